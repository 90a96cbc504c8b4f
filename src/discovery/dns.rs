//! DNS discovery: resolves backend names (A/AAAA, TTL-driven refresh, stale grace) into
//! swapped endpoint sets, one shared task per name. Never sees kube, config or route types.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use hickory_resolver::config::{
    LookupIpStrategy, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::Name;
use hickory_resolver::TokioResolver;
use tokio::sync::watch;
use tokio::task::AbortHandle;

use crate::balance::{EndpointRegistry, EndpointSet, HealthPolicy};
use crate::discovery::DiscoveryError;

/// After a failed lookup the next try comes after 1 s, 2 s, 4 s ... up to this. 30 s: a broken
/// DNS server is asked at most twice a minute per name, and its recovery is noticed within
/// 30 s (the last good answer is still being served meanwhile).
const FAILURE_RETRY_MAX: Duration = Duration::from_secs(30);

/// How DNS discovery resolves and refreshes.
#[derive(Debug, Clone)]
pub struct DnsConfig {
    /// Name servers to ask (UDP, falling back to TCP for truncated answers). Empty = the
    /// system configuration (`/etc/resolv.conf`), which in a pod is the cluster DNS.
    pub nameservers: Vec<SocketAddr>,
    /// Floor of the refresh interval. Default 1 s: a TTL of 0 (or 1) must not turn into a
    /// query loop, and one second is well within R3's reaction time.
    pub min_refresh: Duration,
    /// Ceiling of the refresh interval. Default 300 s: a day-long TTL must not pin a stale
    /// answer; five minutes bounds how long a silently changed record goes unseen.
    pub max_refresh: Duration,
    /// How long the last good answer is kept after lookups start failing (timeouts, SERVFAIL,
    /// refused). Default 5 min: a DNS outage (CoreDNS rolling, a network blip) must not take
    /// healthy backends away; the endpoints' own passive health covers the ones that died.
    pub stale_grace: Duration,
    /// How long the last good answer is kept after the name stops existing (NXDOMAIN) or has
    /// no address (NODATA). Default 5 s: such an answer is authoritative (a service scaled to
    /// zero or deleted), so it should answer 503 soon, yet one flapping answer must not empty
    /// a backend.
    pub negative_grace: Duration,
    /// Timeout of one DNS query. Default 2 s: the refresh runs in the background, no request
    /// waits for it, and cluster DNS answers in milliseconds when it answers at all.
    pub lookup_timeout: Duration,
    /// Tries per lookup and name server. Default 2 (one retry for a lost UDP datagram).
    pub lookup_attempts: usize,
    /// Passive-health policy of the endpoint sets built from answers.
    pub health_policy: HealthPolicy,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            nameservers: Vec::new(),
            min_refresh: Duration::from_secs(1),
            max_refresh: Duration::from_secs(300),
            stale_grace: Duration::from_secs(300),
            negative_grace: Duration::from_secs(5),
            lookup_timeout: Duration::from_secs(2),
            lookup_attempts: 2,
            health_policy: HealthPolicy::default(),
        }
    }
}

/// Where a watch stands, for `/debug`, readiness and route status.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WatchStatus {
    /// Incremented each time a new endpoint set is published.
    pub generation: u64,
    /// At least one lookup has completed (with addresses or an authoritative "none").
    pub resolved: bool,
    /// The current set is an old answer kept through lookup failures.
    pub stale: bool,
    /// Addresses in the current set.
    pub addresses: usize,
    /// The last lookup's error, if the last lookup failed.
    pub last_error: Option<Arc<str>>,
}

type WatchKey = (String, u16);
type WatchMap = Mutex<HashMap<WatchKey, Weak<WatchShared>>>;

/// Resolves backend host names into endpoint sets and keeps them fresh. Cheap to clone; one
/// resolver and one refresh task per watched (name, port), shared by every watcher.
#[derive(Clone)]
pub struct DnsDiscovery {
    resolver: TokioResolver,
    registry: Arc<EndpointRegistry>,
    config: Arc<DnsConfig>,
    watches: Arc<WatchMap>,
}

impl fmt::Debug for DnsDiscovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DnsDiscovery")
            .field("config", &self.config)
            .field("watches", &self.watched_count())
            .finish()
    }
}

