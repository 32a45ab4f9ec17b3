//! The shard schema (Parquet, one row per sample) and the conversion of rows to and from Arrow.
//!
//! Layout contract (version [`SCHEMA_VERSION`]):
//! - A **batch** is the `batch_size` samples of one batch of one group, sorted by length
//!   (descending): consecutive rows with the same (`group`, `batch`). A group's batches are
//!   consecutive in one shard, in batch order.
//! - **Row groups hold whole batches, several of them**: a row group is closed after the batch that
//!   brings its estimated raw size ([`row_raw_bytes`]) to [`ROW_GROUP_TARGET_BYTES`] or its rows to
//!   [`ROW_GROUP_MAX_ROWS`]. Image batches (≥ 338 KB per raw tile) usually fill a row group alone;
//!   text row groups hold hundreds of batches, so the footer stays a few bytes per sample (version
//!   1 had one row group per batch: a 171 MB footer on a 300K-record text shard).
//! - The batch index is the `batch` column itself: the index a reader builds from the small
//!   columns (runs of equal `batch` inside each row group) gives each batch's row range, and a
//!   rank reads its batch's row group bytes (one contiguous read) and decodes only its rows.
//! - No column statistics and no page index are written (no reader uses them).
//! - A shard holds one modality (`image` or `text`) and whole groups only.
//! - `tiles`: one binary value per tile, image by image, base tile first then the grid row-major.
//!   Every encoding gives back 3·336·336 uint8 bytes in (channel RGB, row, column) order (CHW),
//!   exactly the reference's pixels before normalisation (`jpeg`: approximately). How each value
//!   is stored is [`crate::tile_codec`]'s: `raw` one zstd frame of predicted residuals per tile
//!   (the column itself uncompressed), `raw-plain` the CHW bytes (column under Parquet zstd),
//!   `jpeg` one baseline JPEG per tile (HWC RGB, column uncompressed).
//! - `image_*` columns are parallel lists, one element per image of the sample.
//! - `checksum` (version 4): [`row_checksum`] of the row's `input_ids`, `labels` and `tiles` as
//!   stored (tile values before any tile codec), written by the build and checked by every
//!   reader as it decodes: a changed row is found where it is used, at no extra read.

use std::collections::HashMap;
use std::sync::Arc;

use arrow_array::builder::{
    BinaryBuilder, BooleanBuilder, Int32Builder, ListBuilder, StringBuilder, UInt32Builder,
    UInt64Builder,
};
use arrow_array::{
    Array, ArrayRef, BinaryArray, BooleanArray, Int32Array, ListArray, RecordBatch, StringArray,
    UInt32Array, UInt64Array,
};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use thiserror::Error;

/// Bumped on any change of columns, their meaning or the layout above.
/// 1: one row group per batch. 2: row groups of several whole batches, no statistics.
/// 3: `raw` tiles stored as predicted residuals in zstd frames ([`crate::tile_codec`]), the
/// `tiles` column uncompressed by Parquet except for `raw-plain` (the version 2 bytes).
/// 4: a `checksum` column ([`row_checksum`]) in every row.
pub const SCHEMA_VERSION: u32 = 4;

/// A row group is closed once its rows' estimated raw bytes ([`row_raw_bytes`]) reach this.
pub const ROW_GROUP_TARGET_BYTES: u64 = 1 << 20;
/// ... or once it holds this many rows.
pub const ROW_GROUP_MAX_ROWS: usize = 8192;

/// Estimated uncompressed bytes of a row, for cutting row groups (deterministic: from the row
/// alone, never from the encoder's state).
pub fn row_raw_bytes(row: &ShardRow) -> u64 {
    let tiles: usize = row.tiles.iter().map(Vec::len).sum();
    let strings = row.id.len() + row.source.len() + row.json_file.len() + row.modality.len();
    let images: usize = row.images.iter().map(|i| i.path.len() + 48).sum();
    (tiles + 4 * (row.input_ids.len() + row.labels.len()) + strings + images + 32) as u64
}

/// Cuts a shard's batches into row groups (see the module doc): feed it each batch's rows, in
/// order; it says when to close the row group after that batch.
#[derive(Debug)]
pub struct RowGroupCutter {
    target_bytes: u64,
    max_rows: usize,
    bytes: u64,
    rows: usize,
}

impl Default for RowGroupCutter {
    fn default() -> Self {
        Self::new(ROW_GROUP_TARGET_BYTES, ROW_GROUP_MAX_ROWS)
    }
}

