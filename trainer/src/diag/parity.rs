//! `llava-trainer parity`: the model on any device against a fixture's HF transformers goldens
//! (logits, loss and every gradient), as the GPU check runs it. The fixture layout is
//! `fixtures/tiny-llava-next-a/`'s (see its README).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use crate::io::weights::{self, LoadOptions};
use crate::model::attention::AttentionKind;
use crate::model::batch::lengths_from_attention_mask;
use crate::model::config::{LlavaNextConfig, UnpadRounding};
use crate::train::step::{self, GradAccumulator, StepOptions};
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
    /// Cosine similarity of the flattened tensors (1 when both are zero).
    pub cosine: f64,
    /// `max |a - e| / (atol + rtol·|e|)` for the f32 tolerance of this quantity: at most 1 is
    /// `allclose` (as the CPU tests check).
    pub allclose_ratio: f64,
}

fn diff(actual: &Tensor, expected: &Tensor, atol: f64, rtol: f64) -> Result<Diff> {
    let a = actual
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    let e = expected
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    if a.len() != e.len() {
        return Err(Error::Config(format!(
            "parity: {} values against {} expected",
            a.len(),
            e.len()
        )));
    }
    let (mut max_abs, mut e_max, mut ratio) = (0f64, 0f64, 0f64);
    let (mut dot, mut na, mut ne) = (0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(&e) {
        let d = (x - y).abs();
        max_abs = max_abs.max(d);
        e_max = e_max.max(y.abs());
        ratio = ratio.max(d / (atol + rtol * y.abs()));
        dot += x * y;
        na += x * x;
        ne += y * y;
    }
    // NaN anywhere must fail every check.
    if a.iter().any(|x| !x.is_finite()) {
        max_abs = f64::INFINITY;
        ratio = f64::INFINITY;
    }
    let cosine = if na == 0.0 && ne == 0.0 {
        1.0
    } else if na == 0.0 || ne == 0.0 || !dot.is_finite() {
        0.0
    } else {
        dot / (na.sqrt() * ne.sqrt())
    };
    Ok(Diff {
        max_abs,
        max_rel: if e_max > 0.0 {
            max_abs / e_max
        } else {
            max_abs
        },
        cosine,
        allclose_ratio: ratio,
    })
}

/// The limits `parity` holds the model to; its exit status says whether every check passed.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Tolerances {
    /// f32: the CPU parity test's `allclose` limits (trainer/tests/integration/parity.rs).
    pub logits_atol: f64,
    pub logits_rtol: f64,
    pub loss_atol: f64,
    pub grad_atol: f64,
    pub grad_rtol: f64,
    /// bf16: `|loss - expected| / |expected|` at most this.
    pub bf16_loss_rel: f64,
    /// bf16: every gradient's cosine with HF's at least this (gradients with a zero expected
    /// norm, such as CLIP's `k_proj.bias`, are left out: their direction is noise).
    pub bf16_grad_cosine: f64,
    /// Every limit divided by this (`--tighten`, `LLAVA_PARITY_TIGHTEN`): a value above the
    /// measured error ratio makes the check fail, which shows the check can fail.
    pub tighten: f64,
}

impl Default for Tolerances {
    fn default() -> Self {
        Self {
            logits_atol: 1e-4,
            logits_rtol: 1e-4,
            loss_atol: 1e-5,
            grad_atol: 1e-5,
            grad_rtol: 1e-3,
            // CPU bf16 run of the tiny fixture (docs/gpu.md): loss relative error 1.4e-4,
            // lowest gradient cosine 0.99947 (a CLIP v_proj.bias). The limits leave ~37x
            // (loss) and ~4x (1 - cosine) of room for other kernels' rounding, and still
            // catch a wrong gradient: a dropped or mis-scaled term moves a cosine far below
            // 0.998 or the loss by more than half a percent.
            bf16_loss_rel: 5e-3,
            bf16_grad_cosine: 0.998,
            tighten: 1.0,
        }
    }
}

/// One pass/fail line of the report: `ratio` is the measured error over its (tightened) limit.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    pub measured: f64,
    pub limit: f64,
    pub ratio: f64,
    pub passed: bool,
}

