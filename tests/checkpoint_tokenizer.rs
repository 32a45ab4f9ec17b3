//! Which tokenizer a run's checkpoints carry (`llava_trainer::io::checkpoint_tokenizer`, issue 31):
//! the model folder's, else the run's `--tokenizer`, else the manifest's file when its SHA-256
//! matches; with none, advice naming why and how to add one. (The README's path, in
//! `readme.rs`, checks the manifest case end to end with the binaries.)

use std::path::Path;

use llava_e2e::*;
use llava_formats::manifest::Manifest;
use llava_trainer::io::checkpoint_tokenizer::{resolve, TokenizerSource};
use llava_trainer::io::init::ModelSource;

fn sha256_of(path: &Path) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(std::fs::read(path).expect("read")))
}

fn manifest(path: Option<&Path>, sha: &str) -> Manifest {
    let mut m = Manifest::for_shards("test", Vec::new(), 1, 1, 336);
    m.tokenizer_path = path.map(|p| p.display().to_string());
    m.tokenizer_sha256 = sha.to_string();
    m
}

fn source(model: Option<&Path>) -> ModelSource {
    ModelSource {
        model: model.map(Path::to_path_buf),
        llm: None,
        vision: None,
        projector: None,
    }
}

#[test]
fn model_folder_then_run_flag_then_manifest() {
    let (dir, _guard) = scratch_removed_on_success("ck-tokenizer");
    let tok = dir.join("tok.json");
    std::fs::write(&tok, b"{}").expect("write");
    let sha = sha256_of(&tok);
    let model = dir.join("model");
    std::fs::create_dir(&model).expect("mkdir");
    let m = manifest(Some(&tok), &sha);

    // No tokenizer in the model folder: the manifest's file, its SHA-256 matching.
    assert_eq!(
        resolve(&source(Some(&model)), None, &m),
        TokenizerSource::Manifest(tok.clone())
    );
    // The run's --tokenizer before the manifest's.
    let flag = dir.join("flag.json");
    std::fs::write(&flag, b"{}").expect("write");
    assert_eq!(
        resolve(&source(Some(&model)), Some(&flag), &m),
        TokenizerSource::RunConfig(flag.clone())
    );
    // The model folder's own tokenizer before both.
    std::fs::write(model.join("tokenizer.json"), b"{}").expect("write");
    assert_eq!(
        resolve(&source(Some(&model)), Some(&flag), &m),
        TokenizerSource::ModelFolder(model.clone())
    );
}

#[test]
fn says_how_to_add_one_when_none_fits() {
    let (dir, _guard) = scratch_removed_on_success("ck-tokenizer-missing");
    let tok = dir.join("tokenizer.json");
    std::fs::write(&tok, b"{\"changed\": 1}").expect("write");
    let model = dir.join("model");
    std::fs::create_dir(&model).expect("mkdir");
    for (m, why) in [
        (manifest(Some(&tok), "00"), "has SHA-256"),
        (
            manifest(Some(&dir.join("gone.json")), "00"),
            "cannot be read",
        ),
        (manifest(None, "00"), "names no tokenizer file"),
    ] {
        let TokenizerSource::Missing(advice) = resolve(&source(Some(&model)), None, &m) else {
            panic!("no tokenizer fits");
        };
        assert!(advice.contains(why), "{advice}");
        assert!(advice.contains("has no tokenizer.json"), "{advice}");
        assert!(advice.contains("--tokenizer"), "{advice}");
    }
}

/// The manifest names a file: a lone `tok.json` brings no companions; a `tokenizer.json` in an
/// HF tokenizer folder brings its `tokenizer_config.json` along.
#[test]
fn writes_from_a_tokenizer_file() {
    let (dir, _guard) = scratch_removed_on_success("ck-tokenizer-file");
    let tokenizer = serde_json::json!({
        "added_tokens": [{"id": 5, "content": "<|eot_id|>", "special": true}],
        "model": {"vocab": {"a": 0, "b": 1, "c": 2, "d": 3, "e": 4}},
    });
    let lone = dir.join("tok.json");
    std::fs::write(&lone, tokenizer.to_string()).expect("write");
    std::fs::write(dir.join("tokenizer_config.json"), r#"{"bos_token": "<s>"}"#).expect("write");
    let read = |p: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p).expect("read")).expect("json")
    };
    for (src, companions) in [(lone, false), (dir.join("tokenizer.json"), true)] {
        std::fs::write(&src, tokenizer.to_string()).expect("write");
        let dst = dir.join(format!("out-{companions}"));
        std::fs::create_dir(&dst).expect("mkdir");
        let wrote = llava_trainer::io::hf_tokenizer::write_tokenizer_files(&src, &dst, 6, 64)
            .expect("writes");
        assert!(wrote);
        let tok = read(&dst.join("tokenizer.json"));
        assert!(tok.to_string().contains("\"<image>\""), "{tok}");
        let config = read(&dst.join("tokenizer_config.json"));
        assert_eq!(config.get("bos_token").is_some(), companions, "{config}");
        assert_eq!(config["pad_token"], "<pad>");
    }
}
