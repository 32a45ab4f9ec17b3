//! One rank of a multi-process job started by a launcher (torchrun, Slurm's `srun`,
//! `--nproc-per-node`): join the job's collective, run the loop, then end the group in order, or
//! tell the other ranks why this one failed.

use std::sync::Arc;
use std::time::Duration;

use super::{run_joined, RunOptions, Summary, TrainConfig};
use crate::parallel::launch::LaunchEnv;
use crate::parallel::tcp::TcpGroup;
use crate::{Error, Result};

/// One CPU rank: the TCP collective, joined through torchrun's store or our rendezvous
/// ([`crate::parallel::join`]).
pub fn run_tcp_rank(
    cfg: &TrainConfig,
    env: &LaunchEnv,
    opts: RunOptions,
    rendezvous_timeout: Duration,
    collective_timeout: Duration,
) -> Result<Summary> {
    let group =
        TcpGroup::join(env, rendezvous_timeout, collective_timeout).map_err(|e| Error::Join {
            context: format!(
                "rank {} of {} ({:?} launch, MASTER_ADDR={} MASTER_PORT={})",
                env.rank, env.world_size, env.source, env.master_addr, env.master_port
            ),
            source: Box::new(e),
        })?;
    tracing::info!(
        "rank {} of {}: joined (TCP collective)",
        env.rank,
        env.world_size
    );
    run_joined(cfg, opts, Arc::new(group))
}

/// One GPU rank: NCCL on GPU `LOCAL_RANK` (`opts.device`), joined through the rendezvous, with
/// the watchdog that aborts a collective stuck after another rank failed.
#[cfg(feature = "cuda")]
pub fn run_nccl_rank(
    cfg: &TrainConfig,
    env: &LaunchEnv,
    opts: RunOptions,
    rendezvous_timeout: Duration,
) -> Result<Summary> {
    use crate::parallel::nccl::NcclGroup;
    use crate::parallel::spawn::FAILURE_GRACE;
    let device = opts
        .device
        .clone()
        .ok_or_else(|| Error::Config("a launched rank has its CUDA device".into()))?;
    let group = NcclGroup::new(env, &device, rendezvous_timeout, super::COLLECTIVE_TIMEOUT)
        .map_err(|e| Error::Join {
            context: format!(
                "rank {} of {} joining the job at {}:{}",
                env.rank, env.world_size, env.master_addr, env.master_port
            ),
            source: Box::new(e),
        })?;
    let group = Arc::new(group);
    group.watchdog(FAILURE_GRACE)?;
    run_joined(cfg, opts, group)
}

/// Without the `cuda` feature ranks in separate processes have no NCCL: says how to get it.
#[cfg(not(feature = "cuda"))]
pub fn run_nccl_rank(
    _cfg: &TrainConfig,
    env: &LaunchEnv,
    _opts: RunOptions,
    _rendezvous_timeout: Duration,
) -> Result<Summary> {
    Err(Error::Unsupported(format!(
        "launched as rank {} of {} ({:?}): ranks in separate processes need NCCL, which this \
         llava-trainer was built without; rebuild with `--features cuda` (scripts/build-cuda.sh), \
         or on the CPU run one process with --nproc-per-node N",
        env.rank, env.world_size, env.source
    )))
}
