//! Decoding to 8-bit RGB exactly like Pillow 10.3 `Image.open(path).convert("RGB")` (spec §1.4,
//! §3.10). A file whose data ends early is refused in every format ([`ImageError::Truncated`]),
//! as Pillow does without `LOAD_TRUNCATED_IMAGES`; images above the pixel limit are refused from
//! their header before any pixel buffer exists, as Pillow's `DecompressionBombError`.
//!
//! JPEG goes through libjpeg-turbo (the library Pillow links), everything else through the
//! `image` crate, followed by Pillow's mode conversion rules: alpha is dropped (not
//! composited), palettes are looked up, grey is replicated, 16-bit channels are reduced the
//! way Pillow's raw modes reduce them. EXIF orientation is ignored, as in the reference.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use image::{DynamicImage, ImageDecoder, ImageFormat};
use turbojpeg::raw;

use crate::limits::{DecodeLimits, PILLOW_WARN_PIXELS};
use crate::truncation::{
    bmp_padded, bmp_shortfall, gif_shortfall, jpeg_shortfall, png_repaired, png_shortfall,
    tiff_shortfall, webp_shortfall, Shortfall,
};

/// A decoded image: `data` is row-major, interleaved RGB (`height * width * 3` bytes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RgbImage {
    pub width: u32,
    pub height: u32,
    pub data: Vec<u8>,
}

impl RgbImage {
    /// A `width x height` image filled with one colour (used for canvases).
    pub fn filled(width: u32, height: u32, rgb: [u8; 3]) -> Self {
        let n = width as usize * height as usize;
        let mut data = Vec::with_capacity(n * 3);
        for _ in 0..n {
            data.extend_from_slice(&rgb);
        }
        RgbImage {
            width,
            height,
            data,
        }
    }

    /// `(W, H)` in PIL / LLaVA-NeXT order.
    pub fn size(&self) -> (u32, u32) {
        (self.width, self.height)
    }
}

/// Why an image could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot read image file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("image data is empty (0 bytes)")]
    Empty,
    #[error("unknown image format (first bytes {magic:02x?}); supported: JPEG, PNG, GIF, BMP, WebP, TIFF")]
    UnknownFormat { magic: Vec<u8> },
    #[error("corrupt or undecodable {format} data: {reason}")]
    Corrupt {
        format: &'static str,
        reason: String,
    },
    #[error("truncated {format} file: {reason}")]
    Truncated {
        format: &'static str,
        reason: String,
    },
    #[error("{format} image is {width}x{height} = {} pixels, above max_image_pixels {limit} (Pillow refuses more than {} pixels with DecompressionBombError)", u64::from(*width) * u64::from(*height), 2 * PILLOW_WARN_PIXELS)]
    TooLarge {
        format: &'static str,
        width: u32,
        height: u32,
        limit: u64,
    },
    #[error("image file is {bytes} bytes, above the limit of {limit} bytes (max_image_file_mb)")]
    FileTooLarge { bytes: u64, limit: u64 },
    #[error("{format} image has zero size ({width}x{height})")]
    ZeroSize {
        format: &'static str,
        width: u32,
        height: u32,
    },
}

impl ImageError {
    /// The reject kind a pipeline reports for this error.
    pub fn kind(&self) -> &'static str {
        match self {
            ImageError::Truncated { .. } => "truncated_image",
            ImageError::TooLarge { .. } | ImageError::FileTooLarge { .. } => "image_too_large",
            _ => "image",
        }
    }
}

/// Refuses `width x height` above the pixel limit (before anything is allocated for it).
pub(crate) fn check_pixels(
    format: Format,
    width: u32,
    height: u32,
    limits: &DecodeLimits,
) -> Result<(), ImageError> {
    if u64::from(width) * u64::from(height) > limits.max_pixels {
        return Err(ImageError::TooLarge {
            format: format.name(),
            width,
            height,
            limit: limits.max_pixels,
        });
    }
    Ok(())
}

/// Refuses files above the file-size limit.
pub(crate) fn check_file_bytes(bytes: u64, limits: &DecodeLimits) -> Result<(), ImageError> {
    if bytes > limits.max_file_bytes {
        return Err(ImageError::FileTooLarge {
            bytes,
            limit: limits.max_file_bytes,
        });
    }
    Ok(())
}

