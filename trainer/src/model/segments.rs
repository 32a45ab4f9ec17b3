//! The model as a chain of segments, for the training step's recomputed backward
//! (`crate::train::step`): vision embeddings, each vision layer, the merge (projector, anyres
//! merge, placement), each decoder layer, and the head's chunked loss. Each takes the previous
//! one's output; run in order they are [`LlavaNext::forward_loss`].

use candle_core::{DType, Module, Tensor};

use crate::model::attention::{AttentionKind, AttentionMask};
use crate::model::batch::Batch;
use crate::model::clip;
use crate::model::llama::LayerContext;
use crate::model::llava_next::LlavaNext;
use crate::model::ops;
use crate::model::prepare::Prepared;
use crate::{Error, Result};

impl LlavaNext {
    /// Vision segment 0: patch + position embeddings and `pre_layrnorm` of every tile.
    pub fn vision_embed(&self, pixel_values: &Tensor) -> Result<Tensor> {
        Ok(self.vision_tower.embed(pixel_values)?)
    }

    /// Vision encoder layer `k`; layers `0..vision_layers()` are used.
    pub fn vision_layer(&self, k: usize, x: &Tensor) -> Result<Tensor> {
        Ok(self.vision_tower.forward_layer(k, x)?)
    }

    /// Encoder layers that run (those after the selected feature layer never do).
    pub fn vision_layers(&self) -> usize {
        self.vision_layers
    }

    /// Projector, anyres merge and placement at the placeholders: the input embeddings
    /// `[B, L', H]` from the selected vision layer (None for a text-only batch).
    pub fn merge(&self, vision: Option<&Tensor>, batch: &Batch, prep: &Prepared) -> Result<Tensor> {
        let packed = match vision {
            Some(hidden) => {
                let feats = if self.cfg.vision_feature_select_strategy == "full" {
                    hidden.clone()
                } else {
                    clip::drop_cls(hidden)?
                };
                let feats = self.multi_modal_projector.forward(&feats)?;
                self.pack_image_features(&feats, &batch.images)?
            }
            None if batch.images.is_empty() => Vec::new(),
            None => return Err(Error::Batch("images listed but no pixel_values".into())),
        };
        self.embed_prepared(prep, &packed)
    }

    /// Positions, mask and attention kind shared by the decoder layers.
    pub fn text_context(&self, prep: &Prepared) -> Result<LayerContext> {
        let lm = &self.language_model;
        if let Some(segments) = &prep.segments {
            let mask = AttentionMask::causal_packed(segments, prep.width, lm.device())?;
            return Ok(LayerContext::new(
                &self.cfg.text_config,
                mask,
                lm.dtype(),
                lm.attention(),
            )?);
        }
        Ok(LayerContext::causal(
            &self.cfg.text_config,
            &prep.lengths,
            prep.width,
            lm.dtype(),
            lm.device(),
            lm.attention(),
        )?)
    }

    /// Decoder layer `k`.
    pub fn text_layer(&self, k: usize, x: &Tensor, ctx: &LayerContext) -> Result<Tensor> {
        match self.language_model.layers().get(k) {
            Some(layer) => Ok(layer.forward(x, ctx)?),
            None => Err(Error::Config(format!("no decoder layer {k}"))),
        }
    }

    /// Final norm, `lm_head` at the supervised positions and the summed cross entropy (f32
    /// scalar; divide by the number of targets for the mean). With no target: 0, still
    /// connected to the graph so that backward works.
    pub fn head_nll(&self, x: &Tensor, prep: &Prepared) -> Result<Tensor> {
        let xn = self.language_model.final_norm(x)?;
        let n = prep.loss_positions.len();
        if n == 0 {
            return Ok((xn.to_dtype(DType::F32)?.sum_all()? * 0.0)?);
        }
        let sel = self.supervised_hidden(&xn, prep)?;
        let mut total: Option<Tensor> = None;
        for (start, len) in self.loss_chunks(n) {
            let nll = self.chunk_nll(&sel.narrow(0, start, len)?, prep, start)?;
            total = Some(match total {
                Some(t) => (t + nll)?,
                None => nll,
            });
        }
        total.ok_or_else(|| Error::Batch("no loss chunk".into()))
    }

    /// Normalised hidden states at the supervised positions: `[n, H]`.
    pub fn supervised_hidden(&self, xn: &Tensor, prep: &Prepared) -> Result<Tensor> {
        let (b, l, h) = xn.dims3()?;
        let pos = Tensor::from_slice(&prep.loss_positions, prep.loss_positions.len(), xn.device())?;
        Ok(xn.reshape((b * l, h))?.index_select(&pos, 0)?)
    }

    /// Summed cross entropy of `rows` (supervised hidden states `start..start + len`).
    pub fn chunk_nll(&self, rows: &Tensor, prep: &Prepared, start: usize) -> Result<Tensor> {
        let len = rows.dim(0)?;
        let logits = self.language_model.lm_head_logits(rows)?;
        let lse = ops::logsumexp_last_dim(&logits)?.squeeze(1)?;
        let tgt = Tensor::from_slice(
            &prep.loss_targets[start..start + len],
            (len, 1),
            rows.device(),
        )?;
        let picked = logits.gather(&tgt, 1)?.squeeze(1)?;
        Ok((lse - picked)?.sum_all()?)
    }

    /// `(start, len)` of each loss chunk over `n` supervised rows.
    pub fn loss_chunks(&self, n: usize) -> Vec<(usize, usize)> {
        let c = self.loss_chunk.max(1);
        (0..n).step_by(c).map(|s| (s, c.min(n - s))).collect()
    }

    /// Rows of `lm_head` logits computed at once by the loss (memory: rows × vocab × 4 bytes).
    pub fn set_loss_chunk(&mut self, rows: usize) {
        self.loss_chunk = rows.max(1);
    }

    /// Attention of the decoder layers and of the vision tower.
    pub fn set_attention(&mut self, text: AttentionKind, vision: AttentionKind) {
        self.language_model.set_attention(text);
        self.vision_tower.set_attention(vision);
    }
}
