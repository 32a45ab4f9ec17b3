//! The epoch plan against a reference: the eager construction the plan had before it was made
//! lazy (every step's batches built up front, commit f03da19), kept here verbatim in substance.
//! Whatever the plan does internally, its batches, order, rank assignment, packing, leftover
//! split and next states must stay the reference's, for every seed, world size, batch size and
//! resume point below.

use std::cmp::Reverse;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use llava_formats::packing;
use llava_loader::rng::{shuffle, SplitMix64};
use llava_loader::synthetic::{write_synthetic, SynthSpec};
use llava_loader::{
    DataState, EpochPlan, IndexOptions, PlanConfig, PlannedBatch, RowSlice, ShardIndex,
};

#[derive(Clone)]
struct Unit {
    group: usize,
    parts: Vec<RowSlice>,
    samples: usize,
    tokens: u64,
}

impl Unit {
    fn new(index: &ShardIndex, group: usize, parts: Vec<RowSlice>) -> Self {
        let (mut samples, mut tokens) = (0, 0);
        for p in &parts {
            let base = index.batches[p.batch].samples.start;
            samples += p.rows.len();
            tokens += index.samples[base + p.rows.start..base + p.rows.end]
                .iter()
                .map(|s| u64::from(s.length))
                .sum::<u64>();
        }
        Self {
            group,
            parts,
            samples,
            tokens,
        }
    }

    fn slice(&self, index: &ShardIndex, range: Range<usize>) -> Self {
        let mut parts = Vec::new();
        let mut offset = 0;
        for p in &self.parts {
            let (lo, hi) = (offset, offset + p.rows.len());
            offset = hi;
            let (start, end) = (range.start.max(lo), range.end.min(hi));
            if start < end {
                parts.push(RowSlice {
                    batch: p.batch,
                    rows: p.rows.start + (start - lo)..p.rows.start + (end - lo),
                });
            }
        }
        Self::new(index, self.group, parts)
    }
}

fn global_units(index: &ShardIndex, seed: u64, epoch: u64, batch_size: usize) -> Vec<Unit> {
    let built = index.built_batch_size();
    let mut order: Vec<usize> = (0..index.groups.len()).collect();
    shuffle(&mut order, &mut SplitMix64::for_epoch(seed, epoch));
    let mut units = Vec::new();
    for g in order {
        let rgs = index.groups[g].batches.clone();
        if batch_size <= built {
            for rg in rgs {
                let n = index.batches[rg].samples.len();
                for start in (0..n).step_by(batch_size) {
                    let rows = start..(start + batch_size).min(n);
                    units.push(Unit::new(index, g, vec![RowSlice { batch: rg, rows }]));
                }
            }
        } else {
            let rgs: Vec<usize> = rgs.collect();
            for chunk in rgs.chunks(batch_size / built) {
                let parts = chunk
                    .iter()
                    .map(|&rg| RowSlice {
                        batch: rg,
                        rows: 0..index.batches[rg].samples.len(),
                    })
                    .collect();
                units.push(Unit::new(index, g, parts));
            }
        }
    }
    units
}

fn assign(items: Vec<Option<Unit>>, cumulative: &mut [u64]) -> Vec<Option<Unit>> {
    let tokens = |u: &Option<Unit>| u.as_ref().map_or(0, |u| u.tokens);
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.sort_by_key(|&i| (Reverse(tokens(&items[i])), i));
    let mut ranks: Vec<usize> = (0..cumulative.len()).collect();
    ranks.sort_by_key(|&r| (cumulative[r], r));
    let mut items: Vec<Option<Option<Unit>>> = items.into_iter().map(Some).collect();
    let mut out: Vec<Option<Unit>> = vec![None; cumulative.len()];
    for (&item, &rank) in order.iter().zip(&ranks) {
        let unit = items[item].take().flatten();
        cumulative[rank] += tokens(&unit);
        out[rank] = unit;
    }
    out
}