/// Container formats recognised from magic bytes (never from the file extension).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Jpeg,
    Png,
    Gif,
    Bmp,
    WebP,
    Tiff,
}

impl Format {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Format::Jpeg => "JPEG",
            Format::Png => "PNG",
            Format::Gif => "GIF",
            Format::Bmp => "BMP",
            Format::WebP => "WebP",
            Format::Tiff => "TIFF",
        }
    }
}

/// Identify the format from the first bytes, as Pillow's plugins do.
pub fn sniff_format(bytes: &[u8]) -> Option<Format> {
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Some(Format::Jpeg)
    } else if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some(Format::Png)
    } else if bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a") {
        Some(Format::Gif)
    } else if bytes.starts_with(b"BM") {
        Some(Format::Bmp)
    } else if bytes.len() >= 12 && &bytes[0..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        Some(Format::WebP)
    } else if bytes.starts_with(b"II*\0") || bytes.starts_with(b"MM\0*") {
        Some(Format::Tiff)
    } else {
        None
    }
}

/// Read and decode a file (see [`decode_rgb`]) with the default limits.
pub fn decode_rgb_file(path: &Path) -> Result<RgbImage, ImageError> {
    decode_rgb_file_with(path, &DecodeLimits::default())
}

/// Read and decode a file; its size is checked before it is read.
pub fn decode_rgb_file_with(path: &Path, limits: &DecodeLimits) -> Result<RgbImage, ImageError> {
    let io = |source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    };
    check_file_bytes(std::fs::metadata(path).map_err(io)?.len(), limits)?;
    let bytes = std::fs::read(path).map_err(io)?;
    decode_rgb_with(&bytes, limits)
}

/// Decode encoded image bytes to RGB the way Pillow's `convert("RGB")` does (default limits).
pub fn decode_rgb(bytes: &[u8]) -> Result<RgbImage, ImageError> {
    decode_rgb_with(bytes, &DecodeLimits::default())
}

/// Decode encoded image bytes to RGB the way Pillow's `convert("RGB")` does, within `limits`.
pub fn decode_rgb_with(bytes: &[u8], limits: &DecodeLimits) -> Result<RgbImage, ImageError> {
    if bytes.is_empty() {
        return Err(ImageError::Empty);
    }
    check_file_bytes(bytes.len() as u64, limits)?;
    let format = sniff_format(bytes).ok_or_else(|| ImageError::UnknownFormat {
        magic: bytes[..bytes.len().min(8)].to_vec(),
    })?;
    let img = match format {
        Format::Jpeg => decode_jpeg(bytes, limits)?,
        Format::Png => decode_png(bytes, limits)?,
        Format::Gif => decode_with_image(bytes, format, limits, GreyDepth::Scale)?,
        Format::Bmp => {
            let padded = bmp_padded(bytes);
            let bytes = padded.as_deref().unwrap_or(bytes);
            match crate::bmp::decode_bmp16(bytes, limits) {
                Some(result) => result?,
                None => decode_with_image(bytes, format, limits, GreyDepth::Scale)?,
            }
        }
        Format::WebP => decode_with_image(bytes, format, limits, GreyDepth::Scale)?,
        // Pillow opens 16-bit grey TIFF as I;16 too.
        Format::Tiff => decode_with_image(bytes, format, limits, GreyDepth::Clip)?,
    };
    if img.width == 0 || img.height == 0 {
        return Err(ImageError::ZeroSize {
            format: format.name(),
            width: img.width,
            height: img.height,
        });
    }
    Ok(img)
}

/// Where the file stops short, from its container structure.
fn shortfall(format: Format, bytes: &[u8]) -> Option<Shortfall> {
    match format {
        Format::Jpeg => jpeg_shortfall(bytes),
        Format::Png => png_shortfall(bytes),
        Format::Gif => gif_shortfall(bytes),
        Format::Bmp => bmp_shortfall(bytes),
        Format::WebP => webp_shortfall(bytes),
        Format::Tiff => tiff_shortfall(bytes),
    }
}

fn truncated(format: Format, bytes: &[u8], fallback: String) -> ImageError {
    ImageError::Truncated {
        format: format.name(),
        reason: shortfall(format, bytes).map_or(fallback, |s| s.to_string()),
    }
}

// ---------------------------------------------------------------------------------------------
// JPEG

