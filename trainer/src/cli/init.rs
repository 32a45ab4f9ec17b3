//! `llava-trainer init`: a randomly initialised model from a small JSON spec, one assembled
//! from separate Llama-3 and CLIP checkpoints (+ projector), or a trained model converted
//! (`--from`, e.g. a reference LLaVA-NeXT checkpoint), written in the HF layout.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use llava_trainer::io::checkpoint;
use llava_trainer::io::init::{self, InitSpec, ModelSource};

#[derive(clap::Args, Debug)]
#[command(after_help = "\
Examples:
  llava-trainer init --config trainer/configs/tiny-model.json --output out/tiny-model
  llava-trainer init --llm Meta-Llama-3-8B-Instruct --vision clip-vit-large-patch14-336 \\
      --output models/llava-next-8b-init
  llava-trainer init --config trainer/configs/tiny-model.json --output out/tiny-model --force
  llava-trainer init --config trainer/configs/tiny-model.json --tokenizer .cache/tokenizer \
      --output out/tiny-model-hf")]
pub struct Args {
    /// model.json: {"vision_config": {...}, "text_config": {...}, "image_grid_pinpoints":
    /// [[w, h], ...], "seed": N}; omitted fields are llama3-llava-next-8b's.
    #[arg(long)]
    config: Option<PathBuf>,
    /// A trained model folder to convert to the HF layout: a reference LLaVA-NeXT checkpoint
    /// (`LlavaLlamaForCausalLM`, original key names, as its train.py saves it) or an HF
    /// LlavaNext one (instead of --config / --llm).
    #[arg(long, value_name = "DIR")]
    from: Option<PathBuf>,
    #[command(flatten)]
    parts: super::model_parts::ModelParts,
    /// Folder to write the model into (model.safetensors, config.json, processor files); created
    /// if missing. An existing model there is kept unless --force.
    #[arg(long, value_name = "DIR")]
    output: PathBuf,
    /// Seed of freshly initialised tensors when assembling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Overwrite a model already in --output.
    #[arg(long)]
    force: bool,
    /// Folder with the Llama-3-Instruct tokenizer.json (+ tokenizer_config.json) to ship with
    /// the model, with `<image>` and `<pad>` added and the llava_llama_3 chat template, as HF's
    /// LlavaNextProcessor needs [default: the --llm folder; none with --config].
    #[arg(long, value_name = "DIR")]
    tokenizer: Option<PathBuf>,
}

/// Files whose presence marks `dir` as holding a model.
const MODEL_FILES: [&str; 2] = ["model.safetensors", "config.json"];

pub fn run(args: Args) -> Result<()> {
    if !args.force {
        if let Some(f) = MODEL_FILES.iter().find(|f| args.output.join(f).exists()) {
            bail!(
                "{} already holds a model ({f}); pass --force to overwrite it, or choose another \
                 --output",
                args.output.display()
            );
        }
    }
    let (cfg, varmap, tok) = match (&args.config, &args.parts.llm, &args.parts.vision) {
        (None, None, None) if args.from.is_some() => {
            let dir = args.from.clone().unwrap_or_default();
            if args.parts.projector.is_some() {
                bail!("--projector does not go with --from (the model has its projector)");
            }
            let (cfg, varmap) = init::load_for_export(&dir, args.seed)
                .with_context(|| format!("reading the model in {}", dir.display()))?;
            (cfg, varmap, Some(dir))
        }
        (Some(c), None, None) if args.from.is_none() => {
            let text =
                std::fs::read_to_string(c).with_context(|| format!("reading {}", c.display()))?;
            let spec: InitSpec =
                serde_json::from_str(&text).with_context(|| format!("parsing {}", c.display()))?;
            let (cfg, varmap) = init::random_model(&spec)?;
            if let Some(p) = &args.parts.projector {
                init::load_projector(&cfg, &varmap, p)?;
            }
            (cfg, varmap, None)
        }
        (None, Some(_), Some(_)) if args.from.is_none() => {
            let src = ModelSource {
                model: None,
                llm: args.parts.llm.clone(),
                vision: args.parts.vision.clone(),
                projector: args.parts.projector.clone(),
            };
            let (cfg, varmap) = init::load_source(&src, args.seed, DType::F32, &Device::Cpu)?;
            (cfg, varmap, args.parts.llm.clone())
        }
        _ => bail!(
            "give one of: --config model.json; --llm DIR --vision DIR [--projector FILE]; \
             --from DIR"
        ),
    };
    if let Some(t) = &args.tokenizer {
        if !t.join("tokenizer.json").is_file() {
            bail!(
                "{} has no tokenizer.json (--tokenizer names the folder that holds it)",
                t.display()
            );
        }
    }
    let tok = args.tokenizer.clone().or(tok);
    checkpoint::save_hf_model(&args.output, &cfg, &varmap, tok.as_deref())?;
    let n: usize = varmap.all_vars().iter().map(|v| v.elem_count()).sum();
    println!(
        "wrote {} ({n} parameters, vocabulary {})",
        args.output.display(),
        cfg.text_config.vocab_size
    );
    Ok(())
}
