//! What the trainer checks and converts between the shards and the model: compatibility,
//! loader batches → model batches (tiles normalised on the device), and the memory plan.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::config::{TrainConfig, TunableParts};
use crate::diag::memory::{MemoryPlan, PlanInput};
use crate::io::init::ModelSource;
use crate::model::attention::AttentionKind;
use crate::model::config::LlavaNextConfig;
use crate::{Batch, Error, ImageMeta, Result};
use llava_loader::{Pixels, ShardIndex};

/// Refuses shards that do not fit the model (what the trainer cannot silently fix).
pub fn check_compatible(
    index: &ShardIndex,
    cfg: &LlavaNextConfig,
    tokenizer: Option<&Path>,
) -> Result<()> {
    let s = &index.manifest.settings;
    let mut problems = Vec::new();
    if s.mm_patch_merge_type != cfg.mm_patch_merge_type {
        problems.push(format!(
            "the shards were built for mm_patch_merge_type \"{0}\", the model uses \"{1}\" \
             (set merge_type / --merge-type {0})",
            s.mm_patch_merge_type, cfg.mm_patch_merge_type
        ));
    }
    if s.tile_size as usize != cfg.vision_config.image_size {
        problems.push(format!(
            "the shards' tiles are {0}x{0}, the vision tower's image_size is {1}",
            s.tile_size, cfg.vision_config.image_size
        ));
    }
    // config.json holds HF's (h, w); the manifest LLaVA-NeXT's (w, h). Compared as sets: the
    // grids come from the shards, the list only matters to HF's processor.
    let mut ours: Vec<[usize; 2]> = s
        .image_grid_pinpoints
        .iter()
        .map(|[w, h]| [*w as usize, *h as usize])
        .collect();
    let mut model: Vec<[usize; 2]> = cfg
        .image_grid_pinpoints
        .iter()
        .map(|[h, w]| [*w, *h])
        .collect();
    ours.sort();
    model.sort();
    if !model.is_empty() && ours != model {
        problems.push(format!(
            "the shards were built with image_grid_pinpoints (w,h) {:?}, the model's config has \
             (h,w) {:?}",
            s.image_grid_pinpoints, cfg.image_grid_pinpoints
        ));
    }
    if let Some(max) = cfg.tokenizer_model_max_length {
        if max != s.model_max_length {
            problems.push(format!(
                "the shards were built with model_max_length {}, the model's \
                 tokenizer_model_max_length is {max}",
                s.model_max_length
            ));
        }
    }
    // Llama-3's ids go up to 128255 plus <image>/<pad>; the shards hold no placeholder ids.
    if let Some(tok) = tokenizer {
        let bytes = std::fs::read(tok).map_err(|source| Error::Io {
            path: tok.into(),
            source,
        })?;
        let sha = {
            use sha2::Digest;
            hex::encode(sha2::Sha256::digest(&bytes))
        };
        if sha != index.manifest.tokenizer_sha256 {
            problems.push(format!(
                "the shards were built with another tokenizer (sha256 {}) than {} ({sha})",
                index.manifest.tokenizer_sha256,
                tok.display()
            ));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Error::Mismatch(format!(
            "shards {} do not fit the model:\n  - {}",
            index.dir.display(),
            problems.join("\n  - ")
        )))
    }
}

/// The loader's plain arrays as the model's tensors; checks every image's token count against
/// the model's (a mismatch means the shards were built for another geometry).
pub fn to_model_batch(
    b: &llava_loader::Batch,
    cfg: &LlavaNextConfig,
    dev: &Device,
) -> Result<Batch> {
    let (rows, l) = (b.num_rows(), b.seq_len);
    let vocab = cfg.text_config.vocab_size as i32;
    if let Some(&id) = b.input_ids.iter().find(|&&id| id >= vocab) {
        return Err(Error::Mismatch(format!(
            "token id {id} is outside the model's vocabulary of {vocab}: the shards were built \
             with a larger tokenizer than the model's embeddings (resize them, e.g. to 128320)"
        )));
    }
    let ids: Vec<i64> = b.input_ids.iter().map(|&x| i64::from(x)).collect();
    let labels: Vec<i64> = b.labels.iter().map(|&x| i64::from(x)).collect();
    let mut images = Vec::with_capacity(b.images.len());
    for im in &b.images {
        let meta = ImageMeta {
            orig_size: (im.width as usize, im.height as usize),
            grid: (im.grid_cols as usize, im.grid_rows as usize),
            num_tiles: im.num_tiles as usize,
        };
        let n = cfg.image_token_count(&meta)?;
        if n != im.image_tokens as usize {
            return Err(Error::Mismatch(format!(
                "an image of sample {} takes {} tokens in the shards and {n} in the model: the \
                 shards were built for another merge type or vision geometry",
                im.sample, im.image_tokens
            )));
        }
        images.push(meta);
    }
    let s = b.tile_size;
    let pixel_values = if b.num_tiles == 0 {
        None
    } else {
        let t = match &b.pixels {
            Pixels::F32(v) => Tensor::from_slice(v, (b.num_tiles, 3, s, s), dev)?,
            Pixels::U8(v) => {
                let x = Tensor::from_slice(v, (b.num_tiles, 3, s, s), dev)?;
                normalize_on_device(&x)?
            }
        };
        Some(t)
    };
    // Ids and labels stay on the host: the step reads them to plan gathers and loss positions.
    Ok(Batch {
        input_ids: Tensor::from_vec(ids, (rows, l), &Device::Cpu)?,
        labels: Some(Tensor::from_vec(labels, (rows, l), &Device::Cpu)?),
        lengths: b.lengths.clone(),
        pixel_values,
        images,
        segments: b.is_packed().then(|| b.segments.clone()),
    })
}