impl DnsDiscovery {
    /// A discovery using `config`'s name servers (or the system's), building endpoint states
    /// in `registry` so they are shared with any other discovery of the same addresses.
    pub fn new(config: DnsConfig, registry: Arc<EndpointRegistry>) -> Result<Self, DiscoveryError> {
        let provider = TokioRuntimeProvider::default();
        let explicit = !config.nameservers.is_empty();
        let mut builder = if explicit {
            let servers = config
                .nameservers
                .iter()
                .map(|server| {
                    let mut ns = NameServerConfig::udp_and_tcp(server.ip());
                    for conn in &mut ns.connections {
                        conn.port = server.port();
                    }
                    ns
                })
                .collect();
            TokioResolver::builder_with_config(ResolverConfig::from_name_servers(servers), provider)
        } else {
            TokioResolver::builder(provider).map_err(DiscoveryError::SystemConfig)?
        };
        let opts: &mut ResolverOpts = builder.options_mut();
        opts.timeout = config.lookup_timeout;
        opts.attempts = config.lookup_attempts.max(1);
        // Every address of a dual-stack service, A and AAAA asked in parallel.
        opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        // The resolver's own cache must never hold an answer longer than we would.
        opts.positive_max_ttl = Some(config.max_refresh);
        opts.negative_max_ttl = Some(config.min_refresh);
        if explicit {
            // Given servers are the whole truth: /etc/hosts does not apply.
            opts.use_hosts_file = ResolveHosts::Never;
        }
        let resolver = builder.build().map_err(DiscoveryError::Resolver)?;
        Ok(Self {
            resolver,
            registry,
            config: Arc::new(config),
            watches: Arc::default(),
        })
    }

    /// The endpoint-state registry the sets are built with.
    pub fn registry(&self) -> &Arc<EndpointRegistry> {
        &self.registry
    }

    /// Starts (or joins) resolving `host` for endpoints on `port`. An IP literal gives a
    /// fixed set without DNS. A name is resolved as a fully qualified name (a trailing dot is
    /// added, so search domains never apply), refreshed when its shortest TTL runs out, and
    /// watched by one task however many callers watch it. The task stops when the last
    /// [`DnsWatch`] for it is dropped. Must be called inside a tokio runtime.
    pub fn watch(&self, host: &str, port: u16) -> Result<DnsWatch, DiscoveryError> {
        let literal = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        if let Ok(ip) = literal.parse::<IpAddr>() {
            return Ok(self.static_watch(host, SocketAddr::new(ip, port)));
        }
        let fqdn = fqdn(host)?;
        let key: WatchKey = (fqdn.to_ascii(), port);
        let mut watches = self.watches.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(shared) = watches.get(&key).and_then(Weak::upgrade) {
            return Ok(DnsWatch { shared });
        }
        let runtime =
            tokio::runtime::Handle::try_current().map_err(|_| DiscoveryError::NoRuntime)?;
        let endpoints = Arc::new(ArcSwap::from_pointee(
            EndpointSet::empty().with_health_policy(self.config.health_policy),
        ));
        let (tx, rx) = watch::channel(WatchStatus::default());
        let task = Refresh {
            resolver: self.resolver.clone(),
            name: fqdn,
            port,
            config: Arc::clone(&self.config),
            registry: Arc::clone(&self.registry),
            endpoints: Arc::clone(&endpoints),
            status: tx,
        };
        let handle = runtime.spawn(task.run());
        let shared = Arc::new(WatchShared {
            key: key.clone(),
            endpoints,
            status: rx,
            task: Some(handle.abort_handle()),
            map: Arc::downgrade(&self.watches),
        });
        watches.insert(key, Arc::downgrade(&shared));
        Ok(DnsWatch { shared })
    }

    fn static_watch(&self, host: &str, addr: SocketAddr) -> DnsWatch {
        let set = EndpointSet::from_addrs(&self.registry, [addr])
            .with_health_policy(self.config.health_policy);
        let (_tx, rx) = watch::channel(WatchStatus {
            generation: 1,
            resolved: true,
            stale: false,
            addresses: 1,
            last_error: None,
        });
        DnsWatch {
            shared: Arc::new(WatchShared {
                key: (host.to_owned(), addr.port()),
                endpoints: Arc::new(ArcSwap::from_pointee(set)),
                status: rx,
                task: None,
                map: Weak::new(),
            }),
        }
    }

    /// Names (with ports) currently resolved by a running task.
    pub fn watched_count(&self) -> usize {
        let watches = self.watches.lock().unwrap_or_else(PoisonError::into_inner);
        watches.values().filter(|w| w.strong_count() > 0).count()
    }
}

