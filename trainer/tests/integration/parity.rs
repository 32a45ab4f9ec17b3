//! Parity with the HF transformers goldens of the fixture (`LLAVA_PARITY_FIXTURE`).
//! Run with `--nocapture` for the error table.

use crate::common;

use candle_core::Tensor;
use common::{check, load_fixture};

const FEAT: (f64, f64) = (1e-4, 1e-4);
const LOSS: (f64, f64) = (1e-5, 0.0);
const GRAD: (f64, f64) = (1e-5, 1e-3);

/// Rows `0..len` of each sample of a `[B, L, ..]` tensor, concatenated.
fn valid_rows(t: &Tensor, lengths: &[usize]) -> Tensor {
    let parts: Vec<Tensor> = lengths
        .iter()
        .enumerate()
        .map(|(i, &n)| t.get(i).and_then(|r| r.narrow(0, 0, n)).expect("rows"))
        .collect();
    Tensor::cat(&parts, 0).expect("cat")
}

/// Fixture tensor name of a canonical parameter (the fixture drops `vision_model.`).
fn fixture_name(canonical: &str) -> String {
    canonical.replacen("vision_tower.vision_model.", "vision_tower.", 1)
}

#[test]
fn parity_with_hf_reference() {
    let fx = load_fixture();
    let (model, varmap) = fx.model();
    let e = &fx.expected;
    let px = fx.pixel_values();
    let lengths = fx.lengths();
    let mut ok = true;
    println!("| check | max abs | max abs / max abs(expected) | tolerance | |");
    println!("|---|---|---|---|---|");

    let emb = model.vision_tower().embed(&px).expect("embed");
    ok &= check(
        "vision embeddings (hidden_states[0])",
        &emb,
        &e["vision.hidden_states.embeddings"],
        FEAT.0,
        FEAT.1,
    );
    let sel = model.vision_selected_layer(&px).expect("vision");
    ok &= check(
        "vision selected layer (-2)",
        &sel,
        &e["vision.selected_layer"],
        FEAT.0,
        FEAT.1,
    );
    let feats = model.image_features(&px).expect("features");
    ok &= check(
        "projector output",
        &feats,
        &e["projector.output"],
        FEAT.0,
        FEAT.1,
    );
    let packed = model.pack_image_features(&feats, &fx.images).expect("pack");
    for (i, p) in packed.iter().enumerate() {
        let name = format!("image_features.packed.{i}");
        ok &= check(&name, p, &e[&name], FEAT.0, FEAT.1);
    }
    let batch = fx.batch();
    let embedded = model.embed_inputs(&batch, &packed).expect("embed inputs");
    assert_eq!(
        embedded.lengths, lengths,
        "pre-expanded ids keep their lengths"
    );
    ok &= check(
        "inputs_embeds (valid rows)",
        &valid_rows(&embedded.embeds, &lengths),
        &valid_rows(&e["inputs_embeds"], &lengths),
        FEAT.0,
        FEAT.1,
    );

    let out = model.forward(&batch).expect("forward");
    ok &= check(
        "logits (valid rows)",
        &valid_rows(&out.logits, &lengths),
        &valid_rows(&e["logits"], &lengths),
        FEAT.0,
        FEAT.1,
    );
    let loss = out.loss.expect("loss");
    ok &= check("loss", &loss, &e["loss"], LOSS.0, LOSS.1);
    let tok = out.token_loss.expect("token loss");
    ok &= check("per-token loss", &tok, &e["token_nll"], LOSS.0, 1e-5);

    let grads = loss.backward().expect("backward");
    let vars = varmap.data().lock().expect("varmap").clone();
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    let (mut worst_abs, mut worst_rel, mut compared, mut none) = (0f64, 0f64, 0, 0);
    for name in names {
        let var = &vars[name];
        let key = format!("grad.full.step1.{}", fixture_name(name));
        let g = grads.get(var.as_tensor());
        match (g, e.get(&key)) {
            (Some(g), Some(want)) => {
                let (abs, rel, pass) = common::compare(g, want, GRAD.0, GRAD.1);
                println!(
                    "| grad {name} | {abs:.3e} | {rel:.3e} | atol {:.0e} rtol {:.0e} | {} |",
                    GRAD.0,
                    GRAD.1,
                    if pass { "ok" } else { "FAIL" }
                );
                ok &= pass;
                worst_abs = worst_abs.max(abs);
                // CLIP k_proj.bias has a mathematically zero gradient (README): its relative
                // error is noise over noise, so it is left out of the worst relative error.
                if !name.ends_with("k_proj.bias") {
                    worst_rel = worst_rel.max(rel);
                }
                compared += 1;
            }
            (None, Some(want)) => {
                println!(
                    "| grad {name} | missing here, HF has one (max |g| {}) | FAIL |",
                    want.abs()
                        .and_then(|t| t.max_all())
                        .and_then(|t| t.to_scalar::<f32>())
                        .unwrap_or(f32::NAN)
                );
                ok = false;
            }
            (Some(g), None) => {
                let m = g
                    .abs()
                    .and_then(|t| t.max_all())
                    .and_then(|t| t.to_scalar::<f32>())
                    .expect("max");
                if m != 0.0 {
                    println!("| grad {name} | nonzero ({m:e}) where HF has none | FAIL |");
                    ok = false;
                }
                none += 1;
            }
            (None, None) => none += 1,
        }
    }
    println!(
        "| gradients of {compared} parameters (worst; rel excl. CLIP k_proj.bias) | {worst_abs:.3e} | {worst_rel:.3e} | atol {:.0e} rtol {:.0e} | {} |",
        GRAD.0, GRAD.1, if ok { "ok" } else { "FAIL" }
    );
    println!("| parameters without gradient (as in HF) | {none} | | | |");
    assert!(ok, "parity failed, see the table above");
}

