//! The `llava-trainer` binary's command line: every flag of every subcommand has a description
//! and every subcommand an example (issue 16); `init` does not overwrite a model unless
//! `--force`; train.toml errors name the file, line and key, once.

use std::path::PathBuf;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_llava-trainer");

#[test]
fn every_flag_of_every_subcommand_has_a_description_and_each_an_example() {
    let readme = llava_test_support::repo_root().join("README.md");
    llava_test_support::help::assert_complete("llava-trainer", BIN, &readme, 6, "run");
}

#[test]
fn init_refuses_to_overwrite_a_model_without_force() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/e2e-scratch")
        .join(format!("cli-init-{}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let model = dir.join("model");
    let config = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("configs/tiny-model.json");
    let init = |extra: &[&str]| {
        Command::new(BIN)
            .arg("init")
            .arg("--config")
            .arg(&config)
            .arg("--output")
            .arg(&model)
            .args(extra)
            .output()
            .expect("llava-trainer init starts")
    };
    let first = init(&[]);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    // Mark the written weights: a refused init must leave them as they are.
    let weights = model.join("model.safetensors");
    let mtime = std::fs::metadata(&weights).unwrap().modified().unwrap();
    let before = std::fs::read(&weights).unwrap();

    let second = init(&[]);
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "init overwrote a model");
    assert!(
        err.contains("already holds a model") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(
        std::fs::metadata(&weights).unwrap().modified().unwrap(),
        mtime
    );
    assert!(std::fs::read(&weights).unwrap() == before);

    let forced = init(&["--force"]);
    assert!(
        forced.status.success(),
        "{}",
        String::from_utf8_lossy(&forced.stderr)
    );
}

/// `run` as a launched rank or with `--nproc-per-node` says what this build can do, before
/// reading any data.
#[test]
fn multi_process_runs_explain_what_they_need() {
    let run = |env: &[(&str, &str)], extra: &[&str]| {
        let out = Command::new(BIN)
            .args(["run", "--shards", "/nonexistent", "--model", "/nonexistent"])
            .args(["--output", "/nonexistent/out"])
            .args(extra)
            .env_remove("RANK")
            .env_remove("WORLD_SIZE")
            .env_remove("SLURM_PROCID")
            .envs(env.iter().copied())
            .output()
            .expect("llava-trainer starts");
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let torchrun = [
        ("RANK", "1"),
        ("WORLD_SIZE", "2"),
        ("LOCAL_RANK", "1"),
        ("LOCAL_WORLD_SIZE", "2"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", "29519"),
    ];
    // A CPU rank joins over TCP (no NCCL needed); here rank 0 never starts.
    let e = run(&torchrun, &["--device", "cpu", "--rendezvous-timeout", "1"]);
    assert!(
        e.contains("rank 1 of 2") && e.contains("could not be reached"),
        "{e}"
    );
    let e = run(&torchrun, &["--nproc-per-node", "2"]);
    assert!(e.contains("drop --nproc-per-node"), "{e}");
    if !cfg!(feature = "cuda") {
        let e = run(&torchrun, &["--device", "cuda"]);
        assert!(e.contains("--features cuda"), "{e}");
        let e = run(&[], &["--nproc-per-node", "2", "--device", "cuda"]);
        assert!(e.contains("without CUDA"), "{e}");
    }
}

/// `llava-trainer run --config FILE` with `text` as the file: (exit success, stderr).
fn run_with_config(name: &str, text: &str) -> (bool, String, PathBuf) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/e2e-scratch")
        .join(format!("cli-config-{name}-{}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let config = dir.join("train.toml");
    std::fs::write(&config, text).expect("train.toml");
    let out = Command::new(BIN)
        .args(["run", "--device", "cpu", "--config"])
        .arg(&config)
        .env("NO_COLOR", "1")
        .output()
        .expect("llava-trainer run starts");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).to_string(),
        config,
    )
}

#[test]
fn train_toml_errors_name_the_file_line_and_key_once() {
    let head = "shards = \"shards\"\nmodel = \"model\"\noutput = \"run\"\n";
    // (name, the file, its location, the key, what the message says)
    let cases = [
        (
            "unknown",
            format!("{head}learning_rate = 1e-3\n"),
            ":4:1: ",
            "learning_rate",
            "unknown key `learning_rate`: did you mean `lr`?",
        ),
        (
            "type",
            format!("{head}seed = 1\n\nlr = \"fast\"\n"),
            ":6:1: ",
            "lr",
            "invalid type: string \"fast\"",
        ),
        (
            "value",
            format!("{head}tunable_parts = \"mm_projector\"\n"),
            ":4:1: ",
            "tunable_parts",
            "unknown tunable part \"mm_projector\"",
        ),
        (
            "syntax",
            format!("{head}lr = 1e-3 3\n"),
            ":4:11: ",
            "(syntax)",
            "not valid TOML",
        ),
    ];
    for (name, text, at, key, says) in cases {
        let (ok, err, config) = run_with_config(name, &text);
        assert!(!ok, "{name}: the run started");
        llava_test_support::assert_located_once(name, &err, &config, at, key, says);
        assert!(!err.contains('\x1b'), "{name}: escape codes:\n{err}");
    }
    // A value that parses but cannot be used: the key's line too.
    let (ok, err, config) = run_with_config("zero", &format!("{head}eval_every = 0\n"));
    assert!(!ok);
    let want = format!("{}:4:1: eval_every: must be at least 1", config.display());
    assert!(err.contains(&want), "no `{want}` in:\n{err}");
    // The same from a flag names the flag.
    let out = Command::new(BIN)
        .args(["run", "--device", "cpu", "--eval-every", "0", "--config"])
        .arg(&config)
        .output()
        .expect("llava-trainer run starts");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("--eval-every: must be at least 1"), "{err}");
}

/// `loader-bench` on 40 synthetic samples (10 batches of 4): the `--json` report counts every
/// sample and tile once, in the keys scripts read; `--plan-memory --json` (the binary's counting
/// allocator) sizes the plan; the terminal summary names the same counts; `--pack-across-batches
/// --dry-run` prints packed rows holding every sample once.
#[test]
fn loader_bench_reports_every_sample_and_the_plan_memory() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/e2e-scratch")
        .join(format!("cli-loader-bench-{}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    let shards = dir.join("synth");
    let bench = |extra: &[&str]| {
        let out = Command::new(BIN)
            .arg("loader-bench")
            .arg("--shards")
            .arg(&shards)
            .args(["--workers", "2"])
            .args(extra)
            .output()
            .expect("llava-trainer loader-bench starts");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let json: serde_json::Value =
        serde_json::from_str(bench(&["--make-synthetic", "40", "--json"]).trim()).expect("JSON");
    assert_eq!(json["samples"], 40, "{json}");
    assert_eq!(json["batches"], 10, "{json}");
    assert_eq!(json["tiles"], 200, "{json}");
    assert_eq!(json["workers"], 2, "{json}");
    assert!(json["object_store"].is_null(), "{json}");
    for key in [
        "samples_per_s",
        "shard_mb_per_s",
        "tile_mb_per_s",
        "time_to_first_batch_ms",
        "wait_p50_ms",
        "worker_p99_ms",
    ] {
        assert!(
            json[key].as_f64().is_some_and(|v| v >= 0.0),
            "{key}: {json}"
        );
    }
    let text = bench(&[]);
    assert!(
        text.contains("10 batches, 40 samples (200 tiles)"),
        "{text}"
    );

    let plan: serde_json::Value =
        serde_json::from_str(bench(&["--plan-memory", "--json"]).trim()).expect("JSON");
    assert_eq!(plan["samples"], 40, "{plan}");
    assert_eq!(plan["steps"], 10, "{plan}");
    assert!(plan["plan_bytes"].as_u64().is_some_and(|b| b > 0), "{plan}");
    assert!(
        plan["all_steps_made_bytes"].as_u64() > plan["plan_bytes"].as_u64(),
        "{plan}"
    );

    // --pack-across-batches --dry-run: the trainer's packed rows, every sample once.
    let rows = bench(&["--pack-across-batches", "--dry-run"]);
    let mut seen: Vec<u64> = Vec::new();
    for line in rows.lines() {
        let row: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
        for s in row["samples"].as_array().expect("samples") {
            seen.push(s["index"].as_u64().expect("index"));
        }
    }
    seen.sort_unstable();
    assert_eq!(seen, (0..40).collect::<Vec<u64>>(), "{rows}");
    assert!(rows.lines().count() < 40, "nothing was packed:\n{rows}");
    std::fs::remove_dir_all(&dir).ok();
}
