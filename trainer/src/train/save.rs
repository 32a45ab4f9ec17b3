//! When and how a run writes its checkpoints: every rank's part (the optimizer state it owns
//! under ZeRO), rank 0's weights, trainer state and tokenizer files, the keep limit.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_nn::VarMap;
use llava_loader::{DataState, ShardIndex};

use super::optim::AdamW;
use super::TrainConfig;
use crate::io::checkpoint::{self, TrainerState};
use crate::model::LlavaNextConfig;
use crate::parallel::zero::{self, Sharding};
use crate::parallel::Collective;
use crate::{Error, Result};

/// Everything a checkpoint of this run is written from, but the step's own values.
pub(crate) struct CheckpointWriter<'a> {
    pub cfg: &'a TrainConfig,
    pub comm: &'a dyn Collective,
    pub index: &'a ShardIndex,
    pub model_cfg: &'a LlavaNextConfig,
    pub varmap: &'a VarMap,
    pub sharding: &'a Sharding,
    /// Names of the trainable tensors, in the optimizer's order.
    pub trainable: &'a [String],
    pub total_steps: u64,
    /// Where the checkpoint's tokenizer files come from (crate::io::checkpoint_tokenizer).
    pub tokenizer_dir: Option<&'a Path>,
    /// Stage 1 (projector only): checkpoints also write `mm_projector.bin`.
    pub projector_only: bool,
}

impl CheckpointWriter<'_> {
    /// Writes `checkpoint-<step>/` (every rank must call it: it holds barriers). Returns the
    /// folder on rank 0, the output folder on the others.
    pub(crate) fn save(
        &self,
        optim: &AdamW,
        step: u64,
        data_state: DataState,
        lr: f64,
        loss: f64,
    ) -> Result<PathBuf> {
        let (cfg, comm) = (self.cfg, self.comm);
        let (rank, world) = (comm.rank(), comm.world_size());
        let lead = rank == 0;
        crate::diag::heap::enter("checkpoint");
        // ZeRO-1/2 over several ranks: each rank writes the optimizer state it owns (nothing is
        // gathered); otherwise rank 0 holds all of it. Rank 0 writes the weights (every rank has
        // them all) and renames the folder once every shard is in.
        let sharded = self.sharding.stage >= 1 && world > 1;
        let optimizer = if sharded {
            if lead {
                checkpoint::prepare_checkpoint_tmp(&cfg.output, step)?;
            }
            comm.barrier()?;
            let tmp = checkpoint::checkpoint_tmp(&cfg.output, step);
            checkpoint::write_optimizer_shard(&tmp, rank, world, &optim.state_tensors())?;
            comm.barrier()?;
            // bf16 runs keep f32 master weights in the optimizer state.
            checkpoint::OptimizerTensors::Sharded(zero::optimizer_index(self.sharding, cfg.bf16))
        } else {
            checkpoint::OptimizerTensors::Whole(if lead {
                optim.state_tensors()
            } else {
                HashMap::new()
            })
        };
        if !lead {
            comm.barrier()?;
            return Ok(cfg.output.clone());
        }
        let state = TrainerState {
            global_step: step,
            total_steps: self.total_steps,
            data_state,
            epoch: data_state.epoch as f64,
            seed: cfg.seed,
            lr,
            last_loss: loss,
            shards_tokenizer_sha256: self.index.manifest.tokenizer_sha256.clone(),
            shards_config_sha256: self.index.manifest.config_sha256.clone(),
            config: cfg.trajectory_keys_at(world),
            trainable: self.trainable.to_vec(),
        };
        let dir = checkpoint::save_checkpoint_with(
            &cfg.output,
            self.model_cfg,
            self.varmap,
            &state,
            optimizer,
            self.tokenizer_dir,
            self.projector_only,
        )?;
        if let Some(keep) = cfg.save_total_limit {
            checkpoint::apply_keep_limit(&cfg.output, keep.max(1))?;
        }
        tracing::info!("saved {}", dir.display());
        comm.barrier()?;
        Ok::<PathBuf, Error>(dir)
    }
}
