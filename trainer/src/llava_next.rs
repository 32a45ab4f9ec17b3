//! The LLaVA-NeXT wrapper: vision tower → projector → anyres merge → placement at the image
//! placeholders → Llama-3, with the batch-mean causal LM loss.
//!
//! Parameter names are HF's legacy `LlavaNextForConditionalGeneration` layout:
//! `vision_tower.vision_model.*`, `multi_modal_projector.*`, `image_newline`,
//! `language_model.{model.*, lm_head.weight}`.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Init, VarBuilder};
use llava_formats::constants::{IGNORE_INDEX, IMAGE_TOKEN_INDEX};
use serde::{Deserialize, Serialize};

use crate::attention::AttentionKind;
use crate::attention::AttentionMask;
use crate::clip::{self, ClipVisionConfig, ClipVisionModel};
use crate::llama::{LayerContext, LlamaConfig, LlamaForCausalLM};
use crate::ops;
use crate::projector::{MultiModalProjector, ProjectorConfig};
use crate::{Error, Result};

// One definition with the pipeline's token counts (`llava_formats::geometry`).
use llava_formats::geometry::{hf_pinpoints, RECIPE_PINPOINTS};
pub use llava_formats::geometry::{MergeType, UnpadRounding};

/// HF `LlavaNextConfig` (`config.json`); defaults are llama3-llava-next-8b.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlavaNextConfig {
    #[serde(default)]
    pub vision_config: ClipVisionConfig,
    #[serde(default)]
    pub text_config: LlamaConfig,
    /// Placeholder id of HF checkpoints; `IMAGE_TOKEN_INDEX` (-200) is always a placeholder too.
    #[serde(default = "defaults::image_token_index")]
    pub image_token_index: i64,
    #[serde(default = "defaults::vision_feature_layer")]
    pub vision_feature_layer: i64,
    /// `"default"` drops CLS, `"full"` keeps it.
    #[serde(default = "defaults::vision_feature_select_strategy")]
    pub vision_feature_select_strategy: String,
    #[serde(default = "defaults::projector_hidden_act")]
    pub projector_hidden_act: String,
    #[serde(default = "defaults::multimodal_projector_bias")]
    pub multimodal_projector_bias: bool,
    /// Kept for the processor; the model takes each image's grid from the batch.
    #[serde(default)]
    pub image_grid_pinpoints: Vec<[usize; 2]>,
    /// Not an HF field: LLaVA's `mm_patch_merge_type`.
    #[serde(default)]
    pub mm_patch_merge_type: MergeType,
    /// Not an HF field.
    #[serde(default)]
    pub unpad_rounding: UnpadRounding,
    /// LLaVA's `tokenizer_model_max_length`: rows are cut to it after image expansion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer_model_max_length: Option<usize>,
}

mod defaults {
    pub fn image_token_index() -> i64 {
        128256
    }
    pub fn vision_feature_layer() -> i64 {
        -2
    }
    pub fn vision_feature_select_strategy() -> String {
        "default".into()
    }
    pub fn projector_hidden_act() -> String {
        "gelu".into()
    }
    pub fn multimodal_projector_bias() -> bool {
        true
    }
}

impl Default for LlavaNextConfig {
    fn default() -> Self {
        Self::llama3_llava_next_8b()
    }
}

