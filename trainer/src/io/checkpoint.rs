//! Checkpoints: `checkpoint-<step>/` with the model in HF's `LlavaNextForConditionalGeneration`
//! legacy layout (spec §8.2–8.4: `model.safetensors`, `config.json`, `preprocessor_config.json`,
//! `processor_config.json`) plus the trainer state for an exact resume
//! (`trainer_state.json` + `trainer_state.safetensors`: optimizer moments and f32 master weights).
//!
//! A checkpoint is written into `checkpoint-<step>.tmp` and renamed, so a kill while saving
//! leaves either no checkpoint or a complete one.
//!
//! ZeRO-1/2 with several ranks: no rank ever holds the whole optimizer state. Each rank writes
//! the moments (and f32 master weights) it owns to `optimizer-rank<r>-of-<world>.safetensors`,
//! and `optimizer_index.json` maps every tensor to its file (instead of
//! `trainer_state.safetensors`). A resume at any world size reads, through memory maps, only
//! the tensors its rank owns now ([`load_optimizer_for`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use candle_nn::VarMap;
use llava_formats::constants::{CLIP_MEAN_F64, CLIP_STD_F64};
use serde::{Deserialize, Serialize};

use super::{json_file, weights};
use crate::model::config::{LlavaNextConfig, PROJECTOR_PREFIX};
use crate::{Error, Result};
use llava_loader::DataState;

pub const STATE_JSON: &str = "trainer_state.json";
pub const STATE_TENSORS: &str = "trainer_state.safetensors";
pub const PROJECTOR_FILE: &str = "mm_projector.safetensors";
/// Which shard file holds each optimizer tensor, for a checkpoint written by ZeRO ranks.
pub const OPTIMIZER_INDEX: &str = "optimizer_index.json";

/// `optimizer_index.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OptimizerIndex {
    /// Ranks (and shard files) that wrote the state.
    pub world_size: usize,
    pub zero_stage: u8,
    /// Tensor name (`m.<param>`, `v.<param>`, `master.<param>`) → shard file name.
    pub weight_map: std::collections::BTreeMap<String, String>,
}

/// The optimizer shard file of `rank` in a world of `world`.
pub fn optimizer_shard_name(rank: usize, world: usize) -> String {
    format!("optimizer-rank{rank:05}-of-{world:05}.safetensors")
}
fn ck_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: path.into(),
        msg: msg.into(),
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.into(),
        source,
    }
}

/// `config.json` of HF `LlavaNextForConditionalGeneration`. `cfg.image_grid_pinpoints` is
/// already in HF's (h, w) order.
pub fn hf_config(cfg: &LlavaNextConfig, dtype: DType) -> Result<serde_json::Value> {
    let mut v = serde_json::to_value(cfg).map_err(|source| Error::Serialize {
        what: "the model config",
        source,
    })?;
    let dtype = if dtype == DType::BF16 {
        "bfloat16"
    } else {
        "float32"
    };
    let o = v
        .as_object_mut()
        .ok_or_else(|| Error::Config("config is not an object".into()))?;
    o.insert(
        "architectures".into(),
        serde_json::json!(["LlavaNextForConditionalGeneration"]),
    );
    o.insert("model_type".into(), "llava_next".into());
    o.insert("torch_dtype".into(), dtype.into());
    o.insert("image_seq_length".into(), cfg.tokens_per_tile().into());
    o.insert("tie_word_embeddings".into(), false.into());
    o.insert("use_image_newline_parameter".into(), true.into());
    if let Some(t) = o.get_mut("text_config").and_then(|t| t.as_object_mut()) {
        t.insert("model_type".into(), "llama".into());
        t.insert(
            "architectures".into(),
            serde_json::json!(["LlamaForCausalLM"]),
        );
        t.insert("torch_dtype".into(), dtype.into());
    }
    if let Some(t) = o.get_mut("vision_config").and_then(|t| t.as_object_mut()) {
        t.insert("model_type".into(), "clip_vision_model".into());
        t.insert("projection_dim".into(), 768.into());
    }
    Ok(v)
}

