//! `llava-data build` → `llava-trainer init` → `llava-trainer run` on CPU (issue 7's "done
//! when"): the loss falls, a killed run resumes to bit-identical weights, Ctrl-C checkpoints,
//! the checkpoint has exactly HF's keys, and the two stages chain through the projector file.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use llava_e2e::*;
use llava_trainer::io::checkpoint;
use llava_trainer::io::init;
use llava_trainer::train::{self, Control, RunOptions, TrainConfig};

fn config(shards: &Path, model: &Path, output: &Path) -> TrainConfig {
    let mut c = TrainConfig::new(shards.into(), model.into(), output.into());
    c.lr = 1e-3;
    c.warmup_ratio = 0.1;
    c.max_steps = Some(8);
    c.save_every = Some(3);
    c.save_total_limit = Some(2);
    c.workers = 2;
    c.merge_type = Some(llava_trainer::model::config::MergeType::Flat);
    c
}

fn stop_at(step: u64, how: Control) -> RunOptions {
    RunOptions {
        after_step: Some(Box::new(
            move |s| if s == step { how } else { Control::Continue },
        )),
        ..RunOptions::default()
    }
}

fn tensor_names(path: &Path) -> BTreeMap<String, Vec<usize>> {
    candle_core::safetensors::load(path, &candle_core::Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, t)| (k, t.dims().to_vec()))
        .collect()
}

