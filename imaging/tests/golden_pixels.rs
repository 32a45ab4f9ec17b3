//! Pixel parity with the reference pipeline's goldens (fixtures/golden): for every `ok` row
//! of golden.jsonl / golden_square.jsonl / golden_pad.jsonl, decode + tile each image with its
//! `processing` mode and compare grid, tile count and SHA-256 of every tile and the whole
//! `(T, 3, 336, 336)` uint8 array. `pixels_index.json` entries are checked by hash too, and
//! against the full `.npy` arrays (first differing pixel) when `LLAVA_SHARED_FIXTURES` points
//! at a shared `fixtures/` folder. Mismatches are collected and printed together.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use common::{fixtures, sha256_hex};
use llava_imaging::geometry::parse_pinpoints;
use llava_imaging::tiles::TILE_BYTES;
use llava_imaging::{decode_rgb_file, make_tiles, AspectMode, RgbImage, Tiles};
use serde_json::Value;

fn read_json(p: &Path) -> Value {
    let text = std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn read_jsonl(p: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("jsonl row"))
        .collect()
}

/// json file name -> image folder (absolute), from fixtures/data/datasets.json.
fn image_folders() -> HashMap<String, PathBuf> {
    let data = fixtures().join("data");
    read_json(&data.join("datasets.json"))
        .as_array()
        .expect("datasets.json is a list")
        .iter()
        .map(|d| {
            let file = d["file"].as_str().expect("file").to_string();
            let folder = data.join(d["image_folder"].as_str().expect("image_folder"));
            (file, folder)
        })
        .collect()
}

fn recipe_mode() -> AspectMode {
    let meta = read_json(&fixtures().join("golden/meta.json"));
    let arg = meta["image_grid_pinpoints_arg"]
        .as_str()
        .expect("pinpoints arg");
    AspectMode::Anyres(parse_pinpoints(arg).expect("recipe pinpoints"))
}

fn mode_for(processing: &str, anyres: &AspectMode) -> AspectMode {
    match processing {
        "anyres" => anyres.clone(),
        "pad" => AspectMode::Pad,
        "square" => AspectMode::Square,
        other => panic!("unknown processing {other:?}"),
    }
}

