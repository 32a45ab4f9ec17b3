//! Loading checkpoints into trainable `Var`s and saving them in the HF legacy layout.
//!
//! Accepted key layouts (mixed freely across files, every key mapped to one canonical name):
//! - HF legacy LlavaNext: `language_model.model.*`, `language_model.lm_head.weight`,
//!   `vision_tower.vision_model.*` or `vision_tower.*`, `multi_modal_projector.*`, `image_newline`;
//! - HF >= 4.52: `model.language_model.*`, `lm_head.weight`, `model.vision_tower[.vision_model].*`,
//!   `model.multi_modal_projector.*`, `model.image_newline`;
//! - original LLaVA-NeXT: `model.embed_tokens`, `model.layers.N`, `model.norm`, `lm_head`,
//!   `model.vision_tower.vision_tower.vision_model.*`, `model.mm_projector.{0,2}.*`,
//!   `model.image_newline`;
//! - separate checkpoints: Llama (`model.*`, `lm_head.weight`), CLIP (`vision_model.*`; a full
//!   CLIPModel's text tower is ignored), projector (`model.mm_projector.*`, safetensors or a
//!   PyTorch `mm_projector.bin`).
//!
//! File formats: safetensors (single, or sharded with `model.safetensors.index.json`) and PyTorch
//! `torch.save` zips (`pytorch_model.bin`, sharded with `pytorch_model.bin.index.json`), the
//! latter read lazily by [`crate::io::torch_pickle`] without Python.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};

use crate::io::torch_pickle::{is_torch_file, TorchFile};
use crate::model::config::{
    LlavaNextConfig, IMAGE_NEWLINE, LANGUAGE_PREFIX, PROJECTOR_PREFIX, VISION_PREFIX,
};
use crate::model::llava_next::LlavaNext;
use crate::{Error, Result};

/// Maps a checkpoint key of any supported layout to the canonical (HF legacy) name.
/// `None` for keys the model does not use (text tower of CLIP, rotary buffers, ...).
pub fn canonical_name(key: &str) -> Option<String> {
    if key.ends_with("rotary_emb.inv_freq") || key.ends_with("position_ids") {
        return None;
    }
    let vision = |rest: &str| Some(format!("{VISION_PREFIX}.{rest}"));
    let lang = |rest: &str| Some(format!("{LANGUAGE_PREFIX}.{rest}"));
    let proj = |rest: &str| {
        let rest = rest
            .strip_prefix("0.")
            .map(|r| format!("linear_1.{r}"))
            .or_else(|| rest.strip_prefix("2.").map(|r| format!("linear_2.{r}")))?;
        Some(format!("{PROJECTOR_PREFIX}.{rest}"))
    };
    // Longest prefixes first: several layouts share leading components.
    if let Some(r) = key.strip_prefix("model.vision_tower.vision_tower.vision_model.") {
        return vision(r);
    }
    if let Some(r) = key
        .strip_prefix("model.vision_tower.vision_model.")
        .or_else(|| key.strip_prefix("vision_tower.vision_model."))
        .or_else(|| key.strip_prefix("model.vision_tower."))
        .or_else(|| key.strip_prefix("vision_tower."))
        .or_else(|| key.strip_prefix("vision_model."))
    {
        return vision(r);
    }
    if let Some(r) = key
        .strip_prefix("model.multi_modal_projector.")
        .or_else(|| key.strip_prefix("multi_modal_projector."))
    {
        return Some(format!("{PROJECTOR_PREFIX}.{r}"));
    }
    if let Some(r) = key.strip_prefix("model.mm_projector.") {
        return proj(r);
    }
    if key == "image_newline" || key == "model.image_newline" {
        return Some(IMAGE_NEWLINE.into());
    }
    if let Some(r) = key.strip_prefix("language_model.") {
        return lang(r);
    }
    if let Some(r) = key.strip_prefix("model.language_model.") {
        return lang(&format!("model.{r}"));
    }
    if key == "lm_head.weight" {
        return lang(key);
    }
    if let Some(r) = key.strip_prefix("model.") {
        if r.starts_with("embed_tokens.") || r.starts_with("layers.") || r.starts_with("norm.") {
            return lang(key);
        }
    }
    None
}

