//! Text generation from a LLaVA-NeXT checkpoint (`llava-trainer generate`): prompt embeddings
//! with the images placed exactly as in training ([`LlavaNext::prepare`] and
//! [`LlavaNext::embed_prepared`]), then token by token with a KV cache ([`decoder`]), greedy or
//! sampled ([`sample`]), until a stop token or `max_new_tokens`. Several prompts of different
//! lengths run as one left-padded batch and give the same tokens as one at a time.
//!
//! Without the cache ([`GenerateOptions::use_cache`] false) every step is the training forward
//! over the whole sequence: a second, independent path that the golden test holds equal.

pub mod chat_template;
pub mod decoder;
pub mod hf_image;
pub mod input;
pub mod prompt;
pub mod sample;

use candle_core::{DType, Tensor};
use llava_formats::rng::SplitMix64;

use crate::model::batch::{Batch, ImageMeta};
use crate::model::llava_next::LlavaNext;
use crate::{Error, Result};
pub use decoder::Decoder;
pub use sample::Sampling;

/// One prompt, already tokenized; images as the loader gives them.
#[derive(Debug, Clone)]
pub struct Prompt {
    /// Token ids; each image is one placeholder (`image_token_index` or -200) or an already
    /// expanded run of them (HF processor style).
    pub input_ids: Vec<i64>,
    /// `[T, 3, S, S]` tiles of all images in placeholder order (any device and float dtype).
    pub pixel_values: Option<Tensor>,
    pub images: Vec<ImageMeta>,
}

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// None: greedy.
    pub sampling: Option<Sampling>,
    /// Generation ends for a row after it emits one of these (the token is kept in the output).
    pub stop_ids: Vec<u32>,
    pub use_cache: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generated {
    /// New tokens, the stop token included when one ended the answer.
    pub tokens: Vec<u32>,
    /// Prompt length after image expansion (what the model attended to before the answer).
    pub prompt_tokens: usize,
    /// True when a stop token ended the answer (false: `max_new_tokens`).
    pub stopped: bool,
}

impl Generated {
    /// The answer as text: the new tokens without the stop token that ended them, decoded
    /// with special tokens skipped.
    pub fn answer(&self, tok: &tokenizers::Tokenizer, stop_ids: &[u32]) -> Result<String> {
        let ids: Vec<u32> = self
            .tokens
            .iter()
            .copied()
            .filter(|t| !(self.stopped && stop_ids.contains(t)))
            .collect();
        tok.decode(&ids, true)
            .map_err(|e| Error::Batch(format!("decoding an answer: {e}")))
    }

    /// Why the answer ended: `stop_token` or `max_new_tokens` (the `stopped` field of the JSON
    /// outputs).
    pub fn stop_reason(&self) -> &'static str {
        if self.stopped {
            "stop_token"
        } else {
            "max_new_tokens"
        }
    }
}

