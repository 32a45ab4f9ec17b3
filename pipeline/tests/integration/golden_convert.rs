//! Whole-record conversion against the reference goldens: ids, labels, geometry, image-token
//! counts, tile hashes and the exact expanded length, for every `ok` row of `golden.jsonl`
//! (anyres), `golden_square.jsonl` and `golden_pad.jsonl` (both merge types).

use crate::common;

use common::*;
use llava_data::convert::{convert, ConvertConfig};
use llava_data::record::{parse_record, read_entries};
use llava_data::template::Template;
use llava_imaging::{AspectMode, MergeType, RECIPE_PINPOINTS};
use serde_json::Value;
use sha2::{Digest, Sha256};

fn check_file(golden: &str, aspect: AspectMode, merges: &[(MergeType, &str)]) -> usize {
    let tokenizer = tokenizer();
    let mut failures = Vec::new();
    let mut checked = 0;
    for row in golden_rows(golden) {
        let file = row["file"].as_str().unwrap();
        let index = row["index"].as_u64().unwrap() as usize;
        let template: Template = row["template"].as_str().unwrap().parse().unwrap();
        let entries = read_entries(&fixtures().join("data").join(file)).unwrap();
        let record = parse_record(&entries[index]).unwrap();
        for &(merge, suffix) in merges {
            let config = ConvertConfig {
                template,
                aspect: aspect.clone(),
                merge,
                model_max_length: 8192,
                limits: Default::default(),
                budget: ConvertConfig::budget_for(&Default::default()),
            };
            let what = format!("{golden} {file}[{index}] {template} {merge:?}");
            let sample = match convert(&record, &image_folder_of(file), &config, tokenizer) {
                Ok(s) => s,
                Err(e) => {
                    failures.push(format!("{what}: rejected: {e}"));
                    continue;
                }
            };
            let mut diffs = Vec::new();
            if sample.input_ids != ints(&row["input_ids"]) {
                diffs.push("input_ids".to_string());
            }
            if sample.labels != ints(&row["labels"]) {
                diffs.push("labels".to_string());
            }
            if sample.length as u64 != row[format!("expanded_length{suffix}")].as_u64().unwrap() {
                diffs.push(format!("length {}", sample.length));
            }
            let golden_images: Vec<&Value> = row["images"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|i| i["modality"] == "image")
                .collect();
            if sample.images.len() != golden_images.len() {
                diffs.push("image count".to_string());
            }
            for (img, want) in sample.images.iter().zip(&golden_images) {
                let t = &img.tiles;
                let size = [img.image_size.0, img.image_size.1];
                if want["image_size"] != serde_json::json!(size) {
                    diffs.push(format!("image_size {size:?}"));
                }
                if want["processing"] != img.processing {
                    diffs.push(format!("processing {}", img.processing));
                }
                if let Some(best) = want.get("best_resolution") {
                    let got = t.best_resolution.map(|(w, h)| serde_json::json!([w, h]));
                    if got.as_ref() != Some(best)
                        || want["grid_cols"] != t.grid_cols
                        || want["grid_rows"] != t.grid_rows
                    {
                        diffs.push(format!("geometry {:?}", t.best_resolution));
                    }
                }
                if want["num_tiles"] != t.num_tiles {
                    diffs.push(format!("num_tiles {}", t.num_tiles));
                }
                if want[format!("image_tokens{suffix}")] != img.image_tokens {
                    diffs.push(format!("image_tokens {}", img.image_tokens));
                }
                let hashes: Vec<String> = (0..t.num_tiles)
                    .map(|i| hex::encode(Sha256::digest(t.tile(i))))
                    .collect();
                let want_hashes: Vec<String> =
                    serde_json::from_value(want["tiles_uint8_sha256"].clone()).unwrap();
                let differing = hashes
                    .iter()
                    .zip(&want_hashes)
                    .filter(|(a, b)| a != b)
                    .count();
                if differing > 0 {
                    diffs.push(format!("{differing} tile hashes"));
                }
                if hex::encode(Sha256::digest(&t.data)) != want["pixels_uint8_sha256"] {
                    diffs.push("pixels_uint8_sha256".to_string());
                }
            }
            if !diffs.is_empty() {
                failures.push(format!("{what}: {}", diffs.join(", ")));
            }
            checked += 1;
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {checked} differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
    checked
}

#[test]
fn anyres_rows_match_the_reference() {
    let pinpoints = RECIPE_PINPOINTS.to_vec();
    let n = check_file(
        "golden.jsonl",
        AspectMode::Anyres(pinpoints),
        &[(MergeType::SpatialUnpad, "")],
    );
    assert_eq!(n, 47);
}

#[test]
fn square_rows_match_the_reference_for_both_merges() {
    let merges = [
        (MergeType::Flat, "_flat"),
        (MergeType::SpatialUnpad, "_spatial_unpad"),
    ];
    assert_eq!(
        check_file("golden_square.jsonl", AspectMode::Square, &merges),
        20
    );
}

#[test]
fn pad_rows_match_the_reference_for_both_merges() {
    let merges = [
        (MergeType::Flat, "_flat"),
        (MergeType::SpatialUnpad, "_spatial_unpad"),
    ];
    assert_eq!(check_file("golden_pad.jsonl", AspectMode::Pad, &merges), 10);
}
