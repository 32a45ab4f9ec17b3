//! The llama3-llava-next-8b recipe (`recipes/llama3-llava-next-8b/`), issue 18:
//! - its config files hold the model card's values (so they cannot drift);
//! - tiny base models in the published layouts (Llama: sharded safetensors + index; CLIP:
//!   `pytorch_model.bin` as the OpenAI repositories ship it, a safetensors `CLIPModel`, a sharded
//!   `.bin` `CLIPVisionModel` with its index) assemble to the same model, and init → stage 1 →
//!   stage 2 run through the recipe's own files laid out as `run.sh` lays them (only sizes
//!   overridden for the tiny model), stage 2 starting from stage 1's projector.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use llava_data::shard_build::{build, BuildOptions, Partition};
use llava_e2e::*;
use llava_trainer::io::checkpoint;
use llava_trainer::io::init::{self, InitSpec, ModelSource};
use llava_trainer::train::{self, RunOptions, TrainConfig};

fn recipe_dir() -> PathBuf {
    repo_root().join("recipes/llama3-llava-next-8b")
}

fn read_toml(path: &Path) -> toml::Table {
    toml::from_str(&std::fs::read_to_string(path).expect("read toml")).expect("parse toml")
}

/// `llava-trainer run --config FILE` semantics: path keys relative to the file's folder.
fn train_config(path: &Path, overrides: &[(&str, toml::Value)]) -> TrainConfig {
    let mut t = read_toml(path);
    train::resolve_paths(&mut t, path.parent().unwrap());
    for (k, v) in overrides {
        t.insert(k.to_string(), v.clone());
    }
    toml::Value::Table(t)
        .try_into()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn recipe_configs_hold_the_model_cards_values() {
    let dir = recipe_dir();
    // Stage 1 (the reference's pretrain_clip.sh, spec §7.5).
    let p = train_config(&dir.join("pretrain.toml"), &[]);
    assert_eq!(p.tunable_parts, "mm_mlp_adapter");
    assert_eq!(
        p.merge_type,
        Some(llava_trainer::model::config::MergeType::Flat)
    );
    assert_eq!(p.lr, 1e-3);
    assert_eq!(p.vision_tower_lr, None);
    assert_eq!(p.weight_decay, 0.0);
    assert_eq!(p.warmup_ratio, 0.03);
    assert_eq!(p.max_grad_norm, 1.0);
    assert_eq!(p.batch_size, Some(16));
    assert_eq!((p.grad_accum, p.epochs, p.max_steps), (1, 1, None));
    assert_eq!((p.seed, p.bf16, p.workers), (42, true, 16));
    assert_eq!(p.source.model, Some(dir.join("base-model")));
    // Stage 2 (the model card's recipe, spec §7.1-§7.3).
    let f = train_config(&dir.join("finetune.toml"), &[]);
    assert_eq!(
        f.tunable_parts,
        "mm_vision_tower,mm_mlp_adapter,mm_language_model"
    );
    assert_eq!(
        f.merge_type,
        Some(llava_trainer::model::config::MergeType::SpatialUnpad)
    );
    assert_eq!(f.lr, 1e-5);
    assert_eq!(f.vision_tower_lr, Some(2e-6));
    assert_eq!(f.weight_decay, 0.0);
    assert_eq!(f.warmup_ratio, 0.03);
    assert_eq!(f.max_grad_norm, 1.0);
    assert_eq!(f.batch_size, Some(4));
    assert_eq!((f.grad_accum, f.epochs, f.max_steps), (1, 1, None));
    assert_eq!((f.seed, f.bf16, f.workers), (42, true, 16));
    assert_eq!((f.save_every, f.save_total_limit), (Some(3000), Some(1)));
    assert!(f.gradient_checkpointing);
    assert_eq!(f.source.model, Some(dir.join("base-model")));
    // --pretrain_mm_mlp_adapter: stage 1's projector file.
    assert_eq!(
        f.source.projector,
        Some(dir.join("runs/stage1").join(checkpoint::PROJECTOR_FILE))
    );
    assert_eq!(p.output, dir.join("runs/stage1"));
    // The loader default is the recipe's too.
    let d = TrainConfig::new("s".into(), "m".into(), "o".into());
    assert_eq!(d.workers, 16, "`run`'s default loader workers");

    // Data: BLIP-558K `plain`/square/flat at 16 per device; the mixture with anyres, the recipe's
    // grids, spatial_unpad, 8192 tokens, 4 per device.
    let dp = read_toml(&dir.join("datasets-pretrain.toml"));
    let int = |t: &toml::Table, k: &str| t[k].as_integer().unwrap_or_else(|| panic!("{k}"));
    let s = |t: &toml::Table, k: &str| t[k].as_str().unwrap_or_else(|| panic!("{k}")).to_string();
    assert_eq!(int(&dp, "batch_size"), 16);
    assert_eq!(int(&dp, "model_max_length"), 8192);
    assert_eq!(s(&dp, "mm_patch_merge_type"), "flat");
    let src = dp["sources"].as_array().unwrap();
    assert_eq!(src.len(), 1);
    let src = src[0].as_table().unwrap();
    assert_eq!(s(src, "template"), "plain");
    assert_eq!(s(src, "image_aspect_ratio"), "square");
    assert!(s(src, "json").ends_with("/blip_laion_cc_sbu_558k.json"));
    let df = read_toml(&dir.join("datasets-finetune.toml"));
    assert_eq!(int(&df, "batch_size"), 4);
    assert_eq!(int(&df, "model_max_length"), 8192);
    assert_eq!(s(&df, "mm_patch_merge_type"), "spatial_unpad");
    assert_eq!(
        s(&df, "image_grid_pinpoints"),
        "[(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]"
    );
    for src in df["sources"].as_array().unwrap() {
        let src = src.as_table().unwrap();
        assert_eq!(s(src, "template"), "llava_llama_3");
        assert_eq!(s(src, "image_aspect_ratio"), "anyres");
    }
    for t in [&dp, &df] {
        assert_eq!(int(t, "group_size") % int(t, "batch_size"), 0);
        assert_eq!(
            s(t, "tokenizer"),
            "models/Meta-Llama-3-8B-Instruct/tokenizer.json"
        );
    }
    // The script launches both stages under torchrun with the GPU count as a variable.
    let sh = std::fs::read_to_string(dir.join("run.sh")).unwrap();
    assert!(sh.contains("--no-python --nproc-per-node \"$NGPU\" \"$LLAVA_TRAINER\" run"));
    for c in [
        "--config pretrain.toml",
        "--config finetune.toml",
        "datasets-pretrain.toml",
        "datasets-finetune.toml",
        "init --llm",
    ] {
        assert!(sh.contains(c), "run.sh: {c}");
    }
}

/// Tiny model weights under canonical names (the tests' tiny geometry, Llama-3's vocabulary).
fn tiny_weights() -> (llava_trainer::LlavaNextConfig, BTreeMap<String, Tensor>) {
    let spec: InitSpec = serde_json::from_value(serde_json::json!({
        "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
                          "num_attention_heads": 2, "image_size": 336, "patch_size": 14},
        "text_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128320,
                        "max_position_embeddings": 8192},
        "seed": 5
    }))
    .unwrap();
    let (cfg, varmap) = init::random_model(&spec).expect("init");
    let data = varmap.data().lock().unwrap();
    let w = data
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    (cfg, w)
}

