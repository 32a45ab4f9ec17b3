//! The loader's integration tests, as one test binary: shard index, epoch plan (against the
//! reference sampler), cross-batch packing and the prefetching workers, on synthetic shards.
//! Run one file's tests with a filter: `cargo test -p llava-loader --test integration plan::`.

mod loader;
mod plan;
mod plan_across;
mod plan_reference;
