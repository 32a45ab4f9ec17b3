//! `llava-trainer bench`: synthetic training steps of a named model shape (random weights, no
//! files), with throughput, model FLOPs, MFU and peak memory; plus the forward/backward timing
//! used by the criterion bench.

use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use serde::Serialize;

use crate::attention::AttentionKind;
use crate::llava_next::{LlavaNextConfig, MergeType};
use crate::memory::{MemoryPlan, PlanInput};
use crate::optim::{AdamW, AdamWConfig};
use crate::step::{self, GradAccumulator, StepOptions};
use crate::train::TunableParts;
use crate::{init, Batch, Error, ImageMeta, LlavaNext, Result};

/// Mean wall time of the phases of one training step (no optimizer).
#[derive(Debug, Clone, Copy)]
pub struct StepTiming {
    pub forward: Duration,
    pub backward: Duration,
    pub iters: usize,
}

/// Runs `warmup` untimed and `iters` timed forward + backward passes of `batch`.
pub fn time_forward_backward(
    model: &LlavaNext,
    batch: &Batch,
    warmup: usize,
    iters: usize,
) -> Result<StepTiming> {
    let step = || -> Result<(Duration, Duration)> {
        let t0 = Instant::now();
        let out = model.forward(batch)?;
        let loss = out
            .loss
            .ok_or_else(|| crate::Error::Batch("benchmark batch needs labels".into()))?;
        // Force the lazy parts of the forward before timing the backward.
        loss.to_scalar::<f32>()?;
        let t1 = Instant::now();
        let grads = loss.backward()?;
        drop(grads);
        Ok((t1 - t0, t1.elapsed()))
    };
    for _ in 0..warmup {
        step()?;
    }
    let (mut fwd, mut bwd) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..iters {
        let (f, b) = step()?;
        fwd += f;
        bwd += b;
    }
    let n = iters.max(1) as u32;
    Ok(StepTiming {
        forward: fwd / n,
        backward: bwd / n,
        iters,
    })
}

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
    pub phases: crate::step::spans::PhaseTimes,
    pub loss: f64,
    pub memory: MemoryReport,
    pub plan: MemoryPlan,
}

/// Random weights for every parameter, drawn on the device (N(0, 0.02), norms 1, biases 0).
pub(crate) fn random_varmap(cfg: &LlavaNextConfig, dtype: DType, dev: &Device) -> Result<VarMap> {
    let varmap = VarMap::new();
    {
        let mut data = varmap
            .data()
            .lock()
            .map_err(|_| Error::Poisoned("VarMap"))?;
        for (name, shape) in init::all_params(cfg) {
            let t = if shape.len() == 1 && name.ends_with(".bias") {
                Tensor::zeros(shape.as_slice(), dtype, dev)?
            } else if shape.len() == 1 && name.ends_with(".weight") {
                Tensor::ones(shape.as_slice(), dtype, dev)?
            } else {
                random_normal(shape.as_slice(), dev)?.to_dtype(dtype)?
            };
            data.insert(name, Var::from_tensor(&t)?);
        }
    }
    Ok(varmap)
}

/// N(0, 0.02) values of `shape`. Tensors above a million values repeat one draw of a prime
/// number of values (rows of a matrix never line up with the period): drawing 1.5e9 normals
/// one by one takes minutes on a CPU, and a benchmark only needs values of the right scale.
fn random_normal(shape: &[usize], dev: &Device) -> Result<Tensor> {
    const PERIOD: usize = 1_048_573;
    let n: usize = shape.iter().product();
    if n <= PERIOD {
        return Ok(Tensor::randn(0f32, 0.02, shape, dev)?);
    }
    let base = Tensor::randn(0f32, 0.02, PERIOD, dev)?;
    let t = base.repeat(n.div_ceil(PERIOD))?.narrow(0, 0, n)?;
    Ok(t.reshape(shape)?)
}

/// Image geometry of the synthetic rows: 672×672 on the 2×2 grid (5 tiles, every position kept
/// by unpad), scaled to the config's tile size.
fn bench_image(cfg: &LlavaNextConfig) -> ImageMeta {
    let s = 2 * cfg.vision_config.image_size;
    ImageMeta {
        orig_size: (s, s),
        grid: (2, 2),
        num_tiles: 5,
    }
}

