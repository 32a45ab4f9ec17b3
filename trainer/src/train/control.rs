//! What happens after a step: go on, save, stop with a checkpoint (Ctrl-C, SIGTERM) or abort
//! (a kill), decided by rank 0 for every rank.

use std::sync::atomic::Ordering;

use candle_core::{Device, Tensor};

use super::RunOptions;
use crate::parallel::Collective;
use crate::Result;

/// What to do after a step (test hook and Ctrl-C).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Continue,
    /// Write a checkpoint and stop (Ctrl-C).
    Stop,
    /// Stop at once without a checkpoint (a kill).
    Abort,
    /// Write a checkpoint and go on (SIGUSR1).
    Save,
}

/// This rank's wish after `step` (the test hook, then SIGUSR1, then a stop flag), and, with
/// several ranks, rank 0's decision broadcast to all, so that every rank stops at the same step.
pub(crate) fn after_step(
    opts: &mut RunOptions,
    step: u64,
    comm: &dyn Collective,
    dev: &Device,
) -> Result<Control> {
    let mut control = match opts.after_step.as_mut() {
        Some(f) => f(step),
        None => Control::Continue,
    };
    if control == Control::Continue
        && opts
            .save_now
            .as_ref()
            .is_some_and(|s| s.swap(false, Ordering::SeqCst))
    {
        control = Control::Save;
    }
    if opts.stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst)) {
        control = Control::Stop;
    }
    // Rank 0 decides for everyone, so that all ranks stop at the same step.
    if comm.world_size() > 1 {
        let code = Tensor::new(control as u32 as f32, dev)?;
        control = match comm.broadcast(&code, 0)?.to_scalar::<f32>()? as u32 {
            1 => Control::Stop,
            2 => Control::Abort,
            3 => Control::Save,
            _ => Control::Continue,
        };
    }
    Ok(control)
}
