//! How a tile's bytes are stored in the `tiles` column, and how a reader gets the exact uint8
//! CHW tile back. Shared by the build (encode) and the loader and `inspect` (decode), so both
//! sides use one definition.
//!
//! `raw` (exact, the default) stores each tile as one zstd frame of *predicted residuals*:
//! - per plane, each pixel minus the clamped gradient prediction `clamp(a + b - c, 0, 255)`
//!   (a = left, b = up, c = up-left; the first row predicts from the left, the first column from
//!   above, the first pixel from 0), modulo 256;
//! - then the R and B residuals minus the G residual (modulo 256): the planes' residuals are
//!   correlated, so their difference is smaller.
//!
//! Chosen by measurement on the fixtures' photographs (README, `tile_encoding`): 25–26% of the
//! raw bytes at zstd 1–3 against 46% for plain CHW bytes under zstd 3. The tiles column itself
//! is then stored without Parquet compression (the frames are compressed already), which also
//! moves the compression out of the single writer thread into the parallel rendering.
//!
//! `raw-plain` stores the CHW bytes as they are (Parquet zstd compresses them: the schema v2
//! layout); `jpeg` stores one baseline JPEG per tile (lossy, decoded by the loader).

use std::cell::RefCell;

use thiserror::Error;

/// `tile_encoding` values.
pub const RAW: &str = "raw";
pub const RAW_PLAIN: &str = "raw-plain";
pub const JPEG: &str = "jpeg";
pub const TILE_ENCODINGS: [&str; 3] = [RAW, RAW_PLAIN, JPEG];

#[derive(Debug, Error, PartialEq, Eq)]
pub enum TileCodecError {
    #[error("a tile of {found} bytes is not 3 planes of {side}x{side}")]
    WrongSize { found: usize, side: usize },
    #[error("zstd: {0}")]
    Zstd(String),
    #[error("a raw tile decompresses to {found} bytes, expected {expected}")]
    WrongDecodedSize { found: usize, expected: usize },
}

/// A thread's zstd context and buffers: creating a context per tile costs more than compressing
/// the tile, and the residual buffer is reused.
struct Encoder {
    level: i32,
    compressor: zstd::bulk::Compressor<'static>,
    residuals: Vec<u8>,
    frame: Vec<u8>,
}

thread_local! {
    static ENCODER: RefCell<Option<Encoder>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { RefCell::new(None) };
}

fn zstd_err(e: std::io::Error) -> TileCodecError {
    TileCodecError::Zstd(e.to_string())
}

/// One CHW tile (`3 × side × side` bytes) → its stored `raw` bytes (a zstd frame at `level`).
pub fn encode_raw(chw: &[u8], side: usize, level: i32) -> Result<Vec<u8>, TileCodecError> {
    check_size(chw.len(), side)?;
    ENCODER.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.as_ref().is_none_or(|e| e.level != level) {
            *cell = Some(Encoder {
                level,
                compressor: zstd::bulk::Compressor::new(level).map_err(zstd_err)?,
                residuals: Vec::new(),
                frame: Vec::new(),
            });
        }
        let e = cell.as_mut().expect("set above");
        e.residuals.resize(chw.len(), 0);
        predict(chw, side, &mut e.residuals)?;
        e.frame.clear();
        e.frame.reserve(zstd::compress_bound(chw.len()));
        e.compressor
            .compress_to_buffer(&e.residuals, &mut e.frame)
            .map_err(zstd_err)?;
        // The exact size: rows hold their tiles until the row group is written.
        Ok(e.frame.clone())
    })
}

