//! Models assembled from what a run names: an HF LlavaNext folder, or separate Llama-3 and CLIP
//! checkpoints, with a projector file over them; missing parts initialised from a seed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use super::random::init_missing;
use crate::io::weights::{self, LoadOptions};
use crate::model::config::{LlavaNextConfig, MergeType, PROJECTOR_PREFIX};
use crate::{Error, Result};

/// Where a model's weights come from.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ModelSource {
    /// HF LlavaNext directory (config.json + safetensors).
    pub model: Option<PathBuf>,
    /// Separate Llama-3 directory (used when `model` is absent), with `vision`.
    pub llm: Option<PathBuf>,
    pub vision: Option<PathBuf>,
    /// Projector weights (`model.mm_projector.*` or `multi_modal_projector.*`); replace the
    /// model's own.
    pub projector: Option<PathBuf>,
}

/// Reads the config and weights of `src` into a `VarMap` under canonical names. Missing
/// projector / `image_newline` are initialised from `seed`; a smaller vocabulary is grown with
/// mean rows to the config's (128320 for separate Llama-3 checkpoints).
pub fn load_source(
    src: &ModelSource,
    seed: u64,
    dtype: DType,
    dev: &Device,
) -> Result<(LlavaNextConfig, VarMap)> {
    let (cfg, paths) = match (&src.model, &src.llm, &src.vision) {
        (Some(m), _, _) => (
            LlavaNextConfig::from_file(m.join("config.json"))?,
            vec![m.clone()],
        ),
        (None, Some(l), Some(v)) => (
            LlavaNextConfig::from_llama_and_clip_files(
                &l.join("config.json"),
                &v.join("config.json"),
                Some(128320),
            )?,
            vec![l.clone(), v.clone()],
        ),
        _ => {
            return Err(Error::Config(
                "give a model directory, or both an LLM and a vision tower directory".into(),
            ))
        }
    };
    // Load with image_newline expected, whatever the merge type.
    let mut full = cfg.clone();
    full.mm_patch_merge_type = MergeType::SpatialUnpad;
    let opts = LoadOptions {
        dtype,
        device: dev.clone(),
        init_missing_projector: true,
        grow_vocab: true,
    };
    let (varmap, _report) = weights::load_varmap(&full, &paths, &opts)?;
    init_missing(&cfg, &varmap, seed, dtype, dev)?;
    if let Some(p) = &src.projector {
        load_projector(&cfg, &varmap, p)?;
    }
    weights::check_complete(&full, &varmap)?;
    Ok((cfg, varmap))
}

/// A model folder in either layout (HF LlavaNext, or the reference's `LlavaLlamaForCausalLM`
/// with its original key names) for writing out in the HF layout: a vocabulary without a row for
/// `<image>` at `image_token_index` grows (mean rows) to hold it and `<pad>` after it, rounded up
/// to a multiple of 64 as HF's conversion does (128256 → 128320 for Llama-3).
pub fn load_for_export(dir: &Path, seed: u64) -> Result<(LlavaNextConfig, VarMap)> {
    let mut cfg = LlavaNextConfig::from_file(dir.join("config.json"))?;
    let image = usize::try_from(cfg.image_token_index.max(0)).unwrap_or(0);
    if cfg.text_config.vocab_size <= image {
        let grown = (image + 2).div_ceil(64) * 64;
        tracing::info!(
            "vocabulary {} → {grown} (room for <image> at {} and <pad>)",
            cfg.text_config.vocab_size,
            cfg.image_token_index
        );
        cfg.text_config.vocab_size = grown;
    }
    let dev = Device::Cpu;
    let mut full = cfg.clone();
    full.mm_patch_merge_type = MergeType::SpatialUnpad;
    let opts = LoadOptions {
        dtype: DType::F32,
        device: dev.clone(),
        init_missing_projector: false,
        grow_vocab: true,
    };
    let (varmap, _report) = weights::load_varmap(&full, &[dir.to_path_buf()], &opts)?;
    init_missing(&cfg, &varmap, seed, DType::F32, &dev)?;
    weights::check_complete(&full, &varmap)?;
    Ok((cfg, varmap))
}

/// Overwrites the projector in `varmap` with the one in `path` (all four tensors required).
pub fn load_projector(cfg: &LlavaNextConfig, varmap: &VarMap, path: &Path) -> Result<()> {
    let dev = Device::Cpu;
    let tensors = if crate::io::torch_pickle::is_torch_file(path) {
        crate::io::torch_pickle::TorchFile::open(path)?
            .load_all(&dev)?
            .into_iter()
            .collect::<HashMap<_, _>>()
    } else {
        candle_core::safetensors::load(path, &dev).map_err(|source| Error::Read {
            path: path.into(),
            source,
        })?
    };
    let mut found: HashMap<String, Tensor> = HashMap::new();
    for (k, t) in tensors {
        if let Some(name) = weights::canonical_name(&k).filter(|n| n.starts_with(PROJECTOR_PREFIX))
        {
            found.insert(name, t);
        }
    }
    let data = varmap
        .data()
        .lock()
        .map_err(|_| Error::Poisoned("VarMap"))?;
    for (name, shape) in cfg.projector_config().param_shapes() {
        let name = format!("{PROJECTOR_PREFIX}.{name}");
        let t = found.get(&name).ok_or_else(|| Error::MissingTensor {
            name: name.clone(),
            searched: path.display().to_string(),
        })?;
        if t.dims() != shape.as_slice() {
            return Err(Error::ShapeMismatch {
                name,
                path: path.into(),
                found: t.dims().to_vec(),
                expected: shape,
            });
        }
        let var = data.get(&name).ok_or_else(|| Error::MissingTensor {
            name: name.clone(),
            searched: "the model".into(),
        })?;
        var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
    }
    Ok(())
}
