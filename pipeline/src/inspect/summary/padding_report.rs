//! Padding efficiency per modality: the build's grouped batches against seeded random batches of
//! the same samples (and, with `--packing`, the grouped batches packed into rows), plus the total.

use llava_formats::schema::col as c;
use polars::prelude::*;

use super::counts::histogram;
use super::report::{Counts, ModalityPadding, ModalitySummary, PaddingReport, SummaryOptions};
use super::rows::{strings, u64s};
use crate::inspect::padding::{grouped_batches, random_batches, Packed, Padding};
use crate::inspect::{BuildDir, InspectError};

/// The per-modality summaries (counts with a histogram) and the padding report.
pub(super) fn modality_sections(
    build: &BuildDir,
    rows: &DataFrame,
    per_modality: Vec<Counts>,
    options: &SummaryOptions,
) -> Result<(Vec<ModalitySummary>, PaddingReport), InspectError> {
    let m = &build.manifest;
    // Per modality: lengths in row order (histogram, padding) and group ids (padding).
    let modality = strings(rows, c::MODALITY)?;
    let length = u64s(rows, c::LENGTH)?;
    let group = u64s(rows, c::GROUP)?;
    let batch_size = options.batch_size.unwrap_or(m.grouping.batch_size).max(1);
    let world_size = options.world_size.max(1);
    // Packed across batches: all modalities at once (the epoch's final rows may mix them).
    let across_rows = match options.pack_length {
        Some(n) if options.across_batches => {
            let seed = options.seed.unwrap_or(m.settings.seed);
            Some(
                Packed::across_batches_rows(&group, &modality, &length, n, seed)
                    .map_err(|e| InspectError::Usage(format!("packing across batches: {e}")))?,
            )
        }
        _ => None,
    };
    let across_of = |keep: &dyn Fn(&Option<String>) -> bool| {
        let (rows, n) = (across_rows.as_ref()?, options.pack_length?);
        let tokens: Vec<u32> = rows.iter().filter(|r| keep(&r.0)).map(|r| r.1).collect();
        Some(Packed::of_rows(&tokens, n, world_size))
    };
    let mut modalities = Vec::new();
    let mut paddings = Vec::new();
    for counts in per_modality {
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
        let across = across_of(&|k| k.as_deref() == Some(counts.modality.as_str()));
        paddings.push(ModalityPadding {
            modality: counts.modality.clone(),
            packed,
            across,
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
    let mut total = paddings.iter().fold(
        ModalityPadding {
            modality: "*".into(),
            grouped: Padding::default(),
            random: Padding::default(),
            packed: options.pack_length.map(|n| Packed {
                pack_length: n,
                ..Packed::default()
            }),
            across: options
                .pack_length
                .filter(|_| options.across_batches)
                .map(|n| Packed {
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
            across: match (&acc.across, &p.across) {
                (Some(a), Some(b)) => Some(a.add(b)),
                _ => None,
            },
        },
    );
    total.across = across_of(&|_| true);
    let across_mixed = across_of(&|k| k.is_none()).filter(|p| p.rows > 0);
    let report = PaddingReport {
        batch_size,
        world_size,
        random: format!(
            "seeded shuffle within each modality (SplitMix64, seed {}, purpose inspect:random:<modality>), cut into batches of {batch_size}",
            m.settings.seed
        ),
        modalities: paddings,
        across_mixed,
        total,
    };
    Ok((modalities, report))
}
