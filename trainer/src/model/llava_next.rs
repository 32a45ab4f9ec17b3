//! The LLaVA-NeXT wrapper: vision tower → projector → anyres merge → placement at the image
//! placeholders → Llama-3, with the batch-mean causal LM loss.
//!
//! The config is [`crate::model::config`], the batch types [`crate::model::batch`], the host-side
//! plan of a batch [`crate::model::prepare`], and the segment-by-segment form the training step
//! recomputes [`crate::model::segments`].

use candle_core::{Module, Tensor};
use candle_nn::{Init, VarBuilder};
use llava_formats::constants::IGNORE_INDEX;

use crate::model::batch::{Batch, ImageMeta};
use crate::model::clip::{self, ClipVisionModel};
use crate::model::config::{
    LlavaNextConfig, MergeType, IMAGE_NEWLINE, LANGUAGE_PREFIX, PROJECTOR_PREFIX, VISION_PREFIX,
};
use crate::model::llama::LlamaForCausalLM;
use crate::model::ops;
use crate::model::prepare::Prepared;
use crate::model::projector::MultiModalProjector;
use crate::{Error, Result};

/// Rows of `lm_head` logits per loss chunk: 1024 × 128320 × 4 B = 525 MB.
pub const DEFAULT_LOSS_CHUNK: usize = 1024;

/// Input embeddings after image placement.
#[derive(Debug, Clone)]
pub struct Embedded {
    /// `[B, L', H]`; padding rows are zero vectors.
    pub embeds: Tensor,
    /// Real tokens per row after expansion and truncation.
    pub lengths: Vec<usize>,
    /// `[B, L']` i64 labels after expansion (image tokens and padding -100).
    pub labels: Option<Tensor>,
}

#[derive(Debug, Clone)]
pub struct Output {
    /// `[B, L', V]` f32.
    pub logits: Tensor,
    /// Scalar f32 mean cross entropy over the supervised positions of the batch.
    pub loss: Option<Tensor>,
    /// `[B, L']` f32, loss of predicting token t+1 at t (0 where ignored and at the last position).
    pub token_loss: Option<Tensor>,
    pub lengths: Vec<usize>,
    pub labels: Option<Tensor>,
}

#[derive(Debug, Clone)]
pub struct LlavaNext {
    pub(crate) vision_tower: ClipVisionModel,
    pub(crate) multi_modal_projector: MultiModalProjector,
    image_newline: Option<Tensor>,
    pub(crate) language_model: LlamaForCausalLM,
    pub(crate) cfg: LlavaNextConfig,
    pub(crate) vision_layers: usize,
    /// Rows of logits per loss chunk.
    pub(crate) loss_chunk: usize,
}

impl LlavaNext {
    /// Builds the model on `vb` (normally a [`candle_nn::VarMap`] filled by
    /// [`crate::io::weights::load`]; absent parameters are freshly initialised).
    pub fn new(cfg: &LlavaNextConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let vision_layers = cfg
            .vision_config
            .layers_for_feature_layer(cfg.vision_feature_layer)
            .ok_or_else(|| Error::Config("vision_feature_layer out of range".into()))?;
        let vision_tower = ClipVisionModel::new(&cfg.vision_config, vb.pp(VISION_PREFIX))?;
        let multi_modal_projector =
            MultiModalProjector::new(&cfg.projector_config(), vb.pp(PROJECTOR_PREFIX))?;
        let image_newline = if cfg.has_image_newline() {
            let h = cfg.text_config.hidden_size;
            let stdev = 1.0 / (h as f64).sqrt();
            Some(vb.get_with_hints(h, IMAGE_NEWLINE, Init::Randn { mean: 0.0, stdev })?)
        } else {
            None
        };
        let language_model = LlamaForCausalLM::new(&cfg.text_config, vb.pp(LANGUAGE_PREFIX))?;
        Ok(Self {
            vision_tower,
            multi_modal_projector,
            image_newline,
            language_model,
            cfg: cfg.clone(),
            vision_layers,
            loss_chunk: DEFAULT_LOSS_CHUNK,
        })
    }

    pub fn config(&self) -> &LlavaNextConfig {
        &self.cfg
    }

    pub fn vision_tower(&self) -> &ClipVisionModel {
        &self.vision_tower
    }

    pub fn language_model(&self) -> &LlamaForCausalLM {
        &self.language_model
    }

