//! Weight loading from every supported key layout, sharded checkpoints, separate LLM / CLIP /
//! projector files, clear errors, and the save → load round trip.

use crate::common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use llava_trainer::io::weights::{self, LoadOptions};
use llava_trainer::Error;

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("llava-trainer-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("tmp dir");
    d
}

/// `(checkpoint_key, llava_hf_hub_key, original_llava_next_key)` of every fixture tensor.
fn key_mapping(dir: &Path) -> Vec<(String, String, String)> {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("key_mapping.json")).expect("read"))
            .expect("json");
    v.as_array()
        .expect("array")
        .iter()
        .map(|e| {
            let s = |k: &str| e[k].as_str().expect(k).to_string();
            (
                s("checkpoint_key"),
                s("llava_hf_hub_key"),
                s("original_llava_next_key"),
            )
        })
        .collect()
}

fn fixture_tensors(dir: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("model/model.safetensors"), &Device::Cpu)
        .expect("model")
}

fn save(map: &HashMap<String, Tensor>, path: &Path) {
    candle_core::safetensors::save(map, path).expect("save");
}

/// All parameters of two VarMaps are bit-identical.
fn assert_same(a: &candle_nn::VarMap, b: &candle_nn::VarMap) {
    let a = a.data().lock().expect("a").clone();
    let b = b.data().lock().expect("b").clone();
    assert_eq!(a.len(), b.len());
    for (k, va) in &a {
        let vb = b.get(k).unwrap_or_else(|| panic!("{k} missing"));
        let d = (va.as_tensor() - vb.as_tensor())
            .and_then(|t| t.abs())
            .and_then(|t| t.max_all())
            .and_then(|t| t.to_dtype(DType::F32))
            .and_then(|t| t.to_scalar::<f32>())
            .expect("diff");
        assert_eq!(d, 0.0, "{k}");
    }
}

