//! 16-bit BMP exactly as Pillow reads it. Pillow supports two bit-field layouts (5-6-5 and
//! 5-5-5, the latter also for uncompressed 16-bit files) and widens each channel with
//! `v * 255 / max` (its `BGR;16` / `BGR;15` unpackers); `image` widens by bit replication, which
//! differs by one on some values. Other 16-bit masks are refused, as Pillow refuses them.

use crate::decode::{check_pixels, Format, ImageError, RgbImage};
use crate::limits::DecodeLimits;
use crate::truncation::bmp_shortfall;

const BI_RGB: u32 = 0;
const BI_BITFIELDS: u32 = 3;

fn corrupt(reason: String) -> ImageError {
    ImageError::Corrupt {
        format: "BMP",
        reason,
    }
}

/// `None` when the file is not a 16-bit BMP (another decoder handles it).
pub(crate) fn decode_bmp16(
    b: &[u8],
    limits: &DecodeLimits,
) -> Option<Result<RgbImage, ImageError>> {
    if b.len() < 54 {
        return None;
    }
    let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    let header = u32_at(14);
    if header < 40 || u16::from_le_bytes([b[28], b[29]]) != 16 {
        return None;
    }
    Some(decode(b, limits, u32_at))
}

fn decode(
    b: &[u8],
    limits: &DecodeLimits,
    u32_at: impl Fn(usize) -> u32,
) -> Result<RgbImage, ImageError> {
    let width = u32_at(18) as i32;
    let height = u32_at(22) as i32;
    let compression = u32_at(30);
    if width <= 0 || height == 0 {
        return Err(ImageError::ZeroSize {
            format: "BMP",
            width: width.max(0) as u32,
            height: height.unsigned_abs(),
        });
    }
    let masks = match compression {
        BI_RGB => (0x7C00, 0x3E0, 0x1F),
        BI_BITFIELDS if b.len() >= 66 => (u32_at(54), u32_at(58), u32_at(62)),
        _ => {
            return Err(corrupt(format!(
                "16-bit BMP with compression {compression} is not supported (nor by Pillow)"
            )))
        }
    };
    let green_bits = match masks {
        (0xF800, 0x7E0, 0x1F) => 6,
        (0x7C00, 0x3E0, 0x1F) => 5,
        (r, g, b) => {
            return Err(corrupt(format!(
                "unsupported 16-bit BMP bit fields layout (red {r:#x}, green {g:#x}, blue {b:#x}); \
                 Pillow reads only 5-6-5 and 5-5-5"
            )))
        }
    };
    let (w, h) = (width as u32, height.unsigned_abs());
    check_pixels(Format::Bmp, w, h, limits)?;
    if let Some(s) = bmp_shortfall(b) {
        return Err(ImageError::Truncated {
            format: "BMP",
            reason: s.to_string(),
        });
    }
    let offset = u32_at(10) as usize;
    let stride = (w as usize * 2).div_ceil(4) * 4;
    let mut data = Vec::with_capacity(w as usize * h as usize * 3);
    for y in 0..h as usize {
        // Rows are stored bottom-up unless the height is negative.
        let file_row = if height > 0 { h as usize - 1 - y } else { y };
        let start = offset + file_row * stride;
        let row = b
            .get(start..start + w as usize * 2)
            .ok_or_else(|| corrupt("pixel data outside the file".into()))?;
        for px in row.chunks_exact(2) {
            let v = u32::from(u16::from_le_bytes([px[0], px[1]]));
            let (r, g, bl) = if green_bits == 6 {
                ((v >> 11) & 31, (v >> 5) & 63, v & 31)
            } else {
                ((v >> 10) & 31, (v >> 5) & 31, v & 31)
            };
            let gmax = (1 << green_bits) - 1;
            data.extend_from_slice(&[
                (r * 255 / 31) as u8,
                (g * 255 / gmax) as u8,
                (bl * 255 / 31) as u8,
            ]);
        }
    }
    Ok(RgbImage {
        width: w,
        height: h,
        data,
    })
}