impl RowGroupCutter {
    /// Other limits than the build's (tests use small ones to get many row groups).
    pub fn new(target_bytes: u64, max_rows: usize) -> Self {
        Self {
            target_bytes,
            max_rows,
            bytes: 0,
            rows: 0,
        }
    }

    /// Adds a batch; `true`: close the row group after it.
    pub fn add_batch(&mut self, rows: &[ShardRow]) -> bool {
        self.bytes += rows.iter().map(row_raw_bytes).sum::<u64>();
        self.rows += rows.len();
        if self.bytes >= self.target_bytes || self.rows >= self.max_rows {
            (self.bytes, self.rows) = (0, 0);
            true
        } else {
            false
        }
    }

    /// Rows in the row group being filled.
    pub fn pending_rows(&self) -> usize {
        self.rows
    }
}

/// Parquet writer settings of a shard: zstd at `zstd_level`, row groups cut by the writer's caller
/// (never by row count), no statistics or page index, no dictionary for `tiles`, and `tiles`
/// uncompressed unless `tile_encoding` is `raw-plain` (`raw` and `jpeg` values are compressed
/// already: zstd again would only cost time on the writer thread).
pub fn writer_properties(
    zstd_level: i32,
    tile_encoding: crate::tile_codec::TileEncoding,
) -> Result<parquet::file::properties::WriterProperties, parquet::errors::ParquetError> {
    use parquet::basic::{Compression, ZstdLevel};
    use parquet::file::properties::{EnabledStatistics, WriterProperties};
    use parquet::schema::types::ColumnPath;
    let tiles = ColumnPath::from(vec![
        col::TILES.to_string(),
        "list".to_string(),
        "item".to_string(),
    ]);
    let mut builder = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(zstd_level)?))
        .set_max_row_group_row_count(None)
        .set_statistics_enabled(EnabledStatistics::None)
        .set_write_page_header_statistics(false)
        .set_offset_index_disabled(true)
        .set_column_dictionary_enabled(tiles.clone(), false);
    if tile_encoding != crate::tile_codec::TileEncoding::RawPlain {
        builder = builder.set_column_compression(tiles, Compression::UNCOMPRESSED);
    }
    Ok(builder.build())
}

/// Parquet key-value metadata keys.
pub const META_SCHEMA_VERSION: &str = "llava.schema_version";
pub const META_TILE_ENCODING: &str = "llava.tile_encoding";
pub const META_TILE_LAYOUT: &str = "llava.tile_layout";

pub mod col {
    pub const ID: &str = "id";
    pub const SOURCE: &str = "source";
    pub const JSON_FILE: &str = "json_file";
    pub const INDEX: &str = "index";
    pub const INPUT_IDS: &str = "input_ids";
    pub const LABELS: &str = "labels";
    pub const LENGTH: &str = "length";
    pub const NUM_IMAGE_TOKENS: &str = "num_image_tokens";
    pub const MODALITY: &str = "modality";
    pub const TRUNCATED: &str = "truncated";
    pub const GROUP: &str = "group";
    pub const BATCH: &str = "batch";
    pub const IMAGE_PATH: &str = "image_path";
    pub const IMAGE_WIDTH: &str = "image_width";
    pub const IMAGE_HEIGHT: &str = "image_height";
    pub const IMAGE_PROCESSING: &str = "image_processing";
    pub const IMAGE_BEST_WIDTH: &str = "image_best_width";
    pub const IMAGE_BEST_HEIGHT: &str = "image_best_height";
    pub const IMAGE_GRID_COLS: &str = "image_grid_cols";
    pub const IMAGE_GRID_ROWS: &str = "image_grid_rows";
    pub const IMAGE_NUM_TILES: &str = "image_num_tiles";
    pub const IMAGE_TOKENS: &str = "image_tokens";
    pub const TILES: &str = "tiles";
    pub const CHECKSUM: &str = "checksum";
}

