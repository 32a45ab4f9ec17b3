//! The training loop: shards → loader → model → AdamW, with checkpoints and exact resume.
//!
//! One optimizer step = `grad_accum` micro-batches of one epoch; their gradients are averaged
//! (the mean of per-micro-batch means, spec §5.4). An epoch's last `n % grad_accum`
//! micro-batches are dropped. Single process (world size 1); multi-GPU is not done.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{self, TrainerState};
use crate::data::{
    self, DataState, EpochPlan, IndexOptions, Loader, LoaderConfig, PixelFormat, Pixels,
    PlanConfig, ShardIndex,
};
use crate::init::{self, ModelSource};
use crate::llava_next::{LlavaNext, LlavaNextConfig, MergeType};
use crate::optim::{AdamW, AdamWConfig};
use crate::schedule::CosineSchedule;
use crate::{Batch, Error, ImageMeta, Result};

/// `train.toml`; every key is also a `llava-trainer run` flag.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Folder with manifest.json and shards/.
    pub shards: PathBuf,
    #[serde(flatten)]
    pub source: ModelSource,
    pub output: PathBuf,
    /// Comma-separated `mm_vision_tower`, `mm_mlp_adapter`, `mm_language_model` (spec §7.2).
    #[serde(default = "defaults::tunable_parts")]
    pub tunable_parts: String,
    #[serde(default = "defaults::lr")]
    pub lr: f64,
    #[serde(default)]
    pub vision_tower_lr: Option<f64>,
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default = "defaults::warmup_ratio")]
    pub warmup_ratio: f64,
    #[serde(default = "defaults::max_grad_norm")]
    pub max_grad_norm: f64,
    /// Per-device batch size (default: the shards'; divisors and multiples of it work).
    #[serde(default)]
    pub batch_size: Option<usize>,
    #[serde(default = "defaults::one")]
    pub grad_accum: usize,
    #[serde(default = "defaults::one_u64")]
    pub epochs: u64,
    /// Overrides `epochs`.
    #[serde(default)]
    pub max_steps: Option<u64>,
    #[serde(default = "defaults::seed")]
    pub seed: u64,
    /// bf16 parameters and activations, f32 master weights and moments.
    #[serde(default)]
    pub bf16: bool,
    /// Checkpoint every N optimizer steps (and always at the end and on Ctrl-C).
    #[serde(default)]
    pub save_every: Option<u64>,
    /// Keep at most this many checkpoints (oldest deleted).
    #[serde(default)]
    pub save_total_limit: Option<usize>,
    #[serde(default = "defaults::one_u64")]
    pub log_every: u64,
    #[serde(default = "defaults::workers")]
    pub workers: usize,
    /// The model's merge (default: the model config's); must equal the shards'.
    #[serde(default)]
    pub merge_type: Option<MergeType>,
    /// The tokenizer the shards must have been built with (sha256 compared with the manifest).
    #[serde(default)]
    pub tokenizer: Option<PathBuf>,
    /// Resume from this checkpoint (default: the latest in `output`, if any).
    #[serde(default)]
    pub resume: Option<PathBuf>,
    /// Start from scratch even when `output` has checkpoints.
    #[serde(default)]
    pub no_resume: bool,
}

mod defaults {
    pub fn tunable_parts() -> String {
        "mm_vision_tower,mm_mlp_adapter,mm_language_model".into()
    }
    pub fn lr() -> f64 {
        1e-5
    }
    pub fn warmup_ratio() -> f64 {
        0.03
    }
    pub fn max_grad_norm() -> f64 {
        1.0
    }
    pub fn one() -> usize {
        1
    }
    pub fn one_u64() -> u64 {
        1
    }
    pub fn seed() -> u64 {
        42
    }
    pub fn workers() -> usize {
        16
    }
}

impl TrainConfig {
    /// A config with defaults for everything but the paths.
    pub fn new(shards: PathBuf, model: PathBuf, output: PathBuf) -> Self {
        let v = serde_json::json!({"shards": shards, "model": model, "output": output});
        serde_json::from_value(v).unwrap_or_else(|_| unreachable!("every other key has a default"))
    }

