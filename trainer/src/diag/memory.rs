//! Per-device memory plan of a training run, from the model config and the run's shape alone.
//!
//! Parameters, gradients and optimizer state are exact byte counts; activations are an estimate
//! from the tensors one decoder / encoder layer keeps for its backward (listed in
//! [`layer_bytes_per_token`]), checked against measured peaks by `llava-trainer bench`.

use serde::Serialize;

use crate::model::attention::AttentionKind;
use crate::model::config::LlavaNextConfig;

/// What the plan depends on.
#[derive(Clone)]
pub struct PlanInput<'a> {
    pub model: &'a LlavaNextConfig,
    /// Trainable parameter names predicate.
    pub trainable: &'a dyn Fn(&str) -> bool,
    pub batch_size: usize,
    /// Tokens per row (text + image tokens), e.g. `model_max_length`.
    pub seq_len: usize,
    /// Tiles in one micro-batch (0 for text only).
    pub tiles: usize,
    pub bf16: bool,
    pub recompute: bool,
    pub attention: AttentionKind,
    pub loss_chunk: usize,
    /// Data-parallel ranks sharing the optimizer state (ZeRO-1) and gradients (ZeRO-2).
    pub world_size: usize,
    pub zero_stage: u8,
}

/// Bytes per device: the rank that needs the most (ZeRO's whole-tensor shards are not equal),
/// with every rank's own figures in [`MemoryPlan::ranks`].
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct MemoryPlan {
    pub parameters: u64,
    pub trainable_parameters: u64,
    /// Model weights as held on the device (bf16 or f32).
    pub weights: u64,
    /// f32 gradient accumulators (ZeRO-2: this rank's partition plus the bucket in flight).
    pub gradients: u64,
    /// AdamW moments, plus f32 master weights under bf16 (sharded by ZeRO-1/2).
    pub optimizer: u64,
    /// Estimated peak of activations: the stored segment inputs (the whole graph without
    /// recompute) plus the largest segment's working set or the loss chunk.
    pub activations: u64,
    /// Peak during a step: weights + gradients + optimizer + activations + the largest
    /// collective's buffers.
    pub total: u64,
    /// Peak during a checkpoint: weights + optimizer + the serialisation of the largest tensor.
    pub checkpoint: u64,
    /// Every rank's figures (one entry per rank; equal at ZeRO-0).
    pub ranks: Vec<RankMemory>,
}

/// One rank's share (see [`MemoryPlan`]).
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct RankMemory {
    pub rank: usize,
    pub gradients: u64,
    pub optimizer: u64,
    /// Peak during a step.
    pub step: u64,
    /// Peak during a checkpoint.
    pub checkpoint: u64,
}

/// Bytes one decoder layer keeps per token for its backward (`e` = activation bytes):
/// two f32 norm inputs and their outputs, q/k/v and their rotations, attention output,
/// o_proj output and residual, gate / up / silu / product of the MLP and its output.
pub fn layer_bytes_per_token(cfg: &LlavaNextConfig, e: u64) -> u64 {
    let t = &cfg.text_config;
    let h = t.hidden_size as u64;
    let q = (t.num_attention_heads * t.head_dim()) as u64;
    let kv = (t.num_key_value_heads * t.head_dim()) as u64;
    let i = t.intermediate_size as u64;
    2 * 4 * h + e * (2 * h + 2 * (q + 2 * kv) + 2 * q + 2 * h + 4 * i + h)
}

/// Bytes one CLIP layer keeps per position (same list with an fc1/fc2 MLP and quick-GELU).
fn vision_layer_bytes_per_position(cfg: &LlavaNextConfig, e: u64) -> u64 {
    let v = &cfg.vision_config;
    let h = v.hidden_size as u64;
    let i = v.intermediate_size as u64;
    2 * 4 * h + e * (2 * h + 4 * h + 2 * h + 3 * i + h)
}

