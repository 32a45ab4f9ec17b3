//! Reading one planned batch: one contiguous read of its row group(s), then Parquet decoding from
//! memory of the planned rows only, then checks that the rows are the ones the plan expects and
//! that each row's bytes match its stored checksum (before any tile decoding).

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::ops::Range;
use std::sync::Arc;

use bytes::{Buf, Bytes};
use llava_formats::constants::IMAGE_TOKEN_INDEX;
use llava_formats::schema::{batch_checksums, batch_to_rows, shard_row_checksum, ShardRow};
use llava_formats::tile_codec::{self, TileEncoding};
use parquet::arrow::arrow_reader::{ParquetRecordBatchReaderBuilder, RowSelection, RowSelector};
use parquet::errors::ParquetError;
use parquet::file::reader::{ChunkReader, Length};

use super::error::{CorruptRow, DataError, DataResult};
use super::index::ShardIndex;
use super::plan::PlannedBatch;
use super::workers::OnCorrupt;

/// The plan's parts cut where the shard changes or a row group is skipped (ranges of
/// `plan.parts`): a batch-wise plan is one segment, a row packed across batches may be several.
fn segments(index: &ShardIndex, plan: &PlannedBatch) -> Vec<Range<usize>> {
    let mut out: Vec<Range<usize>> = Vec::new();
    for (i, p) in plan.parts.iter().enumerate() {
        let b = &index.batches[p.batch];
        let joins = i > 0 && {
            let prev = &index.batches[plan.parts[i - 1].batch];
            prev.shard == b.shard
                && (prev.row_group == b.row_group || prev.row_group + 1 == b.row_group)
        };
        match out.last_mut() {
            Some(seg) if joins => seg.end = i + 1,
            _ => out.push(i..i + 1),
        }
    }
    out
}

/// A byte range of a file held in memory, served to the Parquet decoder at file offsets.
struct RangeReader {
    offset: u64,
    data: Bytes,
    file_len: u64,
}

impl Length for RangeReader {
    fn len(&self) -> u64 {
        self.file_len
    }
}

impl RangeReader {
    fn local(&self, start: u64, len: usize) -> parquet::errors::Result<usize> {
        let end = start + len as u64;
        if start < self.offset || end > self.offset + self.data.len() as u64 {
            return Err(ParquetError::General(format!(
                "read of {start}..{end} outside the row group bytes {}..{}",
                self.offset,
                self.offset + self.data.len() as u64
            )));
        }
        Ok((start - self.offset) as usize)
    }
}

impl ChunkReader for RangeReader {
    type T = bytes::buf::Reader<Bytes>;

    fn get_read(&self, start: u64) -> parquet::errors::Result<Self::T> {
        let at = self.local(start, 0)?;
        Ok(self.data.slice(at..).reader())
    }

    fn get_bytes(&self, start: u64, length: usize) -> parquet::errors::Result<Bytes> {
        let at = self.local(start, length)?;
        Ok(self.data.slice(at..at + length))
    }
}

/// The rows of one planned batch, as read.
pub(crate) struct ReadRows {
    /// Plan order, without the skipped rows.
    pub rows: Vec<ShardRow>,
    /// Shard bytes read.
    pub bytes: u64,
    /// With [`OnCorrupt::Skip`]: the rows left out (position in `plan.samples`, where and why).
    pub skipped: Vec<(usize, CorruptRow)>,
}

/// One worker's reader: keeps each shard file open for reuse.
pub(crate) struct ShardReader {
    index: Arc<ShardIndex>,
    files: HashMap<usize, File>,
}

impl ShardReader {
    pub fn new(index: Arc<ShardIndex>) -> Self {
        Self {
            index,
            files: HashMap::new(),
        }
    }

