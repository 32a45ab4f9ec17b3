//! The `llava-data` binary as a user runs it (issue 16): every flag of every subcommand has a
//! description and every subcommand an example; `build` killed with SIGTERM (what Slurm and
//! Kubernetes send a preempted job) once its first shard is written leaves only complete shards,
//! and the rerun finishes the build byte-identical to an uninterrupted one; `merge` and
//! `inspect --verify` log progress lines without a terminal; datasets.toml errors name the file,
//! line and key, once.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_llava-data");

use llava_test_support::scratch;

/// The bundled example's five sources, three times over (126 samples), in ~1 MB shards: many
/// shards, so that a build killed after its first one has work left.
fn mixture(dir: &Path) -> PathBuf {
    let f = common::fixtures();
    let mut text = format!(
        "output = \"out\"\ntokenizer = \"{}\"\nseed = 5\nbatch_size = 2\ngroup_size = 2\n\
         shard_target_mb = 1\n",
        common::tokenizer_path().display()
    );
    for copy in 0..3 {
        for (name, json, images) in [
            (
                "blip",
                "blip_laion_cc_sbu_558k.json",
                "llava/llava_pretrain/images",
            ),
            ("instruct", "llava_instruct_150k.json", "coco/train2017"),
            ("mix665k", "llava_v1_5_mix665k.json", ""),
            ("sharegpt4v", "sharegpt4v.json", ""),
        ] {
            text.push_str(&format!(
                "\n[[sources]]\nname = \"{name}_{copy}\"\njson = \"{f}/data/{json}\"\n\
                 image_folder = \"{f}/images/{images}\"\ntemplate = \"llava_llama_3\"\n",
                f = f.display()
            ));
        }
        text.push_str(&format!(
            "\n[[sources]]\nname = \"text_{copy}\"\njson = \"{}/data/sharegpt_text.json\"\n\
             template = \"llava_llama_3\"\n",
            f.display()
        ));
    }
    let path = dir.join("datasets.toml");
    std::fs::write(&path, text).expect("datasets.toml");
    path
}

/// `llava-data build CONFIG`, stderr to `log`, stdout to `log` + `.stdout`: no terminal.
fn build_cmd(config: &Path, log: &Path) -> Command {
    let mut c = Command::new(BIN);
    c.arg("build")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(log.with_extension("stdout")).expect("stdout file"))
        .stderr(std::fs::File::create(log).expect("log file"));
    c
}

