//! `llava-trainer run`: train on llava-data shards (`--config train.toml`, every key a flag).

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use llava_formats::config::ConfigError;
use llava_formats::located;
use llava_trainer::dist::launch::{LaunchEnv, LaunchSource};
use llava_trainer::dist::spawn::{self, LocalJob};
use llava_trainer::train::{self, RunOptions, Summary, TrainConfig};

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
    config: Option<PathBuf>,
    /// A `llava-data build` output folder (manifest.json + shards/). Required.
    #[arg(long, value_name = "DIR")]
    shards: Option<PathBuf>,
    /// HF LlavaNext model directory.
    #[arg(long)]
    model: Option<PathBuf>,
    #[command(flatten)]
    parts: super::model_parts::ModelParts,
    /// Run folder: checkpoint-<step>/ and log.jsonl go there; a rerun resumes from it. Required.
    #[arg(long, value_name = "DIR")]
    output: Option<PathBuf>,
    /// Parts that train, comma-separated: mm_mlp_adapter (pretraining) or
    /// mm_vision_tower,mm_mlp_adapter,mm_language_model [default: all three].
    #[arg(long)]
    tunable_parts: Option<String>,
    /// Peak learning rate (cosine schedule after warmup) [default: 1e-5].
    #[arg(long)]
    lr: Option<f64>,
    /// Learning rate of the vision tower's parameters [default: --lr].
    #[arg(long)]
    vision_tower_lr: Option<f64>,
    /// AdamW decoupled weight decay, on parameters with 2 or more dimensions [default: 0].
    #[arg(long)]
    weight_decay: Option<f64>,
    /// Fraction of the steps spent warming up: ceil(ratio x steps) [default: 0.03].
    #[arg(long)]
    warmup_ratio: Option<f64>,
    /// Global gradient-norm clipping [default: 1.0].
    #[arg(long)]
    max_grad_norm: Option<f64>,
    /// Per-device batch size, a divisor or multiple of the shards' [default: the shards'].
    #[arg(long)]
    batch_size: Option<usize>,
    /// Micro-batches per optimizer step [default: 1].
    #[arg(long)]
    grad_accum: Option<usize>,
    /// Passes over the shards, when --max-steps is not given [default: 1].
    #[arg(long)]
    epochs: Option<u64>,
    /// Optimizer steps to train [default: epochs x steps per epoch].
    #[arg(long)]
    max_steps: Option<u64>,
    /// Seed of the data order and of freshly initialised tensors [default: 42].
    #[arg(long)]
    seed: Option<u64>,
    /// bf16 weights and activations (f32 master weights, moments and gradients).
    #[arg(long)]
    bf16: bool,
    /// bf16 (and TF32 for f32 matmuls) or f32 [default: bf16 on CUDA, f32 on the CPU].
    #[arg(long, value_parser = ["bf16", "f32"])]
    precision: Option<String>,
    /// Checkpoint every N steps (always at the end and on a signal) [default: only then].
    #[arg(long)]
    save_every: Option<u64>,
    /// Keep at most N checkpoints, deleting the oldest [default: all].
    #[arg(long)]
    save_total_limit: Option<usize>,
    /// Print a step line and append to log.jsonl every N steps [default: 1].
    #[arg(long)]
    log_every: Option<u64>,
    /// Without a terminal (a Slurm log, a file): also log a progress line (step, rate, ETA) every
    /// SECS seconds; on a terminal a progress bar is drawn instead.
    #[arg(long, value_name = "SECS", default_value_t = 30.0)]
    progress_every: f64,
    /// Loader threads [default: 16, the recipe's `dataloader_num_workers`].
    #[arg(long)]
    workers: Option<usize>,
    /// flat (pretraining) or spatial_unpad (fine-tuning); must match the shards.
    #[arg(long)]
    merge_type: Option<String>,
    /// Tokenizer the shards must have been built with (checked against the manifest); the
    /// checkpoints ship it when the model folder has no tokenizer.json.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Resume from this checkpoint (default: the latest in --output).
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Start from scratch even when --output has checkpoints.
    #[arg(long)]
    no_resume: bool,
    /// Keep every activation for the backward instead of recomputing each layer (faster for
    /// small models; the default recomputes).
    #[arg(long)]
    no_gradient_checkpointing: bool,
    /// Decoder attention: blockwise (default), blockwise:N (block size) or dense.
    #[arg(long)]
    attention: Option<String>,
    /// Rows of lm_head logits per loss chunk [default: 1024].
    #[arg(long)]
    loss_chunk: Option<usize>,
    /// Train even when the memory plan says the run does not fit the device.
    #[arg(long)]
    skip_memory_check: bool,
    /// cpu, cuda (device LOCAL_RANK or 0), cuda:N, or auto (CUDA when built with it).
    #[arg(long, default_value = "auto")]
    device: String,
    /// ZeRO stage: 0 (all-reduce gradients), 1 (shard the optimizer state), 2 (and gradients)
    /// [default: 0].
    #[arg(long)]
    zero_stage: Option<u8>,
    /// Data-parallel ranks on this machine: this process starts one process per rank (on CUDA
    /// rank i on GPU i over NCCL; on the CPU over a TCP collective, see --cpu-ranks) and
    /// supervises them, as `torchrun` would. Under torchrun or Slurm leave it at 1: the
    /// launcher starts the ranks.
    #[arg(long, default_value_t = 1)]
    nproc_per_node: usize,
    /// With --nproc-per-node on the CPU: `processes` (default; the same path as torchrun and
    /// srun) or `threads` (every rank a thread of this process; identical results).
    #[arg(long, value_name = "processes|threads", default_value = "processes")]
    cpu_ranks: String,
    /// Seconds a collective waits for the slowest rank before failing with the rank it waited
    /// for (checkpoints of the 8B model take minutes: keep it generous).
    #[arg(long, value_name = "SECONDS", default_value_t = 1800.0)]
    collective_timeout: f64,
    /// Seconds a rank waits for the others to join (rank 0 at MASTER_ADDR:MASTER_PORT) before
    /// giving up with a message naming the missing ranks.
    #[arg(long, value_name = "SECONDS", default_value_t = 300.0)]
    rendezvous_timeout: f64,
    /// Pack each micro-batch's whole samples into rows of at most --pack-length tokens
    /// (balanced first-fit decreasing, fewest padded positions): attention and RoPE positions
    /// restart per sample; same loss and gradients as unpacked.
    #[arg(long)]
    packing: bool,
    /// Tokens per packed row (default: the shards' model_max_length).
    #[arg(long)]
    pack_length: Option<u32>,
    /// Pack across batch boundaries (implies --packing): each micro-batch is one row of up to
    /// --pack-length tokens of one modality (the epoch's last rows may mix), filled from the
    /// following groups too (fewer, fuller steps; every sample once per epoch; `llava-data inspect --pack-across-batches`
    /// reports its fill).
    #[arg(long)]
    pack_across_batches: bool,
    /// A held-out `llava-data build` folder: mean loss and supervised tokens on it (no
    /// gradient, rank 0, fixed order) every --eval-every steps and at the end [default: none].
    #[arg(long, value_name = "DIR")]
    eval_shards: Option<PathBuf>,
    /// Evaluate on --eval-shards every N steps [default: only at the end].
    #[arg(long, value_name = "N")]
    eval_every: Option<u64>,
    /// Also write TensorBoard event files (loss, lr, grad_norm, tokens/s, eval loss; the
    /// --eval-prompts answers as text) into DIR
    /// (`tensorboard --logdir DIR`) [default: none; log.jsonl is always written].
    #[arg(long, value_name = "DIR")]
    tensorboard: Option<PathBuf>,
    /// A sample whose row checksum does not match its bytes (bit rot, an interrupted copy):
    /// stop (the error names the shard, row group, row and sample) or skip (left out of its
    /// batch, a warning each, the count at the end and in log.jsonl) [default: stop].
    #[arg(long, value_name = "stop|skip")]
    on_corrupt: Option<String>,
    /// With `--shards s3://…` (gs://, az://, https://): keep fetched row groups in DIR so that
    /// later epochs read them locally (docs/object-storage.md) [default: no cache].
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// The cache's size cap, e.g. 200G [default: 100G].
    #[arg(long, value_name = "SIZE", default_value = "100G", value_parser = llava_trainer::data::source::parse_size)]
    cache_size: u64,
    /// JSONL of prompts (`generate --input` lines: {"id", "prompt", "images"}) that rank 0
    /// answers greedily every --eval-generate-every steps and at the end: printed, in log.jsonl
    /// and TensorBoard (text) [default: none].
    #[arg(long, value_name = "FILE.jsonl")]
    eval_prompts: Option<PathBuf>,
    /// Answer --eval-prompts every N steps [default: only at the end].
    #[arg(long, value_name = "N")]
    eval_generate_every: Option<u64>,
    /// Most new tokens per --eval-prompts answer [default: 64].
    #[arg(long, value_name = "N")]
    eval_max_new_tokens: Option<usize>,
}

