//! The summary's input: the small columns of every shard (never `tiles`, never `input_ids`), one
//! row per sample, as a polars frame; and the typed columns read back out of aggregated frames.

use std::path::Path;

use llava_formats::constants::IGNORE_INDEX;
use llava_formats::schema::col as c;
use polars::prelude::*;
use polars_io::parquet::read::ParquetReader;
use polars_io::SerReader;

use crate::inspect::{BuildDir, InspectError};

/// The columns the summary reads (the list ones are small: one element per image, or per token
/// for `labels`).
const COLUMNS: [&str; 10] = [
    c::SOURCE,
    c::MODALITY,
    c::LENGTH,
    c::NUM_IMAGE_TOKENS,
    c::TRUNCATED,
    c::GROUP,
    c::LABELS,
    c::IMAGE_PROCESSING,
    c::IMAGE_GRID_COLS,
    c::IMAGE_GRID_ROWS,
];
const IMAGE_NUM_TILES: &str = c::IMAGE_NUM_TILES;

/// A polars error while reading `path`, with the shard named.
fn polars_at(path: &Path) -> impl Fn(PolarsError) -> InspectError + '_ {
    move |source| InspectError::Polars {
        context: path.display().to_string(),
        source,
    }
}

/// Reads one shard's small columns and reduces them to one row per sample.
fn read_shard(
    build: &BuildDir,
    shard: &llava_formats::manifest::ShardInfo,
) -> Result<DataFrame, InspectError> {
    let path = &build.shard_path(&shard.file);
    // On a bucket only these columns' chunks are fetched.
    let names: Vec<&str> = COLUMNS.iter().copied().chain([IMAGE_NUM_TILES]).collect();
    let file = build.open_shard(shard, &|meta| {
        crate::inspect::remote::column_chunks(meta, Some(&names), None)
    })?;
    let columns = COLUMNS
        .iter()
        .chain([&IMAGE_NUM_TILES])
        .map(|s| s.to_string())
        .collect();
    let df = ParquetReader::new(file)
        .with_columns(Some(columns))
        .finish()
        .map_err(polars_at(path))?;
    let u64_ = DataType::UInt64;
    df.lazy()
        .select([
            col(c::SOURCE),
            col(c::MODALITY),
            col(c::LENGTH).cast(u64_.clone()),
            col(c::NUM_IMAGE_TOKENS)
                .cast(u64_.clone())
                .alias("image_tokens"),
            col(c::TRUNCATED).cast(u64_.clone()),
            col(c::GROUP),
            (col(c::LABELS).list().len().cast(u64_.clone())
                - col(c::LABELS)
                    .list()
                    .count_matches(lit(IGNORE_INDEX))
                    .cast(u64_.clone()))
            .alias("supervised"),
            col(IMAGE_NUM_TILES),
            col(IMAGE_NUM_TILES)
                .list()
                .len()
                .cast(u64_.clone())
                .alias("images"),
            col(IMAGE_NUM_TILES)
                .list()
                .sum()
                .cast(u64_.clone())
                .fill_null(lit(0u64))
                .alias("tiles"),
            col(c::IMAGE_PROCESSING),
            col(c::IMAGE_GRID_COLS),
            col(c::IMAGE_GRID_ROWS),
        ])
        .collect()
        .map_err(polars_at(path))
}

/// All shards' rows (small columns), in manifest shard order and file row order.
pub fn read_rows(build: &BuildDir) -> Result<DataFrame, InspectError> {
    let mut all: Option<DataFrame> = None;
    for shard in &build.manifest.shards {
        let df = read_shard(build, shard)?;
        match all.as_mut() {
            None => all = Some(df),
            Some(a) => {
                a.vstack_mut_owned(df)?;
            }
        }
    }
    match all {
        Some(mut a) => {
            a.rechunk_mut_par();
            Ok(a)
        }
        None => Err(InspectError::Usage(format!(
            "{}: the manifest lists no shard",
            build.dir.display()
        ))),
    }
}

pub fn u64s(df: &DataFrame, name: &str) -> Result<Vec<u64>, InspectError> {
    let column = df.column(name)?.cast(&DataType::UInt64)?;
    Ok(column
        .as_materialized_series()
        .u64()?
        .iter()
        .map(|v| v.unwrap_or(0))
        .collect())
}

pub(super) fn f64s(df: &DataFrame, name: &str) -> Result<Vec<f64>, InspectError> {
    let column = df.column(name)?.cast(&DataType::Float64)?;
    Ok(column
        .as_materialized_series()
        .f64()?
        .iter()
        .map(|v| v.unwrap_or(0.0))
        .collect())
}

pub fn strings(df: &DataFrame, name: &str) -> Result<Vec<String>, InspectError> {
    Ok(df
        .column(name)?
        .as_materialized_series()
        .str()?
        .iter()
        .map(|v| v.unwrap_or("").to_string())
        .collect())
}
