//! Endpoint sets and the per-request endpoint pick (least connections, round robin, random),
//! with runtime state keyed by address. Never sees kube, config or discovery types.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Instant;

use prometheus::IntGauge;

use crate::balance::health::{FailureKind, HealthPolicy, LazyNow, PassiveHealth};
use crate::balance::{mix64, reduce, BalanceError};

/// Sets up to this size are scanned exactly for the least loaded endpoint; larger ones use the
/// power of two choices. Why 8: scanning 8 counters (one cache line of pointers, 8 relaxed
/// loads) costs about what P2C costs once it has rolled its dice, and on small sets P2C is
/// visibly worse: with 3 endpoints, two random draws both land on the slowest endpoint 1 time
/// in 9 (11 %), which alone would nearly break A5's 15 % bound for a slow endpoint.
pub const EXACT_SCAN_MAX: usize = 8;

/// P2C draws this many pairs before falling back to a full scan when the drawn endpoints are
/// ineligible (terminating, ejected, excluded). Three pairs find an eligible endpoint with
/// probability > 98 % even when half the set is out, and bound the work when most of it is.
const P2C_ROUNDS: usize = 3;

/// Runtime state of one endpoint address. Lives outside configuration snapshots and endpoint
/// sets (it is shared through the [`EndpointRegistry`]), so in-flight counts and ejections
/// survive both kinds of swap.
pub struct EndpointState {
    addr: SocketAddr,
    in_flight: AtomicU64,
    health: PassiveHealth,
}

impl EndpointState {
    fn new(addr: SocketAddr) -> Self {
        // Start the health clock's epoch no later than the first state, so instants taken by
        // callers afterwards are never before it.
        let _ = crate::balance::health::tick(Instant::now());
        Self {
            addr,
            in_flight: AtomicU64::new(0),
            health: PassiveHealth::default(),
        }
    }

    /// The endpoint's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Requests (and streams) now in flight to this address, across every backend using it.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// The passive-health counters.
    pub fn health(&self) -> &PassiveHealth {
        &self.health
    }
}

impl fmt::Debug for EndpointState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EndpointState")
            .field("addr", &self.addr)
            .field("in_flight", &self.in_flight())
            .field("consecutive_failures", &self.health.consecutive_failures())
            .field("ejected_for", &self.health.ejected_for(Instant::now()))
            .finish()
    }
}

/// Hands out one [`EndpointState`] per address. Called when endpoint sets are built (a
/// discovery update), never per request, so a mutex is fine here. Holds only weak references:
/// a state lives as long as some endpoint set or in-flight guard uses it.
#[derive(Debug, Default)]
pub struct EndpointRegistry {
    inner: Mutex<RegistryInner>,
}

#[derive(Debug, Default)]
struct RegistryInner {
    states: HashMap<SocketAddr, Weak<EndpointState>>,
    /// Live entries at the last sweep: the next sweep runs when the map has doubled past it,
    /// which keeps sweeping amortised O(1) per insert.
    live_at_sweep: usize,
}

impl EndpointRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// The state of `addr`, created on first use. The same address always gets the same state
    /// while anyone holds it.
    pub fn get_or_insert(&self, addr: SocketAddr) -> Arc<EndpointState> {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(state) = inner.states.get(&addr).and_then(Weak::upgrade) {
            return state;
        }
        let state = Arc::new(EndpointState::new(addr));
        inner.states.insert(addr, Arc::downgrade(&state));
        if inner.states.len() > 2 * inner.live_at_sweep + 16 {
            inner.states.retain(|_, weak| weak.strong_count() > 0);
            inner.live_at_sweep = inner.states.len();
        }
        state
    }

    /// An [`Endpoint`] for `addr` with its shared state.
    pub fn endpoint(&self, addr: SocketAddr, serving: bool) -> Endpoint {
        Endpoint {
            addr,
            state: self.get_or_insert(addr),
            serving,
        }
    }

    /// The state of `addr` if some set still uses it.
    pub fn get(&self, addr: SocketAddr) -> Option<Arc<EndpointState>> {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner.states.get(&addr).and_then(Weak::upgrade)
    }

    /// Drops the entries of states nobody uses any more. Runs by itself as entries are added;
    /// callable for tests and housekeeping.
    pub fn sweep(&self) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner.states.retain(|_, weak| weak.strong_count() > 0);
        inner.live_at_sweep = inner.states.len();
    }

    /// Addresses with a live state.
    pub fn live_count(&self) -> usize {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner
            .states
            .values()
            .filter(|weak| weak.strong_count() > 0)
            .count()
    }
}

