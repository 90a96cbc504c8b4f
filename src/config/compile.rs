//! `compile()`: the pure function from a `Store` to a `Snapshot`. Validates every object as the API
//! server's schema would (standalone has no API server), resolves references, orders routes,
//! resolves conflicts, and reports every problem per object. A broken object never breaks another.
//! The problems themselves are the typed values of [`super::problem`].

use std::collections::HashMap;
use std::sync::Arc;

use http::{HeaderName, HeaderValue};

use super::path;
use super::problem::{KeyProblem, PrefixProblem, Reason, RouteProblem, UrlProblem};
use super::route::*;
use super::table::{Entry, RouteTable};
use super::tls::{certified_key, CertStore};
use super::{ObjectKey, ObjectReport, Problem, Snapshot, Store};
use crate::api::{
    parse_duration, AgentApiKeySpec, AgentRoute, AgentRouteSpec, Condition, Cors, RetryOn, Sticky,
    DEFAULT_GATEWAY_CLASS,
};
use crate::auth::keys::{self, KeyDigest, KeyEntry, KeyLimits, KeyStore};

/// Settings that shape a compile.
#[derive(Clone, Debug)]
pub struct CompileOptions {
    /// Only routes of this class are served.
    pub gateway_class: String,
    /// Requests per minute of keys that name none.
    pub default_rpm: u32,
    /// The snapshot's generation number.
    pub generation: u64,
    /// Cluster DNS domain, for the `Host` of Service backends.
    pub cluster_domain: String,
    /// The Secret of MCP session keys (`--mcp-session-secret`), if set.
    pub mcp_session_secret: Option<ObjectKey>,
}

impl Default for CompileOptions {
    fn default() -> Self {
        Self {
            gateway_class: DEFAULT_GATEWAY_CLASS.to_string(),
            default_rpm: 60,
            generation: 1,
            cluster_domain: "cluster.local".to_string(),
            mcp_session_secret: None,
        }
    }
}

/// The snapshot's problem records, rendered from the typed problems of each object.
struct Problems<'a> {
    store: &'a Store,
    list: Vec<Problem>,
}

impl Problems<'_> {
    fn push(
        &mut self,
        kind: &str,
        object: &ObjectKey,
        field: &str,
        reason: Reason,
        message: String,
    ) {
        let origin = self
            .store
            .origins
            .get(&(kind.to_string(), object.clone()))
            .cloned();
        self.list.push(Problem {
            kind: kind.to_string(),
            object: object.clone(),
            field: field.to_string(),
            reason: reason.as_str().to_string(),
            message,
            origin,
        });
    }

    /// A problem of an object whose reasons are not typed (an Ingress's warnings).
    fn push_text(&mut self, kind: &str, object: &ObjectKey, reason: &str, message: String) {
        let origin = self
            .store
            .origins
            .get(&(kind.to_string(), object.clone()))
            .cloned();
        self.list.push(Problem {
            kind: kind.to_string(),
            object: object.clone(),
            field: String::new(),
            reason: reason.to_string(),
            message,
            origin,
        });
    }

    fn route(&mut self, object: &ObjectKey, p: &RouteProblem) {
        self.push("AgentRoute", object, &p.field(), p.reason(), p.to_string());
    }

    fn key(&mut self, object: &ObjectKey, p: &KeyProblem) {
        self.push("AgentApiKey", object, p.field(), p.reason(), p.to_string());
    }
}

/// Shares one `Arc<str>` per distinct string of the store (namespaces, client ids, roles): 100,000
/// keys name 50 namespaces and a few roles, so most of them need no allocation of their own.
#[derive(Default)]
struct Interner<'a> {
    map: HashMap<&'a str, Arc<str>>,
}

impl<'a> Interner<'a> {
    fn get(&mut self, s: &'a str) -> Arc<str> {
        self.map.entry(s).or_insert_with(|| Arc::from(s)).clone()
    }
}

fn object_key<'a, K: kube::Resource>(obj: &'a K, strings: &mut Interner<'a>) -> ObjectKey {
    let meta = obj.meta();
    ObjectKey {
        namespace: strings.get(meta.namespace.as_deref().unwrap_or("default")),
        name: Arc::from(meta.name.as_deref().unwrap_or_default()),
    }
}

/// Oldest first, by creation time then by position in the store: ties and conflicts go to the
/// oldest. (time, index) is unique: an unstable sort gives the same order as a stable one.
pub(super) fn oldest_first<K: kube::Resource>(objects: &[K]) -> Vec<&K> {
    let mut ordered: Vec<(usize, &K)> = objects.iter().enumerate().collect();
    ordered.sort_unstable_by(|(ia, a), (ib, b)| {
        let ta = a.meta().creation_timestamp.as_ref().map(|t| t.0);
        let tb = b.meta().creation_timestamp.as_ref().map(|t| t.0);
        ta.cmp(&tb).then(ia.cmp(ib))
    });
    ordered.into_iter().map(|(_, o)| o).collect()
}

