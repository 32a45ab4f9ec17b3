//! The epoch plan: which samples each rank trains on at each step. A pure function of (shard
//! index, seed, epoch, world size, batch size) plus the resume state, so every rank computes the
//! same plan without talking to the others.
//!
//! Global order (independent of the world size): the groups are shuffled with a seeded
//! (seed, epoch) RNG; each group contributes its batches in order (a group is one modality and
//! sorted by length, so neighbouring batches have similar lengths and never mix modalities).
//! Step `s` of a run takes the next `world_size` global batches (a *window*) and gives one to
//! each rank: the window's batches, largest token count first, go to the ranks with the smallest
//! cumulative token count so far (ties: lower rank). That keeps every rank's token total within
//! one batch's tokens of every other rank's over the whole epoch (see [`Balance`]).
//!
//! Leftovers: when fewer than `world_size` global batches remain at the end of an epoch, their
//! samples are split (contiguously, never across batches, so never across modalities) into
//! exactly `world_size` smaller batches, each rank getting one, so that all ranks take the same
//! number of steps and every sample is seen exactly once. When fewer samples than ranks remain,
//! each remaining sample is its own batch and the other ranks get an **empty batch** (no
//! samples): the trainer must still take the step (zero loss, zero gradient contribution) so
//! that collective operations stay in lock-step.
//!
//! Packing (`pack_length`): each planned batch's samples are laid out in rows of at most
//! `pack_length` tokens by balanced first-fit decreasing ([`llava_formats::packing`]); which samples a
//! rank trains on at each step does not change, so balance, resume and world-size changes work
//! exactly as without packing, and packing may be switched on or off when resuming.
//!
//! Packing across batches (`pack_length` with `across_batches`): the units are no longer
//! batches but rows of at most `pack_length` tokens, one per micro-batch, filled from the
//! following samples of the same modality across batch and group boundaries
//! ([`llava_formats::pack_stream`], in [`pack_across`](super::pack_across)). Windows, balance,
//! leftovers and resume work on these units as on batches; [`DataState::position`] then counts
//! rows and [`DataState::pack_across`] records the pack length, so a resume mid-epoch must use
//! the same packing (at any world size).
//!
//! Memory: the plan keeps the epoch's group order (4 bytes per group) and a cursor, never the
//! batches: a step's [`PlannedBatch`]es are made when the step is reached, in order (a step's
//! rank assignment depends on the token totals of the steps before it). A rank's loader holds
//! [`RankBatches`], which makes every rank's units of a step but only its own batch. Measured
//! (`llava-trainer loader-bench --plan-memory`, 1M samples in groups of 32): 0.125 bytes per
//! sample, against 104 for every step made at once (what the plan held when it was eager) and 98
//! for one rank's batches as a `Vec` at world size 1 (what the loader held besides).
//!
//! Resuming: [`DataState`] records the position in the global order. Resuming with the same
//! world size replays the same windows (and the same rank assignment); resuming with another
//! world size starts new windows at the saved position, so the remaining global order is the
//! same and no sample is repeated or skipped.

use std::cmp::Reverse;
use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::error::{DataError, DataResult};
use super::index::{Modality, SampleRef, ShardIndex};
use super::pack_across::RowUnits;
use llava_formats::pack_stream::epoch_group_order;
use llava_formats::packing;

/// What the plan depends on besides the shards and the resume state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanConfig {
    pub seed: u64,
    pub world_size: usize,
    /// Per-device batch size; `None` = the size the shards were built with. Other values must
    /// divide it (built batches are split) or be a multiple of it (consecutive batches of one
    /// group are merged).
    pub batch_size: Option<usize>,
    /// Pack each batch's samples into rows of at most this many tokens; `None`: one sample per
    /// row.
    pub pack_length: Option<u32>,
    /// With `pack_length`: fill rows across batch boundaries instead, one row per micro-batch
    /// ([`llava_formats::pack_stream`]; see the module doc).
    pub across_batches: bool,
}

impl PlanConfig {
    /// `pack_length` as `llava-trainer run` sets it from its `packing`, `pack_across_batches`
    /// and `pack_length` keys (the Python package and `loader-bench` take the same): with
    /// either packing on, the given row length or else the shards' `model_max_length`; with
    /// neither, `None`.
    pub fn packing_length(
        index: &ShardIndex,
        packing: bool,
        across_batches: bool,
        pack_length: Option<u32>,
    ) -> Option<u32> {
        (packing || across_batches)
            .then(|| pack_length.unwrap_or(index.manifest.settings.model_max_length as u32))
    }