/// The original LLaVA-NeXT input form: one -200 per image, expanded inside the model, gives the
/// same logits and loss as HF's pre-expanded ids.
#[test]
fn single_placeholder_per_image_matches_expanded() {
    let fx = load_fixture();
    let (model, _) = fx.model();
    let batch = fx.batch();
    let ids = batch.input_ids.to_vec2::<i64>().expect("ids");
    let labels = fx.inputs["labels"].to_vec2::<i64>().expect("labels");
    let image_id = fx.cfg.image_token_index;
    let l = ids[0].len();
    let (mut new_ids, mut new_labels, mut lengths) = (Vec::new(), Vec::new(), Vec::new());
    for (b, row) in ids.iter().enumerate() {
        let (mut r, mut lab) = (Vec::new(), Vec::new());
        for (p, &id) in row.iter().enumerate().take(batch.lengths[b]) {
            if id == image_id {
                if p > 0 && row[p - 1] == image_id {
                    continue;
                }
                r.push(-200i64);
            } else {
                r.push(id);
            }
            lab.push(labels[b][p]);
        }
        lengths.push(r.len());
        r.resize(l, 0);
        lab.resize(l, -100);
        new_ids.extend(r);
        new_labels.extend(lab);
    }
    let dev = &candle_core::Device::Cpu;
    let collapsed = llava_trainer::Batch {
        input_ids: Tensor::from_vec(new_ids, (ids.len(), l), dev).expect("ids"),
        labels: Some(Tensor::from_vec(new_labels, (ids.len(), l), dev).expect("labels")),
        lengths,
        ..batch.clone()
    };
    let a = model.forward(&batch).expect("expanded");
    let c = model.forward(&collapsed).expect("collapsed");
    assert_eq!(a.lengths, c.lengths);
    let w = c.logits.dim(1).expect("width");
    let al = a.logits.narrow(1, 0, w).expect("narrow");
    let lengths = a.lengths.clone();
    assert!(
        common::compare(
            &valid_rows(&c.logits, &lengths),
            &valid_rows(&al, &lengths),
            1e-5,
            1e-5
        )
        .2
    );
    let (la, lc) = (a.loss.expect("a"), c.loss.expect("c"));
    assert!(common::compare(&la, &lc, 1e-6, 0.0).2);
}

#[test]
fn placeholder_count_mismatch_is_an_error() {
    let fx = load_fixture();
    let (model, _) = fx.model();
    let mut batch = fx.batch();
    let px = fx.pixel_values();
    let n = fx.num_patches[0];
    batch.images.push(fx.images[0]);
    batch.pixel_values =
        Some(Tensor::cat(&[&px, &px.narrow(0, 0, n).expect("n")], 0).expect("cat"));
    let err = model.forward(&batch).expect_err("4 images, 3 placeholders");
    assert!(err.to_string().contains("do not match"), "{err}");
}
