//! `generate` against HF transformers' `generate` on the parity fixture (`LLAVA_PARITY_FIXTURE`,
//! default tiny-llava-next-a): greedy, 20 new tokens, each sample's prompt and image, token for
//! token with and without the KV cache (goldens in the fixture's generate.json, made by
//! scripts/make-parity-fixture.py). Then all prompts as one left-padded batch: the same tokens.

use crate::common::load_fixture;

use llava_trainer::generate::{generate, GenerateOptions, Prompt, Sampling};
use serde_json::Value;

fn prompts(fx: &crate::common::Fixture) -> (Vec<Prompt>, Vec<Vec<u32>>, Vec<u32>) {
    let path = fx.dir.join("generate.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (make it with --generate-only)", path.display()));
    let doc: Value = serde_json::from_str(&text).expect("generate.json");
    let ids = fx.inputs["input_ids"].to_vec2::<i64>().expect("ids");
    let px = fx.inputs["pixel_values"].clone();
    let mut out = Vec::new();
    let mut want = Vec::new();
    for p in doc["prompts"].as_array().expect("prompts") {
        let i = p["sample"].as_u64().expect("sample") as usize;
        let n = p["prompt_len"].as_u64().expect("prompt_len") as usize;
        let tiles = fx.num_patches[i];
        let cached: Vec<u32> = serde_json::from_value(p["new_tokens_cached"].clone()).unwrap();
        let uncached: Vec<u32> = serde_json::from_value(p["new_tokens_uncached"].clone()).unwrap();
        assert_eq!(cached, uncached, "HF itself: cache on/off differ");
        out.push(Prompt {
            input_ids: ids[i][..n].to_vec(),
            pixel_values: Some(px.get(i).unwrap().narrow(0, 0, tiles).unwrap()),
            images: vec![fx.images[i]],
        });
        want.push(cached);
    }
    let eos = doc["eos_id"].as_u64().expect("eos_id") as u32;
    (out, want, vec![eos])
}

fn opts(stop_ids: &[u32], use_cache: bool) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens: 20,
        sampling: None,
        stop_ids: stop_ids.to_vec(),
        use_cache,
    }
}

#[test]
fn greedy_matches_hf_generate_with_and_without_cache() {
    let fx = load_fixture();
    let (model, _) = fx.model();
    let (prompts, want, stop) = prompts(&fx);
    for use_cache in [true, false] {
        for (p, w) in prompts.iter().zip(&want) {
            let got = generate(&model, std::slice::from_ref(p), &opts(&stop, use_cache))
                .expect("generate");
            assert_eq!(&got[0].tokens, w, "use_cache {use_cache}");
        }
    }
}

#[test]
fn batch_of_different_lengths_gives_the_same_tokens() {
    let fx = load_fixture();
    let (model, _) = fx.model();
    let (prompts, want, stop) = prompts(&fx);
    let got = generate(&model, &prompts, &opts(&stop, true)).expect("generate");
    let lens: Vec<usize> = got.iter().map(|g| g.prompt_tokens).collect();
    assert!(
        lens.iter().any(|&l| l != lens[0]),
        "lengths differ: {lens:?}"
    );
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(&g.tokens, w);
    }
    // Sampling: a seed repeats, and batched equals one at a time.
    let mut o = opts(&stop, true);
    o.sampling = Some(Sampling {
        temperature: 1.0,
        top_p: 0.9,
        seed: 5,
    });
    let batched = generate(&model, &prompts, &o).expect("sample");
    for (p, b) in prompts.iter().zip(&batched) {
        let one = generate(&model, std::slice::from_ref(p), &o).expect("sample one");
        assert_eq!(one[0].tokens, b.tokens);
    }
}

