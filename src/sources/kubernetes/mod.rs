//! The Kubernetes source of `tollgate run`: reflectors per kind fill a `config::Store`, endpoint
//! slices feed `SliceEndpoints`, and the elected leader writes status. Never compiles or routes.

pub mod health;
pub mod leader;
pub mod status;
pub mod watch;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kube::api::ListParams;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client};
use tokio::sync::watch as signal;
use tokio::task::JoinHandle;

use crate::api::{AgentApiKey, AgentRoute};
use crate::config::{Snapshot, Store};
use crate::discovery::SliceEndpoints;

use leader::LeaderState;
use watch::{EndpointMapper, Reflectors};

/// Settings of the Kubernetes source (`tollgate run`).
#[derive(Clone, Debug)]
pub struct KubeOptions {
    /// A kubeconfig file; `None`: in-cluster configuration, else `KUBECONFIG`/`~/.kube/config`.
    pub kubeconfig: Option<PathBuf>,
    /// Namespaces to watch; empty: every namespace.
    pub watch_namespaces: Vec<String>,
    /// Name of the `coordination.k8s.io` Lease that elects the status writer.
    pub lease_name: String,
    /// Namespace of that Lease; `None`: `POD_NAMESPACE`, else the namespace of the kubeconfig
    /// context (in-cluster: the service account's), else `default` (see [`lease_namespace`]).
    pub lease_namespace: Option<String>,
    /// This replica's name in the Lease (`POD_NAME`, else host name and pid).
    pub identity: String,
    /// A burst of changes within this window costs one compile.
    pub debounce: Duration,
    /// Lease timing (see [`leader::LeaseTiming`]).
    pub lease: leader::LeaseTiming,
    /// Longest pause between watch retries while the API server is away.
    pub watch_backoff_max: Duration,
    /// Whether Service backends are resolved from EndpointSlices (else by DNS: no slice watch).
    pub endpoint_slices: bool,
    /// The Secret of MCP session keys (`--mcp-session-secret`), watched like a referenced one.
    pub mcp_session_secret: Option<crate::config::ObjectKey>,
    /// Whether the Gateway API CRDs are installed (found at start by [`gateway_api_installed`]):
    /// only then are GatewayClass, Gateway, HTTPRoute and ReferenceGrant watched.
    pub gateway_api: bool,
    /// Whether IngressClasses can be listed (found at start by [`ingress_allowed`]): only
    /// then are IngressClass and Ingress watched.
    pub ingress: bool,
    /// Whether Namespaces can be listed (found at start by [`namespaces_allowed`]): only then
    /// are their labels watched, for `allowedRoutes` `Selector`.
    pub namespace_labels: bool,
    /// `status.addresses` of Gateways (`--gateway-address`): IP addresses or host names.
    pub gateway_addresses: Vec<String>,
}

impl Default for KubeOptions {
    fn default() -> Self {
        Self {
            kubeconfig: None,
            watch_namespaces: Vec::new(),
            lease_name: "tollgate-leader".to_string(),
            lease_namespace: None,
            identity: default_identity(),
            // 50 ms folds a `kubectl apply -f dir/` burst into one compile while keeping
            // change-to-traffic far below the 1 s p99 of P6.
            debounce: Duration::from_millis(50),
            lease: leader::LeaseTiming::default(),
            // client-go backs off up to 30 s; 5 s keeps recovery after an API server outage
            // quick (R4) while one list per kind and replica every 5 s is still gentle on a
            // recovering server (six watches per namespace: ~1 request/s per replica).
            watch_backoff_max: Duration::from_secs(5),
            endpoint_slices: true,
            mcp_session_secret: None,
            gateway_api: false,
            ingress: false,
            namespace_labels: false,
            gateway_addresses: Vec::new(),
        }
    }
}

/// The Lease namespace: the one given, else `POD_NAMESPACE` (set by the Deployment through the
/// downward API), else the client's default namespace: the kubeconfig context's namespace
/// (in-cluster: the service account's), which kube itself falls back to `default` for. A
/// namespace that exists wherever the gateway can run, so status is written without flags.
pub fn lease_namespace(given: Option<&str>, client: &Client) -> String {
    given
        .map(str::to_string)
        .or_else(|| std::env::var("POD_NAMESPACE").ok())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| client.default_namespace().to_string())
}

/// `POD_NAME`, else `<host name>-<pid>`: unique per replica, readable in `kubectl get lease`.
pub fn default_identity() -> String {
    if let Some(pod) = std::env::var("POD_NAME").ok().filter(|s| !s.is_empty()) {
        return pod;
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "tollgate".to_string());
    format!("{host}-{}", std::process::id())
}

