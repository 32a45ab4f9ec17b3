//! Which keys each query sees, as one contiguous range per query.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Result, Tensor};

/// Partial-block biases already built, by (query range, key range): shared by the clones of a
/// mask, so every layer's forward and backward reuse the first one's.
type BiasCache = Arc<Mutex<HashMap<(Range<usize>, Range<usize>), Tensor>>>;

/// Visible keys of every query of a `[B, L]` batch: key `j` is visible to query `i` of row `b`
/// iff `lo[b, i] <= j <= hi[b, i]`.
///
/// - Causal with right padding (one sample per row of `len` tokens): `[0, min(i, len - 1)]`.
///   Padding queries see the whole sample (what the dense `[B, 1, L, L]` bias of HF gives);
///   their outputs are never used.
/// - Packed rows (several samples back to back): `[start of i's sample, i]`; padding queries
///   belong to the row's last sample. Attention never crosses a sample boundary.
/// - Bidirectional (CLIP tiles): `[0, L - 1]`.
///
/// A query that sees nothing (a row without tokens) has `lo = L, hi = 0`.
#[derive(Debug, Clone)]
pub struct AttentionMask {
    batch: usize,
    seq_len: usize,
    /// Host copies, `b * L + i`.
    lo: Vec<u32>,
    hi: Vec<u32>,
    /// Start of each position's sample, `b * L + i` (RoPE positions are `i - start`).
    start: Vec<u32>,
    /// Every query sees every key (no mask needed at all).
    all_visible: bool,
    /// `[B, L]` u32 on the model's device.
    lo_t: Tensor,
    hi_t: Tensor,
    /// See [`AttentionMask::block_bias`].
    biases: BiasCache,
}

/// How much of a `[queries, keys]` block some query sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockVisibility {
    /// No query of any row sees a key of the block: skip it.
    None,
    /// Some do: apply the mask.
    Partial,
    /// Every query of every row sees every key: no mask.
    Full,
}

impl AttentionMask {
    /// Causal attention over right-padded rows of `lengths[b]` real tokens.
    pub fn causal(lengths: &[usize], seq_len: usize, dev: &Device) -> Result<Self> {
        let rows: Vec<Vec<usize>> = lengths.iter().map(|&n| vec![n]).collect();
        Self::causal_packed(&rows, seq_len, dev)
    }

    /// Causal attention over rows that each hold whole samples back to back
    /// (`samples[b]` = their lengths, in order), right padded to `seq_len`.
    pub fn causal_packed(samples: &[Vec<usize>], seq_len: usize, dev: &Device) -> Result<Self> {
        let b = samples.len();
        let (mut lo, mut hi, mut start) = (
            Vec::with_capacity(b * seq_len),
            Vec::with_capacity(b * seq_len),
            Vec::with_capacity(b * seq_len),
        );
        for (row, lens) in samples.iter().enumerate() {
            let total: usize = lens.iter().sum();
            if total > seq_len {
                candle_core::bail!("row {row}: samples of {total} tokens in {seq_len} positions")
            }
            let mut st = 0usize;
            for &n in lens.iter().filter(|&&n| n > 0) {
                for i in st..st + n {
                    lo.push(st as u32);
                    hi.push(i as u32);
                    start.push(st as u32);
                }
                st += n;
            }
            // Padding: the last sample's keys, positions continuing its count.
            let last = lens.iter().rev().find(|&&n| n > 0).map(|&n| total - n);
            for _ in total..seq_len {
                match last {
                    Some(s) => {
                        lo.push(s as u32);
                        hi.push((total - 1) as u32);
                        start.push(s as u32);
                    }
                    None => {
                        lo.push(seq_len as u32);
                        hi.push(0);
                        start.push(0);
                    }
                }
            }
        }
        Self::from_ranges(b, seq_len, lo, hi, start, false, dev)
    }

    /// Every query sees every key (CLIP's tiles).
    pub fn bidirectional(batch: usize, seq_len: usize, dev: &Device) -> Result<Self> {
        let n = batch * seq_len;
        let last = seq_len.saturating_sub(1) as u32;
        Self::from_ranges(
            batch,
            seq_len,
            vec![0; n],
            vec![last; n],
            vec![0; n],
            seq_len > 0,
            dev,
        )
    }

    fn from_ranges(
        batch: usize,
        seq_len: usize,
        lo: Vec<u32>,
        hi: Vec<u32>,
        start: Vec<u32>,
        all_visible: bool,
        dev: &Device,
    ) -> Result<Self> {
        let lo_t = Tensor::from_slice(&lo, (batch, seq_len), dev)?;
        let hi_t = Tensor::from_slice(&hi, (batch, seq_len), dev)?;
        Ok(Self {
            batch,
            seq_len,
            lo,
            hi,
            start,
            all_visible,
            lo_t,
            hi_t,
            biases: BiasCache::default(),
        })
    }

    pub fn batch(&self) -> usize {
        self.batch
    }

    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    pub fn device(&self) -> &Device {
        self.lo_t.device()
    }

