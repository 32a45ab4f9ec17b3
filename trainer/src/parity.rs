//! `llava-trainer parity`: the model on any device against a fixture's HF transformers goldens
//! (logits, loss and every gradient), as the GPU check runs it. The fixture layout is
//! `fixtures/tiny-llava-next-a/`'s (see its README).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use crate::attention::AttentionKind;
use crate::llava_next::{lengths_from_attention_mask, LlavaNextConfig, UnpadRounding};
use crate::step::{self, GradAccumulator, StepOptions};
use crate::weights::{self, LoadOptions};
use crate::{Batch, Error, ImageMeta, Result};

/// A fixture read from disk, tensors on the CPU.
pub struct Fixture {
    pub dir: PathBuf,
    pub cfg: LlavaNextConfig,
    pub inputs: HashMap<String, Tensor>,
    pub expected: HashMap<String, Tensor>,
    pub images: Vec<ImageMeta>,
    pub num_patches: Vec<usize>,
}

fn read_tensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, &Device::Cpu).map_err(|source| Error::Read {
        path: path.into(),
        source,
    })
}

impl Fixture {
    pub fn load(dir: &Path) -> Result<Self> {
        let mut cfg = LlavaNextConfig::from_file(dir.join("model/config.json"))?;
        // The goldens come from HF, which rounds unpad sizes to 7 decimals before truncating.
        cfg.unpad_rounding = UnpadRounding::HfRound7;
        let inputs = read_tensors(&dir.join("inputs.safetensors"))?;
        let expected = read_tensors(&dir.join("expected.safetensors"))?;
        let path = dir.join("fixture.json");
        let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        let fixture: serde_json::Value =
            serde_json::from_str(&text).map_err(|source| Error::Json { path, source })?;
        let missing = |k: &str| Error::Config(format!("fixture {}: no {k}", dir.display()));
        let num_patches: Vec<usize> = expected
            .get("num_patches")
            .ok_or_else(|| missing("num_patches"))?
            .to_vec1::<i64>()?
            .into_iter()
            .map(|x| x as usize)
            .collect();
        let sizes = inputs
            .get("image_sizes")
            .ok_or_else(|| missing("image_sizes"))?
            .to_vec2::<i64>()?;
        let samples = fixture["batch"]["samples"]
            .as_array()
            .ok_or_else(|| missing("batch.samples"))?;
        let mut images = Vec::new();
        for ((s, hw), &n) in samples.iter().zip(&sizes).zip(&num_patches) {
            let rc = &s["tiles_rows_cols"];
            let (rows, cols) = (
                rc[0].as_u64().ok_or_else(|| missing("tiles_rows_cols"))? as usize,
                rc[1].as_u64().ok_or_else(|| missing("tiles_rows_cols"))? as usize,
            );
            images.push(ImageMeta {
                // HF gives (H, W); the model takes PIL's (W, H).
                orig_size: (hw[1] as usize, hw[0] as usize),
                grid: (cols, rows),
                num_tiles: n,
            });
        }
        Ok(Self {
            dir: dir.into(),
            cfg,
            inputs,
            expected,
            images,
            num_patches,
        })
    }

    fn input(&self, k: &str) -> Result<&Tensor> {
        self.inputs
            .get(k)
            .ok_or_else(|| Error::Config(format!("fixture inputs: no {k}")))
    }

    /// The fixture's batch with pixels on `dev` (ids and labels stay on the host).
    pub fn batch(&self, dev: &Device) -> Result<Batch> {
        let px = self.input("pixel_values")?;
        let parts = self
            .num_patches
            .iter()
            .enumerate()
            .map(|(i, &n)| px.get(i)?.narrow(0, 0, n))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Batch {
            input_ids: self.input("input_ids")?.clone(),
            labels: Some(self.input("labels")?.clone()),
            lengths: lengths_from_attention_mask(self.input("attention_mask")?)?,
            pixel_values: Some(Tensor::cat(&parts, 0)?.to_device(dev)?),
            images: self.images.clone(),
            segments: None,
        })
    }
}

/// One compared quantity.
#[derive(Debug, Clone, Serialize)]
pub struct Diff {
    pub max_abs: f64,
    /// `max_abs / max |expected|`.
    pub max_rel: f64,
}