/// The binary end to end on a freshly initialised 336-px model with the Llama-3 tokenizer: an
/// image through the build's tiling, `--json`, the cache off giving the same tokens, and
/// `--input` batching two prompts of different lengths as one at a time.
#[test]
fn cli_generate_json_cache_and_batch() {
    use std::process::Command;
    const BIN: &str = env!("CARGO_BIN_EXE_llava-trainer");
    let root = llava_test_support::repo_root();
    let dir = root
        .join("target/e2e-scratch")
        .join(format!("cli-generate-{}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    std::fs::create_dir_all(&dir).expect("scratch");
    let model = dir.join("model");
    let tok = llava_test_support::tokenizer_path();
    let ok = |out: std::process::Output| {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf8")
    };
    ok(Command::new(BIN)
        .args(["init", "--config"])
        .arg(root.join("trainer/configs/tiny-model.json"))
        .arg("--tokenizer")
        .arg(tok.parent().expect("tokenizer dir"))
        .arg("--output")
        .arg(&model)
        .output()
        .expect("init"));
    let image = root.join("fixtures/images/coco/train2017/000000352481.png");
    let gen = |extra: &[&str]| -> Vec<Value> {
        let out = ok(Command::new(BIN)
            .args([
                "generate",
                "--device",
                "cpu",
                "--json",
                "--max-new-tokens",
                "4",
            ])
            .arg("--model")
            .arg(&model)
            .args(extra)
            .output()
            .expect("generate"));
        out.lines()
            .map(|l| serde_json::from_str(l).expect("json line"))
            .collect()
    };
    let img = image.to_str().expect("path");
    let one = gen(&["--image", img, "--prompt", "What is in the image?"]);
    let v = &one[0];
    assert_eq!(v["new_tokens"], 4);
    assert!(
        v["prompt_tokens"].as_u64().unwrap() > 1000,
        "anyres image tokens: {v}"
    );
    assert!(v["tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(v["answer"].is_string());
    let uncached = gen(&[
        "--image",
        img,
        "--prompt",
        "What is in the image?",
        "--no-cache",
    ]);
    assert_eq!(uncached[0]["tokens"], v["tokens"]);
    let text_only = gen(&["--prompt", "Hello there, how are you today?"]);
    let input = dir.join("prompts.jsonl");
    std::fs::write(
        &input,
        format!(
            "{}\n{}\n",
            serde_json::json!({"id": "a", "prompt": "What is in the image?", "images": [img]}),
            serde_json::json!({"id": "b", "prompt": "Hello there, how are you today?"})
        ),
    )
    .expect("write jsonl");
    let batch = gen(&[
        "--input",
        input.to_str().expect("path"),
        "--batch-size",
        "2",
    ]);
    assert_eq!(batch.len(), 2);
    assert_eq!(batch[0]["id"], "a");
    assert_eq!(batch[0]["batch_size"], 2);
    assert_eq!(batch[0]["tokens"], v["tokens"]);
    assert_eq!(batch[1]["tokens"], text_only[0]["tokens"]);
    std::fs::remove_dir_all(&dir).ok();
}

/// The model folder's chat template rendered as HF's `LlavaNextProcessor.apply_chat_template(…,
/// add_generation_prompt=True)` renders it (fixtures/chat-templates/golden.json, made by
/// scripts/make-chat-template-golden.py with transformers 4.57.6): llava_llama_3's (what our
/// checkpoints carry), Llama-3-Instruct's (string content, BOS in the text) and a multi-line
/// template where trim_blocks, lstrip_blocks and loop controls matter; 0, 1 and 2 images.
#[test]
fn chat_templates_render_as_hf() {
    use llava_trainer::generate::chat_template::ChatTemplate;
    use llava_trainer::generate::prompt;
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures/chat-templates/golden.json");
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let special: Vec<(String, String)> = doc["special_tokens"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
        .collect();
    let cases = doc["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 9);
    for case in cases {
        let name = case["template"].as_str().unwrap();
        // Written to a model folder as HF writes it, then found there.
        let dir = tempfile::tempdir().unwrap();
        let file = if name == "multiline_llava_hf" {
            let p = dir.path().join("chat_template.jinja");
            std::fs::write(&p, doc["templates"][name].as_str().unwrap()).unwrap();
            p
        } else {
            let p = dir.path().join("tokenizer_config.json");
            let mut cfg = serde_json::json!({"chat_template": doc["templates"][name]});
            for (k, v) in &special {
                cfg[k] = Value::String(v.clone());
            }
            std::fs::write(&p, cfg.to_string()).unwrap();
            p
        };
        let t = ChatTemplate::find(dir.path()).unwrap().expect("a template");
        assert_eq!(t.origin, file);
        assert_eq!(
            t.takes_content_parts(),
            !case["string_content"].as_bool().unwrap()
        );
        let n = case["n_images"].as_u64().unwrap() as usize;
        let q = case["question"].as_str().unwrap();
        let text = t.render(q, n).unwrap();
        assert_eq!(
            text,
            case["text"].as_str().unwrap(),
            "{name} with {n} images"
        );
        assert_eq!(t.starts_with_bos(&text), name == "llama3_instruct");
        if name == "llava_llama_3" {
            assert_eq!(text, prompt::llava_llama3_text(q, n), "the built-in format");
        }
    }
}

/// Image files at a tile size other than 336 px: HF's `LlavaNextImageProcessor` (PIL path) at
/// the fixture's 56-px tiles, against its own output (`preprocess.pixel_values_pil_backend`),
/// with the grid and tile count HF chose: every tile bit-exact (sample 1's base tile, 50x130
/// squashed to 56x56, needs Pillow 13's vertical-first order).
#[test]
fn image_files_at_other_tile_sizes_match_hf_image_processor() {
    use llava_trainer::generate::prompt::{load_image, Aspect};
    let fx = load_fixture();
    let want = &fx.expected["preprocess.pixel_values_pil_backend"];
    let max_abs = |a: &candle_core::Tensor, b: &candle_core::Tensor| {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    for i in 0..fx.num_patches.len() {
        let path = fx.dir.join(format!("images/sample{i}.png"));
        let (px, meta) =
            load_image(&path, &fx.cfg, Aspect::Anyres, &candle_core::Device::Cpu).expect("tiles");
        assert_eq!(meta, fx.images[i], "sample {i}: grid");
        for k in 0..meta.num_tiles {
            let d = max_abs(&px.get(k).unwrap(), &want.get(i).unwrap().get(k).unwrap());
            println!("sample {i} tile {k}: max |ours - HF| {d:e}");
            assert!(d == 0.0, "sample {i} tile {k}: max abs diff {d}");
        }
    }
}
