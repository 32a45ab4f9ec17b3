//! Conversation templates: a validated [`Record`] → `input_ids` and `labels`, as the reference's
//! `preprocess_multimodal` + `preprocess_llama3` / `preprocess_plain` produce them.

mod llama3;
mod plain;

use std::fmt;
use std::str::FromStr;

use llava_formats::constants::IMAGE_TOKEN_INDEX;

use crate::record::Record;
use crate::reject::Reject;
use crate::text::python_strip;
use crate::tokenizer::TextTokenizer;

pub use llama3::SYSTEM_PROMPT;

pub const IMAGE_PLACEHOLDER: &str = "<image>";

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Template {
    /// The reference's current `preprocess_llama3` (fine-tuning).
    LlavaLlama3,
    /// `preprocess_plain`: `<image>` + caption + `\n` (projector pretraining).
    Plain,
}

impl FromStr for Template {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "llava_llama_3" => Ok(Template::LlavaLlama3),
            "plain" => Ok(Template::Plain),
            other => Err(format!(
                "unknown template {other:?}; expected \"llava_llama_3\" or \"plain\""
            )),
        }
    }
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Template::LlavaLlama3 => "llava_llama_3",
            Template::Plain => "plain",
        })
    }
}

/// Token ids and labels of one sample, images as one [`IMAGE_TOKEN_INDEX`] each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokenized {
    pub input_ids: Vec<i32>,
    pub labels: Vec<i32>,
    /// Position of the first token of the first supervised turn: a truncation that keeps fewer
    /// tokens than this leaves nothing to train on.
    pub first_trained_position: usize,
}

pub fn tokenize(
    template: Template,
    record: &Record,
    tokenizer: &TextTokenizer,
) -> Result<Tokenized, Reject> {
    let turns = normalized_turns(record);
    match template {
        Template::LlavaLlama3 => llama3::tokenize(record, turns, tokenizer),
        Template::Plain => plain::tokenize(record, turns, tokenizer),
    }
}

/// `preprocess_multimodal`: applied to every turn of samples with an image. A single `<image>` not
/// at the start moves to the front followed by a newline; the dataset hack string is deleted.
fn normalized_turns(record: &Record) -> Vec<crate::record::Turn> {
    let mut turns = record.turns.clone();
    if record.has_image() {
        for turn in &mut turns {
            let v = &turn.value;
            if v.matches(IMAGE_PLACEHOLDER).count() == 1 && !v.starts_with(IMAGE_PLACEHOLDER) {
                let rest = v.replace(IMAGE_PLACEHOLDER, "");
                let moved = format!("{IMAGE_PLACEHOLDER}\n{}", python_strip(&rest));
                turn.value = python_strip(&moved).to_string();
            }
            turn.value = turn.value.replace("QA_GT_caption_based_noisy", "");
        }
    }
    turns
}

/// Encodes text in which each `<image>` becomes one [`IMAGE_TOKEN_INDEX`] (the reference registers
/// `<image>` as a special token, so the text pieces around it are encoded separately).
fn encode_with_images(
    tokenizer: &TextTokenizer,
    text: &str,
    images_allowed: bool,
    out: &mut Vec<i32>,
) -> Result<(), Reject> {
    let encode = |piece: &str, out: &mut Vec<i32>| -> Result<(), Reject> {
        let ids = tokenizer
            .encode(piece)
            .map_err(|e| Reject::Tokenizer(e.to_string()))?;
        out.extend(ids);
        Ok(())
    };
    if !images_allowed {
        return encode(text, out);
    }
    for (i, piece) in text.split(IMAGE_PLACEHOLDER).enumerate() {
        if i > 0 {
            out.push(IMAGE_TOKEN_INDEX);
        }
        encode(piece, out)?;
    }
    Ok(())
}

/// Rejects message text that contains a literal special-token string.
fn check_special_strings(tokenizer: &TextTokenizer, turn: usize, text: &str) -> Result<(), Reject> {
    match tokenizer.find_special_string(text) {
        Some(token) => Err(Reject::SpecialTokenInText {
            turn,
            token: token.to_string(),
        }),
        None => Ok(()),
    }
}
