//! Image size from the file header, without decoding pixels: lets a build compute every sample's
//! exact token count (which depends only on the size) before the expensive decode.

use std::io::{BufReader, Cursor, Read};
use std::path::Path;

use image::{ImageDecoder, ImageFormat};

use crate::decode::{sniff_format, Format, ImageError};

/// `(width, height)` as Pillow's `Image.open(path).size` reports it.
pub fn probe_size_file(path: &Path) -> Result<(u32, u32), ImageError> {
    let file = std::fs::File::open(path).map_err(|source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    // Headers are small; 64 KiB covers JPEG files with large EXIF/ICC segments in most cases,
    // and we fall back to the whole file otherwise.
    let mut head = Vec::with_capacity(1 << 16);
    BufReader::new(file)
        .take(1 << 16)
        .read_to_end(&mut head)
        .map_err(|source| ImageError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    match probe_size(&head) {
        Ok(size) => Ok(size),
        Err(_) if head.len() == 1 << 16 => {
            let bytes = std::fs::read(path).map_err(|source| ImageError::Io {
                path: path.to_path_buf(),
                source,
            })?;
            probe_size(&bytes)
        }
        Err(e) => Err(e),
    }
}

/// `(width, height)` from the first bytes of an encoded image.
pub fn probe_size(bytes: &[u8]) -> Result<(u32, u32), ImageError> {
    if bytes.is_empty() {
        return Err(ImageError::Empty);
    }
    let format = sniff_format(bytes).ok_or_else(|| ImageError::UnknownFormat {
        magic: bytes[..bytes.len().min(8)].to_vec(),
    })?;
    let corrupt = |reason: String| ImageError::Corrupt {
        format: format.name(),
        reason,
    };
    let size = match format {
        Format::Jpeg => jpeg_size(bytes).ok_or_else(|| corrupt("no frame header".into()))?,
        _ => {
            let image_format = match format {
                Format::Png => ImageFormat::Png,
                Format::Gif => ImageFormat::Gif,
                Format::Bmp => ImageFormat::Bmp,
                Format::WebP => ImageFormat::WebP,
                Format::Tiff => ImageFormat::Tiff,
                Format::Jpeg => unreachable!("handled above"),
            };
            let reader = image::ImageReader::with_format(Cursor::new(bytes), image_format);
            let decoder = reader.into_decoder().map_err(|e| corrupt(e.to_string()))?;
            decoder.dimensions()
        }
    };
    if size.0 == 0 || size.1 == 0 {
        return Err(ImageError::ZeroSize {
            format: format.name(),
            width: size.0,
            height: size.1,
        });
    }
    Ok(size)
}

/// Width and height from the first SOFn marker segment.
fn jpeg_size(bytes: &[u8]) -> Option<(u32, u32)> {
    let mut i = 2; // after SOI
    while i + 4 <= bytes.len() {
        if bytes[i] != 0xFF {
            return None;
        }
        let marker = bytes[i + 1];
        if marker == 0xFF {
            i += 1; // fill byte
            continue;
        }
        // Markers without a length.
        if marker == 0x01 || (0xD0..=0xD8).contains(&marker) {
            i += 2;
            continue;
        }
        let len = u16::from_be_bytes([bytes[i + 2], bytes[i + 3]]) as usize;
        let is_sof = (0xC0..=0xCF).contains(&marker) && ![0xC4, 0xC8, 0xCC].contains(&marker);
        if is_sof {
            let seg = bytes.get(i + 4..i + 2 + len)?;
            if seg.len() < 5 {
                return None;
            }
            let h = u16::from_be_bytes([seg[1], seg[2]]) as u32;
            let w = u16::from_be_bytes([seg[3], seg[4]]) as u32;
            return Some((w, h));
        }
        i += 2 + len;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_equals_decode_on_every_fixture_image() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/images");
        let mut stack = vec![root];
        let mut checked = 0;
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    stack.push(path);
                } else if !path.extension().is_some_and(|e| e == "md" || e == "json") {
                    let decoded = crate::decode_rgb_file(&path).unwrap();
                    let probed = probe_size_file(&path).unwrap();
                    assert_eq!(
                        probed,
                        (decoded.width, decoded.height),
                        "{}",
                        path.display()
                    );
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, 30);
    }
}
