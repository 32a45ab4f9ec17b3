//! Llama-3 decoder for training (HF `LlamaForCausalLM`): GQA, half-split RoPE, RMSNorm, SwiGLU,
//! causal + right-padding mask, untied `lm_head`. Full-sequence forward, no KV cache.

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{Embedding, Init, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::model::attention::{self, AttentionKind, AttentionMask};
use crate::model::ops::{self, Linear, RmsNorm};

/// RoPE parameters: HF 4.x `rope_scaling` or HF 5.x `rope_parameters` (which also holds the theta).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RopeParameters {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    #[serde(default, alias = "type", skip_serializing_if = "Option::is_none")]
    pub rope_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub low_freq_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub high_freq_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_max_position_embeddings: Option<usize>,
}

/// `text_config` of an HF LLaVA-NeXT config (or a Llama `config.json`); defaults are Llama-3-8B.
/// HF `LlamaConfig` (`text_config`); a missing field takes its Llama-3-8B value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeParameters>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<RopeParameters>,
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
}

impl Default for LlamaConfig {
    fn default() -> Self {
        Self::llama3_8b()
    }
}

impl LlamaConfig {
    /// `meta-llama/Meta-Llama-3-8B(-Instruct)`.
    pub fn llama3_8b() -> Self {
        LlamaConfig {
            vocab_size: 128256,
            hidden_size: 4096,
            intermediate_size: 14336,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            num_key_value_heads: 8,
            head_dim: None,
            rms_norm_eps: 1e-5,
            rope_theta: 500000.0,
            rope_scaling: None,
            rope_parameters: None,
            max_position_embeddings: 8192,
            tie_word_embeddings: false,
            attention_bias: false,
            mlp_bias: false,
        }
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// Theta and scaling, wherever the config put them (HF 5.x moved both to `rope_parameters`).
    pub fn rope(&self) -> (f64, Option<&RopeParameters>) {
        let theta = self
            .rope_parameters
            .as_ref()
            .and_then(|p| p.rope_theta)
            .unwrap_or(self.rope_theta);
        let scaling = self
            .rope_scaling
            .as_ref()
            .or(self.rope_parameters.as_ref())
            .filter(|p| !matches!(p.rope_type.as_deref(), None | Some("default")));
        (theta, scaling)
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.attention_bias || self.mlp_bias {
            return Err("Llama attention_bias / mlp_bias are not supported".into());
        }
        if self.num_attention_heads == 0 || self.hidden_size == 0 || self.vocab_size == 0 {
            return Err("hidden_size, vocab_size and num_attention_heads must be > 0".into());
        }
        if self
            .num_attention_heads
            .checked_rem(self.num_key_value_heads)
            != Some(0)
        {
            return Err(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if self.head_dim() & 1 == 1 {
            return Err(format!(
                "head_dim {} must be even for RoPE",
                self.head_dim()
            ));
        }
        if let (_, Some(s)) = self.rope() {
            if s.rope_type.as_deref() != Some("llama3") {
                return Err(format!("unsupported rope_type {:?}", s.rope_type));
            }
        }
        Ok(())
    }

    /// Every parameter's name (relative to `LlamaForCausalLM`) and shape.
    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let q = self.num_attention_heads * self.head_dim();
        let kv = self.num_key_value_heads * self.head_dim();
        let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, h])];
        for l in 0..self.num_hidden_layers {
            let p = format!("model.layers.{l}");
            out.push((format!("{p}.self_attn.q_proj.weight"), vec![q, h]));
            out.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, h]));
            out.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, h]));
            out.push((format!("{p}.self_attn.o_proj.weight"), vec![h, q]));
            out.push((format!("{p}.mlp.gate_proj.weight"), vec![i, h]));
            out.push((format!("{p}.mlp.up_proj.weight"), vec![i, h]));
            out.push((format!("{p}.mlp.down_proj.weight"), vec![h, i]));
            out.push((format!("{p}.input_layernorm.weight"), vec![h]));
            out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
        }
        out.push(("model.norm.weight".into(), vec![h]));
        if !self.tie_word_embeddings {
            out.push(("lm_head.weight".into(), vec![v, h]));
        }
        out
    }

    /// RoPE inverse frequencies (f32 as HF), with Llama-3.1 `llama3` scaling when configured.
    fn inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim();
        let (theta, scaling) = self.rope();
        let base: Vec<f32> = (0..d / 2)
            .map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / d as f32))
            .collect();
        let Some(s) = scaling else { return base };
        let factor = s.factor.unwrap_or(8.0);
        let low = s.low_freq_factor.unwrap_or(1.0);
        let high = s.high_freq_factor.unwrap_or(4.0);
        let old_ctx = s.original_max_position_embeddings.unwrap_or(8192) as f64;
        let (low_wl, high_wl) = (old_ctx / low, old_ctx / high);
        base.into_iter()
            .map(|f| {
                let f = f as f64;
                let wl = 2.0 * std::f64::consts::PI / f;
                let out = if wl < high_wl {
                    f
                } else if wl > low_wl {
                    f / factor
                } else {
                    let smooth = (old_ctx / wl - low) / (high - low);
                    (1.0 - smooth) * f / factor + smooth * f
                };
                out as f32
            })
            .collect()
    }
}

