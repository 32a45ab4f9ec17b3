//! `llava-data`: LLaVA records -> token ids, labels and tiles -> shards.
