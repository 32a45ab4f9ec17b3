//! AdamW parity with the fixture's three torch AdamW steps (lr 1e-3, wd 0, no clipping) for
//! every recorded variant, plus schedule and clipping unit checks. Honours
//! `LLAVA_PARITY_FIXTURE`. Run with `--nocapture` for the error table.

use crate::common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use common::{compare, load_fixture};
use llava_trainer::io::weights;
use llava_trainer::model::trainable::build_model;
use llava_trainer::train::optim::{AdamW, AdamWConfig};
use llava_trainer::train::schedule::CosineSchedule;

const LOSS_ATOL: f64 = 1e-5;
const W_ATOL: f64 = 1e-5;
/// README: a gradient element whose sign is float noise moves by ~2·lr per step the other way.
const W_LOOSE: f64 = 2e-3 * 3.0;

fn fixture_name(canonical: &str) -> String {
    canonical.replacen("vision_tower.vision_model.", "vision_tower.", 1)
}

fn trainable(variant: &str, name: &str) -> bool {
    match variant {
        "full" => true,
        "pretrain" => name.starts_with("multi_modal_projector") || name == "image_newline",
        _ => name.starts_with("multi_modal_projector"),
    }
}

/// Max abs error, elements over the strict tolerance, and whether all are within the loose one.
fn weight_error(a: &Tensor, e: &Tensor) -> (f64, usize, bool) {
    let a = a.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("a");
    let e = e.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("e");
    let mut max = 0f64;
    let mut over = 0;
    let mut ok = true;
    for (x, y) in a.iter().zip(&e) {
        let d = f64::from((x - y).abs());
        max = max.max(d);
        if d > W_ATOL {
            over += 1;
            ok &= d <= W_LOOSE;
        }
    }
    (max, over, ok)
}

fn run_variant(variant: &str) -> bool {
    let fx = load_fixture();
    let opts = weights::LoadOptions::default();
    let (varmap, _) =
        weights::load_varmap(&fx.cfg, &[fx.dir.join("model")], &opts).expect("weights");
    let initial: HashMap<String, Tensor> = varmap
        .data()
        .lock()
        .expect("lock")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().copy().expect("copy")))
        .collect();
    let (model, vars) = build_model(&fx.cfg, &varmap, &|n| trainable(variant, n)).expect("model");
    let by_name: HashMap<String, Var> = vars.iter().cloned().collect();
    let cfg = AdamWConfig {
        lr: 1e-3,
        weight_decay: 0.0,
        max_grad_norm: None,
        ..AdamWConfig::default()
    };
    let mut opt = AdamW::new(cfg, vars).expect("optimizer");
    let batch = fx.batch();
    let e = &fx.expected;
    let want_losses = e[&format!("train.{variant}.losses")]
        .to_vec1::<f32>()
        .expect("losses");
    let mut ok = true;
    let mut loose_total = 0;
    for (k, want) in want_losses.iter().enumerate() {
        let out = model.forward_loss(&batch).expect("forward");
        let loss = out.loss.to_scalar::<f32>().expect("loss");
        let d = f64::from((loss - want).abs());
        let pass = d <= LOSS_ATOL;
        println!(
            "| {variant} | loss before step {} | {loss:.7} vs {want:.7} | {d:.2e} | {} |",
            k + 1,
            if pass { "ok" } else { "FAIL" }
        );
        ok &= pass;
        let store = out.loss.backward().expect("backward");
        let grads: HashMap<String, Tensor> = by_name
            .iter()
            .filter_map(|(n, v)| store.get(v.as_tensor()).map(|g| (n.clone(), g.clone())))
            .collect();
        opt.step(&grads, 1.0).expect("step");
        // Weights recorded after this step.
        let data = varmap.data().lock().expect("lock");
        let mut worst = (0f64, String::new());
        for (name, var) in data.iter() {
            let key = format!("train.{variant}.step{}.{}", k + 1, fixture_name(name));
            let Some(want) = e.get(&key) else { continue };
            let (max, over, pass) = weight_error(var.as_tensor(), want);
            loose_total += over;
            ok &= pass;
            if !pass {
                println!(
                    "| {variant} | {name} after step {} | FAIL max {max:.2e} |",
                    k + 1
                );
            }
            if max > worst.0 {
                worst = (max, name.clone());
            }
        }
        println!(
            "| {variant} | recorded weights after step {} | worst {} | {:.2e} | |",
            k + 1,
            worst.1,
            worst.0
        );
    }
    let after = model
        .forward_loss(&batch)
        .expect("forward")
        .loss
        .to_scalar::<f32>()
        .expect("loss");
    let want = e[&format!("train.{variant}.loss_after_steps")]
        .to_scalar::<f32>()
        .expect("after");
    let d = f64::from((after - want).abs());
    println!(
        "| {variant} | loss after 3 steps | {after:.7} vs {want:.7} | {d:.2e} | {} |",
        if d <= LOSS_ATOL { "ok" } else { "FAIL" }
    );
    ok &= d <= LOSS_ATOL;

    let data = varmap.data().lock().expect("lock");
    if variant == "full" {
        // Every parameter against trained_full_step3.safetensors.
        let trained = candle_core::safetensors::load(
            fx.dir.join("trained_full_step3.safetensors"),
            &Device::Cpu,
        )
        .expect("trained_full_step3");
        let (mut max_abs, mut max_rel, mut over) = (0f64, 0f64, 0);
        for (name, var) in data.iter() {
            let want = &trained[&fixture_name(name)];
            // README: CLIP k_proj.bias has a mathematically zero gradient; AdamW amplifies its
            // float noise, so it is compared at 2e-3.
            if name.ends_with("self_attn.k_proj.bias") && name.contains("vision_tower") {
                let (abs, _, pass) = compare(var.as_tensor(), want, 2e-3, 0.0);
                ok &= pass;
                println!("| full | {name} (noise-driven) | {abs:.2e} | atol 2e-3 |");
                continue;
            }
            let (abs, n_over, pass) = weight_error(var.as_tensor(), want);
            let (_, rel, _) = compare(var.as_tensor(), want, W_ATOL, 0.0);
            ok &= pass;
            over += n_over;
            max_abs = max_abs.max(abs);
            max_rel = max_rel.max(rel);
        }
        println!(
            "| full | all {} weights after step 3 (excl. CLIP k_proj.bias) | max abs {max_abs:.2e} | max abs / max |w| {max_rel:.2e} | elements over 1e-5: {over} |",
            data.len()
        );
    } else {
        // Frozen parameters stay bit-identical.
        for (name, var) in data.iter() {
            if trainable(variant, name) {
                continue;
            }
            let same = var
                .as_tensor()
                .eq(&initial[name])
                .and_then(|t| t.to_dtype(DType::F32))
                .and_then(|t| t.min_all())
                .and_then(|t| t.to_scalar::<f32>())
                .expect("eq")
                == 1.0;
            if !same {
                println!("| {variant} | frozen {name} changed | FAIL |");
                ok = false;
            }
        }
    }
    println!("| {variant} | elements over 1e-5 in recorded steps | {loose_total} | | |");
    ok
}

