//! Mutation fuzzing of the record parser and the templates for a fixed time budget: not a test
//! (CI never runs it), a bench-like command.
//!
//! ```sh
//! cargo run --release -p llava-data --example fuzz_records -- [SECONDS=60] [SEED=1] [CRASH_DIR]
//! ```
//!
//! Seeds are the records of `fixtures/data/*.json`, one JSON line each, mutated byte-wise and
//! structurally (turn values emptied, roles swapped, `<image>` and special-token strings
//! inserted). Each goes through `parse_record` and, when the tokenizer is in `.cache/tokenizer/`,
//! both templates; every 64th execution a mutated whole file goes through the streaming JSON /
//! JSONL readers. A panic is a finding, saved to CRASH_DIR (default `target/fuzz-crashes`).

use std::path::{Path, PathBuf};
use std::time::Instant;

use llava_data::record::{for_each_entry, parse_record, RawEntry};
use llava_data::template::{tokenize, Template};
use llava_data::tokenizer::TextTokenizer;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const SNIPPETS: &[&str] = &[
    "<image>",
    "<|eot_id|>",
    "<|begin_of_text|>",
    "\"\"",
    "null",
    "[]",
    "{}",
    "\"gpt\"",
    "\"human\"",
    "\"system\"",
    "\"\\u0000\"",
    "\"\\ud800\"",
    "1e999",
    "-0",
];

fn mutate(seed: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut b = seed.to_vec();
    for _ in 0..1 + rng.below(3) {
        let at = rng.below(b.len() + 1);
        match rng.below(5) {
            0 if !b.is_empty() => {
                let i = at.min(b.len() - 1);
                b[i] = rng.next() as u8;
            }
            1 => b.truncate(at),
            2 => {
                let s = SNIPPETS[rng.below(SNIPPETS.len())].as_bytes();
                b.splice(at..at, s.iter().copied());
            }
            3 if !b.is_empty() => {
                // Empty a string value: drop everything up to the next quote.
                let i = at.min(b.len() - 1);
                if let Some(q) = b[i..].iter().position(|&c| c == b'"') {
                    b.drain(i..i + q);
                }
            }
            _ => {
                let start = at.min(b.len());
                let end = (start + rng.below(32)).min(b.len());
                let run = b[start..end].to_vec();
                b.splice(start..start, run);
            }
        }
    }
    b
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let seconds: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(60);
    let seed: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1);
    let crash_dir = args
        .get(3)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/fuzz-crashes"));
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut lines: Vec<Vec<u8>> = Vec::new();
    for e in std::fs::read_dir(root.join("fixtures/data"))
        .expect("fixtures/data")
        .flatten()
    {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "json") {
            if let Ok(serde_json::Value::Array(list)) =
                serde_json::from_slice(&std::fs::read(&p).unwrap_or_default())
            {
                lines.extend(list.iter().map(|v| v.to_string().into_bytes()));
            }
        }
    }
    lines.sort();
    assert!(!lines.is_empty(), "no seed records");
    let tokenizer = TextTokenizer::from_file(&root.join(".cache/tokenizer/tokenizer.json")).ok();
    if tokenizer.is_none() {
        eprintln!("no tokenizer in .cache/tokenizer: fuzzing the parser only");
    }
    std::panic::set_hook(Box::new(|_| {}));
    let tmp = std::env::temp_dir().join(format!("llava-fuzz-records-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).expect("tempdir");

    let mut rng = Rng(seed);
    let (mut execs, mut parsed, mut tokenized, mut findings) = (0u64, 0u64, 0u64, 0u64);
    let t0 = Instant::now();
    while t0.elapsed().as_secs() < seconds {
        execs += 1;
        let whole_file = execs % 64 == 0;
        let input = if whole_file {
            let n = 1 + rng.below(6);
            let mut list = b"[".to_vec();
            for k in 0..n {
                if k > 0 {
                    list.push(b',');
                }
                list.extend_from_slice(&lines[rng.below(lines.len())]);
            }
            list.push(b']');
            mutate(&list, &mut rng)
        } else {
            mutate(&lines[rng.below(lines.len())], &mut rng)
        };
        let result = std::panic::catch_unwind(|| {
            let mut entries = Vec::new();
            if whole_file {
                for ext in ["json", "jsonl"] {
                    let path = tmp.join(format!("input.{ext}"));
                    std::fs::write(&path, &input).ok();
                    let _ = for_each_entry(&path, &mut |e| entries.push(e));
                }
            } else {
                entries.push(RawEntry {
                    index: 0,
                    line: Some(1),
                    value: serde_json::from_slice(&input).map_err(|e| e.to_string()),
                });
            }
            let (mut p, mut t) = (0, 0);
            for entry in &entries {
                if let Ok(record) = parse_record(entry) {
                    p += 1;
                    if let Some(tok) = &tokenizer {
                        for template in [Template::LlavaLlama3, Template::Plain] {
                            if tokenize(template, &record, tok).is_ok() {
                                t += 1;
                            }
                        }
                    }
                }
            }
            (p, t)
        });
        match result {
            Ok((p, t)) => {
                parsed += p;
                tokenized += t;
            }
            Err(_) => {
                findings += 1;
                std::fs::create_dir_all(&crash_dir).ok();
                let path = crash_dir.join(format!("record-{findings}.json"));
                std::fs::write(&path, &input).ok();
                println!("FINDING (panic): {}", path.display());
            }
        }
    }
    std::fs::remove_dir_all(&tmp).ok();
    println!(
        "{execs} executions in {:.1} s ({:.0}/s): {parsed} records parsed, {tokenized} tokenized, {findings} findings",
        t0.elapsed().as_secs_f64(),
        execs as f64 / t0.elapsed().as_secs_f64()
    );
    if findings > 0 {
        std::process::exit(1);
    }
}