/// Rotary tables `cos`, `sin`: `[L, head_dim]` (halves duplicated, HF `rotate_half` layout),
/// or `[B, 1, L, head_dim]` when packed samples restart their positions inside a row.
#[derive(Debug, Clone)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// Positions `0..seq_len` in every row.
    pub fn new(cfg: &LlamaConfig, seq_len: usize, dtype: DType, dev: &Device) -> Result<Self> {
        let (cos, sin) = Self::tables(cfg, seq_len, dev)?;
        Ok(Self {
            cos: cos.to_dtype(dtype)?,
            sin: sin.to_dtype(dtype)?,
        })
    }

    /// The positions of `mask` (restarting at 0 for every packed sample).
    pub fn for_mask(cfg: &LlamaConfig, mask: &AttentionMask, dtype: DType) -> Result<Self> {
        let (b, l, dev) = (mask.batch(), mask.seq_len(), mask.device());
        if mask.positions_are_plain() {
            return Self::new(cfg, l, dtype, dev);
        }
        let (cos, sin) = Self::tables(cfg, l, dev)?;
        let pos = Tensor::from_vec(mask.positions(), b * l, dev)?;
        let d = cos.dim(1)?;
        let pick = |t: &Tensor| -> Result<Tensor> {
            t.index_select(&pos, 0)?
                .reshape((b, 1, l, d))?
                .to_dtype(dtype)
        };
        Ok(Self {
            cos: pick(&cos)?,
            sin: pick(&sin)?,
        })
    }

    /// f32 `cos`, `sin` of positions `0..n`: `[n, head_dim]`.
    fn tables(cfg: &LlamaConfig, n: usize, dev: &Device) -> Result<(Tensor, Tensor)> {
        let inv = cfg.inv_freq();
        let half = inv.len();
        let inv = Tensor::from_vec(inv, (1, half), dev)?;
        let pos = Tensor::arange(0u32, n as u32, dev)?
            .to_dtype(DType::F32)?
            .reshape((n, 1))?;
        let freqs = pos.broadcast_mul(&inv)?;
        let emb = Tensor::cat(&[&freqs, &freqs], 1)?;
        Ok((emb.cos()?, emb.sin()?))
    }

    /// `x`: `[B, heads, L, d]`.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let d = x.dim(D::Minus1)?;
        let x1 = x.narrow(D::Minus1, 0, d / 2)?;
        let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        x.broadcast_mul(&self.cos)? + rotated.broadcast_mul(&self.sin)?
    }
}

/// What every decoder layer of one forward shares: positions, mask and attention algorithm.
#[derive(Debug, Clone)]
pub struct LayerContext {
    pub rope: Rope,
    pub mask: AttentionMask,
    pub attention: AttentionKind,
}

impl LayerContext {
    /// Causal attention over right-padded rows, positions from 0.
    pub fn causal(
        cfg: &LlamaConfig,
        lengths: &[usize],
        seq_len: usize,
        dtype: DType,
        dev: &Device,
        attention: AttentionKind,
    ) -> Result<Self> {
        let mask = AttentionMask::causal(lengths, seq_len, dev)?;
        Self::new(cfg, mask, dtype, attention)
    }

