//! A route as the hot path uses it: every string parsed, every header value built, at compile time.
//! Immutable; shared by `Arc` from the snapshot into requests.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method};
use serde::Serialize;

use crate::api::{LoadBalancer, Protocol, Sticky};

/// Where a backend's traffic goes.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum BackendTarget {
    /// A Kubernetes Service in the route's namespace.
    Service {
        namespace: Arc<str>,
        name: Arc<str>,
        port: u16,
    },
    /// An explicit upstream.
    Url {
        https: bool,
        host: Arc<str>,
        port: u16,
        /// Prepended to the forwarded path (without a trailing slash; may be empty).
        base_path: Arc<str>,
    },
}

impl BackendTarget {
    /// A stable label: `namespace/service:port` or `host:port`.
    pub fn label(&self) -> String {
        match self {
            BackendTarget::Service {
                namespace,
                name,
                port,
            } => format!("{namespace}/{name}:{port}"),
            BackendTarget::Url {
                https, host, port, ..
            } => format!("{}://{host}:{port}", if *https { "https" } else { "http" }),
        }
    }
}

/// One backend of a route.
#[derive(Clone, Debug, Serialize)]
pub struct CompiledBackend {
    /// Stable id (the target's label); the key of endpoint sets and metrics.
    pub id: Arc<str>,
    /// The `Host` sent upstream: `svc.ns.svc.<cluster-domain>:port` or the url's `host:port`.
    #[serde(skip)]
    pub authority: HeaderValue,
    pub target: BackendTarget,
    pub weight: u32,
    pub canary: bool,
}

/// Methods a route accepts.
#[derive(Clone, Debug, Default, Serialize)]
pub struct MethodSet {
    /// Empty: every method.
    pub methods: Vec<String>,
    /// The `Allow` header for a 405.
    #[serde(skip)]
    pub allow: Option<HeaderValue>,
    /// A Gateway API method match: another method is simply no match (404, or a shorter
    /// prefix), as the spec says, never 405.
    #[serde(skip)]
    pub mismatch_is_no_match: bool,
}

impl MethodSet {
    pub fn allows(&self, m: &Method) -> bool {
        self.methods.is_empty() || self.methods.iter().any(|x| x == m.as_str())
    }
    pub fn overlaps(&self, other: &MethodSet) -> bool {
        self.methods.is_empty()
            || other.methods.is_empty()
            || self.methods.iter().any(|m| other.methods.contains(m))
    }
}

/// Host pattern of a table entry.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum HostPattern {
    Any,
    Exact(String),
    /// `*.example.com` stored as `.example.com`: matches any name ending with it.
    Wildcard(String),
}

impl HostPattern {
    pub fn parse(text: &str) -> Self {
        match text.strip_prefix('*') {
            Some(suffix) => HostPattern::Wildcard(suffix.to_ascii_lowercase()),
            None => HostPattern::Exact(text.to_ascii_lowercase()),
        }
    }
    /// Higher is more specific: exact beats wildcard beats any; longer beats shorter.
    pub fn specificity(&self) -> u32 {
        match self {
            HostPattern::Any => 0,
            HostPattern::Wildcard(s) => 1_000_000 + s.len() as u32,
            HostPattern::Exact(s) => 2_000_000 + s.len() as u32,
        }
    }
    /// `host` is already lower-case without a port.
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Any => true,
            HostPattern::Exact(h) => h == host,
            HostPattern::Wildcard(suffix) => host.len() > suffix.len() && host.ends_with(&**suffix),
        }
    }
}

/// Stream and exchange timeouts.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CompiledTimeouts {
    pub request: Option<Duration>,
    pub first_byte: Option<Duration>,
    pub idle: Option<Duration>,
}

/// When and how often to retry.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CompiledRetry {
    pub attempts: u32,
    /// Bit n set: retry on status 500+n.
    pub on_status: u128,
    pub on_connect_failure: bool,
    pub backoff: Duration,
}

