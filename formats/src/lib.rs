//! The contract between `llava-data` (pipeline) and `llava-trainer`: the `datasets.toml` model,
//! the shard schema and the manifest, and the anyres geometry that fixes an image's token count.
//! Both halves depend on this crate and on nothing of each other.

#[cfg(feature = "cli")]
pub mod cli;
pub mod config;
pub mod constants;
pub mod geometry;
pub mod located;
pub mod manifest;
pub mod normalize;
pub mod pack_stream;
pub mod packing;
pub mod process;
pub mod progress;
pub mod rng;
pub mod schema;
pub mod tile_codec;
