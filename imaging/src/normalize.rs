//! The CLIP processor's rescale + normalise (spec §3.6): `x = f32(f64(u8) * f64(1/255))`,
//! then `(x - mean[c]) / std[c]` in f32. Bit-exact with transformers 4.40 on uint8 input.

use crate::tiles::Tiles;

/// The processor config's Python floats; numpy casts them to the image dtype (f32).
pub const CLIP_MEAN_F64: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
pub const CLIP_STD_F64: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

/// Lookup table per channel: value of each u8 after rescale + normalise.
pub fn normalize_lut() -> [[f32; 256]; 3] {
    let mut lut = [[0f32; 256]; 3];
    for (c, table) in lut.iter_mut().enumerate() {
        for (v, out) in table.iter_mut().enumerate() {
            let x = (v as f64 * (1.0f64 / 255.0)) as f32;
            *out = (x - CLIP_MEAN_F64[c] as f32) / CLIP_STD_F64[c] as f32;
        }
    }
    lut
}

/// `(T, 3, 336, 336)` float32 pixel values in the same layout as `tiles.data`.
pub fn normalize_tiles(tiles: &Tiles) -> Vec<f32> {
    let lut = normalize_lut();
    let plane = tiles.data.len() / (tiles.num_tiles.max(1) * 3);
    tiles
        .data
        .iter()
        .enumerate()
        .map(|(i, &v)| lut[(i / plane) % 3][v as usize])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_table_bits() {
        let lut = normalize_lut();
        let table: [(usize, [u32; 3]); 6] = [
            (0, [0xbfe568dc, 0xbfe044b8, 0xbfbd77d8]),
            (1, [0xbfe38a7f, 0xbfde58f1, 0xbfbba5e1]),
            (127, [0x3d7ce092, 0x3e1d9531, 0x3ea6c5e6]),
            (128, [0x3d9c5620, 0x3e2cf36b, 0x3eae0dc4]),
            (254, [0x3ff536e5, 0x4003d502, 0x40086d66]),
            (255, [0x3ff71541, 0x4004cae5, 0x40095660]),
        ];
        for (v, bits) in table {
            for c in 0..3 {
                assert_eq!(lut[c][v].to_bits(), bits[c], "v={v} c={c}");
            }
        }
    }
}