/// Compiles the store. Pure: same store and options, same snapshot.
pub fn compile(store: &Store, opts: &CompileOptions) -> Snapshot {
    let mut problems = Problems {
        store,
        list: Vec::new(),
    };
    let mut reports = Vec::with_capacity(store.keys.len() + store.routes.len());
    let mut strings = Interner::default();

    // Keys first (routes do not depend on them, but reports read better in this order).
    let keys = compile_keys(store, opts, &mut problems, &mut reports, &mut strings);

    let mut certs = CertStore::default();
    // The table's entries by prefix, in acceptance order until RouteTable sorts them; also what
    // conflict detection reads (no copies of prefixes or hosts to look them up).
    let mut by_prefix: HashMap<Box<str>, Vec<Entry>> = HashMap::new();
    let mut routes = Vec::with_capacity(store.routes.len());
    let mut out = RouteOutputs {
        problems: &mut problems,
        reports: &mut reports,
        by_prefix: &mut by_prefix,
        routes: &mut routes,
        certs: &mut certs,
    };
    compile_agent_routes(store, opts, &mut strings, &mut out);
    let gateway_api = super::gateway::compile_gateway_api(
        store,
        opts,
        store.routes.len() as u64,
        &mut by_prefix,
        &mut routes,
        &mut certs,
    );
    let ingresses = super::ingress::compile_ingresses(
        store,
        opts,
        (store.routes.len() + store.gateway_api.http_routes.len()) as u64,
        &mut by_prefix,
        &mut routes,
        &mut certs,
    );
    for i in &ingresses {
        for (reason, message) in &i.warnings {
            problems.push_text("Ingress", &i.object, reason, message.clone());
        }
    }
    certs.finish();
    let mcp_session_keys = opts
        .mcp_session_secret
        .as_ref()
        .and_then(|name| mcp_session_keys(store, name, &mut problems));

    Snapshot {
        gateway_api,
        ingresses,
        generation: opts.generation,
        routes: RouteTable::new(by_prefix, routes),
        keys,
        certs,
        problems: problems.list,
        reports,
        endpoints: HashMap::new(),
        mcp_session_keys,
        keepalive: Vec::new(),
    }
}

/// What compiling routes adds to: problems, reports, the table's entries and the certificates.
struct RouteOutputs<'a, 'p> {
    problems: &'a mut Problems<'p>,
    reports: &'a mut Vec<ObjectReport>,
    by_prefix: &'a mut HashMap<Box<str>, Vec<Entry>>,
    routes: &'a mut Vec<Arc<CompiledRoute>>,
    certs: &'a mut CertStore,
}

/// The AgentRoutes of our class, oldest first: compiled, checked for conflicts, their
/// references resolved, and entered in the table.
fn compile_agent_routes<'a>(
    store: &'a Store,
    opts: &CompileOptions,
    strings: &mut Interner<'a>,
    out: &mut RouteOutputs<'_, '_>,
) {
    // The conditions of every accepted route whose references resolve: one shared list.
    let accepted_ok: Arc<[Condition]> = Arc::new([
        Condition::new("Accepted", true, "Accepted", ""),
        Condition::new("ResolvedRefs", true, "ResolvedRefs", ""),
    ]);
    for (order, route) in oldest_first(&store.routes).into_iter().enumerate() {
        let class = route
            .spec
            .gateway_class
            .as_deref()
            .unwrap_or(DEFAULT_GATEWAY_CLASS);
        if class != opts.gateway_class {
            continue;
        }
        let key = object_key(route, strings);
        let generation = route.metadata.generation;
        let compiled = match compile_route(route, &key, opts, strings) {
            Ok(c) => c,
            Err(found) => {
                for p in &found {
                    out.problems.route(&key, p);
                }
                out.reports.push(route_report(
                    key,
                    generation,
                    not_accepted(&found),
                    Vec::new(),
                ));
                continue;
            }
        };

        if let Some(winner) = conflicting(out.by_prefix, &compiled) {
            let p = RouteProblem::Conflicted {
                prefix: compiled.prefix.clone(),
                winner,
            };
            out.problems.route(&key, &p);
            let conditions = Arc::new([
                Condition::new("Accepted", false, "Conflicted", p.to_string()),
                Condition::new("ResolvedRefs", true, "ResolvedRefs", ""),
            ]);
            out.reports
                .push(route_report(key, generation, conditions, Vec::new()));
            continue;
        }

        // The last unresolved reference is the one the condition names.
        let unresolved = resolve_refs(store, &compiled, out.certs);
        for p in &unresolved {
            out.problems.route(&key, p);
        }
        let conditions = match unresolved.last() {
            None => accepted_ok.clone(),
            Some(p) => Arc::new([
                Condition::new("Accepted", true, "Accepted", ""),
                Condition::new("ResolvedRefs", false, p.reason().as_str(), p.to_string()),
            ]),
        };

        let compiled = Arc::new(compiled);
        let slot = match out.by_prefix.get_mut(compiled.prefix.as_str()) {
            Some(slot) => slot,
            None => out
                .by_prefix
                .entry(compiled.prefix.as_str().into())
                .or_insert_with(|| Vec::with_capacity(compiled.hosts.len())),
        };
        for host in &compiled.hosts {
            slot.push(Entry {
                host: host.clone(),
                route: compiled.clone(),
                specificity: host.specificity(),
                order: order as u64,
            });
        }
        let backend_names: Vec<String> =
            compiled.backends.iter().map(|b| b.id.to_string()).collect();
        out.reports
            .push(route_report(key, generation, conditions, backend_names));
        out.routes.push(compiled);
    }
}

