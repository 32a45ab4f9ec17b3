//! `llava-trainer loader-bench`: throughput and latency of the data loader on local shards, or
//! the plan of one rank as JSON lines (`--dry-run`).

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use llava_loader::index::BatchInfo;
use llava_loader::synthetic::{write_synthetic, SynthSpec};
use llava_loader::{
    DataState, EpochPlan, IndexOptions, Loader, LoaderConfig, PixelFormat, PlanConfig, SampleRef,
    ShardIndex,
};
use llava_trainer::diag::heap;

#[derive(clap::Args, Debug)]
#[command(after_help = "\
Examples:
  llava-trainer loader-bench --shards out/example --workers 4 --max-batches 50
  llava-trainer loader-bench --shards out/example --world-size 4 --rank 1 --dry-run
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

/// Peak resident set size of this process so far (Linux `VmHWM`), in MiB.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i].as_secs_f64() * 1e3
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
    let config = PlanConfig {
        seed: args.seed,
        world_size: args.world_size,
        batch_size: args.batch_size,
        pack_length: None,
        across_batches: false,
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
    let start = Instant::now();
    let mut loader = Loader::new(index.clone(), batches, &loader_config)?;
    let (mut waits, mut builds) = (Vec::new(), Vec::new());
    let (mut samples, mut tiles, mut bytes) = (0usize, 0usize, 0u64);
    loop {
        let t = Instant::now();
        let Some(batch) = loader.next() else { break };
        waits.push(t.elapsed());
        let batch = batch?;
        builds.push(batch.load_time);
        samples += batch.batch_size();
        tiles += batch.num_tiles;
        bytes += batch.bytes_read;
    }
    let wall = start.elapsed().as_secs_f64();
    drop(loader);
    let first_wait = waits.first().copied().unwrap_or_default();
    let to_first_batch = start - opened + first_wait;
    // Steady state excludes the first batch (pipeline fill).
    let mut steady: Vec<Duration> = waits.iter().skip(1).copied().collect();
    steady.sort();
    builds.sort();
    let result = serde_json::json!({
        "workers": args.workers,
        "batches": waits.len(),
        "samples": samples,
        "tiles": tiles,
        "seconds": wall,
        "samples_per_s": samples as f64 / wall,
        "samples_per_s_per_worker": samples as f64 / wall / args.workers as f64,
        "shard_mb_per_s": bytes as f64 / 1e6 / wall,
        "tile_mb_per_s": (tiles * 3 * index.tile_size() * index.tile_size()) as f64 / 1e6 / wall,
        "first_batch_ms": first_wait.as_secs_f64() * 1e3,
        "open_ms": open_time.as_secs_f64() * 1e3,
        "time_to_first_batch_ms": to_first_batch.as_secs_f64() * 1e3,
        "peak_rss_mib": peak_rss_mib(),
        "wait_p50_ms": percentile(&steady, 0.50),
        "wait_p99_ms": percentile(&steady, 0.99),
        "worker_p50_ms": percentile(&builds, 0.50),
        "worker_p99_ms": percentile(&builds, 0.99),
        // `--shards s3://…`: ranged requests made, ranges served by --cache-dir, ranges evicted.
        "object_store": index.remote.as_ref().map(|r| {
            let s = r.cache_stats();
            serde_json::json!({"fetches": s.fetches, "cache_hits": s.hits,
                "cache_evictions": s.evictions, "cache_bytes": s.bytes})
        }),
    });
    if args.json {
        println!("{result}");
    } else {
        println!(
            "index opened in {:.1} ms, first batch {:.1} ms after the start (open + plan + read); peak RSS {:.0} MiB\n\
             {} batches, {samples} samples ({tiles} tiles) in {wall:.2}s with {} workers: \
             {:.1} samples/s ({:.1}/worker), {:.1} MB/s shard bytes, {:.1} MB/s tiles; \
             consumer wait p50 {:.1} ms p99 {:.1} ms (first {:.1} ms); \
             worker per batch p50 {:.1} ms p99 {:.1} ms",
            open_time.as_secs_f64() * 1e3,
            to_first_batch.as_secs_f64() * 1e3,
            peak_rss_mib().unwrap_or(f64::NAN),
            waits.len(),
            args.workers,
            result["samples_per_s"].as_f64().unwrap_or(0.0),
            result["samples_per_s_per_worker"].as_f64().unwrap_or(0.0),
            result["shard_mb_per_s"].as_f64().unwrap_or(0.0),
            result["tile_mb_per_s"].as_f64().unwrap_or(0.0),
            result["wait_p50_ms"].as_f64().unwrap_or(0.0),
            result["wait_p99_ms"].as_f64().unwrap_or(0.0),
            result["first_batch_ms"].as_f64().unwrap_or(0.0),
            result["worker_p50_ms"].as_f64().unwrap_or(0.0),
            result["worker_p99_ms"].as_f64().unwrap_or(0.0),
        );
    }
    Ok(())
}

