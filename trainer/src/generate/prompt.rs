//! From a question and image files to a [`Prompt`]: the conversion path of the build. The
//! `llava_llama_3` conversation (the chat template of our checkpoints,
//! [`crate::io::hf_tokenizer::LLAVA_LLAMA3_CHAT_TEMPLATE`]: default system prompt, `<image>\n` per
//! image at the front of the user turn, the stripped text, the assistant header), tokenized with
//! the checkpoint's `tokenizer.json`; each image decoded, tiled and normalised by
//! `llava-imaging` exactly as the build does, with the config's pinpoints.

use std::path::Path;

use candle_core::{Device, Tensor};
use llava_imaging::{decode_rgb_file, make_tiles, normalize_tiles, AspectMode, TILE};
use tokenizers::Tokenizer;

use super::chat_template::ChatTemplate;
use super::Prompt;
use crate::io::hf_tokenizer::IMAGE_TOKEN;
use crate::model::batch::ImageMeta;
use crate::model::config::LlavaNextConfig;
use crate::{Error, Result};

pub const LLAMA3_SYSTEM: &str = "You are a helpful language and vision assistant. You are able to \
understand the visual content that the user provides, and assist the user with a variety of tasks \
using natural language.";

/// How the question becomes text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Template {
    /// The model folder's Jinja chat template (chat_template.jinja / chat_template.json /
    /// tokenizer_config.json), rendered as HF's processor does.
    Chat,
    /// The `llava_llama_3` conversation; the tokenizer adds `<|begin_of_text|>`.
    LlavaLlama3,
    /// The text exactly as given (write `<image>` where each image goes; no special tokens
    /// added): for tokenizers without Llama-3's header tokens, such as the parity fixtures'.
    Raw,
}

/// How an image becomes tiles (the build's `image_aspect_ratio`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Aspect {
    /// Base tile + best-resolution tiles from the config's `image_grid_pinpoints`.
    Anyres,
    /// Padded to a square with the CLIP mean colour, one tile.
    Pad,
    /// Resized and centre-cropped, one tile.
    Square,
}

/// The llava_llama_3 text of one user turn with `n_images` images, generation prompt included.
pub fn llava_llama3_text(question: &str, n_images: usize) -> String {
    format!(
        "<|start_header_id|>system<|end_header_id|>\n\n{LLAMA3_SYSTEM}<|eot_id|>\
         <|start_header_id|>user<|end_header_id|>\n\n{}{}<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\n",
        "<image>\n".repeat(n_images),
        question.trim()
    )
}

/// A template choice made concrete: the chat template itself, or a built-in format.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptFormat {
    Chat(ChatTemplate),
    LlavaLlama3,
    Raw,
}

impl From<Template> for PromptFormat {
    /// The built-in formats (`Chat` needs [`prompt_format`]: it becomes llava_llama_3 here).
    fn from(t: Template) -> Self {
        match t {
            Template::Raw => Self::Raw,
            Template::LlavaLlama3 | Template::Chat => Self::LlavaLlama3,
        }
    }
}

/// The format for `choice` (None: the model folder's chat template when it has one, else
/// [`default_template`] with a notice).
pub fn prompt_format(
    choice: Option<Template>,
    model_dir: &Path,
    tok: &Tokenizer,
) -> Result<PromptFormat> {
    match choice {
        Some(Template::LlavaLlama3) => Ok(PromptFormat::LlavaLlama3),
        Some(Template::Raw) => Ok(PromptFormat::Raw),
        Some(Template::Chat) => ChatTemplate::find(model_dir)?
            .map(PromptFormat::Chat)
            .ok_or_else(|| {
                Error::Config(format!(
                    "{} has no chat template (chat_template.jinja, chat_template.json or \
                     tokenizer_config.json's chat_template)",
                    model_dir.display()
                ))
            }),
        None => match ChatTemplate::find(model_dir)? {
            Some(c) => {
                tracing::info!("prompt format: the chat template of {}", c.origin.display());
                Ok(PromptFormat::Chat(c))
            }
            None => {
                let t = default_template(tok);
                tracing::info!(
                    "{} has no chat template: prompts use the {} format",
                    model_dir.display(),
                    if t == Template::Raw {
                        "raw"
                    } else {
                        "llava_llama_3"
                    }
                );
                Ok(t.into())
            }
        },
    }
}

/// The template a tokenizer calls for: llava_llama_3 when it knows Llama-3's header tokens.
pub fn default_template(tok: &Tokenizer) -> Template {
    if tok.token_to_id("<|start_header_id|>").is_some() {
        Template::LlavaLlama3
    } else {
        Template::Raw
    }
}

/// The aspect mode a config calls for: anyres with pinpoints, else pad.
pub fn default_aspect(cfg: &LlavaNextConfig) -> Aspect {
    if cfg.image_grid_pinpoints.is_empty() {
        Aspect::Pad
    } else {
        Aspect::Anyres
    }
}