/// One endpoint of a backend as discovery last saw it.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// Where to connect.
    pub addr: SocketAddr,
    /// Runtime state shared by every set that contains this address.
    pub state: Arc<EndpointState>,
    /// `false` = terminating: requests already sent finish, no new request is picked for it.
    pub serving: bool,
}

/// How a backend's endpoints share its requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum LbPolicy {
    /// The endpoint with the fewest requests in flight (exact below [`EXACT_SCAN_MAX`]
    /// endpoints, power of two choices above). Adapts to slow endpoints and long streams.
    #[default]
    LeastConnections,
    /// Each endpoint in turn.
    RoundRobin,
    /// A uniformly random endpoint.
    Random,
}

impl LbPolicy {
    /// A bounded label for metrics and `/debug` output.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::LeastConnections => "leastConnections",
            Self::RoundRobin => "roundRobin",
            Self::Random => "random",
        }
    }
}

/// The endpoints of one backend: immutable, built whole by discovery and swapped (ArcSwap).
/// Only the round-robin cursor changes, and it is an atomic.
pub struct EndpointSet {
    endpoints: Vec<Endpoint>,
    cursor: AtomicUsize,
    serving: usize,
    policy: HealthPolicy,
    in_flight_gauge: Option<IntGauge>,
}

impl fmt::Debug for EndpointSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EndpointSet")
            .field("endpoints", &self.endpoints)
            .field("policy", &self.policy)
            .finish()
    }
}

impl Default for EndpointSet {
    fn default() -> Self {
        Self::empty()
    }
}

impl EndpointSet {
    /// A set with no endpoints (a backend not resolved yet, or scaled to zero).
    pub fn empty() -> Self {
        Self::new(Vec::new())
    }

    /// A set of these endpoints, ordered by address (a stable order keeps round robin fair
    /// across rebuilds and makes equal sets compare equal). A duplicate address keeps one
    /// entry, serving if any duplicate is.
    pub fn new(mut endpoints: Vec<Endpoint>) -> Self {
        // Serving entries first among equal addresses, so dedup keeps them.
        endpoints.sort_by(|a, b| a.addr.cmp(&b.addr).then(b.serving.cmp(&a.serving)));
        endpoints.dedup_by(|later, earlier| later.addr == earlier.addr);
        let serving = endpoints.iter().filter(|e| e.serving).count();
        Self {
            endpoints,
            cursor: AtomicUsize::new(0),
            serving,
            policy: HealthPolicy::default(),
            in_flight_gauge: None,
        }
    }

    /// Serving endpoints for these addresses, states taken from `registry`.
    pub fn from_addrs(
        registry: &EndpointRegistry,
        addrs: impl IntoIterator<Item = SocketAddr>,
    ) -> Self {
        Self::new(
            addrs
                .into_iter()
                .map(|addr| registry.endpoint(addr, true))
                .collect(),
        )
    }

