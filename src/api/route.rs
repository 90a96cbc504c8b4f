//! `AgentRoute`: a path-prefix route to one or more backends, with its policies.
// kube's derive repeats `type_` once per printcolumn, which clippy mistakes for a duplicate.
#![allow(clippy::duplicated_attributes)]

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::status::Condition;

/// A route from a path prefix (and optional hosts, methods, headers, body field) to backends.
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "tollgate.dev",
    version = "v1alpha1",
    kind = "AgentRoute",
    namespaced,
    status = "AgentRouteStatus",
    shortname = "ar",
    category = "tollgate",
    printcolumn(
        name = "Prefix",
        type_ = "string",
        json_path = ".spec.match.pathPrefix"
    ),
    printcolumn(
        name = "Backends",
        type_ = "string",
        json_path = ".spec.backends[*].service"
    ),
    printcolumn(
        name = "Accepted",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Accepted\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct AgentRouteSpec {
    /// Only gateways of this class serve the route (default "tollgate").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_class: Option<String>,
    /// Exact host names or `*.example.com`; empty means every host.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    // maxItems/maxLength bound the CEL rule's estimated cost (the API server refuses unbounded rules).
    #[schemars(length(max = 64), inner(length(max = 253)))]
    #[x_kube(validation = Rule::new("self.all(h, h.matches('^(\\\\*\\\\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$'))").message("hosts must be lower-case DNS names, optionally starting with '*.'"))]
    pub hosts: Vec<String>,
    /// What a request must look like to take this route.
    #[serde(rename = "match")]
    pub match_: RouteMatch,
    /// `http` (default), `sse`, `websocket` or `mcp` (Model Context Protocol, Streamable HTTP:
    /// sessions pinned by sealed ids).
    #[serde(default)]
    pub protocol: Protocol,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<Timeouts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<RouteAuth>,
    /// Per-client limits on this route, on top of the key's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewrite: Option<Rewrite>,
    /// One or more backends; weights split traffic.
    #[schemars(length(min = 1, max = 16))]
    #[x_kube(validation = Rule::new("self.exists(b, !has(b.weight) || b.weight > 0)").message("at least one backend needs a weight above 0"))]
    pub backends: Vec<Backend>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cors: Option<Cors>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<RouteTls>,
    /// Request header that steers canary traffic: `always` or `never`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[A-Za-z0-9-]+$"))]
    pub canary_header: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sticky: Option<Sticky>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancer>,
    /// MCP policy (`protocol: mcp` routes only): which tools a caller may see and call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mcp: Option<McpPolicy>,
}

/// Tool access on an MCP route.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct McpPolicy {
    /// The first rule whose name glob matches a tool decides who may use it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub tools: Vec<McpToolRule>,
    /// A tool that no rule names is refused to everyone (default: allowed to every caller).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deny_unlisted: bool,
}

/// Who may see and call the tools whose names match `name`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct McpToolRule {
    /// A tool name, `*` matching any run of characters (`search_*`).
    #[schemars(length(min = 1, max = 128))]
    pub name: String,
    /// The caller's key must hold one of these.
    #[schemars(length(min = 1, max = 32))]
    pub roles: Vec<String>,
    /// Calls of the matching tools each client may make, per tool, on this route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<McpToolRateLimit>,
}

/// A per-tool request limit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct McpToolRateLimit {
    #[schemars(range(min = 1))]
    pub requests_per_minute: u32,
    /// Bucket capacity; default `requestsPerMinute`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub burst: Option<u32>,
}

/// A backend of an MCP route that federates several servers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackendMcp {
    /// Its tools are listed as `<prefix>__<tool>`; every backend of the route needs one.
    #[schemars(
        regex(pattern = r"^[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?$"),
        length(max = 64)
    )]
    pub prefix: String,
}

/// What a request must match.
#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteMatch {
    /// Segment-aware prefix: `/a/b` matches `/a/b` and `/a/b/c`, not `/a/bc`.
    #[schemars(regex(pattern = r"^/[^?#\s]*$"), length(max = 1024))]
    pub path_prefix: String,
    /// Empty means every method.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(length(max = 32)))]
    #[x_kube(validation = Rule::new("self.all(m, m.matches('^[A-Z]+$'))").message("methods are upper-case tokens such as GET or POST"))]
    pub methods: Vec<String>,
    /// Every listed header must be present with exactly this value.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderMatch>,
    /// Content-based routing on a top-level JSON field of the request body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_field: Option<BodyFieldMatch>,
}

/// A header that must be present with an exact value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct HeaderMatch {
    #[schemars(regex(pattern = r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$"))]
    pub name: String,
    pub value: String,
}

/// A top-level JSON field of the body whose (string) value must be one of `values`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct BodyFieldMatch {
    #[schemars(length(min = 1))]
    pub name: String,
    #[schemars(length(min = 1))]
    pub values: Vec<String>,
}

/// How the exchange is carried.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Http,
    Sse,
    Websocket,
    Mcp,
}

