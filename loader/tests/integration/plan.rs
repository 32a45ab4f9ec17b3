//! Epoch plan: coverage, modality purity, token balance, determinism and resumption, on
//! synthetic shards (tiny 8×8 tiles: the plan never reads pixels).

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use llava_loader::synthetic::{write_synthetic, SynthSpec};
use llava_loader::{
    DataError, DataState, EpochPlan, IndexOptions, Modality, PlanConfig, PlannedBatch, ShardIndex,
};

fn dataset(dir: &Path, image: usize, text: usize) -> Arc<ShardIndex> {
    let spec = SynthSpec {
        image_samples: image,
        text_samples: text,
        batch_size: 4,
        group_size: 12,
        groups_per_shard: 2,
        tile_size: 8,
        ..SynthSpec::default()
    };
    write_synthetic(dir, &spec).expect("write synthetic shards");
    ShardIndex::open(dir, &IndexOptions::default()).expect("open index")
}

/// (source, index) of a sample.
type Key = (String, u64);

fn keys(index: &ShardIndex, b: &PlannedBatch) -> Vec<Key> {
    b.samples
        .iter()
        .map(|s| (index.source_name(s).to_string(), s.index))
        .collect()
}

fn all_keys(index: &ShardIndex) -> HashSet<Key> {
    index
        .samples
        .iter()
        .map(|s| (index.source_name(s).to_string(), s.index))
        .collect()
}

fn config(world_size: usize, batch_size: Option<usize>) -> PlanConfig {
    PlanConfig {
        seed: 42,
        world_size,
        batch_size,
        pack_length: None,
        across_batches: false,
    }
}

/// Checks one full-epoch plan; returns the balance ratio.
fn check_epoch(index: &ShardIndex, plan: &EpochPlan) -> f64 {
    let w = plan.world_size;
    let mut seen: HashMap<Key, usize> = HashMap::new();
    for step in plan.steps() {
        assert_eq!(step.len(), w, "one batch per rank per step");
        for (rank, b) in step.iter().enumerate() {
            assert_eq!(b.rank, rank);
            assert!(b.samples.len() <= plan.batch_size);
            // No batch mixes modalities: synthetic sources are per modality.
            let sources: HashSet<&str> = b.samples.iter().map(|s| index.source_name(s)).collect();
            assert!(sources.len() <= 1, "batch mixes {sources:?}");
            if let Some(m) = b.modality {
                let want = if m == Modality::Image {
                    "synth_image"
                } else {
                    "synth_text"
                };
                assert!(sources.iter().all(|s| *s == want));
            } else {
                assert!(b.is_empty());
            }
            let tokens: u64 = b.samples.iter().map(|s| u64::from(s.length)).sum();
            assert_eq!(tokens, b.tokens);
            for k in keys(index, b) {
                *seen.entry(k).or_default() += 1;
            }
        }
    }
    assert_eq!(
        seen.keys().cloned().collect::<HashSet<_>>(),
        all_keys(index),
        "every sample is planned"
    );
    assert!(seen.values().all(|&n| n == 1), "no sample twice");
    for r in 0..w {
        assert_eq!(plan.rank(r).expect("rank").len(), plan.num_steps());
    }
    let bal = plan.balance();
    let max = *bal.rank_tokens.iter().max().expect("ranks");
    let min = *bal.rank_tokens.iter().min().expect("ranks");
    // The stated bound: the greedy assignment keeps the spread within one batch's tokens.
    assert!(
        max - min <= bal.max_batch_tokens,
        "spread {} > largest batch {} ({bal})",
        max - min,
        bal.max_batch_tokens
    );
    bal.ratio
}

#[test]
fn every_sample_once_pure_modality_balanced() {
    let dir = tempfile::tempdir().expect("tempdir");
    // 61 image + 37 text samples: groups of 12, short last groups and batches → leftovers.
    let index = dataset(dir.path(), 61, 37);
    for bs in [None, Some(2), Some(1), Some(8)] {
        for w in [1, 2, 3, 8] {
            let plan = EpochPlan::new(&index, &config(w, bs), &DataState::new(0)).expect("plan");
            check_epoch(&index, &plan);
            eprintln!("batch size {bs:?} world {w}: {}", plan.balance());
        }
    }
}

#[test]
fn token_balance_tightens_with_epoch_size() {
    // 900 samples: the spread bound (one batch) is small against a rank's total.
    let dir = tempfile::tempdir().expect("tempdir");
    let index = dataset(dir.path(), 600, 300);
    for w in [2, 3, 8] {
        let plan = EpochPlan::new(&index, &config(w, None), &DataState::new(1)).expect("plan");
        let ratio = check_epoch(&index, &plan);
        eprintln!("world {w}: {}", plan.balance());
        assert!(ratio < 1.05, "world {w}: max/min rank tokens {ratio}");
    }
}

