//! NCCL backend of [`Collective`]: one process per GPU (torchrun / Slurm launch, or
//! `--nproc-per-node` on one node), collectives enqueued on candle's CUDA stream through
//! cudarc's NCCL bindings. Rank 0's NCCL unique id is shared over
//! [`rendezvous`](super::rendezvous), whose connections stay open as the control channel: a
//! rank's failure (an error it reports, or its connection dropping when it dies) reaches the
//! others there, and [`Collective::barrier`] is its barrier.
//!
//! A peer that dies while a collective is in flight leaves this rank's kernels waiting for it;
//! NCCL itself never gives up. [`NcclGroup::watchdog`] is the way out (as torch's NCCL
//! watchdog): a thread that, once the control channel reports a failed rank, aborts the
//! communicator (`ncclCommAbort` ends the pending kernels, so the training thread gets an error
//! naming that rank) and, if the process is still running after a grace period, exits it.
//!
//! **Compiled, never run on a GPU** (no GPU has been lent to this project's sessions; the
//! thread backend carries the tested logic). Known gaps: `ncclCommInitRank` has no timeout of
//! its own (every rank has passed the rendezvous by then); gradients are reduced tensor by
//! tensor after the backward, not bucketed and overlapped with it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use candle_core::cuda::cudarc::driver::DeviceRepr;
use candle_core::cuda::cudarc::nccl::{Comm, Id, NcclType, ReduceOp};
use candle_core::cuda::CudaDType;
use candle_core::{CpuStorage, CudaStorage, DType, Device, InplaceOp2, Layout, Tensor};

use super::join::join;
use super::launch::LaunchEnv;
use super::rendezvous::Rendezvous;
use super::Collective;
use crate::{Error, Result};

/// A communicator that may move between threads. NCCL allows a communicator to be used from any
/// thread as long as calls on it are not concurrent; [`NcclGroup`] only touches it under a mutex.
struct SendComm(Comm);

// SAFETY: see above: every use is serialised by `NcclGroup::comm`'s mutex.
unsafe impl Send for SendComm {}

/// One rank of an NCCL group.
pub struct NcclGroup {
    comm: Mutex<Option<SendComm>>,
    device: Device,
    control: Rendezvous,
    /// Set by [`NcclGroup::finish`]: the watchdog stops watching.
    finished: AtomicBool,
    rank: usize,
    world_size: usize,
    timeout: Duration,
}

impl NcclGroup {
    /// Joins the group of `env` on `device` (this rank's GPU): rank 0 creates the unique id and
    /// hands it out through the rendezvous at `MASTER_ADDR:MASTER_PORT`, then every rank creates
    /// its communicator on candle's stream of `device`. `rendezvous_timeout` bounds the
    /// joining, `timeout` every barrier.
    pub fn new(
        env: &LaunchEnv,
        device: &Device,
        rendezvous_timeout: Duration,
        timeout: Duration,
    ) -> Result<Self> {
        let Device::Cuda(cuda) = device else {
            return Err(Error::Config(format!(
                "NCCL needs a CUDA device, got {device:?}"
            )));
        };
        // Through torchrun's agent store when it serves one, else our rendezvous (Slurm).
        let control = join(
            env,
            |_ip, _host| {
                let id = Id::new().map_err(|e| nccl_error("ncclGetUniqueId", e))?;
                Ok(id.internal().iter().map(|&c| c as u8).collect::<Vec<u8>>())
            },
            rendezvous_timeout,
        )?;
        let bytes: [u8; 128] = control.id.as_slice().try_into().map_err(|_| {
            Error::Distributed(format!(
                "NCCL unique id from rank 0 has {} bytes, expected 128",
                control.id.len()
            ))
        })?;
        let id = Id::uninit(bytes.map(|b| b as std::ffi::c_char));
        let comm = Comm::from_rank(cuda.cuda_stream(), env.rank, env.world_size, id)
            .map_err(|e| nccl_error("ncclCommInitRank", e))?;
        Ok(Self {
            comm: Mutex::new(Some(SendComm(comm))),
            device: device.clone(),
            control,
            finished: AtomicBool::new(false),
            rank: env.rank,
            world_size: env.world_size,
            timeout,
        })
    }

