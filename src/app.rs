//! Wiring: builds a `Gateway`, binds the listeners, connects a source (files or Kubernetes) to
//! compile-and-swap, and drains on shutdown. The binary and the integration tests both start here.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::auth::external::{ExtAuth, ExtAuthConfig};
use crate::auth::keys::KeyLimits;
use crate::balance::endpoints::EndpointRegistry;
use crate::config::route::BackendTarget;
use crate::config::{compile, CompileOptions, Problem, Snapshot, Store};
use crate::discovery::{DiscoveryMode, DnsConfig, DnsDiscovery, Resolver, SliceEndpoints, Target};
use crate::proxy::upstream::{Upstream, UpstreamOptions};
use crate::proxy::{Gateway, ProxyOptions};
use crate::ratelimit::{RateLimiter, RedisConfig, RedisLimiter};
use crate::sources::files::FileSource;
use crate::telemetry::Metrics;

/// Everything needed to start a gateway.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub listen: SocketAddr,
    pub tls_listen: Option<SocketAddr>,
    pub admin_listen: SocketAddr,
    pub gateway_class: String,
    pub default_rpm: u32,
    pub shutdown_grace: Duration,
    pub proxy: ProxyOptions,
    pub upstream: UpstreamOptions,
    pub metrics_per_client: bool,
    /// The Secret of MCP session keys (`--mcp-session-secret`); `None`: a random key per process.
    pub mcp_session_secret: Option<crate::config::ObjectKey>,
    /// Cluster DNS domain for Service names.
    pub cluster_domain: String,
    /// How Service backends are discovered (standalone always uses DNS).
    pub discovery: DiscoveryMode,
    /// DNS discovery settings (name servers, refresh bounds).
    pub dns: DnsConfig,
    /// Shared limits across replicas (`redis://host:port[/db]`); local limits when unset.
    pub redis_url: Option<String>,
    /// Longest wait for a Redis decision before answering from local limits.
    pub redis_timeout: Duration,
    /// The external auth service asked about unknown keys (`--ext-auth-url`); off when unset.
    pub ext_auth: Option<ExtAuthConfig>,
}

impl ServeOptions {
    /// Loopback on ephemeral ports: for tests and the demo.
    pub fn loopback() -> Self {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        Self {
            listen: any,
            tls_listen: None,
            admin_listen: any,
            gateway_class: crate::api::DEFAULT_GATEWAY_CLASS.to_string(),
            default_rpm: 60,
            shutdown_grace: Duration::from_secs(30),
            proxy: ProxyOptions::default(),
            upstream: UpstreamOptions::default(),
            metrics_per_client: false,
            mcp_session_secret: None,
            cluster_domain: "cluster.local".to_string(),
            discovery: DiscoveryMode::Dns,
            dns: DnsConfig::default(),
            redis_url: None,
            redis_timeout: crate::ratelimit::redis::DEFAULT_CALL_TIMEOUT,
            ext_auth: None,
        }
    }

