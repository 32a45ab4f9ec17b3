//! Packing **across batch boundaries**: one epoch's samples, in the trainer's order, laid into
//! rows of at most `capacity` tokens, each row one micro-batch. One implementation for the
//! trainer (`pack_across_batches = true`) and `llava-data inspect --pack-across-batches`, so
//! the fill `inspect` reports is the fill the trainer gets.
//!
//! Order: the groups in their seeded (seed, epoch) order ([`epoch_group_order`], the order of
//! the batch-wise plan), each group's samples in shard row order. Each modality has its own
//! buffer: while streaming, rows never mix modalities, as batches never do. After a group
//! arrives, rows leave its modality's buffer while the buffer holds at least [`LOOKAHEAD_ROWS`]
//! rows' worth of tokens. At the end of the epoch the leftovers of **all** modalities are pooled
//! (modalities in the order first seen) and packed together, so a small remainder of one
//! modality shares the last rows of another instead of taking a nearly empty row of its own:
//! only these final rows may mix modalities (their key is `None`).
//!
//! A row while streaming: the **oldest** waiting sample first (so no sample waits long and the
//! epoch keeps roughly its shuffled order), then repeatedly the longest waiting sample that
//! still fits (ties: the older). When emptying a buffer at the end: the longest first instead
//! (best-fit decreasing), so the leftovers take as few rows as they can.
//!
//! Every sample is in exactly one row; a sample is never split; the result is a pure function
//! of the input order, lengths and capacity. Memory: the buffers (about `LOOKAHEAD_ROWS` rows
//! per modality), never the epoch.

use std::collections::VecDeque;

use crate::packing::TooLong;
use crate::rng::{shuffle, SplitMix64};

/// Rows' worth of tokens a modality's buffer gathers before rows leave it: more fills rows
/// better (more samples to choose from) and moves samples further from their shuffled place.
pub const LOOKAHEAD_ROWS: u64 = 8;

/// The order of `groups` groups in epoch `epoch`: a seeded shuffle of `0..groups` (the
/// trainer's plan, batch-wise or packed, walks the groups in this order).
pub fn epoch_group_order(groups: usize, seed: u64, epoch: u64) -> Vec<u32> {
    let mut order: Vec<u32> = (0..groups as u32).collect();
    shuffle(&mut order, &mut SplitMix64::for_epoch(seed, epoch));
    order
}

/// One packed row: samples whose lengths sum to `tokens` ≤ capacity, in the order they were
/// placed, each with its `key` (modality). `key` is the row's one key, or `None` for a row that
/// mixes keys (only among the epoch's final pooled rows).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row<K, T> {
    pub key: Option<K>,
    pub samples: Vec<(K, T)>,
    pub tokens: u64,
}

#[derive(Debug, Clone)]
struct Buffer<K, T> {
    key: K,
    /// Waiting samples, oldest first.
    waiting: Vec<(T, u32)>,
    tokens: u64,
}

/// The streaming packer (see the module doc): [`push_group`](Self::push_group) each group in
/// order, [`pop`](Self::pop) the rows that are ready, [`finish`](Self::finish) at the end of
/// the epoch, then pop the rest.
#[derive(Debug, Clone)]
pub struct AcrossBatches<K, T> {
    capacity: u32,
    buffers: Vec<Buffer<K, T>>,
    ready: VecDeque<Row<K, T>>,
    /// Samples pushed so far (positions for [`TooLong`]).
    pushed: usize,
}

impl<K: Copy + Eq, T: Copy> AcrossBatches<K, T> {
    pub fn new(capacity: u32) -> Self {
        Self {
            capacity,
            buffers: Vec::new(),
            ready: VecDeque::new(),
            pushed: 0,
        }
    }

    /// Adds one group's samples `(sample, length)` of modality `key`, then moves out the rows
    /// its buffer can make with enough left to choose from. A sample longer than the capacity is
    /// an error (its position among all samples pushed).
    pub fn push_group(
        &mut self,
        key: K,
        samples: impl IntoIterator<Item = (T, u32)>,
    ) -> Result<(), TooLong> {
        let capacity = self.capacity;
        let b = match self.buffers.iter().position(|b| b.key == key) {
            Some(b) => b,
            None => {
                self.buffers.push(Buffer {
                    key,
                    waiting: Vec::new(),
                    tokens: 0,
                });
                self.buffers.len() - 1
            }
        };
        let buffer = &mut self.buffers[b];
        for (sample, length) in samples {
            if length > capacity {
                return Err(TooLong {
                    sample: self.pushed,
                    length,
                    capacity,
                });
            }
            self.pushed += 1;
            buffer.waiting.push((sample, length));
            buffer.tokens += u64::from(length);
        }
        let threshold = LOOKAHEAD_ROWS * u64::from(capacity);
        while buffer.tokens >= threshold && !buffer.waiting.is_empty() {
            let key = buffer.key;
            let (samples, tokens) = take_row(buffer, capacity, false);
            self.ready.push_back(Row {
                key: Some(key),
                samples: samples.into_iter().map(|s| (key, s)).collect(),
                tokens,
            });
        }
        Ok(())
    }