/// The name as an FQDN, lowercased (DNS names are case-insensitive; one task per name).
fn fqdn(host: &str) -> Result<Name, DiscoveryError> {
    let invalid = || DiscoveryError::InvalidName {
        host: host.to_owned(),
    };
    if host.is_empty() || host == "." {
        return Err(invalid());
    }
    let mut name = Name::from_ascii(host.to_ascii_lowercase()).map_err(|_| invalid())?;
    name.set_fqdn(true);
    Ok(name)
}

/// A handle on the endpoints of one watched name. Clones share the watch; when the last one
/// drops, the name stops being resolved.
#[derive(Clone)]
pub struct DnsWatch {
    shared: Arc<WatchShared>,
}

struct WatchShared {
    key: WatchKey,
    endpoints: Arc<ArcSwap<EndpointSet>>,
    status: watch::Receiver<WatchStatus>,
    task: Option<AbortHandle>,
    map: Weak<WatchMap>,
}

impl Drop for WatchShared {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
        if let Some(map) = self.map.upgrade() {
            let mut map = map.lock().unwrap_or_else(PoisonError::into_inner);
            // Remove our entry unless a new watch of the same name already replaced it.
            if map.get(&self.key).is_some_and(|w| w.strong_count() == 0) {
                map.remove(&self.key);
            }
        }
    }
}

impl fmt::Debug for DnsWatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DnsWatch")
            .field("name", &self.shared.key.0)
            .field("port", &self.shared.key.1)
            .field("status", &*self.shared.status.borrow())
            .finish()
    }
}

impl DnsWatch {
    /// The swapped endpoint set: `load()` it per request.
    pub fn endpoints(&self) -> &Arc<ArcSwap<EndpointSet>> {
        &self.shared.endpoints
    }

    /// The current endpoint set.
    pub fn current(&self) -> Arc<EndpointSet> {
        self.shared.endpoints.load_full()
    }

    /// The watched name (fully qualified, lowercased) or the IP literal.
    pub fn name(&self) -> &str {
        &self.shared.key.0
    }

    /// The endpoints' port.
    pub fn port(&self) -> u16 {
        self.shared.key.1
    }

    /// Where the watch stands.
    pub fn status(&self) -> WatchStatus {
        self.shared.status.borrow().clone()
    }

