//! Log set-up: tracing with text or JSON lines; `RUST_LOG` filters (default `info`).
//! Access lines use the `tollgate::access` target; nothing here ever sees a plain key.
//!
//! Lines are formatted on the thread that logs and written to stdout by a dedicated thread
//! (tracing-appender's non-blocking writer), in batches: a request never waits on a `write(2)`
//! to a slow pipe or disk, and a busy gateway makes one syscall per batch, not per line.

use std::io::IsTerminal;

use tracing_subscriber::{fmt, EnvFilter};

/// Output format of the logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Flushes the log lines still queued when dropped: keep it alive until the process ends.
#[must_use = "dropping the guard stops the log writer"]
pub struct LogGuard {
    _worker: Option<tracing_appender::non_blocking::WorkerGuard>,
}

impl std::fmt::Debug for LogGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogGuard").finish_non_exhaustive()
    }
}

/// Installs the global subscriber; a second call is a no-op.
pub fn init(format: LogFormat) -> LogGuard {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Not lossy: when 128k lines are queued the logging thread waits rather than drop access
    // lines. 64 KiB batches: one write(2) carries a few hundred access lines under load.
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .thread_name("tollgate-log")
        .finish(std::io::BufWriter::with_capacity(
            64 * 1024,
            std::io::stdout(),
        ));
    // Colour codes only for a terminal: in a file or a log collector's pipe they are noise, and
    // rendering them was more than half of the cost of an access line.
    let ansi = std::io::stdout().is_terminal();
    let builder = fmt()
        .with_env_filter(filter)
        .with_target(true)
        .with_ansi(ansi)
        .with_writer(writer);
    let installed = match format {
        // Access lines by our own formatter (the same text, a third of the cost).
        LogFormat::Text => builder
            .event_format(super::access_format::AccessFormat::new(ansi))
            .try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
    };
    LogGuard {
        _worker: installed.is_ok().then_some(guard),
    }
}
