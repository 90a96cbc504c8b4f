//! Ingresses (networking.k8s.io/v1) into the same route table: those of an IngressClass of our
//! controller (`spec.ingressClassName`, or none when our class carries the is-default-class
//! annotation). Pure, like the rest of compile: what an Ingress asks for that is not served
//! becomes a warning of its report, which the status writer turns into a Warning Event.
//!
//! Each path is a route: `Prefix` and `ImplementationSpecific` match whole segments, `Exact`
//! the path itself. A rule-less Ingress's `defaultBackend` catches what nothing else matched
//! (the oldest, if several). The ingress-nginx annotations of [`ANNOTATIONS`] are served; any
//! other `nginx.ingress.kubernetes.io/*` annotation is a warning that names it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use k8s_openapi::api::networking::v1::{Ingress, IngressBackend, IngressClass};

use super::compile::{normalize_prefix, oldest_first, tls_from_secret, valid_host};
use super::gateway::enter_routes;
use super::route::*;
use super::table::Entry;
use super::tls::CertStore;
use super::{CompileOptions, ObjectKey, Store};
use crate::api::{LoadBalancer, Protocol, Sticky};

/// The `controller` of an IngressClass of ours.
pub const INGRESS_CONTROLLER: &str = "tollgate.dev/ingress-controller";
/// The annotation that makes an IngressClass the default for Ingresses that name none.
pub const DEFAULT_CLASS_ANNOTATION: &str = "ingressclass.kubernetes.io/is-default-class";
/// The prefix of ingress-nginx's annotations.
pub const NGINX_PREFIX: &str = "nginx.ingress.kubernetes.io/";

/// The ingress-nginx annotations served (without [`NGINX_PREFIX`]).
pub const ANNOTATIONS: &[&str] = &[
    "rewrite-target",
    "ssl-redirect",
    "force-ssl-redirect",
    "proxy-body-size",
    "proxy-read-timeout",
    "limit-rpm",
    "enable-cors",
    "cors-allow-origin",
    "cors-allow-methods",
    "cors-allow-headers",
    "cors-expose-headers",
    "cors-allow-credentials",
    "cors-max-age",
    "backend-protocol",
];

/// The Ingress objects a source gathered.
#[derive(Clone, Debug, Default)]
pub struct IngressInputs {
    pub ingresses: Vec<Ingress>,
    pub classes: Vec<IngressClass>,
}

/// What compile says about one Ingress of our classes.
#[derive(Clone, Debug, PartialEq)]
pub struct IngressReport {
    pub object: ObjectKey,
    pub generation: Option<i64>,
    /// Whether its paths are in the table.
    pub served: bool,
    /// Each becomes a Warning Event on the Ingress, with its reason: `UnsupportedAnnotation`,
    /// `InvalidCertificateRef` (a TLS Secret missing or unusable) or `NotServed` (what the
    /// Ingress asks for cannot be served: none of its paths is).
    pub warnings: Vec<(&'static str, String)>,
}

fn ns_of(o: &Ingress) -> &str {
    o.metadata.namespace.as_deref().unwrap_or("default")
}

fn name_of<K: kube::Resource>(o: &K) -> &str {
    o.meta().name.as_deref().unwrap_or_default()
}

/// The names of our IngressClasses, and the default one if one of ours is marked so.
fn our_classes(classes: &[IngressClass]) -> (BTreeSet<String>, bool) {
    let mut names = BTreeSet::new();
    let mut default = false;
    for c in classes {
        let ours = c
            .spec
            .as_ref()
            .and_then(|s| s.controller.as_deref())
            .is_some_and(|c| c == INGRESS_CONTROLLER);
        if !ours {
            continue;
        }
        names.insert(name_of(c).to_string());
        default |= c
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(DEFAULT_CLASS_ANNOTATION))
            .is_some_and(|v| v == "true");
    }
    (names, default)
}

/// The settings an Ingress's annotations give each of its routes.
#[derive(Clone, Default)]
struct Annotated {
    rewrite: Option<String>,
    ssl_redirect: Option<bool>,
    force_ssl_redirect: bool,
    max_body: Option<u64>,
    read_timeout: Option<Duration>,
    rpm: Option<u32>,
    cors: Option<CompiledCors>,
}

