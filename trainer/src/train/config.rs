//! `train.toml`: the run's settings, and the tunable parts they name.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

use crate::io::init::ModelSource;
use crate::model::config::MergeType;
use crate::{Error, Result};
use llava_loader::OnCorrupt;

/// Keys that hold paths: in a train.toml they are relative to the file (as in datasets.toml);
/// as flags, to the current directory.
pub const PATH_KEYS: [&str; 11] = [
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

/// Makes a train.toml's paths (the [`PATH_KEYS`]) relative to `base`, the file's folder, as
/// `llava-trainer run --config` reads them. `s3://bucket/prefix` is a location, not a path
/// relative to the file: it stays as it is.
pub fn resolve_paths(table: &mut toml::Table, base: &Path) {
    for key in PATH_KEYS {
        if let Some(toml::Value::String(s)) = table.get_mut(key) {
            if !llava_formats::config::is_url(Path::new(s.as_str())) {
                *s = base.join(&*s).display().to_string();
            }
        }
    }
}

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
    /// `bf16` or `f32`; unset: bf16 on CUDA, f32 on the CPU (see [`Self::resolve_precision`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precision: Option<String>,
    /// Recompute each layer in the backward instead of keeping every activation (memory
    /// O(layers · s · h) instead of O(layers · s · h · 34)); same gradients.
    #[serde(default = "defaults::yes")]
    pub gradient_checkpointing: bool,
    /// Decoder attention: `blockwise` (default, memory O(s · block)), `blockwise:N` or `dense`.
    #[serde(default = "defaults::attention")]
    pub attention: String,
    /// Rows of `lm_head` logits per loss chunk (memory rows × vocab × 4 bytes).
    #[serde(default = "defaults::loss_chunk")]
    pub loss_chunk: usize,
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
    /// Data parallelism: 0 all-reduces gradients and every rank steps everything; 1 shards the
    /// optimizer state (f32 master weights and moments) over the ranks; 2 also the gradients.
    #[serde(default)]
    pub zero_stage: u8,
    /// Train even when the memory plan says the run does not fit the device.
    #[serde(default)]
    pub skip_memory_check: bool,
    /// Pack each micro-batch's samples into rows of at most `pack_length` tokens (balanced first-fit
    /// decreasing): no padding between samples, attention and positions per sample, same loss
    /// and gradients. Not a trajectory key: it may change on resume.
    #[serde(default)]
    pub packing: bool,
    /// Row capacity when packing (default: the shards' `model_max_length`).
    #[serde(default)]
    pub pack_length: Option<u32>,
    /// Pack across batch boundaries (implies `packing`): each micro-batch is one row of up to
    /// `pack_length` tokens of one modality (the epoch's last rows, of the pooled leftovers, may
    /// mix), filled from the following groups (fewer, fuller steps; docs/training.md). Changes the steps per epoch: a trajectory key.
    #[serde(default)]
    pub pack_across_batches: bool,
    /// A held-out `llava-data build` folder: its mean loss and supervised token count (no
    /// gradient) every `eval_every` steps and at the end, to log.jsonl, the terminal and
    /// TensorBoard.
    #[serde(default)]
    pub eval_shards: Option<PathBuf>,
    /// Evaluate on `eval_shards` every N optimizer steps (default: only at the end).
    #[serde(default)]
    pub eval_every: Option<u64>,
    /// Also write TensorBoard event files (scalars: loss, lr, grad_norm, tokens/s, eval loss;
    /// `eval_prompts` answers as text) into this folder.
    #[serde(default)]
    pub tensorboard: Option<PathBuf>,
    /// A sample whose row checksum does not match its bytes (a changed shard): `stop` the run
    /// with an error naming the shard, row group, row and sample (default), or `skip` it (left
    /// out of its batch; a warning each, counted at the end and in log.jsonl).
    #[serde(default)]
    pub on_corrupt: OnCorrupt,
    /// A JSONL of prompts (`generate --input`'s format: `{"id", "prompt", "images"}`, image
    /// paths relative to the file) that rank 0 answers greedily every `eval_generate_every`
    /// steps and at the end: to the log, log.jsonl and TensorBoard (text).
    #[serde(default)]
    pub eval_prompts: Option<PathBuf>,
    /// Answer `eval_prompts` every N optimizer steps (default: only at the end).
    #[serde(default)]
    pub eval_generate_every: Option<u64>,
    /// Most new tokens per `eval_prompts` answer (the stop token included).
    #[serde(default = "defaults::eval_max_new_tokens")]
    pub eval_max_new_tokens: usize,
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
    pub fn yes() -> bool {
        true
    }
    pub fn attention() -> String {
        "blockwise".into()
    }
    pub fn eval_max_new_tokens() -> usize {
        64
    }
    pub fn loss_chunk() -> usize {
        crate::model::llava_next::DEFAULT_LOSS_CHUNK
    }
}

impl TrainConfig {
    /// A config with defaults for everything but the paths.
    pub fn new(shards: PathBuf, model: PathBuf, output: PathBuf) -> Self {
        let v = serde_json::json!({"shards": shards, "model": model, "output": output});
        serde_json::from_value(v).unwrap_or_else(|_| unreachable!("every other key has a default"))
    }

