//! How a launched rank finds the others, whatever started it.
//!
//! - torchrun (`TORCHELASTIC_USE_AGENT_STORE=True`, in its static, `--standalone` and c10d
//!   modes): its agent already serves a c10d TCPStore at `MASTER_ADDR:MASTER_PORT`. Every rank
//!   connects to it as a client ([`store`](super::store)); rank 0 binds our rendezvous on a free
//!   port of the address it reached the store from and publishes `host:port` under a key of this
//!   run and restart; the others read it there. No port to guess, nothing binds `MASTER_PORT`.
//! - Slurm (`srun`), `--nproc-per-node`, or variables set by hand: nothing listens, so rank 0
//!   hosts the rendezvous at `MASTER_ADDR:MASTER_PORT` itself.
//!
//! Either way the result is the same [`Rendezvous`]: rank 0's id on every rank, and the control
//! channel that carries failures and barriers.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::time::Duration;

use super::launch::LaunchEnv;
use super::rendezvous::{rendezvous, rendezvous_on, Rendezvous};
use super::store::StoreClient;
use crate::{Error, Result};

/// Whether torchrun's agent serves its store at `MASTER_ADDR:MASTER_PORT` for this process.
pub fn agent_store() -> bool {
    std::env::var("TORCHELASTIC_USE_AGENT_STORE").is_ok_and(|v| v.eq_ignore_ascii_case("true"))
}

/// The key rank 0 publishes its rendezvous address under: one per torchrun run and restart, so
/// that a restarted job (`--max-restarts`) never reads the address of its previous incarnation.
fn rendezvous_key() -> String {
    let run = std::env::var("TORCHELASTIC_RUN_ID").unwrap_or_else(|_| "none".into());
    let restart = std::env::var("TORCHELASTIC_RESTART_COUNT").unwrap_or_else(|_| "0".into());
    format!("llava-trainer/{run}/{restart}/rendezvous")
}

/// Joins the job of `env`. Rank 0's id comes from `make_id`, given the address to listen on and
/// the host name the other ranks reach it by (a TCP collective listens there; NCCL ignores
/// both).
pub fn join(
    env: &LaunchEnv,
    make_id: impl FnOnce(IpAddr, &str) -> Result<Vec<u8>>,
    timeout: Duration,
) -> Result<Rendezvous> {
    let fail = |e: &dyn std::fmt::Display| {
        Error::Distributed(format!(
            "rank {} of {} joining the job: {e}",
            env.rank, env.world_size
        ))
    };
    if !agent_store() || env.world_size == 1 {
        let ip = if env.rank == 0 {
            rank0_ip(&env.master_addr)
        } else {
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        };
        let id = if env.rank == 0 {
            Some(make_id(ip, &env.master_addr)?)
        } else {
            None
        };
        return rendezvous(env, id, timeout).map_err(|e| fail(&e));
    }
    let mut store =
        StoreClient::connect(&env.master_addr, env.master_port, timeout).map_err(|e| fail(&e))?;
    let key = rendezvous_key();
    if env.rank == 0 {
        let ip = store.local_ip().unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
        let listener = TcpListener::bind(SocketAddr::new(ip, 0))
            .map_err(|e| fail(&format!("binding a port on {ip}: {e}")))?;
        let port = listener.local_addr().map_err(|e| fail(&e))?.port();
        // IPv6 (`localhost` may be ::1) needs brackets before a port.
        let host = match ip {
            IpAddr::V6(_) => format!("[{ip}]"),
            IpAddr::V4(_) => ip.to_string(),
        };
        let id = make_id(ip, &host)?;
        store
            .set(&key, SocketAddr::new(ip, port).to_string().as_bytes())
            .map_err(|e| fail(&e))?;
        tracing::info!("rank 0: rendezvous at {ip}:{port} (published in torchrun's store)");
        drop(store);
        let here = LaunchEnv {
            master_addr: ip.to_string(),
            master_port: port,
            ..env.clone()
        };
        rendezvous_on(Some(listener), &here, Some(id), timeout).map_err(|e| fail(&e))
    } else {
        let v = store
            .get(
                &key,
                timeout,
                "rank 0's rendezvous address; did rank 0 start?",
            )
            .map_err(|e| fail(&e))?;
        drop(store);
        let text = String::from_utf8_lossy(&v).into_owned();
        let addr: SocketAddr = text
            .parse()
            .map_err(|e| fail(&format!("rank 0 published {text:?} in the store: {e}")))?;
        let there = LaunchEnv {
            master_addr: addr.ip().to_string(),
            master_port: addr.port(),
            ..env.clone()
        };
        rendezvous(&there, None, timeout).map_err(|e| fail(&e))
    }
}

/// Where rank 0 listens for the data connections when it hosts the rendezvous: loopback stays
/// loopback (one node, tests); otherwise every interface.
fn rank0_ip(master_addr: &str) -> IpAddr {
    use std::net::ToSocketAddrs;
    let loopback = (master_addr, 0u16)
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.find(|a| a.ip().is_loopback()))
        .map(|a| a.ip());
    loopback.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
}
