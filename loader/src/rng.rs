//! The shared seeded RNG (`llava_formats::rng`), re-exported where the plan uses it.

pub use llava_formats::rng::{shuffle, SplitMix64};
