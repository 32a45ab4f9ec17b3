//! Measuring tools: `bench` (synthetic and real-shard steps), `parity` (against HF goldens), the
//! per-rank memory plan, the epoch plan's own memory (`plan_memory`) and live-heap counting.

pub mod bench;
pub mod heap;
pub mod memory;
pub mod packing_bench;
pub mod parity;
pub mod plan_memory;