    /// Uses this passive-health policy instead of the default.
    pub fn with_health_policy(mut self, policy: HealthPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Counts this set's in-flight requests in `gauge` too (for example
    /// `tollgate_upstream_in_flight{backend}`); resolved once here, not per request.
    pub fn with_in_flight_gauge(mut self, gauge: IntGauge) -> Self {
        self.in_flight_gauge = Some(gauge);
        self
    }

    /// The endpoints, ordered by address.
    pub fn endpoints(&self) -> &[Endpoint] {
        &self.endpoints
    }

    /// Number of endpoints, terminating ones included.
    pub fn len(&self) -> usize {
        self.endpoints.len()
    }

    /// Whether the set has no endpoint at all.
    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    /// Endpoints that take new requests (not terminating); ejection is not counted here.
    pub fn ready_count(&self) -> usize {
        self.serving
    }

    /// The passive-health policy of this set.
    pub fn health_policy(&self) -> HealthPolicy {
        self.policy
    }

    /// Whether both sets hold the same addresses with the same serving flags.
    pub fn same_endpoints(&self, other: &EndpointSet) -> bool {
        self.endpoints.len() == other.endpoints.len()
            && self
                .endpoints
                .iter()
                .zip(&other.endpoints)
                .all(|(a, b)| a.addr == b.addr && a.serving == b.serving)
    }

    /// Picks an endpoint for a new request and counts it in flight until the guard drops.
    /// `rng` is a fresh random number per request (any quality PRNG; it is mixed here).
    /// Skips terminating and ejected endpoints; if every serving endpoint is ejected, ejection
    /// is ignored (ejecting everything would turn a partial outage into a total one).
    /// Lock-free and allocation-free.
    pub fn pick(self: &Arc<Self>, lb: LbPolicy, rng: u64) -> Option<(&Endpoint, InFlightGuard)> {
        self.pick_at(lb, rng, &[], None)
    }

    /// Like [`pick`](Self::pick), avoiding `exclude` (endpoints that already failed this
    /// request, for a connect-failure retry). Exclusion yields when nothing else is left: a
    /// retry then goes to the same endpoint rather than nowhere.
    pub fn pick_excluding(
        self: &Arc<Self>,
        lb: LbPolicy,
        rng: u64,
        exclude: &[SocketAddr],
    ) -> Option<(&Endpoint, InFlightGuard)> {
        self.pick_at(lb, rng, exclude, None)
    }

    /// Like [`pick_excluding`](Self::pick_excluding), with the error saying why nothing could
    /// be picked.
    pub fn try_pick(
        self: &Arc<Self>,
        lb: LbPolicy,
        rng: u64,
        exclude: &[SocketAddr],
    ) -> Result<(&Endpoint, InFlightGuard), BalanceError> {
        match self.pick_at(lb, rng, exclude, None) {
            Some(picked) => Ok(picked),
            None if self.endpoints.is_empty() => Err(BalanceError::NoEndpoints),
            None => Err(BalanceError::NoServingEndpoints),
        }
    }

    /// The pick with an explicit clock (`None` = read it only if some endpoint is ejected).
    pub fn pick_at(
        self: &Arc<Self>,
        lb: LbPolicy,
        rng: u64,
        exclude: &[SocketAddr],
        now: Option<Instant>,
    ) -> Option<(&Endpoint, InFlightGuard)> {
        let now = LazyNow::new(now);
        let index = self.select(lb, rng, exclude, &now)?;
        let endpoint = self.endpoints.get(index)?;
        Some((endpoint, InFlightGuard::new(Arc::clone(self), index)))
    }

    /// The endpoint at `addr`, whatever its health or whether it is terminating: a pinned
    /// session (MCP) goes where it lives as long as that endpoint is in the set. `None` once
    /// discovery no longer lists it.
    pub fn pin(self: &Arc<Self>, addr: SocketAddr) -> Option<(&Endpoint, InFlightGuard)> {
        let index = self
            .endpoints
            .binary_search_by(|e| e.addr.cmp(&addr))
            .ok()?;
        let endpoint = self.endpoints.get(index)?;
        Some((endpoint, InFlightGuard::new(Arc::clone(self), index)))
    }

    /// The endpoint of a sticky client (`sticky: clientId`): rendezvous hashing of the client's
    /// hash with each endpoint's address, so every replica picks the same endpoint and adding
    /// one endpoint to n moves only about 1/(n+1) of the clients. Ejected and `exclude`d
    /// endpoints are skipped while another can take the request, as in [`pick`](Self::pick).
    pub fn pick_sticky(
        self: &Arc<Self>,
        client_hash: u64,
        exclude: &[SocketAddr],
    ) -> Option<(&Endpoint, InFlightGuard)> {
        if self.serving == 0 {
            return None;
        }
        let now = LazyNow::new(None);
        let best = |eligible: &dyn Fn(&Endpoint) -> bool| {
            self.endpoints
                .iter()
                .enumerate()
                .filter(|(_, e)| eligible(e))
                .max_by_key(|(_, e)| mix64(client_hash ^ addr_hash(e.addr)))
                .map(|(i, _)| i)
        };
        let excluded = |e: &Endpoint| exclude.contains(&e.addr);
        let index = best(&|e| e.serving && !excluded(e) && !e.state.health.is_ejected(&now))
            .or_else(|| best(&|e| e.serving && !excluded(e)))
            .or_else(|| best(&|e| e.serving))?;
        let endpoint = self.endpoints.get(index)?;
        Some((endpoint, InFlightGuard::new(Arc::clone(self), index)))
    }

    /// Whether discovery lists an endpoint at `addr`.
    pub fn contains(&self, addr: SocketAddr) -> bool {
        self.endpoints
            .binary_search_by(|e| e.addr.cmp(&addr))
            .is_ok()
    }

    /// The three passes: strict; ejection ignored (never eject everything); exclusion ignored.
    fn select(
        &self,
        lb: LbPolicy,
        rng: u64,
        exclude: &[SocketAddr],
        now: &LazyNow,
    ) -> Option<usize> {
        if self.serving == 0 {
            return None;
        }
        // One cursor step per request, whatever the number of passes.
        let start = match lb {
            LbPolicy::RoundRobin => self.cursor.fetch_add(1, Ordering::Relaxed),
            _ => 0,
        };
        let excluded = |e: &Endpoint| exclude.contains(&e.addr);
        self.select_pass(lb, rng, start, |e| {
            e.serving && !excluded(e) && !e.state.health.is_ejected(now)
        })
        .or_else(|| self.select_pass(lb, rng, start, |e| e.serving && !excluded(e)))
        .or_else(|| {
            if exclude.is_empty() {
                None
            } else {
                self.select_pass(lb, rng, start, |e| e.serving)
            }
        })
    }

    fn select_pass(
        &self,
        lb: LbPolicy,
        rng: u64,
        cursor: usize,
        eligible: impl Fn(&Endpoint) -> bool,
    ) -> Option<usize> {
        let n = self.endpoints.len();
        if n == 0 {
            return None;
        }
        match lb {
            LbPolicy::LeastConnections if n <= EXACT_SCAN_MAX => {
                self.least_loaded_scan(reduce(mix64(rng), n), eligible)
            }
            LbPolicy::LeastConnections => self.power_of_two(rng, eligible),
            LbPolicy::RoundRobin => self.first_eligible_from(cursor % n, &eligible),
            LbPolicy::Random => {
                let mut r = rng;
                for _ in 0..P2C_ROUNDS {
                    r = mix64(r);
                    let i = reduce(r, n);
                    if self.endpoints.get(i).is_some_and(&eligible) {
                        return Some(i);
                    }
                }
                self.first_eligible_from(reduce(mix64(r), n), &eligible)
            }
        }
    }

    /// The first eligible endpoint at or after `start`, wrapping around.
    fn first_eligible_from(
        &self,
        start: usize,
        eligible: &impl Fn(&Endpoint) -> bool,
    ) -> Option<usize> {
        let n = self.endpoints.len();
        (0..n)
            .map(|k| (start + k) % n)
            .find(|&i| self.endpoints.get(i).is_some_and(eligible))
    }

    /// Exact least-loaded endpoint; the scan starts at `start` so ties spread evenly.
    fn least_loaded_scan(
        &self,
        start: usize,
        eligible: impl Fn(&Endpoint) -> bool,
    ) -> Option<usize> {
        let n = self.endpoints.len();
        let mut best: Option<(usize, u64)> = None;
        for k in 0..n {
            let i = (start + k) % n;
            let Some(e) = self.endpoints.get(i) else {
                continue;
            };
            if !eligible(e) {
                continue;
            }
            let load = e.state.in_flight();
            if best.is_none_or(|(_, b)| load < b) {
                best = Some((i, load));
                if load == 0 {
                    break;
                }
            }
        }
        best.map(|(i, _)| i)
    }

    /// Power of two choices: two distinct random endpoints, the less loaded one wins.
    fn power_of_two(&self, rng: u64, eligible: impl Fn(&Endpoint) -> bool) -> Option<usize> {
        let n = self.endpoints.len();
        let mut r = rng;
        for _ in 0..P2C_ROUNDS {
            r = mix64(r);
            let a = reduce(r, n);
            let b = (a + 1 + reduce(r.rotate_left(32), n - 1)) % n;
            let ea = self.endpoints.get(a).filter(|e| eligible(e));
            let eb = self.endpoints.get(b).filter(|e| eligible(e));
            match (ea, eb) {
                (Some(x), Some(y)) => {
                    return Some(if y.state.in_flight() < x.state.in_flight() {
                        b
                    } else {
                        a
                    });
                }
                (Some(_), None) => return Some(a),
                (None, Some(_)) => return Some(b),
                (None, None) => {}
            }
        }
        self.least_loaded_scan(reduce(mix64(r), n), eligible)
    }

    /// Whether an endpoint other than `index` could take traffic now (serving, not ejected).
    fn has_other_available(&self, index: usize, now: &LazyNow) -> bool {
        self.endpoints
            .iter()
            .enumerate()
            .any(|(i, e)| i != index && e.serving && !e.state.health.is_ejected(now))
    }
}

/// One request's claim on an endpoint: counted in flight from the pick until the guard drops.
/// Keep it inside the response body, so a long SSE stream counts until its last byte. Report
/// the outcome with [`success`](Self::success) or [`failure`](Self::failure).
pub struct InFlightGuard {
    set: Arc<EndpointSet>,
    index: usize,
}

impl InFlightGuard {
    fn new(set: Arc<EndpointSet>, index: usize) -> Self {
        if let Some(e) = set.endpoints.get(index) {
            e.state.in_flight.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(g) = &set.in_flight_gauge {
            g.inc();
        }
        Self { set, index }
    }

    fn endpoint(&self) -> Option<&Endpoint> {
        self.set.endpoints.get(self.index)
    }

    /// The picked endpoint's address.
    pub fn addr(&self) -> SocketAddr {
        self.endpoint()
            .map_or(SocketAddr::from(([0, 0, 0, 0], 0)), |e| e.addr)
    }

    /// The picked endpoint's shared state.
    pub fn state(&self) -> Option<&Arc<EndpointState>> {
        self.endpoint().map(|e| &e.state)
    }

    /// The endpoint answered (headers without a 5xx): its failure streak ends.
    pub fn success(&self) {
        if let Some(e) = self.endpoint() {
            e.state.health.record_success();
        }
    }

    /// The endpoint failed this request. Enough consecutive failures eject it, unless it is the
    /// last endpoint of the set that could take traffic. Returns the ejection, if this failure
    /// caused one.
    pub fn failure(&self, kind: FailureKind) -> Option<std::time::Duration> {
        self.failure_at(kind, None)
    }

    /// [`failure`](Self::failure) with an explicit clock.
    pub fn failure_at(
        &self,
        kind: FailureKind,
        now: Option<Instant>,
    ) -> Option<std::time::Duration> {
        let e = self.endpoint()?;
        let now = LazyNow::new(now);
        let ejected = e.state.health.record_failure(&self.set.policy, &now, || {
            self.set.has_other_available(self.index, &now)
        });
        if let Some(length) = ejected {
            tracing::warn!(
                endpoint = %e.addr,
                reason = kind.as_str(),
                ejected_ms = u64::try_from(length.as_millis()).unwrap_or(u64::MAX),
                "endpoint ejected after consecutive failures"
            );
        }
        ejected
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        if let Some(e) = self.set.endpoints.get(self.index) {
            e.state.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
        if let Some(g) = &self.set.in_flight_gauge {
            g.dec();
        }
    }
}

impl fmt::Debug for InFlightGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InFlightGuard")
            .field("addr", &self.addr())
            .finish()
    }
}

/// A hash of an endpoint address that every replica computes alike.
fn addr_hash(addr: SocketAddr) -> u64 {
    let mut bytes = [0u8; 18];
    match addr.ip() {
        std::net::IpAddr::V4(ip) => bytes[..4].copy_from_slice(&ip.octets()),
        std::net::IpAddr::V6(ip) => bytes[..16].copy_from_slice(&ip.octets()),
    }
    bytes[16..].copy_from_slice(&addr.port().to_be_bytes());
    mix64(crate::balance::stable_hash(&bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use std::time::Duration;

    fn addr(last: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, last], 8000))
    }

