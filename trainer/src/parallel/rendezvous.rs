//! Rank 0 hands an opaque id (NCCL's 128-byte unique id) to every rank over TCP at
//! `MASTER_ADDR:MASTER_PORT`, and keeps the connections as a control channel (failure
//! announcements, barriers) so that one dead rank does not leave the others hanging in a
//! collective.
//!
//! Topology: a star. Every rank `r > 0` holds one connection to rank 0; rank 0 relays.
//!
//! Wire format: frames of `u32` big-endian payload length, then the payload; the payload's
//! first byte is the tag, integers are big-endian:
//! - `1` HELLO    `b"LLVRDZV1"` magic, rank `u32`, world size `u32`       (rank r → 0)
//! - `2` ID       the id bytes                                         (0 → rank r)
//! - `3` REJECT   UTF-8 reason; the connection is then closed          (0 → rank r)
//! - `4` FAILURE  rank `u32`, UTF-8 message                            (r → 0, relayed 0 → all)
//! - `5` BARRIER  rank `u32`, barrier number `u64`                     (r → 0, relayed 0 → all)
//! - `6` GOODBYE  orderly close follows; EOF after it is not a failure (both ways)
//!
//! A connection that ends without GOODBYE is a failure of the rank at the other end.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::launch::LaunchEnv;

const MAGIC: &[u8; 8] = b"LLVRDZV1";
/// Control messages are small; a larger length prefix means a stray client or corruption.
const MAX_FRAME: usize = 1 << 20;
/// How long an accepted connection may take to say hello before it is dropped as a stray.
const HELLO_TIMEOUT: Duration = Duration::from_secs(2);
/// How long an orderly close waits for the other ends to close too.
const LINGER: Duration = Duration::from_secs(2);

const TAG_HELLO: u8 = 1;
const TAG_ID: u8 = 2;
const TAG_REJECT: u8 = 3;
const TAG_FAILURE: u8 = 4;
const TAG_BARRIER: u8 = 5;
const TAG_GOODBYE: u8 = 6;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RendezvousError {
    #[error("rank {rank} is not below world size {world_size}")]
    BadLayout { rank: usize, world_size: usize },
    #[error(
        "rank 0 could not listen on {addr}: {source}; is the port taken (another job on this \
         node?) - pick another MASTER_PORT"
    )]
    Bind { addr: String, source: io::Error },
    #[error(
        "rank 0: ranks {missing:?} did not join at {addr} within {secs:.1} s; check that they \
         were started, that they use the same MASTER_ADDR/MASTER_PORT and WORLD_SIZE={world_size}, \
         and that they can reach this node (firewall)"
    )]
    MissingRanks {
        missing: Vec<usize>,
        addr: String,
        secs: f64,
        world_size: usize,
    },
    #[error(
        "rank {rank}: rank 0 at {addr} could not be reached after {secs:.1} s ({attempts} \
         attempts, last error: {last_error}); check that rank 0 is running, that MASTER_ADDR/\
         MASTER_PORT are the same on every rank and reachable from this node (firewall), and \
         that rank 0 could bind the port (see its log)"
    )]
    Unreachable {
        rank: usize,
        addr: String,
        secs: f64,
        attempts: usize,
        last_error: String,
    },
    #[error(
        "rank {rank}: connected to rank 0 at {addr} but got no id within {secs:.1} s; rank 0 \
         is still waiting for other ranks (see its log for which)"
    )]
    NoId {
        rank: usize,
        addr: String,
        secs: f64,
    },
    #[error("rank {rank}: rank 0 at {addr} refused this rank: {reason}")]
    Rejected {
        rank: usize,
        addr: String,
        reason: String,
    },
    #[error("rank 0: {0}")]
    BadPeer(String),
    #[error("rank {rank}: control channel to {addr}: {detail}")]
    Protocol {
        rank: usize,
        addr: String,
        detail: String,
    },
    #[error(
        "rank {rank}: barrier timed out after {secs:.1} s; ranks {missing:?} did not arrive \
         (still working, stuck, or hung in a collective?)"
    )]
    BarrierTimeout {
        rank: usize,
        missing: Vec<usize>,
        secs: f64,
    },
    #[error("rank {failed_rank} failed: {message}")]
    PeerFailed { failed_rank: usize, message: String },
}