/// Keys that hold paths: in a train.toml they are relative to the file (as in datasets.toml);
/// as flags, to the current directory.
const PATH_KEYS: [&str; 11] = [
    "shards",
    "eval_shards",
    "eval_prompts",
    "tensorboard",
    "model",
    "llm",
    "vision",
    "projector",
    "output",
    "tokenizer",
    "resume",
];

impl Args {
    pub(crate) fn device_spec(&self) -> String {
        self.device.clone()
    }
}

/// Where the run keys are documented (for error messages).
const RUN_DOCS: &str = "`llava-trainer run --help` and docs/configuration.md";

/// Names other trainers use for a key (HF `TrainingArguments`), for "did you mean".
const ALIASES: [(&str, &str); 9] = [
    ("learning_rate", "lr"),
    ("output_dir", "output"),
    ("per_device_train_batch_size", "batch_size"),
    ("gradient_accumulation_steps", "grad_accum"),
    ("num_train_epochs", "epochs"),
    ("save_steps", "save_every"),
    ("logging_steps", "log_every"),
    ("eval_steps", "eval_every"),
    ("dataloader_num_workers", "workers"),
];

pub(crate) fn merged(args: Args) -> Result<TrainConfig> {
    let file = args.config.as_ref().map(|p| p.display().to_string());
    let mut text = String::new();
    let mut v: toml::Table = match &args.config {
        Some(p) => {
            text = std::fs::read_to_string(p)
                .with_context(|| format!("reading {}: check the --config path", p.display()))?;
            let file = p.display().to_string();
            let mut table: toml::Table = toml::from_str(&text)
                .map_err(|e| ConfigError::from_toml(&file, &text, &e, RUN_DOCS))?;
            let base = p.parent().unwrap_or(std::path::Path::new("."));
            for key in PATH_KEYS {
                if let Some(toml::Value::String(s)) = table.get_mut(key) {
                    // `s3://bucket/prefix` is a location, not a path relative to the file.
                    if !llava_formats::config::is_url(std::path::Path::new(s.as_str())) {
                        *s = base.join(&*s).display().to_string();
                    }
                }
            }
            table
        }
        None => toml::Table::new(),
    };
    let path = |p: PathBuf| toml::Value::String(p.display().to_string());
    let mut from_flags: Vec<String> = Vec::new();
    let mut set = |k: &str, x: Option<toml::Value>| {
        if let Some(x) = x {
            v.insert(k.into(), x);
            from_flags.push(k.into());
        }
    };
    set("shards", args.shards.map(path));
    set("model", args.model.map(path));
    set("llm", args.parts.llm.map(path));
    set("vision", args.parts.vision.map(path));
    set("projector", args.parts.projector.map(path));
    set("output", args.output.map(path));
    set("tunable_parts", args.tunable_parts.map(toml::Value::String));
    set("lr", args.lr.map(toml::Value::Float));
    set(
        "vision_tower_lr",
        args.vision_tower_lr.map(toml::Value::Float),
    );
    set("weight_decay", args.weight_decay.map(toml::Value::Float));
    set("warmup_ratio", args.warmup_ratio.map(toml::Value::Float));
    set("max_grad_norm", args.max_grad_norm.map(toml::Value::Float));
    let int = |x: u64| toml::Value::Integer(x as i64);
    set("batch_size", args.batch_size.map(|x| int(x as u64)));
    set("grad_accum", args.grad_accum.map(|x| int(x as u64)));
    set("epochs", args.epochs.map(int));
    set("max_steps", args.max_steps.map(int));
    set("seed", args.seed.map(int));
    set("bf16", args.bf16.then_some(toml::Value::Boolean(true)));
    set("precision", args.precision.map(toml::Value::String));
    set("save_every", args.save_every.map(int));
    set(
        "save_total_limit",
        args.save_total_limit.map(|x| int(x as u64)),
    );
    set("log_every", args.log_every.map(int));
    set("workers", args.workers.map(|x| int(x as u64)));
    set("merge_type", args.merge_type.map(toml::Value::String));
    set("tokenizer", args.tokenizer.map(path));
    set("resume", args.resume.map(path));
    set(
        "no_resume",
        args.no_resume.then_some(toml::Value::Boolean(true)),
    );
    set(
        "gradient_checkpointing",
        args.no_gradient_checkpointing
            .then_some(toml::Value::Boolean(false)),
    );
    set("attention", args.attention.map(toml::Value::String));
    set("zero_stage", args.zero_stage.map(|x| int(u64::from(x))));
    set("loss_chunk", args.loss_chunk.map(|x| int(x as u64)));
    set(
        "skip_memory_check",
        args.skip_memory_check.then_some(toml::Value::Boolean(true)),
    );
    set(
        "packing",
        args.packing.then_some(toml::Value::Boolean(true)),
    );
    set("pack_length", args.pack_length.map(|x| int(u64::from(x))));
    set(
        "pack_across_batches",
        args.pack_across_batches
            .then_some(toml::Value::Boolean(true)),
    );
    set("eval_shards", args.eval_shards.map(path));
    set("eval_every", args.eval_every.map(int));
    set("tensorboard", args.tensorboard.map(path));
    set("on_corrupt", args.on_corrupt.map(toml::Value::String));
    set("eval_prompts", args.eval_prompts.map(path));
    set("eval_generate_every", args.eval_generate_every.map(int));
    set(
        "eval_max_new_tokens",
        args.eval_max_new_tokens.map(|x| int(x as u64)),
    );
    // An error names the flag, or the file, line and key it comes from.
    let located = |key: &str, message: String| -> anyhow::Error {
        match &file {
            Some(f) if !from_flags.iter().any(|k| k == key) => {
                ConfigError::at_key(f, &text, key, message).into()
            }
            _ => anyhow::anyhow!("--{}: {message}", key.replace('_', "-")),
        }
    };
    let cfg: TrainConfig = match toml::Value::Table(v.clone()).try_into() {
        Ok(c) => c,
        Err(e) => {
            let msg = e.message().trim().to_string();
            if let Some(rest) = msg.strip_prefix("missing field ") {
                let k = located::backticked(rest).unwrap_or(rest);
                let flag = k.replace('_', "-");
                anyhow::bail!(
                    "{}`{k}` is required: pass --{flag}, or set `{k} = ...` in the --config file \
                     (see {RUN_DOCS})",
                    file.as_ref().map_or(String::new(), |f| format!("{f}: "))
                );
            }
            let unknown = msg
                .strip_prefix("unknown field ")
                .and_then(located::backticked)
                .map(str::to_string);
            if let Some(k) = unknown {
                let keys = TrainConfig::keys();
                let known: Vec<&str> = keys.iter().map(String::as_str).collect();
                let hint = ALIASES
                    .iter()
                    .find(|(a, _)| *a == k)
                    .map(|(_, to)| *to)
                    .or_else(|| located::closest(&k, &known))
                    .map_or(String::new(), |s| format!("did you mean `{s}`? "));
                return Err(located(
                    &k,
                    format!(
                        "unknown key `{k}`: {hint}remove or rename it (the keys are in {RUN_DOCS})"
                    ),
                ));
            }
            // Which key: the first whose value alone, with the required keys, fails the same way.
            let culprit = v.iter().map(|(k, _)| k.clone()).find(|k| {
                let mut probe = toml::Table::new();
                for r in ["shards", "output", "model"] {
                    probe.insert(r.into(), toml::Value::String("x".into()));
                }
                if let Some(x) = v.get(k) {
                    probe.insert(k.clone(), x.clone());
                }
                toml::Value::Table(probe).try_into::<TrainConfig>().is_err()
            });
            return Err(match culprit {
                Some(k) => located(
                    &k,
                    format!("{msg}: fix the value (its type and allowed values are in {RUN_DOCS})"),
                ),
                None => anyhow::anyhow!("invalid training configuration: {msg} (see {RUN_DOCS})"),
            });
        }
    };
    cfg.validate().map_err(|(k, m)| located(k, m))?;
    Ok(cfg)
}

