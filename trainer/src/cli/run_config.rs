//! `llava-trainer run`'s settings: the `--config` train.toml with the flags over it, as one
//! [`TrainConfig`]. An error names the flag, or the file, line and key it comes from.

use std::path::PathBuf;

use anyhow::{Context, Result};
use llava_formats::config::ConfigError;
use llava_formats::located;
use llava_trainer::train::{self, TrainConfig};

use super::run::Args;

/// Where the run keys are documented (for error messages).
const RUN_DOCS: &str = "`llava-trainer run --help` and docs/configuration.md";

/// Names other trainers use for a key (HF `TrainingArguments`), for "did you mean".
const ALIASES: [(&str, &str); 9] = [
    ("learning_rate", "lr"),
    ("output_dir", "output"),
    ("per_device_train_batch_size", "batch_size"),
    ("gradient_accumulation_steps", "grad_accum"),
    ("num_train_epochs", "epochs"),
    ("save_steps", "save_every"),
    ("logging_steps", "log_every"),
    ("eval_steps", "eval_every"),
    ("dataloader_num_workers", "workers"),
];

pub(crate) fn merged(args: Args) -> Result<TrainConfig> {
    let file = args.config.as_ref().map(|p| p.display().to_string());
    let mut text = String::new();
    let mut v: toml::Table = match &args.config {
        Some(p) => {
            text = std::fs::read_to_string(p)
                .with_context(|| format!("reading {}: check the --config path", p.display()))?;
            let file = p.display().to_string();
            let mut table: toml::Table = toml::from_str(&text)
                .map_err(|e| ConfigError::from_toml(&file, &text, &e, RUN_DOCS))?;
            train::resolve_paths(&mut table, p.parent().unwrap_or(std::path::Path::new(".")));
            table
        }
        None => toml::Table::new(),
    };
    let path = |p: PathBuf| toml::Value::String(p.display().to_string());
    let mut from_flags: Vec<String> = Vec::new();
    let mut set = |k: &str, x: Option<toml::Value>| {
        if let Some(x) = x {
            v.insert(k.into(), x);
            from_flags.push(k.into());
        }
    };
    set("shards", args.shards.map(path));
    set("model", args.model.map(path));
    set("llm", args.parts.llm.map(path));
    set("vision", args.parts.vision.map(path));
    set("projector", args.parts.projector.map(path));
    set("output", args.output.map(path));
    set("tunable_parts", args.tunable_parts.map(toml::Value::String));
    set("lr", args.lr.map(toml::Value::Float));
    set(
        "vision_tower_lr",
        args.vision_tower_lr.map(toml::Value::Float),
    );
    set("weight_decay", args.weight_decay.map(toml::Value::Float));
    set("warmup_ratio", args.warmup_ratio.map(toml::Value::Float));
    set("max_grad_norm", args.max_grad_norm.map(toml::Value::Float));
    let int = |x: u64| toml::Value::Integer(x as i64);
    set("batch_size", args.batch_size.map(|x| int(x as u64)));
    set("grad_accum", args.grad_accum.map(|x| int(x as u64)));
    set("epochs", args.epochs.map(int));
    set("max_steps", args.max_steps.map(int));
    set("seed", args.seed.map(int));
    set("bf16", args.bf16.then_some(toml::Value::Boolean(true)));
    set("precision", args.precision.map(toml::Value::String));
    set("save_every", args.save_every.map(int));
    set(
        "save_total_limit",
        args.save_total_limit.map(|x| int(x as u64)),
    );
    set("log_every", args.log_every.map(int));
    set("workers", args.workers.map(|x| int(x as u64)));
    set("merge_type", args.merge_type.map(toml::Value::String));
    set("tokenizer", args.tokenizer.map(path));
    set("resume", args.resume.map(path));
    set(
        "no_resume",
        args.no_resume.then_some(toml::Value::Boolean(true)),
    );
    set(
        "gradient_checkpointing",
        args.no_gradient_checkpointing
            .then_some(toml::Value::Boolean(false)),
    );
    set("attention", args.attention.map(toml::Value::String));
    set("zero_stage", args.zero_stage.map(|x| int(u64::from(x))));
    set("loss_chunk", args.loss_chunk.map(|x| int(x as u64)));
    set(
        "skip_memory_check",
        args.skip_memory_check.then_some(toml::Value::Boolean(true)),
    );
    set(
        "packing",
        args.packing.then_some(toml::Value::Boolean(true)),
    );
    set("pack_length", args.pack_length.map(|x| int(u64::from(x))));
    set(
        "pack_across_batches",
        args.pack_across_batches
            .then_some(toml::Value::Boolean(true)),
    );
    set("eval_shards", args.eval_shards.map(path));
    set("eval_every", args.eval_every.map(int));
    set("tensorboard", args.tensorboard.map(path));
    set("on_corrupt", args.on_corrupt.map(toml::Value::String));
    set("eval_prompts", args.eval_prompts.map(path));
    set("eval_generate_every", args.eval_generate_every.map(int));
    set(
        "eval_max_new_tokens",
        args.eval_max_new_tokens.map(|x| int(x as u64)),
    );
    // An error names the flag, or the file, line and key it comes from.
    let located = |key: &str, message: String| -> anyhow::Error {
        match &file {
            Some(f) if !from_flags.iter().any(|k| k == key) => {
                ConfigError::at_key(f, &text, key, message).into()
            }
            _ => anyhow::anyhow!("--{}: {message}", key.replace('_', "-")),
        }
    };
    let cfg: TrainConfig = match toml::Value::Table(v.clone()).try_into() {
        Ok(c) => c,
        Err(e) => {
            let msg = e.message().trim().to_string();
            if let Some(rest) = msg.strip_prefix("missing field ") {
                let k = located::backticked(rest).unwrap_or(rest);
                let flag = k.replace('_', "-");
                anyhow::bail!(
                    "{}`{k}` is required: pass --{flag}, or set `{k} = ...` in the --config file \
                     (see {RUN_DOCS})",
                    file.as_ref().map_or(String::new(), |f| format!("{f}: "))
                );
            }
            let unknown = msg
                .strip_prefix("unknown field ")
                .and_then(located::backticked)
                .map(str::to_string);
            if let Some(k) = unknown {
                let keys = TrainConfig::keys();
                let known: Vec<&str> = keys.iter().map(String::as_str).collect();
                let hint = ALIASES
                    .iter()
                    .find(|(a, _)| *a == k)
                    .map(|(_, to)| *to)
                    .or_else(|| located::closest(&k, &known))
                    .map_or(String::new(), |s| format!("did you mean `{s}`? "));
                return Err(located(
                    &k,
                    format!(
                        "unknown key `{k}`: {hint}remove or rename it (the keys are in {RUN_DOCS})"
                    ),
                ));
            }
            // Which key: the first whose value alone, with the required keys, fails the same way.
            let culprit = v.iter().map(|(k, _)| k.clone()).find(|k| {
                let mut probe = toml::Table::new();
                for r in ["shards", "output", "model"] {
                    probe.insert(r.into(), toml::Value::String("x".into()));
                }
                if let Some(x) = v.get(k) {
                    probe.insert(k.clone(), x.clone());
                }
                toml::Value::Table(probe).try_into::<TrainConfig>().is_err()
            });
            return Err(match culprit {
                Some(k) => located(
                    &k,
                    format!("{msg}: fix the value (its type and allowed values are in {RUN_DOCS})"),
                ),
                None => anyhow::anyhow!("invalid training configuration: {msg} (see {RUN_DOCS})"),
            });
        }
    };
    cfg.validate().map_err(|(k, m)| located(k, m))?;
    Ok(cfg)
}
