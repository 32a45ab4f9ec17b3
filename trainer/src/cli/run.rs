//! `llava-trainer run`: train on llava-data shards (`--config train.toml`, every key a flag).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use llava_trainer::parallel::layout::Layout;
use llava_trainer::parallel::spawn;
use llava_trainer::train::{self, RunOptions, Signals, Summary};

use super::run_config::merged;

#[derive(clap::Args, Debug)]
#[group(skip)]
#[command(after_help = "\
Examples:
  llava-trainer run --config trainer/configs/pretrain.toml --max-steps 4
  llava-trainer run --shards out/example --model out/tiny-model --output out/runs/stage2 \\
      --lr 1e-5 --max-steps 4 --save-every 2 --device cpu
  llava-trainer run --config train.toml --device cuda:0 --bf16

Device: --device auto trains on CUDA when the binary is built with the `cuda` feature, else on
the CPU. A rerun with the same --output resumes from its latest checkpoint; a finished run says
so and exits 0. Signals: SIGTERM / SIGINT checkpoint at the next step boundary and exit 143 / 130
(a second one exits at once); SIGUSR1 checkpoints and goes on.")]
pub struct Args {
    /// train.toml; flags override its keys.
    #[arg(long)]
    pub(super) config: Option<PathBuf>,
    /// A `llava-data build` output folder (manifest.json + shards/). Required.
    #[arg(long, value_name = "DIR")]
    pub(super) shards: Option<PathBuf>,
    /// HF LlavaNext model directory.
    #[arg(long)]
    pub(super) model: Option<PathBuf>,
    #[command(flatten)]
    pub(super) parts: super::model_parts::ModelParts,
    /// Run folder: checkpoint-<step>/ and log.jsonl go there; a rerun resumes from it. Required.
    #[arg(long, value_name = "DIR")]
    pub(super) output: Option<PathBuf>,
    /// Parts that train, comma-separated: mm_mlp_adapter (pretraining) or
    /// mm_vision_tower,mm_mlp_adapter,mm_language_model [default: all three].
    #[arg(long)]
    pub(super) tunable_parts: Option<String>,
    /// Peak learning rate (cosine schedule after warmup) [default: 1e-5].
    #[arg(long)]
    pub(super) lr: Option<f64>,
    /// Learning rate of the vision tower's parameters [default: --lr].
    #[arg(long)]
    pub(super) vision_tower_lr: Option<f64>,
    /// AdamW decoupled weight decay, on parameters with 2 or more dimensions [default: 0].
    #[arg(long)]
    pub(super) weight_decay: Option<f64>,
    /// Fraction of the steps spent warming up: ceil(ratio x steps) [default: 0.03].
    #[arg(long)]
    pub(super) warmup_ratio: Option<f64>,
    /// Global gradient-norm clipping [default: 1.0].
    #[arg(long)]
    pub(super) max_grad_norm: Option<f64>,
    /// Per-device batch size, a divisor or multiple of the shards' [default: the shards'].
    #[arg(long)]
    pub(super) batch_size: Option<usize>,
    /// Micro-batches per optimizer step [default: 1].
    #[arg(long)]
    pub(super) grad_accum: Option<usize>,
    /// Passes over the shards, when --max-steps is not given [default: 1].
    #[arg(long)]
    pub(super) epochs: Option<u64>,
    /// Optimizer steps to train [default: epochs x steps per epoch].
    #[arg(long)]
    pub(super) max_steps: Option<u64>,
    /// Seed of the data order and of freshly initialised tensors [default: 42].
    #[arg(long)]
    pub(super) seed: Option<u64>,
    /// bf16 weights and activations (f32 master weights, moments and gradients).
    #[arg(long)]
    pub(super) bf16: bool,
    /// bf16 (and TF32 for f32 matmuls) or f32 [default: bf16 on CUDA, f32 on the CPU].
    #[arg(long, value_parser = ["bf16", "f32"])]
    pub(super) precision: Option<String>,
    /// Checkpoint every N steps (always at the end and on a signal) [default: only then].
    #[arg(long)]
    pub(super) save_every: Option<u64>,
    /// Keep at most N checkpoints, deleting the oldest [default: all].
    #[arg(long)]
    pub(super) save_total_limit: Option<usize>,
    /// Print a step line and append to log.jsonl every N steps [default: 1].
    #[arg(long)]
    pub(super) log_every: Option<u64>,
    /// Without a terminal (a Slurm log, a file): also log a progress line (step, rate, ETA) every
    /// SECS seconds; on a terminal a progress bar is drawn instead.
    #[arg(long, value_name = "SECS", default_value_t = 30.0)]
    pub(super) progress_every: f64,
    /// Loader threads [default: 16, the recipe's `dataloader_num_workers`].
    #[arg(long)]
    pub(super) workers: Option<usize>,
    /// flat (pretraining) or spatial_unpad (fine-tuning); must match the shards.
    #[arg(long)]
    pub(super) merge_type: Option<String>,
    /// Tokenizer the shards must have been built with (checked against the manifest); the
    /// checkpoints ship it when the model folder has no tokenizer.json.
    #[arg(long)]
    pub(super) tokenizer: Option<PathBuf>,
    /// Resume from this checkpoint (default: the latest in --output).
    #[arg(long)]
    pub(super) resume: Option<PathBuf>,
    /// Start from scratch even when --output has checkpoints.
    #[arg(long)]
    pub(super) no_resume: bool,
    /// Keep every activation for the backward instead of recomputing each layer (faster for
    /// small models; the default recomputes).
    #[arg(long)]
    pub(super) no_gradient_checkpointing: bool,
    /// Decoder attention: blockwise (default), blockwise:N (block size) or dense.
    #[arg(long)]
    pub(super) attention: Option<String>,
    /// Rows of lm_head logits per loss chunk [default: 1024].
    #[arg(long)]
    pub(super) loss_chunk: Option<usize>,
    /// Train even when the memory plan says the run does not fit the device.
    #[arg(long)]
    pub(super) skip_memory_check: bool,
    /// cpu, cuda (device LOCAL_RANK or 0), cuda:N, or auto (CUDA when built with it).
    #[arg(long, default_value = "auto")]
    pub(super) device: String,
    /// ZeRO stage: 0 (all-reduce gradients), 1 (shard the optimizer state), 2 (and gradients)
    /// [default: 0].
    #[arg(long)]
    pub(super) zero_stage: Option<u8>,
    /// Data-parallel ranks on this machine: this process starts one process per rank (on CUDA
    /// rank i on GPU i over NCCL; on the CPU over a TCP collective, see --cpu-ranks) and
    /// supervises them, as `torchrun` would. Under torchrun or Slurm leave it at 1: the
    /// launcher starts the ranks.
    #[arg(long, default_value_t = 1)]
    pub(super) nproc_per_node: usize,
    /// With --nproc-per-node on the CPU: `processes` (default; the same path as torchrun and
    /// srun) or `threads` (every rank a thread of this process; identical results).
    #[arg(long, value_name = "processes|threads", default_value = "processes")]
    pub(super) cpu_ranks: String,
    /// Seconds a collective waits for the slowest rank before failing with the rank it waited
    /// for (checkpoints of the 8B model take minutes: keep it generous).
    #[arg(long, value_name = "SECONDS", default_value_t = 1800.0)]
    pub(super) collective_timeout: f64,
    /// Seconds a rank waits for the others to join (rank 0 at MASTER_ADDR:MASTER_PORT) before
    /// giving up with a message naming the missing ranks.
    #[arg(long, value_name = "SECONDS", default_value_t = 300.0)]
    pub(super) rendezvous_timeout: f64,
    /// Pack each micro-batch's whole samples into rows of at most --pack-length tokens
    /// (balanced first-fit decreasing, fewest padded positions): attention and RoPE positions
    /// restart per sample; same loss and gradients as unpacked.
    #[arg(long)]
    pub(super) packing: bool,
    /// Tokens per packed row (default: the shards' model_max_length).
    #[arg(long)]
    pub(super) pack_length: Option<u32>,
    /// Pack across batch boundaries (implies --packing): each micro-batch is one row of up to
    /// --pack-length tokens of one modality (the epoch's last rows may mix), filled from the
    /// following groups too (fewer, fuller steps; every sample once per epoch; `llava-data inspect --pack-across-batches`
    /// reports its fill).
    #[arg(long)]
    pub(super) pack_across_batches: bool,
    /// A held-out `llava-data build` folder: mean loss and supervised tokens on it (no
    /// gradient, rank 0, fixed order) every --eval-every steps and at the end [default: none].
    #[arg(long, value_name = "DIR")]
    pub(super) eval_shards: Option<PathBuf>,
    /// Evaluate on --eval-shards every N steps [default: only at the end].
    #[arg(long, value_name = "N")]
    pub(super) eval_every: Option<u64>,
    /// Also write TensorBoard event files (loss, lr, grad_norm, tokens/s, eval loss; the
    /// --eval-prompts answers as text) into DIR
    /// (`tensorboard --logdir DIR`) [default: none; log.jsonl is always written].
    #[arg(long, value_name = "DIR")]
    pub(super) tensorboard: Option<PathBuf>,
    /// A sample whose row checksum does not match its bytes (bit rot, an interrupted copy):
    /// stop (the error names the shard, row group, row and sample) or skip (left out of its
    /// batch, a warning each, the count at the end and in log.jsonl) [default: stop].
    #[arg(long, value_name = "stop|skip")]
    pub(super) on_corrupt: Option<String>,
    /// With `--shards s3://…` (gs://, az://, https://): keep fetched row groups in DIR so that
    /// later epochs read them locally (docs/object-storage.md) [default: no cache].
    #[arg(long, value_name = "DIR")]
    pub(super) cache_dir: Option<PathBuf>,
    /// The cache's size cap, e.g. 200G [default: 100G].
    #[arg(long, value_name = "SIZE", default_value = "100G", value_parser = llava_loader::source::parse_size)]
    pub(super) cache_size: u64,
    /// JSONL of prompts (`generate --input` lines: {"id", "prompt", "images"}) that rank 0
    /// answers greedily every --eval-generate-every steps and at the end: printed, in log.jsonl
    /// and TensorBoard (text) [default: none].
    #[arg(long, value_name = "FILE.jsonl")]
    pub(super) eval_prompts: Option<PathBuf>,
    /// Answer --eval-prompts every N steps [default: only at the end].
    #[arg(long, value_name = "N")]
    pub(super) eval_generate_every: Option<u64>,
    /// Most new tokens per --eval-prompts answer [default: 64].
    #[arg(long, value_name = "N")]
    pub(super) eval_max_new_tokens: Option<usize>,
}

