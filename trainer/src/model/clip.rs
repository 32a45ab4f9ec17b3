//! CLIP vision tower (HF `CLIPVisionModel`), returning the hidden state LLaVA selects.
//!
//! Names mirror the checkpoint: `embeddings.{class_embedding, patch_embedding.weight,
//! position_embedding.weight}`, `pre_layrnorm`, `encoder.layers.N.{self_attn, layer_norm1, mlp,
//! layer_norm2}`, `post_layernorm` (loaded and saved, never applied, as in LLaVA).

use candle_core::{Module, Result, Tensor, D};
use candle_nn::{Init, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::model::attention::{self, AttentionKind, AttentionMask};
use crate::model::ops::{self, LayerNorm, Linear};

/// Activation of the CLIP MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClipActivation {
    QuickGelu,
    /// Exact erf GELU.
    Gelu,
}

/// `vision_config` of an HF LLaVA-NeXT / CLIP config; defaults are CLIP ViT-L/14-336.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub layer_norm_eps: f64,
    pub hidden_act: ClipActivation,
}

impl Default for ClipVisionConfig {
    fn default() -> Self {
        Self::clip_vit_l_14_336()
    }
}

impl ClipVisionConfig {
    /// `openai/clip-vit-large-patch14-336`.
    pub fn clip_vit_l_14_336() -> Self {
        ClipVisionConfig {
            hidden_size: 1024,
            intermediate_size: 4096,
            num_hidden_layers: 24,
            num_attention_heads: 16,
            num_channels: 3,
            image_size: 336,
            patch_size: 14,
            layer_norm_eps: 1e-5,
            hidden_act: ClipActivation::QuickGelu,
        }
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        let h = self.hidden_size;
        if self.patch_size == 0 || self.num_attention_heads == 0 || h == 0 {
            return Err(
                "vision hidden_size, patch_size and num_attention_heads must be > 0".into(),
            );
        }
        if h.checked_rem(self.num_attention_heads) != Some(0)
            || self.image_size.checked_rem(self.patch_size) != Some(0)
        {
            return Err(format!(
                "vision hidden_size {h} / heads {} or image_size {} / patch_size {} do not divide",
                self.num_attention_heads, self.image_size, self.patch_size
            ));
        }
        Ok(())
    }

    /// Patches per side of one tile (24 for 336/14).
    pub fn grid_size(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Positions per tile: CLS + patches.
    pub fn num_positions(&self) -> usize {
        self.grid_size() * self.grid_size() + 1
    }

    /// Every parameter's name (relative to the vision model) and shape.
    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let mut v = vec![
            ("embeddings.class_embedding".into(), vec![h]),
            (
                "embeddings.patch_embedding.weight".into(),
                vec![h, self.num_channels, self.patch_size, self.patch_size],
            ),
            (
                "embeddings.position_embedding.weight".into(),
                vec![self.num_positions(), h],
            ),
            ("pre_layrnorm.weight".into(), vec![h]),
            ("pre_layrnorm.bias".into(), vec![h]),
        ];
        for l in 0..self.num_hidden_layers {
            let p = format!("encoder.layers.{l}");
            for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                v.push((format!("{p}.self_attn.{proj}.weight"), vec![h, h]));
                v.push((format!("{p}.self_attn.{proj}.bias"), vec![h]));
            }
            for ln in ["layer_norm1", "layer_norm2"] {
                v.push((format!("{p}.{ln}.weight"), vec![h]));
                v.push((format!("{p}.{ln}.bias"), vec![h]));
            }
            v.push((format!("{p}.mlp.fc1.weight"), vec![i, h]));
            v.push((format!("{p}.mlp.fc1.bias"), vec![i]));
            v.push((format!("{p}.mlp.fc2.weight"), vec![h, i]));
            v.push((format!("{p}.mlp.fc2.bias"), vec![h]));
        }
        v.push(("post_layernorm.weight".into(), vec![h]));
        v.push(("post_layernorm.bias".into(), vec![h]));
        v
    }

    /// Number of encoder layers to run so that the output is HF's `hidden_states[layer]`
    /// (`hidden_states[0]` = embeddings after pre_layrnorm; negative counts from the end).
    pub fn layers_for_feature_layer(&self, layer: i64) -> Option<usize> {
        let n = self.num_hidden_layers as i64 + 1;
        let idx = if layer < 0 { n + layer } else { layer };
        (0..n).contains(&idx).then_some(idx as usize)
    }
}

