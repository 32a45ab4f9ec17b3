//! Shared helpers of the fixture tests.
#![allow(dead_code)]

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use llava_trainer::io::weights;
use llava_trainer::{Batch, LlavaNext};

/// Fixture directory: `$LLAVA_PARITY_FIXTURE`, else the bundled tiny-llava-next-a.
pub fn fixture_dir() -> PathBuf {
    std::env::var_os("LLAVA_PARITY_FIXTURE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/tiny-llava-next-a")
        })
}

/// The library's fixture reader ([`llava_trainer::diag::parity::Fixture`]), with the conveniences the
/// tests use (tensors on the CPU, panics instead of errors).
pub struct Fixture(pub llava_trainer::diag::parity::Fixture);

impl std::ops::Deref for Fixture {
    type Target = llava_trainer::diag::parity::Fixture;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

pub fn load_fixture() -> Fixture {
    let dir = fixture_dir();
    Fixture(
        llava_trainer::diag::parity::Fixture::load(&dir)
            .unwrap_or_else(|e| panic!("fixture {}: {e}", dir.display())),
    )
}

impl Fixture {
    pub fn model(&self) -> (LlavaNext, candle_nn::VarMap) {
        let opts = weights::LoadOptions::default();
        let (model, varmap, _) =
            weights::load(&self.cfg, &[self.dir.join("model")], &opts).expect("load weights");
        (model, varmap)
    }

    /// Used tiles of every sample, concatenated: `[sum(num_patches), 3, S, S]`.
    pub fn pixel_values(&self) -> Tensor {
        self.batch().pixel_values.expect("the fixture has images")
    }

    pub fn lengths(&self) -> Vec<usize> {
        self.batch().lengths
    }

    pub fn batch(&self) -> Batch {
        self.0.batch(&Device::Cpu).expect("fixture batch")
    }
}

/// Max abs error, max abs error relative to the expected tensor's abs max, and whether
/// every element satisfies |a - e| <= atol + rtol |e|.
pub fn compare(actual: &Tensor, expected: &Tensor, atol: f64, rtol: f64) -> (f64, f64, bool) {
    assert_eq!(actual.dims(), expected.dims(), "shape");
    let a = actual
        .to_dtype(DType::F64)
        .and_then(|t| t.flatten_all())
        .expect("a");
    let e = expected
        .to_dtype(DType::F64)
        .and_then(|t| t.flatten_all())
        .expect("e");
    let a = a.to_vec1::<f64>().expect("a");
    let e = e.to_vec1::<f64>().expect("e");
    let mut max_abs = 0f64;
    let mut e_max = 0f64;
    let mut ok = true;
    for (x, y) in a.iter().zip(&e) {
        let d = (x - y).abs();
        max_abs = max_abs.max(d);
        e_max = e_max.max(y.abs());
        ok &= d <= atol + rtol * y.abs();
    }
    let rel = if e_max > 0.0 {
        max_abs / e_max
    } else {
        max_abs
    };
    (max_abs, rel, ok)
}

/// Prints one table row and returns whether it passed.
pub fn check(name: &str, actual: &Tensor, expected: &Tensor, atol: f64, rtol: f64) -> bool {
    let (abs, rel, ok) = compare(actual, expected, atol, rtol);
    println!(
        "| {name} | {abs:.3e} | {rel:.3e} | atol {atol:.0e} rtol {rtol:.0e} | {} |",
        if ok { "ok" } else { "FAIL" }
    );
    ok
}

/// `llava-trainer init` of the README's tiny model (`configs/tiny-model.json`) into `dir`, through
/// the binary as a user runs it (the multi-process, signal and corrupt-row tests share it).
pub fn init_tiny_model(dir: &std::path::Path) -> PathBuf {
    let model = dir.join("tiny-model");
    let config = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("configs/tiny-model.json");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_llava-trainer"))
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
    model
}

/// Text-only synthetic shards (16 samples, batches of 2) and the tiny model under `dir`.
pub fn text_shards_and_tiny_model(dir: &std::path::Path) -> (PathBuf, PathBuf) {
    use llava_loader::synthetic::{write_synthetic, SynthSpec};
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
    (shards, init_tiny_model(dir))
}
