//! Launch environment parsing, and the TCP rendezvous with real processes on 127.0.0.1.
//!
//! The multi-process tests re-run this test binary as the ranks: with `LLAVA_LAUNCH_CHILD` set,
//! the `child_rank` test plays one rank of the named scenario and exits the process itself.

use std::collections::HashMap;
use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use llava_trainer::parallel::launch::{
    expand_hostlist, first_host, from_env, from_process_env, LaunchError, LaunchSource,
};
use llava_trainer::parallel::rendezvous::{rendezvous, RendezvousError};

fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let m: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |k| m.get(k).cloned()
}

// ---------------------------------------------------------------- (a) environment parsing

#[test]
fn torchrun_env() {
    let vars = env_of(&[
        ("RANK", "5"),
        ("WORLD_SIZE", "16"),
        ("LOCAL_RANK", "5"),
        ("LOCAL_WORLD_SIZE", "8"),
        ("MASTER_ADDR", "node001"),
        ("MASTER_PORT", "29400"),
        // Slurm variables are present too under `srun torchrun`; torchrun's win.
        ("SLURM_PROCID", "0"),
        ("SLURM_NTASKS", "2"),
    ]);
    let e = from_env(&vars).expect("valid torchrun env");
    assert_eq!(e.source, LaunchSource::Torchrun);
    assert_eq!(
        (e.rank, e.world_size, e.local_rank, e.local_world_size),
        (5, 16, 5, 8)
    );
    assert_eq!((e.master_addr.as_str(), e.master_port), ("node001", 29400));
}

#[test]
fn torchrun_bad_values_name_variable_and_value() {
    let base = [
        ("RANK", "1"),
        ("WORLD_SIZE", "2"),
        ("LOCAL_RANK", "1"),
        ("LOCAL_WORLD_SIZE", "2"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", "29500"),
    ];
    let with = |k: &'static str, v: &'static str| {
        let mut p: Vec<(&str, &str)> = base.iter().copied().filter(|(b, _)| *b != k).collect();
        p.push((k, v));
        from_env(&env_of(&p))
    };
    let msg = |r: Result<_, LaunchError>| r.expect_err("must fail").to_string();
    let m = msg(with("RANK", "two"));
    assert!(m.contains("RANK") && m.contains("two"), "{m}");
    let m = msg(with("RANK", "2"));
    assert!(m.contains("RANK") && m.contains("WORLD_SIZE=2"), "{m}");
    let m = msg(with("WORLD_SIZE", "0"));
    assert!(m.contains("WORLD_SIZE") && m.contains("\"0\""), "{m}");
    let m = msg(with("MASTER_PORT", "70000"));
    assert!(m.contains("MASTER_PORT") && m.contains("70000"), "{m}");
    let m = msg(with("LOCAL_RANK", "-1"));
    assert!(m.contains("LOCAL_RANK") && m.contains("-1"), "{m}");
    let no_addr: Vec<_> = base
        .iter()
        .copied()
        .filter(|(k, _)| *k != "MASTER_ADDR")
        .collect();
    let m = msg(from_env(&env_of(&no_addr)));
    assert!(m.contains("MASTER_ADDR") && m.contains("not set"), "{m}");
}

#[test]
fn slurm_env() {
    let vars = env_of(&[
        ("SLURM_PROCID", "9"),
        ("SLURM_NTASKS", "16"),
        ("SLURM_LOCALID", "1"),
        ("SLURM_TASKS_PER_NODE", "8(x2)"),
        ("SLURM_JOB_NODELIST", "gpu-a[07-08],gpu-b3"),
    ]);
    let e = from_env(&vars).expect("valid slurm env");
    assert_eq!(e.source, LaunchSource::Slurm);
    assert_eq!(
        (e.rank, e.world_size, e.local_rank, e.local_world_size),
        (9, 16, 1, 8)
    );
    assert_eq!((e.master_addr.as_str(), e.master_port), ("gpu-a07", 29500));

    // --ntasks-per-node wins over the per-node list; MASTER_PORT is honoured.
    let vars = env_of(&[
        ("SLURM_PROCID", "0"),
        ("SLURM_NTASKS", "4"),
        ("SLURM_LOCALID", "0"),
        ("SLURM_NTASKS_PER_NODE", "4"),
        ("SLURM_TASKS_PER_NODE", "garbage"),
        ("SLURM_JOB_NODELIST", "node[001-004,007],other"),
        ("MASTER_PORT", "12345"),
    ]);
    let e = from_env(&vars).expect("valid slurm env");
    assert_eq!((e.master_addr.as_str(), e.master_port), ("node001", 12345));
    assert_eq!(e.local_world_size, 4);

    // Uneven nodes: this node's count comes from SLURM_NODEID.
    let vars = env_of(&[
        ("SLURM_PROCID", "17"),
        ("SLURM_NTASKS", "20"),
        ("SLURM_LOCALID", "1"),
        ("SLURM_NODEID", "2"),
        ("SLURM_TASKS_PER_NODE", "8(x2),4"),
        ("SLURM_JOB_NODELIST", "a,b,c"),
    ]);
    let e = from_env(&vars).expect("valid slurm env");
    assert_eq!((e.local_world_size, e.master_addr.as_str()), (4, "a"));
}

#[test]
fn slurm_bad_values_name_variable_and_value() {
    let base = |extra: (&'static str, &'static str)| {
        let mut p = vec![
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "2"),
            ("SLURM_LOCALID", "0"),
            ("SLURM_TASKS_PER_NODE", "2"),
            ("SLURM_JOB_NODELIST", "n[1-2]"),
        ];
        p.retain(|(k, _)| *k != extra.0);
        p.push(extra);
        from_env(&env_of(&p)).expect_err("must fail").to_string()
    };
    let m = base(("SLURM_JOB_NODELIST", "n[1-2"));
    assert!(
        m.contains("SLURM_JOB_NODELIST") && m.contains("n[1-2"),
        "{m}"
    );
    let m = base(("SLURM_TASKS_PER_NODE", "8(x"));
    assert!(
        m.contains("SLURM_TASKS_PER_NODE") && m.contains("8(x"),
        "{m}"
    );
    let m = base(("SLURM_PROCID", "2"));
    assert!(
        m.contains("SLURM_PROCID") && m.contains("SLURM_NTASKS=2"),
        "{m}"
    );
    let m = base(("SLURM_NTASKS", "x"));
    assert!(m.contains("SLURM_NTASKS") && m.contains("\"x\""), "{m}");
    let m = base(("SLURM_TASKS_PER_NODE", "8(x2),4"));
    assert!(m.contains("SLURM_NODEID"), "{m}");
}