/// The MCP session keys from the `keys` entry of the Secret `name`; a problem when it is
/// missing or unusable (the key material never appears in the message).
fn mcp_session_keys(
    store: &Store,
    name: &ObjectKey,
    problems: &mut Problems<'_>,
) -> Option<Arc<crate::mcp::SessionKeys>> {
    let Some(text) = store
        .secrets
        .get(name)
        .and_then(|s| secret_value(s, "keys"))
    else {
        problems.push(
            "Secret",
            name,
            "data.keys",
            Reason::SecretNotFound,
            "the --mcp-session-secret Secret or its keys entry is missing".to_string(),
        );
        return None;
    };
    match crate::mcp::SessionKeys::parse(&text) {
        Ok(k) => Some(Arc::new(k)),
        Err(e) => {
            problems.push(
                "Secret",
                name,
                "data.keys",
                Reason::Invalid,
                format!("MCP session keys: {e}"),
            );
            None
        }
    }
}

/// The conditions of a route that is not accepted: every problem in one message.
fn not_accepted(found: &[RouteProblem]) -> Arc<[Condition]> {
    let msg = found
        .iter()
        .map(|p| {
            let field = p.field();
            if field.is_empty() {
                p.to_string()
            } else {
                format!("{field}: {p}")
            }
        })
        .collect::<Vec<_>>()
        .join("; ");
    Arc::new([
        Condition::new("Accepted", false, "Invalid", msg),
        Condition::new("ResolvedRefs", false, "Invalid", "route not accepted"),
    ])
}

/// The id of an older accepted route that serves the same prefix, a same host and the same
/// conditions (the last one found, as the routes were accepted).
fn conflicting(
    by_prefix: &HashMap<Box<str>, Vec<Entry>>,
    route: &CompiledRoute,
) -> Option<Arc<str>> {
    let older = by_prefix.get(route.prefix.as_str())?;
    let mut winner = None;
    for host in &route.hosts {
        for e in older.iter().filter(|e| e.host == *host) {
            let other = &e.route;
            if other.headers == route.headers
                && other.body_field == route.body_field
                && other.methods.overlaps(&route.methods)
            {
                winner = Some(other.id.clone());
            }
        }
    }
    winner
}

/// References: Services (Kubernetes mode) and the TLS Secret, whose certificate goes into `certs`
/// for the route's hosts. Returns what does not resolve.
fn resolve_refs(store: &Store, route: &CompiledRoute, certs: &mut CertStore) -> Vec<RouteProblem> {
    let mut unresolved = Vec::new();
    if let Some(services) = &store.services {
        let missing: Vec<String> = route
            .backends
            .iter()
            .filter_map(|b| match &b.target {
                BackendTarget::Service {
                    namespace, name, ..
                } if !services.contains(&ObjectKey::new(&**namespace, &**name)) => {
                    Some(name.to_string())
                }
                _ => None,
            })
            .collect();
        if !missing.is_empty() {
            unresolved.push(RouteProblem::ServiceNotFound(missing));
        }
    }
    if let Some(secret_name) = &route.tls_secret {
        let skey = ObjectKey::new(&*route.namespace, secret_name);
        match tls_from_secret(store.secrets.get(&skey)) {
            Ok(cert) => {
                for h in &route.hosts {
                    match h {
                        HostPattern::Exact(name) => certs.insert(name, cert.clone()),
                        HostPattern::Wildcard(suffix) => {
                            certs.insert(&format!("*{suffix}"), cert.clone())
                        }
                        HostPattern::Any => certs.insert("*", cert.clone()),
                    }
                }
            }
            Err(p) => unresolved.push(p),
        }
    }
    unresolved
}

fn route_report(
    key: ObjectKey,
    generation: Option<i64>,
    conditions: Arc<[Condition]>,
    backends: Vec<String>,
) -> ObjectReport {
    ObjectReport {
        kind: "AgentRoute",
        object: key,
        generation,
        conditions,
        fingerprint: None,
        backends,
    }
}

pub(super) fn tls_from_secret(
    secret: Option<&k8s_openapi::api::core::v1::Secret>,
) -> Result<Arc<rustls::sign::CertifiedKey>, RouteProblem> {
    let secret = secret.ok_or(RouteProblem::TlsSecretNotFound)?;
    let crt = secret_value(secret, "tls.crt").ok_or(RouteProblem::TlsSecretMissing("tls.crt"))?;
    let key = secret_value(secret, "tls.key").ok_or(RouteProblem::TlsSecretMissing("tls.key"))?;
    certified_key(&crt, &key).map_err(|e| RouteProblem::InvalidCertificate(e.to_string()))
}

/// A value of a Secret, from `data` (already base64-decoded) or `stringData`.
pub fn secret_value(secret: &k8s_openapi::api::core::v1::Secret, key: &str) -> Option<Vec<u8>> {
    if let Some(v) = secret.data.as_ref().and_then(|d| d.get(key)) {
        return Some(v.0.clone());
    }
    secret
        .string_data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|s| s.as_bytes().to_vec())
}

