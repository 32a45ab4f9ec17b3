//! Subcommands of the `llava-trainer` binary.

pub mod bench;
pub mod device;
pub mod generate;
pub mod init;
pub mod loader_bench;
pub mod model_parts;
pub mod parity;
pub mod plan;
pub mod run;
pub mod run_config;
