//! The Prometheus metrics of api.md, registered once in a private registry.
//! Label values are bounded (route ids, backend ids, codes); per-client labels are opt-in.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Decrements a gauge when dropped: rides inside a response body, so a stream counts until its
/// last byte.
pub struct GaugeGuard(pub IntGauge);

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Distinct tool names counted per route in `tollgate_mcp_tool_calls_total`; later names are
/// counted as `other`.
pub const MCP_TOOL_LABELS: usize = 64;

impl Metrics {
    /// The `tool` label of a tool called on `route`: its name while the route has used fewer
    /// than [`MCP_TOOL_LABELS`] names, else `other`.
    pub fn mcp_tool_label(&self, route: &str, tool: &str) -> String {
        let mut seen = self
            .mcp_tool_labels
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let names = seen.entry(route.to_string()).or_default();
        if names.contains(tool) {
            return tool.to_string();
        }
        if names.len() < MCP_TOOL_LABELS {
            names.insert(tool.to_string());
            return tool.to_string();
        }
        "other".to_string()
    }
}

/// Every metric the gateway exports.
pub struct Metrics {
    registry: Registry,
    pub requests_total: IntCounterVec,
    pub request_duration: HistogramVec,
    pub upstream_requests_total: IntCounterVec,
    pub upstream_in_flight: IntGaugeVec,
    pub rate_limited_total: IntCounterVec,
    pub auth_failures_total: IntCounterVec,
    pub tokens_total: IntCounterVec,
    pub streams_active: IntGaugeVec,
    /// MCP route requests by JSON-RPC method (bounded list) and outcome.
    pub mcp_requests_total: IntCounterVec,
    /// MCP tool calls by tool (at most [`MCP_TOOL_LABELS`] names per route) and outcome.
    pub mcp_tool_calls_total: IntCounterVec,
    /// Federated MCP servers that could not be reached, by prefix (the others went on).
    pub mcp_server_unavailable_total: IntCounterVec,
    /// The tool names each route has used as labels so far.
    pub mcp_tool_labels:
        std::sync::Mutex<std::collections::HashMap<String, std::collections::HashSet<String>>>,
    pub config_reloads_total: IntCounterVec,
    pub routes: IntGauge,
    pub api_keys: IntGauge,
    pub endpoints_ready: IntGaugeVec,
    pub ratelimit_fallbacks_total: IntCounter,
    pub ext_auth_overloaded_total: IntCounter,
    pub leader: IntGauge,
    pub apiserver_reachable: IntGauge,
    pub apiserver_outages_total: IntCounter,
    pub client_requests_total: Option<IntCounterVec>,
    pub compile_seconds: Histogram,
}