pub(super) fn normalize_prefix(p: &str) -> Result<String, PrefixProblem> {
    if !p.starts_with('/') {
        return Err(PrefixProblem::NotAbsolute);
    }
    let n = path::normalize(p)?;
    if n != p && n.trim_end_matches('/') != p.trim_end_matches('/') {
        return Err(PrefixProblem::NotNormal(n.into_owned()));
    }
    let trimmed = n.trim_end_matches('/');
    Ok(if trimmed.is_empty() {
        "/".to_string()
    } else {
        trimmed.to_string()
    })
}

pub(super) fn valid_host(h: &str) -> bool {
    let name = h.strip_prefix("*.").unwrap_or(h);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

fn duration_field(
    value: &Option<String>,
    field: &'static str,
    out: &mut Vec<RouteProblem>,
) -> Option<std::time::Duration> {
    let text = value.as_ref()?;
    match parse_duration(text) {
        Ok(d) => Some(d),
        Err(error) => {
            out.push(RouteProblem::Duration { field, error });
            None
        }
    }
}

/// One route, section by section in the order of its spec. Every section reports its own
/// problems; the route is served only if none of them found one.
fn compile_route<'a>(
    route: &'a AgentRoute,
    key: &ObjectKey,
    opts: &CompileOptions,
    strings: &mut Interner<'a>,
) -> Result<CompiledRoute, Vec<RouteProblem>> {
    let spec = &route.spec;
    let mut out = Vec::new();
    if key.name.is_empty() {
        out.push(RouteProblem::NameRequired);
    }
    let CompiledMatch {
        prefix,
        hosts,
        methods,
        headers,
        body_field,
    } = compile_match(spec, &mut out);
    if spec.protocol == crate::api::Protocol::Mcp && !methods.allows(&http::Method::POST) {
        out.push(RouteProblem::McpMethods);
    }
    let mcp_tools = compile_mcp(spec, strings, &mut out);
    let mcp_federation = compile_federation(spec, &mut out);
    let conditions = headers.len() as u32 + u32::from(body_field.is_some());
    let timeouts = compile_timeouts(spec, &mut out);
    let retry = compile_retry(spec, &mut out);
    let auth = compile_auth(spec, strings);
    let rate_limit = compile_rate_limit(spec, &mut out);
    let rewrite = compile_rewrite(spec, &mut out);
    let backends = compile_backends(spec, &key.namespace, opts, &mut out);
    let cors = spec.cors.as_ref().map(|c| compile_cors(c, &mut out));
    let canary_header = compile_canary_header(spec, &mut out);
    if !out.is_empty() {
        return Err(out);
    }

    Ok(CompiledRoute {
        id: {
            let mut id = String::with_capacity(key.namespace.len() + 1 + key.name.len());
            id.push_str(&key.namespace);
            id.push('/');
            id.push_str(&key.name);
            Arc::from(id)
        },
        namespace: key.namespace.clone(),
        name: key.name.to_string(),
        hosts,
        prefix,
        exact: None,
        query: Vec::new(),
        methods,
        headers,
        body_field,
        protocol: spec.protocol,
        timeouts,
        retry,
        auth,
        rate_limit,
        rewrite,
        filters: None,
        cors,
        tls_secret: spec.tls.as_ref().map(|t| t.secret_name.clone()),
        canary_header,
        sticky: spec.sticky.unwrap_or(Sticky::None),
        load_balancer: spec.load_balancer.unwrap_or_default(),
        mcp_tools,
        mcp_federation,
        weighted: crate::balance::weighted::WeightedBackends::with_identities(
            backends
                .iter()
                .enumerate()
                .map(|(index, b)| crate::balance::weighted::BackendWeight {
                    index,
                    weight: b.weight,
                    canary: b.canary,
                    identity: b.id.to_string(),
                }),
        ),
        backends,
        conditions,
    })
}

/// `spec.mcp`: tool access, on mcp routes only.
fn compile_mcp<'a>(
    spec: &'a AgentRouteSpec,
    strings: &mut Interner<'a>,
    out: &mut Vec<RouteProblem>,
) -> Option<Arc<crate::mcp::ToolAccess>> {
    let policy = spec.mcp.as_ref()?;
    if spec.protocol != crate::api::Protocol::Mcp {
        out.push(RouteProblem::McpNotMcp);
        return None;
    }
    let mut rules = Vec::with_capacity(policy.tools.len());
    for (index, rule) in policy.tools.iter().enumerate() {
        if rule.name.is_empty() || rule.roles.is_empty() || rule.roles.iter().any(String::is_empty)
        {
            out.push(RouteProblem::McpToolRule { index });
            continue;
        }
        rules.push(crate::mcp::tools::ToolRule {
            name: rule.name.clone(),
            roles: rule.roles.iter().map(|r| strings.get(r)).collect(),
            rate_limit: rule
                .rate_limit
                .as_ref()
                .map(|l| crate::mcp::tools::ToolLimit {
                    per_minute: l.requests_per_minute.max(1),
                    burst: l.burst.unwrap_or(l.requests_per_minute).max(1),
                }),
        });
    }
    if rules.is_empty() && !policy.deny_unlisted {
        // Nothing to decide: every tool for everyone, and no body to read.
        return None;
    }
    Some(Arc::new(crate::mcp::ToolAccess {
        rules,
        deny_unlisted: policy.deny_unlisted,
    }))
}

