//! `manifest.json` (what a build wrote) and `rejects.jsonl` (what it did not, and why).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::geometry::{MergeType, RECIPE_PINPOINTS};
use crate::tile_codec::TileEncoding;

use crate::constants::IGNORE_INDEX;
use crate::schema::{ShardRow, SCHEMA_VERSION};

pub const MANIFEST_FILE: &str = "manifest.json";
pub const REJECTS_FILE: &str = "rejects.jsonl";
pub const FORMAT_NAME: &str = "llava-next-shards";

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("not a manifest: {0}")]
    Json(#[from] serde_json::Error),
    #[error("format {found:?}, expected {FORMAT_NAME:?}")]
    Format { found: String },
    #[error(
        "shards built with schema version {found}{}, this build reads version {SCHEMA_VERSION}: \
         rebuild them with this llava-data (`llava-data build`)",
        match *found {
            1 => " (one row group per batch)",
            2 | 3 => " (rows without checksums: see docs/integrity.md)",
            _ => "",
        }
    )]
    Version { found: u64 },
}

impl Manifest {
    /// Parses `manifest.json`, checking the format name and schema version first (so an old
    /// build gets a clear error naming its version, not a missing-field one).
    pub fn from_json(text: &str) -> Result<Manifest, ManifestError> {
        let value: serde_json::Value = serde_json::from_str(text)?;
        let format = value.get("format").and_then(|v| v.as_str()).unwrap_or("");
        if format != FORMAT_NAME {
            return Err(ManifestError::Format {
                found: format.to_string(),
            });
        }
        let found = value
            .get("schema_version")
            .and_then(|v| v.as_u64())
            .unwrap_or(0);
        if found != u64::from(SCHEMA_VERSION) {
            return Err(ManifestError::Version { found });
        }
        Ok(serde_json::from_value(value)?)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`FORMAT_NAME`].
    pub format: String,
    pub schema_version: u32,
    /// `llava-data <version>`.
    pub created_by: String,
    /// SHA-256 of the `datasets.toml` bytes.
    pub config_sha256: String,
    pub tokenizer_sha256: String,
    /// The tokenizer file the build read (absolute), so that a trainer can ship it with its
    /// checkpoints once its SHA-256 matches `tokenizer_sha256`. Absent in older manifests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer_path: Option<String>,
    pub settings: BuildSettings,
    pub grouping: Grouping,
    pub sources: Vec<SourceStats>,
    pub shards: Vec<ShardInfo>,
    pub totals: Totals,
}

/// Settings that decide the content of a row; a trainer checks them against its model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BuildSettings {
    pub model_max_length: usize,
    /// (width, height) pairs, LLaVA-NeXT order.
    pub image_grid_pinpoints: Vec<[u32; 2]>,
    pub mm_patch_merge_type: MergeType,
    pub tile_size: u32,
    pub tile_encoding: TileEncoding,
    pub seed: u64,
}

/// How samples were grouped (see the schema doc in `formats::schema`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Grouping {
    /// `length_pools`: per modality, a seeded shuffle cut into pools of `group_size ×
    /// length_pool_groups` samples, each pool sorted by exact length (descending) and cut into
    /// groups of `group_size`, each group into batches of `batch_size` consecutive samples
    /// (consecutive rows; row groups hold several whole batches). Groups never mix modalities; the last group of a modality may be
    /// short, and so may its last batch.
    pub method: String,
    pub batch_size: usize,
    pub group_size: usize,
    pub length_pool_groups: usize,
    pub groups: u64,
    pub batches: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceStats {
    pub name: String,
    pub json: Vec<String>,
    pub template: String,
    pub image_aspect_ratio: String,
    pub sampling: String,
    /// Records in the files, before sampling.
    pub in_files: u64,
    /// Records selected by the sampling rule: `written + rejected = read`.
    pub read: u64,
    pub written: u64,
    pub rejected: u64,
    pub rejects_by_kind: BTreeMap<String, u64>,
}

/// A shard's (and so a batch's) modality; batches never mix them. Serialised `image` / `text`,
/// as in the shards' `modality` column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Modality {
    Image,
    Text,
}

impl Modality {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "image" => Some(Self::Image),
            "text" => Some(Self::Text),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Image => "image",
            Self::Text => "text",
        }
    }
}

