//! Reflectors (one per kind and watched namespace) and what is built from them: the `Store` that
//! compile reads, and the EndpointSlice → `SliceEndpoints` mapping. Only gathers; never compiles.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Debug;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{Ingress, IngressClass};
use kube::runtime::reflector::{self, ObjectRef, Store as Reader};
use kube::runtime::utils::Backoff;
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::watch as signal;
use tokio::task::JoinHandle;

use super::health::{watch_unreachable, ApiHealth};
use super::KubeOptions;
use crate::api::gateway::{Gateway, GatewayClass, HTTPRoute, ReferenceGrant};
use crate::api::{AgentApiKey, AgentRoute};
use crate::config::gateway::GatewayInputs;
use crate::config::ingress::IngressInputs;
use crate::config::{ObjectKey, Store};
use crate::discovery::endpointslices::SliceEndpoint;
use crate::discovery::SliceEndpoints;

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Secret types the gateway reads: TLS certificates (`tls.secretName`) and API keys
/// (`kubectl create secret generic` makes `Opaque`). Service-account tokens, registry
/// credentials, Helm release records and the rest are never listed, never cached.
pub const SECRET_TYPES: [&str; 2] = ["kubernetes.io/tls", "Opaque"];

/// `kubectl apply` keeps the whole object here, a Secret's data included: never cache it.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Exponential backoff with full jitter between watch retries (the API server is away or
/// refusing): from 250 ms up to `max`.
pub struct WatchBackoff {
    next: Duration,
    max: Duration,
}

impl WatchBackoff {
    const MIN: Duration = Duration::from_millis(250);

    pub fn new(max: Duration) -> Self {
        Self {
            next: Self::MIN,
            max: max.max(Self::MIN),
        }
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        let cap = self.next;
        self.next = (self.next * 2).min(self.max);
        // Jitter in [cap/2, cap]: replicas that lost the server together do not return together.
        let half = cap / 2;
        Some(half + half.mul_f64(rand::random::<f64>()))
    }
}

impl Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = Self::MIN;
    }
}

/// Read handles of every reflector store.
#[derive(Clone)]
pub struct Reflectors {
    pub routes: Vec<Reader<AgentRoute>>,
    pub keys: Vec<Reader<AgentApiKey>>,
    pub secrets: Vec<Reader<Secret>>,
    pub services: Vec<Reader<Service>>,
    pub slices: Vec<Reader<EndpointSlice>>,
    /// Secrets the flags name (`--mcp-session-secret`): wanted whatever routes and keys say.
    pub flag_secrets: Vec<ObjectKey>,
    /// The Gateway API kinds: empty when their CRDs are not installed.
    pub gateway_api: bool,
    pub classes: Vec<Reader<GatewayClass>>,
    pub gateways: Vec<Reader<Gateway>>,
    pub http_routes: Vec<Reader<HTTPRoute>>,
    pub grants: Vec<Reader<ReferenceGrant>>,
    /// Ingress and IngressClass: empty when IngressClasses cannot be listed.
    pub ingress: bool,
    pub ingresses: Vec<Reader<Ingress>>,
    pub ingress_classes: Vec<Reader<IngressClass>>,
    /// Namespaces (for their labels: `allowedRoutes` `Selector`): empty when not watched.
    pub namespaces: Vec<Reader<Namespace>>,
}

fn key_of<K: Resource>(o: &K) -> ObjectKey {
    ObjectKey::new(
        o.meta().namespace.clone().unwrap_or_default(),
        o.meta().name.clone().unwrap_or_default(),
    )
}

fn sorted_clones<K: Resource<DynamicType = ()> + Clone>(stores: &[Reader<K>]) -> Vec<K> {
    let mut all: Vec<K> = stores
        .iter()
        .flat_map(|s| s.state())
        .map(|o| (*o).clone())
        .collect();
    // Reflector stores are hash maps; sorting keeps compile's tie-break (the oldest, then this
    // order) identical across compiles and replicas.
    all.sort_by_key(|o| key_of(o));
    all
}

impl Reflectors {
    /// Resolves once every store has finished its first list.
    pub async fn wait_until_ready(&self) {
        for s in &self.routes {
            let _ = s.wait_until_ready().await;
        }
        for s in &self.keys {
            let _ = s.wait_until_ready().await;
        }
        for s in &self.secrets {
            let _ = s.wait_until_ready().await;
        }
        for s in &self.services {
            let _ = s.wait_until_ready().await;
        }
        for s in &self.slices {
            let _ = s.wait_until_ready().await;
        }
        for s in &self.classes {
            let _ = s.wait_until_ready().await;
        }
        for s in &self.gateways {
            let _ = s.wait_until_ready().await;
        }
        for s in &self.http_routes {
            let _ = s.wait_until_ready().await;
        }
        for s in &self.grants {
            let _ = s.wait_until_ready().await;
        }
        for s in &self.ingresses {
            let _ = s.wait_until_ready().await;
        }
        for s in &self.ingress_classes {
            let _ = s.wait_until_ready().await;
        }
    }

