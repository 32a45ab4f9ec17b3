//! The trainer's data path: shard index → epoch plan → prefetching loader → collated batches.
//!
//! - [`index`]: the manifest plus each row group's samples and exact lengths (no tiles read).
//! - [`plan`]: the per-epoch, per-rank plan, token-balanced and resumable ([`DataState`]).
//! - [`loader`]: N worker threads reading whole row groups, delivering [`Batch`]es in plan order.
//! - [`collate`]: padding, masks, labels and CLIP normalisation (`llava_formats::normalize`).
//! - [`synthetic`]: shards in the real format for tests and `loader-bench`.
//!
//! Depends on `llava-formats` only (never on the pipeline or imaging crates).

pub mod collate;
pub mod error;
pub mod index;
pub mod loader;
mod pack_across;
pub mod plan;
mod read;
pub mod rng;
pub mod source;
pub mod synthetic;

pub use collate::{Batch, ImageInfo, PixelFormat, Pixels, SampleId, PAD_ID};
pub use error::{CorruptRow, DataError, DataResult};
pub use index::{IndexOptions, Modality, SampleRef, ShardIndex};
pub use loader::{Loader, LoaderConfig, OnCorrupt};
pub use plan::{
    Balance, DataState, EpochPlan, PlanConfig, PlannedBatch, RankBatches, RowSlice, Steps,
};
