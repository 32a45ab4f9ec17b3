//! The JSON files of model folders and checkpoints (configs, tokenizer files, training state),
//! read and written with the file's path in every error.

use std::path::Path;

use serde::Serialize;
use serde_json::{Map, Value};

use crate::{Error, Result};

pub fn read(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.into(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| Error::Json {
        path: path.into(),
        source,
    })
}

/// The object in `path`, or an empty one when the file does not exist (optional companion
/// files such as `tokenizer_config.json`).
pub fn read_object_or_empty(path: &Path) -> Result<Map<String, Value>> {
    if !path.is_file() {
        return Ok(Map::new());
    }
    match read(path)? {
        Value::Object(m) => Ok(m),
        _ => Err(Error::Checkpoint {
            path: path.into(),
            msg: "not a JSON object".into(),
        }),
    }
}

/// Pretty-printed with a final newline, as HF writes its files.
pub fn write(path: &Path, value: &impl Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|source| Error::Json {
        path: path.into(),
        source,
    })?;
    std::fs::write(path, text + "\n").map_err(|source| Error::Io {
        path: path.into(),
        source,
    })
}
