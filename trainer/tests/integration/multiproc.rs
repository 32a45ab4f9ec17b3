//! CPU ranks as real processes (issue 28): `llava-trainer run` started by the real `torchrun`
//! (static, `--standalone`, c10d rendezvous), by a real one-node Slurm cluster (`srun`, `sbatch`)
//! and a Slurm-like environment set by hand, and by
//! its own `--nproc-per-node` supervisor; every one trains the tiny model for a few steps with
//! 2 ranks, and its losses equal world size 1's (same global batch) to 1e-6 and the thread
//! ranks' exactly.
//!
//! torchrun comes from `LLAVA_TORCHRUN` (a `torchrun` binary, or a python with torch), else the
//! test venv's torch (`scripts/setup.sh` installs it); a missing venv fails the test, and only
//! `LLAVA_NO_TORCH=1` skips it (scripts/torchrun-check.sh runs the same launches by hand).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;

const BIN: &str = env!("CARGO_BIN_EXE_llava-trainer");
const STEPS: &str = "3";

fn scratch(name: &str) -> PathBuf {
    llava_test_support::scratch(&format!("multiproc-{name}"))
}

/// Text-only synthetic shards and the tiny model, made once per test binary.
fn inputs() -> &'static (PathBuf, PathBuf) {
    static INPUTS: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    INPUTS.get_or_init(|| crate::common::text_shards_and_tiny_model(&scratch("inputs")))
}

/// The arguments of `llava-trainer run` (after the program) for a short CPU run into `output`.
fn run_args(output: &Path, grad_accum: usize) -> Vec<String> {
    let (shards, model) = inputs();
    [
        "run",
        "--shards",
        &shards.display().to_string(),
        "--model",
        &model.display().to_string(),
        "--output",
        &output.display().to_string(),
        "--max-steps",
        STEPS,
        "--lr",
        "1e-3",
        "--warmup-ratio",
        "0.1",
        "--workers",
        "1",
        "--device",
        "cpu",
        "--no-resume",
        "--grad-accum",
        &grad_accum.to_string(),
        "--rendezvous-timeout",
        "120",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// A command without any launcher variable inherited from the test's own environment.
fn clean(mut cmd: Command) -> Command {
    for k in [
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
        "SLURM_PROCID",
        "SLURM_NTASKS",
        "SLURM_LOCALID",
        "SLURM_JOB_ID",
        "TORCHELASTIC_USE_AGENT_STORE",
    ] {
        cmd.env_remove(k);
    }
    cmd.stdin(Stdio::null());
    cmd
}

fn ok(out: Output, what: &str) -> Output {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The `loss` of every step line of `output/log.jsonl`.
fn losses(output: &Path) -> Vec<f64> {
    let log = std::fs::read_to_string(output.join("log.jsonl")).expect("log.jsonl");
    log.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("a JSON line"))
        .filter_map(|v| v.get("loss").and_then(|x| x.as_f64()))
        .collect()
}

/// World size 1 with grad_accum 2: the global batch of 2 ranks x 1.
fn reference() -> &'static Vec<f64> {
    static REF: OnceLock<Vec<f64>> = OnceLock::new();
    REF.get_or_init(|| {
        let out = scratch("reference").join("run");
        let mut cmd = clean(Command::new(BIN));
        ok(
            cmd.args(run_args(&out, 2)).output().expect("run"),
            "world 1",
        );
        let l = losses(&out);
        assert_eq!(l.len(), STEPS.parse::<usize>().unwrap(), "{l:?}");
        if let Some(d) = out.parent() {
            std::fs::remove_dir_all(d).ok();
        }
        l
    })
}

fn assert_matches_reference(name: &str, got: &[f64]) {
    let want = reference();
    assert_eq!(got.len(), want.len(), "{name}: {got:?} vs {want:?}");
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!(
            (a - b).abs() <= 1e-6 * b.abs().max(1.0),
            "{name}: step {} loss {a} vs world 1 {b}",
            i + 1
        );
    }
    eprintln!("{name}: losses {got:?} = world 1's within 1e-6");
}

