//! `resize_bicubic_pillow13` against Pillow 13 itself (sha256 of its bytes, made by
//! `tests/data/gen_pillow13_pass_order.py`), and `resize_bicubic` (Pillow 10.3's order) against
//! the same goldens where the two orders agree.

use std::path::Path;

use llava_imaging::{decode::decode_rgb_file, resize_bicubic, resize_bicubic_pillow13, RgbImage};
use sha2::{Digest, Sha256};

/// The generator's LCG image: one byte (bits 16..23) of each step per channel value.
fn noise(w: u32, h: u32) -> RgbImage {
    let mut x: u64 = 1;
    let data = (0..w * h * 3)
        .map(|_| {
            x = (1_103_515_245 * x + 12_345) % (1 << 31);
            ((x >> 16) & 0xFF) as u8
        })
        .collect();
    RgbImage {
        width: w,
        height: h,
        data,
    }
}

#[test]
fn pillow13_order_matches_pillow13_and_differs_from_10_3_only_where_it_should() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let golden: serde_json::Value = serde_json::from_slice(
        &std::fs::read(root.join("tests/data/pillow13_pass_order.json")).unwrap(),
    )
    .unwrap();
    let sample1 =
        decode_rgb_file(&root.join("../fixtures/tiny-llava-next-a/images/sample1.png")).unwrap();
    let sources = [("noise", noise(50, 130)), ("sample1", sample1)];
    let sha = |img: &RgbImage| hex::encode(Sha256::digest(&img.data));
    let mut vertical_first_differs = 0;
    for case in golden["cases"].as_array().unwrap() {
        let name = case["source"].as_str().unwrap();
        let src = &sources.iter().find(|(n, _)| *n == name).unwrap().1;
        let w = case["size"][0].as_u64().unwrap() as u32;
        let h = case["size"][1].as_u64().unwrap() as u32;
        let want = case["sha256"].as_str().unwrap();
        assert_eq!(
            sha(&resize_bicubic_pillow13(src, w, h)),
            want,
            "{name} -> {w}x{h}"
        );
        // Pillow 13 changes the order only when both change and the height shrinks by more
        // than twice as many pixels as the width; elsewhere the reference's order is the same.
        let (dw, dh) = (
            i64::from(src.width) - i64::from(w),
            i64::from(src.height) - i64::from(h),
        );
        let vertical_first = w != src.width && dh > 0 && dh > 2 * dw;
        let old = sha(&resize_bicubic(src, w, h));
        if vertical_first {
            vertical_first_differs += usize::from(old != want);
        } else {
            assert_eq!(old, want, "{name} -> {w}x{h}: same order, same bytes");
        }
    }
    // The noise image makes the 8-bit intermediate matter: the orders must disagree there.
    assert!(vertical_first_differs >= 2, "{vertical_first_differs}");
}
