//! Images per (processing, anyres grid).

use llava_formats::schema::col as c;
use polars::prelude::*;

use super::report::{GridCount, TilesCount};
use super::rows::{strings, u64s};
use crate::inspect::InspectError;

/// One entry per (processing, cols, rows), sorted by them; every image of every sample counts.
pub(super) fn grid_counts(rows: &DataFrame) -> Result<Vec<GridCount>, InspectError> {
    let keys = [c::IMAGE_PROCESSING, c::IMAGE_GRID_COLS, c::IMAGE_GRID_ROWS];
    let grid_df = rows
        .clone()
        .lazy()
        .select(keys.map(col))
        .explode(
            cols(keys),
            ExplodeOptions {
                empty_as_null: false,
                keep_nulls: false,
            },
        )
        .group_by(keys.map(col))
        .agg([len().cast(DataType::UInt64).alias("images")])
        .sort(keys.map(String::from), Default::default())
        .collect()?;
    let processing = strings(&grid_df, c::IMAGE_PROCESSING)?;
    let gcols = u64s(&grid_df, c::IMAGE_GRID_COLS)?;
    let grows = u64s(&grid_df, c::IMAGE_GRID_ROWS)?;
    let gimages = u64s(&grid_df, "images")?;
    Ok((0..grid_df.height())
        .map(|i| GridCount {
            processing: processing[i].clone(),
            cols: gcols[i] as u32,
            rows: grows[i] as u32,
            images: gimages[i],
        })
        .collect())
}

/// Images per number of tiles, sorted by tiles.
pub(super) fn tiles_per_image(rows: &DataFrame) -> Result<Vec<TilesCount>, InspectError> {
    let df = rows
        .clone()
        .lazy()
        .select([col(c::IMAGE_NUM_TILES)])
        .explode(
            cols([c::IMAGE_NUM_TILES]),
            ExplodeOptions {
                empty_as_null: false,
                keep_nulls: false,
            },
        )
        .group_by([col(c::IMAGE_NUM_TILES)])
        .agg([len().cast(DataType::UInt64).alias("images")])
        .sort([c::IMAGE_NUM_TILES], Default::default())
        .collect()?;
    let tiles = u64s(&df, c::IMAGE_NUM_TILES)?;
    let images = u64s(&df, "images")?;
    Ok(tiles
        .into_iter()
        .zip(images)
        .map(|(tiles, images)| TilesCount {
            tiles: tiles as u32,
            images,
        })
        .collect())
}
