//! Loader: plan order, collation (padding, masks, labels, pixels) with 1 and 4 workers, and
//! clear errors on missing, truncated or corrupted shards.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use llava_formats::constants::IGNORE_INDEX;
use llava_formats::normalize::lut;
use llava_formats::schema::{batch_to_rows, ShardRow};
use llava_loader::synthetic::{write_synthetic, SynthSpec};
use llava_loader::{
    DataError, DataState, EpochPlan, IndexOptions, Loader, LoaderConfig, PixelFormat, Pixels,
    PlanConfig, ShardIndex, PAD_ID,
};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

const TILE: u32 = 16;

fn dataset(dir: &Path) -> Arc<ShardIndex> {
    let spec = SynthSpec {
        image_samples: 30,
        text_samples: 17,
        batch_size: 4,
        group_size: 8,
        groups_per_shard: 2,
        tile_size: TILE,
        // Three batches per row group, across group ends: the reader must slice its batch.
        row_group_max_rows: Some(10),
        ..SynthSpec::default()
    };
    write_synthetic(dir, &spec).expect("write synthetic shards");
    let index = ShardIndex::open(dir, &IndexOptions::default()).expect("open index");
    let shard0 = index.shards[0].metadata.metadata();
    assert!(
        shard0.num_row_groups() >= 2,
        "the tests need several row groups"
    );
    assert!(
        (0..shard0.num_row_groups()).any(|rg| shard0.row_group(rg).num_rows() > 4),
        "the tests need row groups of several batches"
    );
    index
}

/// Every stored row, read independently of the loader.
fn stored_rows(index: &ShardIndex) -> HashMap<(String, u64), ShardRow> {
    let mut out = HashMap::new();
    for shard in &index.shards {
        let file = File::open(&shard.path).expect("open shard");
        let reader = ParquetRecordBatchReaderBuilder::try_new(file)
            .expect("reader")
            .build()
            .expect("build");
        for batch in reader {
            for mut row in batch_to_rows(&batch.expect("batch")).expect("rows") {
                // Synthetic shards store `raw` tiles: the CHW bytes are what the loader gives.
                for t in &mut row.tiles {
                    *t = llava_formats::tile_codec::decode_raw(t, TILE as usize).expect("raw tile");
                }
                out.insert((row.source.clone(), row.index), row);
            }
        }
    }
    out
}

fn plan(index: &ShardIndex, world_size: usize, rank: usize) -> Vec<llava_loader::PlannedBatch> {
    let cfg = PlanConfig {
        seed: 9,
        world_size,
        batch_size: None,
        pack_length: None,
        across_batches: false,
    };
    EpochPlan::new(index, &cfg, &DataState::new(0))
        .expect("plan")
        .rank(rank)
        .expect("rank")
}