/// Expands a path into tensor files. A file is taken as is (an index JSON expands to its shards).
/// A directory, in the order HF's `from_pretrained` prefers: `model.safetensors`,
/// `model.safetensors.index.json`, `pytorch_model.bin`, `pytorch_model.bin.index.json`, else every
/// `*.safetensors`, else every `pytorch_model*.bin` (never other `*.bin`: HF output folders
/// hold a pickled `training_args.bin`).
pub fn resolve_files(path: &Path) -> Result<Vec<PathBuf>> {
    let io = |source| Error::Io {
        path: path.into(),
        source,
    };
    if !path.is_dir() {
        if !path.exists() {
            return Err(io(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no such file",
            )));
        }
        if path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.ends_with(".index.json"))
        {
            return index_files(path);
        }
        return Ok(vec![path.into()]);
    }
    for index in [
        "model.safetensors.index.json",
        "pytorch_model.bin.index.json",
    ] {
        let single = path.join(index.trim_end_matches(".index.json"));
        let index = path.join(index);
        if single.exists() {
            return Ok(vec![single]);
        }
        if index.exists() {
            return index_files(&index);
        }
    }
    let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(io)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    let name = |p: &Path| {
        p.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("")
            .to_string()
    };
    let st: Vec<PathBuf> = entries
        .iter()
        .filter(|p| name(p).ends_with(".safetensors"))
        .cloned()
        .collect();
    if !st.is_empty() {
        return Ok(st);
    }
    let bins: Vec<PathBuf> = entries
        .iter()
        .filter(|p| {
            let n = name(p);
            n.starts_with("pytorch_model") && n.ends_with(".bin")
        })
        .cloned()
        .collect();
    if bins.is_empty() {
        return Err(io(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no weights in directory (looked for model.safetensors[.index.json], \
             pytorch_model.bin[.index.json], *.safetensors, pytorch_model*.bin)",
        )));
    }
    Ok(bins)
}

fn index_files(index: &Path) -> Result<Vec<PathBuf>> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: BTreeMap<String, String>,
    }
    let text = std::fs::read_to_string(index).map_err(|source| Error::Io {
        path: index.into(),
        source,
    })?;
    let idx: Index = serde_json::from_str(&text).map_err(|source| Error::Json {
        path: index.into(),
        source,
    })?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files: Vec<PathBuf> = idx.weight_map.values().map(|f| dir.join(f)).collect();
    files.sort();
    files.dedup();
    for f in &files {
        if !f.is_file() {
            return Err(Error::Io {
                path: f.clone(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("shard listed in {} is missing", index.display()),
                ),
            });
        }
    }
    Ok(files)
}

/// How to load.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Parameter dtype (F32 on CPU; BF16 for the GPU path).
    pub dtype: DType,
    pub device: Device,
    /// Freshly initialise a projector / `image_newline` absent from the sources (pretraining).
    pub init_missing_projector: bool,
    /// Grow `embed_tokens` / `lm_head` with mean rows when the checkpoint's vocabulary is smaller
    /// than the config's (Llama-3's 128256 → 128320 for `<image>` and `<pad>`).
    pub grow_vocab: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dtype: DType::F32,
            device: Device::Cpu,
            init_missing_projector: false,
            grow_vocab: false,
        }
    }
}

/// What a load did, by canonical name.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    pub loaded: Vec<String>,
    /// Freshly initialised (projector / newline).
    pub initialised: Vec<String>,
    /// Rows added to embeddings by `grow_vocab`.
    pub grown: Vec<String>,
    /// Checkpoint keys that map to nothing in the model.
    pub ignored: Vec<String>,
}

enum Source {
    Safetensors(MmapedSafetensors),
    Pickle(TorchFile),
}

struct Found {
    file: usize,
    key: String,
    shape: Vec<usize>,
}

fn open(path: &Path) -> Result<Source> {
    let read = |source| Error::Read {
        path: path.into(),
        source,
    };
    if is_torch_file(path) {
        return Ok(Source::Pickle(TorchFile::open(path)?));
    }
    // SAFETY: the file is mapped read-only; the checkpoints are not modified while training reads them.
    let st = unsafe { MmapedSafetensors::new(path) }.map_err(read)?;
    Ok(Source::Safetensors(st))
}

