//! Evaluation on `eval_shards`: rank 0 alone runs every batch of the eval shards, in one fixed
//! order (the world-size-1 plan of epoch 0), so that the value does not depend on the world size.

use std::sync::Arc;

use candle_core::{DType, Device};
use llava_loader::{
    DataState, EpochPlan, IndexOptions, Loader, LoaderConfig, PlanConfig, RankBatches, ShardIndex,
};
use serde::{Deserialize, Serialize};

use super::log::Reporter;
use super::{check_compatible, step, to_model_batch, TrainConfig};
use crate::model::{LlavaNext, LlavaNextConfig};
use crate::Result;

/// One evaluation on `eval_shards` (a log.jsonl line).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EvalLog {
    pub step: u64,
    /// Mean cross entropy over every supervised token of the eval shards.
    pub eval_loss: f64,
    /// Supervised tokens the mean is over.
    pub eval_tokens: u64,
}

impl EvalLog {
    pub(crate) fn report(&self, total_steps: u64, reporter: &mut Reporter) -> Result<()> {
        let line = format!(
            "eval at step {}/{total_steps}: eval_loss {:.4} over {} tokens",
            self.step, self.eval_loss, self.eval_tokens
        );
        reporter.report(
            self.step,
            &line,
            self,
            &[
                ("eval/loss", self.eval_loss),
                ("eval/tokens", self.eval_tokens as f64),
            ],
        )
    }
}

/// The eval shards and their fixed batches.
pub(crate) struct EvalSet {
    index: Arc<ShardIndex>,
    batches: RankBatches,
}

impl EvalSet {
    /// The eval shards of `cfg`, checked against the model and tokenizer like the training
    /// shards; None without `eval_shards`.
    pub(crate) fn open(cfg: &TrainConfig, model_cfg: &LlavaNextConfig) -> Result<Option<Self>> {
        let Some(dir) = &cfg.eval_shards else {
            return Ok(None);
        };
        let index = ShardIndex::open(dir, &IndexOptions::default())?;
        check_compatible(&index, model_cfg, cfg.tokenizer.as_deref())?;
        let plan = PlanConfig {
            seed: cfg.seed,
            world_size: 1,
            batch_size: cfg.batch_size,
            pack_length: None,
            across_batches: false,
        };
        let batches = EpochPlan::new(&index, &plan, &DataState::new(0))?.rank_batches(&index, 0)?;
        Ok(Some(Self { index, batches }))
    }

    /// Mean loss over every supervised token of the eval shards, and their number.
    pub(crate) fn evaluate(
        &self,
        model: &LlavaNext,
        model_cfg: &LlavaNextConfig,
        loader_cfg: &LoaderConfig,
        dev: &Device,
    ) -> Result<(f64, u64)> {
        let loader = Loader::new(self.index.clone(), self.batches.clone(), loader_cfg)?;
        let (mut nll, mut targets) = (0f64, 0u64);
        for b in loader {
            let b = b?;
            if b.is_empty() {
                continue;
            }
            let batch = to_model_batch(&b, model_cfg, dev)?;
            let out = step::segments::eval_loss(model, &batch)?;
            let mean = out.loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
            nll += f64::from(mean) * out.targets as f64;
            targets += out.targets as u64;
        }
        let mean = if targets > 0 {
            nll / targets as f64
        } else {
            f64::NAN
        };
        Ok((mean, targets))
    }
}
