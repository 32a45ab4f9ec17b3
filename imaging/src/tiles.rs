//! From a decoded image to the uint8 tiles the reference feeds CLIP (spec §3.2-3.9). The
//! layout is `(T, 3, 336, 336)` (tile, RGB channel, row, column), i.e. exactly the array
//! whose SHA-256 the goldens record; normalisation to float is a separate step.

use crate::decode::RgbImage;
use crate::geometry::{clip_resize_size, resize_and_pad_size, select_best_resolution, TILE};
use crate::resample::{apply_planar_multi, PlanarScratch, ResizePlan};

/// `int(mean * 255)` of the CLIP processor: the `pad` background (spec §3.9).
pub const PAD_BACKGROUND: [u8; 3] = [122, 116, 104];

/// `image_aspect_ratio` of the reference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AspectMode {
    /// Base squash + best-resolution tiles (`anyres`, also `anyres_max_N`), `(w, h)` pinpoints.
    Anyres(Vec<(u32, u32)>),
    /// `expand2square` with [`PAD_BACKGROUND`], then the CLIP processor (one tile).
    Pad,
    /// The CLIP processor directly: shortest edge 336, centre crop (one tile).
    Square,
}

/// Tiles of one image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tiles {
    /// 1 for square/pad; 1 + cols * rows for anyres (base first).
    pub num_tiles: usize,
    /// Anyres only: the selected `(w, h)`.
    pub best_resolution: Option<(u32, u32)>,
    /// Anyres grid (1 x 1 for square/pad).
    pub grid_cols: u32,
    pub grid_rows: u32,
    /// `(num_tiles, 3, 336, 336)` uint8, channel-planar.
    pub data: Vec<u8>,
}

/// Bytes in one channel-planar tile.
pub const TILE_BYTES: usize = 3 * (TILE as usize) * (TILE as usize);

impl Tiles {
    /// Tile `i` as `(3, 336, 336)` bytes. Panics if `i >= num_tiles`.
    pub fn tile(&self, i: usize) -> &[u8] {
        &self.data[i * TILE_BYTES..(i + 1) * TILE_BYTES]
    }

    /// Tile `i` as `(336, 336, 3)` interleaved RGB (for PNG dumps and HWC hashes).
    pub fn tile_hwc(&self, i: usize) -> Vec<u8> {
        chw_to_hwc(self.tile(i))
    }
}

/// `(3, 336, 336)` planar to `(336, 336, 3)` interleaved.
pub fn chw_to_hwc(tile: &[u8]) -> Vec<u8> {
    let plane = TILE as usize * TILE as usize;
    let mut out = vec![0u8; plane * 3];
    for (i, px) in out.chunks_exact_mut(3).enumerate() {
        px[0] = tile[i];
        px[1] = tile[plane + i];
        px[2] = tile[2 * plane + i];
    }
    out
}

/// Samples we refuse to tile, with the reference's behaviour in the message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TileError {
    #[error("image has zero size ({0}x{1})")]
    ZeroSize(u32, u32),
    #[error("empty image_grid_pinpoints")]
    NoPinpoints,
    #[error("selected pinpoint {0}x{1} is not a multiple of the 336 tile size")]
    PinpointNotTileMultiple(u32, u32),
    #[error(
        "{mode} processing of a {w}x{h} image: the CLIP processor sees height {side} and takes \
         axis 0 as channels; the reference raises 'mean must have 1 elements' (sample substituted)"
    )]
    ChannelInferenceError {
        mode: &'static str,
        w: u32,
        h: u32,
        side: u32,
    },
    #[error(
        "{mode} processing of a {w}x{h} image: the CLIP processor sees height 3 and takes axis 0 \
         as channels; the reference would scramble channels, so the sample is rejected"
    )]
    ChannelInferenceScramble { mode: &'static str, w: u32, h: u32 },
}

/// Tile `img` as the reference does for `mode`.
pub fn make_tiles(img: &RgbImage, mode: &AspectMode) -> Result<Tiles, TileError> {
    if img.width == 0 || img.height == 0 {
        return Err(TileError::ZeroSize(img.width, img.height));
    }
    match mode {
        AspectMode::Anyres(pinpoints) => anyres(img, pinpoints),
        AspectMode::Square => {
            check_channel_trap("square", img, img.height)?;
            Ok(single_from(img))
        }
        AspectMode::Pad => {
            check_channel_trap("pad", img, img.width.max(img.height))?;
            Ok(single_from(&expand2square(img, PAD_BACKGROUND)))
        }
    }
}

