//! Where a step's time goes (`bench` only): forward, recomputation, backward, optimizer and
//! communication spans. A span synchronises the device at its start and end so that the
//! asynchronous CUDA work it launched is counted in it; that costs throughput, so spans are
//! off (a relaxed atomic load each) unless `bench` turns them on.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use candle_core::Device;
use serde::Serialize;

/// A phase of the step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The first pass over the segments, and the head's logits and loss.
    Forward,
    /// A segment's forward run again in the backward (gradient checkpointing).
    Recompute,
    Backward,
    Optimizer,
    /// Gradient reduction and parameter gathering across ranks.
    Communication,
}

/// Seconds per phase, summed over the spans since [`enable`].
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct PhaseTimes {
    pub forward_s: f64,
    pub recompute_s: f64,
    pub backward_s: f64,
    pub optimizer_s: f64,
    pub communication_s: f64,
}

impl PhaseTimes {
    fn add(&mut self, p: Phase, d: Duration) {
        let s = d.as_secs_f64();
        match p {
            Phase::Forward => self.forward_s += s,
            Phase::Recompute => self.recompute_s += s,
            Phase::Backward => self.backward_s += s,
            Phase::Optimizer => self.optimizer_s += s,
            Phase::Communication => self.communication_s += s,
        }
    }

    /// Every phase divided by `n` (per step).
    pub fn per(self, n: usize) -> Self {
        let n = n.max(1) as f64;
        Self {
            forward_s: self.forward_s / n,
            recompute_s: self.recompute_s / n,
            backward_s: self.backward_s / n,
            optimizer_s: self.optimizer_s / n,
            communication_s: self.communication_s / n,
        }
    }
}

static ON: AtomicBool = AtomicBool::new(false);
static STATE: Mutex<Option<(Device, PhaseTimes)>> = Mutex::new(None);

/// Starts counting spans on `dev` from zero.
pub fn enable(dev: &Device) {
    if let Ok(mut s) = STATE.lock() {
        *s = Some((dev.clone(), PhaseTimes::default()));
        ON.store(true, Ordering::Relaxed);
    }
}

/// Stops counting and returns the sums.
pub fn disable() -> PhaseTimes {
    ON.store(false, Ordering::Relaxed);
    STATE
        .lock()
        .ok()
        .and_then(|mut s| s.take())
        .map(|(_, t)| t)
        .unwrap_or_default()
}

/// The sums so far, counting on.
pub fn reset() -> PhaseTimes {
    STATE
        .lock()
        .ok()
        .and_then(|mut s| s.as_mut().map(|(_, t)| std::mem::take(t)))
        .unwrap_or_default()
}

fn sync() {
    if let Ok(s) = STATE.lock() {
        if let Some((dev, _)) = s.as_ref() {
            // A failed synchronisation shows up as the next op's error.
            let _ = dev.synchronize();
        }
    }
}

/// A running span; its time is added when it is dropped.
pub struct Span {
    phase: Phase,
    start: Option<Instant>,
}

/// Opens a span of `phase` (a no-op unless [`enable`]d).
pub fn span(phase: Phase) -> Span {
    let start = if ON.load(Ordering::Relaxed) {
        sync();
        Some(Instant::now())
    } else {
        None
    };
    Span { phase, start }
}

impl Drop for Span {
    fn drop(&mut self) {
        if let Some(t0) = self.start {
            sync();
            let d = t0.elapsed();
            if let Ok(mut s) = STATE.lock() {
                if let Some((_, t)) = s.as_mut() {
                    t.add(self.phase, d);
                }
            }
        }
    }
}
