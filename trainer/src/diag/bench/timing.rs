//! Forward and backward wall time of one batch, for the criterion bench (`benches/fwd_bwd.rs`).

use std::time::{Duration, Instant};

use crate::{Batch, LlavaNext, Result};

/// Mean wall time of the phases of one training step (no optimizer).
#[derive(Debug, Clone, Copy)]
pub struct StepTiming {
    pub forward: Duration,
    pub backward: Duration,
    pub iters: usize,
}

/// Runs `warmup` untimed and `iters` timed forward + backward passes of `batch`.
pub fn time_forward_backward(
    model: &LlavaNext,
    batch: &Batch,
    warmup: usize,
    iters: usize,
) -> Result<StepTiming> {
    let step = || -> Result<(Duration, Duration)> {
        let t0 = Instant::now();
        let out = model.forward(batch)?;
        let loss = out
            .loss
            .ok_or_else(|| crate::Error::Batch("benchmark batch needs labels".into()))?;
        // Force the lazy parts of the forward before timing the backward.
        loss.to_scalar::<f32>()?;
        let t1 = Instant::now();
        let grads = loss.backward()?;
        drop(grads);
        Ok((t1 - t0, t1.elapsed()))
    };
    for _ in 0..warmup {
        step()?;
    }
    let (mut fwd, mut bwd) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..iters {
        let (f, b) = step()?;
        fwd += f;
        bwd += b;
    }
    let n = iters.max(1) as u32;
    Ok(StepTiming {
        forward: fwd / n,
        backward: bwd / n,
        iters,
    })
}
