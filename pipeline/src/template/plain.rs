//! `plain`: the reference's `preprocess_plain` (spec §2.3), used for projector pretraining.
//!
//! The human turn is replaced by `<image>`, so the text is `<image>` + answer + `"\n"`:
//! ids `[<|begin_of_text|>, -200] + bpe(answer + "\n")`, the first two positions masked.

use llava_formats::constants::{IGNORE_INDEX, IMAGE_TOKEN_INDEX};

use super::{check_special_strings, Tokenized, IMAGE_PLACEHOLDER};
use crate::record::{Record, Turn};
use crate::reject::Reject;
use crate::text::python_strip;
use crate::tokenizer::TextTokenizer;

pub(super) fn tokenize(
    record: &Record,
    turns: Vec<Turn>,
    tokenizer: &TextTokenizer,
) -> Result<Tokenized, Reject> {
    let [question, answer] = turns.as_slice() else {
        return Err(Reject::PlainShape(format!("{} turns", turns.len())));
    };
    if question.from != "human" || answer.from != "gpt" {
        return Err(Reject::PlainShape(format!(
            "turns are from {:?} and {:?}",
            question.from, answer.from
        )));
    }
    if !question.value.contains(IMAGE_PLACEHOLDER) {
        return Err(Reject::PlainShape("the human turn has no <image>".into()));
    }
    if answer.value.contains(IMAGE_PLACEHOLDER) {
        return Err(Reject::ImageInAssistantTurn {
            turn: 1,
            role: "gpt".into(),
        });
    }
    // The human text is discarded and replaced by exactly one image.
    if record.images.len() != 1 {
        return Err(Reject::ImageCountMismatch {
            placeholders: 1,
            images: record.images.len(),
        });
    }
    check_special_strings(tokenizer, 1, &answer.value)?;
    if python_strip(&answer.value).is_empty() {
        return Err(Reject::NothingToTrain("the answer is empty".into()));
    }
    let sp = tokenizer.specials();
    let mut input_ids = vec![sp.begin_of_text, IMAGE_TOKEN_INDEX];
    input_ids.extend(
        tokenizer
            .encode(&format!("{}\n", answer.value))
            .map_err(|e| Reject::Tokenizer(e.to_string()))?,
    );
    let mut labels = input_ids.clone();
    labels[..2].fill(IGNORE_INDEX);
    Ok(Tokenized {
        input_ids,
        labels,
        first_trained_position: 2,
    })
}