/// Shards under their final names, sorted.
fn final_shards(out: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(out.join("shards"))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "parquet"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// (name, bytes) of the manifest, the rejects and every shard.
fn output_files(out: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = ["manifest.json", "rejects.jsonl"]
        .iter()
        .map(|n| (n.to_string(), std::fs::read(out.join(n)).expect(n)))
        .collect();
    for p in final_shards(out) {
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        files.push((format!("shards/{name}"), std::fs::read(&p).unwrap()));
    }
    files
}

#[test]
fn a_build_killed_by_sigterm_leaves_complete_shards_and_resumes_identical() {
    let dir = scratch("build-sigterm");

    let config = mixture(&dir);
    let out = dir.join("out");

    // The uninterrupted build (then removed: the killed one runs from scratch in its place, so
    // that every path in the outputs is the same).
    let status = build_cmd(&config, &dir.join("reference.log"))
        .args(["--progress-every", "0.05"])
        .status()
        .expect("llava-data build starts");
    assert!(status.success(), "reference build failed");
    // Without a terminal: progress lines (at least each pass's last one) and no escape codes.
    let log = std::fs::read_to_string(dir.join("reference.log")).unwrap();
    let stdout = std::fs::read_to_string(dir.join("reference.stdout")).unwrap();
    for pass in ["pass 1/2: tokenize + sizes: ", "pass 2/2: pixels + write: "] {
        let last = log
            .lines()
            .filter_map(|l| l.split_once(pass).map(|(_, rest)| rest))
            .next_back()
            .unwrap_or_else(|| panic!("no \"{pass}\" progress line:\n{log}"));
        let (pos, len) = last
            .split_once(' ')
            .and_then(|(counts, _)| counts.split_once('/'))
            .unwrap_or_else(|| panic!("progress line: {last}"));
        assert_eq!(
            pos, len,
            "the last progress line of a pass is complete: {last}"
        );
        assert!(last.contains("/s") && last.contains("ETA"), "{last}");
    }
    assert!(
        !log.contains('\x1b') && !stdout.contains('\x1b'),
        "escape codes without a terminal:\n{log}\n{stdout}"
    );
    assert!(stdout.contains("samples ("), "the summary: {stdout}");
    let reference = output_files(&out);
    let shard_count = reference.len() - 2;
    assert!(
        shard_count >= 4,
        "the test needs several shards, got {shard_count}"
    );
    std::fs::remove_dir_all(&out).unwrap();

    // The same build, SIGTERM as soon as its first shard is under its final name.
    let mut child = build_cmd(&config, &dir.join("killed.log"))
        .spawn()
        .expect("llava-data build starts");
    loop {
        if !final_shards(&out).is_empty() {
            break;
        }
        if let Some(status) = child.try_wait().expect("try_wait") {
            panic!("the build ended ({status}) before writing a shard");
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // The shell's builtin `kill` (no procps needed).
    let ok = Command::new("sh")
        .args(["-c", &format!("kill -TERM {}", child.id())])
        .status()
        .expect("sh runs")
        .success();
    assert!(ok, "kill -TERM failed");
    let status = child.wait().expect("wait");
    assert!(
        !status.success(),
        "the build finished before SIGTERM arrived"
    );
    {
        use std::os::unix::process::ExitStatusExt;
        assert!(
            status.signal() == Some(15) || status.code() == Some(143),
            "SIGTERM: {status}"
        );
    }
    assert!(
        !out.join("manifest.json").exists(),
        "a killed build wrote its manifest"
    );
    // What is under a final name is a complete shard, byte-identical to the reference's.
    let left = final_shards(&out);
    assert!(
        !left.is_empty() && left.len() < shard_count,
        "{} of {shard_count} shards",
        left.len()
    );
    for p in &left {
        let name = format!("shards/{}", p.file_name().unwrap().to_string_lossy());
        let want = reference
            .iter()
            .find(|(n, _)| *n == name)
            .unwrap_or_else(|| panic!("{name} is not in the reference build"));
        assert!(
            std::fs::read(p).unwrap() == want.1,
            "{name} differs from the reference"
        );
    }

    // The rerun keeps them and ends byte-identical to the uninterrupted build.
    let status = build_cmd(&config, &dir.join("resume.log"))
        .status()
        .expect("llava-data build starts");
    assert!(status.success(), "resumed build failed");
    let resumed = output_files(&out);
    let names = |v: &[(String, Vec<u8>)]| v.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(names(&resumed), names(&reference));
    for ((name, a), (_, b)) in resumed.iter().zip(&reference) {
        assert!(a == b, "{name} differs after the resume");
    }
    let log = std::fs::read_to_string(dir.join("resume.log")).unwrap_or_default();
    assert!(
        log.contains(&format!("{} already finished", left.len())),
        "the rerun did not keep the finished shards: {log}"
    );
}

/// Descriptions, examples, and README sections that exist (the checker is shared with
/// llava-trainer's CLI test).
#[test]
fn every_flag_of_every_subcommand_has_a_description_and_each_an_example() {
    let readme = common::repo_root().join("README.md");
    llava_test_support::help::assert_complete("llava-data", BIN, &readme, 5, "build");
}

/// `llava-data ARGS` without a terminal: (success, stdout, stderr).
fn run_data(args: &[&std::ffi::OsStr]) -> (bool, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("llava-data starts");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn datasets_toml_errors_name_the_file_line_and_key_once() {
    let dir = scratch("config-errors");
    let head = format!(
        "output = \"out\"\ntokenizer = \"{}\"\n",
        common::tokenizer_path().display()
    );
    let source = "[[sources]]\nname = \"a\"\njson = \"a.json\"\ntemplate = \"plain\"\n";
    // (name, the file, its location, the key, what the message says)
    let cases = [
        (
            "unknown",
            format!("{head}{source}smapling = \"first:3\"\n"),
            ":7:1: ",
            "sources[0].smapling",
            "unknown key `smapling`: did you mean `sampling`?",
        ),
        (
            "type",
            format!("{head}batch_size = \"four\"\n{source}"),
            ":3:14: ",
            "batch_size",
            "invalid type: string \"four\"",
        ),
        (
            "value",
            format!("{head}{source}image_aspect_ratio = \"wide\"\n"),
            ":7:1: ",
            "sources[0].image_aspect_ratio",
            "\"wide\" is not allowed: use one of",
        ),
        (
            "sampling",
            format!("{head}{source}sampling = \"some:3\"\n"),
            ":7:12: ",
            "sources[0].sampling",
            "\"some:3\": expected",
        ),
    ];
    for (name, text, at, key, says) in cases {
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(&config, text).unwrap();
        let (ok, _, err) = run_data(&["build".as_ref(), config.as_os_str()]);
        assert!(!ok, "{name}: the build ran");
        llava_test_support::assert_located_once(name, &err, &config, at, key, says);
    }
}

#[test]
fn merge_and_verify_log_progress_lines_without_a_terminal() {
    let dir = scratch("merge-progress");
    let f = common::fixtures();
    let config = dir.join("datasets.toml");
    std::fs::write(
        &config,
        format!(
            "output = \"out\"\ntokenizer = \"{tok}\"\nbatch_size = 2\ngroup_size = 2\n\
             shard_target_mb = 1\n\n[[sources]]\nname = \"instruct\"\n\
             json = \"{f}/data/llava_instruct_150k.json\"\n\
             image_folder = \"{f}/images/coco/train2017\"\ntemplate = \"llava_llama_3\"\n\n\
             [[sources]]\nname = \"text\"\njson = \"{f}/data/sharegpt_text.json\"\n\
             template = \"llava_llama_3\"\n",
            tok = common::tokenizer_path().display(),
            f = f.display()
        ),
    )
    .unwrap();
    let out = dir.join("out");
    for part in ["0/2", "1/2"] {
        let (ok, _, err) = run_data(&[
            "build".as_ref(),
            config.as_os_str(),
            "--partition".as_ref(),
            part.as_ref(),
        ]);
        assert!(ok, "build --partition {part}: {err}");
    }
    // Each command's last progress line is complete (pos = len) and has a rate and an ETA.
    let last_progress = |log: &str, what: &str| {
        let last = log
            .lines()
            .filter_map(|l| l.split_once(what).map(|(_, rest)| rest.to_string()))
            .next_back()
            .unwrap_or_else(|| panic!("no \"{what}\" progress line:\n{log}"));
        let (pos, len) = last
            .split_once(' ')
            .and_then(|(counts, _)| counts.split_once('/'))
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .unwrap_or_else(|| panic!("progress line: {last}"));
        assert_eq!(pos, len, "{last}");
        assert!(
            pos != "0" && last.contains("/s") && last.contains("ETA"),
            "{last}"
        );
    };
    let every = ["--progress-every".as_ref(), "0.001".as_ref()];
    let (ok, stdout, err) = run_data(&[&["merge".as_ref(), out.as_os_str()][..], &every].concat());
    assert!(ok, "merge: {err}");
    last_progress(&err, "merge: shard records: ");
    assert!(stdout.contains("samples ("), "{stdout}");
    assert!(!err.contains('\x1b') && !stdout.contains('\x1b'), "{err}");

    let (ok, stdout, err) = run_data(
        &[
            &["inspect".as_ref(), out.as_os_str(), "--verify".as_ref()][..],
            &every,
        ]
        .concat(),
    );
    assert!(ok, "inspect --verify: {stdout}{err}");
    last_progress(&err, "verify: rows: ");
    assert!(stdout.contains("OK: "), "{stdout}");
    assert!(!err.contains('\x1b') && !stdout.contains('\x1b'), "{err}");
}