/// Live heap bytes that `make` leaves allocated (what it returns, kept alive until measured).
fn heap_delta<T>(make: impl FnOnce() -> Result<T>) -> Result<(u64, T)> {
    let before = heap::live();
    let value = make()?;
    Ok((heap::live().saturating_sub(before), value))
}

/// `--plan-memory`: the plan as kept (group order + cursor), one rank's lazy batches, and, for
/// comparison, every step's batches made at once (what the plan held before it was lazy) and
/// one rank's batches as a `Vec` (what the loader held).
fn plan_memory(index: &Arc<ShardIndex>, config: &PlanConfig, args: &Args) -> Result<()> {
    if !heap::is_installed() {
        bail!("--plan-memory needs the counting allocator of the llava-trainer binary");
    }
    let state = DataState::new(args.epoch);
    let samples = index.samples.len().max(1) as f64;
    let t = Instant::now();
    let (plan_bytes, plan) = heap_delta(|| Ok(EpochPlan::new(index, config, &state)?))?;
    let plan_ms = t.elapsed().as_secs_f64() * 1e3;
    let (rank_bytes, rank) = heap_delta(|| Ok(plan.rank_batches(index, args.rank)?))?;
    let t = Instant::now();
    let (eager_bytes, eager) = heap_delta(|| Ok(plan.steps()))?;
    let eager_ms = t.elapsed().as_secs_f64() * 1e3;
    drop(eager);
    let (rank_vec_bytes, rank_vec) = heap_delta(|| Ok(plan.rank(args.rank)?))?;
    drop(rank_vec);
    drop(rank);
    let index_bytes = std::mem::size_of::<SampleRef>() * index.samples.len()
        + std::mem::size_of::<BatchInfo>() * index.batches.len();
    let result = serde_json::json!({
        "samples": index.samples.len(),
        "world_size": config.world_size,
        "steps": plan.num_steps(),
        "plan_bytes": plan_bytes,
        "plan_bytes_per_sample": plan_bytes as f64 / samples,
        "plan_ms": plan_ms,
        "rank_batches_bytes": rank_bytes,
        "all_steps_made_bytes": eager_bytes,
        "all_steps_made_bytes_per_sample": eager_bytes as f64 / samples,
        "all_steps_made_ms": eager_ms,
        "rank_vec_bytes": rank_vec_bytes,
        "rank_vec_bytes_per_sample": rank_vec_bytes as f64 / samples,
        "index_bytes_per_sample": index_bytes as f64 / samples,
    });
    if args.json {
        println!("{result}");
        return Ok(());
    }
    println!(
        "{} samples, world size {}, {} steps: plan {plan_bytes} bytes ({:.4}/sample, made in \
         {plan_ms:.1} ms), rank {}'s lazy batches {rank_bytes} bytes; every step made at once \
         {eager_bytes} bytes ({:.1}/sample, {eager_ms:.0} ms), rank {}'s as a Vec \
         {rank_vec_bytes} bytes ({:.1}/sample); the index {:.1} bytes/sample",
        index.samples.len(),
        config.world_size,
        plan.num_steps(),
        plan_bytes as f64 / samples,
        args.rank,
        eager_bytes as f64 / samples,
        args.rank,
        rank_vec_bytes as f64 / samples,
        index_bytes as f64 / samples,
    );
    Ok(())
}