#[test]
fn every_layout_loads_the_same_parameters() {
    let fx = common::load_fixture();
    let opts = LoadOptions::default();
    let (reference, _) =
        weights::load_varmap(&fx.cfg, &[fx.dir.join("model")], &opts).expect("ref");
    let tensors = fixture_tensors(&fx.dir);
    let mapping = key_mapping(&fx.dir);
    let tmp = tmpdir("layouts");

    // llava-hf hub layout (with `vision_model.`), sharded with an index.
    let hub: Vec<(String, Tensor)> = mapping
        .iter()
        .map(|(ck, hub, _)| (hub.clone(), tensors[ck].clone()))
        .collect();
    let (a, b) = hub.split_at(hub.len() / 2);
    let hub_dir = tmp.join("hub");
    std::fs::create_dir_all(&hub_dir).expect("dir");
    let mut weight_map = serde_json::Map::new();
    for (i, part) in [a, b].iter().enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", i + 1);
        save(&part.iter().cloned().collect(), &hub_dir.join(&file));
        for (k, _) in part.iter() {
            weight_map.insert(k.clone(), file.clone().into());
        }
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
    std::fs::write(
        hub_dir.join("model.safetensors.index.json"),
        index.to_string(),
    )
    .expect("index");
    let (vm, _) = weights::load_varmap(&fx.cfg, &[hub_dir], &opts).expect("hub layout");
    assert_same(&reference, &vm);

    // Original LLaVA-NeXT layout, one file.
    let orig: HashMap<String, Tensor> = mapping
        .iter()
        .map(|(ck, _, o)| (o.clone(), tensors[ck].clone()))
        .collect();
    let orig_path = tmp.join("orig.safetensors");
    save(&orig, &orig_path);
    let (vm, _) = weights::load_varmap(&fx.cfg, &[orig_path], &opts).expect("original layout");
    assert_same(&reference, &vm);

    // Separate Llama, CLIP (with a text tower to ignore) and projector checkpoints.
    let mut llm = HashMap::new();
    let mut clip = HashMap::new();
    let mut proj = HashMap::new();
    for (ck, _, o) in &mapping {
        let t = tensors[ck].clone();
        if let Some(r) = o.strip_prefix("model.vision_tower.vision_tower.") {
            clip.insert(r.to_string(), t);
        } else if o.starts_with("model.mm_projector.") {
            proj.insert(o.clone(), t);
        } else if o != "model.image_newline" {
            llm.insert(o.clone(), t);
        }
    }
    clip.insert(
        "text_model.embeddings.token_embedding.weight".into(),
        Tensor::zeros((4, 4), DType::F32, &Device::Cpu).expect("z"),
    );
    let paths = [
        tmp.join("llm.safetensors"),
        tmp.join("clip.safetensors"),
        tmp.join("proj.safetensors"),
    ];
    save(&llm, &paths[0]);
    save(&clip, &paths[1]);
    save(&proj, &paths[2]);
    let err = weights::load_varmap(&fx.cfg, &paths, &opts)
        .err()
        .expect("image_newline missing");
    assert!(
        matches!(&err, Error::MissingTensor { name, .. } if name == "image_newline"),
        "{err}"
    );
    let fresh = LoadOptions {
        init_missing_projector: true,
        ..LoadOptions::default()
    };
    let (model, vm, report) = weights::load(&fx.cfg, &paths, &fresh).expect("separate files");
    assert_eq!(report.initialised, vec!["image_newline".to_string()]);
    assert!(report.ignored.iter().any(|k| k.starts_with("text_model.")));
    assert_eq!(vm.all_vars().len(), reference.all_vars().len());
    drop(model);

    // Without the projector file: a fresh projector (pretraining start).
    let (_, vm, report) = weights::load(&fx.cfg, &paths[..2], &fresh).expect("fresh projector");
    assert_eq!(report.initialised.len(), 5);
    weights::check_complete(&fx.cfg, &vm).expect("complete");
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn missing_and_misshaped_tensors_are_named() {
    let fx = common::load_fixture();
    let mut tensors = fixture_tensors(&fx.dir);
    let tmp = tmpdir("errors");
    let key = "language_model.model.layers.1.mlp.up_proj.weight";
    let t = tensors.remove(key).expect("present");
    let path = tmp.join("missing.safetensors");
    save(&tensors, &path);
    let err = weights::load_varmap(
        &fx.cfg,
        std::slice::from_ref(&path),
        &LoadOptions::default(),
    )
    .err()
    .expect("missing");
    assert!(
        err.to_string().contains(key) && err.to_string().contains("missing.safetensors"),
        "{err}"
    );

    tensors.insert(key.into(), t.narrow(0, 0, 8).expect("narrow"));
    save(&tensors, &path);
    let err = weights::load_varmap(&fx.cfg, &[path], &LoadOptions::default())
        .err()
        .expect("shape");
    let msg = err.to_string();
    // Shapes from the fixture's config, so any valid LLAVA_PARITY_FIXTURE works.
    let (inter, hidden) = (
        fx.cfg.text_config.intermediate_size,
        fx.cfg.text_config.hidden_size,
    );
    assert!(
        msg.contains(key)
            && msg.contains(&format!("[8, {hidden}]"))
            && msg.contains(&format!("[{inter}, {hidden}]")),
        "{msg}"
    );
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn save_writes_hf_legacy_layout_and_round_trips() {
    let fx = common::load_fixture();
    let opts = LoadOptions::default();
    let (_, vm, _) = weights::load(&fx.cfg, &[fx.dir.join("model")], &opts).expect("load");
    let tmp = tmpdir("save");
    let out = tmp.join("model.safetensors");
    weights::save(&vm, &out).expect("save");
    let saved = candle_core::safetensors::load(&out, &Device::Cpu).expect("read back");
    let hub: Vec<String> = key_mapping(&fx.dir)
        .into_iter()
        .map(|(_, h, _)| h)
        .collect();
    let mut names: Vec<String> = saved.keys().cloned().collect();
    names.sort();
    let mut hub_sorted = hub.clone();
    hub_sorted.sort();
    assert_eq!(names, hub_sorted, "saved names are the llava-hf hub names");
    let (_, back, _) = weights::load(&fx.cfg, std::slice::from_ref(&tmp), &opts).expect("reload");
    assert_same(&vm, &back);

    // bf16 parameters load, and save in bf16.
    let bf = LoadOptions {
        dtype: DType::BF16,
        ..LoadOptions::default()
    };
    let (model, vm, _) = weights::load(&fx.cfg, &[fx.dir.join("model")], &bf).expect("bf16");
    assert!(vm.all_vars().iter().all(|v| v.dtype() == DType::BF16));
    let out = model.forward(&fx.batch()).expect("bf16 forward");
    let loss = out.loss.expect("loss").to_scalar::<f32>().expect("scalar");
    let want = fx.expected["loss"].to_scalar::<f32>().expect("loss");
    println!("bf16 parameters: loss {loss} vs f32 reference {want}");
    assert!((loss - want).abs() < 0.1, "{loss} vs {want}");
    let _ = std::fs::remove_dir_all(&tmp);
}

/// `llava-trainer init --from` on a checkpoint as the reference's train.py saves it (original key
/// names, a flat `llava_llama` config.json naming its vision tower) writes the HF layout with the
/// same parameters and the same model shape.
#[test]
fn init_from_a_reference_checkpoint_writes_the_hf_layout() {
    let fx = common::load_fixture();
    let tensors = fixture_tensors(&fx.dir);
    let tmp = tmpdir("from-reference");
    let src = tmp.join("llava-next-reference");
    std::fs::create_dir_all(src.join("clip-tower")).expect("dir");
    let orig: HashMap<String, Tensor> = key_mapping(&fx.dir)
        .iter()
        .map(|(ck, _, o)| (o.clone(), tensors[ck].clone()))
        .collect();
    save(&orig, &src.join("model.safetensors"));
    // The reference's config.json: the Llama fields at the top level plus mm_* keys; its vision
    // tower is a name (here a folder beside it holding a CLIPVisionModel config).
    let hf: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fx.dir.join("model/config.json")).expect("config"),
    )
    .expect("json");
    let mut flat = hf["text_config"].as_object().expect("text_config").clone();
    for (k, v) in [
        ("model_type", serde_json::json!("llava_llama")),
        (
            "architectures",
            serde_json::json!(["LlavaLlamaForCausalLM"]),
        ),
        ("mm_vision_tower", serde_json::json!("clip-tower")),
        ("mm_projector_type", serde_json::json!("mlp2x_gelu")),
        ("mm_vision_select_layer", hf["vision_feature_layer"].clone()),
        ("mm_vision_select_feature", serde_json::json!("patch")),
        ("mm_patch_merge_type", serde_json::json!("spatial_unpad")),
        ("image_aspect_ratio", serde_json::json!("anyres")),
        ("image_token_index", hf["image_token_index"].clone()),
    ] {
        flat.insert(k.into(), v);
    }
    // The reference stores pinpoints as (w, h); HF's config holds them swapped (h, w).
    let pinpoints: Vec<[u32; 2]> =
        serde_json::from_value(hf["image_grid_pinpoints"].clone()).expect("pinpoints");
    let wh: Vec<[u32; 2]> = pinpoints.iter().map(|[a, b]| [*b, *a]).collect();
    flat.insert("image_grid_pinpoints".into(), serde_json::json!(wh));
    std::fs::write(
        src.join("config.json"),
        serde_json::Value::Object(flat).to_string(),
    )
    .expect("config");
    std::fs::write(
        src.join("clip-tower/config.json"),
        hf["vision_config"].to_string(),
    )
    .expect("clip config");

    let out = tmp.join("hf");
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_llava-trainer"))
        .args(["init", "--from"])
        .arg(&src)
        .arg("--output")
        .arg(&out)
        .output()
        .expect("llava-trainer starts");
    assert!(
        run.status.success(),
        "init --from failed: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    let cfg = llava_trainer::model::config::LlavaNextConfig::from_file(out.join("config.json"))
        .expect("HF config");
    assert_eq!(cfg.text_config.vocab_size, fx.cfg.text_config.vocab_size);
    assert_eq!(cfg.image_token_index, fx.cfg.image_token_index);
    assert_eq!(cfg.image_grid_pinpoints, fx.cfg.image_grid_pinpoints);
    assert_eq!(
        serde_json::to_value(&cfg.vision_config).expect("json"),
        serde_json::to_value(&fx.cfg.vision_config).expect("json")
    );
    let opts = LoadOptions::default();
    let (reference, _) =
        weights::load_varmap(&fx.cfg, &[fx.dir.join("model")], &opts).expect("fixture");
    let (converted, _) =
        weights::load_varmap(&fx.cfg, std::slice::from_ref(&out), &opts).expect("converted");
    assert_same(&reference, &converted);
    // Written under HF's legacy names, as the Hub's llava-hf checkpoints are.
    let written = candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu)
        .expect("model.safetensors");
    assert!(written.contains_key("multi_modal_projector.linear_1.weight"));
    assert!(written.keys().all(|k| !k.starts_with("model.mm_projector")));
    let _ = std::fs::remove_dir_all(&tmp);
}
