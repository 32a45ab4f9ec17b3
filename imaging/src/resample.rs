//! Port of Pillow 10.3 `ImagingResample` with the BICUBIC filter for 8-bit RGB
//! (`src/libImaging/Resample.c`, spec §3.7). Every step that influences the output bytes is
//! kept: f64 coefficients normalised by their sum, 22-bit fixed point rounded half away from
//! zero, accumulation from `1 << 21`, clipping, an 8-bit intermediate between the horizontal
//! pass (done first, only if the width changes) and the vertical pass (only if the height
//! changes). Loop order differs from Pillow where it is free (integer sums are exact).

use crate::decode::RgbImage;

const PRECISION_BITS: u32 = 32 - 8 - 2;
const HALF: i32 = 1 << (PRECISION_BITS - 1);

/// Keys cubic with a = -0.5, exactly as Pillow writes it.
#[inline]
fn bicubic_filter(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = if x < 0.0 { -x } else { x };
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Fixed-point filter taps for one axis: output `i` reads `len[i]` inputs starting at
/// `start[i]`, with weights `weights[i * ksize ..][..len[i]]`.
#[derive(Clone, Debug)]
pub struct Coeffs {
    pub start: Vec<usize>,
    pub len: Vec<usize>,
    pub ksize: usize,
    pub weights: Vec<i32>,
}

impl Coeffs {
    /// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for `in_size -> out_size`
    /// over the full input (box `0..in_size`).
    pub fn new(in_size: usize, out_size: usize) -> Self {
        const SUPPORT: f64 = 2.0;
        let scale = in_size as f64 / out_size as f64;
        let filterscale = if scale < 1.0 { 1.0 } else { scale };
        let support = SUPPORT * filterscale;
        let ksize = support.ceil() as usize * 2 + 1;
        let mut start = Vec::with_capacity(out_size);
        let mut len = Vec::with_capacity(out_size);
        let mut weights = vec![0i32; out_size * ksize];
        let mut k = vec![0f64; ksize];
        let ss = 1.0 / filterscale;
        for xx in 0..out_size {
            let center = (xx as f64 + 0.5) * scale;
            // C `(int)` truncates toward zero; both bounds are then clamped.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64).max(0) as usize;
            let n = xmax.saturating_sub(xmin);
            let mut ww = 0.0;
            for (x, kx) in k.iter_mut().enumerate().take(n) {
                let w = bicubic_filter((x as f64 + xmin as f64 - center + 0.5) * ss);
                *kx = w;
                ww += w;
            }
            let row = &mut weights[xx * ksize..xx * ksize + ksize];
            for (x, out) in row.iter_mut().enumerate().take(n) {
                let mut v = k[x];
                if ww != 0.0 {
                    v /= ww;
                }
                let f = v * f64::from(1u32 << PRECISION_BITS);
                *out = if v < 0.0 {
                    (-0.5 + f) as i32
                } else {
                    (0.5 + f) as i32
                };
            }
            start.push(xmin);
            len.push(n);
        }
        Coeffs {
            start,
            len,
            ksize,
            weights,
        }
    }

    #[inline]
    fn taps(&self, i: usize) -> (usize, &[i32]) {
        let off = i * self.ksize;
        (self.start[i], &self.weights[off..off + self.len[i]])
    }
}

#[inline]
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

// The passes are written once as `#[inline(always)]` bodies and compiled twice: for the
// baseline target and, chosen at run time, with AVX2 (8-lane i32 multiply-adds). Integer
// arithmetic is exact, so both give identical bytes.

/// Horizontal pass over rows `y0..y0+rows` of `src` (RGB, `src_w` wide).
fn horizontal(src: &[u8], src_w: usize, y0: usize, rows: usize, c: &Coeffs) -> Vec<u8> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 support was just checked.
        return unsafe { horizontal_avx2(src, src_w, y0, rows, c) };
    }
    horizontal_body(src, src_w, y0, rows, c)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn horizontal_avx2(src: &[u8], src_w: usize, y0: usize, rows: usize, c: &Coeffs) -> Vec<u8> {
    horizontal_body(src, src_w, y0, rows, c)
}

