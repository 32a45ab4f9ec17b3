//! The model folder's Jinja chat template, rendered as HF's processor renders it
//! (`apply_chat_template(messages, add_generation_prompt=True)`): transformers' Jinja2 sandbox
//! has `trim_blocks`, `lstrip_blocks`, loop controls, `raise_exception`, `strftime_now` and the
//! tokenizer's special tokens (`bos_token`, …) in the context; minijinja has the same switches,
//! and its pycompat callback gives the Python string methods (`.strip()`, …) templates call.
//! The golden is `fixtures/chat-templates/golden.json` (scripts/make-chat-template-golden.py).

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::io::hf_tokenizer::IMAGE_TOKEN;
use crate::{Error, Result};

/// A chat template and the special tokens its context gets.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatTemplate {
    pub source: String,
    /// Where it was read from (for logs and errors).
    pub origin: PathBuf,
    /// `bos_token`, `eos_token`, `pad_token`, `unk_token` as text.
    pub special_tokens: Vec<(String, String)>,
}

/// A special token entry: a string or an AddedToken object `{"content": ...}`.
fn token_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(m) => m.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| Error::Config(format!("{}: {e}", path.display()))),
        Err(_) => Ok(None),
    }
}

/// `tokenizer_config.json`'s `chat_template`: a string, or named templates (`default` taken).
fn template_of(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Array(a) => a
            .iter()
            .find(|t| t["name"] == "default")
            .and_then(|t| t["template"].as_str())
            .map(str::to_string),
        _ => None,
    }
}

impl ChatTemplate {
    /// The template of a model folder, in HF's order of preference: the processor's
    /// (`chat_template.jinja`, `chat_template.json`), then `tokenizer_config.json`'s. None when
    /// the folder has none.
    pub fn find(dir: &Path) -> Result<Option<Self>> {
        let tok_cfg = read_json(&dir.join("tokenizer_config.json"))?;
        let jinja = dir.join("chat_template.jinja");
        let found = if jinja.is_file() {
            let s = std::fs::read_to_string(&jinja).map_err(|source| Error::Io {
                path: jinja.clone(),
                source,
            })?;
            Some((s, jinja))
        } else if let Some(t) = read_json(&dir.join("chat_template.json"))?
            .and_then(|v| template_of(&v["chat_template"]))
        {
            Some((t, dir.join("chat_template.json")))
        } else {
            tok_cfg
                .as_ref()
                .and_then(|v| template_of(&v["chat_template"]))
                .map(|t| (t, dir.join("tokenizer_config.json")))
        };
        let Some((source, origin)) = found else {
            return Ok(None);
        };
        let map = read_json(&dir.join("special_tokens_map.json"))?;
        let mut special_tokens = Vec::new();
        for key in ["bos_token", "eos_token", "pad_token", "unk_token"] {
            let v = tok_cfg
                .as_ref()
                .and_then(|c| token_text(&c[key]))
                .or_else(|| map.as_ref().and_then(|m| token_text(&m[key])));
            if let Some(v) = v {
                special_tokens.push((key.to_string(), v));
            }
        }
        Ok(Some(Self {
            source,
            origin,
            special_tokens,
        }))
    }

    /// Whether the template reads typed content parts (`{"type": "image"}`, HF processor style)
    /// rather than one string per message.
    pub fn takes_content_parts(&self) -> bool {
        self.source.contains("'type'")
            || self.source.contains("\"type\"")
            || self.source.contains(".type")
    }

    /// The text of one user turn with `n_images` images and the generation prompt: content
    /// parts (the images, then the text) when the template reads them, else one string with an
    /// `<image>\n` line per image before the question.
    pub fn render(&self, question: &str, n_images: usize) -> Result<String> {
        let content = if self.takes_content_parts() {
            let mut parts: Vec<Value> = (0..n_images)
                .map(|_| serde_json::json!({"type": "image"}))
                .collect();
            parts.push(serde_json::json!({"type": "text", "text": question}));
            Value::Array(parts)
        } else {
            Value::String(format!("{IMAGE_TOKEN}\n").repeat(n_images) + question)
        };
        let mut ctx = serde_json::Map::new();
        ctx.insert(
            "messages".into(),
            serde_json::json!([{"role": "user", "content": content}]),
        );
        ctx.insert("add_generation_prompt".into(), Value::Bool(true));
        ctx.insert("tools".into(), Value::Null);
        ctx.insert("documents".into(), Value::Null);
        for (k, v) in &self.special_tokens {
            ctx.insert(k.clone(), Value::String(v.clone()));
        }
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_function("strftime_now", |fmt: String| strftime_now(&fmt));
        env.render_str(&self.source, Value::Object(ctx))
            .map_err(|e| {
                Error::Config(format!(
                    "{}: the chat template does not render: {e:#}",
                    self.origin.display()
                ))
            })
    }

    /// Whether the rendered text already holds the BOS token (then, as HF's processor, the
    /// tokenizer adds no special tokens).
    pub fn starts_with_bos(&self, text: &str) -> bool {
        self.special_tokens
            .iter()
            .any(|(k, v)| k == "bos_token" && !v.is_empty() && text.starts_with(v.as_str()))
    }
}

/// Python's `time.strftime(fmt)` in local time (Llama-3.1 templates print today's date).
fn strftime_now(fmt: &str) -> String {
    let Ok(cfmt) = std::ffi::CString::new(fmt) else {
        return String::new();
    };
    let mut buf = [0u8; 256];
    // SAFETY: localtime_r fills `tm` from `now`; strftime writes at most buf.len() bytes.
    let n = unsafe {
        let now = libc::time(std::ptr::null_mut());
        let mut tm: libc::tm = std::mem::zeroed();
        libc::localtime_r(&now, &mut tm);
        libc::strftime(buf.as_mut_ptr().cast(), buf.len(), cfmt.as_ptr(), &tm)
    };
    String::from_utf8_lossy(&buf[..n]).into_owned()
}