    fn set_of(registry: &EndpointRegistry, n: u8) -> Arc<EndpointSet> {
        Arc::new(EndpointSet::from_addrs(registry, (1..=n).map(addr)))
    }

    #[test]
    fn round_robin_cycles_in_address_order() {
        let reg = EndpointRegistry::new();
        // Built out of order: the set sorts by address.
        let set = Arc::new(EndpointSet::from_addrs(&reg, [addr(3), addr(1), addr(2)]));
        let order: Vec<u8> = (0..7)
            .map(|i| match set.pick(LbPolicy::RoundRobin, i) {
                Some((e, _guard)) => match e.addr.ip() {
                    std::net::IpAddr::V4(v4) => v4.octets()[3],
                    std::net::IpAddr::V6(_) => 0,
                },
                None => 0,
            })
            .collect();
        assert_eq!(order, vec![1, 2, 3, 1, 2, 3, 1]);
    }

    #[test]
    fn guard_counts_in_flight_until_dropped() {
        let reg = EndpointRegistry::new();
        let gauge = IntGauge::new("test_in_flight", "test").unwrap();
        let set =
            Arc::new(EndpointSet::from_addrs(&reg, [addr(1)]).with_in_flight_gauge(gauge.clone()));
        let (_, g1) = set.pick(LbPolicy::LeastConnections, 1).unwrap();
        let (_, g2) = set.pick(LbPolicy::LeastConnections, 2).unwrap();
        let state = reg.get(addr(1)).unwrap();
        assert_eq!(state.in_flight(), 2);
        assert_eq!(gauge.get(), 2);
        drop(g1);
        assert_eq!(state.in_flight(), 1);
        drop(g2);
        assert_eq!(state.in_flight(), 0);
        assert_eq!(gauge.get(), 0);
    }

