//! The shard index: the manifest plus what the plan needs from each shard's small columns
//! (group, batch, exact length, sample identity) per batch. Built once per run by reading only
//! those columns (never the tiles), and checked against the manifest so that a stale or foreign
//! shard fails here, before training starts.
//!
//! Schema v2 stores several whole batches per Parquet row group; the batch index is the `batch`
//! column: each run of equal (`group`, `batch`) inside a row group is one batch, and the index
//! keeps its row range. Memory: 16 bytes per sample ([`SampleRef`]) plus 64 per batch
//! ([`BatchInfo`]), i.e. 32 bytes per sample at batch size 4.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::{Array, RecordBatch, StringArray, UInt32Array, UInt64Array};
use llava_formats::manifest::{Manifest, ShardInfo, FORMAT_NAME, MANIFEST_FILE};
use llava_formats::schema::{check_version, col, shard_schema, SCHEMA_VERSION};
use parquet::arrow::arrow_reader::{
    ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReaderBuilder,
};
use parquet::arrow::ProjectionMask;
use sha2::{Digest, Sha256};

use super::error::{DataError, DataResult};
use super::source;

pub use llava_formats::manifest::Modality;

/// One sample as the plan sees it. `source` indexes [`ShardIndex::sources`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SampleRef {
    pub source: u32,
    /// Position of the record in its source file.
    pub index: u64,
    /// Exact tokens in the model (text + image tokens).
    pub length: u32,
}

/// One batch as built: a row range of one Parquet row group.
#[derive(Debug, Clone)]
pub struct BatchInfo {
    /// Index into [`ShardIndex::shards`].
    pub shard: usize,
    /// Row group number inside its shard file.
    pub row_group: usize,
    /// Rows of the batch inside that row group.
    pub rows: Range<usize>,
    pub group: u32,
    pub batch: u32,
    /// Range into [`ShardIndex::samples`], in row order.
    pub samples: Range<usize>,
    pub tokens: u64,
}

/// One group: consecutive batches of one shard, one modality.
#[derive(Debug, Clone)]
pub struct GroupInfo {
    pub id: u32,
    pub shard: usize,
    pub modality: Modality,
    /// Range into [`ShardIndex::batches`].
    pub batches: Range<usize>,
}

/// One shard file and its parsed footer (shared by all loader workers, parsed once).
#[derive(Debug, Clone)]
pub struct ShardFile {
    pub info: ShardInfo,
    pub path: PathBuf,
    pub modality: Modality,
    pub metadata: ArrowReaderMetadata,
}

#[derive(Debug, Clone, Default)]
pub struct IndexOptions {
    /// Hash every shard and compare with the manifest's SHA-256 (reads all bytes once).
    /// Off by default: sizes are always compared, which catches truncation cheaply.
    pub verify_checksums: bool,
}

#[derive(Debug)]
pub struct ShardIndex {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub shards: Vec<ShardFile>,
    /// All batches, shard by shard, in file order.
    pub batches: Vec<BatchInfo>,
    /// All groups in shard/file order (the unshuffled order).
    pub groups: Vec<GroupInfo>,
    pub samples: Vec<SampleRef>,
    /// Interned source names.
    pub sources: Vec<String>,
    /// The object store the shards are read from (`--shards s3://…`); `None`: local files.
    pub remote: Option<Arc<source::RemoteShards>>,
}

impl ShardIndex {
    /// Reads `dir/manifest.json` and the small columns of every shard it lists.
    pub fn open(dir: &Path, options: &IndexOptions) -> DataResult<Arc<Self>> {
        let manifest_path = dir.join(MANIFEST_FILE);
        let text = if source::is_remote(dir) {
            let bytes = source::remote(dir)?.read(MANIFEST_FILE)?;
            String::from_utf8_lossy(&bytes).into_owned()
        } else {
            std::fs::read_to_string(&manifest_path).map_err(|source| DataError::Io {
                path: manifest_path.clone(),
                source,
            })?
        };
        let manifest = Manifest::from_json(&text).map_err(|source| DataError::ManifestCheck {
            path: manifest_path.clone(),
            source,
        })?;
        Self::from_manifest(dir, manifest, options)
    }

