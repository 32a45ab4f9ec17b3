//! `llava-trainer bench`: synthetic training steps of a named model shape (random weights, no
//! files), with throughput, model FLOPs, MFU and peak memory.
//!
//! - [`synthetic`]: the model shape, its random weights and the synthetic micro-batch.
//! - [`flops`]: model FLOPs per step; [`probe`]: peak memory over the timed steps.
//! - [`op_count`]: tensor ops of attention and decoder layers (`--count-ops`).
//! - [`timing`]: forward/backward timing for the criterion bench.
//! - `crate::diag::packing_bench`: the same steps on real shards, packed or not.

pub mod flops;
pub mod op_count;
pub mod probe;
pub mod synthetic;
pub mod timing;

use std::time::Instant;

use candle_core::{DType, Device};
use serde::Serialize;

use crate::diag::memory::{MemoryPlan, PlanInput};
use crate::io::init;
use crate::model::attention::AttentionKind;
use crate::model::config::LlavaNextConfig;
use crate::train::optim::{AdamW, AdamWConfig};
use crate::train::step::{self, GradAccumulator, StepOptions};
use crate::train::TunableParts;
use crate::Result;
use flops::model_flops;
use probe::MemoryProbe;
use synthetic::synthetic_batch;

pub use op_count::{count_attention_ops, AttentionOpCount, LayerOps};
pub use synthetic::{named_config, random_varmap};
pub use timing::{time_forward_backward, StepTiming};

/// The shape and settings of a synthetic step.
#[derive(Debug, Clone)]
pub struct BenchSpec {
    pub model: LlavaNextConfig,
    /// Name printed in the report.
    pub model_name: String,
    pub batch: usize,
    /// Tokens per row, image tokens included.
    pub seq: usize,
    /// Images per row (each a 672×672 picture on a 2×2 grid: 5 tiles).
    pub images: usize,
    /// Fraction of the text tokens that carry loss.
    pub supervised: f64,
    pub bf16: bool,
    pub recompute: bool,
    pub attention: AttentionKind,
    pub loss_chunk: usize,
    pub tunable_parts: String,
    /// Run AdamW after the backward (allocates the optimizer state).
    pub optimizer: bool,
    pub steps: usize,
    /// Untimed steps first (kernels, allocator pools, optimizer state).
    pub warmup: usize,
    pub peak_tflops: Option<f64>,
    pub seed: u64,
    /// Steps after the timed ones with the phase spans on (device synchronised per span).
    pub phase_steps: usize,
}

/// Bytes of memory, measured.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryReport {
    /// "cpu: peak live heap bytes" (the binary's counting allocator; peak RSS where it is not
    /// installed) or "cuda: driver-reported use, sampled every 2 ms".
    pub method: String,
    /// Peak over the timed steps.
    pub peak: u64,
    /// Before the first step: weights (and optimizer state if created up front).
    pub baseline: u64,
    pub weights: u64,
    pub gradients: u64,
    pub optimizer: u64,
    /// `peak - weights - gradients - optimizer` (everything else the step held at its peak).
    pub activations: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub model: String,
    pub device: String,
    pub layers: usize,
    pub vision_layers_run: usize,
    pub batch: usize,
    pub seq: usize,
    pub images_per_row: usize,
    pub tiles: usize,
    pub bf16: bool,
    pub gradient_checkpointing: bool,
    pub attention: String,
    pub optimizer: bool,
    pub trainable_parameters: u64,
    pub steps: usize,
    pub step_s: f64,
    pub tokens_per_s: f64,
    pub supervised_tokens: usize,
    /// Which formula `model_flops_per_step` uses.
    pub flops_formula: String,
    pub model_flops_per_token: f64,
    pub model_flops_per_step: f64,
    pub achieved_tflops: f64,
    pub peak_tflops: Option<f64>,
    pub mfu: Option<f64>,
    /// Seconds per timed step in each phase: spans that synchronise the device (so the sum is
    /// a little above `step_s` on CUDA); `communication_s` is 0 in a one-process bench.
    pub phases: crate::train::step::spans::PhaseTimes,
    pub loss: f64,
    pub memory: MemoryReport,
    pub plan: MemoryPlan,
}

