//! The start of a run, before its first step: settings and memory checks, the model from its
//! source, the data plan, and resuming (weights, optimizer state, data position) from a
//! checkpoint.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Var};
use candle_nn::VarMap;
use llava_loader::{DataState, PlanConfig, ShardIndex};

use super::log::gib;
use super::optim::{AdamW, AdamWConfig};
use super::{check_compatible, memory_plan, source_config, TrainConfig, TunableParts};
use crate::diag::memory;
use crate::io::checkpoint::{self, TrainerState};
use crate::io::init;
use crate::model::attention::AttentionKind;
use crate::model::{LlavaNext, LlavaNextConfig};
use crate::parallel::zero::Sharding;
use crate::{Error, Result};

/// Settings no run can start with.
pub(crate) fn check_settings(cfg: &TrainConfig) -> Result<()> {
    if cfg.grad_accum == 0 || cfg.log_every == 0 || cfg.workers == 0 {
        return Err(Error::Config(
            "grad_accum, log_every and workers must be at least 1".into(),
        ));
    }
    Ok(())
}

/// Refuses a run that cannot fit before reading gigabytes of weights (unless
/// `skip_memory_check`), and logs the plan.
pub(crate) fn check_memory(
    cfg: &TrainConfig,
    index: &ShardIndex,
    world: usize,
    dev: &Device,
) -> Result<()> {
    let (plan, advice) = memory_plan(
        cfg,
        &source_config(&cfg.source)?,
        index,
        world,
        memory::device_capacity(dev),
    )?;
    tracing::info!(
        "memory plan per device: {:.2} GiB (weights {:.2}, gradients {:.2}, optimizer {:.2}, \
         activations {:.2})",
        gib(plan.total),
        gib(plan.weights),
        gib(plan.gradients),
        gib(plan.optimizer),
        gib(plan.activations)
    );
    if let Some(advice) = advice {
        if cfg.skip_memory_check {
            tracing::warn!("{advice} (skip_memory_check is set: trying anyway)");
        } else {
            return Err(Error::Config(format!(
                "{advice} (skip_memory_check = true to try anyway)"
            )));
        }
    }
    Ok(())
}

/// The model's config and variables from the run's source, with the run's overrides, checked
/// against the shards.
pub(crate) fn load_model(
    cfg: &TrainConfig,
    index: &ShardIndex,
    dtype: DType,
    dev: &Device,
) -> Result<(LlavaNextConfig, VarMap)> {
    let (mut model_cfg, varmap) = init::load_source(&cfg.source, cfg.seed, dtype, dev)?;
    if let Some(m) = cfg.merge_type {
        model_cfg.mm_patch_merge_type = m;
    }
    if model_cfg.tokenizer_model_max_length.is_none() {
        model_cfg.tokenizer_model_max_length = Some(index.manifest.settings.model_max_length);
    }
    check_compatible(index, &model_cfg, cfg.tokenizer.as_deref())?;
    Ok((model_cfg, varmap))
}

/// The epoch plan's settings for `world` ranks.
pub(crate) fn plan_config(cfg: &TrainConfig, index: &ShardIndex, world: usize) -> PlanConfig {
    PlanConfig {
        seed: cfg.seed,
        world_size: world,
        batch_size: cfg.batch_size,
        pack_length: PlanConfig::packing_length(
            index,
            cfg.packing,
            cfg.pack_across_batches,
            cfg.pack_length,
        ),
        across_batches: cfg.pack_across_batches,
    }
}

/// The checkpoint to resume from: `resume`, else the latest in `output` unless `no_resume`.
pub(crate) fn resume_dir(cfg: &TrainConfig) -> Option<PathBuf> {
    match (&cfg.resume, cfg.no_resume) {
        (Some(p), _) => Some(p.clone()),
        (None, false) => checkpoint::list_checkpoints(&cfg.output)
            .pop()
            .map(|(_, p)| p),
        (None, true) => None,
    }
}

/// The trainer state of the checkpoint `dir` to resume from (checked to be a checkpoint).
pub(crate) fn resume_state(dir: &Path) -> Result<TrainerState> {
    checkpoint::check_is_checkpoint(dir)?;
    checkpoint::load_state_json(dir)
}

/// Whether the checkpoint already is this run's last step (same settings, same shards): nothing
/// to train, and no weights to read.
pub(crate) fn is_finished(
    state: &TrainerState,
    cfg: &TrainConfig,
    world: usize,
    index: &ShardIndex,
    total_steps: u64,
) -> bool {
    state.global_step >= total_steps
        && state.config == cfg.trajectory_keys_at(world)
        && state.shards_tokenizer_sha256 == index.manifest.tokenizer_sha256
        && state.shards_config_sha256 == index.manifest.config_sha256
}

