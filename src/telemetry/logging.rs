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

/// kube-client logs every failed request at ERROR (its trace layer) and every watch cut at
/// WARN: during an API server outage that is a line per request. The Kubernetes source reports
/// the outage itself (one WARN, one INFO), so these are off unless `RUST_LOG` names kube.
const KUBE_QUIET: &str = "kube_client=error,kube_client::client::builder=off";

/// `RUST_LOG` (default `info`), with [`KUBE_QUIET`] unless it says something about kube.
fn filter_directives(rust_log: Option<&str>) -> String {
    let base = rust_log
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .unwrap_or("info");
    if base.contains("kube") {
        base.to_string()
    } else {
        format!("{base},{KUBE_QUIET}")
    }
}

/// Installs the global subscriber; a second call is a no-op.
pub fn init(format: LogFormat) -> LogGuard {
    let filter = EnvFilter::new(filter_directives(std::env::var("RUST_LOG").ok().as_deref()));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kube_client_noise_is_off_unless_asked_for() {
        assert_eq!(filter_directives(None), format!("info,{KUBE_QUIET}"));
        assert_eq!(
            filter_directives(Some("debug")),
            format!("debug,{KUBE_QUIET}")
        );
        assert_eq!(
            filter_directives(Some("kube_client=debug")),
            "kube_client=debug"
        );
        for d in [filter_directives(None), filter_directives(Some("warn"))] {
            assert!(EnvFilter::try_new(&d).is_ok(), "{d}");
        }
    }
}
