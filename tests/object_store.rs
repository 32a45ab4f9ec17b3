//! Shards on object storage (issue 30) against a real S3 server process: `s3s-fs` (installed by
//! `scripts/setup.sh`) on the loopback interface. Build to the bucket (byte-identical to a local
//! build, resumable), `inspect --verify` on it, read and train from it (same batches, losses and
//! checkpoint bytes as from local files), the range cache and its size cap, and the faults: the
//! server stopped and restarted mid-epoch while training (the run goes on, same result), a
//! changed object (the read stops naming it), wrong credentials and none at all (the error names
//! the variables, at once).
//!
//! Every scenario runs in one test: the S3 settings are environment variables of the process.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use llava_data::shard_build::{build, BuildOptions, Partition};
use llava_e2e::*;
use std::sync::{Arc, Mutex};

use llava_loader::source::{set_cache, CacheOptions};
use llava_loader::{IndexOptions, Pixels, ShardIndex};
use llava_trainer::io::checkpoint;
use llava_trainer::train::{self, Control, RunOptions, TrainConfig};

const BUCKET: &str = "llava";
const KEY: &str = "test-access-key";
const SECRET: &str = "test-secret-key";

/// `s3s-fs`: `LLAVA_S3S_FS`, else on `PATH`, else in `$CARGO_HOME/bin` (where `scripts/setup.sh`
/// installs it). Missing, the test fails: object storage is part of the test command.
fn s3s_fs() -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("s3s-fs"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    std::env::var_os("LLAVA_S3S_FS")
        .map(PathBuf::from)
        .into_iter()
        .chain(on_path)
        .chain(cargo_home.map(|c| c.join("bin/s3s-fs")))
        .find(|p| p.is_file())
        .expect(
            "s3s-fs (the S3 server these tests start) is missing: run scripts/setup.sh, or \
             `cargo install --locked s3s-fs --version 0.14.1 --features binary`, or set \
             LLAVA_S3S_FS to its path",
        )
}

/// An s3s-fs process serving `root` (one folder per bucket) on 127.0.0.1.
struct Server {
    child: Option<Child>,
    root: PathBuf,
    port: u16,
}

impl Server {
    fn start(root: &Path) -> Server {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        let mut s = Server {
            child: None,
            root: root.to_path_buf(),
            port,
        };
        s.restart();
        s
    }