/// Generates an answer for every prompt (one batch).
pub fn generate(
    model: &LlavaNext,
    prompts: &[Prompt],
    opts: &GenerateOptions,
) -> Result<Vec<Generated>> {
    if prompts.is_empty() {
        return Ok(Vec::new());
    }
    let embeds = prompts
        .iter()
        .map(|p| prompt_embeds(model, p))
        .collect::<Result<Vec<_>>>()?;
    let lens: Vec<usize> = embeds
        .iter()
        .map(|e| e.dim(1))
        .collect::<candle_core::Result<_>>()?;
    let mut rngs: Vec<Option<SplitMix64>> = prompts
        .iter()
        .map(|_| opts.sampling.map(|s| SplitMix64::new(s.seed)))
        .collect();
    let mut out: Vec<Generated> = lens
        .iter()
        .map(|&n| Generated {
            tokens: Vec::new(),
            prompt_tokens: n,
            stopped: false,
        })
        .collect();
    if opts.max_new_tokens == 0 {
        return Ok(out);
    }
    let pick = |logits: &[f32], rng: &mut Option<SplitMix64>| match (&opts.sampling, rng) {
        (Some(s), Some(r)) => sample::sample(logits, s, r),
        _ => sample::argmax(logits),
    };
    if !opts.use_cache {
        for (r, p) in prompts.iter().enumerate() {
            let mut ids = p.input_ids.clone();
            while out[r].tokens.len() < opts.max_new_tokens && !out[r].stopped {
                let logits = last_logits_uncached(model, p, &ids)?;
                let t = pick(&logits, &mut rngs[r]);
                out[r].tokens.push(t);
                out[r].stopped = opts.stop_ids.contains(&t);
                ids.push(t as i64);
            }
        }
        return Ok(out);
    }
    let width = lens.iter().copied().max().unwrap_or(0);
    let pad: Vec<usize> = lens.iter().map(|&n| width - n).collect();
    let lm = model.language_model();
    let hdim = model.config().text_config.hidden_size;
    let rows = embeds
        .iter()
        .zip(&pad)
        .map(|(e, &p)| {
            if p == 0 {
                return Ok(e.clone());
            }
            let z = Tensor::zeros((1, p, hdim), e.dtype(), e.device())?;
            Tensor::cat(&[&z, e], 1)
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    let mut dec = Decoder::new(lm, pad, width + opts.max_new_tokens)?;
    let mut logits = dec.forward(&Tensor::cat(&rows, 0)?)?;
    for _ in 0..opts.max_new_tokens {
        let l = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let mut next = Vec::with_capacity(prompts.len());
        for (r, row) in l.iter().enumerate() {
            let g = &mut out[r];
            if g.stopped || g.tokens.len() >= opts.max_new_tokens {
                // Finished rows still take a column; their outputs are ignored.
                next.push(g.tokens.last().copied().unwrap_or(0));
                continue;
            }
            let t = pick(row, &mut rngs[r]);
            g.tokens.push(t);
            g.stopped = opts.stop_ids.contains(&t);
            next.push(t);
        }
        let done = out
            .iter()
            .all(|g| g.stopped || g.tokens.len() >= opts.max_new_tokens);
        if done {
            break;
        }
        let ids = Tensor::from_vec(next, (prompts.len(), 1), lm.device())?;
        logits = dec.forward(&lm.embed(&ids)?)?;
    }
    Ok(out)
}

fn one_row_batch(model: &LlavaNext, p: &Prompt, ids: &[i64]) -> Result<Batch> {
    let dev = model.language_model().device();
    let dtype = model.language_model().dtype();
    let pixel_values = match &p.pixel_values {
        Some(px) => Some(px.to_device(dev)?.to_dtype(dtype)?),
        None => None,
    };
    if ids.is_empty() {
        return Err(Error::Batch("an empty prompt".into()));
    }
    Ok(Batch {
        input_ids: Tensor::from_slice(ids, (1, ids.len()), &candle_core::Device::Cpu)?,
        labels: None,
        lengths: vec![ids.len()],
        pixel_values,
        images: p.images.clone(),
        segments: None,
    })
}

/// `[1, L, H]` input embeddings of a prompt, images placed.
fn prompt_embeds(model: &LlavaNext, p: &Prompt) -> Result<Tensor> {
    let batch = one_row_batch(model, p, &p.input_ids)?;
    let packed = model.batch_image_features(&batch)?;
    let prep = model.prepare(&batch)?;
    model.embed_prepared(&prep, &packed)
}

/// Logits of the last position of the training forward over the whole sequence.
fn last_logits_uncached(model: &LlavaNext, p: &Prompt, ids: &[i64]) -> Result<Vec<f32>> {
    let batch = one_row_batch(model, p, ids)?;
    let o = model.forward(&batch)?;
    let n = o.lengths[0];
    Ok(o.logits
        .get(0)?
        .get(n - 1)?
        .to_dtype(DType::F32)?
        .to_vec1()?)
}
