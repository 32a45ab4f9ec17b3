//! Collation of one batch's rows into the plain arrays the model consumes.

use std::time::Duration;

use llava_formats::constants::IGNORE_INDEX;
use llava_formats::schema::ShardRow;

use super::error::CorruptRow;
use super::index::Modality;
use super::plan::{DataState, PlannedBatch};
use llava_formats::normalize::normalize_into;

/// Id written into padding positions. Any value works: padding is defined by `lengths` /
/// `attention_mask`, never by comparing ids with this (token 0 is a real token, `"!"`).
pub const PAD_ID: i32 = 0;

/// How tiles are handed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PixelFormat {
    /// CLIP-normalised float32, bit-exact with the reference.
    #[default]
    F32,
    /// The stored uint8 (normalise on the device: 4x less host memory and transfer).
    U8,
}

/// All tiles of a batch as one `[num_tiles, 3, tile_size, tile_size]` row-major array.
#[derive(Debug, Clone, PartialEq)]
pub enum Pixels {
    F32(Vec<f32>),
    U8(Vec<u8>),
}

impl Pixels {
    pub fn len(&self) -> usize {
        match self {
            Self::F32(v) => v.len(),
            Self::U8(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Which record a row of the batch is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SampleId {
    pub source: String,
    /// Position of the record in its source file.
    pub index: u64,
    pub id: String,
}

/// One image of the batch, in placeholder order (the order of the `-200`s, row by row).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// Sample of the batch (index into [`Batch::samples`]) the image belongs to.
    pub sample: usize,
    /// Row of the batch it is in (the sample's row; differs from `sample` when packed).
    pub row: usize,
    /// Original (decoded) size, what unpad uses.
    pub width: u32,
    pub height: u32,
    pub grid_cols: u32,
    pub grid_rows: u32,
    /// Tiles of this image in [`Batch::pixels`]: base first, then the grid row-major.
    pub num_tiles: u32,
    /// Feature tokens the model inserts for this image.
    pub image_tokens: u32,
    /// `anyres`, `pad` or `square`.
    pub processing: String,
}

/// One collated batch for one rank, as plain arrays (the model side turns them into tensors).
///
/// Shapes: `B = rows.len()` rows (one per sample, or several whole samples back to back when
/// packed), `L = seq_len` (longest row of `input_ids`, before image expansion). `input_ids`,
/// `labels` and `attention_mask` are `[B, L]` row-major, right padded with [`PAD_ID`], `-100` and
/// `0` past each row's `lengths[i]`; `segments[i]` are the `input_ids` lengths of row i's
/// samples. Every image is still one `-200` in `input_ids`. `pixels` is `[num_tiles, 3, tile_size, tile_size]`: all tiles of all images
/// in placeholder order. An empty batch (`B = 0`, see `plan`) has no rows and must still be
/// stepped through (zero loss) to keep ranks in lock-step.
#[derive(Debug, Clone)]
pub struct Batch {
    pub epoch: u64,
    pub step: u64,
    pub rank: usize,
    /// `None` only for an empty batch.
    pub modality: Option<Modality>,
    pub samples: Vec<SampleId>,
    /// The samples (indices into `samples`) of each row, in order.
    pub rows: Vec<Vec<usize>>,
    /// `input_ids` length of each sample of each row (`segments[i].len() == rows[i].len()`).
    pub segments: Vec<Vec<usize>>,
    pub seq_len: usize,
    pub input_ids: Vec<i32>,
    pub labels: Vec<i32>,
    /// 1 for real tokens, 0 for padding; built from `lengths`.
    pub attention_mask: Vec<u8>,
    /// `input_ids` length per row (text tokens + one placeholder per image).
    pub lengths: Vec<usize>,
    /// Exact length per sample in the model (image placeholders expanded).
    pub model_lengths: Vec<u32>,
    /// Sum of `model_lengths`.
    pub tokens: u64,
    pub images: Vec<ImageInfo>,
    pub tile_size: usize,
    pub num_tiles: usize,
    pub pixels: Pixels,
    /// Data state to save with a checkpoint taken after this step.
    pub next_state: DataState,
    /// Shard bytes read for this batch.
    pub bytes_read: u64,
    /// Worker time to read, decode and collate this batch.
    pub load_time: Duration,
    /// Planned samples left out because their row checksum did not match (only with
    /// [`OnCorrupt::Skip`](super::workers::OnCorrupt); otherwise such a row fails the batch).
    /// The batch holds the other samples, collated as if those were never planned.
    pub skipped: Vec<CorruptRow>,
}

impl Batch {
    /// Samples in the batch.
    pub fn batch_size(&self) -> usize {
        self.samples.len()
    }

    /// Rows of the model's `[B, L]` inputs (fewer than the samples when packed).
    pub fn num_rows(&self) -> usize {
        self.rows.len()
    }

    /// Whether some row holds more than one sample.
    pub fn is_packed(&self) -> bool {
        self.rows.iter().any(|r| r.len() > 1)
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// `[num_tiles, 3, tile_size, tile_size]`.
    pub fn pixel_shape(&self) -> [usize; 4] {
        [self.num_tiles, 3, self.tile_size, self.tile_size]
    }
}

/// Collates rows that the reader has already checked (ids/labels same length, one `-200` per
/// image, one tile of `3·S·S` bytes per tile of each image).
pub fn collate(
    plan: &PlannedBatch,
    rows: &[ShardRow],
    format: PixelFormat,
    tile_size: usize,
) -> Batch {
    // `plan.rows` lays the samples out; a plan without rows means one sample per row.
    let layout: Vec<Vec<usize>> = if plan.rows.is_empty() {
        (0..rows.len()).map(|i| vec![i]).collect()
    } else {
        plan.rows.clone()
    };
    let b = layout.len();
    let lengths: Vec<usize> = layout
        .iter()
        .map(|r| r.iter().map(|&s| rows[s].input_ids.len()).sum())
        .collect();
    let seq_len = lengths.iter().copied().max().unwrap_or(0);
    let mut input_ids = vec![PAD_ID; b * seq_len];
    let mut labels = vec![IGNORE_INDEX; b * seq_len];
    let mut attention_mask = vec![0u8; b * seq_len];
    let mut images = Vec::new();
    let mut segments = Vec::with_capacity(b);
    // Tiles follow the images' placeholder order: row by row, sample by sample.
    let mut tile_order = Vec::with_capacity(rows.len());
    for (i, row_samples) in layout.iter().enumerate() {
        let mut at = i * seq_len;
        let mut segs = Vec::with_capacity(row_samples.len());
        for &s in row_samples {
            let r = &rows[s];
            let n = r.input_ids.len();
            input_ids[at..at + n].copy_from_slice(&r.input_ids);
            labels[at..at + n].copy_from_slice(&r.labels);
            attention_mask[at..at + n].fill(1);
            at += n;
            segs.push(n);
            tile_order.push(s);
            images.extend(r.images.iter().map(|m| ImageInfo {
                sample: s,
                row: i,
                width: m.width,
                height: m.height,
                grid_cols: m.grid_cols,
                grid_rows: m.grid_rows,
                num_tiles: m.num_tiles,
                image_tokens: m.image_tokens,
                processing: m.processing.clone(),
            }));
        }
        segments.push(segs);
    }
    let num_tiles: usize = rows.iter().map(|r| r.tiles.len()).sum();
    let plane = tile_size * tile_size;
    let tile_bytes = 3 * plane;
    let tiles = tile_order.iter().flat_map(|&s| &rows[s].tiles);
    let pixels = match format {
        PixelFormat::U8 => {
            let mut out = Vec::with_capacity(num_tiles * tile_bytes);
            for t in tiles {
                out.extend_from_slice(t);
            }
            Pixels::U8(out)
        }
        PixelFormat::F32 => {
            let mut out = vec![0f32; num_tiles * tile_bytes];
            for (t, dst) in tiles.zip(out.chunks_mut(tile_bytes)) {
                normalize_into(t, plane, dst);
            }
            Pixels::F32(out)
        }
    };
    Batch {
        epoch: plan.epoch,
        step: plan.step,
        rank: plan.rank,
        modality: plan.modality,
        samples: rows
            .iter()
            .map(|r| SampleId {
                source: r.source.clone(),
                index: r.index,
                id: r.id.clone(),
            })
            .collect(),
        rows: layout,
        segments,
        seq_len,
        input_ids,
        labels,
        attention_mask,
        lengths,
        model_lengths: rows.iter().map(|r| r.length).collect(),
        tokens: rows.iter().map(|r| u64::from(r.length)).sum(),
        images,
        tile_size,
        num_tiles,
        pixels,
        next_state: plan.next_state,
        bytes_read: 0,
        load_time: Duration::ZERO,
        skipped: Vec::new(),
    }
}

/// `plan` without the samples at `skipped` (positions in `plan.samples`, ascending): the rows'
/// sample indices renumbered, rows left empty dropped. The batch stays well-formed (a smaller
/// batch, possibly an empty one, which every rank still steps through).
pub(crate) fn without_samples(plan: &PlannedBatch, skipped: &[usize]) -> PlannedBatch {
    let kept = |s: usize| skipped.binary_search(&s).is_err();
    let renumber = |s: usize| s - skipped.partition_point(|&k| k < s);
    let rows = plan
        .rows
        .iter()
        .map(|r| {
            r.iter()
                .copied()
                .filter(|&s| kept(s))
                .map(renumber)
                .collect::<Vec<_>>()
        })
        .filter(|r| !r.is_empty())
        .collect();
    let samples: Vec<_> = plan
        .samples
        .iter()
        .enumerate()
        .filter(|(i, _)| kept(*i))
        .map(|(_, s)| *s)
        .collect();
    PlannedBatch {
        tokens: samples.iter().map(|s| u64::from(s.length)).sum(),
        samples,
        rows,
        parts: plan.parts.clone(),
        ..*plan
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SampleRef;

    #[test]
    fn without_samples_renumbers_rows() {
        let sample = |index| SampleRef {
            source: 0,
            index,
            length: 10,
        };
        let plan = PlannedBatch {
            epoch: 0,
            step: 3,
            rank: 0,
            modality: Some(Modality::Text),
            parts: Vec::new(),
            samples: (0..5).map(sample).collect(),
            rows: vec![vec![0, 1], vec![2], vec![3, 4]],
            tokens: 50,
            next_state: DataState::new(0),
        };
        let out = without_samples(&plan, &[1, 2]);
        assert_eq!(out.rows, vec![vec![0], vec![1, 2]]);
        assert_eq!(
            out.samples.iter().map(|s| s.index).collect::<Vec<_>>(),
            [0, 3, 4]
        );
        assert_eq!(out.tokens, 30);
        let none = without_samples(&plan, &[0, 1, 2, 3, 4]);
        assert!(none.rows.is_empty() && none.samples.is_empty());
    }
}