impl LlavaNextConfig {
    /// CLIP ViT-L/14-336 + mlp2x_gelu + Llama-3-8B with the vocabulary grown to 128320
    /// (`<image>`, `<pad>`, rounded up to a multiple of 64; spec §8.3).
    pub fn llama3_llava_next_8b() -> Self {
        LlavaNextConfig {
            vision_config: ClipVisionConfig::clip_vit_l_14_336(),
            text_config: LlamaConfig {
                vocab_size: 128320,
                ..LlamaConfig::llama3_8b()
            },
            image_token_index: defaults::image_token_index(),
            vision_feature_layer: defaults::vision_feature_layer(),
            vision_feature_select_strategy: defaults::vision_feature_select_strategy(),
            projector_hidden_act: defaults::projector_hidden_act(),
            multimodal_projector_bias: defaults::multimodal_projector_bias(),
            // The recipe's (w, h) grids, each pair swapped into HF's (h, w) (spec §8.4: HF then
            // picks the grids LLaVA-NeXT picks).
            image_grid_pinpoints: hf_pinpoints(&RECIPE_PINPOINTS),
            mm_patch_merge_type: MergeType::SpatialUnpad,
            unpad_rounding: UnpadRounding::Truncate,
            tokenizer_model_max_length: None,
        }
    }

    pub fn from_json_str(s: &str) -> std::result::Result<Self, serde_json::Error> {
        serde_json::from_str(s)
    }