    /// Counts for the log line at sync.
    pub fn describe(&self) -> String {
        let n = |v: usize| v.to_string();
        let mut out = format!(
            "routes={} keys={} secrets={} services={} endpointslices={}",
            n(self.routes.iter().map(Reader::len).sum()),
            n(self.keys.iter().map(Reader::len).sum()),
            n(self.secrets.iter().map(Reader::len).sum()),
            n(self.services.iter().map(Reader::len).sum()),
            n(self.slices.iter().map(Reader::len).sum()),
        );
        if self.gateway_api {
            out.push_str(&format!(
                " gatewayclasses={} gateways={} httproutes={} referencegrants={}",
                n(self.classes.iter().map(Reader::len).sum()),
                n(self.gateways.iter().map(Reader::len).sum()),
                n(self.http_routes.iter().map(Reader::len).sum()),
                n(self.grants.iter().map(Reader::len).sum()),
            ));
        }
        if self.ingress {
            out.push_str(&format!(
                " ingressclasses={} ingresses={}",
                n(self.ingress_classes.iter().map(Reader::len).sum()),
                n(self.ingresses.iter().map(Reader::len).sum()),
            ));
        }
        out
    }

    /// The Secrets some route (`tls.secretName`), key (`secretRef`) or Gateway listener
    /// (`tls.certificateRefs`) names.
    fn referenced_secrets(
        routes: &[AgentRoute],
        keys: &[AgentApiKey],
        gateways: &[Gateway],
        ingresses: &[Ingress],
    ) -> HashSet<ObjectKey> {
        let mut out = HashSet::new();
        for i in ingresses {
            out.extend(ingress_secrets(i));
        }
        for g in gateways {
            out.extend(gateway_secrets(g));
        }
        for r in routes {
            if let Some(tls) = &r.spec.tls {
                out.insert(ObjectKey::new(key_of(r).namespace, &tls.secret_name));
            }
        }
        for k in keys {
            if let Some(s) = &k.spec.secret_ref {
                out.insert(ObjectKey::new(key_of(k).namespace, &s.name));
            }
        }
        out
    }

    /// Whether a route or key names this Secret (else its changes cannot matter).
    pub fn is_referenced(&self, secret: &ObjectKey) -> bool {
        if self.flag_secrets.contains(secret) {
            return true;
        }
        let in_ns = |ns: &Option<String>| ns.as_deref() == Some(&*secret.namespace);
        self.routes.iter().any(|s| {
            s.find(|r| {
                in_ns(&r.metadata.namespace)
                    && r.spec
                        .tls
                        .as_ref()
                        .is_some_and(|t| *t.secret_name == *secret.name)
            })
            .is_some()
        }) || self.ingresses.iter().any(|s| {
            s.find(|i| ingress_secrets(i).any(|k| k == *secret))
                .is_some()
        }) || self.gateways.iter().any(|s| {
            s.find(|g| gateway_secrets(g).any(|k| k == *secret))
                .is_some()
        }) || self.keys.iter().any(|s| {
            s.find(|k| {
                in_ns(&k.metadata.namespace)
                    && k.spec
                        .secret_ref
                        .as_ref()
                        .is_some_and(|r| *r.name == *secret.name)
            })
            .is_some()
        })
    }

    /// The `Store` compile reads: every route and key, the referenced Secrets, the Service names.
    pub fn store(&self) -> Store {
        let routes = sorted_clones(&self.routes);
        let keys = sorted_clones(&self.keys);
        let gateway_api = GatewayInputs {
            installed: self.gateway_api,
            classes: sorted_clones(&self.classes),
            gateways: sorted_clones(&self.gateways),
            http_routes: sorted_clones(&self.http_routes),
            grants: sorted_clones(&self.grants),
            namespaces: (!self.namespaces.is_empty()).then(|| {
                self.namespaces
                    .iter()
                    .flat_map(|s| s.state())
                    .map(|n| (n.name_any(), n.labels().clone()))
                    .collect()
            }),
        };
        let ingress = IngressInputs {
            ingresses: sorted_clones(&self.ingresses),
            classes: sorted_clones(&self.ingress_classes),
        };
        let mut wanted =
            Self::referenced_secrets(&routes, &keys, &gateway_api.gateways, &ingress.ingresses);
        wanted.extend(self.flag_secrets.iter().cloned());
        let mut secrets = BTreeMap::new();
        for s in &self.secrets {
            for secret in s.state() {
                let k = key_of(&*secret);
                if wanted.contains(&k) {
                    secrets.insert(k, (*secret).clone());
                }
            }
        }
        let services: BTreeSet<ObjectKey> = self
            .services
            .iter()
            .flat_map(|s| s.state())
            .map(|s| key_of(&*s))
            .collect();
        Store {
            routes,
            keys,
            secrets,
            services: Some(services),
            origins: BTreeMap::new(),
            gateway_api,
            ingress,
        }
    }

