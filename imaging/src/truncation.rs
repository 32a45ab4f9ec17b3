//! Is an encoded file complete? Pillow (without `LOAD_TRUNCATED_IMAGES`) refuses a file whose
//! pixel data ends early, in every format; libjpeg-turbo instead pads a cut JPEG with grey rows
//! and only warns. These walks over the container structure find where a file stops short and
//! how much is missing, as far as the structure tells, without decoding pixels.

/// Where a file stops short.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shortfall {
    /// Bytes the file has.
    pub have: u64,
    /// Bytes the structure still needed at the point where the file ends (a lower bound).
    pub missing_at_least: u64,
    /// Pixel rows that cannot be decoded, where the format tells.
    pub missing_rows: Option<u64>,
    /// What was being read when the data ended.
    pub context: String,
}

impl std::fmt::Display for Shortfall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "file ends after {} bytes {}; at least {} more byte(s) needed",
            self.have, self.context, self.missing_at_least
        )?;
        if let Some(rows) = self.missing_rows {
            write!(f, ", {rows} pixel row(s) missing")?;
        }
        Ok(())
    }
}

fn short(have: usize, missing: usize, context: String) -> Option<Shortfall> {
    Some(Shortfall {
        have: have as u64,
        missing_at_least: missing.max(1) as u64,
        missing_rows: None,
        context,
    })
}

/// JPEG: follows the markers the way libjpeg's `next_marker` does (stray bytes before a marker
/// and `0xFF` fill bytes are skipped, as libjpeg does with a warning) through every scan's
/// entropy-coded data up to the end-of-image marker. A file without EOI is truncated: libjpeg
/// would pad the missing data.
pub fn jpeg_shortfall(b: &[u8]) -> Option<Shortfall> {
    let n = b.len();
    let mut i = 2; // after SOI
    let mut scans = 0usize;
    loop {
        while i < n && b[i] != 0xFF {
            i += 1;
        }
        while i < n && b[i] == 0xFF {
            i += 1;
        }
        if i >= n {
            let where_ = if scans == 0 {
                "before the first scan".to_string()
            } else {
                format!("after scan {scans}, without an end-of-image marker")
            };
            return short(n, 2, where_);
        }
        let marker = b[i];
        i += 1;
        match marker {
            0xD9 => return None,
            // Standalone markers (and a stuffed zero outside a scan, which libjpeg skips).
            0x00 | 0x01 | 0xD0..=0xD8 => continue,
            _ => {}
        }
        if i + 2 > n {
            return short(
                n,
                i + 2 - n + 2,
                format!("in the length of marker 0x{marker:02X}"),
            );
        }
        let len = usize::from(u16::from_be_bytes([b[i], b[i + 1]]));
        if len < 2 {
            return None; // corrupt, not short: the decoder reports it
        }
        let end = i + len;
        if end > n {
            return short(
                n,
                end - n + 2,
                format!("inside marker segment 0x{marker:02X} ({len} bytes)"),
            );
        }
        i = end;
        if marker == 0xDA {
            scans += 1;
            // Entropy-coded data runs to the next 0xFF not followed by a stuffed 0 or RSTn.
            loop {
                match b[i..].iter().position(|&x| x == 0xFF) {
                    None => {
                        return short(
                            n,
                            2,
                            format!("inside the entropy-coded data of scan {scans}"),
                        )
                    }
                    Some(p) => i += p,
                }
                let mut j = i + 1;
                while j < n && b[j] == 0xFF {
                    j += 1;
                }
                if j >= n {
                    return short(
                        n,
                        2,
                        format!("inside the entropy-coded data of scan {scans}"),
                    );
                }
                if b[j] == 0x00 || (0xD0..=0xD7).contains(&b[j]) {
                    i = j + 1;
                } else {
                    break; // a marker: handled by the outer loop
                }
            }
        }
    }
}