impl CompiledRetry {
    pub fn none() -> Self {
        Self {
            attempts: 1,
            on_status: 0,
            on_connect_failure: false,
            backoff: Duration::ZERO,
        }
    }
    pub fn retries_status(&self, status: u16) -> bool {
        (500..600).contains(&status) && self.on_status & (1u128 << (status - 500)) != 0
    }
}

/// Who may call the route.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CompiledAuth {
    pub required: bool,
    pub roles: Vec<Arc<str>>,
    /// Namespaces whose keys are admitted besides the route's own.
    pub allow_namespaces: Vec<String>,
    pub any_namespace: bool,
}

impl CompiledAuth {
    pub fn admits_namespace(&self, route_ns: &str, key_ns: &str) -> bool {
        self.any_namespace
            || key_ns == route_ns
            || self.allow_namespaces.iter().any(|n| n == key_ns)
    }
}

/// The route's own per-client limits.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CompiledRateLimit {
    pub requests_per_minute: Option<u32>,
    pub burst: Option<u32>,
    pub tokens_per_minute: Option<u64>,
}

/// CORS with its header values prebuilt.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CompiledCors {
    pub any_origin: bool,
    pub origins: Vec<String>,
    #[serde(skip)]
    pub allow_methods: Option<HeaderValue>,
    #[serde(skip)]
    pub allow_headers: Option<HeaderValue>,
    #[serde(skip)]
    pub expose_headers: Option<HeaderValue>,
    #[serde(skip)]
    pub max_age: Option<HeaderValue>,
    pub allow_credentials: bool,
}

impl CompiledCors {
    pub fn allows_origin(&self, origin: &str) -> bool {
        self.any_origin || self.origins.iter().any(|o| o == origin)
    }
}

/// Header edits of a Gateway API header modifier filter, in the spec's order: set, add, remove.
#[derive(Clone, Debug, Default, Serialize)]
pub struct HeaderEdits {
    #[serde(serialize_with = "ser_headers")]
    pub set: Vec<(HeaderName, HeaderValue)>,
    #[serde(serialize_with = "ser_headers")]
    pub add: Vec<(HeaderName, HeaderValue)>,
    #[serde(serialize_with = "ser_names")]
    pub remove: Vec<HeaderName>,
}

impl HeaderEdits {
    pub fn apply(&self, h: &mut http::HeaderMap) {
        for (n, v) in &self.set {
            h.insert(n.clone(), v.clone());
        }
        for (n, v) in &self.add {
            h.append(n.clone(), v.clone());
        }
        for n in &self.remove {
            h.remove(n);
        }
    }
}

/// A path modifier of a redirect or rewrite.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum PathChange {
    /// The whole path becomes this.
    Full(String),
    /// The matched prefix becomes this.
    Prefix(String),
}

/// A Gateway API `RequestRedirect`: answered by the gateway, never forwarded.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CompiledRedirect {
    pub scheme: Option<String>,
    pub hostname: Option<String>,
    pub port: Option<u16>,
    pub path: Option<PathChange>,
    pub status: u16,
}

/// The Gateway API filters of a rule. Boxed behind an `Option` on the route: a route without
/// filters pays one pointer test per phase that reads them.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteFilters {
    pub request_headers: Option<HeaderEdits>,
    pub response_headers: Option<HeaderEdits>,
    pub redirect: Option<CompiledRedirect>,
    /// `URLRewrite` hostname: the `Host` sent upstream.
    #[serde(skip)]
    pub rewrite_host: Option<HeaderValue>,
    /// `URLRewrite` `ReplaceFullPath` (`ReplacePrefixMatch` is the route's `rewrite`).
    pub full_path: Option<String>,
    /// A request that did not arrive over TLS is redirected (308) to `https` (an Ingress with
    /// TLS, or its `ssl-redirect` / `force-ssl-redirect` annotations).
    pub ssl_redirect: bool,
    /// This route's request body limit, below `--max-body-bytes` (`proxy-body-size`).
    pub max_body: Option<u64>,
}