/// Checks that the checkpoint `dir` (whose state is `state`) was written by this run's settings
/// on these shards, and puts its weights into `varmap` (the optimizer state is read later, per
/// rank).
pub(crate) fn restore_weights(
    dir: &Path,
    state: &TrainerState,
    cfg: &TrainConfig,
    world: usize,
    index: &ShardIndex,
    varmap: &VarMap,
    dev: &Device,
) -> Result<()> {
    if state.config != cfg.trajectory_keys_at(world) {
        return Err(Error::Checkpoint {
            path: dir.into(),
            msg: format!(
                "written with other settings: {} (this run: {}); use --no-resume or \
                 another --output",
                state.config,
                cfg.trajectory_keys_at(world)
            ),
        });
    }
    if state.shards_tokenizer_sha256 != index.manifest.tokenizer_sha256
        || state.shards_config_sha256 != index.manifest.config_sha256
    {
        return Err(Error::Checkpoint {
            path: dir.into(),
            msg: "trained on other shards (manifest checksums differ)".into(),
        });
    }
    let weights =
        candle_core::safetensors::load(dir.join("model.safetensors"), dev).map_err(|source| {
            Error::Read {
                path: dir.join("model.safetensors"),
                source,
            }
        })?;
    let data = varmap
        .data()
        .lock()
        .map_err(|_| Error::Poisoned("VarMap"))?;
    for (name, var) in data.iter() {
        let t = weights.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.clone(),
            searched: dir.join("model.safetensors").display().to_string(),
        })?;
        var.set(&t.to_dtype(var.dtype())?)?;
    }
    Ok(())
}

/// The model over `varmap` with the run's attention and loss chunk, and its trainable
/// variables (by `parts`).
pub(crate) fn build_model(
    cfg: &TrainConfig,
    model_cfg: &LlavaNextConfig,
    varmap: &VarMap,
    parts: &TunableParts,
) -> Result<(LlavaNext, Vec<(String, Var)>)> {
    let (mut model, trainable) =
        crate::model::trainable::build_model(model_cfg, varmap, &|n| parts.is_trainable(n))?;
    let attention: AttentionKind = cfg
        .attention
        .parse()
        .map_err(|e| Error::Config(format!("attention: {e}")))?;
    model.set_attention(attention, AttentionKind::Dense);
    model.set_loss_chunk(cfg.loss_chunk);
    Ok((model, trainable))
}

/// AdamW with the run's settings over the variables this rank steps.
pub(crate) fn optimizer(cfg: &TrainConfig, owned: Vec<(String, Var)>) -> Result<AdamW> {
    AdamW::new(
        AdamWConfig {
            lr: cfg.lr,
            vision_tower_lr: cfg.vision_tower_lr,
            weight_decay: cfg.weight_decay,
            max_grad_norm: Some(cfg.max_grad_norm),
            ..AdamWConfig::default()
        },
        owned,
    )
}

/// Loads this rank's share of the optimizer state of `dir` (whatever world size wrote it) and
/// returns where the run is: its data state and step.
pub(crate) fn restore_optimizer(
    dir: &Path,
    state: TrainerState,
    trainable: &[String],
    sharding: &Sharding,
    rank: usize,
    optim: &mut AdamW,
) -> Result<(DataState, u64)> {
    if state.trainable != trainable {
        return Err(Error::Checkpoint {
            path: dir.into(),
            msg: "other trainable parameters".into(),
        });
    }
    // Only this rank's shard is read, whatever world size wrote the checkpoint.
    let tensors = checkpoint::load_optimizer_for(dir, &|k| {
        k.split_once('.')
            .is_some_and(|(_, n)| sharding.steps(rank, n))
    })?;
    optim.load_state(tensors, state.global_step)?;
    tracing::info!(
        "resuming from {} at step {}",
        dir.display(),
        state.global_step
    );
    Ok((state.data_state, state.global_step))
}

/// The model and variables of a run's start (for tests and tools).
pub fn load_for_training(
    cfg: &TrainConfig,
    dev: &Device,
) -> Result<(LlavaNextConfig, VarMap, LlavaNext)> {
    let dtype = if cfg.bf16 { DType::BF16 } else { DType::F32 };
    let parts = TunableParts::parse(&cfg.tunable_parts)?;
    let (c, vm) = init::load_source(&cfg.source, cfg.seed, dtype, dev)?;
    let (m, _) = crate::model::trainable::build_model(&c, &vm, &|n| parts.is_trainable(n))?;
    Ok((c, vm, m))
}
