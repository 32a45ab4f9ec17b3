//! A client of PyTorch's c10d `TCPStore`: the key-value store torchrun's agent already serves at
//! `MASTER_ADDR:MASTER_PORT` (`TORCHELASTIC_USE_AGENT_STORE=True`). Ranks join it as clients,
//! as torch's own ranks do, instead of binding that port (which fails: the agent holds it).
//!
//! Wire protocol (torch/csrc/distributed/c10d/TCPStore.cpp and TCPStoreBackend.hpp, the same
//! for the libuv server torch 2.x uses by default and the older one): a request is a one-byte
//! query type followed by its arguments; integers are in the host's byte order (little-endian
//! on every platform torch ships), strings and byte values are a `u64` length then the bytes.
//! A connection starts with `VALIDATE` + the magic `0x3C85F7CE` (no answer), then `PING` with
//! a `u32` nonce that the server echoes.
//! - `SET key value` → nothing; `GET key` → value (the key must exist: `CHECK` or `WAIT` first)
//! - `ADD key i64` → the new `i64`; `CHECK n keys…` → `READY`(0) / `NOT_READY`(1)
//!
//! Waiting polls `CHECK` (rather than the server-side `WAIT`) so that a timeout never leaves
//! a wait pending on the server.

use std::io::{self, Read, Write};
use std::net::{IpAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

const VALIDATION_MAGIC: u32 = 0x3C85_F7CE;

/// `c10d::detail::QueryType` (TCPStoreBackend.hpp).
#[derive(Clone, Copy)]
#[repr(u8)]
enum Query {
    Validate = 0,
    Set = 1,
    Get = 3,
    Add = 4,
    Check = 5,
    Ping = 13,
}

const CHECK_READY: u8 = 0;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error(
        "torchrun's store at {addr} could not be reached after {secs:.1} s (last error: {last}); \
         is this process started by torchrun, with MASTER_ADDR/MASTER_PORT as it set them?"
    )]
    Unreachable {
        addr: String,
        secs: f64,
        last: String,
    },
    #[error("torchrun's store at {addr}: {op}: {source}")]
    Io {
        addr: String,
        op: String,
        #[source]
        source: io::Error,
    },
    #[error("torchrun's store at {addr}: key {key:?} did not appear within {secs:.1} s ({what})")]
    Timeout {
        addr: String,
        key: String,
        secs: f64,
        what: String,
    },
    #[error("torchrun's store at {addr}: {detail}")]
    Protocol { addr: String, detail: String },
}

/// One connection to a c10d TCPStore.
pub struct StoreClient {
    stream: TcpStream,
    addr: String,
}

