//! Pass 2: render and write the shards this process owns, one at a time, each to a temporary
//! name renamed when complete, with a small record of what it holds beside it.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use llava_formats::config::DatasetsConfig;
use llava_formats::manifest::{Modality, RejectEntry, ShardInfo};
use llava_formats::schema::RowGroupCutter;
use llava_formats::schema::{rows_to_batch, shard_schema, ImageMeta, ShardRow};
use llava_formats::tile_codec::{self, TileEncoding};
use parquet::arrow::ArrowWriter;
use parquet::file::properties::WriterProperties;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::group::{Plan, ShardPlan};
use super::pass1::{progress_bar, Pass1};
use super::sink::ShardOut;
use super::stage_clock::{CpuClock, StageClocks};
use super::{io_err, BuildContext, BuildError, BuildOptions, BuildTimes, SHARDS_DIR, WORK_DIR};
use crate::convert::{render, Prepared, Sample};

/// What a finished shard holds, written beside the work files; `assemble` builds the manifest
/// from these records alone, so that partitions built on different machines merge.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardRecord {
    pub config_sha256: String,
    pub info: ShardInfo,
    /// Samples written, per source (config order).
    pub written: Vec<u64>,
    pub rejects: Vec<RejectEntry>,
    pub images: u64,
    pub image_tokens: u64,
    pub truncated: u64,
}

pub fn record_path(output: &Path, file: &str) -> PathBuf {
    output
        .join(WORK_DIR)
        .join(SHARDS_DIR)
        .join(format!("{file}.json"))
}

/// Writes every shard of the plan that this partition owns and that is not finished yet.
/// Returns (written, skipped).
pub fn write_owned(
    ctx: &BuildContext,
    pass1: &Pass1,
    plan: &Plan,
    options: &BuildOptions,
    times: &mut BuildTimes,
) -> Result<(usize, usize), BuildError> {
    let shards_dir = ctx.output.join(SHARDS_DIR);
    let records_dir = ctx.output.join(WORK_DIR).join(SHARDS_DIR);
    for dir in [&shards_dir, &records_dir] {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    }
    let spill = File::open(&pass1.spill_path).map_err(io_err(&pass1.spill_path))?;
    let owned: Vec<(usize, &ShardPlan)> = plan
        .shards
        .iter()
        .enumerate()
        .filter(|(i, _)| options.partition.owns(*i))
        .collect();
    let todo: Vec<&ShardPlan> = owned
        .iter()
        .map(|(_, s)| *s)
        .filter(|s| !is_finished(ctx, s))
        .collect();
    let samples_todo: u64 = todo
        .iter()
        .flat_map(|s| shard_groups(plan, s))
        .map(|g| u64::from(g.len))
        .sum();
    let bar = progress_bar(options.progress, samples_todo, "pass 2/2: pixels + write");
    let mut rejected = 0usize;
    let clocks = StageClocks::default();
    for shard in &todo {
        let record = write_shard(ctx, pass1, plan, shard, &spill, &bar, &clocks)?;
        rejected += record.rejects.len();
        bar.set_message(format!("{rejected} rejected"));
    }
    super::pass1::finish_progress(&bar);
    times.render_s = clocks.render.seconds();
    times.encode_s = clocks.encode.seconds();
    times.write_s = clocks.write.seconds();
    times.sync_s = clocks.sync.seconds();
    Ok((todo.len(), owned.len() - todo.len()))
}

fn shard_groups<'a>(plan: &'a Plan, shard: &ShardPlan) -> &'a [super::group::Group] {
    let start = shard.first_group as usize;
    &plan.groups[start..start + shard.groups as usize]
}

/// A shard is finished when its file and record exist, for this config, with the recorded size.
fn is_finished(ctx: &BuildContext, shard: &ShardPlan) -> bool {
    if let Some(remote) = &ctx.remote {
        return super::sink::is_finished_remote(ctx, remote, shard);
    }
    let path = ctx.output.join(SHARDS_DIR).join(&shard.file);
    let Ok(text) = std::fs::read_to_string(record_path(&ctx.output, &shard.file)) else {
        return false;
    };
    let Ok(record) = serde_json::from_str::<ShardRecord>(&text) else {
        return false;
    };
    record.config_sha256 == ctx.config_sha256
        && std::fs::metadata(&path).is_ok_and(|m| m.len() == record.info.bytes)
}