enum Msg {
    Hello { rank: usize, world_size: usize },
    Id(Vec<u8>),
    Reject(String),
    Failure { rank: usize, message: String },
    Barrier { rank: usize, seq: u64 },
    Goodbye,
}

fn encode(msg: &Msg) -> Vec<u8> {
    let mut p = Vec::new();
    match msg {
        Msg::Hello { rank, world_size } => {
            p.push(TAG_HELLO);
            p.extend_from_slice(MAGIC);
            p.extend_from_slice(&(*rank as u32).to_be_bytes());
            p.extend_from_slice(&(*world_size as u32).to_be_bytes());
        }
        Msg::Id(id) => {
            p.push(TAG_ID);
            p.extend_from_slice(id);
        }
        Msg::Reject(reason) => {
            p.push(TAG_REJECT);
            p.extend_from_slice(reason.as_bytes());
        }
        Msg::Failure { rank, message } => {
            p.push(TAG_FAILURE);
            p.extend_from_slice(&(*rank as u32).to_be_bytes());
            p.extend_from_slice(message.as_bytes());
        }
        Msg::Barrier { rank, seq } => {
            p.push(TAG_BARRIER);
            p.extend_from_slice(&(*rank as u32).to_be_bytes());
            p.extend_from_slice(&seq.to_be_bytes());
        }
        Msg::Goodbye => p.push(TAG_GOODBYE),
    }
    // Length prefix first, one write per frame: frames from several threads never interleave
    // because every writer holds the stream's mutex.
    let mut frame = Vec::with_capacity(4 + p.len());
    frame.extend_from_slice(&(p.len() as u32).to_be_bytes());
    frame.extend_from_slice(&p);
    frame
}

fn bad(detail: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, detail.into())
}

fn be_u32(b: &[u8]) -> io::Result<usize> {
    let a: [u8; 4] = b
        .get(..4)
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| bad("short message"))?;
    Ok(u32::from_be_bytes(a) as usize)
}

fn read_msg(r: &mut impl Read) -> io::Result<Msg> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_be_bytes(len) as usize;
    if len == 0 || len > MAX_FRAME {
        return Err(bad(format!("frame length {len} out of range")));
    }
    let mut p = vec![0u8; len];
    r.read_exact(&mut p)?;
    let body = &p[1..];
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    Ok(match p[0] {
        TAG_HELLO => {
            if body.len() != 16 || &body[..8] != MAGIC {
                return Err(bad("not a llava-trainer rendezvous hello"));
            }
            Msg::Hello {
                rank: be_u32(&body[8..])?,
                world_size: be_u32(&body[12..])?,
            }
        }
        TAG_ID => Msg::Id(body.to_vec()),
        TAG_REJECT => Msg::Reject(text(body)),
        TAG_FAILURE => Msg::Failure {
            rank: be_u32(body)?,
            message: text(body.get(4..).unwrap_or_default()),
        },
        TAG_BARRIER => {
            let seq: [u8; 8] = body
                .get(4..12)
                .and_then(|s| s.try_into().ok())
                .ok_or_else(|| bad("short barrier message"))?;
            Msg::Barrier {
                rank: be_u32(body)?,
                seq: u64::from_be_bytes(seq),
            }
        }
        TAG_GOODBYE => Msg::Goodbye,
        t => return Err(bad(format!("unknown message tag {t}"))),
    })
}

/// One connection: rank 0 holds one per peer, a peer holds one to rank 0.
struct Peer {
    rank: usize,
    stream: Mutex<TcpStream>,
}

impl Peer {
    /// Errors are the reader thread's business (it sees the same dead socket).
    fn send(&self, msg: &Msg) -> io::Result<()> {
        let frame = encode(msg);
        lock(&self.stream).write_all(&frame)
    }

    fn shutdown(&self, how: Shutdown) {
        let _ = lock(&self.stream).shutdown(how);
    }
}