    /// Reads a `config.json`: HF LlavaNext (has `text_config`) or original LLaVA-NeXT
    /// (`llava_llama`: flat Llama fields plus `mm_*`).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let value = crate::json_file::read(path)?;
        let json = |source| Error::Json {
            path: path.into(),
            source,
        };
        let cfg = if value.get("text_config").is_some() {
            serde_json::from_value(value).map_err(json)?
        } else {
            let mut cfg = Self::from_llava_original(value.clone()).map_err(json)?;
            // The reference names its vision tower (`mm_vision_tower`); when the name is a local
            // folder (absolute, or beside this config) with a CLIP config, its shape is used.
            let tower = value
                .get("mm_vision_tower")
                .and_then(|v| v.as_str())
                .map(|name| path.parent().unwrap_or(Path::new(".")).join(name))
                .map(|dir| dir.join("config.json"))
                .filter(|p| p.is_file());
            if let Some(clip) = tower {
                let mut c = crate::json_file::read(&clip)?;
                if let Some(v) = c.get("vision_config") {
                    c = v.clone();
                }
                cfg.vision_config = serde_json::from_value(c).map_err(|source| Error::Json {
                    path: clip.clone(),
                    source,
                })?;
            }
            cfg
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Original LLaVA-NeXT `config.json` (`LlavaLlamaForCausalLM`); the vision tower is named,
    /// not described, so it takes the CLIP ViT-L/14-336 shape.
    pub fn from_llava_original(value: serde_json::Value) -> serde_json::Result<Self> {
        let text_config: LlamaConfig = serde_json::from_value(value.clone())?;
        let mut cfg = Self::llama3_llava_next_8b();
        cfg.text_config = text_config;
        // The reference never writes it (it uses -200 and adds `<image>` as 128256 on the fly).
        cfg.image_token_index = value
            .get("image_token_index")
            .and_then(|v| v.as_i64())
            .unwrap_or(IMAGE_TOKEN_INDEX as i64);
        if let Some(l) = value.get("mm_vision_select_layer").and_then(|v| v.as_i64()) {
            cfg.vision_feature_layer = l;
        }
        if value
            .get("mm_vision_select_feature")
            .and_then(|v| v.as_str())
            == Some("cls_patch")
        {
            cfg.vision_feature_select_strategy = "full".into();
        }
        if let Some(m) = value.get("mm_patch_merge_type") {
            cfg.mm_patch_merge_type = serde_json::from_value(m.clone())?;
        }
        if let Some(p) = value.get("image_grid_pinpoints") {
            // The reference's list is (w, h); this field holds HF's (h, w).
            let wh: Vec<[usize; 2]> = serde_json::from_value(p.clone()).unwrap_or_default();
            cfg.image_grid_pinpoints = wh.iter().map(|[w, h]| [*h, *w]).collect();
        }
        cfg.tokenizer_model_max_length = value
            .get("tokenizer_model_max_length")
            .and_then(|v| v.as_u64())
            .map(|v| v as usize);
        Ok(cfg)
    }

    /// Config for separate checkpoints: a Llama `config.json` and a CLIP `config.json`
    /// (`CLIPVisionModel`, or a full `CLIPModel` with `vision_config`); the rest is the recipe's
    /// (mlp2x_gelu, layer -2, spatial_unpad). `vocab_size` overrides the Llama one (e.g. 128320).
    pub fn from_llama_and_clip_files(
        llama: &Path,
        clip: &Path,
        vocab_size: Option<usize>,
    ) -> Result<Self> {
        let mut cfg = Self::llama3_llava_next_8b();
        let l = crate::json_file::read(llama)?;
        cfg.text_config = serde_json::from_value(l).map_err(|source| Error::Json {
            path: llama.into(),
            source,
        })?;
        if let Some(v) = vocab_size {
            cfg.text_config.vocab_size = v;
        }
        let mut c = crate::json_file::read(clip)?;
        if let Some(v) = c.get("vision_config") {
            c = v.clone();
        }
        cfg.vision_config = serde_json::from_value(c).map_err(|source| Error::Json {
            path: clip.into(),
            source,
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        self.text_config.validate().map_err(Error::Config)?;
        self.vision_config.validate().map_err(Error::Config)?;
        if self.projector_hidden_act != "gelu" {
            return Err(Error::Config(format!(
                "projector_hidden_act {:?} (only \"gelu\")",
                self.projector_hidden_act
            )));
        }
        if !matches!(
            self.vision_feature_select_strategy.as_str(),
            "default" | "full"
        ) {
            return Err(Error::Config(format!(
                "vision_feature_select_strategy {:?}",
                self.vision_feature_select_strategy
            )));
        }
        if self
            .vision_config
            .layers_for_feature_layer(self.vision_feature_layer)
            .is_none()
        {
            return Err(Error::Config(format!(
                "vision_feature_layer {} out of range",
                self.vision_feature_layer
            )));
        }
        Ok(())
    }

    pub fn projector_config(&self) -> ProjectorConfig {
        ProjectorConfig {
            vision_hidden_size: self.vision_config.hidden_size,
            text_hidden_size: self.text_config.hidden_size,
            bias: self.multimodal_projector_bias,
        }
    }

    pub fn has_image_newline(&self) -> bool {
        self.mm_patch_merge_type == MergeType::SpatialUnpad
    }

    /// Feature tokens of one tile (g², plus CLS with the `full` strategy).
    pub fn tokens_per_tile(&self) -> usize {
        let g = self.vision_config.grid_size();
        g * g + usize::from(self.vision_feature_select_strategy == "full")
    }

    /// Every parameter of the model: canonical (HF legacy) name and shape; no allocation.
    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let mut out: Vec<(String, Vec<usize>)> = Vec::new();
        for (n, s) in self.vision_config.param_shapes() {
            out.push((format!("{VISION_PREFIX}.{n}"), s));
        }
        for (n, s) in self.projector_config().param_shapes() {
            out.push((format!("{PROJECTOR_PREFIX}.{n}"), s));
        }
        if self.has_image_newline() {
            out.push((IMAGE_NEWLINE.into(), vec![self.text_config.hidden_size]));
        }
        for (n, s) in self.text_config.param_shapes() {
            out.push((format!("{LANGUAGE_PREFIX}.{n}"), s));
        }
        out
    }

    /// Number of tokens image features occupy: the packed length of one image.
    pub fn image_token_count(&self, image: &ImageMeta) -> Result<usize> {
        let t = self.tokens_per_tile();
        if image.num_tiles == 0 {
            return Err(Error::Batch("an image with 0 tiles".into()));
        }
        if self.mm_patch_merge_type == MergeType::Flat {
            return Ok(image.num_tiles * t);
        }
        if image.num_tiles == 1 {
            return Ok(t + 1);
        }
        let (h, w) = self.unpadded_grid(image)?;
        Ok(t + h * (w + 1))
    }

    /// Feature-grid size `(h', w')` kept by `unpad_image` for a multi-tile image.
    pub fn unpadded_grid(&self, image: &ImageMeta) -> Result<(usize, usize)> {
        image.check_tiles()?;
        let g = self.vision_config.grid_size();
        let (cols, rows) = image.grid;
        let (fh, fw) = (rows * g, cols * g);
        let (w, h) = image.orig_size;
        if w == 0 || h == 0 {
            return Err(Error::Batch(format!("image of size {w}x{h}")));
        }
        let as_u32 = |v: usize| {
            u32::try_from(v).map_err(|_| Error::Batch(format!("image dimension {v} too large")))
        };
        let (kh, kw) = llava_formats::geometry::unpad_feature_hw_rounded(
            as_u32(fh)?,
            as_u32(fw)?,
            (as_u32(w)?, as_u32(h)?),
            self.unpad_rounding,
        );
        Ok((kh as usize, kw as usize))
    }
}

/// Rows of `lm_head` logits per loss chunk: 1024 × 128320 × 4 B = 525 MB.
pub const DEFAULT_LOSS_CHUNK: usize = 1024;

pub const VISION_PREFIX: &str = "vision_tower.vision_model";
pub const PROJECTOR_PREFIX: &str = "multi_modal_projector";
pub const IMAGE_NEWLINE: &str = "image_newline";
pub const LANGUAGE_PREFIX: &str = "language_model";

/// What the model needs to know about one image; the pipeline computed all of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageMeta {
    /// Original image size `(width, height)` in pixels (PIL order), used by unpad.
    pub orig_size: (usize, usize),
    /// Anyres grid `(cols, rows)` of the best resolution; `(1, 1)` for single-tile images.
    pub grid: (usize, usize),
    /// Tiles in `pixel_values` for this image: 1 (`pad`/`square`) or `1 + cols * rows`.
    pub num_tiles: usize,
}

impl ImageMeta {
    /// A single-tile (`pad`/`square`) image.
    pub fn single(orig_size: (usize, usize)) -> Self {
        Self {
            orig_size,
            grid: (1, 1),
            num_tiles: 1,
        }
    }