    pub fn new(
        cfg: &LlamaConfig,
        mask: AttentionMask,
        dtype: DType,
        attention: AttentionKind,
    ) -> Result<Self> {
        Ok(Self {
            rope: Rope::for_mask(cfg, &mask, dtype)?,
            mask,
            attention,
        })
    }
}

#[derive(Debug, Clone)]
pub struct LlamaAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl LlamaAttention {
    pub fn new(cfg: &LlamaConfig, vb: VarBuilder) -> Result<Self> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim());
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        Ok(Self {
            q_proj: ops::linear(h, nh * d, false, vb.pp("q_proj"))?,
            k_proj: ops::linear(h, nkv * d, false, vb.pp("k_proj"))?,
            v_proj: ops::linear(h, nkv * d, false, vb.pp("v_proj"))?,
            o_proj: ops::linear(nh * d, h, false, vb.pp("o_proj"))?,
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: d,
        })
    }

    pub fn forward(&self, xs: &Tensor, ctx: &LayerContext) -> Result<Tensor> {
        let (b, l, _) = xs.dims3()?;
        let (nh, nkv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let heads = |t: Tensor, n: usize| -> Result<Tensor> {
            t.reshape((b, l, n, d))?.transpose(1, 2)?.contiguous()
        };
        let q = ctx.rope.apply(&heads(self.q_proj.forward(xs)?, nh)?)?;
        let k = ctx.rope.apply(&heads(self.k_proj.forward(xs)?, nkv)?)?;
        let v = heads(self.v_proj.forward(xs)?, nkv)?;
        let scale = 1.0 / (d as f64).sqrt();
        let out = attention::attend(&q, &k, &v, &ctx.mask, scale, ctx.attention)?
            .transpose(1, 2)?
            .reshape((b, l, nh * d))?;
        self.o_proj.forward(&out)
    }
}

#[derive(Debug, Clone)]
pub struct LlamaMlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl LlamaMlp {
    pub fn new(cfg: &LlamaConfig, vb: VarBuilder) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate_proj: ops::linear(h, i, false, vb.pp("gate_proj"))?,
            up_proj: ops::linear(h, i, false, vb.pp("up_proj"))?,
            down_proj: ops::linear(i, h, false, vb.pp("down_proj"))?,
        })
    }
}

impl Module for LlamaMlp {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let gate = self.gate_proj.forward(xs)?.silu()?;
        self.down_proj.forward(&(gate * self.up_proj.forward(xs)?)?)
    }
}

#[derive(Debug, Clone)]
pub struct LlamaDecoderLayer {
    self_attn: LlamaAttention,
    mlp: LlamaMlp,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
}

impl LlamaDecoderLayer {
    pub fn new(cfg: &LlamaConfig, vb: VarBuilder) -> Result<Self> {
        let (h, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        Ok(Self {
            self_attn: LlamaAttention::new(cfg, vb.pp("self_attn"))?,
            mlp: LlamaMlp::new(cfg, vb.pp("mlp"))?,
            input_layernorm: RmsNorm::new(h, eps, vb.pp("input_layernorm"))?,
            post_attention_layernorm: RmsNorm::new(h, eps, vb.pp("post_attention_layernorm"))?,
        })
    }

    pub fn forward(&self, xs: &Tensor, ctx: &LayerContext) -> Result<Tensor> {
        let x = (xs
            + self
                .self_attn
                .forward(&self.input_layernorm.forward(xs)?, ctx)?)?;
        &x + self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&x)?)?
    }
}

/// `LlamaForCausalLM`: `vb` points at its root (`model.*`, `lm_head`).
#[derive(Debug, Clone)]
pub struct LlamaForCausalLM {
    embed_tokens: Embedding,
    layers: Vec<LlamaDecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    cfg: LlamaConfig,
    attention: AttentionKind,
}