    /// The rows of `plan`, in plan order, and the bytes read: one contiguous read of the row
    /// group(s) holding the planned batches, then only the planned rows are decoded (a row
    /// selection skips the other batches of those row groups). A row whose checksum does not
    /// match fails the read, or with [`OnCorrupt::Skip`] is left out and listed.
    pub fn read(&mut self, plan: &PlannedBatch, on_corrupt: OnCorrupt) -> DataResult<ReadRows> {
        let segments = segments(&self.index, plan);
        if segments.len() <= 1 {
            return self.read_segment(plan, on_corrupt);
        }
        // A row packed across batches: one read per run of consecutive row groups of one shard.
        let mut out = ReadRows {
            rows: Vec::with_capacity(plan.samples.len()),
            bytes: 0,
            skipped: Vec::new(),
        };
        let mut first_sample = 0;
        for parts in segments {
            let samples: usize = plan.parts[parts.clone()].iter().map(|p| p.rows.len()).sum();
            let sub = PlannedBatch {
                parts: plan.parts[parts].to_vec(),
                samples: plan.samples[first_sample..first_sample + samples].to_vec(),
                rows: Vec::new(),
                ..plan.clone()
            };
            let read = self.read_segment(&sub, on_corrupt)?;
            out.rows.extend(read.rows);
            out.bytes += read.bytes;
            out.skipped.extend(
                read.skipped
                    .into_iter()
                    .map(|(pos, bad)| (first_sample + pos, bad)),
            );
            first_sample += samples;
        }
        Ok(out)
    }

