//! `LlavaNextConfig`: the model's shape, read from the three `config.json` layouts a model folder
//! may hold (HF `LlavaNextForConditionalGeneration`, the original LLaVA-NeXT `llava_llama`, or a
//! separate Llama + CLIP pair), validated, and the parameter names and shapes it implies.
//!
//! Parameter names are HF's legacy `LlavaNextForConditionalGeneration` layout:
//! `vision_tower.vision_model.*`, `multi_modal_projector.*`, `image_newline`,
//! `language_model.{model.*, lm_head.weight}`.

use std::path::Path;

use llava_formats::constants::IMAGE_TOKEN_INDEX;
use serde::{Deserialize, Serialize};

use crate::model::clip::ClipVisionConfig;
use crate::model::llama::LlamaConfig;
use crate::model::projector::ProjectorConfig;
use crate::{Error, Result};

// One definition with the pipeline's token counts (`llava_formats::geometry`).
use llava_formats::geometry::{hf_pinpoints, RECIPE_PINPOINTS};
pub use llava_formats::geometry::{MergeType, UnpadRounding};

pub const VISION_PREFIX: &str = "vision_tower.vision_model";
pub const PROJECTOR_PREFIX: &str = "multi_modal_projector";
pub const IMAGE_NEWLINE: &str = "image_newline";
pub const LANGUAGE_PREFIX: &str = "language_model";

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
        let value = crate::io::json_file::read(path)?;
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
                let mut c = crate::io::json_file::read(&clip)?;
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
        let l = crate::io::json_file::read(llama)?;
        cfg.text_config = serde_json::from_value(l).map_err(|source| Error::Json {
            path: llama.into(),
            source,
        })?;
        if let Some(v) = vocab_size {
            cfg.text_config.vocab_size = v;
        }
        let mut c = crate::io::json_file::read(clip)?;
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
