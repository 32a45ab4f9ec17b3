//! uint8 CHW tiles → CLIP-normalised float32 (shared by the pipeline's checks and the trainer's
//! loader), bit-exact with the reference (spec §3.6):
//! `x = f32(f64(u8) * f64(1/255))`, then `(x - mean_f32[c]) / std_f32[c]` in f32. Only 256
//! values per channel exist, so a lookup table computed once with exactly that arithmetic is
//! both exact and fast.

use std::sync::OnceLock;

use crate::constants::{CLIP_MEAN, CLIP_STD};

/// The normalised value of every u8, per channel.
pub fn lut() -> &'static [[f32; 256]; 3] {
    static LUT: OnceLock<[[f32; 256]; 3]> = OnceLock::new();
    LUT.get_or_init(|| {
        let mut lut = [[0f32; 256]; 3];
        for (c, table) in lut.iter_mut().enumerate() {
            for (v, out) in table.iter_mut().enumerate() {
                let x = (v as f64 * (1.0f64 / 255.0)) as f32;
                *out = (x - CLIP_MEAN[c]) / CLIP_STD[c];
            }
        }
        lut
    })
}

/// Normalises `tiles` (any number of `(3, S, S)` tiles back to back, `plane` = S·S) into `out`
/// (same length).
pub fn normalize_into(tiles: &[u8], plane: usize, out: &mut [f32]) {
    debug_assert_eq!(tiles.len(), out.len());
    debug_assert!(plane > 0 && tiles.len().is_multiple_of(3 * plane));
    let lut = lut();
    for (i, (src, dst)) in tiles.chunks(plane).zip(out.chunks_mut(plane)).enumerate() {
        let table = &lut[i % 3];
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = table[s as usize];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_3_11_uniform_values_bit_exact() {
        let table: [(usize, [u32; 3]); 6] = [
            (0, [0xbfe568dc, 0xbfe044b8, 0xbfbd77d8]),
            (1, [0xbfe38a7f, 0xbfde58f1, 0xbfbba5e1]),
            (127, [0x3d7ce092, 0x3e1d9531, 0x3ea6c5e6]),
            (128, [0x3d9c5620, 0x3e2cf36b, 0x3eae0dc4]),
            (254, [0x3ff536e5, 0x4003d502, 0x40086d66]),
            (255, [0x3ff71541, 0x4004cae5, 0x40095660]),
        ];
        for (v, bits) in table {
            // A uniform 2x2 tile of value v: every element of channel c must have the bits.
            let tile = vec![v as u8; 3 * 4];
            let mut out = vec![0f32; tile.len()];
            normalize_into(&tile, 4, &mut out);
            for (i, x) in out.iter().enumerate() {
                assert_eq!(x.to_bits(), bits[i / 4], "v={v} element {i}");
            }
        }
    }
}
