//! The summary of a build, read through polars from the small columns of the shards (never
//! `tiles`, never `input_ids`): per source and modality counts and length percentiles, a length
//! histogram per modality, grid shapes, truncations, rejects and padding efficiency.

use std::collections::BTreeMap;
use std::fs::File;

use llava_formats::constants::IGNORE_INDEX;
use llava_formats::schema::col as c;
use polars::prelude::*;
use polars_io::parquet::read::ParquetReader;
use polars_io::SerReader;
use serde::{Deserialize, Serialize};

use super::padding::{grouped_batches, random_batches, Packed, Padding};
use super::{io_err, BuildDir, InspectError};

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

#[derive(Debug, Clone)]
pub struct SummaryOptions {
    /// Batch size of the padding report (default: the build's).
    pub batch_size: Option<usize>,
    /// Ranks per step of the padding report.
    pub world_size: usize,
    /// Bins of each length histogram.
    pub bins: usize,
    /// Also report the grouped batches packed into rows of this many tokens.
    pub pack_length: Option<u32>,
}

impl Default for SummaryOptions {
    fn default() -> Self {
        SummaryOptions {
            batch_size: None,
            world_size: 1,
            bins: 16,
            pack_length: None,
        }
    }
}

/// Everything `inspect DIR` prints; `--json` prints it as is (fields documented in the README).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub dir: String,
    pub schema_version: u32,
    pub shards: usize,
    pub samples: u64,
    pub tokens: u64,
    pub supervised_tokens: u64,
    pub build: BuildInfo,
    /// One entry per (source, modality), sorted by source then modality.
    pub sources: Vec<Counts>,
    /// One entry per modality (`source` is `*`), with a histogram.
    pub modalities: Vec<ModalitySummary>,
    /// Images per (processing, grid); sorted by processing, then grid.
    pub grids: Vec<GridCount>,
    pub rejects: RejectSummary,
    pub padding: PaddingReport,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BuildInfo {
    pub seed: u64,
    pub model_max_length: usize,
    pub batch_size: usize,
    pub group_size: usize,
    pub groups: u64,
    pub batches: u64,
    pub tokenizer_sha256: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Counts {
    pub source: String,
    pub modality: String,
    pub samples: u64,
    /// Sum of exact lengths (text + image tokens).
    pub tokens: u64,
    /// Positions whose label is not -100.
    pub supervised_tokens: u64,
    pub image_tokens: u64,
    pub images: u64,
    pub tiles: u64,
    /// Samples cut at `model_max_length`.
    pub truncated: u64,
    pub length: LengthStats,
}

/// Exact lengths; percentiles are nearest-rank (polars `quantile(q, nearest)`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LengthStats {
    pub min: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub max: u64,
    pub mean: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModalitySummary {
    #[serde(flatten)]
    pub counts: Counts,
    /// Equal-width bins `[lo, hi)` from 0 to the max length (the last one includes `hi`).
    pub histogram: Vec<Bin>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Bin {
    pub lo: u64,
    pub hi: u64,
    pub count: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GridCount {
    /// `anyres`, `pad` or `square`.
    pub processing: String,
    /// Columns × rows of the anyres grid (width × height, as the pinpoints); 1 × 1 otherwise.
    pub cols: u32,
    pub rows: u32,
    pub images: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RejectSummary {
    pub total: u64,
    /// Per source, from the manifest: records read, written, rejected.
    pub by_source: Vec<SourceRejects>,
    /// Per kind (most frequent first), from `rejects.jsonl`, with the first reason seen.
    pub by_kind: Vec<KindCount>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceRejects {
    pub source: String,
    pub read: u64,
    pub written: u64,
    pub rejected: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KindCount {
    pub kind: String,
    pub count: u64,
    pub example: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PaddingReport {
    pub batch_size: usize,
    pub world_size: usize,
    /// How the random baseline was drawn.
    pub random: String,
    pub modalities: Vec<ModalityPadding>,
    pub total: ModalityPadding,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModalityPadding {
    pub modality: String,
    /// The build's grouping (see `inspect::padding`).
    pub grouped: Padding,
    /// Seeded random batches of the same samples.
    pub random: Padding,
    /// The grouped batches packed (with `--packing`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packed: Option<Packed>,
}

/// Reads one shard's small columns and reduces them to one row per sample.
fn read_shard(path: &std::path::Path) -> Result<DataFrame, InspectError> {
    let file = File::open(path).map_err(io_err(path))?;
    let columns = COLUMNS
        .iter()
        .chain([&IMAGE_NUM_TILES])
        .map(|s| s.to_string())
        .collect();
    let df = ParquetReader::new(file)
        .with_columns(Some(columns))
        .finish()
        .map_err(|e| InspectError::Parquet {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    let u64_ = DataType::UInt64;
    Ok(df
        .lazy()
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
        .collect()?)
}

/// All shards' rows (small columns), in manifest shard order and file row order.
pub fn read_rows(build: &BuildDir) -> Result<DataFrame, InspectError> {
    let mut all: Option<DataFrame> = None;
    for shard in &build.manifest.shards {
        let df = read_shard(&build.shard_path(&shard.file))?;
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

fn count_aggs() -> Vec<Expr> {
    let q = |p: f64, name: &str| {
        col(c::LENGTH)
            .quantile(lit(p), QuantileMethod::Nearest)
            .alias(name)
    };
    vec![
        len().cast(DataType::UInt64).alias("samples"),
        col(c::LENGTH).sum().alias("tokens"),
        col("supervised").sum(),
        col("image_tokens").sum(),
        col("images").sum(),
        col("tiles").sum(),
        col(c::TRUNCATED).sum(),
        col(c::LENGTH).min().alias("min"),
        q(0.5, "p50"),
        q(0.9, "p90"),
        q(0.99, "p99"),
        col(c::LENGTH).max().alias("max"),
        col(c::LENGTH).mean().alias("mean"),
    ]
}

fn u64s(df: &DataFrame, name: &str) -> Result<Vec<u64>, InspectError> {
    let column = df.column(name)?.cast(&DataType::UInt64)?;
    Ok(column
        .as_materialized_series()
        .u64()?
        .iter()
        .map(|v| v.unwrap_or(0))
        .collect())
}

fn f64s(df: &DataFrame, name: &str) -> Result<Vec<f64>, InspectError> {
    let column = df.column(name)?.cast(&DataType::Float64)?;
    Ok(column
        .as_materialized_series()
        .f64()?
        .iter()
        .map(|v| v.unwrap_or(0.0))
        .collect())
}

fn strings(df: &DataFrame, name: &str) -> Result<Vec<String>, InspectError> {
    Ok(df
        .column(name)?
        .as_materialized_series()
        .str()?
        .iter()
        .map(|v| v.unwrap_or("").to_string())
        .collect())
}

/// Rows of an aggregated frame → [`Counts`] (`source` is `*` when the frame has no source).
fn counts_of(df: &DataFrame) -> Result<Vec<Counts>, InspectError> {
    let n = df.height();
    let sources = if df.column(c::SOURCE).is_ok() {
        strings(df, c::SOURCE)?
    } else {
        vec!["*".to_string(); n]
    };
    let modality = strings(df, c::MODALITY)?;
    let [samples, tokens, supervised, image_tokens, images, tiles, truncated, min, p50, p90, p99, max] =
        [
            "samples",
            "tokens",
            "supervised",
            "image_tokens",
            "images",
            "tiles",
            c::TRUNCATED,
            "min",
            "p50",
            "p90",
            "p99",
            "max",
        ]
        .map(|name| u64s(df, name));
    let (samples, tokens, supervised, image_tokens, images, tiles, truncated) = (
        samples?,
        tokens?,
        supervised?,
        image_tokens?,
        images?,
        tiles?,
        truncated?,
    );
    let (min, p50, p90, p99, max) = (min?, p50?, p90?, p99?, max?);
    let mean = f64s(df, "mean")?;
    Ok((0..n)
        .map(|i| Counts {
            source: sources[i].clone(),
            modality: modality[i].clone(),
            samples: samples[i],
            tokens: tokens[i],
            supervised_tokens: supervised[i],
            image_tokens: image_tokens[i],
            images: images[i],
            tiles: tiles[i],
            truncated: truncated[i],
            length: LengthStats {
                min: min[i],
                p50: p50[i],
                p90: p90[i],
                p99: p99[i],
                max: max[i],
                mean: mean[i],
            },
        })
        .collect())
}

/// Equal-width bins from 0 to `max` (bin width rounded up to a "nice" 1/2/5 × 10^k).
pub fn histogram(lengths: &[u64], bins: usize) -> Vec<Bin> {
    let max = lengths.iter().copied().max().unwrap_or(0);
    let bins = bins.max(1) as u64;
    let raw = (max + 1).div_ceil(bins).max(1);
    let mut width = 1u64;
    'nice: loop {
        for m in [1, 2, 5] {
            if width * m >= raw {
                width *= m;
                break 'nice;
            }
        }
        width *= 10;
    }
    let n = (max / width + 1) as usize;
    let mut out: Vec<Bin> = (0..n as u64)
        .map(|i| Bin {
            lo: i * width,
            hi: (i + 1) * width,
            count: 0,
        })
        .collect();
    for &l in lengths {
        out[(l / width) as usize].count += 1;
    }
    out
}

/// Reads and summarises a build.
pub fn summarize(build: &BuildDir, options: &SummaryOptions) -> Result<Summary, InspectError> {
    let m = &build.manifest;
    let rows = read_rows(build)?;
    let sort = |keys: &[&str]| {
        (
            keys.iter().map(|k| col(*k)).collect::<Vec<_>>(),
            keys.iter().map(|k| k.to_string()).collect::<Vec<_>>(),
        )
    };

    let (by, keys) = sort(&[c::SOURCE, c::MODALITY]);
    let by_source = rows
        .clone()
        .lazy()
        .group_by(by)
        .agg(count_aggs())
        .sort(keys, Default::default())
        .collect()?;
    let sources = counts_of(&by_source)?;

    let (by, keys) = sort(&[c::MODALITY]);
    let by_modality = rows
        .clone()
        .lazy()
        .group_by(by)
        .agg(count_aggs())
        .sort(keys, Default::default())
        .collect()?;

    // Per modality: lengths in row order (histogram, padding) and group ids (padding).
    let modality = strings(&rows, c::MODALITY)?;
    let length = u64s(&rows, c::LENGTH)?;
    let group = u64s(&rows, c::GROUP)?;
    let batch_size = options.batch_size.unwrap_or(m.grouping.batch_size).max(1);
    let world_size = options.world_size.max(1);
    let mut modalities = Vec::new();
    let mut paddings = Vec::new();
    for counts in counts_of(&by_modality)? {
        let idx: Vec<usize> = (0..rows.height())
            .filter(|&i| modality[i] == counts.modality)
            .collect();
        let lengths: Vec<u64> = idx.iter().map(|&i| length[i]).collect();
        let pairs: Vec<(u32, u32)> = idx
            .iter()
            .map(|&i| (group[i] as u32, length[i] as u32))
            .collect();
        let lengths32: Vec<u32> = pairs.iter().map(|p| p.1).collect();
        let grouped = grouped_batches(&pairs, batch_size);
        let packed = match options.pack_length {
            Some(n) => Some(Packed::of(&grouped, n, world_size).map_err(|e| {
                InspectError::Usage(format!(
                    "{}: {e}; samples are never split (the build's model_max_length is {})",
                    counts.modality, m.settings.model_max_length
                ))
            })?),
            None => None,
        };
        paddings.push(ModalityPadding {
            modality: counts.modality.clone(),
            packed,
            grouped: Padding::of(&grouped, world_size),
            random: Padding::of(
                &random_batches(&lengths32, batch_size, m.settings.seed, &counts.modality),
                world_size,
            ),
        });
        modalities.push(ModalitySummary {
            histogram: histogram(&lengths, options.bins),
            counts,
        });
    }
    let total = paddings.iter().fold(
        ModalityPadding {
            modality: "*".into(),
            grouped: Padding::default(),
            random: Padding::default(),
            packed: options.pack_length.map(|n| Packed {
                pack_length: n,
                ..Packed::default()
            }),
        },
        |acc, p| ModalityPadding {
            modality: acc.modality,
            grouped: acc.grouped.add(&p.grouped),
            random: acc.random.add(&p.random),
            packed: match (&acc.packed, &p.packed) {
                (Some(a), Some(b)) => Some(a.add(b)),
                _ => None,
            },
        },
    );

    let (by, keys) = sort(&[c::IMAGE_PROCESSING, c::IMAGE_GRID_COLS, c::IMAGE_GRID_ROWS]);
    let grid_df = rows
        .clone()
        .lazy()
        .select([
            col(c::IMAGE_PROCESSING),
            col(c::IMAGE_GRID_COLS),
            col(c::IMAGE_GRID_ROWS),
        ])
        .explode(
            cols([c::IMAGE_PROCESSING, c::IMAGE_GRID_COLS, c::IMAGE_GRID_ROWS]),
            ExplodeOptions {
                empty_as_null: false,
                keep_nulls: false,
            },
        )
        .group_by(by)
        .agg([len().cast(DataType::UInt64).alias("images")])
        .sort(keys, Default::default())
        .collect()?;
    let processing = strings(&grid_df, c::IMAGE_PROCESSING)?;
    let gcols = u64s(&grid_df, c::IMAGE_GRID_COLS)?;
    let grows = u64s(&grid_df, c::IMAGE_GRID_ROWS)?;
    let gimages = u64s(&grid_df, "images")?;
    let grids = (0..grid_df.height())
        .map(|i| GridCount {
            processing: processing[i].clone(),
            cols: gcols[i] as u32,
            rows: grows[i] as u32,
            images: gimages[i],
        })
        .collect();

    let mut kinds: BTreeMap<String, (u64, String)> = BTreeMap::new();
    for r in build.rejects()? {
        let e = kinds.entry(r.kind.clone()).or_insert((0, r.reason.clone()));
        e.0 += 1;
    }
    let mut by_kind: Vec<KindCount> = kinds
        .into_iter()
        .map(|(kind, (count, example))| KindCount {
            kind,
            count,
            example,
        })
        .collect();
    by_kind.sort_by(|a, b| b.count.cmp(&a.count).then(a.kind.cmp(&b.kind)));
    let rejects = RejectSummary {
        total: m.totals.rejected,
        by_source: m
            .sources
            .iter()
            .map(|s| SourceRejects {
                source: s.name.clone(),
                read: s.read,
                written: s.written,
                rejected: s.rejected,
            })
            .collect(),
        by_kind,
    };

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
        grids,
        rejects,
        padding: PaddingReport {
            batch_size,
            world_size,
            random: format!(
                "seeded shuffle within each modality (SplitMix64, seed {}, purpose inspect:random:<modality>), cut into batches of {batch_size}",
                m.settings.seed
            ),
            modalities: paddings,
            total,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_bins_are_nice_and_complete() {
        let h = histogram(&[0, 5, 99, 100, 1999], 10);
        assert_eq!(h[0].hi - h[0].lo, 200);
        assert_eq!(h.iter().map(|b| b.count).sum::<u64>(), 5);
        assert_eq!(h.last().map(|b| b.count), Some(1));
    }
}