    fn check_tiles(&self) -> Result<()> {
        let (cols, rows) = self.grid;
        if self.num_tiles != 1 + cols * rows {
            return Err(Error::Batch(format!(
                "image with grid {cols}x{rows} (cols x rows) has {} tiles, expected {}",
                self.num_tiles,
                1 + cols * rows
            )));
        }
        Ok(())
    }
}

/// One right-padded training micro-batch.
#[derive(Debug, Clone)]
pub struct Batch {
    /// `[B, L]` integer ids, right padded. Image placeholders are `-200` (one per image, expanded
    /// by the model) or `config.image_token_index`; a run of at least N placeholders, N being the
    /// image's token count, is taken as already expanded (HF processor style).
    pub input_ids: Tensor,
    /// `[B, L]` targets aligned with `input_ids` (not shifted), `-100` = ignored. None: no loss.
    pub labels: Option<Tensor>,
    /// Real tokens per row; positions at or past it are padding.
    pub lengths: Vec<usize>,
    /// `[T, 3, S, S]`: all tiles of all images in placeholder order; per image its base tile
    /// first, then its grid tiles row-major. None when the batch has no image.
    pub pixel_values: Option<Tensor>,
    /// One entry per image, in placeholder order.
    pub images: Vec<ImageMeta>,
    /// Packed rows: the `input_ids` lengths of the samples of each row, back to back (summing to
    /// `lengths[row]`). Attention never crosses a sample, positions restart at 0 for each, and
    /// the last token of a sample does not predict the next sample's first. None: one sample
    /// per row.
    pub segments: Option<Vec<Vec<usize>>>,
}

/// Per-row lengths from a `[B, L]` 0/1 attention mask (right padding).
pub fn lengths_from_attention_mask(mask: &Tensor) -> Result<Vec<usize>> {
    let rows = mask.to_dtype(DType::I64)?.to_vec2::<i64>()?;
    Ok(rows
        .iter()
        .map(|r| r.iter().filter(|&&m| m != 0).count())
        .collect())
}

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
    vision_tower: ClipVisionModel,
    multi_modal_projector: MultiModalProjector,
    image_newline: Option<Tensor>,
    language_model: LlamaForCausalLM,
    cfg: LlavaNextConfig,
    vision_layers: usize,
    /// Rows of logits per loss chunk.
    loss_chunk: usize,
}