/// transformers infers channels-first when the (H, W, 3) array has H in {1, 3}.
fn check_channel_trap(mode: &'static str, img: &RgbImage, side: u32) -> Result<(), TileError> {
    let (w, h) = (img.width, img.height);
    match side {
        1 => Err(TileError::ChannelInferenceError { mode, w, h, side }),
        3 => Err(TileError::ChannelInferenceScramble { mode, w, h }),
        _ => Ok(()),
    }
}

/// `expand2square`: the image pasted centred (floor offset) on a square background.
fn expand2square(img: &RgbImage, bg: [u8; 3]) -> RgbImage {
    let (w, h) = (img.width, img.height);
    if w == h {
        return img.clone();
    }
    let side = w.max(h);
    let mut canvas = RgbImage::filled(side, side, bg);
    let (x, y) = if w > h {
        (0, (w - h) / 2)
    } else {
        ((h - w) / 2, 0)
    };
    paste(&mut canvas, img, x, y);
    canvas
}

/// Paste `src` at `(x, y)` into `dst`; `src` must fit.
fn paste(dst: &mut RgbImage, src: &RgbImage, x: u32, y: u32) {
    let dstride = dst.width as usize * 3;
    let sstride = src.width as usize * 3;
    for r in 0..src.height as usize {
        let d0 = (y as usize + r) * dstride + x as usize * 3;
        dst.data[d0..d0 + sstride].copy_from_slice(&src.data[r * sstride..(r + 1) * sstride]);
    }
}

/// CLIP processor resize + centre crop of `img`, written channel-planar into `dst`
/// (`TILE_BYTES` long).
fn clip_process_into(img: &RgbImage, dst: &mut [u8]) {
    let (nw, nh) = clip_resize_size(img.size(), TILE);
    let plan = ResizePlan::new(img.width, img.height, nw, nh);
    let t = TILE as usize;
    let left = (nw as usize - t) / 2;
    let top = (nh as usize - t) / 2;
    plan.apply_planar(img, &mut PlanarScratch::default(), |ch, y, row| {
        if (top..top + t).contains(&y) {
            let o = (ch * t + y - top) * t;
            dst[o..o + t].copy_from_slice(&row[left..left + t]);
        }
    });
}

fn single_from(img: &RgbImage) -> Tiles {
    let mut data = vec![0u8; TILE_BYTES];
    clip_process_into(img, &mut data);
    Tiles {
        num_tiles: 1,
        best_resolution: None,
        grid_cols: 1,
        grid_rows: 1,
        data,
    }
}

fn anyres(img: &RgbImage, pinpoints: &[(u32, u32)]) -> Result<Tiles, TileError> {
    let best = select_best_resolution(img.size(), pinpoints).ok_or(TileError::NoPinpoints)?;
    if best.0 % TILE != 0 || best.1 % TILE != 0 {
        return Err(TileError::PinpointNotTileMultiple(best.0, best.1));
    }
    let (cols, rows) = (best.0 / TILE, best.1 / TILE);
    let n = 1 + (cols * rows) as usize;
    // Zero-initialised: the black padding of the resize-and-pad canvas is already there.
    let mut data = vec![0u8; n * TILE_BYTES];
    let t = TILE as usize;
    let plane = t * t;
    let mut scratch = PlanarScratch::default();

    // Tile 0: aspect-ignoring squash of the whole image. Tiles 1..: resize, then paste at
    // (px, py) on the black canvas, written straight into the tiles.
    let base = ResizePlan::new(img.width, img.height, TILE, TILE);
    let ((nw, nh), (px, py)) = resize_and_pad_size(img.size(), best);
    let (px, py) = (px as usize, py as usize);
    let grid = ResizePlan::new(img.width, img.height, nw, nh);
    apply_planar_multi(&[&base, &grid], img, &mut scratch, |p, ch, y, row| {
        if p == 0 {
            let o = ch * plane + y * t;
            data[o..o + t].copy_from_slice(row);
            return;
        }
        let cy = py + y;
        let (tr, yl) = (cy / t, cy % t);
        let mut x = px;
        let end = px + row.len();
        while x < end {
            let tc = x / t;
            let x1 = end.min((tc + 1) * t);
            let tile = 1 + tr * cols as usize + tc;
            let o = tile * TILE_BYTES + ch * plane + yl * t + (x - tc * t);
            data[o..o + (x1 - x)].copy_from_slice(&row[x - px..x1 - px]);
            x = x1;
        }
    });
    Ok(Tiles {
        num_tiles: n,
        best_resolution: Some(best),
        grid_cols: cols,
        grid_rows: rows,
        data,
    })
}