#[derive(Default)]
struct State {
    /// The first failure seen (own rank excluded): (rank, message).
    failure: Option<(usize, String)>,
    /// Ranks already announced as failed, so a dropped connection after a report is not
    /// announced a second time.
    failed: Vec<bool>,
    /// Highest barrier number each rank has arrived at.
    arrived: Vec<u64>,
    /// The other end said GOODBYE (index: rank at the other end).
    goodbye: Vec<bool>,
    /// This side is closing its connections: read errors are expected, not failures.
    closing: bool,
    /// Reader threads that have ended.
    readers_done: usize,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

/// A poisoned lock only means another thread panicked mid-update of plain flags; carry on.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The result of a rendezvous: the shared id and the control channel to the other ranks.
///
/// Dropping it without [`Rendezvous::finish`] closes the connections abruptly, which the other
/// ranks see as this rank failing ("connection lost").
pub struct Rendezvous {
    /// Rank 0's id, identical on every rank.
    pub id: Vec<u8>,
    rank: usize,
    world_size: usize,
    /// Rank 0: one per other rank; other ranks: just rank 0.
    peers: Vec<Arc<Peer>>,
    shared: Arc<Shared>,
    barrier_seq: AtomicU64,
    addr: String,
}

/// Exchanges the id: rank 0 (which must pass `id_for_rank0`; `None` means an empty id, for a
/// control channel only) listens at `env.master_addr:env.master_port` and sends it to every
/// other rank; the others connect, retrying until `timeout` since rank 0 may start later.
pub fn rendezvous(
    env: &LaunchEnv,
    id_for_rank0: Option<Vec<u8>>,
    timeout: Duration,
) -> Result<Rendezvous, RendezvousError> {
    rendezvous_on(None, env, id_for_rank0, timeout)
}

/// [`rendezvous`] where rank 0 listens on `listener` (already bound, e.g. to a free port that
/// the ranks learnt from torchrun's store) instead of binding `MASTER_PORT` itself.
pub fn rendezvous_on(
    listener: Option<TcpListener>,
    env: &LaunchEnv,
    id_for_rank0: Option<Vec<u8>>,
    timeout: Duration,
) -> Result<Rendezvous, RendezvousError> {
    if env.world_size == 0 || env.rank >= env.world_size {
        return Err(RendezvousError::BadLayout {
            rank: env.rank,
            world_size: env.world_size,
        });
    }
    let addr = format!("{}:{}", env.master_addr, env.master_port);
    let n = env.world_size;
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            failed: vec![false; n],
            arrived: vec![0; n],
            goodbye: vec![false; n],
            ..State::default()
        }),
        changed: Condvar::new(),
    });
    let (id, peers) = if n == 1 {
        (id_for_rank0.unwrap_or_default(), Vec::new())
    } else if env.rank == 0 {
        let id = id_for_rank0.unwrap_or_default();
        let peers = serve(listener, env, &addr, &id, timeout)?;
        (id, peers)
    } else {
        connect(env, &addr, timeout)?
    };
    let rdzv = Rendezvous {
        id,
        rank: env.rank,
        world_size: n,
        peers,
        shared,
        barrier_seq: AtomicU64::new(0),
        addr,
    };
    rdzv.spawn_readers()?;
    Ok(rdzv)
}

/// Where rank 0 listens: loopback stays loopback (tests, single node); anything else listens on
/// every interface, since a host name may resolve to 127.0.1.1 locally but not for other nodes.
fn listen_addr(env: &LaunchEnv) -> SocketAddr {
    let loopback = (env.master_addr.as_str(), env.master_port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.find(|a| a.ip().is_loopback()));
    loopback.unwrap_or_else(|| SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), env.master_port))
}

