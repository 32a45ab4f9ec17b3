//! CPU ranks in separate processes: [`Collective`] over TCP, for `torchrun … --device cpu`,
//! `srun`, and `--nproc-per-node N --device cpu`. A correctness path (and the way every launch
//! feature is tested without GPUs), not a fast one.
//!
//! Topology: a star. Every rank `r > 0` holds one data connection to rank 0, which collects
//! every rank's tensor, computes the result exactly as the thread backend does (sums in rank
//! order: bit-identical to [`ThreadGroup`](super::threads::ThreadGroup)) and sends each rank
//! what it needs. Rank 0's data address is the rendezvous id ([`join`]); the rendezvous
//! connections stay open as the control channel, so a failed rank is named to every other.
//!
//! No call blocks for good: every read and write wakes every 100 ms to look at the control
//! channel, at [`TcpGroup::abort_local`] (the watchdog's way to end a collective that never
//! completes) and at the collective timeout, whose error names the rank being waited for.
//!
//! Data frames (integers little-endian): request `r → 0`: op `u8`, root `u32`, sequence `u64`,
//! then a tensor count `u32` and the tensors; reply `0 → r`: count `u32`, tensors. A tensor:
//! dtype `u8`, rank `u8`, dims `u64` each, then its elements (bf16/f16 travel as f32, exactly).

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};

use super::join::join;
use super::launch::LaunchEnv;
use super::rendezvous::Rendezvous;
use super::Collective;
use crate::{Error, Result};

const HELLO: &[u8; 8] = b"LLVTCPC1";
/// How often a waiting call looks at failures, aborts and its deadline.
const POLL: Duration = Duration::from_millis(100);
/// Ranks other than 0 wait this much longer than rank 0, so that rank 0's timeout (which names
/// the rank it waited for) reaches them before their own (which can only name rank 0).
const FOLLOWER_SLACK: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    AllReduce = 1,
    Reduce = 2,
    Broadcast = 3,
    AllGather = 4,
    Barrier = 5,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::AllReduce => "all-reduce",
            Op::Reduce => "reduce",
            Op::Broadcast => "broadcast",
            Op::AllGather => "all-gather",
            Op::Barrier => "barrier",
        }
    }
}

/// One rank of a job whose ranks are CPU processes.
pub struct TcpGroup {
    rank: usize,
    world: usize,
    control: Rendezvous,
    /// Rank 0: the connections to ranks 1..world (index r - 1); others: the one to rank 0.
    links: Mutex<Vec<TcpStream>>,
    seq: AtomicU64,
    timeout: Duration,
    /// Set by [`TcpGroup::abort_local`]: the reason every pending and later call fails with.
    aborted: Mutex<Option<String>>,
}

fn dist(msg: String) -> Error {
    Error::Distributed(msg)
}

impl TcpGroup {
    /// Joins the job of `env` ([`join`]: torchrun's store or our own rendezvous), then opens
    /// the data connections. `rendezvous_timeout` bounds the joining, `timeout` each collective.
    pub fn join(env: &LaunchEnv, rendezvous_timeout: Duration, timeout: Duration) -> Result<Self> {
        let mut listener: Option<TcpListener> = None;
        let control = join(
            env,
            |ip: IpAddr, host: &str| {
                let l = TcpListener::bind(SocketAddr::new(ip, 0))
                    .map_err(|e| dist(format!("rank 0: binding a data port on {ip}: {e}")))?;
                let port = l
                    .local_addr()
                    .map_err(|e| dist(format!("rank 0: data port: {e}")))?
                    .port();
                listener = Some(l);
                Ok(format!("{host}:{port}").into_bytes())
            },
            rendezvous_timeout,
        )?;
        let deadline = Instant::now() + rendezvous_timeout;
        let links = if env.world_size == 1 {
            Vec::new()
        } else if env.rank == 0 {
            let l = listener.ok_or_else(|| dist("rank 0 has no data listener".into()))?;
            accept_all(&l, env.world_size, deadline)?
        } else {
            let addr = String::from_utf8_lossy(&control.id).into_owned();
            vec![connect_to(&addr, env.rank, deadline)?]
        };
        for s in &links {
            s.set_read_timeout(Some(POLL))
                .and_then(|()| s.set_write_timeout(Some(POLL)))
                .and_then(|()| s.set_nodelay(true))
                .map_err(|e| dist(format!("configuring a data connection: {e}")))?;
        }
        Ok(Self {
            rank: env.rank,
            world: env.world_size,
            control,
            links: Mutex::new(links),
            seq: AtomicU64::new(0),
            timeout,
            aborted: Mutex::new(None),
        })
    }

