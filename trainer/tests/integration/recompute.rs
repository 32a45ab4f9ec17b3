//! The training step's contracts on the fixture (`LLAVA_PARITY_FIXTURE`, else the repo's):
//! the recomputed (segmented) backward gives the monolithic backward's gradients, the chunked
//! loss equals the full-logits loss, blockwise attention inside the model equals dense, and a
//! bf16 model tracks the f32 one. Run with `--nocapture` for the measured differences.

use crate::common;

use std::collections::HashMap;

use candle_core::{DType, Tensor};
use llava_trainer::io::weights::{self, LoadOptions};
use llava_trainer::model::attention::AttentionKind;
use llava_trainer::model::trainable::build_model;
use llava_trainer::train::step::{micro_batch, GradAccumulator, StepOptions};
use llava_trainer::train::TunableParts;

/// Gradients and loss of one micro-batch.
fn grads(
    parts: &str,
    recompute: bool,
    attention: AttentionKind,
    loss_chunk: usize,
    grad_accum: usize,
    dtype: DType,
) -> (HashMap<String, Tensor>, f32) {
    let fx = common::load_fixture();
    let opts = LoadOptions {
        dtype,
        ..LoadOptions::default()
    };
    let (varmap, _) =
        weights::load_varmap(&fx.cfg, &[fx.dir.join("model")], &opts).expect("weights");
    let parts = TunableParts::parse(parts).expect("parts");
    let (mut model, vars) =
        build_model(&fx.cfg, &varmap, &|n| parts.is_trainable(n)).expect("model");
    model.set_attention(attention, AttentionKind::Dense);
    model.set_loss_chunk(loss_chunk);
    let mut acc = GradAccumulator::new(vars);
    let out = micro_batch(
        &model,
        &fx.batch(),
        &mut acc,
        grad_accum,
        StepOptions { recompute },
    )
    .expect("step");
    (acc.take(), out.loss.to_scalar::<f32>().expect("loss"))
}

/// Max |a - b| over all tensors, and the count of bit-identical tensors.
fn compare(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>) -> (f64, usize) {
    assert_eq!(
        {
            let mut k: Vec<_> = a.keys().collect();
            k.sort();
            k
        },
        {
            let mut k: Vec<_> = b.keys().collect();
            k.sort();
            k
        },
        "the same parameters get gradients"
    );
    let (mut worst, mut identical) = (0f64, 0);
    for (name, ga) in a {
        let gb = &b[name];
        let va = ga
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .expect("a");
        let vb = gb
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .expect("b");
        if va.iter().zip(&vb).all(|(x, y)| x.to_bits() == y.to_bits()) {
            identical += 1;
        }
        for (x, y) in va.iter().zip(&vb) {
            worst = worst.max(f64::from((x - y).abs()));
        }
    }
    (worst, identical)
}

#[test]
fn recomputed_backward_equals_monolithic() {
    for parts in [
        "mm_vision_tower,mm_mlp_adapter,mm_language_model",
        "mm_mlp_adapter",
        "mm_vision_tower,mm_mlp_adapter",
    ] {
        for accum in [1, 2] {
            let kind = AttentionKind::Blockwise { block: 16 };
            let (mono, lm) = grads(parts, false, kind, 1024, accum, DType::F32);
            let (seg, ls) = grads(parts, true, kind, 1024, accum, DType::F32);
            let (worst, identical) = compare(&mono, &seg);
            println!(
                "{parts} accum {accum}: {identical}/{} tensors bit-identical, max abs diff \
                 {worst:.2e}; loss {lm} vs {ls}",
                mono.len()
            );
            assert_eq!(lm.to_bits(), ls.to_bits(), "same loss");
            assert!(!mono.is_empty());
            // Bitwise: each segment replays the monolithic graph's ops in the same order.
            assert_eq!(
                identical,
                mono.len(),
                "{parts}: max abs difference {worst:e}"
            );
        }
    }
}

#[test]
fn chunked_loss_equals_full_logits_loss() {
    let fx = common::load_fixture();
    let (model, _) = fx.model();
    let full = model
        .forward(&fx.batch())
        .expect("forward")
        .loss
        .expect("loss")
        .to_scalar::<f32>()
        .expect("loss");
    let kind = AttentionKind::Dense;
    let (g1, l1) = grads(
        "mm_vision_tower,mm_mlp_adapter,mm_language_model",
        true,
        kind,
        1024,
        1,
        DType::F32,
    );
    let (g7, l7) = grads(
        "mm_vision_tower,mm_mlp_adapter,mm_language_model",
        true,
        kind,
        7,
        1,
        DType::F32,
    );
    let (worst, _) = compare(&g1, &g7);
    println!("loss full logits {full}, one chunk {l1}, chunks of 7 {l7}; grads max diff {worst:e}");
    assert!((full - l1).abs() <= 1e-6 * full.abs());
    assert!((full - l7).abs() <= 1e-6 * full.abs());
    assert!(worst <= 1e-7, "chunked gradients differ by {worst:e}");
}

#[test]
fn blockwise_model_equals_dense_model() {
    let parts = "mm_vision_tower,mm_mlp_adapter,mm_language_model";
    let (dense, ld) = grads(parts, true, AttentionKind::Dense, 1024, 1, DType::F32);
    let (block, lb) = grads(
        parts,
        true,
        AttentionKind::Blockwise { block: 8 },
        1024,
        1,
        DType::F32,
    );
    let (worst, _) = compare(&dense, &block);
    let max_g = dense
        .values()
        .map(|g| {
            g.abs()
                .and_then(|t| t.max_all())
                .and_then(|t| t.to_scalar::<f32>())
                .expect("max")
        })
        .fold(0f32, f32::max);
    println!("loss {ld} vs {lb}; gradients max abs diff {worst:e} (max |g| {max_g})");
    assert!((ld - lb).abs() <= 1e-6 * ld.abs());
    assert!(worst <= 1e-6 * f64::from(max_g), "{worst:e}");
}

#[test]
fn bf16_tracks_f32() {
    let parts = "mm_vision_tower,mm_mlp_adapter,mm_language_model";
    let kind = AttentionKind::default();
    let (g32, l32) = grads(parts, true, kind, 1024, 1, DType::F32);
    let (g16, l16) = grads(parts, true, kind, 1024, 1, DType::BF16);
    // Gradients: compare direction (cosine) over all parameters together.
    let (mut dot, mut n32, mut n16) = (0f64, 0f64, 0f64);
    for (name, a) in &g32 {
        let b = &g16[name];
        let va = a.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("a");
        let vb = b.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("b");
        for (x, y) in va.iter().zip(&vb) {
            dot += f64::from(*x) * f64::from(*y);
            n32 += f64::from(*x).powi(2);
            n16 += f64::from(*y).powi(2);
        }
    }
    let cos = dot / (n32.sqrt() * n16.sqrt());
    let rel = (l16 - l32).abs() / l32.abs();
    println!("loss f32 {l32} bf16 {l16} (relative {rel:.2e}); gradient cosine {cos:.5}");
    assert!(rel < 1e-2, "bf16 loss is {rel} away from f32");
    assert!(cos > 0.99, "bf16 gradients point elsewhere: cosine {cos}");
}
