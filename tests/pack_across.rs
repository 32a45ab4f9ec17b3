//! Packing across batch boundaries on the bundled example (`datasets.toml`): the rows
//! `llava-data inspect --pack-across-batches` reports are the rows the trainer's plan makes
//! (same count, tokens and fill per modality, at several seeds), and they are full.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use llava_data::build::{build, BuildOptions, Partition};
use llava_data::inspect::summary::{summarize, SummaryOptions};
use llava_data::inspect::BuildDir;
use llava_e2e::*;
use llava_trainer::data::{DataState, EpochPlan, IndexOptions, Modality, PlanConfig, ShardIndex};

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

/// (rows, tokens) per modality of the trainer's plan, world size 1, epoch 0.
fn trainer_rows(out: &Path, seed: u64, pack_length: u32) -> Vec<(Modality, u64, u64)> {
    let index = ShardIndex::open(out, &IndexOptions::default()).expect("index");
    let cfg = PlanConfig {
        seed,
        world_size: 1,
        batch_size: None,
        pack_length: Some(pack_length),
        across_batches: true,
    };
    let plan = EpochPlan::new(&index, &cfg, &DataState::new(0)).expect("plan");
    let mut per: Vec<(Modality, u64, u64)> = Vec::new();
    for step in plan.steps() {
        let b = &step[0];
        assert_eq!(b.rows.len(), 1, "one row per micro-batch");
        let m = b.modality.expect("not empty at world size 1");
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
            let &(_, n, tokens) = trainer.iter().find(|t| t.0 == m).expect("trainer rows");
            assert_eq!(
                (a.rows, a.padding.real_tokens),
                (n, tokens),
                "{} at seed {seed}, pack length {pack_length}",
                p.modality
            );
            let fill = tokens as f64 / (n * u64::from(pack_length)) as f64;
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
        let total = s.padding.total.across.as_ref().expect("total");
        assert_eq!(total.rows, rows);
        if pack_length == 8192 {
            // The image rows (7 of the example's 8) are at least 95% full.
            let image = s
                .padding
                .modalities
                .iter()
                .find(|p| p.modality == "image")
                .and_then(|p| p.across.as_ref())
                .expect("image rows");
            assert!(image.fill >= 0.95, "image fill {}", image.fill);
        }
    }
}