/// The synthetic micro-batch: per row `images` placeholders, then text; the last
/// `supervised` fraction of each row's text carries labels.
fn synthetic_batch(spec: &BenchSpec, dev: &Device) -> Result<(Batch, usize)> {
    let cfg = &spec.model;
    let meta = bench_image(cfg);
    let per_image = cfg.image_token_count(&meta)?;
    let image_tokens = per_image * spec.images;
    if image_tokens >= spec.seq {
        return Err(Error::Config(format!(
            "{} images take {image_tokens} tokens, more than --seq {}",
            spec.images, spec.seq
        )));
    }
    let text = spec.seq - image_tokens;
    let width = text + spec.images;
    let vocab = cfg.text_config.vocab_size.min(128_000) as u64;
    let mut rng = crate::data::rng::SplitMix64::new(spec.seed);
    let (mut ids, mut labels) = (Vec::new(), Vec::new());
    let supervised_from = spec.images + ((1.0 - spec.supervised) * text as f64) as usize;
    let mut supervised = 0;
    for _ in 0..spec.batch {
        for p in 0..width {
            if p < spec.images {
                ids.push(cfg.image_token_index);
                labels.push(-100i64);
            } else {
                let id = (rng.next_u64() % vocab) as i64;
                ids.push(id);
                if p >= supervised_from {
                    labels.push(id);
                    supervised += 1;
                } else {
                    labels.push(-100);
                }
            }
        }
    }
    let tiles = spec.batch * spec.images * meta.num_tiles;
    let s = cfg.vision_config.image_size;
    let pixel_values = if tiles > 0 {
        let px = Tensor::randn(0f32, 1.0, (tiles, 3, s, s), dev)?;
        Some(px)
    } else {
        None
    };
    let batch = Batch {
        input_ids: Tensor::from_vec(ids, (spec.batch, width), &Device::Cpu)?,
        labels: Some(Tensor::from_vec(labels, (spec.batch, width), &Device::Cpu)?),
        lengths: vec![width; spec.batch],
        pixel_values,
        images: vec![meta; spec.batch * spec.images],
        segments: None,
    };
    Ok((batch, supervised))
}