#[derive(Debug, Clone)]
pub struct ClipEmbeddings {
    class_embedding: Tensor,
    patch_embedding: Tensor,
    position_embedding: Tensor,
    patch_size: usize,
}

impl ClipEmbeddings {
    pub fn new(cfg: &ClipVisionConfig, vb: VarBuilder) -> Result<Self> {
        let h = cfg.hidden_size;
        let p = cfg.patch_size;
        let class_embedding = vb.get_with_hints(
            h,
            "class_embedding",
            Init::Randn {
                mean: 0.0,
                stdev: 1.0,
            },
        )?;
        let patch_embedding = vb.pp("patch_embedding").get_with_hints(
            (h, cfg.num_channels, p, p),
            "weight",
            Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
        )?;
        let position_embedding = vb.pp("position_embedding").get_with_hints(
            (cfg.num_positions(), h),
            "weight",
            Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
        )?;
        Ok(Self {
            class_embedding,
            patch_embedding,
            position_embedding,
            patch_size: p,
        })
    }

    /// `pixels`: `[N, C, S, S]` → `[N, 1 + (S/p)², hidden]`.
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let (n, c, hgt, wid) = pixels.dims4()?;
        let p = self.patch_size;
        let (gh, gw) = (hgt / p, wid / p);
        let hidden = self.patch_embedding.dim(0)?;
        // Stride == kernel, so the patch conv is an unfold + matmul (cheaper, same numbers).
        let patches = pixels
            .to_dtype(self.patch_embedding.dtype())?
            .reshape((n, c, gh, p, gw, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .reshape((n, gh * gw, c * p * p))?;
        let w = self.patch_embedding.reshape((hidden, c * p * p))?;
        let patch_embeds = patches.broadcast_matmul(&w.t()?)?;
        let cls = self
            .class_embedding
            .reshape((1, 1, hidden))?
            .broadcast_as((n, 1, hidden))?;
        let embeds = Tensor::cat(&[&cls, &patch_embeds], 1)?;
        let pos = self.position_embedding.narrow(0, 0, gh * gw + 1)?;
        embeds.broadcast_add(&pos)
    }
}

#[derive(Debug, Clone)]
pub struct ClipAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    num_heads: usize,
    head_dim: usize,
}

impl ClipAttention {
    pub fn new(cfg: &ClipVisionConfig, vb: VarBuilder) -> Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            q_proj: ops::linear(h, h, true, vb.pp("q_proj"))?,
            k_proj: ops::linear(h, h, true, vb.pp("k_proj"))?,
            v_proj: ops::linear(h, h, true, vb.pp("v_proj"))?,
            out_proj: ops::linear(h, h, true, vb.pp("out_proj"))?,
            num_heads: cfg.num_attention_heads,
            head_dim: h / cfg.num_attention_heads,
        })
    }
}

impl ClipAttention {
    /// Bidirectional attention over each tile's positions.
    pub fn forward(&self, xs: &Tensor, kind: AttentionKind) -> Result<Tensor> {
        let (n, l, h) = xs.dims3()?;
        let heads = |t: Tensor| -> Result<Tensor> {
            t.reshape((n, l, self.num_heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = heads(self.q_proj.forward(xs)?)?;
        let k = heads(self.k_proj.forward(xs)?)?;
        let v = heads(self.v_proj.forward(xs)?)?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let mask = AttentionMask::bidirectional(n, l, xs.device())?;
        let out = attention::attend(&q, &k, &v, &mask, scale, kind)?
            .transpose(1, 2)?
            .reshape((n, l, h))?;
        self.out_proj.forward(&out)
    }
}

#[derive(Debug, Clone)]
pub struct ClipMlp {
    fc1: Linear,
    fc2: Linear,
    act: ClipActivation,
}

impl ClipMlp {
    pub fn new(cfg: &ClipVisionConfig, vb: VarBuilder) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            fc1: ops::linear(h, i, true, vb.pp("fc1"))?,
            fc2: ops::linear(i, h, true, vb.pp("fc2"))?,
            act: cfg.hidden_act,
        })
    }
}

impl Module for ClipMlp {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let x = self.fc1.forward(xs)?;
        let x = match self.act {
            ClipActivation::QuickGelu => ops::quick_gelu(&x)?,
            ClipActivation::Gelu => x.gelu_erf()?,
        };
        self.fc2.forward(&x)
    }
}

