//! Subcommands of the `llava-trainer` binary.

pub mod init;
pub mod loader_bench;
pub mod run;
