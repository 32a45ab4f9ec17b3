//! Sequence packing: which samples of a batch share a row. One function for the trainer (which
//! packs) and `llava-data inspect` (which reports what packing would give), so both always agree.
//!
//! A batch of rows is computed as `rows × longest row` positions, so packing should minimise
//! that, not only the row count: a batch packed into rows of 8000 and 2000 tokens costs as much as
//! two rows of 8000. [`pack`] (**balanced first-fit decreasing**) does it in two steps, inside one
//! batch:
//! 1. [`first_fit_decreasing`] gives the fewest rows it can find, `k`: samples longest first
//!    (ties: earlier sample first), each into the first row with room, else a new row (FFD uses
//!    at most 11/9·OPT + 6/9 rows).
//! 2. For each row count from `k` up to one row per sample, the samples go longest first into the
//!    least-filled row that has room (LPT scheduling), which evens the rows out; the layout with
//!    the fewest positions wins (ties: fewer rows). One row per sample is among the candidates,
//!    so packing never computes more positions than not packing.
//!
//! Whole samples only: a sample is never split across rows. The result is a pure function of
//! the lengths and the capacity.

use std::fmt;

/// A sample longer than a row can hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TooLong {
    /// Position of the sample in the input.
    pub sample: usize,
    pub length: u32,
    pub capacity: u32,
}

impl fmt::Display for TooLong {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "sample {} has {} tokens, more than the pack length {}",
            self.sample, self.length, self.capacity
        )
    }
}

impl std::error::Error for TooLong {}

/// Rows of sample indices (into `lengths`); each row's total is at most `capacity`, each row
/// lists its samples in input order, rows are ordered by their first sample.
pub fn first_fit_decreasing(lengths: &[u32], capacity: u32) -> Result<Vec<Vec<usize>>, TooLong> {
    if let Some((sample, &length)) = lengths.iter().enumerate().find(|(_, &n)| n > capacity) {
        return Err(TooLong {
            sample,
            length,
            capacity,
        });
    }
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(lengths[i]), i));
    let mut rows: Vec<Vec<usize>> = Vec::new();
    let mut free: Vec<u32> = Vec::new();
    for i in order {
        match free.iter().position(|&f| f >= lengths[i]) {
            Some(r) => {
                rows[r].push(i);
                free[r] -= lengths[i];
            }
            None => {
                rows.push(vec![i]);
                free.push(capacity - lengths[i]);
            }
        }
    }
    for row in &mut rows {
        row.sort_unstable();
    }
    rows.sort_unstable_by_key(|row| row[0]);
    Ok(rows)
}

/// The rows of one batch with the fewest computed positions (`rows × longest row`) that
/// balanced first-fit decreasing finds (see the module doc). Rows as [`first_fit_decreasing`].
pub fn pack(lengths: &[u32], capacity: u32) -> Result<Vec<Vec<usize>>, TooLong> {
    let ffd = first_fit_decreasing(lengths, capacity)?;
    let cost = |rows: &[Vec<usize>]| -> u64 {
        let longest = rows
            .iter()
            .map(|r| r.iter().map(|&i| u64::from(lengths[i])).sum::<u64>())
            .max()
            .unwrap_or(0);
        longest * rows.len() as u64
    };
    let mut best_cost = cost(&ffd);
    let mut best = ffd;
    for k in best.len()..=lengths.len() {
        if let Some(rows) = least_filled(lengths, capacity, k) {
            let c = cost(&rows);
            if c < best_cost {
                best_cost = c;
                best = rows;
            }
        }
    }
    Ok(best)
}

/// Longest first into the least-filled of `k` rows that has room (ties: lower row); None if
/// some sample fits in no row. Empty rows are dropped.
fn least_filled(lengths: &[u32], capacity: u32, k: usize) -> Option<Vec<Vec<usize>>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(lengths[i]), i));
    let mut rows: Vec<Vec<usize>> = vec![Vec::new(); k];
    let mut fill = vec![0u32; k];
    for i in order {
        let r = (0..k)
            .filter(|&r| capacity - fill[r] >= lengths[i])
            .min_by_key(|&r| (fill[r], r))?;
        rows[r].push(i);
        fill[r] += lengths[i];
    }
    rows.retain(|r| !r.is_empty());
    for row in &mut rows {
        row.sort_unstable();
    }
    rows.sort_unstable_by_key(|row| row[0]);
    Some(rows)
}

/// One row per sample, in order (no packing).
pub fn one_per_row(n: usize) -> Vec<Vec<usize>> {
    (0..n).map(|i| vec![i]).collect()
}

/// Tokens and compute slots of batches laid out in rows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RowUsage {
    /// Real tokens.
    pub tokens: u64,
    /// Rows × the longest row of their batch, summed over batches: what a `[rows, longest]`
    /// forward computes.
    pub slots: u64,
    pub rows: u64,
}

impl RowUsage {
    /// Adds one batch laid out as `rows` (indices into `lengths`).
    pub fn add_batch(&mut self, lengths: &[u32], rows: &[Vec<usize>]) {
        let totals: Vec<u64> = rows
            .iter()
            .map(|r| r.iter().map(|&i| u64::from(lengths[i])).sum())
            .collect();
        let longest = totals.iter().copied().max().unwrap_or(0);
        self.tokens += totals.iter().sum::<u64>();
        self.slots += longest * totals.len() as u64;
        self.rows += totals.len() as u64;
    }

