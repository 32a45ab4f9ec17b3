//! Issue 27: a rejection found while writing (pass 2) is booked against its own source, in a
//! batch that mixes sources, whole or partitioned; every other record is written once.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use arrow_array::{Array, StringArray, UInt64Array};
use llava_data::shard_build::{assemble::assemble, build, BuildOptions, Partition};
use llava_formats::manifest::{Manifest, RejectEntry};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;
use serde_json::{json, Value};

use crate::common::{fixtures, tokenizer_path};
use llava_test_support::scratch;

/// (source, json file as written, record index) of one record.
pub type RecordKey = (String, String, u64);

pub fn options(partition: Partition) -> BuildOptions {
    BuildOptions {
        output: None,
        partition,
        progress: false,
    }
}

/// Every row of the build's shards: key → id (a row written twice fails the test).
pub fn written_rows(out: &Path) -> BTreeMap<RecordKey, String> {
    let mut rows = BTreeMap::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(out.join("shards"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for path in files {
        let file = std::fs::File::open(&path).unwrap();
        let builder = ParquetRecordBatchReaderBuilder::try_new(file).unwrap();
        let wanted = ["id", "source", "json_file", "index"];
        let mask = ProjectionMask::columns(builder.parquet_schema(), wanted);
        for batch in builder.with_projection(mask).build().unwrap() {
            let batch = batch.unwrap();
            let strings = |name: &str| {
                batch
                    .column_by_name(name)
                    .unwrap()
                    .as_any()
                    .downcast_ref::<StringArray>()
                    .unwrap()
                    .clone()
            };
            let (id, source, json_file) = (strings("id"), strings("source"), strings("json_file"));
            let index = batch.column_by_name("index").unwrap();
            let index = index.as_any().downcast_ref::<UInt64Array>().unwrap();
            for r in 0..batch.num_rows() {
                let key = (
                    source.value(r).to_string(),
                    json_file.value(r).to_string(),
                    index.value(r),
                );
                let old = rows.insert(key.clone(), id.value(r).to_string());
                assert!(old.is_none(), "{key:?} written twice ({})", path.display());
            }
        }
    }
    rows
}

pub fn rejects(out: &Path) -> Vec<RejectEntry> {
    std::fs::read_to_string(out.join("rejects.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Per source `read = written + rejected`, and the manifest's counts are those of the shards'
/// rows and of `rejects.jsonl` (each reject once).
pub fn assert_reconciles(manifest: &Manifest, out: &Path) {
    let rows = written_rows(out);
    let rejects = rejects(out);
    let mut rejected_keys = std::collections::BTreeSet::new();
    for r in &rejects {
        let key = (r.source.clone(), r.json_file.clone(), r.index);
        assert!(rejected_keys.insert(key.clone()), "{key:?} rejected twice");
        assert!(
            !rows.contains_key(&key),
            "{key:?} both written and rejected"
        );
    }
    for s in &manifest.sources {
        let written = rows.keys().filter(|k| k.0 == s.name).count() as u64;
        let rejected = rejects.iter().filter(|r| r.source == s.name).count() as u64;
        assert_eq!(
            (s.written, s.rejected),
            (written, rejected),
            "source {}: manifest vs shards and rejects.jsonl",
            s.name
        );
        assert_eq!(s.read, s.written + s.rejected, "source {}", s.name);
    }
}

/// The first `n` records of the LLaVA-Instruct fixture, repeated with distinct ids.
fn instruct_records(n: usize) -> Vec<Value> {
    let text = std::fs::read_to_string(fixtures().join("data/llava_instruct_150k.json")).unwrap();
    let base: Vec<Value> = serde_json::from_str(&text).unwrap();
    (0..n)
        .map(|i| {
            let mut r = base[i % base.len()].clone();
            r["id"] = json!(format!("{}-{i}", r["id"].as_str().unwrap()));
            r
        })
        .collect()
}

/// 24 LLaVA-Instruct records and a source whose only record's JPEG is cut mid-scan (it passes
/// pass 1's header probe; pass 2's decode rejects it).
fn two_source_mixture(dir: &Path, progressive: bool, batch_size: usize) -> PathBuf {
    let images = dir.join("broken_images");
    std::fs::create_dir_all(&images).unwrap();
    let jpeg = if progressive {
        "sam/images/sa_2862.jpg"
    } else {
        "gqa/images/2414911.jpg"
    };
    let bytes = std::fs::read(fixtures().join("images").join(jpeg)).unwrap();
    std::fs::write(images.join("cut.jpg"), &bytes[..bytes.len() / 2]).unwrap();
    let instruct = serde_json::to_string(&instruct_records(24)).unwrap();
    std::fs::write(dir.join("instruct.json"), instruct).unwrap();
    let broken = json!([{"id": "cut", "image": "cut.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat is this?"},
        {"from": "gpt", "value": "A picture."}]}]);
    std::fs::write(dir.join("broken.json"), broken.to_string()).unwrap();
    let config = dir.join("datasets.toml");
    std::fs::write(
        &config,
        format!(
            r#"output = "out"
tokenizer = "{tokenizer}"
batch_size = {batch_size}
group_size = {group_size}
shard_target_mb = 1

[[sources]]
name = "llava_instruct_150k"
json = "instruct.json"
image_folder = "{coco}"
template = "llava_llama_3"

[[sources]]
name = "broken"
json = "broken.json"
image_folder = "broken_images"
template = "llava_llama_3"
"#,
            tokenizer = tokenizer_path().display(),
            group_size = batch_size * 2,
            coco = fixtures().join("images/coco/train2017").display(),
        ),
    )
    .unwrap();
    config
}

fn assert_cut_is_rejected(manifest: &Manifest, out: &Path) {
    assert_reconciles(manifest, out);
    let by_name: BTreeMap<&str, _> = manifest
        .sources
        .iter()
        .map(|s| (s.name.as_str(), s))
        .collect();
    let instruct = by_name["llava_instruct_150k"];
    assert_eq!(
        (instruct.read, instruct.written, instruct.rejected),
        (24, 24, 0)
    );
    let broken = by_name["broken"];
    assert_eq!((broken.read, broken.written, broken.rejected), (1, 0, 1));
    let rejects = rejects(out);
    assert_eq!(rejects.len(), 1);
    let r = &rejects[0];
    assert_eq!(
        (
            r.source.as_str(),
            r.json_file.as_str(),
            r.index,
            r.id.as_str()
        ),
        ("broken", "broken.json", 0, "cut")
    );
    assert_eq!(r.kind, "truncated_image", "{}", r.reason);
}

/// The issue's reduction: it failed with `source llava_instruct_150k: written 23 + rejected 0 !=
/// read 24`, for a baseline and a progressive JPEG.
#[test]
fn a_pass2_reject_in_a_mixed_batch_is_booked_to_its_source() {
    for progressive in [false, true] {
        let dir = scratch(&format!("reject-attribution-{progressive}"));
        let config = two_source_mixture(&dir, progressive, 4);
        let report = build(&config, &options(Partition::WHOLE)).expect("the build succeeds");
        assert_cut_is_rejected(&report.manifest.expect("manifest"), &dir.join("out"));
        std::fs::remove_dir_all(&dir).ok();
    }
}

/// The same mixture in three partitions (one shard each at most) and a merge.
#[test]
fn a_pass2_reject_is_booked_to_its_source_across_partitions() {
    let dir = scratch("reject-attribution-partitions");
    let config = two_source_mixture(&dir, false, 2);
    for index in 0..3 {
        let part = build(&config, &options(Partition { index, count: 3 })).expect("partition");
        assert!(part.manifest.is_none());
    }
    let manifest = assemble(&dir.join("out")).expect("merge");
    assert_cut_is_rejected(&manifest, &dir.join("out"));
    std::fs::remove_dir_all(&dir).ok();
}

/// A merge whose counts do not add up (a shard record made to count one row too many) fails
/// naming the source, the shard and the rejects found in it, with `rejects.jsonl` on disk.
#[test]
fn a_failed_merge_names_the_shard_and_keeps_the_rejects() {
    let dir = scratch("reject-attribution-failed-merge");
    let config = two_source_mixture(&dir, false, 2);
    for index in 0..2 {
        build(&config, &options(Partition { index, count: 2 })).expect("partition");
    }
    let out = dir.join("out");
    let records = out.join(".work/shards/image-00000.parquet.json");
    let mut record: Value = serde_json::from_slice(&std::fs::read(&records).unwrap()).unwrap();
    let counted = record["written"][0].as_u64().unwrap();
    record["written"][0] = json!(counted + 1);
    std::fs::write(&records, record.to_string()).unwrap();
    let err = assemble(&out)
        .expect_err("the counts do not add up")
        .to_string();
    assert!(
        err.contains("source llava_instruct_150k: written 25 + rejected 0 != read 24")
            && err.contains(&format!(
                "image-00000.parquet holds {counted} row(s) of it but its record counts {}",
                counted + 1
            ))
            && err.contains("rejects.jsonl"),
        "{err}"
    );
    let kept = rejects(&out);
    assert_eq!(kept.len(), 1, "the cut JPEG's reject is on disk");
    assert_eq!((kept[0].source.as_str(), kept[0].index), ("broken", 0));
    std::fs::remove_dir_all(&dir).ok();
}

/// A pass 2 that stops on an I/O error leaves `rejects.jsonl` with what pass 1 and the finished
/// shards rejected.
#[test]
fn a_failed_pass2_keeps_the_rejects_found_so_far() {
    let dir = scratch("reject-attribution-failed-pass2");
    let config = two_source_mixture(&dir, false, 2);
    // A second broken record that pass 1 rejects (its image does not exist).
    let broken = json!([
        {"id": "cut", "image": "cut.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat is this?"},
            {"from": "gpt", "value": "A picture."}]},
        {"id": "gone", "image": "gone.jpg", "conversations": [
            {"from": "human", "value": "<image>\nAnd this?"},
            {"from": "gpt", "value": "Nothing."}]}]);
    std::fs::write(dir.join("broken.json"), broken.to_string()).unwrap();
    // The second image shard cannot be created: a folder has its temporary name.
    std::fs::create_dir_all(dir.join("out/shards/image-00001.parquet.tmp")).unwrap();
    let err = build(&config, &options(Partition::WHOLE)).expect_err("pass 2 fails");
    assert!(err.to_string().contains("image-00001.parquet.tmp"), "{err}");
    let kept = rejects(&dir.join("out"));
    assert!(
        kept.iter()
            .any(|r| (r.source.as_str(), r.index, r.kind.as_str()) == ("broken", 1, "image")),
        "{kept:?}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