impl MemoryPlan {
    pub fn estimate(p: &PlanInput) -> Self {
        let cfg = p.model;
        let e: u64 = if p.bf16 { 2 } else { 4 };
        let (mut params, mut trainable) = (0u64, 0u64);
        for (name, shape) in crate::io::init::all_params(cfg) {
            let n: u64 = shape.iter().map(|&d| d as u64).product();
            params += n;
            if (p.trainable)(&name) {
                trainable += n;
            }
        }
        let world = p.world_size.max(1);
        let weights = params * e;
        let master = if p.bf16 { 4 } else { 0 };
        // Who owns what (parallel::zero's whole-tensor shards) and ZeRO-2's buckets (the trainable
        // parameters whose gradients one segment's backward completes).
        let trainable_params: Vec<(String, Vec<usize>)> = crate::io::init::all_params(cfg)
            .into_iter()
            .filter(|(n, _)| (p.trainable)(n))
            .collect();
        let count = |s: &[usize]| s.iter().map(|&d| d as u64).product::<u64>();
        let sharding =
            crate::parallel::zero::Sharding::new(&trainable_params, world, p.zero_stage).ok();
        let mut owned = vec![0u64; world];
        let mut largest_owned = vec![0u64; world];
        // Per bucket (backward order): its elements, and each rank's part of them.
        let mut buckets: std::collections::BTreeMap<(u8, usize), (u64, Vec<u64>)> =
            Default::default();
        let mut largest = 0u64;
        for (name, shape) in &trainable_params {
            let n = count(shape);
            largest = largest.max(n);
            let r = sharding.as_ref().map_or(0, |s| s.owner(name));
            owned[r] += n;
            largest_owned[r] = largest_owned[r].max(n);
            let key = crate::train::step::segments::backward_order(
                crate::train::step::segments::param_segment(name),
            );
            let b = buckets.entry(key).or_insert((0, vec![0; world]));
            b.0 += n;
            b.1[r] += n;
        }
        let largest_weight = crate::io::init::all_params(cfg)
            .iter()
            .map(|(_, s)| count(s))
            .max()
            .unwrap_or(0);
        let sharded_opt = p.zero_stage >= 1 && world > 1;
        let sharded_grad = p.zero_stage >= 2 && world > 1;

        let t = &cfg.text_config;
        let (b, s) = (p.batch_size as u64, p.seq_len as u64);
        let tokens = b * s;
        let h = t.hidden_size as u64;
        let layers = t.num_hidden_layers as u64;
        let per_layer = layer_bytes_per_token(cfg, e) * tokens;
        let heads = t.num_attention_heads as u64;
        // f32 scores, probabilities and their gradient at once.
        let scores = match p.attention {
            AttentionKind::Dense => 3 * 4 * b * heads * s * s,
            AttentionKind::Blockwise { block } => {
                let blk = (block as u64).min(s);
                3 * 4 * b * heads * blk * blk
            }
        };
        let vision_positions = p.tiles as u64 * cfg.vision_config.num_positions() as u64;
        let vision_layers = cfg
            .vision_config
            .layers_for_feature_layer(cfg.vision_feature_layer)
            .unwrap_or(0) as u64;
        let vision_layer = vision_layer_bytes_per_position(cfg, e) * vision_positions;
        let vision_scores = 3
            * 4
            * p.tiles as u64
            * cfg.vision_config.num_attention_heads as u64
            * (cfg.vision_config.num_positions() as u64).pow(2);
        let vision_boundary = vision_positions * cfg.vision_config.hidden_size as u64 * e;
        let chunk = p.loss_chunk.max(1) as u64;
        // logits, their exp and their gradient, f32.
        let head = 3 * 4 * chunk.min(tokens) * t.vocab_size as u64;
        // Making one bucket's gradients and adding them up, per parameter: autograd's gradient,
        // the store's zeros and sum, a contiguous copy of a transposed weight (activation
        // dtype), the f32 copy and the accumulator's old and new sums (calibrated against the
        // counting allocator on CPU ranks, docs/multi-gpu.md).
        let transient = |n: u64| n * (3 * e + 12);
        let stored = if p.recompute {
            layers * tokens * h * e + vision_layers * vision_boundary
        } else {
            // Every layer's graph, attention scores included.
            layers * (per_layer + scores) + vision_layers * (vision_layer + vision_scores)
        };
        let segment_working = (per_layer + scores).max(vision_layer + vision_scores);
        // Activations only; the gradients' making (`transient`) counts in the step's phases.
        let activations = stored + segment_working.max(head);
        // The largest tensor's reduction: on the CPU's star-shaped collective, rank 0 holds the
        // running sum, the incoming bytes and tensor and the reply; NCCL needs only the output.
        let collective = if world > 1 { 4 * 4 * largest } else { 0 };
        let ranks: Vec<RankMemory> = (0..world)
            .map(|r| {
                let optimizer = if sharded_opt {
                    owned[r] * (8 + master)
                } else {
                    trainable * (8 + master)
                };
                // The backward, bucket by bucket (the head first): the f32 gradients held so
                // far, plus the bucket being made and its segment's working set.
                let (mut held, mut peak_grads, mut phase) = (0u64, 0u64, 0u64);
                for (key, (n, per_rank)) in &buckets {
                    let working = if key.0 == 0 { head } else { segment_working };
                    // ZeRO-2: the bucket's own sums until they leave (within the transient).
                    let in_flight = if sharded_grad { n * 4 } else { 0 };
                    phase = phase.max(held + transient(*n) + working);
                    held += if sharded_grad { per_rank[r] * 4 } else { n * 4 };
                    peak_grads = peak_grads.max(held + in_flight);
                }
                // After the backward: every gradient and one collective's buffers (stages 0-1),
                // then the optimizer's temporaries for its largest tensor.
                let mine = if sharded_opt {
                    largest_owned[r]
                } else {
                    largest
                };
                phase = phase
                    .max(held + if sharded_grad { 0 } else { collective })
                    .max(held + 3 * 4 * mine);
                // A checkpoint: weights and optimizer state, plus the bytes of the largest tensor
                // this rank serialises (rank 0: the weights; every rank its optimizer shard
                // under ZeRO-1/2, else rank 0 all of it).
                let opt_save = match (sharded_opt, r) {
                    (true, _) => 4 * largest_owned[r],
                    (false, 0) => 4 * largest,
                    (false, _) => 0,
                };
                let weight_save = if r == 0 { e * largest_weight } else { 0 };
                RankMemory {
                    rank: r,
                    gradients: peak_grads,
                    optimizer,
                    step: weights + optimizer + stored + phase,
                    checkpoint: weights + optimizer + opt_save.max(weight_save),
                }
            })
            .collect();
        let top = ranks
            .iter()
            .copied()
            .max_by_key(|r| (r.step.max(r.checkpoint), usize::MAX - r.rank))
            .unwrap_or(RankMemory {
                rank: 0,
                gradients: 0,
                optimizer: 0,
                step: 0,
                checkpoint: 0,
            });
        Self {
            parameters: params,
            trainable_parameters: trainable,
            weights,
            gradients: top.gradients,
            optimizer: top.optimizer,
            activations,
            total: top.step,
            checkpoint: top.checkpoint,
            ranks,
        }
    }

