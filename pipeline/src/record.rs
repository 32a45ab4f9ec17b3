//! LLaVA records: a JSON list or JSONL of `{id?, image?, conversations: [{from, value}]}`.
//!
//! Parsing is lenient about *types* only where the reference is (`id` of any JSON type) and strict
//! elsewhere: every shape the reference would crash on, or silently mis-train, becomes a [`Reject`].

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde_json::Value;
use thiserror::Error;

use crate::reject::Reject;
use crate::text::python_strip;

/// One entry of a source file, before validation.
#[derive(Debug, Clone)]
pub struct RawEntry {
    /// 0-based position among the file's records (JSON list element or non-blank JSONL line).
    pub index: usize,
    /// 1-based line number for JSONL files (where a user finds the record).
    pub line: Option<usize>,
    pub value: Result<Value, String>,
}

/// A validated record.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub index: usize,
    /// The record's `id` as a string (JSON strings as is, other JSON values serialised); the index
    /// when absent, as the reference's `data_dict["id"]`.
    pub id: String,
    /// Image paths relative to the image folder; empty for text-only records.
    pub images: Vec<String>,
    pub turns: Vec<Turn>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Turn {
    pub from: String,
    pub value: String,
}

impl Record {
    pub fn has_image(&self) -> bool {
        !self.images.is_empty()
    }
}

#[derive(Debug, Error)]
pub enum SourceError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a JSON list of records: {reason}")]
    NotAList { path: PathBuf, reason: String },
    #[error("{path}: unknown extension; expected .json (a list) or .jsonl (one record per line)")]
    UnknownExtension { path: PathBuf },
}

/// Calls `f` with every entry of a `.json` (list) or `.jsonl` file, in order, holding one record
/// at a time (a 1 GB JSON list is streamed, not loaded).
pub fn for_each_entry(path: &Path, f: &mut dyn FnMut(RawEntry)) -> Result<(), SourceError> {
    let io_err = |source| SourceError::Io {
        path: path.to_path_buf(),
        source,
    };
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let reader = BufReader::with_capacity(1 << 20, File::open(path).map_err(io_err)?);
    match ext {
        "jsonl" => {
            let mut index = 0;
            for (line_no, line) in reader.lines().enumerate() {
                let line = line.map_err(io_err)?;
                if line.trim().is_empty() {
                    continue;
                }
                f(RawEntry {
                    index,
                    line: Some(line_no + 1),
                    value: serde_json::from_str(&line).map_err(|e| e.to_string()),
                });
                index += 1;
            }
            Ok(())
        }
        "json" => {
            use serde::de::Deserializer as _;
            let mut de = serde_json::Deserializer::from_reader(reader);
            de.deserialize_seq(EntryVisitor { f })
                .and_then(|()| de.end())
                .map_err(|e| SourceError::NotAList {
                    path: path.to_path_buf(),
                    reason: e.to_string(),
                })
        }
        _ => Err(SourceError::UnknownExtension {
            path: path.to_path_buf(),
        }),
    }
}

/// Visits a JSON list element by element.
struct EntryVisitor<'a> {
    f: &'a mut dyn FnMut(RawEntry),
}

impl<'de> serde::de::Visitor<'de> for EntryVisitor<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON list of records")
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut index = 0;
        while let Some(value) = seq.next_element::<Value>()? {
            (self.f)(RawEntry {
                index,
                line: None,
                value: Ok(value),
            });
            index += 1;
        }
        Ok(())
    }
}

/// Reads every entry of a `.json` (list) or `.jsonl` file into memory (small files, tests).
pub fn read_entries(path: &Path) -> Result<Vec<RawEntry>, SourceError> {
    let mut entries = Vec::new();
    for_each_entry(path, &mut |e| entries.push(e))?;
    Ok(entries)
}

/// The `id` of an entry as written to outputs, available even for entries that fail validation.
pub fn entry_id(entry: &RawEntry) -> String {
    match &entry.value {
        Ok(Value::Object(map)) => match map.get("id") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Null) | None => entry.index.to_string(),
            Some(other) => other.to_string(),
        },
        _ => entry.index.to_string(),
    }
}

