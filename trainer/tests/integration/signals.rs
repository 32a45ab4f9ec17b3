//! `llava-trainer run` as a real process under SIGTERM, SIGINT and SIGUSR1 (issue 16): the
//! checkpoint a signal writes, the exit codes a wrapper script sees (143 / 130 / 0), and a resume
//! after SIGTERM that ends bit-identical to an uninterrupted run.
//!
//! The same binary runs the evaluation on held-out shards and reads the TensorBoard event file
//! back with its own decoder (CRCs, protobuf), checking every value against log.jsonl.
//!
//! Every signal is sent after the run has printed its first step line, so it lands while the run
//! is training; nothing here depends on how long a step takes.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;

use llava_test_support::RemoveOnSuccess;

use llava_loader::synthetic::{write_synthetic, SynthSpec};
use llava_trainer::io::checkpoint;

const BIN: &str = env!("CARGO_BIN_EXE_llava-trainer");
/// Steps of the runs that must end on their own (the reference, SIGUSR1, the resume).
const STEPS: u64 = 8;

fn scratch(name: &str) -> PathBuf {
    llava_test_support::scratch(&format!("signals-{name}"))
}

/// `run` in a fresh scratch folder that is removed when the test passes (each run's
/// checkpoints take ~190 MB).
fn run_dir(name: &str) -> (PathBuf, RemoveOnSuccess) {
    let dir = scratch(name);
    (dir.join("run"), RemoveOnSuccess(dir))
}

/// Text-only synthetic shards and the README's tiny model, made once per test binary.
fn inputs() -> &'static (PathBuf, PathBuf) {
    static INPUTS: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    INPUTS.get_or_init(|| crate::common::text_shards_and_tiny_model(&scratch("inputs")))
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
        // Shared by several tests, so kept (one run, ~190 MB).
        let output = scratch("reference").join("run");
        let status = spawn_run(&output, STEPS).wait().expect("wait");
        assert!(status.success(), "reference run: {}", stderr_of(&output));
        output
    })
}

