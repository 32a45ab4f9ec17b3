//! Row checksums end to end (issue 27): bytes flipped in a built shard's tile data, or a token id
//! changed under an intact Parquet encoding, stop the loader and training with the shard, row
//! group, row and sample named; `on_corrupt = "skip"` trains on, leaves the sample out and
//! counts it (summary, log.jsonl).

use std::fs::File;
use std::path::{Path, PathBuf};

use arrow_array::RecordBatch;
use llava_e2e::*;
use llava_formats::manifest::Manifest;
use llava_formats::schema::{batch_to_rows, col, rows_to_batch, writer_properties, ShardRow};
use llava_formats::tile_codec::TileEncoding;
use llava_loader::{
    CorruptRow, DataError, DataState, EpochPlan, IndexOptions, Modality, OnCorrupt, PlanConfig,
    ShardIndex,
};
use llava_trainer::train::{self, TrainConfig};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use sha2::{Digest, Sha256};

const SEED: u64 = 42;

/// Where the first sample of rank 0's first planned batch of `modality` (any when `None`) is.
struct Target {
    shard: PathBuf,
    row_group: usize,
    row: usize,
    source: String,
    index: u64,
}

fn first_planned(out: &Path, modality: Option<Modality>) -> Target {
    let index = ShardIndex::open(out, &IndexOptions::default()).expect("index");
    let cfg = PlanConfig {
        seed: SEED,
        world_size: 1,
        batch_size: None,
        pack_length: None,
        across_batches: false,
    };
    let plan = EpochPlan::new(&index, &cfg, &DataState::new(0))
        .expect("plan")
        .rank(0)
        .expect("rank 0");
    let batch = plan
        .iter()
        .find(|b| !b.is_empty() && modality.is_none_or(|m| b.modality == Some(m)))
        .expect("a batch of that modality");
    let part = &batch.parts[0];
    let built = &index.batches[part.batch];
    let sample = &batch.samples[0];
    Target {
        shard: index.shards[built.shard].path.clone(),
        row_group: built.row_group,
        row: built.rows.start + part.rows.start,
        source: index.source_name(sample).to_string(),
        index: sample.index,
    }
}

/// The rows of one row group as stored (tiles still encoded).
fn stored_rows(shard: &Path, row_group: usize) -> Vec<ShardRow> {
    let reader = ParquetRecordBatchReaderBuilder::try_new(File::open(shard).unwrap())
        .unwrap()
        .with_row_groups(vec![row_group])
        .build()
        .unwrap();
    reader
        .flat_map(|b| batch_to_rows(&b.unwrap()).unwrap())
        .collect()
}

/// Flips 64 bytes in the middle of the target row's first tile, in place: found in the file by
/// its stored bytes, inside the `tiles` column chunk (stored without Parquet compression), so
/// Parquet decodes the row as before and only the checksum can tell. Returns the row's id.
fn flip_tile_bytes(t: &Target) -> String {
    let row = stored_rows(&t.shard, t.row_group).swap_remove(t.row);
    let tile = &row.tiles[0];
    assert!(tile.len() > 512, "a tile of {} bytes", tile.len());
    let meta = ParquetRecordBatchReaderBuilder::try_new(File::open(&t.shard).unwrap())
        .unwrap()
        .metadata()
        .clone();
    let chunk = meta
        .row_group(t.row_group)
        .columns()
        .iter()
        .find(|c| c.column_path().parts()[0] == col::TILES)
        .expect("tiles column")
        .byte_range();
    let mut bytes = std::fs::read(&t.shard).unwrap();
    let (lo, hi) = (chunk.0 as usize, (chunk.0 + chunk.1) as usize);
    let at = lo
        + bytes[lo..hi]
            .windows(256)
            .position(|w| w == &tile[..256])
            .expect("the stored tile bytes are in the tiles column chunk");
    let mid = at + tile.len() / 2;
    for b in &mut bytes[mid - 32..mid + 32] {
        *b ^= 0xA5;
    }
    std::fs::write(&t.shard, bytes).unwrap();
    row.id
}

