//! The summary of a build, read through polars from the small columns of the shards (never
//! `tiles`, never `input_ids`): per source and modality counts and length percentiles, a length
//! histogram per modality, grid shapes, truncations, rejects and padding efficiency. One module
//! per section; [`summarize`] puts them together.

mod counts;
mod grids;
mod padding_report;
mod rejects;
mod report;
mod rows;

use llava_formats::schema::col as c;

pub use counts::histogram;
pub use report::*;
pub use rows::{read_rows, strings, u64s};

use crate::inspect::{BuildDir, InspectError};

/// Reads and summarises a build.
pub fn summarize(build: &BuildDir, options: &SummaryOptions) -> Result<Summary, InspectError> {
    summarize_rows(build, &read_rows(build)?, options)
}

/// Summarises the rows [`read_rows`] read (for a caller that uses them again: `--html`).
pub fn summarize_rows(
    build: &BuildDir,
    rows: &polars::prelude::DataFrame,
    options: &SummaryOptions,
) -> Result<Summary, InspectError> {
    let m = &build.manifest;
    let rows = rows.clone();
    let sources = counts::grouped_counts(&rows, &[c::SOURCE, c::MODALITY])?;
    let per_modality = counts::grouped_counts(&rows, &[c::MODALITY])?;
    let (modalities, padding) =
        padding_report::modality_sections(build, &rows, per_modality, options)?;
    Ok(Summary {
        dir: build.dir.display().to_string(),
        schema_version: m.schema_version,
        shards: m.shards.len(),
        samples: sources.iter().map(|s| s.samples).sum(),
        tokens: sources.iter().map(|s| s.tokens).sum(),
        supervised_tokens: sources.iter().map(|s| s.supervised_tokens).sum(),
        build: BuildInfo {
            seed: m.settings.seed,
            model_max_length: m.settings.model_max_length,
            batch_size: m.grouping.batch_size,
            group_size: m.grouping.group_size,
            groups: m.grouping.groups,
            batches: m.grouping.batches,
            tokenizer_sha256: m.tokenizer_sha256.clone(),
        },
        sources,
        modalities,
        grids: grids::grid_counts(&rows)?,
        tiles_per_image: grids::tiles_per_image(&rows)?,
        rejects: rejects::reject_summary(build)?,
        padding,
    })
}
