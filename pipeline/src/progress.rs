//! Progress of long commands (`build`, `merge`, `inspect --verify`): an indicatif bar on a
//! terminal (drawn with the others of llava_formats::progress, so log lines never land on it),
//! else a hidden bar that logs a line (counts, rate, ETA) at a fixed interval and when it ends.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

/// Without a terminal, a progress line (through `tracing`) every this many milliseconds; 0: none.
static LOG_EVERY_MS: AtomicU64 = AtomicU64::new(0);

/// Makes the bars of a command without a terminal (`progress: false`) log a line every `every`
/// (counts, rate, ETA) and one when done; `None` (the default, as in tests) keeps them silent.
pub fn set_progress_log_interval(every: Option<Duration>) {
    let ms = every.map_or(0, |d| (d.as_millis() as u64).max(1));
    LOG_EVERY_MS.store(ms, Ordering::Relaxed);
}

/// A progress bar drawn on a terminal (`enabled`), else a hidden one that logs progress lines
/// when `set_progress_log_interval` asked for them.
pub fn progress_bar(enabled: bool, len: u64, what: &str) -> ProgressBar {
    if !enabled {
        let bar = ProgressBar::hidden();
        bar.set_length(len);
        bar.set_prefix(what.to_string());
        let ms = LOG_EVERY_MS.load(Ordering::Relaxed);
        if ms > 0 {
            spawn_progress_logger(&bar, Duration::from_millis(ms));
        }
        return bar;
    }
    let bar = llava_formats::progress::terminal_bar(len);
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix} [{bar:30}] {pos}/{len} ({per_sec}, ETA {eta}) {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_prefix(what.to_string());
    bar
}

/// One progress line: `what: pos/len (pct%), rate/s, elapsed, ETA`.
fn log_progress(bar: &ProgressBar) {
    let (pos, len) = (bar.position(), bar.length().unwrap_or(0));
    let pct = if len > 0 {
        100.0 * pos as f64 / len as f64
    } else {
        100.0
    };
    tracing::info!(
        "{}: {pos}/{len} ({pct:.1}%), {:.1}/s, elapsed {}s, ETA {}s {}",
        bar.prefix(),
        bar.per_sec(),
        bar.elapsed().as_secs(),
        bar.eta().as_secs(),
        bar.message()
    );
}

/// Logs `bar`'s progress every `every` until it is finished or dropped.
fn spawn_progress_logger(bar: &ProgressBar, every: Duration) {
    let weak = bar.downgrade();
    std::thread::spawn(move || loop {
        let mut waited = Duration::ZERO;
        while waited < every {
            let slice = (every - waited).min(Duration::from_millis(50));
            std::thread::sleep(slice);
            waited += slice;
            match weak.upgrade() {
                Some(b) if !b.is_finished() => {}
                _ => return,
            }
        }
        match weak.upgrade() {
            Some(b) if !b.is_finished() => log_progress(&b),
            _ => return,
        }
    });
}

/// Ends a bar from `progress_bar`: clears it on a terminal; without one, logs its last line.
pub fn finish_progress(bar: &ProgressBar) {
    if bar.is_hidden() && LOG_EVERY_MS.load(Ordering::Relaxed) > 0 {
        log_progress(bar);
    }
    bar.finish_and_clear();
}