impl Check {
    /// An error that must stay at or below `limit`.
    fn at_most(name: &str, measured: f64, limit: f64) -> Self {
        let ratio = if limit > 0.0 {
            measured / limit
        } else {
            f64::INFINITY
        };
        Self {
            name: name.into(),
            measured,
            limit,
            ratio,
            passed: ratio <= 1.0,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ParityReport {
    pub device: String,
    pub fixture: String,
    pub bf16: bool,
    pub logits: Diff,
    pub loss: f64,
    pub loss_abs_error: f64,
    pub loss_rel_error: f64,
    /// Worst gradient over all parameters HF gives one for (recomputed backward): max of each
    /// field over the parameters (`max_rel` without CLIP's k_proj.bias, whose gradient is
    /// mathematically zero); `cosine` is the minimum over the parameters other than that one.
    pub gradients: Diff,
    pub gradients_compared: usize,
    pub worst_gradient: String,
    /// The parameter with the lowest gradient cosine.
    pub worst_gradient_cosine: String,
    /// HF has a gradient and we do not, or the reverse with a non-zero value.
    pub gradient_mismatches: Vec<String>,
    pub tolerances: Tolerances,
    /// What decided `passed`: f32 runs check the CPU tests' `allclose` limits, bf16 runs the
    /// loss relative error and the gradient cosines.
    pub checks: Vec<Check>,
    pub passed: bool,
}

/// Fixture tensor name of a canonical parameter (the fixture drops `vision_model.`).
fn fixture_name(canonical: &str) -> String {
    canonical.replacen("vision_tower.vision_model.", "vision_tower.", 1)
}

/// Logits (monolithic forward), loss and gradients (the training step: recomputed backward,
/// blockwise attention) on `dev`, against the goldens, checked against `tol`.
pub fn run_parity(dir: &Path, dev: &Device, bf16: bool, tol: &Tolerances) -> Result<ParityReport> {
    let fx = Fixture::load(dir)?;
    let dtype = if bf16 { DType::BF16 } else { DType::F32 };
    let opts = LoadOptions {
        dtype,
        device: dev.clone(),
        ..LoadOptions::default()
    };
    let (varmap, _) = weights::load_varmap(&fx.cfg, &[fx.dir.join("model")], &opts)?;
    let (mut model, vars) = crate::model::trainable::build_model(&fx.cfg, &varmap, &|_| true)?;
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
        tol.logits_atol,
        tol.logits_rtol,
    )?;
    let mut acc = GradAccumulator::new(vars.clone());
    let mb = step::micro_batch(&model, &batch, &mut acc, 1, StepOptions { recompute: true })?;
    let loss = f64::from(mb.loss.to_scalar::<f32>()?);
    let want_loss = f64::from(expected("loss")?.to_dtype(DType::F32)?.to_scalar::<f32>()?);
    let grads = acc.take();
    let mut worst = Diff {
        max_abs: 0.0,
        max_rel: 0.0,
        cosine: 1.0,
        allclose_ratio: 0.0,
    };
    let (mut worst_name, mut worst_cos_name, mut compared, mut mismatches) =
        (String::new(), String::new(), 0, Vec::new());
    for (name, _) in &vars {
        let key = format!("grad.full.step1.{}", fixture_name(name));
        match (grads.get(name), fx.expected.get(&key)) {
            (Some(g), Some(want)) => {
                let d = diff(g, want, tol.grad_atol, tol.grad_rtol)?;
                compared += 1;
                // CLIP k_proj.bias has a mathematically zero gradient: relative noise.
                let noise = name.ends_with("k_proj.bias");
                if d.max_abs > worst.max_abs || (!noise && d.max_rel > worst.max_rel) {
                    worst_name = name.clone();
                }
                worst.max_abs = worst.max_abs.max(d.max_abs);
                worst.allclose_ratio = worst.allclose_ratio.max(d.allclose_ratio);
                if !noise {
                    worst.max_rel = worst.max_rel.max(d.max_rel);
                    if d.cosine < worst.cosine {
                        worst.cosine = d.cosine;
                        worst_cos_name = name.clone();
                    }
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
    let loss_abs_error = if loss.is_finite() {
        (loss - want_loss).abs()
    } else {
        f64::INFINITY
    };
    let loss_rel_error = loss_abs_error / want_loss.abs().max(f64::MIN_POSITIVE);
    let t = tol.tighten.max(f64::MIN_POSITIVE);
    let mut checks = if bf16 {
        vec![
            Check::at_most("loss relative error", loss_rel_error, tol.bf16_loss_rel / t),
            Check::at_most(
                "1 - min gradient cosine",
                1.0 - worst.cosine,
                (1.0 - tol.bf16_grad_cosine) / t,
            ),
        ]
    } else {
        vec![
            // allclose ratios are at most 1 when they pass: tightening divides the limit.
            Check::at_most("logits allclose ratio", logits.allclose_ratio, 1.0 / t),
            Check::at_most("loss abs error", loss_abs_error, tol.loss_atol / t),
            Check::at_most("gradients allclose ratio", worst.allclose_ratio, 1.0 / t),
        ]
    };
    checks.push(Check::at_most(
        "gradient mismatches",
        mismatches.len() as f64,
        0.5,
    ));
    if compared == 0 {
        checks.push(Check::at_most("no gradient compared", 1.0, 0.5));
    }
    let passed = checks.iter().all(|c| c.passed);
    Ok(ParityReport {
        device: format!("{dev:?}"),
        fixture: dir.display().to_string(),
        bf16,
        logits,
        loss,
        loss_abs_error,
        loss_rel_error,
        gradients: worst,
        gradients_compared: compared,
        worst_gradient: worst_name,
        worst_gradient_cosine: worst_cos_name,
        gradient_mismatches: mismatches,
        tolerances: *tol,
        checks,
        passed,
    })
}