/// The checksum of a row: xxh3-64 over its `input_ids` and `labels` (each a little-endian u64
/// count, then the i32 values little-endian) and its `tiles` (the count, then each value's
/// length and bytes as stored: before [`crate::tile_codec`] decoding). Computed from the values
/// a reader has anyway after Parquet decoding, so checking costs one pass of a hash that runs
/// at memory speed, and no tile decoding.
pub fn row_checksum<'a>(
    input_ids: &[i32],
    labels: &[i32],
    tiles: impl ExactSizeIterator<Item = &'a [u8]>,
) -> u64 {
    use std::hash::Hasher;
    let mut h = twox_hash::XxHash3_64::new();
    for ids in [input_ids, labels] {
        h.write(&(ids.len() as u64).to_le_bytes());
        // Little-endian bytes, a block at a time (one hasher call per 256 values).
        let mut buf = [0u8; 1024];
        for chunk in ids.chunks(256) {
            for (b, v) in buf.chunks_exact_mut(4).zip(chunk) {
                b.copy_from_slice(&v.to_le_bytes());
            }
            h.write(&buf[..4 * chunk.len()]);
        }
    }
    h.write(&(tiles.len() as u64).to_le_bytes());
    for t in tiles {
        h.write(&(t.len() as u64).to_le_bytes());
        h.write(t);
    }
    h.finish()
}

/// [`row_checksum`] of a row as stored.
pub fn shard_row_checksum(row: &ShardRow) -> u64 {
    row_checksum(
        &row.input_ids,
        &row.labels,
        row.tiles.iter().map(Vec::as_slice),
    )
}

/// One image of a sample (everything but the pixels).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageMeta {
    pub path: String,
    /// Decoded size (w, h) in stored orientation: what the model's unpad uses.
    pub width: u32,
    pub height: u32,
    /// `anyres`, `pad` or `square`.
    pub processing: String,
    /// Best resolution (w, h) for anyres; 0 × 0 for single-tile images.
    pub best_width: u32,
    pub best_height: u32,
    pub grid_cols: u32,
    pub grid_rows: u32,
    pub num_tiles: u32,
    pub image_tokens: u32,
}

/// One sample as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardRow {
    pub id: String,
    pub source: String,
    pub json_file: String,
    /// Position of the record in its JSON/JSONL file.
    pub index: u64,
    pub input_ids: Vec<i32>,
    pub labels: Vec<i32>,
    /// Exact length in the model: text tokens + image tokens.
    pub length: u32,
    pub num_image_tokens: u32,
    /// `image` or `text`.
    pub modality: String,
    pub truncated: bool,
    pub group: u32,
    pub batch: u32,
    pub images: Vec<ImageMeta>,
    pub tiles: Vec<Vec<u8>>,
}