/// How the ranks of this run are laid out, from `--nproc-per-node` and the launcher's variables.
enum Layout {
    /// One rank in this process.
    Single,
    /// `--nproc-per-node N` on the CPU: N threads over the in-process backend.
    Threads(usize),
    /// `--nproc-per-node N` on CUDA without a launcher: start N processes of this binary with
    /// torchrun's variables and supervise them.
    SpawnLocal(usize),
    /// One rank of a torchrun / Slurm / `--nproc-per-node` job: NCCL.
    Launched(LaunchEnv),
    /// One CPU rank of such a job: the TCP collective.
    LaunchedCpu(LaunchEnv),
}

fn layout(args: &Args) -> Result<Layout> {
    let env = llava_trainer::dist::launch::from_process_env()
        .context("reading the launcher's variables (torchrun's RANK/WORLD_SIZE or Slurm's)")?;
    let nproc = args.nproc_per_node.max(1);
    let launched = env.source != LaunchSource::Single;
    let cpu = super::device::is_cpu_spec(&args.device);
    Ok(match (launched, nproc, cpu) {
        (true, n, _) if n > 1 => anyhow::bail!(
            "--nproc-per-node {n} inside a {:?} launch (rank {} of {}): the launcher already \
             started the ranks; drop --nproc-per-node",
            env.source,
            env.rank,
            env.world_size
        ),
        (true, _, true) if env.world_size == 1 => Layout::Single,
        (true, _, true) => Layout::LaunchedCpu(env),
        (true, _, false) => Layout::Launched(env),
        (false, 1, _) => Layout::Single,
        (false, n, true) => match args.cpu_ranks.as_str() {
            "threads" => Layout::Threads(n),
            "processes" => Layout::SpawnLocal(n),
            other => anyhow::bail!("--cpu-ranks {other:?}: expected processes or threads"),
        },
        (false, n, false) => Layout::SpawnLocal(n),
    })
}

