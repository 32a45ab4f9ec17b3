//! `loader-bench --plan-memory`: the heap bytes of an epoch plan as kept (group order + cursor)
//! and of one rank's lazy batches, against every step's batches made at once (what the plan held
//! before it was lazy) and one rank's batches as a `Vec` (what the loader held). Counted with the
//! binary's counting allocator ([`super::heap`]).

use std::sync::Arc;
use std::time::Instant;

use llava_loader::index::BatchInfo;
use llava_loader::{DataState, EpochPlan, PlanConfig, SampleRef, ShardIndex};
use serde::Serialize;

use super::heap;
use crate::{Error, Result};

/// Bytes and times of the plan of one epoch (the `--json` object; alphabetical, as it was
/// built as a JSON map).
#[derive(Debug, Clone, Serialize)]
pub struct PlanMemoryReport {
    pub all_steps_made_bytes: u64,
    pub all_steps_made_bytes_per_sample: f64,
    pub all_steps_made_ms: f64,
    pub index_bytes_per_sample: f64,
    pub plan_bytes: u64,
    pub plan_bytes_per_sample: f64,
    pub plan_ms: f64,
    pub rank_batches_bytes: u64,
    pub rank_vec_bytes: u64,
    pub rank_vec_bytes_per_sample: f64,
    pub samples: usize,
    pub steps: usize,
    pub world_size: usize,
    #[serde(skip)]
    rank: usize,
}

/// Live heap bytes that `make` leaves allocated (what it returns, kept alive until measured).
fn heap_delta<T>(make: impl FnOnce() -> Result<T>) -> Result<(u64, T)> {
    let before = heap::live();
    let value = make()?;
    Ok((heap::live().saturating_sub(before), value))
}

/// Measures the plan of `epoch` for `config` and the batches of `rank`.
pub fn measure(
    index: &Arc<ShardIndex>,
    config: &PlanConfig,
    rank: usize,
    epoch: u64,
) -> Result<PlanMemoryReport> {
    if !heap::is_installed() {
        return Err(Error::Config(
            "--plan-memory needs the counting allocator of the llava-trainer binary".into(),
        ));
    }
    let state = DataState::new(epoch);
    let samples = index.samples.len().max(1) as f64;
    let t = Instant::now();
    let (plan_bytes, plan) = heap_delta(|| Ok(EpochPlan::new(index, config, &state)?))?;
    let plan_ms = t.elapsed().as_secs_f64() * 1e3;
    let (rank_bytes, rank_batches) = heap_delta(|| Ok(plan.rank_batches(index, rank)?))?;
    let t = Instant::now();
    let (eager_bytes, eager) = heap_delta(|| Ok(plan.steps()))?;
    let eager_ms = t.elapsed().as_secs_f64() * 1e3;
    drop(eager);
    let (rank_vec_bytes, rank_vec) = heap_delta(|| Ok(plan.rank(rank)?))?;
    drop(rank_vec);
    drop(rank_batches);
    let index_bytes = std::mem::size_of::<SampleRef>() * index.samples.len()
        + std::mem::size_of::<BatchInfo>() * index.batches.len();
    Ok(PlanMemoryReport {
        samples: index.samples.len(),
        world_size: config.world_size,
        steps: plan.num_steps(),
        plan_bytes,
        plan_bytes_per_sample: plan_bytes as f64 / samples,
        plan_ms,
        rank_batches_bytes: rank_bytes,
        all_steps_made_bytes: eager_bytes,
        all_steps_made_bytes_per_sample: eager_bytes as f64 / samples,
        all_steps_made_ms: eager_ms,
        rank_vec_bytes,
        rank_vec_bytes_per_sample: rank_vec_bytes as f64 / samples,
        index_bytes_per_sample: index_bytes as f64 / samples,
        rank,
    })
}

impl PlanMemoryReport {
    /// The report as one line for a terminal.
    pub fn summary(&self) -> String {
        format!(
            "{} samples, world size {}, {} steps: plan {} bytes ({:.4}/sample, made in \
             {:.1} ms), rank {}'s lazy batches {} bytes; every step made at once \
             {} bytes ({:.1}/sample, {:.0} ms), rank {}'s as a Vec \
             {} bytes ({:.1}/sample); the index {:.1} bytes/sample",
            self.samples,
            self.world_size,
            self.steps,
            self.plan_bytes,
            self.plan_bytes_per_sample,
            self.plan_ms,
            self.rank,
            self.rank_batches_bytes,
            self.all_steps_made_bytes,
            self.all_steps_made_bytes_per_sample,
            self.all_steps_made_ms,
            self.rank,
            self.rank_vec_bytes,
            self.rank_vec_bytes_per_sample,
            self.index_bytes_per_sample,
        )
    }
}
