//! `multi_modal_projector` (LLaVA `mm_projector`, type `mlp2x_gelu`): linear_1 → erf GELU → linear_2.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::model::ops::{self, Linear};

/// Projector shape; for LLaVA-NeXT it follows from the vision and text hidden sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProjectorConfig {
    pub vision_hidden_size: usize,
    pub text_hidden_size: usize,
    pub bias: bool,
}

impl ProjectorConfig {
    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (v, t) = (self.vision_hidden_size, self.text_hidden_size);
        let mut out = vec![("linear_1.weight".to_string(), vec![t, v])];
        if self.bias {
            out.push(("linear_1.bias".into(), vec![t]));
        }
        out.push(("linear_2.weight".into(), vec![t, t]));
        if self.bias {
            out.push(("linear_2.bias".into(), vec![t]));
        }
        out
    }
}

#[derive(Debug, Clone)]
pub struct MultiModalProjector {
    linear_1: Linear,
    linear_2: Linear,
}

impl MultiModalProjector {
    /// Missing weights are drawn like PyTorch's default Linear init (fresh pretraining projector).
    pub fn new(cfg: &ProjectorConfig, vb: VarBuilder) -> Result<Self> {
        let (v, t) = (cfg.vision_hidden_size, cfg.text_hidden_size);
        Ok(Self {
            linear_1: ops::linear(v, t, cfg.bias, vb.pp("linear_1"))?,
            linear_2: ops::linear(t, t, cfg.bias, vb.pp("linear_2"))?,
        })
    }
}

impl Module for MultiModalProjector {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.linear_2
            .forward(&self.linear_1.forward(xs)?.gelu_erf()?)
    }
}
