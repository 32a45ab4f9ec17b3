//! What a synthetic step runs on: a named model shape with random weights, and a micro-batch of
//! random tokens and tiles of the requested shape (no files).

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;

use super::BenchSpec;
use crate::io::init;
use crate::model::config::{LlavaNextConfig, MergeType};
use crate::{Batch, Error, ImageMeta, Result};

/// Random weights for every parameter, drawn on the device (N(0, 0.02), norms 1, biases 0).
pub fn random_varmap(cfg: &LlavaNextConfig, dtype: DType, dev: &Device) -> Result<VarMap> {
    let varmap = VarMap::new();
    {
        let mut data = varmap
            .data()
            .lock()
            .map_err(|_| Error::Poisoned("VarMap"))?;
        for (name, shape) in init::all_params(cfg) {
            let t = if shape.len() == 1 && name.ends_with(".bias") {
                Tensor::zeros(shape.as_slice(), dtype, dev)?
            } else if shape.len() == 1 && name.ends_with(".weight") {
                Tensor::ones(shape.as_slice(), dtype, dev)?
            } else {
                random_normal(shape.as_slice(), dev)?.to_dtype(dtype)?
            };
            data.insert(name, Var::from_tensor(&t)?);
        }
    }
    Ok(varmap)
}

/// N(0, 0.02) values of `shape`. Tensors above a million values repeat one draw of a prime
/// number of values (rows of a matrix never line up with the period): drawing 1.5e9 normals
/// one by one takes minutes on a CPU, and a benchmark only needs values of the right scale.
fn random_normal(shape: &[usize], dev: &Device) -> Result<Tensor> {
    const PERIOD: usize = 1_048_573;
    let n: usize = shape.iter().product();
    if n <= PERIOD {
        return Ok(Tensor::randn(0f32, 0.02, shape, dev)?);
    }
    let base = Tensor::randn(0f32, 0.02, PERIOD, dev)?;
    let t = base.repeat(n.div_ceil(PERIOD))?.narrow(0, 0, n)?;
    Ok(t.reshape(shape)?)
}

/// Image geometry of the synthetic rows: 672×672 on the 2×2 grid (5 tiles, every position kept
/// by unpad), scaled to the config's tile size.
fn bench_image(cfg: &LlavaNextConfig) -> ImageMeta {
    let s = 2 * cfg.vision_config.image_size;
    ImageMeta {
        orig_size: (s, s),
        grid: (2, 2),
        num_tiles: 5,
    }
}

/// The synthetic micro-batch: per row `images` placeholders, then text; the last
/// `supervised` fraction of each row's text carries labels.
pub(super) fn synthetic_batch(spec: &BenchSpec, dev: &Device) -> Result<(Batch, usize)> {
    let cfg = &spec.model;
    let meta = bench_image(cfg);
    let per_image = cfg.image_token_count(&meta)?;
    let image_tokens = per_image * spec.images;
    if image_tokens >= spec.seq {
        return Err(Error::Config(format!(
            "{} images take {image_tokens} tokens, more than --seq {}",
            spec.images, spec.seq
        )));
    }
    let text = spec.seq - image_tokens;
    let width = text + spec.images;
    let vocab = cfg.text_config.vocab_size.min(128_000) as u64;
    let mut rng = llava_loader::rng::SplitMix64::new(spec.seed);
    let (mut ids, mut labels) = (Vec::new(), Vec::new());
    let supervised_from = spec.images + ((1.0 - spec.supervised) * text as f64) as usize;
    let mut supervised = 0;
    for _ in 0..spec.batch {
        for p in 0..width {
            if p < spec.images {
                ids.push(cfg.image_token_index);
                labels.push(-100i64);
            } else {
                let id = (rng.next_u64() % vocab) as i64;
                ids.push(id);
                if p >= supervised_from {
                    labels.push(id);
                    supervised += 1;
                } else {
                    labels.push(-100);
                }
            }
        }
    }
    let tiles = spec.batch * spec.images * meta.num_tiles;
    let s = cfg.vision_config.image_size;
    let pixel_values = if tiles > 0 {
        let px = Tensor::randn(0f32, 1.0, (tiles, 3, s, s), dev)?;
        Some(px)
    } else {
        None
    };
    let batch = Batch {
        input_ids: Tensor::from_vec(ids, (spec.batch, width), &Device::Cpu)?,
        labels: Some(Tensor::from_vec(labels, (spec.batch, width), &Device::Cpu)?),
        lengths: vec![width; spec.batch],
        pixel_values,
        images: vec![meta; spec.batch * spec.images],
        segments: None,
    };
    Ok((batch, supervised))
}

/// `llava-next-8b` (the real 8B config), `tiny` (trainer/configs/tiny-model.json's shape) or a
/// path to an HF LlavaNext `config.json`; `layers` cuts the decoder depth, `vision_layers` the
/// encoder's.
pub fn named_config(
    name: &str,
    layers: Option<usize>,
    vision_layers: Option<usize>,
) -> Result<LlavaNextConfig> {
    let mut cfg = match name {
        "llava-next-8b" | "llama3-llava-next-8b" => LlavaNextConfig::llama3_llava_next_8b(),
        "tiny" => tiny_config()?,
        path => LlavaNextConfig::from_file(path)?,
    };
    if let Some(l) = layers {
        cfg.text_config.num_hidden_layers = l;
    }
    if let Some(v) = vision_layers {
        // Keep the selected layer one below the top, as LLaVA's -2.
        cfg.vision_config.num_hidden_layers = v + 1;
    }
    cfg.mm_patch_merge_type = MergeType::SpatialUnpad;
    cfg.validate()?;
    Ok(cfg)
}

/// The shape of `trainer/configs/tiny-model.json` (compiled in: the bench needs no files).
fn tiny_config() -> Result<LlavaNextConfig> {
    let spec: init::InitSpec =
        serde_json::from_str(include_str!("../../../configs/tiny-model.json"))
            .map_err(|e| Error::Config(format!("tiny-model.json: {e}")))?;
    spec.config()
}
