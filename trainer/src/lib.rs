//! `llava-trainer`'s library: LLaVA-NeXT (CLIP ViT-L/14-336 → mlp2x_gelu → Llama-3) trained on
//! candle from `llava-data` shards, read by `llava-loader`.
//!
//! One folder per concern:
//! - [`model`]: the network (config, batches, CLIP, projector, Llama-3, attention, the
//!   differentiable ops), forward and loss.
//! - [`train`]: the training loop (run, step, optimizer, schedule, evaluation, logging).
//! - [`io`]: model files on disk (weights, torch pickles, checkpoints, HF tokenizer files, init).
//! - [`parallel`]: launching ranks, rendezvous, collectives and ZeRO.
//! - [`diag`]: measuring tools (bench, parity, memory plan, heap).
//! - [`generate`]: text generation from a checkpoint.
//!
//! The binary's `cli/` only parses flags and calls into these.

pub mod diag;
pub mod error;
pub mod generate;
pub mod io;
pub mod model;
pub mod parallel;
pub mod train;

pub use error::{Error, Result};
pub use model::{Batch, ImageMeta, LlavaNext, LlavaNextConfig, Output};
