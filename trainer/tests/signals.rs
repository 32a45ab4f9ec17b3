//! `llava-trainer run` as a real process under SIGTERM, SIGINT and SIGUSR1 (issue 16): the
//! checkpoint a signal writes, the exit codes a wrapper script sees (143 / 130 / 0), and a resume
//! after SIGTERM that ends bit-identical to an uninterrupted run.
//!
//! Every signal is sent after the run has printed its first step line, so it lands while the run
//! is training; nothing here depends on how long a step takes.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;

use llava_trainer::checkpoint;
use llava_trainer::data::synthetic::{write_synthetic, SynthSpec};

const BIN: &str = env!("CARGO_BIN_EXE_llava-trainer");
/// Steps of the runs that must end on their own (the reference, SIGUSR1, the resume).
const STEPS: u64 = 8;

fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/e2e-scratch")
        .join(format!("signals-{name}-{}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// Text-only synthetic shards and the README's tiny model, made once per test binary.
fn inputs() -> &'static (PathBuf, PathBuf) {
    static INPUTS: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    INPUTS.get_or_init(|| {
        let dir = scratch("inputs");
        let shards = dir.join("shards");
        let spec = SynthSpec {
            image_samples: 0,
            text_samples: 16,
            batch_size: 2,
            group_size: 2,
            groups_per_shard: 4,
            ..SynthSpec::default()
        };
        write_synthetic(&shards, &spec).expect("synthetic shards");
        let model = dir.join("tiny-model");
        let config = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("configs/tiny-model.json");
        let out = Command::new(BIN)
            .arg("init")
            .arg("--config")
            .arg(&config)
            .arg("--output")
            .arg(&model)
            .output()
            .expect("llava-trainer init starts");
        assert!(
            out.status.success(),
            "init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        (shards, model)
    })
}

/// `llava-trainer run --shards --model --output` on the synthetic shards and tiny model.
fn run_command(output: &Path) -> Command {
    let (shards, model) = inputs();
    let mut cmd = Command::new(BIN);
    cmd.arg("run")
        .arg("--shards")
        .arg(shards)
        .arg("--model")
        .arg(model)
        .arg("--output")
        .arg(output);
    cmd
}

/// `llava-trainer run` on the synthetic shards into `output`, stdout piped (step lines),
/// stderr to `output.stderr`.
fn spawn_run(output: &Path, max_steps: u64) -> Child {
    let stderr = std::fs::File::create(output.with_extension("stderr")).expect("stderr file");
    run_command(output)
        .args(["--max-steps", &max_steps.to_string()])
        .args(["--lr", "1e-3", "--warmup-ratio", "0.1", "--workers", "1"])
        .args(["--device", "cpu"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("llava-trainer run starts")
}

/// `kill -SIGNAL pid` through `sh` (its builtin: no procps needed).
fn send(pid: u32, signal: &str) {
    let ok = Command::new("sh")
        .args(["-c", &format!("kill -{signal} {pid}")])
        .status()
        .expect("sh runs")
        .success();
    assert!(ok, "kill -{signal} {pid} failed");
}

/// Reads the run's stdout until its first step line, sends `signal` (e.g. "TERM"), then reads
/// the rest and waits. Returns the exit status and everything printed.
fn signal_after_first_step(mut child: Child, signal: &str) -> (ExitStatus, String) {
    let stdout = child.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(stdout).lines();
    let mut seen = String::new();
    let mut sent = false;
    for line in lines.by_ref() {
        let line = line.expect("stdout is UTF-8");
        seen.push_str(&line);
        seen.push('\n');
        if !sent && line.starts_with("step ") {
            send(child.id(), signal);
            sent = true;
        }
    }
    assert!(sent, "the run printed no step line:\n{seen}");
    (child.wait().expect("wait"), seen)
}

fn stderr_of(output: &Path) -> String {
    std::fs::read_to_string(output.with_extension("stderr")).unwrap_or_default()
}

/// Every checkpoint in `output` is complete, and no temporary one is left.
fn assert_complete_checkpoints(output: &Path) -> Vec<(u64, PathBuf)> {
    let all = checkpoint::list_checkpoints(output);
    for (_, dir) in &all {
        checkpoint::check_is_checkpoint(dir).expect("complete checkpoint");
    }
    let tmp: Vec<_> = std::fs::read_dir(output)
        .expect("output exists")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(tmp.is_empty(), "temporary checkpoints left: {tmp:?}");
    all
}

/// The files that must be bit-identical between two runs' final checkpoints.
fn final_bytes(output: &Path) -> Vec<(String, Vec<u8>)> {
    let dir = output.join(format!("checkpoint-{STEPS}"));
    ["model.safetensors", "trainer_state.safetensors"]
        .iter()
        .map(|f| {
            let bytes = std::fs::read(dir.join(f))
                .unwrap_or_else(|e| panic!("{}: {e}", dir.join(f).display()));
            (f.to_string(), bytes)
        })
        .collect()
}

/// An uninterrupted run of `STEPS` steps, made once.
fn reference() -> &'static PathBuf {
    static REF: OnceLock<PathBuf> = OnceLock::new();
    REF.get_or_init(|| {
        let output = scratch("reference").join("run");
        let status = spawn_run(&output, STEPS).wait().expect("wait");
        assert!(status.success(), "reference run: {}", stderr_of(&output));
        output
    })
}

#[test]
fn sigterm_checkpoints_exits_143_and_resumes_bit_identical() {
    let output = scratch("sigterm").join("run");
    let (status, stdout) = signal_after_first_step(spawn_run(&output, STEPS), "TERM");
    assert_eq!(
        status.code(),
        Some(143),
        "{status}\n{stdout}\n{}",
        stderr_of(&output)
    );
    let checkpoints = assert_complete_checkpoints(&output);
    let (step, _) = *checkpoints.last().expect("SIGTERM wrote a checkpoint");
    assert!(
        (1..STEPS).contains(&step),
        "checkpoint at step {step} of {STEPS}"
    );
    assert!(
        stdout.contains(&format!("stopped at step {step}/{STEPS}")),
        "{stdout}"
    );

    // The rerun resumes from it and ends where the uninterrupted run ends, to the bit.
    let out = spawn_run(&output, STEPS)
        .wait_with_output()
        .expect("resume");
    let log = stderr_of(&output);
    assert!(out.status.success(), "resume: {log}");
    assert!(log.contains(&format!("at step {step}")), "{log}");
    assert!(
        final_bytes(&output) == final_bytes(reference()),
        "the resumed run's final checkpoint differs from the uninterrupted run's"
    );
}

#[test]
fn sigint_checkpoints_and_exits_130() {
    let output = scratch("sigint").join("run");
    // Far more steps than the test waits for: the run is always still training at the signal.
    let (status, stdout) = signal_after_first_step(spawn_run(&output, 1_000_000), "INT");
    assert_eq!(
        status.code(),
        Some(130),
        "{status}\n{stdout}\n{}",
        stderr_of(&output)
    );
    let checkpoints = assert_complete_checkpoints(&output);
    assert_eq!(checkpoints.len(), 1, "{checkpoints:?}");
    assert!(stdout.contains("stopped at step"), "{stdout}");
}

#[test]
fn sigusr1_checkpoints_and_goes_on_to_the_end() {
    let output = scratch("sigusr1").join("run");
    let (status, stdout) = signal_after_first_step(spawn_run(&output, STEPS), "USR1");
    assert!(
        status.success(),
        "{status}\n{stdout}\n{}",
        stderr_of(&output)
    );
    let steps: Vec<u64> = assert_complete_checkpoints(&output)
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(
        steps.len(),
        2,
        "a SIGUSR1 checkpoint and the final one: {steps:?}"
    );
    assert!(steps[0] < STEPS && steps[1] == STEPS, "{steps:?}");
    assert!(
        stdout.contains(&format!("done at step {STEPS}/{STEPS}")),
        "{stdout}"
    );
    // Saving in the middle does not change the trajectory.
    assert!(
        final_bytes(&output) == final_bytes(reference()),
        "a SIGUSR1 checkpoint changed the run's final weights"
    );
}

/// Waits until `signal` (a number) is no longer pending for process `pid`, i.e. its handler has
/// run (Linux: the pending masks in /proc/PID/status).
fn wait_delivered(pid: u32, signal: u32) {
    let bit = 1u64 << (signal - 1);
    loop {
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            return;
        };
        let pending = status
            .lines()
            .filter(|l| l.starts_with("SigPnd:") || l.starts_with("ShdPnd:"))
            .filter_map(|l| u64::from_str_radix(l.split_whitespace().nth(1)?, 16).ok())
            .any(|mask| mask & bit != 0);
        if !pending {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

#[test]
fn a_second_sigterm_exits_at_once_with_143() {
    let output = scratch("sigterm2").join("run");
    let mut child = spawn_run(&output, 1_000_000);
    let stdout = child.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(stdout).lines();
    for line in lines.by_ref() {
        if line.expect("UTF-8").starts_with("step ") {
            break;
        }
    }
    // The first one asks for a checkpoint at the end of the step under way; the second, sent
    // once the first has been handled, ends the process at once.
    send(child.id(), "TERM");
    wait_delivered(child.id(), 15);
    send(child.id(), "TERM");
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(143), "{status}: {}", stderr_of(&output));
    assert!(
        !rest.iter().any(|l| l.starts_with("stopped")),
        "it waited for the step to finish: {rest:?}"
    );
    // A checkpoint under its final name is complete (an exit during a save leaves only a
    // `.tmp` folder, which a resume ignores).
    for (_, dir) in checkpoint::list_checkpoints(&output) {
        checkpoint::check_is_checkpoint(&dir).expect("complete checkpoint");
    }
}

#[test]
fn without_a_terminal_run_logs_progress_lines_and_no_escape_codes() {
    let output = scratch("progress").join("run");
    let log = output.with_extension("stderr");
    let stdout_file = output.with_extension("stdout");
    let status = run_command(&output)
        .args(["--max-steps", "3", "--log-every", "2", "--workers", "1"])
        .args(["--device", "cpu", "--progress-every", "0"])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout_file).expect("stdout file"))
        .stderr(std::fs::File::create(&log).expect("stderr file"))
        .status()
        .expect("llava-trainer run starts");
    let (log, stdout) = (
        std::fs::read_to_string(&log).unwrap(),
        std::fs::read_to_string(&stdout_file).unwrap(),
    );
    assert!(status.success(), "{log}");
    // --progress-every 0: a progress line at every step boundary, besides the step lines of
    // --log-every (steps 2 and 3, the last).
    for step in 1..=3 {
        assert!(
            log.contains(&format!("progress: step {step}/3 (")),
            "no progress line for step {step}:\n{log}"
        );
    }
    let steps: Vec<&str> = stdout.lines().filter(|l| l.starts_with("step ")).collect();
    assert_eq!(steps.len(), 2, "{stdout}");
    assert!(log.contains("ETA"), "{log}");
    assert!(
        !log.contains('\x1b') && !stdout.contains('\x1b'),
        "escape codes without a terminal:\n{log}\n{stdout}"
    );
}

#[test]
fn a_finished_run_says_so_and_exits_0_without_training() {
    let output = reference();
    let before = std::fs::read(output.join("log.jsonl")).expect("log.jsonl");
    let out = spawn_run(output, STEPS)
        .wait_with_output()
        .expect("rerun of a finished run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", stderr_of(output));
    assert!(
        stdout.contains("already finished") && stdout.contains(&format!("{STEPS}/{STEPS}")),
        "{stdout}"
    );
    assert!(!stdout.contains("step 1/"), "it trained again: {stdout}");
    let steps: Vec<u64> = checkpoint::list_checkpoints(output)
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(steps, [STEPS]);
    assert_eq!(std::fs::read(output.join("log.jsonl")).unwrap(), before);
}
