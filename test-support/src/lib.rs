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
