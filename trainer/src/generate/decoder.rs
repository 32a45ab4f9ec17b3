//! The language model with a KV cache, for decoding: the same weights and arithmetic as HF's
//! eager Llama (scores and softmax in f32, RoPE tables in f32 cast to the activations' dtype),
//! over left-padded rows. Row `r` has `pad[r]` padding columns on the left: its positions count
//! from its first real column, and no query ever sees a padding key, so a row's tokens do not
//! depend on the other rows of the batch.

use candle_core::{DType, Device, Module, Tensor, D};

use crate::model::llama::{LlamaForCausalLM, Rope};
use crate::model::ops;
use crate::Result;

/// A large negative bias rather than -inf: a padding query sees no key at all, and a uniform
/// softmax keeps its (unused) output finite instead of NaN.
const MASKED: f32 = f32::MIN;

/// Keys and values of every layer seen so far, `[B, kv_heads, T, head_dim]` each.
pub struct Decoder<'a> {
    lm: &'a LlamaForCausalLM,
    rope: Rope,
    cache: Vec<Option<(Tensor, Tensor)>>,
    pad: Vec<usize>,
    /// Columns in the cache (padding included).
    len: usize,
}

impl<'a> Decoder<'a> {
    /// A decoder for rows of at most `max_len` columns; `pad[r]`: left padding of row `r`.
    pub fn new(lm: &'a LlamaForCausalLM, pad: Vec<usize>, max_len: usize) -> Result<Self> {
        let rope = Rope::new(lm.config(), max_len.max(1), DType::F32, lm.device())?;
        Ok(Self {
            lm,
            rope,
            cache: vec![None; lm.layers().len()],
            pad,
            len: 0,
        })
    }

    /// Columns processed so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Runs `embeds` (`[B, L, H]`, the next `L` columns of every row) through the model,
    /// appending to the cache; returns the f32 logits of the last column, `[B, V]`.
    pub fn forward(&mut self, embeds: &Tensor) -> Result<Tensor> {
        let (b, l, _) = embeds.dims3()?;
        if b != self.pad.len() {
            return Err(crate::Error::Batch(format!(
                "{b} rows for a decoder of {}",
                self.pad.len()
            )));
        }
        let dev = embeds.device().clone();
        let start = self.len;
        let total = start + l;
        let (cos, sin) = self.rope_at(start, l, &dev)?;
        let bias = self.bias(start, l, &dev)?;
        let cfg = self.lm.config();
        let (nh, nkv, d) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim(),
        );
        let scale = 1.0 / (d as f64).sqrt();
        let mut x = embeds.clone();
        for (li, layer) in self.lm.layers().iter().enumerate() {
            let (attn, mlp, ln1, ln2) = layer.parts();
            let (qp, kp, vp, op) = attn.projections();
            let h = ln1.forward(&x)?;
            let heads = |t: Tensor, n: usize| -> candle_core::Result<Tensor> {
                t.reshape((b, l, n, d))?.transpose(1, 2)?.contiguous()
            };
            let q = rope(&heads(qp.forward(&h)?, nh)?, &cos, &sin)?;
            let k = rope(&heads(kp.forward(&h)?, nkv)?, &cos, &sin)?;
            let v = heads(vp.forward(&h)?, nkv)?;
            let (k, v) = match self.cache[li].take() {
                Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
                None => (k, v),
            };
            self.cache[li] = Some((k.clone(), v.clone()));
            let k = repeat_kv(&k, nh / nkv, total)?;
            let v = repeat_kv(&v, nh / nkv, total)?;
            let dtype = q.dtype();
            let scores = (q
                .to_dtype(DType::F32)?
                .matmul(&k.to_dtype(DType::F32)?.t()?)?
                * scale)?
                .broadcast_add(&bias)?;
            let p = ops::softmax_last_dim(&scores)?.to_dtype(dtype)?;
            let o = p
                .matmul(&v.contiguous()?)?
                .transpose(1, 2)?
                .reshape((b, l, nh * d))?;
            x = (x + op.forward(&o)?)?;
            x = (&x + mlp.forward(&ln2.forward(&x)?)?)?;
        }
        self.len = total;
        let last = x.narrow(1, l - 1, 1)?.squeeze(1)?;
        let last = self.lm.final_norm(&last)?;
        Ok(self.lm.lm_head_logits(&last)?)
    }

    /// RoPE tables of columns `start..start + l` of every row, `[B, 1, l, d]`.
    fn rope_at(&self, start: usize, l: usize, dev: &Device) -> Result<(Tensor, Tensor)> {
        let mut pos = Vec::with_capacity(self.pad.len() * l);
        for &p in &self.pad {
            pos.extend((start..start + l).map(|c| c.saturating_sub(p) as u32));
        }
        let b = self.pad.len();
        let idx = Tensor::from_vec(pos, b * l, dev)?;
        let d = self.rope.cos().dim(1)?;
        let pick =
            |t: &Tensor| -> Result<Tensor> { Ok(t.index_select(&idx, 0)?.reshape((b, 1, l, d))?) };
        Ok((pick(self.rope.cos())?, pick(self.rope.sin())?))
    }

    /// `[B, 1, l, start + l]` f32: 0 where query column `start + i` may see key column `j`
    /// (causal, not padding), [`MASKED`] elsewhere.
    fn bias(&self, start: usize, l: usize, dev: &Device) -> Result<Tensor> {
        let total = start + l;
        let mut v = Vec::with_capacity(self.pad.len() * l * total);
        for &p in &self.pad {
            for i in 0..l {
                let c = start + i;
                v.extend((0..total).map(|j| if j >= p && j <= c { 0.0 } else { MASKED }));
            }
        }
        Ok(Tensor::from_vec(v, (self.pad.len(), 1, l, total), dev)?)
    }
}

/// HF `apply_rotary_pos_emb` (rotate_half layout); tables cast to the activations' dtype.
fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let (cos, sin) = (cos.to_dtype(x.dtype())?, sin.to_dtype(x.dtype())?);
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
}

/// `[B, nkv, T, d]` → `[B, nkv * n_rep, T, d]` (each KV head serves `n_rep` query heads).
fn repeat_kv(x: &Tensor, n_rep: usize, t: usize) -> candle_core::Result<Tensor> {
    if n_rep == 1 {
        return Ok(x.clone());
    }
    let (b, nkv, _, d) = x.dims4()?;
    x.unsqueeze(2)?
        .broadcast_as((b, nkv, n_rep, t, d))?
        .reshape((b, nkv * n_rep, t, d))
}
