//! The training step's compute: forward and backward of each micro-batch into accumulated f32
//! gradients, without reading anything back from the device.
//!
//! Two ways to get the gradients of one micro-batch, with the same result:
//! - monolithic: one autograd graph over the whole model (every activation alive until
//!   backward; fastest for small models);
//! - recomputed ([`segments`]): the forward keeps only each segment's input, the backward
//!   recomputes one segment at a time (`gradient_checkpointing`, the default for real models).

pub mod segments;
pub mod spans;

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use crate::{Batch, Error, LlavaNext, Result};

/// How a micro-batch's gradients are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepOptions {
    /// Recompute each segment in the backward instead of keeping every activation.
    pub recompute: bool,
}

impl Default for StepOptions {
    fn default() -> Self {
        Self { recompute: true }
    }
}

/// Sums of gradients over the micro-batches of one optimizer step, in f32, per trainable
/// parameter.
pub struct GradAccumulator {
    params: Vec<(String, Var)>,
    grads: Vec<Option<Tensor>>,
}

impl GradAccumulator {
    pub fn new(params: Vec<(String, Var)>) -> Self {
        let grads = vec![None; params.len()];
        Self { params, grads }
    }

    /// Adds every gradient `store` holds for a trainable parameter.
    pub fn absorb(&mut self, store: &GradStore) -> Result<()> {
        for ((_, var), acc) in self.params.iter().zip(self.grads.iter_mut()) {
            if let Some(g) = store.get(var.as_tensor()) {
                let g = g.to_dtype(DType::F32)?;
                *acc = Some(match acc.take() {
                    Some(a) => (a + g)?,
                    None => g,
                });
            }
        }
        Ok(())
    }

    /// The gradients by parameter name (parameters that got none are absent) and a fresh start.
    pub fn take(&mut self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for ((name, _), g) in self.params.iter().zip(self.grads.iter_mut()) {
            if let Some(g) = g.take() {
                out.insert(name.clone(), g);
            }
        }
        out
    }
}

/// What one micro-batch contributed, all on the device or known on the host.
#[derive(Debug, Clone)]
pub struct MicroBatchLoss {
    /// Scalar f32, detached: mean cross entropy over the micro-batch's supervised targets.
    pub loss: Tensor,
    /// Supervised targets (host-side count).
    pub targets: usize,
}

/// Forward and backward of one micro-batch; its gradients, scaled by `1 / grad_accum` (the
/// mean of per-micro-batch means, spec §5.4), go into `acc`.
pub fn micro_batch(
    model: &LlavaNext,
    batch: &Batch,
    acc: &mut GradAccumulator,
    grad_accum: usize,
    opts: StepOptions,
) -> Result<MicroBatchLoss> {
    if grad_accum == 0 {
        return Err(Error::Config("grad_accum must be at least 1".into()));
    }
    if opts.recompute {
        return segments::micro_batch(model, batch, acc, grad_accum);
    }
    let out = {
        let _t = spans::span(spans::Phase::Forward);
        model.forward_loss(batch)?
    };
    // The same two scalings as the recomputed path, in the same order.
    let scaled = if grad_accum > 1 {
        (&out.loss / grad_accum as f64)?
    } else {
        out.loss.clone()
    };
    {
        let _t = spans::span(spans::Phase::Backward);
        acc.absorb(&scaled.backward()?)?;
    }
    Ok(MicroBatchLoss {
        loss: out.loss.detach(),
        targets: out.targets,
    })
}
