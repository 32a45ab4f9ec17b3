//! `llava-trainer bench --shards DIR`: training throughput of the same micro-batches of real
//! shards laid out one sample per row (grouped batching, padded to the longest) and packed
//! (`packing = true`), measured alternately in one run on one model.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use serde::Serialize;

use crate::diag::bench::random_varmap;
use crate::model::attention::AttentionKind;
use crate::train::step::{self, GradAccumulator, StepOptions};
use crate::train::{check_compatible, to_model_batch, TunableParts};
use crate::{Batch, Error, LlavaNextConfig, Result};
use llava_loader::{
    Batch as DataBatch, DataState, EpochPlan, IndexOptions, Loader, LoaderConfig, PixelFormat,
    PlanConfig, ShardIndex,
};

/// What to measure.
#[derive(Debug, Clone)]
pub struct PackingBenchSpec {
    pub shards: PathBuf,
    pub model: LlavaNextConfig,
    pub model_name: String,
    /// Micro-batches (the first ones of epoch 0 at world size 1).
    pub batches: usize,
    /// Samples per micro-batch (default: the shards').
    pub batch_size: Option<usize>,
    /// Row capacity (default: the shards' `model_max_length`).
    pub pack_length: Option<u32>,
    /// Timed passes over the micro-batches per layout (alternating grouped / packed).
    pub rounds: usize,
    pub recompute: bool,
    pub attention: AttentionKind,
    pub tunable_parts: String,
    pub seed: u64,
}

/// One layout's figures.
#[derive(Debug, Clone, Serialize)]
pub struct LayoutReport {
    pub rows: usize,
    pub samples: usize,
    /// Real tokens (image tokens included) per pass.
    pub tokens: u64,
    /// Rows × longest row, summed over micro-batches: the positions the model computes.
    pub positions: u64,
    /// `tokens / positions`.
    pub efficiency: f64,
    /// Mean seconds per pass over all micro-batches (forward + backward).
    pub seconds: f64,
    /// Real tokens per second.
    pub tokens_per_s: f64,
    /// Mean training loss of the micro-batches (the same samples: equal up to float noise).
    pub mean_loss: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PackingBenchReport {
    pub model: String,
    pub device: String,
    pub shards: String,
    pub batches: usize,
    pub pack_length: u32,
    pub rounds: usize,
    pub gradient_checkpointing: bool,
    pub attention: String,
    pub grouped: LayoutReport,
    pub packed: LayoutReport,
    /// Packed tokens/s over grouped tokens/s.
    pub speedup: f64,
}

/// Loads the plan's first `n` micro-batches of rank 0 (`pack_length` None: unpacked).
fn load(
    index: &Arc<ShardIndex>,
    spec: &PackingBenchSpec,
    pack_length: Option<u32>,
) -> Result<Vec<DataBatch>> {
    let cfg = PlanConfig {
        seed: spec.seed,
        world_size: 1,
        batch_size: spec.batch_size,
        pack_length,
        across_batches: false,
    };
    let plan = EpochPlan::new(index, &cfg, &DataState::new(0))?;
    let jobs = plan.rank_batches(index, 0)?.take(spec.batches);
    let loader = Loader::new(
        index.clone(),
        jobs,
        &LoaderConfig {
            workers: 2,
            prefetch: 4,
            pixels: PixelFormat::F32,
            on_corrupt: Default::default(),
        },
    )?;
    Ok(loader.collect::<std::result::Result<Vec<_>, _>>()?)
}

/// Rows × the longest row (image tokens expanded): the positions a forward computes.
fn positions(b: &DataBatch) -> u64 {
    let row_tokens =
        |r: &Vec<usize>| -> u64 { r.iter().map(|&s| u64::from(b.model_lengths[s])).sum() };
    b.rows.iter().map(row_tokens).max().unwrap_or(0) * b.num_rows() as u64
}

pub fn run_packing_bench(spec: &PackingBenchSpec, dev: &Device) -> Result<PackingBenchReport> {
    let index = Arc::new(ShardIndex::open(&spec.shards, &IndexOptions::default())?);
    let mut cfg = spec.model.clone();
    if cfg.tokenizer_model_max_length.is_none() {
        cfg.tokenizer_model_max_length = Some(index.manifest.settings.model_max_length);
    }
    check_compatible(&index, &cfg, None)?;
    let pack_length = spec
        .pack_length
        .unwrap_or(index.manifest.settings.model_max_length as u32);
    let grouped_data = load(&index, spec, None)?;
    let packed_data = load(&index, spec, Some(pack_length))?;
    if grouped_data.is_empty() {
        return Err(Error::Config(format!(
            "{}: no micro-batch to run",
            spec.shards.display()
        )));
    }

    let parts = TunableParts::parse(&spec.tunable_parts)?;
    let trainable = |n: &str| parts.is_trainable(n);
    let varmap = random_varmap(&cfg, DType::F32, dev)?;
    let (mut model, vars) = crate::model::trainable::build_model(&cfg, &varmap, &trainable)?;
    model.set_attention(spec.attention, AttentionKind::Dense);
    let opts = StepOptions {
        recompute: spec.recompute,
    };
    let to_model = |data: &[DataBatch]| -> Result<Vec<Batch>> {
        data.iter().map(|b| to_model_batch(b, &cfg, dev)).collect()
    };
    let layouts = [to_model(&grouped_data)?, to_model(&packed_data)?];
    let mut acc = GradAccumulator::new(vars);
    // One pass over a layout: seconds and the summed loss.
    let mut pass = |batches: &[Batch]| -> Result<(Duration, f64)> {
        let start = Instant::now();
        let mut loss = 0f64;
        for b in batches {
            let out = step::micro_batch(&model, b, &mut acc, 1, opts)?;
            drop(acc.take());
            // Reading the loss waits for the device.
            loss += f64::from(out.loss.to_scalar::<f32>()?);
        }
        Ok((start.elapsed(), loss))
    };
    // Untimed warm-up of each layout (allocator, kernels), then alternate the order per round.
    for l in &layouts {
        pass(&l[..1])?;
    }
    let mut time = [Duration::ZERO; 2];
    let mut loss = [0f64; 2];
    let rounds = spec.rounds.max(1);
    for r in 0..rounds {
        let order = if r % 2 == 0 { [0, 1] } else { [1, 0] };
        for k in order {
            let (t, l) = pass(&layouts[k])?;
            time[k] += t;
            loss[k] = l;
        }
    }
    let report = |k: usize, data: &[DataBatch]| {
        let tokens: u64 = data.iter().map(|b| b.tokens).sum();
        let positions: u64 = data.iter().map(positions).sum();
        let seconds = time[k].as_secs_f64() / rounds as f64;
        LayoutReport {
            rows: data.iter().map(DataBatch::num_rows).sum(),
            samples: data.iter().map(DataBatch::batch_size).sum(),
            tokens,
            positions,
            efficiency: tokens as f64 / positions.max(1) as f64,
            seconds,
            tokens_per_s: tokens as f64 / seconds.max(1e-12),
            mean_loss: loss[k] / data.len() as f64,
        }
    };
    let grouped = report(0, &grouped_data);
    let packed = report(1, &packed_data);
    Ok(PackingBenchReport {
        model: spec.model_name.clone(),
        device: format!("{dev:?}"),
        shards: spec.shards.display().to_string(),
        batches: grouped_data.len(),
        pack_length,
        rounds,
        gradient_checkpointing: spec.recompute,
        attention: spec.attention.to_string(),
        speedup: packed.tokens_per_s / grouped.tokens_per_s.max(1e-12),
        grouped,
        packed,
    })
}
