//! What both binaries do around their commands (feature `cli`): the logging setup and the exit
//! code with each cause of an error printed once.

use std::process::ExitCode;

/// `tracing` to stderr at `info` (`RUST_LOG` overrides), each line written with the progress
/// bars cleared first (never on a bar's line, see [`crate::progress`]), colours only on a
/// terminal and never with `NO_COLOR` (https://no-color.org).
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(crate::progress::LogWriter::default)
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
        )
        .init();
}

/// Success, or the error on stderr (each cause once: wrappers that already print their source
/// are not repeated) and exit status 1.
pub fn exit_code<E>(result: Result<(), E>) -> ExitCode
where
    E: AsRef<dyn std::error::Error + Send + Sync + 'static>,
{
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{}", crate::located::error_report(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}