impl LlamaForCausalLM {
    pub fn new(cfg: &LlamaConfig, vb: VarBuilder) -> Result<Self> {
        if let Err(e) = cfg.validate() {
            candle_core::bail!("{e}")
        }
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        let vm = vb.pp("model");
        let emb = vm.pp("embed_tokens").get_with_hints(
            (v, h),
            "weight",
            Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
        )?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| LlamaDecoderLayer::new(cfg, vm.pp("layers").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::new(h, cfg.rms_norm_eps, vm.pp("norm"))?;
        let lm_head = if cfg.tie_word_embeddings {
            Linear::new(emb.clone(), None)
        } else {
            ops::linear(h, v, false, vb.pp("lm_head"))?
        };
        Ok(Self {
            embed_tokens: Embedding::new(emb, h),
            layers,
            norm,
            lm_head,
            cfg: cfg.clone(),
            attention: AttentionKind::default(),
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// Token embeddings of `ids` (any shape, integer dtype, values in `0..vocab`).
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        self.embed_tokens.forward(ids)
    }

    /// `embeds`: `[B, L, H]`; `lengths`: real tokens per row (right padding); positions 0..L-1.
    /// Returns logits `[B, L, V]` in f32.
    pub fn forward_embeds(&self, embeds: &Tensor, lengths: &[usize]) -> Result<Tensor> {
        let x = self.forward_hidden(embeds, lengths)?;
        self.lm_head.forward(&x)?.to_dtype(DType::F32)
    }

    /// Final hidden states `[B, L, H]` (after the last norm, before `lm_head`).
    pub fn forward_hidden(&self, embeds: &Tensor, lengths: &[usize]) -> Result<Tensor> {
        let (b, l, _) = embeds.dims3()?;
        if lengths.len() != b {
            candle_core::bail!("{} lengths for a batch of {b}", lengths.len())
        }
        let ctx = LayerContext::causal(
            &self.cfg,
            lengths,
            l,
            embeds.dtype(),
            embeds.device(),
            self.attention,
        )?;
        self.forward_hidden_ctx(embeds, &ctx)
    }

    /// Final hidden states for any mask (packed rows included).
    pub fn forward_hidden_ctx(&self, embeds: &Tensor, ctx: &LayerContext) -> Result<Tensor> {
        let mut x = embeds.clone();
        for layer in &self.layers {
            x = layer.forward(&x, ctx)?;
        }
        self.norm.forward(&x)
    }

    /// Decoder layers (the segments of the recomputed backward).
    pub fn layers(&self) -> &[LlamaDecoderLayer] {
        &self.layers
    }

    /// The final RMSNorm.
    pub fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        self.norm.forward(x)
    }

    /// `lm_head` on `[N, H]` hidden states: `[N, V]` logits in f32.
    pub fn lm_head_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.lm_head.forward(hidden)?.to_dtype(DType::F32)
    }

    /// Attention algorithm of the decoder layers.
    pub fn attention(&self) -> AttentionKind {
        self.attention
    }

    pub fn set_attention(&mut self, kind: AttentionKind) {
        self.attention = kind;
    }

    pub fn device(&self) -> &Device {
        self.embed_tokens.embeddings().device()
    }

    pub fn dtype(&self) -> DType {
        self.embed_tokens.embeddings().dtype()
    }
}

/// Read-only views of the weights for inference code with its own attention (the KV-cache
/// decoder of `generate`); the training forward does not use them.
impl Rope {
    /// `[L, head_dim]` (or `[B, 1, L, head_dim]`) cosine table.
    pub fn cos(&self) -> &Tensor {
        &self.cos
    }

    /// Sine table, same shape as [`Rope::cos`].
    pub fn sin(&self) -> &Tensor {
        &self.sin
    }
}

impl LlamaAttention {
    /// `(q_proj, k_proj, v_proj, o_proj)`.
    pub fn projections(&self) -> (&Linear, &Linear, &Linear, &Linear) {
        (&self.q_proj, &self.k_proj, &self.v_proj, &self.o_proj)
    }
}

impl LlamaDecoderLayer {
    /// `(self_attn, mlp, input_layernorm, post_attention_layernorm)`.
    pub fn parts(&self) -> (&LlamaAttention, &LlamaMlp, &RmsNorm, &RmsNorm) {
        (
            &self.self_attn,
            &self.mlp,
            &self.input_layernorm,
            &self.post_attention_layernorm,
        )
    }
}