fn serve(
    listener: Option<TcpListener>,
    env: &LaunchEnv,
    addr: &str,
    id: &[u8],
    timeout: Duration,
) -> Result<Vec<Arc<Peer>>, RendezvousError> {
    let start = Instant::now();
    let deadline = start + timeout;
    let n = env.world_size;
    let bind = listen_addr(env);
    let bind_err = |source| RendezvousError::Bind {
        addr: bind.to_string(),
        source,
    };
    let listener = match listener {
        Some(l) => l,
        None => TcpListener::bind(bind).map_err(bind_err)?,
    };
    // Non-blocking accept, so the deadline holds even if nobody ever connects.
    listener.set_nonblocking(true).map_err(bind_err)?;
    let mut slots: Vec<Option<TcpStream>> = (0..n).map(|_| None).collect();
    let reject_all = |slots: &mut [Option<TcpStream>], reason: &str| {
        for mut s in slots.iter_mut().filter_map(Option::take) {
            let _ = s.write_all(&encode(&Msg::Reject(reason.to_string())));
            let _ = s.shutdown(Shutdown::Both);
        }
    };
    while slots[1..].iter().any(Option::is_none) {
        let now = Instant::now();
        if now >= deadline {
            let missing: Vec<usize> = (1..n).filter(|&r| slots[r].is_none()).collect();
            let err = RendezvousError::MissingRanks {
                missing,
                addr: addr.to_string(),
                secs: timeout.as_secs_f64(),
                world_size: n,
            };
            reject_all(&mut slots, &err.to_string());
            return Err(err);
        }
        let mut stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // e.g. the peer reset before accept; keep waiting for the others.
                tracing::debug!("rendezvous accept: {e}");
                continue;
            }
        };
        // A stray client (port scanner, a stale job) must not stall the whole job.
        let hello_wait = HELLO_TIMEOUT.min(deadline.saturating_duration_since(Instant::now()));
        let hello = stream
            .set_nonblocking(false)
            .and_then(|()| stream.set_read_timeout(Some(hello_wait.max(Duration::from_millis(1)))))
            .and_then(|()| read_msg(&mut stream));
        let (rank, their_world) = match hello {
            Ok(Msg::Hello { rank, world_size }) => (rank, world_size),
            Ok(_) => {
                tracing::warn!("rendezvous: dropped a connection that did not start with hello");
                continue;
            }
            Err(e) => {
                tracing::warn!("rendezvous: dropped a connection without a valid hello: {e}");
                continue;
            }
        };
        let problem = if their_world != n {
            Some(format!(
                "rank {rank} was started with world size {their_world}, but rank 0 has \
                 world size {n}; every rank must get the same WORLD_SIZE / SLURM_NTASKS"
            ))
        } else if rank == 0 || rank >= n {
            Some(format!(
                "a process announced rank {rank}, which is not a rank 1..{} of this job",
                n - 1
            ))
        } else if slots[rank].is_some() {
            Some(format!(
                "rank {rank} joined twice; two processes were given the same RANK / SLURM_PROCID \
                 (or a stale process of an earlier job is still running)"
            ))
        } else {
            None
        };
        if let Some(reason) = problem {
            let _ = stream.write_all(&encode(&Msg::Reject(reason.clone())));
            let _ = stream.shutdown(Shutdown::Both);
            reject_all(&mut slots, &format!("rendezvous aborted: {reason}"));
            return Err(RendezvousError::BadPeer(reason));
        }
        slots[rank] = Some(stream);
    }
    let mut peers = Vec::with_capacity(n - 1);
    for (rank, stream) in slots.into_iter().enumerate().skip(1) {
        let Some(mut stream) = stream else { continue };
        let proto = |e: io::Error| RendezvousError::Protocol {
            rank: 0,
            addr: addr.to_string(),
            detail: format!("sending the id to rank {rank}: {e}"),
        };
        stream.set_read_timeout(None).map_err(proto)?;
        let _ = stream.set_nodelay(true);
        stream
            .write_all(&encode(&Msg::Id(id.to_vec())))
            .map_err(proto)?;
        peers.push(Arc::new(Peer {
            rank,
            stream: Mutex::new(stream),
        }));
    }
    Ok(peers)
}

