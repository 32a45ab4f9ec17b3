//! Seeded random initialisation in the HF layout (`llava-trainer init`): the same weights on
//! every platform, each parameter from its own stream so that the order does not matter.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use llava_loader::rng::SplitMix64;
use serde::{Deserialize, Serialize};

use crate::model::clip::ClipVisionConfig;
use crate::model::config::{LlavaNextConfig, MergeType, IMAGE_NEWLINE};
use crate::model::llama::LlamaConfig;
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