    /// [`ShardReader::read`] of parts that are consecutive row groups of one shard.
    fn read_segment(&mut self, plan: &PlannedBatch, on_corrupt: OnCorrupt) -> DataResult<ReadRows> {
        let index = self.index.clone();
        let Some(first) = plan.parts.first() else {
            return Ok(ReadRows {
                rows: Vec::new(),
                bytes: 0,
                skipped: Vec::new(),
            });
        };
        let shard_id = index.batches[first.batch].shard;
        let shard = &index.shards[shard_id];
        let path = &shard.path;
        let first_rg = index.batches[first.batch].row_group;
        let corrupt = |row_group: usize, detail: String| DataError::Corrupt {
            path: path.clone(),
            row_group: Some(row_group),
            detail,
        };
        if plan
            .parts
            .iter()
            .any(|p| index.batches[p.batch].shard != shard_id)
        {
            return Err(DataError::Plan("a batch spans two shards".into()));
        }
        // Row groups in file order (a batch's parts are consecutive built batches, so their row
        // groups are consecutive too), and the wanted rows of each, in row order.
        let mut rg_numbers: Vec<usize> = Vec::new();
        let mut wanted: Vec<(usize, Range<usize>)> = Vec::new();
        for p in &plan.parts {
            let b = &index.batches[p.batch];
            if b.rows.start + p.rows.end > b.rows.end {
                return Err(DataError::Plan(format!(
                    "rows {:?} outside batch {} of {} rows",
                    p.rows,
                    p.batch,
                    b.rows.len()
                )));
            }
            if rg_numbers.last() != Some(&b.row_group) {
                if rg_numbers
                    .last()
                    .is_some_and(|&last| last + 1 != b.row_group)
                {
                    return Err(DataError::Plan(
                        "a batch's row groups are not consecutive".into(),
                    ));
                }
                rg_numbers.push(b.row_group);
            }
            wanted.push((
                b.row_group,
                b.rows.start + p.rows.start..b.rows.start + p.rows.end,
            ));
        }

        // Consecutive row groups: their column chunks are one byte range.
        let meta = shard.metadata.metadata();
        let (mut lo, mut hi) = (u64::MAX, 0u64);
        for &rg in &rg_numbers {
            for c in meta.row_group(rg).columns() {
                let start = c.dictionary_page_offset().unwrap_or(c.data_page_offset());
                let len = c.compressed_size();
                if start < 0 || len < 0 {
                    return Err(corrupt(rg, "negative column chunk offset".into()));
                }
                lo = lo.min(start as u64);
                hi = hi.max(start as u64 + len as u64);
            }
        }
        // An object store (`--shards s3://…`) serves the same range (`super::source`).
        let data = if let Some(remote) = &index.remote {
            remote.read_range(&shard.info.file, lo..hi)?
        } else {
            let file = match self.files.entry(shard_id) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(File::open(path).map_err(|source| DataError::MissingShard {
                        path: path.clone(),
                        source,
                    })?)
                }
            };
            let mut buf = vec![0u8; (hi - lo) as usize];
            file.seek(SeekFrom::Start(lo))
                .and_then(|_| file.read_exact(&mut buf))
                .map_err(|e| corrupt(first_rg, format!("cannot read bytes {lo}..{hi}: {e}")))?;
            Bytes::from(buf)
        };
        let bytes_read = data.len() as u64;
        let chunk = RangeReader {
            offset: lo,
            data,
            file_len: shard.info.bytes,
        };

        // Select the wanted rows among all rows of those row groups.
        let mut selectors = Vec::new();
        let mut at = 0usize; // position in the concatenated rows of rg_numbers
        let mut base = 0usize; // first row of the current row group in that concatenation
        let mut current = rg_numbers[0];
        for (rg, rows) in &wanted {
            if *rg != current {
                base += meta.row_group(current).num_rows() as usize;
                current = *rg;
            }
            let (start, end) = (base + rows.start, base + rows.end);
            if start < at {
                return Err(DataError::Plan("planned rows are not in row order".into()));
            }
            if start > at {
                selectors.push(RowSelector::skip(start - at));
            }
            selectors.push(RowSelector::select(end - start));
            at = end;
        }
        let total_rows: usize = rg_numbers
            .iter()
            .map(|&rg| meta.row_group(rg).num_rows() as usize)
            .sum();
        if at > total_rows {
            return Err(corrupt(
                first_rg,
                format!("the plan wants row {at}, the row groups hold {total_rows}"),
            ));
        }
        if at < total_rows {
            selectors.push(RowSelector::skip(total_rows - at));
        }
        let selected = plan.samples.len();
        let reader =
            ParquetRecordBatchReaderBuilder::new_with_metadata(chunk, shard.metadata.clone())
                .with_row_groups(rg_numbers.clone())
                .with_row_selection(RowSelection::from(selectors))
                .with_batch_size(selected.max(1))
                .build()
                .map_err(|source| DataError::Parquet {
                    path: path.clone(),
                    row_group: Some(first_rg),
                    source,
                })?;
        let mut all = Vec::with_capacity(selected);
        let mut checksums = Vec::with_capacity(selected);
        for batch in reader {
            let batch = batch.map_err(|e| corrupt(first_rg, format!("cannot decode: {e}")))?;
            let rows = batch_to_rows(&batch).map_err(|e| corrupt(first_rg, e.to_string()))?;
            let sums = batch_checksums(&batch).map_err(|e| corrupt(first_rg, e.to_string()))?;
            checksums.extend_from_slice(sums);
            all.extend(rows);
        }
        let wanted_rows: usize = wanted.iter().map(|(_, r)| r.len()).sum();
        if all.len() != wanted_rows || wanted_rows != selected {
            return Err(corrupt(
                first_rg,
                format!(
                    "decoded {} rows, the plan wants {wanted_rows} ({selected} samples)",
                    all.len()
                ),
            ));
        }

        // Check each row is the one the plan expects.
        let mut out = Vec::with_capacity(selected);
        let mut skipped = Vec::new();
        let mut rows = all.into_iter().zip(checksums);
        let positions = wanted
            .iter()
            .flat_map(|(rg, r)| r.clone().map(move |i| (*rg, i)));
        for (pos, ((rg, i), want)) in positions.zip(plan.samples.iter()).enumerate() {
            let (row, stored) = rows
                .next()
                .ok_or_else(|| corrupt(rg, format!("row {i} is missing")))?;
            let want_source = index.source_name(want);
            // The stored bytes first: a changed row is reported as such, whatever else it breaks.
            let found = shard_row_checksum(&row);
            if found != stored {
                let bad = CorruptRow {
                    path: path.clone(),
                    row_group: rg,
                    row: i,
                    source: want_source.to_string(),
                    index: want.index,
                    id: row.id.clone(),
                    expected: stored,
                    found,
                };
                match on_corrupt {
                    OnCorrupt::Stop => return Err(DataError::RowChecksum(Box::new(bad))),
                    OnCorrupt::Skip => {
                        skipped.push((pos, bad));
                        continue;
                    }
                }
            }
            if row.source != want_source || row.index != want.index || row.length != want.length {
                return Err(corrupt(
                    rg,
                    format!(
                        "row {i} is {}#{} (length {}), the index expects {want_source}#{} \
                         (length {}); was the shard rewritten after the run started?",
                        row.source, row.index, row.length, want.index, want.length
                    ),
                ));
            }
            let mut row = row;
            match index.manifest.settings.tile_encoding {
                TileEncoding::Jpeg => decode_jpeg_tiles(&mut row, index.tile_size())
                    .map_err(|d| corrupt(rg, format!("row {i}: {d}")))?,
                TileEncoding::Raw => decode_raw_tiles(&mut row, index.tile_size())
                    .map_err(|d| corrupt(rg, format!("row {i}: {d}")))?,
                TileEncoding::RawPlain => {}
            }
            check_row(&row, index.tile_size()).map_err(|d| corrupt(rg, format!("row {i}: {d}")))?;
            out.push(row);
        }
        Ok(ReadRows {
            rows: out,
            bytes: bytes_read,
            skipped,
        })
    }
}

