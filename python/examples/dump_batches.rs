//! The Rust loader's batches as JSON lines: the reference the Python tests compare
//! `llava_data.ShardDataset` with (same samples, order, ids, labels, masks and pixel bytes).
//!
//! ```sh
//! cargo run -p llava-data-py --example dump_batches -- --shards out/example [--world-size 2 --rank 1]
//! ```
//!
//! One line per batch of the rank: `step`, `epoch`, `ids` ([source, index, id] per sample),
//! `rows`, `row_samples`, `segments`, `seq_len`, `input_ids` / `labels` / `attention_mask` (row-major `[rows, seq_len]`),
//! `lengths`, `images` ([width, height, num_tiles] per image), `tokens`, `pixels_sha256` (SHA-256
//! of all tiles: little-endian float32, or uint8 with `--u8`) and `next_state`.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use llava_loader::{
    DataState, EpochPlan, IndexOptions, Loader, LoaderConfig, PixelFormat, Pixels, PlanConfig,
    ShardIndex,
};
use sha2::{Digest, Sha256};

#[derive(Parser, Debug)]
struct Args {
    /// Folder with manifest.json and the shards.
    #[arg(long)]
    shards: PathBuf,
    #[arg(long, default_value_t = 0)]
    rank: usize,
    #[arg(long, default_value_t = 1)]
    world_size: usize,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    #[arg(long, default_value_t = 0)]
    epoch: u64,
    #[arg(long)]
    batch_size: Option<usize>,
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Hand tiles over as uint8 instead of normalised float32.
    #[arg(long)]
    u8: bool,
    /// Pack each batch into rows of at most this many tokens.
    #[arg(long)]
    pack_length: Option<u32>,
    /// With --pack-length: fill rows across batch boundaries (`run --pack-across-batches`).
    #[arg(long, requires = "pack_length")]
    pack_across_batches: bool,
    /// Resume from this data state (JSON, as saved with a checkpoint).
    #[arg(long)]
    state: Option<String>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let index = ShardIndex::open(&args.shards, &IndexOptions::default())?;
    let config = PlanConfig {
        seed: args.seed,
        world_size: args.world_size,
        batch_size: args.batch_size,
        pack_length: args.pack_length,
        across_batches: args.pack_across_batches,
    };
    let state = match &args.state {
        Some(json) => serde_json::from_str(json).context("--state is not a data state")?,
        None => DataState::new(args.epoch),
    };
    let plan = EpochPlan::new(&index, &config, &state)?.rank_batches(&index, args.rank)?;
    let loader_config = LoaderConfig {
        workers: args.workers,
        prefetch: args.workers,
        pixels: if args.u8 {
            PixelFormat::U8
        } else {
            PixelFormat::F32
        },
        on_corrupt: Default::default(),
    };
    let mut out = std::io::stdout().lock();
    for batch in Loader::new(index.clone(), plan, &loader_config)? {
        let batch = batch?;
        let digest = match &batch.pixels {
            Pixels::F32(v) => {
                let mut h = Sha256::new();
                for x in v {
                    h.update(x.to_le_bytes());
                }
                h.finalize()
            }
            Pixels::U8(v) => Sha256::digest(v),
        };
        let line = serde_json::json!({
            "step": batch.step,
            "epoch": batch.epoch,
            "ids": batch.samples.iter().map(|s| serde_json::json!([s.source, s.index, s.id])).collect::<Vec<_>>(),
            "rows": batch.num_rows(),
            "row_samples": batch.rows,
            "segments": batch.segments,
            "seq_len": batch.seq_len,
            "input_ids": batch.input_ids,
            "labels": batch.labels,
            "attention_mask": batch.attention_mask,
            "lengths": batch.lengths,
            "images": batch.images.iter().map(|i| [i.width, i.height, i.num_tiles]).collect::<Vec<_>>(),
            "tokens": batch.tokens,
            "pixels_sha256": hex::encode(digest),
            "next_state": batch.next_state,
        });
        writeln!(out, "{line}")?;
    }
    Ok(())
}
