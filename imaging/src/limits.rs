//! Size limits checked before any pixel is decoded: a few megabytes of PNG can declare
//! gigapixels, and one such sample must not take gigabytes of memory.

/// Pillow's `Image.MAX_IMAGE_PIXELS` (`1024 * 1024 * 1024 // 4 // 3`): above it Pillow warns.
pub const PILLOW_WARN_PIXELS: u64 = 89_478_485;

/// Pillow raises `DecompressionBombError` above `2 * MAX_IMAGE_PIXELS` pixels; our default limit.
pub const PILLOW_MAX_IMAGE_PIXELS: u64 = 2 * PILLOW_WARN_PIXELS;

/// Default largest image file read (256 MiB).
pub const DEFAULT_MAX_IMAGE_FILE_BYTES: u64 = 256 << 20;

/// What a decode may cost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Largest `width * height` decoded; larger images are refused from their header.
    pub max_pixels: u64,
    /// Largest encoded file read into memory.
    pub max_file_bytes: u64,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits {
            max_pixels: PILLOW_MAX_IMAGE_PIXELS,
            max_file_bytes: DEFAULT_MAX_IMAGE_FILE_BYTES,
        }
    }
}

impl DecodeLimits {
    /// The most bytes any decoder may allocate for one image: the widest pixel layout we accept
    /// (RGBA, 16 bits per channel) at the pixel limit, plus room for the decoders' own tables.
    pub fn max_alloc_bytes(&self) -> u64 {
        self.max_pixels.saturating_mul(8).saturating_add(64 << 20)
    }
}
