//! Pixel parity of the loader: fixture images tiled by `llava-imaging` (the training path never
//! decodes images; only `generate` does, for its prompts), written to a shard, loaded and
//! collated; each image's float32 tiles must hash to the golden `pixels_float32_sha256` (and the
//! uint8 hand-over to `pixels_uint8_sha256`).

use std::collections::HashMap;
use std::path::PathBuf;

use llava_formats::schema::{ImageMeta, ShardRow};
use llava_imaging::{decode_rgb_file, make_tiles, AspectMode, RECIPE_PINPOINTS};
use llava_loader::synthetic::{manifest, write_manifest, write_shard};
use llava_loader::{
    DataState, EpochPlan, IndexOptions, Loader, LoaderConfig, PixelFormat, Pixels, PlanConfig,
    ShardIndex,
};
use serde_json::Value;
use sha2::{Digest, Sha256};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Golden anyres rows with one image whose pixels are recorded, one per tile count (3, 4, 5).
fn golden_rows() -> Vec<Value> {
    let text = std::fs::read_to_string(fixtures().join("golden/golden.jsonl")).expect("golden");
    let mut by_tiles: HashMap<u64, usize> = HashMap::new();
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|r| {
            r["status"] == "ok"
                && r["images"].as_array().is_some_and(|a| a.len() == 1)
                && r["images"][0]["pixels_float32_sha256"].is_string()
                && r["images"][0]["processing"] == "anyres"
        })
        .filter(|r| {
            let n = by_tiles
                .entry(r["images"][0]["num_tiles"].as_u64().unwrap_or(0))
                .or_default();
            *n += 1;
            *n <= 2
        })
        .collect()
}

fn u32_of(v: &Value) -> u32 {
    v.as_u64().expect("number") as u32
}