    /// Keys that change the trajectory: a resume must match them.
    fn trajectory_keys(&self) -> serde_json::Value {
        serde_json::json!({
            "tunable_parts": self.tunable_parts, "lr": self.lr,
            "vision_tower_lr": self.vision_tower_lr, "weight_decay": self.weight_decay,
            "warmup_ratio": self.warmup_ratio, "max_grad_norm": self.max_grad_norm,
            "batch_size": self.batch_size, "grad_accum": self.grad_accum, "epochs": self.epochs,
            "max_steps": self.max_steps, "seed": self.seed, "bf16": self.bf16,
        })
    }
}

/// Parsed `tunable_parts`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TunableParts {
    pub vision_tower: bool,
    pub mlp_adapter: bool,
    pub language_model: bool,
}

impl TunableParts {
    pub fn parse(s: &str) -> Result<Self> {
        let mut p = Self {
            vision_tower: false,
            mlp_adapter: false,
            language_model: false,
        };
        for part in s.split(',').map(str::trim).filter(|x| !x.is_empty()) {
            match part {
                "mm_vision_tower" => p.vision_tower = true,
                "mm_mlp_adapter" => p.mlp_adapter = true,
                "mm_language_model" => p.language_model = true,
                other => {
                    return Err(Error::Config(format!(
                        "unknown tunable part {other:?} (mm_vision_tower, mm_mlp_adapter, \
                         mm_language_model)"
                    )))
                }
            }
        }
        if !(p.vision_tower || p.mlp_adapter || p.language_model) {
            return Err(Error::Config("tunable_parts is empty".into()));
        }
        Ok(p)
    }

    /// Spec §7.2 by canonical name: the language model part is everything that is neither
    /// vision tower nor projector, so `image_newline` belongs to it.
    pub fn is_trainable(&self, name: &str) -> bool {
        if name.contains("vision_tower") {
            self.vision_tower
        } else if name.starts_with("multi_modal_projector") {
            self.mlp_adapter
        } else {
            self.language_model
        }
    }

    /// Projector-only runs also write `mm_projector.safetensors` (pretraining, §7.5).
    pub fn projector_only(&self) -> bool {
        self.mlp_adapter && !self.vision_tower && !self.language_model
    }
}

/// Refuses shards that do not fit the model (what the trainer cannot silently fix).
pub fn check_compatible(
    index: &ShardIndex,
    cfg: &LlavaNextConfig,
    tokenizer: Option<&Path>,
) -> Result<()> {
    let s = &index.manifest.settings;
    let mut problems = Vec::new();
    let merge = match cfg.mm_patch_merge_type {
        MergeType::Flat => "flat",
        MergeType::SpatialUnpad => "spatial_unpad",
    };
    if s.mm_patch_merge_type != merge {
        problems.push(format!(
            "the shards were built for mm_patch_merge_type {:?}, the model uses {merge:?} \
             (set merge_type / --merge-type {})",
            s.mm_patch_merge_type, s.mm_patch_merge_type
        ));
    }
    if s.tile_size as usize != cfg.vision_config.image_size {
        problems.push(format!(
            "the shards' tiles are {0}x{0}, the vision tower's image_size is {1}",
            s.tile_size, cfg.vision_config.image_size
        ));
    }
    // config.json holds HF's (h, w); the manifest LLaVA-NeXT's (w, h). Compared as sets: the
    // grids come from the shards, the list only matters to HF's processor.
    let mut ours: Vec<[usize; 2]> = s
        .image_grid_pinpoints
        .iter()
        .map(|[w, h]| [*w as usize, *h as usize])
        .collect();
    let mut model: Vec<[usize; 2]> = cfg
        .image_grid_pinpoints
        .iter()
        .map(|[h, w]| [*w, *h])
        .collect();
    ours.sort();
    model.sort();
    if !model.is_empty() && ours != model {
        problems.push(format!(
            "the shards were built with image_grid_pinpoints (w,h) {:?}, the model's config has \
             (h,w) {:?}",
            s.image_grid_pinpoints, cfg.image_grid_pinpoints
        ));
    }
    if let Some(max) = cfg.tokenizer_model_max_length {
        if max != s.model_max_length {
            problems.push(format!(
                "the shards were built with model_max_length {}, the model's \
                 tokenizer_model_max_length is {max}",
                s.model_max_length
            ));
        }
    }
    // Llama-3's ids go up to 128255 plus <image>/<pad>; the shards hold no placeholder ids.
    if let Some(tok) = tokenizer {
        let bytes = std::fs::read(tok).map_err(|source| Error::Io {
            path: tok.into(),
            source,
        })?;
        let sha = {
            use sha2::Digest;
            hex::encode(sha2::Sha256::digest(&bytes))
        };
        if sha != index.manifest.tokenizer_sha256 {
            problems.push(format!(
                "the shards were built with another tokenizer (sha256 {}) than {} ({sha})",
                index.manifest.tokenizer_sha256,
                tok.display()
            ));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Error::Mismatch(format!(
            "shards {} do not fit the model:\n  - {}",
            index.dir.display(),
            problems.join("\n  - ")
        )))
    }
}