#[test]
fn sigterm_checkpoints_exits_143_and_resumes_bit_identical() {
    let (output, _removed) = run_dir("sigterm");
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
    let (output, _removed) = run_dir("sigint");
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
    let (output, _removed) = run_dir("sigusr1");
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
    let (output, _removed) = run_dir("sigterm2");
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
    let (output, _removed) = run_dir("progress");
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

// ---- Evaluation and TensorBoard (same binary: one process-level test file for `run`) ----

/// CRC-32C bit by bit (the writer uses a table): an independent check of the records.
fn crc32c_bitwise(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 == 1 {
                (c >> 1) ^ 0x82F6_3B78
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// TFRecord's mask, written as its spec states it (the writer uses `rotate_right`).
#[allow(clippy::manual_rotate)]
fn masked(c: u32) -> u32 {
    ((c >> 15) | (c << 17)).wrapping_add(0xa282_ead8)
}

/// The TFRecords of an event file, both CRCs of each checked.
fn tf_records(bytes: &[u8]) -> Vec<Vec<u8>> {
    let (mut out, mut i) = (Vec::new(), 0);
    let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().unwrap());
    while i < bytes.len() {
        let len_bytes = &bytes[i..i + 8];
        let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
        assert_eq!(
            u32_at(i + 8),
            masked(crc32c_bitwise(len_bytes)),
            "length CRC"
        );
        let data = &bytes[i + 12..i + 12 + len];
        assert_eq!(
            u32_at(i + 12 + len),
            masked(crc32c_bitwise(data)),
            "data CRC"
        );
        out.push(data.to_vec());
        i += 16 + len;
    }
    out
}

/// A protobuf field's value.
#[derive(Debug)]
enum Field<'a> {
    Varint(u64),
    Fixed64([u8; 8]),
    Bytes(&'a [u8]),
    Fixed32([u8; 4]),
}

fn proto_fields(buf: &[u8]) -> Vec<(u64, Field<'_>)> {
    let mut i = 0;
    let varint = |i: &mut usize| {
        let (mut v, mut shift) = (0u64, 0);
        loop {
            let b = buf[*i];
            *i += 1;
            v |= u64::from(b & 0x7f) << shift;
            shift += 7;
            if b < 0x80 {
                return v;
            }
        }
    };
    let mut out = Vec::new();
    while i < buf.len() {
        let key = varint(&mut i);
        let field = match key & 7 {
            0 => Field::Varint(varint(&mut i)),
            1 => {
                i += 8;
                Field::Fixed64(buf[i - 8..i].try_into().unwrap())
            }
            2 => {
                let n = varint(&mut i) as usize;
                i += n;
                Field::Bytes(&buf[i - n..i])
            }
            5 => {
                i += 4;
                Field::Fixed32(buf[i - 4..i].try_into().unwrap())
            }
            w => panic!("wire type {w}"),
        };
        out.push((key >> 3, field));
    }
    out
}

/// An event file as (file_version of the first record, [(tag, step, value)]).
fn read_events(path: &Path) -> (String, Vec<(String, u64, f32)>) {
    let records = tf_records(&std::fs::read(path).expect("event file"));
    let (mut version, mut scalars) = (String::new(), Vec::new());
    for (n, rec) in records.iter().enumerate() {
        let (mut step, mut wall) = (0u64, 0f64);
        let mut values = Vec::new();
        for (field, v) in proto_fields(rec) {
            match (field, v) {
                (1, Field::Fixed64(b)) => wall = f64::from_le_bytes(b),
                (2, Field::Varint(s)) => step = s,
                (3, Field::Bytes(b)) if n == 0 => version = String::from_utf8(b.to_vec()).unwrap(),
                (5, Field::Bytes(summary)) => {
                    for (f, v) in proto_fields(summary) {
                        let (1, Field::Bytes(value)) = (f, v) else {
                            panic!("Summary field {f}");
                        };
                        let (mut tag, mut x) = (String::new(), f32::NAN);
                        for (f, v) in proto_fields(value) {
                            match (f, v) {
                                (1, Field::Bytes(t)) => {
                                    tag = String::from_utf8(t.to_vec()).unwrap()
                                }
                                (2, Field::Fixed32(b)) => x = f32::from_le_bytes(b),
                                other => panic!("Summary.Value field {other:?}"),
                            }
                        }
                        values.push((tag, x));
                    }
                }
                other => panic!("Event field {other:?}"),
            }
        }
        assert!(wall > 1.6e9, "wall_time {wall}");
        scalars.extend(values.into_iter().map(|(t, x)| (t, step, x)));
    }
    (version, scalars)
}

/// A 4-step run evaluating every 2 steps on held-out synthetic shards, with TensorBoard events;
/// `world` ranks as threads, `grad_accum` per rank (the same global batch for 1 x 2 and 2 x 1).
/// Returns (log.jsonl lines, stdout, event file).
fn eval_run(
    name: &str,
    world: usize,
    grad_accum: usize,
) -> (Vec<serde_json::Value>, String, PathBuf) {
    let dir = scratch(name);
    let eval = dir.join("eval-shards");
    let spec = SynthSpec {
        image_samples: 0,
        text_samples: 6,
        batch_size: 2,
        group_size: 2,
        groups_per_shard: 4,
        seed: 7,
        ..SynthSpec::default()
    };
    write_synthetic(&eval, &spec).expect("eval shards");
    let (output, tb) = (dir.join("run"), dir.join("tb"));
    let out = run_command(&output)
        .args([
            "--max-steps",
            "4",
            "--lr",
            "1e-3",
            "--warmup-ratio",
            "0.1",
            "--workers",
            "1",
        ])
        .args(["--device", "cpu", "--eval-every", "2", "--eval-shards"])
        .arg(&eval)
        .arg("--tensorboard")
        .arg(&tb)
        .args(["--nproc-per-node", &world.to_string()])
        .args(["--grad-accum", &grad_accum.to_string()])
        .stdin(Stdio::null())
        .output()
        .expect("llava-trainer run starts");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log = std::fs::read_to_string(output.join("log.jsonl")).expect("log.jsonl");
    let lines = log
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    let events: Vec<PathBuf> = std::fs::read_dir(&tb)
        .expect("the TensorBoard folder")
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(events.len(), 1, "{events:?}");
    let file = events[0].file_name().unwrap().to_string_lossy().to_string();
    assert!(file.starts_with("events.out.tfevents."), "{file}");
    (
        lines,
        String::from_utf8_lossy(&out.stdout).to_string(),
        events[0].clone(),
    )
}

#[test]
fn eval_loss_is_logged_and_tensorboard_events_read_back_equal_to_log_jsonl() {
    let (log, stdout, events) = eval_run("eval-1", 1, 2);
    let evals: Vec<&serde_json::Value> = log
        .iter()
        .filter(|l| l.get("eval_loss").is_some())
        .collect();
    let steps: Vec<u64> = evals.iter().map(|e| e["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [2, 4], "eval every 2 steps and at the end: {log:?}");
    let tokens: Vec<u64> = evals
        .iter()
        .map(|e| e["eval_tokens"].as_u64().unwrap())
        .collect();
    assert!(tokens[0] > 0 && tokens[0] == tokens[1], "{tokens:?}");
    for e in &evals {
        let l = e["eval_loss"].as_f64().unwrap();
        // A random tiny model: near ln(128320) = 11.76.
        assert!((9.0..14.0).contains(&l), "eval_loss {l}");
    }
    assert!(stdout.contains("eval at step 2/4: eval_loss "), "{stdout}");
    assert!(stdout.contains("eval at step 4/4: eval_loss "), "{stdout}");

    // The event file, decoded independently: CRCs, version, and every value equal to log.jsonl's.
    let (version, scalars) = read_events(&events);
    assert_eq!(version, "brain.Event:2");
    let get = |tag: &str, step: u64| {
        scalars
            .iter()
            .find(|(t, s, _)| t == tag && *s == step)
            .map(|x| x.2)
            .unwrap_or_else(|| panic!("no {tag} at step {step}: {scalars:?}"))
    };
    let mut train_steps = 0;
    for l in &log {
        let step = l["step"].as_u64().unwrap();
        let f = |k: &str| l[k].as_f64().unwrap() as f32;
        if l.get("eval_loss").is_some() {
            assert_eq!(get("eval/loss", step), f("eval_loss"));
            assert_eq!(get("eval/tokens", step), f("eval_tokens"));
        } else {
            train_steps += 1;
            assert_eq!(get("train/loss", step), f("loss"));
            assert_eq!(get("train/lr", step), f("lr"));
            assert_eq!(get("train/grad_norm", step), f("grad_norm"));
            assert_eq!(get("train/tokens_per_s", step), f("tokens_per_s"));
        }
    }
    assert_eq!(train_steps, 4);
    assert_eq!(scalars.len(), 4 * 5 + 2 * 2, "{scalars:?}");

    // Two ranks with the same global batch: rank 0 evaluates the same batches in the same
    // order; the weights differ only by the rank-order gradient sums.
    let (log2, _, _) = eval_run("eval-2", 2, 1);
    let evals2: Vec<&serde_json::Value> = log2
        .iter()
        .filter(|l| l.get("eval_loss").is_some())
        .collect();
    assert_eq!(evals2.len(), 2);
    for (a, b) in evals.iter().zip(&evals2) {
        assert_eq!(a["eval_tokens"], b["eval_tokens"]);
        let (x, y) = (
            a["eval_loss"].as_f64().unwrap(),
            b["eval_loss"].as_f64().unwrap(),
        );
        assert!(
            (x - y).abs() <= 1e-5 * x.abs(),
            "world 1: {x}, world 2: {y}"
        );
    }
    // Each run's checkpoints take ~190 MB: leave nothing behind once checked.
    for name in ["eval-1", "eval-2"] {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../target/e2e-scratch")
            .join(format!("signals-{name}-{}", std::process::id()));
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            eprintln!("leaving {}: {e}", dir.display());
        }
    }
}
