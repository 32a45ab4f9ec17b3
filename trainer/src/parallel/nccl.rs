//! NCCL backend of [`Collective`]: one process per GPU (torchrun / Slurm launch, or
//! `--nproc-per-node` on one node), collectives enqueued on candle's CUDA stream through our
//! own bindings of NCCL ([`super::nccl_lib`], loaded when the first multi-rank job starts: a
//! CUDA build runs one GPU without NCCL installed). Rank 0's NCCL unique id is shared over
//! [`rendezvous`](super::rendezvous) (or torchrun's agent store), whose connections stay open
//! as the control channel: a rank's failure (an error it reports, or its connection dropping
//! when it dies) reaches the others there, and [`Collective::barrier`] is its barrier.
//!
//! A peer that dies while a collective is in flight leaves this rank's kernels (or its call,
//! while NCCL connects) waiting for it; NCCL itself never gives up. [`NcclGroup::watchdog`] is
//! the way out (as torch's NCCL watchdog): a thread that, once the control channel reports a
//! failed rank, calls `ncclCommAbort` **without** the lock the stuck collective holds (the
//! communicator handle is an atomic the watchdog takes), so the training thread's call returns
//! with an error naming that rank; if the process is still running after a grace period, it
//! exits.
//!
//! **Compiled, never run on a GPU** (no GPU has been lent to this project's sessions; the
//! thread and TCP backends carry the tested logic). Known gaps: `ncclCommInitRank` has no
//! timeout of its own (every rank has passed the rendezvous by then); ZeRO-2's reductions run
//! on candle's stream, in order with the backward (no separate communication stream yet).

use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::cuda::cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};
use candle_core::cuda::CudaDType;
use candle_core::{CpuStorage, CudaStorage, DType, Device, InplaceOp2, Layout, Tensor};

use super::join::join;
use super::launch::LaunchEnv;
use super::nccl_lib::{DataType, Nccl, RawComm, UniqueId, SUM};
use super::rendezvous::Rendezvous;
use super::Collective;
use crate::{Error, Result};

/// One rank of an NCCL group.
pub struct NcclGroup {
    lib: &'static Nccl,
    /// The communicator; null once aborted or destroyed (whoever swaps it out ends it).
    comm: AtomicPtr<c_void>,
    /// Serialises enqueues (NCCL calls on one communicator must not be concurrent). The
    /// watchdog never takes it.
    enqueue: Mutex<()>,
    stream: Arc<CudaStream>,
    device: Device,
    control: Rendezvous,
    /// Set by [`NcclGroup::finish`]: the watchdog stops watching.
    finished: AtomicBool,
    rank: usize,
    world_size: usize,
    timeout: Duration,
}

// SAFETY: the raw communicator is only used under `enqueue` (collectives) or after being swapped
// out of the atomic (abort / destroy), and the stream handle is cudarc's thread-safe stream.
unsafe impl Send for NcclGroup {}
unsafe impl Sync for NcclGroup {}

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
        // Loaded here, not at program start: only a multi-rank CUDA job needs NCCL.
        let lib = Nccl::get()?;
        // Through torchrun's agent store when it serves one, else our rendezvous (Slurm).
        let control = join(
            env,
            |_ip, _host| {
                let id = lib.unique_id()?;
                Ok(id.internal.iter().map(|&c| c as u8).collect::<Vec<u8>>())
            },
            rendezvous_timeout,
        )?;
        let bytes: [u8; 128] = control.id.as_slice().try_into().map_err(|_| {
            Error::Distributed(format!(
                "NCCL unique id from rank 0 has {} bytes, expected 128",
                control.id.len()
            ))
        })?;
        let id = UniqueId {
            internal: bytes.map(|b| b as std::ffi::c_char),
        };
        let stream = cuda.cuda_stream();
        // ncclCommInitRank uses the current CUDA context's device.
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| Error::Distributed(format!("binding the CUDA context: {e:?}")))?;
        let mut comm: RawComm = std::ptr::null_mut();
        // SAFETY: `comm` is a valid out-pointer; `id` is rank 0's id, the same on every rank.
        lib.check("ncclCommInitRank", unsafe {
            (lib.comm_init_rank)(&mut comm, env.world_size as i32, id, env.rank as i32)
        })?;
        Ok(Self {
            lib,
            comm: AtomicPtr::new(comm),
            enqueue: Mutex::new(()),
            stream,
            device: device.clone(),
            control,
            finished: AtomicBool::new(false),
            rank: env.rank,
            world_size: env.world_size,
            timeout,
        })
    }

    /// Runs `kind` from `src` into a fresh tensor of `out_shape` on this rank's device, unless
    /// another rank failed or this one aborted.
    fn run(&self, kind: Kind, src: &Tensor, out_shape: &[usize]) -> Result<Tensor> {
        if !matches!(src.device(), Device::Cuda(_)) {
            return Err(Error::Distributed(format!(
                "NCCL collective on a tensor on {:?}",
                src.device()
            )));
        }
        if let Some((rank, msg)) = self.control.failure() {
            return Err(Error::Distributed(format!("rank {rank} failed: {msg}")));
        }
        let src = src.contiguous()?;
        let out = Tensor::zeros(out_shape, src.dtype(), src.device())?;
        let _guard = self
            .enqueue
            .lock()
            .map_err(|_| Error::Distributed("NCCL communicator poisoned".into()))?;
        let comm = self.comm.load(Ordering::SeqCst);
        if comm.is_null() {
            return Err(self.aborted_error());
        }
        out.inplace_op2(
            &src,
            &NcclOp {
                group: self,
                comm,
                kind,
            },
        )
        .map_err(|e| match self.control.failure() {
            Some((rank, msg)) => Error::Distributed(format!("rank {rank} failed: {msg}")),
            None => e.into(),
        })?;
        Ok(out)
    }

    fn aborted_error(&self) -> Error {
        match self.control.failure() {
            Some((rank, msg)) => Error::Distributed(format!("rank {rank} failed: {msg}")),
            None => Error::Distributed("NCCL communicator aborted on this rank".into()),
        }
    }

    /// Aborts the communicator (`ncclCommAbort`: pending kernels and a call blocked in NCCL
    /// end with an error) without waiting for the enqueue lock. Idempotent.
    pub fn abort_comm(&self) {
        let comm = self.comm.swap(std::ptr::null_mut(), Ordering::SeqCst);
        if !comm.is_null() {
            // SAFETY: `comm` came from ncclCommInitRank and is ended exactly once (the swap).
            let r = unsafe { (self.lib.comm_abort)(comm) };
            if let Err(e) = self.lib.check("ncclCommAbort", r) {
                tracing::warn!("{e}");
            }
        }
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
                // Not under `enqueue`: the stuck collective holds it.
                group.abort_comm();
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
    group: &'a NcclGroup,
    comm: RawComm,
    kind: Kind,
}

