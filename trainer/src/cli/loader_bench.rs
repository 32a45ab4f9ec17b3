//! `llava-trainer loader-bench`: throughput and latency of the data loader on local shards, or
//! the plan of one rank as JSON lines (`--dry-run`).

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use llava_loader::synthetic::{write_synthetic, SynthSpec};
use llava_loader::{
    DataState, EpochPlan, IndexOptions, LoaderConfig, PixelFormat, PlanConfig, ShardIndex,
};

#[derive(clap::Args, Debug)]
#[command(after_help = "\
Examples:
  llava-trainer loader-bench --shards out/example --workers 4 --max-batches 50
  llava-trainer loader-bench --shards out/example --world-size 4 --rank 1 --dry-run
  llava-trainer loader-bench --shards out/example --pack-across-batches --dry-run
  llava-trainer loader-bench --shards out/example --world-size 8 --plan-memory
  llava-trainer loader-bench --shards /tmp/synth --make-synthetic 400 --json")]
pub struct Args {
    /// Folder with manifest.json and the shards, or an object store URL (`s3://bucket/prefix`,
    /// gs://, az://, https://): only the row groups read are fetched (docs/object-storage.md).
    #[arg(long)]
    shards: PathBuf,
    /// With an object store --shards: keep fetched row groups in DIR (later epochs read locally).
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// The cache's size cap, e.g. 200G.
    #[arg(long, value_name = "SIZE", default_value = "100G", value_parser = llava_loader::source::parse_size)]
    cache_size: u64,
    /// Loader threads.
    #[arg(long, default_value_t = 16)]
    workers: usize,
    /// Batches built or buffered at once (default: the number of workers).
    #[arg(long)]
    prefetch: Option<usize>,
    /// Per-device batch size (default: the shards' batch size; divisors and multiples work).
    #[arg(long)]
    batch_size: Option<usize>,
    /// Data-parallel ranks the epoch plan is cut for.
    #[arg(long, default_value_t = 1)]
    world_size: usize,
    /// The rank whose batches are read (0-based).
    #[arg(long, default_value_t = 0)]
    rank: usize,
    /// Epoch of the plan (each epoch has its own seeded order).
    #[arg(long, default_value_t = 0)]
    epoch: u64,
    /// Seed of the data order (the run's `seed`).
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Stop after this many batches.
    #[arg(long)]
    max_batches: Option<usize>,
    /// Hand tiles over as uint8 instead of normalised float32.
    #[arg(long)]
    u8: bool,
    /// Compare every shard's SHA-256 with the manifest first.
    #[arg(long)]
    verify_checksums: bool,
    /// Pack each batch's samples into rows of --pack-length tokens (as `run --packing`).
    #[arg(long)]
    packing: bool,
    /// Fill rows across batch boundaries (as `run --pack-across-batches`).
    #[arg(long)]
    pack_across_batches: bool,
    /// Row length of packing [default: the shards' model_max_length].
    #[arg(long, value_name = "TOKENS")]
    pack_length: Option<u32>,
    /// Print the rank's plan as JSON lines and exit.
    #[arg(long)]
    dry_run: bool,
    /// Print the epoch plan's heap bytes (as kept, and with every batch made at once) and exit.
    #[arg(long)]
    plan_memory: bool,
    /// Print the result as one JSON object.
    #[arg(long)]
    json: bool,
    /// First write this many synthetic five-tile image samples (batch size 4) into --shards.
    #[arg(long)]
    make_synthetic: Option<usize>,
}

pub fn run(args: Args) -> Result<()> {
    if let Some(samples) = args.make_synthetic {
        let spec = SynthSpec {
            image_samples: samples,
            text_samples: 0,
            batch_size: 4,
            group_size: 64,
            groups_per_shard: 4,
            tiles_per_image: 5,
            ..SynthSpec::default()
        };
        let t = Instant::now();
        write_synthetic(&args.shards, &spec)
            .with_context(|| format!("writing synthetic shards to {}", args.shards.display()))?;
        tracing::info!(
            "wrote {samples} synthetic five-tile samples in {:.1}s",
            t.elapsed().as_secs_f64()
        );
    }
    if let Some(dir) = &args.cache_dir {
        llava_loader::source::set_cache(Some(llava_loader::source::CacheOptions {
            dir: dir.clone(),
            max_bytes: args.cache_size,
        }));
    }
    let opened = Instant::now();
    let index = ShardIndex::open(
        &args.shards,
        &IndexOptions {
            verify_checksums: args.verify_checksums,
        },
    )?;
    let open_time = opened.elapsed();
    if args.pack_length.is_some() && !args.packing && !args.pack_across_batches {
        bail!("--pack-length goes with --packing or --pack-across-batches");
    }
    let config = PlanConfig {
        seed: args.seed,
        world_size: args.world_size,
        batch_size: args.batch_size,
        pack_length: PlanConfig::packing_length(
            &index,
            args.packing,
            args.pack_across_batches,
            args.pack_length,
        ),
        across_batches: args.pack_across_batches,
    };
    if args.plan_memory {
        return plan_memory(&index, &config, &args);
    }
    let plan = EpochPlan::new(&index, &config, &DataState::new(args.epoch))?;
    let max = args.max_batches.unwrap_or(usize::MAX);
    let batches = plan.rank_batches(&index, args.rank)?.take(max);
    if args.dry_run {
        let mut out = std::io::stdout().lock();
        for b in batches {
            writeln!(out, "{}", b.to_json(&index))?;
        }
        return Ok(());
    }
    tracing::info!(
        "epoch {} plan: {} steps of batch size {}; {}",
        args.epoch,
        plan.num_steps(),
        plan.batch_size,
        plan.balance()
    );
    if batches.len() == 0 {
        bail!("rank {} has no batches", args.rank);
    }

    let loader_config = LoaderConfig {
        workers: args.workers,
        prefetch: args.prefetch.unwrap_or(args.workers),
        pixels: if args.u8 {
            PixelFormat::U8
        } else {
            PixelFormat::F32
        },
        on_corrupt: Default::default(),
    };
    let report = llava_loader::bench::measure(&index, batches, &loader_config, opened, open_time)?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("{}", report.summary());
    }
    Ok(())
}

/// `--plan-memory`: the plan's own heap bytes ([`llava_trainer::diag::plan_memory`]).
fn plan_memory(index: &Arc<ShardIndex>, config: &PlanConfig, args: &Args) -> Result<()> {
    let report = llava_trainer::diag::plan_memory::measure(index, config, args.rank, args.epoch)?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("{}", report.summary());
    }
    Ok(())
}