/// Owned TurboJPEG decompressor handle; we call the C API directly because the safe wrapper
/// turns libjpeg *warnings* (truncated data, extraneous bytes) into errors, whereas Pillow
/// ignores them and keeps the decoded pixels.
struct TjHandle(raw::tjhandle);

impl TjHandle {
    fn new() -> Result<Self, ImageError> {
        // SAFETY: tj3Init has no preconditions; a null return is handled below.
        let h = unsafe { raw::tj3Init(raw::TJINIT_TJINIT_DECOMPRESS as CInt) };
        if h.is_null() {
            return Err(jpeg_corrupt("cannot initialise libjpeg-turbo".into()));
        }
        Ok(TjHandle(h))
    }

    fn error_string(&self) -> String {
        // SAFETY: handle is valid; tj3GetErrorStr returns a NUL-terminated static/handle buffer.
        unsafe { std::ffi::CStr::from_ptr(raw::tj3GetErrorStr(self.0)) }
            .to_string_lossy()
            .into_owned()
    }

    fn get(&self, param: raw::TJPARAM) -> CInt {
        // SAFETY: valid handle, plain integer query.
        unsafe { raw::tj3Get(self.0, param as CInt) }
    }

    fn is_warning(&self) -> bool {
        // SAFETY: valid handle.
        unsafe { raw::tj3GetErrorCode(self.0) == raw::TJERR_TJERR_WARNING as CInt }
    }
}

impl Drop for TjHandle {
    fn drop(&mut self) {
        // SAFETY: handle came from tj3Init and is destroyed once.
        unsafe { raw::tj3Destroy(self.0) }
    }
}

type CInt = std::os::raw::c_int;

fn jpeg_corrupt(reason: String) -> ImageError {
    ImageError::Corrupt {
        format: "JPEG",
        reason,
    }
}

/// libjpeg's warning when it had to invent an end of file (JWRN_JPEG_EOF).
const LIBJPEG_EOF_WARNING: &str = "Premature end of JPEG file";

/// A JPEG's `(width, height, colorspace)` as libjpeg reads its headers: exactly as lenient as
/// the decoder (stray bytes between markers are skipped with a warning, as Pillow does).
pub(crate) fn jpeg_header(bytes: &[u8]) -> Result<(u32, u32, CInt), ImageError> {
    let tj = TjHandle::new()?;
    jpeg_header_with(&tj, bytes)
}

fn jpeg_header_with(tj: &TjHandle, bytes: &[u8]) -> Result<(u32, u32, CInt), ImageError> {
    // SAFETY: pointer/length describe `bytes`, which outlives the call.
    let rc = unsafe { raw::tj3DecompressHeader(tj.0, bytes.as_ptr(), bytes.len() as raw::size_t) };
    let width = tj.get(raw::TJPARAM_TJPARAM_JPEGWIDTH);
    let height = tj.get(raw::TJPARAM_TJPARAM_JPEGHEIGHT);
    let colorspace = tj.get(raw::TJPARAM_TJPARAM_COLORSPACE);
    if (rc != 0 && !tj.is_warning()) || width <= 0 || height <= 0 {
        let reason = match tj.error_string() {
            r if r.is_empty() || rc == 0 => format!("no frame header (size {width}x{height})"),
            r => r,
        };
        return Err(if jpeg_shortfall(bytes).is_some() {
            truncated(Format::Jpeg, bytes, reason)
        } else {
            jpeg_corrupt(reason)
        });
    }
    Ok((width as u32, height as u32, colorspace))
}

