//! Leader election on a `coordination.k8s.io` Lease: every replica serves traffic, the holder
//! alone writes status. Owns only the Lease; knows nothing of routes or what status says.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tokio::sync::watch;

use super::health::{is_unreachable, ApiHealth};

/// Lease timing, as client-go's leader election: a holder renews every `renew_every`, stops
/// acting as leader when it could not renew for `renew_deadline`, and others take over once the
/// record has not changed for `duration`. `renew_deadline < duration` keeps two writers apart.
#[derive(Clone, Copy, Debug)]
pub struct LeaseTiming {
    pub duration: Duration,
    pub renew_deadline: Duration,
    pub renew_every: Duration,
    /// How often a follower looks at the Lease.
    pub retry_every: Duration,
    /// Longest wait for one API call.
    pub request_timeout: Duration,
}

impl Default for LeaseTiming {
    fn default() -> Self {
        Self {
            duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            renew_every: Duration::from_secs(5),
            retry_every: Duration::from_secs(2),
            request_timeout: Duration::from_secs(5),
        }
    }
}

/// Whether this replica leads, and until when it may believe so without renewing.
#[derive(Debug)]
pub struct LeaderState {
    identity: String,
    valid_until: Mutex<Option<Instant>>,
    /// Set by [`release`]: this replica no longer campaigns (it is shutting down).
    stopped: std::sync::atomic::AtomicBool,
}

impl LeaderState {
    pub fn new(identity: &str) -> Self {
        Self {
            identity: identity.to_string(),
            valid_until: Mutex::new(None),
            stopped: std::sync::atomic::AtomicBool::new(false),
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// True while the last successful renewal is recent enough.
    pub fn is_leader(&self) -> bool {
        let until = match self.valid_until.lock() {
            Ok(g) => *g,
            Err(p) => *p.into_inner(),
        };
        until.is_some_and(|t| Instant::now() < t)
    }

    /// Records a renewal (`Some(deadline)`) or a loss (`None`); returns true on a transition.
    fn set(&self, until: Option<Instant>) -> bool {
        let was = self.is_leader();
        match self.valid_until.lock() {
            Ok(mut g) => *g = until,
            Err(p) => *p.into_inner() = until,
        }
        was != self.is_leader()
    }
}

/// What to do with the Lease as read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// We hold it: renew.
    Renew,
    /// Nobody holds it, or the holder stopped renewing: take it.
    Acquire,
    /// Someone else holds it and renews: stay a follower.
    Follow,
}

/// Pure decision on a Lease record; `expired`: the record has not changed for its duration.
pub fn decide(spec: Option<&LeaseSpec>, me: &str, expired: bool) -> Decision {
    match spec
        .and_then(|s| s.holder_identity.as_deref())
        .filter(|h| !h.is_empty())
    {
        Some(h) if h == me => Decision::Renew,
        Some(_) if !expired => Decision::Follow,
        _ => Decision::Acquire,
    }
}

/// When the Lease record last changed, by our own clock (so clock skew between replicas does
/// not matter: only how long we have seen the same record).
#[derive(Debug, Default)]
struct Observer {
    resource_version: Option<String>,
    since: Option<Instant>,
}

impl Observer {
    fn observe(&mut self, rv: Option<&str>, now: Instant) {
        if self.since.is_none() || self.resource_version.as_deref() != rv {
            self.resource_version = rv.map(str::to_string);
            self.since = Some(now);
        }
    }

