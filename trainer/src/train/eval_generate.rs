//! Generation during training (`eval_prompts`, `eval_generate_every`): rank 0 answers a few
//! fixed prompts (greedy, `eval_max_new_tokens`) every N optimizer steps and at the end, with the
//! weights of that step, through the path of `llava-trainer generate` (the same prompt text,
//! tiles, stop tokens and KV-cache decoder), so an answer at step N is the one `generate` gives on
//! `checkpoint-N`. Answers go to the log (tracing), `log.jsonl` (one record per prompt) and
//! TensorBoard (text). The other ranks do not wait for it here: they meet rank 0 at the next
//! collective, which allows for far longer than a few answers take.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Device;
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use super::log::Reporter;
use super::TrainConfig;
use crate::generate::input::{self, InputPrompt};
use crate::generate::prompt::{self, Aspect};
use crate::generate::{generate, GenerateOptions, Prompt};
use crate::io::checkpoint_tokenizer::{self, TokenizerSource};
use crate::model::config::LlavaNextConfig;
use crate::model::llava_next::LlavaNext;
use crate::{Error, Result};
use llava_loader::ShardIndex;

/// One answer (a log.jsonl line).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GenerateLog {
    pub step: u64,
    /// The prompt's `id` in the file (its line number when it has none).
    pub prompt_id: serde_json::Value,
    pub prompt: String,
    pub answer: String,
    /// New token ids, the stop token included when one ended the answer.
    pub tokens: Vec<u32>,
    pub prompt_tokens: usize,
    /// `stop_token` or `max_new_tokens`.
    pub stopped: String,
    /// New tokens of all prompts / time of the batch (prefill included).
    pub tokens_per_s: f64,
}

/// The prompts, ready on the device, and how to decode.
pub(crate) struct EvalGenerate {
    every: Option<u64>,
    items: Vec<InputPrompt>,
    prompts: Vec<Prompt>,
    tok: Tokenizer,
    opts: GenerateOptions,
}

/// How the shards tiled their images (when every source agrees), else the model's default.
fn shards_aspect(index: &ShardIndex, cfg: &LlavaNextConfig) -> Aspect {
    let mut modes = index
        .manifest
        .sources
        .iter()
        .map(|s| s.image_aspect_ratio.as_str());
    let first = modes.next();
    let agreed = first.filter(|f| modes.all(|m| m == *f));
    match agreed {
        Some("square") => Aspect::Square,
        Some("pad") => Aspect::Pad,
        Some(m) if m.starts_with("anyres") && !cfg.image_grid_pinpoints.is_empty() => {
            Aspect::Anyres
        }
        _ => prompt::default_aspect(cfg),
    }
}

/// The tokenizer file the run's checkpoints carry (what `generate` on them reads).
fn tokenizer_file(cfg: &TrainConfig, index: &ShardIndex) -> Result<PathBuf> {
    let found =
        checkpoint_tokenizer::resolve(&cfg.source, cfg.tokenizer.as_deref(), &index.manifest);
    match found {
        TokenizerSource::Missing(why) => Err(Error::Config(format!(
            "eval_prompts needs the run's tokenizer: {why}"
        ))),
        other => {
            let p = other.path().map(Path::to_path_buf).unwrap_or_default();
            Ok(if p.is_dir() {
                p.join("tokenizer.json")
            } else {
                p
            })
        }
    }
}

impl EvalGenerate {
    /// Rank 0's setup before the first step: reads the prompt file and turns every prompt
    /// into tokens and tiles (a bad line or image is named with its file and line). None when
    /// `eval_prompts` is unset.
    pub fn new(
        cfg: &TrainConfig,
        model_cfg: &LlavaNextConfig,
        index: &ShardIndex,
        dev: &Device,
    ) -> Result<Option<Self>> {
        let Some(path) = &cfg.eval_prompts else {
            return Ok(None);
        };
        let items = input::read_input(path)?;
        let tok_path = tokenizer_file(cfg, index)?;
        let tok = Tokenizer::from_file(&tok_path)
            .map_err(|e| Error::Config(format!("{}: {e}", tok_path.display())))?;
        // The format the run's checkpoints carry (their chat template is llava_llama_3's).
        let template = prompt::default_template(&tok);
        let format = prompt::PromptFormat::from(template);
        let aspect = shards_aspect(index, model_cfg);
        let mut prompts = Vec::with_capacity(items.len());
        for it in &items {
            let images: Vec<&Path> = it.images.iter().map(PathBuf::as_path).collect();
            let (_, p) =
                prompt::build_prompt(&tok, model_cfg, &it.prompt, &images, &format, aspect, dev)
                    .map_err(|e| Error::Config(format!("{}:{}: {e}", path.display(), it.line)))?;
            prompts.push(p);
        }
        let gen_dir = tok_path.parent().map(Path::to_path_buf);
        let opts = GenerateOptions {
            max_new_tokens: cfg.eval_max_new_tokens,
            sampling: None,
            stop_ids: input::stop_ids(&tok, gen_dir.as_deref(), &[]),
            use_cache: true,
        };
        tracing::info!(
            "eval_prompts: {} prompt(s) from {} ({template:?}, {aspect:?} images, {} new tokens \
             at most), answered every {} and at the end",
            items.len(),
            path.display(),
            opts.max_new_tokens,
            cfg.eval_generate_every
                .map_or("run".to_string(), |n| format!("{n} steps")),
        );
        Ok(Some(Self {
            every: cfg.eval_generate_every,
            items,
            prompts,
            tok,
            opts,
        }))
    }

    /// Answers every prompt when `step` is due (every N steps, and the last one).
    pub fn after_step(
        &self,
        model: &LlavaNext,
        step: u64,
        total_steps: u64,
        reporter: &mut Reporter,
    ) -> Result<Vec<GenerateLog>> {
        let due = self.every.is_some_and(|n| step.is_multiple_of(n)) || step == total_steps;
        if !due {
            return Ok(Vec::new());
        }
        let t = Instant::now();
        let out = generate(model, &self.prompts, &self.opts)?;
        let secs = t.elapsed().as_secs_f64();
        let new_total: usize = out.iter().map(|g| g.tokens.len()).sum();
        let tps = new_total as f64 / secs.max(1e-9);
        let mut logs = Vec::with_capacity(out.len());
        for (it, g) in self.items.iter().zip(&out) {
            let answer = g.answer(&self.tok, &self.opts.stop_ids)?;
            let log = GenerateLog {
                step,
                prompt_id: it
                    .id
                    .clone()
                    .unwrap_or_else(|| serde_json::Value::from(it.line)),
                prompt: it.prompt.clone(),
                answer,
                tokens: g.tokens.clone(),
                prompt_tokens: g.prompt_tokens,
                stopped: g.stop_reason().into(),
                tokens_per_s: tps,
            };
            tracing::info!(
                "generate at step {step} [{}] {:?} -> {:?} ({} tokens, {tps:.1} tokens/s)",
                it.label(),
                it.prompt,
                log.answer,
                g.tokens.len()
            );
            let text = format!(
                "**{}**\n\n{}\n\n*answer ({} tokens):*\n\n{}",
                it.label(),
                it.prompt,
                g.tokens.len(),
                log.answer
            );
            reporter.record_text(step, &log, &[(&format!("generate/{}", it.label()), &text)])?;
            logs.push(log);
        }
        Ok(logs)
    }
}