pub fn run(args: Args) -> Result<()> {
    let layout = layout(&args)?;
    if let Some(dir) = &args.cache_dir {
        llava_trainer::data::source::set_cache(Some(llava_trainer::data::source::CacheOptions {
            dir: dir.clone(),
            max_bytes: args.cache_size,
        }));
    }
    let rendezvous_timeout = Duration::try_from_secs_f64(args.rendezvous_timeout)
        .context("--rendezvous-timeout: a number of seconds")?;
    let collective_timeout = Duration::try_from_secs_f64(args.collective_timeout)
        .context("--collective-timeout: a number of seconds")?;
    if let Layout::SpawnLocal(nproc) = layout {
        if !cfg!(feature = "cuda") && !super::device::is_cpu_spec(&args.device) {
            // Says that this binary has no CUDA, before starting anything.
            super::device::parse(&args.device)?;
        }
        // Check the configuration once here rather than N times in the ranks.
        merged(args)?;
        return spawn_local(nproc, rendezvous_timeout);
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
    llava_trainer::ops::set_tf32(device.is_cuda() && cfg.bf16);
    tracing::info!("precision: {precision}");
    // SIGINT (Ctrl-C) and SIGTERM (what Slurm and Kubernetes send before killing a preempted
    // job): finish the step, checkpoint, exit 130 / 143 so a wrapper knows training did not
    // finish. A second signal exits at once. SIGUSR1 (Slurm's `--signal=USR1@120`): checkpoint at
    // the next step boundary and go on. With several ranks, rank 0's flags decide for all.
    use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};
    let stop = Arc::new(AtomicBool::new(false));
    let exit_code = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for (sig, code) in [(SIGINT, 130), (SIGTERM, 143)] {
        signal_hook::flag::register_conditional_shutdown(sig, code, stop.clone())
            .context("installing the signal handlers")?;
        signal_hook::flag::register_usize(sig, exit_code.clone(), code as usize)
            .context("installing the signal handlers")?;
        signal_hook::flag::register(sig, stop.clone()).context("installing the signal handlers")?;
    }
    let save_now = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(SIGUSR1, save_now.clone())
        .context("installing the SIGUSR1 handler")?;
    let lead =
        !matches!(&layout, Layout::Launched(env) | Layout::LaunchedCpu(env) if env.rank != 0);
    let opts = RunOptions {
        stop: Some(stop),
        save_now: Some(save_now),
        progress: lead,
        progress_every: lead.then_some(progress_every),
        device: Some(device),
        ..RunOptions::default()
    };
    let summary = match layout {
        Layout::Single => train::run(&cfg, opts)?,
        Layout::Threads(n) => train::run_threads(&cfg, n, opts)?,
        Layout::Launched(env) => run_nccl(&cfg, &env, opts, rendezvous_timeout)?,
        Layout::LaunchedCpu(env) => {
            run_tcp(&cfg, &env, opts, rendezvous_timeout, collective_timeout)?
        }
        Layout::SpawnLocal(_) => unreachable!("handled above"),
    };
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
    let code = exit_code.load(std::sync::atomic::Ordering::SeqCst);
    if summary.interrupted && code != 0 {
        std::process::exit(code as i32);
    }
    Ok(())
}