#[test]
fn single_process_without_launcher() {
    let e = from_env(&env_of(&[("HOME", "/root")])).expect("single");
    assert_eq!(e.source, LaunchSource::Single);
    assert_eq!((e.rank, e.world_size), (0, 1));
    // Empty values (`export RANK=`) count as unset.
    let e = from_env(&env_of(&[("RANK", ""), ("WORLD_SIZE", " ")])).expect("single");
    assert_eq!(e.source, LaunchSource::Single);
}

#[test]
fn hostlists() {
    assert_eq!(
        first_host("node[001-004,007],other").as_deref(),
        Ok("node001")
    );
    assert_eq!(first_host("gpu-a[1-2]").as_deref(), Ok("gpu-a1"));
    assert_eq!(first_host("alpha,beta").as_deref(), Ok("alpha"));
    assert_eq!(first_host("solo").as_deref(), Ok("solo"));
    assert_eq!(first_host("rack[2-3]-n[08-09]").as_deref(), Ok("rack2-n08"));
    assert_eq!(
        expand_hostlist("node[001-003,007],other,gpu-a[9-10]", 100).expect("valid"),
        ["node001", "node002", "node003", "node007", "other", "gpu-a9", "gpu-a10"]
    );
    assert_eq!(
        expand_hostlist("r[1-2]-n[1-2]", 100).expect("valid"),
        ["r1-n1", "r1-n2", "r2-n1", "r2-n2"]
    );
    assert!(expand_hostlist("n[1-100000]", 1000).is_err());
    for bad in ["", "n[", "n]", "n[3-1]", "n[a-b]", "a,,b", "n[1-2[3]]"] {
        assert!(first_host(bad).is_err(), "{bad:?} should be rejected");
    }
}