/// PNG: walks the chunks. Before the image data ends, a chunk that runs past the end of the
/// file is missing the rest of its bytes plus the 12-byte IEND. After it, Pillow stops at a cut
/// chunk header or IEND, but still reads the data of other chunks (text, EXIF) in full.
pub fn png_shortfall(b: &[u8]) -> Option<Shortfall> {
    let n = b.len();
    let mut i = 8;
    let mut idat = false;
    let mut after_idat = false;
    loop {
        if i + 8 > n {
            if idat {
                return None; // whether the image data is complete, the decoder tells
            }
            return short(n, i + 8 - n + 4, "in a chunk header".to_string());
        }
        let len = u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]) as usize;
        let kind = &b[i + 4..i + 8];
        let name = String::from_utf8_lossy(kind).into_owned();
        if kind == b"IEND" {
            return None;
        }
        if kind == b"IDAT" {
            idat = true;
        } else if idat {
            after_idat = true;
        }
        let end = i.saturating_add(12).saturating_add(len);
        if end > n {
            // The CRC of the last chunk is not needed by Pillow once the image data is read.
            if after_idat && i + 8 + len <= n {
                return None;
            }
            return short(
                n,
                end - n + 12,
                format!("inside chunk {name} ({len} data bytes)"),
            );
        }
        i = end;
    }
}

/// A cut PNG made well-formed again, for decoders that insist on whole chunks: the complete
/// chunks, the data a cut IDAT still has (in a chunk with its own length and CRC), and an IEND.
/// Pillow reads a PNG as long as the decoder gets every row, whatever follows (the zlib checksum,
/// CRCs, IEND); decoding this copy tells whether it does. `None` when the file is whole.
pub fn png_repaired(b: &[u8]) -> Option<Vec<u8>> {
    const IEND: [u8; 12] = [0, 0, 0, 0, b'I', b'E', b'N', b'D', 0xAE, 0x42, 0x60, 0x82];
    let n = b.len();
    let mut i = 8.min(n);
    let mut tail = Vec::new();
    while i + 8 <= n {
        let len = u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]) as usize;
        let end = i.saturating_add(12).saturating_add(len);
        if &b[i + 4..i + 8] == b"IEND" && end <= n {
            return None;
        }
        if end > n {
            if &b[i + 4..i + 8] == b"IDAT" {
                let data = &b[i + 8..n.min(i + 8 + len)];
                tail.extend_from_slice(&(data.len() as u32).to_be_bytes());
                tail.extend_from_slice(b"IDAT");
                tail.extend_from_slice(data);
                tail.extend_from_slice(&crc32(&[&b"IDAT"[..], data].concat()).to_be_bytes());
            }
            break;
        }
        i = end;
    }
    let mut fixed = b[..i.min(n)].to_vec();
    fixed.extend_from_slice(&tail);
    fixed.extend_from_slice(&IEND);
    Some(fixed)
}

