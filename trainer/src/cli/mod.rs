//! Subcommands of the `llava-trainer` binary.

pub mod loader_bench;
