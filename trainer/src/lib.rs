//! Training model for LLaVA-NeXT (CLIP ViT-L/14-336 → mlp2x_gelu → Llama-3) on candle.
//!
//! Everything in the forward pass has a backward pass: candle-nn's fused softmax / norm / rope
//! kernels are inference-only and are replaced by the primitive-op forms in [`ops`].

pub mod attention;
pub mod bench;
pub mod checkpoint;
pub mod checkpoint_tokenizer;
pub mod clip;
pub mod data;
pub mod dist;
pub mod error;
pub mod generate;
pub mod heap;
pub mod hf_tokenizer;
pub mod init;
pub mod json_file;
pub mod llama;
pub mod llava_next;
pub mod memory;
pub mod ops;
pub mod optim;
pub mod packing_bench;
pub mod parity;
pub mod projector;
pub mod schedule;
pub mod step;
pub mod torch_pickle;
pub mod train;
pub mod weights;

pub use error::{Error, Result};
pub use llava_next::{Batch, ImageMeta, LlavaNext, LlavaNextConfig, Output};
