//! Pillow-exact decoding, resampling and anyres tiling for LLaVA-NeXT.
//!
//! `decode` -> `RgbImage` (Pillow `convert("RGB")`), `resample` (Pillow BICUBIC),
//! `geometry` (anyres sizes and token counts, from `llava_formats`), `tiles` (uint8 `(T, 3, 336, 336)` tiles),
//! `normalize` (the CLIP processor's float32 values).

mod bmp;
pub mod decode;
pub mod limits;
pub mod normalize;
pub mod probe;
pub mod resample;
mod tiff_guard;
pub mod tiles;
pub mod truncation;

pub use decode::{
    decode_rgb, decode_rgb_file, decode_rgb_file_with, decode_rgb_with, ImageError, RgbImage,
};
pub use geometry::{
    anyres_grid, anyres_image_tokens, parse_pinpoints, resize_and_pad_size, select_best_resolution,
    single_tile_tokens, unpad_feature_hw, MergeType, PinpointsError, RECIPE_PINPOINTS, TILE,
};
pub use limits::{DecodeLimits, PILLOW_MAX_IMAGE_PIXELS};
/// The anyres geometry lives in `llava_formats` (the trainer shares it); re-exported here
/// because tiling is where it is used most.
pub use llava_formats::geometry;
pub use normalize::normalize_tiles;
pub use probe::{probe_size, probe_size_file, probe_size_file_with, probe_size_with};
pub use resample::{resize_bicubic, resize_bicubic_pillow13};
pub use tiles::{make_tiles, AspectMode, TileError, Tiles};

use std::path::Path;

/// Write tile `i` of `tiles` as an RGB PNG (for `convert --dump-tiles`).
pub fn write_tile_png(tiles: &Tiles, i: usize, path: &Path) -> Result<(), image::ImageError> {
    let hwc = tiles.tile_hwc(i);
    image::save_buffer_with_format(
        path,
        &hwc,
        TILE,
        TILE,
        image::ExtendedColorType::Rgb8,
        image::ImageFormat::Png,
    )
}