    /// RoPE position of every token, `[b][i]`: restarts at 0 for each packed sample.
    pub fn positions(&self) -> Vec<u32> {
        self.start
            .iter()
            .enumerate()
            .map(|(k, &s)| (k % self.seq_len.max(1)) as u32 - s)
            .collect()
    }

    /// Whether rows are plain (positions `0..L` in every row): RoPE can use one table.
    pub fn positions_are_plain(&self) -> bool {
        self.start.iter().all(|&s| s == 0)
    }

    /// Visibility of the block of queries `qs` and keys `ks` over all rows.
    pub fn block(&self, qs: std::ops::Range<usize>, ks: std::ops::Range<usize>) -> BlockVisibility {
        if self.all_visible {
            return BlockVisibility::Full;
        }
        if qs.is_empty() || ks.is_empty() {
            return BlockVisibility::None;
        }
        let (j0, j1) = (ks.start as u32, ks.end as u32 - 1);
        let (mut any, mut full) = (false, true);
        for row in 0..self.batch {
            let base = row * self.seq_len;
            for i in qs.clone() {
                let (lo, hi) = (self.lo[base + i], self.hi[base + i]);
                any |= lo <= j1 && hi >= j0;
                full &= lo <= j0 && hi >= j1;
            }
        }
        match (any, full) {
            (_, true) => BlockVisibility::Full,
            (true, false) => BlockVisibility::Partial,
            (false, false) => BlockVisibility::None,
        }
    }

    /// Additive f32 bias of a block: 0 where visible, -inf elsewhere, shaped
    /// `[B, 1, 1, |qs|, |ks|]` to broadcast over `[B, Hkv, rep, |qs|, |ks|]` scores. Built on the
    /// device once per mask and block (about 10 ops), then shared by every layer's forward and
    /// backward through the mask's clones.
    pub fn block_bias(&self, qs: Range<usize>, ks: Range<usize>) -> Result<Tensor> {
        let key = (qs.clone(), ks.clone());
        if let Some(t) = self.biases.lock().ok().and_then(|c| c.get(&key).cloned()) {
            return Ok(t);
        }
        let bias = self.build_bias(qs, ks)?;
        if let Ok(mut c) = self.biases.lock() {
            c.insert(key, bias.clone());
        }
        Ok(bias)
    }

    fn build_bias(&self, qs: Range<usize>, ks: Range<usize>) -> Result<Tensor> {
        let dev = self.device();
        let (bq, bk) = (qs.len(), ks.len());
        let kpos = Tensor::arange(ks.start as u32, ks.end as u32, dev)?.reshape((1, 1, bk))?;
        let lo = self.lo_t.narrow(1, qs.start, bq)?.unsqueeze(2)?;
        let hi = self.hi_t.narrow(1, qs.start, bq)?.unsqueeze(2)?;
        let vis = (kpos.broadcast_ge(&lo)?.to_dtype(DType::F32)?
            * kpos.broadcast_le(&hi)?.to_dtype(DType::F32)?)?;
        // log(1) = 0, log(0) = -inf.
        vis.log()?.unsqueeze(1)?.unsqueeze(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causal_padding_and_packing_ranges() {
        let dev = Device::Cpu;
        let m = AttentionMask::causal(&[3, 0], 4, &dev).expect("mask");
        assert_eq!(m.lo, [0, 0, 0, 0, 4, 4, 4, 4]);
        assert_eq!(m.hi, [0, 1, 2, 2, 0, 0, 0, 0]);
        let p = AttentionMask::causal_packed(&[vec![2, 3]], 6, &dev).expect("mask");
        assert_eq!(p.lo, [0, 0, 2, 2, 2, 2]);
        assert_eq!(p.hi, [0, 1, 2, 3, 4, 4]);
        assert_eq!(p.positions(), [0, 1, 0, 1, 2, 3]);
        assert_eq!(p.block(0..2, 2..6), BlockVisibility::None);
        assert_eq!(p.block(2..4, 0..2), BlockVisibility::None);
        assert_eq!(p.block(4..6, 2..4), BlockVisibility::Full);
        assert_eq!(p.block(2..6, 2..6), BlockVisibility::Partial);
        let bias = p.block_bias(2..4, 2..5).expect("bias");
        let v = bias
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .expect("v");
        let inf = f32::NEG_INFINITY;
        assert_eq!(v, [0.0, inf, inf, 0.0, 0.0, inf]);
    }

    #[test]
    fn a_block_bias_is_built_once_per_mask_and_shared_by_its_clones() {
        let p = AttentionMask::causal_packed(&[vec![2, 3]], 6, &Device::Cpu).expect("mask");
        let a = p.block_bias(2..4, 2..5).expect("bias");
        let b = p.clone().block_bias(2..4, 2..5).expect("bias");
        assert_eq!(a.id(), b.id(), "the clone reuses the first bias");
        let other = p.block_bias(0..2, 0..2).expect("bias");
        assert_ne!(a.id(), other.id());
    }
}
