//! Shards on object storage (issue 30) against a real S3 server process: `s3s-fs` (installed by
//! `scripts/setup.sh`) on the loopback interface. Build to the bucket (byte-identical to a local
//! build, resumable), `inspect --verify` on it, train from it (same losses and checkpoint bytes
//! as from local files), and the faults: the server stopped and restarted mid-epoch (reading goes
//! on), a corrupted object (the read stops naming it), wrong credentials (the error names the
//! variables).
//!
//! Every scenario runs in one test: the S3 settings are environment variables of the process.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use llava_data::build::{build, BuildOptions, Partition};
use llava_e2e::*;
use llava_trainer::data::{
    DataState, EpochPlan, IndexOptions, Loader, LoaderConfig, PixelFormat, Pixels, PlanConfig,
    ShardIndex,
};

const BUCKET: &str = "llava";
const KEY: &str = "test-access-key";
const SECRET: &str = "test-secret-key";

/// `s3s-fs`: `LLAVA_S3S_FS`, else where `scripts/setup.sh` installs it, else `~/.cargo/bin`.
fn s3s_fs() -> PathBuf {
    let candidates = [
        std::env::var_os("LLAVA_S3S_FS").map(PathBuf::from),
        Some(repo_root().join(".cache/tools/bin/s3s-fs")),
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin/s3s-fs")),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|p| p.is_file())
        .expect("s3s-fs is missing: run scripts/setup.sh (it installs it into .cache/tools)")
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

fn mixture(dir: &Path) -> PathBuf {
    let f = fixtures();
    let text = format!(
        r#"output = "out"
tokenizer = "{tok}"
seed = 7
batch_size = 2
group_size = 2
length_pool_groups = 1
mm_patch_merge_type = "flat"

[[sources]]
name = "blip"
json = "{f}/data/blip_laion_cc_sbu_558k.json"
image_folder = "{f}/images/llava/llava_pretrain/images"
template = "plain"
image_aspect_ratio = "square"

[[sources]]
name = "instruct"
json = "{f}/data/llava_instruct_150k.json"
image_folder = "{f}/images/coco/train2017"
template = "llava_llama_3"
image_aspect_ratio = "square"
"#,
        tok = tokenizer_path().display(),
        f = f.display()
    );
    let config = dir.join("datasets.toml");
    std::fs::write(&config, text).unwrap();
    config
}

fn options(output: Option<&str>) -> BuildOptions {
    BuildOptions {
        output: output.map(PathBuf::from),
        partition: Partition::WHOLE,
        progress: false,
    }
}

/// Every batch of epoch 0 (rank 0 of 1) as (sample ids, u8 pixels), or the first error.
fn load_all(index: std::sync::Arc<ShardIndex>) -> Result<Vec<(Vec<String>, Vec<u8>)>, String> {
    let cfg = PlanConfig {
        seed: 1,
        world_size: 1,
        batch_size: None,
        pack_length: None,
    };
    let planned = EpochPlan::new(&index, &cfg, &DataState::new(0))
        .expect("plan")
        .rank(0)
        .expect("rank 0");
    let config = LoaderConfig {
        workers: 2,
        prefetch: 2,
        pixels: PixelFormat::U8,
    };
    let mut out = Vec::new();
    for batch in Loader::new(index.clone(), planned, &config).map_err(|e| e.to_string())? {
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

#[test]
fn shards_on_a_real_s3_server() {
    let (dir, _cleanup) = scratch_removed_on_success("object-store");
    let root = dir.join("s3-root");
    std::fs::create_dir_all(root.join(BUCKET)).unwrap();
    let mut server = Server::start(&root);
    set_credentials(&server.endpoint(), SECRET);
    let url = format!("s3://{BUCKET}/run1");
    let config = mixture(&dir);

    // Local build, then the same build to the bucket: the same bytes.
    let local = build(&config, &options(None)).expect("local build");
    let remote = build(&config, &options(Some(&url))).expect("build to the bucket");
    assert!(remote.manifest.is_some() && remote.shards_written == local.shards_written);
    let local_dir = dir.join("out");
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
    assert_eq!(
        (again.shards_written, again.shards_skipped),
        (1, local.shards_written - 1)
    );
    assert_eq!(
        tree(&bucket_dir),
        tree(&local_dir),
        "resumed bucket == local build"
    );

    // inspect --verify on the bucket.
    let build_dir = llava_data::inspect::BuildDir::open(Path::new(&url)).expect("open bucket");
    let report = llava_data::inspect::verify::verify(&build_dir);
    assert!(report.ok(), "{:?}", report.problems);
    assert_eq!(report.rows, local.manifest.as_ref().unwrap().totals.samples);

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

    // The server stopped mid-epoch and back 2 s later: the reads wait and go on.
    server.stop();
    let restarted = std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_secs(2));
            server.restart();
        });
        load_all(index.clone())
    });
    assert_eq!(restarted.unwrap(), from_files, "after a restart");

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

    // Wrong credentials: the error says which variables were refused.
    set_credentials(&server.endpoint(), "not-the-secret");
    let err = llava_data::inspect::BuildDir::open(Path::new(&url)).expect_err("refused");
    let text = err.to_string();
    assert!(
        text.contains("AWS_SECRET_ACCESS_KEY") && text.contains("refused"),
        "{text}"
    );
    set_credentials(&server.endpoint(), SECRET);
}