    fn service(&self, ns: &str, name: &str) -> Option<Arc<Service>> {
        let r = ObjectRef::new(name).within(ns);
        self.services.iter().find_map(|s| s.get(&r))
    }

    fn slices_of(&self, ns: &str, name: &str) -> Vec<Arc<EndpointSlice>> {
        self.slices
            .iter()
            .flat_map(|s| {
                s.state_filter(|e| {
                    e.metadata.namespace.as_deref() == Some(ns)
                        && e.labels().get(SERVICE_NAME_LABEL).map(String::as_str) == Some(name)
                })
            })
            .collect()
    }
}

/// The Secrets a Gateway's listeners name (`tls.certificateRefs`, the namespace defaulting to
/// the Gateway's).
fn gateway_secrets(g: &Gateway) -> impl Iterator<Item = ObjectKey> + '_ {
    let ns = g.metadata.namespace.as_deref().unwrap_or("default");
    g.spec
        .listeners
        .iter()
        .filter_map(|l| l.tls.as_ref())
        .flat_map(|t| &t.certificate_refs)
        .map(move |r| ObjectKey::new(r.namespace.as_deref().unwrap_or(ns), &r.name))
}

/// The Secrets an Ingress's `tls` names (in its namespace).
fn ingress_secrets(i: &Ingress) -> impl Iterator<Item = ObjectKey> + '_ {
    let ns = i.metadata.namespace.as_deref().unwrap_or("default");
    i.spec
        .iter()
        .flat_map(|s| s.tls.iter().flatten())
        .filter_map(|t| t.secret_name.as_deref())
        .map(move |n| ObjectKey::new(ns, n))
}

/// The endpoints of each port of a Service, from its EndpointSlices. A Service port maps to the
/// slice port of the same name (both unnamed for a single-port Service); the slice port carries
/// the target port. Ready (or unknown) endpoints serve; terminating ones stay, not serving, so
/// they finish their requests; not-ready ones are left out.
pub fn service_port_endpoints(
    svc: &Service,
    slices: &[Arc<EndpointSlice>],
) -> Vec<(u16, Vec<SliceEndpoint>)> {
    let ports = svc
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .map(Vec::as_slice)
        .unwrap_or_default();
    let mut out = Vec::new();
    for sp in ports {
        let Ok(service_port) = u16::try_from(sp.port) else {
            continue;
        };
        if sp.protocol.as_deref().is_some_and(|p| p != "TCP") {
            continue;
        }
        let name = sp.name.as_deref().unwrap_or("");
        let mut by_addr: BTreeMap<SocketAddr, bool> = BTreeMap::new();
        for slice in slices {
            if slice.address_type != "IPv4" && slice.address_type != "IPv6" {
                continue; // FQDN slices name hosts, not addresses
            }
            let Some(port) = slice
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref().unwrap_or("") == name)
                .and_then(|p| p.port)
                .and_then(|p| u16::try_from(p).ok())
            else {
                continue;
            };
            for ep in slice.endpoints.iter().flatten() {
                let c = ep.conditions.clone().unwrap_or_default();
                let terminating = c.terminating == Some(true);
                // `ready` unset means unknown, which consumers treat as ready.
                let ready = c.ready != Some(false) && !terminating;
                if !ready && !terminating {
                    continue;
                }
                let Some(ip) = ep.addresses.first().and_then(|a| a.parse::<IpAddr>().ok()) else {
                    continue;
                };
                // The same endpoint may sit in two slices while they are rebalanced: serving wins.
                let serving = by_addr.entry(SocketAddr::new(ip, port)).or_insert(false);
                *serving |= ready;
            }
        }
        let endpoints = by_addr
            .into_iter()
            .map(|(addr, serving)| SliceEndpoint { addr, serving })
            .collect();
        out.push((service_port, endpoints));
    }
    out
}

/// Writes Service endpoint sets into `SliceEndpoints`; never touches routes (no recompile).
pub struct EndpointMapper {
    slices: Arc<SliceEndpoints>,
    status: Arc<signal::Sender<u64>>,
    /// Ports written per Service, so a port or Service that goes away is emptied.
    written: Mutex<HashMap<(String, String), Vec<u16>>>,
}

impl EndpointMapper {
    pub fn new(slices: Arc<SliceEndpoints>, status: Arc<signal::Sender<u64>>) -> Self {
        Self {
            slices,
            status,
            written: Mutex::new(HashMap::new()),
        }
    }

