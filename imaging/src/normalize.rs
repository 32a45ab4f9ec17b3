//! The CLIP processor's rescale + normalise (spec §3.6) of a tile set; the arithmetic lives in
//! `llava_formats::normalize`, shared with the trainer's loader.

use llava_formats::normalize::normalize_into;

use crate::tiles::Tiles;

/// `(T, 3, 336, 336)` float32 pixel values in the same layout as `tiles.data`.
pub fn normalize_tiles(tiles: &Tiles) -> Vec<f32> {
    let mut out = vec![0f32; tiles.data.len()];
    let plane = tiles.data.len() / (tiles.num_tiles.max(1) * 3);
    if plane > 0 {
        normalize_into(&tiles.data, plane, &mut out);
    }
    out
}
