//! Shared helpers of the pipeline's integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

use llava_data::tokenizer::TextTokenizer;

pub use llava_test_support::{fixtures, repo_root, tokenizer_path};

/// Loaded once per test binary (a 9 MB JSON).
pub fn tokenizer() -> &'static TextTokenizer {
    static TOKENIZER: std::sync::OnceLock<TextTokenizer> = std::sync::OnceLock::new();
    TOKENIZER.get_or_init(|| TextTokenizer::from_file(&tokenizer_path()).expect("tokenizer loads"))
}

pub fn golden_rows(name: &str) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(fixtures().join("golden").join(name)).expect("golden file");
    text.lines()
        .map(|l| serde_json::from_str(l).expect("golden row is JSON"))
        .collect()
}

/// `fixtures/data/datasets.json`: each data file's image folder (relative to `fixtures/data`).
pub fn image_folder_of(file: &str) -> PathBuf {
    let text =
        std::fs::read_to_string(fixtures().join("data/datasets.json")).expect("datasets.json");
    let list: Vec<serde_json::Value> = serde_json::from_str(&text).expect("datasets.json is JSON");
    let entry = list
        .iter()
        .find(|e| e["file"] == file)
        .unwrap_or_else(|| panic!("{file} not in datasets.json"));
    fixtures()
        .join("data")
        .join(entry["image_folder"].as_str().expect("image_folder"))
}

pub fn ints(v: &serde_json::Value) -> Vec<i32> {
    v.as_array()
        .expect("list")
        .iter()
        .map(|x| x.as_i64().expect("int") as i32)
        .collect()
}