fn writer_properties(ctx: &BuildContext) -> Result<WriterProperties, BuildError> {
    llava_formats::schema::writer_properties(ctx.config.zstd_level, ctx.config.tile_encoding)
        .map_err(BuildError::WriterSettings)
}

fn write_shard(
    ctx: &BuildContext,
    pass1: &Pass1,
    plan: &Plan,
    shard: &ShardPlan,
    spill: &File,
    bar: &indicatif::ProgressBar,
    clocks: &StageClocks,
) -> Result<ShardRecord, BuildError> {
    let final_path = ctx.output.join(SHARDS_DIR).join(&shard.file);
    let tmp_path = final_path.with_extension("parquet.tmp");
    let file = HashingWriter::new(super::sink::create(ctx, &shard.file, &tmp_path)?);
    let schema = shard_schema(ctx.config.tile_encoding);
    let parquet_err = |source: parquet::errors::ParquetError| BuildError::Parquet {
        path: tmp_path.clone(),
        source,
    };
    let writer = ArrowWriter::try_new(file, schema.clone(), Some(writer_properties(ctx)?))
        .map_err(parquet_err)?;

    let modality = if shard.is_image {
        Modality::Image
    } else {
        Modality::Text
    };
    let mut stats = Stats::new(
        format!("{SHARDS_DIR}/{}", shard.file),
        modality,
        ctx.config.sources.len(),
    );
    // Batches with their global ids, in order.
    let mut batches = Vec::new();
    let mut batch_id = shard.first_batch;
    for group in shard_groups(plan, shard) {
        for batch in plan.batches(group) {
            batches.push((group.id, batch_id, batch));
            batch_id += 1;
        }
    }
    // Tiles are encoded (predictor + zstd, or JPEG) while rendering, in parallel. Parquet
    // encoding, the small columns' zstd and the SHA-256 of the bytes run on their own thread,
    // overlapping the rendering of the next window; batches reach it in order through a small
    // bounded channel (memory stays bounded: the writer holds the row group being filled, at
    // most ~ROW_GROUP_TARGET_BYTES + one batch).
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<ShardRow>>(2);
    let file = std::thread::scope(|scope| -> Result<(HashingWriter, u64), BuildError> {
        let writer_schema = schema.clone();
        let handle = scope.spawn(move || -> parquet::errors::Result<(HashingWriter, u64)> {
            let mut writer = writer;
            let mut cutter = RowGroupCutter::default();
            let mut row_groups = 0u64;
            for rows in rx {
                let t = CpuClock::start();
                writer.write(&rows_to_batch(&rows, &writer_schema))?;
                if cutter.add_batch(&rows) {
                    writer.flush()?;
                    row_groups += 1;
                }
                clocks.write.stop(t);
            }
            if cutter.pending_rows() > 0 {
                row_groups += 1;
            }
            let t = CpuClock::start();
            let file = writer.into_inner()?;
            clocks.write.stop(t);
            Ok((file, row_groups))
        });
        // Render a window of whole batches in parallel (enough samples to keep every thread
        // busy), then send its batches in order: the output does not depend on the thread count.
        let window_samples = (rayon::current_num_threads() * 2).max(ctx.config.batch_size);
        let mut start = 0;
        'windows: while start < batches.len() {
            let mut end = start;
            let mut n = 0;
            while end < batches.len() && (n < window_samples || end == start) {
                n += batches[end].2.len();
                end += 1;
            }
            let work: Vec<(u32, u32, u32)> = batches[start..end]
                .iter()
                .flat_map(|&(g, b, ords)| ords.iter().map(move |&o| (g, b, o)))
                .collect();
            // Each result keeps its sample's ordinal: a rejected sample leaves a gap in its
            // batch's rows, so rows cannot be matched to ordinals by position.
            let rendered: Vec<(u32, Result<ShardRow, Box<RejectEntry>>)> = work
                .par_iter()
                .map(|&(group, batch, ordinal)| {
                    let row = render_row(ctx, pass1, ordinal as usize, spill, group, batch, clocks);
                    (ordinal, row)
                })
                .collect();
            let mut results = rendered.into_iter();
            for &(_, _, ords) in &batches[start..end] {
                let mut rows = Vec::with_capacity(ords.len());
                for (ordinal, result) in results.by_ref().take(ords.len()) {
                    match result {
                        Ok(row) => {
                            stats.add(&row, pass1.samples[ordinal as usize].source as usize);
                            rows.push(row);
                        }
                        Err(reject) => stats.rejects.push(*reject),
                    }
                }
                bar.inc(ords.len() as u64);
                if rows.is_empty() {
                    continue;
                }
                stats.info.batches += 1;
                // A closed channel means the writer failed: its error is reported below.
                if tx.send(rows).is_err() {
                    break 'windows;
                }
            }
            start = end;
        }
        drop(tx);
        handle
            .join()
            .map_err(|_| BuildError::WriterPanicked {
                shard: shard.file.clone(),
            })?
            .map_err(parquet_err)
    })?;
    let (file, row_groups) = file;
    let (file, bytes, sha256) = file.finish();
    let record = ShardRecord {
        config_sha256: ctx.config_sha256.clone(),
        info: ShardInfo {
            bytes,
            sha256,
            row_groups,
            // The plan's range: a group whose every sample was rejected still belongs here.
            first_group: shard.first_group,
            groups: shard.groups,
            ..stats.info
        },
        written: stats.written,
        rejects: stats.rejects,
        images: stats.images,
        image_tokens: stats.image_tokens,
        truncated: stats.truncated,
    };
    super::sink::commit(
        ctx,
        file,
        &record,
        &shard.file,
        &tmp_path,
        &final_path,
        clocks,
    )?;
    Ok(record)
}

