//! `compile()`: the pure function from a `Store` to a `Snapshot`. Validates every object as the API
//! server's schema would (standalone has no API server), resolves references, orders routes,
//! resolves conflicts, and reports every problem per object. A broken object never breaks another.

use std::collections::HashMap;
use std::sync::Arc;

use http::{HeaderName, HeaderValue};

use super::path;
use super::route::*;
use super::table::{Entry, RouteTable};
use super::tls::{certified_key, CertStore};
use super::{ObjectKey, ObjectReport, Problem, Snapshot, Store};
use crate::api::{
    parse_duration, AgentApiKey, AgentRoute, AgentRouteSpec, Condition, Cors, RetryOn, Sticky,
    DEFAULT_GATEWAY_CLASS,
};
use crate::auth::keys::{self, KeyEntry, KeyLimits, KeyStore};

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
}

impl Default for CompileOptions {
    fn default() -> Self {
        Self {
            gateway_class: DEFAULT_GATEWAY_CLASS.to_string(),
            default_rpm: 60,
            generation: 1,
            cluster_domain: "cluster.local".to_string(),
        }
    }
}

struct Problems<'a> {
    store: &'a Store,
    list: Vec<Problem>,
}

impl Problems<'_> {
    fn push(&mut self, kind: &str, object: &ObjectKey, field: &str, reason: &str, message: String) {
        let origin = self
            .store
            .origins
            .get(&(kind.to_string(), object.clone()))
            .cloned();
        self.list.push(Problem {
            kind: kind.to_string(),
            object: object.clone(),
            field: field.to_string(),
            reason: reason.to_string(),
            message,
            origin,
        });
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

    // Routes, oldest first: ties and conflicts go to the oldest.
    let mut ordered: Vec<(usize, &AgentRoute)> = store.routes.iter().enumerate().collect();
    // (time, index) is unique: an unstable sort gives the same order as a stable one.
    ordered.sort_unstable_by(|(ia, a), (ib, b)| {
        let ta = a.metadata.creation_timestamp.as_ref().map(|t| t.0);
        let tb = b.metadata.creation_timestamp.as_ref().map(|t| t.0);
        ta.cmp(&tb).then(ia.cmp(ib))
    });

    // The conditions of every accepted route whose references resolve: one shared list.
    let accepted_ok: Arc<[Condition]> = Arc::new([
        Condition::new("Accepted", true, "Accepted", ""),
        Condition::new("ResolvedRefs", true, "ResolvedRefs", ""),
    ]);
    let mut certs = CertStore::default();
    // The table's entries by prefix, in acceptance order until RouteTable sorts them; also what
    // conflict detection reads (no copies of prefixes or hosts to look them up).
    let mut by_prefix: HashMap<Box<str>, Vec<Entry>> = HashMap::new();
    let mut routes = Vec::with_capacity(store.routes.len());

    for (order, (_, route)) in ordered.into_iter().enumerate() {
        let class = route
            .spec
            .gateway_class
            .as_deref()
            .unwrap_or(DEFAULT_GATEWAY_CLASS);
        if class != opts.gateway_class {
            continue;
        }
        let key = object_key(route, &mut strings);
        let generation = route.metadata.generation;
        let before = problems.list.len();
        let compiled = compile_route(route, &key, opts, &mut problems, &mut strings);
        let compiled = match compiled {
            Some(c) if problems.list.len() == before => c,
            _ => {
                let msg = problems.list[before..]
                    .iter()
                    .map(|p| {
                        if p.field.is_empty() {
                            p.message.clone()
                        } else {
                            format!("{}: {}", p.field, p.message)
                        }
                    })
                    .collect::<Vec<_>>()
                    .join("; ");
                reports.push(route_report(
                    key,
                    generation,
                    Arc::new([
                        Condition::new("Accepted", false, "Invalid", msg),
                        Condition::new("ResolvedRefs", false, "Invalid", "route not accepted"),
                    ]),
                    Vec::new(),
                ));
                continue;
            }
        };

        // Conflicts with older accepted routes.
        let mut conflict_with: Option<Arc<str>> = None;
        if let Some(older) = by_prefix.get(compiled.prefix.as_str()) {
            for host in &compiled.hosts {
                for e in older.iter().filter(|e| e.host == *host) {
                    let other = &e.route;
                    if other.headers == compiled.headers
                        && other.body_field == compiled.body_field
                        && other.methods.overlaps(&compiled.methods)
                    {
                        conflict_with = Some(other.id.clone());
                    }
                }
            }
        }
        if let Some(winner) = conflict_with {
            let msg = format!(
                "prefix {} on the same hosts and conditions is already served by {winner}",
                compiled.prefix
            );
            problems.push("AgentRoute", &key, "spec.match", "Conflicted", msg.clone());
            reports.push(route_report(
                key,
                generation,
                Arc::new([
                    Condition::new("Accepted", false, "Conflicted", msg),
                    Condition::new("ResolvedRefs", true, "ResolvedRefs", ""),
                ]),
                Vec::new(),
            ));
            continue;
        }

        // References: Services (Kubernetes mode) and the TLS Secret.
        let mut resolved = Condition::new("ResolvedRefs", true, "ResolvedRefs", "");
        if let Some(services) = &store.services {
            let missing: Vec<String> = compiled
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
                let msg = format!("Service not found: {}", missing.join(", "));
                problems.push(
                    "AgentRoute",
                    &key,
                    "spec.backends",
                    "BackendNotFound",
                    msg.clone(),
                );
                resolved = Condition::new("ResolvedRefs", false, "BackendNotFound", msg);
            }
        }
        if let Some(secret_name) = &compiled.tls_secret {
            let skey = ObjectKey::new(&*compiled.namespace, secret_name);
            match tls_from_secret(store.secrets.get(&skey)) {
                Ok(cert) => {
                    for h in &compiled.hosts {
                        match h {
                            HostPattern::Exact(name) => certs.insert(name, cert.clone()),
                            HostPattern::Wildcard(suffix) => {
                                certs.insert(&format!("*{suffix}"), cert.clone())
                            }
                            HostPattern::Any => certs.insert("*", cert.clone()),
                        }
                    }
                }
                Err((reason, msg)) => {
                    problems.push(
                        "AgentRoute",
                        &key,
                        "spec.tls.secretName",
                        reason,
                        msg.clone(),
                    );
                    resolved = Condition::new("ResolvedRefs", false, reason, msg);
                }
            }
        }

        let compiled = Arc::new(compiled);
        let slot = match by_prefix.get_mut(compiled.prefix.as_str()) {
            Some(slot) => slot,
            None => by_prefix
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
        let conditions = if resolved == accepted_ok[1] {
            accepted_ok.clone()
        } else {
            Arc::new([Condition::new("Accepted", true, "Accepted", ""), resolved])
        };
        reports.push(route_report(key, generation, conditions, backend_names));
        routes.push(compiled);
    }
    certs.finish();

    Snapshot {
        generation: opts.generation,
        routes: RouteTable::new(by_prefix, routes),
        keys,
        certs,
        problems: problems.list,
        reports,
        endpoints: HashMap::new(),
        keepalive: Vec::new(),
    }
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

fn tls_from_secret(
    secret: Option<&k8s_openapi::api::core::v1::Secret>,
) -> Result<Arc<rustls::sign::CertifiedKey>, (&'static str, String)> {
    let secret = secret.ok_or(("SecretNotFound", "TLS Secret not found".to_string()))?;
    let crt = secret_value(secret, "tls.crt")
        .ok_or(("InvalidCertificate", "Secret has no tls.crt".to_string()))?;
    let key = secret_value(secret, "tls.key")
        .ok_or(("InvalidCertificate", "Secret has no tls.key".to_string()))?;
    certified_key(&crt, &key).map_err(|e| ("InvalidCertificate", e.to_string()))
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

fn normalize_prefix(p: &str) -> Result<String, String> {
    if !p.starts_with('/') {
        return Err("must start with '/'".into());
    }
    let n = path::normalize(p).map_err(|e| e.to_string())?;
    if n != p && n.trim_end_matches('/') != p.trim_end_matches('/') {
        return Err(format!("is not in normal form (would be {n})"));
    }
    let trimmed = n.trim_end_matches('/');
    Ok(if trimmed.is_empty() {
        "/".to_string()
    } else {
        trimmed.to_string()
    })
}

fn valid_host(h: &str) -> bool {
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
    field: &str,
    key: &ObjectKey,
    problems: &mut Problems<'_>,
) -> Option<std::time::Duration> {
    let text = value.as_ref()?;
    match parse_duration(text) {
        Ok(d) => Some(d),
        Err(e) => {
            problems.push("AgentRoute", key, field, "Invalid", e.to_string());
            None
        }
    }
}

/// Where the sections of one route report their problems.
struct RouteProblems<'p, 's> {
    key: &'p ObjectKey,
    problems: &'p mut Problems<'s>,
}

impl RouteProblems<'_, '_> {
    fn invalid(&mut self, field: &str, message: String) {
        self.problems
            .push("AgentRoute", self.key, field, "Invalid", message);
    }

    fn duration(&mut self, value: &Option<String>, field: &str) -> Option<std::time::Duration> {
        duration_field(value, field, self.key, self.problems)
    }
}

/// One route, section by section in the order of its spec. Every section reports its own
/// problems; the route is served only if none of them found one.
fn compile_route<'a>(
    route: &'a AgentRoute,
    key: &ObjectKey,
    opts: &CompileOptions,
    problems: &mut Problems<'_>,
    strings: &mut Interner<'a>,
) -> Option<CompiledRoute> {
    let spec = &route.spec;
    let mut out = RouteProblems { key, problems };
    if key.name.is_empty() {
        out.invalid("metadata.name", "is required".into());
    }
    let CompiledMatch {
        prefix,
        hosts,
        methods,
        headers,
        body_field,
    } = compile_match(spec, &mut out);
    let conditions = headers.len() as u32 + u32::from(body_field.is_some());
    let timeouts = compile_timeouts(spec, &mut out);
    let retry = compile_retry(spec, &mut out);
    let auth = compile_auth(spec, strings);
    let rate_limit = compile_rate_limit(spec, &mut out);
    let rewrite = compile_rewrite(spec, &mut out);
    let backends = compile_backends(spec, &key.namespace, opts, &mut out);
    let cors = spec.cors.as_ref().map(|c| compile_cors(c, &mut out));
    let canary_header = compile_canary_header(spec, &mut out);

    Some(CompiledRoute {
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
        methods,
        headers,
        body_field,
        protocol: spec.protocol,
        timeouts,
        retry,
        auth,
        rate_limit,
        rewrite,
        cors,
        tls_secret: spec.tls.as_ref().map(|t| t.secret_name.clone()),
        canary_header,
        sticky: spec.sticky.unwrap_or(Sticky::None),
        load_balancer: spec.load_balancer.unwrap_or_default(),
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

/// What `spec.hosts` and `spec.match` compile to.
struct CompiledMatch {
    prefix: String,
    hosts: Vec<HostPattern>,
    methods: MethodSet,
    headers: Vec<(HeaderName, HeaderValue)>,
    body_field: Option<(String, Vec<String>)>,
}

/// `spec.hosts` and `spec.match`: what a request must look like to be this route's.
fn compile_match(spec: &AgentRouteSpec, out: &mut RouteProblems<'_, '_>) -> CompiledMatch {
    let prefix = match normalize_prefix(&spec.match_.path_prefix) {
        Ok(p) => p,
        Err(e) => {
            out.invalid("spec.match.pathPrefix", e);
            String::new()
        }
    };
    let mut hosts = Vec::new();
    for (i, h) in spec.hosts.iter().enumerate() {
        if valid_host(h) {
            hosts.push(HostPattern::parse(h));
        } else {
            out.invalid(
                &format!("spec.hosts[{i}]"),
                format!("{h:?} is not a lower-case DNS name or *.name"),
            );
        }
    }
    if hosts.is_empty() {
        hosts.push(HostPattern::Any);
    }
    hosts.dedup();

    let mut methods = Vec::new();
    for (i, m) in spec.match_.methods.iter().enumerate() {
        if m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase()) {
            out.invalid(
                &format!("spec.match.methods[{i}]"),
                format!("{m:?} is not an upper-case method"),
            );
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
            _ => out.invalid(
                &format!("spec.match.headers[{i}]"),
                "invalid header name or value".into(),
            ),
        }
    }
    headers.sort_by(|a, b| {
        a.0.as_str()
            .cmp(b.0.as_str())
            .then(a.1.as_bytes().cmp(b.1.as_bytes()))
    });
    let body_field = spec.match_.body_field.as_ref().and_then(|b| {
        if b.name.is_empty() || b.values.is_empty() {
            out.invalid(
                "spec.match.bodyField",
                "needs a name and at least one value".into(),
            );
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
        methods: MethodSet { methods, allow },
        headers,
        body_field,
    }
}

/// `spec.timeouts`.
fn compile_timeouts(spec: &AgentRouteSpec, out: &mut RouteProblems<'_, '_>) -> CompiledTimeouts {
    let t = spec.timeouts.clone().unwrap_or_default();
    CompiledTimeouts {
        request: out.duration(&t.request, "spec.timeouts.request"),
        first_byte: out.duration(&t.first_byte, "spec.timeouts.firstByte"),
        idle: out.duration(&t.idle, "spec.timeouts.idle"),
    }
}

/// `spec.retry`.
fn compile_retry(spec: &AgentRouteSpec, out: &mut RouteProblems<'_, '_>) -> CompiledRetry {
    let Some(r) = &spec.retry else {
        return CompiledRetry::none();
    };
    if !(1..=10).contains(&r.attempts) {
        out.invalid("spec.retry.attempts", "must be between 1 and 10".into());
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
        backoff: out
            .duration(&r.backoff, "spec.retry.backoff")
            .unwrap_or_default(),
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
    out: &mut RouteProblems<'_, '_>,
) -> Option<CompiledRateLimit> {
    let r = spec.rate_limit.as_ref()?;
    if r.requests_per_minute == Some(0) || r.burst == Some(0) || r.tokens_per_minute == Some(0) {
        out.invalid("spec.rateLimit", "limits must be at least 1".into());
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
fn compile_rewrite(spec: &AgentRouteSpec, out: &mut RouteProblems<'_, '_>) -> Option<String> {
    let r = spec.rewrite.as_ref()?;
    match path::normalize(&r.path_prefix) {
        Ok(n) if n == r.path_prefix => Some(r.path_prefix.clone()),
        _ => {
            out.invalid(
                "spec.rewrite.pathPrefix",
                "must be a normal absolute path".into(),
            );
            None
        }
    }
}

/// `spec.backends`: where the route forwards to, with the `Host` each one is sent.
fn compile_backends(
    spec: &AgentRouteSpec,
    namespace: &Arc<str>,
    opts: &CompileOptions,
    out: &mut RouteProblems<'_, '_>,
) -> Vec<CompiledBackend> {
    let mut backends = Vec::new();
    if spec.backends.is_empty() {
        out.invalid("spec.backends", "at least one backend is required".into());
    }
    for (i, b) in spec.backends.iter().enumerate() {
        let field = format!("spec.backends[{i}]");
        let target = match (&b.service, b.port, &b.url) {
            (Some(svc), Some(port), None) if port > 0 => Some(BackendTarget::Service {
                namespace: namespace.clone(),
                name: Arc::from(svc.as_str()),
                port,
            }),
            (None, None, Some(url)) => match parse_backend_url(url) {
                Ok(t) => Some(t),
                Err(e) => {
                    out.invalid(&format!("{field}.url"), e);
                    None
                }
            },
            _ => {
                out.invalid(
                    &field,
                    "a backend is either service and port, or url".into(),
                );
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
            out.invalid(&field, "invalid host".into());
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
        out.invalid(
            "spec.backends",
            "at least one backend needs a weight above 0".into(),
        );
    }
    backends
}

/// `spec.cors`: the answers to preflights and the headers added to responses.
fn compile_cors(c: &Cors, out: &mut RouteProblems<'_, '_>) -> CompiledCors {
    let any_origin = c.allow_origins.iter().any(|o| o == "*");
    if any_origin && c.allow_credentials {
        out.invalid(
            "spec.cors",
            "allowOrigins '*' cannot be combined with allowCredentials".into(),
        );
    }
    let join = |v: &[String]| {
        if v.is_empty() {
            None
        } else {
            HeaderValue::from_str(&v.join(", ")).ok()
        }
    };
    let max_age = out
        .duration(&c.max_age, "spec.cors.maxAge")
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
fn compile_canary_header(
    spec: &AgentRouteSpec,
    out: &mut RouteProblems<'_, '_>,
) -> Option<HeaderName> {
    let h = spec.canary_header.as_ref()?;
    match HeaderName::from_bytes(h.as_bytes()) {
        Ok(n) => Some(n),
        Err(_) => {
            out.invalid("spec.canaryHeader", "invalid header name".into());
            None
        }
    }
}

/// Parses `http(s)://host[:port][/base]`.
pub fn parse_backend_url(url: &str) -> Result<BackendTarget, String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("invalid url: {e}"))?;
    let https = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => return Err("url scheme must be http or https".into()),
    };
    let host = uri.host().ok_or("url has no host")?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if uri.query().is_some() {
        return Err("url must not have a query".into());
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
    let mut ordered: Vec<(usize, &AgentApiKey)> = store.keys.iter().enumerate().collect();
    // (time, index) is unique: an unstable sort gives the same order as a stable one.
    ordered.sort_unstable_by(|(ia, a), (ib, b)| {
        let ta = a.metadata.creation_timestamp.as_ref().map(|t| t.0);
        let tb = b.metadata.creation_timestamp.as_ref().map(|t| t.0);
        ta.cmp(&tb).then(ia.cmp(ib))
    });
    let mut store_out = KeyStore::with_capacity(store.keys.len());
    // One clock reading per compile: every key is judged against the same instant.
    let now = jiff::Timestamp::now().as_second();
    let mut id = String::new();
    // The condition of every ready key, and one role list per distinct list: shared.
    let ready_ok: Arc<[Condition]> = Arc::new([Condition::new("Ready", true, "Ready", "")]);
    let mut role_lists: HashMap<&'a [String], Arc<[Arc<str>]>> = HashMap::new();
    for (_, k) in ordered {
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
        if spec.client_id.is_empty() {
            problems.push(
                "AgentApiKey",
                &key,
                "spec.clientId",
                "Invalid",
                "is required".into(),
            );
            reports.push(report(
                key,
                false,
                "Invalid",
                "spec.clientId is required".into(),
                None,
            ));
            continue;
        }
        let expires_at = match &spec.expires_at {
            None => None,
            Some(t) => match t.parse::<jiff::Timestamp>() {
                Ok(ts) => Some(ts.as_second()),
                Err(e) => {
                    let msg = format!("not an RFC 3339 time: {e}");
                    problems.push(
                        "AgentApiKey",
                        &key,
                        "spec.expiresAt",
                        "Invalid",
                        msg.clone(),
                    );
                    reports.push(report(key, false, "Invalid", msg, None));
                    continue;
                }
            },
        };
        let digest = match (&spec.secret_ref, &spec.key_hash) {
            (Some(r), None) => {
                let skey = ObjectKey::new(&key.namespace, &r.name);
                match store
                    .secrets
                    .get(&skey)
                    .and_then(|s| secret_value(s, &r.key))
                {
                    Some(bytes) => {
                        let trimmed = bytes.trim_ascii();
                        if trimmed.is_empty() {
                            let msg = format!("Secret {} key {} is empty", r.name, r.key);
                            problems.push(
                                "AgentApiKey",
                                &key,
                                "spec.secretRef",
                                "SecretNotFound",
                                msg.clone(),
                            );
                            reports.push(report(key, false, "SecretNotFound", msg, None));
                            continue;
                        }
                        keys::digest(trimmed)
                    }
                    None => {
                        let msg = format!("Secret {} with key {} not found", r.name, r.key);
                        problems.push(
                            "AgentApiKey",
                            &key,
                            "spec.secretRef",
                            "SecretNotFound",
                            msg.clone(),
                        );
                        reports.push(report(key, false, "SecretNotFound", msg, None));
                        continue;
                    }
                }
            }
            (None, Some(h)) => match keys::parse_key_hash(h) {
                Some(d) => d,
                None => {
                    let msg = "must be sha256: followed by 64 lower-case hex digits".to_string();
                    problems.push("AgentApiKey", &key, "spec.keyHash", "Invalid", msg.clone());
                    reports.push(report(key, false, "Invalid", msg, None));
                    continue;
                }
            },
            _ => {
                let msg = "set exactly one of secretRef and keyHash".to_string();
                problems.push("AgentApiKey", &key, "spec", "Invalid", msg.clone());
                reports.push(report(key, false, "Invalid", msg, None));
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
            let msg = format!("the same key is already defined by {}", owner.id);
            problems.push("AgentApiKey", &key, "spec", "Conflicted", msg.clone());
            reports.push(report(key, false, "Conflicted", msg, Some(fp)));
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