impl NcclOp<'_> {
    fn launch<T: CudaDType>(
        &self,
        ty: DataType,
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
        let g = self.group;
        let stream = &g.stream;
        let input = src.as_cuda_slice::<T>()?.slice(s0..s1);
        let mut output = dst.as_cuda_slice_mut::<T>()?.slice_mut(d0..d1);
        let count = s1 - s0;
        let (sp, _record_src) = input.device_ptr(stream);
        let (dp, _record_dst) = output.device_ptr_mut(stream);
        let (sp, dp) = (sp as *const c_void, dp as *mut c_void);
        let raw_stream = stream.cu_stream() as *mut c_void;
        let lib = g.lib;
        // SAFETY: device pointers of live slices of `count` elements (the output of
        // `world × count` for all-gather), on the communicator's own stream.
        let r = unsafe {
            match self.kind {
                Kind::AllReduceSum => {
                    (lib.all_reduce)(sp, dp, count, ty, SUM, self.comm, raw_stream)
                }
                Kind::ReduceSum { root } => {
                    (lib.reduce)(sp, dp, count, ty, SUM, root as i32, self.comm, raw_stream)
                }
                Kind::Broadcast { root } => {
                    (lib.broadcast)(sp, dp, count, ty, root as i32, self.comm, raw_stream)
                }
                Kind::AllGather => (lib.all_gather)(sp, dp, count, ty, self.comm, raw_stream),
            }
        };
        lib.check(&format!("NCCL {:?}", self.kind), r)
            .map_err(|e| candle_core::Error::Cuda(e.to_string().into()))
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
            DType::F32 => self.launch::<f32>(DataType::Float32, s1, l1, s2, l2),
            DType::BF16 => self.launch::<half::bf16>(DataType::Bfloat16, s1, l1, s2, l2),
            DType::F16 => self.launch::<half::f16>(DataType::Float16, s1, l1, s2, l2),
            DType::F64 => self.launch::<f64>(DataType::Float64, s1, l1, s2, l2),
            DType::U32 => self.launch::<u32>(DataType::Uint32, s1, l1, s2, l2),
            DType::I64 => self.launch::<i64>(DataType::Int64, s1, l1, s2, l2),
            DType::U8 => self.launch::<u8>(DataType::Uint8, s1, l1, s2, l2),
            other => candle_core::bail!("NCCL: unsupported dtype {other:?}"),
        }
    }
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

    /// End of training: the device's work is done, every rank meets, and the control channel
    /// closes in order (the others do not count it as a failure).
    fn finish(&self) -> Result<()> {
        self.device.synchronize()?;
        self.finished.store(true, Ordering::SeqCst);
        self.control
            .finish(self.timeout)
            .map_err(|e| Error::Distributed(format!("finishing: {e}")))
    }

    /// Tells the other ranks (through rank 0) and aborts this rank's communicator
    /// (`ncclCommAbort`, which also ends this rank's pending NCCL kernels).
    fn abort(&self, reason: &str) {
        self.control.report_failure(reason);
        self.abort_comm();
    }
}

impl Drop for NcclGroup {
    fn drop(&mut self) {
        let comm = self.comm.swap(std::ptr::null_mut(), Ordering::SeqCst);
        if !comm.is_null() {
            // SAFETY: ended exactly once (the swap); no collective runs (we are dropped).
            unsafe { (self.lib.comm_destroy)(comm) };
        }
    }
}