    fn expired(&self, now: Instant, duration: Duration) -> bool {
        self.since
            .is_some_and(|t| now.saturating_duration_since(t) > duration)
    }
}

fn micro_now() -> MicroTime {
    MicroTime(Timestamp::now())
}

/// One round: read the Lease, then create, renew, take over or follow. Ok(true): we lead.
async fn try_once(
    api: &Api<Lease>,
    name: &str,
    me: &str,
    timing: &LeaseTiming,
    observer: &mut Observer,
) -> Result<bool, kube::Error> {
    let secs = i32::try_from(timing.duration.as_secs())
        .unwrap_or(15)
        .max(1);
    let Some(mut lease) = api.get_opt(name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(me.to_string()),
                lease_duration_seconds: Some(secs),
                acquire_time: Some(micro_now()),
                renew_time: Some(micro_now()),
                lease_transitions: Some(0),
                ..Default::default()
            }),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(created) => {
                observer.observe(created.metadata.resource_version.as_deref(), Instant::now());
                Ok(true)
            }
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        };
    };
    let now = Instant::now();
    observer.observe(lease.metadata.resource_version.as_deref(), now);
    let duration = lease
        .spec
        .as_ref()
        .and_then(|s| s.lease_duration_seconds)
        .map_or(timing.duration, |s| Duration::from_secs(s.max(1) as u64));
    let decision = decide(lease.spec.as_ref(), me, observer.expired(now, duration));
    if decision == Decision::Follow {
        return Ok(false);
    }
    let spec = lease.spec.get_or_insert_with(Default::default);
    if decision == Decision::Acquire {
        if let Some(old) = spec.holder_identity.as_deref().filter(|h| !h.is_empty()) {
            tracing::info!(previous = old, "lease holder stopped renewing; taking over");
        }
        spec.holder_identity = Some(me.to_string());
        spec.acquire_time = Some(micro_now());
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
    }
    spec.renew_time = Some(micro_now());
    spec.lease_duration_seconds = Some(secs);
    // `replace` sends the resourceVersion we read: if anyone wrote in between, 409 and we follow.
    match api.replace(name, &PostParams::default(), &lease).await {
        Ok(updated) => {
            observer.observe(updated.metadata.resource_version.as_deref(), Instant::now());
            Ok(true)
        }
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Why the API server refused a Lease request, in words that name the fix; `None`: not a
/// refusal (the API server is away or overloaded: retried quietly, reported as an outage).
pub fn refusal(e: &kube::Error, namespace: &str, name: &str) -> Option<String> {
    let kube::Error::Api(s) = e else {
        return None;
    };
    Some(match s.code {
        404 => format!(
            "namespace {namespace} does not exist, so Lease {namespace}/{name} cannot be \
             created; pass --lease-namespace with an existing namespace (or create {namespace})"
        ),
        403 => format!(
            "not allowed to get/create/update Lease {namespace}/{name}: {}; bind the gateway's \
             identity to manifests/rbac/leader-election.yaml in {namespace}, or pass \
             --lease-namespace with a namespace where it may",
            s.message
        ),
        c if c >= 500 || c == 429 => return None,
        c => format!(
            "Lease {namespace}/{name} refused ({c}): {}; check --lease-namespace and \
             --lease-name",
            s.message
        ),
    })
}

/// Where the campaign reports: a gain (status is written at once), `tollgate_leader`, and the
/// API server's reachability.
pub struct Signals {
    pub on_gain: Arc<watch::Sender<u64>>,
    pub gauge: prometheus::IntGauge,
    pub health: Arc<ApiHealth>,
}

/// Campaigns for and renews the Lease for the life of the process. `on_gain` is bumped when
/// this replica becomes leader (so status is written at once).
pub async fn run(
    client: Client,
    namespace: String,
    name: String,
    timing: LeaseTiming,
    state: Arc<LeaderState>,
    signals: Signals,
) {
    let Signals {
        on_gain,
        gauge,
        health,
    } = signals;
    let api: Api<Lease> = Api::namespaced(client, &namespace);
    let mut observer = Observer::default();
    let mut failing = false;
    // The refusal last reported at ERROR: said once, again only when it changes or after a
    // recovery, never on every retry.
    let mut refused: Option<String> = None;
    let mut leading = false;
    loop {
        if state.stopped.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        let started = Instant::now();
        let round = tokio::time::timeout(
            timing.request_timeout,
            try_once(&api, &name, &state.identity, &timing, &mut observer),
        )
        .await;
        if state.stopped.load(std::sync::atomic::Ordering::Acquire) {
            return; // released while this round ran: its outcome no longer matters
        }
        match round {
            Ok(Ok(lead)) => {
                health.reached();
                failing = false;
                if refused.take().is_some() {
                    tracing::info!(lease = %format!("{namespace}/{name}"),
                        "the Lease is usable again: leader election resumed");
                }
                let until = lead.then(|| started + timing.renew_deadline);
                if state.set(until) {
                    if lead {
                        tracing::info!(lease = %format!("{namespace}/{name}"), identity = %state.identity,
                            "became leader: this replica writes status");
                        on_gain.send_modify(|n| *n += 1);
                    } else {
                        tracing::info!(lease = %format!("{namespace}/{name}"), "another replica leads");
                    }
                }
            }
            Ok(Err(e)) => {
                if let Some(reason) = refusal(&e, &namespace, &name) {
                    if refused.as_deref() != Some(reason.as_str()) {
                        tracing::error!(lease = %format!("{namespace}/{name}"), identity = %state.identity,
                            "this replica cannot lead, so no status is written: {reason}");
                        refused = Some(reason);
                    }
                } else if is_unreachable(&e) {
                    health.unreachable("lease", &e);
                } else if !failing {
                    tracing::warn!(lease = %format!("{namespace}/{name}"), error = %e,
                        "lease renewal failed; will retry");
                }
                failing = true;
            }
            Err(_) => {
                health.unreachable("lease", &"timed out");
                failing = true;
            }
        }
        // A leader that cannot renew stops believing it leads once its renew deadline passes
        // (`is_leader` checks the clock), before anyone else may take over.
        let now_leading = state.is_leader();
        gauge.set(i64::from(now_leading));
        if leading && !now_leading && failing {
            if health.is_down() {
                // Part of the outage already reported: not a second warning.
                tracing::info!(
                    "stopped writing status: the lease could not be renewed during \
                    the API server outage"
                );
            } else {
                tracing::warn!("lost leadership: the lease could not be renewed in time");
            }
        }
        leading = now_leading;
        // While the API server is away, ask no more often than a holder renews.
        let pause = if now_leading || failing {
            timing.renew_every
        } else {
            timing.retry_every
        };
        tokio::time::sleep(pause).await;
    }
}

/// Gives the Lease up on shutdown (as client-go's ReleaseOnCancel): stops campaigning and, if
/// this replica holds the Lease, clears the holder so another replica takes over at its next
/// look (seconds) instead of after the lease duration.
pub async fn release(
    client: Client,
    namespace: &str,
    name: &str,
    timing: &LeaseTiming,
    state: &LeaderState,
    gauge: &prometheus::IntGauge,
) {
    state
        .stopped
        .store(true, std::sync::atomic::Ordering::Release);
    let was_leader = state.is_leader();
    state.set(None);
    gauge.set(0);
    if !was_leader {
        return;
    }
    let api: Api<Lease> = Api::namespaced(client, namespace);
    let give_up = async {
        let Some(mut lease) = api.get_opt(name).await? else {
            return Ok(());
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        if spec.holder_identity.as_deref() != Some(state.identity()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(micro_now());
        api.replace(name, &PostParams::default(), &lease)
            .await
            .map(|_| ())
    };
    match tokio::time::timeout(timing.request_timeout, give_up).await {
        Ok(Ok(())) => tracing::info!(lease = %format!("{namespace}/{name}"), "lease released"),
        Ok(Err(e)) => tracing::debug!(error = %e, "lease not released"),
        Err(_) => tracing::debug!("lease release timed out"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(holder: Option<&str>) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(str::to_string),
            ..Default::default()
        }
    }

    #[test]
    fn decisions() {
        assert_eq!(decide(None, "a", false), Decision::Acquire);
        assert_eq!(decide(Some(&spec(None)), "a", false), Decision::Acquire);
        assert_eq!(decide(Some(&spec(Some(""))), "a", false), Decision::Acquire);
        assert_eq!(decide(Some(&spec(Some("a"))), "a", false), Decision::Renew);
        assert_eq!(decide(Some(&spec(Some("a"))), "a", true), Decision::Renew);
        assert_eq!(decide(Some(&spec(Some("b"))), "a", false), Decision::Follow);
        assert_eq!(decide(Some(&spec(Some("b"))), "a", true), Decision::Acquire);
    }

    #[test]
    fn expiry_counts_from_the_last_change_we_saw() {
        let mut o = Observer::default();
        let t0 = Instant::now();
        let d = Duration::from_secs(15);
        o.observe(Some("1"), t0);
        assert!(!o.expired(t0 + Duration::from_secs(10), d));
        o.observe(Some("1"), t0 + Duration::from_secs(10));
        assert!(
            o.expired(t0 + Duration::from_secs(16), d),
            "same record: clock runs on"
        );
        o.observe(Some("2"), t0 + Duration::from_secs(16));
        assert!(
            !o.expired(t0 + Duration::from_secs(20), d),
            "a renewal restarts it"
        );
    }

    #[test]
    fn state_reports_transitions_once() {
        let s = LeaderState::new("me");
        assert!(!s.is_leader());
        assert!(s.set(Some(Instant::now() + Duration::from_secs(10))));
        assert!(s.is_leader());
        assert!(!s.set(Some(Instant::now() + Duration::from_secs(10))));
        assert!(s.set(None));
        assert!(!s.is_leader());
    }
}