/// Why the Kubernetes source could not start. Failures after start are retried, not returned.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// The kubeconfig file named on the command line could not be read or used.
    #[error("cannot use kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        source: kube::config::KubeconfigError,
    },
    /// Neither an in-cluster configuration nor a kubeconfig was found.
    #[error("no Kubernetes configuration found (in-cluster or KUBECONFIG): {0}")]
    Infer(#[from] kube::config::InferConfigError),
    /// The client could not be built from the configuration.
    #[error("cannot build the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
    /// The AgentRoute/AgentApiKey CRDs are not installed in the cluster.
    #[error("the AgentRoute/AgentApiKey CRDs are not installed: kubectl apply -f crds/")]
    CrdsMissing,
    /// RBAC does not let this identity list a kind the gateway needs.
    #[error(
        "not allowed to list {resource} in {scope}: {message} \
         (apply manifests/rbac/ and bind the gateway's identity to its role)"
    )]
    Forbidden {
        resource: &'static str,
        scope: String,
        message: String,
    },
    /// The API server could not be reached, or answered the start-up check with an error.
    #[error("cannot reach the Kubernetes API server: {0}")]
    Unreachable(#[source] kube::Error),
    /// The start-up check did not finish in time.
    #[error("the Kubernetes API server did not answer within {0:?}")]
    Timeout(Duration),
}

impl KubeError {
    /// A bounded label for metrics and logs.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Kubeconfig { .. } => "kubeconfig",
            Self::Infer(_) => "infer",
            Self::Client(_) => "client",
            Self::CrdsMissing => "crds_missing",
            Self::Forbidden { .. } => "forbidden",
            Self::Unreachable(_) => "unreachable",
            Self::Timeout(_) => "timeout",
        }
    }
}

/// Builds the client: the given kubeconfig, else in-cluster, else `KUBECONFIG`.
pub async fn client(opts: &KubeOptions) -> Result<Client, KubeError> {
    let config = match &opts.kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path).map_err(|source| KubeError::Kubeconfig {
                path: path.clone(),
                source,
            })?;
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|source| KubeError::Kubeconfig {
                    path: path.clone(),
                    source,
                })?
        }
        None => kube::Config::infer().await?,
    };
    Client::try_from(config).map_err(KubeError::Client)
}

/// How long the start-up check may take before the gateway gives up with a clear message.
const STARTUP_CHECK_TIMEOUT: Duration = Duration::from_secs(30);

/// Refuses to start without the CRDs (a 404 on the kind), or without the right to list them.
pub async fn check_crds(client: &Client, namespaces: &[String]) -> Result<(), KubeError> {
    let scope = namespaces.first().cloned();
    let check = async {
        check_kind::<AgentRoute>(client, scope.as_deref(), "agentroutes.tollgate.dev").await?;
        check_kind::<AgentApiKey>(client, scope.as_deref(), "agentapikeys.tollgate.dev").await
    };
    tokio::time::timeout(STARTUP_CHECK_TIMEOUT, check)
        .await
        .map_err(|_| KubeError::Timeout(STARTUP_CHECK_TIMEOUT))?
}

async fn check_kind<K>(
    client: &Client,
    namespace: Option<&str>,
    resource: &'static str,
) -> Result<(), KubeError>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    // HTTP codes, not `Status::is_not_found()`: an unknown resource gets a plain-text 404 whose
    // parsed reason kube-core 5 does not recognise as NotFound.
    match api.list_metadata(&ListParams::default().limit(1)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Err(KubeError::CrdsMissing),
        Err(kube::Error::Api(s)) if s.code == 403 => Err(KubeError::Forbidden {
            resource,
            scope: namespace.map_or_else(
                || "all namespaces".to_string(),
                |n| format!("namespace {n}"),
            ),
            message: s.message.clone(),
        }),
        Err(e) => Err(KubeError::Unreachable(e)),
    }
}

/// Whether the Gateway API (standard channel) CRDs are installed: a GatewayClass list answers.
/// Says which at start, so an operator knows whether Gateways are watched.
pub async fn gateway_api_installed(client: &Client) -> bool {
    let api: Api<crate::api::gateway::GatewayClass> = Api::all(client.clone());
    let answer = tokio::time::timeout(
        STARTUP_CHECK_TIMEOUT,
        api.list_metadata(&ListParams::default().limit(1)),
    )
    .await;
    match answer {
        Ok(Ok(_)) => {
            tracing::info!(
                "Gateway API CRDs installed: watching GatewayClass, Gateway, HTTPRoute, ReferenceGrant"
            );
            true
        }
        Ok(Err(kube::Error::Api(s))) if s.code == 404 => {
            tracing::info!(
                "Gateway API CRDs not installed: Gateways and HTTPRoutes are not watched"
            );
            false
        }
        // Expected with only namespaced Roles (--watch-namespace): GatewayClasses are
        // cluster-scoped, and the API server checks RBAC before it looks for the kind.
        Ok(Err(kube::Error::Api(s))) if s.code == 403 => {
            tracing::info!(
                "not allowed to list GatewayClasses (a cluster-scoped kind; grant list/watch of \
                 gateway.networking.k8s.io gatewayclasses cluster-wide to serve Gateways): \
                 Gateways and HTTPRoutes are not watched"
            );
            false
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e,
                "cannot list GatewayClasses: Gateways and HTTPRoutes are not watched");
            false
        }
        Err(_) => {
            tracing::warn!("GatewayClass list timed out: Gateways and HTTPRoutes are not watched");
            false
        }
    }
}