    #[test]
    fn state_survives_set_swap_and_is_swept_when_unused() {
        let reg = EndpointRegistry::new();
        let old = set_of(&reg, 2);
        let (_, guard) = old.pick(LbPolicy::RoundRobin, 0).unwrap();
        let picked = guard.addr();
        // Rebuilt set (a discovery update): same state objects, the in-flight count carries.
        let new = set_of(&reg, 3);
        let carried = new
            .endpoints()
            .iter()
            .find(|e| e.addr == picked)
            .map(|e| e.state.in_flight());
        assert_eq!(carried, Some(1));
        drop(old);
        drop(guard);
        drop(new);
        reg.sweep();
        assert_eq!(reg.live_count(), 0);
        assert!(reg.get(addr(1)).is_none());
    }

    #[test]
    fn least_connections_prefers_idle_endpoint() {
        let reg = EndpointRegistry::new();
        let set = set_of(&reg, 3);
        let mut held = Vec::new();
        for i in 0..3 {
            held.push(set.pick(LbPolicy::LeastConnections, i).unwrap().1);
        }
        // One of each now; release the one on .2, the next pick must go there.
        held.retain(|g| g.addr() != addr(2));
        for i in 0..10 {
            let (e, g) = set.pick(LbPolicy::LeastConnections, i).unwrap();
            assert_eq!(e.addr, addr(2));
            drop(g);
        }
    }