/// Runs the bench on `dev`.
pub fn run_bench(spec: &BenchSpec, dev: &Device) -> Result<BenchReport> {
    let cfg = &spec.model;
    cfg.validate()?;
    let dtype = if spec.bf16 { DType::BF16 } else { DType::F32 };
    // As `run`: TF32 for the f32 matmuls that remain in a bf16 step on CUDA.
    crate::model::ops::set_tf32(spec.bf16 && dev.is_cuda());
    let parts = TunableParts::parse(&spec.tunable_parts)?;
    let trainable = |n: &str| parts.is_trainable(n);
    let varmap = random_varmap(cfg, dtype, dev)?;
    let (mut model, vars) = crate::model::trainable::build_model(cfg, &varmap, &trainable)?;
    model.set_attention(spec.attention, AttentionKind::Dense);
    model.set_loss_chunk(spec.loss_chunk);
    let (batch, supervised) = synthetic_batch(spec, dev)?;
    let tiles = batch.images.iter().map(|m| m.num_tiles).sum::<usize>();
    let plan = MemoryPlan::estimate(&PlanInput {
        model: cfg,
        trainable: &trainable,
        batch_size: spec.batch,
        seq_len: spec.seq,
        tiles,
        bf16: spec.bf16,
        recompute: spec.recompute,
        attention: spec.attention,
        loss_chunk: spec.loss_chunk,
        world_size: 1,
        zero_stage: 0,
    });
    let trainable_params: u64 = vars.iter().map(|(_, v)| v.elem_count() as u64).sum();
    let mut optim = if spec.optimizer {
        Some(AdamW::new(AdamWConfig::default(), vars.clone())?)
    } else {
        None
    };
    let mut acc = GradAccumulator::new(vars.clone());
    let opts = StepOptions {
        recompute: spec.recompute,
    };
    let mut one_step = |acc: &mut GradAccumulator| -> Result<f64> {
        let out = step::micro_batch(&model, &batch, acc, 1, opts)?;
        let grads = acc.take();
        if let Some(o) = optim.as_mut() {
            let _t = step::spans::span(step::spans::Phase::Optimizer);
            o.step(&grads, 1.0)?;
        }
        drop(grads);
        // The step's one read also waits for the device to finish.
        Ok(f64::from(out.loss.to_scalar::<f32>()?))
    };
    for _ in 0..spec.warmup {
        one_step(&mut acc)?;
    }
    let probe = MemoryProbe::start(dev)?;
    let t0 = Instant::now();
    let mut loss = f64::NAN;
    for _ in 0..spec.steps.max(1) {
        loss = one_step(&mut acc)?;
    }
    let step_s = t0.elapsed().as_secs_f64() / spec.steps.max(1) as f64;
    // The phases in extra steps of their own: their synchronisations must not slow the
    // timed ones.
    step::spans::enable(dev);
    let phased = (0..spec.phase_steps).try_for_each(|_| one_step(&mut acc).map(|_| ()));
    let phases = step::spans::disable().per(spec.phase_steps);
    phased?;
    let (peak, baseline, method) = probe.finish()?;

    let e: u64 = if spec.bf16 { 2 } else { 4 };
    let weights: u64 = init::all_params(cfg)
        .iter()
        .map(|(_, s)| s.iter().map(|&d| d as u64).product::<u64>() * e)
        .sum();
    let gradients = trainable_params * 4;
    let optimizer = if spec.optimizer {
        trainable_params * if spec.bf16 { 12 } else { 8 }
    } else {
        0
    };
    let memory = MemoryReport {
        method,
        peak,
        baseline,
        weights,
        gradients,
        optimizer,
        activations: peak.saturating_sub(weights + gradients + optimizer),
    };

    let (per_token, per_step, formula) = model_flops(spec, cfg, tiles, &trainable);
    let tokens = (spec.batch * spec.seq) as f64;
    let achieved = per_step / step_s / 1e12;
    Ok(BenchReport {
        model: spec.model_name.clone(),
        device: format!("{dev:?}"),
        layers: cfg.text_config.num_hidden_layers,
        vision_layers_run: if tiles > 0 { model.vision_layers() } else { 0 },
        batch: spec.batch,
        seq: spec.seq,
        images_per_row: spec.images,
        tiles,
        bf16: spec.bf16,
        gradient_checkpointing: spec.recompute,
        attention: spec.attention.to_string(),
        optimizer: spec.optimizer,
        trainable_parameters: trainable_params,
        steps: spec.steps.max(1),
        step_s,
        tokens_per_s: tokens / step_s,
        supervised_tokens: supervised,
        flops_formula: formula,
        model_flops_per_token: per_token,
        model_flops_per_step: per_step,
        achieved_tflops: achieved,
        peak_tflops: spec.peak_tflops,
        mfu: spec.peak_tflops.map(|p| achieved / p),
        phases,
        loss,
        memory,
        plan,
    })
}