impl Args {
    pub(crate) fn device_spec(&self) -> String {
        self.device.clone()
    }
}

pub fn run(args: Args) -> Result<()> {
    let env = llava_trainer::parallel::launch::from_process_env()
        .context("reading the launcher's variables (torchrun's RANK/WORLD_SIZE or Slurm's)")?;
    let cpu = super::device::is_cpu_spec(&args.device);
    let layout = Layout::choose(env, args.nproc_per_node, cpu, &args.cpu_ranks)?;
    if let Some(dir) = &args.cache_dir {
        llava_loader::source::set_cache(Some(llava_loader::source::CacheOptions {
            dir: dir.clone(),
            max_bytes: args.cache_size,
        }));
    }
    let rendezvous_timeout = Duration::try_from_secs_f64(args.rendezvous_timeout)
        .context("--rendezvous-timeout: a number of seconds")?;
    let collective_timeout = Duration::try_from_secs_f64(args.collective_timeout)
        .context("--collective-timeout: a number of seconds")?;
    if let Layout::SpawnLocal(nproc) = layout {
        if !cfg!(feature = "cuda") && !cpu {
            // Says that this binary has no CUDA, before starting anything.
            super::device::parse(&args.device)?;
        }
        // Check the configuration once here rather than N times in the ranks.
        merged(args)?;
        let exit = spawn::run_self_as_ranks(nproc, rendezvous_timeout)?;
        if exit.code != 0 {
            std::process::exit(exit.code);
        }
        return Ok(());
    }
    // A launched rank uses GPU LOCAL_RANK whatever --device names (torchrun's convention).
    let device = match &layout {
        Layout::Launched(_) => super::device::parse("cuda")?,
        _ => super::device::parse(&args.device)?,
    };
    let progress_every = Duration::try_from_secs_f64(args.progress_every)
        .context("--progress-every: a number of seconds")?;
    let mut cfg = merged(args)?;
    let precision = cfg.resolve_precision(device.is_cuda());
    llava_trainer::model::ops::set_tf32(device.is_cuda() && cfg.bf16);
    tracing::info!("precision: {precision}");
    let signals = Signals::install()?;
    let lead = layout.is_lead();
    let opts = RunOptions {
        stop: Some(signals.stop.clone()),
        save_now: Some(signals.save_now.clone()),
        progress: lead,
        progress_every: lead.then_some(progress_every),
        device: Some(device),
        ..RunOptions::default()
    };
    let summary = match layout {
        Layout::Single => train::run(&cfg, opts)?,
        Layout::Threads(n) => train::run_threads(&cfg, n, opts)?,
        Layout::Launched(env) => train::run_nccl_rank(&cfg, &env, opts, rendezvous_timeout)?,
        Layout::LaunchedCpu(env) => {
            train::run_tcp_rank(&cfg, &env, opts, rendezvous_timeout, collective_timeout)?
        }
        Layout::SpawnLocal(_) => unreachable!("handled above"),
    };
    print_outcome(&summary);
    let code = signals.exit_code();
    if summary.interrupted && code != 0 {
        std::process::exit(code);
    }
    Ok(())
}

/// The run's last line: finished, stopped or already finished, with its checkpoint.
fn print_outcome(summary: &Summary) {
    if summary.already_finished {
        println!(
            "already finished: {} is at step {}/{}; nothing to train (--no-resume or another \
             --output starts a new run)",
            summary
                .last_checkpoint
                .as_ref()
                .map_or(String::new(), |p| p.display().to_string()),
            summary.steps_done,
            summary.total_steps
        );
    } else if let Some(p) = &summary.last_checkpoint {
        println!(
            "{} at step {}/{}; checkpoint {}",
            if summary.interrupted {
                "stopped"
            } else {
                "done"
            },
            summary.steps_done,
            summary.total_steps,
            p.display()
        );
    }
    if !summary.skipped_corrupt.is_empty() {
        println!(
            "skipped {} corrupt sample(s) (--on-corrupt skip; listed in log.jsonl)",
            summary.skipped_corrupt.len()
        );
    }
}
