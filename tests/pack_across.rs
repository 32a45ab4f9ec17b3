//! Packing across batch boundaries on the bundled example (`datasets.toml`): the rows
//! `llava-data inspect --pack-across-batches` reports are the rows the trainer's plan makes
//! (same count, tokens and fill per modality and of the final rows that mix modalities, at
//! several seeds), and they are full.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use llava_data::inspect::summary::{summarize, SummaryOptions};
use llava_data::inspect::BuildDir;
use llava_data::shard_build::{build, BuildOptions, Partition};
use llava_e2e::*;
use llava_loader::{DataState, EpochPlan, IndexOptions, Modality, PlanConfig, ShardIndex};

/// The example built from the repository's own `datasets.toml` (its paths are relative to the
/// file: the fixtures and the tokenizer are linked next to a copy), once.
fn example() -> &'static PathBuf {
    static OUT: OnceLock<PathBuf> = OnceLock::new();
    OUT.get_or_init(|| {
        let dir = scratch("pack-across");
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        std::fs::copy(root.join("datasets.toml"), dir.join("datasets.toml")).expect("copy");
        std::os::unix::fs::symlink(fixtures(), dir.join("fixtures")).expect("link fixtures");
        let tok = dir.join(".cache/tokenizer");
        std::fs::create_dir_all(&tok).expect("mkdir");
        std::os::unix::fs::symlink(tokenizer_path(), tok.join("tokenizer.json")).expect("link");
        let options = BuildOptions {
            output: None,
            partition: Partition::WHOLE,
            progress: false,
        };
        build(&dir.join("datasets.toml"), &options).expect("build the example");
        dir.join("out/example")
    })
}

/// (rows, tokens) per modality of the trainer's plan, world size 1, epoch 0 (`None`: the rows
/// that mix modalities).
fn trainer_rows(out: &Path, seed: u64, pack_length: u32) -> Vec<(Option<Modality>, u64, u64)> {
    let index = ShardIndex::open(out, &IndexOptions::default()).expect("index");
    let cfg = PlanConfig {
        seed,
        world_size: 1,
        batch_size: None,
        pack_length: Some(pack_length),
        across_batches: true,
    };
    let plan = EpochPlan::new(&index, &cfg, &DataState::new(0)).expect("plan");
    let mut per: Vec<(Option<Modality>, u64, u64)> = Vec::new();
    for step in plan.steps() {
        let b = &step[0];
        assert!(!b.is_empty(), "not empty at world size 1");
        assert_eq!(b.rows.len(), 1, "one row per micro-batch");
        let m = b.modality;
        match per.iter_mut().find(|p| p.0 == m) {
            Some(p) => {
                p.1 += 1;
                p.2 += b.tokens;
            }
            None => per.push((m, 1, b.tokens)),
        }
    }
    per
}

#[test]
fn inspect_reports_the_trainers_rows_and_they_are_full() {
    let out = example();
    let build_dir = BuildDir::open(out).expect("open");
    for (seed, pack_length) in [(42, 8192), (7, 8192), (42, 4096)] {
        let s = summarize(
            &build_dir,
            &SummaryOptions {
                pack_length: Some(pack_length),
                across_batches: true,
                seed: Some(seed),
                ..Default::default()
            },
        )
        .expect("summary");
        let trainer = trainer_rows(out, seed, pack_length);
        let mut rows = 0;
        for p in &s.padding.modalities {
            let a = p.across.as_ref().expect("across report");
            let m = Modality::parse(&p.modality).expect("modality");
            let (n, tokens) = trainer
                .iter()
                .find(|t| t.0 == Some(m))
                .map_or((0, 0), |t| (t.1, t.2));
            assert_eq!(
                (a.rows, a.padding.real_tokens),
                (n, tokens),
                "{} at seed {seed}, pack length {pack_length}",
                p.modality
            );
            let fill = if n == 0 {
                1.0
            } else {
                tokens as f64 / (n * u64::from(pack_length)) as f64
            };
            assert!((a.fill - fill).abs() < 1e-12);
            // One row per micro-batch: no padding inside a micro-batch.
            assert!((a.padding.efficiency - 1.0).abs() < 1e-12);
            rows += n;
            eprintln!(
                "seed {seed} pack {pack_length}: {} {n} rows, fill {:.1}%",
                p.modality,
                100.0 * a.fill
            );
            // The fewest rows the modality's tokens can take, or one more.
            let fewest = tokens.div_ceil(u64::from(pack_length));
            assert!(
                n <= fewest + 1,
                "{}: {n} rows, {fewest} at best",
                p.modality
            );
        }
        // The final rows that mix modalities.
        let (n, tokens) = trainer
            .iter()
            .find(|t| t.0.is_none())
            .map_or((0, 0), |t| (t.1, t.2));
        let mixed = s.padding.across_mixed.as_ref();
        assert_eq!(
            mixed.map_or((0, 0), |a| (a.rows, a.padding.real_tokens)),
            (n, tokens),
            "mixed rows at seed {seed}, pack length {pack_length}"
        );
        rows += n;
        let total = s.padding.total.across.as_ref().expect("total");
        assert_eq!(total.rows, rows);
        let all: u64 = trainer.iter().map(|t| t.2).sum();
        assert_eq!(total.padding.real_tokens, all);
        eprintln!(
            "seed {seed} pack {pack_length}: mixed {n} rows; all {rows} rows, fill {:.1}%",
            100.0 * total.fill
        );
        // The fewest rows all the tokens can take, or one more.
        assert!(rows <= all.div_ceil(u64::from(pack_length)) + 1);
        if pack_length == 8192 {
            // The leftovers of both modalities share the last rows: all rows >= 95% full.
            assert!(total.fill >= 0.95, "fill {}", total.fill);
        }
    }
}