/// `raw` shards store each tile as predicted residuals in a zstd frame: undo both (exact).
fn decode_raw_tiles(row: &mut ShardRow, tile_size: usize) -> Result<(), String> {
    for tile in &mut row.tiles {
        *tile = tile_codec::decode_raw(tile, tile_size).map_err(|e| format!("a raw tile: {e}"))?;
    }
    Ok(())
}

/// `jpeg` shards store one baseline JPEG (HWC RGB) per tile: decode each into the raw CHW layout.
/// Lossy by design (the build's `raw` default is exact); decoding is libjpeg-turbo's, as in the build.
fn decode_jpeg_tiles(row: &mut ShardRow, tile_size: usize) -> Result<(), String> {
    for tile in &mut row.tiles {
        let image = turbojpeg::decompress(tile, turbojpeg::PixelFormat::RGB)
            .map_err(|e| format!("a jpeg tile does not decode: {e}"))?;
        if image.width != tile_size || image.height != tile_size {
            return Err(format!(
                "a jpeg tile is {}x{}, expected {tile_size}x{tile_size}",
                image.width, image.height
            ));
        }
        let plane = tile_size * tile_size;
        let mut chw = vec![0u8; 3 * plane];
        for y in 0..tile_size {
            let line = &image.pixels[y * image.pitch..y * image.pitch + 3 * tile_size];
            for (x, px) in line.chunks_exact(3).enumerate() {
                let i = y * tile_size + x;
                chw[i] = px[0];
                chw[plane + i] = px[1];
                chw[2 * plane + i] = px[2];
            }
        }
        *tile = chw;
    }
    Ok(())
}

/// What collation relies on.
fn check_row(row: &ShardRow, tile_size: usize) -> Result<(), String> {
    if row.input_ids.len() != row.labels.len() {
        return Err(format!(
            "{} input ids but {} labels",
            row.input_ids.len(),
            row.labels.len()
        ));
    }
    let placeholders = row
        .input_ids
        .iter()
        .filter(|&&t| t == IMAGE_TOKEN_INDEX)
        .count();
    if placeholders != row.images.len() {
        return Err(format!(
            "{placeholders} image placeholders but {} images",
            row.images.len()
        ));
    }
    let tiles: u64 = row.images.iter().map(|m| u64::from(m.num_tiles)).sum();
    if tiles != row.tiles.len() as u64 {
        return Err(format!(
            "images declare {tiles} tiles, {} stored",
            row.tiles.len()
        ));
    }
    let tile_bytes = 3 * tile_size * tile_size;
    if let Some(t) = row.tiles.iter().find(|t| t.len() != tile_bytes) {
        return Err(format!(
            "a raw tile has {} bytes, expected {tile_bytes}",
            t.len()
        ));
    }
    Ok(())
}
