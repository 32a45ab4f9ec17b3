//! How the ranks of a run are laid out: one process, threads, processes this binary starts, or
//! one rank of a launcher's job, from `--nproc-per-node`, the device and the launcher's variables.

use super::launch::{LaunchEnv, LaunchSource};
use crate::{Error, Result};

/// Where this process's rank(s) run.
#[derive(Debug)]
pub enum Layout {
    /// One rank in this process.
    Single,
    /// `--nproc-per-node N` on the CPU: N threads over the in-process backend.
    Threads(usize),
    /// `--nproc-per-node N` on CUDA (or CPU processes) without a launcher: start N processes of
    /// this binary with torchrun's variables and supervise them.
    SpawnLocal(usize),
    /// One rank of a torchrun / Slurm / `--nproc-per-node` job: NCCL.
    Launched(LaunchEnv),
    /// One CPU rank of such a job: the TCP collective.
    LaunchedCpu(LaunchEnv),
}

impl Layout {
    /// The layout for `nproc` ranks per node (`--nproc-per-node`) of this launch, on the CPU or
    /// not; `cpu_ranks` (`processes` or `threads`) says how CPU ranks run without a launcher.
    pub fn choose(env: LaunchEnv, nproc: usize, cpu: bool, cpu_ranks: &str) -> Result<Layout> {
        let nproc = nproc.max(1);
        let launched = env.source != LaunchSource::Single;
        Ok(match (launched, nproc, cpu) {
            (true, n, _) if n > 1 => {
                return Err(Error::Config(format!(
                    "--nproc-per-node {n} inside a {:?} launch (rank {} of {}): the launcher \
                     already started the ranks; drop --nproc-per-node",
                    env.source, env.rank, env.world_size
                )))
            }
            (true, _, true) if env.world_size == 1 => Layout::Single,
            (true, _, true) => Layout::LaunchedCpu(env),
            (true, _, false) => Layout::Launched(env),
            (false, 1, _) => Layout::Single,
            (false, n, true) => match cpu_ranks {
                "threads" => Layout::Threads(n),
                "processes" => Layout::SpawnLocal(n),
                other => {
                    return Err(Error::Config(format!(
                        "--cpu-ranks {other:?}: expected processes or threads"
                    )))
                }
            },
            (false, n, false) => Layout::SpawnLocal(n),
        })
    }

    /// Whether this process is rank 0 (it logs and shows progress).
    pub fn is_lead(&self) -> bool {
        !matches!(self, Layout::Launched(env) | Layout::LaunchedCpu(env) if env.rank != 0)
    }
}