fn decode_jpeg(bytes: &[u8], limits: &DecodeLimits) -> Result<RgbImage, ImageError> {
    let tj = TjHandle::new()?;
    let (width, height, colorspace) = jpeg_header_with(&tj, bytes)?;
    check_pixels(Format::Jpeg, width, height, limits)?;
    // libjpeg pads a cut file with grey rows; Pillow refuses it.
    if let Some(s) = jpeg_shortfall(bytes) {
        return Err(ImageError::Truncated {
            format: "JPEG",
            reason: s.to_string(),
        });
    }
    let (w, h) = (width as usize, height as usize);
    let cmyk =
        colorspace == raw::TJCS_TJCS_CMYK as CInt || colorspace == raw::TJCS_TJCS_YCCK as CInt;
    let (pf, channels) = if cmyk {
        (raw::TJPF_TJPF_CMYK, 4)
    } else {
        // Grey JPEGs are expanded to RGB by libjpeg itself (L replicated, as Pillow's convert).
        (raw::TJPF_TJPF_RGB, 3)
    };
    let npix = w
        .checked_mul(h)
        .and_then(|n| n.checked_mul(channels))
        .ok_or_else(|| jpeg_corrupt(format!("image too large: {w}x{h}")))?;
    let mut buf = vec![0u8; npix];
    // SAFETY: `buf` holds exactly pitch*height bytes for the requested pixel format.
    let rc = unsafe {
        raw::tj3Decompress8(
            tj.0,
            bytes.as_ptr(),
            bytes.len() as raw::size_t,
            buf.as_mut_ptr(),
            (w * channels) as CInt,
            pf as CInt,
        )
    };
    if rc != 0 {
        let message = tj.error_string();
        if message.starts_with(LIBJPEG_EOF_WARNING) {
            return Err(ImageError::Truncated {
                format: "JPEG",
                reason: format!("libjpeg: {message}"),
            });
        }
        // Other warnings (extraneous bytes, corrupt entropy data) leave the image Pillow
        // also decodes, since Pillow ignores libjpeg warnings; only hard errors fail.
        if !tj.is_warning() {
            return Err(jpeg_corrupt(message));
        }
    }
    let data = if cmyk { cmyk_to_rgb(&buf) } else { buf };
    Ok(RgbImage {
        width: w as u32,
        height: h as u32,
        data,
    })
}

