//! How a tile's bytes are stored in the `tiles` column, and how a reader gets the exact uint8
//! CHW tile back. Shared by the build (encode) and the loader and `inspect` (decode), so both
//! sides use one definition.
//!
//! `raw` (exact, the default) stores each tile as zstd frames of *predicted residuals*:
//! - per plane, each pixel minus the clamped gradient prediction `clamp(a + b - c, 0, 255)`
//!   (a = left, b = up, c = up-left; the first row predicts from the left, the first column from
//!   above, the first pixel from 0), modulo 256;
//! - then the R and B residuals minus the G residual (modulo 256): the planes' residuals are
//!   correlated, so their difference is smaller.
//!
//! Chosen by measurement on the fixtures' photographs (docs/benchmarks.md, "Bytes per sample"): 25–26% of the
//! raw bytes at zstd 1–3 against 46% for plain CHW bytes under zstd 3. The tiles column itself
//! is then stored without Parquet compression (the frames are compressed already), which also
//! moves the compression out of the single writer thread into the parallel rendering.
//!
//! The residuals are stored as three concatenated zstd frames, one per plane (R−G, G, B−G; a
//! zstd decoder reads concatenated frames as one stream), because how a plane is best compressed
//! depends on the plane, not on the format:
//! - a plane with long zero runs (flat areas, padding, screenshots, drawings, the colour planes of
//!   a grey image) is compressed at `zstd_level`: LZ matches are what shrink it, and zstd finds
//!   them quickly;
//! - a photographic plane holds almost no LZ matches: at the fast levels (1–2) it is only
//!   entropy-coded (zstd's fastest match search, with the literals still Huffman-coded), which
//!   is several times faster and as small. Levels 3+ compress every plane at the level (a user
//!   who asks for a higher level asks for the smallest shards).
//!
//! Measured on the fixtures' tiles (docs/shards.md, "Tiles (schema v3)"): photographs 25.2% of the raw bytes
//! at 712 MB/s (one frame per tile at zstd 1) → 25.0% at 1,350 MB/s; the bundled images 13.8% at
//! 859 MB/s → 13.9% at 1,795 MB/s.

use std::cell::RefCell;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// How a shard stores its tiles (`tile_encoding` in `datasets.toml` and the manifest), serialised
/// as `raw`, `raw-plain` and `jpeg`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TileEncoding {
    /// Exact: predicted residuals in zstd frames (this module).
    #[default]
    Raw,
    /// Exact: the CHW bytes, compressed by Parquet (the schema v2 layout).
    RawPlain,
    /// Lossy: one baseline JPEG per tile.
    Jpeg,
}

impl TileEncoding {
    pub const ALL: [TileEncoding; 3] = [
        TileEncoding::Raw,
        TileEncoding::RawPlain,
        TileEncoding::Jpeg,
    ];

    pub fn name(self) -> &'static str {
        match self {
            TileEncoding::Raw => "raw",
            TileEncoding::RawPlain => "raw-plain",
            TileEncoding::Jpeg => "jpeg",
        }
    }
}

impl std::str::FromStr for TileEncoding {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        TileEncoding::ALL
            .into_iter()
            .find(|e| e.name() == s)
            .ok_or_else(|| format!("{s:?} is not a tile encoding: use raw, raw-plain or jpeg"))
    }
}

impl std::fmt::Display for TileEncoding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum TileCodecError {
    #[error("a tile of {found} bytes is not 3 planes of {side}x{side}")]
    WrongSize { found: usize, side: usize },
    #[error("zstd: {0}")]
    Zstd(String),
    #[error("a raw tile decompresses to {found} bytes, expected {expected}")]
    WrongDecodedSize { found: usize, expected: usize },
}

/// A plane is compressed with LZ matching when at least this fraction of its aligned 8-byte
/// chunks are all zero (long zero runs: see the module doc). Chosen by measurement on the
/// fixtures' tiles: 0.3 gives the smallest output of the thresholds tried (0–0.5).
const ZERO_CHUNKS_FOR_MATCHING: f64 = 0.3;
/// zstd's fast-search acceleration for photographic planes: large enough that the match search
/// skips nearly everything (a negative level); the literals stay Huffman-coded (forced below).
const ENTROPY_ONLY_LEVEL: i32 = -1000;
/// Hash table of 2^12 entries at the fast levels: a plane is ~110 KB, so a small table finds
/// the same matches and stays in cache (measured faster and no larger at levels 1–2).
const FAST_HASH_LOG: u32 = 12;

/// A thread's zstd contexts and buffers: creating a context per tile costs more than compressing
/// the tile, and the residual buffer is reused.
struct Encoder {
    level: i32,
    /// Planes with long zero runs (every plane at levels 3+): `level`.
    matching: zstd::bulk::Compressor<'static>,
    /// Photographic planes at the fast levels: entropy coding only.
    entropy_only: Option<zstd::bulk::Compressor<'static>>,
    residuals: Vec<u8>,
    /// One plane's frame (zstd writes from the start of the buffer it is given).
    frame: Vec<u8>,
}