/// The loader's plain arrays as the model's tensors; checks every image's token count against
/// the model's (a mismatch means the shards were built for another geometry).
pub fn to_model_batch(b: &data::Batch, cfg: &LlavaNextConfig, dev: &Device) -> Result<Batch> {
    let (rows, l) = (b.batch_size(), b.seq_len);
    let vocab = cfg.text_config.vocab_size as i32;
    if let Some(&id) = b.input_ids.iter().find(|&&id| id >= vocab) {
        return Err(Error::Mismatch(format!(
            "token id {id} is outside the model's vocabulary of {vocab}: the shards were built \
             with a larger tokenizer than the model's embeddings (resize them, e.g. to 128320)"
        )));
    }
    let ids: Vec<i64> = b.input_ids.iter().map(|&x| i64::from(x)).collect();
    let labels: Vec<i64> = b.labels.iter().map(|&x| i64::from(x)).collect();
    let mut images = Vec::with_capacity(b.images.len());
    for im in &b.images {
        let meta = ImageMeta {
            orig_size: (im.width as usize, im.height as usize),
            grid: (im.grid_cols as usize, im.grid_rows as usize),
            num_tiles: im.num_tiles as usize,
        };
        let n = cfg.image_token_count(&meta)?;
        if n != im.image_tokens as usize {
            return Err(Error::Mismatch(format!(
                "an image of sample {} takes {} tokens in the shards and {n} in the model: the \
                 shards were built for another merge type or vision geometry",
                im.sample, im.image_tokens
            )));
        }
        images.push(meta);
    }
    let s = b.tile_size;
    let pixel_values = if b.num_tiles == 0 {
        None
    } else {
        let t = match &b.pixels {
            Pixels::F32(v) => Tensor::from_slice(v, (b.num_tiles, 3, s, s), dev)?,
            Pixels::U8(v) => {
                // Same normalisation as the loader's f32 path, done on the device.
                let x = Tensor::from_slice(v, (b.num_tiles, 3, s, s), dev)?.to_dtype(DType::F32)?;
                let mean = Tensor::new(&llava_formats::constants::CLIP_MEAN, dev)?
                    .reshape((1, 3, 1, 1))?;
                let std =
                    Tensor::new(&llava_formats::constants::CLIP_STD, dev)?.reshape((1, 3, 1, 1))?;
                (x / 255.0)?.broadcast_sub(&mean)?.broadcast_div(&std)?
            }
        };
        Some(t)
    };
    Ok(Batch {
        input_ids: Tensor::from_vec(ids, (rows, l), dev)?,
        labels: Some(Tensor::from_vec(labels, (rows, l), dev)?),
        lengths: b.lengths.clone(),
        pixel_values,
        images,
    })
}

/// What to do after a step (test hook and Ctrl-C).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Continue,
    /// Write a checkpoint and stop (Ctrl-C).
    Stop,
    /// Stop at once without a checkpoint (a kill).
    Abort,
}

