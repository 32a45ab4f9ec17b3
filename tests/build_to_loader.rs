//! `llava-data build` output read by `llava-trainer`'s loader: every sample once, in plan order,
//! with the pixels that were written; and `jpeg` tiles decode close to the exact `raw` ones.

use std::collections::HashMap;
use std::path::Path;

use llava_data::shard_build::{build, BuildOptions, Partition};
use llava_e2e::*;
use llava_loader::{IndexOptions, Pixels, ShardIndex};

/// (source, index) → the sample's tiles as the loader hands them over (u8, CHW, concatenated).
fn load_all(out: &Path) -> HashMap<(String, u64), Vec<u8>> {
    let index = ShardIndex::open(out, &IndexOptions::default()).expect("index opens");
    let mut samples = HashMap::new();
    for batch in epoch0_u8_loader(&index, 1, 3, Default::default()).expect("loader") {
        let batch = batch.expect("batch loads");
        let Pixels::U8(pixels) = &batch.pixels else {
            panic!("asked for u8 pixels");
        };
        let tile = 3 * 336 * 336;
        let mut offset = 0;
        for (s, id) in batch.samples.iter().enumerate() {
            let tiles: usize = batch
                .images
                .iter()
                .filter(|i| i.sample == s)
                .map(|i| i.num_tiles as usize)
                .sum();
            let bytes = pixels[offset * tile..(offset + tiles) * tile].to_vec();
            offset += tiles;
            let previous = samples.insert((id.source.clone(), id.index), bytes);
            assert!(
                previous.is_none(),
                "{}#{} loaded twice",
                id.source,
                id.index
            );
        }
    }
    samples
}

#[test]
fn built_shards_load_and_jpeg_tiles_stay_close_to_raw() {
    let dir = scratch("build-to-loader");
    let options = BuildOptions {
        output: None,
        partition: Partition::WHOLE,
        progress: false,
    };
    let config = fixture_mixture(&dir, "");
    let manifest = build(&config, &options).unwrap().manifest.unwrap();
    let raw = load_all(&dir.join("out"));
    assert_eq!(raw.len() as u64, manifest.totals.samples);

    let jpeg_dir = dir.join("jpeg");
    std::fs::create_dir_all(&jpeg_dir).unwrap();
    let config = fixture_mixture(&jpeg_dir, "tile_encoding = \"jpeg\"");
    build(&config, &options).unwrap();
    let jpeg = load_all(&jpeg_dir.join("out"));
    assert_eq!(jpeg.len(), raw.len());
    let (mut sum, mut n, mut worst) = (0u64, 0u64, 0u8);
    for (key, exact) in &raw {
        let lossy = &jpeg[key];
        assert_eq!(lossy.len(), exact.len(), "{key:?}");
        for (a, b) in exact.iter().zip(lossy) {
            let d = a.abs_diff(*b);
            sum += u64::from(d);
            worst = worst.max(d);
            n += 1;
        }
    }
    let mean = sum as f64 / n.max(1) as f64;
    eprintln!("jpeg vs raw tiles: mean abs error {mean:.3}, max {worst}, {n} bytes");
    // q95 4:4:4 JPEG: mean error around one level; edges can be off by more.
    assert!(mean < 2.0, "mean abs error {mean}, max {worst}");
    assert!(n > 0);
}