impl std::fmt::Display for Modality {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardInfo {
    pub file: String,
    pub modality: Modality,
    pub rows: u64,
    pub bytes: u64,
    pub sha256: String,
    pub min_length: u32,
    pub max_length: u32,
    /// Parquet row groups (each holds whole batches; see `formats::schema`).
    pub row_groups: u64,
    /// Batches in the shard.
    pub batches: u64,
    /// Group ids in this shard: `first_group .. first_group + groups`.
    pub first_group: u32,
    pub groups: u32,
    pub tokens: u64,
    pub supervised_tokens: u64,
    pub tiles: u64,
}

impl Manifest {
    /// A manifest for shards written outside `llava-data build` (tests, benches, the trainer's
    /// synthetic shards): the recipe's settings with `tile_size`, `raw` tiles, grouping counts
    /// and totals summed from `shards`, no sources (a loader does not read them).
    pub fn for_shards(
        created_by: &str,
        shards: Vec<ShardInfo>,
        batch_size: usize,
        group_size: usize,
        tile_size: u32,
    ) -> Self {
        let totals = Totals {
            samples: shards.iter().map(|s| s.rows).sum(),
            tokens: shards.iter().map(|s| s.tokens).sum(),
            supervised_tokens: shards.iter().map(|s| s.supervised_tokens).sum(),
            tiles: shards.iter().map(|s| s.tiles).sum(),
            bytes: shards.iter().map(|s| s.bytes).sum(),
            ..Totals::default()
        };
        Manifest {
            format: FORMAT_NAME.to_string(),
            schema_version: SCHEMA_VERSION,
            created_by: created_by.to_string(),
            config_sha256: String::new(),
            tokenizer_sha256: String::new(),
            tokenizer_path: None,
            settings: BuildSettings {
                model_max_length: 8192,
                image_grid_pinpoints: RECIPE_PINPOINTS.iter().map(|&(w, h)| [w, h]).collect(),
                mm_patch_merge_type: MergeType::SpatialUnpad,
                tile_size,
                tile_encoding: TileEncoding::Raw,
                seed: 0,
            },
            grouping: Grouping {
                method: "length_pools".to_string(),
                batch_size,
                group_size,
                length_pool_groups: 1,
                groups: shards.iter().map(|s| u64::from(s.groups)).sum(),
                batches: shards.iter().map(|s| s.batches).sum(),
            },
            sources: Vec::new(),
            shards,
            totals,
        }
    }
}

impl ShardInfo {
    /// An entry for `file` with nothing counted yet: [`ShardInfo::count_row`] adds the rows;
    /// `bytes`, `sha256`, `row_groups` and `batches` are the writer's to fill in.
    pub fn empty(file: impl Into<String>, modality: Modality) -> Self {
        Self {
            file: file.into(),
            modality,
            rows: 0,
            bytes: 0,
            sha256: String::new(),
            min_length: 0,
            max_length: 0,
            row_groups: 0,
            batches: 0,
            first_group: 0,
            groups: 0,
            tokens: 0,
            supervised_tokens: 0,
            tiles: 0,
        }
    }

    /// Counts one row, in file order: rows, lengths, tokens, supervised tokens (labels other
    /// than `IGNORE_INDEX`), tiles and the group range (a shard's groups are consecutive ids).
    pub fn count_row(&mut self, row: &ShardRow) {
        if self.rows == 0 {
            self.min_length = row.length;
            self.first_group = row.group;
        }
        self.rows += 1;
        self.min_length = self.min_length.min(row.length);
        self.max_length = self.max_length.max(row.length);
        self.tokens += u64::from(row.length);
        self.supervised_tokens += row.labels.iter().filter(|&&l| l != IGNORE_INDEX).count() as u64;
        self.tiles += row.tiles.len() as u64;
        self.groups = self
            .groups
            .max(row.group.saturating_sub(self.first_group) + 1);
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Totals {
    pub samples: u64,
    pub image_samples: u64,
    pub text_samples: u64,
    pub rejected: u64,
    pub truncated: u64,
    /// Sum of exact lengths (text + image tokens).
    pub tokens: u64,
    pub image_tokens: u64,
    pub supervised_tokens: u64,
    pub images: u64,
    pub tiles: u64,
    pub bytes: u64,
}

/// One line of `rejects.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RejectEntry {
    pub source: String,
    pub json_file: String,
    pub index: u64,
    /// 1-based line for JSONL files.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub line: Option<u64>,
    pub id: String,
    /// Stable short name, for counting.
    pub kind: String,
    pub reason: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_schema_version_is_named() {
        let old = r#"{"format": "llava-next-shards", "schema_version": 1, "shards": []}"#;
        let err = Manifest::from_json(old).unwrap_err().to_string();
        assert!(err.contains("schema version 1"), "{err}");
        assert!(
            err.contains(&format!("reads version {SCHEMA_VERSION}")),
            "{err}"
        );
        assert!(err.contains("llava-data build"), "{err}");
        let other = r#"{"format": "x", "schema_version": 2}"#;
        assert!(Manifest::from_json(other)
            .unwrap_err()
            .to_string()
            .contains("format"));
    }
}
