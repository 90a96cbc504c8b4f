//! Passive health (outlier ejection): consecutive connect failures or 5xx answers eject an
//! endpoint for a growing backoff. Pure atomics and a monotonic clock; no I/O, no config types.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How passive health ejects and readmits endpoints.
///
/// The defaults follow Envoy's outlier detection (5 consecutive failures), with a shorter
/// backoff because Tollgate never ejects the last healthy endpoint and readmits on probation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthPolicy {
    /// Consecutive failures that eject an endpoint. Default 5: one or two failures are routine
    /// (a pod restarting a connection, one bad request answered 500), five in a row with no
    /// success in between is an endpoint that is down, and under load it takes milliseconds to
    /// see five, so a killed pod is avoided well within R3's one second.
    pub failure_threshold: u32,
    /// The first ejection's length. Default 1 s: long enough to stop a burst of failing
    /// requests, short enough that a pod that only hiccuped is back almost at once.
    pub base_ejection: Duration,
    /// The cap of the doubling backoff (1 s, 2 s, 4 s, ... ). Default 30 s: a dead endpoint
    /// costs one probing request every 30 s at most, and a recovered one waits at most 30 s.
    pub max_ejection: Duration,
}

impl Default for HealthPolicy {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            base_ejection: Duration::from_secs(1),
            max_ejection: Duration::from_secs(30),
        }
    }
}

impl HealthPolicy {
    /// The ejection length after `previous` back-to-back ejections: base × 2^previous, capped.
    pub fn ejection_for(&self, previous: u32) -> Duration {
        let factor = 1u32.checked_shl(previous.min(31)).unwrap_or(u32::MAX);
        self.base_ejection
            .checked_mul(factor)
            .unwrap_or(self.max_ejection)
            .min(self.max_ejection)
    }

    /// A threshold of zero would eject on nothing; treat it as one.
    fn threshold(&self) -> u32 {
        self.failure_threshold.max(1)
    }
}

/// What went wrong with a request to an endpoint, for passive health and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureKind {
    /// The TCP (or TLS) connection could not be established.
    Connect,
    /// The endpoint answered with a 5xx status.
    ServerError,
    /// The endpoint accepted the request but sent no response headers in time.
    Timeout,
}

impl FailureKind {
    /// A bounded label for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connect => "connect_failure",
            Self::ServerError => "server_error",
            Self::Timeout => "timeout",
        }
    }
}

/// Process-wide origin of the millisecond clock stored in atomics.
static EPOCH: OnceLock<Instant> = OnceLock::new();

fn epoch() -> Instant {
    *EPOCH.get_or_init(Instant::now)
}

/// Milliseconds since the process epoch, plus one so that 0 can mean "never".
pub(crate) fn tick(at: Instant) -> u64 {
    let ms = at.saturating_duration_since(epoch()).as_millis();
    u64::try_from(ms).unwrap_or(u64::MAX - 1).saturating_add(1)
}

/// Reads the clock at most once, and only if someone asks: the pick path needs the time only
/// when some endpoint carries an ejection deadline.
pub(crate) struct LazyNow {
    fixed: Option<Instant>,
    cached: std::cell::Cell<u64>,
}

impl LazyNow {
    pub(crate) fn new(fixed: Option<Instant>) -> Self {
        Self {
            fixed,
            cached: std::cell::Cell::new(0),
        }
    }

    pub(crate) fn get(&self) -> u64 {
        let cached = self.cached.get();
        if cached != 0 {
            return cached;
        }
        let now = tick(self.fixed.unwrap_or_else(Instant::now));
        self.cached.set(now);
        now
    }
}

/// The passive-health counters of one endpoint address. Lives in [`EndpointState`], so it
/// survives endpoint-set and config swaps.
///
/// [`EndpointState`]: crate::balance::EndpointState
#[derive(Debug, Default)]
pub struct PassiveHealth {
    consecutive_failures: AtomicU32,
    /// Tick until which the endpoint is ejected; 0 = not ejected (the fast path reads only this).
    ejected_until: AtomicU64,
    /// Back-to-back ejections since the last success: the backoff exponent.
    ejections: AtomicU32,
    /// Ejections over the endpoint's life, for debugging and tests.
    total_ejections: AtomicU64,
}

impl PassiveHealth {
    /// Whether the endpoint is ejected at `now` (a [`tick`]). Clears an expired deadline so
    /// later picks are back on the clock-free fast path.
    pub(crate) fn is_ejected(&self, now: &LazyNow) -> bool {
        let until = self.ejected_until.load(Ordering::Relaxed);
        if until == 0 {
            return false;
        }
        if now.get() < until {
            return true;
        }
        // Expired: readmit. A lost race only means another picker cleared it first.
        let _ = self
            .ejected_until
            .compare_exchange(until, 0, Ordering::Relaxed, Ordering::Relaxed);
        false
    }

