//! Padding efficiency: real tokens / padded tokens, for the build's grouping and for random
//! batching of the same samples.
//!
//! - **Grouped** (what a trainer reading the shards gets): per modality, the rows of each group in
//!   shard and row-group order, cut into batches of `batch_size` consecutive rows (with the build's
//!   batch size these are exactly its batches); a group's last batch may be short.
//! - **Random**: the same rows of one modality shuffled with a seeded [`SplitMix64`] (purpose
//!   `inspect:random:<modality>` of the build seed), cut into batches of `batch_size`.
//!
//! A batch pads every row to its longest: `padded = rows × max length`. A *step* is `world_size`
//! consecutive batches, one per rank; ranks wait for the slowest, so the step-level figure counts
//! `batches in the step × the largest padded batch of the step`.

use serde::{Deserialize, Serialize};

use std::collections::HashMap;

use llava_formats::pack_stream::{epoch_group_order, pack_epoch};
use llava_formats::packing::{pack, TooLong};
use llava_formats::rng::{shuffle, SplitMix64};

/// Padding of one way of batching.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Padding {
    pub batches: u64,
    pub steps: u64,
    /// Sum of exact lengths.
    pub real_tokens: u64,
    /// Sum over batches of rows × the batch's max length.
    pub padded_tokens: u64,
    /// `real_tokens / padded_tokens` (1.0 = no padding).
    pub efficiency: f64,
    /// Sum over steps of (batches in the step) × (largest padded batch of the step).
    pub step_padded_tokens: u64,
    /// `real_tokens / step_padded_tokens`: also counts ranks waiting for the slowest one.
    pub step_efficiency: f64,
}

impl Padding {
    /// Padding of `batches` (lengths of each batch's rows, in order) with `world_size` batches a
    /// step.
    pub fn of(batches: &[Vec<u32>], world_size: usize) -> Padding {
        let padded_of =
            |b: &Vec<u32>| b.len() as u64 * u64::from(b.iter().copied().max().unwrap_or(0));
        let real: u64 = batches.iter().flatten().map(|&l| u64::from(l)).sum();
        let padded: u64 = batches.iter().map(padded_of).sum();
        let w = world_size.max(1);
        let step_padded: u64 = batches
            .chunks(w)
            .map(|step| step.len() as u64 * step.iter().map(padded_of).max().unwrap_or(0))
            .sum();
        Padding {
            batches: batches.len() as u64,
            steps: batches.len().div_ceil(w) as u64,
            real_tokens: real,
            padded_tokens: padded,
            efficiency: ratio(real, padded),
            step_padded_tokens: step_padded,
            step_efficiency: ratio(real, step_padded),
        }
    }

    /// Sum of two paddings (e.g. the modalities of one build); ratios recomputed.
    pub fn add(&self, other: &Padding) -> Padding {
        let real = self.real_tokens + other.real_tokens;
        let padded = self.padded_tokens + other.padded_tokens;
        let step_padded = self.step_padded_tokens + other.step_padded_tokens;
        Padding {
            batches: self.batches + other.batches,
            steps: self.steps + other.steps,
            real_tokens: real,
            padded_tokens: padded,
            efficiency: ratio(real, padded),
            step_padded_tokens: step_padded,
            step_efficiency: ratio(real, step_padded),
        }
    }
}

/// The grouped batches packed as the trainer packs them (`packing = true`): each batch's
/// samples in rows of at most `pack_length` tokens by balanced first-fit decreasing
/// (`llava_formats::packing`), a row being one sample-sized unit of padding.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Packed {
    pub pack_length: u32,
    /// Rows of all batches (samples without packing).
    pub rows: u64,
    /// Padding of the rows: real tokens / (rows × the batch's longest row).
    pub padding: Padding,
    /// Real tokens / (rows × `pack_length`): how full the rows are.
    pub fill: f64,
}

impl Packed {
    /// Packs each of `batches` (sample lengths) into rows; fails if a sample is too long.
    pub fn of(
        batches: &[Vec<u32>],
        pack_length: u32,
        world_size: usize,
    ) -> Result<Packed, TooLong> {
        let mut row_batches = Vec::with_capacity(batches.len());
        for lengths in batches {
            let rows = pack(lengths, pack_length)?;
            row_batches.push(
                rows.iter()
                    .map(|r| r.iter().map(|&i| lengths[i]).sum())
                    .collect::<Vec<u32>>(),
            );
        }
        let padding = Padding::of(&row_batches, world_size);
        let rows = row_batches.iter().map(|b| b.len() as u64).sum();
        Ok(Packed {
            pack_length,
            rows,
            fill: ratio(padding.real_tokens, rows * u64::from(pack_length)),
            padding,
        })
    }