#[test]
fn fewer_samples_than_ranks_gives_empty_batches() {
    let dir = tempfile::tempdir().expect("tempdir");
    let index = dataset(dir.path(), 3, 2);
    let plan = EpochPlan::new(&index, &config(8, None), &DataState::new(0)).expect("plan");
    check_epoch(&index, &plan);
    assert_eq!(plan.num_steps(), 1);
    let empty = plan.steps()[0].iter().filter(|b| b.is_empty()).count();
    assert_eq!(empty, 3);
    assert_eq!(plan.balance().empty_batches, 3);
}

#[test]
fn deterministic_per_seed_and_epoch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let index = dataset(dir.path(), 61, 37);
    let order = |seed: u64, epoch: u64| -> Vec<Vec<Key>> {
        let cfg = PlanConfig {
            seed,
            world_size: 2,
            batch_size: None,
            pack_length: None,
            across_batches: false,
        };
        EpochPlan::new(&index, &cfg, &DataState::new(epoch))
            .expect("plan")
            .steps()
            .iter()
            .flatten()
            .map(|b| keys(&index, b))
            .collect()
    };
    assert_eq!(order(42, 0), order(42, 0));
    assert_eq!(order(42, 3), order(42, 3));
    assert_ne!(order(42, 0), order(42, 1));
    assert_ne!(order(42, 0), order(43, 0));
    // A second index of the same files gives the same plan (no hidden state).
    let again = ShardIndex::open(dir.path(), &IndexOptions::default()).expect("index");
    let a = EpochPlan::new(&index, &config(3, None), &DataState::new(5)).expect("plan");
    let b = EpochPlan::new(&again, &config(3, None), &DataState::new(5)).expect("plan");
    assert_eq!(a.steps(), b.steps());
}

#[test]
fn resume_same_world_size_gives_the_same_batches() {
    let dir = tempfile::tempdir().expect("tempdir");
    let index = dataset(dir.path(), 61, 37);
    for w in [1, 3, 8] {
        let full = EpochPlan::new(&index, &config(w, None), &DataState::new(2)).expect("plan");
        for k in [1, full.num_steps() / 2, full.num_steps() - 1] {
            // Every rank saves the same next_state after step k - 1.
            let state = full.steps()[k - 1][0].next_state;
            assert!(full.steps()[k - 1].iter().all(|b| b.next_state == state));
            let json = serde_json::to_string(&state).expect("state to json");
            let state: DataState = serde_json::from_str(&json).expect("state from json");
            let resumed = EpochPlan::new(&index, &config(w, None), &state).expect("resume");
            assert_eq!(resumed.steps(), &full.steps()[k..], "world {w}, k {k}");
        }
        // After the last step the state is the start of the next epoch.
        let last = full.steps().last().expect("steps")[0].next_state;
        assert_eq!((last.epoch, last.position, last.step), (3, 0, 0));
    }
}

#[test]
fn resume_with_another_world_size_continues_without_repeats() {
    let dir = tempfile::tempdir().expect("tempdir");
    let index = dataset(dir.path(), 61, 37);
    for (w1, w2) in [(3, 2), (2, 8), (8, 1), (1, 3)] {
        let first = EpochPlan::new(&index, &config(w1, None), &DataState::new(0)).expect("plan");
        let k = first.num_steps() / 3;
        let done: Vec<Key> = first.steps()[..k]
            .iter()
            .flatten()
            .flat_map(|b| keys(&index, b))
            .collect();
        let state = first.steps()[k - 1][0].next_state;
        let rest = EpochPlan::new(&index, &config(w2, None), &state).expect("resume");
        let later: Vec<Key> = rest
            .steps()
            .iter()
            .flatten()
            .flat_map(|b| keys(&index, b))
            .collect();
        let mut union: HashSet<Key> = done.iter().cloned().collect();
        for key in &later {
            assert!(union.insert(key.clone()), "{key:?} repeated ({w1} -> {w2})");
        }
        assert_eq!(union, all_keys(&index), "{w1} -> {w2}: samples skipped");
        // The same global order: with world size 1 both runs list the epoch's batches in order.
        let single = EpochPlan::new(&index, &config(1, None), &DataState::new(0)).expect("plan");
        let single_batches: Vec<HashSet<Key>> = single
            .steps()
            .iter()
            .map(|s| keys(&index, &s[0]).into_iter().collect())
            .collect();
        let pos = state.position as usize;
        let rest_windows: Vec<HashSet<Key>> = rest
            .steps()
            .iter()
            .map(|s| s.iter().flat_map(|b| keys(&index, b)).collect())
            .collect();
        // Each full window of the resumed run is the next w2 global batches.
        for (i, window) in rest_windows.iter().enumerate() {
            let lo = pos + i * w2;
            let hi = (lo + w2).min(single_batches.len());
            let want: HashSet<Key> = single_batches[lo..hi].iter().flatten().cloned().collect();
            assert_eq!(window, &want, "{w1} -> {w2}: window {i}");
        }
    }
}

