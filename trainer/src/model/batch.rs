//! What the model takes in: a right-padded (or packed) micro-batch of token ids, labels and
//! tiles, and each image's geometry.

use candle_core::{DType, Tensor};

use crate::{Error, Result};

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

    /// A grid image has its base tile and one per grid cell.
    pub(crate) fn check_tiles(&self) -> Result<()> {
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