#[test]
fn train_resume_and_checkpoint_layout() {
    let dir = scratch("train");
    let _cleanup = RemoveOnSuccess(dir.clone());
    let shards = build_shards(&dir);
    let model = tiny_model(&dir);

    // Refuses shards built for another merge.
    let mut bad = config(&shards, &model, &dir.join("bad"));
    bad.merge_type = Some(llava_trainer::model::config::MergeType::SpatialUnpad);
    let err = train::run(&bad, RunOptions::default()).expect_err("merge mismatch");
    assert!(err.to_string().contains("mm_patch_merge_type"), "{err}");

    // Uninterrupted run.
    let a = dir.join("a");
    let t = std::time::Instant::now();
    let sa = train::run(&config(&shards, &model, &a), RunOptions::default()).expect("run a");
    let secs = t.elapsed().as_secs_f64();
    let losses: Vec<f64> = sa.history.iter().map(|h| h.loss).collect();
    println!(
        "losses {losses:?}; {:.2}s per step incl. checkpoints",
        secs / 8.0
    );
    assert_eq!(sa.steps_done, 8);
    let first = (losses[0] + losses[1]) / 2.0;
    let last = (losses[6] + losses[7]) / 2.0;
    assert!(last < first - 0.1, "loss falls: {first} → {last}");
    assert_eq!(sa.history[0].lr, 0.0, "lr 0 at the first step");
    // Keep limit 2: checkpoint-3 deleted.
    let kept: Vec<u64> = checkpoint::list_checkpoints(&a)
        .iter()
        .map(|c| c.0)
        .collect();
    assert_eq!(kept, vec![6, 8]);
    let log = std::fs::read_to_string(a.join("log.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 8);

    // Ctrl-C at step 2, a kill after step 4 (last checkpoint 3), then resume to the end.
    let b = dir.join("b");
    let cb = config(&shards, &model, &b);
    let s1 = train::run(&cb, stop_at(2, Control::Stop)).expect("run b1");
    assert!(s1.interrupted);
    assert!(b.join("checkpoint-2/trainer_state.json").is_file());
    let s2 = train::run(&cb, stop_at(4, Control::Abort)).expect("run b2");
    assert_eq!(
        s2.resumed_from.as_deref(),
        Some(b.join("checkpoint-2").as_path())
    );
    assert!(s2.interrupted && s2.steps_done == 4);
    let s3 = train::run(&cb, RunOptions::default()).expect("run b3");
    assert_eq!(
        s3.resumed_from.as_deref(),
        Some(b.join("checkpoint-3").as_path())
    );
    assert_eq!(s3.steps_done, 8);
    for f in ["model.safetensors", "trainer_state.safetensors"] {
        let x = std::fs::read(a.join("checkpoint-8").join(f)).unwrap();
        let y = std::fs::read(b.join("checkpoint-8").join(f)).unwrap();
        assert!(
            x == y,
            "{f}: resumed run differs from the uninterrupted one"
        );
    }
    let resumed: Vec<f64> = s3.history.iter().map(|h| h.loss).collect();
    assert_eq!(
        resumed,
        losses[3..].to_vec(),
        "same losses after the resume"
    );

    // Exactly HF's keys (the fixture's llava-hf hub names: same layer counts) and shapes.
    let ck = a.join("checkpoint-8");
    let names = tensor_names(&ck.join("model.safetensors"));
    let mapping: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("tiny-llava-next-a/key_mapping.json")).unwrap(),
    )
    .unwrap();
    let hub: BTreeSet<String> = mapping
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["llava_hf_hub_key"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names.keys().cloned().collect::<BTreeSet<_>>(), hub);
    let cfg = llava_trainer::LlavaNextConfig::from_file(ck.join("config.json")).expect("config");
    for (n, s) in init::all_params(&cfg) {
        assert_eq!(names[&n], s, "{n}");
    }
    assert_eq!(
        names["language_model.model.embed_tokens.weight"],
        vec![128320, 64]
    );
    let c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ck.join("config.json")).unwrap()).unwrap();
    assert_eq!(c["architectures"][0], "LlavaNextForConditionalGeneration");
    assert_eq!(c["model_type"], "llava_next");
    assert_eq!(c["image_token_index"], 128256);
    assert_eq!(c["vision_feature_layer"], -2);
    assert_eq!(
        c["image_grid_pinpoints"],
        serde_json::json!([[672, 336], [336, 672], [672, 672], [336, 1008], [1008, 336]]),
        "pinpoints swapped to HF's (h, w)"
    );
    for f in ["preprocessor_config.json", "processor_config.json"] {
        assert!(ck.join(f).is_file(), "{f}");
    }

    // Stage 1 (projector only) writes the projector under the reference's names; stage 2 loads it.
    let p1 = dir.join("stage1");
    let mut c1 = config(&shards, &model, &p1);
    c1.tunable_parts = "mm_mlp_adapter".into();
    c1.max_steps = Some(2);
    train::run(&c1, RunOptions::default()).expect("stage 1");
    let proj = p1.join(checkpoint::PROJECTOR_FILE);
    let keys: Vec<String> = tensor_names(&proj).into_keys().collect();
    assert_eq!(
        keys,
        [
            "model.mm_projector.0.bias",
            "model.mm_projector.0.weight",
            "model.mm_projector.2.bias",
            "model.mm_projector.2.weight"
        ]
    );
    let mut c2 = config(&shards, &model, &dir.join("stage2"));
    c2.source.projector = Some(proj);
    c2.max_steps = Some(1);
    train::run(&c2, RunOptions::default()).expect("stage 2 with the stage-1 projector");
}