fn connect(
    env: &LaunchEnv,
    addr: &str,
    timeout: Duration,
) -> Result<(Vec<u8>, Vec<Arc<Peer>>), RendezvousError> {
    let start = Instant::now();
    let deadline = start + timeout;
    let rank = env.rank;
    let mut attempts = 0usize;
    let mut last_error = String::from("none");
    let mut backoff = Duration::from_millis(20);
    let mut stream = loop {
        let now = Instant::now();
        if now >= deadline {
            return Err(RendezvousError::Unreachable {
                rank,
                addr: addr.to_string(),
                secs: timeout.as_secs_f64(),
                attempts,
                last_error,
            });
        }
        attempts += 1;
        // Resolve on every attempt: the master's name may appear in DNS only once it is up.
        match (env.master_addr.as_str(), env.master_port).to_socket_addrs() {
            Ok(addrs) => {
                let per_try = (deadline - now).min(Duration::from_secs(2));
                let mut connected = None;
                for a in addrs {
                    match TcpStream::connect_timeout(&a, per_try) {
                        Ok(s) => {
                            connected = Some(s);
                            break;
                        }
                        Err(e) => last_error = format!("{a}: {e}"),
                    }
                }
                if let Some(s) = connected {
                    break s;
                }
            }
            Err(e) => last_error = format!("resolving {}: {e}", env.master_addr),
        }
        let left = deadline.saturating_duration_since(Instant::now());
        std::thread::sleep(backoff.min(left));
        backoff = (backoff * 2).min(Duration::from_millis(500));
    };
    let proto = |detail: String| RendezvousError::Protocol {
        rank,
        addr: addr.to_string(),
        detail,
    };
    let _ = stream.set_nodelay(true);
    stream
        .write_all(&encode(&Msg::Hello {
            rank,
            world_size: env.world_size,
        }))
        .map_err(|e| proto(format!("sending hello: {e}")))?;
    // Rank 0 sends the id once everyone has joined; wait for that until our own deadline.
    let wait = deadline.saturating_duration_since(Instant::now());
    stream
        .set_read_timeout(Some(wait.max(Duration::from_millis(1))))
        .map_err(|e| proto(format!("{e}")))?;
    let id = match read_msg(&mut stream) {
        Ok(Msg::Id(id)) => id,
        Ok(Msg::Reject(reason)) => {
            return Err(RendezvousError::Rejected {
                rank,
                addr: addr.to_string(),
                reason,
            })
        }
        Ok(_) => return Err(proto("expected the id from rank 0".to_string())),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            return Err(RendezvousError::NoId {
                rank,
                addr: addr.to_string(),
                secs: timeout.as_secs_f64(),
            })
        }
        Err(e) => {
            return Err(proto(format!(
                "waiting for the id: {e} (rank 0 exited? is something else listening on \
                 that port?)"
            )))
        }
    };
    stream
        .set_read_timeout(None)
        .map_err(|e| proto(format!("{e}")))?;
    Ok((
        id,
        vec![Arc::new(Peer {
            rank: 0,
            stream: Mutex::new(stream),
        })],
    ))
}

impl Rendezvous {
    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// One reader thread per connection: records failures and barrier arrivals, and on rank 0
    /// relays them to everyone else.
    fn spawn_readers(&self) -> Result<(), RendezvousError> {
        for peer in &self.peers {
            let reader = lock(&peer.stream)
                .try_clone()
                .map_err(|e| RendezvousError::Protocol {
                    rank: self.rank,
                    addr: self.addr.clone(),
                    detail: format!("cloning the socket of rank {}: {e}", peer.rank),
                })?;
            let peer = Arc::clone(peer);
            let all = self.peers.clone();
            let shared = Arc::clone(&self.shared);
            let relay = self.rank == 0;
            std::thread::Builder::new()
                .name(format!("rdzv-rank{}", peer.rank))
                .spawn(move || read_loop(reader, peer.rank, relay, &all, &shared))
                .map_err(|e| RendezvousError::Protocol {
                    rank: self.rank,
                    addr: self.addr.clone(),
                    detail: format!("spawning the control reader: {e}"),
                })?;
        }
        Ok(())
    }

    /// Announces that this rank failed: rank 0 relays the message to every rank, whose
    /// [`failure`](Self::failure) then returns `(this rank, msg)`. The rank should exit after it.
    pub fn report_failure(&self, msg: &str) {
        let m = Msg::Failure {
            rank: self.rank,
            message: msg.to_string(),
        };
        for p in &self.peers {
            let _ = p.send(&m);
        }
        if self.rank != 0 {
            // Nothing more to say; a clean write-side close makes sure rank 0 gets the report
            // before any reset from the process exiting.
            for p in &self.peers {
                p.shutdown(Shutdown::Write);
            }
        }
    }

    /// The first failure of another rank seen so far, without blocking: `(rank, message)`.
    pub fn failure(&self) -> Option<(usize, String)> {
        lock(&self.shared.state).failure.clone()
    }