    /// Recomputes one Service's sets from the stores. Serialized, so a slower pass never
    /// overwrites a newer one.
    pub fn recompute(&self, r: &Reflectors, ns: &str, name: &str) {
        let mut written = match self.written.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        self.recompute_locked(&mut written, r, ns, name);
        drop(written);
        self.status.send_modify(|n| *n += 1);
    }

    fn recompute_locked(
        &self,
        written: &mut HashMap<(String, String), Vec<u16>>,
        r: &Reflectors,
        ns: &str,
        name: &str,
    ) {
        let sets = match r.service(ns, name) {
            Some(svc) => service_port_endpoints(&svc, &r.slices_of(ns, name)),
            None => Vec::new(),
        };
        let id = (ns.to_string(), name.to_string());
        let ports: Vec<u16> = sets.iter().map(|(p, _)| *p).collect();
        for gone in written
            .get(&id)
            .into_iter()
            .flatten()
            .filter(|p| !ports.contains(p))
        {
            self.slices
                .update(&(ns.to_string(), name.to_string(), *gone), &[]);
        }
        for (port, endpoints) in &sets {
            self.slices
                .update(&(ns.to_string(), name.to_string(), *port), endpoints);
        }
        if ports.is_empty() {
            written.remove(&id);
        } else {
            written.insert(id, ports);
        }
    }

    /// Recomputes every known Service (after a relist, where deletions may have been missed).
    pub fn recompute_all(&self, r: &Reflectors) {
        let mut written = match self.written.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let mut ids: BTreeSet<(String, String)> = written.keys().cloned().collect();
        for s in &r.services {
            for svc in s.state() {
                let k = key_of(&*svc);
                ids.insert((k.namespace.to_string(), k.name.to_string()));
            }
        }
        for (ns, name) in ids {
            self.recompute_locked(&mut written, r, &ns, &name);
        }
        drop(written);
        self.status.send_modify(|n| *n += 1);
    }
}

/// Tracks which objects a reflector holds, to tell a new or deleted one from an update.
#[derive(Default)]
struct KeyTracker {
    known: HashSet<ObjectKey>,
    buffer: HashSet<ObjectKey>,
}

impl KeyTracker {
    /// Returns true when the set of keys changed.
    fn on<K: Resource>(&mut self, ev: &Event<K>) -> bool {
        match ev {
            Event::Apply(o) => self.known.insert(key_of(o)),
            Event::Delete(o) => self.known.remove(&key_of(o)),
            Event::Init => {
                self.buffer.clear();
                false
            }
            Event::InitApply(o) => {
                self.buffer.insert(key_of(o));
                false
            }
            Event::InitDone => {
                let changed = self.buffer != self.known;
                self.known = std::mem::take(&mut self.buffer);
                changed
            }
        }
    }
}

/// Drops what is never read and must not be cached: `managedFields` and the last-applied copy.
fn strip<K: Resource>(o: &mut K) {
    let meta = o.meta_mut();
    meta.managed_fields = None;
    if let Some(a) = meta.annotations.as_mut() {
        a.remove(LAST_APPLIED);
    }
}

/// How a reflector retries, and where it reports that the API server is away.
#[derive(Clone)]
struct Retry {
    backoff_max: Duration,
    health: Arc<ApiHealth>,
}

/// Runs one reflector: lists and watches with backoff, keeps the store, calls `on_event` after
/// the store has taken each event. The API server being away goes to the outage tracker (one
/// line per outage for every watch together); other errors are logged once per failing streak
/// and retried forever.
fn drive<K>(
    kind: &'static str,
    scope: String,
    writer: reflector::store::Writer<K>,
    api: Api<K>,
    config: watcher::Config,
    retry: Retry,
    mut on_event: impl FnMut(&Event<K>) + Send + 'static,
) -> JoinHandle<()>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let stream = watcher(api, config)
        .modify(strip::<K>)
        .backoff(WatchBackoff::new(retry.backoff_max));
    let health = retry.health;
    let stream = reflector::reflector(writer, stream);
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        let mut failing = false;
        while let Some(item) = stream.next().await {
            match item {
                Ok(ev) => {
                    health.reached();
                    if failing && matches!(ev, Event::InitDone | Event::Apply(_) | Event::Delete(_))
                    {
                        tracing::info!(kind, scope, "watch resumed");
                        failing = false;
                    }
                    on_event(&ev);
                }
                Err(e) if watch_unreachable(&e) => {
                    health.unreachable(kind, &e);
                }
                // 410 Gone: the resourceVersion is compacted away (after an outage, as a rule);
                // the watcher lists again by itself. Routine, not a warning.
                Err(watcher::Error::WatchError(s)) if s.code == 410 => {
                    tracing::debug!(kind, scope, reason = %s.message, "watch expired; listing again");
                }
                Err(e) => {
                    if failing {
                        tracing::debug!(kind, scope, error = %e, "watch still failing");
                    } else {
                        tracing::warn!(kind, scope, error = %e,
                            "watch failed; serving the last known state and retrying with backoff");
                    }
                    failing = true;
                }
            }
        }
    })
}