    /// `None` when the plan fits `capacity` bytes, else what to change.
    pub fn advice(&self, p: &PlanInput, capacity: u64) -> Option<String> {
        if self.total <= capacity {
            return None;
        }
        let gib = |x: u64| x as f64 / (1u64 << 30) as f64;
        let mut tips = Vec::new();
        if !p.recompute {
            tips.push("turn gradient_checkpointing on".to_string());
        }
        if matches!(p.attention, AttentionKind::Dense) {
            tips.push("use blockwise attention".to_string());
        }
        if p.batch_size > 1 {
            tips.push(format!(
                "lower batch_size (now {}) and raise grad_accum",
                p.batch_size
            ));
        }
        if p.zero_stage == 0 {
            tips.push(format!(
                "shard the optimizer state over the ranks (zero_stage = 1: {:.1} GiB of optimizer \
                 state per GPU now, 1/world_size of it with ZeRO)",
                gib(self.optimizer)
            ));
        } else {
            tips.push(format!(
                "use more GPUs (ZeRO stage {} already splits the optimizer state over {} ranks: \
                 {:.1} GiB per GPU now)",
                p.zero_stage,
                p.world_size.max(1),
                gib(self.optimizer)
            ));
        }
        if !p.bf16 {
            tips.push("train in bf16".to_string());
        }
        Some(format!(
            "the run needs about {:.1} GiB per device (weights {:.1}, gradients {:.1}, optimizer \
             {:.1}, activations {:.1}) and the device has {:.1} GiB: {}",
            gib(self.total),
            gib(self.weights),
            gib(self.gradients),
            gib(self.optimizer),
            gib(self.activations),
            gib(capacity),
            tips.join("; ")
        ))
    }
}

