//! The plan packing across batches (`pack_across_batches`): every sample once per epoch at any
//! world size, one modality per row (but the epoch's final pooled rows), rows within the pack length and mostly full, token balance
//! as the batch-wise plan's, determinism, and resumes (same and other world sizes) that
//! continue the same rows.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use llava_loader::synthetic::{write_synthetic, SynthSpec};
use llava_loader::{
    DataError, DataState, EpochPlan, IndexOptions, PlanConfig, PlannedBatch, ShardIndex,
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

fn across(world_size: usize, pack_length: u32) -> PlanConfig {
    PlanConfig {
        seed: 42,
        world_size,
        batch_size: None,
        pack_length: Some(pack_length),
        across_batches: true,
    }
}

fn longest(index: &ShardIndex) -> u32 {
    index
        .samples
        .iter()
        .map(|s| s.length)
        .max()
        .expect("samples")
}

type Key = (String, u64);

fn keys(index: &ShardIndex, b: &PlannedBatch) -> Vec<Key> {
    b.samples
        .iter()
        .map(|s| (index.source_name(s).to_string(), s.index))
        .collect()
}

/// Checks one rank-by-step list of batches: one row each, within capacity, one modality or
/// (`modality` None) really several.
fn check_batch(index: &ShardIndex, b: &PlannedBatch, capacity: u32) {
    if b.is_empty() {
        return;
    }
    assert_eq!(b.rows.len(), 1, "one row per micro-batch: {:?}", b.rows);
    let tokens: u64 = b.samples.iter().map(|s| u64::from(s.length)).sum();
    assert_eq!(tokens, b.tokens);
    assert!(tokens <= u64::from(capacity), "{tokens} > {capacity}");
    let modalities: Vec<_> = b
        .parts
        .iter()
        .map(|p| {
            let g = index.batches[p.batch].group;
            index
                .groups
                .iter()
                .find(|x| x.id == g)
                .expect("group")
                .modality
        })
        .collect();
    match b.modality {
        Some(m) => assert!(modalities.iter().all(|&x| x == m), "a row mixes modalities"),
        None => assert!(modalities.iter().any(|&x| x != modalities[0]), "not mixed"),
    }
}

fn count(index: &ShardIndex, steps: &[Vec<PlannedBatch>]) -> HashMap<Key, usize> {
    let mut seen = HashMap::new();
    for step in steps {
        for b in step {
            for k in keys(index, b) {
                *seen.entry(k).or_insert(0) += 1;
            }
        }
    }
    seen
}

#[test]
fn every_sample_once_one_row_per_micro_batch_balanced_and_full() {
    let dir = tempfile::tempdir().expect("tempdir");
    let index = dataset(dir.path(), 301, 157);
    let capacity = 6 * longest(&index);
    let all = index.samples.len();
    for w in [1, 2, 3, 8] {
        let plan = EpochPlan::new(&index, &across(w, capacity), &DataState::new(0)).expect("plan");
        let steps = plan.steps();
        assert_eq!(steps.len(), plan.num_steps());
        for step in &steps {
            assert_eq!(step.len(), w);
            for b in step {
                check_batch(&index, b, capacity);
            }
        }
        let seen = count(&index, &steps);
        assert_eq!(seen.len(), all, "world {w}: every sample is planned");
        assert!(seen.values().all(|&n| n == 1), "world {w}: a sample twice");
        let bal = plan.balance();
        let max = *bal.rank_tokens.iter().max().expect("ranks");
        let min = *bal.rank_tokens.iter().min().expect("ranks");
        assert!(max - min <= bal.max_batch_tokens, "world {w}: {bal}");
        assert!(bal.max_batch_tokens <= u64::from(capacity));
        // Fill: the rows (before the split leftovers of the last step) are nearly full.
        let rows = plan.total_batches;
        let tokens: u64 = index.samples.iter().map(|s| u64::from(s.length)).sum();
        let fill = tokens as f64 / (rows * u64::from(capacity)) as f64;
        assert!(fill > 0.9, "world {w}: fill {fill}");
        eprintln!("world {w}: {rows} rows, fill {fill:.4}; {bal}");
    }
}

#[test]
fn the_same_seed_gives_the_same_rows_another_seed_others() {
    let dir = tempfile::tempdir().expect("tempdir");
    let index = dataset(dir.path(), 61, 37);
    let capacity = 4 * longest(&index);
    let rows = |seed: u64, epoch: u64| -> Vec<Vec<Key>> {
        let cfg = PlanConfig {
            seed,
            ..across(2, capacity)
        };
        EpochPlan::new(&index, &cfg, &DataState::new(epoch))
            .expect("plan")
            .steps()
            .iter()
            .flatten()
            .map(|b| keys(&index, b))
            .collect()
    };
    assert_eq!(rows(42, 0), rows(42, 0));
    assert_ne!(rows(42, 0), rows(43, 0));
    assert_ne!(rows(42, 0), rows(42, 1));
}

#[test]
fn a_resume_continues_the_same_rows_at_any_world_size() {
    let dir = tempfile::tempdir().expect("tempdir");
    let index = dataset(dir.path(), 97, 61);
    let capacity = 4 * longest(&index);
    let full = EpochPlan::new(&index, &across(2, capacity), &DataState::new(0)).expect("plan");
    let steps = full.steps();
    let n = steps.len();
    assert!(n > 4, "{n} steps");
    for k in [1, n / 2, n - 1] {
        let state = steps[k - 1][0].next_state;
        assert_eq!(state.pack_across, capacity);
        // Same world size: the very same batches, rank by rank.
        let resumed = EpochPlan::new(&index, &across(2, capacity), &state).expect("resume");
        assert_eq!(
            resumed.steps(),
            steps[k..].to_vec(),
            "resume after step {k}"
        );
        // Other world sizes: the rest of the epoch exactly once, in the same rows.
        let before = count(&index, &steps[..k]);
        for w in [1, 3, 5] {
            let plan = EpochPlan::new(&index, &across(w, capacity), &state).expect("resume");
            let after = plan.steps();
            let mut seen = count(&index, &after);
            for (key, c) in &before {
                *seen.entry(key.clone()).or_insert(0) += c;
            }
            assert_eq!(seen.len(), index.samples.len(), "world {w} after step {k}");
            assert!(seen.values().all(|&c| c == 1), "world {w} after step {k}");
            if w == 1 {
                // One rank takes the remaining rows one by one: the same rows as the world-2
                // plan's full steps (its last step may split its leftovers otherwise).
                let got: Vec<Vec<Key>> = after.iter().flatten().map(|b| keys(&index, b)).collect();
                let full_steps: Vec<Vec<Key>> = steps[k..n - 1]
                    .iter()
                    .flatten()
                    .map(|b| keys(&index, b))
                    .collect();
                for row in &full_steps {
                    assert!(
                        got.contains(row),
                        "after step {k}: row {row:?} is not planned"
                    );
                }
                assert!(got.len() >= full_steps.len());
            }
        }
    }
}

#[test]
fn a_resume_must_keep_the_packing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let index = dataset(dir.path(), 61, 37);
    let capacity = 4 * longest(&index);
    let plan = EpochPlan::new(&index, &across(1, capacity), &DataState::new(0)).expect("plan");
    let state = plan.steps()[1][0].next_state;
    for other in [
        PlanConfig {
            across_batches: false,
            ..across(1, capacity)
        },
        across(1, capacity + 1),
    ] {
        let err = EpochPlan::new(&index, &other, &state).unwrap_err();
        assert!(matches!(err, DataError::Resume(_)), "{err}");
        assert!(err.to_string().contains("packed"), "{err}");
    }
    // At the start of an epoch anything goes.
    let next = DataState {
        pack_across: capacity,
        ..DataState::new(1)
    };
    EpochPlan::new(&index, &across(1, capacity + 1), &next).expect("a new epoch");
}