    /// The communicator, unless another rank failed or this one aborted.
    fn comm(&self) -> Result<MutexGuard<'_, Option<SendComm>>> {
        if let Some((rank, msg)) = self.control.failure() {
            return Err(Error::Distributed(format!("rank {rank} failed: {msg}")));
        }
        let guard = self
            .comm
            .lock()
            .map_err(|_| Error::Distributed("NCCL communicator poisoned".into()))?;
        if guard.is_none() {
            return Err(Error::Distributed(
                "NCCL communicator aborted on this rank".into(),
            ));
        }
        Ok(guard)
    }

    /// Runs `kind` from `src` into a fresh tensor of `out_shape` on this rank's device.
    fn run(&self, kind: Kind, src: &Tensor, out_shape: &[usize]) -> Result<Tensor> {
        if !matches!(src.device(), Device::Cuda(_)) {
            return Err(Error::Distributed(format!(
                "NCCL collective on a tensor on {:?}",
                src.device()
            )));
        }
        let src = src.contiguous()?;
        let out = Tensor::zeros(out_shape, src.dtype(), src.device())?;
        let guard = self.comm()?;
        let comm = &guard.as_ref().expect("checked by comm()").0;
        out.inplace_op2(&src, &NcclOp { comm, kind })?;
        Ok(out)
    }

    /// Starts the watchdog thread (see the module doc): polls the control channel every
    /// 200 ms; on a failed rank, aborts this rank's communicator, and exits the process with
    /// status 1 if it has not ended `grace` later.
    pub fn watchdog(self: &Arc<Self>, grace: Duration) -> Result<()> {
        let group = Arc::clone(self);
        std::thread::Builder::new()
            .name("nccl-watchdog".into())
            .spawn(move || {
                let failure = loop {
                    if group.finished.load(Ordering::SeqCst) {
                        return;
                    }
                    if let Some(f) = group.control.failure() {
                        break f;
                    }
                    std::thread::sleep(Duration::from_millis(200));
                };
                let (rank, msg) = failure;
                tracing::error!(
                    "rank {rank} failed: {msg}; rank {} aborts its NCCL communicator",
                    group.rank
                );
                if let Ok(mut guard) = group.comm.lock() {
                    drop(guard.take());
                }
                let until = Instant::now() + grace;
                while Instant::now() < until {
                    if group.finished.load(Ordering::SeqCst) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
                eprintln!(
                    "rank {}: rank {rank} failed ({msg}) and this rank did not stop within {:.0} s; \
                     exiting",
                    group.rank,
                    grace.as_secs_f64()
                );
                std::process::exit(1);
            })
            .map_err(|e| Error::Distributed(format!("starting the NCCL watchdog: {e}")))?;
        Ok(())
    }

    /// End of training: the device's work is done, every rank meets, and the control channel
    /// closes in order (the others do not count it as a failure).
    pub fn finish(&self) -> Result<()> {
        self.device.synchronize()?;
        self.finished.store(true, Ordering::SeqCst);
        self.control
            .finish(self.timeout)
            .map_err(|e| Error::Distributed(format!("finishing: {e}")))
    }
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    AllReduceSum,
    ReduceSum { root: usize },
    Broadcast { root: usize },
    AllGather,
}

/// One collective as a candle in-place op: `s1` (the output, contiguous) from `s2` (the input).
struct NcclOp<'a> {
    comm: &'a Comm,
    kind: Kind,
}

