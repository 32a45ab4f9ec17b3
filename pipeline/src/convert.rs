//! One record → one training sample, in two steps:
//! - [`prepare`]: template tokens, each image's size (from its header) and token count, the exact
//!   length and the truncation. Cheap: a build runs it over the whole mixture to plan the groups.
//! - [`render`]: decodes and tiles the images of a prepared sample (the expensive part).

use std::path::Path;
use std::sync::Arc;

use llava_formats::constants::{IGNORE_INDEX, IMAGE_TOKEN_INDEX, TOKENS_PER_TILE};
use llava_imaging::{
    anyres_grid, anyres_image_tokens, decode_rgb_file_with, make_tiles, probe_size_file_with,
    single_tile_tokens, AspectMode, DecodeLimits, MergeType, Tiles, TILE,
};
use serde::{Deserialize, Serialize};

use crate::budget::PixelBudget;
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
    /// Pixel and file-size limits, checked from the header in `prepare` and again in `render`.
    pub limits: DecodeLimits,
    /// Shared by every source of a run: bounds the pixels decoded at once.
    pub budget: Arc<PixelBudget>,
}

impl ConvertConfig {
    /// The decoded-pixel budget for `limits`: two of the largest allowed images at once.
    pub fn budget_for(limits: &DecodeLimits) -> Arc<PixelBudget> {
        Arc::new(PixelBudget::new(limits.max_pixels.saturating_mul(2)))
    }
}

/// A sample with everything but its pixels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prepared {
    pub index: usize,
    pub id: String,
    pub input_ids: Vec<i32>,
    pub labels: Vec<i32>,
    /// Exact sequence length in the model: text tokens + image tokens.
    pub length: usize,
    pub truncated: bool,
    pub images: Vec<PlannedImage>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedImage {
    /// Path as written in the record (relative to the image folder).
    pub path: String,
    /// `(w, h)` in stored orientation (no EXIF rotation), from the file header.
    pub image_size: (u32, u32),
    /// `anyres`, `pad` or `square`.
    pub processing: String,
    pub num_tiles: usize,
    /// Feature tokens this image becomes in the model.
    pub image_tokens: usize,
}

/// One tiled image of a sample.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SampleImage {
    pub path: String,
    pub image_size: (u32, u32),
    pub processing: String,
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
    pub length: usize,
    pub truncated: bool,
    pub images: Vec<SampleImage>,
}

impl Prepared {
    pub fn num_image_tokens(&self) -> usize {
        self.images.iter().map(|i| i.image_tokens).sum()
    }
    pub fn num_tiles(&self) -> usize {
        self.images.iter().map(|i| i.num_tiles).sum()
    }
    pub fn modality(&self) -> &'static str {
        if self.images.is_empty() {
            "text"
        } else {
            "image"
        }
    }
    /// Positions with a label (the reference's `n_supervised`).
    pub fn supervised_tokens(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE_INDEX).count()
    }
}

/// Decodes and tiles a record in one go (`prepare` + `render`).
pub fn convert(
    record: &Record,
    image_folder: &Path,
    config: &ConvertConfig,
    tokenizer: &TextTokenizer,
) -> Result<Sample, Reject> {
    let prepared = prepare(record, image_folder, config, tokenizer)?;
    render(prepared, image_folder, config)
}

pub fn prepare(
    record: &Record,
    image_folder: &Path,
    config: &ConvertConfig,
    tokenizer: &TextTokenizer,
) -> Result<Prepared, Reject> {
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
            plan_image(image_folder, path, mode, config)
        })
        .collect::<Result<Vec<_>, _>>()?;

    let cut = truncation_point(&tokens.input_ids, &images, config.model_max_length);
    let truncated = cut.keep < tokens.input_ids.len();
    if truncated {
        if cut.keep <= tokens.first_trained_position {
            return Err(match cut.image_cut {
                Some(image) => Reject::ImageDoesNotFit {
                    index: image,
                    tokens: images[image].image_tokens,
                    position: cut.length,
                    max_len: config.model_max_length,
                },
                None => Reject::NothingLeftAfterTruncation {
                    max_len: config.model_max_length,
                },
            });
        }
        tokens.input_ids.truncate(cut.keep);
        tokens.labels.truncate(cut.keep);
        images.truncate(cut.images_kept);
    }
    Ok(Prepared {
        index: record.index,
        id: record.id.clone(),
        input_ids: tokens.input_ids,
        labels: tokens.labels,
        length: cut.length,
        truncated,
        images,
    })
}

/// Decodes and tiles the images of a prepared sample.
pub fn render(
    prepared: Prepared,
    image_folder: &Path,
    config: &ConvertConfig,
) -> Result<Sample, Reject> {
    let images = prepared
        .images
        .into_iter()
        .map(|planned| {
            let full = image_folder.join(&planned.path);
            let reject = |reason: String| Reject::Image {
                path: full.display().to_string(),
                reason,
            };
            // Held until the tiles are made: the decoded image is the big allocation.
            let (w, h) = planned.image_size;
            let _lease = config.budget.acquire(u64::from(w) * u64::from(h));
            let image = decode_rgb_file_with(&full, &config.limits)
                .map_err(|e| Reject::image(&full, &e))?;
            if (image.width, image.height) != planned.image_size {
                return Err(reject(format!(
                    "decoded size {}x{} differs from the header's {}x{}",
                    image.width, image.height, planned.image_size.0, planned.image_size.1
                )));
            }
            let mode = match planned.processing.as_str() {
                "pad" => AspectMode::Pad,
                _ => config.aspect.clone(),
            };
            let tiles = make_tiles(&image, &mode).map_err(|e| reject(e.to_string()))?;
            Ok(SampleImage {
                path: planned.path,
                image_size: planned.image_size,
                processing: planned.processing,
                image_tokens: planned.image_tokens,
                tiles,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Sample {
        index: prepared.index,
        id: prepared.id,
        input_ids: prepared.input_ids,
        labels: prepared.labels,
        length: prepared.length,
        truncated: prepared.truncated,
        images,
    })
}

fn plan_image(
    folder: &Path,
    path: &str,
    mode: &AspectMode,
    config: &ConvertConfig,
) -> Result<PlannedImage, Reject> {
    let merge = config.merge;
    // `os.path.join` semantics: an absolute path in the record replaces the folder.
    let full = folder.join(path);
    let image_size =
        probe_size_file_with(&full, &config.limits).map_err(|e| Reject::image(&full, &e))?;
    let (processing, num_tiles, image_tokens) = match mode {
        AspectMode::Anyres(pinpoints) => {
            let (cols, rows) = anyres_grid(image_size, pinpoints, TILE);
            let num_tiles = 1 + (cols * rows) as usize;
            let tokens = match merge {
                MergeType::SpatialUnpad => anyres_image_tokens(image_size, pinpoints),
                // `flat` concatenates the features of every tile.
                MergeType::Flat => num_tiles * TOKENS_PER_TILE as usize,
            };
            ("anyres", num_tiles, tokens)
        }
        AspectMode::Pad => ("pad", 1, single_tile_tokens(merge)),
        AspectMode::Square => ("square", 1, single_tile_tokens(merge)),
    };
    Ok(PlannedImage {
        path: path.to_string(),
        image_size,
        processing: processing.to_string(),
        num_tiles,
        image_tokens,
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
fn truncation_point(ids: &[i32], images: &[PlannedImage], max_len: usize) -> Cut {
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