#[inline(always)]
fn horizontal_body(src: &[u8], src_w: usize, y0: usize, rows: usize, c: &Coeffs) -> Vec<u8> {
    let out_w = c.start.len();
    let mut out = vec![0u8; out_w * rows * 3];
    for (r, out_row) in out.chunks_exact_mut(out_w * 3).enumerate() {
        let in_row = &src[(y0 + r) * src_w * 3..(y0 + r + 1) * src_w * 3];
        for (xx, o) in out_row.chunks_exact_mut(3).enumerate() {
            let (xmin, k) = c.taps(xx);
            let px = &in_row[xmin * 3..(xmin + k.len()) * 3];
            let (mut s0, mut s1, mut s2) = (HALF, HALF, HALF);
            for (p, &w) in px.chunks_exact(3).zip(k) {
                s0 += i32::from(p[0]) * w;
                s1 += i32::from(p[1]) * w;
                s2 += i32::from(p[2]) * w;
            }
            o[0] = clip8(s0);
            o[1] = clip8(s1);
            o[2] = clip8(s2);
        }
    }
    out
}

/// Vertical pass; `row_offset` shifts the coefficient rows (the horizontal pass only
/// produced the rows the vertical pass needs). Accumulates a whole output row at a time so
/// the inner loop is a contiguous multiply-add the compiler vectorises.
fn vertical(src: &[u8], width: usize, row_offset: usize, c: &Coeffs) -> Vec<u8> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 support was just checked.
        return unsafe { vertical_avx2(src, width, row_offset, c) };
    }
    vertical_body(src, width, row_offset, c)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn vertical_avx2(src: &[u8], width: usize, row_offset: usize, c: &Coeffs) -> Vec<u8> {
    vertical_body(src, width, row_offset, c)
}