/// `mcp.prefix` on backends: with one on every backend, the route federates several servers.
fn compile_federation(
    spec: &AgentRouteSpec,
    out: &mut Vec<RouteProblem>,
) -> Option<Arc<crate::mcp::Federation>> {
    let prefixed = spec.backends.iter().filter(|b| b.mcp.is_some()).count();
    if prefixed == 0 {
        return None;
    }
    if spec.protocol != crate::api::Protocol::Mcp {
        out.push(RouteProblem::McpPrefix(
            "mcp.prefix is for backends of routes with protocol mcp",
        ));
        return None;
    }
    if prefixed != spec.backends.len() {
        out.push(RouteProblem::McpPrefix(
            "mcp.prefix must be set on every backend or on none",
        ));
        return None;
    }
    let mut servers: Vec<crate::mcp::FederatedServer> = Vec::with_capacity(prefixed);
    for (backend, b) in spec.backends.iter().enumerate() {
        let prefix = b.mcp.as_ref().map_or("", |m| m.prefix.as_str());
        let shape = !prefix.is_empty()
            && !prefix.contains("__")
            && prefix
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-');
        if !shape {
            out.push(RouteProblem::McpPrefix(
                "an mcp.prefix is letters, digits and '-'",
            ));
            return None;
        }
        if servers.iter().any(|s| &*s.prefix == prefix) {
            out.push(RouteProblem::McpPrefix(
                "two backends have the same mcp.prefix",
            ));
            return None;
        }
        servers.push(crate::mcp::FederatedServer {
            prefix: Arc::from(prefix),
            backend,
        });
    }
    Some(Arc::new(crate::mcp::Federation { servers }))
}

/// What `spec.hosts` and `spec.match` compile to.
struct CompiledMatch {
    prefix: String,
    hosts: Vec<HostPattern>,
    methods: MethodSet,
    headers: Vec<(HeaderName, HeaderValue)>,
    body_field: Option<(String, Vec<String>)>,
}

/// `spec.hosts` and `spec.match`: what a request must look like to be this route's.
fn compile_match(spec: &AgentRouteSpec, out: &mut Vec<RouteProblem>) -> CompiledMatch {
    let prefix = match normalize_prefix(&spec.match_.path_prefix) {
        Ok(p) => p,
        Err(e) => {
            out.push(RouteProblem::PathPrefix(e));
            String::new()
        }
    };
    let mut hosts = Vec::new();
    for (i, h) in spec.hosts.iter().enumerate() {
        if valid_host(h) {
            hosts.push(HostPattern::parse(h));
        } else {
            out.push(RouteProblem::Host {
                index: i,
                host: h.clone(),
            });
        }
    }
    if hosts.is_empty() {
        hosts.push(HostPattern::Any);
    }
    hosts.dedup();

    let mut methods = Vec::new();
    for (i, m) in spec.match_.methods.iter().enumerate() {
        if m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase()) {
            out.push(RouteProblem::Method {
                index: i,
                method: m.clone(),
            });
        } else if !methods.contains(m) {
            methods.push(m.clone());
        }
    }
    let allow = if methods.is_empty() {
        None
    } else {
        HeaderValue::from_str(&methods.join(", ")).ok()
    };

    let mut headers = Vec::new();
    for (i, h) in spec.match_.headers.iter().enumerate() {
        match (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_str(&h.value),
        ) {
            (Ok(n), Ok(v)) => headers.push((n, v)),
            _ => out.push(RouteProblem::MatchHeader { index: i }),
        }
    }
    headers.sort_by(|a, b| {
        a.0.as_str()
            .cmp(b.0.as_str())
            .then(a.1.as_bytes().cmp(b.1.as_bytes()))
    });
    let body_field = spec.match_.body_field.as_ref().and_then(|b| {
        if b.name.is_empty() || b.values.is_empty() {
            out.push(RouteProblem::BodyField);
            None
        } else {
            let mut values = b.values.clone();
            values.sort();
            Some((b.name.clone(), values))
        }
    });
    CompiledMatch {
        prefix,
        hosts,
        methods: MethodSet {
            methods,
            allow,
            mismatch_is_no_match: false,
        },
        headers,
        body_field,
    }
}

/// `spec.timeouts`.
fn compile_timeouts(spec: &AgentRouteSpec, out: &mut Vec<RouteProblem>) -> CompiledTimeouts {
    let t = spec.timeouts.clone().unwrap_or_default();
    CompiledTimeouts {
        request: duration_field(&t.request, "spec.timeouts.request", out),
        first_byte: duration_field(&t.first_byte, "spec.timeouts.firstByte", out),
        idle: duration_field(&t.idle, "spec.timeouts.idle", out),
    }
}