/// A size as ingress-nginx writes it: `8m`, `512k`, `1g`, plain bytes; `0` is no limit.
fn parse_size(v: &str) -> Option<u64> {
    let v = v.trim();
    let (num, mult) = match v.char_indices().last()? {
        (i, 'k' | 'K') => (&v[..i], 1u64 << 10),
        (i, 'm' | 'M') => (&v[..i], 1 << 20),
        (i, 'g' | 'G') => (&v[..i], 1 << 30),
        _ => (v, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

/// An ingress-nginx annotation's value, by its name without [`NGINX_PREFIX`].
fn ann_get<'a>(all: &'a BTreeMap<String, String>, n: &str) -> Option<&'a str> {
    all.get(&format!("{NGINX_PREFIX}{n}")).map(String::as_str)
}

fn bad(n: &str, v: &str) -> String {
    format!("annotation {NGINX_PREFIX}{n}: {v:?} is not served")
}

fn bool_value(v: &str) -> Option<bool> {
    match v.trim() {
        "true" => Some(true),
        "false" => Some(false),
        _ => None,
    }
}

/// Reads the ingress-nginx annotations. `Err`: a value that cannot be served (then no path of
/// the Ingress is); unknown annotations are warnings.
fn annotations(
    all: Option<&BTreeMap<String, String>>,
    warnings: &mut Vec<(&'static str, String)>,
) -> Result<Annotated, String> {
    let mut out = Annotated::default();
    let Some(all) = all else {
        return Ok(out);
    };
    let get = |n: &str| ann_get(all, n);
    for name in all.keys() {
        if let Some(short) = name.strip_prefix(NGINX_PREFIX) {
            if !ANNOTATIONS.contains(&short) {
                warnings.push((
                    "UnsupportedAnnotation",
                    format!("annotation {name} is not supported; it is ignored"),
                ));
            }
        }
    }
    if let Some(v) = get("rewrite-target") {
        // Capture groups (`/$2`) need regular-expression paths, which are not served.
        if !v.starts_with('/') || v.contains('$') {
            return Err(bad("rewrite-target", v));
        }
        out.rewrite = Some(v.to_string());
    }
    if let Some(v) = get("ssl-redirect") {
        out.ssl_redirect = Some(bool_value(v).ok_or_else(|| bad("ssl-redirect", v))?);
    }
    if let Some(v) = get("force-ssl-redirect") {
        out.force_ssl_redirect = bool_value(v).ok_or_else(|| bad("force-ssl-redirect", v))?;
    }
    if let Some(v) = get("proxy-body-size") {
        let n = parse_size(v).ok_or_else(|| bad("proxy-body-size", v))?;
        out.max_body = (n > 0).then_some(n);
    }
    if let Some(v) = get("proxy-read-timeout") {
        let s: u64 = v.trim().parse().map_err(|_| bad("proxy-read-timeout", v))?;
        out.read_timeout = (s > 0).then(|| Duration::from_secs(s));
    }
    if let Some(v) = get("limit-rpm") {
        let n: u32 = v.trim().parse().map_err(|_| bad("limit-rpm", v))?;
        out.rpm = (n > 0).then_some(n);
    }
    if let Some(v) = get("backend-protocol") {
        if !matches!(v.trim(), "HTTP" | "AUTO_HTTP") {
            return Err(bad("backend-protocol", v));
        }
    }
    if let Some(v) = get("enable-cors") {
        if bool_value(v).ok_or_else(|| bad("enable-cors", v))? {
            out.cors = Some(cors(all)?);
        }
    }
    Ok(out)
}

/// CORS from the `cors-*` annotations, with ingress-nginx's defaults.
fn cors(all: &BTreeMap<String, String>) -> Result<CompiledCors, String> {
    let get = |n: &str| ann_get(all, n);
    let origins: Vec<String> = get("cors-allow-origin")
        .unwrap_or("*")
        .split(',')
        .map(|o| o.trim().to_string())
        .filter(|o| !o.is_empty())
        .collect();
    let any_origin = origins.iter().any(|o| o == "*");
    let header = |n: &str, default: Option<&str>| -> Result<Option<HeaderValue>, String> {
        match get(n).or(default) {
            None => Ok(None),
            Some(v) => HeaderValue::from_str(v.trim())
                .map(Some)
                .map_err(|_| bad(n, v)),
        }
    };
    let credentials = match get("cors-allow-credentials") {
        None => false,
        Some(v) => bool_value(v).ok_or_else(|| bad("cors-allow-credentials", v))?,
    };
    if credentials && any_origin {
        return Err(bad("cors-allow-credentials", "true with origin *"));
    }
    let max_age = match get("cors-max-age") {
        None => HeaderValue::from_static("1728000"),
        Some(v) => {
            let n: u64 = v.trim().parse().map_err(|_| bad("cors-max-age", v))?;
            HeaderValue::from(n)
        }
    };
    Ok(CompiledCors {
        any_origin,
        origins,
        allow_methods: header(
            "cors-allow-methods",
            Some("GET, PUT, POST, DELETE, PATCH, OPTIONS"),
        )?,
        allow_headers: header(
            "cors-allow-headers",
            Some(
                "DNT,Keep-Alive,User-Agent,X-Requested-With,If-Modified-Since,Cache-Control,\
                 Content-Type,Range,Authorization",
            ),
        )?,
        expose_headers: header("cors-expose-headers", None)?,
        max_age: Some(max_age),
        allow_credentials: credentials,
    })
}

/// Compiles our Ingresses into table entries (after `first_order`) and their certificates.
pub(super) fn compile_ingresses(
    store: &Store,
    opts: &CompileOptions,
    first_order: u64,
    by_prefix: &mut HashMap<Box<str>, Vec<Entry>>,
    routes: &mut Vec<Arc<CompiledRoute>>,
    certs: &mut CertStore,
) -> Vec<IngressReport> {
    let inputs = &store.ingress;
    let (ours, default) = our_classes(&inputs.classes);
    let mut reports = Vec::new();
    if ours.is_empty() {
        return reports;
    }
    let mut order = first_order;
    let mut defaults = Vec::new();
    for ing in oldest_first(&inputs.ingresses) {
        let spec = ing.spec.clone().unwrap_or_default();
        let is_ours = match spec.ingress_class_name.as_deref() {
            Some(c) => ours.contains(c),
            None => default,
        };
        if !is_ours {
            continue;
        }
        let mut warnings = Vec::new();
        let compiled = compile_ingress(store, opts, ing, &mut warnings, certs);
        let served = compiled.is_ok();
        if let Ok((paths, default_backend)) = compiled {
            enter_routes(paths, order, by_prefix, routes);
            defaults.extend(default_backend);
        }
        order += 1;
        reports.push(IngressReport {
            object: ObjectKey::new(ns_of(ing), name_of(ing)),
            generation: ing.metadata.generation,
            served,
            warnings,
        });
    }
    // Default backends after every other route: they catch only what nothing else matched.
    let last = order + 1;
    enter_routes(defaults, last, by_prefix, routes);
    reports
}

/// One Ingress: its paths as routes (and its `defaultBackend` when it has no rules), its TLS
/// certificates into `certs`. `Err`: something it asks for is not served (in `warnings`).
#[allow(clippy::type_complexity)]
fn compile_ingress(
    store: &Store,
    opts: &CompileOptions,
    ing: &Ingress,
    warnings: &mut Vec<(&'static str, String)>,
    certs: &mut CertStore,
) -> Result<(Vec<CompiledRoute>, Option<CompiledRoute>), ()> {
    let spec = ing.spec.clone().unwrap_or_default();
    let ns = ns_of(ing);
    let ann = match annotations(ing.metadata.annotations.as_ref(), warnings) {
        Ok(a) => a,
        Err(msg) => {
            warnings.push(("NotServed", msg));
            return Err(());
        }
    };
    let tls = spec.tls.clone().unwrap_or_default();
    for t in &tls {
        let Some(secret) = &t.secret_name else {
            continue;
        };
        match tls_from_secret(store.secrets.get(&ObjectKey::new(ns, secret))) {
            Ok(cert) => {
                let hosts = t.hosts.clone().unwrap_or_default();
                if hosts.is_empty() {
                    certs.insert("*", cert.clone());
                }
                for h in hosts {
                    certs.insert(&h, cert.clone());
                }
            }
            Err(p) => warnings.push((
                "InvalidCertificateRef",
                format!("tls Secret {ns}/{secret}: {p}"),
            )),
        }
    }
    let mut built = Vec::new();
    let ctx = Ctx {
        store,
        opts,
        ing,
        ann: &ann,
        has_tls: !tls.is_empty(),
    };
    let rules = spec.rules.clone().unwrap_or_default();
    for (ri, rule) in rules.iter().enumerate() {
        let host = match rule.host.as_deref() {
            None | Some("") => HostPattern::Any,
            Some(h) => HostPattern::parse(h),
        };
        let paths = rule
            .http
            .as_ref()
            .map(|h| h.paths.clone())
            .unwrap_or_default();
        for (pi, p) in paths.iter().enumerate() {
            let at = format!("spec.rules[{ri}].http.paths[{pi}]");
            let value = p.path.as_deref().unwrap_or("/");
            let exact = match p.path_type.as_str() {
                "Exact" => true,
                "Prefix" | "ImplementationSpecific" => false,
                other => {
                    warnings.push(("NotServed", format!("{at}.pathType {other} is not served")));
                    return Err(());
                }
            };
            match ctx.route(&at, host.clone(), value, exact, &p.backend) {
                Ok(r) => built.push(r),
                Err(msg) => {
                    warnings.push(("NotServed", msg));
                    return Err(());
                }
            }
        }
    }
    let default_backend = match (&spec.default_backend, rules.is_empty()) {
        (Some(b), true) => {
            match ctx.route("spec.defaultBackend", HostPattern::Any, "/", false, b) {
                Ok(r) => Some(r),
                Err(msg) => {
                    warnings.push(("NotServed", msg));
                    return Err(());
                }
            }
        }
        _ => None,
    };
    Ok((built, default_backend))
}

/// What every route of one Ingress shares.
struct Ctx<'a> {
    store: &'a Store,
    opts: &'a CompileOptions,
    ing: &'a Ingress,
    ann: &'a Annotated,
    has_tls: bool,
}

impl Ctx<'_> {
    /// One path (or the default backend) as a route. `Err`: why it cannot be served.
    fn route(
        &self,
        at: &str,
        host: HostPattern,
        value: &str,
        exact: bool,
        backend: &IngressBackend,
    ) -> Result<CompiledRoute, String> {
        let ns = ns_of(self.ing);
        let name = name_of(self.ing);
        let prefix = normalize_prefix(value)
            .map_err(|_| format!("{at}.path {value:?} is not a normal path"))?;
        let b = self.backend(at, backend)?;
        let ann = self.ann;
        let ssl_redirect =
            ann.force_ssl_redirect || (self.has_tls && ann.ssl_redirect.unwrap_or(true));
        let filters = (ssl_redirect || ann.max_body.is_some()).then(|| {
            Box::new(RouteFilters {
                ssl_redirect,
                max_body: ann.max_body,
                ..RouteFilters::default()
            })
        });
        let backends = vec![b];
        Ok(CompiledRoute {
            id: Arc::from(format!("ingress/{ns}/{name}/{at}").as_str()),
            namespace: Arc::from(ns),
            name: name.to_string(),
            hosts: vec![host],
            exact: exact.then(|| {
                Box::from(if value.len() > 1 && value.ends_with('/') {
                    format!("{prefix}/")
                } else {
                    prefix.clone()
                })
            }),
            prefix,
            query: Vec::new(),
            methods: MethodSet::default(),
            headers: Vec::new(),
            body_field: None,
            protocol: Protocol::Http,
            timeouts: CompiledTimeouts {
                request: None,
                first_byte: ann.read_timeout,
                idle: ann.read_timeout,
            },
            retry: CompiledRetry::none(),
            // Plain routing stays plain: an Ingress needs no key.
            auth: CompiledAuth {
                required: false,
                roles: Vec::new(),
                allow_namespaces: Vec::new(),
                any_namespace: false,
            },
            rate_limit: ann.rpm.map(|rpm| CompiledRateLimit {
                requests_per_minute: Some(rpm),
                // ingress-nginx's default burst multiplier is 5.
                burst: Some(rpm.saturating_mul(5)),
                tokens_per_minute: None,
            }),
            rewrite: ann.rewrite.clone(),
            filters,
            weighted: crate::balance::weighted::WeightedBackends::with_identities(
                backends.iter().enumerate().map(|(index, b)| {
                    crate::balance::weighted::BackendWeight {
                        index,
                        weight: b.weight,
                        canary: false,
                        identity: b.id.to_string(),
                    }
                }),
            ),
            backends,
            cors: ann.cors.clone(),
            tls_secret: None,
            canary_header: None,
            sticky: Sticky::None,
            load_balancer: LoadBalancer::default(),
            mcp_tools: None,
            mcp_federation: None,
            // Exact beats a prefix of the same path.
            conditions: u32::from(exact) << 24,
        })
    }

    /// A Service backend with a port number (a named port or a resource is not served).
    fn backend(&self, at: &str, b: &IngressBackend) -> Result<CompiledBackend, String> {
        let ns = ns_of(self.ing);
        let Some(svc) = &b.service else {
            return Err(format!("{at}.backend: only Service backends are served"));
        };
        let port = svc
            .port
            .as_ref()
            .and_then(|p| p.number)
            .and_then(|n| u16::try_from(n).ok())
            .filter(|n| *n > 0)
            .ok_or_else(|| format!("{at}.backend.service.port: a port number is needed"))?;
        if let Some(services) = &self.store.services {
            if !services.contains(&ObjectKey::new(ns, &svc.name)) {
                return Err(format!("{at}.backend: Service {ns}/{} not found", svc.name));
            }
        }
        let authority = format!(
            "{}.{ns}.svc.{}:{port}",
            svc.name,
            self.opts.cluster_domain.trim_end_matches('.')
        );
        let (Ok(authority), true) = (HeaderValue::from_str(&authority), valid_host(&svc.name))
        else {
            return Err(format!("{at}.backend: invalid Service name"));
        };
        let target = BackendTarget::Service {
            namespace: Arc::from(ns),
            name: Arc::from(svc.name.as_str()),
            port,
        };
        Ok(CompiledBackend {
            id: Arc::from(target.label().as_str()),
            authority,
            target,
            weight: 1,
            canary: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_as_ingress_nginx_writes_them() {
        assert_eq!(parse_size("8m"), Some(8 << 20));
        assert_eq!(parse_size("512k"), Some(512 << 10));
        assert_eq!(parse_size("1G"), Some(1 << 30));
        assert_eq!(parse_size("100"), Some(100));
        assert_eq!(parse_size("0"), Some(0));
        assert_eq!(parse_size("lots"), None);
        assert_eq!(parse_size(""), None);
    }

    fn ann(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (format!("{NGINX_PREFIX}{k}"), v.to_string()))
            .collect()
    }

    #[test]
    fn unknown_nginx_annotations_are_named_and_bad_values_refused() {
        let mut w = Vec::new();
        let a = annotations(
            Some(&ann(&[("limit-rpm", "30"), ("configuration-snippet", "x")])),
            &mut w,
        )
        .expect("served");
        assert_eq!(a.rpm, Some(30));
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].0, "UnsupportedAnnotation");
        assert!(w[0]
            .1
            .contains("nginx.ingress.kubernetes.io/configuration-snippet"));
        let mut w = Vec::new();
        assert!(annotations(Some(&ann(&[("rewrite-target", "/$2")])), &mut w).is_err());
        assert!(annotations(Some(&ann(&[("backend-protocol", "GRPC")])), &mut w).is_err());
        assert!(annotations(
            Some(&ann(&[
                ("enable-cors", "true"),
                ("cors-allow-credentials", "true")
            ])),
            &mut w
        )
        .is_err());
    }
}