fn split_leftovers(index: &ShardIndex, units: &[Unit], world_size: usize) -> Vec<Option<Unit>> {
    let total: usize = units.iter().map(|u| u.samples).sum();
    if total < world_size {
        let mut pieces: Vec<Option<Unit>> = units
            .iter()
            .flat_map(|u| (0..u.samples).map(move |i| Some(u.slice(index, i..i + 1))))
            .collect();
        pieces.resize(world_size, None);
        return pieces;
    }
    let mut k = vec![1usize; units.len()];
    for _ in units.len()..world_size {
        let mut best: Option<usize> = None;
        for (i, u) in units.iter().enumerate() {
            if k[i] >= u.samples {
                continue;
            }
            best = match best {
                Some(b) if units[b].samples * k[i] >= u.samples * k[b] => Some(b),
                _ => Some(i),
            };
        }
        match best {
            Some(b) => k[b] += 1,
            None => break,
        }
    }
    let mut pieces = Vec::with_capacity(world_size);
    for (u, &k) in units.iter().zip(&k) {
        let (base, extra) = (u.samples / k, u.samples % k);
        let mut start = 0;
        for j in 0..k {
            let len = base + usize::from(j < extra);
            pieces.push(Some(u.slice(index, start..start + len)));
            start += len;
        }
    }
    pieces
}

/// The reference plan: every remaining step, `steps[i][rank]` (valid states only).
fn reference(index: &ShardIndex, config: &PlanConfig, state: &DataState) -> Vec<Vec<PlannedBatch>> {
    let w = config.world_size;
    let batch_size = config.batch_size.unwrap_or(index.built_batch_size());
    let units = global_units(index, config.seed, state.epoch, batch_size);
    let mid_epoch = state.position > 0;
    let (anchor, anchor_step) = if mid_epoch && state.world_size == w {
        (state.anchor, state.anchor_step)
    } else {
        (state.position, state.step)
    };
    let skip = ((state.position - anchor) / w as u64) as usize;
    let mut cumulative = vec![0u64; w];
    let mut raw_steps = Vec::new();
    let rest = &units[anchor as usize..];
    let full = rest.len() / w;
    for window in rest[..full * w].chunks(w) {
        raw_steps.push(assign(
            window.iter().cloned().map(Some).collect(),
            &mut cumulative,
        ));
    }
    let leftover = &rest[full * w..];
    if !leftover.is_empty() {
        raw_steps.push(assign(split_leftovers(index, leftover, w), &mut cumulative));
    }
    let num_steps = raw_steps.len();
    let mut steps = Vec::new();
    for (k, step_units) in raw_steps.into_iter().enumerate().skip(skip) {
        let next_state = if k + 1 == num_steps {
            DataState {
                world_size: w,
                batch_size,
                seed: config.seed,
                ..DataState::new(state.epoch + 1)
            }
        } else {
            DataState {
                epoch: state.epoch,
                position: anchor + ((k + 1) * w) as u64,
                step: anchor_step + k as u64 + 1,
                anchor,
                anchor_step,
                world_size: w,
                batch_size,
                seed: config.seed,
                pack_across: 0,
            }
        };
        let step = anchor_step + k as u64;
        let batches = step_units
            .into_iter()
            .enumerate()
            .map(|(rank, unit)| planned(index, unit, state.epoch, step, rank, next_state, config))
            .collect();
        steps.push(batches);
    }
    steps
}

fn planned(
    index: &ShardIndex,
    unit: Option<Unit>,
    epoch: u64,
    step: u64,
    rank: usize,
    next_state: DataState,
    config: &PlanConfig,
) -> PlannedBatch {
    let (modality, parts, samples, tokens) = match unit {
        None => (None, Vec::new(), Vec::new(), 0),
        Some(unit) => {
            let samples: Vec<_> = unit
                .parts
                .iter()
                .flat_map(|p| {
                    let base = index.batches[p.batch].samples.start;
                    index.samples[base + p.rows.start..base + p.rows.end]
                        .iter()
                        .copied()
                })
                .collect();
            let modality = Some(index.groups[unit.group].modality);
            (modality, unit.parts, samples, unit.tokens)
        }
    };
    let rows = match config.pack_length {
        None => packing::one_per_row(samples.len()),
        Some(capacity) => {
            let lengths: Vec<u32> = samples.iter().map(|s| s.length).collect();
            packing::pack(&lengths, capacity).expect("every sample fits")
        }
    };
    PlannedBatch {
        epoch,
        step,
        rank,
        modality,
        parts,
        samples,
        rows,
        tokens,
        next_state,
    }
}

