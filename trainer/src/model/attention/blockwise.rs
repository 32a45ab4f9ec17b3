//! Blockwise attention (the flash-attention algorithm, written with tensor ops).
//!
//! Forward: for each block of queries, walk the key blocks it can see with an online softmax
//! (running max `m`, running sum `l`, rescaled accumulator), keeping only the output and the
//! per-query log-sum-exp. Backward: recompute each block's probabilities from the log-sum-exp and
//! accumulate `dq`, `dk`, `dv` block by block (Dao et al. 2022, algorithm 2). Peak memory is one
//! `[B, Hkv, rep, block, block]` score block instead of `[B, Hq, L, L]`.
//!
//! candle calls a custom op's backward with the op's inputs and output gradient; the forward
//! itself is computed outside the op with tensor ops (so it runs on every device), and the op
//! only hands that result to autograd.

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor, D,
};

use super::{check_shapes, AttentionMask, BlockVisibility};

/// Query and key block size when none is configured: 1024 keeps a 32-head score block at
/// 128 MiB (f32) and the number of kernel launches per layer small.
pub const DEFAULT_BLOCK: usize = 1024;

/// See [`super::attend`].
pub fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttentionMask,
    scale: f64,
    block: usize,
) -> Result<Tensor> {
    check_shapes(q, k, v, mask)?;
    if block == 0 {
        candle_core::bail!("attention block size must be > 0")
    }
    let geom = Geometry::new(q, k, block)?;
    let (qd, kd, vd) = (q.detach(), k.detach(), v.detach());
    let (out, lse) = forward(&geom, &qd, &kd, &vd, mask, scale)?;
    if !(q.track_op() || k.track_op() || v.track_op()) {
        return Ok(out);
    }
    let op = BlockwiseAttention {
        out: Mutex::new(Some(out)),
        lse,
        mask: mask.clone(),
        scale,
        geom,
    };
    q.apply_op3_arc(k, v, Arc::new(Box::new(op)))
}

/// Shapes of one call.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    b: usize,
    hq: usize,
    hkv: usize,
    rep: usize,
    l: usize,
    d: usize,
    block: usize,
}

impl Geometry {
    fn new(q: &Tensor, k: &Tensor, block: usize) -> Result<Self> {
        let (b, hq, l, d) = q.dims4()?;
        let hkv = k.dim(1)?;
        Ok(Self {
            b,
            hq,
            hkv,
            rep: hq / hkv,
            l,
            d,
            block,
        })
    }

    fn blocks(&self) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
        (0..self.l)
            .step_by(self.block)
            .map(|s| s..(s + self.block).min(self.l))
    }

    /// Queries `qs` of every head as `[B, Hkv, rep·|qs|, d]` rows (GQA: the `rep` query heads of
    /// a kv head share its keys).
    fn rows(&self, x: &Tensor, qs: &std::ops::Range<usize>) -> Result<Tensor> {
        x.reshape((self.b, self.hkv, self.rep, self.l, self.d))?
            .narrow(3, qs.start, qs.len())?
            .contiguous()?
            .reshape((self.b, self.hkv, self.rep * qs.len(), self.d))
    }

    /// `[B, Hkv, rep·n, x]` → `[B, Hkv, rep, n, x]`.
    fn split(&self, t: &Tensor, n: usize) -> Result<Tensor> {
        let last = t.dim(D::Minus1)?;
        t.reshape((self.b, self.hkv, self.rep, n, last))
    }
}

/// Each key/value block of one call, laid out once for every query block that reads it
/// (`kt`: `[B, Hkv, d, |ks|]`, `k`, `v`: `[B, Hkv, |ks|, d]`, `vt`: `[B, Hkv, d, |ks|]`); a
/// transposed copy per (query block, key block) pair would cost `n_q` copies of K.
struct KvBlocks {
    kt: Vec<Tensor>,
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    vt: Vec<Tensor>,
}

impl KvBlocks {
    /// `backward`: also the plain K blocks and the transposed V blocks.
    fn new(g: &Geometry, k: &Tensor, v: &Tensor, backward: bool) -> Result<Self> {
        let mut out = Self {
            kt: Vec::new(),
            k: Vec::new(),
            v: Vec::new(),
            vt: Vec::new(),
        };
        for ks in g.blocks() {
            let kb = k.narrow(2, ks.start, ks.len())?;
            let vb = v.narrow(2, ks.start, ks.len())?;
            out.kt.push(kb.t()?.contiguous()?);
            out.v.push(vb.contiguous()?);
            if backward {
                out.k.push(kb.contiguous()?);
                out.vt.push(vb.t()?.contiguous()?);
            }
        }
        Ok(out)
    }
}