/// Runs the bench on `dev`.
pub fn run_bench(spec: &BenchSpec, dev: &Device) -> Result<BenchReport> {
    let cfg = &spec.model;
    cfg.validate()?;
    let dtype = if spec.bf16 { DType::BF16 } else { DType::F32 };
    // As `run`: TF32 for the f32 matmuls that remain in a bf16 step on CUDA.
    crate::ops::set_tf32(spec.bf16 && dev.is_cuda());
    let parts = TunableParts::parse(&spec.tunable_parts)?;
    let trainable = |n: &str| parts.is_trainable(n);
    let varmap = random_varmap(cfg, dtype, dev)?;
    let (mut model, vars) = init::build_model(cfg, &varmap, &trainable)?;
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

/// Model FLOPs of one step (not counting recomputation): per token `6·N + 12·l·h·s` with N the
/// Llama parameters without the embedding table (lm_head included) — torchtitan's and PaLM's
/// formula — and per tile `k·N_v·P + (k/6)·12·l_v·h_v·P²` for the vision layers that run (k = 6
/// when the vision tower trains, 2 when it only runs forward; P = positions per tile).
fn model_flops(
    spec: &BenchSpec,
    cfg: &LlavaNextConfig,
    tiles: usize,
    trainable: &dyn Fn(&str) -> bool,
) -> (f64, f64, String) {
    let t = &cfg.text_config;
    let params = init::all_params(cfg);
    let count = |pred: &dyn Fn(&str) -> bool| -> f64 {
        params
            .iter()
            .filter(|(n, _)| pred(n))
            .map(|(_, s)| s.iter().product::<usize>() as f64)
            .sum()
    };
    let n_llm = count(&|n| n.starts_with("language_model.") && !n.contains("embed_tokens"));
    let l = t.num_hidden_layers as f64;
    let per_token = 6.0 * n_llm + 12.0 * l * t.hidden_size as f64 * spec.seq as f64;
    let vision_layers = cfg
        .vision_config
        .layers_for_feature_layer(cfg.vision_feature_layer)
        .unwrap_or(0);
    let n_v = count(&|n| {
        n.starts_with("vision_tower.")
            && n.split(".layers.")
                .nth(1)
                .and_then(|r| r.split('.').next())
                .and_then(|k| k.parse::<usize>().ok())
                .is_some_and(|k| k < vision_layers)
    });
    let k = if params
        .iter()
        .any(|(n, _)| n.starts_with("vision_tower.") && trainable(n))
    {
        6.0
    } else {
        2.0
    };
    let p = cfg.vision_config.num_positions() as f64;
    let per_tile = k * n_v * p
        + k / 6.0 * 12.0 * vision_layers as f64 * cfg.vision_config.hidden_size as f64 * p * p;
    let per_step = per_token * (spec.batch * spec.seq) as f64 + per_tile * tiles as f64;
    let formula = "per token 6·N_llm + 12·layers·hidden·seq (N_llm: Llama without the embedding \
                   table, lm_head included); per tile k·N_vision·577 + (k/6)·12·layers_v·1024·577² \
                   (k = 6 if the vision tower trains, else 2); recomputation not counted; \
                   MFU = model_flops_per_step / step_s / peak_flops (torchtitan)"
        .to_string();
    (per_token, per_step, formula)
}

/// Peak memory over a span: RSS high-water mark on the CPU, sampled driver use on CUDA.
struct MemoryProbe {
    baseline: u64,
    #[allow(dead_code)]
    sampler: Option<(
        std::sync::Arc<std::sync::atomic::AtomicBool>,
        std::thread::JoinHandle<u64>,
    )>,
    cpu: bool,
}

fn proc_status_kib(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

impl MemoryProbe {
    fn start(dev: &Device) -> Result<Self> {
        match dev {
            Device::Cpu if crate::heap::is_installed() => {
                crate::heap::reset_peak();
                Ok(Self {
                    baseline: crate::heap::live(),
                    sampler: None,
                    cpu: true,
                })
            }
            Device::Cpu => {
                // Reset the high-water mark so the peak is this span's (Linux ≥ 4.0).
                let _ = std::fs::write("/proc/self/clear_refs", "5");
                Ok(Self {
                    baseline: proc_status_kib("VmRSS:").unwrap_or(0) * 1024,
                    sampler: None,
                    cpu: true,
                })
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(cuda) => {
                use candle_core::cuda::cudarc::driver::result::mem_get_info;
                use std::sync::atomic::{AtomicBool, Ordering};
                let used = || mem_get_info().map(|(free, total)| (total - free) as u64);
                let baseline = used().map_err(|e| Error::Config(format!("cuda memory: {e}")))?;
                let stop = std::sync::Arc::new(AtomicBool::new(false));
                let flag = stop.clone();
                let stream = cuda.cuda_stream();
                let handle = std::thread::spawn(move || {
                    let _ = stream.context().bind_to_thread();
                    let mut peak = 0u64;
                    while !flag.load(Ordering::Relaxed) {
                        if let Ok((free, total)) = mem_get_info() {
                            peak = peak.max((total - free) as u64);
                        }
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    peak
                });
                Ok(Self {
                    baseline,
                    sampler: Some((stop, handle)),
                    cpu: false,
                })
            }
            _ => Err(Error::Config("bench: unsupported device".into())),
        }
    }

    /// `(peak, baseline, method)`.
    fn finish(self) -> Result<(u64, u64, String)> {
        if self.cpu && crate::heap::is_installed() {
            return Ok((
                crate::heap::peak(),
                self.baseline,
                "cpu: peak live heap bytes (counting global allocator)".into(),
            ));
        }
        if self.cpu {
            let peak = proc_status_kib("VmHWM:").unwrap_or(0) * 1024;
            return Ok((peak, self.baseline, "cpu: peak RSS (VmHWM)".into()));
        }
        let peak = match self.sampler {
            Some((stop, handle)) => {
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
                handle.join().unwrap_or(0)
            }
            None => 0,
        };
        Ok((
            peak,
            self.baseline,
            "cuda: device memory in use (driver view, sampled every 2 ms)".into(),
        ))
    }
}

/// `llava-next-8b` (the real 8B config), `tiny` (trainer/configs/tiny-model.json's shape) or a
/// path to an HF LlavaNext `config.json`; `layers` cuts the decoder depth, `vision_layers` the
/// encoder's.
pub fn named_config(
    name: &str,
    layers: Option<usize>,
    vision_layers: Option<usize>,
) -> Result<LlavaNextConfig> {
    let mut cfg = match name {
        "llava-next-8b" | "llama3-llava-next-8b" => LlavaNextConfig::llama3_llava_next_8b(),
        "tiny" => tiny_config()?,
        path => LlavaNextConfig::from_file(path)?,
    };
    if let Some(l) = layers {
        cfg.text_config.num_hidden_layers = l;
    }
    if let Some(v) = vision_layers {
        // Keep the selected layer one below the top, as LLaVA's -2.
        cfg.vision_config.num_hidden_layers = v + 1;
    }
    cfg.mm_patch_merge_type = MergeType::SpatialUnpad;
    cfg.validate()?;
    Ok(cfg)
}

/// The shape of `trainer/configs/tiny-model.json` (compiled in: the bench needs no files).
fn tiny_config() -> Result<LlavaNextConfig> {
    let spec: init::InitSpec = serde_json::from_str(include_str!("../configs/tiny-model.json"))
        .map_err(|e| Error::Config(format!("tiny-model.json: {e}")))?;
    spec.config()
}

/// Tensors candle has created in this process so far: its `TensorId` counter, which every op
/// (a kernel launch, or a view such as `narrow` / `reshape`) advances by one. Reading it creates
/// one tensor, which the callers subtract.
fn tensors_created() -> Result<u64> {
    let probe = Tensor::zeros((), DType::F32, &Device::Cpu)?;
    let text = format!("{:?}", probe.id());
    text.trim_start_matches("TensorId(")
        .trim_end_matches(')')
        .parse()
        .map_err(|_| Error::Config(format!("unexpected tensor id {text:?}")))
}

/// Tensor ops of one decoder layer's attention (forward, and backward through autograd).
#[derive(Debug, Clone, Serialize)]
pub struct AttentionOpCount {
    pub seq: usize,
    pub attention: String,
    pub forward_ops: u64,
    pub backward_ops: u64,
    /// Whole decoder layers (norms, projections, RoPE, attention, MLP), two in a row sharing
    /// one mask as a model's layers do: the first and the second layer's forward and backward.
    pub layers: [LayerOps; 2],
    /// What is counted.
    pub method: String,
}

/// Tensor ops of one whole decoder layer.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct LayerOps {
    pub forward_ops: u64,
    pub backward_ops: u64,
}

/// Counts the tensor ops of one causal attention call over `seq` tokens (Llama-3's 4:1 query
/// to key/value heads) and of its backward. The count depends on the number of blocks, not on
/// the head count or size, so small heads give the 8B model's count at a fraction of the work.
pub fn count_attention_ops(
    seq: usize,
    kind: AttentionKind,
    dev: &Device,
) -> Result<AttentionOpCount> {
    let (hq, hkv, d) = (4, 1, 8);
    let q = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, hq, seq, d), dev)?)?;
    let k = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, hkv, seq, d), dev)?)?;
    let v = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, hkv, seq, d), dev)?)?;
    let mask = crate::attention::AttentionMask::causal(&[seq], seq, dev)?;
    let g = Tensor::randn(0f32, 1.0, (1, hq, seq, d), dev)?;
    let c0 = tensors_created()?;
    let y = crate::attention::attend(&q, &k, &v, &mask, 1.0 / (d as f64).sqrt(), kind)?;
    let c1 = tensors_created()?;
    let loss = (y * &g)?.sum_all()?;
    let c2 = tensors_created()?;
    let grads = loss.backward()?;
    let c3 = tensors_created()?;
    drop(grads);
    let layers = count_layer_ops(seq, kind, dev)?;
    Ok(AttentionOpCount {
        seq,
        attention: kind.to_string(),
        forward_ops: c1 - c0 - 1,
        backward_ops: c3 - c2 - 1,
        layers,
        method: "tensors candle creates (its TensorId counter): every kernel launch makes one, \
                 and so does every view (narrow, reshape, transpose)"
            .into(),
    })
}

