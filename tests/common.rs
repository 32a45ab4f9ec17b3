//! Helpers of the end-to-end tests: fixture mixtures in temporary folders, shard readers.

use std::fs::File;
use std::path::{Path, PathBuf};

use llava_formats::schema::{batch_to_rows, ShardRow};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

pub fn fixtures() -> PathBuf {
    repo_root().join("fixtures")
}

pub fn tokenizer_path() -> PathBuf {
    let path = std::env::var_os("LLAVA_TOKENIZER")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".cache/tokenizer/tokenizer.json"));
    assert!(
        path.exists(),
        "{} is missing: run scripts/fetch-tokenizer.sh (the README's test command does)",
        path.display()
    );
    path
}

/// A fresh, empty folder under the target dir (kept on failure for a look).
pub fn scratch(name: &str) -> PathBuf {
    let dir = repo_root()
        .join("target/e2e-scratch")
        .join(format!("{name}-{}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// Bad records, one per reason, plus one good text record (index 4), in JSONL.
pub const BAD_JSONL: &str = r#"{"id": "broken", "conversations": [
{"id": "missing_image", "image": "nope/none.jpg", "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "x"}]}
{"id": "system_first", "conversations": [{"from": "system", "value": "be nice"}, {"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"}]}
{"id": "corrupt_pixels", "image": "corrupt.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "x"}]}
{"id": "good_text", "conversations": [{"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "Blue."}]}
"#;

/// Writes `datasets.toml` for the fixture mixture (every source style, plus the bad records) into
/// `dir` and returns its path. `extra` is appended to the top-level keys.
pub fn fixture_mixture(dir: &Path, extra: &str) -> PathBuf {
    let f = fixtures();
    std::fs::write(dir.join("bad.jsonl"), BAD_JSONL).unwrap();
    // A PNG whose header is fine and whose pixel data is not: found only when decoding (pass 2).
    let mut png = std::fs::read(f.join("images/coco/train2017/000000352481.png")).unwrap();
    let mid = png.len() / 2;
    png[mid..mid + 4000].fill(0x55);
    std::fs::write(dir.join("corrupt.png"), png).unwrap();
    let text = format!(
        r#"output = "out"
tokenizer = "{tok}"
seed = 7
batch_size = 2
group_size = 4
length_pool_groups = 2
shard_target_mb = 1
{extra}

[[sources]]
name = "blip"
json = "{f}/data/blip_laion_cc_sbu_558k.json"
image_folder = "{f}/images/llava/llava_pretrain/images"
template = "plain"
image_aspect_ratio = "square"

[[sources]]
name = "instruct"
json = "{f}/data/llava_instruct_150k.json"
image_folder = "{f}/images/coco/train2017"
template = "llava_llama_3"

[[sources]]
name = "mix665k"
json = ["{f}/data/llava_v1_5_mix665k.json"]
image_folder = "{f}/images"
template = "llava_llama_3"
image_aspect_ratio = "anyres"

[[sources]]
name = "sharegpt4v"
json = "{f}/data/sharegpt4v.json"
image_folder = "{f}/images"
template = "llava_llama_3"
sampling = "first:4"

[[sources]]
name = "text"
json = "{f}/data/sharegpt_text.json"
template = "llava_llama_3"

[[sources]]
name = "bad"
json = "bad.jsonl"
image_folder = "."
template = "llava_llama_3"
"#,
        tok = tokenizer_path().display(),
        f = f.display(),
    );
    let path = dir.join("datasets.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Every row of a shard, in file order.
pub fn read_shard(path: &Path) -> Vec<ShardRow> {
    let file = File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap();
    reader
        .flat_map(|b| batch_to_rows(&b.unwrap()).unwrap())
        .collect()
}

/// (relative path, bytes) of every file under `dir/shards` plus the manifest and rejects.
pub fn output_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    for name in ["manifest.json", "rejects.jsonl"] {
        files.push((name.to_string(), std::fs::read(dir.join(name)).unwrap()));
    }
    let mut shards: Vec<_> = std::fs::read_dir(dir.join("shards"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    shards.sort();
    for p in shards {
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        files.push((format!("shards/{name}"), std::fs::read(&p).unwrap()));
    }
    files
}