    /// The row capacity when packing across batches (the unit of [`DataState::position`]).
    fn pack_across(&self) -> u32 {
        match self.pack_length {
            Some(n) if self.across_batches => n,
            _ => 0,
        }
    }
}

/// Where a run is in the data: save it with each checkpoint (it is serde-serialisable), and
/// pass it back to [`EpochPlan::new`] to resume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DataState {
    pub epoch: u64,
    /// Global batches of this epoch consumed by all ranks together.
    pub position: u64,
    /// Steps of this epoch taken.
    pub step: u64,
    /// Position and step where the windows of the current world size start.
    pub anchor: u64,
    pub anchor_step: u64,
    /// The plan parameters that produced this state (0 world size = fresh state).
    pub world_size: usize,
    pub batch_size: usize,
    pub seed: u64,
    /// Row capacity when the plan packs across batches (then `position` counts rows); 0: it
    /// counts batches. Absent in older checkpoints (0).
    #[serde(default)]
    pub pack_across: u32,
}

impl DataState {
    /// The start of `epoch`.
    pub fn new(epoch: u64) -> Self {
        Self {
            epoch,
            ..Self::default()
        }
    }
}

/// A contiguous row range of one built batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowSlice {
    /// Index into [`ShardIndex::batches`].
    pub batch: usize,
    /// Rows inside that batch.
    pub rows: Range<usize>,
}

/// One rank's batch at one step, before reading.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedBatch {
    pub epoch: u64,
    pub step: u64,
    pub rank: usize,
    /// The samples' one modality; `None` for an empty batch (see the module doc) or a row that
    /// mixes modalities (only the epoch's final rows when packing across batches).
    pub modality: Option<Modality>,
    /// Consecutive built batches of one shard, in order; empty for an empty batch.
    pub parts: Vec<RowSlice>,
    pub samples: Vec<SampleRef>,
    /// The model's rows: indices into `samples`, each row's samples back to back in order
    /// (one sample per row without packing).
    pub rows: Vec<Vec<usize>>,
    /// Exact tokens (sum of the samples' lengths).
    pub tokens: u64,
    /// The state after this step: save it with a checkpoint taken after this batch.
    pub next_state: DataState,
}

impl PlannedBatch {
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// One `--dry-run` line.
    pub fn to_json(&self, index: &ShardIndex) -> serde_json::Value {
        serde_json::json!({
            "step": self.step,
            "rank": self.rank,
            "samples": self.samples.iter().map(|s| serde_json::json!({
                "source": index.source_name(s),
                "index": s.index,
            })).collect::<Vec<_>>(),
            // null for an empty batch, "mixed" for a final pooled row of several modalities.
            "modality": match self.modality {
                Some(m) => Some(m.as_str()),
                None if self.is_empty() => None,
                None => Some("mixed"),
            },
            "rows": self.rows,
            "tokens": self.tokens,
        })
    }
}

/// Per-device batch size actually used: `requested` if it divides or is a multiple of `built`.
pub fn effective_batch_size(built: usize, requested: Option<usize>) -> DataResult<usize> {
    match requested {
        None => Ok(built),
        Some(r) if r > 0 && (built.is_multiple_of(r) || r.is_multiple_of(built)) => Ok(r),
        Some(r) => Err(DataError::BatchSize {
            requested: r,
            built,
        }),
    }
}

/// A global batch before it is given to a rank.
#[derive(Debug, Clone)]
pub(super) struct Unit {
    group: usize,
    parts: Vec<RowSlice>,
    samples: usize,
    tokens: u64,
}