    /// Fixes `bf16` for the device: `precision` when set, else bf16 on CUDA (the recipe's
    /// `--bf16 True --tf32 True`) and f32 on the CPU (where bf16 matmuls are ~4x slower).
    /// Returns the description the run logs.
    pub fn resolve_precision(&mut self, cuda: bool) -> &'static str {
        self.bf16 = match self.precision.as_deref() {
            Some("bf16") => true,
            Some(_) => false,
            None => self.bf16 || cuda,
        };
        match (self.bf16, cuda) {
            (true, true) => {
                "bf16 weights and activations, f32 master weights and moments, TF32 f32 matmuls"
            }
            (true, false) => "bf16 weights and activations, f32 master weights and moments",
            (false, _) => "f32",
        }
    }

    /// Every key a `train.toml` may hold.
    pub fn keys() -> Vec<String> {
        let c = Self::new(PathBuf::new(), PathBuf::new(), PathBuf::new());
        match serde_json::to_value(&c) {
            Ok(serde_json::Value::Object(m)) => m.keys().cloned().collect(),
            _ => Vec::new(),
        }
    }

    /// Checks the values that deserialization accepts but a run cannot use; the error names the
    /// key.
    pub fn validate(&self) -> std::result::Result<(), (&'static str, String)> {
        TunableParts::parse(&self.tunable_parts).map_err(|e| {
            let m = match e {
                Error::Config(m) => m,
                e => e.to_string(),
            };
            ("tunable_parts", m)
        })?;
        self.attention
            .parse::<crate::model::attention::AttentionKind>()
            .map_err(|e| {
                (
                    "attention",
                    format!("{e}: use blockwise, blockwise:N or dense"),
                )
            })?;
        match self.precision.as_deref() {
            None | Some("bf16") => {}
            Some("f32") if !self.bf16 => {}
            Some("f32") => return Err(("precision", "f32 contradicts bf16 = true".into())),
            Some(p) => return Err(("precision", format!("{p:?}: use bf16 or f32"))),
        }
        for (key, v) in [
            ("grad_accum", self.grad_accum as u64),
            ("log_every", self.log_every),
            ("workers", self.workers as u64),
            ("loss_chunk", self.loss_chunk as u64),
            ("epochs", self.epochs),
        ] {
            if v == 0 {
                return Err((key, "must be at least 1".into()));
            }
        }
        if self.eval_every == Some(0) {
            return Err((
                "eval_every",
                "must be at least 1 (omit it to evaluate only at the end)".into(),
            ));
        }
        if self.eval_every.is_some() && self.eval_shards.is_none() {
            return Err((
                "eval_every",
                "needs eval_shards (a held-out `llava-data build` folder)".into(),
            ));
        }
        if self.eval_generate_every == Some(0) {
            return Err((
                "eval_generate_every",
                "must be at least 1 (omit it to generate only at the end)".into(),
            ));
        }
        if self.eval_generate_every.is_some() && self.eval_prompts.is_none() {
            return Err((
                "eval_generate_every",
                "needs eval_prompts (a JSONL of prompts)".into(),
            ));
        }
        if self.eval_max_new_tokens == 0 {
            return Err(("eval_max_new_tokens", "must be at least 1".into()));
        }
        if let Some(p) = &self.eval_prompts {
            // Every line checked before any weights are read.
            crate::generate::input::read_input(p).map_err(|e| {
                let m = match e {
                    Error::Config(m) => m,
                    e => e.to_string(),
                };
                ("eval_prompts", m)
            })?;
        }
        if self.zero_stage > 2 {
            return Err((
                "zero_stage",
                format!("{} is not 0, 1 or 2", self.zero_stage),
            ));
        }
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            return Err(("lr", "must be a finite number >= 0".into()));
        }
        if !(0.0..=1.0).contains(&self.warmup_ratio) {
            return Err(("warmup_ratio", "must be in [0, 1]".into()));
        }
        Ok(())
    }

    /// Keys that change the trajectory: a resume must match them.
    /// With `world_size` ranks: the micro-batches per optimizer step (world × grad_accum)
    /// replace grad_accum, so a run resumes on another world size with the same global batch.
    pub(crate) fn trajectory_keys_at(&self, world_size: usize) -> serde_json::Value {
        let mut v = self.trajectory_keys();
        if let Some(m) = v.as_object_mut() {
            m.remove("grad_accum");
            m.insert(
                "micro_batches_per_step".into(),
                (self.grad_accum * world_size.max(1)).into(),
            );
        }
        v
    }

    pub(crate) fn trajectory_keys(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "tunable_parts": self.tunable_parts, "lr": self.lr,
            "vision_tower_lr": self.vision_tower_lr, "weight_decay": self.weight_decay,
            "warmup_ratio": self.warmup_ratio, "max_grad_norm": self.max_grad_norm,
            "batch_size": self.batch_size, "grad_accum": self.grad_accum, "epochs": self.epochs,
            "max_steps": self.max_steps, "seed": self.seed, "bf16": self.bf16,
        });
        // Only when on, so that checkpoints from before the key still resume.
        if self.pack_across_batches {
            if let Some(m) = v.as_object_mut() {
                m.insert("pack_across_batches".into(), self.pack_length.into());
            }
        }
        v
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

#[cfg(test)]
mod precision_tests {
    use super::*;

    #[test]
    fn precision_defaults_to_bf16_on_cuda_and_f32_on_the_cpu() {
        let mut c = TrainConfig::new("s".into(), "m".into(), "o".into());
        assert_eq!(c.resolve_precision(false), "f32");
        assert!(!c.bf16);
        assert!(c.resolve_precision(true).contains("TF32"));
        assert!(c.bf16);
        let mut c = TrainConfig::new("s".into(), "m".into(), "o".into());
        c.precision = Some("f32".into());
        assert_eq!(c.resolve_precision(true), "f32");
        c.precision = Some("bf16".into());
        assert!(c.resolve_precision(false).starts_with("bf16"));
        c.precision = Some("f16".into());
        assert_eq!(c.validate().unwrap_err().0, "precision");
        c.precision = Some("f32".into());
        c.bf16 = true;
        assert_eq!(c.validate().unwrap_err().0, "precision");
    }
}