fn dataset(dir: &Path, image: usize, text: usize, group_size: usize) -> Arc<ShardIndex> {
    let spec = SynthSpec {
        image_samples: image,
        text_samples: text,
        batch_size: 4,
        group_size,
        groups_per_shard: 2,
        tile_size: 8,
        ..SynthSpec::default()
    };
    write_synthetic(dir, &spec).expect("write synthetic shards");
    ShardIndex::open(dir, &IndexOptions::default()).expect("open index")
}

/// One configuration against the reference: from the start of the epoch, then resumed after
/// several steps with the same and with other world sizes.
fn check(index: &Arc<ShardIndex>, config: &PlanConfig, epoch: u64) {
    let what = format!("{config:?} epoch {epoch}");
    let start = DataState::new(epoch);
    let plan = EpochPlan::new(index, config, &start).expect("plan");
    let want = reference(index, config, &start);
    assert_eq!(plan.num_steps(), want.len(), "{what}");
    assert_eq!(plan.steps(), want, "{what}");
    for rank in 0..config.world_size {
        let mine: Vec<PlannedBatch> = want.iter().map(|s| s[rank].clone()).collect();
        assert_eq!(plan.rank(rank).expect("rank"), mine, "{what} rank {rank}");
        // What the loader takes: the same batches, made one step at a time.
        let lazy = plan.rank_batches(index, rank).expect("rank batches");
        assert_eq!(lazy.len(), mine.len(), "{what} rank {rank}");
        assert_eq!(lazy.collect::<Vec<_>>(), mine, "{what} rank {rank}");
    }
    let n = want.len();
    for k in [1, 2, n / 3, n / 2, n.saturating_sub(1)] {
        if k == 0 || k >= n {
            continue;
        }
        let state = want[k - 1][0].next_state;
        for w2 in [config.world_size, 1, 2, 3, 5] {
            let resumed_config = PlanConfig {
                world_size: w2,
                ..config.clone()
            };
            let resumed = EpochPlan::new(index, &resumed_config, &state).expect("resume");
            let want = reference(index, &resumed_config, &state);
            assert_eq!(
                resumed.num_steps(),
                want.len(),
                "{what} k {k} -> world {w2}"
            );
            assert_eq!(resumed.steps(), want, "{what} k {k} -> world {w2}");
            // A second resume inside the resumed run (anchors of another world size).
            if want.len() > 2 {
                let again = want[want.len() / 2][0].next_state;
                let plan = EpochPlan::new(index, &resumed_config, &again).expect("resume again");
                let want = reference(index, &resumed_config, &again);
                assert_eq!(plan.steps(), want, "{what} k {k} -> world {w2}, again");
            }
        }
    }
}

#[test]
fn the_plan_equals_the_eager_reference() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Short groups and batches (61 + 37 samples in groups of 12, 23 + 6 in groups of 7), so leftover steps,
    // split batches and empty batches all occur.
    let index = dataset(dir.path(), 61, 37, 12);
    let small = tempfile::tempdir().expect("tempdir");
    let odd = dataset(small.path(), 23, 6, 7);
    for (index, seeds) in [(&index, [42u64, 7]), (&odd, [1, 99])] {
        let longest = index
            .samples
            .iter()
            .map(|s| s.length)
            .max()
            .expect("samples");
        for seed in seeds {
            for batch_size in [None, Some(1), Some(2), Some(8), Some(12)] {
                for world_size in [1, 2, 3, 8, 40] {
                    for pack_length in [None, Some(2 * longest)] {
                        let config = PlanConfig {
                            seed,
                            world_size,
                            batch_size,
                            pack_length,
                            across_batches: false,
                        };
                        for epoch in [0, 3] {
                            check(index, &config, epoch);
                        }
                    }
                }
            }
        }
    }
    // rank_batches shares the index the plan was made from, and only that one.
    let again = ShardIndex::open(dir.path(), &IndexOptions::default()).expect("index");
    let config = PlanConfig {
        seed: 1,
        world_size: 2,
        batch_size: None,
        pack_length: None,
        across_batches: false,
    };
    let plan = EpochPlan::new(&index, &config, &DataState::new(0)).expect("plan");
    assert!(plan.rank_batches(&again, 0).is_err());
    assert!(plan.rank_batches(&index, 2).is_err());
}