/// How long the other ranks of a job may take to stop once one failed, before they are killed
/// (a step and an emergency checkpoint of the 8B model fit in it).
const FAILURE_GRACE: Duration = Duration::from_secs(120);

/// Starts `nproc` copies of this command as the ranks of a one-node job and waits for them.
fn spawn_local(nproc: usize, rendezvous_timeout: Duration) -> Result<()> {
    let program = std::env::current_exe().context("finding this executable to start the ranks")?;
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let master_port = match std::env::var("MASTER_PORT") {
        Ok(p) => p
            .parse()
            .with_context(|| format!("MASTER_PORT={p:?}: not a port number"))?,
        Err(_) => spawn::free_port().context("finding a free port for the rendezvous")?,
    };
    tracing::info!(
        "starting {nproc} rank processes with the rendezvous at 127.0.0.1:{master_port} \
         (timeout {:.0} s)",
        rendezvous_timeout.as_secs_f64()
    );
    let job = LocalJob {
        nproc,
        master_port,
        grace: FAILURE_GRACE,
    };
    let exit = spawn::run_local_job(&program, &spawn::strip_nproc_flag(&args), &job)?;
    if exit.code != 0 {
        std::process::exit(exit.code);
    }
    Ok(())
}

/// One CPU rank of a multi-process job: the TCP collective, joined through torchrun's store or
/// our rendezvous ([`llava_trainer::dist::join`]).
fn run_tcp(
    cfg: &TrainConfig,
    env: &LaunchEnv,
    opts: RunOptions,
    rendezvous_timeout: Duration,
    collective_timeout: Duration,
) -> Result<Summary> {
    use llava_trainer::dist::tcp::TcpGroup;
    use llava_trainer::dist::Collective;
    let group = Arc::new(
        TcpGroup::join(env, rendezvous_timeout, collective_timeout).with_context(|| {
            format!(
                "rank {} of {} ({:?} launch, MASTER_ADDR={} MASTER_PORT={})",
                env.rank, env.world_size, env.source, env.master_addr, env.master_port
            )
        })?,
    );
    tracing::info!(
        "rank {} of {}: joined (TCP collective)",
        env.rank,
        env.world_size
    );
    let out = train::run_rank(cfg, opts, group.clone());
    match &out {
        Err(e) => group.abort(&e.to_string()),
        Ok(_) => group.finish()?,
    }
    Ok(out?)
}