#[inline(always)]
fn vertical_body(src: &[u8], width: usize, row_offset: usize, c: &Coeffs) -> Vec<u8> {
    let stride = width * 3;
    let out_h = c.start.len();
    let mut out = vec![0u8; stride * out_h];
    let mut acc = vec![0i32; stride];
    for (yy, out_row) in out.chunks_exact_mut(stride).enumerate() {
        let (ymin, k) = c.taps(yy);
        acc.fill(HALF);
        for (j, &w) in k.iter().enumerate() {
            let y = ymin + j - row_offset;
            let in_row = &src[y * stride..(y + 1) * stride];
            for (a, &p) in acc.iter_mut().zip(in_row) {
                *a += i32::from(p) * w;
            }
        }
        for (o, &a) in out_row.iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
    out
}

/// Precomputed two-pass plan for one `(in_w, in_h) -> (out_w, out_h)` resize.
#[derive(Clone, Debug)]
pub struct ResizePlan {
    in_w: usize,
    in_h: usize,
    out_w: usize,
    out_h: usize,
    horiz: Option<Coeffs>,
    vert: Option<Coeffs>,
}

impl ResizePlan {
    pub fn new(in_w: u32, in_h: u32, out_w: u32, out_h: u32) -> Self {
        let (in_w, in_h, out_w, out_h) =
            (in_w as usize, in_h as usize, out_w as usize, out_h as usize);
        ResizePlan {
            in_w,
            in_h,
            out_w,
            out_h,
            horiz: (in_w != out_w).then(|| Coeffs::new(in_w, out_w)),
            vert: (in_h != out_h).then(|| Coeffs::new(in_h, out_h)),
        }
    }

    /// Apply to `src`, which must be `in_w x in_h`.
    pub fn apply(&self, src: &RgbImage) -> RgbImage {
        assert_eq!(
            (src.width as usize, src.height as usize),
            (self.in_w, self.in_h),
            "ResizePlan applied to an image of the wrong size"
        );
        let data = match (&self.horiz, &self.vert) {
            (None, None) => src.data.clone(),
            (Some(h), None) => horizontal(&src.data, self.in_w, 0, self.in_h, h),
            (None, Some(v)) => vertical(&src.data, self.in_w, 0, v),
            (Some(h), Some(v)) => {
                // Only the source rows the vertical pass reads (Pillow's ybox_first/last).
                let first = v.start[0];
                let last = v.start[self.out_h - 1] + v.len[self.out_h - 1];
                let tmp = horizontal(&src.data, self.in_w, first, last - first, h);
                vertical(&tmp, self.out_w, first, v)
            }
        };
        RgbImage {
            width: self.out_w as u32,
            height: self.out_h as u32,
            data,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Channel-planar path (used by tiling). Both passes run as "vertical" passes over contiguous
// u8 rows, so they vectorise: the horizontal pass works on the transposed source plane (one
// row per source column), its 8-bit result is transposed back and the vertical pass emits
// output rows one channel at a time, which is exactly the CHW tile layout. Per output sample
// the arithmetic is Pillow's: `HALF + sum(p * w)` in i32 over the same taps, `>> 22`, clip.
// Integer sums are exact, so the order of accumulation cannot change a byte.
// ---------------------------------------------------------------------------------------

/// Rows per strip of the transposed source in the horizontal pass: one 64-byte line per
/// source column and channel, so the strip stays in L1/L2 and stores never alias.
const STRIP: usize = 64;

/// Channel `ch` of rows `r0..r0 + n` of interleaved `src` (`w` wide) into three planes,
/// transposed: `planes[ch][x * STRIP + r]`.
fn extract_strip(src: &[u8], w: usize, r0: usize, n: usize, planes: &mut [u8]) {
    let (p0, rest) = planes.split_at_mut(w * STRIP);
    let (p1, p2) = rest.split_at_mut(w * STRIP);
    const B: usize = 16;
    for x0 in (0..w).step_by(B) {
        let x1 = (x0 + B).min(w);
        for r in 0..n {
            let row = &src[((r0 + r) * w + x0) * 3..((r0 + r) * w + x1) * 3];
            for (x, px) in (x0..x1).zip(row.chunks_exact(3)) {
                let i = x * STRIP + r;
                p0[i] = px[0];
                p1[i] = px[1];
                p2[i] = px[2];
            }
        }
    }
}

/// `src` (`rows x cols`, row-major) into `dst` as `cols x rows`.
fn transpose(src: &[u8], rows: usize, cols: usize, dst: &mut [u8]) {
    const B: usize = 16;
    let src = &src[..rows * cols];
    let dst = &mut dst[..rows * cols];
    for r0 in (0..rows).step_by(B) {
        let r1 = (r0 + B).min(rows);
        for c0 in (0..cols).step_by(B) {
            let c1 = (c0 + B).min(cols);
            for c in c0..c1 {
                let d = &mut dst[c * rows + r0..c * rows + r1];
                for (r, o) in (r0..r1).zip(d.iter_mut()) {
                    *o = src[r * cols + c];
                }
            }
        }
    }
}

/// One filter pass along the rows of `src` (row stride `stride`): output row `i` is
/// `clip8(HALF + sum_j src[(start[i] + j - row_offset) * stride + col0 + x] * w[i][j])` for
/// `x < len`, handed to `emit(i, row)`.
#[allow(clippy::too_many_arguments)]
fn filter_pass<F: FnMut(usize, &[u8])>(
    src: &[u8],
    stride: usize,
    col0: usize,
    len: usize,
    c: &Coeffs,
    row_offset: usize,
    line: &mut Vec<u8>,
    emit: F,
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 support was just checked; the body is safe code.
        return unsafe { filter_pass_avx2(src, stride, col0, len, c, row_offset, line, emit) };
    }
    filter_pass_body(src, stride, col0, len, c, row_offset, line, emit)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn filter_pass_avx2<F: FnMut(usize, &[u8])>(
    src: &[u8],
    stride: usize,
    col0: usize,
    len: usize,
    c: &Coeffs,
    row_offset: usize,
    line: &mut Vec<u8>,
    emit: F,
) {
    filter_pass_body(src, stride, col0, len, c, row_offset, line, emit)
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn filter_pass_body<F: FnMut(usize, &[u8])>(
    src: &[u8],
    stride: usize,
    col0: usize,
    len: usize,
    c: &Coeffs,
    row_offset: usize,
    line: &mut Vec<u8>,
    mut emit: F,
) {
    const L: usize = 32;
    line.clear();
    line.resize(len, 0);
    for i in 0..c.start.len() {
        let (ymin, k) = c.taps(i);
        let base = (ymin - row_offset) * stride + col0;
        let mut x = 0;
        while x + L <= len {
            let mut acc = [HALF; L];
            for (j, &w) in k.iter().enumerate() {
                let r: &[u8; L] = src[base + j * stride + x..][..L]
                    .try_into()
                    .expect("L bytes");
                for (a, &p) in acc.iter_mut().zip(r) {
                    *a += i32::from(p) * w;
                }
            }
            for (o, &a) in line[x..x + L].iter_mut().zip(&acc) {
                *o = clip8(a);
            }
            x += L;
        }
        for (xx, o) in line.iter_mut().enumerate().skip(x) {
            let mut a = HALF;
            for (j, &w) in k.iter().enumerate() {
                a += i32::from(src[base + j * stride + xx]) * w;
            }
            *o = clip8(a);
        }
        emit(i, line);
    }
}

/// Reusable buffers for [`ResizePlan::apply_planar`].
#[derive(Default)]
pub struct PlanarScratch {
    a: Vec<u8>,
    b: Vec<u8>,
    strip: Vec<u8>,
    line: Vec<u8>,
    hbufs: Vec<Vec<u8>>,
}

impl ResizePlan {
    /// Output size `(out_w, out_h)`.
    pub fn out_size(&self) -> (usize, usize) {
        (self.out_w, self.out_h)
    }

    /// Same bytes as [`ResizePlan::apply`], delivered channel-planar: `sink(ch, y, row)` is
    /// called for every channel `ch` (0..3) and output row `y` with the `out_w` bytes of that
    /// channel.
    pub fn apply_planar(
        &self,
        src: &RgbImage,
        scratch: &mut PlanarScratch,
        mut sink: impl FnMut(usize, usize, &[u8]),
    ) {
        apply_planar_multi(&[self], src, scratch, |_, ch, y, row| sink(ch, y, row));
    }
}

/// [`ResizePlan::apply_planar`] for several plans over the same source, which is read and
/// de-interleaved once: `sink(plan_index, ch, y, row)`.
pub fn apply_planar_multi(
    plans: &[&ResizePlan],
    src: &RgbImage,
    scratch: &mut PlanarScratch,
    mut sink: impl FnMut(usize, usize, usize, &[u8]),
) {
    let (in_w, in_h) = (src.width as usize, src.height as usize);
    for p in plans {
        assert_eq!(
            (in_w, in_h),
            (p.in_w, p.in_h),
            "ResizePlan applied to an image of the wrong size"
        );
    }
    let PlanarScratch {
        a,
        b,
        strip,
        line,
        hbufs,
    } = scratch;
    // Source rows each plan's vertical pass reads (Pillow's ybox_first/last).
    let ranges: Vec<(usize, usize)> = plans
        .iter()
        .map(|p| match &p.vert {
            Some(v) => (v.start[0], v.start[p.out_h - 1] + v.len[p.out_h - 1]),
            None => (0, in_h),
        })
        .collect();
    // Horizontal passes, strip by strip of source rows: `hbufs[i]` holds per channel
    // `out_w` rows (one per output column) of `last - first` bytes.
    hbufs.resize_with(plans.len(), Vec::new);
    let mut any_h = false;
    for ((p, hb), &(first, last)) in plans.iter().zip(hbufs.iter_mut()).zip(&ranges) {
        hb.clear();
        if p.horiz.is_some() {
            hb.resize(3 * p.out_w * (last - first), 0);
            any_h = true;
        }
    }
    if any_h {
        let lo = ranges.iter().map(|r| r.0).min().unwrap_or(0);
        let hi = ranges.iter().map(|r| r.1).max().unwrap_or(0);
        strip.clear();
        strip.resize(3 * in_w * STRIP, 0);
        for r0 in (lo..hi).step_by(STRIP) {
            let n = STRIP.min(hi - r0);
            extract_strip(&src.data, in_w, r0, n, strip);
            for ((p, hb), &(first, last)) in plans.iter().zip(hbufs.iter_mut()).zip(&ranges) {
                let Some(h) = &p.horiz else { continue };
                let (s0, s1) = (r0.max(first), (r0 + n).min(last));
                if s0 >= s1 {
                    continue;
                }
                let rows = last - first;
                let plane = p.out_w * rows;
                let (o, m) = (s0 - first, s1 - s0);
                for ch in 0..3 {
                    let sp = &strip[ch * in_w * STRIP..(ch + 1) * in_w * STRIP];
                    let hp = &mut hb[ch * plane..(ch + 1) * plane];
                    filter_pass(sp, STRIP, s0 - r0, m, h, 0, line, |x, r| {
                        hp[x * rows + o..x * rows + o + m].copy_from_slice(r)
                    });
                }
            }
        }
    }
    for (i, ((p, hb), &(first, last))) in plans.iter().zip(hbufs.iter()).zip(&ranges).enumerate() {
        let out_w = p.out_w;
        match (&p.horiz, &p.vert) {
            (None, vert) => {
                // Channel plane in natural layout straight from the interleaved source.
                a.clear();
                a.resize(in_w * in_h, 0);
                for ch in 0..3 {
                    for (o, px) in a.iter_mut().zip(src.data.chunks_exact(3)) {
                        *o = px[ch];
                    }
                    match vert {
                        None => {
                            for (y, row) in a.chunks_exact(in_w).enumerate() {
                                sink(i, ch, y, row);
                            }
                        }
                        Some(v) => {
                            filter_pass(a, in_w, 0, in_w, v, 0, line, |y, row| sink(i, ch, y, row))
                        }
                    }
                }
            }
            (Some(_), vert) => {
                let rows = last - first;
                let plane = out_w * rows;
                b.clear();
                b.resize(plane, 0);
                for ch in 0..3 {
                    transpose(&hb[ch * plane..(ch + 1) * plane], out_w, rows, b);
                    match vert {
                        None => {
                            for (y, row) in b.chunks_exact(out_w).enumerate() {
                                sink(i, ch, y, row);
                            }
                        }
                        Some(v) => filter_pass(b, out_w, 0, out_w, v, first, line, |y, row| {
                            sink(i, ch, y, row)
                        }),
                    }
                }
            }
        }
    }
}

/// Pillow `image.resize((w, h))` (BICUBIC, the default for RGB) of an RGB image, as the
/// reference's Pillow 10.3.0 does it (horizontal pass first). A resize to the same size
/// returns a copy, as Pillow does. `w` and `h` must be non-zero.
pub fn resize_bicubic(src: &RgbImage, w: u32, h: u32) -> RgbImage {
    ResizePlan::new(src.width, src.height, w, h).apply(src)
}

/// [`resize_bicubic`] as Pillow 13 does it: when the height shrinks by more than twice as many
/// pixels as the width does, the vertical pass runs first (`ImagingResampleInner` in Pillow
/// 13.0.0's `Resample.c`: `in_h - out_h > 0 && in_h - out_h > (in_w - out_w) * 2`). The 8-bit
/// intermediate then differs, so bytes can differ by a few levels from Pillow 10.3's; this is
/// what HF's image processor gives today with a current Pillow. Every other size change is
/// identical to [`resize_bicubic`].
pub fn resize_bicubic_pillow13(src: &RgbImage, w: u32, h: u32) -> RgbImage {
    let plan = ResizePlan::new(src.width, src.height, w, h);
    let (dw, dh) = (
        plan.in_w as i64 - plan.out_w as i64,
        plan.in_h as i64 - plan.out_h as i64,
    );
    match (&plan.horiz, &plan.vert) {
        (Some(hc), Some(vc)) if dh > 0 && dh > dw * 2 => {
            let tmp = vertical(&src.data, plan.in_w, 0, vc);
            RgbImage {
                width: w,
                height: h,
                data: horizontal(&tmp, plan.in_w, 0, plan.out_h, hc),
            }
        }
        _ => plan.apply(src),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for &(i, o) in &[
            (640usize, 336usize),
            (300, 336),
            (4096, 672),
            (1, 336),
            (36, 336),
        ] {
            let c = Coeffs::new(i, o);
            for x in 0..o {
                let (_, k) = c.taps(x);
                let s: i64 = k.iter().map(|&w| i64::from(w)).sum();
                assert!(
                    (s - (1 << 22)).abs() <= k.len() as i64,
                    "{i}->{o} at {x}: {s}"
                );
            }
        }
    }

    /// Pillow's 8-bit passes written the plainest way, one output sample at a time (the loops
    /// of `ImagingResampleHorizontal_8bpc` / `ImagingResampleVertical_8bpc`): the reference the
    /// compiled bodies are checked against, so the check means something on a CPU without AVX2
    /// too (there the dispatcher runs the portable body, and comparing the two would compare a
    /// function with itself).
    fn reference_horizontal(src: &[u8], src_w: usize, rows: usize, c: &Coeffs) -> Vec<u8> {
        let out_w = c.start.len();
        let mut out = Vec::with_capacity(out_w * rows * 3);
        for r in 0..rows {
            for xx in 0..out_w {
                for ch in 0..3 {
                    let mut acc = HALF;
                    for j in 0..c.len[xx] {
                        let x = c.start[xx] + j;
                        acc +=
                            i32::from(src[(r * src_w + x) * 3 + ch]) * c.weights[xx * c.ksize + j];
                    }
                    out.push(clip8(acc));
                }
            }
        }
        out
    }

    fn reference_vertical(src: &[u8], width: usize, c: &Coeffs) -> Vec<u8> {
        let out_h = c.start.len();
        let mut out = Vec::with_capacity(out_h * width * 3);
        for yy in 0..out_h {
            for x in 0..width {
                for ch in 0..3 {
                    let mut acc = HALF;
                    for j in 0..c.len[yy] {
                        let y = c.start[yy] + j;
                        acc +=
                            i32::from(src[(y * width + x) * 3 + ch]) * c.weights[yy * c.ksize + j];
                    }
                    out.push(clip8(acc));
                }
            }
        }
        out
    }

    #[test]
    fn passes_match_the_plain_reference_on_every_path() {
        // The dispatcher (AVX2 where the CPU has it), the portable body and, where available,
        // the AVX2 copy called directly: each must equal the plain reference byte for byte.
        let (w, h) = (53usize, 41usize);
        let src: Vec<u8> = (0..w * h * 3).map(|i| (i * 7919 % 251) as u8).collect();
        for &(ow, oh) in &[(17usize, 90usize), (336, 7), (53, 300)] {
            let hc = Coeffs::new(w, ow);
            let want_h = reference_horizontal(&src, w, h, &hc);
            assert_eq!(
                horizontal(&src, w, 0, h, &hc),
                want_h,
                "dispatch, {ow}x{oh}"
            );
            assert_eq!(
                horizontal_body(&src, w, 0, h, &hc),
                want_h,
                "body, {ow}x{oh}"
            );
            let vc = Coeffs::new(h, oh);
            let want_v = reference_vertical(&want_h, ow, &vc);
            assert_eq!(vertical(&want_h, ow, 0, &vc), want_v, "dispatch, {ow}x{oh}");
            assert_eq!(
                vertical_body(&want_h, ow, 0, &vc),
                want_v,
                "body, {ow}x{oh}"
            );
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: AVX2 support was just checked.
                let (a, b) = unsafe {
                    (
                        horizontal_avx2(&src, w, 0, h, &hc),
                        vertical_avx2(&want_h, ow, 0, &vc),
                    )
                };
                assert_eq!(a, want_h, "avx2, {ow}x{oh}");
                assert_eq!(b, want_v, "avx2, {ow}x{oh}");
            }
        }
    }

    #[test]
    fn planar_pass_dispatch_matches_portable_body_and_reference() {
        // The AVX2 copy of the planar pass equals its baseline compilation, and the planar
        // resize equals the interleaved one (lengths around the 32-lane block and tails).
        let (w, h) = (71usize, 45usize);
        let src: Vec<u8> = (0..w * h * 3).map(|i| (i * 7919 % 251) as u8).collect();
        for &(ow, oh) in &[(17usize, 90usize), (336, 7), (71, 300), (64, 45), (33, 31)] {
            let vc = Coeffs::new(h, oh);
            let (mut l1, mut l2) = (Vec::new(), Vec::new());
            let (mut o1, mut o2) = (Vec::new(), Vec::new());
            filter_pass(&src, w * 3, 5, w * 3 - 5, &vc, 0, &mut l1, |_, r| {
                o1.extend_from_slice(r)
            });
            filter_pass_body(&src, w * 3, 5, w * 3 - 5, &vc, 0, &mut l2, |_, r| {
                o2.extend_from_slice(r)
            });
            assert_eq!(o1, o2);
            let img = RgbImage {
                width: w as u32,
                height: h as u32,
                data: src.clone(),
            };
            let reference = resize_bicubic(&img, ow as u32, oh as u32);
            let mut planar = vec![0u8; ow * oh * 3];
            ResizePlan::new(w as u32, h as u32, ow as u32, oh as u32).apply_planar(
                &img,
                &mut PlanarScratch::default(),
                |ch, y, row| {
                    for (x, &v) in row.iter().enumerate() {
                        planar[(y * ow + x) * 3 + ch] = v;
                    }
                },
            );
            assert_eq!(planar, reference.data, "{w}x{h} -> {ow}x{oh}");
        }
    }

    #[test]
    fn same_size_is_copy_and_uniform_stays_uniform() {
        let img = RgbImage::filled(17, 9, [10, 200, 255]);
        assert_eq!(resize_bicubic(&img, 17, 9), img);
        let r = resize_bicubic(&img, 40, 3);
        assert!(r.data.chunks(3).all(|p| p == [10, 200, 255]));
    }
}