/// Two small decoder layers (4 query heads, 1 key/value head, head size 8) over one `seq`-token
/// sample, sharing one layer context as a model's layers do; each layer's forward and backward
/// from its own input (the count depends on the blocks, not on the sizes). The first builds the
/// mask's partial-block biases, the second reuses them.
fn count_layer_ops(seq: usize, kind: AttentionKind, dev: &Device) -> Result<[LayerOps; 2]> {
    use crate::llama::{LayerContext, LlamaConfig, LlamaDecoderLayer};
    let cfg = LlamaConfig {
        vocab_size: 16,
        hidden_size: 32,
        intermediate_size: 64,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 1,
        head_dim: Some(8),
        max_position_embeddings: seq.max(1),
        ..LlamaConfig::llama3_8b()
    };
    let varmap = VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, dev);
    let layers = [
        LlamaDecoderLayer::new(&cfg, vb.pp("layers.0"))?,
        LlamaDecoderLayer::new(&cfg, vb.pp("layers.1"))?,
    ];
    let ctx = LayerContext::causal(&cfg, &[seq], seq, DType::F32, dev, kind)?;
    let mut out = [LayerOps {
        forward_ops: 0,
        backward_ops: 0,
    }; 2];
    for (i, layer) in layers.iter().enumerate() {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, seq, cfg.hidden_size), dev)?)?;
        let g = Tensor::randn(0f32, 1.0, (1, seq, cfg.hidden_size), dev)?;
        let c0 = tensors_created()?;
        let y = layer.forward(&x, &ctx)?;
        let c1 = tensors_created()?;
        let loss = (y * &g)?.sum_all()?;
        let c2 = tensors_created()?;
        let grads = loss.backward()?;
        let c3 = tensors_created()?;
        drop(grads);
        out[i] = LayerOps {
            forward_ops: c1 - c0,
            backward_ops: c3 - c2,
        };
    }
    Ok(out)
}
