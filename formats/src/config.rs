//! The `datasets.toml` model: what `llava-data build` reads. Every key is documented in
//! docs/configuration.md; a bad value fails before any work with the file, the key and what was
//! expected.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::geometry::{pinpoints_text, MergeType, RECIPE_PINPOINTS};
use crate::tile_codec::TileEncoding;

/// A config file's error: `file:line:column: key: message`, the message saying what to do.
#[derive(Debug, Error)]
pub struct ConfigError {
    pub file: String,
    /// Dotted key path, e.g. `sources[2].sampling`.
    pub key: String,
    pub message: String,
    /// 1-based line and column of the key (or of the parse error) in the file, when known.
    pub line: Option<usize>,
    pub column: Option<usize>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(col) = self.column {
                write!(f, ":{col}")?;
            }
        }
        write!(f, ": {}: {}", self.key, self.message)
    }
}

impl ConfigError {
    /// An error about `key` (a dotted path) of `file`, located in `text` when the key is there.
    pub fn at_key(file: &str, text: &str, key: &str, message: String) -> Self {
        let (line, column) = match crate::located::key_span(text, key) {
            Some(s) => {
                let (l, c) = crate::located::line_col(text, s.start);
                (Some(l), Some(c))
            }
            None => (None, None),
        };
        Self {
            file: file.to_string(),
            key: key.to_string(),
            message,
            line,
            column,
        }
    }

    /// A `toml` parse or deserialization error of `text` (the contents of `file`): its line and
    /// column, the key its span points into, and what to do. `docs` says where the keys are
    /// documented (e.g. "docs/configuration.md").
    pub fn from_toml(file: &str, text: &str, e: &toml::de::Error, docs: &str) -> Self {
        use crate::located::{backticked, closest, key_at, line_col};
        let msg = e.message().trim().to_string();
        let at = e.span().map(|s| s.start);
        let (line, column) = at.map_or((None, None), |o| {
            let (l, c) = line_col(text, o);
            (Some(l), Some(c))
        });
        let key = at.and_then(|o| key_at(text, o));
        let (key, message) = if let Some(rest) = msg.strip_prefix("unknown field ") {
            let name = backticked(rest).unwrap_or(rest).to_string();
            // serde lists the expected fields: `expected one of `a`, `b``.
            let known: Vec<&str> = rest
                .split_once("expected")
                .map(|(_, l)| l.split('`').skip(1).step_by(2).collect())
                .unwrap_or_default();
            let hint = match closest(&name, &known) {
                Some(k) => format!("did you mean `{k}`? "),
                None => String::new(),
            };
            (
                key.unwrap_or(name.clone()),
                format!("unknown key `{name}`: {hint}remove or rename it (the keys are in {docs})"),
            )
        } else if let Some(rest) = msg.strip_prefix("missing field ") {
            let name = backticked(rest).unwrap_or(rest).to_string();
            let key = match key {
                Some(table) if table.ends_with(']') => format!("{table}.{name}"),
                _ => name,
            };
            (key, format!("this key is required: add it (see {docs})"))
        } else if let Some(key) = key {
            (
                key,
                format!("{msg}: fix the value (its type and allowed values are in {docs})"),
            )
        } else {
            (
                "(syntax)".to_string(),
                format!("{msg}: this is not valid TOML (https://toml.io)"),
            )
        };
        Self {
            file: file.to_string(),
            key,
            message,
            line,
            column,
        }
    }
}

/// Whether an output or shard location is a URL (`s3://…`, `gs://…`, `file:///…`) rather than a
/// local path: `scheme://` with an ASCII scheme, as object stores name their locations.
pub fn is_url(path: &Path) -> bool {
    path.to_str().is_some_and(is_url_str)
}

/// [`is_url`] of a string: the one rule, shared with `llava-storage`.
pub fn is_url_str(text: &str) -> bool {
    text.split_once("://").is_some_and(|(scheme, _)| {
        !scheme.is_empty()
            && scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
    })
}