/// Pillow reads every CMYK JPEG with raw mode `CMYK;I` (Adobe-inverted), then `cmyk2rgb`:
/// `nk = 255 - k; out = nk - MULDIV255(c, nk)` per channel.
fn cmyk_to_rgb(cmyk: &[u8]) -> Vec<u8> {
    #[inline]
    fn muldiv255(a: i32, b: i32) -> i32 {
        let t = a * b + 128;
        ((t >> 8) + t) >> 8
    }
    let mut out = Vec::with_capacity(cmyk.len() / 4 * 3);
    for px in cmyk.chunks_exact(4) {
        let nk = i32::from(px[3]); // inverted K: 255 - (255 - raw)
        for &c in &px[..3] {
            let c = 255 - i32::from(c);
            out.push((nk - muldiv255(c, nk)).clamp(0, 255) as u8);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Other formats through `image`

/// How a 16-bit grey channel becomes 8 bits: Pillow opens 16-bit grey PNG/TIFF as `I;16`,
/// whose `convert("RGB")` clips values to 255 instead of scaling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum GreyDepth {
    Clip,
    Scale,
}

fn decode_png(bytes: &[u8], limits: &DecodeLimits) -> Result<RgbImage, ImageError> {
    // IHDR is always the first chunk: bit depth at byte 24, colour type at byte 25.
    let grey16 = bytes.len() > 25 && bytes[24] == 16 && (bytes[25] == 0 || bytes[25] == 4);
    // Pillow: colour type 0 (grey) at 16 bits is I;16 (clip); grey+alpha at 16 bits is
    // LA;16B (high byte).
    let depth = if grey16 && bytes[25] == 0 {
        GreyDepth::Clip
    } else {
        GreyDepth::Scale
    };
    let Some(fixed) = png_repaired(bytes) else {
        return decode_with_image(bytes, Format::Png, limits, depth);
    };
    // A cut file: accepted only if every row still decodes, as in Pillow.
    match decode_with_image(&fixed, Format::Png, limits, depth) {
        Ok(img) => Ok(img),
        Err(e @ (ImageError::TooLarge { .. } | ImageError::FileTooLarge { .. })) => Err(e),
        Err(e) => Err(truncated(Format::Png, bytes, e.to_string())),
    }
}

fn image_error(format: Format, bytes: &[u8], e: image::ImageError) -> ImageError {
    let reason = e.to_string();
    let truncated = match &e {
        image::ImageError::IoError(io) => io.kind() == std::io::ErrorKind::UnexpectedEof,
        _ => {
            let r = reason.to_ascii_lowercase();
            r.contains("eof") || r.contains("end of file") || r.contains("truncat")
        }
    };
    if truncated {
        self::truncated(format, bytes, reason)
    } else {
        ImageError::Corrupt {
            format: format.name(),
            reason,
        }
    }
}

pub(crate) fn image_format(format: Format) -> ImageFormat {
    match format {
        Format::Jpeg => ImageFormat::Jpeg,
        Format::Png => ImageFormat::Png,
        Format::Gif => ImageFormat::Gif,
        Format::Bmp => ImageFormat::Bmp,
        Format::WebP => ImageFormat::WebP,
        Format::Tiff => ImageFormat::Tiff,
    }
}

/// An `image` reader for `bytes`, after the checks `image` itself lacks.
pub(crate) fn image_reader(
    format: Format,
    bytes: &[u8],
) -> Result<image::ImageReader<Cursor<&[u8]>>, ImageError> {
    if format == Format::Tiff {
        crate::tiff_guard::check_first_ifd(bytes).map_err(|reason| ImageError::Corrupt {
            format: format.name(),
            reason,
        })?;
    }
    Ok(image::ImageReader::with_format(
        Cursor::new(bytes),
        image_format(format),
    ))
}

/// `image`'s limits for one decode: no size cap of its own (ours is checked from the header),
/// but no allocation beyond what the largest allowed image needs.
pub(crate) fn image_limits(limits: &DecodeLimits) -> image::Limits {
    let mut l = image::Limits::no_limits();
    l.max_alloc = Some(limits.max_alloc_bytes());
    l
}

fn decode_with_image(
    bytes: &[u8],
    format: Format,
    limits: &DecodeLimits,
    grey16: GreyDepth,
) -> Result<RgbImage, ImageError> {
    if let Some(s) = shortfall(format, bytes) {
        return Err(ImageError::Truncated {
            format: format.name(),
            reason: s.to_string(),
        });
    }
    let mut reader = image_reader(format, bytes)?;
    reader.limits(image_limits(limits));
    let decoder = reader
        .into_decoder()
        .map_err(|e| image_error(format, bytes, e))?;
    let (width, height) = decoder.dimensions();
    check_pixels(format, width, height, limits)?;
    let dynimg = DynamicImage::from_decoder(decoder).map_err(|e| image_error(format, bytes, e))?;
    Ok(dynamic_to_rgb(dynimg, grey16))
}

/// Pillow's `convert("RGB")` for each pixel layout `image` can produce. 16-bit colour and
/// grey+alpha channels keep the high byte (Pillow's `;16B` raw modes).
fn dynamic_to_rgb(img: DynamicImage, grey16: GreyDepth) -> RgbImage {
    let (width, height) = (img.width(), img.height());
    let data = match img {
        DynamicImage::ImageRgb8(b) => b.into_raw(),
        DynamicImage::ImageRgba8(b) => b
            .as_raw()
            .chunks_exact(4)
            .flat_map(|p| [p[0], p[1], p[2]])
            .collect(),
        DynamicImage::ImageLuma8(b) => b.as_raw().iter().flat_map(|&v| [v, v, v]).collect(),
        DynamicImage::ImageLumaA8(b) => b
            .as_raw()
            .chunks_exact(2)
            .flat_map(|p| [p[0], p[0], p[0]])
            .collect(),
        DynamicImage::ImageLuma16(b) => b
            .as_raw()
            .iter()
            .map(|&v| grey16_to_u8(v, grey16))
            .flat_map(|v| [v, v, v])
            .collect(),
        DynamicImage::ImageLumaA16(b) => b
            .as_raw()
            .chunks_exact(2)
            .map(|p| grey16_to_u8(p[0], grey16))
            .flat_map(|v| [v, v, v])
            .collect(),
        DynamicImage::ImageRgb16(b) => b.as_raw().iter().map(|&v| (v >> 8) as u8).collect(),
        DynamicImage::ImageRgba16(b) => b
            .as_raw()
            .chunks_exact(4)
            .flat_map(|p| [(p[0] >> 8) as u8, (p[1] >> 8) as u8, (p[2] >> 8) as u8])
            .collect(),
        // Float images (TIFF/EXR) have no Pillow RGB equivalent worth matching; clamp.
        other => other.to_rgb8().into_raw(),
    };
    RgbImage {
        width,
        height,
        data,
    }
}

#[inline]
fn grey16_to_u8(v: u16, mode: GreyDepth) -> u8 {
    match mode {
        GreyDepth::Clip => v.min(255) as u8,
        GreyDepth::Scale => (v >> 8) as u8,
    }
}