#[derive(Debug, Clone)]
pub struct ClipEncoderLayer {
    self_attn: ClipAttention,
    layer_norm1: LayerNorm,
    mlp: ClipMlp,
    layer_norm2: LayerNorm,
}

impl ClipEncoderLayer {
    pub fn new(cfg: &ClipVisionConfig, vb: VarBuilder) -> Result<Self> {
        let (h, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
        Ok(Self {
            self_attn: ClipAttention::new(cfg, vb.pp("self_attn"))?,
            layer_norm1: LayerNorm::new(h, eps, vb.pp("layer_norm1"))?,
            mlp: ClipMlp::new(cfg, vb.pp("mlp"))?,
            layer_norm2: LayerNorm::new(h, eps, vb.pp("layer_norm2"))?,
        })
    }
}

impl ClipEncoderLayer {
    pub fn forward(&self, xs: &Tensor, kind: AttentionKind) -> Result<Tensor> {
        let x = (xs
            + self
                .self_attn
                .forward(&self.layer_norm1.forward(xs)?, kind)?)?;
        &x + self.mlp.forward(&self.layer_norm2.forward(&x)?)?
    }
}

/// `vision_model` of HF CLIP.
#[derive(Debug, Clone)]
pub struct ClipVisionModel {
    embeddings: ClipEmbeddings,
    pre_layrnorm: LayerNorm,
    layers: Vec<ClipEncoderLayer>,
    /// Held so the weight is part of the model (and saved); LLaVA never applies it.
    #[allow(dead_code)]
    post_layernorm: LayerNorm,
    attention: AttentionKind,
}

impl ClipVisionModel {
    /// `vb` points at the `vision_model` prefix.
    pub fn new(cfg: &ClipVisionConfig, vb: VarBuilder) -> Result<Self> {
        let (h, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
        let embeddings = ClipEmbeddings::new(cfg, vb.pp("embeddings"))?;
        let pre_layrnorm = LayerNorm::new(h, eps, vb.pp("pre_layrnorm"))?;
        let vl = vb.pp("encoder").pp("layers");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| ClipEncoderLayer::new(cfg, vl.pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let post_layernorm = LayerNorm::new(h, eps, vb.pp("post_layernorm"))?;
        Ok(Self {
            embeddings,
            pre_layrnorm,
            layers,
            post_layernorm,
            // 577-token tiles: the dense score matrix is small and its backward is one matmul.
            attention: AttentionKind::Dense,
        })
    }

    /// HF `hidden_states[0]`: embeddings after `pre_layrnorm`.
    pub fn embed(&self, pixels: &Tensor) -> Result<Tensor> {
        self.pre_layrnorm.forward(&self.embeddings.forward(pixels)?)
    }

    /// Output after the first `num_layers` encoder layers (HF `hidden_states[num_layers]`,
    /// CLS at position 0). Layers past it are not computed, so they get no gradient, as in HF.
    pub fn forward_to_layer(&self, pixels: &Tensor, num_layers: usize) -> Result<Tensor> {
        if num_layers > self.layers.len() {
            candle_core::bail!(
                "vision feature layer {num_layers} > {} encoder layers",
                self.layers.len()
            )
        }
        let mut x = self.embed(pixels)?;
        for layer in &self.layers[..num_layers] {
            x = layer.forward(&x, self.attention)?;
        }
        Ok(x)
    }

    /// Encoder layer `k` (0-based) on `[N, 1 + g², C]` hidden states.
    pub fn forward_layer(&self, k: usize, x: &Tensor) -> Result<Tensor> {
        match self.layers.get(k) {
            Some(layer) => layer.forward(x, self.attention),
            None => candle_core::bail!("vision encoder layer {k} of {}", self.layers.len()),
        }
    }

    pub fn attention(&self) -> AttentionKind {
        self.attention
    }

    pub fn set_attention(&mut self, kind: AttentionKind) {
        self.attention = kind;
    }
}

/// Drop CLS (`vision_feature_select_strategy = "default"`, LLaVA `patch`).
pub fn drop_cls(hidden: &Tensor) -> Result<Tensor> {
    let l = hidden.dim(D::Minus2)?;
    hidden.narrow(1, 1, l - 1)
}
