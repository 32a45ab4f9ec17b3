//! `llava-data build` end to end on the fixture mixture (issue 3's "done when").

use std::collections::HashMap;

use llava_data::shard_build::{assemble::assemble, build, BuildOptions, Partition};
use llava_e2e::*;
use llava_formats::manifest::{Manifest, RejectEntry};
use sha2::{Digest, Sha256};

fn options(partition: Partition) -> BuildOptions {
    BuildOptions {
        output: None,
        partition,
        progress: false,
    }
}

fn build_with_threads(dir: &std::path::Path, threads: usize) -> Manifest {
    let config = fixture_mixture(dir, "");
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    pool.install(|| build(&config, &options(Partition::WHOLE)))
        .expect("build succeeds")
        .manifest
        .expect("a whole build writes the manifest")
}

#[test]
fn manifest_reconciles_and_rows_match_the_goldens() {
    let dir = scratch("reconcile");
    let m = build_with_threads(&dir, 2);
    let out = dir.join("out");

    // Per source: written + rejected = read; sampling applied.
    let by_name: HashMap<&str, _> = m.sources.iter().map(|s| (s.name.as_str(), s)).collect();
    for s in &m.sources {
        assert_eq!(s.written + s.rejected, s.read, "{}", s.name);
    }
    assert_eq!(
        (by_name["sharegpt4v"].in_files, by_name["sharegpt4v"].read),
        (5, 4)
    );
    let bad = by_name["bad"];
    assert_eq!((bad.read, bad.written, bad.rejected), (5, 1, 4));
    for kind in ["invalid_json", "image", "bad_first_role"] {
        assert!(
            bad.rejects_by_kind.contains_key(kind),
            "{kind}: {:?}",
            bad.rejects_by_kind
        );
    }
    // rejects.jsonl lists each reject with its source, index and reason, in record order.
    let rejects: Vec<RejectEntry> = std::fs::read_to_string(out.join("rejects.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ids: Vec<(&str, u64)> = rejects.iter().map(|r| (r.id.as_str(), r.index)).collect();
    assert_eq!(
        ids,
        [
            ("0", 0),
            ("missing_image", 1),
            ("system_first", 2),
            ("corrupt_pixels", 3)
        ]
    );
    assert_eq!(rejects[0].line, Some(1));
    assert!(
        rejects[3].reason.contains("corrupt.png"),
        "{}",
        rejects[3].reason
    );

    // Totals and shard entries agree with the shards' rows.
    let mut rows = Vec::new();
    for shard in &m.shards {
        let bytes = std::fs::read(out.join(&shard.file)).unwrap();
        assert_eq!(bytes.len() as u64, shard.bytes);
        assert_eq!(hex::encode(Sha256::digest(&bytes)), shard.sha256);
        let shard_rows = read_shard(&out.join(&shard.file));
        assert_eq!(shard_rows.len() as u64, shard.rows);
        assert!(
            shard_rows
                .iter()
                .all(|r| r.modality == shard.modality.as_str()),
            "one modality per shard"
        );
        rows.extend(shard_rows);
    }
    assert_eq!(rows.len() as u64, m.totals.samples);
    assert_eq!(
        rows.iter().map(|r| u64::from(r.length)).sum::<u64>(),
        m.totals.tokens
    );
    assert_eq!(
        rows.iter().map(|r| r.tiles.len() as u64).sum::<u64>(),
        m.totals.tiles
    );

    // Rows equal the reference conversions (anyres sources: golden.jsonl; blip plain+square:
    // golden_square.jsonl with the spatial_unpad counts).
    let goldens = [
        ("golden.jsonl", "instruct", "llava_instruct_150k.json", ""),
        ("golden.jsonl", "mix665k", "llava_v1_5_mix665k.json", ""),
        ("golden.jsonl", "sharegpt4v", "sharegpt4v.json", ""),
        ("golden.jsonl", "text", "sharegpt_text.json", ""),
        (
            "golden_square.jsonl",
            "blip",
            "blip_laion_cc_sbu_558k.json",
            "_spatial_unpad",
        ),
    ];
    let mut compared = 0;
    for (golden, source, file, suffix) in goldens {
        let text = std::fs::read_to_string(fixtures().join("golden").join(golden)).unwrap();
        for line in text.lines() {
            let g: serde_json::Value = serde_json::from_str(line).unwrap();
            if g["file"] != file || (source == "blip" && g["template"] != "plain") {
                continue;
            }
            let index = g["index"].as_u64().unwrap();
            let Some(row) = rows.iter().find(|r| r.source == source && r.index == index) else {
                assert!(
                    source == "sharegpt4v" && index == 4,
                    "{source}[{index}] missing"
                );
                continue;
            };
            let ints = |v: &serde_json::Value| -> Vec<i32> {
                v.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_i64().unwrap() as i32)
                    .collect()
            };
            assert_eq!(
                row.input_ids,
                ints(&g["input_ids"]),
                "{source}[{index}] ids"
            );
            assert_eq!(row.labels, ints(&g["labels"]), "{source}[{index}] labels");
            let key = if suffix.is_empty() {
                "expanded_length".to_string()
            } else {
                format!("expanded_length{suffix}")
            };
            assert_eq!(
                u64::from(row.length),
                g[key].as_u64().unwrap(),
                "{source}[{index}] length"
            );
            let want: Vec<String> = g["images"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|i| i["modality"] == "image")
                .flat_map(|i| {
                    i["tiles_uint8_sha256"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|h| h.as_str().unwrap().to_string())
                })
                .collect();
            let got: Vec<String> = row
                .tiles
                .iter()
                .map(|t| hex::encode(Sha256::digest(t)))
                .collect();
            assert_eq!(got, want, "{source}[{index}] tiles");
            compared += 1;
        }
    }
    assert_eq!(compared, 5 + 23 + 4 + 4 + 5);
}

#[test]
fn output_is_identical_for_one_and_two_threads() {
    // Same folder for both (reject reasons name absolute image paths).
    let dir = scratch("threads");
    build_with_threads(&dir, 1);
    let fa = output_files(&dir.join("out"));
    std::fs::remove_dir_all(dir.join("out")).unwrap();
    build_with_threads(&dir, 2);
    let fb = output_files(&dir.join("out"));
    assert_eq!(fa.len(), fb.len());
    for ((na, ba), (nb, bb)) in fa.iter().zip(&fb) {
        assert_eq!(na, nb);
        assert!(ba == bb, "{na} differs between 1 and 2 threads");
    }
}

#[test]
fn a_killed_build_resumes_without_redoing_finished_shards() {
    let dir = scratch("resume");
    let config = fixture_mixture(&dir, "");
    let first = build(&config, &options(Partition::WHOLE)).unwrap();
    let out = dir.join("out");
    let reference = output_files(&out);
    let shards = first.manifest.as_ref().unwrap().shards.clone();
    assert!(
        shards.len() >= 3,
        "the test needs several shards, got {}",
        shards.len()
    );
    // What a kill leaves: a half-written temporary file, one shard never renamed, no manifest.
    let victim = out.join(&shards[1].file);
    std::fs::rename(&victim, victim.with_extension("parquet.tmp")).unwrap();
    std::fs::write(
        out.join(&shards[1].file).with_extension("parquet.tmp"),
        b"half a shard",
    )
    .unwrap();
    std::fs::remove_file(out.join("manifest.json")).unwrap();
    let untouched = out.join(&shards[0].file);
    let mtime = std::fs::metadata(&untouched).unwrap().modified().unwrap();

    let second = build(&config, &options(Partition::WHOLE)).unwrap();
    assert_eq!(second.shards_written, 1);
    assert_eq!(second.shards_skipped, shards.len() - 1);
    assert_eq!(
        std::fs::metadata(&untouched).unwrap().modified().unwrap(),
        mtime
    );
    assert_eq!(output_files(&out), reference, "resumed output differs");
}

#[test]
fn partitions_merged_equal_a_single_build() {
    let dir = scratch("partitions");
    let single_manifest = build_with_threads(&dir, 2);
    let single_files = output_files(&dir.join("out"));
    std::fs::remove_dir_all(dir.join("out")).unwrap();
    let config = fixture_mixture(&dir, "");
    for i in 0..3 {
        let outcome = build(&config, &options(Partition { index: i, count: 3 })).unwrap();
        assert!(outcome.manifest.is_none());
        assert!(!dir.join("out/manifest.json").exists());
    }
    let merged = assemble(&dir.join("out")).unwrap();
    assert_eq!(merged, single_manifest);
    assert!(
        output_files(&dir.join("out")) == single_files,
        "merged output differs"
    );
}

#[test]
fn merging_before_every_partition_is_done_says_what_is_missing() {
    let dir = scratch("partial");
    let config = fixture_mixture(&dir, "");
    build(&config, &options(Partition { index: 0, count: 2 })).unwrap();
    let err = assemble(&dir.join("out")).unwrap_err().to_string();
    assert!(err.contains("not built yet"), "{err}");
}

#[test]
fn a_broken_config_names_the_file_and_the_key() {
    let dir = scratch("broken");
    let config = fixture_mixture(&dir, "");
    let text = std::fs::read_to_string(&config).unwrap();
    let cases = [
        (
            text.replace("template = \"plain\"", "template = \"llama3\""),
            "sources[0].template",
        ),
        (
            text.replace("sampling = \"first:4\"", "sampling = \"some:4\""),
            "some:4",
        ),
        (
            text.replace(
                "seed = 7",
                "seed = 7\nimage_grid_pinpoints = \"[(336, 672\"",
            ),
            "image_grid_pinpoints",
        ),
        (
            text.replace("bad.jsonl", "missing.jsonl"),
            "sources[5].json",
        ),
        (
            text.replace("shard_target_mb = 1", "shard_target_mb = 1\nshard_size = 3"),
            "shard_size",
        ),
        (
            text.replace("group_size = 4", "group_size = 3"),
            "group_size",
        ),
    ];
    for (broken, key) in cases {
        std::fs::write(&config, &broken).unwrap();
        let err = build(&config, &options(Partition::WHOLE))
            .unwrap_err()
            .to_string();
        assert!(err.contains("datasets.toml"), "{err}");
        assert!(err.contains(key), "expected {key:?} in: {err}");
        assert!(
            !dir.join("out/shards").exists(),
            "no work before the config is valid"
        );
    }
}
