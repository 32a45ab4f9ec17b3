//! Token geometry of an image: how many input positions its features take after the anyres
//! merge (`spatial_unpad`: the unpadded feature grid plus one newline per row), from the config
//! and the image's size and grid alone. The pipeline counts the same way
//! (`llava_formats::geometry`), so shard lengths are exact.

use crate::model::batch::ImageMeta;
use crate::model::config::{LlavaNextConfig, MergeType};
use crate::{Error, Result};

impl LlavaNextConfig {
    /// Feature tokens of one tile (g², plus CLS with the `full` strategy).
    pub fn tokens_per_tile(&self) -> usize {
        let g = self.vision_config.grid_size();
        g * g + usize::from(self.vision_feature_select_strategy == "full")
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
}