/// One rank of a multi-process job: NCCL on GPU `LOCAL_RANK`, joined through the rendezvous.
#[cfg(feature = "cuda")]
fn run_nccl(
    cfg: &TrainConfig,
    env: &LaunchEnv,
    opts: RunOptions,
    rendezvous_timeout: Duration,
) -> Result<Summary> {
    use llava_trainer::dist::nccl::NcclGroup;
    use llava_trainer::dist::Collective;
    let device = opts
        .device
        .clone()
        .context("a launched rank has its CUDA device")?;
    let group = Arc::new(
        NcclGroup::new(env, &device, rendezvous_timeout, train::COLLECTIVE_TIMEOUT).with_context(
            || {
                format!(
                    "rank {} of {} joining the job at {}:{}",
                    env.rank, env.world_size, env.master_addr, env.master_port
                )
            },
        )?,
    );
    group.watchdog(FAILURE_GRACE)?;
    let out = train::run_rank(cfg, opts, group.clone());
    match &out {
        Err(e) => group.abort(&e.to_string()),
        Ok(_) => group.finish()?,
    }
    Ok(out?)
}

#[cfg(not(feature = "cuda"))]
fn run_nccl(
    _cfg: &TrainConfig,
    env: &LaunchEnv,
    _opts: RunOptions,
    _rendezvous_timeout: Duration,
) -> Result<Summary> {
    anyhow::bail!(
        "launched as rank {} of {} ({:?}): ranks in separate processes need NCCL, which this \
         llava-trainer was built without; rebuild with `--features cuda` (scripts/build-cuda.sh), \
         or on the CPU run one process with --nproc-per-node N",
        env.rank,
        env.world_size,
        env.source
    )
}