/// A route ready to serve.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CompiledRoute {
    /// `namespace/name`.
    pub id: Arc<str>,
    pub namespace: Arc<str>,
    pub name: String,
    pub hosts: Vec<HostPattern>,
    pub prefix: String,
    /// A Gateway API `Exact` path match: the normalised path must be exactly this (the route
    /// sits under `prefix` in the table, which is this path without a trailing slash).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exact: Option<Box<str>>,
    /// Gateway API `queryParams` (Exact): each name must carry this value. Empty: no check.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub query: Vec<(Box<str>, Box<str>)>,
    pub methods: MethodSet,
    #[serde(serialize_with = "ser_headers")]
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body_field: Option<(String, Vec<String>)>,
    pub protocol: Protocol,
    pub timeouts: CompiledTimeouts,
    pub retry: CompiledRetry,
    pub auth: CompiledAuth,
    pub rate_limit: Option<CompiledRateLimit>,
    pub rewrite: Option<String>,
    /// Gateway API filters (HTTPRoute rules only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filters: Option<Box<RouteFilters>>,
    pub backends: Vec<CompiledBackend>,
    pub cors: Option<CompiledCors>,
    pub tls_secret: Option<String>,
    #[serde(serialize_with = "ser_opt_name")]
    pub canary_header: Option<HeaderName>,
    pub sticky: Sticky,
    pub load_balancer: LoadBalancer,
    /// Tool access of an MCP route (`mcp`), when it has one.
    pub mcp_tools: Option<Arc<crate::mcp::ToolAccess>>,
    /// The servers of a federating MCP route (every backend has `mcp.prefix`), when it is one.
    pub mcp_federation: Option<Arc<crate::mcp::Federation>>,
    /// The weighted (canary, sticky) pick over `backends`.
    #[serde(skip)]
    pub weighted: crate::balance::weighted::WeightedBackends,
    /// Number of header and body conditions (tie-breaker: more specific wins).
    pub conditions: u32,
}

fn ser_headers<S: serde::Serializer>(
    h: &[(HeaderName, HeaderValue)],
    s: S,
) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeSeq;
    let mut seq = s.serialize_seq(Some(h.len()))?;
    for (n, v) in h {
        seq.serialize_element(&(n.as_str(), v.to_str().unwrap_or("<binary>")))?;
    }
    seq.end()
}

fn ser_names<S: serde::Serializer>(h: &[HeaderName], s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeSeq;
    let mut seq = s.serialize_seq(Some(h.len()))?;
    for n in h {
        seq.serialize_element(n.as_str())?;
    }
    seq.end()
}

fn ser_opt_name<S: serde::Serializer>(h: &Option<HeaderName>, s: S) -> Result<S::Ok, S::Error> {
    match h {
        Some(n) => s.serialize_some(n.as_str()),
        None => s.serialize_none(),
    }
}

impl CompiledRoute {
    /// The path to forward: the matched prefix replaced by the rewrite, if any.
    pub fn rewrite_path<'a>(&self, path: &'a str) -> std::borrow::Cow<'a, str> {
        let Some(new_prefix) = &self.rewrite else {
            return std::borrow::Cow::Borrowed(path);
        };
        std::borrow::Cow::Owned(self.replace_prefix(new_prefix, path))
    }

    /// `path` with the matched prefix replaced by `new_prefix`.
    pub fn replace_prefix(&self, new_prefix: &str, path: &str) -> String {
        let rest = if self.prefix == "/" {
            path
        } else {
            &path[self.prefix.len().min(path.len())..]
        };
        let mut out = String::with_capacity(new_prefix.len() + rest.len());
        let base = new_prefix.strip_suffix('/').unwrap_or(new_prefix);
        out.push_str(base);
        if rest.is_empty() {
            if base.is_empty() {
                out.push('/');
            }
        } else if !rest.starts_with('/') {
            out.push('/');
            out.push_str(rest);
        } else {
            out.push_str(rest);
        }
        out
    }
}
