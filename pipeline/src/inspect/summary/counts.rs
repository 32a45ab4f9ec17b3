//! Counts and exact-length percentiles per (source, modality) and per modality, and the length
//! histograms.

use llava_formats::schema::col as c;
use polars::prelude::*;

use super::report::{Bin, Counts, LengthStats};
use super::rows::{f64s, strings, u64s};
use crate::inspect::InspectError;

/// Counts grouped by `keys` (sorted by them); `source` is `*` when it is not a key.
pub(super) fn grouped_counts(rows: &DataFrame, keys: &[&str]) -> Result<Vec<Counts>, InspectError> {
    let by: Vec<Expr> = keys.iter().map(|k| col(*k)).collect();
    let names: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
    let df = rows
        .clone()
        .lazy()
        .group_by(by)
        .agg(count_aggs())
        .sort(names, Default::default())
        .collect()?;
    counts_of(&df)
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