/// Renders sample `ordinal` of pass 1 from `spill` (pass 1's spill file, open).
fn render_row(
    ctx: &BuildContext,
    pass1: &Pass1,
    ordinal: usize,
    spill: &File,
    group: u32,
    batch: u32,
    clocks: &StageClocks,
) -> Result<ShardRow, Box<RejectEntry>> {
    let t = CpuClock::start();
    let meta = &pass1.samples[ordinal];
    let s = meta.source as usize;
    let source = &ctx.config.sources[s];
    let mut buf = vec![0u8; meta.bytes as usize];
    let reject = |id: &str, kind: &str, reason: String| {
        Box::new(RejectEntry {
            source: source.name.clone(),
            json_file: source.json_as_written[meta.file as usize].clone(),
            index: u64::from(meta.index),
            line: None,
            id: id.to_string(),
            kind: kind.to_string(),
            reason,
        })
    };
    spill
        .read_exact_at(&mut buf, pass1.samples.offset(ordinal))
        .map_err(|e| reject("", "io", format!("{}: {e}", pass1.spill_path.display())))?;
    let prepared: Prepared =
        serde_json::from_slice(&buf).map_err(|e| reject("", "io", e.to_string()))?;
    let id = prepared.id.clone();
    let sample = render(prepared, ctx.image_folder(s), &ctx.convert[s])
        .map_err(|r| reject(&id, r.kind(), r.to_string()))?;
    clocks.render.stop(t);
    let t = CpuClock::start();
    let tiles = encode_tiles(&sample, &ctx.config).map_err(|e| reject(&id, "tile_encoding", e))?;
    clocks.encode.stop(t);
    Ok(ShardRow {
        id: sample.id,
        source: source.name.clone(),
        json_file: source.json_as_written[meta.file as usize].clone(),
        index: u64::from(meta.index),
        length: sample.length as u32,
        num_image_tokens: sample.images.iter().map(|i| i.image_tokens as u32).sum(),
        modality: if sample.images.is_empty() {
            "text"
        } else {
            "image"
        }
        .to_string(),
        truncated: sample.truncated,
        group,
        batch,
        images: sample
            .images
            .iter()
            .map(|img| ImageMeta {
                path: img.path.clone(),
                width: img.image_size.0,
                height: img.image_size.1,
                processing: img.processing.clone(),
                best_width: img.tiles.best_resolution.map_or(0, |b| b.0),
                best_height: img.tiles.best_resolution.map_or(0, |b| b.1),
                grid_cols: img.tiles.grid_cols,
                grid_rows: img.tiles.grid_rows,
                num_tiles: img.tiles.num_tiles as u32,
                image_tokens: img.image_tokens as u32,
            })
            .collect(),
        tiles,
        input_ids: sample.input_ids,
        labels: sample.labels,
    })
}