    /// HF `hidden_states[vision_feature_layer]` of every tile: `[T, 1 + g², C]` (CLS included).
    pub fn vision_selected_layer(&self, pixel_values: &Tensor) -> Result<Tensor> {
        Ok(self
            .vision_tower
            .forward_to_layer(pixel_values, self.vision_layers)?)
    }

    /// Projected per-tile features `[T, tokens_per_tile, H]` (one vision call for all tiles).
    pub fn image_features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let hidden = self.vision_selected_layer(pixel_values)?;
        let feats = if self.cfg.vision_feature_select_strategy == "full" {
            hidden
        } else {
            clip::drop_cls(&hidden)?
        };
        Ok(self.multi_modal_projector.forward(&feats)?)
    }

    /// Splits `[T, t, H]` tile features per image and merges each: `[N_i, H]` per image.
    pub fn pack_image_features(&self, feats: &Tensor, images: &[ImageMeta]) -> Result<Vec<Tensor>> {
        let total: usize = images.iter().map(|m| m.num_tiles).sum();
        let (t_all, t, h) = feats.dims3()?;
        if total != t_all {
            return Err(Error::Batch(format!(
                "images declare {total} tiles, pixel_values has {t_all}"
            )));
        }
        let mut out = Vec::with_capacity(images.len());
        let mut start = 0;
        for meta in images {
            let f = feats.narrow(0, start, meta.num_tiles)?;
            start += meta.num_tiles;
            out.push(self.pack_one(&f, meta, t, h)?);
        }
        Ok(out)
    }

    fn pack_one(&self, f: &Tensor, meta: &ImageMeta, t: usize, h: usize) -> Result<Tensor> {
        if self.cfg.mm_patch_merge_type == MergeType::Flat {
            return Ok(f.reshape((meta.num_tiles * t, h))?);
        }
        let newline = self
            .image_newline
            .as_ref()
            .ok_or_else(|| Error::Config("spatial_unpad needs image_newline".into()))?;
        let base = f.get(0)?;
        if meta.num_tiles == 1 {
            return Ok(Tensor::cat(&[&base, &newline.reshape((1, h))?], 0)?);
        }
        let (kh, kw) = self.cfg.unpadded_grid(meta)?;
        let g = self.cfg.vision_config.grid_size();
        if t != g * g {
            return Err(Error::Config(
                "spatial_unpad needs the CLS-free (\"default\") feature strategy".into(),
            ));
        }
        let (cols, rows) = meta.grid;
        let (fh, fw) = (rows * g, cols * g);
        if kh == 0 {
            return Ok(base);
        }
        // [rows*cols, g*g, C] → [rows, cols, g, g, C] → [C, rows, g, cols, g] → [C, Fh, Fw].
        let nl = newline.reshape((h, 1, 1))?.broadcast_as((h, kh, 1))?;
        let grid = if kw == 0 {
            nl.contiguous()?
        } else {
            let grid = f
                .narrow(0, 1, rows * cols)?
                .reshape((rows, cols, g, g, h))?
                .permute((4, 0, 2, 1, 3))?
                .reshape((h, fh, fw))?
                .narrow(1, (fh - kh) / 2, kh)?
                .narrow(2, (fw - kw) / 2, kw)?;
            Tensor::cat(&[&grid, &nl], 2)?
        };
        let grid = grid.reshape((h, kh * (kw + 1)))?.t()?;
        Ok(Tensor::cat(&[&base, &grid], 0)?)
    }

    /// Embeds the text and puts each image's packed features at its placeholder(s).
    pub fn embed_inputs(&self, batch: &Batch, packed: &[Tensor]) -> Result<Embedded> {
        let prep = self.prepare(batch)?;
        let embeds = self.embed_prepared(&prep, packed)?;
        let dev = embeds.device().clone();
        let labels = match &prep.labels {
            Some(v) => Some(Tensor::from_slice(v, (prep.batch, prep.width), &dev)?),
            None => None,
        };
        Ok(Embedded {
            embeds,
            lengths: prep.lengths,
            labels,
        })
    }

    /// Input embeddings `[B, L', H]` of a prepared batch with the images' packed features.
    pub fn embed_prepared(&self, prep: &Prepared, packed: &[Tensor]) -> Result<Tensor> {
        if packed.len() != prep.image_counts.len() {
            return Err(Error::Batch(format!(
                "{} packed images for {} in the batch",
                packed.len(),
                prep.image_counts.len()
            )));
        }
        for (k, (p, &n)) in packed.iter().zip(&prep.image_counts).enumerate() {
            if p.dim(0)? != n {
                return Err(Error::Batch(format!(
                    "image {k}: {} feature tokens, the config gives {n}",
                    p.dim(0)?
                )));
            }
        }
        let dev = self.language_model.device().clone();
        let ids_t = Tensor::from_slice(&prep.text_ids, prep.text_ids.len(), &dev)?;
        let text = self.language_model.embed(&ids_t)?;
        let hdim = self.cfg.text_config.hidden_size;
        let mut parts = vec![text];
        for p in packed {
            parts.push(p.to_dtype(parts[0].dtype())?);
        }
        parts.push(Tensor::zeros((1, hdim), parts[0].dtype(), &dev)?);
        let table = Tensor::cat(&parts, 0)?;
        let gather = Tensor::from_slice(&prep.gather, prep.gather.len(), &dev)?;
        Ok(table
            .index_select(&gather, 0)?
            .reshape((prep.batch, prep.width, hdim))?)
    }

    /// Packed image features of the batch (empty without images).
    pub fn batch_image_features(&self, batch: &Batch) -> Result<Vec<Tensor>> {
        match (&batch.pixel_values, batch.images.is_empty()) {
            (None, true) => Ok(Vec::new()),
            (Some(px), false) => {
                let feats = self.image_features(px)?;
                self.pack_image_features(&feats, &batch.images)
            }
            (None, false) => Err(Error::Batch("images listed but no pixel_values".into())),
            (Some(_), true) => Err(Error::Batch("pixel_values without image metadata".into())),
        }
    }

    /// Full forward: logits, and with labels the batch-mean loss and per-token loss.
    pub fn forward(&self, batch: &Batch) -> Result<Output> {
        let packed = self.batch_image_features(batch)?;
        let prep = self.prepare(batch)?;
        let embeds = self.embed_prepared(&prep, &packed)?;
        let ctx = self.text_context(&prep)?;
        let hidden = self.language_model.forward_hidden_ctx(&embeds, &ctx)?;
        let logits = self.language_model.lm_head_logits(&hidden)?;
        let dev = embeds.device().clone();
        let labels = match &prep.labels {
            Some(v) => Some(Tensor::from_slice(v, (prep.batch, prep.width), &dev)?),
            None => None,
        };
        let (loss, token_loss) = match &labels {
            Some(labels) => {
                let (loss, tok) = ops::shifted_cross_entropy(&logits, labels, IGNORE_INDEX as i64)?;
                (Some(loss), Some(tok))
            }
            None => (None, None),
        };
        Ok(Output {
            logits,
            loss,
            token_loss,
            lengths: prep.lengths,
            labels,
        })
    }
}