/// Stored `raw` bytes → the exact CHW tile.
pub fn decode_raw(stored: &[u8], side: usize) -> Result<Vec<u8>, TileCodecError> {
    let expected = 3 * side * side;
    let mut out = DECOMPRESSOR.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.is_none() {
            *cell = Some(zstd::bulk::Decompressor::new().map_err(zstd_err)?);
        }
        let d = cell.as_mut().expect("set above");
        // One byte of room: a frame that holds more than a tile fails instead of being cut.
        d.decompress(stored, expected + 1).map_err(zstd_err)
    })?;
    if out.len() != expected {
        return Err(TileCodecError::WrongDecodedSize {
            found: out.len(),
            expected,
        });
    }
    unpredict(&mut out, side);
    Ok(out)
}

fn check_size(len: usize, side: usize) -> Result<usize, TileCodecError> {
    if side == 0 || len != 3 * side * side {
        return Err(TileCodecError::WrongSize { found: len, side });
    }
    Ok(side * side)
}

#[inline(always)]
fn gradient(a: u8, b: u8, c: u8) -> u8 {
    (i16::from(a) + i16::from(b) - i16::from(c)).clamp(0, 255) as u8
}

/// Residuals of one plane (see the module doc). Every prediction reads source pixels only, so
/// the compiler can vectorise the row loop.
// Indexed loops: `x - 1` and `x` of two rows read as the formula does.
#[allow(clippy::needless_range_loop)]
fn predict_plane(src: &[u8], side: usize, out: &mut [u8]) {
    out[0] = src[0];
    for x in 1..side {
        out[x] = src[x].wrapping_sub(src[x - 1]);
    }
    for y in 1..side {
        let (prev, cur) = (
            &src[(y - 1) * side..y * side],
            &src[y * side..(y + 1) * side],
        );
        let row = &mut out[y * side..(y + 1) * side];
        row[0] = cur[0].wrapping_sub(prev[0]);
        for x in 1..side {
            row[x] = cur[x].wrapping_sub(gradient(cur[x - 1], prev[x], prev[x - 1]));
        }
    }
}

/// The inverse of [`predict_plane`] for the three planes, in place. Each pixel needs its
/// reconstructed left neighbour, so a row is one dependency chain; the three planes' rows are
/// undone in one loop so that their chains overlap (about 3x faster than plane after plane).
#[allow(clippy::needless_range_loop)]
fn unpredict_planes(buf: &mut [u8], side: usize) {
    let plane = side * side;
    let (r, rest) = buf.split_at_mut(plane);
    let (g, b) = rest.split_at_mut(plane);
    let mut planes = [r, g, b];
    for p in planes.iter_mut() {
        for x in 1..side {
            p[x] = p[x].wrapping_add(p[x - 1]);
        }
    }
    for y in 1..side {
        let [r, g, b] = &mut planes;
        let (r_done, r_row) = r.split_at_mut(y * side);
        let (g_done, g_row) = g.split_at_mut(y * side);
        let (b_done, b_row) = b.split_at_mut(y * side);
        let (r_prev, g_prev, b_prev) = (
            &r_done[(y - 1) * side..],
            &g_done[(y - 1) * side..],
            &b_done[(y - 1) * side..],
        );
        let (r_row, g_row, b_row) = (&mut r_row[..side], &mut g_row[..side], &mut b_row[..side]);
        r_row[0] = r_row[0].wrapping_add(r_prev[0]);
        g_row[0] = g_row[0].wrapping_add(g_prev[0]);
        b_row[0] = b_row[0].wrapping_add(b_prev[0]);
        let (mut rl, mut gl, mut bl) = (r_row[0], g_row[0], b_row[0]);
        for x in 1..side {
            rl = r_row[x].wrapping_add(gradient(rl, r_prev[x], r_prev[x - 1]));
            gl = g_row[x].wrapping_add(gradient(gl, g_prev[x], g_prev[x - 1]));
            bl = b_row[x].wrapping_add(gradient(bl, b_prev[x], b_prev[x - 1]));
            r_row[x] = rl;
            g_row[x] = gl;
            b_row[x] = bl;
        }
    }
}

