//! Anyres geometry of the reference (`llava/mm_utils.py`, `llava_arch.py`; spec §3.1-3.4,
//! §4.4-4.5): the one definition that the pipeline (tiles, token counts in the shards) and the
//! trainer (the model's feature layout) share, so the two can never disagree on an image's
//! length. Sizes are `(W, H)` as in PIL and LLaVA-NeXT. All float arithmetic is f64 in the
//! reference's operation order, and `int()` truncates, so integers come out identical.

use serde::{Deserialize, Serialize};

use crate::constants::TOKENS_PER_TILE;
pub use crate::constants::{PATCHES_PER_SIDE, TILE_SIZE as TILE};

/// The recipe's `--image_grid_pinpoints`, `(W, H)` as the reference writes them. HF configs
/// hold the same grids as `[H, W]`: see [`hf_pinpoints`].
pub const RECIPE_PINPOINTS: [(u32, u32); 5] =
    [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)];

/// Pinpoints as the reference's command line and `datasets.toml` write them:
/// `"[(336, 672), (672, 336), ...]"`.
pub fn pinpoints_text(pinpoints: &[(u32, u32)]) -> String {
    let pairs: Vec<String> = pinpoints
        .iter()
        .map(|(w, h)| format!("({w}, {h})"))
        .collect();
    format!("[{}]", pairs.join(", "))
}

/// `(W, H)` pinpoints in HF's `image_grid_pinpoints` order, `[H, W]`.
pub fn hf_pinpoints(pinpoints: &[(u32, u32)]) -> Vec<[usize; 2]> {
    pinpoints
        .iter()
        .map(|&(w, h)| [h as usize, w as usize])
        .collect()
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PinpointsError {
    #[error("image_grid_pinpoints is empty")]
    Empty,
    #[error("cannot parse image_grid_pinpoints {input:?}: {reason}")]
    Syntax { input: String, reason: String },
    #[error("image_grid_pinpoints contains a zero size ({0}, {1})")]
    Zero(u32, u32),
}

/// Parse `--image_grid_pinpoints` with 336-pixel tiles; see [`parse_pinpoints_with_tile`].
pub fn parse_pinpoints(s: &str) -> Result<Vec<(u32, u32)>, PinpointsError> {
    parse_pinpoints_with_tile(s, TILE)
}

/// Parse either a literal list (`"[(336, 672), (672, 336)]"`, `"[[336,672],[672,336]]"`) or
/// the range syntax `"(1x1),...,(6x6)"`. Range syntax (any string containing `x`): only the
/// first and last `(AxB)` matter; the list is every `(i*tile, j*tile)` for `i` in A..=C (outer)
/// and `j` in B..=D (inner), as `train.py` builds it.
pub fn parse_pinpoints_with_tile(s: &str, tile: u32) -> Result<Vec<(u32, u32)>, PinpointsError> {
    let syntax = |reason: &str| PinpointsError::Syntax {
        input: s.to_string(),
        reason: reason.to_string(),
    };
    let list = if s.contains('x') {
        let groups = range_groups(s);
        let (first, last) = match (groups.first(), groups.last()) {
            (Some(f), Some(l)) => (*f, *l),
            _ => return Err(syntax("no (AxB) group found")),
        };
        let mut v = Vec::new();
        for i in first.0..=last.0 {
            for j in first.1..=last.1 {
                let w = i
                    .checked_mul(tile)
                    .ok_or_else(|| syntax("size overflows"))?;
                let h = j
                    .checked_mul(tile)
                    .ok_or_else(|| syntax("size overflows"))?;
                v.push((w, h));
            }
        }
        v
    } else {
        parse_literal_pairs(s).map_err(|r| syntax(&r))?
    };
    if list.is_empty() {
        return Err(PinpointsError::Empty);
    }
    if let Some(&(w, h)) = list.iter().find(|&&(w, h)| w == 0 || h == 0) {
        return Err(PinpointsError::Zero(w, h));
    }
    Ok(list)
}

/// All `(\d+)x(\d+)` groups enclosed in parentheses, in order (Python regex `\((\d+)x(\d+)\)`).
fn range_groups(s: &str) -> Vec<(u32, u32)> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'(' {
            let digits = |mut j: usize| {
                let st = j;
                while j < b.len() && b[j].is_ascii_digit() {
                    j += 1;
                }
                (st, j)
            };
            let (a0, a1) = digits(i + 1);
            if a1 > a0 && a1 < b.len() && b[a1] == b'x' {
                let (c0, c1) = digits(a1 + 1);
                if c1 > c0 && c1 < b.len() && b[c1] == b')' {
                    if let (Ok(x), Ok(y)) = (s[a0..a1].parse(), s[c0..c1].parse()) {
                        out.push((x, y));
                        i = c1 + 1;
                        continue;
                    }
                }
            }
        }
        i += 1;
    }
    out
}