/// Run-time options that are not part of the configuration.
#[derive(Default)]
pub struct RunOptions {
    /// Set by the first Ctrl-C: finish the step, checkpoint, return.
    pub stop: Option<Arc<AtomicBool>>,
    /// Called after every optimizer step with its number (1-based).
    pub after_step: Option<Box<dyn FnMut(u64) -> Control>>,
    /// indicatif progress bar (only on a terminal).
    pub progress: bool,
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

#[derive(Debug, Clone)]
pub struct Summary {
    pub steps_done: u64,
    pub total_steps: u64,
    /// Every step of this process (not only logged ones).
    pub history: Vec<StepLog>,
    pub last_checkpoint: Option<PathBuf>,
    pub interrupted: bool,
    pub resumed_from: Option<PathBuf>,
}

/// Micro-batches across epochs from a data state, in groups of `accum` from one epoch.
struct Stream {
    index: Arc<ShardIndex>,
    plan: PlanConfig,
    loader_cfg: LoaderConfig,
    state: DataState,
    loader: Option<Loader>,
    left: usize,
    accum: usize,
}

impl Stream {
    fn open_epoch(&mut self) -> Result<()> {
        let plan = EpochPlan::new(&self.index, &self.plan, &self.state)?;
        let batches = plan.rank(0)?;
        self.left = batches.len();
        self.loader = Some(Loader::new(self.index.clone(), batches, &self.loader_cfg)?);
        Ok(())
    }

