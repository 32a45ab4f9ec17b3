//! The `tokenizer.json` BPE, used for text only: templates place every special token themselves.

use std::path::Path;

use sha2::{Digest, Sha256};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum TokenizerError {
    #[error("cannot read tokenizer {path}: {reason}")]
    Load { path: String, reason: String },
    #[error("tokenizer {path} has no token {token:?}; the llava_llama_3 template needs the Llama-3-Instruct tokenizer")]
    MissingSpecial { path: String, token: String },
    #[error("tokenizer failed on text: {0}")]
    Encode(String),
}

/// Ids of the Llama-3 special tokens that the templates place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecialIds {
    pub begin_of_text: i32,
    pub start_header: i32,
    pub end_header: i32,
    pub eot: i32,
}

/// Calls of [`TextTokenizer::encode`] in this process (all tokenizers): lets a test prove that
/// a build reused pass 1 instead of tokenizing again.
static ENCODE_CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many times any tokenizer of this process has encoded a text.
pub fn encode_calls() -> u64 {
    ENCODE_CALLS.load(std::sync::atomic::Ordering::Relaxed)
}

pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    specials: SpecialIds,
    /// Contents of the tokenizer's special added tokens: such strings inside message text would be
    /// read as control tokens by the reference, so records containing them are rejected.
    special_strings: Vec<String>,
    sha256: String,
}

impl TextTokenizer {
    pub fn from_file(path: &Path) -> Result<Self, TokenizerError> {
        let display = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|e| TokenizerError::Load {
            path: display.clone(),
            reason: e.to_string(),
        })?;
        let sha256 = hex::encode(Sha256::digest(&bytes));
        let inner =
            tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| TokenizerError::Load {
                path: display.clone(),
                reason: e.to_string(),
            })?;
        let id = |token: &str| {
            inner.token_to_id(token).map(|id| id as i32).ok_or_else(|| {
                TokenizerError::MissingSpecial {
                    path: display.clone(),
                    token: token.to_string(),
                }
            })
        };
        let specials = SpecialIds {
            begin_of_text: id("<|begin_of_text|>")?,
            start_header: id("<|start_header_id|>")?,
            end_header: id("<|end_header_id|>")?,
            eot: id("<|eot_id|>")?,
        };
        let mut special_strings: Vec<String> = inner
            .get_added_tokens_decoder()
            .values()
            .filter(|t| t.special)
            .map(|t| t.content.clone())
            .collect();
        special_strings.sort();
        Ok(Self {
            inner,
            specials,
            special_strings,
            sha256,
        })
    }

    pub fn specials(&self) -> SpecialIds {
        self.specials
    }

    /// SHA-256 of the `tokenizer.json` bytes (recorded in manifests so trainers can check it).
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// BPE ids of `text`, without any special token added.
    pub fn encode(&self, text: &str) -> Result<Vec<i32>, TokenizerError> {
        ENCODE_CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if text.is_empty() {
            return Ok(Vec::new());
        }
        let encoding = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok(encoding.get_ids().iter().map(|&id| id as i32).collect())
    }

    /// The first special-token string found in `text`, if any.
    pub fn find_special_string(&self, text: &str) -> Option<&str> {
        // Every Llama-3 special token starts with "<|": only look where one could start.
        if !text.contains('<') {
            return None;
        }
        self.special_strings
            .iter()
            .find(|s| text.contains(s.as_str()))
            .map(String::as_str)
    }

    /// Text of one id (for showing samples); `None` for ids outside the vocabulary.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Decodes ids to text, keeping special tokens visible.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, false)
            .map_err(|e| TokenizerError::Encode(e.to_string()))
    }
}