/// `ast.literal_eval` of a list of 2-element tuples/lists of non-negative integers.
fn parse_literal_pairs(s: &str) -> Result<Vec<(u32, u32)>, String> {
    let t = s.trim();
    let inner = t
        .strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .or_else(|| t.strip_prefix('(').and_then(|r| r.strip_suffix(')')))
        .ok_or("expected an outer [ ... ] list")?;
    let mut out = Vec::new();
    let mut rest = inner.trim_start();
    while !rest.is_empty() {
        let close = match rest.as_bytes()[0] {
            b'(' => ')',
            b'[' => ']',
            _ => return Err(format!("expected '(' or '[' at {rest:?}")),
        };
        let end = rest
            .find(close)
            .ok_or_else(|| format!("unclosed pair at {rest:?}"))?;
        let nums: Vec<&str> = rest[1..end].split(',').map(str::trim).collect();
        let nums: Vec<&str> = match nums.as_slice() {
            [a, b] | [a, b, ""] => vec![a, b],
            _ => return Err(format!("expected 2 numbers in {:?}", &rest[..=end])),
        };
        let parse = |n: &str| {
            n.parse::<u32>()
                .map_err(|e| format!("bad number {n:?}: {e}"))
        };
        out.push((parse(nums[0])?, parse(nums[1])?));
        rest = rest[end + 1..].trim_start();
        if let Some(r) = rest.strip_prefix(',') {
            rest = r.trim_start();
        } else if !rest.is_empty() {
            return Err(format!("expected ',' at {rest:?}"));
        }
    }
    Ok(out)
}

/// `select_best_resolution`: most effective (downscaled) pixels, then least waste; strict
/// comparisons, so the earliest candidate wins ties. `None` only for an empty list.
pub fn select_best_resolution(original: (u32, u32), possible: &[(u32, u32)]) -> Option<(u32, u32)> {
    let (ow, oh) = (f64::from(original.0), f64::from(original.1));
    let orig_area = u64::from(original.0) * u64::from(original.1);
    let mut best = None;
    let mut best_eff = 0u64;
    let mut best_wasted = u64::MAX; // float('inf')
    for &(w, h) in possible {
        let scale = f64::min(f64::from(w) / ow, f64::from(h) / oh);
        let dw = (ow * scale) as u64;
        let dh = (oh * scale) as u64;
        let effective = (dw * dh).min(orig_area);
        let wasted = (u64::from(w) * u64::from(h)).saturating_sub(effective);
        if effective > best_eff || (effective == best_eff && wasted < best_wasted) {
            best_eff = effective;
            best_wasted = wasted;
            best = Some((w, h));
        }
    }
    best
}

/// `resize_and_pad_image` sizes: `(new_w, new_h)` of the resized image and the paste offset
/// `(x, y)` on the `target` canvas (floor of half the remainder).
pub fn resize_and_pad_size(original: (u32, u32), target: (u32, u32)) -> ((u32, u32), (u32, u32)) {
    let (ow, oh) = original;
    let (tw, th) = target;
    let sw = f64::from(tw) / f64::from(ow);
    let sh = f64::from(th) / f64::from(oh);
    let (nw, nh) = if sw < sh {
        (tw, ((f64::from(oh) * sw).ceil() as u32).min(th))
    } else {
        (((f64::from(ow) * sh).ceil() as u32).min(tw), th)
    };
    ((nw, nh), ((tw - nw) / 2, (th - nh) / 2))
}

/// `get_anyres_image_grid_shape`: `(cols, rows)` of the best resolution in `tile` units.
/// The reference falls back to 2x2 when selection raises; an empty list is the only such
/// case here and also yields `(2, 2)`.
pub fn anyres_grid(original: (u32, u32), pinpoints: &[(u32, u32)], tile: u32) -> (u32, u32) {
    match select_best_resolution(original, pinpoints) {
        Some((w, h)) => (w / tile, h / tile),
        None => (2, 2),
    }
}