    /// The rows the trainer's `pack_across_batches` plan makes in epoch 0
    /// (`llava_formats::pack_stream`), each row one micro-batch: `group`, `modality` and
    /// `length` per shard row in shard order. Groups are numbered in order of first appearance,
    /// as the trainer's index numbers them, and walked in the seeded epoch order. Each row is
    /// `(modality, tokens)`, the modality `None` for the epoch's final pooled rows that mix
    /// modalities.
    pub fn across_batches_rows(
        group: &[u64],
        modality: &[String],
        length: &[u64],
        pack_length: u32,
        seed: u64,
    ) -> Result<Vec<(Option<String>, u32)>, TooLong> {
        let mut number: HashMap<u64, usize> = HashMap::new();
        let mut names: Vec<&str> = Vec::new();
        let mut samples: Vec<(usize, Vec<(usize, u32)>)> = Vec::new();
        for (i, &g) in group.iter().enumerate() {
            let next = number.len();
            let n = *number.entry(g).or_insert(next);
            if n == samples.len() {
                let m = match names.iter().position(|&x| x == modality[i]) {
                    Some(m) => m,
                    None => {
                        names.push(&modality[i]);
                        names.len() - 1
                    }
                };
                samples.push((m, Vec::new()));
            }
            samples[n].1.push((i, length[i] as u32));
        }
        let order = epoch_group_order(samples.len(), seed, 0);
        let groups = order
            .iter()
            .map(|&g| std::mem::take(&mut samples[g as usize]))
            .filter(|(_, s)| !s.is_empty());
        let rows = pack_epoch(groups, pack_length)?;
        Ok(rows
            .iter()
            .map(|r| (r.key.map(|m| names[m].to_string()), r.tokens as u32))
            .collect())
    }

    /// Rows of one micro-batch each, of `tokens` real tokens.
    pub fn of_rows(tokens: &[u32], pack_length: u32, world_size: usize) -> Packed {
        let row_batches: Vec<Vec<u32>> = tokens.iter().map(|&t| vec![t]).collect();
        let padding = Padding::of(&row_batches, world_size);
        let rows = tokens.len() as u64;
        Packed {
            pack_length,
            rows,
            fill: ratio(padding.real_tokens, rows * u64::from(pack_length)),
            padding,
        }
    }

    /// Sum of two (the modalities of one build); ratios recomputed.
    pub fn add(&self, other: &Packed) -> Packed {
        let padding = self.padding.add(&other.padding);
        let rows = self.rows + other.rows;
        let pack_length = self.pack_length.max(other.pack_length);
        Packed {
            pack_length,
            rows,
            fill: ratio(padding.real_tokens, rows * u64::from(pack_length)),
            padding,
        }
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        1.0
    } else {
        a as f64 / b as f64
    }
}

/// Batches of the build's grouping: `rows` = (group id, length) in shard and row-group order;
/// each run of one group is cut into batches of `batch_size`.
pub fn grouped_batches(rows: &[(u32, u32)], batch_size: usize) -> Vec<Vec<u32>> {
    let b = batch_size.max(1);
    let mut batches = Vec::new();
    let mut start = 0;
    while start < rows.len() {
        let group = rows[start].0;
        let mut end = start;
        while end < rows.len() && rows[end].0 == group {
            end += 1;
        }
        batches.extend(
            rows[start..end]
                .chunks(b)
                .map(|c| c.iter().map(|&(_, l)| l).collect()),
        );
        start = end;
    }
    batches
}

/// Batches of a seeded random order of `lengths` (one modality).
pub fn random_batches(
    lengths: &[u32],
    batch_size: usize,
    seed: u64,
    modality: &str,
) -> Vec<Vec<u32>> {
    let mut order = lengths.to_vec();
    shuffle(
        &mut order,
        &mut SplitMix64::for_purpose(seed, &format!("inspect:random:{modality}")),
    );
    order
        .chunks(batch_size.max(1))
        .map(<[u32]>::to_vec)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padding_of_known_batches() {
        // Two batches: [10, 6] pads to 20, [4] pads to 4: 20 real / 24 padded.
        let p = Padding::of(&[vec![10, 6], vec![4]], 1);
        assert_eq!((p.real_tokens, p.padded_tokens, p.steps), (20, 24, 2));
        assert!((p.efficiency - 20.0 / 24.0).abs() < 1e-12);
        // Two ranks: one step whose slowest batch is 20 padded tokens: 2 × 20.
        let p = Padding::of(&[vec![10, 6], vec![4]], 2);
        assert_eq!((p.step_padded_tokens, p.steps), (40, 1));
    }

    #[test]
    fn packing_removes_the_padding_between_samples() {
        // [10, 6] and [4] at pack length 16: one row of 16 and one of 4 → no padding at all;
        // fill = 20 real / (2 rows × 16).
        let p = Packed::of(&[vec![10, 6], vec![4]], 16, 1).unwrap();
        assert_eq!((p.rows, p.padding.padded_tokens), (2, 20));
        assert!((p.padding.efficiency - 1.0).abs() < 1e-12);
        assert!((p.fill - 20.0 / 32.0).abs() < 1e-12);
        // Pack length 12: 10 and 6 need two rows again.
        let p = Packed::of(&[vec![10, 6], vec![4]], 12, 1).unwrap();
        assert_eq!((p.rows, p.padding.padded_tokens), (3, 24));
        assert!(Packed::of(&[vec![10, 6]], 8, 1).is_err());
    }

    #[test]
    fn grouped_batches_never_cross_groups() {
        let rows = [(0, 9), (0, 8), (0, 7), (1, 3), (1, 2)];
        assert_eq!(
            grouped_batches(&rows, 2),
            vec![vec![9, 8], vec![7], vec![3, 2]]
        );
    }

    #[test]
    fn random_batches_keep_every_length_and_are_seeded() {
        let lengths: Vec<u32> = (1..=10).collect();
        let a = random_batches(&lengths, 3, 7, "image");
        assert_eq!(a, random_batches(&lengths, 3, 7, "image"));
        let mut all: Vec<u32> = a.concat();
        all.sort();
        assert_eq!(all, lengths);
        assert_eq!(a.len(), 4);
    }
}
