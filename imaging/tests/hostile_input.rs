//! Hostile and unusual image files (issue 13): truncation in every format, the pixel and
//! file-size limits, and header probing that agrees with the decoder on every file the decoder
//! accepts, on the shipped fixtures and on generated variants of them.

mod common;

use std::path::PathBuf;

use common::fixtures;
use llava_imaging::decode::{decode_rgb, decode_rgb_with, sniff_format, Format, ImageError};
use llava_imaging::{
    probe_size, probe_size_file_with, probe_size_with, DecodeLimits, PILLOW_MAX_IMAGE_PIXELS,
};

fn fixture_images() -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![fixtures().join("images")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read_dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if !path.extension().is_some_and(|e| e == "md" || e == "json") {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// The generated format variants (fixtures/formats), Pillow-readable or not.
fn format_fixtures() -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(fixtures().join("formats"))
        .expect("fixtures/formats")
        .map(|e| e.expect("entry").path())
        .filter(|p| !p.extension().is_some_and(|e| e == "py" || e == "json"))
        .collect();
    out.sort();
    out
}

fn read(path: &PathBuf) -> Vec<u8> {
    std::fs::read(path).expect("read")
}

// ---------------------------------------------------------------------------------------------
// JPEG variants libjpeg reads with (at most) a warning, and Pillow decodes normally.

/// Offset of the second marker (the one after the first segment following SOI).
fn second_marker(jpeg: &[u8]) -> usize {
    let len = usize::from(u16::from_be_bytes([jpeg[4], jpeg[5]]));
    4 + len
}

/// Stray bytes between two markers (libjpeg: "extraneous bytes before marker").
fn with_stray_bytes(jpeg: &[u8]) -> Vec<u8> {
    let at = second_marker(jpeg);
    [&jpeg[..at], &[0x00, 0x13, 0x37][..], &jpeg[at..]].concat()
}

/// `0xFF` fill bytes before a marker (allowed by the standard).
fn with_fill_bytes(jpeg: &[u8]) -> Vec<u8> {
    let at = second_marker(jpeg);
    [&jpeg[..at], &[0xFF, 0xFF, 0xFF][..], &jpeg[at..]].concat()
}

/// Two 60 KB APP15 segments first: the frame header lies past the probe's 64 KiB first read.
fn with_large_app_segments(jpeg: &[u8]) -> Vec<u8> {
    let mut seg = vec![0xFF, 0xEF, 0xEA, 0x62]; // length 60002
    seg.resize(2 + 60002, 0x20);
    [&jpeg[..2], &seg[..], &seg[..], &jpeg[2..]].concat()
}

/// Bytes after the end-of-image marker (Pillow ignores them).
fn with_trailing_garbage(bytes: &[u8]) -> Vec<u8> {
    [bytes, &b"trailing data that is not part of the image"[..]].concat()
}

#[test]
fn jpeg_with_stray_bytes_between_markers_decodes_like_the_original() {
    let mut checked = 0;
    for path in fixture_images() {
        let bytes = read(&path);
        if sniff_format(&bytes) != Some(Format::Jpeg) {
            continue;
        }
        let want = decode_rgb(&bytes).expect("original");
        for (what, variant) in [
            ("stray bytes", with_stray_bytes(&bytes)),
            ("fill bytes", with_fill_bytes(&bytes)),
            ("large APP segments", with_large_app_segments(&bytes)),
            ("trailing garbage", with_trailing_garbage(&bytes)),
        ] {
            let got = decode_rgb(&variant)
                .unwrap_or_else(|e| panic!("{} with {what}: {e}", path.display()));
            assert_eq!(got, want, "{} with {what}", path.display());
            assert_eq!(
                probe_size(&variant).expect("probe"),
                (want.width, want.height),
                "{} with {what}",
                path.display()
            );
            checked += 1;
        }
    }
    assert!(checked >= 36, "{checked}"); // 9 JPEGs x 4 variants
}

/// Every file the decoder accepts gets the same size from the probe (both from bytes and from
/// the file, which reads only the first 64 KiB when that suffices), on every shipped image and on
/// variants: the JPEG variants above, trailing data, and cuts that still decode (GIF frames after
/// the first, a PNG's cut IEND), and every generated format variant (fixtures/formats).
#[test]
fn probe_agrees_with_decoder_on_every_accepted_file() {
    let dir = std::env::temp_dir().join(format!("llava-probe-agree-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tempdir");
    let limits = DecodeLimits::default();
    let (mut accepted, mut refused) = (0, 0);
    for path in fixture_images().into_iter().chain(format_fixtures()) {
        let bytes = read(&path);
        let mut variants = vec![bytes.clone(), with_trailing_garbage(&bytes)];
        if sniff_format(&bytes) == Some(Format::Jpeg) {
            variants.push(with_stray_bytes(&bytes));
            variants.push(with_fill_bytes(&bytes));
            variants.push(with_large_app_segments(&bytes));
        }
        for cut in [bytes.len() / 3, bytes.len() * 2 / 3, bytes.len() - 1] {
            variants.push(bytes[..cut].to_vec());
        }
        for (k, variant) in variants.iter().enumerate() {
            let Ok(img) = decode_rgb_with(variant, &limits) else {
                refused += 1;
                continue;
            };
            accepted += 1;
            let size = (img.width, img.height);
            assert_eq!(
                probe_size_with(variant, &limits).ok(),
                Some(size),
                "{} variant {k}",
                path.display()
            );
            let file = dir.join("variant");
            std::fs::write(&file, variant).expect("write");
            assert_eq!(
                probe_size_file_with(&file, &limits).ok(),
                Some(size),
                "{} variant {k} (file)",
                path.display()
            );
        }
    }
    std::fs::remove_dir_all(&dir).ok();
    assert!(
        accepted >= 90 && refused >= 60,
        "{accepted} accepted, {refused} refused"
    );
}

// ---------------------------------------------------------------------------------------------
// Truncation: one policy for every format.

#[test]
fn truncated_files_of_every_format_are_rejected_with_what_is_missing() {
    let mut formats = std::collections::BTreeSet::new();
    for path in fixture_images() {
        let bytes = read(&path);
        let format = sniff_format(&bytes).expect("format");
        // A GIF is only cut when its first frame is (Pillow decodes the first frame alone); the
        // cuts near the end, where Pillow may still read every row, are checked against Pillow
        // in `cut_files_are_accepted_or_refused_as_pillow_does`.
        let cuts = if format == Format::Gif {
            vec![bytes.len() / 8]
        } else {
            vec![bytes.len() / 4, bytes.len() / 2]
        };
        for cut in cuts {
            let Err(e) = decode_rgb(&bytes[..cut]) else {
                panic!("{} cut at {cut} decodes", path.display());
            };
            assert!(
                matches!(e, ImageError::Truncated { .. }),
                "{} cut at {cut}: {e}",
                path.display()
            );
            assert_eq!(e.kind(), "truncated_image");
            let msg = e.to_string();
            assert!(
                msg.contains(&format!("after {cut} bytes")) && msg.contains("more byte"),
                "{} cut at {cut}: {msg}",
                path.display()
            );
        }
        formats.insert(format!("{format:?}"));
    }
    assert_eq!(formats.len(), 5, "{formats:?}"); // the shipped images have no TIFF
}

#[test]
fn truncated_bmp_reports_missing_rows() {
    let bytes = read(&fixtures().join("images/textvqa/train_images/86a09d76939d412c.bmp"));
    // 64 rows of 384 bytes from byte 54: cut 10 rows and a bit.
    let e = decode_rgb(&bytes[..bytes.len() - 384 * 10 - 7]).unwrap_err();
    assert!(e.to_string().contains("11 pixel row(s) missing"), "{e}");
}

#[test]
fn progressive_and_baseline_jpeg_cut_mid_scan_are_rejected() {
    // sa_2862.jpg is progressive (10 scans), 2414911.jpg baseline.
    for (rel, scan) in [
        ("sam/images/sa_2862.jpg", "scan 7"),
        ("gqa/images/2414911.jpg", "scan 1"),
    ] {
        let bytes = read(&fixtures().join("images").join(rel));
        let e = decode_rgb(&bytes[..bytes.len() / 2]).unwrap_err();
        assert_eq!(e.kind(), "truncated_image", "{rel}: {e}");
        assert!(e.to_string().contains(scan), "{rel}: {e}");
    }
}

#[test]
fn png_with_complete_image_data_but_cut_iend_decodes_like_pillow() {
    // Pillow stops reading at a cut chunk header after the image data.
    let bytes = read(&fixtures().join("images/gqa/images/2378838.png"));
    let want = decode_rgb(&bytes).expect("full");
    for k in [1, 4, 8, 12] {
        assert_eq!(
            decode_rgb(&bytes[..bytes.len() - k]).expect("cut IEND"),
            want
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Limits.

/// A PNG whose header declares `w x h` (8-bit RGB) with a tiny, incomplete IDAT: what a
/// "decompression bomb" looks like to the header parser.
fn png_declaring(w: u32, h: u32) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    for (kind, data) in [
        (&b"IHDR"[..], &ihdr[..]),
        (b"IDAT", &[0x78, 0x9C, 0x03, 0x00][..]),
        (b"IEND", &[][..]),
    ] {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let start = out.len();
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        let crc = crc32(&out[start..]);
        out.extend_from_slice(&crc.to_be_bytes());
    }
    out
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A real JPEG with its frame header patched to declare `w x h`.
fn jpeg_declaring(w: u16, h: u16) -> Vec<u8> {
    let mut bytes = read(&fixtures().join("images/gqa/images/2337875.jpg"));
    let sof = bytes
        .windows(2)
        .position(|m| m[0] == 0xFF && matches!(m[1], 0xC0..=0xC2))
        .expect("SOF");
    bytes[sof + 5..sof + 7].copy_from_slice(&h.to_be_bytes());
    bytes[sof + 7..sof + 9].copy_from_slice(&w.to_be_bytes());
    bytes
}

#[test]
fn pillow_pixel_limit_is_checked_from_the_header() {
    assert_eq!(PILLOW_MAX_IMAGE_PIXELS, 178_956_970); // 2 * Image.MAX_IMAGE_PIXELS
                                                      // The 40000 x 40000 PNG (1.6 gigapixels): refused by probe and decoder alike, from
                                                      // the header (nothing is allocated: the IDAT here could not even fill one row).
    let bomb = png_declaring(40_000, 40_000);
    for e in [
        probe_size(&bomb).unwrap_err(),
        decode_rgb(&bomb).unwrap_err(),
    ] {
        assert!(matches!(e, ImageError::TooLarge { .. }), "{e}");
        assert_eq!(e.kind(), "image_too_large");
        assert!(e.to_string().contains("1600000000 pixels"), "{e}");
    }
    let bomb = jpeg_declaring(20_000, 20_000);
    assert!(matches!(
        decode_rgb(&bomb).unwrap_err(),
        ImageError::TooLarge { .. }
    ));
    assert!(matches!(
        probe_size(&bomb).unwrap_err(),
        ImageError::TooLarge { .. }
    ));
    // Pillow refuses strictly more than the limit: exactly the limit passes the check.
    let at_limit = DecodeLimits {
        max_pixels: 13_000 * 13_000,
        ..DecodeLimits::default()
    };
    assert_eq!(
        probe_size_with(&jpeg_declaring(13_000, 13_000), &at_limit).ok(),
        Some((13_000, 13_000))
    );
    assert!(probe_size_with(&jpeg_declaring(13_001, 13_000), &at_limit).is_err());
}

#[test]
fn configured_limits_apply_to_every_format() {
    for path in fixture_images() {
        let bytes = read(&path);
        let (w, h) = probe_size(&bytes).expect("probe");
        let pixels = u64::from(w) * u64::from(h);
        let tight = DecodeLimits {
            max_pixels: pixels - 1,
            ..DecodeLimits::default()
        };
        let e = decode_rgb_with(&bytes, &tight).unwrap_err();
        assert_eq!(e.kind(), "image_too_large", "{}: {e}", path.display());
        let e = probe_size_with(&bytes, &tight).unwrap_err();
        assert_eq!(e.kind(), "image_too_large", "{}: {e}", path.display());
        let exact = DecodeLimits {
            max_pixels: pixels,
            ..DecodeLimits::default()
        };
        decode_rgb_with(&bytes, &exact).expect("at the limit");
        let small_files = DecodeLimits {
            max_file_bytes: bytes.len() as u64 - 1,
            ..DecodeLimits::default()
        };
        let e = decode_rgb_with(&bytes, &small_files).unwrap_err();
        assert!(matches!(e, ImageError::FileTooLarge { .. }), "{e}");
        assert_eq!(e.kind(), "image_too_large");
        let e = probe_size_file_with(&path, &small_files).unwrap_err();
        assert!(matches!(e, ImageError::FileTooLarge { .. }), "{e}");
    }
}

// ---------------------------------------------------------------------------------------------
// Against Pillow: every fixture cut at 12 points (tests/data/gen_pillow_truncation.py).

#[test]
fn cut_files_are_accepted_or_refused_as_pillow_does() {
    let p =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/pillow_truncation.json");
    let cases: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(p).expect("oracle")).expect("json");
    let mut failures = Vec::new();
    for case in &cases {
        let rel = case["file"].as_str().expect("file");
        let cut = case["cut"].as_u64().expect("cut") as usize;
        let bytes = read(&fixtures().join("images").join(rel));
        let ours = decode_rgb(&bytes[..cut]);
        match (case["ok"].as_bool(), &ours) {
            (Some(true), Ok(img)) => {
                if common::sha256_hex(&img.data) != case["rgb_sha256"].as_str().unwrap_or("") {
                    failures.push(format!("{rel} cut at {cut}: pixels differ from Pillow's"));
                }
            }
            (Some(false), Err(e)) => {
                if !matches!(e, ImageError::Truncated { .. } | ImageError::Corrupt { .. }) {
                    failures.push(format!("{rel} cut at {cut}: refused as {e}"));
                }
            }
            (Some(true), Err(e)) => failures.push(format!(
                "{rel} cut at {cut}: Pillow reads it, we refuse: {e}"
            )),
            _ => failures.push(format!(
                "{rel} cut at {cut}: Pillow refuses ({}), we accept",
                case["error"]
            )),
        }
    }
    assert!(cases.len() > 300, "{}", cases.len());
    assert!(
        failures.is_empty(),
        "{} of {}:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// Format variants against Pillow (fixtures/formats/gen_formats.py).

/// Variants we do not decode like Pillow yet, with why; reported, not hidden.
const FORMAT_KNOWN_DIFFERENT: &[(&str, &str)] = &[(
    "tiff_palette.tif",
    "refused (`image`'s TIFF decoder has no RGBPalette support); Pillow reads it",
)];

#[test]
fn format_variants_decode_like_pillow_or_are_refused_with_a_reason() {
    let dir = fixtures().join("formats");
    let oracle: Vec<serde_json::Value> = serde_json::from_str(
        &std::fs::read_to_string(dir.join("pillow.json")).expect("pillow.json"),
    )
    .expect("json");
    let mut failures = Vec::new();
    for case in &oracle {
        let name = case["file"].as_str().expect("file");
        if FORMAT_KNOWN_DIFFERENT.iter().any(|(f, _)| *f == name) {
            continue;
        }
        let ours = llava_imaging::decode_rgb_file(&dir.join(name));
        match (case.get("rgb_sha256").and_then(|v| v.as_str()), ours) {
            (Some(want), Ok(img)) => {
                let size = (u64::from(img.width), u64::from(img.height));
                let pillow = (
                    case["width"].as_u64().unwrap_or(0),
                    case["height"].as_u64().unwrap_or(0),
                );
                if size != pillow || common::sha256_hex(&img.data) != want {
                    failures.push(format!(
                        "{name} (Pillow mode {}): pixels differ",
                        case["mode"]
                    ));
                }
            }
            (Some(_), Err(e)) => failures.push(format!("{name}: Pillow reads it, we refuse: {e}")),
            (None, Ok(_)) => failures.push(format!(
                "{name}: Pillow refuses it ({}), we decode",
                case["error"]
            )),
            (None, Err(e)) => assert!(!e.to_string().is_empty()),
        }
    }
    assert!(oracle.len() >= 30);
    for (name, why) in FORMAT_KNOWN_DIFFERENT {
        let e = llava_imaging::decode_rgb_file(&dir.join(name)).expect_err(why);
        assert!(e.to_string().contains("RGBPalette"), "{name}: {e}");
    }
    assert!(
        failures.is_empty(),
        "{} of {}:\n{}",
        failures.len(),
        oracle.len(),
        failures.join("\n")
    );
}
