//! The tokenizer files a model directory ships, made usable by HF's `LlavaNextProcessor` (and so
//! by lmms-eval and vLLM): the LLM's tokenizer plus what HF's own conversion of
//! llama3-llava-next-8b adds (spec §8.3): `<image>` at `image_token_index` (128256) and `<pad>`
//! (128257) as special added tokens, `pad_token = "<pad>"`, and the `llava_llama_3` chat template.
//! Without `<image>` in the vocabulary the processor inserts no image tokens at all.
//!
//! Idempotent: a tokenizer that already has both tokens at those ids (a checkpoint of ours) is
//! written back unchanged in content.

use std::path::Path;

use serde_json::{json, Map, Value};

use super::json_file;
use crate::{Error, Result};

pub const IMAGE_TOKEN: &str = "<image>";
pub const PAD_TOKEN: &str = "<pad>";

/// The `llava_llama_3` conversation as a Jinja chat template (spec §2.4, §2.7): the default
/// system prompt unless the conversation starts with a system message; per message the header,
/// then its images as `<image>\n` (the reference moves the image to the front of the first user
/// turn), then its text stripped, then `<|eot_id|>`; the generation prompt is the assistant
/// header. Message content may be a string or HF's list of `{"type": "image"|"text"}` parts.
/// No `bos_token`: the tokenizer's post-processor adds it, so the model cards' usage
/// (`processor(images, apply_chat_template(...))`) gets exactly one.
pub const LLAVA_LLAMA3_CHAT_TEMPLATE: &str = concat!(
    "{%- if messages[0]['role'] != 'system' %}",
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}",
    "{{- 'You are a helpful language and vision assistant. You are able to understand the visual ",
    "content that the user provides, and assist the user with a variety of tasks using natural ",
    "language.' }}",
    "{{- '<|eot_id|>' }}",
    "{%- endif %}",
    "{%- for message in messages %}",
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}",
    "{%- if message['content'] is string %}",
    "{{- message['content'] | trim }}",
    "{%- else %}",
    "{%- for part in message['content'] | selectattr('type', 'equalto', 'image') %}",
    "{{- '<image>\\n' }}",
    "{%- endfor %}",
    "{%- for part in message['content'] | selectattr('type', 'equalto', 'text') %}",
    "{{- part['text'] | trim }}",
    "{%- endfor %}",
    "{%- endif %}",
    "{{- '<|eot_id|>' }}",
    "{%- endfor %}",
    "{%- if add_generation_prompt %}",
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}",
    "{%- endif %}",
);

fn bad(path: &Path, msg: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: path.into(),
        msg: msg.into(),
    }
}

fn added_token(id: u32, content: &str) -> Value {
    json!({
        "id": id,
        "content": content,
        "single_word": false,
        "lstrip": false,
        "rstrip": false,
        "normalized": false,
        "special": true,
    })
}