impl LlavaNext {
    /// Builds the model on `vb` (normally a [`candle_nn::VarMap`] filled by
    /// [`crate::weights::load`]; absent parameters are freshly initialised).
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

    fn is_placeholder(&self, id: i64) -> bool {
        id == IMAGE_TOKEN_INDEX as i64 || id == self.cfg.image_token_index
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

    /// The host-side plan of a batch: image token counts from the config, the gather table of
    /// the input embeddings, lengths after expansion and truncation, and the supervised
    /// positions. Reads `input_ids` / `labels` as host data: keep them on the CPU (the training
    /// step does) so that nothing waits for the device.
    pub fn prepare(&self, batch: &Batch) -> Result<Prepared> {
        let ids = batch.input_ids.to_dtype(DType::I64)?.to_vec2::<i64>()?;
        let b = ids.len();
        let l = ids.first().map_or(0, Vec::len);
        if batch.lengths.len() != b {
            return Err(Error::Batch(format!(
                "{} lengths for {b} rows",
                batch.lengths.len()
            )));
        }
        if let Some(segs) = &batch.segments {
            let ok = segs.len() == b
                && segs
                    .iter()
                    .zip(&batch.lengths)
                    .all(|(s, &n)| s.iter().sum::<usize>() == n);
            if !ok {
                return Err(Error::Batch(
                    "segments must give, per row, sample lengths summing to the row's length"
                        .into(),
                ));
            }
        }
        let labels = match &batch.labels {
            Some(t) => {
                let v = t.to_dtype(DType::I64)?.to_vec2::<i64>()?;
                if v.len() != b || v.iter().any(|r| r.len() != l) {
                    return Err(Error::Batch("labels and input_ids differ in shape".into()));
                }
                Some(v)
            }
            None => None,
        };
        let vocab = self.cfg.text_config.vocab_size as i64;
        let counts: Vec<usize> = batch
            .images
            .iter()
            .map(|m| self.cfg.image_token_count(m))
            .collect::<Result<_>>()?;
        let img_total: usize = counts.iter().sum();
        let mut img_offset = Vec::with_capacity(counts.len());
        let mut acc = 0;
        for c in &counts {
            img_offset.push(acc);
            acc += c;
        }
        // Rows of the gather table: [embeds of all B*L ids | all image tokens | one zero row].
        let text_rows = b * l;
        let zero_row = (text_rows + img_total) as u32;
        let mut safe_ids = Vec::with_capacity(text_rows);
        let mut rows_idx: Vec<Vec<u32>> = Vec::with_capacity(b);
        let mut rows_lab: Vec<Vec<i64>> = Vec::with_capacity(b);
        let mut rows_segs: Vec<Vec<usize>> = Vec::with_capacity(b);
        let mut next_image = 0usize;
        let mut n_placeholders = 0usize;
        for (bi, row) in ids.iter().enumerate() {
            let len = batch.lengths[bi];
            if len > l {
                return Err(Error::Batch(format!("row {bi}: length {len} > {l}")));
            }
            for (p, &id) in row.iter().enumerate() {
                let ok = (0..vocab).contains(&id);
                if p < len && !ok && !self.is_placeholder(id) {
                    return Err(Error::Batch(format!(
                        "row {bi}, position {p}: token id {id} outside the vocabulary of {vocab}"
                    )));
                }
                safe_ids.push(if ok { id as u32 } else { 0 });
            }
            let segs = match &batch.segments {
                Some(s) => s[bi].clone(),
                None => vec![len],
            };
            let mut idx = Vec::with_capacity(len);
            let mut lab = Vec::with_capacity(len);
            let mut seg_lens = Vec::with_capacity(segs.len());
            let mut p = 0;
            for seg_len in segs {
                // Each sample is expanded (and truncated, as the reference truncates each
                // sample) on its own.
                let end = p + seg_len;
                let seg_start = idx.len();
                while p < end {
                    let id = row[p];
                    if !self.is_placeholder(id) {
                        idx.push((bi * l + p) as u32);
                        lab.push(labels.as_ref().map_or(IGNORE_INDEX as i64, |v| v[bi][p]));
                        p += 1;
                        continue;
                    }
                    n_placeholders += 1;
                    let k = next_image;
                    next_image += 1;
                    let Some(&n) = counts.get(k) else {
                        p += 1;
                        continue; // counted; reported below
                    };
                    let run = row[p..end]
                        .iter()
                        .take_while(|&&x| self.is_placeholder(x))
                        .count();
                    p += if run >= n && n > 1 { n } else { 1 };
                    let off = (text_rows + img_offset[k]) as u32;
                    idx.extend(off..off + n as u32);
                    lab.extend(std::iter::repeat_n(IGNORE_INDEX as i64, n));
                }
                if let Some(max) = self.cfg.tokenizer_model_max_length {
                    idx.truncate(seg_start + max);
                    lab.truncate(seg_start + max);
                }
                // A packed sample's first token is no target of the sample before it (in an
                // unpacked row, position 0 is never a target anyway).
                if seg_start > 0 && lab.len() > seg_start {
                    lab[seg_start] = IGNORE_INDEX as i64;
                }
                seg_lens.push(idx.len() - seg_start);
            }
            rows_segs.push(seg_lens);
            rows_idx.push(idx);
            rows_lab.push(lab);
        }
        if n_placeholders != counts.len() {
            return Err(Error::Batch(format!(
                "image features and image tokens do not match: {} images, {n_placeholders} \
                 placeholders (a pre-expanded run counts as one)",
                counts.len()
            )));
        }
        let width = rows_idx.iter().map(Vec::len).max().unwrap_or(0);
        let lengths: Vec<usize> = rows_idx.iter().map(Vec::len).collect();
        let mut gather = Vec::with_capacity(b * width);
        let mut flat_lab = Vec::with_capacity(b * width);
        for (idx, lab) in rows_idx.iter().zip(&rows_lab) {
            gather.extend_from_slice(idx);
            gather.extend(std::iter::repeat_n(zero_row, width - idx.len()));
            flat_lab.extend_from_slice(lab);
            flat_lab.extend(std::iter::repeat_n(IGNORE_INDEX as i64, width - lab.len()));
        }
        // Position t predicts label t + 1 of the same row (packed boundaries are ignored labels).
        let (mut loss_positions, mut loss_targets) = (Vec::new(), Vec::new());
        if labels.is_some() {
            for bi in 0..b {
                let row = &flat_lab[bi * width..(bi + 1) * width];
                for t in 0..width.saturating_sub(1) {
                    let y = row[t + 1];
                    if y == IGNORE_INDEX as i64 {
                        continue;
                    }
                    if !(0..vocab).contains(&y) {
                        return Err(Error::Batch(format!(
                            "row {bi}: label {y} outside the vocabulary of {vocab}"
                        )));
                    }
                    loss_positions.push((bi * width + t) as u32);
                    loss_targets.push(y as u32);
                }
            }
        }
        Ok(Prepared {
            batch: b,
            width,
            text_ids: safe_ids,
            gather,
            image_counts: counts,
            lengths,
            labels: labels.map(|_| flat_lab),
            loss_positions,
            loss_targets,
            segments: batch.segments.as_ref().map(|_| rows_segs),
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

    // The segments of the recomputed backward (crate::step): each takes the previous one's output.

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

/// The host-side plan of one batch (see [`LlavaNext::prepare`]).
#[derive(Debug, Clone)]
pub struct Prepared {
    pub batch: usize,
    /// Row width after image expansion (`L'`).
    pub width: usize,
    /// `B * L` text ids (placeholders and padding as 0), embedded before the gather.
    pub text_ids: Vec<u32>,
    /// `B * L'` rows of `[text embeds | image tokens | zero row]` forming the input embeddings.
    pub gather: Vec<u32>,
    /// Feature tokens of each image (from the config and the image's geometry).
    pub image_counts: Vec<usize>,
    /// Real tokens per row after expansion and truncation.
    pub lengths: Vec<usize>,
    /// `B * L'` labels after expansion (-100 for image tokens, padding and the first token of each
    /// packed sample but a row's first); None without labels.
    pub labels: Option<Vec<i64>>,
    /// Flat `b * L' + t` positions whose next token is supervised, and those tokens.
    pub loss_positions: Vec<u32>,
    pub loss_targets: Vec<u32>,
    /// Packed rows: each row's samples' lengths after expansion and truncation.
    pub segments: Option<Vec<Vec<usize>>>,
}

/// A fresh device-side helper: the CPU, or CUDA device 0 with the `cuda` feature.
pub fn default_device() -> Result<Device> {
    #[cfg(feature = "cuda")]
    {
        Ok(Device::new_cuda(0)?)
    }
    #[cfg(not(feature = "cuda"))]
    {
        Ok(Device::Cpu)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(w: usize, h: usize, cols: usize, rows: usize) -> ImageMeta {
        ImageMeta {
            orig_size: (w, h),
            grid: (cols, rows),
            num_tiles: 1 + cols * rows,
        }
    }

    #[test]
    fn token_counts_match_spec_table() {
        let cfg = LlavaNextConfig::llama3_llava_next_8b();
        let cases = [
            ((640, 480, 2, 2), 2340),
            ((768, 1024, 2, 2), 2352),
            ((1280, 720, 2, 2), 1948),
            ((720, 1280, 2, 2), 1968),
            ((512, 512, 2, 2), 2928),
            ((1024, 899, 2, 2), 2634),
            ((800, 1200, 2, 2), 2160),
            ((2000, 500, 3, 1), 1890),
            ((3000, 1000, 3, 1), 2328),
            ((700, 300, 3, 1), 1944),
            ((500, 1500, 1, 3), 2376),
            ((336, 336, 1, 2), 1176),
            ((300, 200, 1, 2), 976),
            ((5000, 10, 2, 1), 576),
            ((10, 5000, 1, 3), 576 + 72),
        ];
        for ((w, h, c, r), n) in cases {
            assert_eq!(
                cfg.image_token_count(&meta(w, h, c, r)).ok(),
                Some(n),
                "{w}x{h}"
            );
        }
        assert_eq!(
            cfg.image_token_count(&ImageMeta::single((640, 480))).ok(),
            Some(577)
        );
    }

    #[test]
    fn original_llava_config() {
        let v = serde_json::json!({
            "model_type": "llava_llama", "vocab_size": 128256, "hidden_size": 4096,
            "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_vision_select_layer": -2,
            "mm_vision_select_feature": "patch", "mm_patch_merge_type": "flat",
            "rope_theta": 500000.0, "tokenizer_model_max_length": 8192
        });
        let cfg = LlavaNextConfig::from_llava_original(v).expect("parse");
        assert_eq!(cfg.image_token_index, -200);
        assert_eq!(cfg.mm_patch_merge_type, MergeType::Flat);
        assert!(!cfg.has_image_newline());
        assert_eq!(cfg.tokenizer_model_max_length, Some(8192));
        assert_eq!(cfg.text_config.vocab_size, 128256);
        cfg.validate().expect("valid");
    }
}
