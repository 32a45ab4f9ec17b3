//! The training loop: shards → loader → model → AdamW, with checkpoints and exact resume.
//!
//! One optimizer step = `grad_accum` micro-batches of one epoch; their gradients are averaged
//! (the mean of per-micro-batch means, spec §5.4). An epoch's last `n % grad_accum`
//! micro-batches are dropped. Ranks of a data-parallel group (threads on the CPU, NCCL processes on
//! GPUs) run this same loop on their own share of each batch; rank 0 logs and saves.

mod compat;
mod config;
mod eval_generate;
mod log;
mod stream;
pub mod tensorboard;

pub use compat::{
    check_compatible, memory_plan, normalize_on_device, source_config, to_model_batch,
};
pub use config::{TrainConfig, TunableParts};
pub use eval_generate::GenerateLog;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use crate::attention::AttentionKind;
use crate::checkpoint::{self, TrainerState};
use crate::data::{
    DataState, EpochPlan, IndexOptions, Loader, LoaderConfig, PixelFormat, PlanConfig, ShardIndex,
};
use crate::dist::threads::ThreadGroup;
use crate::dist::zero::{self, Sharding};
use crate::dist::{Collective, Single};
use crate::init;
use crate::llava_next::{LlavaNext, LlavaNextConfig};
use crate::memory;
use crate::optim::{AdamW, AdamWConfig};
use crate::schedule::CosineSchedule;
use crate::step::{self, StepOptions};
use crate::{Error, Result};
use log::{gib, truncate_log};
use stream::{batches_per_epoch, Stream};

/// What to do after a step (test hook and Ctrl-C).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Continue,
    /// Write a checkpoint and stop (Ctrl-C).
    Stop,
    /// Stop at once without a checkpoint (a kill).
    Abort,
    /// Write a checkpoint and go on (SIGUSR1).
    Save,
}

/// Run-time options that are not part of the configuration.
#[derive(Default)]
pub struct RunOptions {
    /// Set by the first Ctrl-C / SIGTERM: finish the step, checkpoint, return.
    pub stop: Option<Arc<AtomicBool>>,
    /// Set by SIGUSR1: checkpoint after the current step and go on (cleared when done).
    pub save_now: Option<Arc<AtomicBool>>,
    /// Called after every optimizer step with its number (1-based).
    pub after_step: Option<Box<dyn FnMut(u64) -> Control + Send>>,
    /// indicatif progress bar (only on a terminal).
    pub progress: bool,
    /// Without a terminal: a progress line (step, rate, ETA) at the first step boundary after
    /// each interval, and at the end. `None`: no such lines.
    pub progress_every: Option<std::time::Duration>,
    pub device: Option<Device>,
}

/// One logged step.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StepLog {
    pub step: u64,
    pub epoch: f64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens_per_s: f64,
    pub samples_per_s: f64,
    pub data_wait_s: f64,
    pub step_s: f64,
}

/// One evaluation on `eval_shards` (a log.jsonl line).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EvalLog {
    pub step: u64,
    /// Mean cross entropy over every supervised token of the eval shards.
    pub eval_loss: f64,
    /// Supervised tokens the mean is over.
    pub eval_tokens: u64,
}

#[derive(Debug, Clone)]
pub struct Summary {
    pub steps_done: u64,
    pub total_steps: u64,
    /// Every step of this process (not only logged ones).
    pub history: Vec<StepLog>,
    pub last_checkpoint: Option<PathBuf>,
    pub interrupted: bool,
    pub resumed_from: Option<PathBuf>,
    /// The run had already reached its last step in a checkpoint: nothing was trained.
    pub already_finished: bool,
    /// Evaluations of this process, in order.
    pub evals: Vec<EvalLog>,
    /// Samples this rank left out because their row checksum did not match (`on_corrupt =
    /// "skip"`), where and why.
    pub skipped_corrupt: Vec<String>,
}

/// Samples left out of a step for a row checksum mismatch (a log.jsonl line; `on_corrupt = "skip"`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CorruptLog {
    pub step: u64,
    /// One located description per sample: shard, row group, row, sample, checksums.
    pub skipped_corrupt: Vec<String>,
    /// Skipped so far in this process.
    pub skipped_corrupt_total: usize,
}