/// Adds `<image>` at `image_id` and `<pad>` (after every existing id) to a `tokenizer.json`'s
/// `added_tokens`, unless present; returns `<image>`'s id and `<pad>`'s (None when the model's
/// `vocab_size` has no row for it: then the tokenizer keeps no pad token). Errors if `image_id`
/// is taken by another token, `<image>` sits elsewhere, or `image_id` is beyond the vocabulary.
pub fn add_llava_tokens(
    tokenizer: &mut Value,
    image_id: u32,
    vocab_size: usize,
    path: &Path,
) -> Result<(u32, Option<u32>)> {
    if image_id as usize >= vocab_size {
        return Err(bad(
            path,
            format!(
                "image_token_index {image_id} is beyond the model's vocabulary of {vocab_size}"
            ),
        ));
    }
    let added = tokenizer
        .get_mut("added_tokens")
        .and_then(Value::as_array_mut)
        .ok_or_else(|| {
            bad(
                path,
                "no `added_tokens` list: not a tokenizers tokenizer.json",
            )
        })?;
    let find = |added: &[Value], content: &str| {
        added
            .iter()
            .find(|t| t["content"] == content)
            .and_then(|t| t["id"].as_u64())
    };
    match find(added, IMAGE_TOKEN) {
        Some(id) if id == u64::from(image_id) => {}
        Some(id) => {
            return Err(bad(
                path,
                format!(
                    "{IMAGE_TOKEN} is token {id}, but the model's image_token_index is {image_id}"
                ),
            ))
        }
        None => {
            if let Some(other) = added.iter().find(|t| t["id"] == image_id) {
                return Err(bad(
                    path,
                    format!(
                        "image_token_index {image_id} is already the token {}",
                        other["content"]
                    ),
                ));
            }
            added.push(added_token(image_id, IMAGE_TOKEN));
        }
    }
    let pad_id = match find(added, PAD_TOKEN) {
        Some(id) => Some(id as u32),
        None => {
            let vocab_max = tokenizer["model"]["vocab"]
                .as_object()
                .and_then(|v| v.values().filter_map(Value::as_u64).max())
                .unwrap_or(0);
            let added = tokenizer["added_tokens"]
                .as_array_mut()
                .expect("checked above");
            let next = added
                .iter()
                .filter_map(|t| t["id"].as_u64())
                .chain([vocab_max])
                .max()
                .unwrap_or(0)
                + 1;
            if (next as usize) < vocab_size {
                added.push(added_token(next as u32, PAD_TOKEN));
                Some(next as u32)
            } else {
                None
            }
        }
    };
    if let Some(added) = tokenizer["added_tokens"].as_array_mut() {
        added.sort_by_key(|t| t["id"].as_u64());
    }
    Ok((image_id, pad_id))
}

/// `tokenizer_config.json` with the two tokens in `added_tokens_decoder`, `pad_token`, the chat
/// template and the processor class.
pub fn patch_tokenizer_config(config: &mut Map<String, Value>, image_id: u32, pad_id: Option<u32>) {
    let decoder = config
        .entry("added_tokens_decoder")
        .or_insert_with(|| Value::Object(Map::new()));
    let tokens = [(Some(image_id), IMAGE_TOKEN), (pad_id, PAD_TOKEN)];
    if let Value::Object(decoder) = decoder {
        for (id, content) in tokens.iter().filter_map(|(id, c)| Some((id.as_ref()?, c))) {
            let (id, content) = (*id, *content);
            let mut entry = added_token(id, content);
            if let Value::Object(e) = &mut entry {
                e.remove("id");
            }
            decoder.insert(id.to_string(), entry);
        }
    }
    if pad_id.is_some() {
        config.insert("pad_token".into(), PAD_TOKEN.into());
    }
    config.insert("chat_template".into(), LLAVA_LLAMA3_CHAT_TEMPLATE.into());
    config.insert("processor_class".into(), "LlavaNextProcessor".into());
}