/// Rewrites the target's shard with one bit of one token id of the target row changed and every
/// stored checksum kept (as a corruption before Parquet's encoding would leave it), row groups
/// as they were, and the manifest's size and SHA-256 updated: only the row checksum can tell.
/// Returns the row's id.
fn flip_token_id(out: &Path, t: &Target) -> String {
    let builder = ParquetRecordBatchReaderBuilder::try_new(File::open(&t.shard).unwrap()).unwrap();
    let schema = builder.schema().clone();
    let row_groups = builder.metadata().num_row_groups();
    let checksum_col = schema.index_of(col::CHECKSUM).unwrap();
    let mut batches = Vec::new();
    let mut id = String::new();
    for rg in 0..row_groups {
        let reader = ParquetRecordBatchReaderBuilder::try_new(File::open(&t.shard).unwrap())
            .unwrap()
            .with_row_groups(vec![rg])
            .with_batch_size(1 << 20)
            .build()
            .unwrap();
        for batch in reader {
            let batch = batch.unwrap();
            if rg != t.row_group {
                batches.push(batch);
                continue;
            }
            let mut rows = batch_to_rows(&batch).unwrap();
            let row = &mut rows[t.row];
            id = row.id.clone();
            let last = row.input_ids.len() - 1;
            row.input_ids[last] ^= 1;
            let changed = rows_to_batch(&rows, &schema);
            let mut columns = changed.columns().to_vec();
            columns[checksum_col] = batch.column(checksum_col).clone();
            batches.push(RecordBatch::try_new(schema.clone(), columns).unwrap());
        }
    }
    let tmp = t.shard.with_extension("rewrite");
    let props = writer_properties(3, TileEncoding::Raw).unwrap();
    let mut writer =
        ArrowWriter::try_new(File::create(&tmp).unwrap(), schema, Some(props)).unwrap();
    for b in &batches {
        writer.write(b).unwrap();
        writer.flush().unwrap();
    }
    writer.close().unwrap();
    std::fs::rename(&tmp, &t.shard).unwrap();
    // The manifest follows the new file (the index checks sizes), as after a re-copy.
    let manifest_path = out.join("manifest.json");
    let mut manifest =
        Manifest::from_json(&std::fs::read_to_string(&manifest_path).unwrap()).unwrap();
    let bytes = std::fs::read(&t.shard).unwrap();
    let name = t.shard.file_name().unwrap().to_string_lossy().to_string();
    let info = manifest
        .shards
        .iter_mut()
        .find(|s| s.file.ends_with(&name))
        .expect("shard in the manifest");
    info.bytes = bytes.len() as u64;
    info.sha256 = hex::encode(Sha256::digest(&bytes));
    std::fs::write(
        &manifest_path,
        serde_json::to_string_pretty(&manifest).unwrap(),
    )
    .unwrap();
    id
}

/// One epoch of rank 0 through the loader: the first error, if any, and the samples delivered
/// and skipped.
fn load_epoch(out: &Path, on_corrupt: OnCorrupt) -> (Option<DataError>, usize, Vec<CorruptRow>) {
    let index = ShardIndex::open(out, &IndexOptions::default()).expect("index");
    let (mut samples, mut skipped) = (0, Vec::new());
    for batch in epoch0_u8_loader(&index, SEED, 2, on_corrupt).expect("loader") {
        match batch {
            Ok(b) => {
                samples += b.batch_size();
                assert_eq!(b.num_rows(), b.batch_size(), "one row per remaining sample");
                skipped.extend(b.skipped);
            }
            Err(e) => return (Some(e), samples, skipped),
        }
    }
    (None, samples, skipped)
}

fn assert_names(bad: &CorruptRow, t: &Target, id: &str) {
    assert_eq!(bad.path, t.shard);
    assert_eq!((bad.row_group, bad.row), (t.row_group, t.row));
    assert_eq!(
        (bad.source.as_str(), bad.index),
        (t.source.as_str(), t.index)
    );
    assert_eq!(bad.id, id);
    assert_ne!(bad.expected, bad.found);
}