    /// Deterministic discrete-time simulation of A5: three endpoints, one answering ten times
    /// slower. Requests arrive at a steady rate; each holds its guard for its endpoint's
    /// service time.
    fn slow_share(n: u8, slow: &[u8], lb: LbPolicy, arrivals_per_tick: usize) -> f64 {
        let reg = EndpointRegistry::new();
        let set = set_of(&reg, n);
        let mut rng = StdRng::seed_from_u64(7);
        let mut in_flight: Vec<(u64, InFlightGuard)> = Vec::new();
        let (mut total, mut to_slow) = (0u64, 0u64);
        for tick in 0..5_000u64 {
            in_flight.retain(|(done, _)| *done > tick);
            for _ in 0..arrivals_per_tick {
                let (e, guard) = set.pick(lb, rng.random()).unwrap();
                let is_slow = slow.iter().any(|&s| e.addr == addr(s));
                // Fast: 2 ticks; slow: 20 ticks.
                let service = if is_slow { 20 } else { 2 };
                total += 1;
                to_slow += u64::from(is_slow);
                in_flight.push((tick + service, guard));
            }
        }
        to_slow as f64 / total as f64
    }

    #[test]
    fn least_connections_starves_slow_endpoint_a5() {
        for load in [1, 2, 4, 8] {
            let share = slow_share(3, &[3], LbPolicy::LeastConnections, load);
            assert!(share < 0.15, "load {load}: slow endpoint got {share:.3}");
        }
        // The same simulation under round robin gives it its full third: the test has teeth.
        let rr = slow_share(3, &[3], LbPolicy::RoundRobin, 4);
        assert!(rr > 0.30, "round robin share {rr:.3}");
    }

    #[test]
    fn power_of_two_choices_on_large_set_avoids_slow_endpoints() {
        // 20 endpoints (P2C path), two slow: a fair share would be 10 %.
        let share = slow_share(20, &[5, 15], LbPolicy::LeastConnections, 16);
        assert!(share < 0.05, "slow endpoints got {share:.3}");
    }

