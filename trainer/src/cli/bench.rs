//! `llava-trainer bench`: synthetic training steps of a named model shape, as JSON.

use anyhow::{Context, Result};
use llava_trainer::diag::bench::{named_config, run_bench, BenchSpec};
use llava_trainer::diag::packing_bench::{run_packing_bench, PackingBenchSpec};
use llava_trainer::model::attention::AttentionKind;

#[derive(clap::Args, Debug)]
#[command(
    after_help = "Examples:\n  llava-trainer bench --model llava-next-8b --layers 2 --seq 4096 \
                        --images 0 --tunable-parts mm_mlp_adapter\n  llava-trainer bench --model \
                        llava-next-8b --layers 32 --seq 8192 --bf16 --device cuda --peak-tflops 989\n  \
                        llava-trainer bench --shards out/example --model tiny --batches 8 \
                        --rounds 3   # grouped vs packed rows of real shards\n\n\
                        With --shards, the same first micro-batches of the shards are trained \
                        one sample per row (padded) and packed (as run --packing), alternately, \
                        and the report gives both throughputs and their ratio."
)]
pub struct Args {
    /// `llava-next-8b` (the real 8B shape), `tiny`, or an HF LlavaNext config.json.
    #[arg(long, default_value = "llava-next-8b")]
    model: String,
    /// Decoder layers to keep (default: all of the config's).
    #[arg(long)]
    layers: Option<usize>,
    /// Vision encoder layers to run (default: the config's, up to the selected layer).
    #[arg(long)]
    vision_layers: Option<usize>,
    /// Tokens per row, image tokens included.
    #[arg(long, default_value_t = 4096)]
    seq: usize,
    /// Rows per micro-batch.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Images per row (each 5 tiles, 2928 tokens at 336 px); 0 for text only.
    #[arg(long, default_value_t = 1)]
    images: usize,
    /// Fraction of each row's text tokens that carry loss.
    #[arg(long, default_value_t = 0.5)]
    supervised: f64,
    /// bf16 weights and activations (f32 master weights and moments).
    #[arg(long)]
    bf16: bool,
    /// Keep every activation instead of recomputing each layer in the backward.
    #[arg(long)]
    no_gradient_checkpointing: bool,
    /// Decoder attention: blockwise, blockwise:N or dense.
    #[arg(long, default_value = "blockwise")]
    attention: String,
    /// Rows of lm_head logits per loss chunk.
    #[arg(long, default_value_t = llava_trainer::model::llava_next::DEFAULT_LOSS_CHUNK)]
    loss_chunk: usize,
    /// Trainable parts (comma-separated mm_vision_tower, mm_mlp_adapter, mm_language_model).
    #[arg(
        long,
        default_value = "mm_vision_tower,mm_mlp_adapter,mm_language_model"
    )]
    tunable_parts: String,
    /// Skip the AdamW step (and its optimizer state).
    #[arg(long)]
    no_optimizer: bool,
    /// Timed steps.
    #[arg(long, default_value_t = 1)]
    steps: usize,
    /// Untimed steps first (0 measures the first step's memory, allocation included).
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Extra steps after the timed ones that time forward, recomputation, backward and
    /// optimizer separately (each span synchronises the device).
    #[arg(long, default_value_t = 1)]
    phase_steps: usize,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Peak dense TFLOP/s of the device for MFU (H100/H200 SXM bf16: 989).
    #[arg(long)]
    peak_tflops: Option<f64>,
    /// Seed of the random weights and inputs.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Real shards: compare grouped (one sample per row) with packed rows on their first
    /// micro-batches instead of a synthetic step.
    #[arg(long, value_name = "DIR")]
    shards: Option<std::path::PathBuf>,
    /// With --shards: micro-batches per pass.
    #[arg(long, default_value_t = 8)]
    batches: usize,
    /// With --shards: samples per micro-batch (default: the shards').
    #[arg(long)]
    batch_size: Option<usize>,
    /// With --shards: tokens per packed row (default: the shards' model_max_length).
    #[arg(long)]
    pack_length: Option<u32>,
    /// With --shards: timed passes per layout.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Instead of a step: count the tensor ops of one decoder layer's attention forward and
    /// backward at --seq tokens with --attention (small heads: the count depends on the blocks).
    #[arg(long)]
    count_ops: bool,
    /// Print the report as JSON (default: a short text summary and the JSON).
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<()> {
    let dev = super::device::parse(&args.device)?;
    let model = named_config(&args.model, args.layers, args.vision_layers)
        .with_context(|| format!("model {:?}", args.model))?;
    let attention: AttentionKind = args.attention.parse().map_err(anyhow::Error::msg)?;
    if args.count_ops {
        let r = llava_trainer::diag::bench::count_attention_ops(args.seq, attention, &dev)?;
        if !args.json {
            eprintln!(
                "{} at {} tokens: {} ops forward, {} backward; whole decoder layer: first {} + {}, \
                 second (mask biases reused) {} + {}",
                r.attention,
                r.seq,
                r.forward_ops,
                r.backward_ops,
                r.layers[0].forward_ops,
                r.layers[0].backward_ops,
                r.layers[1].forward_ops,
                r.layers[1].backward_ops
            );
        }
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    if let Some(shards) = args.shards {
        let spec = PackingBenchSpec {
            shards,
            model,
            model_name: args.model.clone(),
            batches: args.batches,
            batch_size: args.batch_size,
            pack_length: args.pack_length,
            rounds: args.rounds,
            recompute: !args.no_gradient_checkpointing,
            attention,
            tunable_parts: args.tunable_parts,
            seed: args.seed,
        };
        let r = run_packing_bench(&spec, &dev)?;
        if !args.json {
            eprintln!(
                "{} micro-batches: grouped {} rows, efficiency {:.1}%, {:.0} tokens/s; packed \
                 {} rows, efficiency {:.1}%, {:.0} tokens/s: {:.2}x",
                r.batches,
                r.grouped.rows,
                100.0 * r.grouped.efficiency,
                r.grouped.tokens_per_s,
                r.packed.rows,
                100.0 * r.packed.efficiency,
                r.packed.tokens_per_s,
                r.speedup
            );
        }
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    let spec = BenchSpec {
        model,
        model_name: args.model.clone(),
        batch: args.batch,
        seq: args.seq,
        images: args.images,
        supervised: args.supervised,
        bf16: args.bf16,
        recompute: !args.no_gradient_checkpointing,
        attention,
        loss_chunk: args.loss_chunk,
        tunable_parts: args.tunable_parts,
        optimizer: !args.no_optimizer,
        steps: args.steps,
        warmup: args.warmup,
        peak_tflops: args.peak_tflops,
        seed: args.seed,
        phase_steps: args.phase_steps,
    };
    let report = run_bench(&spec, &dev)?;
    let json = serde_json::to_string_pretty(&report)?;
    if !args.json {
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        eprintln!(
            "{} x{} layers, seq {}, batch {}: {:.2} s/step, {:.0} tokens/s, {:.2} TFLOP/s, peak \
             memory {:.2} GiB (activations {:.2} GiB; plan {:.2} GiB)",
            report.model,
            report.layers,
            report.seq,
            report.batch,
            report.step_s,
            report.tokens_per_s,
            report.achieved_tflops,
            gib(report.memory.peak),
            gib(report.memory.activations),
            gib(report.plan.activations),
        );
    }
    println!("{json}");
    Ok(())
}
