//! `inspect`'s summary and `--sample` on a build in an object store (`s3://…`): each shard's
//! footer and only the column chunks a reader asks for are fetched (ranged GETs, the object's
//! size and ETag checked), written at their offsets into a sparse temporary file. The polars
//! and Parquet readers then open that file as they open a local shard; the other bytes (the
//! tiles) are never fetched and take no disk.

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;

use llava_formats::manifest::ShardInfo;
use llava_storage::Location;
use parquet::file::metadata::{ParquetMetaData, ParquetMetaDataReader};

use super::InspectError;

/// Which byte ranges of a shard a reader needs, given its footer.
pub type Want<'a> = &'a dyn Fn(&ParquetMetaData) -> Vec<Range<u64>>;

/// The column chunks of `columns` (top-level names) in `row_groups` (all when `None`).
pub fn column_chunks(
    meta: &ParquetMetaData,
    columns: Option<&[&str]>,
    row_groups: Option<&[usize]>,
) -> Vec<Range<u64>> {
    let schema = meta.file_metadata().schema_descr();
    let mut out = Vec::new();
    for (g, rg) in meta.row_groups().iter().enumerate() {
        if row_groups.is_some_and(|keep| !keep.contains(&g)) {
            continue;
        }
        for (i, chunk) in rg.columns().iter().enumerate() {
            let root = schema.get_column_root(i).name();
            if columns.is_none_or(|names| names.contains(&root)) {
                let (start, len) = chunk.byte_range();
                out.push(start..start + len);
            }
        }
    }
    out
}

/// A sparse local copy of shard `shard` of `location` holding its footer and the ranges `want`
/// picks.
pub fn sparse_copy(
    location: &Location,
    shard: &ShardInfo,
    want: Want,
) -> Result<File, InspectError> {
    let key = shard.file.as_str();
    let storage = |e: llava_storage::StorageError| InspectError::Storage(e.to_string());
    let info = location.check(key, shard.bytes).map_err(storage)?;
    let size = shard.bytes;
    let corrupt =
        |detail: String| InspectError::Storage(format!("{}: {detail}", location.object_url(key)));
    let tail = size.min(64 << 10);
    let mut footer = location
        .read_range(key, size - tail..size, Some(&info))
        .map_err(storage)?;
    let n = footer.len();
    if n < 8 || &footer[n - 4..] != b"PAR1" {
        return Err(corrupt("not a Parquet file (no PAR1 footer)".into()));
    }
    let meta_len = u64::from(u32::from_le_bytes([
        footer[n - 8],
        footer[n - 7],
        footer[n - 6],
        footer[n - 5],
    ]));
    if meta_len + 8 > size {
        return Err(corrupt(format!(
            "a {meta_len}-byte footer in a {size}-byte file"
        )));
    }
    if meta_len + 8 > tail {
        footer = location
            .read_range(key, size - meta_len - 8..size, Some(&info))
            .map_err(storage)?;
    }
    let n = footer.len();
    let meta = ParquetMetaDataReader::decode_metadata(&footer[n - 8 - meta_len as usize..n - 8])
        .map_err(|e| corrupt(format!("footer: {e}")))?;
    let temp_err = |e: std::io::Error| {
        InspectError::Storage(format!(
            "a temporary file for {}: {e}",
            location.object_url(key)
        ))
    };
    let file = unlinked_temp_file().map_err(temp_err)?;
    file.set_len(size).map_err(temp_err)?;
    file.write_all_at(&footer, size - n as u64)
        .map_err(temp_err)?;
    // Neighbouring chunks (the columns of one row group) go as one request.
    let mut ranges = want(&meta);
    ranges.sort_by_key(|r| r.start);
    let mut merged: Vec<Range<u64>> = Vec::new();
    for r in ranges {
        match merged.last_mut() {
            Some(last) if r.start <= last.end + (256 << 10) => last.end = last.end.max(r.end),
            _ => merged.push(r),
        }
    }
    for r in merged {
        if r.end > size {
            return Err(corrupt(format!(
                "a column chunk ends at {} of {size} bytes",
                r.end
            )));
        }
        let bytes = location
            .read_range(key, r.clone(), Some(&info))
            .map_err(storage)?;
        file.write_all_at(&bytes, r.start).map_err(temp_err)?;
    }
    Ok(file)
}

/// A read-write file in the temporary folder, already unlinked: it goes when closed.
fn unlinked_temp_file() -> std::io::Result<File> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("llava-inspect-{}-{n}", std::process::id()));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)?;
    std::fs::remove_file(&path)?;
    Ok(file)
}