impl Unit {
    pub(super) fn new(index: &ShardIndex, group: usize, parts: Vec<RowSlice>) -> Self {
        let mut samples = 0;
        let mut tokens = 0;
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

    /// The samples `range` (in row order across parts) as a unit of their own.
    fn slice(&self, index: &ShardIndex, range: Range<usize>) -> Self {
        let mut parts = Vec::new();
        let mut offset = 0;
        for p in &self.parts {
            let (lo, hi) = (offset, offset + p.rows.len());
            offset = hi;
            let start = range.start.max(lo);
            let end = range.end.min(hi);
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

/// The number of global batches group `g` gives at `batch_size` (see [`Units::next`]).
fn units_in_group(index: &ShardIndex, g: usize, batch_size: usize) -> u64 {
    let built = index.built_batch_size();
    let batches = index.groups[g].batches.clone();
    if batch_size <= built {
        batches
            .map(|b| index.batches[b].samples.len().div_ceil(batch_size) as u64)
            .sum()
    } else {
        batches.len().div_ceil(batch_size / built) as u64
    }
}

/// The epoch's units in order: built batches (or slices / merges of them), or rows packed
/// across batches ([`RowUnits`]).
#[derive(Debug, Clone)]
enum Units {
    Batches(BatchUnits),
    Rows(RowUnits),
}

impl Units {
    fn new(
        index: &ShardIndex,
        seed: u64,
        epoch: u64,
        batch_size: usize,
        pack_across: u32,
    ) -> DataResult<Self> {
        Ok(match pack_across {
            0 => Self::Batches(BatchUnits::new(index, seed, epoch, batch_size)),
            n => Self::Rows(RowUnits::new(index, seed, epoch, n)?),
        })
    }

    fn total(&self, index: &ShardIndex) -> u64 {
        match self {
            Self::Batches(u) => u.total(index),
            Self::Rows(u) => u.total(),
        }
    }

    fn next(&mut self, index: &ShardIndex) -> Option<Unit> {
        match self {
            Self::Batches(u) => u.next(index),
            Self::Rows(u) => u.next(index),
        }
    }

    fn skip(&mut self, index: &ShardIndex, n: u64) {
        match self {
            Self::Batches(u) => u.skip(index, n),
            Self::Rows(u) => {
                for _ in 0..n {
                    if u.next(index).is_none() {
                        return;
                    }
                }
            }
        }
    }
}

/// The epoch's global batches in order, made one at a time: the groups in their seeded
/// (seed, epoch) order, each contributing its batches in order. It keeps the group order only
/// (4 bytes per group, shared by clones), so a plan costs no memory per sample.
#[derive(Debug, Clone)]
struct BatchUnits {
    order: Arc<[u32]>,
    batch_size: usize,
    built: usize,
    /// The next unit: position in `order`, then built batch (offset in the group's batches)
    /// and row inside it.
    group: usize,
    batch: usize,
    row: usize,
}

impl BatchUnits {
    fn new(index: &ShardIndex, seed: u64, epoch: u64, batch_size: usize) -> Self {
        let order = epoch_group_order(index.groups.len(), seed, epoch);
        Self {
            order: order.into(),
            batch_size,
            built: index.built_batch_size(),
            group: 0,
            batch: 0,
            row: 0,
        }
    }

    /// Units of the whole epoch.
    fn total(&self, index: &ShardIndex) -> u64 {
        (0..index.groups.len())
            .map(|g| units_in_group(index, g, self.batch_size))
            .sum()
    }

    /// The next unit: a slice of `batch_size` rows of one built batch (the last may be short)
    /// when `batch_size` divides the built size, else `batch_size / built` consecutive built
    /// batches of one group.
    fn next(&mut self, index: &ShardIndex) -> Option<Unit> {
        loop {
            let g = *self.order.get(self.group)? as usize;
            let batches = index.groups[g].batches.clone();
            if self.batch < batches.len() {
                let first = batches.start + self.batch;
                if self.batch_size <= self.built {
                    let n = index.batches[first].samples.len();
                    let rows = self.row..(self.row + self.batch_size).min(n);
                    self.row = rows.end;
                    if self.row >= n {
                        self.batch += 1;
                        self.row = 0;
                    }
                    if !rows.is_empty() {
                        return Some(Unit::new(index, g, vec![RowSlice { batch: first, rows }]));
                    }
                    continue;
                }
                let end = (self.batch + self.batch_size / self.built).min(batches.len());
                let parts = (batches.start + self.batch..batches.start + end)
                    .map(|rg| RowSlice {
                        batch: rg,
                        rows: 0..index.batches[rg].samples.len(),
                    })
                    .collect();
                self.batch = end;
                return Some(Unit::new(index, g, parts));
            }
            self.group += 1;
            self.batch = 0;
            self.row = 0;
        }
    }

    /// Passes over `n` units (whole groups at once where it can).
    fn skip(&mut self, index: &ShardIndex, mut n: u64) {
        while n > 0 {
            if self.batch == 0 && self.row == 0 {
                let Some(&g) = self.order.get(self.group) else {
                    return;
                };
                let whole = units_in_group(index, g as usize, self.batch_size);
                if whole <= n {
                    n -= whole;
                    self.group += 1;
                    continue;
                }
            }
            if self.next(index).is_none() {
                return;
            }
            n -= 1;
        }
    }
}

/// Gives one item to each rank: largest tokens first to the rank with the smallest running total.
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

/// Splits the final `< world_size` batches into exactly `world_size` pieces (see module doc).
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
    // Pieces per unit: start at one each, then repeatedly split the unit with the most samples
    // per piece (ties: earlier unit) until there are `world_size` pieces.
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
            None => break, // unreachable: total >= world_size
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

/// Token balance across ranks over the steps a plan delivers; log it at the start of an epoch.
#[derive(Debug, Clone, PartialEq)]
pub struct Balance {
    pub rank_tokens: Vec<u64>,
    pub rank_samples: Vec<u64>,
    /// max / min of `rank_tokens` (1 when all are equal, infinite when some rank has none).
    pub ratio: f64,
    /// The bound the assignment guarantees from a plan's anchor: max − min ≤ this.
    pub max_batch_tokens: u64,
    /// Mean and worst max/min of the batches' tokens within one step (full steps only).
    pub mean_step_ratio: f64,
    pub worst_step_ratio: f64,
    pub empty_batches: usize,
}

impl fmt::Display for Balance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let max = self.rank_tokens.iter().max().copied().unwrap_or(0);
        let min = self.rank_tokens.iter().min().copied().unwrap_or(0);
        write!(
            f,
            "rank tokens max/min = {:.4} ({max}/{min}, bound: spread <= {} = largest batch); \
             per-step max/min mean {:.3}, worst {:.3}; {} empty batches",
            self.ratio,
            self.max_batch_tokens,
            self.mean_step_ratio,
            self.worst_step_ratio,
            self.empty_batches
        )
    }
}

fn ratio(values: impl Iterator<Item = u64> + Clone) -> f64 {
    let max = values.clone().max().unwrap_or(0);
    let min = values.min().unwrap_or(0);
    match (max, min) {
        (0, _) => 1.0,
        (_, 0) => f64::INFINITY,
        _ => max as f64 / min as f64,
    }
}

/// What every step of a plan shares: enough to give a step its number and next state.
#[derive(Debug, Clone, Copy)]
struct Frame {
    epoch: u64,
    world_size: usize,
    batch_size: usize,
    seed: u64,
    anchor: u64,
    anchor_step: u64,
    /// Steps from the anchor to the end of the epoch.
    steps: usize,
    pack_length: Option<u32>,
    pack_across: u32,
}

impl Frame {
    /// The state after step `k` (counted from the anchor).
    fn next_state(&self, k: usize) -> DataState {
        if k + 1 == self.steps {
            return DataState {
                world_size: self.world_size,
                batch_size: self.batch_size,
                seed: self.seed,
                pack_across: self.pack_across,
                ..DataState::new(self.epoch + 1)
            };
        }
        DataState {
            epoch: self.epoch,
            position: self.anchor + ((k + 1) * self.world_size) as u64,
            step: self.anchor_step + k as u64 + 1,
            anchor: self.anchor,
            anchor_step: self.anchor_step,
            world_size: self.world_size,
            batch_size: self.batch_size,
            seed: self.seed,
            pack_across: self.pack_across,
        }
    }

    /// Rank `rank`'s batch of step `k` (counted from the anchor).
    fn batch(&self, index: &ShardIndex, unit: Option<Unit>, k: usize, rank: usize) -> PlannedBatch {
        let step = self.anchor_step + k as u64;
        let mut b = planned(index, unit, self.epoch, step, rank, self.next_state(k));
        b.rows = pack_rows(&b.samples, self.pack_length);
        b
    }
}

/// Where a plan is: the next unit and every rank's token total since the anchor (the
/// assignment of a step depends on all the steps before it, so steps are made in order).
#[derive(Debug, Clone)]
struct Cursor {
    units: Units,
    /// Units of the epoch not taken yet.
    left: u64,
    cumulative: Vec<u64>,
    /// The next step, counted from the anchor.
    k: usize,
}

impl Cursor {
    /// The next step's number (from the anchor) and its units, one per rank (`None`: an empty
    /// batch): a full window of `world_size` units, or the split leftovers at the end.
    fn next_step(&mut self, index: &ShardIndex) -> Option<(usize, Vec<Option<Unit>>)> {
        if self.left == 0 {
            return None;
        }
        let w = self.cumulative.len();
        let take = self.left.min(w as u64) as usize;
        let units: Vec<Unit> = (0..take).map_while(|_| self.units.next(index)).collect();
        self.left -= take as u64;
        let items = if take == w {
            units.into_iter().map(Some).collect()
        } else {
            split_leftovers(index, &units, w)
        };
        let k = self.k;
        self.k += 1;
        Some((k, assign(items, &mut self.cumulative)))
    }
}

/// The rest of one epoch, for all ranks. It holds the epoch's group order and a cursor, not the
/// batches: each step's [`PlannedBatch`]es are made when asked for ([`EpochPlan::iter`],
/// [`EpochPlan::rank_batches`]), so the plan's memory does not grow with the samples (4 bytes
/// per group, 8 per rank).
#[derive(Clone)]
pub struct EpochPlan<'a> {
    pub epoch: u64,
    pub world_size: usize,
    pub batch_size: usize,
    /// Global batches in the epoch (at `batch_size`).
    pub total_batches: u64,
    index: &'a ShardIndex,
    frame: Frame,
    /// At the first remaining step.
    start: Cursor,
    num_steps: usize,
    /// Whether the last step holds split leftovers.
    leftover_step: bool,
}

impl fmt::Debug for EpochPlan<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EpochPlan")
            .field("epoch", &self.epoch)
            .field("world_size", &self.world_size)
            .field("batch_size", &self.batch_size)
            .field("total_batches", &self.total_batches)
            .field("num_steps", &self.num_steps)
            .field("leftover_step", &self.leftover_step)
            .finish_non_exhaustive()
    }
}

