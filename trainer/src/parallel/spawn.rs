//! `--nproc-per-node N` without a launcher: this process starts N copies of a command as the
//! ranks of a one-node job, with torchrun's environment (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
//! `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`), and supervises them as torchrun does: the
//! first rank to fail is named, and the others get `grace` to stop on their own (the rendezvous
//! tells them) before they are killed. Signals (SIGINT/SIGTERM/SIGUSR1) sent to this process are
//! forwarded to every rank, so a Ctrl-C or a `kill` of the supervisor reach the training loops,
//! which checkpoint. Each rank runs in its own process group (so the terminal's signal is not
//! delivered twice) and gets SIGTERM if the supervisor dies. Under Slurm prefer `srun` with one
//! task per GPU: Slurm signals every process of a step itself.

use std::ffi::OsString;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often the supervisor looks at its children.
const POLL: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SpawnError {
    #[error("starting rank {rank} ({program}): {source}")]
    Start {
        rank: usize,
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("waiting for rank {rank}: {source}")]
    Wait {
        rank: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("installing the signal forwarding: {0}")]
    Signals(#[source] std::io::Error),
    #[error("finding this executable to start the ranks: {0}")]
    CurrentExe(#[source] std::io::Error),
    #[error("MASTER_PORT={0:?}: not a port number")]
    MasterPort(String),
    #[error("finding a free port for the rendezvous: {0}")]
    FreePort(#[source] std::io::Error),
    /// The first rank that failed, and what the others did.
    #[error(
        "rank {rank} of {world_size} failed ({status}); see its messages above{}",
        if killed.is_empty() { String::new() } else {
            format!("; ranks {killed:?} did not stop within the grace period and were killed")
        }
    )]
    RankFailed {
        rank: usize,
        world_size: usize,
        status: String,
        killed: Vec<usize>,
    },
}

/// A one-node job of `nproc` ranks.
#[derive(Debug, Clone)]
pub struct LocalJob {
    pub nproc: usize,
    /// Where rank 0's rendezvous listens (`MASTER_PORT`).
    pub master_port: u16,
    /// How long the other ranks may take to stop after one failed.
    pub grace: Duration,
}

/// The exit of a job whose every rank finished: the first nonzero code among them (a signal
/// such as SIGTERM ends every rank with 143), else 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobExit {
    pub code: i32,
}

/// How long the other ranks of a job may take to stop once one failed, before they are killed
/// (a step and an emergency checkpoint of the 8B model fit in it).
pub const FAILURE_GRACE: Duration = Duration::from_secs(120);

/// `--nproc-per-node N` without a launcher: starts `nproc` copies of this process's own command
/// line (without that flag) as the ranks of a one-node job, with the rendezvous at
/// `MASTER_PORT` (else a free port), and waits for them.
pub fn run_self_as_ranks(
    nproc: usize,
    rendezvous_timeout: Duration,
) -> Result<JobExit, SpawnError> {
    let program = std::env::current_exe().map_err(SpawnError::CurrentExe)?;
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let master_port = match std::env::var("MASTER_PORT") {
        Ok(p) => p.parse().map_err(|_| SpawnError::MasterPort(p))?,
        Err(_) => free_port().map_err(SpawnError::FreePort)?,
    };
    tracing::info!(
        "starting {nproc} rank processes with the rendezvous at 127.0.0.1:{master_port} \
         (timeout {:.0} s)",
        rendezvous_timeout.as_secs_f64()
    );
    let job = LocalJob {
        nproc,
        master_port,
        grace: FAILURE_GRACE,
    };
    run_local_job(&program, &strip_nproc_flag(&args), &job)
}

/// A port on 127.0.0.1 that was free a moment ago (for `MASTER_PORT` when none is given).
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind(("127.0.0.1", 0))?
        .local_addr()?
        .port())
}

/// `args` without `--nproc-per-node N` / `--nproc-per-node=N` (what each rank runs).
pub fn strip_nproc_flag(args: &[OsString]) -> Vec<OsString> {
    let mut out = Vec::with_capacity(args.len());
    let mut skip_next = false;
    for a in args {
        if std::mem::take(&mut skip_next) {
            continue;
        }
        match a.to_str() {
            Some("--nproc-per-node") => skip_next = true,
            Some(s) if s.starts_with("--nproc-per-node=") => {}
            _ => out.push(a.clone()),
        }
    }
    out
}

/// The exit code a status stands for (128 + signal for a signalled process, as shells say).
fn code_of(status: &ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1)
}

