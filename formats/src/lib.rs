//! The contract between `llava-data` (pipeline) and `llava-trainer`: the `datasets.toml` model,
//! the shard schema and the manifest. Both halves depend on this crate and on nothing of each other.

pub mod config;
pub mod constants;
pub mod located;
pub mod manifest;
pub mod normalize;
pub mod packing;
pub mod progress;
pub mod rng;
pub mod schema;
pub mod tile_codec;