#[derive(Debug, Error)]
pub enum SchemaError {
    #[error("column {0:?} is missing")]
    MissingColumn(&'static str),
    #[error("column {column:?} has type {found}, expected {expected}")]
    WrongType {
        column: &'static str,
        found: String,
        expected: String,
    },
    #[error("shard schema version {found} is not supported (this build reads version {SCHEMA_VERSION}{}); rebuild the shards with this llava-data (`llava-data build`)", match found.as_str() { "1" => ", which stores several batches per row group", "2" => ", which stores `raw` tiles as predicted zstd frames", "3" => ", which checksums every row: see docs/integrity.md", _ => "" })]
    Version { found: String },
}

fn list_of(item: DataType) -> DataType {
    DataType::List(Arc::new(Field::new("item", item, true)))
}

/// The Arrow schema of a shard, with the version and tile encoding in its metadata.
pub fn shard_schema(tile_encoding: crate::tile_codec::TileEncoding) -> SchemaRef {
    use DataType::*;
    let fields = vec![
        Field::new(col::ID, Utf8, false),
        Field::new(col::SOURCE, Utf8, false),
        Field::new(col::JSON_FILE, Utf8, false),
        Field::new(col::INDEX, UInt64, false),
        Field::new(col::INPUT_IDS, list_of(Int32), false),
        Field::new(col::LABELS, list_of(Int32), false),
        Field::new(col::LENGTH, UInt32, false),
        Field::new(col::NUM_IMAGE_TOKENS, UInt32, false),
        Field::new(col::MODALITY, Utf8, false),
        Field::new(col::TRUNCATED, Boolean, false),
        Field::new(col::GROUP, UInt32, false),
        Field::new(col::BATCH, UInt32, false),
        Field::new(col::IMAGE_PATH, list_of(Utf8), false),
        Field::new(col::IMAGE_WIDTH, list_of(UInt32), false),
        Field::new(col::IMAGE_HEIGHT, list_of(UInt32), false),
        Field::new(col::IMAGE_PROCESSING, list_of(Utf8), false),
        Field::new(col::IMAGE_BEST_WIDTH, list_of(UInt32), false),
        Field::new(col::IMAGE_BEST_HEIGHT, list_of(UInt32), false),
        Field::new(col::IMAGE_GRID_COLS, list_of(UInt32), false),
        Field::new(col::IMAGE_GRID_ROWS, list_of(UInt32), false),
        Field::new(col::IMAGE_NUM_TILES, list_of(UInt32), false),
        Field::new(col::IMAGE_TOKENS, list_of(UInt32), false),
        Field::new(col::TILES, list_of(Binary), false),
        Field::new(col::CHECKSUM, UInt64, false),
    ];
    let metadata = HashMap::from([
        (META_SCHEMA_VERSION.to_string(), SCHEMA_VERSION.to_string()),
        (META_TILE_ENCODING.to_string(), tile_encoding.name().to_string()),
        (
            META_TILE_LAYOUT.to_string(),
            "tile-major; decoded: uint8 CHW 3x336x336; raw: zstd frame of gradient+colour \
             residuals (llava_formats::tile_codec); raw-plain: CHW bytes; jpeg: baseline JPEG HWC RGB"
                .to_string(),
        ),
    ]);
    Arc::new(Schema::new_with_metadata(fields, metadata))
}

/// Checks the version recorded in a shard's metadata.
pub fn check_version(metadata: &HashMap<String, String>) -> Result<(), SchemaError> {
    match metadata.get(META_SCHEMA_VERSION) {
        Some(v) if v == &SCHEMA_VERSION.to_string() => Ok(()),
        Some(v) => Err(SchemaError::Version { found: v.clone() }),
        None => Err(SchemaError::Version {
            found: "(none)".into(),
        }),
    }
}

/// Rows → one record batch (one row group when written).
pub fn rows_to_batch(rows: &[ShardRow], schema: &SchemaRef) -> RecordBatch {
    let strings = |f: &dyn Fn(&ShardRow) -> &str| -> ArrayRef {
        Arc::new(StringArray::from_iter_values(rows.iter().map(f)))
    };
    let u32s = |f: &dyn Fn(&ShardRow) -> u32| -> ArrayRef {
        Arc::new(UInt32Array::from_iter_values(rows.iter().map(f)))
    };
    let i32_lists = |f: &dyn Fn(&ShardRow) -> &[i32]| -> ArrayRef {
        let mut b = ListBuilder::new(Int32Builder::new());
        for r in rows {
            b.values().append_slice(f(r));
            b.append(true);
        }
        Arc::new(b.finish())
    };
    let image_u32s = |f: &dyn Fn(&ImageMeta) -> u32| -> ArrayRef {
        let mut b = ListBuilder::new(UInt32Builder::new());
        for r in rows {
            for img in &r.images {
                b.values().append_value(f(img));
            }
            b.append(true);
        }
        Arc::new(b.finish())
    };
    let image_strings = |f: &dyn Fn(&ImageMeta) -> &str| -> ArrayRef {
        let mut b = ListBuilder::new(StringBuilder::new());
        for r in rows {
            for img in &r.images {
                b.values().append_value(f(img));
            }
            b.append(true);
        }
        Arc::new(b.finish())
    };
    let mut index = UInt64Builder::new();
    let mut checksum = UInt64Builder::with_capacity(rows.len());
    let mut truncated = BooleanBuilder::new();
    let tile_bytes: usize = rows.iter().flat_map(|r| &r.tiles).map(Vec::len).sum();
    let tile_count: usize = rows.iter().map(|r| r.tiles.len()).sum();
    let mut tiles = ListBuilder::new(BinaryBuilder::with_capacity(tile_count, tile_bytes));
    for r in rows {
        index.append_value(r.index);
        checksum.append_value(shard_row_checksum(r));
        truncated.append_value(r.truncated);
        for t in &r.tiles {
            tiles.values().append_value(t);
        }
        tiles.append(true);
    }
    let columns: Vec<ArrayRef> = vec![
        strings(&|r| &r.id),
        strings(&|r| &r.source),
        strings(&|r| &r.json_file),
        Arc::new(index.finish()),
        i32_lists(&|r| &r.input_ids),
        i32_lists(&|r| &r.labels),
        u32s(&|r| r.length),
        u32s(&|r| r.num_image_tokens),
        strings(&|r| &r.modality),
        Arc::new(truncated.finish()),
        u32s(&|r| r.group),
        u32s(&|r| r.batch),
        image_strings(&|i| &i.path),
        image_u32s(&|i| i.width),
        image_u32s(&|i| i.height),
        image_strings(&|i| &i.processing),
        image_u32s(&|i| i.best_width),
        image_u32s(&|i| i.best_height),
        image_u32s(&|i| i.grid_cols),
        image_u32s(&|i| i.grid_rows),
        image_u32s(&|i| i.num_tiles),
        image_u32s(&|i| i.image_tokens),
        Arc::new(tiles.finish()),
        Arc::new(checksum.finish()),
    ];
    RecordBatch::try_new(schema.clone(), columns).expect("columns follow shard_schema")
}

fn column<'a, T: 'static>(
    batch: &'a RecordBatch,
    name: &'static str,
    expected: &str,
) -> Result<&'a T, SchemaError> {
    let array = batch
        .column_by_name(name)
        .ok_or(SchemaError::MissingColumn(name))?;
    array
        .as_any()
        .downcast_ref::<T>()
        .ok_or_else(|| SchemaError::WrongType {
            column: name,
            found: array.data_type().to_string(),
            expected: expected.to_string(),
        })
}