fn save_st(path: &Path, t: &[(String, Tensor)]) {
    let m: HashMap<String, Tensor> = t.iter().cloned().collect();
    candle_core::safetensors::save(&m, path).expect("save safetensors");
}

/// Writes the Hub layouts: `llm` (sharded safetensors + index) and three CLIP folders.
fn write_base_models(models: &Path) -> (PathBuf, [PathBuf; 3]) {
    let (cfg, w) = tiny_weights();
    let llm = models.join("Meta-Llama-3-8B-Instruct");
    std::fs::create_dir_all(&llm).unwrap();
    // Llama-3's own vocabulary: init grows it to 128320 for `<image>` and `<pad>`.
    let mut text = serde_json::to_value(&cfg.text_config).unwrap();
    text["vocab_size"] = 128256.into();
    text["architectures"] = serde_json::json!(["LlamaForCausalLM"]);
    text["model_type"] = "llama".into();
    std::fs::write(llm.join("config.json"), text.to_string()).unwrap();
    std::fs::copy(tokenizer_path(), llm.join("tokenizer.json")).unwrap();
    let (mut shard1, mut shard2) = (Vec::new(), Vec::new());
    let mut weight_map = serde_json::Map::new();
    for (k, t) in &w {
        let Some(hf) = k.strip_prefix("language_model.") else {
            continue;
        };
        let (shard, file) = if hf.starts_with("model.embed_tokens") || hf.contains("layers.0.") {
            (&mut shard1, "model-00001-of-00002.safetensors")
        } else {
            (&mut shard2, "model-00002-of-00002.safetensors")
        };
        let t = if hf.contains("embed_tokens") || hf.contains("lm_head") {
            t.narrow(0, 0, 128256).unwrap()
        } else {
            t.clone()
        };
        shard.push((hf.to_string(), t));
        weight_map.insert(hf.into(), file.into());
    }
    save_st(&llm.join("model-00001-of-00002.safetensors"), &shard1);
    save_st(&llm.join("model-00002-of-00002.safetensors"), &shard2);
    std::fs::write(
        llm.join("model.safetensors.index.json"),
        serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map}).to_string(),
    )
    .unwrap();

    // CLIP: the vision tower's keys as `vision_model.*`, plus what a full CLIPModel has.
    let vision: Vec<(String, Tensor)> = w
        .iter()
        .filter_map(|(k, t)| {
            k.strip_prefix("vision_tower.")
                .map(|r| (r.to_string(), t.clone()))
        })
        .collect();
    let dev = Device::Cpu;
    let mut full = vision.clone();
    full.extend([
        (
            "text_model.embeddings.token_embedding.weight".to_string(),
            Tensor::ones((10, 8), DType::F32, &dev).unwrap(),
        ),
        (
            "text_model.final_layer_norm.weight".into(),
            Tensor::ones(8, DType::F32, &dev).unwrap(),
        ),
        ("logit_scale".into(), Tensor::new(4.6f32, &dev).unwrap()),
        (
            "visual_projection.weight".into(),
            Tensor::zeros((4, 32), DType::F32, &dev).unwrap(),
        ),
        (
            "text_projection.weight".into(),
            Tensor::zeros((4, 8), DType::F32, &dev).unwrap(),
        ),
        // Old transformers saved this buffer (int64); the OpenAI .bin files have it.
        (
            "vision_model.embeddings.position_ids".into(),
            Tensor::arange(0i64, 577, &dev)
                .unwrap()
                .unsqueeze(0)
                .unwrap(),
        ),
    ]);
    let vc = serde_json::to_value(&cfg.vision_config).unwrap();
    let clip_model = serde_json::json!({
        "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 4,
        "text_config": {"hidden_size": 8, "vocab_size": 10}, "vision_config": vc,
    });
    let clip_vision = {
        let mut v = vc.clone();
        v["architectures"] = serde_json::json!(["CLIPVisionModel"]);
        v["model_type"] = "clip_vision_model".into();
        v
    };
    let bin = models.join("clip-vit-large-patch14-336");
    let st = models.join("clip-safetensors");
    let sharded = models.join("clip-vision-sharded-bin");
    for d in [&bin, &st, &sharded] {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(bin.join("config.json"), clip_model.to_string()).unwrap();
    write_torch_zip(&bin.join("pytorch_model.bin"), &full);
    std::fs::write(st.join("config.json"), clip_model.to_string()).unwrap();
    save_st(&st.join("model.safetensors"), &full);
    std::fs::write(sharded.join("config.json"), clip_vision.to_string()).unwrap();
    let half = vision.len() / 2;
    let mut weight_map = serde_json::Map::new();
    for (i, part) in [&vision[..half], &vision[half..]].into_iter().enumerate() {
        let file = format!("pytorch_model-0000{}-of-00002.bin", i + 1);
        write_torch_zip(&sharded.join(&file), part);
        for (k, _) in part {
            weight_map.insert(k.clone(), file.clone().into());
        }
    }
    std::fs::write(
        sharded.join("pytorch_model.bin.index.json"),
        serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map}).to_string(),
    )
    .unwrap();
    (llm, [bin, st, sharded])
}

