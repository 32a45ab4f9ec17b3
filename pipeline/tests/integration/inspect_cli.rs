//! `llava-data inspect` through the binary, on a small build of two fixture sources.

use crate::common;

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::OnceLock;

use llava_data::build::{build, BuildOptions, Partition};

/// A build of sharegpt4v (anyres, 2x2 grids among them) and sharegpt_text, made once.
fn built() -> &'static PathBuf {
    static OUT: OnceLock<PathBuf> = OnceLock::new();
    OUT.get_or_init(|| {
        let dir = common::repo_root()
            .join("target/e2e-scratch")
            .join(format!("inspect-cli-{}", std::process::id()));
        std::fs::remove_dir_all(&dir).ok();
        std::fs::create_dir_all(&dir).unwrap();
        let f = common::fixtures();
        let config = format!(
            r#"output = "out"
tokenizer = "{tok}"
seed = 3
batch_size = 2
group_size = 4

[[sources]]
name = "sharegpt4v"
json = "{f}/data/sharegpt4v.json"
image_folder = "{f}/images"
template = "llava_llama_3"

[[sources]]
name = "text"
json = "{f}/data/sharegpt_text.json"
template = "llava_llama_3"
"#,
            tok = common::tokenizer_path().display(),
            f = f.display()
        );
        std::fs::write(dir.join("datasets.toml"), config).unwrap();
        let options = BuildOptions {
            output: None,
            partition: Partition::WHOLE,
            progress: false,
        };
        build(&dir.join("datasets.toml"), &options).expect("build succeeds");
        dir.join("out")
    })
}

fn inspect(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_llava-data"))
        .arg("inspect")
        .arg(built())
        .args(args)
        .output()
        .expect("llava-data runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn summary_prints_the_tables() {
    let o = inspect(&[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = stdout(&o);
    for needle in [
        "sharegpt4v",
        "length histogram, image",
        "images by processing and grid",
        "anyres 2x2",
        "padding efficiency",
        "random: seeded shuffle",
    ] {
        assert!(text.contains(needle), "{needle:?} not in\n{text}");
    }
}

#[test]
fn json_parses_and_matches_the_manifest() {
    let o = inspect(&["--json", "--batch-size", "3", "--world-size", "2"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("one JSON object");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(built().join("manifest.json")).unwrap()).unwrap();
    assert_eq!(v["samples"], manifest["totals"]["samples"]);
    assert_eq!(v["tokens"], manifest["totals"]["tokens"]);
    assert_eq!(
        v["supervised_tokens"],
        manifest["totals"]["supervised_tokens"]
    );
    assert_eq!(v["padding"]["batch_size"], 3);
    assert_eq!(v["padding"]["world_size"], 2);
    assert!(
        v["padding"]["total"]["grouped"]["efficiency"]
            .as_f64()
            .unwrap()
            > 0.0
    );
}

#[test]
fn verify_says_ok() {
    let o = inspect(&["--verify"]);
    assert!(o.status.success(), "{}", stdout(&o));
    assert!(stdout(&o).starts_with("OK: "), "{}", stdout(&o));
}

#[test]
fn verify_fails_on_a_flipped_byte_with_the_file_named() {
    let src = built();
    let dir = src.parent().unwrap().join("flipped");
    std::fs::remove_dir_all(&dir).ok();
    std::fs::create_dir_all(dir.join("shards")).unwrap();
    std::fs::copy(src.join("manifest.json"), dir.join("manifest.json")).unwrap();
    for e in std::fs::read_dir(src.join("shards")).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, dir.join("shards").join(p.file_name().unwrap())).unwrap();
    }
    let shard = dir.join("shards/text-00000.parquet");
    let mut bytes = std::fs::read(&shard).unwrap();
    let at = bytes.len() / 3;
    bytes[at] ^= 0x80;
    std::fs::write(&shard, bytes).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_llava-data"))
        .args(["inspect", "--verify"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let text = stdout(&o);
    assert!(text.contains("FAILED"), "{text}");
    assert!(text.contains("shards/text-00000.parquet: sha256"), "{text}");
}

#[test]
fn sample_shows_marked_text_and_writes_tiles_and_plot() {
    let scratch = built().parent().unwrap().to_path_buf();
    let tiles = scratch.join("tiles.png");
    let tok = common::tokenizer_path();
    let o = inspect(&[
        "--sample",
        "sharegpt4v:1",
        "--tokenizer",
        tok.to_str().unwrap(),
        "--tiles",
        tiles.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = stdout(&o);
    // Not a terminal: brackets.
    assert!(text.contains("[[") && text.contains("]]"), "{text}");
    assert!(text.contains("<image: "), "{text}");
    let img = image::open(&tiles).unwrap();
    assert_eq!(img.height() % 336, 0);
    assert!(img.width() >= 336);

    let plot = scratch.join("lengths.png");
    let o = inspect(&["--plot", plot.to_str().unwrap()]);
    assert!(o.status.success());
    let img = image::open(&plot).unwrap();
    assert_eq!(img.width(), llava_data::inspect::plot::WIDTH);
    assert_eq!(img.height(), 2 * llava_data::inspect::plot::PANEL_HEIGHT);

    // No tokenizer: a clear refusal.
    let o = inspect(&["--sample", "sharegpt4v:1"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--tokenizer"));
}

#[test]
fn sample_by_bare_number_is_the_row_in_shard_order() {
    use llava_data::inspect::{sample, BuildDir};
    let b = BuildDir::open(built()).unwrap();
    let total: u64 = b.manifest.shards.iter().map(|s| s.rows).sum();
    let mut seen = Vec::new();
    let mut last = (String::new(), 0);
    for k in 0..total {
        let found = sample::find(&b, &k.to_string(), false).unwrap();
        // Shard order, then row-group order within a shard.
        let shard_pos = |f: &str| b.manifest.shards.iter().position(|s| s.file == f);
        if found.shard == last.0 {
            assert!(found.row_group >= last.1, "row {k}");
        } else {
            assert!(shard_pos(&found.shard) > shard_pos(&last.0), "row {k}");
        }
        last = (found.shard.clone(), found.row_group);
        // The same row as found by its id.
        let by_id = sample::find(&b, &found.row.id, false).unwrap();
        assert_eq!(
            (by_id.shard, by_id.row.index),
            (found.shard, found.row.index)
        );
        seen.push(found.row.id);
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len() as u64, total, "every row once");
    assert!(sample::find(&b, &total.to_string(), false).is_err());

    // As users type it: `--sample 7` is the 8th row.
    let tok = common::tokenizer_path();
    let o = inspect(&["--sample", "7", "--tokenizer", tok.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}
