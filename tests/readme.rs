//! The README's numbered path, walked from the README's own code blocks so that it cannot drift
//! (issue 31): every fenced block right after a `<!-- readme-test: cpu -->` line runs, in order,
//! with bash in a scratch folder laid out like the repository (the configs copied, `fixtures/`
//! and the tokenizer linked), with the `llava-data` and `llava-trainer` binaries that cargo built
//! beside this test first on PATH. Then the outputs are checked, the checkpoint's tokenizer
//! included; and where a Python with torch and transformers is found (`LLAVA_PYTHON`, else
//! `.venv`), the `<!-- readme-test: python -->` block runs and `tests/hf_load_check.py` loads the
//! checkpoint with HF transformers.

use std::path::{Path, PathBuf};
use std::process::Command;

use llava_e2e::*;

/// The blocks marked `<!-- readme-test: TAG -->` (the marker on the line before the opening fence).
fn marked_blocks(readme: &str, tag: &str) -> Vec<String> {
    let marker = format!("<!-- readme-test: {tag} -->");
    let lines: Vec<&str> = readme.lines().collect();
    let mut blocks = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if line.trim() != marker {
            continue;
        }
        let fence = lines.get(i + 1).copied().unwrap_or_default();
        assert!(
            fence.starts_with("```"),
            "README line {}: {marker} must be followed by a fenced block",
            i + 1
        );
        let body: Vec<&str> = lines[i + 2..]
            .iter()
            .take_while(|l| !l.starts_with("```"))
            .copied()
            .collect();
        blocks.push(body.join("\n"));
    }
    blocks
}

/// Where cargo put `llava-data` and `llava-trainer`: beside `target/<profile>/deps/`, where this
/// test binary runs from. `cargo test --workspace` builds them (their crates have integration
/// tests); alone, `cargo build -p llava-data -p llava-trainer` first.
fn binaries() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/")
        .to_path_buf();
    for bin in ["llava-data", "llava-trainer"] {
        assert!(
            dir.join(bin).is_file(),
            "{} is missing: `cargo test --workspace` builds it, or run `cargo build -p llava-data \
             -p llava-trainer` before this test",
            dir.join(bin).display()
        );
    }
    dir
}

/// The repository as the README's commands see it: configs copied (their paths are relative to
/// the files, so the outputs land in `dir/out`), fixtures and the tokenizer linked.
fn lay_out(dir: &Path) {
    let root = repo_root();
    for f in ["datasets.toml", "datasets-pretrain.toml"] {
        std::fs::copy(root.join(f), dir.join(f)).expect("copy a datasets file");
    }
    let configs = dir.join("trainer/configs");
    std::fs::create_dir_all(&configs).expect("mkdir trainer/configs");
    for e in std::fs::read_dir(root.join("trainer/configs")).expect("trainer/configs") {
        let p = e.expect("entry").path();
        std::fs::copy(&p, configs.join(p.file_name().expect("name"))).expect("copy a config");
    }
    std::os::unix::fs::symlink(fixtures(), dir.join("fixtures")).expect("link fixtures");
    let tok = dir.join(".cache/tokenizer");
    std::fs::create_dir_all(&tok).expect("mkdir .cache/tokenizer");
    let src = tokenizer_path();
    std::os::unix::fs::symlink(&src, tok.join("tokenizer.json")).expect("link the tokenizer");
    let config = src.with_file_name("tokenizer_config.json");
    if config.is_file() {
        std::os::unix::fs::symlink(config, tok.join("tokenizer_config.json")).expect("link");
    }
}

fn run_block(dir: &Path, bin: &Path, block: &str) -> String {
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", block])
        .current_dir(dir)
        .env("PATH", path)
        .env("NO_COLOR", "1")
        .output()
        .expect("bash starts");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "README block failed ({}):\n{block}\n--- output:\n{text}",
        out.status
    );
    text
}

#[test]
fn the_readme_path_reaches_a_checkpoint_hf_transformers_loads() {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).expect("README.md");
    for step in 1..=8 {
        assert!(
            readme.contains(&format!("\n## {step}. ")),
            "the README's numbered path lost step {step}"
        );
    }
    let cpu = marked_blocks(&readme, "cpu");
    assert!(
        cpu.len() >= 3,
        "the README marks {} blocks `readme-test: cpu`: build, inspect and train at least",
        cpu.len()
    );
    let bin = binaries();
    let (dir, _guard) = scratch_removed_on_success("readme");
    lay_out(&dir);
    let mut log = String::new();
    for block in &cpu {
        log += &run_block(&dir, &bin, block);
    }

    // What the blocks promise.
    for f in [
        "out/example/manifest.json",
        "out/example-pretrain/manifest.json",
        "out/tiny-model/model.safetensors",
        "out/runs/stage1/mm_projector.safetensors",
    ] {
        assert!(
            dir.join(f).is_file(),
            "{f} missing after the README's steps"
        );
    }
    assert!(log.contains("OK: 2 shards, 42 rows verified"), "{log}");
    let ck = dir.join("out/runs/stage2/checkpoint-2");
    for f in [
        "model.safetensors",
        "config.json",
        "preprocessor_config.json",
        "processor_config.json",
        "trainer_state.json",
        // The tiny model's folder has no tokenizer: these come from the shards' manifest.
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.json",
    ] {
        assert!(ck.join(f).is_file(), "{} missing", ck.join(f).display());
    }
    let tok = std::fs::read_to_string(ck.join("tokenizer.json")).expect("tokenizer.json");
    assert!(
        tok.contains("\"<image>\""),
        "no <image> token in the tokenizer"
    );

    let python = marked_blocks(&readme, "python");
    assert_eq!(python.len(), 1, "one `readme-test: python` block");
    // The test venv's torch + transformers (`LLAVA_NO_TORCH=1` opts out, and says so).
    let Some(py) = llava_test_support::torch_python() else {
        return;
    };
    let out = Command::new(&py)
        .args(["-c", &python[0]])
        .current_dir(&dir)
        .output()
        .expect("python starts");
    assert!(
        out.status.success(),
        "the README's Python block failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(&py)
        .arg(repo_root().join("tests/hf_load_check.py"))
        .arg(&ck)
        .output()
        .expect("python starts");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in ["loading info {}", "mismatched 0", "finite True"] {
        assert!(
            text.contains(want),
            "hf_load_check: no `{want}` in:\n{text}"
        );
    }
}
