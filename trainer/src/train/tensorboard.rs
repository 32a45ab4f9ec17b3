//! TensorBoard event files: `events.out.tfevents.<time>.<host>`, TFRecords of `Event` protos
//! with scalar summaries, what `tensorboard --logdir` and `tbparse` read.
//!
//! The few protobuf fields are written by hand: `Event { wall_time = 1 (double), step = 2
//! (int64), file_version = 3 (string), summary = 5 }`, `Summary { value = 1 (repeated) }`,
//! `Summary.Value { tag = 1 (string), simple_value = 2 (float) }`; text (the text plugin's
//! format) is `Summary.Value { tag = 1, tensor = 8, metadata = 9 }` with `TensorProto { dtype = 1
//! (DT_STRING = 7), tensor_shape = 2 (empty: a scalar), string_val = 8 }` and
//! `SummaryMetadata { plugin_data = 1: PluginData { plugin_name = 1: "text" } }`. A TFRecord is
//! `u64 length, masked crc32c(length), data, masked crc32c(data)`, little endian.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Appends scalar summaries to one event file.
pub struct EventWriter {
    path: PathBuf,
    file: File,
}

impl EventWriter {
    /// Creates `dir` if needed and a new event file in it, starting with the version record.
    pub fn create(dir: &Path) -> Result<Self> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".into());
        // Two writers in one second (a quick resume) must not share a file.
        let mut path = dir.join(format!("events.out.tfevents.{}.{host}", now.as_secs()));
        let mut n = 1;
        while path.exists() {
            path = dir.join(format!("events.out.tfevents.{}.{host}.{n}", now.as_secs()));
            n += 1;
        }
        let file = File::create(&path).map_err(io(&path))?;
        let mut w = Self { path, file };
        let mut event = Vec::new();
        put_double(&mut event, 1, wall_time());
        put_bytes(&mut event, 3, b"brain.Event:2");
        w.record(&event)?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One event at `step` holding every `(tag, value)` as a scalar; flushed at once.
    pub fn scalars(&mut self, step: u64, values: &[(&str, f64)]) -> Result<()> {
        let mut summary = Vec::new();
        for (tag, v) in values {
            if !v.is_finite() {
                continue;
            }
            let mut value = Vec::new();
            put_bytes(&mut value, 1, tag.as_bytes());
            put_key(&mut value, 2, 5);
            value.extend_from_slice(&(*v as f32).to_le_bytes());
            put_bytes(&mut summary, 1, &value);
        }
        self.summary_event(step, &summary)
    }

    /// One event at `step` holding every `(tag, text)` as a text summary (markdown, shown by
    /// TensorBoard's Text tab); flushed at once.
    pub fn texts(&mut self, step: u64, values: &[(&str, &str)]) -> Result<()> {
        let mut summary = Vec::new();
        for (tag, text) in values {
            let mut plugin = Vec::new();
            put_bytes(&mut plugin, 1, b"text");
            let mut metadata = Vec::new();
            put_bytes(&mut metadata, 1, &plugin);
            let mut tensor = Vec::new();
            put_key(&mut tensor, 1, 0);
            put_varint(&mut tensor, 7);
            put_bytes(&mut tensor, 2, &[]);
            put_bytes(&mut tensor, 8, text.as_bytes());
            let mut value = Vec::new();
            put_bytes(&mut value, 1, tag.as_bytes());
            put_bytes(&mut value, 8, &tensor);
            put_bytes(&mut value, 9, &metadata);
            put_bytes(&mut summary, 1, &value);
        }
        self.summary_event(step, &summary)
    }

    /// An `Event` (wall time, step, `summary`) written as one record.
    fn summary_event(&mut self, step: u64, summary: &[u8]) -> Result<()> {
        let mut event = Vec::new();
        put_double(&mut event, 1, wall_time());
        put_key(&mut event, 2, 0);
        put_varint(&mut event, step);
        put_bytes(&mut event, 5, summary);
        self.record(&event)
    }

    fn record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut buf = Vec::with_capacity(data.len() + 16);
        buf.extend_from_slice(&len);
        buf.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
        buf.extend_from_slice(data);
        buf.extend_from_slice(&masked_crc32c(data).to_le_bytes());
        let io = |source| Error::Io {
            path: self.path.clone(),
            source,
        };
        self.file.write_all(&buf).map_err(io)?;
        self.file.flush().map_err(io)
    }
}

fn wall_time() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Field key: `(field << 3) | wire type` (0 varint, 1 64-bit, 2 length-delimited, 5 32-bit).
fn put_key(out: &mut Vec<u8>, field: u64, wire: u64) {
    put_varint(out, (field << 3) | wire);
}

fn put_double(out: &mut Vec<u8>, field: u64, v: f64) {
    put_key(out, field, 1);
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    put_key(out, field, 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), table-driven.
pub fn crc32c(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0x82F6_3B78
                } else {
                    c >> 1
                };
            }
            *e = c;
        }
        t
    });
    !data.iter().fold(!0u32, |c, &b| {
        table[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8)
    })
}

/// TFRecord's masked CRC: `((crc >> 15) | (crc << 17)) + 0xa282ead8`.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    let c = crc32c(data);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_check_value() {
        // The standard check value of CRC-32C, and RFC 3720's 32 zero bytes.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
    }

    #[test]
    fn varints() {
        let mut v = Vec::new();
        put_varint(&mut v, 300);
        assert_eq!(v, [0xAC, 0x02]);
    }
}