/// `datasets.toml` as written (paths still relative to the file).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetsConfig {
    /// Output folder of the build.
    pub output: PathBuf,
    /// The Llama-3-Instruct `tokenizer.json`.
    pub tokenizer: PathBuf,
    #[serde(default = "default_max_len")]
    pub model_max_length: usize,
    /// `"[(336, 672), ...]"`, `"(1x1),...,(3x3)"` or `[[336, 672], ...]`, (width, height).
    #[serde(default = "default_pinpoints")]
    pub image_grid_pinpoints: Pinpoints,
    /// `spatial_unpad` (fine-tuning) or `flat` (pretraining): how many tokens an image becomes.
    #[serde(default)]
    pub mm_patch_merge_type: MergeType,
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Shards are closed once their estimated size passes this many MiB.
    #[serde(default = "default_shard_mb")]
    pub shard_target_mb: u64,
    /// Per-device batch size the groups are cut for (one Parquet row group per batch).
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Samples per group (a multiple of `batch_size`; usually batch_size × world size).
    #[serde(default = "default_group_size")]
    pub group_size: usize,
    /// Groups per length-sorting pool: larger pools give groups of more similar length.
    #[serde(default = "default_pool_groups")]
    pub length_pool_groups: usize,
    /// `raw` (exact uint8, predicted + zstd per tile, default), `raw-plain` (exact, the CHW bytes
    /// under Parquet zstd: no decoding cost in the loader) or `jpeg` (lossy).
    #[serde(default)]
    pub tile_encoding: TileEncoding,
    #[serde(default = "default_jpeg_quality")]
    pub jpeg_quality: u8,
    #[serde(default = "default_zstd_level")]
    pub zstd_level: i32,
    /// Images with more pixels are rejected from their header (`image_too_large`) before any
    /// decoding; the default is where Pillow raises `DecompressionBombError`.
    #[serde(default = "default_max_image_pixels")]
    pub max_image_pixels: u64,
    /// Image files larger than this many MiB are rejected before they are read.
    #[serde(default = "default_max_image_file_mb")]
    pub max_image_file_mb: u64,
    pub sources: Vec<SourceConfig>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// Name written to every row's `source` column.
    pub name: String,
    /// One or more LLaVA `.json` / `.jsonl` files, concatenated in order.
    pub json: OneOrMany,
    /// Folder the records' `image` paths are relative to (may be omitted for text-only data).
    #[serde(default)]
    pub image_folder: Option<PathBuf>,
    /// `llava_llama_3` or `plain`.
    pub template: String,
    /// `anyres`, `pad` or `square`.
    #[serde(default = "default_aspect")]
    pub image_aspect_ratio: String,
    /// `all`, `first:N`, `end:N`, `random:N`, with N a count or a percentage (`random:10%`).
    #[serde(default)]
    pub sampling: Sampling,
    /// `json` paths as written in the file (for rows and reports); filled by `load`.
    #[serde(skip)]
    pub json_as_written: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(PathBuf),
    Many(Vec<PathBuf>),
}