fn describe(status: &ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => status.to_string(),
    }
}

fn send_signal(child: &Child, signal: i32) {
    // SAFETY: kill(2) on a pid we started and have not reaped yet.
    unsafe {
        libc::kill(child.id() as libc::pid_t, signal);
    }
}

/// Runs `program args` as every rank of `job` and waits for them.
///
/// `Ok(JobExit)` when no rank failed on its own (a rank that exits 130/143 after a forwarded
/// signal is not a failure: the code is passed on); `Err(RankFailed)` naming the first rank that
/// exited nonzero while no signal had been forwarded.
pub fn run_local_job(
    program: &Path,
    args: &[OsString],
    job: &LocalJob,
) -> Result<JobExit, SpawnError> {
    use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};
    let world_size = job.nproc.max(1);
    // The last signal received (0: none); forwarded on the next poll.
    let pending = Arc::new(AtomicUsize::new(0));
    let mut forwarded_stop = false;
    let mut hooks = Vec::new();
    for sig in [SIGINT, SIGTERM, SIGUSR1] {
        hooks.push(
            signal_hook::flag::register_usize(sig, pending.clone(), sig as usize)
                .map_err(SpawnError::Signals)?,
        );
    }
    let unregister = |hooks: Vec<signal_hook::SigId>| {
        for h in hooks {
            signal_hook::low_level::unregister(h);
        }
    };
    let mut children: Vec<Option<Child>> = Vec::with_capacity(world_size);
    for rank in 0..world_size {
        let mut cmd = Command::new(program);
        {
            use std::os::unix::process::CommandExt;
            // Own process group: a Ctrl-C on the terminal reaches only this supervisor, which
            // forwards it once (delivered twice, a rank would take it as the "exit at once"
            // second signal).
            cmd.process_group(0);
            // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec. A
            // rank must not outlive its supervisor (e.g. one killed with SIGKILL).
            #[cfg(target_os = "linux")]
            unsafe {
                cmd.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                    Ok(())
                });
            }
        }
        let spawned = cmd
            .args(args)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", world_size.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("LOCAL_WORLD_SIZE", world_size.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", job.master_port.to_string())
            .stdin(Stdio::null())
            .spawn();
        match spawned {
            Ok(c) => children.push(Some(c)),
            Err(source) => {
                for c in children.iter_mut().flatten() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                unregister(hooks);
                return Err(SpawnError::Start {
                    rank,
                    program: program.display().to_string(),
                    source,
                });
            }
        }
    }
    let mut first_failure: Option<(usize, String)> = None;
    let mut first_code = 0;
    let mut deadline: Option<Instant> = None;
    let mut killed = Vec::new();
    loop {
        let sig = pending.swap(0, Ordering::SeqCst);
        if sig != 0 {
            forwarded_stop |= sig as i32 != SIGUSR1;
            for c in children.iter().flatten() {
                send_signal(c, sig as i32);
            }
        }
        for (rank, slot) in children.iter_mut().enumerate() {
            let Some(child) = slot else { continue };
            let status = match child.try_wait() {
                Ok(Some(s)) => s,
                Ok(None) => continue,
                Err(source) => {
                    unregister(hooks);
                    return Err(SpawnError::Wait { rank, source });
                }
            };
            *slot = None;
            let code = code_of(&status);
            if code != 0 {
                if first_code == 0 {
                    first_code = code;
                }
                if !forwarded_stop && first_failure.is_none() {
                    first_failure = Some((rank, describe(&status)));
                    deadline = Some(Instant::now() + job.grace);
                }
            }
        }
        if children.iter().all(Option::is_none) {
            break;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            for (rank, slot) in children.iter_mut().enumerate() {
                if let Some(mut c) = slot.take() {
                    let _ = c.kill();
                    let _ = c.wait();
                    killed.push(rank);
                }
            }
            break;
        }
        std::thread::sleep(POLL);
    }
    unregister(hooks);
    match first_failure {
        Some((rank, status)) => Err(SpawnError::RankFailed {
            rank,
            world_size,
            status,
            killed,
        }),
        None => Ok(JobExit { code: first_code }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn strips_both_forms_of_the_flag() {
        assert_eq!(
            strip_nproc_flag(&os(&["run", "--nproc-per-node", "4", "--shards", "s"])),
            os(&["run", "--shards", "s"])
        );
        assert_eq!(
            strip_nproc_flag(&os(&["run", "--nproc-per-node=2", "--lr", "1"])),
            os(&["run", "--lr", "1"])
        );
    }
}
