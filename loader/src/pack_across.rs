//! The plan's units when packing across batches (`pack_across_batches = true`): each unit is
//! one row of at most `pack_length` tokens, filled from the samples of one modality across
//! batch and group boundaries by [`llava_formats::pack_stream`] (the same code as
//! `llava-data inspect --pack-across-batches`). Only the epoch's final rows, packed from the
//! pooled leftovers of all modalities, may mix image and text samples (their planned
//! `modality` is `None`).
//!
//! The rows are a pure function of (shard index, seed, epoch, pack length), made one at a time
//! in order; the plan gives them to ranks exactly as it gives batches (token-balanced windows,
//! split leftovers), and [`DataState::position`](super::DataState) counts rows, so a resume
//! replays the packer to the saved row (a walk over the epoch's lengths: no tile is read) and
//! may change the world size as the batch-wise plan does.

use std::sync::Arc;

use llava_formats::manifest::Modality;
use llava_formats::pack_stream::{epoch_group_order, AcrossBatches, Row};

use super::error::{DataError, DataResult};
use super::index::ShardIndex;
use super::plan::{RowSlice, Unit};

/// A sample as the packer sees it: its group (index into [`ShardIndex::groups`]), built batch
/// (index into [`ShardIndex::batches`]) and row inside that batch.
type Item = (u32, u32, u32);

/// The epoch's packed rows in order, made one at a time (it holds the group order and the
/// packer's buffers, never the epoch).
#[derive(Debug, Clone)]
pub(super) struct RowUnits {
    order: Arc<[u32]>,
    /// The next group of `order` to give the packer.
    group: usize,
    finished: bool,
    packer: AcrossBatches<Modality, Item>,
    /// Rows in the whole epoch.
    total: u64,
}

impl RowUnits {
    /// The start of `epoch`; counts the epoch's rows (one walk over its lengths).
    pub(super) fn new(
        index: &ShardIndex,
        seed: u64,
        epoch: u64,
        capacity: u32,
    ) -> DataResult<Self> {
        let order: Arc<[u32]> = epoch_group_order(index.groups.len(), seed, epoch).into();
        let mut units = Self {
            order,
            group: 0,
            finished: false,
            packer: AcrossBatches::new(capacity),
            total: 0,
        };
        let mut counter = units.clone();
        let mut total = 0;
        while counter.next_row(index)?.is_some() {
            total += 1;
        }
        units.total = total;
        Ok(units)
    }

    pub(super) fn total(&self) -> u64 {
        self.total
    }

    /// The next row as a unit (checked for every sample in [`RowUnits::new`]).
    pub(super) fn next(&mut self, index: &ShardIndex) -> Option<Unit> {
        let row = self.next_row(index).ok()??;
        Some(unit_of(index, &row))
    }

    fn next_row(&mut self, index: &ShardIndex) -> DataResult<Option<Row<Modality, Item>>> {
        loop {
            if let Some(row) = self.packer.pop() {
                return Ok(Some(row));
            }
            if let Some(&g) = self.order.get(self.group) {
                self.group += 1;
                let info = &index.groups[g as usize];
                let samples = info.batches.clone().flat_map(|b| {
                    index.samples[index.batches[b].samples.clone()]
                        .iter()
                        .enumerate()
                        .map(move |(row, s)| ((g, b as u32, row as u32), s.length))
                });
                self.packer
                    .push_group(info.modality, samples)
                    .map_err(|e| DataError::Plan(format!("packing across batches: {e}")))?;
            } else if !self.finished {
                self.packer.finish();
                self.finished = true;
            } else {
                return Ok(None);
            }
        }
    }
}

/// A row's samples in shard order (batch, then row), as consecutive row slices: the order the
/// reader reads them in.
fn unit_of(index: &ShardIndex, row: &Row<Modality, Item>) -> Unit {
    let mut items: Vec<Item> = row.samples.iter().map(|s| s.1).collect();
    items.sort_unstable_by_key(|&(_, b, r)| (b, r));
    let group = items.first().map_or(0, |&(g, _, _)| g as usize);
    let mut parts: Vec<RowSlice> = Vec::new();
    for &(_, b, r) in &items {
        let (b, r) = (b as usize, r as usize);
        match parts.last_mut() {
            Some(p) if p.batch == b && p.rows.end == r => p.rows.end = r + 1,
            _ => parts.push(RowSlice {
                batch: b,
                rows: r..r + 1,
            }),
        }
    }
    Unit::new(index, group, parts)
}