/// Each tile as stored (`llava_formats::tile_codec`): predicted residuals in a zstd frame
/// (`raw`), the CHW bytes (`raw-plain`) or a JPEG of the tile (`jpeg`).
fn encode_tiles(sample: &Sample, config: &DatasetsConfig) -> Result<Vec<Vec<u8>>, String> {
    let side = llava_imaging::TILE as usize;
    let mut out = Vec::new();
    for img in &sample.images {
        for t in 0..img.tiles.num_tiles {
            out.push(match config.tile_encoding {
                TileEncoding::Jpeg => {
                    let hwc = img.tiles.tile_hwc(t);
                    let image = turbojpeg::Image {
                        pixels: hwc.as_slice(),
                        width: side,
                        pitch: 3 * side,
                        height: side,
                        format: turbojpeg::PixelFormat::RGB,
                    };
                    let quality = i32::from(config.jpeg_quality);
                    turbojpeg::compress(image, quality, turbojpeg::Subsamp::None)
                        .map_err(|e| e.to_string())?
                        .to_vec()
                }
                TileEncoding::RawPlain => img.tiles.tile(t).to_vec(),
                TileEncoding::Raw => {
                    tile_codec::encode_raw(img.tiles.tile(t), side, config.zstd_level)
                        .map_err(|e| e.to_string())?
                }
            });
        }
    }
    Ok(out)
}

/// The shard file, hashed and counted as the Parquet writer writes it (sequentially), so the
/// SHA-256 needs no second read of the file and runs on the writer thread.
///
/// Every [`WRITEBACK_EVERY`] bytes it asks the kernel to start writing the file out
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`, which does not wait): the disk then works while
/// the next rows are rendered, and the fsync that ends the shard waits only for the last few MiB
/// instead of the whole file (measured: docs/benchmarks.md).
struct HashingWriter {
    file: ShardOut,
    hasher: Sha256,
    bytes: u64,
    unsynced: u64,
}

/// Bytes written between two writeback requests.
const WRITEBACK_EVERY: u64 = 8 << 20;

impl HashingWriter {
    fn new(file: ShardOut) -> Self {
        Self {
            file,
            hasher: Sha256::new(),
            bytes: 0,
            unsynced: 0,
        }
    }

    /// (file, size, SHA-256 hex) of everything written.
    fn finish(self) -> (ShardOut, u64, String) {
        (self.file, self.bytes, hex::encode(self.hasher.finalize()))
    }

    /// Starts writeback of everything written so far, without waiting for it. Best effort: an
    /// error here is not an error of the build (the final fsync reports real I/O errors).
    fn start_writeback(&mut self) {
        self.unsynced = 0;
        #[cfg(target_os = "linux")]
        if let Some(file) = self.file.file() {
            use std::os::fd::AsRawFd;
            // SAFETY: the descriptor is this open file's; offset 0 and length 0 mean "the whole
            // file", and SYNC_FILE_RANGE_WRITE only queues writeback.
            unsafe {
                libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
            }
        }
    }
}

impl std::io::Write for HashingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        self.unsynced += n as u64;
        if self.unsynced >= WRITEBACK_EVERY {
            self.start_writeback();
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// What a shard's rows add up to: the manifest entry's counts ([`ShardInfo::count_row`]) and
/// the record's.
struct Stats {
    info: ShardInfo,
    images: u64,
    image_tokens: u64,
    truncated: u64,
    written: Vec<u64>,
    rejects: Vec<RejectEntry>,
}

impl Stats {
    fn new(file: String, modality: Modality, sources: usize) -> Self {
        Stats {
            info: ShardInfo::empty(file, modality),
            images: 0,
            image_tokens: 0,
            truncated: 0,
            written: vec![0; sources],
            rejects: Vec::new(),
        }
    }

    fn add(&mut self, row: &ShardRow, source: usize) {
        self.info.count_row(row);
        self.images += row.images.len() as u64;
        self.image_tokens += u64::from(row.num_image_tokens);
        self.truncated += u64::from(row.truncated);
        self.written[source] += 1;
    }
}