fn decode_cached<'a>(cache: &'a mut HashMap<PathBuf, RgbImage>, p: &Path) -> &'a RgbImage {
    cache
        .entry(p.to_path_buf())
        .or_insert_with(|| decode_rgb_file(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
}

/// Compare one golden `images[]` entry; returns a list of problems.
fn check_entry(t: &Tiles, e: &Value) -> Vec<String> {
    let mut errs = Vec::new();
    let num = e["num_tiles"].as_u64().unwrap_or(0) as usize;
    if t.num_tiles != num {
        errs.push(format!("num_tiles {} != {num}", t.num_tiles));
    }
    if let Some(b) = e["best_resolution"].as_array() {
        let want = (
            b[0].as_u64().unwrap_or(0) as u32,
            b[1].as_u64().unwrap_or(0) as u32,
        );
        if t.best_resolution != Some(want) {
            errs.push(format!(
                "best_resolution {:?} != {want:?}",
                t.best_resolution
            ));
        }
        let grid = (e["grid_cols"].as_u64(), e["grid_rows"].as_u64());
        if grid != (Some(u64::from(t.grid_cols)), Some(u64::from(t.grid_rows))) {
            errs.push(format!("grid {}x{} != {grid:?}", t.grid_cols, t.grid_rows));
        }
    }
    let want_tiles: Vec<&str> = e["tiles_uint8_sha256"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    for (i, want) in want_tiles.iter().enumerate() {
        if i < t.num_tiles && sha256_hex(t.tile(i)) != *want {
            errs.push(format!("tile {i} hash differs"));
        }
    }
    if sha256_hex(&t.data) != e["pixels_uint8_sha256"].as_str().unwrap_or("") {
        errs.push("whole-array hash differs".into());
    }
    errs
}

#[test]
fn golden_jsonl_pixels_match() {
    let folders = image_folders();
    let anyres = recipe_mode();
    let mut cache = HashMap::new();
    let mut summary = Vec::new();
    let mut failures = Vec::new();
    for name in ["golden.jsonl", "golden_square.jsonl", "golden_pad.jsonl"] {
        let (mut checked, mut ok) = (0, 0);
        for row in read_jsonl(&fixtures().join("golden").join(name)) {
            if row["status"] != "ok" {
                continue;
            }
            let file = row["file"].as_str().expect("file");
            let folder = folders
                .get(file)
                .unwrap_or_else(|| panic!("{file} not in datasets.json"));
            for (k, e) in row["images"].as_array().into_iter().flatten().enumerate() {
                if e["modality"] != "image" || e["pixels_uint8_sha256"].is_null() {
                    continue;
                }
                let rel = e["file"].as_str().expect("image file");
                let processing = e["processing"].as_str().expect("processing");
                let what = format!("{name} {file}#{} img{k} {rel} ({processing})", row["index"]);
                checked += 1;
                let img = decode_cached(&mut cache, &folder.join(rel));
                let size = e["image_size"].as_array().expect("image_size");
                if (Some(u64::from(img.width)), Some(u64::from(img.height)))
                    != (size[0].as_u64(), size[1].as_u64())
                {
                    failures.push(format!("{what}: image_size {:?} != {size:?}", img.size()));
                    continue;
                }
                match make_tiles(img, &mode_for(processing, &anyres)) {
                    Ok(t) => {
                        let errs = check_entry(&t, e);
                        if errs.is_empty() {
                            ok += 1;
                        } else {
                            failures.push(format!("{what}: {}", errs.join("; ")));
                        }
                    }
                    Err(err) => failures.push(format!("{what}: tiling failed: {err}")),
                }
            }
        }
        summary.push(format!("{name}: {ok}/{checked} images exact"));
        assert!(checked > 0, "{name}: no images checked");
    }
    eprintln!("{}", summary.join("\n"));
    assert!(
        failures.is_empty(),
        "{}\n{} mismatches:\n{}",
        summary.join("\n"),
        failures.len(),
        failures.join("\n")
    );
}

/// Parse a C-order uint8 `.npy` (format 1.0/2.0/3.0) into its data bytes.
fn npy_data(bytes: &[u8]) -> &[u8] {
    assert!(bytes.starts_with(b"\x93NUMPY"), "not an npy file");
    let (hlen, start) = if bytes[6] == 1 {
        (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10)
    } else {
        (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        )
    };
    let header = String::from_utf8_lossy(&bytes[start..start + hlen]);
    assert!(header.contains("'|u1'"), "npy dtype is not uint8: {header}");
    assert!(header.contains("'fortran_order': False"), "{header}");
    &bytes[start + hlen..]
}

/// `(tile, channel, row, col)` of the first differing byte.
fn first_diff(got: &[u8], want: &[u8]) -> Option<String> {
    let i = got.iter().zip(want).position(|(a, b)| a != b)?;
    let (t, r) = (i / TILE_BYTES, i % TILE_BYTES);
    let (c, r) = (r / (336 * 336), r % (336 * 336));
    let n = got.iter().zip(want).filter(|(a, b)| a != b).count();
    let max = got
        .iter()
        .zip(want)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap_or(0);
    Some(format!(
        "first diff at tile {t} channel {c} row {} col {}: got {} want {}; {n} bytes differ, max abs {max}",
        r / 336,
        r % 336,
        got[i],
        want[i]
    ))
}

#[test]
fn pixels_index_arrays_match() {
    let index = read_json(&fixtures().join("golden/pixels_index.json"));
    let anyres = recipe_mode();
    let shared = std::env::var_os("LLAVA_SHARED_FIXTURES").map(PathBuf::from);
    let mut cache = HashMap::new();
    let mut failures = Vec::new();
    let (mut checked, mut npy_checked) = (0, 0);
    for e in index.as_array().expect("index list") {
        let image = fixtures().join(e["image"].as_str().expect("image"));
        let processing = e["processing"].as_str().expect("processing");
        let what = format!("{} ({processing})", e["image"]);
        let img = decode_cached(&mut cache, &image);
        let t = match make_tiles(img, &mode_for(processing, &anyres)) {
            Ok(t) => t,
            Err(err) => {
                failures.push(format!("{what}: {err}"));
                continue;
            }
        };
        checked += 1;
        let want_shape: Vec<u64> = e["shape"]
            .as_array()
            .map(|s| s.iter().filter_map(Value::as_u64).collect())
            .unwrap_or_default();
        if want_shape != [t.num_tiles as u64, 3, 336, 336] {
            failures.push(format!(
                "{what}: shape {want_shape:?} vs {} tiles",
                t.num_tiles
            ));
            continue;
        }
        if sha256_hex(&t.data) != e["sha256_of_array_bytes"].as_str().unwrap_or("") {
            failures.push(format!("{what}: array hash differs"));
        }
        if let Some(dir) = &shared {
            let npy = dir.join("golden").join(e["npy"].as_str().expect("npy"));
            match std::fs::read(&npy) {
                Ok(bytes) => {
                    npy_checked += 1;
                    if let Some(d) = first_diff(&t.data, npy_data(&bytes)) {
                        failures.push(format!("{what}: npy {}: {d}", npy.display()));
                    }
                }
                Err(err) => failures.push(format!("{what}: cannot read {}: {err}", npy.display())),
            }
        }
    }
    eprintln!("pixels_index: {checked} arrays checked by hash, {npy_checked} against .npy");
    assert!(checked >= 30, "only {checked} arrays checked");
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Synthetic image S(W,H) of spec §3.11.
fn synthetic(w: u32, h: u32) -> RgbImage {
    let mut data = Vec::with_capacity((w * h * 3) as usize);
    for y in 0..h {
        for x in 0..w {
            data.push((255 * x / (w - 1)) as u8);
            data.push((255 * y / (h - 1)) as u8);
            data.push((7 * (x + y) % 256) as u8);
        }
    }
    RgbImage {
        width: w,
        height: h,
        data,
    }
}

#[test]
fn spec_synthetic_vectors() {
    use sha2::{Digest, Sha256};
    type Wh = (u32, u32);
    let table: [(Wh, Wh, usize, &str, &str); 4] = [
        (
            (640, 480),
            (672, 672),
            5,
            "094f8ad68a8fa71a41c9838ff2130411f0000edbf22534e8b525a5b3c5389dbe",
            "9a6146eb0107e2713e4f9f47960614204b92f7e7ac6a5a5e2776dccb54166476",
        ),
        (
            (300, 200),
            (336, 672),
            3,
            "ca7b2fcc690a579362c8737aa109bf9889ef166b01adf48349e0840415ca8b51",
            "a3d96583a774fd12dc98f8db185c626bb1577054c08047978c167dc718e0db5c",
        ),
        (
            (1000, 1000),
            (672, 672),
            5,
            "0946481f62d9df366250dd80f4af76e13937bef01a66001cd6dbfba05558bf50",
            "b13d4c1b2d7c44bd7b69863896cdf1ec3ff4af7c4231c7514d26cbae5bb0e0f5",
        ),
        (
            (2000, 500),
            (1008, 336),
            4,
            "762adc13db3494910dbf2e345b01f3a7fb2a65dd87423740e8df7143fb6044ad",
            "d4bb6715635d83c764c41a4d948b17af92a1c2af3fa269afca004f02494d0a7b",
        ),
    ];
    let mode = AspectMode::Anyres(llava_imaging::RECIPE_PINPOINTS.to_vec());
    let mut failures = Vec::new();
    for ((w, h), best, n, hwc_hash, f32_hash) in table {
        let t = make_tiles(&synthetic(w, h), &mode).expect("tiles");
        assert_eq!(t.best_resolution, Some(best));
        assert_eq!(t.num_tiles, n);
        // HWC per tile, base first, concatenated.
        let mut hasher = Sha256::new();
        for i in 0..t.num_tiles {
            hasher.update(t.tile_hwc(i));
        }
        if hex::encode(hasher.finalize()) != hwc_hash {
            failures.push(format!("S({w},{h}) uint8 HWC hash differs"));
        }
        let f: Vec<u8> = llava_imaging::normalize_tiles(&t)
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        if sha256_hex(&f) != f32_hash {
            failures.push(format!("S({w},{h}) float32 CHW hash differs"));
        }
        if (w, h) == (640, 480) {
            let b = t.tile_hwc(0);
            assert_eq!(&b[0..3], &[0, 0, 5]);
            let i = (168 * 336 + 168) * 3;
            assert_eq!(&b[i..i + 3], &[128, 127, 85]);
            let f = llava_imaging::normalize_tiles(&t);
            assert_eq!(f64::from(f[0]), -1.792_262_554_168_701_2);
            let sum: f64 = f.iter().map(|&v| f64::from(v)).sum();
            assert!((sum - -319_071.007_332_216_5).abs() < 1e-6, "sum {sum}");
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