    pub fn from_manifest(
        dir: &Path,
        manifest: Manifest,
        options: &IndexOptions,
    ) -> DataResult<Arc<Self>> {
        let manifest_path = dir.join(MANIFEST_FILE);
        let bad_manifest = |detail: String| DataError::Corrupt {
            path: manifest_path.clone(),
            row_group: None,
            detail,
        };
        if manifest.format != FORMAT_NAME {
            return Err(bad_manifest(format!(
                "format {:?}, expected {FORMAT_NAME:?}",
                manifest.format
            )));
        }
        if manifest.schema_version != SCHEMA_VERSION {
            return Err(bad_manifest(format!(
                "schema version {}, this build reads {SCHEMA_VERSION}; rebuild the shards with \
                 this llava-data (`llava-data build`)",
                manifest.schema_version
            )));
        }
        if manifest.grouping.batch_size == 0 {
            return Err(bad_manifest("grouping.batch_size is 0".into()));
        }

        let mut index = ShardIndex {
            dir: dir.to_path_buf(),
            manifest: manifest.clone(),
            shards: Vec::new(),
            batches: Vec::new(),
            groups: Vec::new(),
            samples: Vec::new(),
            sources: Vec::new(),
            remote: if source::is_remote(dir) {
                Some(source::remote(dir)?)
            } else {
                None
            },
        };
        // Reserve what the manifest lists (a corrupt count only costs a wrong reservation).
        let listed: u64 = manifest.shards.iter().map(|s| s.rows).sum();
        index.samples.reserve(listed.min(1 << 28) as usize);
        let mut source_ids: HashMap<String, u32> = HashMap::new();
        let mut seen_groups: HashMap<u32, PathBuf> = HashMap::new();
        // Shards are opened (footer, optional checksum, small columns) a window at a time in
        // parallel, and merged in manifest order: the index, and which error is reported first,
        // do not depend on the thread count; memory holds one window's columns.
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(1, MAX_OPEN_THREADS);
        let opened = manifest.shards.chunks(threads).flat_map(|window| {
            std::thread::scope(|scope| {
                let handles: Vec<_> = window
                    .iter()
                    .map(|info| {
                        scope.spawn(move || -> DataResult<(ShardFile, SmallColumns)> {
                            let file = open_shard(dir, info, options)?;
                            let columns = read_small_columns(dir, &file)?;
                            Ok((file, columns))
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
                    .collect::<Vec<_>>()
            })
        });
        for opened in opened {
            let (file, columns) = opened?;
            let shard = index.shards.len();
            let path = file.path.clone();
            let modality = file.modality;
            index.shards.push(file);
            // The shard's source names as the index's ids, once per shard (not per sample).
            let source_of: Vec<u32> = columns
                .source_names
                .iter()
                .map(|name| {
                    let next_id = source_ids.len() as u32;
                    *source_ids.entry(name.clone()).or_insert_with(|| {
                        index.sources.push(name.clone());
                        next_id
                    })
                })
                .collect();

            let meta = index.shards[shard].metadata.metadata().clone();
            let mut offset = 0usize;
            let mut shard_batches = 0u64;
            for rg in 0..meta.num_row_groups() {
                let n = meta.row_group(rg).num_rows() as usize;
                let rows = offset..offset + n;
                offset += n;
                let corrupt = |detail: String| DataError::Corrupt {
                    path: path.clone(),
                    row_group: Some(rg),
                    detail,
                };
                if n == 0 {
                    return Err(corrupt("empty row group".into()));
                }
                if rows.end > columns.group.len() {
                    return Err(corrupt(format!(
                        "the footer says {} rows or more, the columns have {}",
                        rows.end,
                        columns.group.len()
                    )));
                }
                // Runs of equal (group, batch) are the row group's batches.
                let mut run_start = rows.start;
                while run_start < rows.end {
                    let group = columns.group[run_start];
                    let batch = columns.batch[run_start];
                    let mut run_end = run_start;
                    while run_end < rows.end
                        && columns.group[run_end] == group
                        && columns.batch[run_end] == batch
                    {
                        run_end += 1;
                    }
                    if let Some(prev) = index.batches.last() {
                        if prev.shard == shard && prev.group == group && prev.batch == batch {
                            return Err(corrupt(format!(
                                "batch ({group}, {batch}) is split across row groups or not contiguous"
                            )));
                        }
                    }
                    let start = index.samples.len();
                    let mut tokens = 0u64;
                    for i in run_start..run_end {
                        if columns.modality[i] != modality {
                            return Err(corrupt(format!(
                                "row of modality {:?} in a {} shard",
                                columns.modality_name(i),
                                modality.as_str()
                            )));
                        }
                        let source = source_of[columns.source[i] as usize];
                        tokens += u64::from(columns.length[i]);
                        index.samples.push(SampleRef {
                            source,
                            index: columns.index[i],
                            length: columns.length[i],
                        });
                    }
                    let batch_id = index.batches.len();
                    index.batches.push(BatchInfo {
                        shard,
                        row_group: rg,
                        rows: run_start - rows.start..run_end - rows.start,
                        group,
                        batch,
                        samples: start..index.samples.len(),
                        tokens,
                    });
                    shard_batches += 1;
                    // A group's batches are consecutive in one shard.
                    match index.groups.last_mut() {
                        Some(g) if g.id == group && g.shard == shard => {
                            g.batches.end = batch_id + 1;
                        }
                        _ => {
                            if let Some(other) = seen_groups.insert(group, path.clone()) {
                                return Err(corrupt(format!(
                                    "group {group} is not contiguous (also in {})",
                                    other.display()
                                )));
                            }
                            index.groups.push(GroupInfo {
                                id: group,
                                shard,
                                modality,
                                batches: batch_id..batch_id + 1,
                            });
                        }
                    }
                    run_start = run_end;
                }
            }
            if offset != columns.group.len() {
                return Err(DataError::Corrupt {
                    path: path.clone(),
                    row_group: None,
                    detail: format!(
                        "the footer says {offset} rows, the columns have {}",
                        columns.group.len()
                    ),
                });
            }
            if shard_batches != index.shards[shard].info.batches {
                return Err(DataError::Corrupt {
                    path: path.clone(),
                    row_group: None,
                    detail: format!(
                        "{shard_batches} batches, the manifest says {}",
                        index.shards[shard].info.batches
                    ),
                });
            }
        }
        Ok(Arc::new(index))
    }

    pub fn source_name(&self, sample: &SampleRef) -> &str {
        &self.sources[sample.source as usize]
    }

    pub fn built_batch_size(&self) -> usize {
        self.manifest.grouping.batch_size
    }

    pub fn tile_size(&self) -> usize {
        self.manifest.settings.tile_size as usize
    }
}

/// Shards opened at once while indexing (each thread reads one shard's footer and small
/// columns; more than the disk and cores can serve only adds memory).
const MAX_OPEN_THREADS: usize = 16;

/// Opens a shard, checks size, optional checksum, version, schema and row-group count.
fn open_shard(dir: &Path, info: &ShardInfo, options: &IndexOptions) -> DataResult<ShardFile> {
    let path = dir.join(&info.file);
    let metadata = if source::is_remote(dir) {
        remote_footer(dir, info, options)?
    } else {
        local_footer(&path, info, options)?
    };
    let corrupt = |detail: String| DataError::Corrupt {
        path: path.clone(),
        row_group: None,
        detail,
    };
    let modality = info.modality;
    // The writer's key-value metadata (schema version) travels in the Arrow schema.
    let kv: HashMap<String, String> = metadata
        .schema()
        .metadata()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    check_version(&kv).map_err(|source| DataError::Schema {
        path: path.clone(),
        source,
    })?;
    // Fields only: the same for every tile encoding.
    let expected = shard_schema(llava_formats::tile_codec::TileEncoding::Raw);
    let found = metadata.schema();
    let same_fields = expected.fields().len() == found.fields().len()
        && expected
            .fields()
            .iter()
            .zip(found.fields())
            .all(|(a, b)| a.name() == b.name() && a.data_type() == b.data_type());
    if !same_fields {
        return Err(corrupt(format!(
            "columns do not match shard schema v{SCHEMA_VERSION}: found [{}]",
            found
                .fields()
                .iter()
                .map(|f| format!("{}: {}", f.name(), f.data_type()))
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let row_groups = metadata.metadata().num_row_groups() as u64;
    if row_groups != info.row_groups {
        return Err(corrupt(format!(
            "{row_groups} row groups, the manifest says {}",
            info.row_groups
        )));
    }
    let rows = metadata.metadata().file_metadata().num_rows() as u64;
    if rows != info.rows {
        return Err(corrupt(format!(
            "{rows} rows, the manifest says {}",
            info.rows
        )));
    }
    Ok(ShardFile {
        info: info.clone(),
        path,
        modality,
        metadata,
    })
}

/// A shard in an object store: its size (and ETag, kept for every later range) checked, the
/// optional checksum streamed, the footer read with one or two ranged requests.
fn remote_footer(
    dir: &Path,
    info: &ShardInfo,
    options: &IndexOptions,
) -> DataResult<ArrowReaderMetadata> {
    let remote = source::remote(dir)?;
    let path = dir.join(&info.file);
    remote.open(&info.file, info.bytes)?;
    if options.verify_checksums {
        let mut hasher = Sha256::new();
        remote.stream(&info.file, info.bytes, |b| hasher.update(b))?;
        let found = hex::encode(hasher.finalize());
        if !found.eq_ignore_ascii_case(&info.sha256) {
            return Err(DataError::Checksum {
                path,
                expected: info.sha256.clone(),
                found,
            });
        }
    }
    let footer = remote.footer(&info.file, info.bytes)?;
    ArrowReaderMetadata::load(&footer, ArrowReaderOptions::new()).map_err(|source| {
        DataError::Parquet {
            path,
            row_group: None,
            source,
        }
    })
}

/// A local shard file: size, optional checksum, footer.
fn local_footer(
    path: &Path,
    info: &ShardInfo,
    options: &IndexOptions,
) -> DataResult<ArrowReaderMetadata> {
    let path = path.to_path_buf();
    let mut file = File::open(&path).map_err(|source| DataError::MissingShard {
        path: path.clone(),
        source,
    })?;
    let size = file
        .metadata()
        .map_err(|source| DataError::Io {
            path: path.clone(),
            source,
        })?
        .len();
    if size != info.bytes {
        return Err(DataError::ShardSize {
            path,
            expected: info.bytes,
            found: size,
        });
    }
    if options.verify_checksums {
        let found = sha256_file(&mut file).map_err(|source| DataError::Io {
            path: path.clone(),
            source,
        })?;
        if !found.eq_ignore_ascii_case(&info.sha256) {
            return Err(DataError::Checksum {
                path,
                expected: info.sha256.clone(),
                found,
            });
        }
    }
    ArrowReaderMetadata::load(&file, ArrowReaderOptions::new()).map_err(|source| {
        DataError::Parquet {
            path: path.to_path_buf(),
            row_group: None,
            source,
        }
    })
}

fn sha256_file(file: &mut File) -> std::io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// The plan's columns of a whole shard, in row order: ~22 bytes per row while one shard is
/// indexed (strings are interned per shard, never kept per row).
#[derive(Default)]
struct SmallColumns {
    /// Index into `source_names`.
    source: Vec<u32>,
    source_names: Vec<String>,
    index: Vec<u64>,
    length: Vec<u32>,
    modality: Vec<Modality>,
    /// Modalities that are neither image nor text, by their position (for the error message).
    unknown_modality: Vec<(usize, String)>,
    group: Vec<u32>,
    batch: Vec<u32>,
}

impl SmallColumns {
    fn modality_name(&self, i: usize) -> String {
        match self.unknown_modality.iter().find(|(j, _)| *j == i) {
            Some((_, name)) => name.clone(),
            None => self.modality[i].as_str().to_string(),
        }
    }
}

fn read_small_columns(dir: &Path, file: &ShardFile) -> DataResult<SmallColumns> {
    let parquet_err = |source| DataError::Parquet {
        path: file.path.clone(),
        row_group: None,
        source,
    };
    let wanted = [
        col::SOURCE,
        col::INDEX,
        col::LENGTH,
        col::MODALITY,
        col::GROUP,
        col::BATCH,
    ];
    let schema = file.metadata.schema();
    let roots: Vec<usize> = wanted
        .iter()
        .filter_map(|name| schema.index_of(name).ok())
        .collect();
    let mask = ProjectionMask::roots(file.metadata.parquet_schema(), roots.clone());
    let reader = if source::is_remote(dir) {
        // Only the small columns' chunks of every row group are fetched (never the tiles).
        let meta = file.metadata.metadata();
        let mut ranges = Vec::new();
        for rg in meta.row_groups() {
            for (i, c) in rg.columns().iter().enumerate() {
                let root = file.metadata.parquet_schema().get_column_root_idx(i);
                if roots.contains(&root) {
                    let (start, len) = c.byte_range();
                    ranges.push(start..start + len);
                }
            }
        }
        let parts = source::remote(dir)?.ranges(&file.info.file, ranges, file.info.bytes)?;
        ParquetRecordBatchReaderBuilder::new_with_metadata(parts, file.metadata.clone())
            .with_projection(mask)
            .with_batch_size(64 * 1024)
            .build()
            .map_err(parquet_err)?
    } else {
        let handle = File::open(&file.path).map_err(|source| DataError::MissingShard {
            path: file.path.clone(),
            source,
        })?;
        ParquetRecordBatchReaderBuilder::new_with_metadata(handle, file.metadata.clone())
            .with_projection(mask)
            .with_batch_size(64 * 1024)
            .build()
            .map_err(parquet_err)?
    };
    let mut out = SmallColumns::default();
    let mut names: HashMap<String, u32> = HashMap::new();
    for batch in reader {
        let batch = batch.map_err(|e| DataError::Corrupt {
            path: file.path.clone(),
            row_group: None,
            detail: e.to_string(),
        })?;
        let corrupt = |detail: String| DataError::Corrupt {
            path: file.path.clone(),
            row_group: None,
            detail,
        };
        let strings = |name| -> DataResult<&StringArray> { typed(&batch, name, &corrupt) };
        let u32s = |name| -> DataResult<&UInt32Array> { typed(&batch, name, &corrupt) };
        let index: &UInt64Array = typed(&batch, col::INDEX, &corrupt)?;
        let source = strings(col::SOURCE)?;
        let modality = strings(col::MODALITY)?;
        for s in source.iter() {
            let s = s.unwrap_or_default();
            let id = match names.get(s) {
                Some(&id) => id,
                None => {
                    let id = out.source_names.len() as u32;
                    out.source_names.push(s.to_string());
                    names.insert(s.to_string(), id);
                    id
                }
            };
            out.source.push(id);
        }
        for m in modality.iter() {
            let m = m.unwrap_or_default();
            let parsed = Modality::parse(m).unwrap_or_else(|| {
                out.unknown_modality
                    .push((out.modality.len(), m.to_string()));
                // Never equal to the shard's modality: the index reports the row.
                if file.modality == Modality::Image {
                    Modality::Text
                } else {
                    Modality::Image
                }
            });
            out.modality.push(parsed);
        }
        out.index.extend(index.values().iter().copied());
        out.length
            .extend(u32s(col::LENGTH)?.values().iter().copied());
        out.group.extend(u32s(col::GROUP)?.values().iter().copied());
        out.batch.extend(u32s(col::BATCH)?.values().iter().copied());
    }
    Ok(out)
}

fn typed<'a, T: 'static>(
    batch: &'a RecordBatch,
    name: &str,
    corrupt: &dyn Fn(String) -> DataError,
) -> DataResult<&'a T> {
    let array = batch
        .column_by_name(name)
        .ok_or_else(|| corrupt(format!("column {name:?} missing")))?;
    if array.null_count() > 0 {
        return Err(corrupt(format!("column {name:?} has nulls")));
    }
    array
        .as_any()
        .downcast_ref::<T>()
        .ok_or_else(|| corrupt(format!("column {name:?} has type {}", array.data_type())))
}