impl OneOrMany {
    pub fn paths(&self) -> Vec<PathBuf> {
        match self {
            OneOrMany::One(p) => vec![p.clone()],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Pinpoints {
    Text(String),
    List(Vec<[u32; 2]>),
}

/// A source's sub-sampling rule (spec §1.1), seeded from the build's seed, unlike the reference.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Sampling {
    #[default]
    All,
    First(Count),
    End(Count),
    Random(Count),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Count {
    Records(usize),
    Percent(f64),
}

impl Count {
    /// Records selected out of `len`: percentages round up, as the reference's `ceil`.
    pub fn resolve(self, len: usize) -> usize {
        match self {
            Count::Records(n) => n.min(len),
            Count::Percent(p) => (((p * len as f64) / 100.0).ceil() as usize).min(len),
        }
    }
}

impl FromStr for Sampling {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "all" {
            return Ok(Sampling::All);
        }
        let expected = "expected \"all\", \"first:N\", \"end:N\" or \"random:N\" (N a count or a percentage like 10%)";
        let (kind, number) = s
            .split_once(':')
            .ok_or_else(|| format!("{s:?}: {expected}"))?;
        let count = if let Some(pct) = number.strip_suffix('%') {
            let p: f64 = pct
                .parse()
                .map_err(|_| format!("{s:?}: {pct:?} is not a percentage"))?;
            if !(p > 0.0 && p <= 100.0) {
                return Err(format!("{s:?}: the percentage must be in (0, 100]"));
            }
            Count::Percent(p)
        } else {
            let n: usize = number
                .parse()
                .map_err(|_| format!("{s:?}: {number:?} is not a count"))?;
            if n == 0 {
                return Err(format!("{s:?}: the count must be at least 1"));
            }
            Count::Records(n)
        };
        match kind {
            "first" => Ok(Sampling::First(count)),
            "end" => Ok(Sampling::End(count)),
            "random" => Ok(Sampling::Random(count)),
            _ => Err(format!("{s:?}: {expected}")),
        }
    }
}

impl fmt::Display for Sampling {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (kind, count) = match self {
            Sampling::All => return f.write_str("all"),
            Sampling::First(c) => ("first", c),
            Sampling::End(c) => ("end", c),
            Sampling::Random(c) => ("random", c),
        };
        match count {
            Count::Records(n) => write!(f, "{kind}:{n}"),
            Count::Percent(p) => write!(f, "{kind}:{p}%"),
        }
    }
}

impl Serialize for Sampling {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Sampling {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

fn default_max_len() -> usize {
    8192
}
fn default_pinpoints() -> Pinpoints {
    Pinpoints::Text(pinpoints_text(&RECIPE_PINPOINTS))
}
fn default_seed() -> u64 {
    42
}
fn default_shard_mb() -> u64 {
    512
}
fn default_batch_size() -> usize {
    4
}
fn default_group_size() -> usize {
    32
}
fn default_pool_groups() -> usize {
    50
}
fn default_jpeg_quality() -> u8 {
    95
}
/// Measured (docs/benchmarks.md, "Bytes per sample"): at 1, `raw` tiles are as small as at 3 and
/// the build is faster.
fn default_zstd_level() -> i32 {
    1
}
/// Pillow's `2 * Image.MAX_IMAGE_PIXELS` (`2 * (1024 * 1024 * 1024 // 4 // 3)`).
pub const DEFAULT_MAX_IMAGE_PIXELS: u64 = 178_956_970;
fn default_max_image_pixels() -> u64 {
    DEFAULT_MAX_IMAGE_PIXELS
}
fn default_max_image_file_mb() -> u64 {
    256
}
fn default_aspect() -> String {
    "anyres".into()
}

/// Where the keys of `datasets.toml` are documented (for error messages).
pub const DATASETS_DOCS: &str = "docs/configuration.md";

pub const TEMPLATES: [&str; 2] = ["llava_llama_3", "plain"];
pub const ASPECTS: [&str; 3] = ["anyres", "pad", "square"];

impl DatasetsConfig {
    /// Reads and validates `path`; relative paths in it are resolved against its folder.
    pub fn load(path: &Path) -> Result<(Self, String), ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            key: "(file)".into(),
            message: format!("{e}: check the path"),
            line: None,
            column: None,
        })?;
        let mut config: DatasetsConfig = toml::from_str(&text)
            .map_err(|e| ConfigError::from_toml(&file, &text, &e, DATASETS_DOCS))?;
        config
            .validate()
            .map_err(|(key, message)| ConfigError::at_key(&file, &text, &key, message))?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.resolve_paths(base);
        Ok((config, text))
    }

    fn validate(&self) -> Result<(), (String, String)> {
        let one_of = |key: &str, value: &str, allowed: &[&str]| {
            if allowed.contains(&value) {
                Ok(())
            } else {
                Err((
                    key.to_string(),
                    format!("{value:?} is not allowed: use one of {allowed:?}"),
                ))
            }
        };
        let positive = |key: &str, v: usize| {
            if v == 0 {
                Err((key.to_string(), "must be at least 1".to_string()))
            } else {
                Ok(())
            }
        };
        positive("model_max_length", self.model_max_length)?;
        positive("batch_size", self.batch_size)?;
        positive("group_size", self.group_size)?;
        positive("length_pool_groups", self.length_pool_groups)?;
        positive("shard_target_mb", self.shard_target_mb as usize)?;
        if self.max_image_pixels == 0 {
            return Err(("max_image_pixels".into(), "must be at least 1".into()));
        }
        if self.max_image_file_mb == 0 || self.max_image_file_mb > 1 << 20 {
            return Err((
                "max_image_file_mb".into(),
                "must be in 1..=1048576 (MiB)".into(),
            ));
        }
        if !self.group_size.is_multiple_of(self.batch_size) {
            return Err((
                "group_size".into(),
                format!(
                    "{} is not a multiple of batch_size {}",
                    self.group_size, self.batch_size
                ),
            ));
        }
        if !(1..=100).contains(&self.jpeg_quality) {
            return Err(("jpeg_quality".into(), "must be in 1..=100".into()));
        }
        if !(1..=22).contains(&self.zstd_level) {
            return Err(("zstd_level".into(), "must be in 1..=22".into()));
        }
        if self.sources.is_empty() {
            return Err((
                "sources".into(),
                "at least one [[sources]] table is needed".into(),
            ));
        }
        for (i, source) in self.sources.iter().enumerate() {
            let key = |k: &str| format!("sources[{i}].{k}");
            if source.name.is_empty() {
                return Err((key("name"), "must not be empty".into()));
            }
            if self.sources[..i].iter().any(|s| s.name == source.name) {
                return Err((
                    key("name"),
                    format!("{:?} is used by an earlier source", source.name),
                ));
            }
            if source.json.paths().is_empty() {
                return Err((key("json"), "needs at least one file".into()));
            }
            one_of(&key("template"), &source.template, &TEMPLATES)?;
            one_of(
                &key("image_aspect_ratio"),
                &source.image_aspect_ratio,
                &ASPECTS,
            )?;
        }
        Ok(())
    }