/// `preprocessor_config.json` (HF `LlavaNextImageProcessor`) for the model's tile size.
pub fn preprocessor_config(cfg: &LlavaNextConfig) -> serde_json::Value {
    let s = cfg.vision_config.image_size;
    serde_json::json!({
        "image_processor_type": "LlavaNextImageProcessor",
        "processor_class": "LlavaNextProcessor",
        "do_resize": true,
        "size": {"shortest_edge": s},
        "do_center_crop": true,
        "crop_size": {"height": s, "width": s},
        "resample": 3,
        "do_rescale": true,
        "rescale_factor": 1.0 / 255.0,
        "do_normalize": true,
        "image_mean": CLIP_MEAN_F64,
        "image_std": CLIP_STD_F64,
        "do_pad": true,
        "do_convert_rgb": true,
        "image_grid_pinpoints": cfg.image_grid_pinpoints,
    })
}

/// `processor_config.json` (HF `LlavaNextProcessor`).
pub fn processor_config(cfg: &LlavaNextConfig) -> serde_json::Value {
    serde_json::json!({
        "processor_class": "LlavaNextProcessor",
        "image_token": "<image>",
        "num_additional_image_tokens": 1,
        "patch_size": cfg.vision_config.patch_size,
        "vision_feature_select_strategy": cfg.vision_feature_select_strategy,
    })
}

/// Writes an HF-loadable model directory (weights, config, processor files; when
/// `tokenizer_dir` has a `tokenizer.json`, the tokenizer files with `<image>`, `<pad>` and the
/// chat template that HF's processor needs, see [`crate::io::hf_tokenizer`]).
pub fn save_hf_model(
    dir: &Path,
    cfg: &LlavaNextConfig,
    varmap: &VarMap,
    tokenizer_dir: Option<&Path>,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let dtype = varmap.all_vars().first().map_or(DType::F32, |v| v.dtype());
    weights::save(varmap, &dir.join("model.safetensors"))?;
    json_file::write(&dir.join("config.json"), &hf_config(cfg, dtype)?)?;
    json_file::write(
        &dir.join("preprocessor_config.json"),
        &preprocessor_config(cfg),
    )?;
    json_file::write(&dir.join("processor_config.json"), &processor_config(cfg))?;
    if let Some(src) = tokenizer_dir {
        let image_id = u32::try_from(cfg.image_token_index).map_err(|_| {
            ck_err(
                dir,
                format!(
                    "image_token_index {} is not a token id",
                    cfg.image_token_index
                ),
            )
        })?;
        crate::io::hf_tokenizer::write_tokenizer_files(
            src,
            dir,
            image_id,
            cfg.text_config.vocab_size,
        )?;
    }
    Ok(())
}

/// The projector under the reference's names (`model.mm_projector.{0,2}.{weight,bias}`), what
/// stage 2 loads with `--projector` (and the original code with `--pretrain_mm_mlp_adapter`).
pub fn save_projector(varmap: &VarMap, path: &Path) -> Result<()> {
    let data = varmap
        .data()
        .lock()
        .map_err(|_| Error::Poisoned("VarMap"))?;
    let mut out = HashMap::new();
    for (name, var) in data.iter() {
        let Some(rest) = name.strip_prefix(&format!("{PROJECTOR_PREFIX}.")) else {
            continue;
        };
        let key = rest
            .replacen("linear_1.", "model.mm_projector.0.", 1)
            .replacen("linear_2.", "model.mm_projector.2.", 1);
        out.insert(key, var.as_tensor().clone());
    }
    candle_core::safetensors::save(&out, path).map_err(|source| Error::Write {
        path: path.into(),
        source,
    })
}

/// Everything but the tensors that a resume needs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    /// Optimizer steps taken.
    pub global_step: u64,
    pub total_steps: u64,
    /// Data position after the last micro-batch of `global_step`.
    pub data_state: DataState,
    /// Epochs done, fractional (for logs).
    pub epoch: f64,
    /// The run's seed: the only randomness after initialisation is the data order, a pure
    /// function of (seed, epoch, data_state); nothing else draws random numbers while training.
    pub seed: u64,
    pub lr: f64,
    pub last_loss: f64,
    /// `manifest.tokenizer_sha256` and `config_sha256` of the shards trained on.
    pub shards_tokenizer_sha256: String,
    pub shards_config_sha256: String,
    /// The run configuration (what a resume compares with).
    pub config: serde_json::Value,
    /// Trainable parameters, sorted (the optimizer state's order).
    pub trainable: Vec<String>,
}