impl NcclOp<'_> {
    fn launch<T: CudaDType + NcclType + DeviceRepr>(
        &self,
        dst: &mut CudaStorage,
        dst_layout: &Layout,
        src: &CudaStorage,
        src_layout: &Layout,
    ) -> candle_core::Result<()> {
        let (Some((d0, d1)), Some((s0, s1))) = (
            dst_layout.contiguous_offsets(),
            src_layout.contiguous_offsets(),
        ) else {
            candle_core::bail!("NCCL operands must be contiguous");
        };
        let input = src.as_cuda_slice::<T>()?.slice(s0..s1);
        let mut output = dst.as_cuda_slice_mut::<T>()?.slice_mut(d0..d1);
        let root = |r: usize| r as i32;
        let rank = self.comm.rank();
        let res = match self.kind {
            Kind::AllReduceSum => self.comm.all_reduce(&input, &mut output, &ReduceOp::Sum),
            Kind::ReduceSum { root: r } => {
                self.comm
                    .reduce(&input, Some(&mut output), &ReduceOp::Sum, root(r))
            }
            Kind::Broadcast { root: r } => {
                let send = (rank == r).then_some(&input);
                self.comm.broadcast(send, &mut output, root(r))
            }
            Kind::AllGather => self.comm.all_gather(&input, &mut output),
        };
        res.map(|_| ())
            .map_err(|e| candle_core::Error::Cuda(format!("NCCL {:?}: {e:?}", self.kind).into()))
    }
}

impl InplaceOp2 for NcclOp<'_> {
    fn name(&self) -> &'static str {
        "nccl"
    }

    fn cpu_fwd(
        &self,
        _: &mut CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<()> {
        candle_core::bail!("NCCL collectives need CUDA tensors")
    }

    fn cuda_fwd(
        &self,
        s1: &mut CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        use candle_core::backend::BackendStorage;
        match s2.dtype() {
            DType::F32 => self.launch::<f32>(s1, l1, s2, l2),
            DType::BF16 => self.launch::<half::bf16>(s1, l1, s2, l2),
            DType::F16 => self.launch::<half::f16>(s1, l1, s2, l2),
            DType::F64 => self.launch::<f64>(s1, l1, s2, l2),
            DType::U32 => self.launch::<u32>(s1, l1, s2, l2),
            DType::I64 => self.launch::<i64>(s1, l1, s2, l2),
            DType::U8 => self.launch::<u8>(s1, l1, s2, l2),
            other => candle_core::bail!("NCCL: unsupported dtype {other:?}"),
        }
    }
}

fn nccl_error(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Distributed(format!("{what}: {e:?}"))
}

impl Collective for NcclGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        self.run(Kind::AllReduceSum, t, t.dims())
    }

    fn reduce_sum(&self, t: &Tensor, root: usize) -> Result<Option<Tensor>> {
        let out = self.run(Kind::ReduceSum { root }, t, t.dims())?;
        Ok((self.rank == root).then_some(out))
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        self.run(Kind::Broadcast { root }, t, t.dims())
    }

    fn all_gather(&self, t: &Tensor) -> Result<Vec<Tensor>> {
        let mut shape = vec![self.world_size];
        shape.extend_from_slice(t.dims());
        let all = self.run(Kind::AllGather, t, &shape)?;
        (0..self.world_size)
            .map(|r| Ok(all.get(r)?))
            .collect::<Result<Vec<_>>>()
    }

    /// The device's queued work is finished, then every rank meets on the control channel.
    fn barrier(&self) -> Result<()> {
        self.device.synchronize()?;
        self.control
            .barrier(self.timeout)
            .map_err(|e| Error::Distributed(format!("barrier: {e}")))
    }

    /// Tells the other ranks (through rank 0) and aborts this rank's communicator
    /// (`ncclCommAbort`, which also ends this rank's pending NCCL kernels).
    fn abort(&self, reason: &str) {
        self.control.report_failure(reason);
        if let Ok(mut guard) = self.comm.lock() {
            drop(guard.take());
        }
    }
}