/// Token ids of `text`: split at each `<image>`, pieces tokenized (special tokens only for the
/// first piece, as the reference's `tokenizer_image_token`), one `image_token_index` between.
pub fn tokenize(
    tok: &Tokenizer,
    text: &str,
    image_token_index: i64,
    add_special: bool,
) -> Result<Vec<i64>> {
    let mut ids = Vec::new();
    for (k, piece) in text.split(IMAGE_TOKEN).enumerate() {
        if k > 0 {
            ids.push(image_token_index);
        }
        if piece.is_empty() && !(k == 0 && add_special) {
            continue;
        }
        let enc = tok
            .encode(piece, add_special && k == 0)
            .map_err(|e| Error::Batch(format!("cannot tokenize {piece:?}: {e}")))?;
        ids.extend(enc.get_ids().iter().map(|&i| i as i64));
    }
    Ok(ids)
}

/// Tiles of one image file as the build makes them: `[T, 3, 336, 336]` f32 and its metadata
/// (other tile sizes: HF's image processor, [`super::hf_image`]).
pub fn load_image(
    path: &Path,
    cfg: &LlavaNextConfig,
    aspect: Aspect,
    dev: &Device,
) -> Result<(Tensor, ImageMeta)> {
    let size = cfg.vision_config.image_size;
    let rgb = decode_rgb_file(path)
        .map_err(|e| Error::Batch(format!("{}: cannot decode: {e}", path.display())))?;
    if size != TILE as usize {
        // Not the build's geometry: HF's image processor at the model's tile size.
        if aspect != Aspect::Anyres || cfg.image_grid_pinpoints.is_empty() {
            return Err(Error::Config(format!(
                "the model's tiles are {size} px: only anyres with image_grid_pinpoints is \
                 supported at other sizes than {TILE} px"
            )));
        }
        let (px, t, grid) =
            super::hf_image::hf_anyres_tiles(&rgb, size as u32, &cfg.image_grid_pinpoints)
                .ok_or_else(|| Error::Config("no image_grid_pinpoints".into()))?;
        let tensor = Tensor::from_vec(px, (t, 3, size, size), dev)?;
        let meta = ImageMeta {
            orig_size: (rgb.width as usize, rgb.height as usize),
            grid,
            num_tiles: t,
        };
        return Ok((tensor, meta));
    }
    let mode = match aspect {
        Aspect::Anyres => {
            if cfg.image_grid_pinpoints.is_empty() {
                return Err(Error::Config(
                    "anyres needs image_grid_pinpoints in config.json".into(),
                ));
            }
            // HF lists (height, width); the tiler takes (width, height).
            AspectMode::Anyres(
                cfg.image_grid_pinpoints
                    .iter()
                    .map(|[h, w]| (*w as u32, *h as u32))
                    .collect(),
            )
        }
        Aspect::Pad => AspectMode::Pad,
        Aspect::Square => AspectMode::Square,
    };
    let tiles = make_tiles(&rgb, &mode)
        .map_err(|e| Error::Batch(format!("{}: cannot tile: {e}", path.display())))?;
    let px = normalize_tiles(&tiles);
    let t = tiles.num_tiles;
    let s = TILE as usize;
    let tensor = Tensor::from_vec(px, (t, 3, s, s), dev)?;
    let orig = (rgb.width as usize, rgb.height as usize);
    let meta = if t == 1 {
        ImageMeta::single(orig)
    } else {
        ImageMeta {
            orig_size: orig,
            grid: (tiles.grid_cols as usize, tiles.grid_rows as usize),
            num_tiles: t,
        }
    };
    Ok((tensor, meta))
}

/// A prompt from a question and image files (images go where the template puts them; in `raw`
/// text without `<image>`, at the front).
pub fn build_prompt(
    tok: &Tokenizer,
    cfg: &LlavaNextConfig,
    question: &str,
    images: &[&Path],
    format: &PromptFormat,
    aspect: Aspect,
    dev: &Device,
) -> Result<(String, Prompt)> {
    let text = match format {
        PromptFormat::Chat(c) => c.render(question, images.len())?,
        PromptFormat::LlavaLlama3 => llava_llama3_text(question, images.len()),
        PromptFormat::Raw => {
            let n = question.matches(IMAGE_TOKEN).count();
            if n == 0 {
                let prefix = format!("{IMAGE_TOKEN} ").repeat(images.len());
                format!("{prefix}{question}")
            } else if n == images.len() {
                question.to_string()
            } else {
                return Err(Error::Batch(format!(
                    "the prompt has {n} {IMAGE_TOKEN} for {} images",
                    images.len()
                )));
            }
        }
    };
    // As HF's processor: special tokens unless the rendered text starts with BOS.
    let add_special = match format {
        PromptFormat::Chat(c) => !c.starts_with_bos(&text),
        PromptFormat::LlavaLlama3 => true,
        PromptFormat::Raw => false,
    };
    let input_ids = tokenize(tok, &text, cfg.image_token_index, add_special)?;
    let mut tiles = Vec::new();
    let mut metas = Vec::new();
    for p in images {
        let (t, m) = load_image(p, cfg, aspect, dev)?;
        tiles.push(t);
        metas.push(m);
    }
    let pixel_values = if tiles.is_empty() {
        None
    } else {
        Some(Tensor::cat(&tiles, 0)?)
    };
    Ok((
        text,
        Prompt {
            input_ids,
            pixel_values,
            images: metas,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_text_matches_the_chat_template() {
        let t = llava_llama3_text("  What is this? ", 1);
        assert!(t.starts_with("<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful"));
        assert!(t.ends_with(
            "<|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat is this?<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n"
        ));
    }
}
