//! Pass 1 is computed once per build and shared: by a resumed build and by every partition,
//! including partitions started at the same time (issue 19). Tokenizer calls are counted by a
//! process-wide counter, so this file holds one test (its own test binary: nothing else
//! tokenizes meanwhile).

use std::path::Path;

use llava_data::shard_build::{assemble::assemble, build, BuildOptions, Partition};
use llava_data::tokenizer::encode_calls;
use llava_e2e::*;

fn options(index: usize, count: usize) -> BuildOptions {
    BuildOptions {
        output: None,
        partition: Partition { index, count },
        progress: false,
    }
}

/// Entries of `out/.work` that belong to pass 1's cache.
fn caches(out: &Path) -> Vec<String> {
    std::fs::read_dir(out.join(".work"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .filter(|n| n.starts_with("pass1-"))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn pass1_runs_once_per_build_for_resume_and_partitions() {
    let dir = scratch("pass1-cache");
    let config = fixture_mixture(&dir, "");
    let out = dir.join("out");

    // A single build: its pass 1 cost, and the reference output.
    let before = encode_calls();
    let whole = build(&config, &options(0, 1)).expect("build");
    let per_pass1 = encode_calls() - before;
    assert!(per_pass1 > 0, "pass 1 tokenizes");
    assert!(!whole.pass1_reused);
    let reference = output_files(&out);
    assert!(
        caches(&out).is_empty(),
        "the cache is removed once the manifest is written"
    );
    std::fs::remove_dir_all(&out).unwrap();
    // After the partitions: pass 1 ran once in total since `before`, and the merge equals the
    // single build (and leaves no cache).
    let merged_equals_reference = |before: u64| {
        assert_eq!(
            encode_calls() - before,
            per_pass1,
            "pass 1 ran once in total"
        );
        assemble(&out).expect("merge");
        assert_eq!(output_files(&out), reference, "merged output differs");
        assert!(caches(&out).is_empty());
        std::fs::remove_dir_all(&out).unwrap();
    };

    // Partitions one after the other (as array jobs that do not overlap): only the first
    // tokenizes; the rest reuse its cache.
    let before = encode_calls();
    let first = build(&config, &options(0, 3)).expect("partition 0");
    assert!(!first.pass1_reused);
    assert_eq!(encode_calls() - before, per_pass1);
    assert_eq!(
        caches(&out).len(),
        1,
        "one cache folder: {:?}",
        caches(&out)
    );
    for i in 1..3 {
        let part = build(&config, &options(i, 3)).expect("partition");
        assert!(part.pass1_reused, "partition {i} reuses pass 1");
    }
    merged_equals_reference(before);

    // Partitions started together (one thread each): one computes, the others wait for it.
    let before = encode_calls();
    let outcomes: Vec<bool> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3)
            .map(|i| {
                let config = config.clone();
                s.spawn(move || build(&config, &options(i, 3)).expect("partition"))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("no panic").pass1_reused)
            .collect()
    });
    assert_eq!(
        outcomes.iter().filter(|&&reused| !reused).count(),
        1,
        "exactly one partition computed pass 1: {outcomes:?}"
    );
    merged_equals_reference(before);

    // A killed build (here: half its shards written by partition 0/2, no manifest) resumes with
    // the cached pass 1 and writes only the rest.
    let part = build(&config, &options(0, 2)).expect("partition 0/2");
    let before = encode_calls();
    let resumed = build(&config, &options(0, 1)).expect("resume");
    assert!(resumed.pass1_reused);
    assert_eq!(
        encode_calls(),
        before,
        "a resumed build does not tokenize again"
    );
    assert_eq!(resumed.shards_skipped, part.shards_written);
    assert_eq!(output_files(&out), reference, "resumed output differs");
    std::fs::remove_dir_all(&out).unwrap();

    // A lock left by a build that died (not refreshed for a minute) is taken over.
    std::fs::create_dir_all(out.join(".work")).unwrap();
    build(&config, &options(0, 2)).expect("partition 0/2");
    let cache = caches(&out)
        .into_iter()
        .find(|n| !n.ends_with(".lock"))
        .unwrap();
    std::fs::remove_dir_all(out.join(".work").join(&cache)).unwrap();
    let lock = out.join(".work").join(format!("{cache}.lock"));
    let f = std::fs::File::create(&lock).unwrap();
    f.set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(120))
        .unwrap();
    drop(f);
    let before = encode_calls();
    let taken = build(&config, &options(1, 2)).expect("takes the stale lock over");
    assert!(!taken.pass1_reused);
    assert_eq!(encode_calls() - before, per_pass1);
    assert!(!lock.exists(), "the lock is released");
    assemble(&out).expect("merge");
    assert_eq!(output_files(&out), reference);
    std::fs::remove_dir_all(&out).unwrap();

    // A lock of a process of this machine that no longer exists (a build killed during pass 1)
    // is taken over without waiting for it to age: dated an hour ahead, it would never look
    // stale, so only the dead holder can release it.
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    std::fs::create_dir_all(out.join(".work")).unwrap();
    std::fs::write(&lock, format!("host {} pid 4294967295\n", host.trim())).unwrap();
    let f = std::fs::File::options().write(true).open(&lock).unwrap();
    f.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(3600))
        .unwrap();
    drop(f);
    let resumed = build(&config, &options(0, 1)).expect("takes the dead process's lock over");
    assert!(!resumed.pass1_reused);
    assert!(!lock.exists());
    assert_eq!(output_files(&out), reference);
}