#[test]
fn nproc_per_node_processes_equal_threads_and_world_1() {
    let dir = scratch("nproc");
    let (procs, threads) = (dir.join("processes"), dir.join("threads"));
    let mut cmd = clean(Command::new(BIN));
    ok(
        cmd.args(run_args(&procs, 1))
            .args(["--nproc-per-node", "2"])
            .output()
            .expect("run"),
        "--nproc-per-node 2 (processes)",
    );
    let mut cmd = clean(Command::new(BIN));
    ok(
        cmd.args(run_args(&threads, 1))
            .args(["--nproc-per-node", "2", "--cpu-ranks", "threads"])
            .output()
            .expect("run"),
        "--nproc-per-node 2 --cpu-ranks threads",
    );
    let (p, t) = (losses(&procs), losses(&threads));
    assert_eq!(p, t, "processes and threads sum in the same order");
    assert_matches_reference("--nproc-per-node 2", &p);
    // The checkpoints are byte-identical too.
    let last = |d: &Path| {
        let (_, c) = llava_trainer::io::checkpoint::list_checkpoints(d)
            .pop()
            .expect("a checkpoint");
        std::fs::read(c.join("model.safetensors")).expect("weights")
    };
    assert!(last(&procs) == last(&threads), "final weights differ");
    std::fs::remove_dir_all(&dir).ok();
}

fn free_port() -> u16 {
    llava_trainer::parallel::spawn::free_port().expect("a free port")
}

/// Two ranks with Slurm's variables, as `srun --ntasks 2` on one node sets them.
fn slurm_ranks(output: &Path, master: Option<u16>, job_id: &str) -> Vec<Child> {
    (0..2)
        .map(|rank| {
            let mut cmd = clean(Command::new(BIN));
            cmd.args(run_args(output, 1))
                .env("SLURM_PROCID", rank.to_string())
                .env("SLURM_NTASKS", "2")
                .env("SLURM_LOCALID", rank.to_string())
                .env("SLURM_TASKS_PER_NODE", "2")
                .env("SLURM_JOB_NODELIST", "127.0.0.1")
                .env("SLURM_JOB_ID", job_id)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            if let Some(p) = master {
                cmd.env("MASTER_ADDR", "127.0.0.1")
                    .env("MASTER_PORT", p.to_string());
            }
            cmd.spawn().expect("rank starts")
        })
        .collect()
}

#[test]
fn slurm_like_environment_trains_with_and_without_master_port() {
    let dir = scratch("slurm");
    // With MASTER_ADDR/MASTER_PORT, as many sbatch scripts export them.
    let with = dir.join("with-master");
    for (r, c) in slurm_ranks(&with, Some(free_port()), "1")
        .into_iter()
        .enumerate()
    {
        ok(
            c.wait_with_output().expect("rank"),
            &format!("slurm rank {r}"),
        );
    }
    assert_matches_reference("slurm with MASTER_PORT", &losses(&with));
    // Without: the port comes from SLURM_JOB_ID, the host from the node list.
    let without = dir.join("without-master");
    let job = (std::process::id() % 20000).to_string();
    for (r, c) in slurm_ranks(&without, None, &job).into_iter().enumerate() {
        ok(
            c.wait_with_output().expect("rank"),
            &format!("slurm rank {r}"),
        );
    }
    assert_matches_reference("slurm without MASTER_PORT", &losses(&without));
    std::fs::remove_dir_all(&dir).ok();
}

/// A real one-node Slurm cluster (`scripts/slurm-local.sh`: Debian's slurmctld, slurmd and
/// munge on loopback ports), stopped when dropped. `None` only with `LLAVA_NO_SLURM=1`; missing
/// packages fail the test (scripts/setup.sh installs them).
struct SlurmCluster {
    dir: PathBuf,
    conf: PathBuf,
}

