//! The end-to-end tests across `llava-data` and `llava-trainer`, as one test binary (see
//! Cargo.toml; `pass1_cache.rs` has a binary of its own). Run one file's tests with a filter:
//! `cargo test -p llava-e2e --test e2e train::`.

mod build_to_loader;
mod checkpoint_tokenizer;
mod data_build;
mod generate;
mod inspect;
mod integrity;
mod object_store;
mod pack_across;
mod readme;
mod recipe;
mod train;
