//! What `inspect DIR` reports (`--json` prints it as is; fields documented in docs/data.md), and
//! the options that shape it.

use serde::{Deserialize, Serialize};

use crate::inspect::padding::{Packed, Padding};

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
    /// With `pack_length`: also report the rows packed across batches, as the trainer's
    /// `pack_across_batches` plan makes them in epoch 0 with `seed`.
    pub across_batches: bool,
    /// The training seed of that plan (default: the build's seed).
    pub seed: Option<u64>,
}

impl Default for SummaryOptions {
    fn default() -> Self {
        SummaryOptions {
            batch_size: None,
            world_size: 1,
            bins: 16,
            pack_length: None,
            across_batches: false,
            seed: None,
        }
    }
}

/// Everything `inspect DIR` prints; `--json` prints it as is (fields documented in docs/data.md).
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
    /// Images per number of tiles (base tile included), sorted by tiles.
    #[serde(default)]
    pub tiles_per_image: Vec<TilesCount>,
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
pub struct TilesCount {
    pub tiles: u32,
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
    /// With `--pack-across-batches`: the epoch's final rows that mix modalities (the pooled
    /// leftovers); the modalities' `across` count only their rows of one modality, `total` all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub across_mixed: Option<Packed>,
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
    /// Rows packed across batches, one row per micro-batch (with `--pack-across-batches`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub across: Option<Packed>,
}