/// Whether Namespaces can be listed (cluster-scoped: namespaced Roles cannot grant it). Their
/// labels serve Gateway listeners' `allowedRoutes` `Selector`; without them it admits none.
pub async fn namespaces_allowed(client: &Client) -> bool {
    let api: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    let answer = tokio::time::timeout(
        STARTUP_CHECK_TIMEOUT,
        api.list_metadata(&ListParams::default().limit(1)),
    )
    .await;
    match answer {
        Ok(Ok(_)) => true,
        Ok(Err(e)) => {
            tracing::info!(error = %e,
                "cannot list Namespaces: allowedRoutes namespaces Selector admits no route");
            false
        }
        Err(_) => {
            tracing::warn!(
                "Namespace list timed out: allowedRoutes namespaces Selector admits no route"
            );
            false
        }
    }
}

/// Whether IngressClasses can be listed (a cluster-scoped kind: namespaced Roles cannot), and
/// with them Ingresses served. Says which at start.
pub async fn ingress_allowed(client: &Client) -> bool {
    let api: Api<k8s_openapi::api::networking::v1::IngressClass> = Api::all(client.clone());
    let answer = tokio::time::timeout(
        STARTUP_CHECK_TIMEOUT,
        api.list_metadata(&ListParams::default().limit(1)),
    )
    .await;
    match answer {
        Ok(Ok(_)) => {
            tracing::info!("watching IngressClass and Ingress");
            true
        }
        Ok(Err(kube::Error::Api(s))) if s.code == 403 => {
            tracing::info!(
                "not allowed to list IngressClasses (a cluster-scoped kind; grant list/watch of \
                 networking.k8s.io ingressclasses cluster-wide to serve Ingresses): \
                 Ingresses are not watched"
            );
            false
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot list IngressClasses: Ingresses are not watched");
            false
        }
        Err(_) => {
            tracing::warn!("IngressClass list timed out: Ingresses are not watched");
            false
        }
    }
}

/// What the source needs from the gateway, as callbacks so it never sees the data plane.
#[derive(Clone)]
pub struct Wiring {
    /// Compiles a gathered store and swaps the result in (blocking work: runs off the runtime).
    pub apply: Arc<dyn Fn(Store) + Send + Sync>,
    /// The snapshot in service (its reports become status).
    pub current: Arc<dyn Fn() -> Arc<Snapshot> + Send + Sync>,
    /// EndpointSlice-fed endpoint sets.
    pub slices: Arc<SliceEndpoints>,
    /// `tollgate_leader`: 1 while this replica holds the Lease.
    pub leader_gauge: prometheus::IntGauge,
    /// Whether the API server is reachable (its metrics), shared by every task of the source.
    pub health: Arc<health::ApiHealth>,
}

/// A running Kubernetes source: observable state for the admin side and tests.
pub struct Handle {
    identity: String,
    leader: Arc<LeaderState>,
    leader_gauge: prometheus::IntGauge,
    health: Arc<health::ApiHealth>,
    client: Client,
    lease: (String, String, leader::LeaseTiming),
    synced: AtomicBool,
    compiles: AtomicU64,
    status_writes: AtomicU64,
    events: AtomicU64,
    gateway_addresses: Vec<String>,
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle")
            .field("identity", &self.identity)
            .field("leader", &self.is_leader())
            .field("synced", &self.is_synced())
            .finish_non_exhaustive()
    }
}

impl Handle {
    /// Stops campaigning and hands the Lease over (call before draining on shutdown), so
    /// another replica writes status within seconds.
    pub async fn release(&self) {
        let (ns, name, timing) = &self.lease;
        leader::release(
            self.client.clone(),
            ns,
            name,
            timing,
            &self.leader,
            &self.leader_gauge,
        )
        .await;
    }

