//! Fresh and assembled models: seeded random initialisation in the HF layout (`llava-trainer
//! init`), assembly from separate Llama-3 / CLIP / projector checkpoints, and the model built
//! over a `VarMap` with frozen parameters detached.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

use crate::clip::ClipVisionConfig;
use crate::data::rng::SplitMix64;
use crate::llama::LlamaConfig;
use crate::llava_next::{LlavaNext, LlavaNextConfig, MergeType, IMAGE_NEWLINE, PROJECTOR_PREFIX};
use crate::weights::{self, LoadOptions};
use crate::{Error, Result};

/// `model.json` of `llava-trainer init`: the parts of an HF LlavaNext config worth choosing.
/// Omitted fields take llama3-llava-next-8b's values.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InitSpec {
    #[serde(default)]
    pub vision_config: Option<serde_json::Value>,
    #[serde(default)]
    pub text_config: Option<serde_json::Value>,
    /// Anyres grid as (width, height), LLaVA-NeXT order (as in `datasets.toml`); written to
    /// `config.json` swapped, see [`llava_formats::geometry::hf_pinpoints`].
    #[serde(default)]
    pub image_grid_pinpoints: Option<Vec<[usize; 2]>>,
    #[serde(default)]
    pub image_token_index: Option<i64>,
    #[serde(default)]
    pub seed: u64,
}

impl InitSpec {
    /// The model config; `image_grid_pinpoints` in it are HF's (h, w).
    pub fn config(&self) -> Result<LlavaNextConfig> {
        let mut cfg = LlavaNextConfig::llama3_llava_next_8b();
        let json = |e: serde_json::Error| Error::Config(format!("model.json: {e}"));
        if let Some(v) = &self.vision_config {
            cfg.vision_config =
                serde_json::from_value::<ClipVisionConfig>(v.clone()).map_err(json)?;
        }
        if let Some(t) = &self.text_config {
            cfg.text_config = serde_json::from_value::<LlamaConfig>(t.clone()).map_err(json)?;
        }
        if let Some(p) = &self.image_grid_pinpoints {
            cfg.image_grid_pinpoints = p.iter().map(|[w, h]| [*h, *w]).collect();
        }
        if let Some(i) = self.image_token_index {
            cfg.image_token_index = i;
        }
        cfg.validate()?;
        Ok(cfg)
    }
}

/// Seeded standard normals (Box-Muller on SplitMix64): the same weights on every platform.
struct Normal(SplitMix64);

impl Normal {
    fn fill(&mut self, n: usize, std: f64) -> Vec<f32> {
        let mut out = Vec::with_capacity(n + 1);
        while out.len() < n {
            // 53 random bits in (0, 1].
            let u1 = ((self.0.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
            let u2 = (self.0.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
            let r = (-2.0 * u1.ln()).sqrt() * std;
            let a = 2.0 * std::f64::consts::PI * u2;
            out.push((r * a.cos()) as f32);
            out.push((r * a.sin()) as f32);
        }
        out.truncate(n);
        out
    }
}

/// HF-style initial value of one parameter: 1-D `*.weight` (norm gains) ones, biases zeros,
/// `image_newline` N(0, 1/sqrt(H)) as the reference, everything else N(0, 0.02).
fn init_tensor(name: &str, shape: &[usize], rng: &mut Normal, dev: &Device) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let one_d = shape.len() == 1;
    let data = if name == IMAGE_NEWLINE {
        rng.fill(n, 1.0 / (n as f64).sqrt())
    } else if one_d && name.ends_with(".bias") {
        vec![0f32; n]
    } else if one_d && name.ends_with(".weight") {
        vec![1f32; n]
    } else {
        rng.fill(n, 0.02)
    };
    Ok(Tensor::from_vec(data, shape, dev)?)
}

/// Adds freshly initialised values for every parameter of `cfg` missing from `varmap`
/// (each from its own stream seeded by `seed` and the name, so the order does not matter).
pub fn init_missing(
    cfg: &LlavaNextConfig,
    varmap: &VarMap,
    seed: u64,
    dtype: DType,
    dev: &Device,
) -> Result<Vec<String>> {
    let mut data = varmap
        .data()
        .lock()
        .map_err(|_| Error::Poisoned("VarMap"))?;
    let mut added = Vec::new();
    for (name, shape) in all_params(cfg) {
        if data.contains_key(&name) {
            continue;
        }
        let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        let mut rng = Normal(SplitMix64::new(seed ^ h));
        let t = init_tensor(&name, &shape, &mut rng, dev)?.to_dtype(dtype)?;
        data.insert(name.clone(), Var::from_tensor(&t)?);
        added.push(name);
    }
    Ok(added)
}

/// Parameters of `cfg` plus `image_newline` even with a `flat` merge: HF's LlavaNext always has
/// one, so checkpoints stay loadable whatever merge a stage trained with.
pub fn all_params(cfg: &LlavaNextConfig) -> Vec<(String, Vec<usize>)> {
    let mut c = cfg.clone();
    c.mm_patch_merge_type = MergeType::SpatialUnpad;
    c.param_shapes()
}

/// A randomly initialised model for `spec`.
pub fn random_model(spec: &InitSpec) -> Result<(LlavaNextConfig, VarMap)> {
    let cfg = spec.config()?;
    let varmap = VarMap::new();
    init_missing(&cfg, &varmap, spec.seed, DType::F32, &Device::Cpu)?;
    Ok((cfg, varmap))
}

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
    let tensors = if crate::torch_pickle::is_torch_file(path) {
        crate::torch_pickle::TorchFile::open(path)?
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

/// The model over `varmap`'s variables; parameters for which `trainable` is false are detached,
/// so backward neither computes their gradients nor walks graph parts that only feed them.
pub fn build_model(
    cfg: &LlavaNextConfig,
    varmap: &VarMap,
    trainable: &dyn Fn(&str) -> bool,
) -> Result<(LlavaNext, Vec<(String, Var)>)> {
    let data = varmap
        .data()
        .lock()
        .map_err(|_| Error::Poisoned("VarMap"))?;
    let mut tensors = HashMap::new();
    let mut vars = Vec::new();
    let (mut dtype, mut dev) = (DType::F32, Device::Cpu);
    for (name, var) in data.iter() {
        dtype = var.dtype();
        dev = var.device().clone();
        if trainable(name) {
            tensors.insert(name.clone(), var.as_tensor().clone());
            vars.push((name.clone(), var.clone()));
        } else {
            tensors.insert(name.clone(), var.as_tensor().detach());
        }
    }
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let vb = VarBuilder::from_tensors(tensors, dtype, &dev);
    Ok((LlavaNext::new(cfg, vb)?, vars))
}
