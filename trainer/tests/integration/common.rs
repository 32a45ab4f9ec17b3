//! Shared helpers of the fixture tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use llava_trainer::{weights, Batch, ImageMeta, LlavaNext, LlavaNextConfig};

/// Fixture directory: `$LLAVA_PARITY_FIXTURE`, else the bundled tiny-llava-next-a.
pub fn fixture_dir() -> PathBuf {
    std::env::var_os("LLAVA_PARITY_FIXTURE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/tiny-llava-next-a")
        })
}

pub struct Fixture {
    pub dir: PathBuf,
    pub cfg: LlavaNextConfig,
    pub inputs: HashMap<String, Tensor>,
    pub expected: HashMap<String, Tensor>,
    pub images: Vec<ImageMeta>,
    pub num_patches: Vec<usize>,
}

pub fn load_fixture() -> Fixture {
    let dir = fixture_dir();
    let mut cfg = LlavaNextConfig::from_file(dir.join("model/config.json")).expect("config");
    // The goldens come from HF, which rounds unpad sizes to 7 decimals before truncating.
    cfg.unpad_rounding = llava_trainer::llava_next::UnpadRounding::HfRound7;
    let inputs = candle_core::safetensors::load(dir.join("inputs.safetensors"), &Device::Cpu)
        .expect("inputs.safetensors");
    let expected = candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu)
        .expect("expected.safetensors");
    let fixture: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("fixture.json")).expect("fixture.json"),
    )
    .expect("fixture.json parses");
    let num_patches: Vec<usize> = expected["num_patches"]
        .to_vec1::<i64>()
        .expect("num_patches")
        .into_iter()
        .map(|x| x as usize)
        .collect();
    let sizes = inputs["image_sizes"].to_vec2::<i64>().expect("image_sizes");
    let samples = fixture["batch"]["samples"].as_array().expect("samples");
    let images = samples
        .iter()
        .zip(&sizes)
        .zip(&num_patches)
        .map(|((s, hw), &n)| {
            let rc = &s["tiles_rows_cols"];
            let rows = rc[0].as_u64().expect("rows") as usize;
            let cols = rc[1].as_u64().expect("cols") as usize;
            ImageMeta {
                // HF gives (H, W); the model takes PIL's (W, H).
                orig_size: (hw[1] as usize, hw[0] as usize),
                grid: (cols, rows),
                num_tiles: n,
            }
        })
        .collect();
    Fixture {
        dir,
        cfg,
        inputs,
        expected,
        images,
        num_patches,
    }
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
        let px = &self.inputs["pixel_values"];
        let parts: Vec<Tensor> = self
            .num_patches
            .iter()
            .enumerate()
            .map(|(i, &n)| px.get(i).and_then(|p| p.narrow(0, 0, n)).expect("tiles"))
            .collect();
        Tensor::cat(&parts, 0).expect("cat")
    }

    pub fn lengths(&self) -> Vec<usize> {
        llava_trainer::llava_next::lengths_from_attention_mask(&self.inputs["attention_mask"])
            .expect("lengths")
    }

    pub fn batch(&self) -> Batch {
        Batch {
            input_ids: self.inputs["input_ids"].clone(),
            labels: Some(self.inputs["labels"].clone()),
            lengths: self.lengths(),
            pixel_values: Some(self.pixel_values()),
            images: self.images.clone(),
            segments: None,
        }
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