/// Training loss of a batch and the number of supervised targets it averages over.
#[derive(Debug, Clone)]
pub struct TrainLoss {
    /// Scalar f32: mean cross entropy over the supervised positions (0 when there are none).
    pub loss: Tensor,
    pub targets: usize,
    /// Rows' lengths after image expansion and truncation.
    pub lengths: Vec<usize>,
}

impl LlavaNext {
    /// The loss of [`LlavaNext::forward`] without materialising `[B, L', V]` logits: `lm_head`
    /// runs only at positions whose next token is supervised, in chunks (with a 128k vocabulary
    /// the full logits dwarf everything else in memory and time). Same value, same gradients.
    pub fn forward_loss(&self, batch: &Batch) -> Result<TrainLoss> {
        let prep = self.prepare(batch)?;
        if prep.labels.is_none() {
            return Err(Error::Batch("a training batch needs labels".into()));
        }
        let x = match &batch.pixel_values {
            Some(px) if !batch.images.is_empty() => {
                let mut x = self.vision_embed(px)?;
                for k in 0..self.vision_layers {
                    x = self.vision_layer(k, &x)?;
                }
                Some(x)
            }
            _ => None,
        };
        let mut h = self.merge(x.as_ref(), batch, &prep)?;
        let ctx = self.text_context(&prep)?;
        for k in 0..self.cfg.text_config.num_hidden_layers {
            h = self.text_layer(k, &h, &ctx)?;
        }
        let nll = self.head_nll(&h, &prep)?;
        let n = prep.loss_positions.len();
        Ok(TrainLoss {
            loss: (nll / n.max(1) as f64)?,
            targets: n,
            lengths: prep.lengths,
        })
    }
}
