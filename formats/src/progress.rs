//! Progress bars and log lines that never share a line, for both binaries: every terminal bar
//! lives in one [`MultiProgress`] ([`bars`]), and the tracing writer ([`LogWriter`]) writes each
//! log line with the bars suspended (cleared, the line printed, the bars redrawn under it).

use std::io::Write;
use std::sync::OnceLock;

use indicatif::{MultiProgress, ProgressBar};

/// The process's bars (drawn on stderr). Add every terminal bar here: `bars().add(bar)`.
pub fn bars() -> &'static MultiProgress {
    static BARS: OnceLock<MultiProgress> = OnceLock::new();
    BARS.get_or_init(MultiProgress::new)
}

/// A new terminal bar of `len` steps, drawn with the others.
pub fn terminal_bar(len: u64) -> ProgressBar {
    bars().add(ProgressBar::new(len))
}

/// stderr for log lines: each write happens with the bars cleared, so a line never lands on a
/// bar. Use as `tracing_subscriber::fmt().with_writer(LogWriter::default)`.
#[derive(Debug, Default, Clone, Copy)]
pub struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        bars().suspend(|| std::io::stderr().write_all(buf))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}
