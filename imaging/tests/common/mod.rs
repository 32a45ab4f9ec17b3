//! Shared helpers for the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

use sha2::{Digest, Sha256};

/// The repository's `fixtures/` folder.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Max abs difference, number of differing bytes and the first differing byte index.
pub fn diff_stats(a: &[u8], b: &[u8]) -> (u8, usize, Option<usize>) {
    let mut max = 0u8;
    let mut n = 0;
    let mut first = None;
    for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
        let d = x.abs_diff(y);
        if d > 0 {
            n += 1;
            max = max.max(d);
            first.get_or_insert(i);
        }
    }
    (max, n, first)
}
