//! The `tollgate` binary: parses the command line, picks a mode, starts it. Nothing else.
#![forbid(unsafe_code)]

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use tollgate::app::{self, ServeOptions};
use tollgate::auth::external::ExtAuthConfig;
use tollgate::discovery::{DiscoveryMode, DnsConfig};
use tollgate::proxy::upstream::UpstreamOptions;
use tollgate::proxy::ProxyOptions;
use tollgate::telemetry::logging::{self, LogFormat};

#[derive(Parser)]
#[command(
    name = "tollgate",
    version,
    about = "API gateway and ingress controller for AI-agent services"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Kubernetes mode: watches AgentRoute, AgentApiKey, Secret, Service and EndpointSlice
    /// (in-cluster config or KUBECONFIG); the Lease holder writes status.
    Run {
        #[command(flatten)]
        kube: KubeFlags,
        #[command(flatten)]
        listeners: Listeners,
        #[command(flatten)]
        common: Common,
    },
    /// The gateway fed from YAML files (AgentRoute, AgentApiKey, Secret); reloads on change.
    Standalone {
        /// A YAML file or a directory of them.
        #[arg(long)]
        config: PathBuf,
        #[command(flatten)]
        listeners: Listeners,
        #[command(flatten)]
        common: Common,
    },
    /// Validates files as `standalone` would; lists every problem; exits 1 on any.
    Check {
        #[arg(long)]
        config: PathBuf,
        /// Only routes of this class are checked as served.
        #[arg(long, default_value = "tollgate")]
        gateway_class: String,
        /// Also check this Secret of MCP session keys (NAMESPACE/NAME), as `standalone` would.
        #[arg(long, value_parser = parse_object_key)]
        mcp_session_secret: Option<tollgate::config::ObjectKey>,
    },
    /// Standalone plus built-in demo agent services and example keys; prints curl lines to try.
    /// Listens on 127.0.0.1 only (the demo keys are public) unless --bind says otherwise.
    Demo {
        /// Where the demo writes its configuration (default: a temporary directory).
        #[arg(long)]
        config_dir: Option<PathBuf>,
        #[command(flatten)]
        listeners: DemoListeners,
        #[command(flatten)]
        common: Common,
    },
    /// Prints the CustomResourceDefinitions (`crds/` holds this output).
    Crdgen,
}

/// The listeners of `run` and `standalone`.
#[derive(Args, Clone)]
struct Listeners {
    /// Plain HTTP listener (HTTP/1.1 and h2c).
    #[arg(long, default_value = "0.0.0.0:8080", env = "TOLLGATE_LISTEN")]
    listen: SocketAddr,
    /// TLS listener; certificates come from the routes' `tls.secretName`.
    #[arg(long, env = "TOLLGATE_TLS_LISTEN")]
    tls_listen: Option<SocketAddr>,
    /// Admin listener: /metrics, /healthz, /readyz, /debug/routes.
    #[arg(long, default_value = "0.0.0.0:9090", env = "TOLLGATE_ADMIN_LISTEN")]
    admin_listen: SocketAddr,
}

/// The listeners of `demo`: loopback unless asked, since anyone who reaches it can use the
/// printed demo keys. No environment variables, so an inherited TOLLGATE_LISTEN cannot open it.
#[derive(Args, Clone)]
struct DemoListeners {
    /// Address of both demo listeners; `0.0.0.0` (or `::`) opens the demo to the network.
    #[arg(long, default_value_t = tollgate::demo::DEFAULT_BIND)]
    bind: IpAddr,
    /// Port of the demo gateway (0: one the system picks).
    #[arg(long, default_value_t = tollgate::demo::DEFAULT_PORT)]
    port: u16,
    /// Port of the demo admin listener: /metrics, /healthz, /readyz, /debug/routes.
    #[arg(long, default_value_t = tollgate::demo::DEFAULT_ADMIN_PORT)]
    admin_port: u16,
}

