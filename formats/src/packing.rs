//! Sequence packing: which samples of a batch share a row. One function for the trainer (which
//! packs) and `llava-data inspect` (which reports what packing would give), so both always agree.
//!
//! Algorithm: **first-fit decreasing** (FFD) inside one batch. The batch's samples are visited
//! longest first (ties: earlier sample first) and each goes into the first row that still has
//! room for it, or opens a new row. FFD uses at most 11/9·OPT + 6/9 rows; inside a length-grouped
//! batch the lengths are close, so it is nearly always optimal. Whole samples only: a sample is
//! never split across rows. The result is a pure function of the lengths and the capacity.

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
        let mut state = 0x1234_5678u64;
        for n in 0..60 {
            let lengths: Vec<u32> = (0..n)
                .map(|_| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    1 + (state >> 33) as u32 % 100
                })
                .collect();
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