#[test]
fn a_pack_length_below_the_longest_sample_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let index = dataset(dir.path(), 13, 7);
    let err =
        EpochPlan::new(&index, &across(1, longest(&index) - 1), &DataState::new(0)).unwrap_err();
    assert!(err.to_string().contains("pack length"), "{err}");
}

#[test]
fn the_loader_reads_rows_that_span_batches_groups_and_shards() {
    use llava_loader::{Loader, LoaderConfig};
    let dir = tempfile::tempdir().expect("tempdir");
    let index = dataset(dir.path(), 61, 37);
    assert!(index.shards.len() > 2, "{} shards", index.shards.len());
    let capacity = 5 * longest(&index);
    let plan = EpochPlan::new(&index, &across(2, capacity), &DataState::new(0)).expect("plan");
    let (mut spanning, mut mixed) = (0, 0);
    for rank in 0..2 {
        let planned = plan.rank(rank).expect("rank");
        spanning += planned
            .iter()
            .filter(|b| {
                let shards: std::collections::HashSet<usize> = b
                    .parts
                    .iter()
                    .map(|p| index.batches[p.batch].shard)
                    .collect();
                shards.len() > 1
            })
            .count();
        let config = LoaderConfig {
            workers: 2,
            prefetch: 3,
            ..LoaderConfig::default()
        };
        let loader = Loader::new(index.clone(), planned.clone(), &config).expect("loader");
        let batches: Vec<_> = loader.map(|b| b.expect("batch")).collect();
        assert_eq!(batches.len(), planned.len());
        for (b, p) in batches.iter().zip(&planned) {
            let got: Vec<Key> = b
                .samples
                .iter()
                .map(|s| (s.source.clone(), s.index))
                .collect();
            assert_eq!(got, keys(&index, p), "step {}", p.step);
            let lengths: Vec<u32> = p.samples.iter().map(|s| s.length).collect();
            assert_eq!(b.model_lengths, lengths);
            assert_eq!(b.tokens, p.tokens);
            assert_eq!(b.rows, p.rows);
            assert_eq!(b.num_rows(), usize::from(!p.is_empty()));
            assert_eq!(b.input_ids.len(), b.seq_len * b.num_rows());
            assert_eq!(b.modality, p.modality);
            if p.modality.is_none() && !p.is_empty() {
                mixed += 1;
            }
            // Each sample's images (a row may mix image and text samples): one placeholder each,
            // in the sample's own segment of its row.
            for (r, (row, segs)) in b.rows.iter().zip(&b.segments).enumerate() {
                let mut at = r * b.seq_len;
                for (&sample, &n) in row.iter().zip(segs) {
                    let placeholders = b.input_ids[at..at + n]
                        .iter()
                        .filter(|&&t| t == llava_formats::constants::IMAGE_TOKEN_INDEX)
                        .count();
                    let images = b.images.iter().filter(|m| m.sample == sample).count();
                    assert_eq!(placeholders, images, "step {} sample {sample}", p.step);
                    assert!(b
                        .images
                        .iter()
                        .filter(|m| m.sample == sample)
                        .all(|m| m.row == r));
                    at += n;
                }
            }
        }
    }
    assert!(
        mixed > 0,
        "no row mixes modalities: the test does not test that"
    );
    assert!(
        spanning > 0,
        "no row spans two shards: the test does not test that"
    );
}