/// Writes `dst`'s tokenizer files from the tokenizer in `src` (a model or tokenizer folder with
/// `tokenizer.json`; `tokenizer_config.json`, `special_tokens_map.json` and
/// `generation_config.json` are taken along when present), with the LLaVA tokens and template.
/// `src` may also be the tokenizer file itself (what a build's manifest names): its folder's
/// companions are taken along only when the file is called `tokenizer.json`.
/// Returns false (and writes nothing) when `src` has no `tokenizer.json`.
pub fn write_tokenizer_files(
    src: &Path,
    dst: &Path,
    image_token_index: u32,
    vocab_size: usize,
) -> Result<bool> {
    // The file itself, or a folder holding `tokenizer.json`; the companions come from the
    // folder only when it is an HF tokenizer folder (a lone `tok.json` has none).
    let (tok_path, companions) = if src.is_file() {
        let hf_folder = src.file_name() == Some("tokenizer.json".as_ref());
        (src.to_path_buf(), src.parent().filter(|_| hf_folder))
    } else {
        (src.join("tokenizer.json"), Some(src))
    };
    if !tok_path.is_file() {
        return Ok(false);
    }
    let companion = |name: &str| companions.map(|d| d.join(name));
    let read_companion = |name: &str| match companion(name) {
        Some(p) => json_file::read_object_or_empty(&p),
        None => Ok(Map::new()),
    };
    let mut tokenizer = json_file::read(&tok_path)?;
    let (image_id, pad_id) =
        add_llava_tokens(&mut tokenizer, image_token_index, vocab_size, &tok_path)?;
    json_file::write(&dst.join("tokenizer.json"), &tokenizer)?;

    let mut config = read_companion("tokenizer_config.json")?;
    patch_tokenizer_config(&mut config, image_id, pad_id);
    json_file::write(&dst.join("tokenizer_config.json"), &Value::Object(config))?;

    let mut map = read_companion("special_tokens_map.json")?;
    if pad_id.is_some() {
        map.insert("pad_token".into(), PAD_TOKEN.into());
    }
    json_file::write(&dst.join("special_tokens_map.json"), &Value::Object(map))?;

    // What processors read their template from (transformers >= 4.43 saves it beside the
    // processor config).
    json_file::write(
        &dst.join("chat_template.json"),
        &json!({ "chat_template": LLAVA_LLAMA3_CHAT_TEMPLATE }),
    )?;
    if let Some(gen) = companion("generation_config.json") {
        if gen.is_file() && companions != Some(dst) {
            std::fs::copy(&gen, dst.join("generation_config.json")).map_err(|source| {
                Error::Io {
                    path: gen.clone(),
                    source,
                }
            })?;
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_tokenizer() -> Value {
        json!({
            "added_tokens": [added_token(5, "<|eot_id|>")],
            "model": {"vocab": {"a": 0, "b": 1, "c": 2, "d": 3, "e": 4}},
        })
    }

    #[test]
    fn adds_image_and_pad_after_the_vocabulary_once() {
        let p = Path::new("tokenizer.json");
        let mut t = tiny_tokenizer();
        assert_eq!(
            add_llava_tokens(&mut t, 6, 64, p).expect("adds"),
            (6, Some(7))
        );
        let again = t.clone();
        assert_eq!(
            add_llava_tokens(&mut t, 6, 64, p).expect("idempotent"),
            (6, Some(7))
        );
        assert_eq!(t, again);
        let contents: Vec<_> = t["added_tokens"]
            .as_array()
            .expect("list")
            .iter()
            .map(|t| (t["id"].as_u64().expect("id"), t["content"].clone()))
            .collect();
        assert_eq!(
            contents,
            [
                (5, json!("<|eot_id|>")),
                (6, json!("<image>")),
                (7, json!("<pad>"))
            ]
        );
    }

    #[test]
    fn refuses_an_image_id_taken_by_another_token() {
        let mut t = tiny_tokenizer();
        let p = Path::new("t.json");
        let e = add_llava_tokens(&mut t, 5, 64, p).expect_err("5 is <|eot_id|>");
        assert!(e.to_string().contains("<|eot_id|>"), "{e}");
        let mut t = tiny_tokenizer();
        add_llava_tokens(&mut t, 6, 64, p).expect("adds");
        let e = add_llava_tokens(&mut t, 9, 64, p).expect_err("<image> is 6");
        assert!(e.to_string().contains("image_token_index is 9"), "{e}");
        let e = add_llava_tokens(&mut tiny_tokenizer(), 64, 64, p).expect_err("no row for 64");
        assert!(
            e.to_string().contains("beyond the model's vocabulary"),
            "{e}"
        );
    }

    #[test]
    fn no_pad_token_without_a_row_for_it() {
        let mut t = tiny_tokenizer();
        let p = Path::new("t.json");
        assert_eq!(add_llava_tokens(&mut t, 6, 7, p).expect("adds"), (6, None));
        let mut config = Map::new();
        patch_tokenizer_config(&mut config, 6, None);
        assert!(!config.contains_key("pad_token"));
        assert_eq!(config["added_tokens_decoder"]["6"]["content"], "<image>");
    }
}
