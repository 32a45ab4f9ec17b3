//! The network: LLaVA-NeXT's vision tower, projector and language model, with a backward pass
//! for everything in the forward.
//!
//! - [`config`]: the model's shape from a `config.json`; [`geometry`]: an image's token count.
//! - [`batch`]: what the model takes in; [`prepare`]: the host-side plan of a batch.
//! - [`llava_next`]: forward and loss; [`segments`]: the same as the chain of segments the
//!   training step recomputes; [`trainable`]: the model over a `VarMap`, frozen parts detached.
//! - [`clip`], [`projector`], [`llama`]: the three networks, mirroring the checkpoint's names;
//!   [`attention`]: dense and blockwise attention behind one interface.
//! - [`ops`]: candle-nn's fused softmax / norm / rope kernels are inference-only; these are
//!   their primitive-op forms, which have a backward pass.

pub mod attention;
pub mod batch;
pub mod clip;
pub mod config;
pub mod geometry;
pub mod llama;
pub mod llava_next;
pub mod ops;
pub mod prepare;
pub mod projector;
pub mod segments;
pub mod trainable;

pub use batch::{Batch, ImageMeta};
pub use config::LlavaNextConfig;
pub use llava_next::{LlavaNext, Output};