/// Flags shared by the serving modes.
#[derive(Args, Clone)]
struct Common {
    /// Serve only routes of this gatewayClass.
    #[arg(long, default_value = "tollgate", env = "TOLLGATE_GATEWAY_CLASS")]
    gateway_class: String,
    /// Requests per minute of keys that name no limit.
    #[arg(long, default_value_t = 60, env = "TOLLGATE_DEFAULT_RPM")]
    default_rpm: u32,
    /// Log format.
    #[arg(long, value_enum, default_value = "text", env = "TOLLGATE_LOG_FORMAT")]
    log_format: LogFormat,
    /// Worker threads of the runtime (default: one per core). 1 runs the gateway on a single
    /// thread (tokio's current-thread scheduler), the cheapest per request.
    #[arg(long, env = "TOLLGATE_WORKERS")]
    workers: Option<usize>,
    /// How long in-flight requests and streams may finish after SIGTERM.
    #[arg(long, default_value = "30s", value_parser = parse_dur)]
    shutdown_grace: Duration,
    /// Largest request body (413 above), in bytes.
    #[arg(long, default_value_t = 10 * 1024 * 1024)]
    max_body_bytes: u64,
    /// Bodies up to this size are kept for replay on retry, in bytes.
    #[arg(long, default_value_t = 64 * 1024)]
    replay_limit_bytes: u64,
    /// How often open streams re-check their API key.
    #[arg(long, default_value = "30s", value_parser = parse_dur)]
    revalidate_interval: Duration,
    /// Time a client has to send a request head once it has started it (a new connection:
    /// its first request, TLS handshake included).
    #[arg(long, default_value = "10s", value_parser = parse_dur)]
    header_read_timeout: Duration,
    /// A client keep-alive connection with nothing in flight is closed after this long. Keep
    /// it longer than the idle timeout of any load balancer in front (60 s on most clouds).
    #[arg(long, default_value = "75s", value_parser = parse_dur)]
    idle_timeout: Duration,
    /// Keep an incoming X-Forwarded-For (when behind a trusted load balancer).
    #[arg(long)]
    trust_forwarded: bool,
    /// PEM file of extra CAs for https backends.
    #[arg(long)]
    upstream_ca_file: Option<PathBuf>,
    /// Add per-client labels to a request counter (watch the cardinality).
    #[arg(long)]
    metrics_per_client: bool,
    /// The Secret (NAMESPACE/NAME; standalone: one in the config files) whose `keys` entry
    /// seals MCP session ids: one 32-byte standard-base64 key per line, newest first. Every
    /// replica given the same Secret routes every session. Unset: a random key per process.
    #[arg(long, value_parser = parse_object_key, env = "TOLLGATE_MCP_SESSION_SECRET")]
    mcp_session_secret: Option<tollgate::config::ObjectKey>,
    /// Shared request and token limits across replicas: `redis://host:port[/db]`. If Redis
    /// is unreachable, limits fall back to each replica's own (logged and counted).
    #[arg(long, env = "TOLLGATE_REDIS_URL")]
    redis_url: Option<String>,
    /// Longest wait for a shared-limit decision from Redis; a slower answer is replaced by this
    /// replica's local limits (counted in tollgate_ratelimit_fallbacks_total).
    #[arg(long, default_value = "50ms", value_parser = parse_dur, env = "TOLLGATE_REDIS_TIMEOUT")]
    redis_timeout: Duration,
    /// External auth service for keys the gateway does not know: the key is sent as
    /// `POST {"api_key": "..."}`; a 200 `{"client_id", "roles"}` admits it (on any route whose
    /// roles match, with --default-rpm limits), 401/403 refuses it; when the service is down,
    /// slow or answers 5xx, requests get 503 auth_unavailable.
    #[arg(long, env = "TOLLGATE_EXT_AUTH_URL")]
    ext_auth_url: Option<String>,
    /// How long an admission by the auth service is cached.
    #[arg(long, default_value = "300s", value_parser = parse_dur)]
    ext_auth_ttl: Duration,
    /// How long a refusal or failure of the auth service is cached.
    #[arg(long, default_value = "5s", value_parser = parse_dur)]
    ext_auth_failure_ttl: Duration,
    /// The longest wait for one auth service answer.
    #[arg(long, default_value = "2s", value_parser = parse_dur)]
    ext_auth_timeout: Duration,
    /// Calls to the external auth service in flight at most; a new unknown key beyond that is
    /// answered 503 `auth_unavailable` without a call (counted).
    #[arg(long, default_value_t = tollgate::auth::external::DEFAULT_MAX_CONCURRENT)]
    ext_auth_max_concurrent: usize,
    /// Cluster DNS domain of Service names.
    #[arg(long, default_value = "cluster.local", env = "TOLLGATE_CLUSTER_DOMAIN")]
    cluster_domain: String,
    /// How Service backends are found: pod endpoints from EndpointSlices, or DNS
    /// (standalone always uses DNS).
    #[arg(
        long,
        value_enum,
        default_value = "endpointslices",
        env = "TOLLGATE_DISCOVERY"
    )]
    discovery: DiscoveryMode,
    /// DNS servers for backend discovery (repeatable; default: /etc/resolv.conf).
    #[arg(long = "dns-server")]
    dns_servers: Vec<SocketAddr>,
}