impl StoreClient {
    /// Connects (retrying until `timeout`: the agent may still be starting its server), then
    /// validates and pings as torch's client does.
    pub fn connect(host: &str, port: u16, timeout: Duration) -> Result<Self, StoreError> {
        let addr = format!("{host}:{port}");
        let deadline = Instant::now() + timeout;
        let mut last = String::from("none");
        let stream = loop {
            if Instant::now() >= deadline {
                return Err(StoreError::Unreachable {
                    addr,
                    secs: timeout.as_secs_f64(),
                    last,
                });
            }
            match (host, port).to_socket_addrs() {
                Ok(addrs) => {
                    let mut ok = None;
                    for a in addrs {
                        match TcpStream::connect_timeout(&a, Duration::from_secs(2)) {
                            Ok(s) => {
                                ok = Some(s);
                                break;
                            }
                            Err(e) => last = format!("{a}: {e}"),
                        }
                    }
                    if let Some(s) = ok {
                        break s;
                    }
                }
                Err(e) => last = format!("resolving {host}: {e}"),
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let _ = stream.set_nodelay(true);
        let io = |op: &str| {
            let (addr, op) = (addr.clone(), op.to_string());
            move |source| StoreError::Io { addr, op, source }
        };
        stream
            .set_read_timeout(Some(timeout.max(Duration::from_secs(1))))
            .map_err(io("setting a timeout"))?;
        let mut c = StoreClient { stream, addr };
        let mut req = vec![Query::Validate as u8];
        req.extend_from_slice(&VALIDATION_MAGIC.to_ne_bytes());
        c.send(&req, "validate")?;
        let nonce = std::process::id();
        let mut req = vec![Query::Ping as u8];
        req.extend_from_slice(&nonce.to_ne_bytes());
        c.send(&req, "ping")?;
        let back = u32::from_ne_bytes(c.recv::<4>("ping")?);
        if back != nonce {
            return Err(StoreError::Protocol {
                addr: c.addr.clone(),
                detail: format!("ping answered {back}, expected {nonce}: not a c10d TCPStore?"),
            });
        }
        Ok(c)
    }

    /// The address of this end of the connection: an address of this host that the store's
    /// host (and so, usually, every node of the job) can reach.
    pub fn local_ip(&self) -> Option<IpAddr> {
        self.stream.local_addr().ok().map(|a| a.ip())
    }

    fn send(&mut self, bytes: &[u8], op: &str) -> Result<(), StoreError> {
        self.stream
            .write_all(bytes)
            .map_err(|source| StoreError::Io {
                addr: self.addr.clone(),
                op: op.to_string(),
                source,
            })
    }

    fn recv<const N: usize>(&mut self, op: &str) -> Result<[u8; N], StoreError> {
        let mut b = [0u8; N];
        self.stream
            .read_exact(&mut b)
            .map_err(|source| StoreError::Io {
                addr: self.addr.clone(),
                op: op.to_string(),
                source,
            })?;
        Ok(b)
    }

    fn push_bytes(req: &mut Vec<u8>, b: &[u8]) {
        req.extend_from_slice(&(b.len() as u64).to_ne_bytes());
        req.extend_from_slice(b);
    }

    pub fn set(&mut self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let mut req = vec![Query::Set as u8];
        Self::push_bytes(&mut req, key.as_bytes());
        Self::push_bytes(&mut req, value);
        self.send(&req, "set")
    }

    /// Adds `delta` to the integer at `key` (0 when absent) and returns the new value.
    pub fn add(&mut self, key: &str, delta: i64) -> Result<i64, StoreError> {
        let mut req = vec![Query::Add as u8];
        Self::push_bytes(&mut req, key.as_bytes());
        req.extend_from_slice(&delta.to_ne_bytes());
        self.send(&req, "add")?;
        Ok(i64::from_ne_bytes(self.recv::<8>("add")?))
    }

    /// Whether every key exists.
    pub fn check(&mut self, keys: &[&str]) -> Result<bool, StoreError> {
        let mut req = vec![Query::Check as u8];
        req.extend_from_slice(&(keys.len() as u64).to_ne_bytes());
        for k in keys {
            Self::push_bytes(&mut req, k.as_bytes());
        }
        self.send(&req, "check")?;
        Ok(self.recv::<1>("check")?[0] == CHECK_READY)
    }

    /// Waits (polling) until `key` exists, then reads it. `what` says what the key stands for in
    /// the timeout error.
    pub fn get(&mut self, key: &str, timeout: Duration, what: &str) -> Result<Vec<u8>, StoreError> {
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_millis(5);
        while !self.check(&[key])? {
            if Instant::now() >= deadline {
                return Err(StoreError::Timeout {
                    addr: self.addr.clone(),
                    key: key.to_string(),
                    secs: timeout.as_secs_f64(),
                    what: what.to_string(),
                });
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(100));
        }
        let mut req = vec![Query::Get as u8];
        Self::push_bytes(&mut req, key.as_bytes());
        self.send(&req, "get")?;
        let len = u64::from_ne_bytes(self.recv::<8>("get")?) as usize;
        if len > 1 << 30 {
            return Err(StoreError::Protocol {
                addr: self.addr.clone(),
                detail: format!("value of {key:?} claims {len} bytes"),
            });
        }
        let mut v = vec![0u8; len];
        self.stream
            .read_exact(&mut v)
            .map_err(|source| StoreError::Io {
                addr: self.addr.clone(),
                op: "get".into(),
                source,
            })?;
        Ok(v)
    }
}