fn row_for(golden: &Value, folders: &HashMap<String, PathBuf>, n: u64) -> ShardRow {
    let image = &golden["images"][0];
    let folder = &folders[golden["file"].as_str().expect("file")];
    let path = folder.join(image["file"].as_str().expect("image file"));
    let rgb = decode_rgb_file(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let tiles = make_tiles(&rgb, &AspectMode::Anyres(RECIPE_PINPOINTS.to_vec())).expect("tiles");
    let ids: Vec<i32> = serde_json::from_value(golden["input_ids"].clone()).expect("ids");
    let labels: Vec<i32> = serde_json::from_value(golden["labels"].clone()).expect("labels");
    let image_tokens = u32_of(&image["image_tokens"]);
    let tile_bytes = tiles.data.len() / tiles.num_tiles;
    ShardRow {
        id: golden["json_id"].as_str().unwrap_or("?").to_string(),
        source: golden["file"].as_str().expect("file").to_string(),
        json_file: golden["file"].as_str().expect("file").to_string(),
        index: n,
        length: ids.len() as u32 - 1 + image_tokens,
        input_ids: ids,
        labels,
        num_image_tokens: image_tokens,
        modality: "image".into(),
        truncated: false,
        group: 0,
        batch: 0,
        images: vec![ImageMeta {
            path: path.display().to_string(),
            width: u32_of(&image["image_size"][0]),
            height: u32_of(&image["image_size"][1]),
            processing: "anyres".into(),
            best_width: u32_of(&image["best_resolution"][0]),
            best_height: u32_of(&image["best_resolution"][1]),
            grid_cols: u32_of(&image["grid_cols"]),
            grid_rows: u32_of(&image["grid_rows"]),
            num_tiles: tiles.num_tiles as u32,
            image_tokens,
        }],
        tiles: tiles.data.chunks(tile_bytes).map(<[u8]>::to_vec).collect(),
    }
}

#[test]
fn collated_tiles_match_golden_float32_pixels() {
    let data = fixtures().join("data");
    let datasets: Value = serde_json::from_str(
        &std::fs::read_to_string(data.join("datasets.json")).expect("datasets.json"),
    )
    .expect("json");
    let folders: HashMap<String, PathBuf> = datasets
        .as_array()
        .expect("list")
        .iter()
        .map(|d| {
            (
                d["file"].as_str().expect("file").to_string(),
                data.join(d["image_folder"].as_str().expect("folder")),
            )
        })
        .collect();
    let goldens = golden_rows();
    assert!(goldens.len() >= 3, "need golden rows with 3, 4 and 5 tiles");
    let mut rows: Vec<ShardRow> = goldens
        .iter()
        .enumerate()
        .map(|(n, g)| row_for(g, &folders, n as u64))
        .collect();
    // One group, sorted by length, batches of 4: the builder's layout.
    rows.sort_by_key(|r| std::cmp::Reverse(r.length));
    let batches: Vec<Vec<ShardRow>> = rows
        .chunks(4)
        .enumerate()
        .map(|(b, c)| {
            c.iter()
                .cloned()
                .map(|mut r| {
                    r.batch = b as u32;
                    r
                })
                .collect()
        })
        .collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let info = write_shard(
        dir.path(),
        "image-00000.parquet",
        llava_loader::Modality::Image,
        batches,
    )
    .expect("shard");
    write_manifest(dir.path(), &manifest(vec![info], 4, 64, 336)).expect("manifest");
    let index = ShardIndex::open(dir.path(), &IndexOptions::default()).expect("index");
    let golden_by_key: HashMap<(String, u64), &Value> = goldens
        .iter()
        .enumerate()
        .map(|(n, g)| ((g["file"].as_str().expect("file").to_string(), n as u64), g))
        .collect();

    let mut checked = 0;
    for pixels in [PixelFormat::F32, PixelFormat::U8] {
        let cfg = PlanConfig {
            seed: 0,
            world_size: 1,
            batch_size: None,
            pack_length: None,
            across_batches: false,
        };
        let plan = EpochPlan::new(&index, &cfg, &DataState::new(0)).expect("plan");
        let loader_cfg = LoaderConfig {
            workers: 2,
            prefetch: 2,
            pixels,
            on_corrupt: Default::default(),
        };
        for batch in
            Loader::new(index.clone(), plan.rank(0).expect("rank"), &loader_cfg).expect("loader")
        {
            let batch = batch.expect("batch");
            let per_tile = 3 * 336 * 336;
            let mut tile = 0;
            for img in &batch.images {
                let s = &batch.samples[img.sample];
                let golden = golden_by_key[&(s.source.clone(), s.index)];
                let range = tile * per_tile..(tile + img.num_tiles as usize) * per_tile;
                tile += img.num_tiles as usize;
                let (hash, key) = match &batch.pixels {
                    Pixels::F32(px) => {
                        let bytes: Vec<u8> =
                            px[range].iter().flat_map(|v| v.to_le_bytes()).collect();
                        (sha256_hex(&bytes), "pixels_float32_sha256")
                    }
                    Pixels::U8(px) => (sha256_hex(&px[range]), "pixels_uint8_sha256"),
                };
                assert_eq!(
                    hash,
                    golden["images"][0][key].as_str().expect("hash"),
                    "{key} of {}#{} ({} tiles)",
                    s.source,
                    s.index,
                    img.num_tiles
                );
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 2 * goldens.len());
}

/// Tiles cross to the device as bytes and are normalised there: bit-identical to the loader's
/// f32 path (every byte value in every channel).
#[test]
fn device_normalisation_equals_loader_f32() {
    let plane = 256;
    let tiles: Vec<u8> = (0..3 * plane).map(|i| (i % 256) as u8).collect();
    let mut want = vec![0f32; tiles.len()];
    llava_formats::normalize::normalize_into(&tiles, plane, &mut want);
    let t = candle_core::Tensor::from_vec(tiles, (1, 3, 16, 16), &candle_core::Device::Cpu)
        .expect("tiles");
    let got = llava_trainer::train::normalize_on_device(&t)
        .expect("normalise")
        .flatten_all()
        .and_then(|x| x.to_vec1::<f32>())
        .expect("values");
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&got), bits(&want));
}
