//! `log.jsonl`: one line per logged step.

use std::io::Write;
use std::path::Path;

use crate::{Error, Result};

pub(crate) fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// Appends one JSON line (a step's or an evaluation's).
pub(crate) fn append_log(path: &Path, entry: &impl serde::Serialize) -> Result<()> {
    let io = |source| Error::Io {
        path: path.into(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io)?;
    let line = serde_json::to_string(entry).map_err(|e| Error::Config(e.to_string()))?;
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