    /// The end of the epoch: every waiting sample of every modality, pooled, into rows, longest
    /// first.
    pub fn finish(&mut self) {
        let mut pool = Buffer {
            key: (),
            waiting: Vec::new(),
            tokens: 0,
        };
        for buffer in &mut self.buffers {
            let key = buffer.key;
            pool.waiting
                .extend(buffer.waiting.drain(..).map(|(s, l)| ((key, s), l)));
            pool.tokens += std::mem::take(&mut buffer.tokens);
        }
        while !pool.waiting.is_empty() {
            let (samples, tokens) = take_row(&mut pool, self.capacity, true);
            let first = samples[0].0;
            let key = samples.iter().all(|s| s.0 == first).then_some(first);
            self.ready.push_back(Row {
                key,
                samples,
                tokens,
            });
        }
    }

    /// The next ready row, oldest first.
    pub fn pop(&mut self) -> Option<Row<K, T>> {
        self.ready.pop_front()
    }
}

/// Index of the longest waiting sample with `length <= room` (ties: the older), skipping none.
fn longest_fitting<T>(waiting: &[(T, u32)], room: u32) -> Option<usize> {
    let mut best: Option<usize> = None;
    for (i, &(_, l)) in waiting.iter().enumerate() {
        if l <= room && best.is_none_or(|b| l > waiting[b].1) {
            best = Some(i);
        }
    }
    best
}

/// One row out of `buffer` (its samples and tokens). Streaming: its oldest sample, then the longest that still fits until
/// none does (greedy: cheap enough to replay a whole epoch on resume). Emptying
/// (`longest_first`): its longest sample, then the subset of the others that fills the room
/// best ([`best_subset`]; greedy where that table would be too large).
fn take_row<K, T: Copy>(
    buffer: &mut Buffer<K, T>,
    capacity: u32,
    longest_first: bool,
) -> (Vec<T>, u64) {
    let first = if longest_first {
        longest_fitting(&buffer.waiting, capacity).unwrap_or(0)
    } else {
        0
    };
    let (s, l) = buffer.waiting.remove(first);
    let mut samples = vec![s];
    let mut room = capacity - l;
    if longest_first {
        let lengths: Vec<u32> = buffer.waiting.iter().map(|w| w.1).collect();
        if let Some(chosen) = best_subset(&lengths, room) {
            // Remove from the back so the indices stay valid; keep the chosen order.
            for &i in chosen.iter().rev() {
                let (s, l) = buffer.waiting.remove(i);
                samples.push(s);
                room -= l;
            }
            samples[1..].reverse();
        }
    }
    while let Some(i) = longest_fitting(&buffer.waiting, room) {
        let (s, l) = buffer.waiting.remove(i);
        samples.push(s);
        room -= l;
    }
    let tokens = u64::from(capacity - room);
    buffer.tokens -= tokens;
    (samples, tokens)
}

/// Table cells (samples × (room + 1) bits) above which [`best_subset`] gives up.
const SUBSET_TABLE_BITS: u64 = 1 << 28;

/// The indices (ascending) of a subset of `lengths` with the largest sum <= `room` (subset sum
/// by bitsets: for each prefix of the samples, the sums it can reach), or None when the table
/// would exceed [`SUBSET_TABLE_BITS`]. Deterministic: the reconstruction leaves out a sample
/// whenever the sum is reachable without it, from the last sample back.
fn best_subset(lengths: &[u32], room: u32) -> Option<Vec<usize>> {
    let bits = room as usize + 1;
    if lengths.len() as u64 * bits as u64 > SUBSET_TABLE_BITS {
        return None;
    }
    let words = bits.div_ceil(64);
    // reach[i]: sums reachable with lengths[..i].
    let mut reach: Vec<Vec<u64>> = Vec::with_capacity(lengths.len() + 1);
    let mut first = vec![0u64; words];
    first[0] = 1;
    reach.push(first);
    for &l in lengths {
        let prev = reach.last().expect("reach[0]");
        let mut next = prev.clone();
        let (w, b) = ((l / 64) as usize, l % 64);
        for i in (w..words).rev() {
            let mut v = prev[i - w] << b;
            if b > 0 && i > w {
                v |= prev[i - w - 1] >> (64 - b);
            }
            next[i] |= v;
        }
        // Sums above `room` do not count.
        if !bits.is_multiple_of(64) {
            next[words - 1] &= (1u64 << (bits % 64)) - 1;
        }
        reach.push(next);
    }
    let has = |set: &[u64], s: usize| set[s / 64] >> (s % 64) & 1 == 1;
    let last = reach.last().expect("reach");
    let mut sum = (0..bits).rev().find(|&s| has(last, s)).unwrap_or(0);
    let mut chosen = Vec::new();
    for i in (0..lengths.len()).rev() {
        if !has(&reach[i], sum) {
            chosen.push(i);
            sum -= lengths[i] as usize;
        }
    }
    chosen.reverse();
    Some(chosen)
}