/// Durations in Go form (`30s`, `1m30s`, `500ms`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Timeouts {
    /// The whole exchange (http); unset means no cap on sse and websocket streams.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = "^([0-9]+(ms|s|m|h))+$"))]
    pub request: Option<String>,
    /// Until the upstream's response headers arrive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = "^([0-9]+(ms|s|m|h))+$"))]
    pub first_byte: Option<String>,
    /// The longest silence between chunks or frames of a stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = "^([0-9]+(ms|s|m|h))+$"))]
    pub idle: Option<String>,
}

/// Retries before the first response byte reaches the client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetryPolicy {
    /// Tries in all, the first included.
    #[schemars(range(min = 1, max = 10))]
    pub attempts: u32,
    /// Status codes (500-599) and/or `connect-failure`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub retry_on: Vec<RetryOn>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = "^([0-9]+(ms|s|m|h))+$"))]
    pub backoff: Option<String>,
}

/// A status code (500-599) or `connect-failure`; YAML may write codes bare (`[502, connect-failure]`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum RetryOn {
    Status(u16),
    ConnectFailure,
}

impl Serialize for RetryOn {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            RetryOn::Status(code) => s.serialize_u16(*code),
            RetryOn::ConnectFailure => s.serialize_str("connect-failure"),
        }
    }
}

impl<'de> Deserialize<'de> for RetryOn {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Str(String),
        }
        let text = match Raw::deserialize(d)? {
            Raw::Int(n) => n.to_string(),
            Raw::Str(s) => s,
        };
        if text == "connect-failure" {
            return Ok(RetryOn::ConnectFailure);
        }
        match text.parse::<u16>() {
            Ok(code) if (500..600).contains(&code) => Ok(RetryOn::Status(code)),
            _ => Err(serde::de::Error::custom(format!(
                "retryOn takes status codes 500-599 or connect-failure, not {text:?}"
            ))),
        }
    }
}

impl JsonSchema for RetryOn {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "RetryOn".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "x-kubernetes-int-or-string": true,
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            // Bounds the CEL rule's estimated cost; "connect-failure" is the longest value.
            "maxLength": 15,
            "x-kubernetes-validations": [{
                "rule": "string(self).matches('^(5[0-9][0-9]|connect-failure)$')",
                "message": "retryOn takes status codes 500-599 or connect-failure"
            }]
        })
    }
    fn inline_schema() -> bool {
        true
    }
}

/// Who may use the route.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouteAuth {
    /// Default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub required: Option<bool>,
    /// The key must hold at least one of these (empty: any key).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<String>,
    /// Keys from these namespaces are admitted too; `*` admits any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_namespaces: Vec<String>,
}

/// Request and token limits.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub requests_per_minute: Option<u32>,
    /// Bucket capacity; default `requestsPerMinute`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub burst: Option<u32>,
    /// LLM tokens per minute, counted from the upstream's reported usage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub tokens_per_minute: Option<u64>,
}

/// Replaces the matched prefix before forwarding.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Rewrite {
    #[schemars(regex(pattern = r"^/[^?#\s]*$"))]
    pub path_prefix: String,
}

/// A backend: a Service in the route's namespace (`service` + `port`) or an explicit `url`.
#[derive(KubeSchema, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.url) ? !has(self.service) && !has(self.port) : has(self.service) && has(self.port)").message("a backend is either service and port, or url"))]
pub struct Backend {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = "^[a-z]([-a-z0-9]*[a-z0-9])?$"), length(max = 63))]
    pub service: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<u16>,
    /// `http://host:port` or `https://host:port`, with an optional base path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = "^https?://[^\\s/?#]+(/[^\\s?#]*)?$"))]
    pub url: Option<String>,
    /// Share of traffic relative to the other backends (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 10000))]
    pub weight: Option<u32>,
    /// Canary backends are steered by `canaryHeader`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub canary: bool,
    /// MCP federation (`protocol: mcp`): this backend is one server among several.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mcp: Option<BackendMcp>,
}

/// Cross-origin rules; preflights are answered by the gateway.
#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!(has(self.allowOrigins) && self.allowOrigins.exists(o, o == '*') && has(self.allowCredentials) && self.allowCredentials)").message("allowOrigins '*' cannot be combined with allowCredentials"))]
pub struct Cors {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(max = 256)))]
    pub allow_origins: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(max = 256)))]
    pub allow_methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(max = 256)))]
    pub allow_headers: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(max = 256)))]
    pub expose_headers: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = "^([0-9]+(ms|s|m|h))+$"))]
    pub max_age: Option<String>,
    #[serde(default)]
    pub allow_credentials: bool,
}

/// Serve the route's hosts over TLS with the certificate of this Secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouteTls {
    pub secret_name: String,
}

/// Session affinity.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Sticky {
    #[default]
    None,
    ClientId,
}

/// How an endpoint is chosen within a backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum LoadBalancer {
    #[default]
    LeastConnections,
    RoundRobin,
    Random,
}

/// What the gateway observed about a route.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentRouteStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<BackendStatus>,
}

/// Ready endpoints of one backend.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackendStatus {
    pub service: String,
    pub ready_endpoints: u32,
}