fn check_corruption(out: &Path, t: &Target, id: &str) {
    let total = ShardIndex::open(out, &IndexOptions::default())
        .unwrap()
        .samples
        .len();
    // Stops, naming the place.
    let (err, _, _) = load_epoch(out, OnCorrupt::Stop);
    let err = err.expect("the corrupt row stops the epoch");
    let DataError::RowChecksum(bad) = &err else {
        panic!("expected a row checksum error, got: {err}");
    };
    assert_names(bad, t, id);
    let msg = err.to_string();
    for part in [
        t.shard.display().to_string(),
        format!("row group {} row {}", t.row_group, t.row),
        format!("{}#{}", t.source, t.index),
        format!("{id:?}"),
        "--on-corrupt skip".to_string(),
    ] {
        assert!(msg.contains(&part), "{part:?} not in: {msg}");
    }
    // Skips it and goes on: every other sample once.
    let (err, samples, skipped) = load_epoch(out, OnCorrupt::Skip);
    assert!(err.is_none(), "{err:?}");
    assert_eq!(skipped.len(), 1);
    assert_names(&skipped[0], t, id);
    assert_eq!(samples, total - 1);
}

#[test]
fn flipped_tile_bytes_are_found_and_located() {
    let (dir, _cleanup) = scratch_removed_on_success("integrity-tiles");
    let out = build_shards(&dir);
    let (_, samples, skipped) = load_epoch(&out, OnCorrupt::Stop);
    assert!(skipped.is_empty());
    let t = first_planned(&out, Some(Modality::Image));
    let id = flip_tile_bytes(&t);
    check_corruption(&out, &t, &id);
    assert!(samples > 1);
}

#[test]
fn a_changed_token_id_is_found_and_located() {
    let (dir, _cleanup) = scratch_removed_on_success("integrity-tokens");
    let out = build_shards(&dir);
    let t = first_planned(&out, None);
    let id = flip_token_id(&out, &t);
    check_corruption(&out, &t, &id);
}

#[test]
fn training_stops_at_a_corrupt_row_or_skips_and_counts_it() {
    let (dir, _cleanup) = scratch_removed_on_success("integrity-train");
    let out = build_shards(&dir);
    let model = tiny_model(&dir);
    // The first sample of the first step.
    let t = first_planned(&out, None);
    let id = flip_token_id(&out, &t);
    let config = |output: &str, on_corrupt| {
        let mut c = TrainConfig::new(out.clone(), model.clone(), dir.join(output));
        c.seed = SEED;
        c.max_steps = Some(2);
        c.workers = 2;
        c.merge_type = Some(llava_trainer::model::config::MergeType::Flat);
        c.on_corrupt = on_corrupt;
        c
    };

    let err = train::run(&config("stop", OnCorrupt::Stop), Default::default())
        .expect_err("a corrupt row stops training")
        .to_string();
    for part in [
        format!("row group {} row {}", t.row_group, t.row),
        format!("{}#{}", t.source, t.index),
        id.clone(),
    ] {
        assert!(err.contains(&part), "{part:?} not in: {err}");
    }

    let cfg = config("skip", OnCorrupt::Skip);
    let summary = train::run(&cfg, Default::default()).expect("skipping trains on");
    assert_eq!(summary.steps_done, 2);
    assert_eq!(
        summary.skipped_corrupt.len(),
        1,
        "{:?}",
        summary.skipped_corrupt
    );
    assert!(summary.skipped_corrupt[0].contains(&format!("{}#{}", t.source, t.index)));
    assert!(summary.history.iter().all(|s| s.loss.is_finite()));
    let log = std::fs::read_to_string(cfg.output.join("log.jsonl")).unwrap();
    let line: serde_json::Value = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|l| l.get("skipped_corrupt").is_some())
        .expect("a log.jsonl line for the skipped sample");
    assert_eq!(line["step"], 1);
    assert_eq!(line["skipped_corrupt_total"], 1);
    assert!(line["skipped_corrupt"][0].as_str().unwrap().contains(&id));
}