fn diff(actual: &Tensor, expected: &Tensor) -> Result<Diff> {
    let a = actual
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .flatten_all()?;
    let e = expected.to_dtype(DType::F64)?.flatten_all()?;
    let max_abs = (&a - &e)?.abs()?.max_all()?.to_scalar::<f64>()?;
    let e_max = e.abs()?.max_all()?.to_scalar::<f64>()?;
    Ok(Diff {
        max_abs,
        max_rel: if e_max > 0.0 {
            max_abs / e_max
        } else {
            max_abs
        },
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct ParityReport {
    pub device: String,
    pub fixture: String,
    pub bf16: bool,
    pub logits: Diff,
    pub loss: f64,
    pub loss_abs_error: f64,
    /// Worst gradient over all parameters HF gives one for (recomputed backward).
    pub gradients: Diff,
    pub gradients_compared: usize,
    pub worst_gradient: String,
    /// HF has a gradient and we do not, or the reverse with a non-zero value.
    pub gradient_mismatches: Vec<String>,
}

/// Fixture tensor name of a canonical parameter (the fixture drops `vision_model.`).
fn fixture_name(canonical: &str) -> String {
    canonical.replacen("vision_tower.vision_model.", "vision_tower.", 1)
}

/// Logits (monolithic forward), loss and gradients (the training step: recomputed backward,
/// blockwise attention) on `dev`, against the goldens.
pub fn run_parity(dir: &Path, dev: &Device, bf16: bool) -> Result<ParityReport> {
    let fx = Fixture::load(dir)?;
    let dtype = if bf16 { DType::BF16 } else { DType::F32 };
    let opts = LoadOptions {
        dtype,
        device: dev.clone(),
        ..LoadOptions::default()
    };
    let (varmap, _) = weights::load_varmap(&fx.cfg, &[fx.dir.join("model")], &opts)?;
    let (mut model, vars) = crate::init::build_model(&fx.cfg, &varmap, &|_| true)?;
    model.set_attention(AttentionKind::default(), AttentionKind::Dense);
    let batch = fx.batch(dev)?;
    let lengths = batch.lengths.clone();
    let expected = |k: &str| {
        fx.expected
            .get(k)
            .ok_or_else(|| Error::Config(format!("fixture expected: no {k}")))
    };
    let out = model.forward(&batch)?;
    let valid = |t: &Tensor| -> Result<Tensor> {
        let parts = lengths
            .iter()
            .enumerate()
            .map(|(i, &n)| t.get(i)?.narrow(0, 0, n))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::cat(&parts, 0)?)
    };
    let logits = diff(
        &valid(&out.logits.to_device(&Device::Cpu)?)?,
        &valid(expected("logits")?)?,
    )?;
    let mut acc = GradAccumulator::new(vars.clone());
    let mb = step::micro_batch(&model, &batch, &mut acc, 1, StepOptions { recompute: true })?;
    let loss = f64::from(mb.loss.to_scalar::<f32>()?);
    let want_loss = f64::from(expected("loss")?.to_dtype(DType::F32)?.to_scalar::<f32>()?);
    let grads = acc.take();
    let (mut worst, mut worst_name, mut compared, mut mismatches) = (
        Diff {
            max_abs: 0.0,
            max_rel: 0.0,
        },
        String::new(),
        0,
        Vec::new(),
    );
    for (name, _) in &vars {
        let key = format!("grad.full.step1.{}", fixture_name(name));
        match (grads.get(name), fx.expected.get(&key)) {
            (Some(g), Some(want)) => {
                let d = diff(g, want)?;
                compared += 1;
                // CLIP k_proj.bias has a mathematically zero gradient: relative noise.
                if d.max_abs > worst.max_abs
                    || (!name.ends_with("k_proj.bias") && d.max_rel > worst.max_rel)
                {
                    worst_name = name.clone();
                }
                worst.max_abs = worst.max_abs.max(d.max_abs);
                if !name.ends_with("k_proj.bias") {
                    worst.max_rel = worst.max_rel.max(d.max_rel);
                }
            }
            (None, Some(_)) => mismatches.push(format!("{name}: HF has a gradient, we have none")),
            (Some(g), None) => {
                let m = g.abs()?.max_all()?.to_scalar::<f32>()?;
                if m != 0.0 {
                    mismatches.push(format!("{name}: gradient {m:e} where HF has none"));
                }
            }
            (None, None) => {}
        }
    }
    Ok(ParityReport {
        device: format!("{dev:?}"),
        fixture: dir.display().to_string(),
        bf16,
        logits,
        loss,
        loss_abs_error: (loss - want_loss).abs(),
        gradients: worst,
        gradients_compared: compared,
        worst_gradient: worst_name,
        gradient_mismatches: mismatches,
    })
}
