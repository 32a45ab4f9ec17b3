//! `llava-trainer run` as a real process on shards with bytes flipped inside one stored tile
//! (issue 27): it stops with the shard, row group, row and sample named; `--on-corrupt skip`
//! trains the epoch without that sample and reports the count (stdout, log.jsonl).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use llava_formats::schema::{batch_to_rows, col};
use llava_loader::synthetic::{write_synthetic, SynthSpec};
use llava_test_support::RemoveOnSuccess;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

const BIN: &str = env!("CARGO_BIN_EXE_llava-trainer");

/// Flips 64 bytes in the middle of the first tile of row group 0's first row of `shard`: found
/// by its stored bytes inside the `tiles` column chunk (stored without Parquet compression), so
/// Parquet decodes the row as before and only its checksum can tell. Returns the row's id.
fn flip_first_tile(shard: &Path) -> String {
    let builder = ParquetRecordBatchReaderBuilder::try_new(File::open(shard).unwrap()).unwrap();
    let (lo, len) = builder
        .metadata()
        .row_group(0)
        .columns()
        .iter()
        .find(|c| c.column_path().parts()[0] == col::TILES)
        .expect("tiles column")
        .byte_range();
    let batch = builder
        .with_row_groups(vec![0])
        .build()
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    let row = batch_to_rows(&batch).unwrap().swap_remove(0);
    let tile = &row.tiles[0];
    let mut bytes = std::fs::read(shard).unwrap();
    let (lo, hi) = (lo as usize, (lo + len) as usize);
    let at = lo
        + bytes[lo..hi]
            .windows(256)
            .position(|w| w == &tile[..256])
            .expect("the stored tile is in the tiles column chunk");
    let mid = at + tile.len() / 2;
    for b in &mut bytes[mid - 32..mid + 32] {
        *b ^= 0xA5;
    }
    std::fs::write(shard, bytes).unwrap();
    row.id
}

fn run(shards: &Path, model: &Path, output: &Path, extra: &[&str]) -> Output {
    Command::new(BIN)
        .arg("run")
        .arg("--shards")
        .arg(shards)
        .arg("--model")
        .arg(model)
        .arg("--output")
        .arg(output)
        // One epoch: every sample, the corrupt one included, is read.
        .args(["--max-steps", "4", "--workers", "2", "--device", "cpu"])
        .args(extra)
        .output()
        .expect("llava-trainer run starts")
}

#[test]
fn run_stops_at_a_corrupt_row_or_skips_and_reports_it() {
    let dir: PathBuf = llava_test_support::scratch("corrupt-run");
    let _cleanup = RemoveOnSuccess(dir.clone());
    let shards = dir.join("shards");
    let spec = SynthSpec {
        image_samples: 8,
        text_samples: 0,
        batch_size: 2,
        group_size: 2,
        groups_per_shard: 4,
        tiles_per_image: 1,
        ..SynthSpec::default()
    };
    write_synthetic(&shards, &spec).expect("synthetic shards");
    let model = crate::common::init_tiny_model(&dir);
    let shard = std::fs::read_dir(&shards)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
        .min()
        .expect("a shard");
    let id = flip_first_tile(&shard);

    let stop = run(&shards, &model, &dir.join("stop"), &[]);
    let stderr = String::from_utf8_lossy(&stop.stderr);
    assert!(!stop.status.success(), "a corrupt row stops the run");
    for part in [
        format!("{} row group 0 row 0: sample", shard.display()),
        format!("(id {id:?}): row checksum"),
        "--on-corrupt skip".to_string(),
    ] {
        assert!(stderr.contains(&part), "{part:?} not in:\n{stderr}");
    }

    let output = dir.join("skip");
    let skip = run(&shards, &model, &output, &["--on-corrupt", "skip"]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&skip.stdout),
        String::from_utf8_lossy(&skip.stderr),
    );
    assert!(skip.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("done at step 4/4"), "{stdout}");
    assert!(
        stdout.contains("skipped 1 corrupt sample(s)"),
        "the count at the end:\n{stdout}"
    );
    assert!(
        stderr.contains("skipped a corrupt sample") && stderr.contains(&format!("{id:?}")),
        "a warning naming it:\n{stderr}"
    );
    let log = std::fs::read_to_string(output.join("log.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let skipped: Vec<_> = lines
        .iter()
        .filter(|l| l.get("skipped_corrupt").is_some())
        .collect();
    assert_eq!(skipped.len(), 1, "{log}");
    assert_eq!(skipped[0]["skipped_corrupt_total"], 1);
    assert_eq!(lines.iter().filter(|l| l.get("loss").is_some()).count(), 4);

    // A bad value is named with the flag.
    let bad = run(
        &shards,
        &model,
        &dir.join("bad"),
        &["--on-corrupt", "ignore"],
    );
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        !bad.status.success() && stderr.contains("on-corrupt"),
        "{stderr}"
    );
}