/// Reads every parameter of `cfg` from `paths` (files or directories) into a new `VarMap`
/// under canonical names. Missing or mis-shaped tensors are errors naming the tensor and file.
pub fn load_varmap(
    cfg: &LlavaNextConfig,
    paths: &[PathBuf],
    opts: &LoadOptions,
) -> Result<(VarMap, LoadReport)> {
    let mut files = Vec::new();
    for p in paths {
        files.extend(resolve_files(p)?);
    }
    let sources = files.iter().map(|f| open(f)).collect::<Result<Vec<_>>>()?;
    let expected: BTreeMap<String, Vec<usize>> = cfg.param_shapes().into_iter().collect();
    let mut found: BTreeMap<String, Found> = BTreeMap::new();
    let mut report = LoadReport::default();
    for (fi, src) in sources.iter().enumerate() {
        let keys: Vec<(String, Vec<usize>)> = match src {
            Source::Safetensors(st) => st
                .tensors()
                .into_iter()
                .map(|(k, v)| (k, v.shape().to_vec()))
                .collect(),
            Source::Pickle(m) => m
                .shapes()
                .map(|(k, s)| (k.to_string(), s))
                .chain(m.skipped().keys().map(|k| (k.clone(), vec![])))
                .collect(),
        };
        for (key, shape) in keys {
            let Some(name) = canonical_name(&key).filter(|n| expected.contains_key(n)) else {
                report.ignored.push(key);
                continue;
            };
            if let Some(prev) = found.get(&name) {
                return Err(Error::DuplicateTensor {
                    name,
                    first: format!("{} in {}", prev.key, files[prev.file].display()),
                    second: format!("{key} in {}", files[fi].display()),
                });
            }
            found.insert(
                name,
                Found {
                    file: fi,
                    key,
                    shape,
                },
            );
        }
    }
    let varmap = VarMap::new();
    let searched = || {
        files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    for (name, shape) in &expected {
        let Some(f) = found.get(name) else {
            let fresh = name.starts_with(PROJECTOR_PREFIX) || name == IMAGE_NEWLINE;
            if fresh && opts.init_missing_projector {
                report.initialised.push(name.clone());
                continue;
            }
            return Err(Error::MissingTensor {
                name: name.clone(),
                searched: searched(),
            });
        };
        let mismatch = || Error::ShapeMismatch {
            name: f.key.clone(),
            path: files[f.file].clone(),
            found: f.shape.clone(),
            expected: shape.clone(),
        };
        let is_vocab = name.ends_with("embed_tokens.weight") || name.ends_with("lm_head.weight");
        let grow = opts.grow_vocab
            && is_vocab
            && f.shape.len() == 2
            && f.shape[1] == shape[1]
            && f.shape[0] < shape[0];
        if let Source::Pickle(m) = &sources[f.file] {
            if m.skipped().contains_key(&f.key) {
                // Not a readable tensor: this fails with the file, the tensor and the reason.
                m.load(&f.key, &opts.device)?;
            }
        }
        if f.shape != *shape && !grow {
            return Err(mismatch());
        }
        let t = match &sources[f.file] {
            Source::Safetensors(st) => {
                st.load(&f.key, &opts.device)
                    .map_err(|source| Error::Read {
                        path: files[f.file].clone(),
                        source,
                    })?
            }
            // Errors name the file, the tensor and why (e.g. an unsupported storage type).
            Source::Pickle(m) => m.load(&f.key, &opts.device)?,
        };
        let t = if grow {
            // New rows = mean of the existing ones (spec §8.3), computed in f32.
            let t32 = t.to_dtype(DType::F32)?;
            let mean = t32.mean_keepdim(0)?;
            let extra = mean.broadcast_as((shape[0] - f.shape[0], shape[1]))?;
            report.grown.push(name.clone());
            Tensor::cat(&[&t32, &extra.contiguous()?], 0)?
        } else {
            t
        };
        let var = Var::from_tensor(&t.to_dtype(opts.dtype)?)?;
        varmap
            .data()
            .lock()
            .map_err(|_| Error::Poisoned("VarMap"))?
            .insert(name.clone(), var);
        report.loaded.push(name.clone());
    }
    Ok((varmap, report))
}

/// Loads the checkpoint(s) and builds the model on the resulting `VarMap`.
pub fn load(
    cfg: &LlavaNextConfig,
    paths: &[PathBuf],
    opts: &LoadOptions,
) -> Result<(LlavaNext, VarMap, LoadReport)> {
    let (varmap, report) = load_varmap(cfg, paths, opts)?;
    let vb = VarBuilder::from_varmap(&varmap, opts.dtype, &opts.device);
    let model = LlavaNext::new(cfg, vb)?;
    check_complete(cfg, &varmap)?;
    Ok((model, varmap, report))
}

/// Verifies the `VarMap` holds exactly the config's parameters with the right shapes.
pub fn check_complete(cfg: &LlavaNextConfig, varmap: &VarMap) -> Result<()> {
    let data = varmap
        .data()
        .lock()
        .map_err(|_| Error::Poisoned("VarMap"))?;
    let expected = cfg.param_shapes();
    for (name, shape) in &expected {
        match data.get(name) {
            None => {
                return Err(Error::MissingTensor {
                    name: name.clone(),
                    searched: "the VarMap".into(),
                })
            }
            Some(v) if v.dims() != shape.as_slice() => {
                return Err(Error::ShapeMismatch {
                    name: name.clone(),
                    path: "<VarMap>".into(),
                    found: v.dims().to_vec(),
                    expected: shape.clone(),
                })
            }
            Some(_) => {}
        }
    }
    if data.len() != expected.len() {
        return Err(Error::Config(format!(
            "VarMap has {} tensors, the config {}",
            data.len(),
            expected.len()
        )));
    }
    Ok(())
}

/// Writes every variable under its canonical name (the HF legacy LlavaNext layout) to one
/// safetensors file, in the dtype it is held in.
pub fn save(varmap: &VarMap, path: &Path) -> Result<()> {
    let data = varmap
        .data()
        .lock()
        .map_err(|_| Error::Poisoned("VarMap"))?;
    let tensors: HashMap<String, Tensor> = data
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    candle_core::safetensors::save(&tensors, path).map_err(|source| Error::Write {
        path: path.into(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::{canonical_name, resolve_files};

    #[test]
    fn directories_resolve_as_from_pretrained_does() {
        let d = tempfile::tempdir().unwrap();
        let p = |n: &str| d.path().join(n);
        std::fs::write(p("training_args.bin"), b"x").unwrap();
        let e = resolve_files(d.path()).unwrap_err().to_string();
        assert!(e.contains("pytorch_model.bin[.index.json]"), "{e}");
        std::fs::write(p("pytorch_model.bin"), b"x").unwrap();
        assert_eq!(resolve_files(d.path()).unwrap(), [p("pytorch_model.bin")]);
        std::fs::remove_file(p("pytorch_model.bin")).unwrap();
        std::fs::write(
            p("pytorch_model.bin.index.json"),
            r#"{"weight_map": {"a": "pytorch_model-00001-of-00002.bin",
                               "b": "pytorch_model-00002-of-00002.bin"}}"#,
        )
        .unwrap();
        let e = resolve_files(d.path()).unwrap_err().to_string();
        assert!(e.contains("pytorch_model-00001-of-00002.bin"), "{e}");
        for n in [
            "pytorch_model-00001-of-00002.bin",
            "pytorch_model-00002-of-00002.bin",
        ] {
            std::fs::write(p(n), b"x").unwrap();
        }
        assert_eq!(resolve_files(d.path()).unwrap().len(), 2);
        std::fs::write(p("model.safetensors"), b"x").unwrap();
        assert_eq!(resolve_files(d.path()).unwrap(), [p("model.safetensors")]);
    }

    #[test]
    fn canonical_names_of_every_layout() {
        let v = "vision_tower.vision_model.encoder.layers.3.mlp.fc1.weight";
        for k in [
            v,
            "vision_tower.encoder.layers.3.mlp.fc1.weight",
            "model.vision_tower.encoder.layers.3.mlp.fc1.weight",
            "model.vision_tower.vision_model.encoder.layers.3.mlp.fc1.weight",
            "model.vision_tower.vision_tower.vision_model.encoder.layers.3.mlp.fc1.weight",
            "vision_model.encoder.layers.3.mlp.fc1.weight",
        ] {
            assert_eq!(canonical_name(k).as_deref(), Some(v), "{k}");
        }
        let l = "language_model.model.layers.0.self_attn.q_proj.weight";
        for k in [
            l,
            "model.language_model.layers.0.self_attn.q_proj.weight",
            "model.layers.0.self_attn.q_proj.weight",
        ] {
            assert_eq!(canonical_name(k).as_deref(), Some(l), "{k}");
        }
        let h = Some("language_model.lm_head.weight");
        assert_eq!(canonical_name("lm_head.weight").as_deref(), h);
        assert_eq!(
            canonical_name("language_model.lm_head.weight").as_deref(),
            h
        );
        let p = Some("multi_modal_projector.linear_2.bias");
        assert_eq!(canonical_name("model.mm_projector.2.bias").as_deref(), p);
        assert_eq!(
            canonical_name("model.multi_modal_projector.linear_2.bias").as_deref(),
            p
        );
        assert_eq!(
            canonical_name("model.image_newline").as_deref(),
            Some("image_newline")
        );
        assert_eq!(
            canonical_name("text_model.encoder.layers.0.mlp.fc1.weight"),
            None
        );
        assert_eq!(canonical_name("logit_scale"), None);
        assert_eq!(
            canonical_name("model.layers.0.self_attn.rotary_emb.inv_freq"),
            None
        );
    }
}
