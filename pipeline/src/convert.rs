//! One record → one training sample: template tokens, tiles of every image, exact length.

use std::path::Path;

use llava_formats::constants::{IMAGE_TOKEN_INDEX, TOKENS_PER_TILE};
use llava_imaging::{
    anyres_image_tokens, decode_rgb_file, make_tiles, single_tile_tokens, AspectMode, MergeType,
    Tiles,
};

use crate::record::Record;
use crate::reject::Reject;
use crate::template::{tokenize, Template};
use crate::tokenizer::TextTokenizer;

/// Everything that decides what a record becomes (one source's settings in `datasets.toml`).
#[derive(Debug, Clone)]
pub struct ConvertConfig {
    pub template: Template,
    /// Single-image processing; records with several images use `pad` for each (as the reference).
    pub aspect: AspectMode,
    pub merge: MergeType,
    pub model_max_length: usize,
}

/// One image of a sample, tiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SampleImage {
    /// Path as written in the record (relative to the image folder).
    pub path: String,
    /// `(w, h)` of the decoded image, in stored orientation.
    pub image_size: (u32, u32),
    /// `anyres`, `pad` or `square`.
    pub processing: &'static str,
    /// Feature tokens this image becomes in the model.
    pub image_tokens: usize,
    /// Base tile first; best resolution and grid for anyres.
    pub tiles: Tiles,
}

/// A converted sample: what one shard row holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    pub index: usize,
    pub id: String,
    pub input_ids: Vec<i32>,
    pub labels: Vec<i32>,
    /// Exact sequence length in the model: text tokens + image tokens.
    pub length: usize,
    pub truncated: bool,
    pub images: Vec<SampleImage>,
}

impl Sample {
    pub fn num_image_tokens(&self) -> usize {
        self.images.iter().map(|i| i.image_tokens).sum()
    }
    pub fn modality(&self) -> &'static str {
        if self.images.is_empty() {
            "text"
        } else {
            "image"
        }
    }
    /// Positions whose label is trained on (the first position is never a target, but the
    /// reference's `n_supervised` counts it, and so do we).
    pub fn supervised_tokens(&self) -> usize {
        self.labels
            .iter()
            .filter(|&&l| l != llava_formats::constants::IGNORE_INDEX)
            .count()
    }
}

pub fn convert(
    record: &Record,
    image_folder: &Path,
    config: &ConvertConfig,
    tokenizer: &TextTokenizer,
) -> Result<Sample, Reject> {
    let mut tokens = tokenize(config.template, record, tokenizer)?;
    let multi = record.images.len() > 1;
    let mut images = record
        .images
        .iter()
        .map(|path| {
            let mode = if multi {
                &AspectMode::Pad
            } else {
                &config.aspect
            };
            tile_image(image_folder, path, mode, config.merge)
        })
        .collect::<Result<Vec<_>, _>>()?;

    let cut = truncation_point(&tokens.input_ids, &images, config.model_max_length);
    let truncated = cut.keep < tokens.input_ids.len();
    if truncated {
        if let Some(image) = cut.image_cut {
            if cut.keep <= tokens.first_trained_position {
                return Err(Reject::ImageDoesNotFit {
                    index: image,
                    tokens: images[image].image_tokens,
                    position: cut.length,
                    max_len: config.model_max_length,
                });
            }
        }
        if cut.keep <= tokens.first_trained_position {
            return Err(Reject::NothingLeftAfterTruncation {
                max_len: config.model_max_length,
            });
        }
        tokens.input_ids.truncate(cut.keep);
        tokens.labels.truncate(cut.keep);
        images.truncate(cut.images_kept);
    }
    Ok(Sample {
        index: record.index,
        id: record.id.clone(),
        input_ids: tokens.input_ids,
        labels: tokens.labels,
        length: cut.length,
        truncated,
        images,
    })
}

fn tile_image(
    folder: &Path,
    path: &str,
    mode: &AspectMode,
    merge: MergeType,
) -> Result<SampleImage, Reject> {
    // `os.path.join` semantics: an absolute path in the record replaces the folder.
    let full = folder.join(path);
    let reject = |reason: String| Reject::Image {
        path: full.display().to_string(),
        reason,
    };
    let image = decode_rgb_file(&full).map_err(|e| reject(e.to_string()))?;
    let tiles = make_tiles(&image, mode).map_err(|e| reject(e.to_string()))?;
    let image_size = (image.width, image.height);
    let (processing, image_tokens) = match (mode, merge) {
        (AspectMode::Anyres(pinpoints), MergeType::SpatialUnpad) => {
            ("anyres", anyres_image_tokens(image_size, pinpoints))
        }
        // `flat` concatenates the features of every tile.
        (AspectMode::Anyres(_), MergeType::Flat) => {
            ("anyres", tiles.num_tiles * TOKENS_PER_TILE as usize)
        }
        (AspectMode::Pad, _) => ("pad", single_tile_tokens(merge)),
        (AspectMode::Square, _) => ("square", single_tile_tokens(merge)),
    };
    Ok(SampleImage {
        path: path.to_string(),
        image_size,
        processing,
        image_tokens,
        tiles,
    })
}

struct Cut {
    /// Ids kept.
    keep: usize,
    /// Expanded length of the kept ids.
    length: usize,
    images_kept: usize,
    /// The image whose features would have crossed `max_len`, if that is where the cut fell.
    image_cut: Option<usize>,
}

/// Where to cut so that the expanded sequence fits in `max_len`. The reference cuts the expanded
/// embeddings at `max_len`, possibly inside an image; we cut before such an image instead: nothing
/// after it would be kept anyway, so the trained tokens are the same.
fn truncation_point(ids: &[i32], images: &[SampleImage], max_len: usize) -> Cut {
    let mut length = 0;
    let mut image = 0;
    for (pos, &id) in ids.iter().enumerate() {
        let add = if id == IMAGE_TOKEN_INDEX {
            images[image].image_tokens
        } else {
            1
        };
        if length + add > max_len {
            return Cut {
                keep: pos,
                length,
                images_kept: image,
                image_cut: (id == IMAGE_TOKEN_INDEX).then_some(image),
            };
        }
        length += add;
        if id == IMAGE_TOKEN_INDEX {
            image += 1;
        }
    }
    Cut {
        keep: ids.len(),
        length,
        images_kept: image,
        image_cut: None,
    }
}
