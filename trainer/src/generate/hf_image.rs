//! Tiles for models whose tiles are not the build's 336 px: HF `LlavaNextImageProcessor` (its
//! PIL path) with the tile size of the model's vision config: the image squashed to one tile,
//! then resized into the best pinpoint (aspect kept, Pillow bicubic), padded with black to it,
//! cut into tiles row-major; each rescaled by 1/255 and CLIP-normalised in f32. The resizes are
//! Pillow 13's (vertical pass first when the height shrinks much more than the width), which HF's processor uses today;
//! the build keeps the reference's Pillow 10.3 order. The golden is the parity fixture's
//! `preprocess.pixel_values_pil_backend` (56-px tiles, made with Pillow 13).

use llava_imaging::{
    resize_and_pad_size, resize_bicubic_pillow13 as resize_bicubic, select_best_resolution,
    RgbImage,
};

/// OpenAI CLIP's normalisation (every LLaVA-NeXT preprocessor config).
const MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
const STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// `[T, 3, tile, tile]` values (base tile first) and the grid `(cols, rows)`; `pinpoints` as
/// config.json lists them, `[height, width]`. None: the pinpoints have no resolution.
pub fn hf_anyres_tiles(
    img: &RgbImage,
    tile: u32,
    pinpoints: &[[usize; 2]],
) -> Option<(Vec<f32>, usize, (usize, usize))> {
    let possible: Vec<(u32, u32)> = pinpoints
        .iter()
        .map(|[h, w]| (*w as u32, *h as u32))
        .collect();
    let best = select_best_resolution((img.width, img.height), &possible)?;
    let ((nw, nh), (px, py)) = resize_and_pad_size((img.width, img.height), best);
    let resized = resize_bicubic(img, nw, nh);
    let (bw, bh) = best;
    let mut padded = vec![0u8; (bw * bh * 3) as usize];
    for y in 0..nh {
        let src = (y * nw * 3) as usize;
        let dst = (((y + py) * bw + px) * 3) as usize;
        padded[dst..dst + (nw * 3) as usize]
            .copy_from_slice(&resized.data[src..src + (nw * 3) as usize]);
    }
    let (cols, rows) = ((bw / tile) as usize, (bh / tile) as usize);
    let base = resize_bicubic(img, tile, tile);
    let t = tile as usize;
    let mut out = Vec::with_capacity((1 + cols * rows) * 3 * t * t);
    push_chw(&mut out, &base.data, t, 0, 0, t);
    for r in 0..rows {
        for c in 0..cols {
            push_chw(&mut out, &padded, bw as usize, c * t, r * t, t);
        }
    }
    Some((out, 1 + cols * rows, (cols, rows)))
}

/// The `t`×`t` window at `(x0, y0)` of an HWC image `width` wide, as normalised CHW.
fn push_chw(out: &mut Vec<f32>, hwc: &[u8], width: usize, x0: usize, y0: usize, t: usize) {
    for ch in 0..3 {
        for y in 0..t {
            for x in 0..t {
                let v = hwc[((y0 + y) * width + x0 + x) * 3 + ch];
                // numpy: f64 multiply, cast to f32, then f32 arithmetic.
                let scaled = (f64::from(v) * (1.0 / 255.0)) as f32;
                out.push((scaled - MEAN[ch]) / STD[ch]);
            }
        }
    }
}