    /// Makes this rank's pending and later collectives fail with `reason` at their next poll,
    /// without telling the others (the watchdog's tool; [`Collective::abort`] also tells them).
    pub fn abort_local(&self, reason: &str) {
        let mut a = self.aborted.lock().unwrap_or_else(|e| e.into_inner());
        a.get_or_insert_with(|| reason.to_string());
    }

    /// The first failure of another rank that the control channel has seen.
    pub fn failure(&self) -> Option<(usize, String)> {
        self.control.failure()
    }

    fn links(&self) -> Result<MutexGuard<'_, Vec<TcpStream>>> {
        self.links
            .lock()
            .map_err(|_| dist("TCP collective poisoned by a panicking thread".into()))
    }

    /// Errors if the call should stop waiting: aborted here, another rank failed, or past the
    /// deadline (naming the rank waited for).
    fn check(&self, peer: usize, deadline: Instant, what: &str) -> Result<()> {
        if let Some(reason) = self
            .aborted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            return Err(dist(format!(
                "rank {}: {what} aborted: {reason}",
                self.rank
            )));
        }
        if let Some((r, m)) = self.control.failure() {
            return Err(dist(format!("rank {r} failed: {m}")));
        }
        if Instant::now() >= deadline {
            return Err(dist(format!(
                "rank {}: timed out after {:.0} s waiting for rank {peer} in {what} (stuck, \
                 hung or much slower?)",
                self.rank,
                self.timeout.as_secs_f64()
            )));
        }
        Ok(())
    }

    /// A connection that ended: name the failure the control channel reports, if it comes.
    fn lost(&self, peer: usize, what: &str) -> Error {
        let until = Instant::now() + Duration::from_secs(2);
        while Instant::now() < until {
            if let Some((r, m)) = self.control.failure() {
                return dist(format!("rank {r} failed: {m}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        dist(format!(
            "rank {}: the connection to rank {peer} ended during {what} (process exited?)",
            self.rank
        ))
    }

    fn read_full(
        &self,
        s: &mut TcpStream,
        buf: &mut [u8],
        peer: usize,
        deadline: Instant,
        what: &str,
    ) -> Result<()> {
        self.transfer_all(buf.len(), peer, deadline, what, |pos| {
            s.read(&mut buf[pos..])
        })
    }

    fn write_full(
        &self,
        s: &mut TcpStream,
        buf: &[u8],
        peer: usize,
        deadline: Instant,
        what: &str,
    ) -> Result<()> {
        self.transfer_all(buf.len(), peer, deadline, what, |pos| s.write(&buf[pos..]))
    }

    /// Calls `step(pos)` (one `read` or `write` from byte `pos`) until `len` bytes moved; a
    /// timeout or interruption checks the deadline and the peer, a closed or failed socket is
    /// the peer lost.
    fn transfer_all(
        &self,
        len: usize,
        peer: usize,
        deadline: Instant,
        what: &str,
        mut step: impl FnMut(usize) -> io::Result<usize>,
    ) -> Result<()> {
        let mut pos = 0;
        while pos < len {
            match step(pos) {
                Ok(0) => return Err(self.lost(peer, what)),
                Ok(n) => pos += n,
                Err(e) if retry(&e) => self.check(peer, deadline, what)?,
                Err(_) => return Err(self.lost(peer, what)),
            }
        }
        Ok(())
    }

    fn read_tensors(
        &self,
        s: &mut TcpStream,
        peer: usize,
        deadline: Instant,
        what: &str,
    ) -> Result<Vec<Tensor>> {
        let mut n = [0u8; 4];
        self.read_full(s, &mut n, peer, deadline, what)?;
        let n = u32::from_le_bytes(n) as usize;
        if n > self.world.max(1) {
            return Err(dist(format!(
                "rank {peer} sent {n} tensors in {what}: the ranks disagree on the collective"
            )));
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let mut head = [0u8; 2];
            self.read_full(s, &mut head, peer, deadline, what)?;
            let mut dims = vec![0u8; 8 * head[1] as usize];
            self.read_full(s, &mut dims, peer, deadline, what)?;
            let dims: Vec<usize> = dims
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as usize)
                .collect();
            let (dtype, wire) = wire_dtype(head[0])?;
            let count: usize = dims.iter().product();
            let mut bytes = vec![0u8; count * wire.size_in_bytes()];
            self.read_full(s, &mut bytes, peer, deadline, what)?;
            out.push(decode(&bytes, wire, &dims)?.to_dtype(dtype)?);
        }
        Ok(out)
    }

    /// One collective: every rank sends its part to rank 0; rank 0 answers each rank.
    fn exchange(&self, op: Op, root: usize, t: Option<&Tensor>) -> Result<Vec<Tensor>> {
        let what = op.name();
        let seq = self.seq.fetch_add(1, Ordering::SeqCst);
        let dev = t.map_or(Device::Cpu, |t| t.device().clone());
        let mut links = self.links()?;
        if self.rank == 0 {
            let deadline = Instant::now() + self.timeout;
            self.check(0, deadline, what)?;
            // Sums fold each rank's tensor in as it arrives (rank order, as
            // `sum_in_rank_order`): one incoming tensor at a time, not world of them.
            let summing = matches!(op, Op::AllReduce | Op::Reduce);
            let mut parts: Vec<Option<Tensor>> = vec![t.cloned()];
            let mut sum: Option<Tensor> = if summing { t.cloned() } else { None };
            for (i, s) in links.iter_mut().enumerate() {
                let r = i + 1;
                let mut head = [0u8; 13];
                self.read_full(s, &mut head, r, deadline, what)?;
                let (their_op, their_root) = (
                    head[0],
                    u32::from_le_bytes(head[1..5].try_into().unwrap_or([0; 4])),
                );
                let their_seq = u64::from_le_bytes(head[5..13].try_into().unwrap_or([0; 8]));
                if their_op != op as u8 || their_root as usize != root || their_seq != seq {
                    return Err(dist(format!(
                        "rank {r} called collective #{their_seq} (op {their_op}, root \
                         {their_root}) while rank 0 called #{seq} ({what}, root {root}): the \
                         ranks ran different code paths"
                    )));
                }
                let mut got = self.read_tensors(s, r, deadline, what)?;
                if summing {
                    let (Some(acc), Some(x)) = (sum.take(), got.pop()) else {
                        return Err(dist(format!("{what}: rank {r} or rank 0 sent nothing")));
                    };
                    sum = Some((acc + x.to_device(&dev)?)?);
                } else {
                    parts.push(got.pop());
                }
            }
            let total = || sum.clone().ok_or_else(|| dist(format!("{what}: no sum")));
            let to_dev = |x: Tensor| x.to_device(&dev).map_err(Error::from);
            let (mine, reply): (Vec<Tensor>, Vec<Vec<Tensor>>) = match op {
                Op::AllReduce => {
                    // One frame for every rank.
                    let sum = total()?;
                    let frame = encode_tensors(std::slice::from_ref(&sum))?;
                    for (i, s) in links.iter_mut().enumerate() {
                        self.write_full(s, &frame, i + 1, deadline, what)?;
                    }
                    return Ok(vec![sum]);
                }
                Op::Reduce => {
                    let sum = total()?;
                    let reply = (1..self.world)
                        .map(|r| if r == root { vec![sum.clone()] } else { vec![] })
                        .collect();
                    (if root == 0 { vec![sum] } else { vec![] }, reply)
                }
                Op::Broadcast => {
                    let b = parts
                        .get(root)
                        .cloned()
                        .flatten()
                        .ok_or_else(|| dist(format!("broadcast: rank {root} sent nothing")))?;
                    (vec![b.clone()], vec![vec![b]; self.world - 1])
                }
                Op::AllGather => {
                    let all = parts
                        .into_iter()
                        .enumerate()
                        .map(|(r, x)| {
                            x.ok_or_else(|| dist(format!("all-gather: rank {r} sent nothing")))
                        })
                        .collect::<Result<Vec<_>>>()?;
                    (all.clone(), vec![all; self.world - 1])
                }
                Op::Barrier => (vec![], vec![vec![]; self.world - 1]),
            };
            for (i, (s, ts)) in links.iter_mut().zip(reply).enumerate() {
                let frame = encode_tensors(&ts)?;
                self.write_full(s, &frame, i + 1, deadline, what)?;
            }
            mine.into_iter().map(to_dev).collect()
        } else {
            let deadline = Instant::now() + self.timeout + FOLLOWER_SLACK;
            self.check(0, deadline, what)?;
            let s = links
                .get_mut(0)
                .ok_or_else(|| dist("no connection to rank 0".into()))?;
            let mut frame = vec![op as u8];
            frame.extend_from_slice(&(root as u32).to_le_bytes());
            frame.extend_from_slice(&seq.to_le_bytes());
            frame.extend_from_slice(&encode_tensors(
                t.into_iter().cloned().collect::<Vec<_>>().as_slice(),
            )?);
            self.write_full(s, &frame, 0, deadline, what)?;
            let got = self.read_tensors(s, 0, deadline, what)?;
            got.into_iter()
                .map(|x| x.to_device(&dev).map_err(Error::from))
                .collect()
        }
    }
}