/// The straightforward interleaved path (resize to HWC images, paste on a canvas, crop and
/// de-interleave): the reference the planar path is checked against byte for byte.
#[cfg(test)]
pub(crate) mod reference {
    use super::*;
    use crate::resample::resize_bicubic;

    pub fn make_tiles(img: &RgbImage, mode: &AspectMode) -> Result<Tiles, TileError> {
        if img.width == 0 || img.height == 0 {
            return Err(TileError::ZeroSize(img.width, img.height));
        }
        match mode {
            AspectMode::Anyres(pinpoints) => anyres(img, pinpoints),
            AspectMode::Square => {
                check_channel_trap("square", img, img.height)?;
                Ok(single(clip_process(img)))
            }
            AspectMode::Pad => {
                check_channel_trap("pad", img, img.width.max(img.height))?;
                Ok(single(clip_process(&expand2square(img, PAD_BACKGROUND))))
            }
        }
    }

    fn single(tile_hwc: RgbImage) -> Tiles {
        let mut data = Vec::with_capacity(TILE_BYTES);
        push_planar(&mut data, &tile_hwc, 0, 0);
        Tiles {
            num_tiles: 1,
            best_resolution: None,
            grid_cols: 1,
            grid_rows: 1,
            data,
        }
    }

    /// Append the 336x336 crop at `(left, top)` of `img` in channel-planar order.
    fn push_planar(out: &mut Vec<u8>, img: &RgbImage, left: usize, top: usize) {
        let t = TILE as usize;
        let stride = img.width as usize * 3;
        for c in 0..3 {
            for y in top..top + t {
                let row = &img.data[y * stride + left * 3..y * stride + (left + t) * 3];
                out.extend(row.chunks_exact(3).map(|p| p[c]));
            }
        }
    }

    /// CLIP processor resize + centre crop, returning the 336x336 HWC crop.
    fn clip_process(img: &RgbImage) -> RgbImage {
        let (nw, nh) = clip_resize_size(img.size(), TILE);
        let resized = resize_bicubic(img, nw, nh);
        let t = TILE as usize;
        let left = (nw as usize - t) / 2;
        let top = (nh as usize - t) / 2;
        let stride = nw as usize * 3;
        let mut data = Vec::with_capacity(t * t * 3);
        for y in top..top + t {
            data.extend_from_slice(
                &resized.data[y * stride + left * 3..y * stride + (left + t) * 3],
            );
        }
        RgbImage {
            width: TILE,
            height: TILE,
            data,
        }
    }