/// uint8 `[T, 3, S, S]` tiles → CLIP-normalised f32 on their device, bit-identical to the
/// loader's f32 path: a gather from the same 3 × 256 table (`llava_formats::normalize`), so the
/// host→device copy is a quarter of the f32 bytes.
pub fn normalize_on_device(tiles: &Tensor) -> Result<Tensor> {
    let dev = tiles.device();
    let lut: Vec<f32> = llava_formats::normalize::lut()
        .iter()
        .flat_map(|c| c.iter().copied())
        .collect();
    let lut = Tensor::from_vec(lut, 3 * 256, dev)?;
    let offsets = Tensor::new(&[0u32, 256, 512], dev)?.reshape((1, 3, 1, 1))?;
    let idx = tiles.to_dtype(DType::U32)?.broadcast_add(&offsets)?;
    let shape = idx.dims().to_vec();
    Ok(lut.index_select(&idx.flatten_all()?, 0)?.reshape(shape)?)
}

/// The model config of a source, without reading any weights.
pub fn source_config(src: &ModelSource) -> Result<LlavaNextConfig> {
    match (&src.model, &src.llm, &src.vision) {
        (Some(m), _, _) => LlavaNextConfig::from_file(m.join("config.json")),
        (None, Some(l), Some(v)) => LlavaNextConfig::from_llama_and_clip_files(
            &l.join("config.json"),
            &v.join("config.json"),
            Some(128320),
        ),
        _ => Err(Error::Config(
            "give a model directory, or both an LLM and a vision tower directory".into(),
        )),
    }
}

/// The per-device memory plan of a run over `index` (longest sample as the row length, five
/// tiles per sample when the shards hold images), and what to change when it does not fit
/// `capacity` bytes.
pub fn memory_plan(
    cfg: &TrainConfig,
    model_cfg: &LlavaNextConfig,
    index: &ShardIndex,
    world_size: usize,
    capacity: Option<u64>,
) -> Result<(MemoryPlan, Option<String>)> {
    let parts = TunableParts::parse(&cfg.tunable_parts)?;
    let trainable = |n: &str| parts.is_trainable(n);
    let attention: AttentionKind = cfg
        .attention
        .parse()
        .map_err(|e| Error::Config(format!("attention: {e}")))?;
    let batch_size = cfg
        .batch_size
        .unwrap_or(index.manifest.grouping.batch_size)
        .max(1);
    let seq_len = index
        .samples
        .iter()
        .map(|s| s.length as usize)
        .max()
        .unwrap_or(0);
    let tiles = if index.manifest.totals.images > 0 {
        5 * batch_size
    } else {
        0
    };
    // Packed across batches: one row of `pack_length` tokens, holding as many images as the
    // shortest samples with an image let in.
    let (tiles, batch_size, seq_len) = if cfg.pack_across_batches {
        let pack = cfg
            .pack_length
            .map_or(index.manifest.settings.model_max_length, |n| n as usize);
        let images = if tiles == 0 {
            0
        } else {
            let shortest = index
                .groups
                .iter()
                .filter(|g| g.modality == llava_loader::Modality::Image)
                .flat_map(|g| g.batches.clone())
                .flat_map(|b| index.samples[index.batches[b].samples.clone()].iter())
                .map(|s| s.length as usize)
                .min()
                .unwrap_or(pack)
                .max(1);
            pack.div_ceil(shortest)
        };
        (5 * images, 1, pack)
    } else {
        (tiles, batch_size, seq_len)
    };
    // Packed rows hold at most the positions of the unpacked batch, but in longer rows (which
    // matters for dense attention's L² scores): plan for rows as long as a pack can get.
    let (rows, seq_len) = if cfg.packing && !cfg.pack_across_batches {
        let pack = cfg
            .pack_length
            .map_or(index.manifest.settings.model_max_length, |n| n as usize);
        let row = pack.min(batch_size * seq_len).max(1);
        ((batch_size * seq_len).div_ceil(row), row)
    } else {
        (batch_size, seq_len)
    };
    let input = PlanInput {
        model: model_cfg,
        trainable: &trainable,
        batch_size: rows,
        seq_len,
        tiles,
        bf16: cfg.bf16,
        recompute: cfg.gradient_checkpointing,
        attention,
        loss_chunk: cfg.loss_chunk,
        world_size,
        zero_stage: cfg.zero_stage,
    };
    let plan = MemoryPlan::estimate(&input);
    let advice = capacity.and_then(|c| plan.advice(&input, c));
    Ok((plan, advice))
}