fn retry(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

fn accept_all(l: &TcpListener, world: usize, deadline: Instant) -> Result<Vec<TcpStream>> {
    l.set_nonblocking(true)
        .map_err(|e| dist(format!("rank 0: data listener: {e}")))?;
    let mut slots: Vec<Option<TcpStream>> = (1..world).map(|_| None).collect();
    while slots.iter().any(Option::is_none) {
        if Instant::now() >= deadline {
            let missing: Vec<usize> = (1..world).filter(|r| slots[r - 1].is_none()).collect();
            return Err(dist(format!(
                "rank 0: ranks {missing:?} joined the rendezvous but never opened their data \
                 connection"
            )));
        }
        let mut s = match l.accept() {
            Ok((s, _)) => s,
            Err(e) if retry(&e) => {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            Err(e) => {
                tracing::debug!("data accept: {e}");
                continue;
            }
        };
        let mut hello = [0u8; 12];
        let ok = s
            .set_nonblocking(false)
            .and_then(|()| s.set_read_timeout(Some(Duration::from_secs(2))))
            .and_then(|()| s.read_exact(&mut hello));
        if ok.is_err() || &hello[..8] != HELLO {
            tracing::warn!("TCP collective: dropped a connection without a valid hello");
            continue;
        }
        let r = u32::from_le_bytes(hello[8..12].try_into().unwrap_or([0; 4])) as usize;
        match slots.get_mut(r.wrapping_sub(1)) {
            Some(slot @ None) => *slot = Some(s),
            _ => tracing::warn!("TCP collective: dropped a data connection claiming rank {r}"),
        }
    }
    Ok(slots.into_iter().flatten().collect())
}

fn connect_to(addr: &str, rank: usize, deadline: Instant) -> Result<TcpStream> {
    let mut last = String::from("none");
    loop {
        if Instant::now() >= deadline {
            return Err(dist(format!(
                "rank {rank}: rank 0's data port {addr} could not be reached (last error: \
                 {last})"
            )));
        }
        match addr.to_socket_addrs() {
            Ok(addrs) => {
                for a in addrs {
                    match TcpStream::connect_timeout(&a, Duration::from_secs(2)) {
                        Ok(mut s) => {
                            let mut hello = HELLO.to_vec();
                            hello.extend_from_slice(&(rank as u32).to_le_bytes());
                            s.write_all(&hello)
                                .map_err(|e| dist(format!("rank {rank}: hello to {a}: {e}")))?;
                            return Ok(s);
                        }
                        Err(e) => last = format!("{a}: {e}"),
                    }
                }
            }
            Err(e) => last = format!("resolving {addr}: {e}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// (the tensor's dtype, the dtype it travels as) for a wire tag.
fn wire_dtype(tag: u8) -> Result<(DType, DType)> {
    Ok(match tag {
        0 => (DType::F32, DType::F32),
        1 => (DType::F64, DType::F64),
        2 => (DType::BF16, DType::F32),
        3 => (DType::F16, DType::F32),
        4 => (DType::U32, DType::U32),
        5 => (DType::U8, DType::U8),
        6 => (DType::I64, DType::I64),
        t => return Err(dist(format!("unknown dtype tag {t} on a data connection"))),
    })
}

fn tag_of(d: DType) -> Result<u8> {
    Ok(match d {
        DType::F32 => 0,
        DType::F64 => 1,
        DType::BF16 => 2,
        DType::F16 => 3,
        DType::U32 => 4,
        DType::U8 => 5,
        DType::I64 => 6,
        d => {
            return Err(dist(format!(
                "TCP collective: {d:?} tensors are not supported"
            )))
        }
    })
}

fn encode_tensors(ts: &[Tensor]) -> Result<Vec<u8>> {
    let mut out = (ts.len() as u32).to_le_bytes().to_vec();
    for t in ts {
        let tag = tag_of(t.dtype())?;
        let (_, wire) = wire_dtype(tag)?;
        out.push(tag);
        out.push(t.rank() as u8);
        for &d in t.dims() {
            out.extend_from_slice(&(d as u64).to_le_bytes());
        }
        let flat = t.flatten_all()?.to_device(&Device::Cpu)?.to_dtype(wire)?;
        match wire {
            DType::F32 => flat
                .to_vec1::<f32>()?
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            DType::F64 => flat
                .to_vec1::<f64>()?
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            DType::U32 => flat
                .to_vec1::<u32>()?
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            DType::I64 => flat
                .to_vec1::<i64>()?
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            _ => out.extend_from_slice(&flat.to_vec1::<u8>()?),
        }
    }
    Ok(out)
}

fn decode(bytes: &[u8], wire: DType, dims: &[usize]) -> Result<Tensor> {
    fn each<const N: usize, T>(b: &[u8], f: fn([u8; N]) -> T) -> Vec<T> {
        b.chunks_exact(N)
            .map(|c| f(c.try_into().unwrap_or([0; N])))
            .collect()
    }
    let cpu = Device::Cpu;
    Ok(match wire {
        DType::F32 => Tensor::from_vec(each(bytes, f32::from_le_bytes), dims, &cpu)?,
        DType::F64 => Tensor::from_vec(each(bytes, f64::from_le_bytes), dims, &cpu)?,
        DType::U32 => Tensor::from_vec(each(bytes, u32::from_le_bytes), dims, &cpu)?,
        DType::I64 => Tensor::from_vec(each(bytes, i64::from_le_bytes), dims, &cpu)?,
        _ => Tensor::from_vec(bytes.to_vec(), dims, &cpu)?,
    })
}

impl Collective for TcpGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        if self.world == 1 {
            return Ok(t.clone());
        }
        self.exchange(Op::AllReduce, 0, Some(t))?
            .pop()
            .ok_or_else(|| dist("all-reduce: no result from rank 0".into()))
    }
    fn reduce_sum(&self, t: &Tensor, root: usize) -> Result<Option<Tensor>> {
        if self.world == 1 {
            return Ok(Some(t.clone()));
        }
        Ok(self.exchange(Op::Reduce, root, Some(t))?.pop())
    }
    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        if self.world == 1 {
            return Ok(t.clone());
        }
        let mine = (self.rank == root).then_some(t);
        self.exchange(Op::Broadcast, root, mine)?
            .pop()
            .ok_or_else(|| dist(format!("broadcast: nothing from rank {root}")))
    }
    fn all_gather(&self, t: &Tensor) -> Result<Vec<Tensor>> {
        if self.world == 1 {
            return Ok(vec![t.clone()]);
        }
        self.exchange(Op::AllGather, 0, Some(t))
    }
    fn barrier(&self) -> Result<()> {
        if self.world == 1 {
            return Ok(());
        }
        self.exchange(Op::Barrier, 0, None).map(|_| ())
    }

    /// End of training: every rank meets, and the connections close in order (not counted as a
    /// failure by the others).
    fn finish(&self) -> Result<()> {
        self.control
            .finish(self.timeout)
            .map_err(|e| dist(format!("finishing: {e}")))
    }

    fn abort(&self, reason: &str) {
        self.abort_local(reason);
        self.control.report_failure(reason);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parallel::launch::LaunchSource;
    use std::sync::Arc;

    fn env(rank: usize, world: usize, port: u16) -> LaunchEnv {
        LaunchEnv {
            rank,
            world_size: world,
            local_rank: rank,
            local_world_size: world,
            master_addr: "127.0.0.1".into(),
            master_port: port,
            source: LaunchSource::Slurm,
        }
    }

    fn port() -> u16 {
        crate::parallel::spawn::free_port().expect("free port")
    }

    /// One rank's (sums, broadcast, gathered, reduce landed where it should, bf16 sum).
    type RankResults = (Vec<f32>, Vec<f32>, Vec<f32>, bool, Vec<f32>);

    #[test]
    fn sums_gathers_and_broadcasts_in_rank_order_over_tcp() {
        let p = port();
        let handles: Vec<_> = (0..3)
            .map(|r| {
                std::thread::spawn(move || -> Result<RankResults> {
                    let long = Duration::from_secs(30);
                    let g = TcpGroup::join(&env(r, 3, p), long, long)?;
                    let t = Tensor::new(&[r as f32 + 1.0, 10.0], &Device::Cpu)?;
                    let mut sums = Vec::new();
                    for _ in 0..5 {
                        sums = g.all_reduce_sum(&t)?.to_vec1::<f32>()?;
                    }
                    let b = g.broadcast(&t, 2)?.to_vec1::<f32>()?;
                    let gathered = g
                        .all_gather(&t)?
                        .iter()
                        .map(|x| x.to_vec1::<f32>().map(|v| v[0]))
                        .collect::<candle_core::Result<_>>()?;
                    let reduced = g.reduce_sum(&t, 1)?;
                    let bf = g
                        .all_reduce_sum(&t.to_dtype(DType::BF16)?)?
                        .to_dtype(DType::F32)?
                        .to_vec1::<f32>()?;
                    g.barrier()?;
                    g.finish()?;
                    Ok((sums, b, gathered, reduced.is_some() == (r == 1), bf))
                })
            })
            .collect();
        for h in handles {
            let (sums, b, gathered, reduce_ok, bf) = h.join().expect("thread").expect("ranks");
            assert_eq!(sums, [6.0, 30.0]);
            assert_eq!(b, [3.0, 10.0]);
            assert_eq!(gathered, [1.0, 2.0, 3.0]);
            assert!(reduce_ok);
            assert_eq!(bf, [6.0, 30.0]);
        }
    }

    #[test]
    fn a_hung_collective_times_out_naming_the_rank_or_is_aborted_by_a_watchdog() {
        let p = port();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        // Rank 1 joins, then never calls a collective until told to leave.
        let idle = std::thread::spawn(move || {
            let long = Duration::from_secs(30);
            let g = TcpGroup::join(&env(1, 2, p), long, long).expect("rank 1 joins");
            rx.recv().ok();
            drop(g);
        });
        let g0 = Arc::new(
            TcpGroup::join(
                &env(0, 2, p),
                Duration::from_secs(30),
                Duration::from_millis(500),
            )
            .expect("rank 0 joins"),
        );
        let t = Tensor::new(&[1f32], &Device::Cpu).expect("t");
        let start = Instant::now();
        let err = g0.all_reduce_sum(&t).expect_err("times out").to_string();
        assert!(err.contains("waiting for rank 1"), "{err}");
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
        // A watchdog thread ends a collective that would otherwise wait much longer.
        let g = Arc::clone(&g0);
        let watchdog = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            g.abort_local("watchdog: no progress");
        });
        let err = g0.barrier().expect_err("aborted").to_string();
        assert!(err.contains("watchdog: no progress"), "{err}");
        watchdog.join().expect("watchdog");
        tx.send(()).ok();
        idle.join().expect("rank 1");
    }

    #[test]
    fn a_dead_rank_is_named() {
        let p = port();
        let dead = std::thread::spawn(move || {
            let long = Duration::from_secs(30);
            let g = TcpGroup::join(&env(1, 2, p), long, long).expect("rank 1 joins");
            // Exits without finishing: its connections drop.
            drop(g);
        });
        let long = Duration::from_secs(30);
        let g0 = TcpGroup::join(&env(0, 2, p), long, long).expect("rank 0 joins");
        dead.join().expect("rank 1");
        let t = Tensor::new(&[1f32], &Device::Cpu).expect("t");
        let err = g0
            .all_reduce_sum(&t)
            .expect_err("rank 1 is gone")
            .to_string();
        assert!(err.contains("rank 1"), "{err}");
    }
}