fn api<K>(client: &Client, ns: &Option<String>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match ns {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

fn bump(tx: &signal::Sender<u64>) {
    tx.send_modify(|n| *n += 1);
}

/// Remembers each object's `metadata.generation`, which moves with the spec but not with
/// status: the status the leader writes must not trigger a compile on every replica.
#[derive(Default)]
struct GenerationTracker {
    seen: HashMap<ObjectKey, Option<i64>>,
    buffer: HashMap<ObjectKey, Option<i64>>,
}

impl GenerationTracker {
    /// Returns true when the event can change what compile builds.
    fn on<K: Resource>(&mut self, ev: &Event<K>) -> bool {
        match ev {
            Event::Apply(o) => {
                self.seen.insert(key_of(o), o.meta().generation) != Some(o.meta().generation)
            }
            Event::Delete(o) => {
                self.seen.remove(&key_of(o));
                true
            }
            Event::Init => {
                self.buffer.clear();
                false
            }
            Event::InitApply(o) => {
                self.buffer.insert(key_of(o), o.meta().generation);
                false
            }
            Event::InitDone => {
                self.seen = std::mem::take(&mut self.buffer);
                true
            }
        }
    }
}

/// A handler that asks for a compile when an object of a kind compile reads whole is added,
/// deleted, or has its spec changed.
fn config_change<K: Resource>(
    config: Arc<signal::Sender<u64>>,
) -> impl FnMut(&Event<K>) + Send + 'static {
    let mut tracker = GenerationTracker::default();
    move |ev| {
        if tracker.on(ev) {
            bump(&config);
        }
    }
}

/// The write halves of the reflector stores, by watched scope (`None`: all namespaces).
type Writers<K> = Vec<(Option<String>, reflector::store::Writer<K>)>;

/// Every store's writer, made together with the readers of [`Reflectors`].
#[derive(Default)]
struct AllWriters {
    routes: Writers<AgentRoute>,
    keys: Writers<AgentApiKey>,
    secrets: Vec<(
        Option<String>,
        &'static str,
        reflector::store::Writer<Secret>,
    )>,
    services: Writers<Service>,
    slices: Writers<EndpointSlice>,
    classes: Writers<GatewayClass>,
    gateways: Writers<Gateway>,
    http_routes: Writers<HTTPRoute>,
    grants: Writers<ReferenceGrant>,
    ingresses: Writers<Ingress>,
    ingress_classes: Writers<IngressClass>,
    namespaces: Writers<Namespace>,
}

/// A new store for scope `ns`: its reader goes to `readers`, its writer to `writers`.
fn new_store<K>(ns: &Option<String>, readers: &mut Vec<Reader<K>>, writers: &mut Writers<K>)
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    let (rd, w) = reflector::store();
    readers.push(rd);
    writers.push((ns.clone(), w));
}

/// The stores of every kind and scope the options ask for. Readers first: handlers read other
/// kinds' stores (a slice event needs its Service).
fn make_stores(opts: &KubeOptions, scopes: &[Option<String>]) -> (Reflectors, AllWriters) {
    let mut w = AllWriters::default();
    let mut r = Reflectors {
        routes: Vec::new(),
        keys: Vec::new(),
        secrets: Vec::new(),
        services: Vec::new(),
        slices: Vec::new(),
        flag_secrets: opts.mcp_session_secret.iter().cloned().collect(),
        gateway_api: opts.gateway_api,
        classes: Vec::new(),
        gateways: Vec::new(),
        http_routes: Vec::new(),
        grants: Vec::new(),
        ingress: opts.ingress,
        ingresses: Vec::new(),
        ingress_classes: Vec::new(),
        namespaces: Vec::new(),
    };
    if opts.gateway_api && opts.namespace_labels {
        new_store(&None, &mut r.namespaces, &mut w.namespaces);
    }
    if opts.ingress {
        // IngressClasses are cluster-scoped too.
        new_store(&None, &mut r.ingress_classes, &mut w.ingress_classes);
    }
    if opts.gateway_api {
        // GatewayClasses are cluster-scoped: one watch whatever the namespaces.
        new_store(&None, &mut r.classes, &mut w.classes);
    }
    for ns in scopes {
        new_store(ns, &mut r.routes, &mut w.routes);
        new_store(ns, &mut r.keys, &mut w.keys);
        for ty in SECRET_TYPES {
            let (rd, wr) = reflector::store();
            r.secrets.push(rd);
            w.secrets.push((ns.clone(), ty, wr));
        }
        new_store(ns, &mut r.services, &mut w.services);
        if opts.endpoint_slices {
            new_store(ns, &mut r.slices, &mut w.slices);
        }
        if opts.gateway_api {
            new_store(ns, &mut r.gateways, &mut w.gateways);
            new_store(ns, &mut r.http_routes, &mut w.http_routes);
            new_store(ns, &mut r.grants, &mut w.grants);
        }
        if opts.ingress {
            new_store(ns, &mut r.ingresses, &mut w.ingresses);
        }
    }
    (r, w)
}