/// Trains as `cfg` says on one device; resumes from the latest checkpoint in `output` unless
/// told otherwise.
pub fn run(cfg: &TrainConfig, opts: RunOptions) -> Result<Summary> {
    run_rank(cfg, opts, Arc::new(Single))
}

/// Data-parallel training with `world` ranks as threads of this process (the in-process
/// backend: CPU runs and tests). Rank 0 gets `opts` (logging, hooks, checkpoints); the others
/// share its stop flag and device. If a rank fails, the others stop with an error naming it.
pub fn run_threads(cfg: &TrainConfig, world: usize, opts: RunOptions) -> Result<Summary> {
    let group = ThreadGroup::new(world.max(1), COLLECTIVE_TIMEOUT);
    let stop = opts.stop.clone();
    let device = opts.device.clone();
    let mut opts = Some(opts);
    let results: Vec<Result<Summary>> = std::thread::scope(|scope| {
        let handles: Vec<_> = group
            .into_iter()
            .map(|comm| {
                let rank_opts = if comm.rank() == 0 {
                    opts.take().unwrap_or_default()
                } else {
                    RunOptions {
                        stop: stop.clone(),
                        device: device.clone(),
                        ..RunOptions::default()
                    }
                };
                scope.spawn(move || {
                    let comm = Arc::new(comm);
                    let out = run_rank(cfg, rank_opts, comm.clone());
                    if let Err(e) = &out {
                        comm.abort(&e.to_string());
                    }
                    out
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::Distributed("a rank panicked".into())))
            })
            .collect()
    });
    // Report the failing rank's own error rather than the others' "rank r failed".
    let mut first_err = None;
    let mut summary = None;
    for (rank, r) in results.into_iter().enumerate() {
        match r {
            Ok(s) if rank == 0 => summary = Some(s),
            Ok(_) => {}
            Err(Error::Distributed(m)) => {
                first_err.get_or_insert(Error::Distributed(format!("rank {rank}: {m}")));
            }
            Err(e) => {
                if !matches!(first_err, Some(ref x) if !matches!(x, Error::Distributed(_))) {
                    first_err = Some(Error::Distributed(format!("rank {rank} failed: {e}")));
                }
            }
        }
    }
    match (first_err, summary) {
        (Some(e), _) => Err(e),
        (None, Some(s)) => Ok(s),
        (None, None) => Err(Error::Distributed("rank 0 returned nothing".into())),
    }
}

/// How long a collective waits for the slowest rank before naming the missing ones. A step of
/// the 8B model takes seconds; checkpoints a few minutes.
pub const COLLECTIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1800);

