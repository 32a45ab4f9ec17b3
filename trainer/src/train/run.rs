//! One run: [`run`] on one device, [`run_threads`] with ranks as threads, and [`run_rank`], the
//! loop every rank runs (start, steps, logging, evaluation, checkpoints, stop).

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use llava_loader::{IndexOptions, LoaderConfig, PixelFormat, ShardIndex};

use super::control::{self, Control};
use super::eval_generate::EvalGenerate;
use super::evaluate::{EvalLog, EvalSet};
use super::log::{truncate_log, CorruptLog, Reporter, StepLog};
use super::save::CheckpointWriter;
use super::schedule::CosineSchedule;
use super::start;
use super::step::{self, StepOptions};
use super::stream::{batches_per_epoch, Stream};
use super::{tensorboard, to_model_batch, TrainConfig, TunableParts};
use crate::io::checkpoint;
use crate::model::{LlavaNext, LlavaNextConfig};
use crate::parallel::threads::ThreadGroup;
use crate::parallel::zero::{self, Sharding};
use crate::parallel::{Collective, Single};
use crate::{Error, Result};

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
    pub progress_every: Option<Duration>,
    pub device: Option<Device>,
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

impl Summary {
    /// A run at `steps_done` of `total_steps` that has not trained, saved or evaluated yet.
    fn new(steps_done: u64, total_steps: u64, resumed_from: Option<PathBuf>) -> Self {
        Summary {
            steps_done,
            total_steps,
            history: Vec::new(),
            last_checkpoint: None,
            interrupted: false,
            resumed_from,
            already_finished: false,
            evals: Vec::new(),
            skipped_corrupt: Vec::new(),
        }
    }
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

/// One rank of a multi-process job over `group` (already joined): the loop, then the group's
/// orderly end, or, when the loop fails, the other ranks told why.
pub fn run_joined(
    cfg: &TrainConfig,
    opts: RunOptions,
    group: Arc<dyn Collective>,
) -> Result<Summary> {
    let out = run_rank(cfg, opts, group.clone());
    match &out {
        Err(e) => group.abort(&e.to_string()),
        Ok(_) => group.finish()?,
    }
    out
}

/// How long a collective waits for the slowest rank before naming the missing ones. A step of
/// the 8B model takes seconds; checkpoints a few minutes.
pub const COLLECTIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1800);