/// `spec.retry`.
fn compile_retry(spec: &AgentRouteSpec, out: &mut Vec<RouteProblem>) -> CompiledRetry {
    let Some(r) = &spec.retry else {
        return CompiledRetry::none();
    };
    if !(1..=10).contains(&r.attempts) {
        out.push(RouteProblem::RetryAttempts);
    }
    let mut on_status = 0u128;
    let mut on_connect_failure = false;
    for on in &r.retry_on {
        match on {
            RetryOn::Status(code) => on_status |= 1u128 << (code - 500),
            RetryOn::ConnectFailure => on_connect_failure = true,
        }
    }
    CompiledRetry {
        attempts: r.attempts.clamp(1, 10),
        on_status,
        on_connect_failure,
        backoff: duration_field(&r.backoff, "spec.retry.backoff", out).unwrap_or_default(),
    }
}

/// `spec.auth`: who may call the route. Nothing in it can be invalid.
fn compile_auth<'a>(spec: &'a AgentRouteSpec, strings: &mut Interner<'a>) -> CompiledAuth {
    match &spec.auth {
        None => CompiledAuth {
            required: true,
            roles: Vec::new(),
            any_namespace: false,
            allow_namespaces: Vec::new(),
        },
        Some(a) => CompiledAuth {
            required: a.required.unwrap_or(true),
            roles: a.roles.iter().map(|r| strings.get(r)).collect(),
            any_namespace: a.allow_namespaces.iter().any(|n| n == "*"),
            allow_namespaces: a.allow_namespaces.clone(),
        },
    }
}

/// `spec.rateLimit`: the route's own limits, on top of the key's.
fn compile_rate_limit(
    spec: &AgentRouteSpec,
    out: &mut Vec<RouteProblem>,
) -> Option<CompiledRateLimit> {
    let r = spec.rate_limit.as_ref()?;
    if r.requests_per_minute == Some(0) || r.burst == Some(0) || r.tokens_per_minute == Some(0) {
        out.push(RouteProblem::RateLimitZero);
    }
    if r.requests_per_minute.is_none() && r.tokens_per_minute.is_none() {
        return None;
    }
    Some(CompiledRateLimit {
        requests_per_minute: r.requests_per_minute,
        burst: r.burst,
        tokens_per_minute: r.tokens_per_minute,
    })
}

/// `spec.rewrite`.
fn compile_rewrite(spec: &AgentRouteSpec, out: &mut Vec<RouteProblem>) -> Option<String> {
    let r = spec.rewrite.as_ref()?;
    match path::normalize(&r.path_prefix) {
        Ok(n) if n == r.path_prefix => Some(r.path_prefix.clone()),
        _ => {
            out.push(RouteProblem::RewritePrefix);
            None
        }
    }
}

/// `spec.backends`: where the route forwards to, with the `Host` each one is sent.
fn compile_backends(
    spec: &AgentRouteSpec,
    namespace: &Arc<str>,
    opts: &CompileOptions,
    out: &mut Vec<RouteProblem>,
) -> Vec<CompiledBackend> {
    let mut backends = Vec::new();
    if spec.backends.is_empty() {
        out.push(RouteProblem::NoBackends);
    }
    for (i, b) in spec.backends.iter().enumerate() {
        let target = match (&b.service, b.port, &b.url) {
            (Some(svc), Some(port), None) if port > 0 => Some(BackendTarget::Service {
                namespace: namespace.clone(),
                name: Arc::from(svc.as_str()),
                port,
            }),
            (None, None, Some(url)) => match parse_backend_url(url) {
                Ok(t) => Some(t),
                Err(e) => {
                    out.push(RouteProblem::BackendUrl { index: i, error: e });
                    None
                }
            },
            _ => {
                out.push(RouteProblem::BackendShape { index: i });
                None
            }
        };
        let Some(target) = target else {
            continue;
        };
        let authority = match &target {
            BackendTarget::Service {
                namespace,
                name,
                port,
            } => format!(
                "{name}.{namespace}.svc.{}:{port}",
                opts.cluster_domain.trim_end_matches('.')
            ),
            BackendTarget::Url { host, port, .. } if host.contains(':') => {
                format!("[{host}]:{port}")
            }
            BackendTarget::Url { host, port, .. } => format!("{host}:{port}"),
        };
        let Ok(authority) = HeaderValue::from_str(&authority) else {
            out.push(RouteProblem::BackendHost { index: i });
            continue;
        };
        backends.push(CompiledBackend {
            authority,
            id: Arc::from(target.label().as_str()),
            target,
            weight: b.weight.unwrap_or(1),
            canary: b.canary,
        });
    }
    if !spec.backends.is_empty() && spec.backends.iter().all(|b| b.weight == Some(0)) {
        out.push(RouteProblem::NoBackendWeight);
    }
    backends
}

/// `spec.cors`: the answers to preflights and the headers added to responses.
fn compile_cors(c: &Cors, out: &mut Vec<RouteProblem>) -> CompiledCors {
    let any_origin = c.allow_origins.iter().any(|o| o == "*");
    if any_origin && c.allow_credentials {
        out.push(RouteProblem::CorsCredentials);
    }
    let join = |v: &[String]| {
        if v.is_empty() {
            None
        } else {
            HeaderValue::from_str(&v.join(", ")).ok()
        }
    };
    let max_age = duration_field(&c.max_age, "spec.cors.maxAge", out)
        .and_then(|d| HeaderValue::from_str(&d.as_secs().to_string()).ok());
    CompiledCors {
        any_origin,
        origins: c.allow_origins.clone(),
        allow_methods: join(&c.allow_methods),
        allow_headers: join(&c.allow_headers),
        expose_headers: join(&c.expose_headers),
        max_age,
        allow_credentials: c.allow_credentials,
    }
}