/// Registration failed (a programming error: duplicate or invalid metric).
#[derive(Debug, thiserror::Error)]
#[error("metrics registration failed: {0}")]
pub struct MetricsError(#[from] prometheus::Error);

impl Metrics {
    pub fn new(per_client: bool) -> Result<Self, MetricsError> {
        let registry = Registry::new();
        let counter =
            |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, MetricsError> {
                let c = IntCounterVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(c.clone()))?;
                Ok(c)
            };
        let gauge =
            |name: &str, help: &str, labels: &[&str]| -> Result<IntGaugeVec, MetricsError> {
                let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(g.clone()))?;
                Ok(g)
            };
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "tollgate_request_duration_seconds",
                "Time from request arrival to response headers, by route",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0,
            ]),
            &["route"],
        )?;
        registry.register(Box::new(request_duration.clone()))?;
        let compile_seconds = Histogram::with_opts(HistogramOpts::new(
            "tollgate_config_compile_seconds",
            "Time to compile a snapshot",
        ))?;
        registry.register(Box::new(compile_seconds.clone()))?;
        let routes = IntGauge::new("tollgate_routes", "Routes in the active snapshot")?;
        registry.register(Box::new(routes.clone()))?;
        let api_keys = IntGauge::new("tollgate_api_keys", "API keys in the active snapshot")?;
        registry.register(Box::new(api_keys.clone()))?;
        let ratelimit_fallbacks_total = IntCounter::new(
            "tollgate_ratelimit_fallbacks_total",
            "Limit checks answered locally because Redis was unreachable",
        )?;
        registry.register(Box::new(ratelimit_fallbacks_total.clone()))?;
        let ext_auth_overloaded_total = IntCounter::new(
            "tollgate_ext_auth_overloaded_total",
            "Unknown keys refused (503 auth_unavailable) without asking the external auth \
             service, because --ext-auth-max-concurrent calls were in flight",
        )?;
        registry.register(Box::new(ext_auth_overloaded_total.clone()))?;
        let leader = IntGauge::new(
            "tollgate_leader",
            "1 while this replica holds the status Lease and writes status (tollgate run)",
        )?;
        registry.register(Box::new(leader.clone()))?;
        let apiserver_reachable = IntGauge::new(
            "tollgate_apiserver_reachable",
            "0 while the Kubernetes API server cannot be reached (tollgate run), else 1",
        )?;
        registry.register(Box::new(apiserver_reachable.clone()))?;
        let apiserver_outages_total = IntCounter::new(
            "tollgate_apiserver_outages_total",
            "Kubernetes API server outages seen (tollgate run)",
        )?;
        registry.register(Box::new(apiserver_outages_total.clone()))?;
        let client_requests_total = if per_client {
            Some(counter(
                "tollgate_client_requests_total",
                "Requests by client id (opt-in: --metrics-per-client)",
                &["client", "route", "code"],
            )?)
        } else {
            None
        };
        Ok(Self {
            requests_total: counter(
                "tollgate_requests_total",
                "Requests answered, by route, method and status code",
                &["route", "method", "code"],
            )?,
            request_duration,
            upstream_requests_total: counter(
                "tollgate_upstream_requests_total",
                "Upstream attempts by route, backend and outcome",
                &["route", "backend", "outcome"],
            )?,
            upstream_in_flight: gauge(
                "tollgate_upstream_in_flight",
                "Requests and streams in flight to a backend",
                &["backend"],
            )?,
            rate_limited_total: counter(
                "tollgate_rate_limited_total",
                "Requests refused by a limit, by route and kind (requests, tokens)",
                &["route", "kind"],
            )?,
            auth_failures_total: counter(
                "tollgate_auth_failures_total",
                "Authentication and authorisation failures by reason",
                &["reason"],
            )?,
            tokens_total: counter(
                "tollgate_tokens_total",
                "LLM tokens reported by upstreams, by route and kind (prompt, completion)",
                &["route", "kind"],
            )?,
            streams_active: gauge(
                "tollgate_streams_active",
                "Open SSE and WebSocket streams",
                &["protocol"],
            )?,
            mcp_requests_total: counter(
                "tollgate_mcp_requests_total",
                "Requests of MCP routes by JSON-RPC method and outcome",
                &["route", "method", "outcome"],
            )?,
            mcp_tool_calls_total: counter(
                "tollgate_mcp_tool_calls_total",
                "MCP tools/call requests by tool and outcome",
                &["route", "tool", "outcome"],
            )?,
            mcp_server_unavailable_total: counter(
                "tollgate_mcp_server_unavailable_total",
                "Requests a federated MCP server of the route could not answer, by its prefix",
                &["route", "server"],
            )?,
            mcp_tool_labels: std::sync::Mutex::default(),
            config_reloads_total: counter(
                "tollgate_config_reloads_total",
                "Snapshot rebuilds by result (success, error)",
                &["result"],
            )?,
            routes,
            api_keys,
            endpoints_ready: gauge(
                "tollgate_endpoints_ready",
                "Ready endpoints by backend",
                &["backend"],
            )?,
            ratelimit_fallbacks_total,
            ext_auth_overloaded_total,
            leader,
            apiserver_reachable,
            apiserver_outages_total,
            client_requests_total,
            compile_seconds,
            registry,
        })
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let families = self.registry.gather();
        if TextEncoder::new().encode(&families, &mut buf).is_err() {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}