/// f32 scores of a block, masked: `[B, Hkv, rep, |qs|, |ks|]`. `kt`: the key block transposed.
fn block_scores(
    g: &Geometry,
    q_rows: &Tensor,
    kt: &Tensor,
    n: usize,
    bias: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let s = (q_rows.matmul(kt)? * scale)?.to_dtype(DType::F32)?;
    let s = g.split(&s, n)?;
    match bias {
        Some(b) => s.broadcast_add(b),
        None => Ok(s),
    }
}

/// The mask bias of a block that needs one.
fn bias_for(
    mask: &AttentionMask,
    vis: BlockVisibility,
    qs: &std::ops::Range<usize>,
    ks: &std::ops::Range<usize>,
) -> Result<Option<Tensor>> {
    match vis {
        BlockVisibility::Partial => Ok(Some(mask.block_bias(qs.clone(), ks.clone())?)),
        _ => Ok(None),
    }
}

/// Output `[B, Hq, L, d]` (dtype of q) and log-sum-exp `[B, Hkv, rep, L, 1]` (f32).
fn forward(
    g: &Geometry,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttentionMask,
    scale: f64,
) -> Result<(Tensor, Tensor)> {
    let dev = q.device();
    let kv = KvBlocks::new(g, k, v, false)?;
    let (mut outs, mut lses) = (Vec::new(), Vec::new());
    for qs in g.blocks() {
        let n = qs.len();
        let q_rows = g.rows(q, &qs)?;
        // (running max clamped finite, running sum, accumulator)
        let mut state: Option<(Tensor, Tensor, Tensor)> = None;
        for (j, ks) in g.blocks().enumerate() {
            let vis = mask.block(qs.clone(), ks.clone());
            if vis == BlockVisibility::None {
                continue;
            }
            let bias = bias_for(mask, vis, &qs, &ks)?;
            let s = block_scores(g, &q_rows, &kv.kt[j], n, bias.as_ref(), scale)?;
            let bmax = s.max_keepdim(D::Minus1)?;
            let m_new = match &state {
                Some((m, _, _)) => m.maximum(&bmax)?,
                None => bmax,
            }
            .maximum(f64::from(f32::MIN))?;
            let p = s.broadcast_sub(&m_new)?.exp()?;
            let rowsum = p.sum_keepdim(D::Minus1)?;
            let pv = p
                .to_dtype(v.dtype())?
                .reshape((g.b, g.hkv, g.rep * n, ks.len()))?
                .matmul(&kv.v[j])?
                .to_dtype(DType::F32)?;
            let pv = g.split(&pv, n)?;
            state = Some(match state {
                None => (m_new, rowsum, pv),
                Some((m, l, acc)) => {
                    let alpha = (m - &m_new)?.exp()?;
                    let l = (l.broadcast_mul(&alpha)? + rowsum)?;
                    let acc = (acc.broadcast_mul(&alpha)? + pv)?;
                    (m_new, l, acc)
                }
            });
        }
        let (out, lse) = match state {
            Some((m, l, acc)) => {
                // Rows that saw no key have l = 0: output 0, and a finite lse that makes every
                // recomputed probability exp(-inf - lse) = 0.
                let l = l.maximum(f64::from(f32::MIN_POSITIVE))?;
                (acc.broadcast_div(&l)?, (m + l.log()?)?)
            }
            None => (
                Tensor::zeros((g.b, g.hkv, g.rep, n, g.d), DType::F32, dev)?,
                Tensor::full(f32::MAX, (g.b, g.hkv, g.rep, n, 1), dev)?,
            ),
        };
        outs.push(out);
        lses.push(lse);
    }
    // `cat` makes a fresh contiguous buffer: the op's forward hands out a copy of exactly it.
    let out = Tensor::cat(&outs, 3)?
        .reshape((g.b, g.hq, g.l, g.d))?
        .to_dtype(q.dtype())?;
    Ok((out, Tensor::cat(&lses, 3)?))
}