impl SlurmCluster {
    fn start() -> Option<Self> {
        if std::env::var_os("LLAVA_NO_SLURM").is_some_and(|v| v == "1") {
            eprintln!("skipped the real Slurm cluster: LLAVA_NO_SLURM=1");
            return None;
        }
        // Short and outside the repo: munge's socket path must fit a sockaddr_un.
        let dir = std::env::temp_dir().join(format!("llava-slurm-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("slurm dir");
        let script = llava_test_support::repo_root().join("scripts/slurm-local.sh");
        let out = ok(
            clean(Command::new(&script))
                .arg("start")
                .arg(&dir)
                .output()
                .expect("slurm-local.sh runs"),
            "scripts/slurm-local.sh start",
        );
        let conf = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        Some(SlurmCluster { dir, conf })
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = clean(Command::new(program));
        cmd.env("SLURM_CONF", &self.conf);
        cmd
    }
}

impl Drop for SlurmCluster {
    fn drop(&mut self) {
        let script = llava_test_support::repo_root().join("scripts/slurm-local.sh");
        Command::new(script)
            .arg("stop")
            .arg(&self.dir)
            .status()
            .ok();
        std::fs::remove_dir_all(&self.dir).ok();
    }
}

/// The real thing: `srun --ntasks 2` (the rendezvous port from SLURM_JOB_ID, the host from the
/// node list) and `sbatch --wait` of a batch script that exports MASTER_ADDR/MASTER_PORT and
/// calls srun, on a one-node Slurm cluster; both train with 2 CPU ranks equal to world 1.
#[test]
fn real_slurm_srun_and_sbatch_train_with_2_cpu_ranks() {
    let Some(cluster) = SlurmCluster::start() else {
        return;
    };
    let dir = scratch("slurm-real");
    let out = dir.join("srun");
    let mut srun = cluster.command("srun");
    srun.args(["--ntasks", "2", "--kill-on-bad-exit=1", "--time", "10"])
        .arg(BIN)
        .args(run_args(&out, 1));
    ok(srun.output().expect("srun starts"), "srun --ntasks 2");
    assert_matches_reference("srun", &losses(&out));

    let out = dir.join("sbatch");
    let quoted: Vec<String> = run_args(&out, 1).iter().map(|a| format!("'{a}'")).collect();
    let script = dir.join("train.sbatch");
    std::fs::write(
        &script,
        format!(
            "#!/bin/bash\n#SBATCH --ntasks=2\n#SBATCH --time=10\n\
             export MASTER_ADDR=127.0.0.1 MASTER_PORT={}\n\
             srun --kill-on-bad-exit=1 '{BIN}' {}\n",
            free_port(),
            quoted.join(" ")
        ),
    )
    .expect("batch script");
    let log = dir.join("sbatch.log");
    let status = cluster
        .command("sbatch")
        .arg("--wait")
        .arg(format!("--output={}", log.display()))
        .arg(&script)
        .output()
        .expect("sbatch starts");
    let job_log = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        status.status.success(),
        "sbatch --wait failed ({}): {}\njob output:\n{job_log}",
        status.status,
        String::from_utf8_lossy(&status.stderr)
    );
    assert_matches_reference("sbatch + srun with MASTER_PORT", &losses(&out));
    std::fs::remove_dir_all(&dir).ok();
}

/// The torchrun command: `LLAVA_TORCHRUN` (a `torchrun` binary or a python with torch), else
/// `python -m torch.distributed.run` with the test venv's python (`test_support::torch_python`).
/// `None` only when the user opted out of torch (`LLAVA_NO_TORCH=1`).
pub fn torchrun() -> Option<Command> {
    let found = match std::env::var_os("LLAVA_TORCHRUN") {
        Some(p) => PathBuf::from(p),
        None => llava_test_support::torch_python()?,
    };
    let is_python = found
        .file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with("python"));
    let mut cmd = clean(Command::new(&found));
    if is_python {
        cmd.args(["-m", "torch.distributed.run"]);
    }
    Some(cmd)
}

