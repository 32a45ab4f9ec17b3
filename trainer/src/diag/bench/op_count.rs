//! Tensor ops of attention and of whole decoder layers (`bench --count-ops`): how many kernel
//! launches and views a step makes, the figure that bounds small-batch GPU speed.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use serde::Serialize;

use crate::model::attention::AttentionKind;
use crate::{Error, Result};

/// Tensors candle has created in this process so far: its `TensorId` counter, which every op
/// (a kernel launch, or a view such as `narrow` / `reshape`) advances by one. Reading it creates
/// one tensor, which the callers subtract.
fn tensors_created() -> Result<u64> {
    let probe = Tensor::zeros((), DType::F32, &Device::Cpu)?;
    let text = format!("{:?}", probe.id());
    text.trim_start_matches("TensorId(")
        .trim_end_matches(')')
        .parse()
        .map_err(|_| Error::Config(format!("unexpected tensor id {text:?}")))
}

/// Tensors created by `forward`, and by the backward of `(forward() * g).sum()`, each span
/// including the one probe tensor of the counter read that ends it.
fn forward_backward_ops(forward: impl FnOnce() -> Result<Tensor>, g: &Tensor) -> Result<LayerOps> {
    let c0 = tensors_created()?;
    let y = forward()?;
    let c1 = tensors_created()?;
    let loss = (y * g)?.sum_all()?;
    let c2 = tensors_created()?;
    let grads = loss.backward()?;
    let c3 = tensors_created()?;
    drop(grads);
    Ok(LayerOps {
        forward_ops: c1 - c0,
        backward_ops: c3 - c2,
    })
}

/// Tensor ops of one decoder layer's attention (forward, and backward through autograd).
#[derive(Debug, Clone, Serialize)]
pub struct AttentionOpCount {
    pub seq: usize,
    pub attention: String,
    pub forward_ops: u64,
    pub backward_ops: u64,
    /// Whole decoder layers (norms, projections, RoPE, attention, MLP), two in a row sharing
    /// one mask as a model's layers do: the first and the second layer's forward and backward.
    pub layers: [LayerOps; 2],
    /// What is counted.
    pub method: String,
}

/// Tensor ops of one whole decoder layer.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct LayerOps {
    pub forward_ops: u64,
    pub backward_ops: u64,
}

/// Counts the tensor ops of one causal attention call over `seq` tokens (Llama-3's 4:1 query
/// to key/value heads) and of its backward. The count depends on the number of blocks, not on
/// the head count or size, so small heads give the 8B model's count at a fraction of the work.
pub fn count_attention_ops(
    seq: usize,
    kind: AttentionKind,
    dev: &Device,
) -> Result<AttentionOpCount> {
    let (hq, hkv, d) = (4, 1, 8);
    let q = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, hq, seq, d), dev)?)?;
    let k = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, hkv, seq, d), dev)?)?;
    let v = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, hkv, seq, d), dev)?)?;
    let mask = crate::model::attention::AttentionMask::causal(&[seq], seq, dev)?;
    let g = Tensor::randn(0f32, 1.0, (1, hq, seq, d), dev)?;
    let scale = 1.0 / (d as f64).sqrt();
    let ops = forward_backward_ops(
        || {
            Ok(crate::model::attention::attend(
                &q, &k, &v, &mask, scale, kind,
            )?)
        },
        &g,
    )?;
    let layers = count_layer_ops(seq, kind, dev)?;
    Ok(AttentionOpCount {
        seq,
        attention: kind.to_string(),
        // Without the probe tensor of the counter read that ends each span.
        forward_ops: ops.forward_ops - 1,
        backward_ops: ops.backward_ops - 1,
        layers,
        method: "tensors candle creates (its TensorId counter): every kernel launch makes one, \
                 and so does every view (narrow, reshape, transpose)"
            .into(),
    })
}

/// Two small decoder layers (4 query heads, 1 key/value head, head size 8) over one `seq`-token
/// sample, sharing one layer context as a model's layers do; each layer's forward and backward
/// from its own input (the count depends on the blocks, not on the sizes). The first builds the
/// mask's partial-block biases, the second reuses them.
fn count_layer_ops(seq: usize, kind: AttentionKind, dev: &Device) -> Result<[LayerOps; 2]> {
    use crate::model::llama::{LayerContext, LlamaConfig, LlamaDecoderLayer};
    let cfg = LlamaConfig {
        vocab_size: 16,
        hidden_size: 32,
        intermediate_size: 64,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 1,
        head_dim: Some(8),
        max_position_embeddings: seq.max(1),
        ..LlamaConfig::llama3_8b()
    };
    let varmap = VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, dev);
    let layers = [
        LlamaDecoderLayer::new(&cfg, vb.pp("layers.0"))?,
        LlamaDecoderLayer::new(&cfg, vb.pp("layers.1"))?,
    ];
    let ctx = LayerContext::causal(&cfg, &[seq], seq, DType::F32, dev, kind)?;
    let mut out = [LayerOps {
        forward_ops: 0,
        backward_ops: 0,
    }; 2];
    for (i, layer) in layers.iter().enumerate() {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, seq, cfg.hidden_size), dev)?)?;
        let g = Tensor::randn(0f32, 1.0, (1, seq, cfg.hidden_size), dev)?;
        out[i] = forward_backward_ops(|| Ok(layer.forward(&x, &ctx)?), &g)?;
    }
    Ok(out)
}
