//! `scripts/gpu-check.sh --device cpu` end to end with this build's binary: the script, the
//! JSON keys its summary reads from `parity` and `bench`, and that a parity tolerance
//! tightened below the measured error makes the check fail.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

fn gpu_check(tighten: Option<f64>) -> (bool, Value) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root");
    let logs = tempfile::tempdir().expect("tempdir");
    let mut cmd = Command::new("bash");
    cmd.arg(root.join("scripts/gpu-check.sh"))
        .args(["--device", "cpu"])
        .env("LLAVA_TRAINER_BIN", env!("CARGO_BIN_EXE_llava-trainer"))
        .env("LLAVA_GPU_CHECK_LOGS", logs.path())
        .env_remove("OUT")
        .env_remove("LLAVA_GPU_CHECK_BUDGET");
    match tighten {
        Some(t) => cmd.env("LLAVA_PARITY_TIGHTEN", t.to_string()),
        None => cmd.env_remove("LLAVA_PARITY_TIGHTEN"),
    };
    let out = cmd.output().expect("bash scripts/gpu-check.sh");
    let json: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "gpu-check printed no JSON ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.success(), json)
}

#[test]
fn gpu_check_runs_on_the_cpu_and_fails_when_a_tolerance_is_tightened() {
    let (ok, j) = gpu_check(None);
    assert!(ok && j["ok"] == true, "{j:#}");
    assert_eq!(j["device_kind"], "cpu");
    assert!(j["budget_s"].as_u64().unwrap() <= 300);
    let mut worst_ratio = 0f64;
    for run in ["cpu_f32", "cpu_bf16"] {
        let p = &j["parity"][run];
        assert_eq!(p["passed"], true, "{run}: {p:#}");
        assert!(p["gradients_compared"].as_u64().unwrap() > 0, "{p:#}");
        assert!(p["gradients_min_cosine"].as_f64().unwrap() > 0.99, "{p:#}");
        for c in p["checks"].as_array().unwrap() {
            worst_ratio = worst_ratio.max(c["ratio"].as_f64().unwrap());
        }
    }
    let bench = j["bench"].as_array().unwrap();
    assert_eq!(bench.len(), 2, "{j:#}");
    for b in bench {
        assert_eq!(b["ok"], true, "{b:#}");
        assert!(b["tokens_per_s"].as_f64().unwrap() > 0.0, "{b:#}");
        assert!(b["flops_formula"].as_str().unwrap().contains("MFU"));
        for k in [
            "forward_s",
            "recompute_s",
            "backward_s",
            "optimizer_s",
            "communication_s",
        ] {
            assert!(b["phases_s"][k].as_f64().is_some(), "{k}: {b:#}");
        }
        assert!(b["phases_s"]["forward_s"].as_f64().unwrap() > 0.0);
        assert!(b["peak_memory_gib"].as_f64().is_some());
    }
    assert_eq!(bench[0]["name"], "bench_full_8192");
    assert_eq!(bench[0]["optimizer"], false);

    // Every limit halved below the largest measured error ratio: parity (and so the check) fail.
    assert!(worst_ratio > 0.0);
    let (ok, j) = gpu_check(Some(2.0 / worst_ratio));
    assert!(!ok && j["ok"] == false, "{j:#}");
    assert_eq!(j["parity_passed"], false);
    assert_eq!(j["bench_ran"], true);
    let failed: Vec<&str> = j["failed_steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert!(failed.iter().any(|s| s.starts_with("parity_")), "{j:#}");
}
