//! What the test suites of every crate share: where the repository, its fixtures and the
//! tokenizer are, scratch folders that clean up after a passing test, and the `--help` checker
//! that both binaries' CLI tests run. Std only, so that it costs nothing to build.

pub mod help;

use std::path::{Path, PathBuf};

/// The repository root (this crate lives in `test-support/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("test-support/ has a parent")
        .to_path_buf()
}

pub fn fixtures() -> PathBuf {
    repo_root().join("fixtures")
}

/// The patched Llama-3-Instruct tokenizer that `scripts/fetch-tokenizer.sh` writes (or
/// `LLAVA_TOKENIZER`). Missing is a failure, not a skip: the goldens are meaningless without it.
pub fn tokenizer_path() -> PathBuf {
    let path = std::env::var_os("LLAVA_TOKENIZER")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".cache/tokenizer/tokenizer.json"));
    assert!(
        path.exists(),
        "{} is missing: run scripts/fetch-tokenizer.sh (the README's test command does)",
        path.display()
    );
    path
}

/// A fresh, empty folder `target/e2e-scratch/NAME-PID` (kept after a failure for a look; pair
/// it with [`RemoveOnSuccess`] when the test leaves large files).
pub fn scratch(name: &str) -> PathBuf {
    let dir = repo_root()
        .join("target/e2e-scratch")
        .join(format!("{name}-{}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// Removes a folder when the test ends without panicking (a failed test keeps it for a look):
/// training tests leave hundreds of MB of checkpoints otherwise.
pub struct RemoveOnSuccess(pub PathBuf);

impl Drop for RemoveOnSuccess {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// [`scratch`] with its [`RemoveOnSuccess`] guard.
pub fn scratch_removed_on_success(name: &str) -> (PathBuf, RemoveOnSuccess) {
    let dir = scratch(name);
    (dir.clone(), RemoveOnSuccess(dir))
}

/// A config error on stderr names `CONFIG` at `at` (`:line:column: `) and `key`, and says `says`
/// exactly once (the error is never printed twice).
pub fn assert_located_once(
    case: &str,
    stderr: &str,
    config: &Path,
    at: &str,
    key: &str,
    says: &str,
) {
    let located = format!("{}{at}{key}: ", config.display());
    assert!(
        stderr.contains(&located),
        "{case}: no `{located}` in:\n{stderr}"
    );
    assert!(stderr.contains(says), "{case}: no `{says}` in:\n{stderr}");
    assert_eq!(
        stderr.matches(says).count(),
        1,
        "{case}: printed twice:\n{stderr}"
    );
}

/// The Python with torch that the tests hand real torch work to (HF transformers loading our
/// checkpoints, torch's `DataLoader`, `torchrun`): `LLAVA_PYTHON`, else the test venv that
/// `scripts/setup.sh` makes (`.venv`, with torch unless `LLAVA_NO_TORCH=1`). `None` only when the
/// user opted out with `LLAVA_NO_TORCH=1`; a missing venv is a setup error, not a skip.
pub fn torch_python() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("LLAVA_PYTHON") {
        return Some(PathBuf::from(p));
    }
    if std::env::var("LLAVA_NO_TORCH").as_deref() == Ok("1") {
        eprintln!("skipped: LLAVA_NO_TORCH=1 (no torch in the test venv)");
        return None;
    }
    let venv = repo_root().join(".venv/bin/python");
    assert!(
        venv.exists(),
        "{} is missing: run ./scripts/setup.sh (or set LLAVA_PYTHON, or LLAVA_NO_TORCH=1 to skip)",
        venv.display()
    );
    Some(venv)
}