    /// The next `accum` micro-batches, and the time spent waiting for them.
    fn next_group(&mut self) -> Result<(Vec<data::Batch>, Duration)> {
        let mut wait = Duration::ZERO;
        if self.loader.is_none() {
            self.open_epoch()?;
        }
        if self.left < self.accum {
            // Drop the epoch's remainder; the next epoch starts fresh.
            self.state = DataState::new(self.state.epoch + 1);
            self.loader = None;
            self.open_epoch()?;
            if self.left < self.accum {
                return Err(Error::Config(format!(
                    "an epoch has {} batches, fewer than grad_accum {}",
                    self.left, self.accum
                )));
            }
        }
        let loader = self
            .loader
            .as_mut()
            .ok_or_else(|| Error::Config("no loader".into()))?;
        let mut out = Vec::with_capacity(self.accum);
        for _ in 0..self.accum {
            let t = Instant::now();
            let b = loader
                .next()
                .ok_or_else(|| Error::Config("the loader ended early".into()))??;
            wait += t.elapsed();
            self.left -= 1;
            self.state = b.next_state;
            out.push(b);
        }
        if self.left == 0 {
            self.loader = None;
        }
        Ok((out, wait))
    }
}

/// Micro-batches per epoch with a fresh plan.
fn batches_per_epoch(index: &ShardIndex, plan: &PlanConfig) -> Result<usize> {
    Ok(EpochPlan::new(index, plan, &DataState::new(0))?.num_steps())
}

/// Trains as `cfg` says; resumes from the latest checkpoint in `output` unless told otherwise.
pub fn run(cfg: &TrainConfig, opts: RunOptions) -> Result<Summary> {
    let mut opts = opts;
    let dev = opts.device.clone().unwrap_or(Device::Cpu);
    let dtype = if cfg.bf16 { DType::BF16 } else { DType::F32 };
    let parts = TunableParts::parse(&cfg.tunable_parts)?;
    if cfg.grad_accum == 0 || cfg.log_every == 0 || cfg.workers == 0 {
        return Err(Error::Config(
            "grad_accum, log_every and workers must be at least 1".into(),
        ));
    }
    let index = ShardIndex::open(&cfg.shards, &IndexOptions::default())?;
    let (mut model_cfg, varmap) = init::load_source(&cfg.source, cfg.seed, dtype, &dev)?;
    if let Some(m) = cfg.merge_type {
        model_cfg.mm_patch_merge_type = m;
    }
    if model_cfg.tokenizer_model_max_length.is_none() {
        model_cfg.tokenizer_model_max_length = Some(index.manifest.settings.model_max_length);
    }
    check_compatible(&index, &model_cfg, cfg.tokenizer.as_deref())?;

    let plan_cfg = PlanConfig {
        seed: cfg.seed,
        world_size: 1,
        batch_size: cfg.batch_size,
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
    let mut resumed_state: Option<(TrainerState, HashMap<String, Tensor>)> = None;
    if let Some(dir) = &resume {
        checkpoint::check_is_checkpoint(dir)?;
        let (state, tensors) = checkpoint::load_state(dir)?;
        if state.config != cfg.trajectory_keys() {
            return Err(Error::Checkpoint {
                path: dir.clone(),
                msg: format!(
                    "written with other settings: {} (this run: {}); use --no-resume or \
                     another --output",
                    state.config,
                    cfg.trajectory_keys()
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
            .map_err(|_| Error::Config("VarMap lock poisoned".into()))?;
        for (name, var) in data.iter() {
            let t = weights.get(name).ok_or_else(|| Error::MissingTensor {
                name: name.clone(),
                searched: dir.join("model.safetensors").display().to_string(),
            })?;
            var.set(&t.to_dtype(var.dtype())?)?;
        }
        drop(data);
        resumed_state = Some((state, tensors));
    }

    let (model, trainable) = init::build_model(&model_cfg, &varmap, &|n| parts.is_trainable(n))?;
    let names: Vec<String> = trainable.iter().map(|(n, _)| n.clone()).collect();
    let vars: HashMap<String, Var> = trainable.iter().cloned().collect();
    let mut optim = AdamW::new(
        AdamWConfig {
            lr: cfg.lr,
            vision_tower_lr: cfg.vision_tower_lr,
            weight_decay: cfg.weight_decay,
            max_grad_norm: Some(cfg.max_grad_norm),
            ..AdamWConfig::default()
        },
        trainable,
    )?;
    let mut data_state = DataState::new(0);
    let mut step = 0u64;
    if let Some((state, tensors)) = resumed_state {
        if state.trainable != names {
            return Err(Error::Checkpoint {
                path: resume.clone().unwrap_or_default(),
                msg: "other trainable parameters".into(),
            });
        }
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
    truncate_log(&log_path, step)?;
    let tokenizer_dir = cfg.source.model.clone().or_else(|| cfg.source.llm.clone());
    let mut stream = Stream {
        index: index.clone(),
        plan: plan_cfg,
        loader_cfg: LoaderConfig {
            workers: cfg.workers,
            prefetch: cfg.workers.max(2),
            pixels: PixelFormat::F32,
        },
        state: data_state,
        loader: None,
        left: 0,
        accum: cfg.grad_accum,
    };
    let bar = (opts.progress && std::io::IsTerminal::is_terminal(&std::io::stderr())).then(|| {
        let b = indicatif::ProgressBar::new(total_steps);
        b.set_position(step);
        b
    });
    let n_params: usize = optim.params.iter().map(|p| p.var.elem_count()).sum();
    tracing::info!(
        "training {} tensors ({n_params} parameters) for {total_steps} steps ({per_epoch} per \
         epoch), warmup {}",
        names.len(),
        schedule.warmup_steps
    );
    let save = |optim: &AdamW, step: u64, data_state: DataState, lr: f64, loss: f64| {
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
            config: cfg.trajectory_keys(),
            trainable: names.clone(),
        };
        let dir = checkpoint::save_checkpoint(
            &cfg.output,
            &model_cfg,
            &varmap,
            &state,
            optim.state_tensors(),
            tokenizer_dir.as_deref(),
            parts.projector_only(),
        )?;
        if let Some(keep) = cfg.save_total_limit {
            checkpoint::apply_keep_limit(&cfg.output, keep.max(1))?;
        }
        tracing::info!("saved {}", dir.display());
        Ok::<PathBuf, Error>(dir)
    };

    let mut summary = Summary {
        steps_done: step,
        total_steps,
        history: Vec::new(),
        last_checkpoint: None,
        interrupted: false,
        resumed_from: resume.clone(),
    };
    let mut last_saved = step;
    let (mut lr, mut loss_v) = (0.0, f64::NAN);
    while step < total_steps {
        let t0 = Instant::now();
        let (group, wait) = stream.next_group()?;
        let mut grads: HashMap<String, Tensor> = HashMap::new();
        let (mut loss_sum, mut tokens, mut samples) = (0f64, 0u64, 0usize);
        for b in &group {
            tokens += b.tokens;
            samples += b.batch_size();
            if b.is_empty() {
                continue;
            }
            let batch = to_model_batch(b, &model_cfg, &dev)?;
            let out = model.forward_loss(&batch)?;
            loss_sum += f64::from(out.loss.to_dtype(DType::F32)?.to_scalar::<f32>()?);
            let scaled = if cfg.grad_accum > 1 {
                (&out.loss / cfg.grad_accum as f64)?
            } else {
                out.loss
            };
            let store = scaled.backward()?;
            for (name, var) in &vars {
                if let Some(g) = store.get(var.as_tensor()) {
                    let g = g.to_dtype(DType::F32)?;
                    let acc = match grads.remove(name) {
                        Some(a) => (a + g)?,
                        None => g,
                    };
                    grads.insert(name.clone(), acc);
                }
            }
        }
        loss_v = loss_sum / group.len() as f64;
        let mult = schedule.multiplier(step);
        lr = cfg.lr * mult;
        let stats = optim.step(&grads, mult)?;
        step += 1;
        data_state = stream.state;
        let dt = t0.elapsed().as_secs_f64();
        let per_epoch_f = (per_epoch * cfg.grad_accum).max(1) as f64;
        let entry = StepLog {
            step,
            epoch: data_state.epoch as f64 + data_state.position as f64 / per_epoch_f,
            loss: loss_v,
            lr,
            grad_norm: stats.grad_norm,
            tokens_per_s: tokens as f64 / dt,
            samples_per_s: samples as f64 / dt,
            data_wait_s: wait.as_secs_f64(),
            step_s: dt,
        };
        if step.is_multiple_of(cfg.log_every) || step == total_steps {
            let line =
                format!(
                "step {step}/{total_steps} loss {:.4} lr {:.3e} grad_norm {:.3} tokens/s {:.0} \
                 samples/s {:.2} data_wait {:.3}s",
                entry.loss, entry.lr, entry.grad_norm, entry.tokens_per_s, entry.samples_per_s,
                entry.data_wait_s
            );
            match &bar {
                Some(b) => b.println(&line),
                None => println!("{line}"),
            }
            append_log(&log_path, &entry)?;
        }
        if let Some(b) = &bar {
            b.set_position(step);
        }
        summary.history.push(entry);
        summary.steps_done = step;
        let mut control = match opts.after_step.as_mut() {
            Some(f) => f(step),
            None => Control::Continue,
        };
        if opts.stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst)) {
            control = Control::Stop;
        }
        if control == Control::Abort {
            summary.interrupted = true;
            return Ok(summary);
        }
        let periodic = cfg
            .save_every
            .is_some_and(|n| n > 0 && step.is_multiple_of(n));
        if periodic || control == Control::Stop || step == total_steps {
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
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    if parts.projector_only() && !summary.interrupted {
        checkpoint::save_projector(&varmap, &cfg.output.join(checkpoint::PROJECTOR_FILE))?;
    }
    Ok(summary)
}

fn append_log(path: &Path, entry: &StepLog) -> Result<()> {
    let io = |source| Error::Io {
        path: path.into(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io)?;
    let line = serde_json::to_string(entry).map_err(|e| Error::Config(e.to_string()))?;
    writeln!(f, "{line}").map_err(io)
}

/// Drops log lines of steps after `step` (a killed run's steps that a resume redoes).
fn truncate_log(path: &Path, step: u64) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| serde_json::from_str::<StepLog>(l).is_ok_and(|e| e.step <= step))
        .collect();
    let mut out = kept.join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    std::fs::write(path, out).map_err(|source| Error::Io {
        path: path.into(),
        source,
    })
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