/// Memory of a device in bytes: the CUDA device's total, or the machine's RAM for the CPU.
pub fn device_capacity(dev: &candle_core::Device) -> Option<u64> {
    match dev {
        candle_core::Device::Cpu => {
            let text = std::fs::read_to_string("/proc/meminfo").ok()?;
            let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024)
        }
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(_) => candle_core::cuda::cudarc::driver::result::mem_get_info()
            .ok()
            .map(|(_, total)| total as u64),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(recompute: bool, attention: AttentionKind, world: usize, zero: u8) -> MemoryPlan {
        let cfg = LlavaNextConfig::llama3_llava_next_8b();
        MemoryPlan::estimate(&PlanInput {
            model: &cfg,
            trainable: &|_| true,
            batch_size: 1,
            seq_len: 8192,
            tiles: 5,
            bf16: true,
            recompute,
            attention,
            loss_chunk: 1024,
            world_size: world,
            zero_stage: zero,
        })
    }

    #[test]
    fn eight_b_states_match_the_design_arithmetic() {
        // DESIGN.md §8: 8.36B parameters; mixed precision keeps bf16 weights (2 bytes), f32
        // gradient accumulators (4) and f32 master + moments (12).
        let p = plan(true, AttentionKind::default(), 1, 0);
        assert_eq!(p.parameters, 8_355_276_800);
        let states = p.weights + p.gradients + p.optimizer;
        assert_eq!(states, p.parameters * 18);
        // ZeRO on 8 ranks: weights whole; the optimizer (stages 1, 2) and the gradients (stage
        // 2: the rank's partition plus the bucket in flight) in about eighths.
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        for stage in [0u8, 1, 2] {
            let z = plan(true, AttentionKind::default(), 8, stage);
            assert_eq!(z.ranks.len(), 8);
            eprintln!(
                "8B, world 8, ZeRO {stage}, fullest rank {}: weights {:.2} GiB, gradients {:.2} GiB, \
                 optimizer {:.2} GiB, activations {:.2} GiB, step {:.2} GiB, checkpoint {:.2} GiB",
                z.ranks.iter().find(|r| r.step == z.total).map_or(0, |r| r.rank),
                gib(z.weights),
                gib(z.gradients),
                gib(z.optimizer),
                gib(z.activations),
                gib(z.total),
                gib(z.checkpoint)
            );
            let ideal = p.optimizer as f64 / 8.0;
            if stage >= 1 {
                assert!(
                    (z.optimizer as f64) < ideal * 1.1,
                    "{stage}: {}",
                    z.optimizer
                );
            } else {
                assert_eq!(z.optimizer, p.optimizer);
            }
            if stage == 2 {
                assert!(z.gradients < p.gradients / 4, "{}", z.gradients);
            } else {
                assert_eq!(z.gradients, p.gradients);
            }
        }
    }

    #[test]
    fn recompute_and_blockwise_shrink_activations() {
        let dense = plan(false, AttentionKind::Dense, 1, 0);
        let ckpt = plan(true, AttentionKind::Dense, 1, 0);
        let flash = plan(true, AttentionKind::default(), 1, 0);
        assert!(ckpt.activations < dense.activations / 10);
        assert!(flash.activations < ckpt.activations / 2);
        // Fully recomputed bf16 8k activations are a few GB, not the ~400 GB of a dense graph.
        assert!(flash.activations < 8 << 30, "{}", flash.activations);
        let cfg = LlavaNextConfig::llama3_llava_next_8b();
        let trainable = |_: &str| true;
        let input = PlanInput {
            model: &cfg,
            trainable: &trainable,
            batch_size: 4,
            seq_len: 8192,
            tiles: 20,
            bf16: true,
            recompute: false,
            attention: AttentionKind::Dense,
            loss_chunk: 1024,
            world_size: 1,
            zero_stage: 0,
        };
        let p = MemoryPlan::estimate(&input);
        let advice = p.advice(&input, 80 << 30).expect("does not fit 80 GiB");
        assert!(advice.contains("gradient_checkpointing"), "{advice}");
        assert!(advice.contains("zero_stage = 1"), "{advice}");
        // A run already at ZeRO-2 is not told to use ZeRO-2.
        let z2 = PlanInput {
            world_size: 8,
            zero_stage: 2,
            ..input
        };
        let advice = MemoryPlan::estimate(&z2)
            .advice(&z2, 20 << 30)
            .expect("does not fit 20 GiB");
        assert!(!advice.contains("zero_stage = 1"), "{advice}");
        assert!(advice.contains("stage 2 already splits"), "{advice}");
    }
}
