//! AdamW exactly as `torch.optim.AdamW` (single-tensor path), with the LLaVA-NeXT parameter
//! groups, global grad-norm clipping and f32 master weights.
//!
//! Per element, at step t (1-based): `w -= lr·wd·w` (decay set only); `m = lerp(m, g, 1-β1)`;
//! `v = β2·v + (1-β2)·g²`; `w -= lr/(1-β1^t) · m / (sqrt(v)/sqrt(1-β2^t) + ε)`.
//!
//! Trainable parameters that get no gradient in a step (the vision tower on a text-only batch,
//! CLIP's unused last layer) are stepped with a zero gradient: their moments decay and, once
//! non-zero, keep moving them. torch skips params whose grad is None instead; ZeRO (the
//! reference's DeepSpeed) keeps flat gradient buffers, which is the zero-gradient behaviour we
//! follow. With zero moments and no weight decay both give the same result (the parity fixture).

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Tensor, Var};

use crate::{Error, Result};

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    /// Base lr: every trainable parameter outside the vision tower.
    pub lr: f64,
    /// lr of parameters whose name contains `vision_tower` (None: the base lr).
    pub vision_tower_lr: Option<f64>,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Global L2 clipping of all trainable gradients (None: no clipping).
    pub max_grad_norm: Option<f64>,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 1e-5,
            vision_tower_lr: None,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            max_grad_norm: Some(1.0),
        }
    }
}

/// HF's decay set: parameters with at least 2 dims (biases, norm gains and `image_newline`,
/// all 1-D, are not decayed).
pub fn decays(shape: &[usize]) -> bool {
    shape.len() >= 2
}

/// One trainable parameter and its optimizer state (all f32).
#[derive(Debug)]
pub struct ParamState {
    pub name: String,
    pub var: Var,
    /// Base lr of its group (before the schedule's multiplier).
    pub lr: f64,
    pub decay: bool,
    /// f32 copy when the variable is held in another dtype (bf16).
    pub master: Option<Tensor>,
    pub m: Tensor,
    pub v: Tensor,
}

/// What one step did; stays on the device until someone reads it (once per logging step).
#[derive(Debug, Clone)]
pub struct StepStats {
    /// Scalar f32: global L2 norm of the gradients before clipping (0 without gradients).
    pub grad_norm: Tensor,
}

impl StepStats {
    /// The norm on the host (one device synchronisation).
    pub fn grad_norm_value(&self) -> Result<f64> {
        Ok(f64::from(self.grad_norm.to_scalar::<f32>()?))
    }
}

#[derive(Debug)]
pub struct AdamW {
    pub config: AdamWConfig,
    pub params: Vec<ParamState>,
    /// Steps taken (t of the bias corrections).
    pub step: u64,
}

