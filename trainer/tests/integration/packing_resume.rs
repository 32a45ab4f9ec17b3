//! `llava-trainer run --pack-across-batches` as a real process, killed mid-epoch (SIGTERM: the
//! signal's checkpoint; SIGKILL: the last periodic one) and run again: the resumed run ends with
//! the uninterrupted run's losses and final checkpoint, to the bit.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;

use llava_loader::{DataState, EpochPlan, IndexOptions, PlanConfig, ShardIndex};
use llava_test_support::RemoveOnSuccess;
use llava_trainer::io::checkpoint;

const BIN: &str = env!("CARGO_BIN_EXE_llava-trainer");
/// Steps of every run: more than one epoch of packed rows.
const STEPS: u64 = 8;

fn scratch(name: &str) -> PathBuf {
    llava_test_support::scratch(&format!("packing-resume-{name}"))
}

/// Text-only synthetic shards, the tiny model and the pack length (three longest samples).
fn inputs() -> &'static (PathBuf, PathBuf, u32) {
    static INPUTS: OnceLock<(PathBuf, PathBuf, u32)> = OnceLock::new();
    INPUTS.get_or_init(|| {
        let (shards, model) = crate::common::text_shards_and_tiny_model(&scratch("inputs"));
        let index = ShardIndex::open(&shards, &IndexOptions::default()).expect("index");
        let longest = index
            .samples
            .iter()
            .map(|s| s.length)
            .max()
            .expect("samples");
        (shards, model, 3 * longest)
    })
}

fn spawn_run(output: &Path) -> Child {
    let (shards, model, pack_length) = inputs();
    let stderr = std::fs::File::create(output.with_extension("stderr")).expect("stderr file");
    Command::new(BIN)
        .arg("run")
        .arg("--shards")
        .arg(shards)
        .arg("--model")
        .arg(model)
        .arg("--output")
        .arg(output)
        .args(["--max-steps", &STEPS.to_string(), "--save-every", "2"])
        .args(["--lr", "1e-3", "--warmup-ratio", "0.1", "--workers", "1"])
        .args(["--device", "cpu", "--pack-across-batches"])
        .args(["--pack-length", &pack_length.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("llava-trainer run starts")
}

fn stderr_of(output: &Path) -> String {
    std::fs::read_to_string(output.with_extension("stderr")).unwrap_or_default()
}

/// Losses of log.jsonl and the bytes of the final checkpoint's weights and trainer state.
fn outcome(output: &Path) -> (Vec<f64>, Vec<Vec<u8>>) {
    let log = std::fs::read_to_string(output.join("log.jsonl")).expect("log.jsonl");
    let losses = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("a JSON line"))
        .filter_map(|v| v.get("loss").and_then(|x| x.as_f64()))
        .collect();
    let dir = output.join(format!("checkpoint-{STEPS}"));
    let bytes = ["model.safetensors", "trainer_state.safetensors"]
        .iter()
        .map(|f| std::fs::read(dir.join(f)).unwrap_or_else(|e| panic!("{f}: {e}")))
        .collect();
    (losses, bytes)
}

fn reference() -> &'static (Vec<f64>, Vec<Vec<u8>>) {
    static REF: OnceLock<(Vec<f64>, Vec<Vec<u8>>)> = OnceLock::new();
    REF.get_or_init(|| {
        let output = scratch("reference").join("run");
        let status = spawn_run(&output).wait().expect("wait");
        assert!(status.success(), "reference run: {}", stderr_of(&output));
        outcome(&output)
    })
}

/// Steps per epoch of the packed plan at world size 1.
fn steps_per_epoch() -> usize {
    let (shards, _, pack_length) = inputs();
    let index = ShardIndex::open(shards, &IndexOptions::default()).expect("index");
    let cfg = PlanConfig {
        seed: 42,
        world_size: 1,
        batch_size: None,
        pack_length: Some(*pack_length),
        across_batches: true,
    };
    EpochPlan::new(&index, &cfg, &DataState::new(0))
        .expect("plan")
        .num_steps()
}

/// Kills the run with `signal` once `ready(step line)` says so; then runs it again to the end
/// and compares with the uninterrupted run.
fn kill_and_resume(name: &str, signal: &str, ready: impl Fn(&Path) -> bool) {
    let per_epoch = steps_per_epoch();
    assert!(
        (3..STEPS as usize).contains(&per_epoch),
        "{per_epoch} steps per epoch: the kill must land mid-epoch and the run cross an epoch"
    );
    let dir = scratch(name);
    let _removed = RemoveOnSuccess(dir.clone());
    let output = dir.join("run");
    let mut child = spawn_run(&output);
    let stdout = child.stdout.take().expect("piped stdout");
    // Read to the end: the killed run still prints (a closed pipe would kill it first).
    let mut sent = false;
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("stdout is UTF-8");
        if !sent && line.starts_with("step ") && ready(&output) {
            let ok = Command::new("sh")
                .args(["-c", &format!("kill -{signal} {}", child.id())])
                .status()
                .expect("sh")
                .success();
            assert!(ok, "kill -{signal}");
            sent = true;
        }
    }
    assert!(sent, "the run printed no step line: {}", stderr_of(&output));
    let status = child.wait().expect("wait");
    assert!(!status.success(), "the run was killed: {status}");
    let (step, _) = *checkpoint::list_checkpoints(&output)
        .last()
        .expect("a checkpoint before the kill");
    assert!(
        step > 0 && step < STEPS,
        "checkpoint at step {step} of {STEPS}"
    );
    let out = spawn_run(&output).wait_with_output().expect("resume");
    let log = stderr_of(&output);
    assert!(out.status.success(), "resume: {log}");
    assert!(log.contains(&format!("at step {step}")), "{log}");
    let (losses, bytes) = outcome(&output);
    let (want_losses, want_bytes) = reference();
    assert_eq!(&losses, want_losses, "losses after resuming at step {step}");
    assert!(
        &bytes == want_bytes,
        "the final checkpoint differs from the uninterrupted run's (resumed at step {step})"
    );
    eprintln!("{signal}: resumed at step {step} ({per_epoch} steps per epoch), bit-identical");
}

#[test]
fn a_packed_run_killed_by_sigterm_resumes_bit_identical() {
    // The first step line: SIGTERM checkpoints that step (mid-epoch: an epoch has >= 3 steps).
    kill_and_resume("sigterm", "TERM", |_| true);
}

#[test]
fn a_packed_run_killed_by_sigkill_resumes_bit_identical() {
    // After the periodic checkpoint of step 2: SIGKILL leaves it (and no signal checkpoint).
    kill_and_resume("sigkill", "KILL", |out| {
        !checkpoint::list_checkpoints(out).is_empty()
    });
}
