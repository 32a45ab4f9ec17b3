//! Image size from the file header, without decoding pixels: lets a build compute every sample's
//! exact token count (which depends only on the size) before the expensive decode.

use std::io::{BufReader, Read};
use std::path::Path;

use image::ImageDecoder;

use crate::decode::{
    check_file_bytes, check_pixels, image_limits, image_reader, jpeg_header, sniff_format, Format,
    ImageError,
};
use crate::limits::DecodeLimits;

/// `(width, height)` as Pillow's `Image.open(path).size` reports it (default limits).
pub fn probe_size_file(path: &Path) -> Result<(u32, u32), ImageError> {
    probe_size_file_with(path, &DecodeLimits::default())
}

/// `(width, height)` of a file, refused as the decoder would refuse it for its file size or
/// pixel count.
pub fn probe_size_file_with(path: &Path, limits: &DecodeLimits) -> Result<(u32, u32), ImageError> {
    let io = |source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    check_file_bytes(file.metadata().map_err(io)?.len(), limits)?;
    // Headers are small; 64 KiB covers JPEG files with large EXIF/ICC segments in most cases,
    // and we fall back to the whole file otherwise.
    let mut head = Vec::with_capacity(1 << 16);
    BufReader::new(file)
        .take(1 << 16)
        .read_to_end(&mut head)
        .map_err(io)?;
    match probe_size_with(&head, limits) {
        Ok(size) => Ok(size),
        Err(e @ (ImageError::TooLarge { .. } | ImageError::FileTooLarge { .. })) => Err(e),
        Err(_) if head.len() == 1 << 16 => {
            let bytes = std::fs::read(path).map_err(io)?;
            probe_size_with(&bytes, limits)
        }
        Err(e) => Err(e),
    }
}

/// `(width, height)` from the first bytes of an encoded image (default limits).
pub fn probe_size(bytes: &[u8]) -> Result<(u32, u32), ImageError> {
    probe_size_with(bytes, &DecodeLimits::default())
}

/// `(width, height)` from the first bytes of an encoded image, read by the same header parser
/// as the decoder (libjpeg for JPEG, `image` for the rest) so that both accept the same files.
pub fn probe_size_with(bytes: &[u8], limits: &DecodeLimits) -> Result<(u32, u32), ImageError> {
    if bytes.is_empty() {
        return Err(ImageError::Empty);
    }
    let format = sniff_format(bytes).ok_or_else(|| ImageError::UnknownFormat {
        magic: bytes[..bytes.len().min(8)].to_vec(),
    })?;
    let size = match format {
        Format::Jpeg => {
            let (w, h, _) = jpeg_header(bytes)?;
            (w, h)
        }
        _ => {
            let mut reader = image_reader(format, bytes)?;
            reader.limits(image_limits(limits));
            let decoder = reader.into_decoder().map_err(|e| ImageError::Corrupt {
                format: format.name(),
                reason: e.to_string(),
            })?;
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
    check_pixels(format, size.0, size.1, limits)?;
    Ok(size)
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