fn load_st(path: &Path) -> BTreeMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .collect()
}

fn same(a: &Tensor, b: &Tensor) -> bool {
    let f = |t: &Tensor| {
        t.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    a.dims() == b.dims() && f(a) == f(b)
}

/// Copies a recipe file into `work` with some top-level keys replaced.
fn copy_with(name: &str, work: &Path, set: &[(&str, toml::Value)]) -> PathBuf {
    let mut t = read_toml(&recipe_dir().join(name));
    for (k, v) in set {
        t.insert(k.to_string(), v.clone());
    }
    let out = work.join(name);
    std::fs::write(&out, toml::to_string(&t).unwrap()).unwrap();
    out
}

/// Both stages through the published layouts, then HF transformers loads the final checkpoint
/// (no missing or unexpected keys, every tensor equal) and runs a forward pass, with the test
/// venv's torch, transformers and safetensors (`test_support::torch_python`).
#[test]
fn published_layouts_through_both_stages() {
    let dir = scratch("recipe");
    let _cleanup = RemoveOnSuccess(dir.clone());
    recipe_pipeline(&dir);
    let Some(python) = llava_test_support::torch_python() else {
        return;
    };
    let out = std::process::Command::new(&python)
        .arg(repo_root().join("tests/hf_load_check.py"))
        .arg(dir.join("runs/stage2/checkpoint-1"))
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", python.display()));
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "{} tests/hf_load_check.py failed",
        python.display()
    );
    assert!(text.contains("loading info {}") && text.contains("mismatched 0"));
    assert!(text.contains("finite True"));
}