impl<'a> EpochPlan<'a> {
    /// The plan from `state` (use [`DataState::new`] for the start of an epoch).
    pub fn new(index: &'a ShardIndex, config: &PlanConfig, state: &DataState) -> DataResult<Self> {
        let w = config.world_size;
        if w == 0 {
            return Err(DataError::Plan("world size must be at least 1".into()));
        }
        let batch_size = effective_batch_size(index.built_batch_size(), config.batch_size)?;
        if let Some(capacity) = config.pack_length {
            check_pack_length(index, capacity)?;
        }
        let mid_epoch = state.position > 0;
        if mid_epoch && state.seed != config.seed {
            return Err(DataError::Resume(format!(
                "the saved state used seed {}, this run uses {}; the data order would change",
                state.seed, config.seed
            )));
        }
        if mid_epoch && state.batch_size != batch_size {
            return Err(DataError::Resume(format!(
                "the saved state used batch size {}, this run uses {batch_size}; finish the epoch \
                 with the old batch size",
                state.batch_size
            )));
        }
        let pack_across = config.pack_across();
        if mid_epoch && state.pack_across != pack_across {
            let packing = |n: u32| match n {
                0 => "batch by batch".to_string(),
                n => format!("across batches in rows of {n} tokens"),
            };
            return Err(DataError::Resume(format!(
                "the saved state packed {}, this run packs {}; the epoch's micro-batches would \
                 change: finish the epoch with the old packing",
                packing(state.pack_across),
                packing(pack_across)
            )));
        }
        let mut units = Units::new(index, config.seed, state.epoch, batch_size, pack_across)?;
        let n = units.total(index);
        if state.position > n {
            return Err(DataError::Resume(format!(
                "position {} is past the end of epoch {} ({n} batches); were the shards rebuilt?",
                state.position, state.epoch
            )));
        }
        // Same world size mid-epoch: replay from the anchor so ranks get the same batches.
        let (anchor, anchor_step) = if mid_epoch && state.world_size == w {
            if state.anchor > state.position
                || !(state.position - state.anchor).is_multiple_of(w as u64)
            {
                return Err(DataError::Resume(format!(
                    "position {} is not on a step boundary of anchor {} with world size {w}",
                    state.position, state.anchor
                )));
            }
            (state.anchor, state.anchor_step)
        } else {
            (state.position, state.step)
        };
        let skip = ((state.position - anchor) / w as u64) as usize;
        units.skip(index, anchor);
        let rest = n - anchor;
        let steps = rest.div_ceil(w as u64) as usize;
        let mut start = Cursor {
            units,
            left: rest,
            cumulative: vec![0; w],
            k: 0,
        };
        // The steps already taken since the anchor still count for the balance.
        for _ in 0..skip {
            start.next_step(index);
        }
        let num_steps = steps.saturating_sub(skip);
        Ok(Self {
            epoch: state.epoch,
            world_size: w,
            batch_size,
            total_batches: n,
            index,
            frame: Frame {
                epoch: state.epoch,
                world_size: w,
                batch_size,
                seed: config.seed,
                anchor,
                anchor_step,
                steps,
                pack_length: config.pack_length,
                pack_across: config.pack_across(),
            },
            start,
            num_steps,
            leftover_step: !rest.is_multiple_of(w as u64) && num_steps > 0,
        })
    }

