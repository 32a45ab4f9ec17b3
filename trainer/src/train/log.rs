//! What a run logs: `log.jsonl` (one line per logged step or evaluation), the same on stdout, and TensorBoard scalars.

use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// One logged step.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StepLog {
    pub step: u64,
    pub epoch: f64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens_per_s: f64,
    pub samples_per_s: f64,
    pub data_wait_s: f64,
    pub step_s: f64,
}

impl StepLog {
    pub(crate) fn report(&self, total_steps: u64, reporter: &mut Reporter) -> Result<()> {
        let line = format!(
            "step {}/{total_steps} loss {:.4} lr {:.3e} grad_norm {:.3} tokens/s {:.0} \
             samples/s {:.2} data_wait {:.3}s",
            self.step,
            self.loss,
            self.lr,
            self.grad_norm,
            self.tokens_per_s,
            self.samples_per_s,
            self.data_wait_s
        );
        reporter.report(
            self.step,
            &line,
            self,
            &[
                ("train/loss", self.loss),
                ("train/lr", self.lr),
                ("train/grad_norm", self.grad_norm),
                ("train/tokens_per_s", self.tokens_per_s),
                ("train/samples_per_s", self.samples_per_s),
            ],
        )
    }
}

/// Samples left out of a step for a row checksum mismatch (a log.jsonl line; `on_corrupt = "skip"`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CorruptLog {
    pub step: u64,
    /// One located description per sample: shard, row group, row, sample, checksums.
    pub skipped_corrupt: Vec<String>,
    /// Skipped so far in this process.
    pub skipped_corrupt_total: usize,
}

impl CorruptLog {
    pub(crate) fn report(&self, reporter: &mut Reporter) -> Result<()> {
        let total = self.skipped_corrupt_total;
        let line = format!(
            "step {}: skipped {} corrupt sample(s), {total} so far",
            self.step,
            self.skipped_corrupt.len()
        );
        reporter.report(
            self.step,
            &line,
            self,
            &[("train/skipped_corrupt", total as f64)],
        )
    }
}

pub(crate) fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// Appends one JSON line (a step's or an evaluation's).
fn append_log(path: &Path, entry: &impl serde::Serialize) -> Result<()> {
    let io = |source| Error::Io {
        path: path.into(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io)?;
    let line = serde_json::to_string(entry).map_err(|source| Error::Serialize {
        what: "a log.jsonl line",
        source,
    })?;
    writeln!(f, "{line}").map_err(io)
}

/// Drops log lines (steps and evaluations) after `step` (a killed run's steps that a resume
/// redoes).
pub(crate) fn truncate_log(path: &Path, step: u64) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .is_ok_and(|e| e["step"].as_u64().is_some_and(|s| s <= step))
        })
        .collect();
    let mut out = kept.join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    std::fs::write(path, out).map_err(|source| Error::Io {
        path: path.into(),
        source,
    })
}

/// Where a logged step or evaluation goes: a line on stdout (above the progress bar when there
/// is one, so the two never share a line), a record in `log.jsonl`, and scalars in the
/// TensorBoard events when `--tensorboard` is set.
pub(crate) struct Reporter {
    pub bar: Option<indicatif::ProgressBar>,
    pub log_path: std::path::PathBuf,
    pub events: Option<super::tensorboard::EventWriter>,
}

impl Reporter {
    pub fn report(
        &mut self,
        step: u64,
        line: &str,
        record: &impl serde::Serialize,
        scalars: &[(&str, f64)],
    ) -> Result<()> {
        match &self.bar {
            Some(b) => b.println(line),
            None => println!("{line}"),
        }
        append_log(&self.log_path, record)?;
        if let Some(w) = self.events.as_mut() {
            w.scalars(step, scalars)?;
        }
        Ok(())
    }

    /// A record in `log.jsonl` and text summaries in TensorBoard, nothing printed (the caller
    /// logs its own line).
    pub fn record_text(
        &mut self,
        step: u64,
        record: &impl serde::Serialize,
        texts: &[(&str, &str)],
    ) -> Result<()> {
        append_log(&self.log_path, record)?;
        if let Some(w) = self.events.as_mut() {
            w.texts(step, texts)?;
        }
        Ok(())
    }
}