fn torchrun_mode(name: &str, flags: &[String]) {
    let Some(mut cmd) = torchrun() else {
        eprintln!("skipped torchrun {name}: LLAVA_NO_TORCH=1");
        return;
    };
    let out = scratch(&format!("torchrun-{name}")).join("run");
    cmd.args(["--nproc-per-node", "2", "--no-python"])
        .args(flags)
        .arg(BIN)
        .args(run_args(&out, 1));
    ok(
        cmd.output().expect("torchrun starts"),
        &format!("torchrun {name}"),
    );
    assert_matches_reference(&format!("torchrun {name}"), &losses(&out));
    if let Some(d) = out.parent() {
        std::fs::remove_dir_all(d).ok();
    }
}

#[test]
fn torchrun_static() {
    torchrun_mode("static", &["--master-port".into(), free_port().to_string()]);
}

#[test]
fn torchrun_standalone() {
    torchrun_mode("standalone", &["--standalone".into()]);
}

#[test]
fn torchrun_c10d_rendezvous() {
    torchrun_mode(
        "c10d",
        &[
            "--rdzv-backend".into(),
            "c10d".into(),
            "--rdzv-endpoint".into(),
            format!("127.0.0.1:{}", free_port()),
        ],
    );
}

/// `run` with `ranks` thread ranks, ZeRO stage `zero`, `accum` micro-batches per rank, into
/// `output` (resuming from its latest checkpoint when there is one).
fn zero_run(output: &Path, ranks: usize, zero: u8, accum: usize, extra: &[&str]) {
    let mut args = run_args(output, accum);
    args.retain(|a| a != "--no-resume");
    let pos = args.iter().position(|a| a == "--max-steps").expect("flag") + 1;
    args[pos] = "4".into();
    let mut cmd = clean(Command::new(BIN));
    cmd.args(args)
        .args(["--zero-stage", &zero.to_string(), "--cpu-ranks", "threads"])
        .args(["--nproc-per-node", &ranks.to_string()])
        .args(extra);
    ok(
        cmd.output().expect("run"),
        &format!("{ranks} ranks, ZeRO {zero}"),
    );
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read_dir") {
        let e = e.expect("entry");
        std::fs::copy(e.path(), to.join(e.file_name())).expect("copy");
    }
}