/// One rank's training loop (world size and rank from `comm`).
pub fn run_rank(cfg: &TrainConfig, opts: RunOptions, comm: Arc<dyn Collective>) -> Result<Summary> {
    let mut opts = opts;
    let (rank, world) = (comm.rank(), comm.world_size());
    // Per-phase peak heap, for checking the memory plan (crate::heap, LLAVA_HEAP_REPORT).
    let _heap = crate::heap::RunReport::start(rank, world);
    let lead = rank == 0;
    let dev = opts.device.clone().unwrap_or(Device::Cpu);
    let dtype = if cfg.bf16 { DType::BF16 } else { DType::F32 };
    let parts = TunableParts::parse(&cfg.tunable_parts)?;
    if cfg.grad_accum == 0 || cfg.log_every == 0 || cfg.workers == 0 {
        return Err(Error::Config(
            "grad_accum, log_every and workers must be at least 1".into(),
        ));
    }
    let index = ShardIndex::open(&cfg.shards, &IndexOptions::default())?;
    // Refuse a run that cannot fit before reading gigabytes of weights.
    let (plan, advice) = memory_plan(
        cfg,
        &source_config(&cfg.source)?,
        &index,
        world,
        memory::device_capacity(&dev),
    )?;
    tracing::info!(
        "memory plan per device: {:.2} GiB (weights {:.2}, gradients {:.2}, optimizer {:.2}, \
         activations {:.2})",
        gib(plan.total),
        gib(plan.weights),
        gib(plan.gradients),
        gib(plan.optimizer),
        gib(plan.activations)
    );
    if let Some(advice) = advice {
        if cfg.skip_memory_check {
            tracing::warn!("{advice} (skip_memory_check is set: trying anyway)");
        } else {
            return Err(Error::Config(format!(
                "{advice} (skip_memory_check = true to try anyway)"
            )));
        }
    }
    let (mut model_cfg, varmap) = init::load_source(&cfg.source, cfg.seed, dtype, &dev)?;
    if let Some(m) = cfg.merge_type {
        model_cfg.mm_patch_merge_type = m;
    }
    if model_cfg.tokenizer_model_max_length.is_none() {
        model_cfg.tokenizer_model_max_length = Some(index.manifest.settings.model_max_length);
    }
    check_compatible(&index, &model_cfg, cfg.tokenizer.as_deref())?;
    // Evaluation: rank 0 alone runs every batch of the eval shards, in one fixed order (the
    // world-size-1 plan of epoch 0), so the value does not depend on the world size.
    let eval_set = match (&cfg.eval_shards, lead) {
        (Some(dir), true) => {
            let eval_index = ShardIndex::open(dir, &IndexOptions::default())?;
            check_compatible(&eval_index, &model_cfg, cfg.tokenizer.as_deref())?;
            let eval_plan = PlanConfig {
                seed: cfg.seed,
                world_size: 1,
                batch_size: cfg.batch_size,
                pack_length: None,
                across_batches: false,
            };
            let batches = EpochPlan::new(&eval_index, &eval_plan, &DataState::new(0))?
                .rank_batches(&eval_index, 0)?;
            Some((eval_index, batches))
        }
        _ => None,
    };
    let eval_gen = match lead {
        true => eval_generate::EvalGenerate::new(cfg, &model_cfg, &index, &dev)?,
        false => None,
    };

    let plan_cfg = PlanConfig {
        seed: cfg.seed,
        world_size: world,
        batch_size: cfg.batch_size,
        pack_length: (cfg.packing || cfg.pack_across_batches).then(|| {
            cfg.pack_length
                .unwrap_or(index.manifest.settings.model_max_length as u32)
        }),
        across_batches: cfg.pack_across_batches,
    };
    let per_epoch = batches_per_epoch(&index, &plan_cfg)? / cfg.grad_accum;
    let total_steps = cfg.max_steps.unwrap_or(cfg.epochs * per_epoch as u64);
    if total_steps == 0 {
        return Err(Error::Config(format!(
            "nothing to train: {per_epoch} optimizer steps per epoch, {} epochs",
            cfg.epochs
        )));
    }
    let schedule = CosineSchedule::new(total_steps, cfg.warmup_ratio);

    // Resume: the checkpoint's weights replace the loaded ones, then the optimizer state.
    let resume = match (&cfg.resume, cfg.no_resume) {
        (Some(p), _) => Some(p.clone()),
        (None, false) => checkpoint::list_checkpoints(&cfg.output)
            .pop()
            .map(|(_, p)| p),
        (None, true) => None,
    };
    // A run whose checkpoint is already at its last step (same settings): nothing to do, and
    // no weights to read.
    if let Some(dir) = &resume {
        checkpoint::check_is_checkpoint(dir)?;
        let state = checkpoint::load_state_json(dir)?;
        if state.global_step >= total_steps
            && state.config == cfg.trajectory_keys_at(world)
            && state.shards_tokenizer_sha256 == index.manifest.tokenizer_sha256
            && state.shards_config_sha256 == index.manifest.config_sha256
        {
            return Ok(Summary {
                steps_done: state.global_step,
                total_steps,
                history: Vec::new(),
                last_checkpoint: Some(dir.clone()),
                interrupted: false,
                resumed_from: Some(dir.clone()),
                already_finished: true,
                evals: Vec::new(),
                skipped_corrupt: Vec::new(),
            });
        }
    }
    let mut resumed_state: Option<TrainerState> = None;
    if let Some(dir) = &resume {
        checkpoint::check_is_checkpoint(dir)?;
        let state = checkpoint::load_state_json(dir)?;
        if state.config != cfg.trajectory_keys_at(world) {
            return Err(Error::Checkpoint {
                path: dir.clone(),
                msg: format!(
                    "written with other settings: {} (this run: {}); use --no-resume or \
                     another --output",
                    state.config,
                    cfg.trajectory_keys_at(world)
                ),
            });
        }
        if state.shards_tokenizer_sha256 != index.manifest.tokenizer_sha256
            || state.shards_config_sha256 != index.manifest.config_sha256
        {
            return Err(Error::Checkpoint {
                path: dir.clone(),
                msg: "trained on other shards (manifest checksums differ)".into(),
            });
        }
        let weights = candle_core::safetensors::load(dir.join("model.safetensors"), &dev).map_err(
            |source| Error::Read {
                path: dir.join("model.safetensors"),
                source,
            },
        )?;
        let data = varmap
            .data()
            .lock()
            .map_err(|_| Error::Poisoned("VarMap"))?;
        for (name, var) in data.iter() {
            let t = weights.get(name).ok_or_else(|| Error::MissingTensor {
                name: name.clone(),
                searched: dir.join("model.safetensors").display().to_string(),
            })?;
            var.set(&t.to_dtype(var.dtype())?)?;
        }
        drop(data);
        resumed_state = Some(state);
    }

    let (mut model, trainable) =
        init::build_model(&model_cfg, &varmap, &|n| parts.is_trainable(n))?;
    let attention: AttentionKind = cfg
        .attention
        .parse()
        .map_err(|e| Error::Config(format!("attention: {e}")))?;
    model.set_attention(attention, AttentionKind::Dense);
    model.set_loss_chunk(cfg.loss_chunk);
    let step_opts = StepOptions {
        recompute: cfg.gradient_checkpointing,
    };
    let names: Vec<String> = trainable.iter().map(|(n, _)| n.clone()).collect();
    let sharding = Sharding::new(
        &trainable
            .iter()
            .map(|(n, v)| (n.clone(), v.dims().to_vec()))
            .collect::<Vec<_>>(),
        world,
        cfg.zero_stage,
    )?;
    let all_vars = trainable.clone();
    let owned: Vec<(String, candle_core::Var)> = trainable
        .into_iter()
        .filter(|(n, _)| sharding.steps(rank, n))
        .collect();
    let mut optim = AdamW::new(
        AdamWConfig {
            lr: cfg.lr,
            vision_tower_lr: cfg.vision_tower_lr,
            weight_decay: cfg.weight_decay,
            max_grad_norm: Some(cfg.max_grad_norm),
            ..AdamWConfig::default()
        },
        owned,
    )?;
    let mut data_state = DataState::new(0);
    let mut step = 0u64;
    if let (Some(state), Some(dir)) = (resumed_state, &resume) {
        if state.trainable != names {
            return Err(Error::Checkpoint {
                path: resume.clone().unwrap_or_default(),
                msg: "other trainable parameters".into(),
            });
        }
        // Only this rank's shard is read, whatever world size wrote the checkpoint.
        let tensors = checkpoint::load_optimizer_for(dir, &|k| {
            k.split_once('.')
                .is_some_and(|(_, n)| sharding.steps(rank, n))
        })?;
        optim.load_state(tensors, state.global_step)?;
        data_state = state.data_state;
        step = state.global_step;
        tracing::info!(
            "resuming from {} at step {step}",
            resume
                .as_ref()
                .map_or(String::new(), |p| p.display().to_string())
        );
    }
    std::fs::create_dir_all(&cfg.output).map_err(|source| Error::Io {
        path: cfg.output.clone(),
        source,
    })?;
    let log_path = cfg.output.join("log.jsonl");
    if lead {
        truncate_log(&log_path, step)?;
    }
    let events = match (&cfg.tensorboard, lead) {
        (Some(dir), true) => {
            let w = tensorboard::EventWriter::create(dir)?;
            tracing::info!("TensorBoard events: {}", w.path().display());
            Some(w)
        }
        _ => None,
    };
    let loader_cfg = LoaderConfig {
        workers: cfg.workers,
        prefetch: cfg.workers.max(2),
        // Tiles cross to the device as bytes and are normalised there.
        pixels: PixelFormat::U8,
        on_corrupt: cfg.on_corrupt,
    };
    // Mean loss over every supervised token of the eval shards, and their number.
    let evaluate = |model: &LlavaNext| -> Result<Option<(f64, u64)>> {
        let Some((eval_index, batches)) = &eval_set else {
            return Ok(None);
        };
        let loader = Loader::new(eval_index.clone(), batches.clone(), &loader_cfg)?;
        let (mut nll, mut targets) = (0f64, 0u64);
        for b in loader {
            let b = b?;
            if b.is_empty() {
                continue;
            }
            let batch = to_model_batch(&b, &model_cfg, &dev)?;
            let out = step::segments::eval_loss(model, &batch)?;
            let mean = out.loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
            nll += f64::from(mean) * out.targets as f64;
            targets += out.targets as u64;
        }
        let mean = if targets > 0 {
            nll / targets as f64
        } else {
            f64::NAN
        };
        Ok(Some((mean, targets)))
    };
    let tokenizer_dir = crate::checkpoint_tokenizer::for_checkpoints(
        &cfg.source,
        cfg.tokenizer.as_deref(),
        &index.manifest,
        lead,
    );
    let mut stream = Stream {
        index: index.clone(),
        plan: plan_cfg,
        loader_cfg: loader_cfg.clone(),
        state: data_state,
        loader: None,
        left: 0,
        accum: cfg.grad_accum,
        rank,
    };
    let bar = (lead && opts.progress && std::io::IsTerminal::is_terminal(&std::io::stderr())).then(
        || {
            // Drawn with llava_formats::progress's bars: log lines never land on it.
            let b = llava_formats::progress::terminal_bar(total_steps);
            b.set_position(step);
            b
        },
    );
    let mut reporter = log::Reporter {
        bar,
        log_path,
        events,
    };
    let n_params: usize = optim.params.iter().map(|p| p.var.elem_count()).sum();
    tracing::info!(
        "training {} tensors ({n_params} parameters) for {total_steps} steps ({per_epoch} per \
         epoch), warmup {}",
        names.len(),
        schedule.warmup_steps
    );
    let with_master = cfg.bf16;
    // ZeRO-1/2 over several ranks: each rank writes the optimizer state it owns (nothing is
    // gathered); otherwise rank 0 holds all of it. Rank 0 writes the weights (every rank has
    // them all) and renames the folder once every shard is in.
    let sharded = sharding.stage >= 1 && world > 1;
    let save = |optim: &AdamW, step: u64, data_state: DataState, lr: f64, loss: f64| {
        crate::heap::enter("checkpoint");
        let optimizer = if sharded {
            if lead {
                checkpoint::prepare_checkpoint_tmp(&cfg.output, step)?;
            }
            comm.barrier()?;
            let tmp = checkpoint::checkpoint_tmp(&cfg.output, step);
            checkpoint::write_optimizer_shard(&tmp, rank, world, &optim.state_tensors())?;
            comm.barrier()?;
            checkpoint::OptimizerTensors::Sharded(zero::optimizer_index(&sharding, with_master))
        } else {
            checkpoint::OptimizerTensors::Whole(if lead {
                optim.state_tensors()
            } else {
                HashMap::new()
            })
        };
        if !lead {
            comm.barrier()?;
            return Ok::<PathBuf, Error>(cfg.output.clone());
        }
        let state = TrainerState {
            global_step: step,
            total_steps,
            data_state,
            epoch: data_state.epoch as f64,
            seed: cfg.seed,
            lr,
            last_loss: loss,
            shards_tokenizer_sha256: index.manifest.tokenizer_sha256.clone(),
            shards_config_sha256: index.manifest.config_sha256.clone(),
            config: cfg.trajectory_keys_at(world),
            trainable: names.clone(),
        };
        let dir = checkpoint::save_checkpoint_with(
            &cfg.output,
            &model_cfg,
            &varmap,
            &state,
            optimizer,
            tokenizer_dir.as_deref(),
            parts.projector_only(),
        )?;
        if let Some(keep) = cfg.save_total_limit {
            checkpoint::apply_keep_limit(&cfg.output, keep.max(1))?;
        }
        tracing::info!("saved {}", dir.display());
        comm.barrier()?;
        Ok::<PathBuf, Error>(dir)
    };

    let mut summary = Summary {
        steps_done: step,
        total_steps,
        history: Vec::new(),
        last_checkpoint: None,
        interrupted: false,
        resumed_from: resume.clone(),
        already_finished: false,
        evals: Vec::new(),
        skipped_corrupt: Vec::new(),
    };
    let mut last_saved = step;
    let (mut lr, mut loss_v) = (0.0, f64::NAN);
    let mut acc = zero::accumulator(all_vars.clone(), &sharding, comm.clone());
    let (started, first_step) = (Instant::now(), step);
    let mut last_progress = started;
    while step < total_steps {
        let t0 = Instant::now();
        crate::heap::enter("step");
        let (group, wait) = stream.next_group()?;
        // Everything below stays on the device until the logging read.
        let mut loss_sum: Option<Tensor> = None;
        let (mut tokens, mut samples) = (0u64, 0usize);
        let mut skipped_now = Vec::new();
        for b in &group {
            for c in &b.skipped {
                tracing::warn!("skipped a corrupt sample (on_corrupt = skip): {c}");
                skipped_now.push(c.to_string());
            }
            tokens += b.tokens;
            samples += b.batch_size();
            if b.is_empty() {
                // ZeRO-2 reduces per micro-batch: every rank takes part in as many.
                acc.end_micro_batch()?;
                continue;
            }
            let batch = to_model_batch(b, &model_cfg, &dev)?;
            let out = step::micro_batch(&model, &batch, &mut acc, cfg.grad_accum, step_opts)?;
            loss_sum = Some(match loss_sum {
                Some(s) => (s + out.loss)?,
                None => out.loss,
            });
        }
        let (grads, norm) = zero::step_gradients(&mut acc, &sharding, comm.as_ref(), &dev)?;
        let mult = schedule.multiplier(step);
        lr = cfg.lr * mult;
        let stats = optim.step_with_norm(&grads, mult, norm)?;
        drop(grads);
        zero::share_parameters(&all_vars, &sharding, comm.as_ref())?;
        step += 1;
        data_state = stream.state;
        let logging = step.is_multiple_of(cfg.log_every) || step == total_steps;
        // The one device read of a step, and only when it is logged.
        let (loss_read, norm_read) = if logging {
            // Mean over every rank's micro-batches; tokens and samples summed over the ranks.
            let local = Tensor::stack(
                &[
                    match &loss_sum {
                        Some(t) => t.to_dtype(DType::F32)?,
                        None => Tensor::new(0f32, &dev)?,
                    },
                    Tensor::new(tokens as f32, &dev)?,
                    Tensor::new(samples as f32, &dev)?,
                ],
                0,
            )?;
            let all = comm.all_reduce_sum(&local)?.to_vec1::<f32>()?;
            tokens = all[1] as u64;
            samples = all[2] as usize;
            let l = f64::from(all[0]) / (group.len() * world) as f64;
            (l, stats.grad_norm_value()?)
        } else {
            (f64::NAN, f64::NAN)
        };
        loss_v = loss_read;
        let dt = t0.elapsed().as_secs_f64();
        let per_epoch_f = (per_epoch * cfg.grad_accum).max(1) as f64;
        let entry = StepLog {
            step,
            epoch: data_state.epoch as f64 + data_state.position as f64 / per_epoch_f,
            loss: loss_v,
            lr,
            grad_norm: norm_read,
            tokens_per_s: tokens as f64 / dt,
            samples_per_s: samples as f64 / dt,
            data_wait_s: wait.as_secs_f64(),
            step_s: dt,
        };
        if logging && lead {
            let line =
                format!(
                "step {step}/{total_steps} loss {:.4} lr {:.3e} grad_norm {:.3} tokens/s {:.0} \
                 samples/s {:.2} data_wait {:.3}s",
                entry.loss, entry.lr, entry.grad_norm, entry.tokens_per_s, entry.samples_per_s,
                entry.data_wait_s
            );
            reporter.report(
                step,
                &line,
                &entry,
                &[
                    ("train/loss", entry.loss),
                    ("train/lr", entry.lr),
                    ("train/grad_norm", entry.grad_norm),
                    ("train/tokens_per_s", entry.tokens_per_s),
                    ("train/samples_per_s", entry.samples_per_s),
                ],
            )?;
        }
        let eval_now =
            cfg.eval_every.is_some_and(|n| step.is_multiple_of(n)) || step == total_steps;
        if eval_now {
            if let Some((eval_loss, eval_tokens)) = evaluate(&model)? {
                let e = EvalLog {
                    step,
                    eval_loss,
                    eval_tokens,
                };
                let line = format!(
                    "eval at step {step}/{total_steps}: eval_loss {eval_loss:.4} over \
                     {eval_tokens} tokens"
                );
                reporter.report(
                    step,
                    &line,
                    &e,
                    &[
                        ("eval/loss", eval_loss),
                        ("eval/tokens", eval_tokens as f64),
                    ],
                )?;
                summary.evals.push(e);
            }
        }
        if let Some(g) = &eval_gen {
            g.after_step(&model, step, total_steps, &mut reporter)?;
        }
        if let Some(b) = &reporter.bar {
            b.set_position(step);
        }
        if let (true, None, Some(every)) = (lead, &reporter.bar, opts.progress_every) {
            if last_progress.elapsed() >= every || step == total_steps {
                last_progress = Instant::now();
                let elapsed = started.elapsed().as_secs_f64();
                let rate = (step - first_step) as f64 / elapsed.max(1e-9);
                tracing::info!(
                    "progress: step {step}/{total_steps} ({:.1}%), {rate:.3} steps/s, elapsed \
                     {elapsed:.0}s, ETA {:.0}s",
                    100.0 * step as f64 / total_steps as f64,
                    (total_steps - step) as f64 / rate.max(1e-9)
                );
            }
        }
        if !skipped_now.is_empty() {
            summary.skipped_corrupt.extend(skipped_now.iter().cloned());
            if lead {
                let total = summary.skipped_corrupt.len();
                let line = format!(
                    "step {step}: skipped {} corrupt sample(s), {total} so far",
                    skipped_now.len()
                );
                let record = CorruptLog {
                    step,
                    skipped_corrupt: skipped_now,
                    skipped_corrupt_total: total,
                };
                reporter.report(
                    step,
                    &line,
                    &record,
                    &[("train/skipped_corrupt", total as f64)],
                )?;
            }
        }
        summary.history.push(entry);
        summary.steps_done = step;
        let mut control = match opts.after_step.as_mut() {
            Some(f) => f(step),
            None => Control::Continue,
        };
        if control == Control::Continue
            && opts
                .save_now
                .as_ref()
                .is_some_and(|s| s.swap(false, Ordering::SeqCst))
        {
            control = Control::Save;
        }
        if opts.stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst)) {
            control = Control::Stop;
        }
        // Rank 0 decides for everyone, so that all ranks stop at the same step.
        if world > 1 {
            let code = Tensor::new(control as u32 as f32, &dev)?;
            control = match comm.broadcast(&code, 0)?.to_scalar::<f32>()? as u32 {
                1 => Control::Stop,
                2 => Control::Abort,
                3 => Control::Save,
                _ => Control::Continue,
            };
        }
        if control == Control::Abort {
            summary.interrupted = true;
            return Ok(summary);
        }
        let periodic = cfg
            .save_every
            .is_some_and(|n| n > 0 && step.is_multiple_of(n));
        if periodic || matches!(control, Control::Stop | Control::Save) || step == total_steps {
            summary.last_checkpoint = Some(save(&optim, step, data_state, lr, loss_v)?);
            last_saved = step;
        }
        if control == Control::Stop {
            summary.interrupted = true;
            break;
        }
    }
    if last_saved != step {
        summary.last_checkpoint = Some(save(&optim, step, data_state, lr, loss_v)?);
    }
    if let Some(b) = reporter.bar {
        b.finish_and_clear();
    }
    if !summary.skipped_corrupt.is_empty() {
        tracing::warn!(
            "rank {rank}: {} corrupt sample(s) skipped in this run (their row checksums did not \
             match; listed above and in log.jsonl): copy or rebuild those shards",
            summary.skipped_corrupt.len()
        );
    }
    if lead && parts.projector_only() && !summary.interrupted {
        checkpoint::save_projector(&varmap, &cfg.output.join(checkpoint::PROJECTOR_FILE))?;
    }
    Ok(summary)
}

/// The model and variables of a run's start (for tests and tools).
pub fn load_for_training(
    cfg: &TrainConfig,
    dev: &Device,
) -> Result<(LlavaNextConfig, VarMap, LlavaNext)> {
    let dtype = if cfg.bf16 { DType::BF16 } else { DType::F32 };
    let parts = TunableParts::parse(&cfg.tunable_parts)?;
    let (c, vm) = init::load_source(&cfg.source, cfg.seed, dtype, dev)?;
    let (m, _) = init::build_model(&c, &vm, &|n| parts.is_trainable(n))?;
    Ok((c, vm, m))
}