    #[test]
    fn random_spreads_evenly() {
        let reg = EndpointRegistry::new();
        let set = set_of(&reg, 4);
        let mut rng = StdRng::seed_from_u64(1);
        let mut counts = [0u32; 4];
        for _ in 0..8_000 {
            let (e, _g) = set.pick(LbPolicy::Random, rng.random()).unwrap();
            let i = set
                .endpoints()
                .iter()
                .position(|x| x.addr == e.addr)
                .unwrap();
            counts[i] += 1;
        }
        for c in counts {
            assert!((1_800..=2_200).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn terminating_endpoints_get_no_new_picks() {
        let reg = EndpointRegistry::new();
        let set = Arc::new(EndpointSet::new(vec![
            reg.endpoint(addr(1), true),
            reg.endpoint(addr(2), false),
            reg.endpoint(addr(3), true),
        ]));
        assert_eq!(set.ready_count(), 2);
        for lb in [
            LbPolicy::LeastConnections,
            LbPolicy::RoundRobin,
            LbPolicy::Random,
        ] {
            for i in 0..100 {
                let (e, _g) = set.pick(lb, i).unwrap();
                assert_ne!(e.addr, addr(2), "{lb:?}");
            }
            // Not even as a last resort for a retry.
            let (e, _g) = set.pick_excluding(lb, 9, &[addr(1), addr(3)]).unwrap();
            assert_ne!(e.addr, addr(2));
        }
        let all_terminating = Arc::new(EndpointSet::new(vec![reg.endpoint(addr(2), false)]));
        assert!(all_terminating.pick(LbPolicy::RoundRobin, 0).is_none());
        assert_eq!(
            all_terminating.try_pick(LbPolicy::RoundRobin, 0, &[]).err(),
            Some(BalanceError::NoServingEndpoints)
        );
        let empty = Arc::new(EndpointSet::empty());
        assert_eq!(
            empty.try_pick(LbPolicy::Random, 0, &[]).err(),
            Some(BalanceError::NoEndpoints)
        );
    }

    #[test]
    fn pick_excluding_avoids_failed_endpoint_while_another_exists() {
        let reg = EndpointRegistry::new();
        let set = set_of(&reg, 3);
        for lb in [
            LbPolicy::LeastConnections,
            LbPolicy::RoundRobin,
            LbPolicy::Random,
        ] {
            for i in 0..50 {
                let (e, _g) = set.pick_excluding(lb, i, &[addr(1), addr(2)]).unwrap();
                assert_eq!(e.addr, addr(3), "{lb:?}");
            }
        }
        // Everything excluded: the retry goes somewhere rather than nowhere.
        let all = [addr(1), addr(2), addr(3)];
        assert!(set.pick_excluding(LbPolicy::RoundRobin, 0, &all).is_some());
    }

    #[test]
    fn ejection_after_consecutive_failures_and_recovery() {
        let reg = EndpointRegistry::new();
        let set = set_of(&reg, 3);
        let t0 = Instant::now();
        let bad = addr(2);
        // Five failures in a row on .2.
        let mut ejected = None;
        for i in 0..5 {
            let (_, guard) = set
                .pick_excluding(LbPolicy::RoundRobin, i, &[addr(1), addr(3)])
                .unwrap();
            assert_eq!(guard.addr(), bad);
            ejected = guard.failure_at(FailureKind::Connect, Some(t0));
        }
        assert_eq!(ejected, Some(Duration::from_secs(1)));
        // While ejected, no lb policy sends to it.
        let during = t0 + Duration::from_millis(500);
        for lb in [
            LbPolicy::LeastConnections,
            LbPolicy::RoundRobin,
            LbPolicy::Random,
        ] {
            for i in 0..60 {
                let (e, _g) = set.pick_at(lb, i, &[], Some(during)).unwrap();
                assert_ne!(e.addr, bad, "{lb:?}");
            }
        }
        // After the ejection it is tried again.
        let after = t0 + Duration::from_millis(1_001);
        let seen = (0..3).any(|i| {
            set.pick_at(LbPolicy::RoundRobin, i, &[], Some(after))
                .is_some_and(|(e, _)| e.addr == bad)
        });
        assert!(seen, "readmitted endpoint not picked");
        // On probation: one more failure ejects it for twice as long.
        let (_, guard) = set
            .pick_at(LbPolicy::RoundRobin, 0, &[addr(1), addr(3)], Some(after))
            .unwrap();
        assert_eq!(
            guard.failure_at(FailureKind::ServerError, Some(after)),
            Some(Duration::from_secs(2))
        );
        // Recovery: after this ejection, one success clears the streak and the backoff.
        let later = after + Duration::from_millis(2_001);
        let (_, guard) = set
            .pick_at(LbPolicy::RoundRobin, 0, &[addr(1), addr(3)], Some(later))
            .unwrap();
        assert_eq!(guard.addr(), bad);
        guard.success();
        let state = reg.get(bad).unwrap();
        assert_eq!(state.health().consecutive_failures(), 0);
        for _ in 0..4 {
            assert_eq!(guard.failure_at(FailureKind::Connect, Some(later)), None);
        }
        assert_eq!(
            guard.failure_at(FailureKind::Connect, Some(later)),
            Some(Duration::from_secs(1))
        );
    }

    #[test]
    fn never_ejects_the_last_available_endpoint() {
        let reg = EndpointRegistry::new();
        let set = set_of(&reg, 2);
        let now = Instant::now();
        let (_, g1) = set
            .pick_excluding(LbPolicy::RoundRobin, 0, &[addr(2)])
            .unwrap();
        let (_, g2) = set
            .pick_excluding(LbPolicy::RoundRobin, 0, &[addr(1)])
            .unwrap();
        for _ in 0..5 {
            g1.failure_at(FailureKind::Connect, Some(now));
        }
        assert!(reg.get(addr(1)).unwrap().health().is_ejected_at(now));
        for _ in 0..50 {
            assert_eq!(g2.failure_at(FailureKind::Connect, Some(now)), None);
        }
        assert!(!reg.get(addr(2)).unwrap().health().is_ejected_at(now));
        // A lone endpoint is never ejected either.
        let lone = set_of(&reg, 1);
        let (_, g) = lone.pick(LbPolicy::Random, 0).unwrap();
        for _ in 0..50 {
            assert_eq!(g.failure_at(FailureKind::Timeout, Some(now)), None);
        }
    }

    #[test]
    fn all_ejected_means_ejection_is_ignored() {
        let reg = EndpointRegistry::new();
        let now = Instant::now();
        // Both addresses ejected through a bigger set that had healthy peers.
        let big = set_of(&reg, 3);
        for bad in [addr(1), addr(2)] {
            let others: Vec<SocketAddr> = (1..=3).map(addr).filter(|a| *a != bad).collect();
            let (_, g) = big
                .pick_at(LbPolicy::RoundRobin, 0, &others, Some(now))
                .unwrap();
            for _ in 0..5 {
                g.failure_at(FailureKind::Connect, Some(now));
            }
            assert!(reg.get(bad).unwrap().health().is_ejected_at(now));
        }
        // A backend whose endpoints are exactly those two still gets an endpoint.
        let small = Arc::new(EndpointSet::from_addrs(&reg, [addr(1), addr(2)]));
        for lb in [
            LbPolicy::LeastConnections,
            LbPolicy::RoundRobin,
            LbPolicy::Random,
        ] {
            assert!(small.pick_at(lb, 3, &[], Some(now)).is_some(), "{lb:?}");
        }
        drop(big);
    }

    #[test]
    fn picks_through_arc_swap_and_concurrently() {
        let reg = Arc::new(EndpointRegistry::new());
        let swap = Arc::new(arc_swap::ArcSwap::from_pointee(EndpointSet::from_addrs(
            &reg,
            (1..=12).map(addr),
        )));
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let swap = Arc::clone(&swap);
                let reg = Arc::clone(&reg);
                std::thread::spawn(move || {
                    let mut rng = StdRng::seed_from_u64(t);
                    let mut held = Vec::new();
                    for i in 0..20_000u64 {
                        let set = swap.load();
                        let lb = [
                            LbPolicy::LeastConnections,
                            LbPolicy::RoundRobin,
                            LbPolicy::Random,
                        ][usize::try_from(i % 3).unwrap()];
                        if let Some((_, guard)) = set.pick(lb, rng.random()) {
                            held.push(guard);
                        }
                        if held.len() > 16 {
                            held.clear();
                        }
                        // A discovery update now and then: the counts must carry over.
                        if t == 0 && i % 1_000 == 0 {
                            let n = 10 + u8::try_from(i / 1_000 % 3).unwrap();
                            swap.store(Arc::new(EndpointSet::from_addrs(&reg, (1..=n).map(addr))));
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        for i in 1..=12 {
            if let Some(state) = reg.get(addr(i)) {
                assert_eq!(state.in_flight(), 0, "{}", state.addr());
            }
        }
    }

    #[test]
    fn duplicates_collapse_and_serving_wins() {
        let reg = EndpointRegistry::new();
        let set = EndpointSet::new(vec![
            reg.endpoint(addr(1), false),
            reg.endpoint(addr(1), true),
            reg.endpoint(addr(2), true),
        ]);
        assert_eq!(set.len(), 2);
        assert!(set.endpoints()[0].serving);
        let other = EndpointSet::from_addrs(&reg, [addr(2), addr(1)]);
        assert!(set.same_endpoints(&other));
    }

    #[test]
    fn sticky_clients_keep_their_endpoint_and_a_new_endpoint_moves_few() {
        let reg = EndpointRegistry::new();
        let four = set_of(&reg, 4);
        let five = set_of(&reg, 5);
        let clients: Vec<u64> = (0..2000u32)
            .map(|i| crate::balance::stable_hash(format!("client-{i}").as_bytes()))
            .collect();
        let pick = |set: &Arc<EndpointSet>, c: u64| set.pick_sticky(c, &[]).unwrap().0.addr;
        let mut per = std::collections::HashMap::new();
        let mut moved = 0;
        for &c in &clients {
            let a = pick(&four, c);
            assert_eq!(a, pick(&four, c), "the same client, the same endpoint");
            *per.entry(a).or_insert(0) += 1;
            let b = pick(&five, c);
            if a != b {
                assert_eq!(b, addr(5), "a client that moves goes to the new endpoint");
                moved += 1;
            }
        }
        for (a, n) in &per {
            assert!((350..650).contains(n), "{a}: {n} of 2000 clients");
        }
        assert!(
            (250..550).contains(&moved),
            "{moved} of 2000 clients moved (about 1/5)"
        );
        // An excluded endpoint (a failed attempt) is avoided while another exists.
        let c = clients[0];
        let first = pick(&four, c);
        let other = four.pick_sticky(c, &[first]).unwrap().0.addr;
        assert_ne!(first, other);
    }
}
