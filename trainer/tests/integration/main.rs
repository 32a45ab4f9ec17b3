//! The trainer's integration tests, as one test binary: each binary links candle and the whole
//! trainer (~100 MB+), so one binary instead of fourteen saves gigabytes of `target/` and a dozen
//! links per build. Run one file's tests with a filter: `cargo test -p llava-trainer --test
//! integration parity::`.

mod attention;
mod cli;
mod common;
mod corrupt;
mod data_pixels;
mod generate;
mod gpu_check;
mod launch;
mod multiproc;
mod optim_parity;
mod packing;
mod packing_resume;
mod param_counts;
mod parity;
mod recompute;
mod signals;
mod weights;