    /// Waits until every rank has called `barrier` as often as this one, a rank fails, or
    /// `timeout` passes (the error then names the ranks that did not arrive).
    pub fn barrier(&self, timeout: Duration) -> Result<(), RendezvousError> {
        if self.world_size == 1 {
            return Ok(());
        }
        let seq = self.barrier_seq.fetch_add(1, Ordering::SeqCst) + 1;
        let deadline = Instant::now() + timeout;
        let me = Msg::Barrier {
            rank: self.rank,
            seq,
        };
        {
            let mut st = lock(&self.shared.state);
            st.arrived[self.rank] = st.arrived[self.rank].max(seq);
        }
        for p in &self.peers {
            let _ = p.send(&me);
        }
        let mut st = lock(&self.shared.state);
        loop {
            // Completion first: a rank that arrived and then left counts as arrived.
            if st.arrived.iter().all(|&a| a >= seq) {
                return Ok(());
            }
            if let Some((failed_rank, message)) = st.failure.clone() {
                return Err(RendezvousError::PeerFailed {
                    failed_rank,
                    message,
                });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(RendezvousError::BarrierTimeout {
                    rank: self.rank,
                    missing: (0..self.world_size)
                        .filter(|&r| st.arrived[r] < seq)
                        .collect(),
                    secs: timeout.as_secs_f64(),
                });
            }
            st = self
                .shared
                .changed
                .wait_timeout(st, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }

    /// End of training: a barrier, then an orderly close that the other ranks do not count as
    /// a failure.
    pub fn finish(&self, timeout: Duration) -> Result<(), RendezvousError> {
        self.barrier(timeout)?;
        lock(&self.shared.state).closing = true;
        for p in &self.peers {
            let _ = p.send(&Msg::Goodbye);
            p.shutdown(Shutdown::Write);
        }
        // Let the other ends close first, so unread data never turns our close into a reset.
        let deadline = Instant::now() + LINGER;
        let mut st = lock(&self.shared.state);
        while st.readers_done < self.peers.len() {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            st = self
                .shared
                .changed
                .wait_timeout(st, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        Ok(())
    }
}

impl Drop for Rendezvous {
    fn drop(&mut self) {
        lock(&self.shared.state).closing = true;
        for p in &self.peers {
            p.shutdown(Shutdown::Both);
        }
    }
}

fn read_loop(mut stream: TcpStream, from: usize, relay: bool, all: &[Arc<Peer>], shared: &Shared) {
    let others = |except: usize| all.iter().filter(move |p| p.rank != except);
    loop {
        match read_msg(&mut stream) {
            Ok(Msg::Failure { rank, message }) => {
                // Rank 0 trusts the connection, not the claimed rank.
                let rank = if relay { from } else { rank };
                if relay {
                    let m = Msg::Failure {
                        rank,
                        message: message.clone(),
                    };
                    // Relay before recording: once rank 0 sees the failure it may exit, and the
                    // others must have been told by then.
                    others(from).for_each(|p| {
                        let _ = p.send(&m);
                    });
                }
                record_failure(shared, rank, message);
            }
            Ok(Msg::Barrier { rank, seq }) => {
                let rank = if relay { from } else { rank };
                if relay {
                    let m = Msg::Barrier { rank, seq };
                    others(from).for_each(|p| {
                        let _ = p.send(&m);
                    });
                }
                let mut st = lock(&shared.state);
                if let Some(a) = st.arrived.get_mut(rank) {
                    *a = (*a).max(seq);
                }
                shared.changed.notify_all();
            }
            Ok(Msg::Goodbye) => {
                let mut st = lock(&shared.state);
                st.goodbye[from] = true;
            }
            Ok(_) => {
                tracing::warn!("rendezvous: unexpected message from rank {from}; ignored");
            }
            Err(e) => {
                let quiet = {
                    let st = lock(&shared.state);
                    st.closing || st.goodbye[from] || st.failed[from]
                };
                if !quiet {
                    tracing::debug!("rendezvous: connection to rank {from} ended: {e}");
                    let message = "connection lost (process exited?)".to_string();
                    if relay {
                        let m = Msg::Failure {
                            rank: from,
                            message: message.clone(),
                        };
                        others(from).for_each(|p| {
                            let _ = p.send(&m);
                        });
                    }
                    record_failure(shared, from, message);
                }
                let mut st = lock(&shared.state);
                st.readers_done += 1;
                shared.changed.notify_all();
                return;
            }
        }
    }
}

fn record_failure(shared: &Shared, rank: usize, message: String) {
    let mut st = lock(&shared.state);
    if let Some(f) = st.failed.get_mut(rank) {
        *f = true;
    }
    if st.failure.is_none() {
        st.failure = Some((rank, message));
    }
    shared.changed.notify_all();
}