fn check_run(index: &Arc<ShardIndex>, workers: usize, pixels: PixelFormat) {
    let rows = stored_rows(index);
    let planned = plan(index, 2, 1);
    let config = LoaderConfig {
        workers,
        prefetch: workers + 1,
        pixels,
        on_corrupt: Default::default(),
    };
    let loader = Loader::new(index.clone(), planned.clone(), &config).expect("loader");
    let batches: Vec<_> = loader.map(|b| b.expect("batch")).collect();
    assert_eq!(batches.len(), planned.len());
    let s = TILE as usize;
    let tile_len = 3 * s * s;
    for (b, p) in batches.iter().zip(&planned) {
        // Plan order and identities.
        assert_eq!((b.step, b.rank, b.modality), (p.step, p.rank, p.modality));
        let ids: Vec<(String, u64)> = b
            .samples
            .iter()
            .map(|x| (x.source.clone(), x.index))
            .collect();
        let want: Vec<(String, u64)> = p
            .samples
            .iter()
            .map(|x| (index.source_name(x).to_string(), x.index))
            .collect();
        assert_eq!(ids, want);
        assert_eq!(b.next_state, p.next_state);
        assert_eq!(b.tokens, p.tokens);
        // Collation.
        let l = b.seq_len;
        assert_eq!(b.input_ids.len(), b.batch_size() * l);
        assert_eq!(b.pixel_shape(), [b.num_tiles, 3, s, s]);
        assert_eq!(b.pixels.len(), b.num_tiles * tile_len);
        let mut tile = 0;
        let mut image = 0;
        for (i, key) in ids.iter().enumerate() {
            let r = &rows[key];
            let n = r.input_ids.len();
            assert_eq!(b.lengths[i], n);
            assert_eq!(b.model_lengths[i], r.length);
            let row = &b.input_ids[i * l..(i + 1) * l];
            assert_eq!(&row[..n], &r.input_ids[..]);
            assert!(row[n..].iter().all(|&t| t == PAD_ID));
            let labels = &b.labels[i * l..(i + 1) * l];
            assert_eq!(&labels[..n], &r.labels[..]);
            assert!(labels[n..].iter().all(|&t| t == IGNORE_INDEX));
            let mask = &b.attention_mask[i * l..(i + 1) * l];
            // Real token 0 at position 3 stays attended: the mask comes from lengths.
            assert!(mask[..n].iter().all(|&m| m == 1));
            assert!(mask[n..].iter().all(|&m| m == 0));
            assert_eq!(r.input_ids.get(3), Some(&0));
            for m in &r.images {
                let info = &b.images[image];
                assert_eq!(info.sample, i);
                assert_eq!(
                    (
                        info.width,
                        info.height,
                        info.grid_cols,
                        info.grid_rows,
                        info.num_tiles
                    ),
                    (m.width, m.height, m.grid_cols, m.grid_rows, m.num_tiles)
                );
                assert_eq!(info.image_tokens, m.image_tokens);
                assert_eq!(info.processing, m.processing);
                image += 1;
            }
            for t in &r.tiles {
                let range = tile * tile_len..(tile + 1) * tile_len;
                match &b.pixels {
                    Pixels::U8(px) => assert_eq!(&px[range], &t[..]),
                    Pixels::F32(px) => {
                        for (j, (&v, &u)) in px[range].iter().zip(t).enumerate() {
                            assert_eq!(v.to_bits(), lut()[j / (s * s)][u as usize].to_bits());
                        }
                    }
                }
                tile += 1;
            }
        }
        assert_eq!(image, b.images.len());
        assert_eq!(tile, b.num_tiles);
    }
}

#[test]
fn plan_order_and_collation_one_worker() {
    let dir = tempfile::tempdir().expect("tempdir");
    let index = dataset(dir.path());
    check_run(&index, 1, PixelFormat::F32);
    check_run(&index, 1, PixelFormat::U8);
}

#[test]
fn plan_order_and_collation_four_workers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let index = dataset(dir.path());
    check_run(&index, 4, PixelFormat::F32);
    check_run(&index, 4, PixelFormat::U8);
}

#[test]
fn merged_and_split_batches_and_empty_batches_load() {
    let dir = tempfile::tempdir().expect("tempdir");
    let index = dataset(dir.path());
    for (bs, w) in [(Some(8), 3), (Some(2), 2), (None, 64)] {
        let cfg = PlanConfig {
            seed: 1,
            world_size: w,
            batch_size: bs,
            pack_length: None,
            across_batches: false,
        };
        let plan = EpochPlan::new(&index, &cfg, &DataState::new(0)).expect("plan");
        let mut total = 0;
        for rank in 0..w {
            let planned = plan.rank(rank).expect("rank");
            let loader = Loader::new(
                index.clone(),
                planned.clone(),
                &LoaderConfig {
                    workers: 3,
                    prefetch: 2,
                    pixels: PixelFormat::U8,
                    on_corrupt: Default::default(),
                },
            )
            .expect("loader");
            for (b, p) in loader.zip(&planned) {
                let b = b.expect("batch");
                assert_eq!(b.batch_size(), p.samples.len());
                assert_eq!(b.is_empty(), p.is_empty());
                total += b.batch_size();
            }
        }
        assert_eq!(total, index.samples.len(), "batch size {bs:?}, world {w}");
    }
}

