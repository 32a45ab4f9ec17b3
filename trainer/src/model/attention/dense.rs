//! Dense attention: the whole `[B, Hq, L, L]` score matrix, differentiated by candle's autograd.

use candle_core::{DType, Result, Tensor, D};

use super::{check_shapes, AttentionMask};

/// See [`super::attend`].
pub fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttentionMask,
    scale: f64,
) -> Result<Tensor> {
    let (b, hq, hkv, l, d) = check_shapes(q, k, v, mask)?;
    let rep = hq / hkv;
    // GQA without repeating K/V: the `rep` query heads of a kv head become extra rows.
    let qg = q.contiguous()?.reshape((b, hkv, rep * l, d))?;
    let scores = (qg.matmul(&k.t()?.contiguous()?)? * scale)?
        .to_dtype(DType::F32)?
        .reshape((b, hkv, rep, l, l))?;
    let scores = match mask.block(0..l, 0..l) {
        super::BlockVisibility::Full => scores,
        _ => scores.broadcast_add(&mask.block_bias(0..l, 0..l)?)?,
    };
    let probs = masked_softmax(&scores)?
        .to_dtype(q.dtype())?
        .reshape((b, hkv, rep * l, l))?;
    probs.matmul(&v.contiguous()?)?.reshape((b, hq, l, d))
}

/// Softmax over the last dim of f32 scores that may hold `-inf`; a row of only `-inf` gives
/// zeros instead of NaN. For other rows it is exactly `exp(s - max) / sum`.
fn masked_softmax(s: &Tensor) -> Result<Tensor> {
    // The max needs no gradient (shift invariance); clamping it keeps `-inf - -inf` out.
    let max = s
        .max_keepdim(D::Minus1)?
        .detach()
        .maximum(f64::from(f32::MIN))?;
    let e = s.broadcast_sub(&max)?.exp()?;
    // A row with a visible key sums to at least exp(0) = 1: the clamp only touches empty rows.
    let sum = e
        .sum_keepdim(D::Minus1)?
        .maximum(f64::from(f32::MIN_POSITIVE))?;
    e.broadcast_div(&sum)
}
