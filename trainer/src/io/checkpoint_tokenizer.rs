//! Which tokenizer a run's checkpoints carry, so that HF's `LlavaNextProcessor` can be built from
//! every checkpoint: the model folder's `tokenizer.json` (what `init --tokenizer` or `--llm`
//! put there), else the run's `--tokenizer` file (already checked against the shards), else the
//! file the shards' manifest names when its SHA-256 is the manifest's. With none of them the run
//! says at its start how to add one, instead of writing checkpoints HF cannot tokenize for.

use std::path::{Path, PathBuf};

use llava_formats::manifest::Manifest;

use crate::io::init::ModelSource;

/// Where the checkpoints' tokenizer files come from.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenizerSource {
    /// A model (or `--llm`) folder with `tokenizer.json`.
    ModelFolder(PathBuf),
    /// The run's `tokenizer` key / `--tokenizer` file.
    RunConfig(PathBuf),
    /// The file the shards' manifest names, whose SHA-256 matches.
    Manifest(PathBuf),
    /// None: why, and what to do.
    Missing(String),
}

impl TokenizerSource {
    /// The folder or `tokenizer.json` file for [`crate::io::hf_tokenizer::write_tokenizer_files`].
    pub fn path(&self) -> Option<&Path> {
        match self {
            Self::ModelFolder(p) | Self::RunConfig(p) | Self::Manifest(p) => Some(p),
            Self::Missing(_) => None,
        }
    }
}

fn sha256_of(path: &Path) -> std::io::Result<String> {
    use sha2::Digest;
    let bytes = std::fs::read(path)?;
    Ok(hex::encode(sha2::Sha256::digest(&bytes)))
}

/// Decides where the checkpoints' tokenizer comes from (see the module doc).
pub fn resolve(
    source: &ModelSource,
    run_tokenizer: Option<&Path>,
    manifest: &Manifest,
) -> TokenizerSource {
    let folder = source.model.as_ref().or(source.llm.as_ref());
    if let Some(dir) = folder.filter(|d| d.join("tokenizer.json").is_file()) {
        return TokenizerSource::ModelFolder(dir.clone());
    }
    if let Some(t) = run_tokenizer.filter(|t| t.is_file()) {
        return TokenizerSource::RunConfig(t.to_path_buf());
    }
    let why = match manifest.tokenizer_path.as_deref().map(PathBuf::from) {
        None => "the shards' manifest names no tokenizer file (built before llava-data recorded \
                 it)"
        .to_string(),
        Some(p) => match sha256_of(&p) {
            Ok(sha) if sha == manifest.tokenizer_sha256 => return TokenizerSource::Manifest(p),
            Ok(sha) => format!(
                "{} (named by the shards' manifest) has SHA-256 {sha}, the shards were built \
                 with {}",
                p.display(),
                manifest.tokenizer_sha256
            ),
            Err(e) => format!(
                "{} (named by the shards' manifest) cannot be read: {e}",
                p.display()
            ),
        },
    };
    let model = match folder {
        Some(d) => format!("the model folder {} has no tokenizer.json", d.display()),
        None => "no model folder".to_string(),
    };
    TokenizerSource::Missing(format!(
        "checkpoints will carry no tokenizer files, so HF's LlavaNextProcessor cannot be built \
         from them: {model} and {why}. To add them, pass --tokenizer PATH/tokenizer.json (the \
         file the shards were built with), or write the model with `llava-trainer init … \
         --tokenizer DIR`"
    ))
}

/// [`resolve`], logged once by the process that writes checkpoints; returns the path to hand
/// to [`crate::io::checkpoint::save_checkpoint`] (the one-line hook in `train::run_rank`).
pub fn for_checkpoints(
    source: &ModelSource,
    run_tokenizer: Option<&Path>,
    manifest: &Manifest,
    lead: bool,
) -> Option<PathBuf> {
    let found = resolve(source, run_tokenizer, manifest);
    if lead {
        match &found {
            TokenizerSource::Missing(advice) => tracing::warn!("{advice}"),
            TokenizerSource::ModelFolder(_) => {}
            TokenizerSource::RunConfig(p) | TokenizerSource::Manifest(p) => tracing::info!(
                "checkpoints carry the tokenizer the shards were built with: {}",
                p.display()
            ),
        }
    }
    found.path().map(Path::to_path_buf)
}
