//! `llava-loader`: reads llava-data shards for training. Shard index → epoch plan → prefetching
//! workers → collated batches, from local files or object storage.
//!
//! - [`index`]: the manifest plus each row group's samples and exact lengths (no tiles read).
//! - [`plan`]: the per-epoch, per-rank plan, token-balanced and resumable ([`DataState`]).
//! - [`workers`]: N worker threads reading whole row groups, delivering [`Batch`]es in plan order.
//! - [`collate`]: padding, masks, labels and CLIP normalisation (`llava_formats::normalize`); the
//!   tiles were decoded as their row group was read (`read`, `llava_formats::tile_codec`).
//! - [`source`]: where shard bytes come from (a path, or `llava-storage` ranges with a cache).
//! - [`synthetic`]: shards in the real format for tests and `loader-bench`; [`bench`]: what
//!   `loader-bench` measures.
//!
//! Its users are `llava-trainer` and the Python package (`python/`, `llava_data.ShardDataset`).
//! It depends on `llava-formats` and `llava-storage` only: no candle, no pipeline, no imaging,
//! so that `pip install ./python` compiles no tensor library.

pub mod bench;
pub mod collate;
pub mod error;
pub mod index;
mod pack_across;
pub mod plan;
mod read;
pub mod rng;
pub mod source;
pub mod synthetic;
pub mod workers;

pub use collate::{Batch, ImageInfo, PixelFormat, Pixels, SampleId, PAD_ID};
pub use error::{CorruptRow, DataError, DataResult};
pub use index::{IndexOptions, Modality, SampleRef, ShardIndex};
pub use plan::{
    Balance, DataState, EpochPlan, PlanConfig, PlannedBatch, RankBatches, RowSlice, Steps,
};
pub use workers::{Loader, LoaderConfig, OnCorrupt};