#[test]
fn unsupported_batch_size_and_bad_state_are_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let index = dataset(dir.path(), 10, 5);
    let err = EpochPlan::new(&index, &config(1, Some(3)), &DataState::new(0)).unwrap_err();
    assert!(
        matches!(
            err,
            DataError::BatchSize {
                requested: 3,
                built: 4
            }
        ),
        "{err}"
    );
    let full = EpochPlan::new(&index, &config(1, None), &DataState::new(0)).expect("plan");
    let state = full.steps()[0][0].next_state;
    let other_seed = PlanConfig {
        seed: 1,
        ..config(1, None)
    };
    let err = EpochPlan::new(&index, &other_seed, &state).unwrap_err();
    assert!(err.to_string().contains("seed"), "{err}");
    let err = EpochPlan::new(&index, &config(1, Some(2)), &state).unwrap_err();
    assert!(err.to_string().contains("batch size"), "{err}");
    assert!(full.rank(1).is_err());
}

#[test]
fn dry_run_json_lines() {
    let dir = tempfile::tempdir().expect("tempdir");
    let index = dataset(dir.path(), 10, 5);
    let plan = EpochPlan::new(&index, &config(2, None), &DataState::new(0)).expect("plan");
    let line = plan.rank(1).expect("rank")[0].to_json(&index);
    assert_eq!(line["rank"], 1);
    assert_eq!(line["step"], 0);
    assert!(line["samples"][0]["source"].is_string());
    assert!(line["samples"][0]["index"].is_u64());
    assert!(line["tokens"].as_u64().unwrap_or(0) > 0);
    assert!(["image", "text"].contains(&line["modality"].as_str().unwrap_or("")));
}

fn packed(world_size: usize, batch_size: Option<usize>, pack_length: u32) -> PlanConfig {
    PlanConfig {
        pack_length: Some(pack_length),
        across_batches: false,
        ..config(world_size, batch_size)
    }
}

fn longest_sample(index: &ShardIndex) -> u32 {
    index
        .samples
        .iter()
        .map(|s| s.length)
        .max()
        .expect("samples")
}

/// The rows of a packed batch: every sample of the batch exactly once, none over capacity.
fn check_rows(b: &PlannedBatch, capacity: u32) {
    let mut seen: Vec<usize> = b.rows.iter().flatten().copied().collect();
    seen.sort_unstable();
    assert_eq!(seen, (0..b.samples.len()).collect::<Vec<_>>());
    for row in &b.rows {
        let tokens: u32 = row.iter().map(|&i| b.samples[i].length).sum();
        assert!(tokens <= capacity, "row of {tokens} tokens > {capacity}");
    }
}

#[test]
fn packing_keeps_every_sample_once_at_any_world_size_and_resumes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let index = dataset(dir.path(), 61, 37);
    let longest = longest_sample(&index);
    for capacity in [longest, 3 * longest] {
        for w in [1, 2, 4] {
            let cfg = packed(w, Some(8), capacity);
            let plan = EpochPlan::new(&index, &cfg, &DataState::new(0)).expect("plan");
            // Packing lays out rows; which samples each rank gets is the unpacked plan's.
            check_epoch(&index, &plan);
            let plain = EpochPlan::new(&index, &config(w, Some(8)), &DataState::new(0))
                .expect("unpacked plan");
            let (mut rows, mut samples) = (0, 0);
            for (a, b) in plan
                .steps()
                .iter()
                .flatten()
                .zip(plain.steps().iter().flatten())
            {
                assert_eq!(a.samples, b.samples);
                check_rows(a, capacity);
                rows += a.rows.len();
                samples += a.samples.len();
            }
            if capacity > longest {
                assert!(
                    rows < samples,
                    "{rows} rows for {samples} samples at {capacity}"
                );
            }
            // Resume mid-epoch (same and other world size): the same remaining packs.
            let k = plan.num_steps() / 2;
            let state = plan.steps()[k - 1][0].next_state;
            let rest = EpochPlan::new(&index, &cfg, &state).expect("resume");
            assert_eq!(rest.steps(), &plan.steps()[k..], "world {w} resumed");
            for w2 in [1, 2, 4] {
                let rest = EpochPlan::new(&index, &packed(w2, Some(8), capacity), &state)
                    .expect("resume on another world size");
                let unpacked =
                    EpochPlan::new(&index, &config(w2, Some(8)), &state).expect("unpacked resume");
                for (a, b) in rest
                    .steps()
                    .iter()
                    .flatten()
                    .zip(unpacked.steps().iter().flatten())
                {
                    assert_eq!(a.samples, b.samples, "{w} -> {w2}");
                    check_rows(a, capacity);
                }
            }
        }
    }
}

#[test]
fn a_pack_length_below_the_longest_sample_is_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let index = dataset(dir.path(), 10, 5);
    let longest = longest_sample(&index);
    let err =
        EpochPlan::new(&index, &packed(1, None, longest - 1), &DataState::new(0)).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("pack length {}", longest - 1)),
        "{msg}"
    );
    assert!(msg.contains(&format!("({longest} tokens)")), "{msg}");
}
