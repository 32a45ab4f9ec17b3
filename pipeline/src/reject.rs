//! Why a record is not turned into a training sample. Every variant is a reason a user can act on;
//! its `Display` is what goes into `rejects.jsonl` and the `convert` output.

use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Reject {
    #[error("line is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("record is not a JSON object")]
    NotAnObject,
    #[error("record has no `conversations` list")]
    NoConversations,
    #[error("`conversations` is empty")]
    EmptyConversations,
    #[error("turn {turn} is not an object with string `from` and `value`{detail}")]
    MalformedTurn { turn: usize, detail: String },
    #[error(
        "turn {turn} uses OpenAI-style `role`/`content` keys; the reference reads `from`/`value`"
    )]
    RoleContentTurn { turn: usize },
    #[error("turn {turn} has role {role:?}; expected human, gpt, user, assistant or system")]
    UnknownRole { turn: usize, role: String },
    #[error("first turn is from {role:?}; the reference requires the first turn to be from human or gpt (it would crash and substitute the next sample)")]
    BadFirstRole { role: String },
    #[error("`image` is null")]
    ImageNull,
    #[error("`image` is empty")]
    ImageEmpty,
    #[error("`image` must be a string or a list of strings")]
    ImageNotString,
    #[error("video samples are not supported")]
    Video,
    #[error("{placeholders} <image> placeholder(s) in the conversation but {images} image(s) in the record")]
    ImageCountMismatch { placeholders: usize, images: usize },
    #[error("turn {turn} ({role}) contains <image>; images may only appear in user turns")]
    ImageInAssistantTurn { turn: usize, role: String },
    #[error("turn {turn} contains the special-token string {token:?}")]
    SpecialTokenInText { turn: usize, token: String },
    #[error("conversation has nothing to train on: {0}")]
    NothingToTrain(String),
    #[error(
        "plain template needs exactly one human turn with <image> followed by one gpt answer: {0}"
    )]
    PlainShape(String),
    #[error("tokenizer failed: {0}")]
    Tokenizer(String),
    #[error("image {path}: {reason}")]
    Image { path: String, reason: String },
    #[error("image {path}: {reason}")]
    TruncatedImage { path: String, reason: String },
    #[error("image {path}: {reason}")]
    ImageTooLarge { path: String, reason: String },
    #[error("every turn of the conversation is empty or blank: nothing to train on")]
    EmptyConversation,
    #[error("image {index} needs {tokens} tokens at position {position}, which does not fit in model_max_length {max_len}")]
    ImageDoesNotFit {
        index: usize,
        tokens: usize,
        position: usize,
        max_len: usize,
    },
    #[error("no supervised token is left after truncation to model_max_length {max_len}")]
    NothingLeftAfterTruncation { max_len: usize },
}

impl Reject {
    /// The reject for an image that cannot be used, with the kind its error calls for.
    pub fn image(path: &std::path::Path, error: &llava_imaging::ImageError) -> Reject {
        let path = path.display().to_string();
        let reason = error.to_string();
        match error.kind() {
            "truncated_image" => Reject::TruncatedImage { path, reason },
            "image_too_large" => Reject::ImageTooLarge { path, reason },
            _ => Reject::Image { path, reason },
        }
    }

    /// A short stable name for counting rejects by kind (the `Display` text carries the details).
    pub fn kind(&self) -> &'static str {
        match self {
            Reject::InvalidJson(_) => "invalid_json",
            Reject::NotAnObject => "not_an_object",
            Reject::NoConversations => "no_conversations",
            Reject::EmptyConversations => "empty_conversations",
            Reject::MalformedTurn { .. } => "malformed_turn",
            Reject::RoleContentTurn { .. } => "role_content_turn",
            Reject::UnknownRole { .. } => "unknown_role",
            Reject::BadFirstRole { .. } => "bad_first_role",
            Reject::ImageNull => "image_null",
            Reject::ImageEmpty => "image_empty",
            Reject::ImageNotString => "image_not_string",
            Reject::Video => "video",
            Reject::ImageCountMismatch { .. } => "image_count_mismatch",
            Reject::ImageInAssistantTurn { .. } => "image_in_assistant_turn",
            Reject::SpecialTokenInText { .. } => "special_token_in_text",
            Reject::NothingToTrain(_) => "nothing_to_train",
            Reject::PlainShape(_) => "plain_shape",
            Reject::Tokenizer(_) => "tokenizer",
            Reject::Image { .. } => "image",
            Reject::TruncatedImage { .. } => "truncated_image",
            Reject::ImageTooLarge { .. } => "image_too_large",
            Reject::EmptyConversation => "empty_conversation",
            Reject::ImageDoesNotFit { .. } => "image_does_not_fit",
            Reject::NothingLeftAfterTruncation { .. } => "nothing_left_after_truncation",
        }
    }
}
