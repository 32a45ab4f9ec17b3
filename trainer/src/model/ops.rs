//! Differentiable forms of the fused candle-nn kernels.
//!
//! candle-nn's `softmax_last_dim`, `rms_norm`, `layer_norm` and `rope` have no backward pass and
//! silently cut the autograd graph, so the training path only uses primitive ops. Reductions run in
//! f32 whatever the parameter dtype, as PyTorch's autocast does.

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp2, DType, Layout, Module, Result, Shape, Tensor, D,
};

/// TF32 tensor cores for f32 matmuls on CUDA (PyTorch's `allow_tf32`; the recipe's
/// `--tf32 True`): process-wide, a no-op without CUDA.
pub fn set_tf32(on: bool) {
    candle_core::cuda::set_gemm_reduced_precision_f32(on);
}

/// Softmax over the last dimension, computed in f32 and cast back to the input dtype.
pub fn softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    let dtype = xs.dtype();
    let xs = xs.to_dtype(DType::F32)?;
    // Shift invariance: the max needs no gradient, detaching it avoids a useless argmax path.
    let max = xs.max_keepdim(D::Minus1)?.detach();
    let e = xs.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&s)?.to_dtype(dtype)
}

/// Log-sum-exp over the last dimension (f32 in, f32 out), keeping the reduced dim.
pub fn logsumexp_last_dim(xs: &Tensor) -> Result<Tensor> {
    let max = xs.max_keepdim(D::Minus1)?.detach();
    let s = xs.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?;
    s.log()?.broadcast_add(&max)
}

/// `x * sigmoid(1.702 x)` (CLIP's quick_gelu).
pub fn quick_gelu(xs: &Tensor) -> Result<Tensor> {
    let sig = (xs.affine(-1.702, 0.0)?.exp()? + 1.0)?.recip()?;
    xs * sig
}

/// LayerNorm with weight and bias (biased variance, as torch).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(size: usize, eps: f64, vb: candle_nn::VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(size, "weight", candle_nn::Init::Const(1.0))?;
        let bias = vb.get_with_hints(size, "bias", candle_nn::Init::Const(0.0))?;
        Ok(Self { weight, bias, eps })
    }
}

impl Module for LayerNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let dtype = xs.dtype();
        let x = xs.to_dtype(DType::F32)?;
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let xn = xc.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        let w = self.weight.to_dtype(DType::F32)?;
        let b = self.bias.to_dtype(DType::F32)?;
        xn.broadcast_mul(&w)?.broadcast_add(&b)?.to_dtype(dtype)
    }
}

/// Llama RMSNorm: normalise in f32, cast back, then scale (HF order).
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn new(size: usize, eps: f64, vb: candle_nn::VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(size, "weight", candle_nn::Init::Const(1.0))?;
        Ok(Self { weight, eps })
    }
}

impl Module for RmsNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let dtype = xs.dtype();
        let x = xs.to_dtype(DType::F32)?;
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
        let xn = x
            .broadcast_div(&(ms + self.eps)?.sqrt()?)?
            .to_dtype(dtype)?;
        xn.broadcast_mul(&self.weight)
    }
}

/// Linear layer, weights `[out, in]` as in PyTorch. Unlike `candle_nn::Linear`, the input is
/// flattened to 2-D before the matmul: a batch-broadcast weight would make backward materialise
/// one weight-sized gradient per batch row before summing them.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let dims = xs.dims().to_vec();
        let (lead, in_dim) = dims.split_at(dims.len().saturating_sub(1));
        let rows: usize = lead.iter().product();
        let in_dim = in_dim.first().copied().unwrap_or(1);
        let out_dim = self.weight.dim(0)?;
        let y = matmul_wt(&xs.reshape((rows, in_dim))?, &self.weight)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut shape = lead.to_vec();
        shape.push(out_dim);
        y.reshape(shape)
    }
}

/// `x · wᵀ` for `x: [M, K]`, `w: [N, K]` whose backward computes only the gradients that are
/// needed. candle's matmul backward always computes both operands' gradients, so a frozen
/// weight (a detached tensor) would still cost a weight-sized gradient (`2·M·N·K` FLOPs and
/// `N·K` elements, 2.1 GB for the 8B `lm_head` in f32) in every backward, and an input without
/// history (the projector's input in stage 1) an input-sized one. The forward is candle's own
/// matmul kernel on the same layouts, so the values are the same as `x.matmul(&w.t())`.
pub fn matmul_wt(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    // Both gradients (or none) needed: candle's own matmul. Measured: the custom op with both
    // gradients raised a full 8B-shape step's peak by one `lm_head`-sized tensor.
    if x.track_op() == w.track_op() {
        return x.matmul(&w.t()?);
    }
    x.apply_op2(w, LinearOp)
}

/// The custom op behind [`matmul_wt`]: candle records it in the graph with its two arguments,
/// and its backward asks each argument whether it carries a gradient.
struct LinearOp;

