//! Sequence packing on the fixture (`LLAVA_PARITY_FIXTURE`, else the repo's tiny-llava-next-a):
//! a packed row of whole samples gives the loss and the gradients of the same samples unpacked,
//! and a token's output does not depend on the other samples of its row. Run with
//! `--nocapture` for the measured differences.

use crate::common;

use std::collections::HashMap;

use candle_core::{DType, Device, IndexOp, Tensor};
use llava_trainer::io::weights::{self, LoadOptions};
use llava_trainer::model::attention::AttentionKind;
use llava_trainer::model::trainable::build_model;
use llava_trainer::train::step::{micro_batch, GradAccumulator, StepOptions};
use llava_trainer::train::TunableParts;
use llava_trainer::Batch;

/// The fixture's rows (real tokens only) concatenated into one row, in order, so the images
/// keep their placeholder order and `pixel_values` stays as it is.
fn pack_all(batch: &Batch) -> Batch {
    let ids = batch.input_ids.to_vec2::<i64>().expect("ids");
    let labels = batch
        .labels
        .as_ref()
        .expect("labels")
        .to_vec2::<i64>()
        .expect("labels");
    let (mut row_ids, mut row_labels) = (Vec::new(), Vec::new());
    for (i, &n) in batch.lengths.iter().enumerate() {
        row_ids.extend_from_slice(&ids[i][..n]);
        row_labels.extend_from_slice(&labels[i][..n]);
    }
    let n = row_ids.len();
    Batch {
        input_ids: Tensor::from_vec(row_ids, (1, n), &Device::Cpu).expect("ids"),
        labels: Some(Tensor::from_vec(row_labels, (1, n), &Device::Cpu).expect("labels")),
        lengths: vec![n],
        segments: Some(vec![batch.lengths.clone()]),
        ..batch.clone()
    }
}

fn grads(
    batch: &Batch,
    recompute: bool,
    attention: AttentionKind,
) -> (HashMap<String, Tensor>, f32) {
    let fx = common::load_fixture();
    let opts = LoadOptions {
        dtype: DType::F32,
        ..LoadOptions::default()
    };
    let (varmap, _) =
        weights::load_varmap(&fx.cfg, &[fx.dir.join("model")], &opts).expect("weights");
    let parts =
        TunableParts::parse("mm_vision_tower,mm_mlp_adapter,mm_language_model").expect("parts");
    let (mut model, vars) =
        build_model(&fx.cfg, &varmap, &|n| parts.is_trainable(n)).expect("model");
    model.set_attention(attention, AttentionKind::Dense);
    let mut acc = GradAccumulator::new(vars);
    let out = micro_batch(&model, batch, &mut acc, 1, StepOptions { recompute }).expect("step");
    (acc.take(), out.loss.to_scalar::<f32>().expect("loss"))
}

/// Max |a − b| over every gradient tensor, relative to the tensor's max |a|; tensors whose
/// gradient is zero in exact arithmetic (CLIP's `k_proj.bias`: softmax ignores a shift shared by
/// all keys, so it is ~1e-9 float noise) are scaled by 1% of the largest gradient instead.
fn max_rel_diff(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>) -> f64 {
    let mut names: Vec<_> = a.keys().collect();
    names.sort();
    let mut other: Vec<_> = b.keys().collect();
    other.sort();
    assert_eq!(names, other, "the same parameters get gradients");
    let values = |m: &HashMap<String, Tensor>, n: &str| {
        m[n].flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .expect("gradient")
    };
    let global = names
        .iter()
        .map(|n| values(a, n).iter().fold(0f32, |m, x| m.max(x.abs())))
        .fold(0f32, f32::max);
    let mut worst = 0f64;
    for name in names {
        let (va, vb) = (values(a, name), values(b, name));
        let scale = va
            .iter()
            .fold(0f32, |m, x| m.max(x.abs()))
            .max(1e-2 * global);
        let diff = va
            .iter()
            .zip(&vb)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        worst = worst.max(f64::from(diff / scale));
    }
    worst
}