    fn restart(&mut self) {
        let child = Command::new(s3s_fs())
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--access-key", KEY, "--secret-key", SECRET])
            .arg(&self.root)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("s3s-fs starts");
        self.child = Some(child);
        let t = Instant::now();
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(t.elapsed() < Duration::from_secs(20), "s3s-fs listens");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

fn set_credentials(endpoint: &str, secret: &str) {
    std::env::set_var("AWS_ENDPOINT_URL", endpoint);
    std::env::set_var("AWS_ACCESS_KEY_ID", KEY);
    std::env::set_var("AWS_SECRET_ACCESS_KEY", secret);
    std::env::set_var("AWS_REGION", "us-east-1");
    // A stopped server is waited for this long per request (the restart takes ~2 s).
    std::env::set_var("LLAVA_STORAGE_RETRY_SECS", "60");
}

fn options(output: Option<&str>) -> BuildOptions {
    BuildOptions {
        output: output.map(PathBuf::from),
        partition: Partition::WHOLE,
        progress: false,
    }
}

/// Each batch's sample ids and u8 pixels.
type Batches = Vec<(Vec<String>, Vec<u8>)>;

/// Every batch of epoch 0 (rank 0 of 1) as (sample ids, u8 pixels), or the first error.
fn load_all(index: std::sync::Arc<ShardIndex>) -> Result<Batches, String> {
    let mut out = Vec::new();
    for batch in epoch0_u8_loader(&index, 1, 2, Default::default()).map_err(|e| e.to_string())? {
        let batch = batch.map_err(|e| e.to_string())?;
        let Pixels::U8(pixels) = &batch.pixels else {
            panic!("asked for u8 pixels");
        };
        let ids = batch
            .samples
            .iter()
            .map(|s| format!("{s:?}"))
            .collect::<Vec<_>>();
        out.push((ids, pixels.clone()));
    }
    Ok(out)
}

fn tree(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for sub in ["manifest.json", "rejects.jsonl"] {
        out.push((sub.to_string(), std::fs::read(dir.join(sub)).unwrap()));
    }
    let mut shards: Vec<_> = std::fs::read_dir(dir.join("shards"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    shards.sort();
    for p in shards {
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        out.push((name, std::fs::read(&p).unwrap()));
    }
    out
}

const STEPS: u64 = 6;

fn train_config(shards: &Path, model: &Path, output: &Path) -> TrainConfig {
    let mut c = TrainConfig::new(shards.into(), model.into(), output.into());
    c.lr = 1e-3;
    c.warmup_ratio = 0.1;
    c.max_steps = Some(STEPS);
    c.workers = 2;
    c.merge_type = Some(llava_trainer::model::config::MergeType::Flat);
    c
}

/// The losses of a run and the bytes of its last checkpoint's weights and optimizer state.
fn trained(summary: &train::Summary, output: &Path) -> (Vec<f64>, Vec<Vec<u8>>) {
    assert_eq!(summary.steps_done, STEPS);
    let losses = summary.history.iter().map(|h| h.loss).collect();
    let (step, last) = checkpoint::list_checkpoints(output)
        .pop()
        .expect("a checkpoint");
    assert_eq!(step, STEPS);
    let bytes = ["model.safetensors", "trainer_state.safetensors"]
        .iter()
        .map(|f| std::fs::read(last.join(f)).unwrap())
        .collect();
    (losses, bytes)
}

fn folder_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

#[test]
fn shards_on_a_real_s3_server() {
    let (dir, _cleanup) = scratch_removed_on_success("object-store");
    let root = dir.join("s3-root");
    std::fs::create_dir_all(root.join(BUCKET)).unwrap();
    let server = Arc::new(Mutex::new(Server::start(&root)));
    let endpoint = server.lock().unwrap().endpoint();
    set_credentials(&endpoint, SECRET);
    // The remote build's local work folder: this test's own (not one per URL in /tmp).
    std::env::set_var("LLAVA_DATA_WORK_DIR", dir.join("work"));
    let url = format!("s3://{BUCKET}/run1");

    // Local build, then the same build to the bucket: the same bytes.
    let local_dir = build_shards(&dir);
    let config = dir.join("datasets.toml");
    let local = llava_data::inspect::BuildDir::open(&local_dir)
        .unwrap()
        .manifest
        .shards
        .len();
    let remote = build(&config, &options(Some(&url))).expect("build to the bucket");
    assert!(remote.manifest.is_some() && remote.shards_written == local);
    let bucket_dir = root.join(BUCKET).join("run1");
    assert_eq!(tree(&bucket_dir), tree(&local_dir), "bucket == local build");
    assert!(
        !dir.join("s3:").exists() && !Path::new("s3:").exists(),
        "no local folder named s3:"
    );

    // Resume: a shard lost (a kill before its upload completed) is the only one written again.
    let first = std::fs::read_dir(bucket_dir.join("shards"))
        .unwrap()
        .flatten()
        .next()
        .unwrap()
        .path();
    std::fs::remove_file(&first).unwrap();
    let again = build(&config, &options(Some(&url))).expect("resumed build");
    assert_eq!((again.shards_written, again.shards_skipped), (1, local - 1));
    assert_eq!(
        tree(&bucket_dir),
        tree(&local_dir),
        "resumed bucket == local build"
    );

    // inspect --verify on the bucket.
    let build_dir = llava_data::inspect::BuildDir::open(Path::new(&url)).expect("open bucket");
    let report = llava_data::inspect::verify::verify(&build_dir);
    assert!(report.ok(), "{:?}", report.problems);

    // inspect's summary and --sample on the bucket == on the folder (footers and the needed
    // column chunks fetched, never the whole shards).
    use llava_data::inspect::{sample, summary};
    let local_build = llava_data::inspect::BuildDir::open(&local_dir).unwrap();
    let opts = summary::SummaryOptions {
        batch_size: None,
        world_size: 1,
        bins: 10,
        pack_length: None,
        across_batches: false,
        seed: None,
    };
    let mut on_bucket = summary::summarize(&build_dir, &opts).expect("summary of the bucket");
    let on_files = summary::summarize(&local_build, &opts).unwrap();
    on_bucket.dir = on_files.dir.clone();
    assert_eq!(on_bucket, on_files, "summary: bucket == files");
    for key in ["0", "5"] {
        let a = sample::find(&build_dir, key, true).expect("--sample on the bucket");
        let b = sample::find(&local_build, key, true).unwrap();
        assert_eq!(
            (a.shard, a.row_group, format!("{:?}", a.row)),
            (b.shard, b.row_group, format!("{:?}", b.row)),
            "--sample {key}: bucket == files"
        );
    }

    // The loader reads the same batches from the bucket as from the folder, checksums too.
    let options_sha = IndexOptions {
        verify_checksums: true,
    };
    let from_files = load_all(ShardIndex::open(&local_dir, &options_sha).unwrap()).unwrap();
    let index = ShardIndex::open(Path::new(&url), &options_sha).expect("index from the bucket");
    assert_eq!(
        load_all(index.clone()).unwrap(),
        from_files,
        "bucket == files"
    );

    // Training from the bucket == training from the files: losses and checkpoint bytes.
    let model = tiny_model(&dir);
    let a = dir.join("train-files");
    let sa = train::run(&train_config(&local_dir, &model, &a), RunOptions::default())
        .expect("train from files");
    let from_files_run = trained(&sa, &a);
    let b = dir.join("train-bucket");
    let sb = train::run(
        &train_config(Path::new(&url), &model, &b),
        RunOptions::default(),
    )
    .expect("train from the bucket");
    assert_eq!(trained(&sb, &b), from_files_run, "bucket run == files run");

    // The server stopped after step 1 and back 3 s later: the reads wait (object_store's
    // retries with backoff) and the run ends as the uninterrupted one.
    let c = dir.join("train-restart");
    let restarted_at = Arc::new(Mutex::new(None::<Instant>));
    let hook = {
        let server = server.clone();
        let restarted_at = restarted_at.clone();
        move |step: u64| {
            if step == 1 {
                server.lock().unwrap().stop();
                let server = server.clone();
                let restarted_at = restarted_at.clone();
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_secs(3));
                    server.lock().unwrap().restart();
                    *restarted_at.lock().unwrap() = Some(Instant::now());
                });
            }
            Control::Continue
        }
    };
    let sc = train::run(
        &train_config(Path::new(&url), &model, &c),
        RunOptions {
            after_step: Some(Box::new(hook)),
            ..RunOptions::default()
        },
    )
    .expect("train through a server restart");
    let ended = Instant::now();
    let back = restarted_at.lock().unwrap().expect("the server came back");
    assert!(back < ended, "the run waited for the server");
    assert_eq!(
        trained(&sc, &c),
        from_files_run,
        "restarted run == files run"
    );

    // The range cache: a cap above the reads keeps them all (a second pass fetches nothing);
    // a small cap deletes the least recently used ranges and stays under it.
    let cache = dir.join("cache");
    set_cache(Some(CacheOptions {
        dir: cache.join("big"),
        max_bytes: 1 << 40,
    }));
    let cached = ShardIndex::open(Path::new(&url), &IndexOptions::default()).unwrap();
    assert_eq!(load_all(cached.clone()).unwrap(), from_files, "cold cache");
    let cold = cached.remote.as_ref().unwrap().cache_stats();
    assert_eq!(load_all(cached.clone()).unwrap(), from_files, "warm cache");
    let warm = cached.remote.as_ref().unwrap().cache_stats();
    assert!(
        cold.fetches > 0 && warm.fetches == cold.fetches,
        "{cold:?} {warm:?}"
    );
    assert!(warm.hits > cold.hits && warm.evictions == 0, "{warm:?}");
    // One byte less than what one pass keeps: each range fits, not all of them together.
    let cap = cold.bytes - 1;
    set_cache(Some(CacheOptions {
        dir: cache.join("small"),
        max_bytes: cap,
    }));
    let small = ShardIndex::open(Path::new(&url), &IndexOptions::default()).unwrap();
    for pass in 0..2 {
        assert_eq!(
            load_all(small.clone()).unwrap(),
            from_files,
            "capped cache {pass}"
        );
    }
    let stats = small.remote.as_ref().unwrap().cache_stats();
    println!("cache: cold {cold:?}, warm {warm:?}, capped at {cap}: {stats:?}");
    let on_disk = folder_bytes(small.remote.as_ref().unwrap().cache_dir().unwrap());
    assert!(stats.evictions > 0, "{stats:?}");
    assert!(
        stats.bytes <= cap && on_disk == stats.bytes,
        "{stats:?}, {on_disk} on disk, cap {cap}"
    );
    set_cache(None);

    // A changed object: the read stops and names it.
    let shard = &index.manifest.shards[0].file;
    let object = bucket_dir.join(shard);
    // (Rewritten behind the server's back with bytes appended: its size no longer matches.)
    let mut bytes = std::fs::read(&object).unwrap();
    bytes.extend_from_slice(&[0x5a; 64]);
    std::fs::write(&object, &bytes).unwrap();
    let err = load_all(index.clone()).expect_err("a corrupted object stops the read");
    assert!(
        err.contains(&format!("{url}/{shard}")),
        "names the object: {err}"
    );
    let report = llava_data::inspect::verify::verify(&build_dir);
    assert!(
        report.problems.iter().any(|p| p.file == *shard),
        "{:?}",
        report.problems
    );

    // Wrong credentials: the error says which variables were refused (build, inspect, trainer).
    set_credentials(&endpoint, "not-the-secret");
    let Err(err) = llava_data::inspect::BuildDir::open(Path::new(&url)) else {
        panic!("wrong credentials accepted");
    };
    let text = err.to_string();
    assert!(
        text.contains("AWS_SECRET_ACCESS_KEY") && text.contains("refused"),
        "{text}"
    );
    let err = ShardIndex::open(Path::new("s3://llava/run2"), &IndexOptions::default())
        .expect_err("refused");
    let text = err.to_string();
    assert!(
        text.contains("AWS_SECRET_ACCESS_KEY") && text.contains("refused"),
        "{text}"
    );

    // No credentials at all (and no instance metadata service): an error at once naming them,
    // not minutes of retries against 169.254.169.254.
    std::env::remove_var("AWS_ACCESS_KEY_ID");
    std::env::remove_var("AWS_SECRET_ACCESS_KEY");
    let closed = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    std::env::set_var(
        "AWS_METADATA_ENDPOINT",
        format!("http://127.0.0.1:{closed}"),
    );
    let t = Instant::now();
    let Err(err) = llava_data::inspect::BuildDir::open(Path::new(&url)) else {
        panic!("opened without credentials");
    };
    let text = err.to_string();
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "fails fast: {:?}",
        t.elapsed()
    );
    assert!(
        text.contains("AWS_ACCESS_KEY_ID") && text.contains("AWS_SECRET_ACCESS_KEY"),
        "{text}"
    );
    std::env::remove_var("AWS_METADATA_ENDPOINT");
    set_credentials(&endpoint, SECRET);
}