impl Encoder {
    fn new(level: i32) -> Result<Self, TileCodecError> {
        use zstd::zstd_safe::{CParameter, ParamSwitch};
        let mut matching = zstd::bulk::Compressor::new(level).map_err(zstd_err)?;
        let entropy_only = if level <= 2 {
            matching
                .set_parameter(CParameter::HashLog(FAST_HASH_LOG))
                .map_err(zstd_err)?;
            let mut c = zstd::bulk::Compressor::new(ENTROPY_ONLY_LEVEL).map_err(zstd_err)?;
            c.set_parameter(CParameter::LiteralCompressionMode(ParamSwitch::Enable))
                .map_err(zstd_err)?;
            c.set_parameter(CParameter::HashLog(FAST_HASH_LOG))
                .map_err(zstd_err)?;
            Some(c)
        } else {
            None
        };
        Ok(Self {
            level,
            matching,
            entropy_only,
            residuals: Vec::new(),
            frame: Vec::new(),
        })
    }
}

thread_local! {
    static ENCODER: RefCell<Option<Encoder>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { RefCell::new(None) };
}

fn zstd_err(e: std::io::Error) -> TileCodecError {
    TileCodecError::Zstd(e.to_string())
}

/// Whether a plane's residuals have long zero runs (LZ matching pays off).
fn has_zero_runs(plane: &[u8]) -> bool {
    let chunks = plane.chunks_exact(8);
    let total = chunks.len();
    // One 8-byte load and compare per chunk (a per-byte `all` does not vectorise).
    let zero = chunks
        .filter(|c| u64::from_ne_bytes((*c).try_into().expect("chunks of 8")) == 0)
        .count();
    zero as f64 >= ZERO_CHUNKS_FOR_MATCHING * total as f64
}

/// One CHW tile (`3 × side × side` bytes) → its stored `raw` bytes (three zstd frames, one per
/// residual plane, each compressed as the module doc says).
pub fn encode_raw(chw: &[u8], side: usize, level: i32) -> Result<Vec<u8>, TileCodecError> {
    let plane = check_size(chw.len(), side)?;
    ENCODER.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.as_ref().is_none_or(|e| e.level != level) {
            *cell = Some(Encoder::new(level)?);
        }
        let e = cell.as_mut().expect("set above");
        e.residuals.resize(chw.len(), 0);
        predict(chw, side, &mut e.residuals)?;
        e.frame.reserve(zstd::compress_bound(plane));
        let Encoder {
            matching,
            entropy_only,
            residuals,
            frame,
            ..
        } = e;
        let mut frames = Vec::new();
        for residual_plane in residuals.chunks_exact(plane) {
            let compressor = match entropy_only {
                Some(fast) if !has_zero_runs(residual_plane) => fast,
                _ => &mut *matching,
            };
            compressor
                .compress_to_buffer(residual_plane, &mut *frame)
                .map_err(zstd_err)?;
            frames.extend_from_slice(frame);
        }
        // The exact size: rows hold their tiles until the row group is written.
        frames.shrink_to_fit();
        Ok(frames)
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
    fn tile_encoding_names_are_the_serialised_ones() {
        for e in TileEncoding::ALL {
            assert_eq!(e.name().parse::<TileEncoding>(), Ok(e));
            assert_eq!(
                serde_json::to_string(&e).unwrap(),
                format!("\"{}\"", e.name())
            );
        }
        assert_eq!(TileEncoding::default(), TileEncoding::Raw);
        assert!("raw_plain".parse::<TileEncoding>().is_err());
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
    fn planes_with_zero_runs_take_the_matching_path() {
        let side = 64;
        let all = tiles(side);
        let residuals = |t: &[u8]| {
            let mut r = vec![0; t.len()];
            predict(t, side, &mut r).unwrap();
            r
        };
        // Noise: no zero runs. Flat and ramps: residuals all zero but for the edges.
        assert!(!has_zero_runs(&residuals(&all[2])));
        for flat in [&all[0], &all[1], &all[3]] {
            assert!(has_zero_runs(&residuals(flat)));
        }
        // A grey noisy tile: G is noise, R−G and B−G are zero: one plane of each kind.
        let grey: Vec<u8> = all[2][..side * side].repeat(3);
        let r = residuals(&grey);
        let planes: Vec<bool> = r.chunks_exact(side * side).map(has_zero_runs).collect();
        assert_eq!(planes, [true, false, true]);
        // Both paths round-trip at the fast levels and above (level 3 uses one context).
        for level in [1, 2, 3] {
            for tile in [&all[0], &all[2], &grey] {
                let stored = encode_raw(tile, side, level).unwrap();
                assert_eq!(&decode_raw(&stored, side).unwrap(), tile);
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