/// Every row of one epoch at once: `groups` in epoch order, each `(key, samples)`.
pub fn pack_epoch<K: Copy + Eq, T: Copy>(
    groups: impl IntoIterator<Item = (K, Vec<(T, u32)>)>,
    capacity: u32,
) -> Result<Vec<Row<K, T>>, TooLong> {
    let mut packer = AcrossBatches::new(capacity);
    let mut rows = Vec::new();
    for (key, samples) in groups {
        packer.push_group(key, samples)?;
        while let Some(r) = packer.pop() {
            rows.push(r);
        }
    }
    packer.finish();
    while let Some(r) = packer.pop() {
        rows.push(r);
    }
    Ok(rows)
}

/// Real tokens / (rows × capacity) of `rows` (1 when there are none).
pub fn fill<K, T>(rows: &[Row<K, T>], capacity: u32) -> f64 {
    if rows.is_empty() {
        return 1.0;
    }
    let tokens: u64 = rows.iter().map(|r| r.tokens).sum();
    tokens as f64 / (rows.len() as u64 * u64::from(capacity)) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `groups` groups of `per_group` samples, alternating two modalities, lengths 1..=max.
    fn random_groups(
        rng: &mut SplitMix64,
        groups: usize,
        per_group: usize,
        max: u64,
    ) -> Vec<(u8, Vec<(usize, u32)>)> {
        let mut id = 0;
        (0..groups)
            .map(|g| {
                let samples = (0..per_group)
                    .map(|_| {
                        id += 1;
                        (id - 1, 1 + rng.below(max) as u32)
                    })
                    .collect();
                ((g % 2) as u8, samples)
            })
            .collect()
    }

    #[test]
    fn every_sample_once_one_modality_per_row_but_the_final_pooled_ones_none_over_capacity() {
        let mut rng = SplitMix64::new(7);
        for (groups, per_group, max, capacity) in [
            (0, 4, 10, 16),
            (1, 1, 10, 10),
            (7, 5, 100, 100),
            (40, 8, 3000, 8192),
        ] {
            let input = random_groups(&mut rng, groups, per_group, max);
            let key_of: Vec<u8> = input
                .iter()
                .flat_map(|(k, s)| s.iter().map(move |_| *k))
                .collect();
            let length_of: Vec<u32> = input
                .iter()
                .flat_map(|(_, s)| s.iter().map(|x| x.1))
                .collect();
            let rows = pack_epoch(input, capacity).unwrap();
            let mut seen: Vec<usize> = rows
                .iter()
                .flat_map(|r| r.samples.iter().map(|s| s.1))
                .collect();
            seen.sort_unstable();
            assert_eq!(seen, (0..groups * per_group).collect::<Vec<_>>());
            for r in &rows {
                assert!(r.samples.iter().all(|&(k, s)| key_of[s] == k));
                match r.key {
                    Some(k) => assert!(r.samples.iter().all(|s| s.0 == k)),
                    None => assert!(r.samples.iter().any(|s| s.0 != r.samples[0].0)),
                }
                let sum: u64 = r
                    .samples
                    .iter()
                    .map(|&(_, s)| u64::from(length_of[s]))
                    .sum();
                assert_eq!(sum, r.tokens);
                assert!(r.tokens <= u64::from(capacity));
            }
        }
    }

    #[test]
    fn rows_fill_up_across_groups() {
        // 400 groups of 8 samples of 100..3000 tokens (LLaVA-like), rows of 8192: one partial
        // pooled row at the end, the rest nearly full.
        let mut rng = SplitMix64::new(11);
        let input: Vec<_> = random_groups(&mut rng, 400, 8, 2900)
            .into_iter()
            .map(|(k, s)| (k, s.into_iter().map(|(i, l)| (i, l + 100)).collect()))
            .collect();
        let rows = pack_epoch(input, 8192).unwrap();
        let f = fill(&rows, 8192);
        assert!(f > 0.97, "fill {f}");
        eprintln!("fill {f:.4} in {} rows", rows.len());
    }

    #[test]
    fn the_same_input_packs_the_same_and_a_clone_goes_on_the_same() {
        let mut rng = SplitMix64::new(3);
        let input = random_groups(&mut rng, 50, 6, 900);
        let all = pack_epoch(input.clone(), 1000).unwrap();
        assert_eq!(all, pack_epoch(input.clone(), 1000).unwrap());
        // A packer cloned after 20 groups (as a resumed plan replays to its position) makes
        // the same remaining rows as the original.
        let mut packer = AcrossBatches::new(1000);
        let mut rows = Vec::new();
        for (k, s) in input[..20].iter().cloned() {
            packer.push_group(k, s).unwrap();
            rows.extend(std::iter::from_fn(|| packer.pop()));
        }
        let mut copy = packer.clone();
        assert!(!rows.is_empty() && rows.len() < all.len());
        for (k, s) in input[20..].iter().cloned() {
            copy.push_group(k, s).unwrap();
            rows.extend(std::iter::from_fn(|| copy.pop()));
        }
        copy.finish();
        rows.extend(std::iter::from_fn(|| copy.pop()));
        assert_eq!(rows, all);
    }

    #[test]
    fn streaming_rows_start_with_the_oldest_sample() {
        // Capacity 10, threshold 80 tokens: the first rows leave once 80 tokens wait.
        let samples: Vec<(usize, u32)> = (0..20)
            .map(|i| (i, if i % 2 == 0 { 6 } else { 4 }))
            .collect();
        let mut packer = AcrossBatches::new(10);
        packer.push_group(0u8, samples).unwrap();
        let first = packer.pop().unwrap();
        assert_eq!(first.samples[0], (0, 0));
        assert_eq!(first.key, Some(0));
        assert_eq!(first.tokens, 10);
    }

    #[test]
    fn only_the_final_pooled_rows_mix_modalities() {
        // Capacity 10, threshold 80: modality 0 streams rows of 6 + 4; the leftovers 6 (key 0)
        // and 4 (key 1) share the last row instead of two rows of 6 and 4.
        let a: Vec<(usize, u32)> = (0..17)
            .map(|i| (i, if i % 2 == 0 { 6 } else { 4 }))
            .collect();
        let rows = pack_epoch([(0u8, a), (1u8, vec![(17, 4)])], 10).unwrap();
        assert_eq!(rows.len(), 9);
        assert!(rows.iter().all(|r| r.tokens == 10));
        let last = rows.last().unwrap();
        assert_eq!(last.key, None);
        assert!(rows[..8].iter().all(|r| r.key == Some(0)));
    }

    #[test]
    fn best_subset_fills_the_room_exactly_when_it_can() {
        // Greedy (longest first) takes 6 then 3 (9 of 12); 5 + 4 + 3 = 12.
        let chosen = best_subset(&[6, 5, 4, 3], 12).unwrap();
        let sum: u32 = chosen.iter().map(|&i| [6, 5, 4, 3][i]).sum();
        assert_eq!(sum, 12);
        assert_eq!(best_subset(&[70, 65], 64).unwrap(), Vec::<usize>::new());
        assert_eq!(best_subset(&[64, 1], 64).unwrap(), vec![0]);
        assert_eq!(best_subset(&[63, 1, 1], 64).unwrap().len(), 2);
        // Against brute force on random lengths.
        let mut rng = SplitMix64::new(5);
        for _ in 0..200 {
            let n = 1 + rng.below(10) as usize;
            let lengths: Vec<u32> = (0..n).map(|_| 1 + rng.below(150) as u32).collect();
            let room = rng.below(400) as u32;
            let chosen = best_subset(&lengths, room).unwrap();
            let sum: u32 = chosen.iter().map(|&i| lengths[i]).sum();
            let best = (0u32..1 << n)
                .map(|m| {
                    (0..n)
                        .filter(|i| m >> i & 1 == 1)
                        .map(|i| lengths[i])
                        .sum::<u32>()
                })
                .filter(|&x| x <= room)
                .max()
                .unwrap();
            assert_eq!(sum, best, "{lengths:?} room {room}");
        }
    }

    #[test]
    fn a_sample_longer_than_a_row_is_an_error() {
        let err = pack_epoch([(0u8, vec![(0usize, 5u32), (1, 11)])], 10).unwrap_err();
        assert_eq!((err.sample, err.length, err.capacity), (1, 11, 10));
    }

    #[test]
    fn the_group_order_is_a_seeded_permutation() {
        let a = epoch_group_order(100, 42, 0);
        assert_eq!(a, epoch_group_order(100, 42, 0));
        assert_ne!(a, epoch_group_order(100, 42, 1));
        let mut s = a.clone();
        s.sort_unstable();
        assert_eq!(s, (0..100).collect::<Vec<u32>>());
    }
}
