//! `--llm DIR --vision DIR [--projector FILE]`: a model assembled from its parts, the flags `init`
//! and `run` share.

use std::path::PathBuf;

#[derive(clap::Args, Debug, Clone, Default)]
pub struct ModelParts {
    /// Llama-3 checkpoint directory (with --vision; instead of one LlavaNext model).
    #[arg(long, value_name = "DIR")]
    pub llm: Option<PathBuf>,
    /// CLIP vision checkpoint directory (with --llm).
    #[arg(long, value_name = "DIR")]
    pub vision: Option<PathBuf>,
    /// Projector weights, e.g. stage 1's mm_projector.safetensors / .bin [default: a freshly
    /// initialised projector].
    #[arg(long, value_name = "FILE")]
    pub projector: Option<PathBuf>,
}