/// A saved checkpoint's trainer state alone (without reading the optimizer's tensors).
pub fn load_state_json(dir: &Path) -> Result<TrainerState> {
    let p = dir.join(STATE_JSON);
    let text = std::fs::read_to_string(&p).map_err(io(&p))?;
    serde_json::from_str(&text).map_err(|source| Error::Json { path: p, source })
}

/// A saved checkpoint's trainer state and the tensors of the optimizer.
pub fn load_state(dir: &Path) -> Result<(TrainerState, HashMap<String, Tensor>)> {
    let p = dir.join(STATE_JSON);
    let text = std::fs::read_to_string(&p).map_err(io(&p))?;
    let state: TrainerState =
        serde_json::from_str(&text).map_err(|source| Error::Json { path: p, source })?;
    let t = dir.join(STATE_TENSORS);
    let tensors = candle_core::safetensors::load(&t, &candle_core::Device::Cpu)
        .map_err(|source| Error::Read { path: t, source })?;
    Ok((state, tensors))
}

/// The optimizer state of a checkpoint being written.
pub enum OptimizerTensors {
    /// Every tensor, in this process: one `trainer_state.safetensors`.
    Whole(HashMap<String, Tensor>),
    /// Already written by the ranks with [`write_optimizer_shard`]; this is their index.
    Sharded(OptimizerIndex),
}

/// `out/checkpoint-<step>.tmp`, where a checkpoint is written before its rename.
pub fn checkpoint_tmp(out: &Path, step: u64) -> PathBuf {
    out.join(format!("checkpoint-{step}.tmp"))
}

/// Rank 0, before any rank writes its shard: an empty `checkpoint-<step>.tmp` (a stale one of
/// an interrupted save is removed).
pub fn prepare_checkpoint_tmp(out: &Path, step: u64) -> Result<PathBuf> {
    let tmp = checkpoint_tmp(out, step);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    Ok(tmp)
}

/// One rank's part of the optimizer state, into the checkpoint folder being written.
pub fn write_optimizer_shard(
    tmp: &Path,
    rank: usize,
    world: usize,
    tensors: &HashMap<String, Tensor>,
) -> Result<()> {
    let p = tmp.join(optimizer_shard_name(rank, world));
    candle_core::safetensors::save(tensors, &p).map_err(|source| Error::Write { path: p, source })
}

/// Writes `out/checkpoint-<step>/` atomically and returns its path.
#[allow(clippy::too_many_arguments)]
pub fn save_checkpoint(
    out: &Path,
    cfg: &LlavaNextConfig,
    varmap: &VarMap,
    state: &TrainerState,
    optimizer: HashMap<String, Tensor>,
    tokenizer_dir: Option<&Path>,
    with_projector: bool,
) -> Result<PathBuf> {
    save_checkpoint_with(
        out,
        cfg,
        varmap,
        state,
        OptimizerTensors::Whole(optimizer),
        tokenizer_dir,
        with_projector,
    )
}

/// [`save_checkpoint`] with the optimizer state whole or already written in shards (whose
/// `.tmp` folder must then exist, see [`prepare_checkpoint_tmp`]).
#[allow(clippy::too_many_arguments)]
pub fn save_checkpoint_with(
    out: &Path,
    cfg: &LlavaNextConfig,
    varmap: &VarMap,
    state: &TrainerState,
    optimizer: OptimizerTensors,
    tokenizer_dir: Option<&Path>,
    with_projector: bool,
) -> Result<PathBuf> {
    let name = format!("checkpoint-{}", state.global_step);
    let final_dir = out.join(&name);
    let tmp = checkpoint_tmp(out, state.global_step);
    match &optimizer {
        OptimizerTensors::Whole(_) => {
            if tmp.exists() {
                std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
            }
        }
        OptimizerTensors::Sharded(index) => {
            for f in index.weight_map.values() {
                if !tmp.join(f).is_file() {
                    return Err(ck_err(&tmp, format!("optimizer shard {f} was not written")));
                }
            }
        }
    }
    save_hf_model(&tmp, cfg, varmap, tokenizer_dir)?;
    if with_projector {
        save_projector(varmap, &tmp.join(PROJECTOR_FILE))?;
    }
    match optimizer {
        OptimizerTensors::Whole(t) => {
            let st = tmp.join(STATE_TENSORS);
            candle_core::safetensors::save(&t, &st).map_err(|source| Error::Write {
                path: st.clone(),
                source,
            })?;
        }
        OptimizerTensors::Sharded(index) => json_file::write(&tmp.join(OPTIMIZER_INDEX), &index)?,
    }
    // The JSON last: its presence marks a complete checkpoint.
    json_file::write(&tmp.join(STATE_JSON), state)?;
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).map_err(io(&final_dir))?;
    }
    std::fs::rename(&tmp, &final_dir).map_err(io(&final_dir))?;
    Ok(final_dir)
}