    /// This replica's identity in the Lease.
    pub fn identity(&self) -> &str {
        &self.identity
    }
    /// True while this replica holds the Lease (and so writes status).
    pub fn is_leader(&self) -> bool {
        self.leader.is_leader()
    }
    /// True once every reflector has listed its kind and the first snapshot is in.
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }
    /// Compiles run from watch changes (the first included).
    pub fn compiles(&self) -> u64 {
        self.compiles.load(Ordering::Relaxed)
    }
    /// Status patches this replica sent successfully.
    pub fn status_writes(&self) -> u64 {
        self.status_writes.load(Ordering::Relaxed)
    }
    /// Kubernetes Events this replica published.
    pub fn events(&self) -> u64 {
        self.events.load(Ordering::Relaxed)
    }
    /// `status.addresses` of Gateways (`--gateway-address`).
    pub fn gateway_addresses(&self) -> &[String] {
        &self.gateway_addresses
    }
    /// The Lease as `namespace/name`.
    pub fn lease(&self) -> String {
        format!("{}/{}", self.lease.0, self.lease.1)
    }
    /// What `/debug/routes` shows of this source.
    pub fn debug(&self) -> serde_json::Value {
        serde_json::json!({
            "identity": self.identity,
            "lease": self.lease(),
            "leader": self.is_leader(),
            "synced": self.is_synced(),
            "statusWrites": self.status_writes(),
            "apiServerReachable": !self.health.is_down(),
        })
    }
}

/// Starts the reflectors, the debounced compile loop, leader election and the status writer.
/// Returns at once: `/readyz` turns true with the first swap, after every store has synced.
pub fn spawn(
    client: Client,
    opts: &KubeOptions,
    wiring: Wiring,
) -> (Arc<Handle>, Vec<JoinHandle<()>>) {
    let (config_tx, config_rx) = signal::channel(0u64);
    let (status_tx, status_rx) = signal::channel(0u64);
    let config_tx = Arc::new(config_tx);
    let status_tx = Arc::new(status_tx);
    let leader = Arc::new(LeaderState::new(&opts.identity));
    let lease_ns = lease_namespace(opts.lease_namespace.as_deref(), &client);
    let handle = Arc::new(Handle {
        identity: opts.identity.clone(),
        leader: leader.clone(),
        leader_gauge: wiring.leader_gauge.clone(),
        health: wiring.health.clone(),
        client: client.clone(),
        lease: (lease_ns.clone(), opts.lease_name.clone(), opts.lease),
        synced: AtomicBool::new(false),
        compiles: AtomicU64::new(0),
        status_writes: AtomicU64::new(0),
        events: AtomicU64::new(0),
        gateway_addresses: opts.gateway_addresses.clone(),
    });
    let mapper = Arc::new(EndpointMapper::new(
        wiring.slices.clone(),
        status_tx.clone(),
    ));
    let (reflectors, mut tasks) = watch::start(
        &client,
        opts,
        config_tx.clone(),
        mapper.clone(),
        wiring.health.clone(),
    );
    let reflectors = Arc::new(reflectors);

    tasks.push(tokio::spawn(compile_loop(
        reflectors.clone(),
        config_rx,
        opts.debounce,
        wiring.clone(),
        mapper,
        status_tx.clone(),
        handle.clone(),
    )));
    tasks.push(tokio::spawn(leader::run(
        client.clone(),
        lease_ns,
        opts.lease_name.clone(),
        opts.lease,
        leader,
        leader::Signals {
            on_gain: status_tx,
            gauge: wiring.leader_gauge.clone(),
            health: wiring.health.clone(),
        },
    )));
    tasks.push(tokio::spawn(status::run(
        client,
        reflectors,
        status_rx,
        wiring.current,
        handle.clone(),
    )));
    (handle, tasks)
}

/// Waits for every store, then compiles on each (debounced) change: one compile per burst.
async fn compile_loop(
    reflectors: Arc<Reflectors>,
    mut changes: signal::Receiver<u64>,
    debounce: Duration,
    wiring: Wiring,
    mapper: Arc<EndpointMapper>,
    status: Arc<signal::Sender<u64>>,
    handle: Arc<Handle>,
) {
    reflectors.wait_until_ready().await;
    // Endpoint sets first, so the first snapshot never serves 503 for a Service with endpoints.
    mapper.recompute_all(&reflectors);
    tracing::info!(kinds = reflectors.describe(), "Kubernetes stores synced");
    loop {
        changes.borrow_and_update();
        let store = reflectors.store();
        let apply = wiring.apply.clone();
        // Compiling 10k routes takes ~100 ms of CPU: keep it off the async workers.
        if let Err(e) = tokio::task::spawn_blocking(move || apply(store)).await {
            tracing::error!(error = %e, "compile task failed");
        }
        handle.compiles.fetch_add(1, Ordering::Relaxed);
        handle.synced.store(true, Ordering::Release);
        status.send_modify(|n| *n += 1);
        if changes.changed().await.is_err() {
            return;
        }
        tokio::time::sleep(debounce).await;
    }
}
