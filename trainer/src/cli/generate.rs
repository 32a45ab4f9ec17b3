//! `llava-trainer generate`: what a checkpoint answers. The prompt goes through the build's
//! conversion path (llava_llama_3 template, anyres tiles, image tokens), the model decodes with
//! a KV cache (llava_trainer::generate); greedy unless --temperature is set.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::DType;
use llava_trainer::generate::input;
use llava_trainer::generate::prompt::{self, Aspect, Template};
use llava_trainer::generate::{generate, GenerateOptions, Prompt, Sampling};
use llava_trainer::io::weights::{self, LoadOptions};
use llava_trainer::model::config::LlavaNextConfig;
use serde_json::json;
use tokenizers::Tokenizer;

#[derive(clap::Args, Debug)]
#[command(after_help = "\
Examples:
  llava-trainer generate --model out/run/checkpoint-800 --image cat.jpg --prompt 'What is this?'
  llava-trainer generate --model out/run/checkpoint-800 --input questions.jsonl --json
  llava-trainer generate --model models/llava-next-8b --device cuda --image cat.jpg \\
      --prompt 'Describe the image.' --max-new-tokens 128 --temperature 0.7 --top-p 0.9 --seed 1

--input lines: {\"prompt\": \"...\", \"images\": [\"a.jpg\"], \"id\": \"optional\"}; image paths
are relative to the file's folder. Answers print as they finish, one per prompt.")]
pub struct Args {
    /// Model folder in the HF layout (config.json, model*.safetensors; a checkpoint-N of `run`).
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// Folder with tokenizer.json when the model folder has none.
    #[arg(long, value_name = "DIR")]
    tokenizer: Option<PathBuf>,
    /// Image file for --prompt (repeat for several images, in order).
    #[arg(long = "image", value_name = "FILE")]
    images: Vec<PathBuf>,
    /// The question (user turn).
    #[arg(long, required_unless_present = "input", conflicts_with = "input")]
    prompt: Option<String>,
    /// JSONL of prompts (see below), generated --batch-size at a time.
    #[arg(long, value_name = "FILE.jsonl")]
    input: Option<PathBuf>,
    /// Prompts per batch with --input (left padded; the same tokens as one at a time).
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Prompt format; default: the model folder's chat template (chat_template.jinja,
    /// chat_template.json or tokenizer_config.json, rendered as HF's processor does), else
    /// llava-llama3 when the tokenizer has Llama-3's header tokens, else raw.
    #[arg(long, value_enum)]
    template: Option<Template>,
    /// Tiling; default: anyres when config.json has image_grid_pinpoints, else pad.
    #[arg(long, value_enum)]
    image_aspect_ratio: Option<Aspect>,
    /// Most new tokens per answer (the stop token included).
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 (default) is greedy decoding.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Nucleus sampling mass (with --temperature).
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// Sampling seed (the same seed gives the same answer).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Extra stop token id (repeatable); `<|eot_id|>`, `<|end_of_text|>` and `</s>` always stop.
    #[arg(long = "stop-id", value_name = "ID")]
    stop_ids: Vec<u32>,
    /// Recompute the whole sequence every step (slow; a check of the cache).
    #[arg(long)]
    no_cache: bool,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Parameter dtype: auto is bf16 on CUDA, f32 on the CPU.
    #[arg(long, default_value = "auto", value_parser = ["auto", "f32", "bf16"])]
    dtype: String,
    /// One JSON object per prompt on stdout (prompt, answer, token counts, tokens/s).
    #[arg(long)]
    json: bool,
}

struct Job {
    id: Option<serde_json::Value>,
    question: String,
    images: Vec<PathBuf>,
}

fn read_jobs(args: &Args) -> Result<Vec<Job>> {
    if let Some(q) = &args.prompt {
        return Ok(vec![Job {
            id: None,
            question: q.clone(),
            images: args.images.clone(),
        }]);
    }
    let path = args.input.as_ref().context("--prompt or --input")?;
    if !args.images.is_empty() {
        bail!("--image goes with --prompt; with --input list images in each line");
    }
    Ok(input::read_input(path)?
        .into_iter()
        .map(|p| Job {
            id: p.id,
            question: p.prompt,
            images: p.images,
        })
        .collect())
}

pub fn run(args: Args) -> Result<()> {
    let dev = super::device::parse(&args.device)?;
    let dtype = match (args.dtype.as_str(), dev.is_cuda()) {
        ("bf16", _) | ("auto", true) => DType::BF16,
        _ => DType::F32,
    };
    let cfg_path = args.model.join("config.json");
    let cfg = LlavaNextConfig::from_file(&cfg_path)
        .with_context(|| format!("reading {}", cfg_path.display()))?;
    let tok_dir = args.tokenizer.as_ref().unwrap_or(&args.model);
    let tok_path = tok_dir.join("tokenizer.json");
    let tok = Tokenizer::from_file(&tok_path).map_err(|e| {
        anyhow::anyhow!(
            "{}: {e} (pass --tokenizer DIR when the model folder has no tokenizer.json)",
            tok_path.display()
        )
    })?;
    let jobs = read_jobs(&args)?;
    let t0 = Instant::now();
    let opts = LoadOptions {
        dtype,
        device: dev.clone(),
        ..LoadOptions::default()
    };
    let (model, _, _) = weights::load(&cfg, std::slice::from_ref(&args.model), &opts)
        .with_context(|| format!("loading {}", args.model.display()))?;
    tracing::info!(
        "loaded {} in {:.1}s",
        args.model.display(),
        t0.elapsed().as_secs_f64()
    );
    let format = prompt::prompt_format(args.template, &args.model, &tok)?;
    let aspect = args
        .image_aspect_ratio
        .unwrap_or_else(|| prompt::default_aspect(&cfg));
    let gen_opts = GenerateOptions {
        max_new_tokens: args.max_new_tokens,
        sampling: (args.temperature > 0.0).then_some(Sampling {
            temperature: args.temperature,
            top_p: args.top_p,
            seed: args.seed,
        }),
        stop_ids: input::stop_ids(&tok, Some(&args.model), &args.stop_ids),
        use_cache: !args.no_cache,
    };
    for chunk in jobs.chunks(args.batch_size.max(1)) {
        let mut texts = Vec::new();
        let mut prompts: Vec<Prompt> = Vec::new();
        for j in chunk {
            let imgs: Vec<&Path> = j.images.iter().map(PathBuf::as_path).collect();
            let (text, p) =
                prompt::build_prompt(&tok, &cfg, &j.question, &imgs, &format, aspect, &dev)?;
            texts.push(text);
            prompts.push(p);
        }
        let t = Instant::now();
        let out = generate(&model, &prompts, &gen_opts)?;
        let secs = t.elapsed().as_secs_f64();
        let new_total: usize = out.iter().map(|g| g.tokens.len()).sum();
        for ((j, g), text) in chunk.iter().zip(&out).zip(&texts) {
            let answer = g.answer(&tok, &gen_opts.stop_ids)?;
            if args.json {
                let v = json!({
                    "id": j.id,
                    "prompt": j.question,
                    "images": j.images,
                    "prompt_text": text,
                    "answer": answer,
                    "tokens": g.tokens,
                    "prompt_tokens": g.prompt_tokens,
                    "new_tokens": g.tokens.len(),
                    "stopped": g.stop_reason(),
                    "batch_size": chunk.len(),
                    "seconds": secs,
                    "tokens_per_s": new_total as f64 / secs.max(1e-9),
                    "device": args.device,
                    "dtype": format!("{dtype:?}").to_lowercase(),
                });
                println!("{v}");
            } else {
                println!("{answer}");
                eprintln!(
                    "[{} prompt tokens, {} new, {:.1} tokens/s]",
                    g.prompt_tokens,
                    g.tokens.len(),
                    new_total as f64 / secs.max(1e-9)
                );
            }
        }
    }
    Ok(())
}