/// Complete checkpoints in `out`, by step (ascending).
pub fn list_checkpoints(out: &Path) -> Vec<(u64, PathBuf)> {
    let Ok(rd) = std::fs::read_dir(out) else {
        return Vec::new();
    };
    let mut v: Vec<(u64, PathBuf)> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let step = name.strip_prefix("checkpoint-")?.parse::<u64>().ok()?;
            let p = e.path();
            p.join(STATE_JSON).is_file().then_some((step, p))
        })
        .collect();
    v.sort();
    v
}

/// Deletes the oldest checkpoints beyond `keep`.
pub fn apply_keep_limit(out: &Path, keep: usize) -> Result<Vec<PathBuf>> {
    let all = list_checkpoints(out);
    let mut removed = Vec::new();
    if all.len() > keep {
        for (_, p) in &all[..all.len() - keep] {
            std::fs::remove_dir_all(p).map_err(io(p))?;
            removed.push(p.clone());
        }
    }
    Ok(removed)
}

/// The optimizer tensors of checkpoint `dir` whose names pass `keep`, read through memory maps
/// (a rank reads only what it owns, whether the checkpoint is whole or in ZeRO shards, written
/// at any world size). Tensors come back on the CPU.
pub fn load_optimizer_for(
    dir: &Path,
    keep: &dyn Fn(&str) -> bool,
) -> Result<HashMap<String, Tensor>> {
    let cpu = candle_core::Device::Cpu;
    let open = |p: &Path| {
        // SAFETY: checkpoint files are written once and renamed into place; nothing writes
        // them while a run reads them.
        unsafe { candle_core::safetensors::MmapedSafetensors::new(p) }.map_err(|source| {
            Error::Read {
                path: p.to_path_buf(),
                source,
            }
        })
    };
    let mut out = HashMap::new();
    let index_path = dir.join(OPTIMIZER_INDEX);
    if index_path.is_file() {
        let text = std::fs::read_to_string(&index_path).map_err(io(&index_path))?;
        let index: OptimizerIndex = serde_json::from_str(&text).map_err(|source| Error::Json {
            path: index_path.clone(),
            source,
        })?;
        let mut by_file: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
        for (k, f) in &index.weight_map {
            if keep(k) {
                by_file.entry(f.as_str()).or_default().push(k.as_str());
            }
        }
        for (f, keys) in by_file {
            let p = dir.join(f);
            let st = open(&p)?;
            for k in keys {
                let t = st.load(k, &cpu).map_err(|source| Error::Read {
                    path: p.clone(),
                    source,
                })?;
                out.insert(k.to_string(), t);
            }
        }
    } else {
        let p = dir.join(STATE_TENSORS);
        let st = open(&p)?;
        for (k, _) in st.tensors() {
            if keep(&k) {
                let t = st.load(&k, &cpu).map_err(|source| Error::Read {
                    path: p.clone(),
                    source,
                })?;
                out.insert(k, t);
            }
        }
    }
    Ok(out)
}

/// Refuses a checkpoint directory that lacks the state files.
pub fn check_is_checkpoint(dir: &Path) -> Result<()> {
    let optimizer = if dir.join(OPTIMIZER_INDEX).is_file() {
        OPTIMIZER_INDEX
    } else {
        STATE_TENSORS
    };
    for f in [STATE_JSON, optimizer, "model.safetensors"] {
        if !dir.join(f).is_file() {
            return Err(ck_err(
                dir,
                format!("no {f}: not a complete trainer checkpoint"),
            ));
        }
    }
    Ok(())
}