/// One rank's training loop (world size and rank from `comm`).
pub fn run_rank(cfg: &TrainConfig, opts: RunOptions, comm: Arc<dyn Collective>) -> Result<Summary> {
    let mut opts = opts;
    let (rank, world) = (comm.rank(), comm.world_size());
    // Per-phase peak heap, for checking the memory plan (crate::diag::heap, LLAVA_HEAP_REPORT).
    let _heap = crate::diag::heap::RunReport::start(rank, world);
    let lead = rank == 0;
    let dev = opts.device.clone().unwrap_or(Device::Cpu);
    let dtype = if cfg.bf16 { DType::BF16 } else { DType::F32 };
    let parts = TunableParts::parse(&cfg.tunable_parts)?;
    start::check_settings(cfg)?;
    let index = ShardIndex::open(&cfg.shards, &IndexOptions::default())?;
    start::check_memory(cfg, &index, world, &dev)?;
    let (model_cfg, varmap) = start::load_model(cfg, &index, dtype, &dev)?;
    let eval_set = match lead {
        true => EvalSet::open(cfg, &model_cfg)?,
        false => None,
    };
    let eval_gen = match lead {
        true => EvalGenerate::new(cfg, &model_cfg, &index, &dev)?,
        false => None,
    };

    let plan_cfg = start::plan_config(cfg, &index, world);
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
    let resume = start::resume_dir(cfg);
    let resumed_state = match &resume {
        Some(dir) => {
            let state = start::resume_state(dir)?;
            if start::is_finished(&state, cfg, world, &index, total_steps) {
                return Ok(Summary {
                    last_checkpoint: Some(dir.clone()),
                    already_finished: true,
                    ..Summary::new(state.global_step, total_steps, resume.clone())
                });
            }
            start::restore_weights(dir, &state, cfg, world, &index, &varmap, &dev)?;
            Some(state)
        }
        None => None,
    };

    let (model, trainable) = start::build_model(cfg, &model_cfg, &varmap, &parts)?;
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
    let mut optim = start::optimizer(cfg, owned)?;
    let (mut data_state, mut step) = match (resumed_state, &resume) {
        (Some(state), Some(dir)) => {
            start::restore_optimizer(dir, state, &names, &sharding, rank, &mut optim)?
        }
        _ => (llava_loader::DataState::new(0), 0),
    };

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
    let tokenizer_dir = crate::io::checkpoint_tokenizer::for_checkpoints(
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
    let mut reporter = Reporter {
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
    let writer = CheckpointWriter {
        cfg,
        comm: comm.as_ref(),
        index: &index,
        model_cfg: &model_cfg,
        varmap: &varmap,
        sharding: &sharding,
        trainable: &names,
        total_steps,
        tokenizer_dir: tokenizer_dir.as_deref(),
        projector_only: parts.projector_only(),
    };

    let mut summary = Summary::new(step, total_steps, resume.clone());
    let mut last_saved = step;
    let (mut lr, mut loss_v) = (0.0, f64::NAN);
    let mut acc = zero::accumulator(all_vars.clone(), &sharding, comm.clone());
    let mut progress = ProgressLines::new(step);
    while step < total_steps {
        let t0 = Instant::now();
        crate::diag::heap::enter("step");
        let (group, wait) = stream.next_group()?;
        let micro = MicroBatches::run(&group, &model, &model_cfg, &dev, &mut acc, cfg, step_opts)?;
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
        let (loss_read, norm_read, tokens, samples) = if logging {
            let (loss, tokens, samples) = micro.over_all_ranks(comm.as_ref(), &dev)?;
            (loss, stats.grad_norm_value()?, tokens, samples)
        } else {
            (f64::NAN, f64::NAN, micro.tokens, micro.samples)
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
            entry.report(total_steps, &mut reporter)?;
        }
        let eval_now =
            cfg.eval_every.is_some_and(|n| step.is_multiple_of(n)) || step == total_steps;
        if let (true, Some(eval)) = (eval_now, &eval_set) {
            let (eval_loss, eval_tokens) = eval.evaluate(&model, &model_cfg, &loader_cfg, &dev)?;
            let e = EvalLog {
                step,
                eval_loss,
                eval_tokens,
            };
            e.report(total_steps, &mut reporter)?;
            summary.evals.push(e);
        }
        if let Some(g) = &eval_gen {
            g.after_step(&model, step, total_steps, &mut reporter)?;
        }
        if let Some(b) = &reporter.bar {
            b.set_position(step);
        }
        if let (true, None, Some(every)) = (lead, &reporter.bar, opts.progress_every) {
            progress.maybe_log(step, total_steps, every);
        }
        if !micro.skipped.is_empty() {
            summary
                .skipped_corrupt
                .extend(micro.skipped.iter().cloned());
            if lead {
                let record = CorruptLog {
                    step,
                    skipped_corrupt: micro.skipped,
                    skipped_corrupt_total: summary.skipped_corrupt.len(),
                };
                record.report(&mut reporter)?;
            }
        }
        summary.history.push(entry);
        summary.steps_done = step;
        let control = control::after_step(&mut opts, step, comm.as_ref(), &dev)?;
        if control == Control::Abort {
            summary.interrupted = true;
            return Ok(summary);
        }
        let periodic = cfg
            .save_every
            .is_some_and(|n| n > 0 && step.is_multiple_of(n));
        if periodic || matches!(control, Control::Stop | Control::Save) || step == total_steps {
            summary.last_checkpoint = Some(writer.save(&optim, step, data_state, lr, loss_v)?);
            last_saved = step;
        }
        if control == Control::Stop {
            summary.interrupted = true;
            break;
        }
    }
    if last_saved != step {
        summary.last_checkpoint = Some(writer.save(&optim, step, data_state, lr, loss_v)?);
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

/// What one rank's micro-batches of a step left: the summed loss (on the device, not read),
/// the tokens and samples they held, and the corrupt samples they skipped.
struct MicroBatches {
    loss_sum: Option<Tensor>,
    tokens: u64,
    samples: usize,
    count: usize,
    skipped: Vec<String>,
}

impl MicroBatches {
    /// Forward and backward of each micro-batch of `group` into `acc`. Everything stays on the
    /// device until the logging read.
    fn run(
        group: &[llava_loader::Batch],
        model: &LlavaNext,
        model_cfg: &LlavaNextConfig,
        dev: &Device,
        acc: &mut step::GradAccumulator,
        cfg: &TrainConfig,
        step_opts: StepOptions,
    ) -> Result<Self> {
        let mut out = Self {
            loss_sum: None,
            tokens: 0,
            samples: 0,
            count: group.len(),
            skipped: Vec::new(),
        };
        for b in group {
            for c in &b.skipped {
                tracing::warn!("skipped a corrupt sample (on_corrupt = skip): {c}");
                out.skipped.push(c.to_string());
            }
            out.tokens += b.tokens;
            out.samples += b.batch_size();
            if b.is_empty() {
                // ZeRO-2 reduces per micro-batch: every rank takes part in as many.
                acc.end_micro_batch()?;
                continue;
            }
            let batch = to_model_batch(b, model_cfg, dev)?;
            let step = step::micro_batch(model, &batch, acc, cfg.grad_accum, step_opts)?;
            out.loss_sum = Some(match out.loss_sum {
                Some(s) => (s + step.loss)?,
                None => step.loss,
            });
        }
        Ok(out)
    }

    /// The mean loss over every rank's micro-batches, and the tokens and samples summed over the
    /// ranks (one collective, one device read).
    fn over_all_ranks(&self, comm: &dyn Collective, dev: &Device) -> Result<(f64, u64, usize)> {
        let local = Tensor::stack(
            &[
                match &self.loss_sum {
                    Some(t) => t.to_dtype(DType::F32)?,
                    None => Tensor::new(0f32, dev)?,
                },
                Tensor::new(self.tokens as f32, dev)?,
                Tensor::new(self.samples as f32, dev)?,
            ],
            0,
        )?;
        let all = comm.all_reduce_sum(&local)?.to_vec1::<f32>()?;
        let loss = f64::from(all[0]) / (self.count * comm.world_size()) as f64;
        Ok((loss, all[1] as u64, all[2] as usize))
    }
}

/// Without a progress bar: a progress line (step, rate, ETA) at the first step boundary after
/// each interval, and at the end.
struct ProgressLines {
    started: Instant,
    first_step: u64,
    last: Instant,
}

impl ProgressLines {
    fn new(first_step: u64) -> Self {
        let started = Instant::now();
        Self {
            started,
            first_step,
            last: started,
        }
    }

    fn maybe_log(&mut self, step: u64, total_steps: u64, every: Duration) {
        if self.last.elapsed() < every && step != total_steps {
            return;
        }
        self.last = Instant::now();
        let elapsed = self.started.elapsed().as_secs_f64();
        let rate = (step - self.first_step) as f64 / elapsed.max(1e-9);
        tracing::info!(
            "progress: step {step}/{total_steps} ({:.1}%), {rate:.3} steps/s, elapsed \
             {elapsed:.0}s, ETA {:.0}s",
            100.0 * step as f64 / total_steps as f64,
            (total_steps - step) as f64 / rate.max(1e-9)
        );
    }
}