    /// Remaining steps.
    pub fn num_steps(&self) -> usize {
        self.num_steps
    }

    /// The remaining steps in order, each made when reached: one batch per rank
    /// (`step[rank]`).
    pub fn iter(&self) -> Steps<'a> {
        Steps {
            index: self.index,
            frame: self.frame,
            cursor: self.start.clone(),
        }
    }

    /// Every remaining step at once (`steps()[i][rank]`): memory grows with the epoch (104
    /// bytes per sample measured); for tests and small plans. Training reads
    /// [`EpochPlan::rank_batches`].
    pub fn steps(&self) -> Vec<Vec<PlannedBatch>> {
        self.iter().collect()
    }

    /// The remaining batches of `rank`, all at once (memory grows with the epoch; see
    /// [`EpochPlan::rank_batches`]).
    pub fn rank(&self, rank: usize) -> DataResult<Vec<PlannedBatch>> {
        self.check_rank(rank)?;
        let mut cursor = self.start.clone();
        let mut out = Vec::with_capacity(self.num_steps);
        while let Some(b) = next_for_rank(self.index, &self.frame, &mut cursor, rank) {
            out.push(b);
        }
        Ok(out)
    }

    /// The remaining batches of `rank`, each made when reached; owns what it needs (the
    /// [`Loader`](super::Loader)'s threads take it). `index` must be the index of this plan.
    pub fn rank_batches(&self, index: &Arc<ShardIndex>, rank: usize) -> DataResult<RankBatches> {
        self.check_rank(rank)?;
        if !std::ptr::eq(Arc::as_ptr(index), self.index) {
            return Err(DataError::Plan(
                "rank_batches: the index is not the one the plan was made from".into(),
            ));
        }
        Ok(RankBatches {
            index: index.clone(),
            frame: self.frame,
            cursor: self.start.clone(),
            rank,
        })
    }

    fn check_rank(&self, rank: usize) -> DataResult<()> {
        if rank >= self.world_size {
            return Err(DataError::Plan(format!(
                "rank {rank} is not below world size {}",
                self.world_size
            )));
        }
        Ok(())
    }

    /// Walks the remaining steps (their tokens only: no batch is made).
    pub fn balance(&self) -> Balance {
        let w = self.world_size;
        let mut rank_tokens = vec![0u64; w];
        let mut rank_samples = vec![0u64; w];
        let mut max_batch_tokens = 0;
        let mut empty_batches = 0;
        let (mut sum_ratio, mut worst, mut full_steps) = (0.0, 1.0f64, 0usize);
        let mut cursor = self.start.clone();
        let mut i = 0;
        while let Some((_, step)) = cursor.next_step(self.index) {
            let tokens = |u: &Option<Unit>| u.as_ref().map_or(0, |u| u.tokens);
            for (r, u) in step.iter().enumerate() {
                rank_tokens[r] += tokens(u);
                rank_samples[r] += u.as_ref().map_or(0, |u| u.samples as u64);
                max_batch_tokens = max_batch_tokens.max(tokens(u));
                empty_batches += usize::from(u.as_ref().is_none_or(|u| u.samples == 0));
            }
            i += 1;
            if !(self.leftover_step && i == self.num_steps) {
                let r = ratio(step.iter().map(tokens));
                sum_ratio += r;
                worst = worst.max(r);
                full_steps += 1;
            }
        }
        Balance {
            ratio: ratio(rank_tokens.iter().copied()),
            rank_tokens,
            rank_samples,
            max_batch_tokens,
            mean_step_ratio: if full_steps == 0 {
                1.0
            } else {
                sum_ratio / full_steps as f64
            },
            worst_step_ratio: worst,
            empty_batches,
        }
    }
}