    /// Whether the endpoint is ejected at `at`.
    pub fn is_ejected_at(&self, at: Instant) -> bool {
        let until = self.ejected_until.load(Ordering::Relaxed);
        until != 0 && tick(at) < until
    }

    /// How long the current ejection still lasts at `at` (zero when not ejected).
    pub fn ejected_for(&self, at: Instant) -> Duration {
        let until = self.ejected_until.load(Ordering::Relaxed);
        Duration::from_millis(until.saturating_sub(tick(at)))
    }

    /// Consecutive failures since the last success.
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures.load(Ordering::Relaxed)
    }

    /// Ejections over the endpoint's life.
    pub fn total_ejections(&self) -> u64 {
        self.total_ejections.load(Ordering::Relaxed)
    }

    /// A success: the failure streak and the backoff start over. A current ejection still runs
    /// its course (the success may come from a request that started long before it).
    pub(crate) fn record_success(&self) {
        // Load before store: on a healthy endpoint this stays a read, so concurrent requests
        // do not bounce the cache line between cores.
        if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
            self.consecutive_failures.store(0, Ordering::Relaxed);
        }
        if self.ejections.load(Ordering::Relaxed) != 0 {
            self.ejections.store(0, Ordering::Relaxed);
        }
    }

    /// A failure. Returns the ejection length when this failure ejected the endpoint.
    /// `may_eject` is asked only when the threshold is reached; it says whether some other
    /// endpoint could take the traffic (the last healthy endpoint is never ejected).
    pub(crate) fn record_failure(
        &self,
        policy: &HealthPolicy,
        now: &LazyNow,
        may_eject: impl FnOnce() -> bool,
    ) -> Option<Duration> {
        let threshold = policy.threshold();
        let failures = self
            .consecutive_failures
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        if failures < threshold {
            return None;
        }
        let current = self.ejected_until.load(Ordering::Relaxed);
        let now_tick = now.get();
        if current != 0 && now_tick < current {
            // Already ejected: late failures of requests sent before the ejection.
            return None;
        }
        if !may_eject() {
            return None;
        }
        let previous = self.ejections.load(Ordering::Relaxed);
        let length = policy.ejection_for(previous);
        let until = now_tick
            .saturating_add(u64::try_from(length.as_millis()).unwrap_or(u64::MAX))
            .max(1);
        if self
            .ejected_until
            .compare_exchange(current, until, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            // Another failure ejected it at the same moment.
            return None;
        }
        self.ejections.fetch_add(1, Ordering::Relaxed);
        self.total_ejections.fetch_add(1, Ordering::Relaxed);
        // Probation: when the ejection ends, one more failure ejects again (for twice as long),
        // while one success clears everything.
        self.consecutive_failures
            .store(threshold - 1, Ordering::Relaxed);
        Some(length)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let p = HealthPolicy::default();
        let secs: Vec<u64> = (0..8).map(|n| p.ejection_for(n).as_secs()).collect();
        assert_eq!(secs, vec![1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(p.ejection_for(u32::MAX), Duration::from_secs(30));
    }

    #[test]
    fn ejects_at_threshold_then_probation() {
        let p = HealthPolicy::default();
        let h = PassiveHealth::default();
        let t0 = Instant::now();
        let now = LazyNow::new(Some(t0));
        for _ in 0..4 {
            assert_eq!(h.record_failure(&p, &now, || true), None);
        }
        assert_eq!(
            h.record_failure(&p, &now, || true),
            Some(Duration::from_secs(1))
        );
        assert!(h.is_ejected(&now));
        // After the ejection one failure is enough, and the backoff doubled.
        let later = LazyNow::new(Some(t0 + Duration::from_millis(1100)));
        assert!(!h.is_ejected(&later));
        assert_eq!(
            h.record_failure(&p, &later, || true),
            Some(Duration::from_secs(2))
        );
        // A success resets the streak and the backoff.
        h.record_success();
        assert_eq!(h.consecutive_failures(), 0);
        let much_later = LazyNow::new(Some(t0 + Duration::from_secs(10)));
        for _ in 0..4 {
            assert_eq!(h.record_failure(&p, &much_later, || true), None);
        }
        assert_eq!(
            h.record_failure(&p, &much_later, || true),
            Some(Duration::from_secs(1))
        );
        assert_eq!(h.total_ejections(), 3);
    }

    #[test]
    fn refuses_ejection_when_told_so() {
        let p = HealthPolicy::default();
        let h = PassiveHealth::default();
        let now = LazyNow::new(Some(Instant::now()));
        for _ in 0..20 {
            assert_eq!(h.record_failure(&p, &now, || false), None);
        }
        assert!(!h.is_ejected(&now));
    }
}