/// PNG's CRC-32 (ISO 3309).
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in bytes {
        crc ^= u32::from(byte);
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

/// WebP: the RIFF header declares the file size; libwebp's demuxer refuses anything shorter.
pub fn webp_shortfall(b: &[u8]) -> Option<Shortfall> {
    let n = b.len();
    if n < 8 {
        return short(n, 12 - n, "in the RIFF header".to_string());
    }
    let declared = u32::from_le_bytes([b[4], b[5], b[6], b[7]]) as usize;
    let want = declared.saturating_add(8);
    if want <= n {
        return None;
    }
    short(
        n,
        want - n,
        format!("of the {want} its RIFF header declares"),
    )
}

/// GIF: walks the blocks up to the end of the first image's data (all Pillow decodes for
/// `convert`); later frames may be cut.
pub fn gif_shortfall(b: &[u8]) -> Option<Shortfall> {
    let n = b.len();
    if n < 13 {
        return short(n, 13 - n, "in the logical screen descriptor".into());
    }
    let mut i = 13;
    if b[10] & 0x80 != 0 {
        i += 3 << ((b[10] & 7) + 1);
    }
    // Sub-blocks: length byte, data, until a zero length.
    let sub_blocks = |mut i: usize, what: &str| -> Result<usize, Option<Shortfall>> {
        loop {
            if i >= n {
                return Err(short(n, 2, format!("inside the {what}")));
            }
            let len = usize::from(b[i]);
            if len == 0 {
                return Ok(i + 1);
            }
            if i + 1 + len > n {
                return Err(short(n, i + 1 + len - n + 2, format!("inside the {what}")));
            }
            i += 1 + len;
        }
    };
    loop {
        if i >= n {
            return short(n, 1, "before the first image".into());
        }
        match b[i] {
            0x21 => {
                if i + 2 > n {
                    return short(n, 3, "in an extension".into());
                }
                i = match sub_blocks(i + 2, "extension") {
                    Ok(j) => j,
                    Err(s) => return s,
                };
            }
            0x2C => {
                if i + 10 > n {
                    return short(n, i + 10 - n, "in the image descriptor".into());
                }
                let flags = b[i + 9];
                i += 10;
                if flags & 0x80 != 0 {
                    let table = 3usize << ((flags & 7) + 1);
                    if i + table > n {
                        return short(n, i + table - n, "in the local colour table".into());
                    }
                    i += table;
                }
                // LZW minimum code size, then the image data.
                return match sub_blocks(i + 1, "image data of the first frame") {
                    Ok(_) => None,
                    Err(s) => s,
                };
            }
            // Trailer or garbage before any image: not a shortfall, the decoder reports it.
            _ => return None,
        }
    }
}

/// Layout of an uncompressed (or bit-field) BMP's pixel array: `(offset, stride, rows,
/// last_row_bytes)`; `None` for compressed or unparseable headers.
fn bmp_layout(b: &[u8]) -> Option<(u64, u64, u64, u64)> {
    if b.len() < 34 {
        return None;
    }
    let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    let offset = u64::from(u32_at(10));
    let (width, height, bpp, compression) = if u32_at(14) == 12 {
        // OS/2 BITMAPCOREHEADER: 16-bit sizes, no compression.
        let w = i64::from(u16::from_le_bytes([b[18], b[19]]));
        let h = i64::from(u16::from_le_bytes([b[20], b[21]]));
        (w, h, u16::from_le_bytes([b[24], b[25]]), 0)
    } else {
        let w = i64::from(u32_at(18) as i32);
        let h = i64::from(u32_at(22) as i32);
        (w, h, u16::from_le_bytes([b[28], b[29]]), u32_at(30))
    };
    // Only uncompressed and bit-field layouts have a fixed size.
    if !(compression == 0 || compression == 3 || compression == 6) || width <= 0 || bpp == 0 {
        return None;
    }
    let bits = width as u64 * u64::from(bpp);
    Some((
        offset,
        bits.div_ceil(32) * 4,
        height.unsigned_abs(),
        bits.div_ceil(8),
    ))
}

/// BMP (uncompressed): the pixel array starts at the header's offset and holds `|height|` rows
/// padded to 4 bytes; Pillow reads the last row without its padding.
pub fn bmp_shortfall(b: &[u8]) -> Option<Shortfall> {
    let n = b.len();
    if n < 34 {
        return short(n, 34 - n, "in the file header".into());
    }
    let (offset, stride, rows, last_row) = bmp_layout(b)?;
    let want = offset
        .saturating_add(stride.saturating_mul(rows.saturating_sub(1)))
        .saturating_add(last_row);
    if want <= n as u64 {
        return None;
    }
    let missing = want - n as u64;
    Some(Shortfall {
        have: n as u64,
        missing_at_least: missing,
        missing_rows: Some(missing.div_ceil(stride).min(rows)),
        context: format!(
            "inside the pixel array ({rows} rows of {stride} bytes from byte {offset})"
        ),
    })
}

/// A BMP whose last row lacks only its padding, padded again (Pillow reads it; `image` wants
/// the whole row). `None` when nothing is missing.
pub fn bmp_padded(b: &[u8]) -> Option<Vec<u8>> {
    let (offset, stride, rows, _) = bmp_layout(b)?;
    let full = offset.saturating_add(stride.saturating_mul(rows));
    let n = b.len() as u64;
    if n >= full || bmp_shortfall(b).is_some() || full - n >= 4 {
        return None;
    }
    let mut padded = b.to_vec();
    padded.resize(full as usize, 0);
    Some(padded)
}

/// TIFF: the strips or tiles of the first image must lie inside the file.
pub fn tiff_shortfall(b: &[u8]) -> Option<Shortfall> {
    let n = b.len();
    if n < 8 {
        return short(n, 8 - n, "in the TIFF header".into());
    }
    let le = b[0] == b'I';
    let u16_at = |o: usize| -> Option<u32> {
        let s = b.get(o..o + 2)?;
        Some(u32::from(if le {
            u16::from_le_bytes([s[0], s[1]])
        } else {
            u16::from_be_bytes([s[0], s[1]])
        }))
    };
    let u32_at = |o: usize| -> Option<u32> {
        let s = b.get(o..o + 4)?;
        let a = [s[0], s[1], s[2], s[3]];
        Some(if le {
            u32::from_le_bytes(a)
        } else {
            u32::from_be_bytes(a)
        })
    };
    let ifd = u32_at(4)? as usize;
    let Some(count) = u16_at(ifd) else {
        return short(
            n,
            ifd + 2 - n.min(ifd + 2),
            "before the first directory".into(),
        );
    };
    let count = count as usize;
    if ifd + 2 + count * 12 > n {
        return short(
            n,
            ifd + 2 + count * 12 - n,
            "inside the first directory".into(),
        );
    }
    // Values of a SHORT or LONG array entry (inline when it fits in 4 bytes).
    let values = |e: usize| -> Option<Vec<u64>> {
        let typ = u16_at(e + 2)?;
        let cnt = u32_at(e + 4)? as usize;
        let size = match typ {
            3 => 2,
            4 => 4,
            _ => return None,
        };
        let at = if size * cnt <= 4 {
            e + 8
        } else {
            u32_at(e + 8)? as usize
        };
        (0..cnt.min(1 << 20))
            .map(|k| {
                if size == 2 {
                    u16_at(at + 2 * k).map(u64::from)
                } else {
                    u32_at(at + 4 * k).map(u64::from)
                }
            })
            .collect()
    };
    let (mut offsets, mut counts) = (None, None);
    for k in 0..count {
        let e = ifd + 2 + k * 12;
        match u16_at(e)? {
            273 | 324 => offsets = values(e),
            279 | 325 => counts = values(e),
            _ => {}
        }
    }
    let (offsets, counts) = (offsets?, counts?);
    let want = offsets
        .iter()
        .zip(&counts)
        .map(|(o, c)| o.saturating_add(*c))
        .max()?;
    (want > n as u64).then(|| Shortfall {
        have: n as u64,
        missing_at_least: want - n as u64,
        missing_rows: None,
        context: format!(
            "inside the image data ({} strips/tiles ending at byte {want})",
            offsets.len()
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jpeg_walk_skips_stray_bytes_and_finds_eoi() {
        // SOI, APP0 (len 4), 3 stray bytes, SOS (len 3) + data with stuffing and RST, EOI.
        let ok = [
            0xFF, 0xD8, 0xFF, 0xE0, 0, 4, 1, 2, 9, 9, 9, 0xFF, 0xDA, 0, 3, 0, 5, 0xFF, 0, 6, 0xFF,
            0xD0, 7, 0xFF, 0xD9,
        ];
        assert_eq!(jpeg_shortfall(&ok), None);
        let cut = &ok[..ok.len() - 2];
        let s = jpeg_shortfall(cut).unwrap();
        assert!(s.context.contains("scan 1"), "{s}");
        let cut = &ok[..5];
        assert!(jpeg_shortfall(cut).unwrap().context.contains("0xE0"));
    }

    #[test]
    fn webp_missing_bytes_from_riff_size() {
        let mut b = b"RIFF\x20\0\0\0WEBPVP8L".to_vec();
        b.resize(30, 0);
        assert_eq!(webp_shortfall(&b).unwrap().missing_at_least, 10);
        b.resize(40, 0);
        assert_eq!(webp_shortfall(&b), None);
    }
}