/// Float rounding of `unpad_image`'s new size.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnpadRounding {
    /// LLaVA-NeXT: `int(H * s)`.
    #[default]
    Truncate,
    /// HF transformers: `int(round(H * s, 7))`.
    HfRound7,
}

/// `unpad_image` on a `fh x fw` feature grid for an original `(W, H)`: the kept `(h', w')`
/// (LLaVA-NeXT's truncation).
pub fn unpad_feature_hw(fh: u32, fw: u32, original: (u32, u32)) -> (u32, u32) {
    unpad_feature_hw_rounded(fh, fw, original, UnpadRounding::Truncate)
}

/// [`unpad_feature_hw`] with the rounding of the implementation being matched.
pub fn unpad_feature_hw_rounded(
    fh: u32,
    fw: u32,
    original: (u32, u32),
    rounding: UnpadRounding,
) -> (u32, u32) {
    let cut = |x: f64| -> i64 {
        match rounding {
            UnpadRounding::Truncate => x as i64,
            UnpadRounding::HfRound7 => ((x * 1e7).round() / 1e7) as i64,
        }
    };
    let (ow, oh) = (f64::from(original.0), f64::from(original.1));
    let orig_ratio = ow / oh;
    let cur_ratio = f64::from(fw) / f64::from(fh);
    if orig_ratio > cur_ratio {
        let s = f64::from(fw) / ow;
        let nh = cut(oh * s);
        let pad = (i64::from(fh) - nh).div_euclid(2);
        // Python slice [pad : fh - pad] on fh rows.
        (slice_len(fh, pad), fw)
    } else {
        let s = f64::from(fh) / oh;
        let nw = cut(ow * s);
        let pad = (i64::from(fw) - nw).div_euclid(2);
        (fh, slice_len(fw, pad))
    }
}

/// Length of Python's `x[pad : n - pad]` for a sequence of length `n`.
fn slice_len(n: u32, pad: i64) -> u32 {
    let n = i64::from(n);
    let norm = |i: i64| if i < 0 { (i + n).max(0) } else { i.min(n) };
    let (a, b) = (norm(pad), norm(n - pad));
    (b - a).max(0) as u32
}

/// Image tokens of an anyres image with `spatial_unpad`: `576 + h'(w'+1)`.
pub fn anyres_image_tokens(original: (u32, u32), pinpoints: &[(u32, u32)]) -> usize {
    let (cols, rows) = anyres_grid(original, pinpoints, TILE);
    let (h, w) = unpad_feature_hw(rows * PATCHES_PER_SIDE, cols * PATCHES_PER_SIDE, original);
    TOKENS_PER_TILE as usize + h as usize * (w as usize + 1)
}

/// How per-tile features become one image's token sequence (LLaVA `mm_patch_merge_type`);
/// serialised as the reference's names, `flat` and `spatial_unpad`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MergeType {
    /// Pretraining: all tiles' tokens concatenated, no newline (576 per tile).
    Flat,
    /// Fine-tuning (HF LlavaNext): base tile, then the unpadded tile grid with an
    /// `image_newline` per row (576 + 1 for a single tile).
    #[default]
    SpatialUnpad,
}

impl MergeType {
    pub fn name(self) -> &'static str {
        match self {
            MergeType::Flat => "flat",
            MergeType::SpatialUnpad => "spatial_unpad",
        }
    }
}

impl std::str::FromStr for MergeType {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "flat" => Ok(MergeType::Flat),
            "spatial_unpad" => Ok(MergeType::SpatialUnpad),
            _ => Err(format!(
                "{s:?} is not a merge type: use spatial_unpad or flat"
            )),
        }
    }
}

impl std::fmt::Display for MergeType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Tokens of a single-tile image: 576 (`flat`) or 577 (`spatial_unpad`).
pub fn single_tile_tokens(merge: MergeType) -> usize {
    match merge {
        MergeType::Flat => TOKENS_PER_TILE as usize,
        MergeType::SpatialUnpad => TOKENS_PER_TILE as usize + 1,
    }
}