/// `(dq, dk, dv)` in the dtypes of `q`, `k`, `v`.
#[allow(clippy::too_many_arguments)]
fn backward(
    g: &Geometry,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    dout: &Tensor,
    lse: &Tensor,
    mask: &AttentionMask,
    scale: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let dev = q.device();
    let shape5 = (g.b, g.hkv, g.rep, g.l, g.d);
    // D_i = rowsum(dO ∘ O), the softmax backward's correction term.
    let delta = (dout.to_dtype(DType::F32)?.reshape(shape5)?
        * out.to_dtype(DType::F32)?.reshape(shape5)?)?
    .sum_keepdim(D::Minus1)?;
    let nblocks = g.l.div_ceil(g.block);
    let kv = KvBlocks::new(g, k, v, true)?;
    let mut dk: Vec<Option<Tensor>> = vec![None; nblocks];
    let mut dv: Vec<Option<Tensor>> = vec![None; nblocks];
    let mut dqs = Vec::with_capacity(nblocks);
    let add = |acc: &mut Option<Tensor>, x: Tensor| -> Result<()> {
        *acc = Some(match acc.take() {
            Some(a) => (a + x)?,
            None => x,
        });
        Ok(())
    };
    for qs in g.blocks() {
        let n = qs.len();
        let q_rows = g.rows(q, &qs)?;
        let do_rows = g.rows(dout, &qs)?;
        let lse_b = lse.narrow(3, qs.start, n)?;
        let delta_b = delta.narrow(3, qs.start, n)?;
        let mut dq: Option<Tensor> = None;
        for (kb_idx, ks) in g.blocks().enumerate() {
            let vis = mask.block(qs.clone(), ks.clone());
            if vis == BlockVisibility::None {
                continue;
            }
            let bias = bias_for(mask, vis, &qs, &ks)?;
            let s = block_scores(g, &q_rows, &kv.kt[kb_idx], n, bias.as_ref(), scale)?;
            let p = s.broadcast_sub(&lse_b)?.exp()?;
            let rows = (g.b, g.hkv, g.rep * n, ks.len());
            let p_rows = p.reshape(rows)?;
            // dV_j += Pᵀ dO (summed over the rep query heads of each kv head by the matmul).
            let dv_j = p_rows
                .to_dtype(v.dtype())?
                .t()?
                .matmul(&do_rows)?
                .to_dtype(DType::F32)?;
            add(&mut dv[kb_idx], dv_j)?;
            let dp = g.split(&do_rows.matmul(&kv.vt[kb_idx])?.to_dtype(DType::F32)?, n)?;
            // The softmax scale once on dS (before its cast, as before), not on dQ and dK.
            let ds = ((p * dp.broadcast_sub(&delta_b)?)? * scale)?
                .reshape(rows)?
                .to_dtype(q.dtype())?;
            add(&mut dq, ds.matmul(&kv.k[kb_idx])?.to_dtype(DType::F32)?)?;
            add(
                &mut dk[kb_idx],
                ds.t()?.matmul(&q_rows)?.to_dtype(DType::F32)?,
            )?;
        }
        let dq = match dq {
            Some(t) => g.split(&t, n)?,
            None => Tensor::zeros((g.b, g.hkv, g.rep, n, g.d), DType::F32, dev)?,
        };
        dqs.push(dq);
    }
    let dq = Tensor::cat(&dqs, 3)?
        .reshape((g.b, g.hq, g.l, g.d))?
        .to_dtype(q.dtype())?;
    let gather = |parts: Vec<Option<Tensor>>, dtype: DType| -> Result<Tensor> {
        let parts: Vec<Tensor> = parts
            .into_iter()
            .zip(g.blocks())
            .map(|(p, ks)| match p {
                Some(t) => Ok(t),
                None => Tensor::zeros((g.b, g.hkv, ks.len(), g.d), DType::F32, dev),
            })
            .collect::<Result<_>>()?;
        Tensor::cat(&parts, 2)?.to_dtype(dtype)
    };
    Ok((dq, gather(dk, k.dtype())?, gather(dv, v.dtype())?))
}

/// The autograd node: its forward hands over the precomputed output, its backward recomputes.
struct BlockwiseAttention {
    /// Taken by the forward (the graph then holds the op's result, not a second copy).
    out: Mutex<Option<Tensor>>,
    lse: Tensor,
    mask: AttentionMask,
    scale: f64,
    geom: Geometry,
}

impl BlockwiseAttention {
    fn take_out(&self) -> Result<Tensor> {
        self.out
            .lock()
            .map_err(|_| candle_core::Error::Msg("blockwise attention: poisoned lock".into()))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg("blockwise attention: forward ran twice".into()))
    }
}

/// The storage of a fresh contiguous tensor, or an error naming what is wrong with it.
fn fresh(layout: &Layout) -> Result<()> {
    if layout.is_contiguous() && layout.start_offset() == 0 {
        Ok(())
    } else {
        candle_core::bail!("blockwise attention: output is not a fresh contiguous tensor")
    }
}

impl CustomOp3 for BlockwiseAttention {
    fn name(&self) -> &'static str {
        "blockwise-attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = self.take_out()?;
        let (storage, layout) = out.storage_and_layout();
        fresh(layout)?;
        match &*storage {
            Storage::Cpu(c) => Ok((c.clone(), layout.shape().clone())),
            _ => candle_core::bail!("blockwise attention: output is not on the CPU"),
        }
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let out = self.take_out()?;
        let (storage, layout) = out.storage_and_layout();
        fresh(layout)?;
        match &*storage {
            Storage::Cuda(c) => Ok((c.try_clone(layout)?, layout.shape().clone())),
            _ => candle_core::bail!("blockwise attention: output is not on the CUDA device"),
        }
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dq, dk, dv) = backward(
            &self.geom,
            &q.detach(),
            &k.detach(),
            &v.detach(),
            &res.detach(),
            &grad.detach(),
            &self.lse,
            &self.mask,
            self.scale,
        )?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}