impl<'a> IntoIterator for &EpochPlan<'a> {
    type Item = Vec<PlannedBatch>;
    type IntoIter = Steps<'a>;

    fn into_iter(self) -> Steps<'a> {
        self.iter()
    }
}

/// Rank `rank`'s batch of the next step (the other ranks' units are only weighed).
fn next_for_rank(
    index: &ShardIndex,
    frame: &Frame,
    cursor: &mut Cursor,
    rank: usize,
) -> Option<PlannedBatch> {
    let (k, step) = cursor.next_step(index)?;
    let unit = step.into_iter().nth(rank).flatten();
    Some(frame.batch(index, unit, k, rank))
}

/// The remaining steps of an [`EpochPlan`], one batch per rank, made one step at a time.
#[derive(Clone)]
pub struct Steps<'a> {
    index: &'a ShardIndex,
    frame: Frame,
    cursor: Cursor,
}

impl Iterator for Steps<'_> {
    type Item = Vec<PlannedBatch>;

    fn next(&mut self) -> Option<Vec<PlannedBatch>> {
        let (k, step) = self.cursor.next_step(self.index)?;
        Some(
            step.into_iter()
                .enumerate()
                .map(|(rank, unit)| self.frame.batch(self.index, unit, k, rank))
                .collect(),
        )
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.frame.steps - self.cursor.k;
        (n, Some(n))
    }
}