#[test]
fn adamw_full_matches_torch() {
    assert!(run_variant("full"), "see the table above");
}

#[test]
fn adamw_pretrain_matches_torch() {
    assert!(run_variant("pretrain"), "see the table above");
}

#[test]
fn adamw_projector_only_matches_torch() {
    assert!(run_variant("projector_only"), "see the table above");
}

#[test]
fn schedule_warmup_and_cosine() {
    let s = CosineSchedule::new(1000, 0.03);
    assert_eq!(s.warmup_steps, 30);
    assert_eq!(s.multiplier(0), 0.0, "lr 0 at the first step");
    assert!((s.multiplier(15) - 0.5).abs() < 1e-12);
    assert_eq!(s.multiplier(30), 1.0);
    // Half way through the decay: cos(π/2) → 0.5.
    assert!((s.multiplier(30 + 485) - 0.5).abs() < 1e-12);
    assert!(
        (s.multiplier(999) - 0.5 * (1.0 + (std::f64::consts::PI * 969.0 / 970.0).cos())).abs()
            < 1e-15
    );
    assert_eq!(CosineSchedule::new(7, 0.03).warmup_steps, 1, "ceil");
    assert_eq!(CosineSchedule::new(7, 0.0).multiplier(0), 1.0);
}

#[test]
fn clipping_scales_by_max_over_norm() {
    let dev = Device::Cpu;
    let var = Var::from_tensor(&Tensor::zeros(2, DType::F32, &dev).expect("t")).expect("var");
    let mut opt = AdamW::new(
        AdamWConfig {
            lr: 0.1,
            max_grad_norm: Some(1.0),
            ..AdamWConfig::default()
        },
        vec![("w.weight".into(), var)],
    )
    .expect("optimizer");
    let g = Tensor::new(&[3f32, 4.0], &dev).expect("g");
    let stats = opt
        .step(&HashMap::from([("w.weight".to_string(), g)]), 1.0)
        .expect("step");
    assert!((stats.grad_norm_value().expect("norm") - 5.0).abs() < 1e-6);
    // m = (1 - β1) · g · 1/(5 + 1e-6).
    let m = opt.params[0].m.to_vec1::<f32>().expect("m");
    let coef = 1.0 / (5.0 + 1e-6);
    assert!((f64::from(m[0]) - 0.1 * 3.0 * coef).abs() < 1e-7, "{m:?}");
    assert!((f64::from(m[1]) - 0.1 * 4.0 * coef).abs() < 1e-7, "{m:?}");
    // Below the limit the coefficient is 1: the moments see the gradient unscaled.
    let m_before = opt.params[0].m.to_vec1::<f32>().expect("m");
    let stats = opt
        .step(
            &HashMap::from([(
                "w.weight".to_string(),
                Tensor::new(&[0.3f32, 0.4], &dev).expect("g"),
            )]),
            1.0,
        )
        .expect("step");
    assert!((stats.grad_norm_value().expect("norm") - 0.5).abs() < 1e-6);
    let m = opt.params[0].m.to_vec1::<f32>().expect("m");
    for (i, g) in [0.3f32, 0.4].iter().enumerate() {
        let want = m_before[i] + (g - m_before[i]) * 0.1;
        assert!((m[i] - want).abs() < 1e-7, "{m:?}");
    }
}