/// The CLIP processor's shortest-edge resize target: short side -> `size`, long side
/// `int(size * long / short)`; returns `(w, h)`.
pub fn clip_resize_size(original: (u32, u32), size: u32) -> (u32, u32) {
    let (w, h) = original;
    let (short, long) = if w <= h { (w, h) } else { (h, w) };
    let new_long = ((u64::from(size) * u64::from(long)) as f64 / f64::from(short)) as u32;
    if w <= h {
        (size, new_long)
    } else {
        (new_long, size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn recipe_pinpoints_in_text_and_hf_order() {
        let text = pinpoints_text(&RECIPE_PINPOINTS);
        assert_eq!(
            text,
            "[(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]"
        );
        assert_eq!(parse_pinpoints(&text).unwrap(), RECIPE_PINPOINTS.to_vec());
        assert_eq!(hf_pinpoints(&RECIPE_PINPOINTS)[3], [336, 1008]);
    }

    #[test]
    fn hf_rounding_differs_only_where_the_product_is_a_hair_below_an_integer() {
        // 47x752 on a 48x24 grid: 47 * (48 / 752) = 2.9999999999999996 in f64 (Python agrees:
        // the reference keeps 2 columns, HF's round(x, 7) keeps 4).
        assert_eq!(unpad_feature_hw(48, 24, (47, 752)), (48, 2));
        let hf = unpad_feature_hw_rounded(48, 24, (47, 752), UnpadRounding::HfRound7);
        assert_eq!(hf, (48, 4));
    }

    #[test]
    fn parses_recipe_and_list_forms() {
        let r = parse_pinpoints("[(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]");
        assert_eq!(r.unwrap(), RECIPE_PINPOINTS.to_vec());
        let r = parse_pinpoints("[[336,672],[672,336],[672,672],[1008,336],[336,1008]]");
        assert_eq!(r.unwrap(), RECIPE_PINPOINTS.to_vec());
        assert!(parse_pinpoints("[]").is_err());
        assert!(parse_pinpoints("[(1, 2, 3)]").is_err());
        assert!(parse_pinpoints("336, 672").is_err());
        assert!(parse_pinpoints("[(0, 336)]").is_err());
    }

    #[test]
    fn parses_range_syntax() {
        let r = parse_pinpoints("(1x1),...,(6x6)").unwrap();
        assert_eq!(r.len(), 36);
        assert_eq!(&r[..3], &[(336, 336), (336, 672), (336, 1008)]);
        assert_eq!(r[6], (672, 336));
        assert_eq!(r[35], (2016, 2016));
        // Only first and last groups matter.
        let r = parse_pinpoints("(2x1),(9x9),(3x2)").unwrap();
        assert_eq!(r, vec![(672, 336), (672, 672), (1008, 336), (1008, 672)]);
        assert!(parse_pinpoints("(axb)").is_err());
    }

    #[test]
    fn best_resolution_examples() {
        let p = &RECIPE_PINPOINTS;
        assert_eq!(select_best_resolution((640, 480), p), Some((672, 672)));
        assert_eq!(select_best_resolution((300, 200), p), Some((336, 672)));
        assert_eq!(select_best_resolution((2000, 500), p), Some((1008, 336)));
        assert_eq!(select_best_resolution((100, 100), p), Some((336, 672)));
        assert_eq!(select_best_resolution((10, 10), &[]), None);
    }

    #[test]
    fn resize_and_pad_examples() {
        assert_eq!(
            resize_and_pad_size((640, 480), (672, 672)),
            ((672, 504), (0, 84))
        );
        // 200 * (336/300) = 224.00000000000003 -> ceil 225.
        assert_eq!(
            resize_and_pad_size((300, 200), (336, 672)),
            ((336, 225), (0, 223))
        );
        assert_eq!(resize_and_pad_size((4000, 3000), (672, 672)).0, (672, 505));
        assert_eq!(
            resize_and_pad_size((2000, 500), (1008, 336)),
            ((1008, 252), (0, 42))
        );
    }

    #[test]
    fn spec_token_table() {
        type Wh = (u32, u32);
        let table: &[(Wh, Wh, Wh, usize)] = &[
            ((640, 480), (2, 2), (36, 48), 2340),
            ((1024, 768), (2, 2), (36, 48), 2340),
            ((768, 1024), (2, 2), (48, 36), 2352),
            ((1280, 720), (2, 2), (28, 48), 1948),
            ((1920, 1080), (2, 2), (28, 48), 1948),
            ((720, 1280), (2, 2), (48, 28), 1968),
            ((512, 512), (2, 2), (48, 48), 2928),
            ((1000, 1000), (2, 2), (48, 48), 2928),
            ((1024, 899), (2, 2), (42, 48), 2634),
            ((800, 1200), (2, 2), (48, 32), 2160),
            ((2000, 500), (3, 1), (18, 72), 1890),
            ((3000, 1000), (3, 1), (24, 72), 2328),
            ((700, 300), (3, 1), (24, 56), 1944),
            ((500, 1500), (1, 3), (72, 24), 2376),
            ((1000, 3000), (1, 3), (72, 24), 2376),
            ((336, 336), (1, 2), (24, 24), 1176),
            ((224, 224), (1, 2), (24, 24), 1176),
            ((100, 100), (1, 2), (24, 24), 1176),
            ((300, 200), (1, 2), (16, 24), 976),
        ];
        for &(size, grid, hw, tokens) in table {
            let p = &RECIPE_PINPOINTS;
            assert_eq!(anyres_grid(size, p, TILE), grid, "{size:?}");
            let (c, r) = grid;
            assert_eq!(unpad_feature_hw(r * 24, c * 24, size), hw, "{size:?}");
            assert_eq!(anyres_image_tokens(size, p), tokens, "{size:?}");
        }
        // Degenerate strips (spec §4.4).
        assert_eq!(anyres_image_tokens((5000, 10), &RECIPE_PINPOINTS), 576);
        assert_eq!(anyres_image_tokens((10, 5000), &RECIPE_PINPOINTS), 576 + 72);
        assert_eq!(single_tile_tokens(MergeType::Flat), 576);
        assert_eq!(single_tile_tokens(MergeType::SpatialUnpad), 577);
    }

    #[test]
    fn clip_resize_examples() {
        assert_eq!(clip_resize_size((512, 600), 336), (336, 393));
        assert_eq!(clip_resize_size((640, 480), 336), (448, 336));
        assert_eq!(clip_resize_size((336, 336), 336), (336, 336));
        assert_eq!(clip_resize_size((900, 27), 336), (11200, 336));
    }

    proptest! {
        #[test]
        fn best_resolution_is_from_list(w in 1u32..5000, h in 1u32..5000) {
            let b = select_best_resolution((w, h), &RECIPE_PINPOINTS).unwrap();
            prop_assert!(RECIPE_PINPOINTS.contains(&b));
            let range = parse_pinpoints("(1x1),...,(6x6)").unwrap();
            let b = select_best_resolution((w, h), &range).unwrap();
            prop_assert!(range.contains(&b));
        }

        #[test]
        fn resize_and_pad_fits(w in 1u32..6000, h in 1u32..6000, t in 0usize..5) {
            let target = RECIPE_PINPOINTS[t];
            let ((nw, nh), (x, y)) = resize_and_pad_size((w, h), target);
            prop_assert!(nw >= 1 && nh >= 1);
            prop_assert!(nw <= target.0 && nh <= target.1);
            prop_assert!(nw == target.0 || nh == target.1);
            prop_assert!(x + nw <= target.0 && y + nh <= target.1);
            prop_assert_eq!(x, (target.0 - nw) / 2);
            prop_assert_eq!(y, (target.1 - nh) / 2);
        }

        #[test]
        fn unpad_bounds_and_token_cap(w in 1u32..6000, h in 1u32..6000) {
            let (cols, rows) = anyres_grid((w, h), &RECIPE_PINPOINTS, TILE);
            let (fh, fw) = (rows * 24, cols * 24);
            let (uh, uw) = unpad_feature_hw(fh, fw, (w, h));
            prop_assert!(uh <= fh && uw <= fw);
            if f64::from(w) / f64::from(h) > f64::from(fw) / f64::from(fh) {
                prop_assert_eq!(uw, fw);
                let nh = (f64::from(h) * (f64::from(fw) / f64::from(w))) as u32;
                prop_assert!(uh >= nh.min(fh) && uh <= nh + 1);
            } else {
                prop_assert_eq!(uh, fh);
                let nw = (f64::from(w) * (f64::from(fh) / f64::from(h))) as u32;
                prop_assert!(uw >= nw.min(fw) && uw <= nw + 1);
            }
            let n = anyres_image_tokens((w, h), &RECIPE_PINPOINTS);
            prop_assert!((576..=2928).contains(&n));
        }
    }
}
