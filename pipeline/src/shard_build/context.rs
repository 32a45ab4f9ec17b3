//! Everything a build needs, resolved and checked before any work starts.

use std::path::{Path, PathBuf};

use llava_formats::config::{is_url, ConfigError, DatasetsConfig, Pinpoints};
use llava_imaging::{parse_pinpoints, AspectMode, DecodeLimits, MergeType};
use sha2::{Digest, Sha256};

use super::BuildError;
use crate::convert::ConvertConfig;
use crate::template::Template;
use crate::tokenizer::TextTokenizer;

pub struct BuildContext {
    pub config: DatasetsConfig,
    pub config_path: PathBuf,
    pub config_sha256: String,
    /// The output folder; for an object store output, the local work folder
    /// ([`super::sink::work_folder`]) and the bucket is `remote`.
    pub output: PathBuf,
    /// The object store of an `s3://…` (`gs://`, `az://`) output.
    pub remote: Option<llava_storage::Location>,
    pub tokenizer: TextTokenizer,
    pub pinpoints: Vec<(u32, u32)>,
    pub merge: MergeType,
    /// One per source, in config order.
    pub convert: Vec<ConvertConfig>,
}

impl BuildContext {
    pub fn load(config_path: &Path, output: Option<&Path>) -> Result<Self, BuildError> {
        let (config, text) = DatasetsConfig::load(config_path)?;
        let file = config_path.display().to_string();
        let err = |key: &str, message: String| {
            BuildError::Config(ConfigError::at_key(&file, &text, key, message))
        };
        // An object store output is opened (and its credentials read) before any work starts.
        let from_config = output.is_none();
        let output = output
            .map(Path::to_path_buf)
            .unwrap_or_else(|| config.output.clone());
        let remote = if is_url(&output) {
            let url = output.to_string_lossy();
            let location = llava_storage::Location::parse(&url).map_err(|e| {
                if from_config {
                    err("output", e.to_string())
                } else {
                    BuildError::Storage(e)
                }
            })?;
            Some(location)
        } else {
            None
        };
        let pinpoints = match &config.image_grid_pinpoints {
            Pinpoints::Text(s) => {
                parse_pinpoints(s).map_err(|e| err("image_grid_pinpoints", e.to_string()))?
            }
            Pinpoints::List(list) => list.iter().map(|[w, h]| (*w, *h)).collect(),
        };
        if pinpoints.is_empty() || pinpoints.iter().any(|&(w, h)| w == 0 || h == 0) {
            return Err(err(
                "image_grid_pinpoints",
                "needs at least one (width, height) pair of positive sizes".into(),
            ));
        }
        let merge = config.mm_patch_merge_type;
        if !config.tokenizer.is_file() {
            return Err(err(
                "tokenizer",
                format!(
                    "{} does not exist (scripts/fetch-tokenizer.sh fetches the Llama-3 one)",
                    config.tokenizer.display()
                ),
            ));
        }
        let tokenizer = TextTokenizer::from_file(&config.tokenizer)
            .map_err(|e| err("tokenizer", e.to_string()))?;
        let limits = DecodeLimits {
            max_pixels: config.max_image_pixels,
            max_file_bytes: config.max_image_file_mb << 20,
        };
        let budget = ConvertConfig::budget_for(&limits);
        let mut convert = Vec::new();
        for (i, source) in config.sources.iter().enumerate() {
            for path in source.json.paths() {
                if !path.is_file() {
                    return Err(err(
                        &format!("sources[{i}].json"),
                        format!("{} does not exist", path.display()),
                    ));
                }
            }
            if let Some(folder) = &source.image_folder {
                if !folder.is_dir() {
                    return Err(err(
                        &format!("sources[{i}].image_folder"),
                        format!("{} is not a folder", folder.display()),
                    ));
                }
            }
            let template: Template = source
                .template
                .parse()
                .map_err(|e: String| err(&format!("sources[{i}].template"), e))?;
            let aspect = match source.image_aspect_ratio.as_str() {
                "pad" => AspectMode::Pad,
                "square" => AspectMode::Square,
                _ => AspectMode::Anyres(pinpoints.clone()),
            };
            convert.push(ConvertConfig {
                template,
                aspect,
                merge,
                model_max_length: config.model_max_length,
                limits,
                budget: budget.clone(),
            });
        }
        let output = match &remote {
            Some(r) if r.is_remote() => super::sink::work_folder(r.url()),
            // `file:///abs/path`: the folder itself.
            Some(_) => url_path(&output),
            None => output,
        };
        let remote = remote.filter(|r| r.is_remote());
        Ok(BuildContext {
            config_sha256: hex::encode(Sha256::digest(text.as_bytes())),
            config,
            config_path: config_path.to_path_buf(),
            output,
            remote,
            tokenizer,
            pinpoints,
            merge,
            convert,
        })
    }

    pub fn image_folder(&self, source: usize) -> &Path {
        self.config.sources[source]
            .image_folder
            .as_deref()
            .unwrap_or(Path::new("."))
    }
}

/// The local folder of a `file://` URL.
fn url_path(output: &Path) -> PathBuf {
    let text = output.to_string_lossy();
    PathBuf::from(text.strip_prefix("file://").unwrap_or(&text))
}