/// Flags of `run` only.
#[derive(Args, Clone)]
struct KubeFlags {
    /// Watch only this namespace (repeatable; default: every namespace).
    #[arg(
        long = "watch-namespace",
        env = "TOLLGATE_WATCH_NAMESPACE",
        value_delimiter = ','
    )]
    watch_namespaces: Vec<String>,
    /// The Lease that elects the replica writing status (default: tollgate-<gateway class>).
    #[arg(long, env = "TOLLGATE_LEASE_NAME")]
    lease_name: Option<String>,
    /// Namespace of that Lease (default: POD_NAMESPACE, else the kubeconfig context's
    /// namespace, else default).
    #[arg(long, env = "TOLLGATE_LEASE_NAMESPACE")]
    lease_namespace: Option<String>,
    /// A burst of changes within this window costs one compile.
    #[arg(long, default_value = "50ms", value_parser = parse_dur)]
    debounce: Duration,
    /// Another replica takes over the Lease once it has not been renewed for this long.
    #[arg(long, default_value = "15s", value_parser = parse_dur)]
    lease_duration: Duration,
    /// The leader stops writing status when it could not renew for this long (< the duration).
    #[arg(long, default_value = "10s", value_parser = parse_dur)]
    lease_renew_deadline: Duration,
    /// How often the leader renews the Lease (a follower looks at it at most every 2 s).
    #[arg(long, default_value = "5s", value_parser = parse_dur)]
    lease_renew_period: Duration,
    /// A kubeconfig file (default: in-cluster, else KUBECONFIG or ~/.kube/config).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// An address of the gateway (IP or host name) written to Gateways' `status.addresses`
    /// and Ingresses' `status.loadBalancer` (repeatable).
    #[arg(
        long = "gateway-address",
        env = "TOLLGATE_GATEWAY_ADDRESS",
        value_delimiter = ','
    )]
    gateway_addresses: Vec<String>,
}

impl KubeFlags {
    fn options(&self, gateway_class: &str) -> tollgate::sources::kubernetes::KubeOptions {
        use tollgate::sources::kubernetes::KubeOptions;
        KubeOptions {
            kubeconfig: self.kubeconfig.clone(),
            watch_namespaces: self.watch_namespaces.clone(),
            gateway_addresses: self.gateway_addresses.clone(),
            lease_name: self
                .lease_name
                .clone()
                .unwrap_or_else(|| format!("tollgate-{gateway_class}")),
            lease_namespace: self.lease_namespace.clone(),
            debounce: self.debounce,
            lease: self.lease_timing(),
            ..KubeOptions::default()
        }
    }
}

impl KubeFlags {
    /// Lease timing from the flags, kept consistent: renew deadline < duration, period <=
    /// deadline, a follower looking no less often than the leader renews.
    fn lease_timing(&self) -> tollgate::sources::kubernetes::leader::LeaseTiming {
        use tollgate::sources::kubernetes::leader::LeaseTiming;
        let d = LeaseTiming::default();
        let duration = self.lease_duration.max(Duration::from_secs(1));
        let renew_deadline = self.lease_renew_deadline.min(duration.mul_f64(0.9));
        let renew_every = self.lease_renew_period.min(renew_deadline);
        LeaseTiming {
            duration,
            renew_deadline,
            renew_every,
            retry_every: d.retry_every.min(renew_every),
            request_timeout: d.request_timeout.min(renew_deadline),
        }
    }
}

fn parse_object_key(s: &str) -> Result<tollgate::config::ObjectKey, String> {
    match s.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok(tollgate::config::ObjectKey::new(ns, name))
        }
        _ => Err(format!("{s:?} is not NAMESPACE/NAME")),
    }
}

fn parse_dur(s: &str) -> Result<Duration, String> {
    tollgate::api::parse_duration(s).map_err(|e| e.to_string())
}

impl Listeners {
    fn serve_options(&self, common: &Common) -> Result<ServeOptions> {
        common.serve_options(self.listen, self.tls_listen, self.admin_listen)
    }
}

impl DemoListeners {
    fn serve_options(&self, common: &Common) -> Result<ServeOptions> {
        common.serve_options(
            SocketAddr::new(self.bind, self.port),
            None,
            SocketAddr::new(self.bind, self.admin_port),
        )
    }
}