/// `spec.canaryHeader`.
fn compile_canary_header(spec: &AgentRouteSpec, out: &mut Vec<RouteProblem>) -> Option<HeaderName> {
    let h = spec.canary_header.as_ref()?;
    match HeaderName::from_bytes(h.as_bytes()) {
        Ok(n) => Some(n),
        Err(_) => {
            out.push(RouteProblem::CanaryHeader);
            None
        }
    }
}

/// Parses `http(s)://host[:port][/base]`.
fn parse_backend_url(url: &str) -> Result<BackendTarget, UrlProblem> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e: http::uri::InvalidUri| UrlProblem::Syntax(e.to_string()))?;
    let https = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => return Err(UrlProblem::Scheme),
    };
    let host = uri.host().ok_or(UrlProblem::NoHost)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if uri.query().is_some() {
        return Err(UrlProblem::Query);
    }
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let base = uri.path().trim_end_matches('/');
    Ok(BackendTarget::Url {
        https,
        host: Arc::from(host.to_ascii_lowercase().as_str()),
        port,
        base_path: Arc::from(base),
    })
}

fn compile_keys<'a>(
    store: &'a Store,
    opts: &CompileOptions,
    problems: &mut Problems<'_>,
    reports: &mut Vec<ObjectReport>,
    strings: &mut Interner<'a>,
) -> KeyStore {
    let mut store_out = KeyStore::with_capacity(store.keys.len());
    // One clock reading per compile: every key is judged against the same instant.
    let now = jiff::Timestamp::now().as_second();
    let mut id = String::new();
    // The condition of every ready key, and one role list per distinct list: shared.
    let ready_ok: Arc<[Condition]> = Arc::new([Condition::new("Ready", true, "Ready", "")]);
    let mut role_lists: HashMap<&'a [String], Arc<[Arc<str>]>> = HashMap::new();
    for k in oldest_first(&store.keys) {
        let key = object_key(k, strings);
        let spec = &k.spec;
        let generation = k.metadata.generation;
        let report = |key: ObjectKey,
                      ready: bool,
                      reason: &str,
                      msg: String,
                      fp: Option<keys::Fingerprint>| {
            let conditions = if ready && reason == "Ready" && msg.is_empty() {
                ready_ok.clone()
            } else {
                Arc::new([Condition::new("Ready", ready, reason, msg)])
            };
            ObjectReport {
                kind: "AgentApiKey",
                object: key,
                generation,
                conditions,
                fingerprint: fp,
                backends: Vec::new(),
            }
        };
        let (digest, expires_at) = match key_secret(store, &key, spec) {
            Ok(found) => found,
            Err(p) => {
                problems.key(&key, &p);
                reports.push(report(
                    key,
                    false,
                    p.reason().as_str(),
                    p.condition_message(),
                    None,
                ));
                continue;
            }
        };
        let fp = keys::Fingerprint::of(&digest);
        if spec.disabled {
            reports.push(report(
                key,
                false,
                "Disabled",
                "the key is disabled".into(),
                Some(fp),
            ));
            continue;
        }
        // The key table answers who owns a digest: its entry's id is the owner's `namespace/name`.
        if let Some(owner) = store_out.get(&digest) {
            let p = KeyProblem::Duplicate {
                owner: owner.id.clone(),
            };
            problems.key(&key, &p);
            reports.push(report(key, false, "Conflicted", p.to_string(), Some(fp)));
            continue;
        }
        let rl = spec.rate_limit.clone().unwrap_or_default();
        let rpm = rl.requests_per_minute.unwrap_or(opts.default_rpm).max(1);
        id.clear();
        id.push_str(&key.namespace);
        id.push('/');
        id.push_str(&key.name);
        let entry = KeyEntry {
            id: Arc::from(id.as_str()),
            namespace: key.namespace.clone(),
            client_id: strings.get(&spec.client_id),
            roles: role_lists
                .entry(&spec.roles)
                .or_insert_with(|| spec.roles.iter().map(|r| strings.get(r)).collect())
                .clone(),
            expires_at,
            limits: KeyLimits {
                requests_per_minute: rpm,
                burst: rl.burst.unwrap_or(rpm).max(1),
                tokens_per_minute: rl.tokens_per_minute,
            },
            fingerprint: fp,
        };
        store_out.insert(digest, Arc::new(entry));
        if expires_at.is_some_and(|t| now >= t) {
            reports.push(report(
                key,
                false,
                "Expired",
                "the key has expired".into(),
                Some(fp),
            ));
        } else {
            reports.push(report(key, true, "Ready", String::new(), Some(fp)));
        }
    }
    store_out
}