fn list_values<'a, T: 'static>(
    list: &'a ListArray,
    name: &'static str,
    expected: &str,
) -> Result<&'a T, SchemaError> {
    list.values()
        .as_any()
        .downcast_ref::<T>()
        .ok_or_else(|| SchemaError::WrongType {
            column: name,
            found: list.data_type().to_string(),
            expected: expected.to_string(),
        })
}

/// The `[start, end)` value range of row `i` of a list column.
fn range(list: &ListArray, i: usize) -> std::ops::Range<usize> {
    let offsets = list.value_offsets();
    offsets[i] as usize..offsets[i + 1] as usize
}

/// The stored [`row_checksum`] of each row of a record batch read from a shard.
pub fn batch_checksums(batch: &RecordBatch) -> Result<&[u64], SchemaError> {
    Ok(column::<UInt64Array>(batch, col::CHECKSUM, "uint64")?.values())
}

/// A record batch read from a shard → rows. Reads only the columns present in `batch` that rows
/// need; a projection without `tiles` gives rows with empty `tiles`.
pub fn batch_to_rows(batch: &RecordBatch) -> Result<Vec<ShardRow>, SchemaError> {
    let id = column::<StringArray>(batch, col::ID, "utf8")?;
    let source = column::<StringArray>(batch, col::SOURCE, "utf8")?;
    let json_file = column::<StringArray>(batch, col::JSON_FILE, "utf8")?;
    let index = column::<UInt64Array>(batch, col::INDEX, "uint64")?;
    let input_ids = column::<ListArray>(batch, col::INPUT_IDS, "list<int32>")?;
    let input_values = list_values::<Int32Array>(input_ids, col::INPUT_IDS, "list<int32>")?;
    let labels = column::<ListArray>(batch, col::LABELS, "list<int32>")?;
    let label_values = list_values::<Int32Array>(labels, col::LABELS, "list<int32>")?;
    let length = column::<UInt32Array>(batch, col::LENGTH, "uint32")?;
    let num_image_tokens = column::<UInt32Array>(batch, col::NUM_IMAGE_TOKENS, "uint32")?;
    let modality = column::<StringArray>(batch, col::MODALITY, "utf8")?;
    let truncated = column::<BooleanArray>(batch, col::TRUNCATED, "boolean")?;
    let group = column::<UInt32Array>(batch, col::GROUP, "uint32")?;
    let batch_no = column::<UInt32Array>(batch, col::BATCH, "uint32")?;
    let u32_list = |name: &'static str| -> Result<(&ListArray, &UInt32Array), SchemaError> {
        let l = column::<ListArray>(batch, name, "list<uint32>")?;
        Ok((l, list_values::<UInt32Array>(l, name, "list<uint32>")?))
    };
    let str_list = |name: &'static str| -> Result<(&ListArray, &StringArray), SchemaError> {
        let l = column::<ListArray>(batch, name, "list<utf8>")?;
        Ok((l, list_values::<StringArray>(l, name, "list<utf8>")?))
    };
    let paths = str_list(col::IMAGE_PATH)?;
    let processing = str_list(col::IMAGE_PROCESSING)?;
    let widths = u32_list(col::IMAGE_WIDTH)?;
    let heights = u32_list(col::IMAGE_HEIGHT)?;
    let best_w = u32_list(col::IMAGE_BEST_WIDTH)?;
    let best_h = u32_list(col::IMAGE_BEST_HEIGHT)?;
    let cols = u32_list(col::IMAGE_GRID_COLS)?;
    let grid_rows = u32_list(col::IMAGE_GRID_ROWS)?;
    let num_tiles = u32_list(col::IMAGE_NUM_TILES)?;
    let image_tokens = u32_list(col::IMAGE_TOKENS)?;
    let tiles = match batch.column_by_name(col::TILES) {
        Some(_) => {
            let l = column::<ListArray>(batch, col::TILES, "list<binary>")?;
            Some((
                l,
                list_values::<BinaryArray>(l, col::TILES, "list<binary>")?,
            ))
        }
        None => None,
    };
    let mut rows = Vec::with_capacity(batch.num_rows());
    for i in 0..batch.num_rows() {
        let images = range(paths.0, i)
            .map(|j| ImageMeta {
                path: paths.1.value(j).to_string(),
                width: widths.1.value(j),
                height: heights.1.value(j),
                processing: processing.1.value(j).to_string(),
                best_width: best_w.1.value(j),
                best_height: best_h.1.value(j),
                grid_cols: cols.1.value(j),
                grid_rows: grid_rows.1.value(j),
                num_tiles: num_tiles.1.value(j),
                image_tokens: image_tokens.1.value(j),
            })
            .collect();
        let tiles = match &tiles {
            Some((l, v)) => range(l, i).map(|j| v.value(j).to_vec()).collect(),
            None => Vec::new(),
        };
        rows.push(ShardRow {
            id: id.value(i).to_string(),
            source: source.value(i).to_string(),
            json_file: json_file.value(i).to_string(),
            index: index.value(i),
            input_ids: input_values.values()[range(input_ids, i)].to_vec(),
            labels: label_values.values()[range(labels, i)].to_vec(),
            length: length.value(i),
            num_image_tokens: num_image_tokens.value(i),
            modality: modality.value(i).to_string(),
            truncated: truncated.value(i),
            group: group.value(i),
            batch: batch_no.value(i),
            images,
            tiles,
        });
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_round_trip() {
        let row = ShardRow {
            id: "a".into(),
            source: "s".into(),
            json_file: "f.json".into(),
            index: 3,
            input_ids: vec![128000, -200, 5],
            labels: vec![-100, -100, 5],
            length: 579,
            num_image_tokens: 577,
            modality: "image".into(),
            truncated: false,
            group: 1,
            batch: 2,
            images: vec![ImageMeta {
                path: "x.jpg".into(),
                width: 10,
                height: 20,
                processing: "square".into(),
                best_width: 0,
                best_height: 0,
                grid_cols: 1,
                grid_rows: 1,
                num_tiles: 1,
                image_tokens: 577,
            }],
            tiles: vec![vec![1, 2, 3]],
        };
        let text = ShardRow {
            images: vec![],
            tiles: vec![],
            modality: "text".into(),
            ..row.clone()
        };
        let schema = shard_schema(crate::tile_codec::TileEncoding::Raw);
        let batch = rows_to_batch(&[row.clone(), text.clone()], &schema);
        assert_eq!(
            batch_checksums(&batch).unwrap(),
            [shard_row_checksum(&row), shard_row_checksum(&text)]
        );
        assert_eq!(batch_to_rows(&batch).unwrap(), vec![row, text]);
    }

    #[test]
    fn checksum_covers_every_value_and_its_place() {
        let tiles = [vec![1u8, 2, 3], vec![4u8]];
        let sum = |ids: &[i32], labels: &[i32], tiles: &[Vec<u8>]| {
            row_checksum(ids, labels, tiles.iter().map(Vec::as_slice))
        };
        let base = sum(&[1, 2], &[-100, 2], &tiles);
        // Deterministic, and any changed value, count or boundary changes it.
        assert_eq!(base, sum(&[1, 2], &[-100, 2], &tiles));
        assert_ne!(base, sum(&[1, 3], &[-100, 2], &tiles));
        assert_ne!(base, sum(&[1, 2], &[-100, 3], &tiles));
        // A value moved from one column to the other, or between tiles.
        assert_ne!(base, sum(&[1], &[2, -100, 2], &tiles));
        assert_ne!(base, sum(&[1, 2], &[-100, 2], &[vec![1, 2], vec![3, 4]]));
        assert_ne!(base, sum(&[1, 2], &[-100, 2], &[vec![1, 2, 3], vec![5]]));
        // Longer than one hashing block.
        let long: Vec<i32> = (0..1000).collect();
        let mut flipped = long.clone();
        flipped[700] ^= 1;
        assert_ne!(sum(&long, &[], &[]), sum(&flipped, &[], &[]));
    }
}
