//! `llava_llama_3`: the reference repo's current `preprocess_llama3` (spec §2.4).
//!
//! Each turn is rendered with the Llama-3 Instruct chat template for a single message,
//! `<|start_header_id|>{role}<|end_header_id|>\n\n{content|trim}<|eot_id|>`, after a system turn
//! that also carries `<|begin_of_text|>`. User and system turns are masked; every other role is
//! supervised whole (header included). Then the four control ids are un-masked everywhere. The
//! reference also lists `"\n\n"` for un-masking, but its lookup returns None for byte-level BPE, so
//! 271 stays masked: we match that.

use llava_formats::constants::IGNORE_INDEX;

use super::{check_special_strings, encode_with_images, Tokenized, IMAGE_PLACEHOLDER};
use crate::record::{Record, Turn};
use crate::reject::Reject;
use crate::text::python_strip;
use crate::tokenizer::TextTokenizer;

pub const SYSTEM_PROMPT: &str = "You are a helpful language and vision assistant. You are able to understand the visual content that the user provides, and assist the user with a variety of tasks using natural language.";

/// Maps a LLaVA `from` to the chat role; `None` for names the reference would mis-train on.
fn chat_role(from: &str) -> Option<&str> {
    match from {
        "human" => Some("user"),
        "gpt" => Some("assistant"),
        "user" | "assistant" | "system" => Some(from),
        _ => None,
    }
}

fn is_masked_role(role: &str) -> bool {
    role == "user" || role == "system"
}

pub(super) fn tokenize(
    record: &Record,
    mut turns: Vec<Turn>,
    tokenizer: &TextTokenizer,
) -> Result<Tokenized, Reject> {
    // The reference looks the first role up strictly: anything but human/gpt crashes the sample.
    match turns[0].from.as_str() {
        "human" => {}
        "gpt" => {
            turns.remove(0);
        }
        other => {
            return Err(Reject::BadFirstRole {
                role: other.to_string(),
            })
        }
    }
    // Turn numbers in messages refer to the record as written.
    let offset = record.turns.len() - turns.len();
    let mut roles = Vec::with_capacity(turns.len());
    let mut placeholders = 0;
    for (i, turn) in turns.iter().enumerate() {
        let role = chat_role(&turn.from).ok_or_else(|| Reject::UnknownRole {
            turn: i + offset,
            role: turn.from.clone(),
        })?;
        let count = turn.value.matches(IMAGE_PLACEHOLDER).count();
        if count > 0 && !is_masked_role(role) {
            return Err(Reject::ImageInAssistantTurn {
                turn: i + offset,
                role: role.to_string(),
            });
        }
        placeholders += count;
        check_special_strings(tokenizer, i + offset, &turn.value)?;
        roles.push(role);
    }
    if placeholders != record.images.len() {
        return Err(Reject::ImageCountMismatch {
            placeholders,
            images: record.images.len(),
        });
    }
    if roles.iter().all(|r| is_masked_role(r)) {
        return Err(Reject::NothingToTrain("no assistant turn".into()));
    }

    let sp = tokenizer.specials();
    let encode = |text: &str| {
        tokenizer
            .encode(text)
            .map_err(|e| Reject::Tokenizer(e.to_string()))
    };
    let mut input_ids = vec![sp.begin_of_text];
    let mut labels = vec![IGNORE_INDEX];
    let mut first_trained_position = None;
    let system = Turn {
        from: "system".into(),
        value: SYSTEM_PROMPT.into(),
    };
    for (role, turn) in
        std::iter::once(("system", &system)).chain(roles.iter().copied().zip(&turns))
    {
        let start = input_ids.len();
        input_ids.push(sp.start_header);
        input_ids.extend(encode(role)?);
        input_ids.push(sp.end_header);
        let content = format!("\n\n{}", python_strip(&turn.value));
        encode_with_images(tokenizer, &content, record.has_image(), &mut input_ids)?;
        input_ids.push(sp.eot);
        if is_masked_role(role) {
            labels.resize(input_ids.len(), IGNORE_INDEX);
        } else {
            first_trained_position.get_or_insert(start);
            labels.extend_from_slice(&input_ids[start..]);
        }
    }
    let unmasked = [sp.begin_of_text, sp.start_header, sp.end_header, sp.eot];
    for (label, id) in labels.iter_mut().zip(&input_ids) {
        if unmasked.contains(id) {
            *label = *id;
        }
    }
    Ok(Tokenized {
        input_ids,
        labels,
        // At least one supervised turn exists (checked above).
        first_trained_position: first_trained_position.unwrap_or(0),
    })
}