/// Validates the shape of one entry.
pub fn parse_record(entry: &RawEntry) -> Result<Record, Reject> {
    let value = entry
        .value
        .as_ref()
        .map_err(|e| Reject::InvalidJson(e.clone()))?;
    let map = value.as_object().ok_or(Reject::NotAnObject)?;
    if map.contains_key("video") {
        return Err(Reject::Video);
    }
    let images = match map.get("image") {
        None => Vec::new(),
        Some(Value::Null) => return Err(Reject::ImageNull),
        Some(Value::String(s)) if s.is_empty() => return Err(Reject::ImageEmpty),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(list)) if list.is_empty() => return Err(Reject::ImageEmpty),
        Some(Value::Array(list)) => list
            .iter()
            .map(|v| match v {
                Value::String(s) if s.is_empty() => Err(Reject::ImageEmpty),
                Value::String(s) => Ok(s.clone()),
                Value::Null => Err(Reject::ImageNull),
                _ => Err(Reject::ImageNotString),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(Reject::ImageNotString),
    };
    let conversations = match map.get("conversations") {
        Some(Value::Array(list)) => list,
        _ => return Err(Reject::NoConversations),
    };
    if conversations.is_empty() {
        return Err(Reject::EmptyConversations);
    }
    let turns = conversations
        .iter()
        .enumerate()
        .map(|(turn, v)| parse_turn(turn, v))
        .collect::<Result<Vec<Turn>, _>>()?;
    check_not_empty(&turns)?;
    Ok(Record {
        index: entry.index,
        id: entry_id(entry),
        images,
        turns,
    })
}

/// A conversation whose every turn is empty (or blank) has nothing to learn but header and
/// end-of-turn tokens; the reference trains it anyway. One with any text is kept: an empty human
/// turn before a real answer is tokenized as the reference does (an empty user block).
fn check_not_empty(turns: &[Turn]) -> Result<(), Reject> {
    if turns.iter().all(|t| python_strip(&t.value).is_empty()) {
        return Err(Reject::EmptyConversation);
    }
    Ok(())
}

fn parse_turn(turn: usize, value: &Value) -> Result<Turn, Reject> {
    let map = value.as_object().ok_or(Reject::MalformedTurn {
        turn,
        detail: String::new(),
    })?;
    let from = map.get("from");
    let val = map.get("value");
    if from.is_none() && val.is_none() && (map.contains_key("role") || map.contains_key("content"))
    {
        return Err(Reject::RoleContentTurn { turn });
    }
    match (from, val) {
        (Some(Value::String(from)), Some(Value::String(value))) => Ok(Turn {
            from: from.clone(),
            value: value.clone(),
        }),
        (None, _) => Err(Reject::MalformedTurn {
            turn,
            detail: " (no `from`)".into(),
        }),
        (_, None) => Err(Reject::MalformedTurn {
            turn,
            detail: " (no `value`)".into(),
        }),
        _ => Err(Reject::MalformedTurn {
            turn,
            detail: " (`from` and `value` must be strings)".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn entry(v: Value) -> RawEntry {
        RawEntry {
            index: 7,
            line: None,
            value: Ok(v),
        }
    }

    #[test]
    fn ids_of_any_type() {
        let conv = json!([{"from":"human","value":"hi"},{"from":"gpt","value":"yo"}]);
        let r = parse_record(&entry(json!({"id": 12, "conversations": conv}))).unwrap();
        assert_eq!(r.id, "12");
        let r = parse_record(&entry(json!({"conversations": conv}))).unwrap();
        assert_eq!(r.id, "7");
        let r = parse_record(&entry(json!({"id": "a", "conversations": conv}))).unwrap();
        assert_eq!(r.id, "a");
    }

    #[test]
    fn image_forms() {
        let conv = json!([{"from":"human","value":"<image>hi"},{"from":"gpt","value":"yo"}]);
        let r = parse_record(&entry(json!({"image": "a.jpg", "conversations": conv}))).unwrap();
        assert_eq!(r.images, vec!["a.jpg"]);
        let r = parse_record(&entry(
            json!({"image": ["a.jpg", "b.png"], "conversations": conv}),
        ))
        .unwrap();
        assert_eq!(r.images.len(), 2);
        let bad = |v: Value| parse_record(&entry(v)).unwrap_err();
        assert_eq!(
            bad(json!({"image": null, "conversations": conv})),
            Reject::ImageNull
        );
        assert_eq!(
            bad(json!({"image": "", "conversations": conv})),
            Reject::ImageEmpty
        );
        assert_eq!(
            bad(json!({"image": [], "conversations": conv})),
            Reject::ImageEmpty
        );
        assert_eq!(
            bad(json!({"image": 3, "conversations": conv})),
            Reject::ImageNotString
        );
        assert_eq!(
            bad(json!({"video": "v.mp4", "conversations": conv})),
            Reject::Video
        );
    }

    #[test]
    fn empty_conversations_are_rejected() {
        let bad = |v: Value| parse_record(&entry(v)).unwrap_err();
        let all_empty =
            json!({"conversations": [{"from":"human","value":""},{"from":"gpt","value":" \n"}]});
        assert_eq!(bad(all_empty), Reject::EmptyConversation);
        // Any text is something to train on: an empty question before a real answer (the
        // reference trains it), a question with blank answers, an image-only question.
        let ok = |v: Value| parse_record(&entry(v)).unwrap();
        ok(json!({"conversations": [{"from":"human","value":"  "},{"from":"gpt","value":"yo"}]}));
        ok(
            json!({"conversations": [{"from":"human","value":"hi"},{"from":"gpt","value":" \n"},
            {"from":"human","value":"again"},{"from":"gpt","value":""}]}),
        );
        ok(
            json!({"conversations": [{"from":"human","value":""},{"from":"gpt","value":"a"},
            {"from":"human","value":"b"},{"from":"gpt","value":"c"}]}),
        );
        ok(
            json!({"image":"a.jpg","conversations": [{"from":"human","value":"<image>"},{"from":"gpt","value":"a cat"}]}),
        );
    }

    #[test]
    fn malformed_conversations() {
        let bad = |v: Value| parse_record(&entry(v)).unwrap_err();
        assert_eq!(bad(json!({"id": 1})), Reject::NoConversations);
        assert_eq!(
            bad(json!({"conversations": []})),
            Reject::EmptyConversations
        );
        assert_eq!(bad(json!([1, 2])), Reject::NotAnObject);
        assert_eq!(
            bad(json!({"conversations": [{"role":"user","content":"hi"}]})),
            Reject::RoleContentTurn { turn: 0 }
        );
        assert!(matches!(
            bad(json!({"conversations": [{"from":"human","value":3}]})),
            Reject::MalformedTurn { turn: 0, .. }
        ));
        let invalid = RawEntry {
            index: 0,
            line: Some(3),
            value: Err("EOF".into()),
        };
        assert!(matches!(
            parse_record(&invalid),
            Err(Reject::InvalidJson(_))
        ));
    }
}