    fn resolve_paths(&mut self, base: &Path) {
        let join = |p: &Path| base.join(p);
        // `s3://bucket/prefix` is a location, not a relative folder named `s3:`.
        if !is_url(&self.output) {
            self.output = join(&self.output);
        }
        self.tokenizer = join(&self.tokenizer);
        for source in &mut self.sources {
            source.json_as_written = source
                .json
                .paths()
                .iter()
                .map(|p| p.display().to_string())
                .collect();
            source.json = OneOrMany::Many(source.json.paths().iter().map(|p| join(p)).collect());
            source.image_folder = source.image_folder.as_deref().map(join);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_forms() {
        assert_eq!("all".parse::<Sampling>().unwrap(), Sampling::All);
        assert_eq!(
            "first:10".parse::<Sampling>().unwrap(),
            Sampling::First(Count::Records(10))
        );
        assert_eq!(
            "random:5%".parse::<Sampling>().unwrap(),
            Sampling::Random(Count::Percent(5.0))
        );
        assert!("end:0".parse::<Sampling>().is_err());
        assert!("sample:3".parse::<Sampling>().is_err());
        assert!("first".parse::<Sampling>().is_err());
        assert_eq!(Count::Percent(10.0).resolve(11), 2); // ceil(1.1)
        assert_eq!(Count::Records(100).resolve(7), 7);
    }

    fn load_str(text: &str) -> Result<DatasetsConfig, ConfigError> {
        // One folder per call: tests run in parallel and texts may have equal lengths.
        static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("llava-config-{}-{call}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("datasets.toml");
        std::fs::write(&path, text).unwrap();
        let r = DatasetsConfig::load(&path).map(|(c, _)| c);
        std::fs::remove_dir_all(&dir).ok();
        r
    }

    const GOOD: &str = r#"
output = "out"
tokenizer = "tok.json"
[[sources]]
name = "a"
json = "a.json"
image_folder = "img"
template = "plain"
image_aspect_ratio = "square"
sampling = "first:3"
"#;

    #[test]
    fn url_output_is_not_joined_to_the_config_folder() {
        let c =
            load_str(&GOOD.replace("output = \"out\"", "output = \"s3://bucket/run1\"")).unwrap();
        assert_eq!(c.output, PathBuf::from("s3://bucket/run1"));
        assert!(is_url(&c.output));
        assert!(!is_url(Path::new("/data/s3:/x")) && !is_url(Path::new("out")));
    }

    #[test]
    fn loads_and_resolves_relative_paths() {
        let c = load_str(GOOD).unwrap();
        assert!(c.output.ends_with("out") && c.output.is_absolute());
        assert_eq!(c.model_max_length, 8192);
        assert_eq!(c.max_image_pixels, 178_956_970);
        assert_eq!(c.max_image_file_mb, 256);
        assert_eq!(c.sources[0].sampling, Sampling::First(Count::Records(3)));
    }

    #[test]
    fn errors_name_the_key() {
        let e = load_str(&GOOD.replace("\"plain\"", "\"llama3\"")).unwrap_err();
        assert_eq!(e.key, "sources[0].template");
        assert!(e.to_string().contains("datasets.toml"), "{e}");
        let e = load_str(&GOOD.replace("first:3", "some:3")).unwrap_err();
        assert!(
            e.message.contains("sampling") || e.message.contains("some:3"),
            "{e}"
        );
        let e = load_str(&GOOD.replace("sampling", "smapling")).unwrap_err();
        assert!(e.message.contains("smapling"), "{e}");
        let e = load_str(&format!("max_image_pixels = 0\n{GOOD}")).unwrap_err();
        assert_eq!(e.key, "max_image_pixels", "{e}");
        let e = load_str(&format!("group_size = 6\nbatch_size = 4\n{GOOD}")).unwrap_err();
        assert_eq!(e.key, "group_size", "{e}");
        // A typed setting: serde's message lists the accepted names, and the key is located.
        let e = load_str(&format!("tile_encoding = \"png\"\n{GOOD}")).unwrap_err();
        assert!(e.to_string().contains("datasets.toml"), "{e}");
        assert!(
            e.message.contains("png") && e.message.contains("raw-plain"),
            "{e}"
        );
        let c = load_str(&format!("tile_encoding = \"raw-plain\"\n{GOOD}")).unwrap();
        assert_eq!(c.tile_encoding, TileEncoding::RawPlain);
    }
}
