//! Throughput and latency of the loader over one rank's planned batches, as
//! `llava-trainer loader-bench` reports them: samples/s, shard and tile bytes/s, how long the
//! consumer waited for each batch and how long a worker took to make one, time to the first
//! batch, peak RSS, and the object-store counters when the shards are remote.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::{DataResult, Loader, LoaderConfig, PlannedBatch, ShardIndex};

/// What one pass over the batches measured (the `--json` object of `loader-bench`; fields in
/// the alphabetical order the object had when it was built as a JSON map).
#[derive(Debug, Clone, Serialize)]
pub struct LoaderBenchReport {
    pub batches: usize,
    pub first_batch_ms: f64,
    /// Ranged requests, cache hits and evictions, cache bytes (`--shards s3://…`); null locally.
    pub object_store: Option<ObjectStoreCounts>,
    pub open_ms: f64,
    pub peak_rss_mib: Option<f64>,
    pub samples: usize,
    pub samples_per_s: f64,
    pub samples_per_s_per_worker: f64,
    pub seconds: f64,
    pub shard_mb_per_s: f64,
    pub tile_mb_per_s: f64,
    pub tiles: usize,
    /// Open + plan + the first batch's wait.
    pub time_to_first_batch_ms: f64,
    /// Consumer waits after the first batch (the pipeline fill), in ms.
    pub wait_p50_ms: f64,
    pub wait_p99_ms: f64,
    /// A worker's time to make one batch, in ms.
    pub worker_p50_ms: f64,
    pub worker_p99_ms: f64,
    pub workers: usize,
}

/// The remote reads of a pass.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ObjectStoreCounts {
    pub cache_bytes: u64,
    pub cache_evictions: u64,
    pub cache_hits: u64,
    pub fetches: u64,
}

/// Loads every batch of `batches` with `config` and measures it. `opened` is when opening the
/// index began and `open_time` how long it took: the time to the first batch counts from there.
pub fn measure<P>(
    index: &Arc<ShardIndex>,
    batches: P,
    config: &LoaderConfig,
    opened: Instant,
    open_time: Duration,
) -> DataResult<LoaderBenchReport>
where
    P: IntoIterator<Item = PlannedBatch>,
    P::IntoIter: ExactSizeIterator + Send + 'static,
{
    let start = Instant::now();
    let mut loader = Loader::new(index.clone(), batches, config)?;
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
    let workers = config.workers;
    let tile_bytes = tiles * 3 * index.tile_size() * index.tile_size();
    Ok(LoaderBenchReport {
        workers,
        batches: waits.len(),
        samples,
        tiles,
        seconds: wall,
        samples_per_s: samples as f64 / wall,
        samples_per_s_per_worker: samples as f64 / wall / workers as f64,
        shard_mb_per_s: bytes as f64 / 1e6 / wall,
        tile_mb_per_s: tile_bytes as f64 / 1e6 / wall,
        first_batch_ms: first_wait.as_secs_f64() * 1e3,
        open_ms: open_time.as_secs_f64() * 1e3,
        time_to_first_batch_ms: to_first_batch.as_secs_f64() * 1e3,
        peak_rss_mib: llava_formats::process::peak_rss_mib(None),
        wait_p50_ms: percentile_ms(&steady, 0.50),
        wait_p99_ms: percentile_ms(&steady, 0.99),
        worker_p50_ms: percentile_ms(&builds, 0.50),
        worker_p99_ms: percentile_ms(&builds, 0.99),
        object_store: index.remote.as_ref().map(|r| {
            let s = r.cache_stats();
            ObjectStoreCounts {
                fetches: s.fetches,
                cache_hits: s.hits,
                cache_evictions: s.evictions,
                cache_bytes: s.bytes,
            }
        }),
    })
}

impl LoaderBenchReport {
    /// The report as two lines for a terminal.
    pub fn summary(&self) -> String {
        format!(
            "index opened in {:.1} ms, first batch {:.1} ms after the start (open + plan + read); \
             peak RSS {:.0} MiB\n\
             {} batches, {} samples ({} tiles) in {:.2}s with {} workers: \
             {:.1} samples/s ({:.1}/worker), {:.1} MB/s shard bytes, {:.1} MB/s tiles; \
             consumer wait p50 {:.1} ms p99 {:.1} ms (first {:.1} ms); \
             worker per batch p50 {:.1} ms p99 {:.1} ms",
            self.open_ms,
            self.time_to_first_batch_ms,
            self.peak_rss_mib.unwrap_or(f64::NAN),
            self.batches,
            self.samples,
            self.tiles,
            self.seconds,
            self.workers,
            self.samples_per_s,
            self.samples_per_s_per_worker,
            self.shard_mb_per_s,
            self.tile_mb_per_s,
            self.wait_p50_ms,
            self.wait_p99_ms,
            self.first_batch_ms,
            self.worker_p50_ms,
            self.worker_p99_ms,
        )
    }
}

/// The `p` quantile (0..=1) of sorted durations, in ms (nearest rank).
fn percentile_ms(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}
