//! One view of whether the API server is reachable, fed by every caller (watches, the Lease,
//! status writes): an outage is one WARN when it starts and one INFO with its duration when it
//! ends, plus `tollgate_apiserver_reachable` and `tollgate_apiserver_outages_total`, instead of
//! a line per failed request.

use std::sync::Mutex;
use std::time::Instant;

use prometheus::{IntCounter, IntGauge};

/// Whether a failed call means the API server is away (connection refused or cut, timeout,
/// 5xx, 429), as opposed to an answer about the request itself (4xx).
pub fn is_unreachable(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(s) => s.code >= 500 || s.code == 429,
        _ => true,
    }
}

/// Same for a watcher error.
pub fn watch_unreachable(e: &kube::runtime::watcher::Error) -> bool {
    use kube::runtime::watcher::Error as W;
    match e {
        W::InitialListFailed(e) | W::WatchStartFailed(e) | W::WatchFailed(e) => is_unreachable(e),
        W::WatchError(s) => s.code >= 500 || s.code == 429,
        _ => false,
    }
}

/// The outage tracker shared by the Kubernetes source's tasks.
#[derive(Debug)]
pub struct ApiHealth {
    down_since: Mutex<Option<Instant>>,
    reachable: IntGauge,
    outages: IntCounter,
}

impl ApiHealth {
    /// Starts as reachable (the start-up check just talked to it).
    pub fn new(reachable: IntGauge, outages: IntCounter) -> Self {
        reachable.set(1);
        Self {
            down_since: Mutex::new(None),
            reachable,
            outages,
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Option<Instant>) -> T) -> T {
        match self.down_since.lock() {
            Ok(mut g) => f(&mut g),
            Err(p) => f(&mut p.into_inner()),
        }
    }

    /// A call could not reach the API server (`what`: which call, `error`: why).
    pub fn unreachable(&self, what: &str, error: &dyn std::fmt::Display) {
        let started = self.with(|d| d.is_none().then(|| *d = Some(Instant::now())).is_some());
        if started {
            self.reachable.set(0);
            self.outages.inc();
            tracing::warn!(call = what, error = %error,
                "Kubernetes API server unreachable; serving the last known state");
        } else {
            tracing::debug!(call = what, error = %error, "Kubernetes API server still unreachable");
        }
    }

    /// A call got an answer from the API server.
    pub fn reached(&self) {
        if let Some(since) = self.with(Option::take) {
            self.reachable.set(1);
            tracing::info!(
                outage_seconds = since.elapsed().as_secs_f64(),
                "Kubernetes API server reachable again"
            );
        }
    }

    /// True while an outage is on.
    pub fn is_down(&self) -> bool {
        self.with(|d| d.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_outage_is_counted_once_and_ends_once() {
        let g = IntGauge::new("r", "r").unwrap_or_else(|e| panic!("{e}"));
        let c = IntCounter::new("o", "o").unwrap_or_else(|e| panic!("{e}"));
        let h = ApiHealth::new(g.clone(), c.clone());
        h.reached();
        assert_eq!((g.get(), c.get()), (1, 0));
        for _ in 0..5 {
            h.unreachable("watch", &"refused");
        }
        assert!(h.is_down());
        assert_eq!((g.get(), c.get()), (0, 1));
        h.reached();
        h.reached();
        assert_eq!((g.get(), c.get()), (1, 1));
        h.unreachable("lease", &"refused");
        assert_eq!((g.get(), c.get()), (0, 2));
    }
}
