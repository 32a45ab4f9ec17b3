//! Data parallelism: collective operations behind one interface, and which rank owns which
//! parameter's optimizer state (ZeRO).
//!
//! Backends: [`threads::ThreadGroup`] runs every rank as a thread of one process and sums in
//! rank order (deterministic; CPU runs and the tests); [`tcp::TcpGroup`] runs CPU ranks as
//! processes (torchrun, srun, `--nproc-per-node`) with the same sums over TCP. NCCL (our own
//! bindings, [`nccl_lib`], loaded at run time; collectives on candle's CUDA stream) is the
//! multi-GPU backend: `nccl::NcclGroup` with the `cuda` feature, compiled but never run on a
//! GPU; [`launch`] (torchrun / Slurm
//! environments) and [`rendezvous`] (rank 0 shares NCCL's unique id over TCP and relays
//! failures) are its launch side; [`join`] picks between our rendezvous and torchrun's agent
//! store ([`store`], the c10d TCPStore client). [`layout`] decides how a run's ranks are laid
//! out; [`spawn`] starts and supervises a one-node job's rank processes itself.

pub mod join;
pub mod launch;
pub mod layout;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod nccl_lib;
pub mod rendezvous;
pub mod spawn;
pub mod store;
pub mod tcp;
pub mod threads;
pub mod zero;

use candle_core::Tensor;

use crate::Result;

/// The collectives the trainer uses. Every rank calls the same operations in the same order
/// (the training loop guarantees it); a failed rank makes the others' calls return an error
/// naming it instead of hanging.
pub trait Collective: Send + Sync {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Sum over ranks, on every rank.
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor>;
    /// Sum over ranks, delivered to `root` (the others get None): ZeRO-2's gradient reduction
    /// with whole-tensor shards (NCCL `reduce`; a reduce-scatter over a flat buffer is the
    /// same data movement).
    fn reduce_sum(&self, t: &Tensor, root: usize) -> Result<Option<Tensor>>;
    /// `root`'s tensor on every rank (`t` is ignored elsewhere but gives the shape).
    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor>;
    /// Every rank's tensor, in rank order.
    fn all_gather(&self, t: &Tensor) -> Result<Vec<Tensor>>;
    fn barrier(&self) -> Result<()>;
    /// Tells the other ranks that this one failed (their pending and next calls error).
    fn abort(&self, reason: &str);
    /// End of training: every rank meets and the group closes in order, so that the others
    /// do not count this rank's exit as a failure. Nothing to do in one process.
    fn finish(&self) -> Result<()> {
        Ok(())
    }
}

/// `WORLD_SIZE` (torchrun) or `SLURM_NTASKS` (srun) of this process's launch; 1 when neither is
/// set.
pub fn launch_world_size() -> usize {
    ["WORLD_SIZE", "SLURM_NTASKS"]
        .iter()
        .find_map(|k| std::env::var(k).ok().and_then(|v| v.parse().ok()))
        .unwrap_or(1)
}

/// A world of one: every collective is the identity.
#[derive(Debug, Default, Clone, Copy)]
pub struct Single;

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.clone())
    }
    fn reduce_sum(&self, t: &Tensor, _root: usize) -> Result<Option<Tensor>> {
        Ok(Some(t.clone()))
    }
    fn broadcast(&self, t: &Tensor, _root: usize) -> Result<Tensor> {
        Ok(t.clone())
    }
    fn all_gather(&self, t: &Tensor) -> Result<Vec<Tensor>> {
        Ok(vec![t.clone()])
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn abort(&self, _reason: &str) {}
}