#[test]
fn zero_checkpoint_is_sharded_and_resumes_at_world_1_and_4() {
    let dir = scratch("zero-resume");
    let first = dir.join("world2");
    // 4 steps at world 2, ZeRO-1, 2 micro-batches per rank; a checkpoint at step 2.
    zero_run(&first, 2, 1, 2, &["--save-every", "2"]);
    let ck2 = first.join("checkpoint-2");
    assert!(
        ck2.join("optimizer_index.json").is_file(),
        "sharded checkpoint"
    );
    assert!(
        !ck2.join("trainer_state.safetensors").exists(),
        "no gathered state"
    );
    for r in 0..2 {
        let f = ck2.join(format!("optimizer-rank{r:05}-of-00002.safetensors"));
        assert!(f.is_file(), "{}", f.display());
    }
    let want = losses(&first);
    // The same global batch (4 micro-batches) at world 1 and 4, resumed from step 2.
    for (world, accum, zero) in [(1usize, 4usize, 0u8), (4, 1, 1), (4, 1, 2)] {
        let out = dir.join(format!("resume-w{world}-z{zero}"));
        copy_dir(&ck2, &out.join("checkpoint-2"));
        // The first run's log: the resume keeps its lines up to step 2.
        std::fs::copy(first.join("log.jsonl"), out.join("log.jsonl")).expect("log");
        zero_run(&out, world, zero, accum, &[]);
        let got = losses(&out);
        assert_eq!(got.len(), want.len(), "world {world}: {got:?}");
        for (i, (a, b)) in got.iter().zip(&want).enumerate().skip(2) {
            assert!(
                (a - b).abs() <= 1e-6 * b.abs().max(1.0),
                "world {world} ZeRO {zero}: step {} loss {a} vs {b}",
                i + 1
            );
        }
        eprintln!("resumed at world {world} ZeRO {zero}: {got:?} (world 2: {want:?})");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_killed_rank_is_named_the_last_checkpoint_is_intact_and_a_restart_resumes() {
    let dir = scratch("killed");
    let out = dir.join("run");
    let port = free_port();
    let start = |out: &Path| -> Vec<Child> {
        (0..2)
            .map(|rank| {
                let mut args = run_args(out, 1);
                args.retain(|a| a != "--no-resume");
                let pos = args.iter().position(|a| a == "--max-steps").expect("flag") + 1;
                args[pos] = "40".into();
                let mut cmd = clean(Command::new(BIN));
                cmd.args(args)
                    .args(["--save-every", "1"])
                    .env("SLURM_PROCID", rank.to_string())
                    .env("SLURM_NTASKS", "2")
                    .env("SLURM_LOCALID", rank.to_string())
                    .env("SLURM_TASKS_PER_NODE", "2")
                    .env("SLURM_JOB_NODELIST", "127.0.0.1")
                    .env("MASTER_PORT", port.to_string())
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped());
                cmd.spawn().expect("rank starts")
            })
            .collect()
    };
    let mut ranks = start(&out);
    // Wait for a complete checkpoint, then kill rank 1 as the OOM killer would.
    let t0 = std::time::Instant::now();
    while llava_trainer::io::checkpoint::list_checkpoints(&out).is_empty() {
        assert!(t0.elapsed().as_secs() < 300, "no checkpoint within 300 s");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let mut r1 = ranks.pop().expect("rank 1");
    r1.kill().expect("kill rank 1");
    r1.wait().ok();
    let killed_at = std::time::Instant::now();
    let r0 = ranks
        .pop()
        .expect("rank 0")
        .wait_with_output()
        .expect("rank 0");
    let err = String::from_utf8_lossy(&r0.stderr).to_string();
    assert!(!r0.status.success(), "rank 0 must fail: {err}");
    assert!(err.contains("rank 1"), "rank 0 names rank 1: {err}");
    assert!(
        killed_at.elapsed().as_secs() < 60,
        "{:?}",
        killed_at.elapsed()
    );
    // Every checkpoint left is complete (the rename is atomic); the last one resumes.
    let cks = llava_trainer::io::checkpoint::list_checkpoints(&out);
    let (last, last_dir) = cks.last().cloned().expect("a checkpoint");
    llava_trainer::io::checkpoint::check_is_checkpoint(&last_dir).expect("complete");
    let mut again = start(&out);
    // Stop the restarted job after it resumed: the log says where from.
    let r1 = again.pop().expect("rank 1");
    let r0 = again.pop().expect("rank 0");
    let t0 = std::time::Instant::now();
    while llava_trainer::io::checkpoint::list_checkpoints(&out)
        .last()
        .is_none_or(|(s, _)| *s <= last)
    {
        assert!(
            t0.elapsed().as_secs() < 300,
            "no new checkpoint after the restart"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    for mut c in [r0, r1] {
        c.kill().ok();
        c.wait().ok();
    }
    let log = std::fs::read_to_string(out.join("log.jsonl")).expect("log");
    let steps: Vec<u64> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["step"].as_u64())
        .collect();
    assert!(
        steps.windows(2).all(|w| w[1] == w[0] + 1),
        "resumed after step {last}: {steps:?}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// One rank's heap report (`LLAVA_HEAP_REPORT`): peak live bytes of the steps and of the
/// checkpoints, and the live bytes when the run started.
fn heap_report(dir: &Path, rank: usize) -> (u64, u64, u64) {
    let p = dir.join(format!("heap-rank{rank}.json"));
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).expect("heap report")).expect("JSON");
    let n = |k: &str| {
        v["peaks"][k]
            .as_u64()
            .unwrap_or_else(|| panic!("{k} in {v}"))
    };
    (
        v["baseline"].as_u64().expect("baseline"),
        n("step"),
        n("checkpoint"),
    )
}

/// The tiny model with a wider decoder (hidden 128): its states (the 128k-row embedding and
/// head dominate) are large next to the few MiB every rank holds besides (loader, thread pools,
/// rotary tables), which the plan does not count.
fn wider_tiny_model(dir: &Path) -> PathBuf {
    let config = dir.join("wider-tiny-model.json");
    let base = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("configs/tiny-model.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(base).expect("tiny config")).expect("JSON");
    v["text_config"]["hidden_size"] = 128.into();
    v["text_config"]["intermediate_size"] = 256.into();
    std::fs::write(&config, v.to_string()).expect("write config");
    let model = dir.join("wider-tiny-model");
    ok(
        clean(Command::new(BIN))
            .args(["init", "--config"])
            .arg(&config)
            .arg("--output")
            .arg(&model)
            .output()
            .expect("init"),
        "init",
    );
    model
}

#[test]
fn per_rank_peak_heap_at_world_4_is_within_10_percent_of_the_memory_plan() {
    let dir = scratch("heap");
    let model = wider_tiny_model(&dir);
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    let mut table = vec![
        "| ZeRO | rank | steps: measured | plan | checkpoint: measured | plan |".to_string(),
        "|---|---|---|---|---|---|".to_string(),
    ];
    let mut failures = Vec::new();
    let mut all_losses = Vec::new();
    for zero in [0u8, 1, 2] {
        let out = dir.join(format!("z{zero}"));
        let reports = dir.join(format!("heap-z{zero}"));
        std::fs::create_dir_all(&reports).expect("mkdir");
        let mut args = run_args(&out, 1);
        let at = |flag: &str| args.iter().position(|a| a == flag).expect("flag") + 1;
        let (m, steps) = (at("--model"), at("--max-steps"));
        args[m] = model.display().to_string();
        // Two steps and the final checkpoint.
        args[steps] = "2".into();
        // Loss chunks of 8 rows: the logits' working set no longer depends on each rank's
        // batch lengths, so the states that ZeRO splits dominate the peak.
        args.extend(["--zero-stage".into(), zero.to_string()]);
        args.extend(["--loss-chunk".into(), "8".into()]);
        let mut cmd = clean(Command::new(BIN));
        ok(
            cmd.args(&args)
                .args(["--nproc-per-node", "4"])
                .env("LLAVA_HEAP_REPORT", &reports)
                .output()
                .expect("run"),
            &format!("world 4 ZeRO {zero}"),
        );
        all_losses.push(losses(&out));
        // The plan of the same flags at world 4, per rank.
        args[0] = "plan".into();
        let mut cmd = clean(Command::new(BIN));
        let plan = ok(
            cmd.args(&args)
                .args(["--world-size", "4", "--json"])
                .output()
                .expect("plan"),
            "plan",
        );
        let plan: serde_json::Value = serde_json::from_slice(&plan.stdout).expect("plan JSON");
        for rank in 0..4 {
            let (base, step, ckpt) = heap_report(&reports, rank);
            let r = &plan["plan"]["ranks"][rank];
            let (p_step, p_ckpt) = (
                r["step"].as_u64().expect("step"),
                r["checkpoint"].as_u64().expect("checkpoint"),
            );
            // What the run holds above the process's own start (runtime, config, connections).
            let (m_step, m_ckpt) = (step - base, ckpt - base);
            table.push(format!(
                "| {zero} | {rank} | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.1} MiB |",
                mib(m_step),
                mib(p_step),
                mib(m_ckpt),
                mib(p_ckpt)
            ));
            for (what, m, p) in [("steps", m_step, p_step), ("checkpoint", m_ckpt, p_ckpt)] {
                let err = (m as f64 - p as f64).abs() / p as f64;
                if err > 0.10 {
                    failures.push(format!(
                        "ZeRO {zero} rank {rank} {what}: measured {:.1} MiB, plan {:.1} MiB ({:.0}% off)",
                        mib(m),
                        mib(p),
                        err * 100.0
                    ));
                }
            }
        }
    }
    eprintln!("{}", table.join("\n"));
    // ZeRO-2's reductions during the backward give the same training as stages 0 and 1.
    for (zero, l) in all_losses.iter().enumerate().skip(1) {
        for (a, b) in l.iter().zip(&all_losses[0]) {
            assert!(
                (a - b).abs() <= 1e-6 * b.abs().max(1.0),
                "ZeRO {zero}: {l:?} vs {:?}",
                all_losses[0]
            );
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    std::fs::remove_dir_all(&dir).ok();
}

/// The pids of this test's `llava-trainer` processes (marked by `tag` in their environment)
/// that torchrun started as `RANK=rank`.
fn tagged_rank_pids(tag: &str, rank: usize) -> Vec<i32> {
    let want_tag = format!("LLAVA_TEST_TAG={tag}");
    let want_rank = format!("RANK={rank}");
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(env) = std::fs::read(e.path().join("environ")) else {
            continue;
        };
        let vars: Vec<String> = env
            .split(|&b| b == 0)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .collect();
        let exe = std::fs::read_link(e.path().join("exe")).unwrap_or_default();
        if vars.contains(&want_tag)
            && vars.contains(&want_rank)
            && exe.file_name().is_some_and(|n| n == "llava-trainer")
        {
            out.push(pid);
        }
    }
    out
}

#[test]
fn torchrun_max_restarts_resumes_from_the_last_checkpoint_after_a_killed_rank() {
    let Some(mut cmd) = torchrun() else {
        eprintln!("skipped torchrun --max-restarts: LLAVA_NO_TORCH=1");
        return;
    };
    let dir = scratch("torchrun-restart");
    let out = dir.join("run");
    let tag = format!("restart-{}", std::process::id());
    let mut args = run_args(&out, 1);
    args.retain(|a| a != "--no-resume");
    let pos = args.iter().position(|a| a == "--max-steps").expect("flag") + 1;
    args[pos] = "12".into();
    cmd.args([
        "--nproc-per-node",
        "2",
        "--max-restarts",
        "1",
        "--no-python",
    ])
    .args(["--master-port", &free_port().to_string()])
    .arg(BIN)
    .args(args)
    .args(["--save-every", "1"])
    .env("LLAVA_TEST_TAG", &tag)
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let job = cmd.spawn().expect("torchrun starts");
    // Once a checkpoint is complete, kill rank 1 as the OOM killer would.
    let t0 = std::time::Instant::now();
    while llava_trainer::io::checkpoint::list_checkpoints(&out).is_empty() {
        assert!(t0.elapsed().as_secs() < 300, "no checkpoint within 300 s");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let victims = tagged_rank_pids(&tag, 1);
    assert_eq!(victims.len(), 1, "one rank-1 process: {victims:?}");
    // SAFETY: kill(2) on a pid this test's torchrun started.
    assert_eq!(unsafe { libc::kill(victims[0], libc::SIGKILL) }, 0);
    let done = ok(
        job.wait_with_output().expect("torchrun"),
        "torchrun --max-restarts 1",
    );
    let err = String::from_utf8_lossy(&done.stderr);
    // The restarted workers resumed from a checkpoint and finished all 12 steps.
    assert!(err.contains("resuming from"), "{err}");
    let log = std::fs::read_to_string(out.join("log.jsonl")).expect("log");
    let steps: Vec<u64> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["step"].as_u64())
        .collect();
    assert_eq!(steps, (1..=12).collect::<Vec<_>>(), "{err}");
    let after = tagged_rank_pids(&tag, 1);
    assert!(after.is_empty(), "workers left: {after:?}");
    std::fs::remove_dir_all(&dir).ok();
}