#[test]
fn dropping_the_loader_early_stops_workers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let index = dataset(dir.path());
    let mut loader = Loader::new(
        index.clone(),
        plan(&index, 1, 0),
        &LoaderConfig {
            workers: 4,
            prefetch: 4,
            pixels: PixelFormat::F32,
            on_corrupt: Default::default(),
        },
    )
    .expect("loader");
    assert!(loader.next().expect("one").is_ok());
    drop(loader); // must not hang
}

fn first_error(index: &Arc<ShardIndex>) -> DataError {
    let loader = Loader::new(
        index.clone(),
        plan(index, 1, 0),
        &LoaderConfig {
            workers: 4,
            prefetch: 4,
            pixels: PixelFormat::F32,
            on_corrupt: Default::default(),
        },
    )
    .expect("loader");
    let mut results: Vec<_> = loader.collect();
    let last = results.pop().expect("results");
    assert!(
        results.iter().all(Result::is_ok),
        "only the last item is the error"
    );
    last.expect_err("a corrupted run must fail")
}

#[test]
fn missing_shard_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let index = dataset(dir.path());
    let victim = index.shards[1].path.clone();
    std::fs::remove_file(&victim).expect("remove");
    // At load time (shard removed after the run started).
    let err = first_error(&index);
    assert!(matches!(err, DataError::MissingShard { .. }), "{err}");
    assert!(
        err.to_string().contains(&victim.display().to_string()),
        "{err}"
    );
    // At start.
    let err = ShardIndex::open(dir.path(), &IndexOptions::default()).unwrap_err();
    assert!(matches!(err, DataError::MissingShard { .. }), "{err}");
}

#[test]
fn truncated_and_rewritten_shards_are_detected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let index = dataset(dir.path());
    let victim = index.shards[0].path.clone();
    let bytes = std::fs::read(&victim).expect("read");
    std::fs::write(&victim, &bytes[..bytes.len() - 10]).expect("truncate");
    let err = ShardIndex::open(dir.path(), &IndexOptions::default()).unwrap_err();
    assert!(matches!(err, DataError::ShardSize { .. }), "{err}");
    // Same size, one byte flipped: the checksum catches it when asked to.
    let mut flipped = bytes.clone();
    flipped[100] ^= 0x55;
    std::fs::write(&victim, &flipped).expect("flip");
    let err = ShardIndex::open(
        dir.path(),
        &IndexOptions {
            verify_checksums: true,
        },
    )
    .unwrap_err();
    assert!(matches!(err, DataError::Checksum { .. }), "{err}");
    assert!(
        err.to_string().contains(&victim.display().to_string()),
        "{err}"
    );
}

#[test]
fn corrupted_row_group_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let index = dataset(dir.path());
    // Overwrite the compressed pages of row group 1 of shard 0 (size unchanged), as a bad disk
    // or a partial copy would.
    let shard = &index.shards[0];
    let meta = shard.metadata.metadata();
    let rg = meta.row_group(1);
    let (start, len) = rg
        .columns()
        .iter()
        .map(|c| c.byte_range())
        .max_by_key(|&(_, len)| len)
        .expect("columns");
    let mut bytes = std::fs::read(&shard.path).expect("read");
    for b in &mut bytes[start as usize + 8..(start + len) as usize] {
        *b = 0xAB;
    }
    std::fs::write(&shard.path, &bytes).expect("write");
    let err = first_error(&index);
    let msg = err.to_string();
    assert!(msg.contains(&shard.path.display().to_string()), "{msg}");
    assert!(msg.contains("row group 1"), "{msg}");
}

#[test]
fn shards_of_an_old_schema_are_refused_with_the_version() {
    let dir = tempfile::tempdir().expect("tempdir");
    dataset(dir.path());
    let path = dir.path().join("manifest.json");
    let mut manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
    manifest["schema_version"] = serde_json::json!(1);
    // A v1 manifest has no per-shard `batches`: the version must be named before that matters.
    for shard in manifest["shards"].as_array_mut().expect("shards") {
        shard.as_object_mut().expect("object").remove("batches");
    }
    std::fs::write(&path, manifest.to_string()).expect("write");
    let err = ShardIndex::open(dir.path(), &IndexOptions::default()).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("schema version 1"), "{msg}");
    assert!(msg.contains("rebuild"), "{msg}");
    assert!(msg.contains(&path.display().to_string()), "{msg}");
}