#[test]
fn a_packed_row_gives_the_unpacked_loss_and_gradients() {
    let fx = common::load_fixture();
    let unpacked = fx.batch();
    assert!(
        unpacked.lengths.len() >= 2,
        "the fixture has several samples"
    );
    let packed = pack_all(&unpacked);
    for (recompute, attention) in [
        (true, AttentionKind::Blockwise { block: 16 }),
        (false, AttentionKind::Dense),
    ] {
        let (ga, la) = grads(&unpacked, recompute, attention);
        let (gb, lb) = grads(&packed, recompute, attention);
        let rel = max_rel_diff(&ga, &gb);
        let dl = (la - lb).abs() / la.abs();
        eprintln!(
            "recompute {recompute}, {attention:?}: loss {la} vs {lb} (rel {dl:.2e}); \
             gradients max rel diff {rel:.2e}"
        );
        assert!(dl < 1e-6, "loss {la} unpacked vs {lb} packed");
        assert!(
            rel < 1e-5,
            "gradients differ by {rel:.2e} (relative to each tensor's max)"
        );
    }
}

#[test]
fn the_full_forward_masks_packed_boundaries_too() {
    let fx = common::load_fixture();
    let (model, _) = fx.model();
    let unpacked = fx.batch();
    let packed = pack_all(&unpacked);
    let a = model.forward(&unpacked).expect("unpacked");
    let b = model.forward(&packed).expect("packed");
    let la = a.loss.expect("loss").to_scalar::<f32>().expect("loss");
    let lb = b.loss.expect("loss").to_scalar::<f32>().expect("loss");
    assert!((la - lb).abs() / la.abs() < 1e-6, "{la} vs {lb}");
    // Row i's logits are the packed row's logits at i's offset.
    let mut at = 0;
    for (i, &n) in a.lengths.iter().enumerate() {
        let x = a.logits.i((i, ..n)).expect("row");
        let y = b.logits.i((0, at..at + n)).expect("segment");
        let d = (x - y)
            .and_then(|d| d.abs())
            .and_then(|d| d.max_all())
            .and_then(|d| d.to_scalar::<f32>())
            .expect("diff");
        assert!(d < 1e-4, "sample {i}: logits differ by {d}");
        at += n;
    }
}

#[test]
fn a_token_does_not_see_the_other_samples_of_its_row() {
    let fx = common::load_fixture();
    let (model, _) = fx.model();
    let packed = pack_all(&fx.batch());
    let segs = packed.segments.as_ref().expect("segments")[0].clone();
    let first = segs[0];
    // Change every text token of the second and later samples (images stay: they are per tile).
    let mut ids = packed.input_ids.to_vec2::<i64>().expect("ids");
    // Word ids (3.., below the vocabulary; pad/BOS/EOS and the image token stay) move to another
    // word id, from the fixture's config: the image token may sit anywhere in the vocabulary.
    let vocab = fx.cfg.text_config.vocab_size as i64;
    let image = fx.cfg.image_token_index;
    let shift = |id: i64| {
        let mut new = 3 + (id - 3 + 7) % (vocab - 3);
        if new == image {
            new = 3 + (new - 3 + 1) % (vocab - 3);
        }
        new
    };
    for id in ids[0][first..]
        .iter_mut()
        .filter(|id| (3..vocab).contains(*id) && **id != image)
    {
        *id = shift(*id);
    }
    let changed = Batch {
        input_ids: Tensor::from_vec(ids.concat(), (1, packed.lengths[0]), &Device::Cpu)
            .expect("ids"),
        ..packed.clone()
    };
    let a = model.forward(&packed).expect("packed");
    let b = model.forward(&changed).expect("changed");
    // The first sample's tokens (expanded length = its unpacked length) are unaffected...
    let n0 = model
        .prepare(&packed)
        .expect("prep")
        .segments
        .expect("segments")[0][0];
    let x = a.logits.i((0, ..n0)).expect("a");
    let y = b.logits.i((0, ..n0)).expect("b");
    let same = (x - y)
        .and_then(|d| d.abs())
        .and_then(|d| d.max_all())
        .and_then(|d| d.to_scalar::<f32>())
        .expect("diff");
    assert_eq!(same, 0.0, "the first sample's outputs moved by {same}");
    // ...while the changed samples' outputs do change (the edit is visible where it should be).
    let x = a.logits.i((0, n0..)).expect("a");
    let y = b.logits.i((0, n0..)).expect("b");
    let moved = (x - y)
        .and_then(|d| d.abs())
        .and_then(|d| d.max_all())
        .and_then(|d| d.to_scalar::<f32>())
        .expect("diff");
    assert!(
        moved > 1e-3,
        "the edited samples' outputs did not change ({moved})"
    );
}