    /// Whether both handles share one watch.
    pub fn same_watch(&self, other: &DnsWatch) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }

    /// Waits until the current set satisfies `pred`, at most `timeout`. Returns whether it did.
    pub async fn wait_for(&self, timeout: Duration, pred: impl Fn(&EndpointSet) -> bool) -> bool {
        let mut updates = self.shared.status.clone();
        let wait = async {
            loop {
                updates.borrow_and_update();
                if pred(&self.shared.endpoints.load()) {
                    return true;
                }
                if updates.changed().await.is_err() {
                    // The task is gone (static set): no later update can come.
                    return pred(&self.shared.endpoints.load());
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.unwrap_or(false)
    }
}

/// The refresh task of one watched name.
struct Refresh {
    resolver: TokioResolver,
    name: Name,
    port: u16,
    config: Arc<DnsConfig>,
    registry: Arc<EndpointRegistry>,
    endpoints: Arc<ArcSwap<EndpointSet>>,
    status: watch::Sender<WatchStatus>,
}

/// What one lookup said.
enum Answer {
    /// Addresses, valid until the shortest TTL runs out.
    Addresses(Vec<SocketAddr>, Instant),
    /// Authoritatively none (NXDOMAIN, NODATA).
    Nothing(Arc<str>),
    /// No answer (timeout, SERVFAIL, refused, network).
    Failed(Arc<str>),
}

impl Refresh {
    async fn run(self) {
        // Since when lookups have not produced addresses (None = the last one did).
        let mut bad_since: Option<Instant> = None;
        let mut failures: u32 = 0;
        loop {
            let answer = self.lookup().await;
            let now = Instant::now();
            let delay = match answer {
                Answer::Addresses(addrs, valid_until) => {
                    bad_since = None;
                    failures = 0;
                    self.publish(addrs, false, None, true);
                    valid_until
                        .saturating_duration_since(now)
                        .clamp(self.config.min_refresh, self.config.max_refresh)
                }
                Answer::Nothing(err) => {
                    failures = failures.saturating_add(1);
                    let grace = self.config.negative_grace;
                    self.keep_or_drop(now, &mut bad_since, grace, err, failures, true)
                }
                Answer::Failed(err) => {
                    failures = failures.saturating_add(1);
                    let grace = self.config.stale_grace;
                    self.keep_or_drop(now, &mut bad_since, grace, err, failures, false)
                }
            };
            tokio::time::sleep(delay).await;
        }
    }

    /// Keeps the last good set until `grace` has passed since lookups went bad, then empties
    /// it (at once when there is nothing to keep). `answered`: the server said "no such
    /// address" rather than nothing. Returns the delay before the next lookup.
    fn keep_or_drop(
        &self,
        now: Instant,
        bad_since: &mut Option<Instant>,
        grace: Duration,
        err: Arc<str>,
        failures: u32,
        answered: bool,
    ) -> Duration {
        let since = *bad_since.get_or_insert(now);
        let elapsed = now.saturating_duration_since(since);
        if self.endpoints.load().is_empty() {
            self.publish(Vec::new(), false, Some(err), answered);
            self.retry_delay(failures, None)
        } else if elapsed >= grace {
            tracing::warn!(name = %self.name, error = %err, "no DNS answer past the grace period: backend emptied");
            self.publish(Vec::new(), false, Some(err), answered);
            self.retry_delay(failures, None)
        } else {
            if failures == 1 {
                tracing::warn!(name = %self.name, error = %err, "DNS lookup failed: keeping the last good answer");
            }
            let current = self.endpoints.load();
            let addrs = current.endpoints().iter().map(|e| e.addr).collect();
            self.publish(addrs, true, Some(err), answered);
            self.retry_delay(failures, Some(grace.saturating_sub(elapsed)))
        }
    }

    /// 1 s, 2 s, 4 s ... capped at [`FAILURE_RETRY_MAX`], and never past the grace deadline.
    fn retry_delay(&self, failures: u32, until_deadline: Option<Duration>) -> Duration {
        let exp = failures.saturating_sub(1).min(16);
        let backoff = self
            .config
            .min_refresh
            .saturating_mul(1u32 << exp)
            .min(FAILURE_RETRY_MAX.max(self.config.min_refresh));
        match until_deadline {
            Some(d) => backoff.min(d.max(Duration::from_millis(10))),
            None => backoff,
        }
    }

    async fn lookup(&self) -> Answer {
        match self.resolver.lookup_ip(self.name.clone()).await {
            Ok(lookup) => {
                let mut addrs: Vec<SocketAddr> = lookup
                    .iter()
                    .map(|ip| SocketAddr::new(ip, self.port))
                    .collect();
                addrs.sort_unstable();
                addrs.dedup();
                if addrs.is_empty() {
                    Answer::Nothing(Arc::from("no addresses"))
                } else {
                    Answer::Addresses(addrs, lookup.valid_until())
                }
            }
            Err(e) if e.is_no_records_found() => Answer::Nothing(Arc::from(e.to_string())),
            Err(e) => Answer::Failed(Arc::from(e.to_string())),
        }
    }

    /// Swaps in a set of `addrs` unless the current one already has exactly these (a swap
    /// would reset the round-robin cursor for nothing); updates the status either way.
    fn publish(
        &self,
        addrs: Vec<SocketAddr>,
        stale: bool,
        error: Option<Arc<str>>,
        answered: bool,
    ) {
        let current = self.endpoints.load();
        let unchanged = current.len() == addrs.len()
            && current
                .endpoints()
                .iter()
                .zip(&addrs)
                .all(|(e, a)| e.addr == *a && e.serving);
        let count = addrs.len();
        if !unchanged {
            tracing::debug!(name = %self.name, addresses = count, "DNS answer changed");
            let set = EndpointSet::from_addrs(&self.registry, addrs)
                .with_health_policy(self.config.health_policy);
            self.endpoints.store(Arc::new(set));
        }
        self.status.send_modify(|s| {
            if !unchanged {
                s.generation += 1;
            }
            s.resolved |= answered;
            s.stale = stale;
            s.addresses = count;
            s.last_error = error;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::dnsmasq::Dnsmasq;

    const NAME: &str = "chat.agents.svc.cluster.local";

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn ips(set: &EndpointSet) -> Vec<IpAddr> {
        set.endpoints().iter().map(|e| e.addr.ip()).collect()
    }

    /// dnsmasq (the integration tests' launcher) answering for the cluster domain, `records`
    /// as the addresses of [`NAME`]; unknown names get NXDOMAIN.
    fn dnsmasq(records: &[&str]) -> Option<Dnsmasq> {
        Dnsmasq::start_or_skip("cluster.local", &for_name(records))
    }

    fn for_name<'a>(records: &[&'a str]) -> Vec<(&'a str, &'a str)> {
        records.iter().map(|ip| (*ip, NAME)).collect()
    }

    fn discovery(server: SocketAddr, stale_grace: Duration) -> DnsDiscovery {
        let config = DnsConfig {
            nameservers: vec![server],
            stale_grace,
            lookup_timeout: Duration::from_millis(500),
            lookup_attempts: 1,
            ..DnsConfig::default()
        };
        DnsDiscovery::new(config, Arc::new(EndpointRegistry::new())).unwrap()
    }

    const THREE: [&str; 3] = ["127.0.0.1", "127.0.0.2", "127.0.0.3"];

    #[tokio::test]
    async fn resolves_three_records_into_a_set_of_three() {
        let Some(dns) = dnsmasq(&THREE) else {
            return;
        };
        let d = discovery(dns.server(), Duration::from_secs(300));
        let w = d.watch(NAME, 8000).unwrap();
        assert!(w.wait_for(Duration::from_secs(5), |s| s.len() == 3).await);
        let set = w.current();
        assert_eq!(ips(&set), THREE.map(ip).to_vec());
        assert!(set
            .endpoints()
            .iter()
            .all(|e| e.addr.port() == 8000 && e.serving));
        let status = w.status();
        assert!(status.resolved && !status.stale && status.last_error.is_none());
        assert_eq!(w.name(), "chat.agents.svc.cluster.local.");
        // Upper case and a trailing dot name the same watch: one task.
        let again = d.watch("CHAT.agents.svc.cluster.local.", 8000).unwrap();
        assert!(again.same_watch(&w));
        assert_eq!(d.watched_count(), 1);
    }

    #[tokio::test]
    async fn picks_up_changed_records_after_the_ttl() {
        let Some(dns) = dnsmasq(&THREE) else {
            return;
        };
        let d = discovery(dns.server(), Duration::from_secs(300));
        let w = d.watch(NAME, 8000).unwrap();
        assert!(w.wait_for(Duration::from_secs(5), |s| s.len() == 3).await);
        let state_of_2 = d
            .registry()
            .get(SocketAddr::new(ip("127.0.0.2"), 8000))
            .unwrap();
        let started = Instant::now();
        dns.rewrite(&for_name(&["127.0.0.2", "127.0.0.4"]));
        let want = vec![ip("127.0.0.2"), ip("127.0.0.4")];
        assert!(
            w.wait_for(Duration::from_secs(5), |s| ips(s) == want).await,
            "got {:?}",
            ips(&w.current())
        );
        // TTL 1 s, floor 1 s: the change lands within a couple of seconds.
        assert!(started.elapsed() < Duration::from_secs(4));
        // Runtime state of the address that stayed is the same object.
        let after = w.current();
        let kept = after
            .endpoints()
            .iter()
            .find(|e| e.addr.ip() == ip("127.0.0.2"))
            .unwrap();
        assert!(Arc::ptr_eq(&kept.state, &state_of_2));
    }

    #[tokio::test]
    async fn keeps_last_good_answer_when_dns_stops_then_empties_after_grace() {
        let Some(mut dns) = dnsmasq(&THREE) else {
            return;
        };
        let d = discovery(dns.server(), Duration::from_secs(3));
        let w = d.watch(NAME, 8000).unwrap();
        assert!(w.wait_for(Duration::from_secs(5), |s| s.len() == 3).await);
        let generation = w.status().generation;
        dns.stop();
        // The next refreshes fail; the answer is kept and marked stale.
        let mut updates = w.shared.status.clone();
        let stale = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                if updates.borrow_and_update().stale {
                    return true;
                }
                if updates.changed().await.is_err() {
                    return false;
                }
            }
        })
        .await
        .unwrap_or(false);
        assert!(stale, "status never turned stale: {:?}", w.status());
        let status = w.status();
        assert_eq!(
            status.generation, generation,
            "set must not have been swapped"
        );
        assert!(status.last_error.is_some());
        assert_eq!(ips(&w.current()), THREE.map(ip).to_vec());
        // Past the grace period (3 s here) the backend empties.
        assert!(
            w.wait_for(Duration::from_secs(8), EndpointSet::is_empty)
                .await
        );
    }

    #[tokio::test]
    async fn dropping_the_last_handle_stops_the_task() {
        let Some(dns) = dnsmasq(&THREE) else {
            return;
        };
        let d = discovery(dns.server(), Duration::from_secs(300));
        let w1 = d.watch(NAME, 8000).unwrap();
        let w2 = d.watch(NAME, 8000).unwrap();
        let other_port = d.watch(NAME, 9000).unwrap();
        assert_eq!(d.watched_count(), 2);
        assert!(w1.wait_for(Duration::from_secs(5), |s| s.len() == 3).await);
        drop(w1);
        assert_eq!(d.watched_count(), 2, "one handle left: still watched");
        let mut updates = w2.shared.status.clone();
        drop(w2);
        assert_eq!(d.watched_count(), 1);
        // The task was aborted: its status sender is gone.
        let closed = tokio::time::timeout(Duration::from_secs(2), async {
            while updates.changed().await.is_ok() {}
        })
        .await;
        assert!(closed.is_ok());
        drop(other_port);
        assert_eq!(d.watched_count(), 0);
    }

    #[tokio::test]
    async fn unknown_name_is_an_empty_set() {
        let Some(dns) = dnsmasq(&THREE) else {
            return;
        };
        let d = discovery(dns.server(), Duration::from_secs(300));
        let w = d.watch("missing.agents.svc.cluster.local", 80).unwrap();
        assert!(
            w.wait_for(Duration::from_secs(5), |_| w.status().resolved)
                .await
        );
        assert!(w.current().is_empty());
        assert!(w.status().last_error.is_some());
    }

    #[tokio::test]
    async fn removed_name_empties_after_the_negative_grace() {
        let Some(dns) = dnsmasq(&THREE) else {
            return;
        };
        let config = DnsConfig {
            nameservers: vec![dns.server()],
            negative_grace: Duration::from_secs(2),
            lookup_timeout: Duration::from_millis(500),
            lookup_attempts: 1,
            ..DnsConfig::default()
        };
        let d = DnsDiscovery::new(config, Arc::new(EndpointRegistry::new())).unwrap();
        let w = d.watch(NAME, 8000).unwrap();
        assert!(w.wait_for(Duration::from_secs(5), |s| s.len() == 3).await);
        let removed = Instant::now();
        dns.rewrite(&for_name(&[]));
        // NXDOMAIN is an answer: kept through the short negative grace, then emptied.
        assert!(
            w.wait_for(Duration::from_secs(8), EndpointSet::is_empty)
                .await
        );
        let took = removed.elapsed();
        assert!(
            took >= Duration::from_secs(2),
            "emptied after {took:?}, before the grace"
        );
        assert!(w.status().resolved && !w.status().stale);
    }

    #[tokio::test]
    async fn ip_literals_need_no_dns() {
        // No server at all: port 9 on loopback answers nothing.
        let d = discovery(
            SocketAddr::from(([127, 0, 0, 1], 9)),
            Duration::from_secs(1),
        );
        let v4 = d.watch("10.1.2.3", 8080).unwrap();
        assert_eq!(
            v4.current().endpoints()[0].addr,
            SocketAddr::from(([10, 1, 2, 3], 8080))
        );
        let v6 = d.watch("[::1]", 8080).unwrap();
        assert_eq!(v6.current().endpoints()[0].addr.ip(), ip("::1"));
        assert!(v6.status().resolved);
        assert!(
            v4.wait_for(Duration::from_millis(10), |s| s.len() == 1)
                .await
        );
        assert_eq!(d.watched_count(), 0);
    }

    #[test]
    fn invalid_names_and_missing_runtime_are_errors() {
        let d = discovery(
            SocketAddr::from(([127, 0, 0, 1], 9)),
            Duration::from_secs(1),
        );
        assert!(matches!(
            d.watch("", 80),
            Err(DiscoveryError::InvalidName { .. })
        ));
        assert!(matches!(
            d.watch("bad..name", 80),
            Err(DiscoveryError::InvalidName { .. })
        ));
        assert!(matches!(
            d.watch("fine.example", 80),
            Err(DiscoveryError::NoRuntime)
        ));
    }
}
