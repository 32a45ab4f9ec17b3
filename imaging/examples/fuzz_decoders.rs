//! Mutation fuzzing of every decoder path (and the header probe) for a fixed time budget: not a
//! test (CI never runs it), a bench-like command.
//!
//! ```sh
//! cargo run --release -p llava-imaging --example fuzz_decoders -- [SECONDS=60] [SEED=1] [CRASH_DIR]
//! ```
//!
//! Inputs are the shipped images and the generated format variants, mutated (bit flips, bytes set
//! to boundary values, cuts, inserted and duplicated runs, header dimensions blown up). Every
//! input must decode or fail with an error: a panic, an input that runs longer than 10 s, or an
//! allocation above the decode limit's `max_alloc_bytes` is a finding; the input is written to
//! CRASH_DIR (default `target/fuzz-crashes`) for a regression test. Prints executions, time and
//! findings per format.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use llava_imaging::decode::sniff_format;
use llava_imaging::{decode_rgb_with, probe_size_with, DecodeLimits};

/// Counts the largest single allocation of the fuzzing thread's decodes.
struct Counting;
static LARGEST: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

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

fn mutate(seed: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut b = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        let n = b.len().max(1);
        // Mutations near the start hit headers, where the interesting parsing is.
        let at = if rng.below(2) == 0 {
            rng.below(n.min(256))
        } else {
            rng.below(n)
        };
        match rng.below(7) {
            0 if !b.is_empty() => {
                let i = at.min(b.len() - 1);
                b[i] ^= 1 << rng.below(8);
            }
            1 if !b.is_empty() => {
                let i = at.min(b.len() - 1);
                b[i] = [0, 0xFF, 0x7F, 0x80, 1][rng.below(5)];
            }
            2 => b.truncate(at),
            3 => {
                let len = rng.below(16);
                let junk: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                let at = at.min(b.len());
                b.splice(at..at, junk);
            }
            4 if b.len() > 8 => {
                let start = at.min(b.len() - 1);
                let end = (start + 1 + rng.below(64)).min(b.len());
                let run = b[start..end].to_vec();
                b.splice(start..start, run);
            }
            5 if b.len() > 4 => {
                // A big 16/32-bit value somewhere in the header (sizes, lengths, counts).
                let at = at.min(b.len().saturating_sub(4)).min(64);
                b[at..at + 2].copy_from_slice(&[0xFF, 0xF0]);
            }
            _ => {
                let at = at.min(b.len());
                b.insert(at, rng.next() as u8);
            }
        }
    }
    b
}

fn seeds(root: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![root.join("images"), root.join("formats")];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(bytes) = std::fs::read(&p) {
                if sniff_format(&bytes).is_some() {
                    out.push((p, bytes));
                }
            }
        }
    }
    out.sort();
    out
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let seconds: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(60);
    let seed: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1);
    let crash_dir = args
        .get(3)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/fuzz-crashes"));
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures");
    let corpus = seeds(&root);
    assert!(
        !corpus.is_empty(),
        "no seed images under {}",
        root.display()
    );
    // A small pixel limit keeps each execution cheap; the allocation bound follows from it.
    let limits = DecodeLimits {
        max_pixels: 4096 * 4096,
        max_file_bytes: 64 << 20,
    };
    let alloc_limit = limits.max_alloc_bytes() as usize;

    // Watchdog: an execution running past 10 s is a hang; the input is saved before aborting.
    static CURRENT: Mutex<Vec<u8>> = Mutex::new(Vec::new());
    static STARTED_MS: AtomicU64 = AtomicU64::new(u64::MAX);
    let t0 = Instant::now();
    {
        let crash_dir = crash_dir.clone();
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_millis(500));
            let started = STARTED_MS.load(Ordering::Relaxed);
            if started != u64::MAX && t0.elapsed().as_millis() as u64 > started + 10_000 {
                std::fs::create_dir_all(&crash_dir).ok();
                let input = CURRENT.lock().map(|c| c.clone()).unwrap_or_default();
                let path = crash_dir.join("hang.bin");
                std::fs::write(&path, input).ok();
                eprintln!("HANG: an input ran past 10 s; saved to {}", path.display());
                std::process::abort();
            }
        });
    }
    std::panic::set_hook(Box::new(|_| {})); // panics are counted, not printed

    let mut rng = Rng(seed);
    let mut per_format: BTreeMap<String, [u64; 4]> = BTreeMap::new(); // execs, ok, err, findings
    let mut findings = 0u64;
    let mut slowest = Duration::ZERO;
    let deadline = Duration::from_secs(seconds);
    while t0.elapsed() < deadline {
        let (_, seed_bytes) = &corpus[rng.below(corpus.len())];
        let input = mutate(seed_bytes, &mut rng);
        let format = sniff_format(&input).map_or("unknown".to_string(), |f| format!("{f:?}"));
        if let Ok(mut c) = CURRENT.lock() {
            c.clone_from(&input);
        }
        LARGEST.store(0, Ordering::Relaxed);
        let start = Instant::now();
        STARTED_MS.store(t0.elapsed().as_millis() as u64, Ordering::Relaxed);
        let result = std::panic::catch_unwind(|| {
            let probed = probe_size_with(&input, &limits);
            (probed.is_ok(), decode_rgb_with(&input, &limits).is_ok())
        });
        STARTED_MS.store(u64::MAX, Ordering::Relaxed);
        slowest = slowest.max(start.elapsed());
        let largest = LARGEST.load(Ordering::Relaxed);
        let entry = per_format.entry(format.clone()).or_default();
        entry[0] += 1;
        let problem = match result {
            Err(_) => Some("panic"),
            Ok(_) if largest > alloc_limit => Some("allocation above the limit"),
            Ok((_, true)) => {
                entry[1] += 1;
                None
            }
            Ok((_, false)) => {
                entry[2] += 1;
                None
            }
        };
        if let Some(what) = problem {
            entry[3] += 1;
            findings += 1;
            std::fs::create_dir_all(&crash_dir).ok();
            let path = crash_dir.join(format!("{format}-{findings}.bin"));
            std::fs::write(&path, &input).ok();
            println!(
                "FINDING ({what}, largest allocation {largest} B): {}",
                path.display()
            );
        }
    }
    let total: u64 = per_format.values().map(|v| v[0]).sum();
    println!(
        "{total} executions in {:.1} s ({:.0}/s), slowest {:.3} s, {findings} findings",
        t0.elapsed().as_secs_f64(),
        total as f64 / t0.elapsed().as_secs_f64(),
        slowest.as_secs_f64()
    );
    println!("format     execs  decoded  refused  findings");
    for (f, v) in &per_format {
        println!("{f:<9} {:>6} {:>8} {:>8} {:>9}", v[0], v[1], v[2], v[3]);
    }
    if findings > 0 {
        std::process::exit(1);
    }
}