/// CHW pixels → stored residuals (before zstd).
pub fn predict(chw: &[u8], side: usize, out: &mut [u8]) -> Result<(), TileCodecError> {
    let plane = check_size(chw.len(), side)?;
    check_size(out.len(), side)?;
    for c in 0..3 {
        let r = c * plane..(c + 1) * plane;
        predict_plane(&chw[r.clone()], side, &mut out[r]);
    }
    let (r, rest) = out.split_at_mut(plane);
    let (g, b) = rest.split_at_mut(plane);
    for ((r, b), g) in r.iter_mut().zip(b.iter_mut()).zip(g.iter()) {
        *r = r.wrapping_sub(*g);
        *b = b.wrapping_sub(*g);
    }
    Ok(())
}

/// Stored residuals → CHW pixels, in place (`buf` must be `3 × side × side` bytes).
fn unpredict(buf: &mut [u8], side: usize) {
    let plane = side * side;
    let (r, rest) = buf.split_at_mut(plane);
    let (g, b) = rest.split_at_mut(plane);
    for ((r, b), g) in r.iter_mut().zip(b.iter_mut()).zip(g.iter()) {
        *r = r.wrapping_add(*g);
        *b = b.wrapping_add(*g);
    }
    unpredict_planes(buf, side);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic tiles: noise, gradients, edges and saturated values (the clamp's corners).
    fn tiles(side: usize) -> Vec<Vec<u8>> {
        let n = 3 * side * side;
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut noise = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        };
        vec![
            vec![0; n],
            vec![255; n],
            (0..n).map(|_| noise()).collect(),
            (0..n).map(|i| ((i % side) * 7 + i / side) as u8).collect(),
            (0..n)
                .map(|i| if (i % side).is_multiple_of(3) { 255 } else { 0 })
                .collect(),
            (0..n)
                .map(|i| ((i % side) as u8).wrapping_mul(37) ^ (noise() & 3))
                .collect(),
        ]
    }

    #[test]
    fn round_trips_exactly() {
        for side in [1, 2, 5, 336] {
            for (k, tile) in tiles(side).iter().enumerate() {
                for level in [1, 3] {
                    let stored = encode_raw(tile, side, level).unwrap();
                    assert_eq!(
                        &decode_raw(&stored, side).unwrap(),
                        tile,
                        "tile {k}, side {side}"
                    );
                }
            }
        }
    }

    #[test]
    fn residuals_are_the_documented_ones() {
        // side 2, planes R G B: predictions 0, a, b, clamp(a + b - c).
        let chw = [
            10, 20, 30, 250, /* G */ 5, 5, 5, 5, /* B */ 0, 255, 255, 0,
        ];
        let mut out = [0u8; 12];
        predict(&chw, 2, &mut out).unwrap();
        let g = [5u8, 0, 0, 0];
        let r = [10u8, 10, 20, 250u8.wrapping_sub(40)];
        let b = [0u8, 255, 255, 0u8.wrapping_sub(255)];
        for i in 0..4 {
            assert_eq!(out[4 + i], g[i]);
            assert_eq!(out[i], r[i].wrapping_sub(g[i]), "r {i}");
            assert_eq!(out[8 + i], b[i].wrapping_sub(g[i]), "b {i}");
        }
    }

    #[test]
    fn refuses_what_is_not_a_tile() {
        assert_eq!(
            encode_raw(&[0; 10], 2, 1),
            Err(TileCodecError::WrongSize { found: 10, side: 2 })
        );
        let stored = encode_raw(&[7; 12], 2, 1).unwrap();
        // A frame holding more than one tile of that side: refused, never cut.
        assert!(decode_raw(&stored, 1).is_err());
        // A frame holding less.
        let short = zstd::bulk::compress(&[0u8; 11], 1).unwrap();
        assert_eq!(
            decode_raw(&short, 2),
            Err(TileCodecError::WrongDecodedSize {
                found: 11,
                expected: 12
            })
        );
        assert!(decode_raw(&stored[..stored.len() - 1], 2).is_err());
        assert!(decode_raw(b"not zstd", 2).is_err());
    }
}
