//! `llava-data`: LLaVA records → token ids, labels and anyres tiles → Parquet shards.

pub mod budget;
pub mod convert;
pub mod inspect;
pub mod progress;
pub mod record;
pub mod reject;
pub mod shard_build;
pub mod template;
pub mod text;
pub mod tokenizer;
