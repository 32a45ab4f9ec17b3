//! `llava-data inspect` through the binary, on a small build of two fixture sources.

use crate::common;

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::OnceLock;

use llava_data::shard_build::{build, BuildOptions, Partition};

/// A build of sharegpt4v (anyres, 2x2 grids among them) and sharegpt_text, made once.
fn built() -> &'static PathBuf {
    static OUT: OnceLock<PathBuf> = OnceLock::new();
    OUT.get_or_init(|| {
        let dir = common::repo_root()
            .join("target/e2e-scratch")
            .join(format!("inspect-cli-{}", std::process::id()));
        std::fs::remove_dir_all(&dir).ok();
        std::fs::create_dir_all(&dir).unwrap();
        let f = common::fixtures();
        let config = format!(
            r#"output = "out"
tokenizer = "{tok}"
seed = 3
batch_size = 2
group_size = 4

[[sources]]
name = "sharegpt4v"
json = "{f}/data/sharegpt4v.json"
image_folder = "{f}/images"
template = "llava_llama_3"

[[sources]]
name = "text"
json = "{f}/data/sharegpt_text.json"
template = "llava_llama_3"
"#,
            tok = common::tokenizer_path().display(),
            f = f.display()
        );
        std::fs::write(dir.join("datasets.toml"), config).unwrap();
        let options = BuildOptions {
            output: None,
            partition: Partition::WHOLE,
            progress: false,
        };
        build(&dir.join("datasets.toml"), &options).expect("build succeeds");
        dir.join("out")
    })
}