    fn anyres(img: &RgbImage, pinpoints: &[(u32, u32)]) -> Result<Tiles, TileError> {
        let best = select_best_resolution(img.size(), pinpoints).ok_or(TileError::NoPinpoints)?;
        if best.0 % TILE != 0 || best.1 % TILE != 0 {
            return Err(TileError::PinpointNotTileMultiple(best.0, best.1));
        }
        let (cols, rows) = (best.0 / TILE, best.1 / TILE);
        let n = 1 + (cols * rows) as usize;
        let mut data = Vec::with_capacity(n * TILE_BYTES);
        let base = resize_bicubic(img, TILE, TILE);
        push_planar(&mut data, &base, 0, 0);
        let ((nw, nh), (px, py)) = resize_and_pad_size(img.size(), best);
        let resized = resize_bicubic(img, nw, nh);
        let mut canvas = RgbImage::filled(best.0, best.1, [0, 0, 0]);
        paste(&mut canvas, &resized, px, py);
        for r in 0..rows {
            for c in 0..cols {
                push_planar(&mut data, &canvas, (c * TILE) as usize, (r * TILE) as usize);
            }
        }
        Ok(Tiles {
            num_tiles: n,
            best_resolution: Some(best),
            grid_cols: cols,
            grid_rows: rows,
            data,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geometry::RECIPE_PINPOINTS;

    fn img(w: u32, h: u32) -> RgbImage {
        RgbImage::filled(w, h, [9, 99, 199])
    }

    #[test]
    fn channel_trap_is_rejected_with_reason() {
        let e = make_tiles(&img(2, 1), &AspectMode::Square).unwrap_err();
        assert!(
            matches!(e, TileError::ChannelInferenceError { side: 1, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("mean must have 1 elements"));
        let e = make_tiles(&img(50, 3), &AspectMode::Square).unwrap_err();
        assert!(
            matches!(e, TileError::ChannelInferenceScramble { .. }),
            "{e}"
        );
        assert!(e.to_string().contains("scramble"));
        // Pad: the padded square's side matters.
        assert!(make_tiles(&img(1, 1), &AspectMode::Pad).is_err());
        assert!(make_tiles(&img(3, 2), &AspectMode::Pad).is_err());
        assert!(make_tiles(&img(50, 3), &AspectMode::Pad).is_ok());
        // Anyres resizes with PIL first: no trap.
        let anyres = AspectMode::Anyres(RECIPE_PINPOINTS.to_vec());
        assert!(make_tiles(&img(2, 1), &anyres).is_ok());
        assert!(make_tiles(&img(1, 36), &AspectMode::Square).is_ok());
    }

    #[test]
    fn shapes_per_mode() {
        let anyres = AspectMode::Anyres(RECIPE_PINPOINTS.to_vec());
        let t = make_tiles(&img(2000, 500), &anyres).unwrap();
        assert_eq!((t.num_tiles, t.grid_cols, t.grid_rows), (4, 3, 1));
        assert_eq!(t.data.len(), 4 * TILE_BYTES);
        assert_eq!(t.best_resolution, Some((1008, 336)));
        for mode in [AspectMode::Square, AspectMode::Pad] {
            let t = make_tiles(&img(640, 480), &mode).unwrap();
            assert_eq!((t.num_tiles, t.best_resolution), (1, None));
            assert_eq!(t.data.len(), TILE_BYTES);
        }
        assert_eq!(
            make_tiles(&img(10, 10), &AspectMode::Anyres(vec![])),
            Err(TileError::NoPinpoints)
        );
        assert_eq!(
            make_tiles(&img(10, 10), &AspectMode::Anyres(vec![(500, 700)])),
            Err(TileError::PinpointNotTileMultiple(500, 700))
        );
    }

    #[test]
    fn pad_background_and_black_anyres_canvas() {
        // 640x160 in pad mode: rows above/below the image are the CLIP-mean grey.
        let t = make_tiles(&img(640, 160), &AspectMode::Pad).unwrap();
        let hwc = t.tile_hwc(0);
        assert_eq!(&hwc[..3], &PAD_BACKGROUND);
        // 2000x500 anyres: resized to 1008x252, pasted at y=42 on black.
        let anyres = AspectMode::Anyres(RECIPE_PINPOINTS.to_vec());
        let t = make_tiles(&img(2000, 500), &anyres).unwrap();
        let tile1 = t.tile_hwc(1);
        assert_eq!(&tile1[..3], &[0, 0, 0]);
        let i = (42 * 336) * 3;
        assert_eq!(&tile1[i..i + 3], &[9, 99, 199]);
    }

    /// Deterministic pseudo-random image (xorshift), with some flat runs so clipping and
    /// uniform regions are exercised too.
    fn noise(w: u32, h: u32, seed: u64) -> RgbImage {
        let mut x = seed | 1;
        let data = (0..w as usize * h as usize * 3)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                if (i / 97) % 5 == 0 {
                    if (i / 97) % 2 == 0 {
                        255
                    } else {
                        0
                    }
                } else {
                    (x >> 24) as u8
                }
            })
            .collect();
        RgbImage {
            width: w,
            height: h,
            data,
        }
    }

    #[test]
    fn planar_matches_reference_on_edge_sizes() {
        let anyres = AspectMode::Anyres(RECIPE_PINPOINTS.to_vec());
        for &(w, h) in &[
            (1, 1),
            (1, 700),
            (700, 1),
            (336, 336),
            (672, 672),
            (672, 336),
            (2, 5),
            (335, 337),
            (4000, 37),
            (37, 3000),
            (1280, 1024),
        ] {
            let img = noise(w, h, u64::from(w * 31 + h));
            for mode in [anyres.clone(), AspectMode::Square, AspectMode::Pad] {
                assert_eq!(
                    make_tiles(&img, &mode),
                    reference::make_tiles(&img, &mode),
                    "{w}x{h} {mode:?}"
                );
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
        #[test]
        fn planar_matches_reference(
            w in 1u32..1200,
            h in 1u32..1200,
            seed in proptest::prelude::any::<u64>(),
            pins in proptest::collection::vec((1u32..5, 1u32..5), 1..4),
            mode_ix in 0usize..3,
        ) {
            let img = noise(w, h, seed);
            let mode = match mode_ix {
                0 => AspectMode::Anyres(pins.iter().map(|&(c, r)| (c * TILE, r * TILE)).collect()),
                1 => AspectMode::Square,
                _ => AspectMode::Pad,
            };
            proptest::prop_assert_eq!(make_tiles(&img, &mode), reference::make_tiles(&img, &mode));
        }
    }
}