    /// Real tokens / compute slots (1 when empty).
    pub fn efficiency(&self) -> f64 {
        if self.slots == 0 {
            1.0
        } else {
            self.tokens as f64 / self.slots as f64
        }
    }

    /// Real tokens / (rows × `capacity`): how full the rows are against the pack length.
    pub fn fill(&self, capacity: u32) -> f64 {
        if self.rows == 0 {
            1.0
        } else {
            self.tokens as f64 / (self.rows * u64::from(capacity)) as f64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    /// `n` lengths in 1..=100.
    fn random_lengths(rng: &mut SplitMix64, n: usize) -> Vec<u32> {
        (0..n).map(|_| 1 + rng.below(100) as u32).collect()
    }

    fn totals(lengths: &[u32], rows: &[Vec<usize>]) -> Vec<u32> {
        rows.iter()
            .map(|r| r.iter().map(|&i| lengths[i]).sum())
            .collect()
    }

    #[test]
    fn ffd_places_longest_first_into_the_first_row_with_room() {
        // Decreasing: 7 (row 0), 6 (row 1), 5 (row 2), 3 → row 0 (7+3), 2 → row 1 (6+2),
        // 2 → row 1 (6+2+2), 1 → row 2 (5+1).
        let lengths = [3, 7, 2, 5, 1, 6, 2];
        let rows = first_fit_decreasing(&lengths, 10).unwrap();
        assert_eq!(rows, vec![vec![0, 1], vec![2, 5, 6], vec![3, 4]]);
        assert_eq!(totals(&lengths, &rows), vec![10, 10, 6]);
    }

    #[test]
    fn every_sample_once_and_no_row_over_capacity() {
        let mut rng = SplitMix64::new(0x1234_5678);
        for n in 0..60 {
            let lengths = random_lengths(&mut rng, n);
            let rows = first_fit_decreasing(&lengths, 128).unwrap();
            let mut seen: Vec<usize> = rows.iter().flatten().copied().collect();
            seen.sort_unstable();
            assert_eq!(seen, (0..n).collect::<Vec<_>>());
            assert!(totals(&lengths, &rows).iter().all(|&t| t <= 128));
            // FFD never leaves two rows that would both fit in one.
            let t = totals(&lengths, &rows);
            for a in 0..t.len() {
                for b in a + 1..t.len() {
                    assert!(t[a] + t[b] > 128, "rows {a} and {b} could merge: {t:?}");
                }
            }
        }
    }

    #[test]
    fn pack_evens_out_rows_instead_of_filling_the_first() {
        // FFD at 12: [6, 5] + [5, 4] = rows of 11 and 9 → 2 × 11 = 22 positions. Balanced:
        // [6, 4] + [5, 5] → 2 × 10 = 20 (three rows: 3 × 9 = 27; four: 4 × 6 = 24).
        let lengths = [6, 5, 5, 4];
        assert_eq!(
            first_fit_decreasing(&lengths, 12).unwrap(),
            vec![vec![0, 1], vec![2, 3]]
        );
        assert_eq!(pack(&lengths, 12).unwrap(), vec![vec![0, 3], vec![1, 2]]);
        // When padding one row per sample is cheapest, that is the answer: [6, 5, 5] at 12
        // packs as 11 + 5 (22) or 6 + 10 (20), unpacked it is 3 × 6 = 18.
        assert_eq!(pack(&[6, 5, 5], 12).unwrap(), one_per_row(3));
    }

    #[test]
    fn pack_never_computes_more_than_one_row_per_sample() {
        let mut rng = SplitMix64::new(0x9e37_79b9);
        for n in 1..40 {
            let lengths = random_lengths(&mut rng, n);
            for capacity in [100, 150, 400] {
                let rows = pack(&lengths, capacity).unwrap();
                let mut seen: Vec<usize> = rows.iter().flatten().copied().collect();
                seen.sort_unstable();
                assert_eq!(seen, (0..n).collect::<Vec<_>>());
                let t = totals(&lengths, &rows);
                assert!(t.iter().all(|&x| x <= capacity));
                let positions = u64::from(*t.iter().max().unwrap()) * t.len() as u64;
                let unpacked = u64::from(*lengths.iter().max().unwrap()) * n as u64;
                assert!(positions <= unpacked, "{positions} > {unpacked}");
            }
        }
    }

    #[test]
    fn a_sample_longer_than_a_row_is_an_error() {
        let err = first_fit_decreasing(&[4, 11, 3], 10).unwrap_err();
        assert_eq!(
            err,
            TooLong {
                sample: 1,
                length: 11,
                capacity: 10
            }
        );
        assert!(err.to_string().contains("pack length 10"));
    }

    #[test]
    fn usage_counts_slots_per_batch() {
        let mut u = RowUsage::default();
        u.add_batch(&[4, 2, 3], &one_per_row(3)); // 9 tokens in 3 × 4 slots
        u.add_batch(&[4, 2, 3], &[vec![0, 1, 2]]); // 9 tokens in 1 × 9 slots
        assert_eq!((u.tokens, u.slots, u.rows), (18, 21, 4));
        assert!((u.efficiency() - 18.0 / 21.0).abs() < 1e-12);
        assert!((u.fill(10) - 18.0 / 40.0).abs() < 1e-12);
    }
}
