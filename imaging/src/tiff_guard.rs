//! A TIFF directory entry declares how many values it has; the `tiff` crate allocates for that
//! count when it reads the first directory, before any limit applies (fuzzing found a 500-byte
//! file making it allocate 266 MB). A value array cannot be larger than the file that stores it,
//! so such a directory is refused before the crate sees it.

/// Checks the first image directory's entries against the file size.
pub(crate) fn check_first_ifd(b: &[u8]) -> Result<(), String> {
    if b.len() < 8 {
        return Ok(()); // too short: the decoder reports it
    }
    let le = b[0] == b'I';
    let u16_at = |o: usize| -> Option<u64> {
        let s = b.get(o..o + 2)?;
        let a = [s[0], s[1]];
        Some(u64::from(if le {
            u16::from_le_bytes(a)
        } else {
            u16::from_be_bytes(a)
        }))
    };
    let u32_at = |o: usize| -> Option<u64> {
        let s = b.get(o..o + 4)?;
        let a = [s[0], s[1], s[2], s[3]];
        Some(u64::from(if le {
            u32::from_le_bytes(a)
        } else {
            u32::from_be_bytes(a)
        }))
    };
    let Some(ifd) = u32_at(4) else { return Ok(()) };
    let ifd = ifd as usize;
    let Some(count) = u16_at(ifd) else {
        return Ok(());
    };
    for k in 0..count as usize {
        let e = ifd + 2 + 12 * k;
        let (Some(tag), Some(typ), Some(n)) = (u16_at(e), u16_at(e + 2), u32_at(e + 4)) else {
            return Ok(()); // a cut directory: the decoder reports it
        };
        // Bytes per value of the TIFF field types (unknown types are skipped by decoders).
        let size = match typ {
            1 | 2 | 6 | 7 => 1,
            3 | 8 => 2,
            4 | 9 | 11 | 13 => 4,
            5 | 10 | 12 | 16 | 17 | 18 => 8,
            _ => continue,
        };
        let bytes = n.saturating_mul(size);
        if bytes > b.len() as u64 {
            return Err(format!(
                "directory entry for tag {tag} declares {n} values ({bytes} bytes), more than the \
                 file's {} bytes",
                b.len()
            ));
        }
    }
    Ok(())
}
