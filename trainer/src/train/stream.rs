//! Micro-batches across epochs from a resumable data state.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::{Error, Result};
use llava_loader::{DataState, EpochPlan, Loader, LoaderConfig, PlanConfig, ShardIndex};

/// Micro-batches across epochs from a data state, in groups of `accum` from one epoch.
pub(crate) struct Stream {
    pub(crate) index: Arc<ShardIndex>,
    pub(crate) plan: PlanConfig,
    pub(crate) loader_cfg: LoaderConfig,
    pub(crate) state: DataState,
    pub(crate) loader: Option<Loader>,
    pub(crate) left: usize,
    pub(crate) accum: usize,
    /// This process's rank: its share of every window of the plan.
    pub(crate) rank: usize,
}

impl Stream {
    fn open_epoch(&mut self) -> Result<()> {
        let plan = EpochPlan::new(&self.index, &self.plan, &self.state)?;
        let batches = plan.rank_batches(&self.index, self.rank)?;
        self.left = batches.len();
        self.loader = Some(Loader::new(self.index.clone(), batches, &self.loader_cfg)?);
        Ok(())
    }

    /// The next `accum` micro-batches, and the time spent waiting for them.
    pub(crate) fn next_group(&mut self) -> Result<(Vec<llava_loader::Batch>, Duration)> {
        let mut wait = Duration::ZERO;
        if self.loader.is_none() {
            self.open_epoch()?;
        }
        if self.left < self.accum {
            // Drop the epoch's remainder; the next epoch starts fresh.
            self.state = DataState::new(self.state.epoch + 1);
            self.loader = None;
            self.open_epoch()?;
            if self.left < self.accum {
                return Err(Error::Config(format!(
                    "an epoch has {} batches, fewer than grad_accum {}",
                    self.left, self.accum
                )));
            }
        }
        let loader = self
            .loader
            .as_mut()
            .ok_or_else(|| Error::Config("no loader".into()))?;
        let mut out = Vec::with_capacity(self.accum);
        for _ in 0..self.accum {
            let t = Instant::now();
            let b = loader
                .next()
                .ok_or(Error::LoaderEnded(self.state.position))??;
            wait += t.elapsed();
            self.left -= 1;
            self.state = b.next_state;
            out.push(b);
        }
        if self.left == 0 {
            self.loader = None;
        }
        Ok((out, wait))
    }
}

/// Micro-batches per epoch with a fresh plan.
pub(crate) fn batches_per_epoch(index: &ShardIndex, plan: &PlanConfig) -> Result<usize> {
    Ok(EpochPlan::new(index, plan, &DataState::new(0))?.num_steps())
}
