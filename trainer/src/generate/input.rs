//! Prompt files (`generate --input`, the run's `eval_prompts`): JSONL lines
//! `{"id": "q1", "prompt": "...", "images": ["a.jpg"]}`, image paths relative to the file.
//! Every line is checked when the file is read (JSON, a prompt, images that exist), so a bad
//! line is named with its file, line and reason before any model work.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use tokenizers::Tokenizer;

use crate::{Error, Result};

/// One prompt of a file.
#[derive(Debug, Clone, PartialEq)]
pub struct InputPrompt {
    /// The line's `id` (any JSON value), or none.
    pub id: Option<serde_json::Value>,
    /// The question (the user turn).
    pub prompt: String,
    /// Image files, resolved against the prompt file's folder.
    pub images: Vec<PathBuf>,
    /// 1-based line number in the file.
    pub line: usize,
}

impl InputPrompt {
    /// The line's id as text (`line N` when it has none), for logs.
    pub fn label(&self) -> String {
        match &self.id {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(v) => v.to_string(),
            None => format!("line {}", self.line),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    #[serde(default)]
    id: Option<serde_json::Value>,
    prompt: String,
    #[serde(default)]
    images: Vec<PathBuf>,
}

/// Reads and checks a prompt file; empty lines are skipped, an empty file is an error.
pub fn read_input(path: &Path) -> Result<Vec<InputPrompt>> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    let bad = |n: usize, why: String| Error::Config(format!("{}:{n}: {why}", path.display()));
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let l: Line = serde_json::from_str(line).map_err(|e| {
            bad(
                n,
                format!("{e} (expected {{\"id\": ..., \"prompt\": \"...\", \"images\": [...]}})"),
            )
        })?;
        if l.prompt.trim().is_empty() {
            return Err(bad(n, "the prompt is empty".into()));
        }
        let images: Vec<PathBuf> = l.images.iter().map(|p| base.join(p)).collect();
        if let Some(missing) = images.iter().find(|p| !p.is_file()) {
            return Err(bad(n, format!("image {} is not a file", missing.display())));
        }
        out.push(InputPrompt {
            id: l.id,
            prompt: l.prompt,
            images,
            line: n,
        });
    }
    if out.is_empty() {
        return Err(Error::Config(format!("{}: no prompts", path.display())));
    }
    Ok(out)
}

/// Stop tokens: `<|eot_id|>`, `<|end_of_text|>` and `</s>` when the tokenizer has them,
/// `generation_config.json`'s `eos_token_id` in `gen_config_dir`, and `extra`; sorted.
pub fn stop_ids(tok: &Tokenizer, gen_config_dir: Option<&Path>, extra: &[u32]) -> Vec<u32> {
    let mut ids: Vec<u32> = ["<|eot_id|>", "<|end_of_text|>", "</s>"]
        .iter()
        .filter_map(|t| tok.token_to_id(t))
        .collect();
    let gen = gen_config_dir.map(|d| d.join("generation_config.json"));
    if let Some(text) = gen.and_then(|p| std::fs::read_to_string(p).ok()) {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
            match &v["eos_token_id"] {
                serde_json::Value::Number(n) => ids.extend(n.as_u64().map(|x| x as u32)),
                serde_json::Value::Array(a) => {
                    ids.extend(a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32))
                }
                _ => {}
            }
        }
    }
    ids.extend_from_slice(extra);
    ids.sort_unstable();
    ids.dedup();
    ids
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_line_is_named_with_file_line_and_reason() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.png"), b"x").unwrap();
        let p = dir.path().join("q.jsonl");
        std::fs::write(
            &p,
            "{\"id\": \"q1\", \"prompt\": \"Hi\", \"images\": [\"a.png\"]}\n\n{\"prompt\": \"x\", \"images\": [\"b.png\"]}\n",
        )
        .unwrap();
        let e = read_input(&p).unwrap_err().to_string();
        assert!(e.contains("q.jsonl:3: image") && e.contains("b.png"), "{e}");
        std::fs::write(&p, "{\"prompt\": \"Hi\"}\n{\"promt\": \"x\"}\n").unwrap();
        let e = read_input(&p).unwrap_err().to_string();
        assert!(e.contains("q.jsonl:2:") && e.contains("promt"), "{e}");
        std::fs::write(
            &p,
            "{\"id\": 7, \"prompt\": \"Hi\", \"images\": [\"a.png\"]}\n",
        )
        .unwrap();
        let ok = read_input(&p).unwrap();
        assert_eq!(ok[0].images, vec![dir.path().join("a.png")]);
        assert_eq!(ok[0].label(), "7");
    }
}