impl Common {
    fn serve_options(
        &self,
        listen: SocketAddr,
        tls_listen: Option<SocketAddr>,
        admin_listen: SocketAddr,
    ) -> Result<ServeOptions> {
        let ca_bundle = match &self.upstream_ca_file {
            Some(p) => Some(std::fs::read(p).with_context(|| format!("reading {}", p.display()))?),
            None => None,
        };
        Ok(ServeOptions {
            listen,
            tls_listen,
            admin_listen,
            gateway_class: self.gateway_class.clone(),
            default_rpm: self.default_rpm,
            shutdown_grace: self.shutdown_grace,
            proxy: ProxyOptions {
                max_body_bytes: self.max_body_bytes,
                replay_limit_bytes: self.replay_limit_bytes,
                revalidate_interval: self.revalidate_interval,
                header_read_timeout: self.header_read_timeout,
                idle_timeout: self.idle_timeout,
                trust_forwarded: self.trust_forwarded,
                ..ProxyOptions::default()
            },
            upstream: UpstreamOptions {
                ca_bundle,
                ..UpstreamOptions::default()
            },
            metrics_per_client: self.metrics_per_client,
            mcp_session_secret: self.mcp_session_secret.clone(),
            redis_url: self.redis_url.clone(),
            redis_timeout: self.redis_timeout,
            ext_auth: self.ext_auth_url.as_ref().map(|url| ExtAuthConfig {
                ttl: self.ext_auth_ttl,
                failure_ttl: self.ext_auth_failure_ttl,
                timeout: self.ext_auth_timeout,
                max_concurrent: self.ext_auth_max_concurrent,
                ..ExtAuthConfig::new(url.clone())
            }),
            cluster_domain: self.cluster_domain.clone(),
            discovery: self.discovery,
            dns: DnsConfig {
                nameservers: self.dns_servers.clone(),
                ..DnsConfig::default()
            },
        })
    }

    fn runtime(&self) -> Result<tokio::runtime::Runtime> {
        // One worker: tokio's current-thread scheduler runs every task on this thread, without
        // the work-stealing queues, wake-up atomics and worker parking of the multi-thread one
        // (measured in BENCHMARKS.md). Blocking work (file reloads) still goes to the blocking
        // pool.
        let mut b = match self.workers {
            Some(1) | Some(0) => tokio::runtime::Builder::new_current_thread(),
            Some(n) => {
                let mut b = tokio::runtime::Builder::new_multi_thread();
                b.worker_threads(n);
                b
            }
            None => tokio::runtime::Builder::new_multi_thread(),
        };
        b.enable_all().build().context("starting the async runtime")
    }
}

/// Waits for SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {},
                    _ = tokio::signal::ctrl_c() => {},
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tollgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<ExitCode> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crdgen => {
            print!("{}", tollgate::api::crds_yaml()?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Check {
            config,
            gateway_class,
            mcp_session_secret,
        } => {
            let problems = tollgate::sources::check(&config, &gateway_class, mcp_session_secret);
            if problems.is_empty() {
                println!("{}: ok", config.display());
                Ok(ExitCode::SUCCESS)
            } else {
                for p in &problems {
                    println!("{p}");
                }
                println!("{} problem(s)", problems.len());
                Ok(ExitCode::FAILURE)
            }
        }
        Command::Demo {
            config_dir,
            listeners,
            common,
        } => {
            let _log = logging::init(common.log_format);
            let opts = listeners.serve_options(&common)?;
            common.runtime()?.block_on(async move {
                tollgate::demo::run(config_dir, opts, shutdown_signal()).await?;
                Ok(ExitCode::SUCCESS)
            })
        }
        Command::Run {
            kube,
            listeners,
            common,
        } => {
            let _log = logging::init(common.log_format);
            let opts = listeners.serve_options(&common)?;
            let mut kube_opts = kube.options(&common.gateway_class);
            kube_opts.mcp_session_secret = opts.mcp_session_secret.clone();
            common.runtime()?.block_on(async move {
                let running = app::start_kubernetes(&opts, &kube_opts).await?;
                shutdown_signal().await;
                tracing::info!("shutting down: draining in-flight requests");
                // Hand the status Lease over first: another replica writes status at once.
                if let Some(k8s) = &running.kubernetes {
                    k8s.release().await;
                }
                running.shutdown().await;
                Ok(ExitCode::SUCCESS)
            })
        }
        Command::Standalone {
            config,
            listeners,
            common,
        } => {
            let _log = logging::init(common.log_format);
            let mut opts = listeners.serve_options(&common)?;
            opts.discovery = DiscoveryMode::Dns;
            common.runtime()?.block_on(async move {
                let running = app::start_standalone(config, &opts).await?;
                shutdown_signal().await;
                tracing::info!("shutting down: draining in-flight requests");
                running.shutdown().await;
                Ok(ExitCode::SUCCESS)
            })
        }
    }
}