/// Every tensor of two checkpoints' model.safetensors: max |a - b| and whether all are
/// bit-identical.
fn weights_diff(a: &Path, b: &Path) -> (f64, bool) {
    let load = |p: &Path| {
        candle_core::safetensors::load(p.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap()
    };
    let (x, y) = (load(a), load(b));
    let (mut worst, mut same) = (0f64, true);
    for (k, t) in &x {
        let u = &y[k];
        let d = (t - u)
            .and_then(|d| d.abs())
            .and_then(|d| d.flatten_all())
            .and_then(|d| d.max(0))
            .and_then(|d| d.to_scalar::<f32>())
            .unwrap();
        worst = worst.max(f64::from(d));
        same &= t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            == u.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    }
    (worst, same)
}

/// Issue 11 on CPU threads: world sizes 1, 2, 4 with the same global batch give the same
/// weights; ZeRO-1/2 equal ZeRO-0 bitwise; a world-4 checkpoint resumes at world 2.
#[test]
fn data_parallel_threads() {
    let dir = scratch("dp");
    let _cleanup = RemoveOnSuccess(dir.clone());
    let shards = build_shards(&dir);
    let model = tiny_model(&dir);
    let run = |name: &str, world: usize, accum: usize, zero: u8, steps: u64, opts: RunOptions| {
        let mut c = config(&shards, &model, &dir.join(name));
        c.batch_size = Some(1);
        c.grad_accum = accum;
        c.zero_stage = zero;
        c.max_steps = Some(steps);
        c.save_every = Some(1);
        c.save_total_limit = None;
        c.workers = 1;
        let s = train::run_threads(&c, world, opts).expect(name);
        (s, dir.join(name))
    };
    let (_, w1) = run("w1a4", 1, 4, 0, 2, RunOptions::default());
    let (_, w2) = run("w2a2", 2, 2, 0, 2, RunOptions::default());
    let (_, w4) = run("w4a1", 4, 1, 0, 2, RunOptions::default());
    let ck = |d: &Path| d.join("checkpoint-2");
    let (d12, _) = weights_diff(&ck(&w1), &ck(&w2));
    let (d14, _) = weights_diff(&ck(&w1), &ck(&w4));
    println!("after 2 steps of 4 micro-batches: world 1 vs 2 max abs {d12:e}, 1 vs 4 {d14:e}");
    assert!(d12 < 1e-6 && d14 < 1e-6, "{d12} {d14}");
    // `--nproc-per-node 2 --grad-accum 1` = `--grad-accum 2` at world 1.
    let (_, a) = run("w1a2", 1, 2, 0, 2, RunOptions::default());
    let (_, b) = run("w2a1", 2, 1, 0, 2, RunOptions::default());
    let (d, _) = weights_diff(&ck(&a), &ck(&b));
    println!("world 2 × accum 1 vs world 1 × accum 2: max abs {d:e}");
    assert!(d < 1e-6, "{d}");
    // ZeRO stages shard state, not arithmetic (ZeRO-2: up to the order of the sum).
    for zero in [1, 2] {
        let (_, z) = run(
            &format!("w2a2z{zero}"),
            2,
            2,
            zero,
            2,
            RunOptions::default(),
        );
        let (d, same) = weights_diff(&ck(&w2), &ck(&z));
        if zero == 1 {
            assert!(same, "ZeRO-1 differs from ZeRO-0 by {d:e}");
        } else {
            // ZeRO-2 reduces each micro-batch's gradients to their owner as the backward makes
            // them, so with grad_accum 2 it sums (rank 0 + rank 1) per micro-batch where ZeRO-0
            // sums each rank's micro-batches first: the same sum in another f32 order.
            assert!(d < 1e-6, "ZeRO-2 differs from ZeRO-0 by {d:e}");
        }
    }
    // Checkpointed at world 4 after step 1, resumed at world 2 (accum 2: the same global batch)
    // and at world 1 (accum 4).
    for (world, accum) in [(2, 2), (1, 4)] {
        let name = format!("resume-w{world}");
        let out = dir.join(&name);
        std::fs::create_dir_all(&out).unwrap();
        copy_dir(&w4.join("checkpoint-1"), &out.join("checkpoint-1"));
        let (s, _) = run(&name, world, accum, 1, 2, RunOptions::default());
        assert_eq!(
            s.resumed_from.as_deref(),
            Some(out.join("checkpoint-1").as_path())
        );
        let (d, _) = weights_diff(&ck(&w4), &ck(&out));
        println!("world 4 → resumed at world {world}: max abs vs uninterrupted world 4 {d:e}");
        assert!(d < 1e-6, "{d}");
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}