impl AdamW {
    /// Optimizer over `trainable` (name, variable) pairs; moments start at zero.
    pub fn new(config: AdamWConfig, trainable: Vec<(String, Var)>) -> Result<Self> {
        let mut params = Vec::with_capacity(trainable.len());
        for (name, var) in trainable {
            let t = var.as_tensor();
            let lr = match config.vision_tower_lr {
                Some(lr) if name.contains("vision_tower") => lr,
                _ => config.lr,
            };
            let master = if t.dtype() == DType::F32 {
                None
            } else {
                Some(t.to_dtype(DType::F32)?.detach())
            };
            let m = Tensor::zeros(t.shape(), DType::F32, t.device())?;
            let v = m.zeros_like()?;
            params.push(ParamState {
                decay: decays(t.dims()),
                name,
                var,
                lr,
                master,
                m,
                v,
            });
        }
        params.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Self {
            config,
            params,
            step: 0,
        })
    }

    /// Global L2 norm of `grads` as torch's `clip_grad_norm_` computes it: the norm of the
    /// per-tensor norms, in f32, on the device (no host read). None without gradients.
    pub fn grad_norm(grads: &HashMap<String, Tensor>) -> Result<Option<Tensor>> {
        let mut names: Vec<&String> = grads.keys().collect();
        names.sort();
        let norms = names
            .iter()
            .map(|n| grads[*n].to_dtype(DType::F32)?.sqr()?.sum_all()?.sqrt())
            .collect::<candle_core::Result<Vec<_>>>()?;
        if norms.is_empty() {
            return Ok(None);
        }
        Ok(Some(Tensor::stack(&norms, 0)?.sqr()?.sum_all()?.sqrt()?))
    }

    /// One step with `grads` (f32, by parameter name; absent = zero) and the lr multiplier of
    /// the schedule. Clips first when configured, as torch's `clip_grad_norm_`: every gradient
    /// is multiplied by `min(1, max / (norm + 1e-6))`, computed on the device.
    pub fn step(&mut self, grads: &HashMap<String, Tensor>, lr_scale: f64) -> Result<StepStats> {
        let norm = Self::grad_norm(grads)?;
        self.step_with_norm(grads, lr_scale, norm)
    }

    /// [`AdamW::step`] with the global gradient norm given (data parallelism computes it over
    /// all ranks' gradients, of which `grads` may be a shard).
    pub fn step_with_norm(
        &mut self,
        grads: &HashMap<String, Tensor>,
        lr_scale: f64,
        norm: Option<Tensor>,
    ) -> Result<StepStats> {
        let coef = match (self.config.max_grad_norm, &norm) {
            (Some(max), Some(norm)) => {
                let max = Tensor::new(max as f32, norm.device())?;
                Some(max.div(&(norm + 1e-6)?)?.minimum(1f64)?)
            }
            _ => None,
        };
        self.step += 1;
        let t = self.step as f64;
        let c = &self.config;
        let bc1 = 1.0 - c.beta1.powf(t);
        let bc2_sqrt = (1.0 - c.beta2.powf(t)).sqrt();
        for p in &mut self.params {
            let w = match &p.master {
                Some(m) => m.clone(),
                None => p.var.as_tensor().detach(),
            };
            let g = match (grads.get(&p.name), &coef) {
                (Some(g), Some(coef)) => g.broadcast_mul(coef)?,
                (Some(g), None) => g.clone(),
                (None, _) => w.zeros_like()?,
            };
            let lr = p.lr * lr_scale;
            let w = if p.decay && c.weight_decay != 0.0 {
                (&w * (1.0 - lr * c.weight_decay))?
            } else {
                w
            };
            // torch: exp_avg.lerp_(grad, 1 - beta1) = m + (1 - β1)·(g - m).
            p.m = (&p.m + ((&g - &p.m)? * (1.0 - c.beta1))?)?;
            p.v = ((&p.v * c.beta2)? + ((&g * (1.0 - c.beta2))? * &g)?)?;
            let denom = ((p.v.sqrt()? / bc2_sqrt)? + c.eps)?;
            let w = (&w - ((&p.m / &denom)? * (lr / bc1))?)?;
            match &mut p.master {
                Some(master) => {
                    p.var.set(&w.to_dtype(p.var.dtype())?)?;
                    *master = w;
                }
                None => p.var.set(&w)?,
            }
        }
        let grad_norm = match norm {
            Some(n) => n,
            None => Tensor::new(0f32, &candle_core::Device::Cpu)?,
        };
        Ok(StepStats { grad_norm })
    }

    /// Optimizer tensors for a checkpoint: `m.<name>`, `v.<name>` and `master.<name>`.
    pub fn state_tensors(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for p in &self.params {
            out.insert(format!("m.{}", p.name), p.m.clone());
            out.insert(format!("v.{}", p.name), p.v.clone());
            if let Some(w) = &p.master {
                out.insert(format!("master.{}", p.name), w.clone());
            }
        }
        out
    }

    /// Restores what [`AdamW::state_tensors`] saved, after `step` steps; every trainable
    /// parameter must be present with its shape.
    pub fn load_state(&mut self, mut tensors: HashMap<String, Tensor>, step: u64) -> Result<()> {
        let bad = |msg: String| Error::Checkpoint {
            path: "trainer_state.safetensors".into(),
            msg,
        };
        for p in &mut self.params {
            let dev = p.var.device().clone();
            let mut take = |kind: &str| -> Result<Tensor> {
                let key = format!("{kind}.{}", p.name);
                let t = tensors.remove(&key).ok_or_else(|| {
                    bad(format!(
                        "no `{key}`: the checkpoint was written with other tunable parts"
                    ))
                })?;
                if t.dims() != p.var.dims() || t.dtype() != DType::F32 {
                    return Err(bad(format!("`{key}` has shape {:?}", t.dims())));
                }
                Ok(t.to_device(&dev)?)
            };
            p.m = take("m")?;
            p.v = take("v")?;
            if p.master.is_some() {
                let w = take("master")?;
                p.var.set(&w.to_dtype(p.var.dtype())?)?;
                p.master = Some(w);
            }
        }
        let extra: BTreeMap<String, ()> = tensors
            .into_keys()
            .filter(|k| !k.starts_with("master."))
            .map(|k| (k, ()))
            .collect();
        if let Some(k) = extra.keys().next() {
            return Err(bad(format!(
                "state for `{k}`, which is not trainable in this run (other tunable parts?)"
            )));
        }
        self.step = step;
        Ok(())
    }
}