/// Everything `run.sh` does, on tiny models, with the recipe's files; returns after stage 2.
fn recipe_pipeline(work: &Path) {
    let work = work.to_path_buf();
    let f = fixtures();
    // run.sh's layout: WORK/{data,models}/ beside the configs.
    let (llm, clips) = write_base_models(&work.join("models"));
    let pre = work.join("data/LLaVA-Pretrain");
    let next = work.join("data/LLaVA-NeXT-Data/llava_next_raw_format");
    std::fs::create_dir_all(&pre).unwrap();
    std::fs::create_dir_all(next.parent().unwrap()).unwrap();
    std::fs::copy(
        f.join("data/blip_laion_cc_sbu_558k.json"),
        pre.join("blip_laion_cc_sbu_558k.json"),
    )
    .unwrap();
    std::os::unix::fs::symlink(
        f.join("images/llava/llava_pretrain/images"),
        pre.join("images"),
    )
    .unwrap();
    std::os::unix::fs::symlink(f.join("images/coco/train2017"), &next).unwrap();
    std::fs::copy(
        f.join("data/llava_instruct_150k.json"),
        work.join("data/LLaVA-NeXT-Data/llava_instruct_150k.json"),
    )
    .unwrap();

    // init: every CLIP layout gives the same model.
    let mut models = Vec::new();
    for (i, clip) in clips.iter().enumerate() {
        let src = ModelSource {
            model: None,
            llm: Some(llm.clone()),
            vision: Some(clip.clone()),
            projector: None,
        };
        let (cfg, varmap) = init::load_source(&src, 0, DType::F32, &Device::Cpu)
            .unwrap_or_else(|e| panic!("{}: {e}", clip.display()));
        let out = work.join(if i == 0 {
            "base-model".to_string()
        } else {
            format!("base-model-{i}")
        });
        checkpoint::save_hf_model(&out, &cfg, &varmap, Some(&llm)).expect("save");
        models.push(load_st(&out.join("model.safetensors")));
    }
    for (i, m) in models.iter().enumerate().skip(1) {
        assert_eq!(m.len(), models[0].len());
        for (k, t) in m {
            assert!(same(t, &models[0][k]), "{k}: CLIP layout {i} differs");
        }
    }
    let base = &models[0];
    assert_eq!(
        base["language_model.model.embed_tokens.weight"].dims(),
        [128320, 64]
    );
    let (_, w) = tiny_weights();
    for (k, t) in &w {
        if k.starts_with("vision_tower.") || k.contains("layers.") {
            assert!(same(t, &base[k]), "{k}: not the source's value");
        }
    }

    // Data, from the recipe's files: only the sizes (and, for stage 2, a sample) changed.
    let small = |b: i64| {
        vec![
            ("batch_size", toml::Value::Integer(b)),
            ("group_size", toml::Value::Integer(b)),
        ]
    };
    let opts = BuildOptions {
        output: None,
        partition: Partition::WHOLE,
        progress: false,
    };
    build(
        &copy_with("datasets-pretrain.toml", &work, &small(2)),
        &opts,
    )
    .expect("stage-1 build");
    // The fixture stands in for the mixture's JSON; 4 samples keep the CPU step short.
    let mut set = small(2);
    let mut srcs = read_toml(&recipe_dir().join("datasets-finetune.toml"))["sources"].clone();
    let s0 = srcs.as_array_mut().unwrap()[0].as_table_mut().unwrap();
    s0.insert(
        "json".into(),
        "data/LLaVA-NeXT-Data/llava_instruct_150k.json".into(),
    );
    s0.insert("sampling".into(), "first:4".into());
    set.push(("sources", srcs));
    build(&copy_with("datasets-finetune.toml", &work, &set), &opts).expect("stage-2 build");

    // Stage 1 and stage 2 from the recipe's training files (CPU: f32, a few steps).
    let cpu = |steps: i64| {
        vec![
            ("batch_size", toml::Value::Integer(2)),
            ("max_steps", toml::Value::Integer(steps)),
            ("bf16", toml::Value::Boolean(false)),
            ("workers", toml::Value::Integer(2)),
        ]
    };
    let c1 = train_config(&copy_with("pretrain.toml", &work, &[]), &cpu(3));
    let s1 = train::run(&c1, RunOptions::default()).expect("stage 1");
    assert_eq!(s1.steps_done, 3);
    let proj = load_st(&work.join("runs/stage1").join(checkpoint::PROJECTOR_FILE));
    let c2 = train_config(&copy_with("finetune.toml", &work, &[]), &cpu(1));
    assert_eq!(
        c2.source.projector.as_deref(),
        Some(
            work.join("runs/stage1")
                .join(checkpoint::PROJECTOR_FILE)
                .as_path()
        )
    );
    let s2 = train::run(&c2, RunOptions::default()).expect("stage 2");
    assert_eq!(s2.steps_done, 1);
    assert_eq!(s2.history[0].lr, 0.0, "lr 0 at the first step");
    // After one step at lr 0 (weight decay 0) every weight is what stage 2 started from: the
    // projector is stage 1's, not the base model's, and the rest is the base model.
    let ck = load_st(&work.join("runs/stage2/checkpoint-1/model.safetensors"));
    for (i, j) in [("0", "1"), ("2", "2")] {
        for p in ["weight", "bias"] {
            let k = format!("multi_modal_projector.linear_{j}.{p}");
            let stage1 = &proj[&format!("model.mm_projector.{i}.{p}")];
            assert!(same(&ck[&k], stage1), "{k}: not stage 1's projector");
            assert!(!same(stage1, &base[&k]), "{k}: stage 1 did not train it");
        }
    }
    for (k, t) in &ck {
        if !k.starts_with("multi_modal_projector") {
            assert!(same(t, &base[k]), "{k}: not the base model's");
        }
    }
}