    pub fn compile_options(&self, generation: u64) -> CompileOptions {
        CompileOptions {
            gateway_class: self.gateway_class.clone(),
            default_rpm: self.default_rpm,
            generation,
            cluster_domain: self.cluster_domain.clone(),
            mcp_session_secret: self.mcp_session_secret.clone(),
        }
    }
}

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// Metrics could not be registered.
    #[error(transparent)]
    Metrics(#[from] crate::telemetry::metrics::MetricsError),
    /// The upstream client could not be built.
    #[error(transparent)]
    Upstream(#[from] crate::proxy::upstream::UpstreamError),
    /// TLS could not be configured.
    #[error("TLS configuration failed: {0}")]
    Tls(#[from] rustls::Error),
    /// The Redis URL is unusable.
    #[error("--redis-url: {0}")]
    Redis(#[from] crate::ratelimit::RedisLimitError),
    /// The external auth client could not be set up.
    #[error(transparent)]
    ExtAuth(#[from] crate::auth::external::ExtAuthError),
    /// Endpoint discovery could not start.
    #[error(transparent)]
    Discovery(#[from] crate::discovery::DiscoveryError),
    /// The configuration path cannot be watched.
    #[error("cannot watch {path}: {source}")]
    Watch {
        path: PathBuf,
        source: notify::Error,
    },
    /// The Kubernetes source could not start (no config, no CRDs, no RBAC, no API server).
    #[error(transparent)]
    Kubernetes(#[from] crate::sources::kubernetes::KubeError),
}

/// A running gateway: its addresses and the handle to stop it.
pub struct Running {
    pub gateway: Arc<Gateway>,
    /// Resolves backends to endpoint sets when a snapshot is attached.
    pub resolver: Arc<Resolver>,
    /// EndpointSlice-fed sets (Kubernetes mode writes them).
    pub slices: Arc<SliceEndpoints>,
    pub listen: SocketAddr,
    pub tls_listen: Option<SocketAddr>,
    pub admin_listen: SocketAddr,
    /// The Kubernetes source (`run` mode): sync, leadership, status writes.
    pub kubernetes: Option<Arc<crate::sources::kubernetes::Handle>>,
    shutdown: watch::Sender<bool>,
    servers: Vec<JoinHandle<()>>,
    background: Vec<JoinHandle<()>>,
    _keep: Vec<Box<dyn std::any::Any + Send>>,
}

impl Running {
    /// Stops accepting, marks `/readyz` false, drains in-flight work up to the grace period.
    pub async fn shutdown(mut self) {
        self.gateway.begin_shutdown();
        let _ = self.shutdown.send(true);
        for s in self.servers.drain(..) {
            let _ = s.await;
        }
        for b in self.background.drain(..) {
            b.abort();
        }
    }

    /// Keeps something alive as long as the gateway runs (a file watcher, a source task).
    pub fn keep(&mut self, thing: Box<dyn std::any::Any + Send>) {
        self._keep.push(thing);
    }

    pub fn add_background(&mut self, h: JoinHandle<()>) {
        self.background.push(h);
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        for b in &self.background {
            b.abort();
        }
    }
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, AppError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| AppError::Bind { addr, source })
}

/// Builds the gateway and starts its listeners; configuration arrives through `Gateway::swap`.
pub async fn start(opts: &ServeOptions) -> Result<Running, AppError> {
    let metrics = Metrics::new(opts.metrics_per_client)?;
    let upstream = Upstream::new(&opts.upstream)?;
    let redis = match &opts.redis_url {
        Some(url) => {
            let config = RedisConfig {
                call_timeout: opts.redis_timeout,
                ..RedisConfig::new(url.clone())
            };
            let r = RedisLimiter::connect(config).await?;
            r.set_fallback_counter(metrics.ratelimit_fallbacks_total.clone());
            Some(r)
        }
        None => None,
    };
    let limiter = Arc::new(RateLimiter::new(redis));
    if opts.mcp_session_secret.is_none() {
        tracing::info!(
            "no --mcp-session-secret: MCP session ids are sealed with a random key of this \
             process, so MCP sessions survive neither a restart nor a second replica"
        );
    }
    // Idle buckets (full again) are evicted every 10 s so memory follows active clients.
    let sweeper = limiter.spawn_sweeper(crate::ratelimit::DEFAULT_SWEEP_INTERVAL);
    // Keys the auth service admits get the defaults of keys that name no limit.
    let ext_auth = match &opts.ext_auth {
        Some(cfg) => {
            let limits = KeyLimits {
                requests_per_minute: opts.default_rpm,
                burst: opts.default_rpm,
                tokens_per_minute: None,
            };
            let ext = ExtAuth::new(cfg.clone(), limits)?;
            tracing::info!(
                auth_service = ext.target(),
                "unknown keys are asked of the external auth service"
            );
            Some(ext)
        }
        None => None,
    };
    let gw = Gateway::new(metrics, opts.proxy.clone(), upstream, limiter, ext_auth);
    let (tx, rx) = watch::channel(false);
    let registry = Arc::new(EndpointRegistry::new());
    let slices = Arc::new(SliceEndpoints::new(registry.clone()));
    let dns = DnsDiscovery::new(opts.dns.clone(), registry.clone())?;
    let resolver = Arc::new(Resolver::new(
        registry,
        dns,
        Some(slices.clone()),
        opts.discovery,
        opts.cluster_domain.clone(),
    ));

    let listener = bind(opts.listen).await?;
    let listen = listener.local_addr().map_err(|source| AppError::Bind {
        addr: opts.listen,
        source,
    })?;
    let admin = bind(opts.admin_listen).await?;
    let admin_listen = admin.local_addr().map_err(|source| AppError::Bind {
        addr: opts.admin_listen,
        source,
    })?;
    let mut servers = vec![tokio::spawn(crate::proxy::server::serve(
        gw.clone(),
        listener,
        None,
        rx.clone(),
        opts.shutdown_grace,
    ))];
    let mut tls_listen = None;
    if let Some(addr) = opts.tls_listen {
        let l = bind(addr).await?;
        tls_listen = Some(
            l.local_addr()
                .map_err(|source| AppError::Bind { addr, source })?,
        );
        let cfg = crate::proxy::server::tls_config(gw.clone())?;
        servers.push(tokio::spawn(crate::proxy::server::serve(
            gw.clone(),
            l,
            Some(cfg),
            rx.clone(),
            opts.shutdown_grace,
        )));
    }
    let background = vec![
        tokio::spawn(crate::admin::serve(gw.clone(), admin)),
        sweeper,
        tokio::spawn(report_endpoints_ready_every(
            gw.clone(),
            ENDPOINTS_READY_INTERVAL,
        )),
    ];
    tracing::info!(%listen, ?tls_listen, %admin_listen, "gateway listening");
    Ok(Running {
        gateway: gw,
        resolver,
        slices,
        listen,
        tls_listen,
        admin_listen,
        kubernetes: None,
        shutdown: tx,
        servers,
        background,
        _keep: Vec::new(),
    })
}

/// Gives every backend of the snapshot its live endpoint set (shared with the previous snapshot
/// when the backend is unchanged, so balancer state and DNS watches carry over).
/// What discovery needs of a backend: config's target in discovery's terms.
fn discovery_target(target: &BackendTarget) -> Target<'_> {
    match target {
        BackendTarget::Service {
            namespace,
            name,
            port,
        } => Target::Service {
            namespace,
            name,
            port: *port,
        },
        BackendTarget::Url { host, port, .. } => Target::Host { host, port: *port },
    }
}

pub fn attach_endpoints(snap: &mut Snapshot, resolver: &Resolver) {
    let mut problems = Vec::new();
    for route in snap.routes.routes() {
        for b in &route.backends {
            if snap.endpoints.contains_key(&b.id) {
                continue;
            }
            match resolver.handle(discovery_target(&b.target)) {
                Ok(h) => {
                    snap.endpoints.insert(b.id.clone(), h.set.clone());
                    snap.keepalive.push(Box::new(h));
                }
                Err(e) => problems.push(Problem {
                    kind: "AgentRoute".into(),
                    object: crate::config::ObjectKey::new(&*route.namespace, &route.name),
                    field: "spec.backends".into(),
                    reason: "BackendNotResolvable".into(),
                    message: e.to_string(),
                    origin: None,
                }),
            }
        }
    }
    snap.problems.extend(problems);
}

/// How often `tollgate_endpoints_ready` is refreshed. Discovery swaps endpoint sets without a
/// snapshot swap (a DNS answer, an EndpointSlice), so the gauge needs a periodic pass besides
/// the one after each swap. 2 s: fresher than any realistic scrape interval, and one pass costs
/// a map walk and an atomic load per backend.
pub const ENDPOINTS_READY_INTERVAL: Duration = Duration::from_secs(2);

/// Sets `tollgate_endpoints_ready{backend}` to the ready (not terminating) endpoint count of
/// every backend in the current snapshot, and removes the series of backends it no longer has.
pub fn report_endpoints_ready(gw: &Gateway) {
    use prometheus::core::Collector;
    // Calls are serialised and each reads the snapshot inside the lock, so the last call to run
    // always reflects the newest snapshot (a periodic pass holding an older one cannot undo
    // the pass made right after a swap).
    static SERIAL: Mutex<()> = Mutex::new(());
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let snap = gw.snapshot();
    let gauge = &gw.metrics.endpoints_ready;
    for (backend, set) in &snap.endpoints {
        let ready = i64::try_from(set.load().ready_count()).unwrap_or(i64::MAX);
        gauge.with_label_values(&[&**backend]).set(ready);
    }
    let gone: Vec<String> = gauge
        .collect()
        .iter()
        .flat_map(|family| family.get_metric())
        .filter_map(|m| m.get_label().iter().find(|l| l.name() == "backend"))
        .map(|l| l.value())
        .filter(|backend| !snap.endpoints.contains_key(*backend))
        .map(str::to_owned)
        .collect();
    for backend in gone {
        // Err only when the series is already gone: nothing to do.
        let _ = gauge.remove_label_values(&[&backend]);
    }
}

/// Runs [`report_endpoints_ready`] every `every` for as long as the gateway runs.
async fn report_endpoints_ready_every(gw: Arc<Gateway>, every: Duration) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        report_endpoints_ready(&gw);
    }
}

/// Loads the files, compiles, swaps; logs and counts the outcome.
pub fn reload_files(
    gw: &Gateway,
    resolver: &Resolver,
    source: &Mutex<FileSource>,
    opts: &ServeOptions,
) {
    let started = Instant::now();
    let loaded = match source.lock() {
        Ok(mut s) => s.load(),
        Err(poisoned) => poisoned.into_inner().load(),
    };
    // Files have no status to write problems to: the log is where they are seen.
    compile_and_swap(
        gw,
        resolver,
        &loaded.store,
        loaded.problems,
        opts,
        started,
        true,
    );
}

/// The one path from a gathered store to the live snapshot, for every source: compile, attach
/// endpoints, count and log, swap. `source_problems` (unparsable files) make the reload an error.
fn compile_and_swap(
    gw: &Gateway,
    resolver: &Resolver,
    store: &Store,
    source_problems: Vec<Problem>,
    opts: &ServeOptions,
    started: Instant,
    log_problems: bool,
) {
    let mut snap = compile(store, &opts.compile_options(gw.swaps() + 1));
    let result = if source_problems.is_empty() {
        "success"
    } else {
        "error"
    };
    let mut problems = source_problems;
    problems.append(&mut snap.problems);
    snap.problems = problems;
    attach_endpoints(&mut snap, resolver);
    if log_problems {
        for p in &snap.problems {
            tracing::warn!(problem = %p, "configuration problem");
        }
    }
    let elapsed = started.elapsed();
    gw.metrics.compile_seconds.observe(elapsed.as_secs_f64());
    gw.metrics
        .config_reloads_total
        .with_label_values(&[result])
        .inc();
    tracing::info!(
        routes = snap.routes.len(),
        keys = snap.keys.len(),
        problems = snap.problems.len(),
        elapsed_ms = elapsed.as_secs_f64() * 1000.0,
        "configuration loaded"
    );
    gw.swap(snap);
    report_endpoints_ready(gw);
}

/// `standalone`: the gateway fed from YAML files, reloaded on change.
pub async fn start_standalone(config: PathBuf, opts: &ServeOptions) -> Result<Running, AppError> {
    let mut running = start(opts).await?;
    let source = Arc::new(Mutex::new(FileSource::new(config.clone())));
    let gw = running.gateway.clone();
    let resolver = running.resolver.clone();
    reload_files(&gw, &resolver, &source, opts);
    let opts2 = opts.clone();
    let on_change: Arc<dyn Fn() + Send + Sync> = Arc::new(move || {
        reload_files(&gw, &resolver, &source, &opts2);
    });
    // 50 ms: long enough to fold an editor's write+rename into one reload, short enough to keep
    // change-to-traffic well under the 250 ms target (P6).
    let watcher = crate::sources::files::watch(&config, Duration::from_millis(50), on_change)
        .map_err(|source| AppError::Watch {
            path: config.clone(),
            source,
        })?;
    running.keep(Box::new(watcher));
    Ok(running)
}

/// Compiles a store gathered by the Kubernetes source, attaches endpoints, swaps.
pub fn reload_store(gw: &Gateway, resolver: &Resolver, store: &Store, opts: &ServeOptions) {
    // Kubernetes problems go to each object's status; no per-problem log line.
    compile_and_swap(gw, resolver, store, Vec::new(), opts, Instant::now(), false);
}

/// `run`: the gateway fed by Kubernetes watches. Refuses to start without the CRDs; `/readyz`
/// turns true once every watch has synced and the first snapshot is in.
pub async fn start_kubernetes(
    opts: &ServeOptions,
    k8s: &crate::sources::kubernetes::KubeOptions,
) -> Result<Running, AppError> {
    use crate::sources::kubernetes as kube_source;
    let client = kube_source::client(k8s).await?;
    kube_source::check_crds(&client, &k8s.watch_namespaces).await?;
    let mut running = start(opts).await?;
    let (gw, resolver, opts2) = (
        running.gateway.clone(),
        running.resolver.clone(),
        opts.clone(),
    );
    let gw2 = running.gateway.clone();
    let wiring = kube_source::Wiring {
        apply: Arc::new(move |store: Store| reload_store(&gw, &resolver, &store, &opts2)),
        current: Arc::new(move || gw2.snapshot()),
        slices: running.slices.clone(),
        leader_gauge: running.gateway.metrics.leader.clone(),
        health: Arc::new(kube_source::health::ApiHealth::new(
            running.gateway.metrics.apiserver_reachable.clone(),
            running.gateway.metrics.apiserver_outages_total.clone(),
        )),
    };
    let mut k8s = k8s.clone();
    k8s.endpoint_slices = opts.discovery == DiscoveryMode::Endpointslices;
    k8s.gateway_api = kube_source::gateway_api_installed(&client).await;
    k8s.ingress = kube_source::ingress_allowed(&client).await;
    k8s.namespace_labels = k8s.gateway_api && kube_source::namespaces_allowed(&client).await;
    let (handle, tasks) = kube_source::spawn(client, &k8s, wiring);
    let h = handle.clone();
    let _ = running.gateway.source_debug.set(Arc::new(
        move || serde_json::json!({ "kubernetes": h.debug() }),
    ));
    for t in tasks {
        running.add_background(t);
    }
    running.kubernetes = Some(handle);
    Ok(running)
}