// ---------------------------------------------------------------- processes

const CHILD_VAR: &str = "LLAVA_LAUNCH_CHILD";
/// Every child gives up on its own well before the parent kills it.
const PARENT_LIMIT: Duration = Duration::from_secs(10);

/// A port that was free a moment ago (the OS hands out fresh ephemeral ports in order).
fn free_port() -> u16 {
    llava_trainer::parallel::spawn::free_port().expect("bind 127.0.0.1:0")
}

fn spawn_rank(scenario: &str, rank: usize, world: usize, port: u16) -> Child {
    Command::new(std::env::current_exe().expect("current exe"))
        .args([
            "--exact",
            "launch::child_rank",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_VAR, scenario)
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("LOCAL_WORLD_SIZE", world.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn child rank")
}

/// Waits at most `PARENT_LIMIT` (then kills); returns the exit code and stdout+stderr.
fn finish(mut child: Child) -> (Option<i32>, String) {
    let mut out = child.stdout.take().expect("piped stdout");
    let mut err = child.stderr.take().expect("piped stderr");
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + PARENT_LIMIT;
    let code = loop {
        match child.try_wait().expect("try_wait") {
            Some(status) => break status.code(),
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let text = t_out.join().unwrap_or_default() + &t_err.join().unwrap_or_default();
    (code, text)
}

fn run_job(scenario: &str, world: usize, ranks: &[usize]) -> Vec<(Option<i32>, String)> {
    let port = free_port();
    let children: Vec<Child> = ranks
        .iter()
        .map(|&r| spawn_rank(scenario, r, world, port))
        .collect();
    children.into_iter().map(finish).collect()
}

/// The rank side of every scenario. Exit codes: 0 ok, 2 expected error seen, 10+ wrong outcome.
#[test]
fn child_rank() {
    let Ok(scenario) = std::env::var(CHILD_VAR) else {
        return; // a normal test run: nothing to do
    };
    let env = from_process_env().expect("child launch env");
    let id: Vec<u8> = (0u8..128)
        .map(|b| b.wrapping_mul(7).wrapping_add(3))
        .collect();
    let rank0_id = (env.rank == 0).then(|| id.clone());
    // In "missing", rank 1 waits longer than rank 0, so it hears rank 0's reason.
    let timeout = match scenario.as_str() {
        "missing" if env.rank == 0 => Duration::from_secs(3),
        _ => Duration::from_secs(6),
    };
    let rdzv = match rendezvous(&env, rank0_id, timeout) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("rank {}: rendezvous error: {e}", env.rank);
            let expected = scenario == "missing" || scenario == "dup";
            std::process::exit(if expected { 2 } else { 10 });
        }
    };
    if scenario == "missing" || scenario == "dup" {
        eprintln!("rank {}: rendezvous unexpectedly succeeded", env.rank);
        std::process::exit(11);
    }
    if rdzv.id != id {
        eprintln!("rank {}: wrong id {:?}", env.rank, rdzv.id);
        std::process::exit(12);
    }
    println!("rank {}: got id of {} bytes", env.rank, rdzv.id.len());
    match scenario.as_str() {
        "exchange" => match rdzv.finish(Duration::from_secs(5)) {
            Ok(()) => std::process::exit(0),
            Err(e) => {
                eprintln!("rank {}: finish: {e}", env.rank);
                std::process::exit(13);
            }
        },
        "fail" | "die" if env.rank == 1 => {
            if scenario == "fail" {
                rdzv.report_failure("boom");
                std::process::exit(1);
            }
            // Dies without a word, as a crashed or killed process would.
            std::process::exit(3);
        }
        "fail" | "die" => {
            // A training loop's between-steps check.
            let deadline = Instant::now() + Duration::from_secs(6);
            while Instant::now() < deadline {
                if let Some((rank, msg)) = rdzv.failure() {
                    eprintln!("rank {}: observed failure of rank {rank}: {msg}", env.rank);
                    std::process::exit(2);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            eprintln!("rank {}: no failure observed", env.rank);
            std::process::exit(14);
        }
        "barrier_missing" => {
            if env.rank == 2 {
                // Never reaches the barrier; stays connected until the others gave up.
                std::thread::sleep(Duration::from_secs(5));
                std::process::exit(0);
            }
            match rdzv.barrier(Duration::from_secs(2)) {
                Err(e @ RendezvousError::BarrierTimeout { .. }) => {
                    eprintln!("rank {}: {e}", env.rank);
                    // Stay until the other waiting rank timed out too, or it would see this
                    // rank's exit as a failure instead.
                    std::thread::sleep(Duration::from_millis(1500));
                    std::process::exit(2);
                }
                other => {
                    eprintln!("rank {}: barrier gave {other:?}", env.rank);
                    std::process::exit(15);
                }
            }
        }
        s => {
            eprintln!("unknown scenario {s}");
            std::process::exit(99);
        }
    }
}

// ---------------------------------------------------------------- (b)-(d)

#[test]
fn id_exchange_three_processes() {
    let res = run_job("exchange", 3, &[1, 2, 0]); // rank 0 last: the others retry
    for (rank, (code, out)) in [1, 2, 0].iter().zip(&res) {
        assert_eq!(*code, Some(0), "rank {rank}:\n{out}");
        assert!(out.contains("got id of 128 bytes"), "rank {rank}:\n{out}");
    }
}

#[test]
fn missing_rank_is_named() {
    let started = Instant::now();
    let res = run_job("missing", 3, &[0, 1]);
    let (code0, out0) = &res[0];
    assert_eq!(*code0, Some(2), "rank 0:\n{out0}");
    assert!(
        out0.contains("ranks [2] did not join"),
        "rank 0 must name rank 2:\n{out0}"
    );
    let (code1, out1) = &res[1];
    assert_eq!(*code1, Some(2), "rank 1:\n{out1}");
    assert!(out1.contains("[2]"), "rank 1 should hear why:\n{out1}");
    assert!(started.elapsed() < PARENT_LIMIT, "bounded by the timeout");
}

#[test]
fn reported_failure_reaches_every_rank() {
    let res = run_job("fail", 3, &[0, 1, 2]);
    assert_eq!(res[1].0, Some(1), "rank 1:\n{}", res[1].1);
    for r in [0, 2] {
        let (code, out) = &res[r];
        assert_eq!(*code, Some(2), "rank {r}:\n{out}");
        assert!(
            out.contains("observed failure of rank 1: boom"),
            "rank {r}:\n{out}"
        );
    }
}

#[test]
fn dead_rank_is_connection_lost() {
    let res = run_job("die", 3, &[0, 1, 2]);
    assert_eq!(res[1].0, Some(3), "rank 1:\n{}", res[1].1);
    for r in [0, 2] {
        let (code, out) = &res[r];
        assert_eq!(*code, Some(2), "rank {r}:\n{out}");
        assert!(
            out.contains("observed failure of rank 1: connection lost"),
            "rank {r}:\n{out}"
        );
    }
}

#[test]
fn barrier_timeout_names_missing_rank() {
    let res = run_job("barrier_missing", 3, &[0, 1, 2]);
    for r in [0, 1] {
        let (code, out) = &res[r];
        assert_eq!(*code, Some(2), "rank {r}:\n{out}");
        assert!(out.contains("ranks [2] did not arrive"), "rank {r}:\n{out}");
    }
    assert_eq!(res[2].0, Some(0), "rank 2:\n{}", res[2].1);
}

#[test]
fn duplicate_rank_is_rejected() {
    let res = run_job("dup", 3, &[0, 1, 1]);
    for (i, (code, out)) in res.iter().enumerate() {
        assert_eq!(*code, Some(2), "process {i}:\n{out}");
        assert!(out.contains("rank 1 joined twice"), "process {i}:\n{out}");
    }
}

#[test]
fn rendezvous_can_be_shared_with_a_training_thread() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<llava_trainer::parallel::rendezvous::Rendezvous>();
}

#[test]
fn single_rank_needs_no_network() {
    let env = llava_trainer::parallel::launch::LaunchEnv::single();
    let r = rendezvous(&env, Some(vec![1, 2, 3]), Duration::from_millis(10)).expect("world of one");
    assert_eq!(r.id, [1, 2, 3]);
    assert_eq!(r.failure(), None);
    r.barrier(Duration::from_millis(10))
        .expect("trivial barrier");
    r.finish(Duration::from_millis(10)).expect("trivial finish");
}

// ---------------------------------------------------------------- `--nproc-per-node` supervisor

mod local_job {
    use std::ffi::OsString;
    use std::path::{Path, PathBuf};
    use std::time::Duration;

    use llava_trainer::parallel::spawn::{run_local_job, JobExit, LocalJob, SpawnError};

    fn scratch(name: &str) -> PathBuf {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("local-job-{name}-{}", std::process::id()));
        std::fs::remove_dir_all(&dir).ok();
        std::fs::create_dir_all(&dir).expect("scratch dir");
        dir
    }

    /// Every rank runs `sh -c script`.
    fn sh(script: &str, nproc: usize, grace: Duration) -> Result<JobExit, SpawnError> {
        let args: Vec<OsString> = vec!["-c".into(), script.into()];
        let job = LocalJob {
            nproc,
            master_port: 29_517,
            grace,
        };
        run_local_job(Path::new("sh"), &args, &job)
    }

    #[test]
    fn every_rank_gets_torchruns_variables() {
        let dir = scratch("env");
        let script = format!(
            "echo $RANK $WORLD_SIZE $LOCAL_RANK $LOCAL_WORLD_SIZE $MASTER_ADDR $MASTER_PORT \
             > {}/rank$RANK",
            dir.display()
        );
        let exit = sh(&script, 3, Duration::from_secs(5)).expect("all ranks succeed");
        assert_eq!(exit, JobExit { code: 0 });
        for r in 0..3 {
            let got = std::fs::read_to_string(dir.join(format!("rank{r}"))).expect("rank ran");
            assert_eq!(got.trim(), format!("{r} 3 {r} 3 127.0.0.1 29517"));
        }
    }

    #[test]
    fn a_failed_rank_is_named_and_stragglers_are_killed_after_the_grace() {
        // Rank 1 fails at once; the others would run for a minute.
        let script = r#"if [ "$RANK" = 1 ]; then echo boom >&2; exit 7; fi; sleep 60"#;
        match sh(script, 3, Duration::from_millis(300)) {
            Err(e @ SpawnError::RankFailed { .. }) => {
                let SpawnError::RankFailed {
                    rank,
                    world_size,
                    ref status,
                    ref killed,
                } = e
                else {
                    unreachable!()
                };
                assert_eq!((rank, world_size), (1, 3));
                assert_eq!(status, "exit code 7");
                assert_eq!(killed, &[0, 2]);
                let msg = e.to_string();
                assert!(msg.contains("rank 1 of 3 failed (exit code 7)"), "{msg}");
                assert!(msg.contains("ranks [0, 2]"), "{msg}");
            }
            other => panic!("expected RankFailed, got {other:?}"),
        }
    }

    #[test]
    fn ranks_that_stop_on_their_own_are_not_killed() {
        // Rank 2 fails; the others notice (here: a short sleep) and exit nonzero themselves,
        // as ranks told by the rendezvous do. The first failure is the one named.
        let script = r#"if [ "$RANK" = 2 ]; then exit 3; fi; sleep 0.3; exit 1"#;
        match sh(script, 3, Duration::from_secs(30)) {
            Err(SpawnError::RankFailed { rank, killed, .. }) => {
                assert_eq!(rank, 2);
                assert!(killed.is_empty(), "killed {killed:?}");
            }
            other => panic!("expected RankFailed, got {other:?}"),
        }
    }

    #[test]
    fn a_program_that_cannot_start_is_an_error_naming_it() {
        let job = LocalJob {
            nproc: 2,
            master_port: 29_518,
            grace: Duration::from_secs(1),
        };
        let err = run_local_job(Path::new("/nonexistent/llava-trainer"), &[], &job)
            .expect_err("no such program");
        assert!(matches!(err, SpawnError::Start { rank: 0, .. }), "{err:?}");
        assert!(err.to_string().contains("/nonexistent/llava-trainer"));
    }
}
