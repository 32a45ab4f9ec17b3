//! The pipeline's integration tests, as one test binary: each binary links the pipeline, polars
//! and the image stack, so one binary instead of six saves gigabytes of `target/` and several
//! links per build. Run one file's tests with a filter: `cargo test -p llava-data --test
//! integration golden_tokens::`.

mod cli;
mod common;
mod golden_convert;
mod golden_tokens;
mod hostile_build;
mod inspect_cli;
mod mixture_props;
mod reject_attribution;
mod template_rules;