/// What every reflector task is started with.
struct Starter<'a> {
    client: &'a Client,
    config: Arc<signal::Sender<u64>>,
    retry: Retry,
    base: watcher::Config,
    tasks: Vec<JoinHandle<()>>,
}

fn scope_name(ns: &Option<String>) -> String {
    ns.clone().unwrap_or_else(|| "*".to_string())
}

impl Starter<'_> {
    /// Watches a namespaced kind that compile reads whole: a spec change asks for a compile.
    fn config_kind<K>(&mut self, kind: &'static str, writers: Writers<K>)
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
            + Clone
            + DeserializeOwned
            + Debug
            + Send
            + Sync
            + 'static,
    {
        for (ns, w) in writers {
            let on = config_change(self.config.clone());
            self.tasks.push(drive::<K>(
                kind,
                scope_name(&ns),
                w,
                api(self.client, &ns),
                self.base.clone(),
                self.retry.clone(),
                on,
            ));
        }
    }

    /// Watches a cluster-scoped kind that compile reads whole.
    fn cluster_kind<K>(&mut self, kind: &'static str, writers: Writers<K>)
    where
        K: Resource<Scope = k8s_openapi::ClusterResourceScope, DynamicType = ()>
            + Clone
            + DeserializeOwned
            + Debug
            + Send
            + Sync
            + 'static,
    {
        for (_, w) in writers {
            let on = config_change(self.config.clone());
            self.tasks.push(drive::<K>(
                kind,
                "*".to_string(),
                w,
                Api::all(self.client.clone()),
                self.base.clone(),
                self.retry.clone(),
                on,
            ));
        }
    }

    /// Namespaces: only their labels matter (they have no generation to tell spec changes by).
    fn namespaces(&mut self, writers: Writers<Namespace>) {
        for (_, w) in writers {
            let config = self.config.clone();
            let mut seen: HashMap<String, BTreeMap<String, String>> = HashMap::new();
            let mut buffer: HashMap<String, BTreeMap<String, String>> = HashMap::new();
            let on = move |ev: &Event<Namespace>| {
                let changed = match ev {
                    Event::Apply(n) => {
                        seen.insert(n.name_any(), n.labels().clone()) != Some(n.labels().clone())
                    }
                    Event::Delete(n) => seen.remove(&n.name_any()).is_some(),
                    Event::Init => {
                        buffer.clear();
                        false
                    }
                    Event::InitApply(n) => {
                        buffer.insert(n.name_any(), n.labels().clone());
                        false
                    }
                    Event::InitDone => {
                        seen = std::mem::take(&mut buffer);
                        true
                    }
                };
                if changed {
                    bump(&config);
                }
            };
            self.tasks.push(drive::<Namespace>(
                "Namespace",
                "*".to_string(),
                w,
                Api::all(self.client.clone()),
                self.base.clone(),
                self.retry.clone(),
                on,
            ));
        }
    }

    fn secrets(
        &mut self,
        writers: Vec<(
            Option<String>,
            &'static str,
            reflector::store::Writer<Secret>,
        )>,
        shared: &Arc<Reflectors>,
    ) {
        for (ns, ty, w) in writers {
            let config = self.config.clone();
            let readers = shared.clone();
            let on = move |ev: &Event<Secret>| match ev {
                // Only a Secret some route or key names can change the configuration.
                Event::Apply(s) | Event::Delete(s) if readers.is_referenced(&key_of(s)) => {
                    bump(&config)
                }
                Event::InitDone => bump(&config),
                _ => {}
            };
            self.tasks.push(drive::<Secret>(
                "Secret",
                format!("{} type={ty}", scope_name(&ns)),
                w,
                api(self.client, &ns),
                self.base.clone().fields(&format!("type={ty}")),
                self.retry.clone(),
                on,
            ));
        }
    }

    fn services(
        &mut self,
        writers: Writers<Service>,
        shared: &Arc<Reflectors>,
        mapper: &Arc<EndpointMapper>,
        slices_on: bool,
    ) {
        for (ns, w) in writers {
            let config = self.config.clone();
            let readers = shared.clone();
            let mapper = mapper.clone();
            let mut tracker = KeyTracker::default();
            let on = move |ev: &Event<Service>| {
                // Routes only care whether a Service exists: recompile when the set changes.
                if tracker.on(ev) {
                    bump(&config);
                }
                if !slices_on {
                    return;
                }
                match ev {
                    Event::Apply(s) | Event::Delete(s) => {
                        let k = key_of(s);
                        mapper.recompute(&readers, &k.namespace, &k.name);
                    }
                    Event::InitDone => mapper.recompute_all(&readers),
                    _ => {}
                }
            };
            self.tasks.push(drive::<Service>(
                "Service",
                scope_name(&ns),
                w,
                api(self.client, &ns),
                self.base.clone(),
                self.retry.clone(),
                on,
            ));
        }
    }

    fn slices(
        &mut self,
        writers: Writers<EndpointSlice>,
        shared: &Arc<Reflectors>,
        mapper: &Arc<EndpointMapper>,
    ) {
        for (ns, w) in writers {
            let readers = shared.clone();
            let mapper = mapper.clone();
            let on = move |ev: &Event<EndpointSlice>| match ev {
                Event::Apply(s) | Event::Delete(s) => {
                    if let (Some(ns), Some(svc)) = (
                        s.metadata.namespace.as_deref(),
                        s.labels().get(SERVICE_NAME_LABEL),
                    ) {
                        mapper.recompute(&readers, ns, svc);
                    }
                }
                Event::InitDone => mapper.recompute_all(&readers),
                _ => {}
            };
            self.tasks.push(drive::<EndpointSlice>(
                "EndpointSlice",
                scope_name(&ns),
                w,
                api(self.client, &ns),
                // Only slices that belong to a Service.
                self.base.clone().labels(SERVICE_NAME_LABEL),
                self.retry.clone(),
                on,
            ));
        }
    }
}

/// Starts every reflector. `config` is bumped on changes that need a compile; endpoint changes
/// go to the mapper instead.
pub fn start(
    client: &Client,
    opts: &KubeOptions,
    config: Arc<signal::Sender<u64>>,
    mapper: Arc<EndpointMapper>,
    health: Arc<ApiHealth>,
) -> (Reflectors, Vec<JoinHandle<()>>) {
    let scopes: Vec<Option<String>> = if opts.watch_namespaces.is_empty() {
        vec![None]
    } else {
        opts.watch_namespaces.iter().cloned().map(Some).collect()
    };
    let (r, w) = make_stores(opts, &scopes);
    // The handlers need the readers; the readers are cheap clones of shared maps.
    let shared = Arc::new(r.clone());
    let mut s = Starter {
        client,
        config,
        retry: Retry {
            backoff_max: opts.watch_backoff_max,
            health,
        },
        base: watcher::Config::default(),
        tasks: Vec::new(),
    };
    s.config_kind::<AgentRoute>("AgentRoute", w.routes);
    s.cluster_kind::<GatewayClass>("GatewayClass", w.classes);
    s.cluster_kind::<IngressClass>("IngressClass", w.ingress_classes);
    s.config_kind::<Ingress>("Ingress", w.ingresses);
    s.namespaces(w.namespaces);
    s.config_kind::<Gateway>("Gateway", w.gateways);
    s.config_kind::<HTTPRoute>("HTTPRoute", w.http_routes);
    s.config_kind::<ReferenceGrant>("ReferenceGrant", w.grants);
    s.config_kind::<AgentApiKey>("AgentApiKey", w.keys);
    s.secrets(w.secrets, &shared);
    s.services(w.services, &shared, &mapper, opts.endpoint_slices);
    s.slices(w.slices, &shared, &mapper);
    (r, s.tasks)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ServicePort, ServiceSpec};
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort};
    use kube::api::ObjectMeta;

    fn svc(ports: &[(Option<&str>, i32)]) -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some("chat".into()),
                namespace: Some("agents".into()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                ports: Some(
                    ports
                        .iter()
                        .map(|(n, p)| ServicePort {
                            name: n.map(str::to_string),
                            port: *p,
                            ..Default::default()
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn ep(ip: &str, ready: Option<bool>, terminating: Option<bool>) -> Endpoint {
        Endpoint {
            addresses: vec![ip.to_string()],
            conditions: Some(EndpointConditions {
                ready,
                serving: ready,
                terminating,
            }),
            ..Default::default()
        }
    }

    fn slice(ports: &[(Option<&str>, i32)], eps: Vec<Endpoint>) -> Arc<EndpointSlice> {
        Arc::new(EndpointSlice {
            address_type: "IPv4".into(),
            metadata: ObjectMeta {
                name: Some("chat-abc".into()),
                namespace: Some("agents".into()),
                ..Default::default()
            },
            ports: Some(
                ports
                    .iter()
                    .map(|(n, p)| EndpointPort {
                        name: n.map(str::to_string),
                        port: Some(*p),
                        ..Default::default()
                    })
                    .collect(),
            ),
            endpoints: Some(eps),
        })
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ready_terminating_and_not_ready_endpoints() {
        let s = svc(&[(None, 80)]);
        let sl = slice(
            &[(None, 8080)],
            vec![
                ep("192.0.2.1", Some(true), None),
                ep("192.0.2.2", None, None),
                ep("192.0.2.3", Some(false), None),
                ep("192.0.2.4", Some(false), Some(true)),
            ],
        );
        let got = service_port_endpoints(&s, &[sl]);
        assert_eq!(
            got,
            vec![(
                80,
                vec![
                    SliceEndpoint {
                        addr: addr("192.0.2.1:8080"),
                        serving: true
                    },
                    SliceEndpoint {
                        addr: addr("192.0.2.2:8080"),
                        serving: true
                    },
                    SliceEndpoint {
                        addr: addr("192.0.2.4:8080"),
                        serving: false
                    },
                ]
            )]
        );
    }

    #[test]
    fn service_ports_map_to_slice_ports_by_name() {
        let s = svc(&[(Some("http"), 80), (Some("grpc"), 9000)]);
        let sl = slice(
            &[(Some("grpc"), 50051), (Some("http"), 8080)],
            vec![ep("192.0.2.1", Some(true), None)],
        );
        let got = service_port_endpoints(&s, &[sl]);
        assert_eq!(got[0].0, 80);
        assert_eq!(got[0].1[0].addr, addr("192.0.2.1:8080"));
        assert_eq!(got[1].0, 9000);
        assert_eq!(got[1].1[0].addr, addr("192.0.2.1:50051"));
    }

    #[test]
    fn an_endpoint_in_two_slices_counts_once_and_serving_wins() {
        let s = svc(&[(None, 80)]);
        let a = slice(
            &[(None, 8080)],
            vec![ep("192.0.2.1", Some(false), Some(true))],
        );
        let b = slice(&[(None, 8080)], vec![ep("192.0.2.1", Some(true), None)]);
        let got = service_port_endpoints(&s, &[a, b]);
        assert_eq!(
            got[0].1,
            vec![SliceEndpoint {
                addr: addr("192.0.2.1:8080"),
                serving: true
            }]
        );
    }

    #[test]
    fn fqdn_slices_and_unmatched_ports_are_ignored() {
        let s = svc(&[(Some("http"), 80)]);
        let mut fqdn = (*slice(
            &[(Some("http"), 8080)],
            vec![ep("example.com", Some(true), None)],
        ))
        .clone();
        fqdn.address_type = "FQDN".into();
        let other = slice(
            &[(Some("metrics"), 9090)],
            vec![ep("192.0.2.9", Some(true), None)],
        );
        let got = service_port_endpoints(&s, &[Arc::new(fqdn), other]);
        assert_eq!(got, vec![(80, vec![])]);
    }

    #[test]
    fn backoff_grows_to_its_cap_and_resets() {
        let mut b = WatchBackoff::new(Duration::from_secs(2));
        let waits: Vec<Duration> = (&mut b).take(8).collect();
        assert!(waits[0] <= Duration::from_millis(250));
        assert!(waits.iter().all(|w| *w <= Duration::from_secs(2)));
        assert!(waits[7] >= Duration::from_secs(1));
        b.reset();
        assert!(b.next().unwrap() <= Duration::from_millis(250));
    }

    #[test]
    fn status_only_updates_do_not_recompile() {
        let mut t = GenerationTracker::default();
        let mut s = svc(&[(None, 80)]);
        s.metadata.generation = Some(1);
        assert!(t.on(&Event::Apply(s.clone())), "new object");
        assert!(
            !t.on(&Event::Apply(s.clone())),
            "same generation: a status write"
        );
        s.metadata.generation = Some(2);
        assert!(t.on(&Event::Apply(s.clone())), "spec changed");
        assert!(t.on(&Event::Delete(s)));
    }

    #[test]
    fn key_tracker_sees_set_changes_only() {
        let mut t = KeyTracker::default();
        let s = svc(&[(None, 80)]);
        assert!(!t.on(&Event::<Service>::Init));
        assert!(!t.on(&Event::InitApply(s.clone())));
        assert!(t.on(&Event::<Service>::InitDone));
        assert!(
            !t.on(&Event::Apply(s.clone())),
            "an update is not a new Service"
        );
        assert!(t.on(&Event::Delete(s.clone())));
        assert!(t.on(&Event::Apply(s)));
    }
}