impl ExactSizeIterator for Steps<'_> {}

/// One rank's remaining batches of an [`EpochPlan`], made one step at a time; `'static` (it
/// shares the index), so a loader's threads can take it.
#[derive(Clone)]
pub struct RankBatches {
    index: Arc<ShardIndex>,
    frame: Frame,
    cursor: Cursor,
    rank: usize,
}

impl Iterator for RankBatches {
    type Item = PlannedBatch;

    fn next(&mut self) -> Option<PlannedBatch> {
        next_for_rank(&self.index, &self.frame, &mut self.cursor, self.rank)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.frame.steps - self.cursor.k;
        (n, Some(n))
    }
}

impl ExactSizeIterator for RankBatches {}

fn planned(
    index: &ShardIndex,
    unit: Option<Unit>,
    epoch: u64,
    step: u64,
    rank: usize,
    next_state: DataState,
) -> PlannedBatch {
    let Some(unit) = unit else {
        return PlannedBatch {
            epoch,
            step,
            rank,
            modality: None,
            parts: Vec::new(),
            samples: Vec::new(),
            rows: Vec::new(),
            tokens: 0,
            next_state,
        };
    };
    let samples = unit
        .parts
        .iter()
        .flat_map(|p| {
            let base = index.batches[p.batch].samples.start;
            index.samples[base + p.rows.start..base + p.rows.end]
                .iter()
                .copied()
        })
        .collect();
    // One modality, unless the unit is a final pooled row packed across batches.
    let modality_of = |p: &RowSlice| index.shards[index.batches[p.batch].shard].modality;
    let first = unit
        .parts
        .first()
        .map_or(index.groups[unit.group].modality, modality_of);
    PlannedBatch {
        epoch,
        step,
        rank,
        modality: unit
            .parts
            .iter()
            .all(|p| modality_of(p) == first)
            .then_some(first),
        parts: unit.parts,
        rows: Vec::new(),
        samples,
        tokens: unit.tokens,
        next_state,
    }
}

/// The rows of one batch: balanced first-fit decreasing with `pack_length`, else one sample per row.
fn pack_rows(samples: &[SampleRef], pack_length: Option<u32>) -> Vec<Vec<usize>> {
    match pack_length {
        None => packing::one_per_row(samples.len()),
        Some(capacity) => {
            let lengths: Vec<u32> = samples.iter().map(|s| s.length).collect();
            // Checked for every sample of the index in `EpochPlan::new`.
            packing::pack(&lengths, capacity)
                .unwrap_or_else(|_| packing::one_per_row(samples.len()))
        }
    }
}

/// Every sample must fit in one row: a sample is never split.
fn check_pack_length(index: &ShardIndex, capacity: u32) -> DataResult<()> {
    match index.samples.iter().max_by_key(|s| s.length) {
        Some(s) if s.length > capacity => Err(DataError::Plan(format!(
            "pack length {capacity} is shorter than sample {}:{} ({} tokens); samples are never \
             split, so the pack length must be at least the longest sample (the shards' \
             model_max_length is {})",
            index.source_name(s),
            s.index,
            s.length,
            index.manifest.settings.model_max_length
        ))),
        _ => Ok(()),
    }
}