impl LinearOp {
    fn dims(l1: &Layout, l2: &Layout) -> Result<(usize, usize, usize, Layout)> {
        let (m, k) = l1.shape().dims2()?;
        let (n, k2) = l2.shape().dims2()?;
        if k != k2 {
            candle_core::bail!("linear: input [{m}, {k}] against weight [{n}, {k2}]");
        }
        Ok((m, n, k, l2.transpose(0, 1)?))
    }
}

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, n, k, wt) = Self::dims(l1, l2)?;
        Ok((s1.matmul(s2, (1, m, n, k), l1, &wt)?, Shape::from((m, n))))
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (m, n, k, wt) = Self::dims(l1, l2)?;
        Ok((s1.matmul(s2, (1, m, n, k), l1, &wt)?, Shape::from((m, n))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // dL/dx = g · w; dL/dw = gᵀ · x; each only for an argument that leads to a variable.
        let gx = if x.track_op() {
            Some(grad.matmul(w)?)
        } else {
            None
        };
        let gw = if w.track_op() {
            Some(grad.t()?.matmul(x)?)
        } else {
            None
        };
        Ok((gx, gw))
    }
}

/// A [`Linear`] named `weight` / `bias` under `vb`; missing weights get PyTorch's default init.
pub fn linear(
    in_dim: usize,
    out_dim: usize,
    bias: bool,
    vb: candle_nn::VarBuilder,
) -> Result<Linear> {
    let bound = 1.0 / (in_dim as f64).sqrt();
    let init = candle_nn::Init::Uniform {
        lo: -bound,
        up: bound,
    };
    let w = vb.get_with_hints((out_dim, in_dim), "weight", init)?;
    let b = if bias {
        Some(vb.get_with_hints(out_dim, "bias", init)?)
    } else {
        None
    };
    Ok(Linear::new(w, b))
}

/// Per-position cross entropy of `logits[:, t]` predicting `labels[:, t + 1]`.
///
/// `logits`: `[B, L, V]` f32; `labels`: `[B, L]` i64 with `ignore` for untrained positions.
/// Returns `(mean over supervised positions, per-token loss [B, L])`; the per-token loss is 0 on
/// ignored targets and on the last position. With no supervised position the mean is 0 (HF: NaN).
pub fn shifted_cross_entropy(
    logits: &Tensor,
    labels: &Tensor,
    ignore: i64,
) -> Result<(Tensor, Tensor)> {
    let (b, l, _v) = logits.dims3()?;
    let dev = logits.device();
    if l < 2 {
        let z = Tensor::zeros((b, l), DType::F32, dev)?;
        return Ok(((logits.sum_all()? * 0.0)?, z));
    }
    let logits = logits
        .narrow(1, 0, l - 1)?
        .to_dtype(DType::F32)?
        .contiguous()?;
    let targets = labels.narrow(1, 1, l - 1)?.to_dtype(DType::I64)?;
    let valid = targets.ne(ignore)?;
    let safe = valid
        .where_cond(&targets, &targets.zeros_like()?)?
        .to_dtype(DType::U32)?;
    let mask = valid.to_dtype(DType::F32)?;
    let lse = logsumexp_last_dim(&logits)?.squeeze(D::Minus1)?;
    let picked = logits
        .gather(&safe.unsqueeze(D::Minus1)?.contiguous()?, D::Minus1)?
        .squeeze(D::Minus1)?;
    let nll = ((lse - picked)? * &mask)?;
    let n = mask.sum_all()?.to_scalar::<f32>()?;
    let loss = (nll.sum_all()? / f64::from(n.max(1.0)))?;
    let per_token = Tensor::cat(&[&nll, &Tensor::zeros((b, 1), DType::F32, dev)?], 1)?;
    Ok((loss, per_token))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn rand(shape: (usize, usize), seed: u64) -> Tensor {
        let n = shape.0 * shape.1;
        let v: Vec<f32> = (0..n)
            .map(|i| (((i as u64 + 1) * (seed * 2 + 7919)) % 1009) as f32 / 504.5 - 1.0)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// Same values and gradients as candle's matmul; a frozen operand gets no gradient entry.
    #[test]
    fn matmul_wt_computes_only_the_needed_gradients() {
        let (x0, w0, g) = (rand((5, 3), 1), rand((4, 3), 2), rand((5, 4), 3));
        let x = Var::from_tensor(&x0).unwrap();
        let w = Var::from_tensor(&w0).unwrap();
        let reference = x.as_tensor().matmul(&w.as_tensor().t().unwrap()).unwrap();
        let ref_store = (&reference * &g)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let ours = matmul_wt(x.as_tensor(), w.as_tensor()).unwrap();
        assert_eq!(max_diff(&ours, &reference), 0.0);
        let store = (&ours * &g).unwrap().sum_all().unwrap().backward().unwrap();
        for v in [&x, &w] {
            let (a, b) = (store.get(v).unwrap(), ref_store.get(v).unwrap());
            assert!(max_diff(a, b) < 1e-6);
        }

        // Frozen weight: the input's gradient only.
        let frozen = w.as_tensor().detach();
        let y = matmul_wt(x.as_tensor(), &frozen).unwrap();
        let store = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(max_diff(store.get(&x).unwrap(), ref_store.get(&x).unwrap()) < 1e-6);
        assert!(store.get(&frozen).is_none());

        // Input without history: the weight's gradient only.
        let input = x.as_tensor().detach();
        let y = matmul_wt(&input, w.as_tensor()).unwrap();
        let store = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(max_diff(store.get(&w).unwrap(), ref_store.get(&w).unwrap()) < 1e-6);
        assert!(store.get(&input).is_none());

        // Nothing trainable: no graph at all.
        assert!(!matmul_wt(&input, &frozen).unwrap().track_op());
    }
}