/// What a key's spec says on its own: the digest of its secret (from the Secret or the hash)
/// and when it expires (Unix seconds). Checked in the order of the fields.
fn key_secret(
    store: &Store,
    key: &ObjectKey,
    spec: &AgentApiKeySpec,
) -> Result<(KeyDigest, Option<i64>), KeyProblem> {
    if spec.client_id.is_empty() {
        return Err(KeyProblem::ClientIdRequired);
    }
    let expires_at = match &spec.expires_at {
        None => None,
        Some(t) => Some(
            t.parse::<jiff::Timestamp>()
                .map_err(|e| KeyProblem::ExpiresAt(e.to_string()))?
                .as_second(),
        ),
    };
    let digest = match (&spec.secret_ref, &spec.key_hash) {
        (Some(r), None) => {
            let skey = ObjectKey::new(&key.namespace, &r.name);
            let named = || (r.name.clone(), r.key.clone());
            let Some(bytes) = store
                .secrets
                .get(&skey)
                .and_then(|s| secret_value(s, &r.key))
            else {
                let (name, key) = named();
                return Err(KeyProblem::SecretNotFound { name, key });
            };
            let trimmed = bytes.trim_ascii();
            if trimmed.is_empty() {
                let (name, key) = named();
                return Err(KeyProblem::SecretEmpty { name, key });
            }
            keys::digest(trimmed)
        }
        (None, Some(h)) => keys::parse_key_hash(h).ok_or(KeyProblem::KeyHash)?,
        _ => return Err(KeyProblem::SecretSource),
    };
    Ok((digest, expires_at))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::fixtures::{api_key, RouteBuilder};
    use crate::api::{RetryPolicy, RouteTls, Timeouts};

    fn route_problems(route: &AgentRoute) -> Vec<RouteProblem> {
        let key = ObjectKey::new("default", route.metadata.name.as_deref().unwrap_or(""));
        let mut strings = Interner::default();
        match compile_route(route, &key, &CompileOptions::default(), &mut strings) {
            Ok(_) => Vec::new(),
            Err(found) => found,
        }
    }

    #[test]
    fn each_broken_section_is_its_own_typed_problem_in_spec_order() {
        let mut r = RouteBuilder::new("r")
            .prefix("api")
            .host("Upper.example")
            .methods(&["get"])
            .url("ftp://nope")
            .build();
        r.spec.timeouts = Some(Timeouts {
            request: Some("10 parsecs".into()),
            ..Default::default()
        });
        r.spec.retry = Some(RetryPolicy {
            attempts: 11,
            retry_on: Vec::new(),
            backoff: None,
        });
        let found = route_problems(&r);
        assert!(
            matches!(
                found.as_slice(),
                [
                    RouteProblem::PathPrefix(PrefixProblem::NotAbsolute),
                    RouteProblem::Host { index: 0, .. },
                    RouteProblem::Method { index: 0, .. },
                    RouteProblem::Duration {
                        field: "spec.timeouts.request",
                        ..
                    },
                    RouteProblem::RetryAttempts,
                    RouteProblem::BackendUrl {
                        index: 0,
                        error: UrlProblem::Scheme
                    },
                ]
            ),
            "{found:?}"
        );
        assert!(found.iter().all(|p| p.reason() == Reason::Invalid));
        assert_eq!(found[5].field(), "spec.backends[0].url");
        assert_eq!(found[5].to_string(), "url scheme must be http or https");
        assert_eq!(found[1].field(), "spec.hosts[0]");
    }

    #[test]
    fn unresolved_references_are_typed_with_their_condition_reason() {
        let mut store = Store {
            services: Some(Default::default()),
            ..Default::default()
        };
        let mut r = RouteBuilder::new("r").backend("llm", 80, 1).build();
        r.spec.tls = Some(RouteTls {
            secret_name: "cert".into(),
        });
        store.routes.push(r);
        let s = compile(&store, &CompileOptions::default());
        let got: Vec<(&str, &str, &str)> = s
            .problems
            .iter()
            .map(|p| (p.field.as_str(), p.reason.as_str(), p.message.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("spec.backends", "BackendNotFound", "Service not found: llm"),
                (
                    "spec.tls.secretName",
                    "SecretNotFound",
                    "TLS Secret not found"
                ),
            ]
        );
        // The route is served; its ResolvedRefs names the last reference that failed.
        let c = &s.reports[0].conditions;
        assert_eq!(
            (c[0].reason.as_str(), c[1].reason.as_str()),
            ("Accepted", "SecretNotFound")
        );
    }

    #[test]
    fn key_problems_are_typed_and_keep_their_condition_text() {
        let store = Store::default();
        let mut k = api_key("k", "agents", "", "secret", &[]);
        assert_eq!(
            key_secret(&store, &ObjectKey::new("agents", "k"), &k.spec),
            Err(KeyProblem::ClientIdRequired)
        );
        assert_eq!(
            KeyProblem::ClientIdRequired.condition_message(),
            "spec.clientId is required"
        );
        k.spec.client_id = "c".into();
        k.spec.key_hash = Some("md5:abc".into());
        assert_eq!(
            key_secret(&store, &ObjectKey::new("agents", "k"), &k.spec),
            Err(KeyProblem::KeyHash)
        );
        k.spec.key_hash = None;
        assert_eq!(
            key_secret(&store, &ObjectKey::new("agents", "k"), &k.spec),
            Err(KeyProblem::SecretSource)
        );
        let dup = KeyProblem::Duplicate {
            owner: Arc::from("agents/old"),
        };
        assert_eq!((dup.field(), dup.reason()), ("spec", Reason::Conflicted));
    }
}
