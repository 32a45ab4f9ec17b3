//! Measuring tools: `bench` (synthetic and real-shard steps), `parity` (against HF goldens), the
//! per-rank memory plan and live-heap counting.

pub mod bench;
pub mod heap;
pub mod memory;
pub mod packing_bench;
pub mod parity;