fn inspect(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_llava-data"))
        .arg("inspect")
        .arg(built())
        .args(args)
        .output()
        .expect("llava-data runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn summary_prints_the_tables() {
    let o = inspect(&[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = stdout(&o);
    for needle in [
        "sharegpt4v",
        "length histogram, image",
        "images by processing and grid",
        "anyres 2x2",
        "padding efficiency",
        "random: seeded shuffle",
    ] {
        assert!(text.contains(needle), "{needle:?} not in\n{text}");
    }
}

#[test]
fn json_parses_and_matches_the_manifest() {
    let o = inspect(&["--json", "--batch-size", "3", "--world-size", "2"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("one JSON object");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(built().join("manifest.json")).unwrap()).unwrap();
    assert_eq!(v["samples"], manifest["totals"]["samples"]);
    assert_eq!(v["tokens"], manifest["totals"]["tokens"]);
    assert_eq!(
        v["supervised_tokens"],
        manifest["totals"]["supervised_tokens"]
    );
    assert_eq!(v["padding"]["batch_size"], 3);
    assert_eq!(v["padding"]["world_size"], 2);
    assert!(
        v["padding"]["total"]["grouped"]["efficiency"]
            .as_f64()
            .unwrap()
            > 0.0
    );
}

#[test]
fn verify_says_ok() {
    let o = inspect(&["--verify"]);
    assert!(o.status.success(), "{}", stdout(&o));
    assert!(stdout(&o).starts_with("OK: "), "{}", stdout(&o));
}

#[test]
fn verify_fails_on_a_flipped_byte_with_the_file_named() {
    let src = built();
    let dir = src.parent().unwrap().join("flipped");
    std::fs::remove_dir_all(&dir).ok();
    std::fs::create_dir_all(dir.join("shards")).unwrap();
    std::fs::copy(src.join("manifest.json"), dir.join("manifest.json")).unwrap();
    for e in std::fs::read_dir(src.join("shards")).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, dir.join("shards").join(p.file_name().unwrap())).unwrap();
    }
    let shard = dir.join("shards/text-00000.parquet");
    let mut bytes = std::fs::read(&shard).unwrap();
    let at = bytes.len() / 3;
    bytes[at] ^= 0x80;
    std::fs::write(&shard, bytes).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_llava-data"))
        .args(["inspect", "--verify"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let text = stdout(&o);
    assert!(text.contains("FAILED"), "{text}");
    assert!(text.contains("shards/text-00000.parquet: sha256"), "{text}");
}

#[test]
fn sample_shows_marked_text_and_writes_tiles_and_plot() {
    let scratch = built().parent().unwrap().to_path_buf();
    let tiles = scratch.join("tiles.png");
    let tok = common::tokenizer_path();
    let o = inspect(&[
        "--sample",
        "sharegpt4v:1",
        "--tokenizer",
        tok.to_str().unwrap(),
        "--tiles",
        tiles.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = stdout(&o);
    // Not a terminal: brackets.
    assert!(text.contains("[[") && text.contains("]]"), "{text}");
    assert!(text.contains("<image: "), "{text}");
    let img = image::open(&tiles).unwrap();
    assert_eq!(img.height() % 336, 0);
    assert!(img.width() >= 336);

    let plot = scratch.join("lengths.png");
    let o = inspect(&["--plot", plot.to_str().unwrap()]);
    assert!(o.status.success());
    let img = image::open(&plot).unwrap();
    assert_eq!(img.width(), llava_data::inspect::plot::WIDTH);
    assert_eq!(img.height(), 2 * llava_data::inspect::plot::PANEL_HEIGHT);

    // No tokenizer: a clear refusal.
    let o = inspect(&["--sample", "sharegpt4v:1"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--tokenizer"));
}

#[test]
fn sample_by_bare_number_is_the_row_in_shard_order() {
    use llava_data::inspect::{sample, BuildDir};
    let b = BuildDir::open(built()).unwrap();
    let total: u64 = b.manifest.shards.iter().map(|s| s.rows).sum();
    let mut seen = Vec::new();
    let mut last = (String::new(), 0);
    for k in 0..total {
        let found = sample::find(&b, &k.to_string(), false).unwrap();
        // Shard order, then row-group order within a shard.
        let shard_pos = |f: &str| b.manifest.shards.iter().position(|s| s.file == f);
        if found.shard == last.0 {
            assert!(found.row_group >= last.1, "row {k}");
        } else {
            assert!(shard_pos(&found.shard) > shard_pos(&last.0), "row {k}");
        }
        last = (found.shard.clone(), found.row_group);
        // The same row as found by its id.
        let by_id = sample::find(&b, &found.row.id, false).unwrap();
        assert_eq!(
            (by_id.shard, by_id.row.index),
            (found.shard, found.row.index)
        );
        seen.push(found.row.id);
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len() as u64, total, "every row once");
    assert!(sample::find(&b, &total.to_string(), false).is_err());

    // As users type it: `--sample 7` is the 8th row.
    let tok = common::tokenizer_path();
    let o = inspect(&["--sample", "7", "--tokenizer", tok.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// `inspect --html` opened in a real headless Chromium (the Debian package `scripts/setup.sh`
/// installs), driven over the DevTools protocol on a pipe: the bundled example's build plus one
/// source of bad records (so that the rejects section has entries of three kinds).
mod browser {
    use super::*;

    /// The bundled example (`datasets.toml` at the repo root) plus a source of bad records.
    fn example_with_rejects() -> &'static PathBuf {
        static OUT: OnceLock<PathBuf> = OnceLock::new();
        OUT.get_or_init(|| {
            let root = common::repo_root();
            let dir = root
                .join("target/e2e-scratch")
                .join(format!("inspect-html-{}", std::process::id()));
            std::fs::remove_dir_all(&dir).ok();
            std::fs::create_dir_all(&dir).unwrap();
            let f = common::fixtures();
            // A missing image, a system turn first, and one good text record. (Not a PNG whose
            // pixels are corrupt: in this mixture the build books that pass-2 reject wrongly
            // (`written + rejected != read` for sharegpt4v), a build bug reported to the lead.)
            std::fs::write(
                dir.join("bad.jsonl"),
                r#"{"id": "missing_image", "image": "nope/none.jpg", "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "x"}]}
{"id": "system_first", "conversations": [{"from": "system", "value": "be nice"}, {"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"}]}
{"id": "good_text", "conversations": [{"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "Blue."}]}
"#,
            )
            .unwrap();
            // The example's config with absolute paths (it names them relative to the repo root).
            let example = std::fs::read_to_string(root.join("datasets.toml")).unwrap();
            let mut config = String::new();
            for line in example.lines() {
                let line = line
                    .replace("\"fixtures/", &format!("\"{}/", f.display()))
                    .replace(
                        "\".cache/tokenizer/tokenizer.json\"",
                        &format!("\"{}\"", common::tokenizer_path().display()),
                    );
                config.push_str(&line);
                config.push('\n');
            }
            config.push_str(&format!(
                "\n[[sources]]\nname = \"bad\"\njson = \"{d}/bad.jsonl\"\nimage_folder = \"{d}\"\n\
                 template = \"llava_llama_3\"\n",
                d = dir.display()
            ));
            std::fs::write(dir.join("datasets.toml"), config).unwrap();
            let options = BuildOptions {
                output: Some(dir.join("out")),
                partition: Partition::WHOLE,
                progress: false,
            };
            build(&dir.join("datasets.toml"), &options).expect("build succeeds");
            dir.join("out")
        })
    }

    fn chromium() -> Option<PathBuf> {
        if let Some(p) = std::env::var_os("CHROMIUM") {
            return Some(PathBuf::from(p));
        }
        let path = std::env::var_os("PATH")?;
        for name in ["chromium", "chromium-browser", "google-chrome"] {
            for dir in std::env::split_paths(&path) {
                let p = dir.join(name);
                if p.is_file() {
                    return Some(p);
                }
            }
        }
        None
    }

    #[test]
    fn html_report_loads_in_chromium_with_the_builds_numbers() {
        let Some(chromium) = chromium() else {
            println!(
                "SKIPPED: no chromium on PATH (scripts/setup.sh installs the Debian package `chromium`)"
            );
            return;
        };
        let out = example_with_rejects();
        let scratch = out.parent().unwrap();
        let report = scratch.join("report.html");
        let tok = common::tokenizer_path();
        let o = Command::new(env!("CARGO_BIN_EXE_llava-data"))
            .arg("inspect")
            .arg(out)
            .args(["--html", report.to_str().unwrap(), "--tokenizer"])
            .arg(&tok)
            .args(["--batch-size", "4", "--world-size", "2", "--json"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let json: serde_json::Value = serde_json::from_slice(&o.stdout).expect("--json");
        let html = std::fs::read_to_string(&report).unwrap();
        // Self-contained: nothing refers to another file or host. (Text may mention URLs, and
        // the SVG names its namespace: attributes are what would load.)
        for needle in [
            "<script src",
            "<link",
            "src=\"http",
            "href=\"http",
            "href=\"//",
            "@import",
            "url(",
        ] {
            assert!(!html.contains(needle), "the report contains {needle:?}");
        }

        let mut page = cdp::Browser::launch(&chromium, scratch).expect("chromium starts");
        page.open(&report).expect("the report loads");
        let state = page
            .eval(
                r#"(async () => {
                  const imgs = [...document.querySelectorAll('img')];
                  await Promise.all(imgs.map(i => i.decode().catch(() => null)));
                  const table = id => [...document.querySelectorAll('#' + id + ' tbody tr')]
                    .map(tr => [...tr.cells].map(td => td.dataset.v ?? td.textContent));
                  const samples = [...document.querySelectorAll('.sample')].map(s => ({
                    id: s.dataset.id,
                    images: Number(s.dataset.images),
                    tiles: [...s.querySelectorAll('img.tile-picture')].map(i => [i.complete, i.naturalWidth, i.naturalHeight]),
                    trained: s.querySelectorAll('pre.conv mark').length,
                    placeholders: [...s.querySelectorAll('pre.conv .img')].map(e => e.textContent),
                  }));
                  const kinds = [...document.querySelectorAll('details.reject-kind')]
                    .map(d => [d.dataset.kind, Number(d.dataset.count), d.querySelectorAll('tbody tr').length,
                               [...d.querySelectorAll('tbody tr')].map(tr => tr.lastElementChild.textContent)]);
                  const svgs = document.querySelectorAll('svg').length;
                  // Sorting: a click on "tokens" of the per-source table sorts it ascending.
                  const th = [...document.querySelectorAll('#by-source th')].find(h => h.textContent === 'tokens');
                  th.click();
                  const sorted = table('by-source').map(r => Number(r[3]));
                  return { sources: table('by-source'), bySourceModality: table('by-source-modality'),
                           totals: table('totals'), padding: table('padding'), samples, kinds, svgs, sorted };
                })()"#,
            )
            .expect("the page's state");
        std::fs::write(
            scratch.join("report.png"),
            page.screenshot(1400, 2200).expect("a screenshot"),
        )
        .unwrap();
        let log = page.close();
        println!(
            "report {} ({} bytes), screenshot {}",
            report.display(),
            html.len(),
            scratch.join("report.png").display()
        );
        assert!(log.errors.is_empty(), "console errors: {:?}", log.errors);
        assert!(
            log.requests.is_empty(),
            "network requests: {:?}",
            log.requests
        );

        // The per-(source, modality) table is `--json`'s sources then modalities.
        let rows = state["bySourceModality"].as_array().unwrap();
        let expected: Vec<&serde_json::Value> = json["sources"]
            .as_array()
            .unwrap()
            .iter()
            .chain(json["modalities"].as_array().unwrap())
            .collect();
        assert_eq!(rows.len(), expected.len());
        for (row, c) in rows.iter().zip(&expected) {
            let cell = |i: usize| row[i].as_str().unwrap().to_string();
            let source = c["source"].as_str().unwrap();
            assert_eq!(cell(0), if source == "*" { "(all)" } else { source });
            assert_eq!(cell(1), c["modality"].as_str().unwrap());
            for (i, field) in [
                "samples",
                "tokens",
                "supervised_tokens",
                "image_tokens",
                "images",
                "tiles",
                "truncated",
            ]
            .iter()
            .enumerate()
            {
                assert_eq!(cell(2 + i), c[field].to_string(), "{source} {field}");
            }
            for (i, field) in ["min", "p50", "p90", "p99", "max"].iter().enumerate() {
                assert_eq!(
                    cell(9 + i),
                    c["length"][field].to_string(),
                    "{source} {field}"
                );
            }
        }
        // Per source: read and rejected from the manifest, after the click sorted by tokens.
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
        let sources = state["sources"].as_array().unwrap();
        assert_eq!(sources.len(), manifest["sources"].as_array().unwrap().len());
        for row in sources {
            let name = row[0].as_str().unwrap();
            let m = manifest["sources"]
                .as_array()
                .unwrap()
                .iter()
                .find(|s| s["name"] == name)
                .unwrap();
            assert_eq!(row[1].as_str().unwrap(), m["read"].to_string(), "{name}");
            assert_eq!(row[2].as_str().unwrap(), m["written"].to_string(), "{name}");
            assert_eq!(
                row[8].as_str().unwrap(),
                m["rejected"].to_string(),
                "{name}"
            );
        }
        let sorted: Vec<f64> = serde_json::from_value(state["sorted"].clone()).unwrap();
        assert!(sorted.windows(2).all(|w| w[0] <= w[1]), "{sorted:?}");
        // Totals and padding.
        let totals = state["totals"].as_array().unwrap();
        assert_eq!(totals[0][1].as_str().unwrap(), json["samples"].to_string());
        assert_eq!(totals[3][1].as_str().unwrap(), json["tokens"].to_string());
        let padding = state["padding"].as_array().unwrap();
        let all = padding.last().unwrap();
        let total = &json["padding"]["total"];
        assert_eq!(
            all[1].as_str().unwrap(),
            total["grouped"]["batches"].to_string()
        );
        let close = |cell: &serde_json::Value, v: &serde_json::Value| {
            (cell.as_str().unwrap().parse::<f64>().unwrap() - v.as_f64().unwrap()).abs() < 1e-9
        };
        assert!(close(&all[4], &total["grouped"]["efficiency"]));
        assert!(close(&all[6], &total["random"]["efficiency"]));
        assert!(close(&all[9], &total["packed"]["padding"]["efficiency"]));
        // Rejects: the kinds of rejects.jsonl with their counts, image failures with their file.
        let kinds = state["kinds"].as_array().unwrap();
        let by_kind = json["rejects"]["by_kind"].as_array().unwrap();
        assert_eq!(kinds.len(), by_kind.len());
        assert_eq!(json["rejects"]["total"], 2);
        let mut image_files = Vec::new();
        for (k, j) in kinds.iter().zip(by_kind) {
            assert_eq!(k[0], j["kind"]);
            assert_eq!(k[1], j["count"]);
            assert_eq!(k[2], j["count"], "every reject listed");
            if ["image", "truncated_image", "image_too_large"].contains(&k[0].as_str().unwrap()) {
                image_files.extend(
                    k[3].as_array()
                        .unwrap()
                        .iter()
                        .map(|v| v.as_str().unwrap().to_string()),
                );
            }
        }
        let missing = "nope/none.jpg";
        assert!(
            image_files.iter().any(|f| f.ends_with(missing)),
            "{missing} not among the image failures' files {image_files:?}"
        );
        // Samples: 43 written, fewer than the default 50: all of them, each image a decoded PNG.
        let samples = state["samples"].as_array().unwrap();
        assert_eq!(samples.len() as u64, json["samples"].as_u64().unwrap());
        let mut pictures = 0;
        for s in samples {
            let tiles = s["tiles"].as_array().unwrap();
            assert_eq!(
                tiles.len() as u64,
                s["images"].as_u64().unwrap(),
                "{}",
                s["id"]
            );
            assert_eq!(
                s["placeholders"].as_array().unwrap().len(),
                tiles.len(),
                "{}",
                s["id"]
            );
            assert!(
                s["trained"].as_u64().unwrap() > 0,
                "{} has a trained span",
                s["id"]
            );
            for t in tiles {
                assert_eq!(t[0], true, "{}", s["id"]);
                assert!(
                    t[1].as_u64().unwrap() > 0 && t[2].as_u64().unwrap() > 0,
                    "{}: {t}",
                    s["id"]
                );
                pictures += 1;
            }
        }
        assert_eq!(pictures, manifest["totals"]["images"].as_u64().unwrap());
        assert!(state["svgs"].as_u64().unwrap() >= 5);
    }

    /// Enough of the Chrome DevTools protocol over `--remote-debugging-pipe` (JSON messages ended
    /// by NUL on fds 3 and 4): no WebSocket, no driver to download.
    mod cdp {
        use std::io::{BufRead, BufReader, Write};
        use std::os::fd::{FromRawFd, OwnedFd};
        use std::os::unix::process::CommandExt;
        use std::path::Path;
        use std::process::{Child, Command, Stdio};
        use std::sync::mpsc::{channel, Receiver};
        use std::time::{Duration, Instant};

        use base64::Engine;
        use serde_json::{json, Value};

        pub struct Browser {
            child: Child,
            to: std::fs::File,
            from: Receiver<Value>,
            next_id: u64,
            session: String,
            pub log: Log,
            _profile: PathBufGuard,
        }

        /// What the page did besides rendering.
        #[derive(Debug, Default)]
        pub struct Log {
            /// Console errors, uncaught exceptions, failed loads.
            pub errors: Vec<String>,
            /// Requests to anything but the report itself and data: URLs.
            pub requests: Vec<String>,
            pub page_url: String,
        }

        struct PathBufGuard(std::path::PathBuf);
        impl Drop for PathBufGuard {
            fn drop(&mut self) {
                std::fs::remove_dir_all(&self.0).ok();
            }
        }

        const TIMEOUT: Duration = Duration::from_secs(60);

        fn pipe() -> (OwnedFd, OwnedFd) {
            let mut fds = [0i32; 2];
            // SAFETY: `fds` has room for the two descriptors pipe2 writes.
            let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
            assert_eq!(rc, 0, "pipe2");
            // SAFETY: both are fresh descriptors owned by nobody else.
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
        }

        impl Browser {
            pub fn launch(chromium: &Path, scratch: &Path) -> Result<Browser, String> {
                use std::os::fd::AsRawFd;
                let profile = scratch.join(format!("chromium-profile-{}", std::process::id()));
                std::fs::remove_dir_all(&profile).ok();
                std::fs::create_dir_all(&profile).map_err(|e| e.to_string())?;
                let (cmd_read, cmd_write) = pipe();
                let (ev_read, ev_write) = pipe();
                let (a, b) = (cmd_read.as_raw_fd(), ev_write.as_raw_fd());
                let mut command = Command::new(chromium);
                command
                    .args([
                        "--headless",
                        "--no-sandbox",
                        "--disable-gpu",
                        "--disable-quic",
                        "--no-first-run",
                        "--no-default-browser-check",
                        "--disable-background-networking",
                        "--disable-component-update",
                        "--disable-sync",
                        "--disable-extensions",
                        "--disable-dev-shm-usage",
                        "--hide-scrollbars",
                        "--remote-debugging-pipe",
                    ])
                    .arg(format!("--user-data-dir={}", profile.display()))
                    .arg("about:blank")
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null());
                // SAFETY: only async-signal-safe calls (fcntl, dup2) between fork and exec.
                unsafe {
                    command.pre_exec(move || {
                        // Out of the way first, so that dup2 onto 3 cannot close the other one.
                        let a2 = libc::fcntl(a, libc::F_DUPFD, 10);
                        let b2 = libc::fcntl(b, libc::F_DUPFD, 10);
                        if a2 < 0 || b2 < 0 || libc::dup2(a2, 3) < 0 || libc::dup2(b2, 4) < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        Ok(())
                    });
                }
                let child = command
                    .spawn()
                    .map_err(|e| format!("{}: {e}", chromium.display()))?;
                drop(cmd_read);
                drop(ev_write);
                let (tx, rx) = channel();
                let from = std::fs::File::from(ev_read);
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(from);
                    loop {
                        let mut buf = Vec::new();
                        match reader.read_until(0, &mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(_) => {
                                buf.pop();
                                if let Ok(v) = serde_json::from_slice::<Value>(&buf) {
                                    if tx.send(v).is_err() {
                                        break;
                                    }
                                }
                            }
                        }
                    }
                });
                let mut browser = Browser {
                    child,
                    to: std::fs::File::from(cmd_write),
                    from: rx,
                    next_id: 0,
                    session: String::new(),
                    log: Log::default(),
                    _profile: PathBufGuard(profile),
                };
                // The page target about:blank opened.
                let deadline = Instant::now() + TIMEOUT;
                let target = loop {
                    let targets = browser.call_browser("Target.getTargets", json!({}))?;
                    let page = targets["targetInfos"]
                        .as_array()
                        .and_then(|t| t.iter().find(|t| t["type"] == "page"))
                        .map(|t| t["targetId"].as_str().unwrap_or("").to_string());
                    if let Some(id) = page {
                        break id;
                    }
                    if Instant::now() > deadline {
                        return Err("no page target".into());
                    }
                    std::thread::sleep(Duration::from_millis(100));
                };
                let attached = browser.call_browser(
                    "Target.attachToTarget",
                    json!({"targetId": target, "flatten": true}),
                )?;
                browser.session = attached["sessionId"].as_str().unwrap_or("").to_string();
                for domain in ["Page", "Runtime", "Log", "Network"] {
                    browser.call(&format!("{domain}.enable"), json!({}))?;
                }
                Ok(browser)
            }

            fn send(&mut self, method: &str, params: Value, session: bool) -> Result<u64, String> {
                self.next_id += 1;
                let mut msg = json!({"id": self.next_id, "method": method, "params": params});
                if session {
                    msg["sessionId"] = json!(self.session);
                }
                let mut bytes = serde_json::to_vec(&msg).unwrap();
                bytes.push(0);
                self.to
                    .write_all(&bytes)
                    .map_err(|e| format!("{method}: {e}"))?;
                Ok(self.next_id)
            }

            /// Waits for the reply to `id` (or for `event`, when `id` is 0), noting every event
            /// that says something about errors or requests on the way.
            fn wait(&mut self, id: u64, event: &str) -> Result<Value, String> {
                let deadline = Instant::now() + TIMEOUT;
                loop {
                    let left = deadline.saturating_duration_since(Instant::now());
                    let msg = self
                        .from
                        .recv_timeout(left)
                        .map_err(|_| format!("no answer to {event} within {TIMEOUT:?}"))?;
                    if id != 0 && msg["id"] == id {
                        if let Some(e) = msg.get("error") {
                            return Err(format!("{event}: {e}"));
                        }
                        return Ok(msg["result"].clone());
                    }
                    self.note(&msg);
                    if id == 0 && msg["method"] == event {
                        return Ok(msg["params"].clone());
                    }
                }
            }

            fn note(&mut self, msg: &Value) {
                let p = &msg["params"];
                match msg["method"].as_str().unwrap_or("") {
                    "Runtime.consoleAPICalled"
                        if matches!(p["type"].as_str(), Some("error" | "assert")) =>
                    {
                        self.log
                            .errors
                            .push(format!("console.{}: {}", p["type"], p["args"]));
                    }
                    "Runtime.exceptionThrown" => {
                        self.log
                            .errors
                            .push(format!("exception: {}", p["exceptionDetails"]));
                    }
                    "Log.entryAdded" if p["entry"]["level"] == "error" => {
                        self.log.errors.push(format!("log: {}", p["entry"]));
                    }
                    "Network.loadingFailed" => {
                        self.log.errors.push(format!("loading failed: {p}"));
                    }
                    "Network.requestWillBeSent" => {
                        let url = p["request"]["url"].as_str().unwrap_or("").to_string();
                        if url != self.log.page_url && !url.starts_with("data:") {
                            self.log.requests.push(url);
                        }
                    }
                    _ => {}
                }
            }

            fn call_browser(&mut self, method: &str, params: Value) -> Result<Value, String> {
                let id = self.send(method, params, false)?;
                self.wait(id, method)
            }

            pub fn call(&mut self, method: &str, params: Value) -> Result<Value, String> {
                let id = self.send(method, params, true)?;
                self.wait(id, method)
            }

            /// Navigates to `file` and waits for its load event.
            pub fn open(&mut self, file: &Path) -> Result<(), String> {
                self.log.page_url = format!("file://{}", file.display());
                self.call(
                    "Emulation.setDeviceMetricsOverride",
                    json!({"width": 1400, "height": 1000, "deviceScaleFactor": 1, "mobile": false}),
                )?;
                let url = self.log.page_url.clone();
                let result = self.call("Page.navigate", json!({"url": url}))?;
                if let Some(e) = result.get("errorText") {
                    return Err(format!("navigating: {e}"));
                }
                self.wait(0, "Page.loadEventFired")?;
                Ok(())
            }

            /// The value of a JavaScript expression (awaited when it is a promise).
            pub fn eval(&mut self, expression: &str) -> Result<Value, String> {
                let r = self.call(
                    "Runtime.evaluate",
                    json!({"expression": expression, "awaitPromise": true, "returnByValue": true}),
                )?;
                if let Some(e) = r.get("exceptionDetails") {
                    return Err(format!("evaluating: {e}"));
                }
                Ok(r["result"]["value"].clone())
            }

            /// A PNG of the top `width × height` pixels of the page.
            pub fn screenshot(&mut self, width: u32, height: u32) -> Result<Vec<u8>, String> {
                let r = self.call(
                    "Page.captureScreenshot",
                    json!({"format": "png", "captureBeyondViewport": true,
                           "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}}),
                )?;
                base64::engine::general_purpose::STANDARD
                    .decode(r["data"].as_str().unwrap_or(""))
                    .map_err(|e| e.to_string())
            }

            /// Closes the browser (waiting for it) and hands back what the page logged. Drains
            /// the events still queued first.
            pub fn close(mut self) -> Log {
                while let Ok(msg) = self.from.recv_timeout(Duration::from_millis(300)) {
                    self.note(&msg);
                }
                let _ = self.send("Browser.close", json!({}), false);
                let deadline = Instant::now() + Duration::from_secs(20);
                while Instant::now() < deadline {
                    if let Ok(Some(_)) = self.child.try_wait() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                if let Ok(None) = self.child.try_wait() {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                }
                std::mem::take(&mut self.log)
            }
        }
    }
}
