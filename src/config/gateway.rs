//! Gateway API objects into the same route table as AgentRoutes: GatewayClasses of our
//! controller, their Gateways' listeners, and the HTTPRoutes attached to them. Pure, like the
//! rest of compile; every verdict becomes a report that the status writer turns into the
//! status the Gateway API spec asks for.
//!
//! Listener mapping: every HTTP listener is served on `--listen` and every HTTPS listener on
//! `--tls-listen`, whatever its `port` (the port is what clients use on the gateway's Service);
//! a route attached to several listeners serves the union of its hostnames' intersections with
//! theirs.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use http::{HeaderName, HeaderValue};

use super::compile::{normalize_prefix, oldest_first, tls_from_secret, valid_host};
use super::route::*;
use super::table::Entry;
use super::tls::CertStore;
use super::{CompileOptions, ObjectKey, Store};
use crate::api::gateway::*;
use crate::api::{parse_duration, Condition, LoadBalancer, Protocol, Sticky};

/// The Gateway API objects a source gathered.
#[derive(Clone, Debug, Default)]
pub struct GatewayInputs {
    /// Whether the Gateway API CRDs are installed (else every list is empty).
    pub installed: bool,
    pub classes: Vec<GatewayClass>,
    pub gateways: Vec<Gateway>,
    pub http_routes: Vec<HTTPRoute>,
    pub grants: Vec<ReferenceGrant>,
    /// Namespace labels by name, for `allowedRoutes` `Selector` (`None`: Namespaces are not
    /// watched, and `Selector` admits none).
    pub namespaces: Option<BTreeMap<String, BTreeMap<String, String>>>,
}

/// Status of one GatewayClass of our controller.
#[derive(Clone, Debug, PartialEq)]
pub struct ClassReport {
    pub name: String,
    pub generation: Option<i64>,
    pub conditions: Vec<Condition>,
}

/// Status of one listener.
#[derive(Clone, Debug, PartialEq)]
pub struct ListenerReport {
    pub name: String,
    pub attached_routes: u32,
    /// `HTTPRoute`, or nothing when the protocol is not served.
    pub supported_kinds: Vec<&'static str>,
    pub conditions: Vec<Condition>,
}

/// Status of one Gateway of our classes.
#[derive(Clone, Debug, PartialEq)]
pub struct GatewayReport {
    pub object: ObjectKey,
    pub generation: Option<i64>,
    pub conditions: Vec<Condition>,
    pub listeners: Vec<ListenerReport>,
}

/// One `status.parents[]` entry of an HTTPRoute.
#[derive(Clone, Debug, PartialEq)]
pub struct ParentReport {
    pub parent_ref: ParentRef,
    pub conditions: Vec<Condition>,
}

/// Status of one HTTPRoute: an entry for each parentRef naming a Gateway of ours.
#[derive(Clone, Debug, PartialEq)]
pub struct HttpRouteReport {
    pub object: ObjectKey,
    pub generation: Option<i64>,
    pub parents: Vec<ParentReport>,
}

/// What the Gateway API objects' status says.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GatewayApiReport {
    pub classes: Vec<ClassReport>,
    pub gateways: Vec<GatewayReport>,
    pub http_routes: Vec<HttpRouteReport>,
}

fn cond(type_: &str, ok: bool, reason: &str, message: impl Into<String>) -> Condition {
    Condition::new(type_, ok, reason, message)
}

fn ns_of<K: kube::Resource>(o: &K) -> &str {
    o.meta().namespace.as_deref().unwrap_or("default")
}

fn name_of<K: kube::Resource>(o: &K) -> &str {
    o.meta().name.as_deref().unwrap_or_default()
}

/// A listener as routes see it.
struct ListenerView<'a> {
    gateway: &'a Gateway,
    listener: &'a Listener,
    /// Served: a supported protocol and its references resolved.
    ready: bool,
    attached: u32,
}

/// Whether a ReferenceGrant in `to_ns` lets a `from_kind` of `from_ns` refer to `to_kind`
/// named `name` (group "" is core).
fn granted(
    grants: &[ReferenceGrant],
    from_kind: &str,
    from_ns: &str,
    to_group: &str,
    to_kind: &str,
    to_ns: &str,
    name: &str,
) -> bool {
    grants.iter().filter(|g| ns_of(*g) == to_ns).any(|g| {
        g.spec
            .from
            .iter()
            .any(|f| f.group == GATEWAY_GROUP && f.kind == from_kind && f.namespace == from_ns)
            && g.spec.to.iter().any(|t| {
                t.group == to_group
                    && t.kind == to_kind
                    && t.name.as_deref().is_none_or(|n| n == name)
            })
    })
}

/// The hostnames a route serves on a listener: the intersection of the listener's hostname
/// (none: any) and the route's (none: any). `None`: they do not intersect.
fn intersect(listener: Option<&str>, route: &[String]) -> Option<Vec<String>> {
    let Some(l) = listener else {
        return Some(route.to_vec());
    };
    if route.is_empty() {
        return Some(vec![l.to_string()]);
    }
    let wild = |p: &str| p.strip_prefix('*').map(str::to_string);
    let covers = |pattern: &str, host: &str| match wild(pattern) {
        // `*.example.com` covers `a.example.com` and `*.a.example.com`, not `example.com`.
        Some(suffix) => host.len() > suffix.len() && host.ends_with(&suffix),
        None => pattern == host,
    };
    let out: Vec<String> = route
        .iter()
        .filter_map(|r| {
            if covers(l, r) {
                Some(r.clone())
            } else if covers(r, l) {
                Some(l.to_string())
            } else {
                None
            }
        })
        .collect();
    (!out.is_empty()).then_some(out)
}

/// Whether labels satisfy a label selector (`matchLabels` and `matchExpressions`, all of them).
pub fn selects(
    selector: &k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
    labels: &BTreeMap<String, String>,
) -> bool {
    let labels_ok = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let exprs_ok = selector.match_expressions.iter().flatten().all(|e| {
        let values = e.values.as_deref().unwrap_or_default();
        let value = labels.get(&e.key);
        match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        }
    });
    labels_ok && exprs_ok
}

/// Whether a listener admits an HTTPRoute from `route_ns` (`allowedRoutes`).
fn allows(
    listener: &Listener,
    gateway_ns: &str,
    route_ns: &str,
    namespaces: Option<&BTreeMap<String, BTreeMap<String, String>>>,
) -> bool {
    let allowed = listener.allowed_routes.clone().unwrap_or_default();
    let kind_ok = match &allowed.kinds {
        None => true,
        Some(kinds) if kinds.is_empty() => true,
        Some(kinds) => kinds.iter().any(|k| {
            k.kind == "HTTPRoute" && k.group.as_deref().unwrap_or(GATEWAY_GROUP) == GATEWAY_GROUP
        }),
    };
    let (from, selector) = allowed
        .namespaces
        .map(|n| (n.from, n.selector))
        .unwrap_or_default();
    let ns_ok = match from.as_deref().unwrap_or("Same") {
        "All" => true,
        "Same" => route_ns == gateway_ns,
        // Without Namespace labels (not watched) or without a selector, `Selector` admits none.
        "Selector" => match (selector, namespaces.and_then(|n| n.get(route_ns))) {
            (Some(s), Some(labels)) => selects(&s, labels),
            _ => false,
        },
        _ => false,
    };
    kind_ok && ns_ok
}

/// Compiles the Gateway API inputs into table entries (after `first_order`) and reports.
pub(super) fn compile_gateway_api(
    store: &Store,
    opts: &CompileOptions,
    first_order: u64,
    by_prefix: &mut HashMap<Box<str>, Vec<Entry>>,
    routes: &mut Vec<Arc<CompiledRoute>>,
    certs: &mut CertStore,
) -> GatewayApiReport {
    let inputs = &store.gateway_api;
    let mut report = GatewayApiReport::default();
    if !inputs.installed {
        return report;
    }
    let ours = our_classes(inputs, &mut report);
    let gateways: Vec<&Gateway> = oldest_first(&inputs.gateways)
        .into_iter()
        .filter(|g| ours.contains(&g.spec.gateway_class_name))
        .collect();
    let (mut listeners, mut listener_conditions) = gateway_listeners(store, &gateways, certs);

    let mut order = first_order;
    for route in oldest_first(&inputs.http_routes) {
        let Some(attachment) =
            attach_route(route, &gateways, &mut listeners, inputs.namespaces.as_ref())
        else {
            continue;
        };
        let Attachment {
            mut parents,
            hostnames,
            attached_any,
        } = attachment;
        let (compiled, refs, unsupported) = compile_http_route(store, opts, route, &hostnames);
        for parent in &mut parents {
            let accepted_ok = parent.conditions[0].status == crate::api::ConditionStatus::True;
            if let (true, Some(msg)) = (accepted_ok, &unsupported) {
                parent.conditions[0] = cond("Accepted", false, "UnsupportedValue", msg.clone());
            }
            parent.conditions.push(refs.clone());
        }
        if attached_any && unsupported.is_none() {
            enter_routes(compiled, order, by_prefix, routes);
        }
        order += 1;
        report.http_routes.push(HttpRouteReport {
            object: ObjectKey::new(ns_of(route), name_of(route)),
            generation: route.metadata.generation,
            parents,
        });
    }
    gateway_reports(&gateways, &listeners, &mut listener_conditions, &mut report);
    report
}

/// The names of the GatewayClasses of our controller, each reported `Accepted`.
fn our_classes(inputs: &GatewayInputs, report: &mut GatewayApiReport) -> BTreeSet<String> {
    let mut ours = BTreeSet::new();
    for c in &inputs.classes {
        if c.spec.controller_name == GATEWAY_CONTROLLER {
            ours.insert(name_of(c).to_string());
            report.classes.push(ClassReport {
                name: name_of(c).to_string(),
                generation: c.metadata.generation,
                conditions: vec![cond("Accepted", true, "Accepted", "")],
            });
        }
    }
    ours
}

/// The listeners of our Gateways, in order, with their own verdicts (empty: all good).
fn gateway_listeners<'a>(
    store: &Store,
    gateways: &[&'a Gateway],
    certs: &mut CertStore,
) -> (Vec<ListenerView<'a>>, Vec<Vec<Condition>>) {
    let mut listeners = Vec::new();
    let mut listener_conditions = Vec::new();
    for g in gateways {
        let gns = ns_of(*g);
        for l in &g.spec.listeners {
            let (conditions, ready) = match l.protocol.as_str() {
                "HTTP" => (Vec::new(), true),
                "HTTPS" => listener_tls(store, gns, l, certs),
                other => (
                    vec![
                        cond(
                            "Accepted",
                            false,
                            "UnsupportedProtocol",
                            format!("protocol {other} is not served (HTTP and HTTPS are)"),
                        ),
                        cond("Programmed", false, "Invalid", "listener not accepted"),
                        cond("ResolvedRefs", true, "ResolvedRefs", ""),
                    ],
                    false,
                ),
            };
            listeners.push(ListenerView {
                gateway: g,
                listener: l,
                ready,
                attached: 0,
            });
            listener_conditions.push(conditions);
        }
    }
    (listeners, listener_conditions)
}

/// How an HTTPRoute attaches to our Gateways.
struct Attachment {
    /// One entry per parentRef naming a Gateway of ours, with its `Accepted`.
    parents: Vec<ParentReport>,
    /// The hostnames it serves (an empty string: any).
    hostnames: Vec<String>,
    attached_any: bool,
}

/// Attaches a route through its parentRefs (counting it on the listeners it lands on).
/// `None`: no parentRef names a Gateway of ours.
fn attach_route(
    route: &HTTPRoute,
    gateways: &[&Gateway],
    listeners: &mut [ListenerView<'_>],
    namespaces: Option<&BTreeMap<String, BTreeMap<String, String>>>,
) -> Option<Attachment> {
    let rns = ns_of(route);
    let mut out = Attachment {
        parents: Vec::new(),
        hostnames: Vec::new(),
        attached_any: false,
    };
    for p in &route.spec.parent_refs {
        let group = p.group.as_deref().unwrap_or(GATEWAY_GROUP);
        let kind = p.kind.as_deref().unwrap_or("Gateway");
        if group != GATEWAY_GROUP || kind != "Gateway" {
            continue;
        }
        let pns = p.namespace.as_deref().unwrap_or(rns);
        let Some(gw) = gateways
            .iter()
            .find(|g| ns_of(**g) == pns && name_of(**g) == p.name)
        else {
            // Not one of ours (or not there): another controller's to report, if any.
            continue;
        };
        let accepted = attach_parent(route, p, gw, listeners, namespaces, &mut out);
        out.parents.push(ParentReport {
            parent_ref: p.clone(),
            conditions: vec![accepted],
        });
    }
    (!out.parents.is_empty()).then_some(out)
}

/// The `Accepted` condition of one parentRef to our Gateway `gw`.
fn attach_parent(
    route: &HTTPRoute,
    p: &ParentRef,
    gw: &Gateway,
    listeners: &mut [ListenerView<'_>],
    namespaces: Option<&BTreeMap<String, BTreeMap<String, String>>>,
    out: &mut Attachment,
) -> Condition {
    let mut selected: Vec<usize> = listeners
        .iter()
        .enumerate()
        .filter(|(_, v)| std::ptr::eq(v.gateway, gw))
        .filter(|(_, v)| {
            p.section_name
                .as_deref()
                .is_none_or(|s| s == v.listener.name)
        })
        .filter(|(_, v)| p.port.is_none_or(|port| port == v.listener.port))
        .map(|(i, _)| i)
        .collect();
    if selected.is_empty() {
        return cond(
            "Accepted",
            false,
            "NoMatchingParent",
            "no listener matches the sectionName and port",
        );
    }
    selected.retain(|&i| listeners[i].ready);
    selected.retain(|&i| allows(listeners[i].listener, ns_of(gw), ns_of(route), namespaces));
    if selected.is_empty() {
        return cond(
            "Accepted",
            false,
            "NotAllowedByListeners",
            "no listener admits this route",
        );
    }
    let mut matched = false;
    for &i in &selected {
        let l = listeners[i].listener;
        if let Some(h) = intersect(l.hostname.as_deref(), &route.spec.hostnames) {
            matched = true;
            listeners[i].attached += 1;
            if h.is_empty() {
                out.hostnames.push(String::new());
            }
            out.hostnames.extend(h);
        }
    }
    if matched {
        out.attached_any = true;
        cond("Accepted", true, "Accepted", "")
    } else {
        cond(
            "Accepted",
            false,
            "NoMatchingListenerHostname",
            "no hostname of the route intersects a listener's",
        )
    }
}

/// Enters compiled routes in the table at acceptance position `order`.
pub(super) fn enter_routes(
    compiled: Vec<CompiledRoute>,
    order: u64,
    by_prefix: &mut HashMap<Box<str>, Vec<Entry>>,
    routes: &mut Vec<Arc<CompiledRoute>>,
) {
    for c in compiled {
        let c = Arc::new(c);
        let slot = by_prefix.entry(c.prefix.as_str().into()).or_default();
        for host in &c.hosts {
            slot.push(Entry {
                host: host.clone(),
                route: c.clone(),
                specificity: host.specificity(),
                order,
            });
        }
        routes.push(c);
    }
}

/// Each Gateway's report: its conditions and its listeners' (attached counts included).
fn gateway_reports(
    gateways: &[&Gateway],
    listeners: &[ListenerView<'_>],
    listener_conditions: &mut [Vec<Condition>],
    report: &mut GatewayApiReport,
) {
    let mut li = 0;
    for g in gateways {
        let mut lreports = Vec::new();
        for l in &g.spec.listeners {
            let view = &listeners[li];
            let mut conditions = std::mem::take(&mut listener_conditions[li]);
            li += 1;
            if conditions.is_empty() {
                conditions = vec![
                    cond("Accepted", true, "Accepted", ""),
                    cond("Programmed", true, "Programmed", ""),
                    cond("ResolvedRefs", true, "ResolvedRefs", ""),
                ];
            }
            lreports.push(ListenerReport {
                name: l.name.clone(),
                attached_routes: view.attached,
                supported_kinds: if matches!(l.protocol.as_str(), "HTTP" | "HTTPS") {
                    vec!["HTTPRoute"]
                } else {
                    Vec::new()
                },
                conditions,
            });
        }
        report.gateways.push(GatewayReport {
            object: ObjectKey::new(ns_of(*g), name_of(*g)),
            generation: g.metadata.generation,
            conditions: vec![
                cond("Accepted", true, "Accepted", ""),
                cond("Programmed", true, "Programmed", ""),
            ],
            listeners: lreports,
        });
    }
}

/// An HTTPS listener's certificates: each `certificateRefs` Secret (another namespace's only
/// with a ReferenceGrant) goes into `certs` for the listener's hostname (none: every name).
fn listener_tls(
    store: &Store,
    gns: &str,
    l: &Listener,
    certs: &mut CertStore,
) -> (Vec<Condition>, bool) {
    let invalid = |reason: &str, msg: String| {
        (
            vec![
                cond("Accepted", true, "Accepted", ""),
                cond("Programmed", false, "Invalid", msg.clone()),
                cond("ResolvedRefs", false, reason, msg),
            ],
            false,
        )
    };
    let Some(tls) = &l.tls else {
        return invalid(
            "InvalidCertificateRef",
            "an HTTPS listener needs tls".into(),
        );
    };
    if tls.mode.as_deref().is_some_and(|m| m != "Terminate") {
        return (
            vec![
                cond(
                    "Accepted",
                    false,
                    "UnsupportedValue",
                    "only tls.mode Terminate is served",
                ),
                cond("Programmed", false, "Invalid", "listener not accepted"),
                cond("ResolvedRefs", true, "ResolvedRefs", ""),
            ],
            false,
        );
    }
    if tls.certificate_refs.is_empty() {
        return invalid("InvalidCertificateRef", "no certificateRefs".into());
    }
    let mut found = Vec::new();
    for r in &tls.certificate_refs {
        let group = r.group.as_deref().unwrap_or("");
        let kind = r.kind.as_deref().unwrap_or("Secret");
        if !group.is_empty() || kind != "Secret" {
            return invalid(
                "InvalidCertificateRef",
                format!("certificateRef {kind} {}: only Secrets", r.name),
            );
        }
        let sns = r.namespace.as_deref().unwrap_or(gns);
        if sns != gns
            && !granted(
                &store.gateway_api.grants,
                "Gateway",
                gns,
                "",
                "Secret",
                sns,
                &r.name,
            )
        {
            return invalid(
                "RefNotPermitted",
                format!("Secret {sns}/{} needs a ReferenceGrant in {sns}", r.name),
            );
        }
        match tls_from_secret(store.secrets.get(&ObjectKey::new(sns, &r.name))) {
            Ok(c) => found.push(c),
            Err(p) => {
                return invalid(
                    "InvalidCertificateRef",
                    format!("Secret {sns}/{}: {p}", r.name),
                )
            }
        }
    }
    let host = l.hostname.as_deref().unwrap_or("*");
    for c in found {
        certs.insert(host, c);
    }
    (Vec::new(), true)
}

/// Gateway API precedence within one prefix level of the table: an exact path, then a method,
/// then more header matches, then more query matches (host specificity and the prefix length
/// come first, from the table itself).
fn precedence(exact: bool, method: bool, headers: usize, query: usize) -> u32 {
    (u32::from(exact) << 24)
        | (u32::from(method) << 16)
        | ((headers.min(255) as u32) << 8)
        | query.min(255) as u32
}

/// One compiled route per rule and match, the `ResolvedRefs` condition, and what the route
/// asks for that is not served (then nothing of it is).
fn compile_http_route(
    store: &Store,
    opts: &CompileOptions,
    route: &HTTPRoute,
    hostnames: &[String],
) -> (Vec<CompiledRoute>, Condition, Option<String>) {
    let hosts = route_hosts(hostnames);
    let mut refs = cond("ResolvedRefs", true, "ResolvedRefs", "");
    let mut unsupported: Option<String> = None;
    let mut out = Vec::new();
    let default_match = [HTTPRouteMatch::default()];
    for (ri, rule) in route.spec.rules.iter().enumerate() {
        let (filters, rewrite) = match compile_filters(&rule.filters, ri) {
            Ok(f) => f,
            Err(msg) => {
                unsupported.get_or_insert(msg);
                (None, None)
            }
        };
        let timeouts = rule_timeouts(rule, ri, &mut unsupported);
        let backends = rule_backends(store, opts, route, ri, rule, &mut refs);
        let shared = RuleParts {
            hosts: &hosts,
            timeouts,
            rewrite,
            filters,
            backends,
        };
        let matches = if rule.matches.is_empty() {
            &default_match[..]
        } else {
            &rule.matches[..]
        };
        for (mi, m) in matches.iter().enumerate() {
            let at = format!("rules[{ri}].matches[{mi}]");
            match compile_rule_match(route, ri, m, &at, &shared) {
                Ok(c) => out.push(c),
                Err(msg) => {
                    unsupported.get_or_insert(msg);
                }
            }
        }
    }
    (out, refs, unsupported)
}

/// The host patterns of a route's hostnames, sorted and without duplicates (any: just `Any`).
fn route_hosts(hostnames: &[String]) -> Vec<HostPattern> {
    let mut hosts: Vec<HostPattern> = hostnames
        .iter()
        .map(|h| {
            if h.is_empty() {
                HostPattern::Any
            } else {
                HostPattern::parse(h)
            }
        })
        .collect();
    if hosts.is_empty() || hosts.contains(&HostPattern::Any) {
        hosts = vec![HostPattern::Any];
    }
    hosts.sort_by(|a, b| format!("{a:?}").cmp(&format!("{b:?}")));
    hosts.dedup();
    hosts
}

/// A rule's `timeouts` (`request`; `0s` is none). `backendRequest` is not served.
fn rule_timeouts(
    rule: &HTTPRouteRule,
    ri: usize,
    unsupported: &mut Option<String>,
) -> CompiledTimeouts {
    let mut timeouts = CompiledTimeouts::default();
    if let Some(t) = &rule.timeouts {
        if t.backend_request.is_some() {
            unsupported.get_or_insert(format!("rules[{ri}].timeouts.backendRequest is not served"));
        }
        if let Some(r) = &t.request {
            match parse_duration(r) {
                // "0s" turns the timeout off, as the spec says.
                Ok(d) if d.is_zero() => {}
                Ok(d) => timeouts.request = Some(d),
                Err(e) => {
                    unsupported.get_or_insert(format!("rules[{ri}].timeouts.request: {e}"));
                }
            }
        }
    }
    timeouts
}

/// What every match of one rule shares.
struct RuleParts<'a> {
    hosts: &'a [HostPattern],
    timeouts: CompiledTimeouts,
    rewrite: Option<String>,
    filters: Option<Box<RouteFilters>>,
    backends: Vec<CompiledBackend>,
}

/// One match of a rule as a compiled route. `Err`: what it asks for that is not served.
fn compile_rule_match(
    route: &HTTPRoute,
    ri: usize,
    m: &HTTPRouteMatch,
    at: &str,
    rule: &RuleParts<'_>,
) -> Result<CompiledRoute, String> {
    let (kind, value) = match &m.path {
        None => ("PathPrefix", "/"),
        Some(p) => (
            p.type_.as_deref().unwrap_or("PathPrefix"),
            p.value.as_deref().unwrap_or("/"),
        ),
    };
    let exact = match kind {
        "PathPrefix" => false,
        "Exact" => true,
        other => return Err(format!("{at}.path.type {other} is not served")),
    };
    let Ok(prefix) = normalize_prefix(value) else {
        return Err(format!("{at}.path.value {value:?} is not a normal path"));
    };
    let headers = match_headers(m, at)?;
    let mut query: Vec<(Box<str>, Box<str>)> = Vec::new();
    for q in &m.query_params {
        if q.type_.as_deref().is_some_and(|t| t != "Exact") {
            return Err(format!("{at}.queryParams: only Exact is served"));
        }
        query.push((q.name.as_str().into(), q.value.as_str().into()));
    }
    query.sort();
    let methods = match &m.method {
        Some(x) => MethodSet {
            methods: vec![x.clone()],
            allow: HeaderValue::from_str(x).ok(),
            mismatch_is_no_match: true,
        },
        None => MethodSet::default(),
    };
    let conditions = precedence(exact, m.method.is_some(), headers.len(), query.len());
    let rns = ns_of(route);
    let name = name_of(route);
    let id = format!("httproute/{rns}/{name}/{ri}");
    let backends = &rule.backends;
    Ok(CompiledRoute {
        id: Arc::from(id.as_str()),
        namespace: Arc::from(rns),
        name: name.to_string(),
        hosts: rule.hosts.to_vec(),
        exact: exact.then(|| {
            // The normalised request path keeps a trailing slash: so does the match.
            Box::from(if value.len() > 1 && value.ends_with('/') {
                format!("{prefix}/")
            } else {
                prefix.clone()
            })
        }),
        prefix,
        query,
        methods,
        headers,
        body_field: None,
        protocol: Protocol::Http,
        timeouts: rule.timeouts.clone(),
        retry: CompiledRetry::none(),
        // Plain routing stays plain: an HTTPRoute needs no key.
        auth: CompiledAuth {
            required: false,
            roles: Vec::new(),
            allow_namespaces: Vec::new(),
            any_namespace: false,
        },
        rate_limit: None,
        rewrite: rule.rewrite.clone(),
        filters: rule.filters.clone(),
        weighted: crate::balance::weighted::WeightedBackends::with_identities(
            backends
                .iter()
                .enumerate()
                .map(|(index, b)| crate::balance::weighted::BackendWeight {
                    index,
                    weight: b.weight,
                    canary: false,
                    identity: b.id.to_string(),
                }),
        ),
        backends: backends.clone(),
        cors: None,
        tls_secret: None,
        canary_header: None,
        sticky: Sticky::None,
        load_balancer: LoadBalancer::default(),
        mcp_tools: None,
        mcp_federation: None,
        conditions,
    })
}

/// A match's header matches (Exact only), sorted.
fn match_headers(m: &HTTPRouteMatch, at: &str) -> Result<Vec<(HeaderName, HeaderValue)>, String> {
    let mut headers = Vec::new();
    for h in &m.headers {
        if h.type_.as_deref().is_some_and(|t| t != "Exact") {
            return Err(format!("{at}.headers: only Exact is served"));
        }
        match (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_str(&h.value),
        ) {
            (Ok(n), Ok(v)) => headers.push((n, v)),
            _ => return Err(format!("{at}.headers: {} is invalid", h.name)),
        }
    }
    headers.sort_by(|a, b| {
        a.0.as_str()
            .cmp(b.0.as_str())
            .then(a.1.as_bytes().cmp(b.1.as_bytes()))
    });
    Ok(headers)
}

fn header_edits(m: &HeaderModifier, at: &str) -> Result<HeaderEdits, String> {
    let pair = |p: &HeaderPair| match (
        HeaderName::from_bytes(p.name.as_bytes()),
        HeaderValue::from_str(&p.value),
    ) {
        (Ok(n), Ok(v)) => Ok((n, v)),
        _ => Err(format!("{at}: invalid header {}", p.name)),
    };
    Ok(HeaderEdits {
        set: m.set.iter().map(pair).collect::<Result<_, _>>()?,
        add: m.add.iter().map(pair).collect::<Result<_, _>>()?,
        remove: m
            .remove
            .iter()
            .map(|n| {
                HeaderName::from_bytes(n.as_bytes())
                    .map_err(|_| format!("{at}: invalid header {n}"))
            })
            .collect::<Result<_, _>>()?,
    })
}

fn path_change(p: &PathModifier, at: &str) -> Result<PathChange, String> {
    match (
        p.type_.as_str(),
        &p.replace_full_path,
        &p.replace_prefix_match,
    ) {
        ("ReplaceFullPath", Some(full), _) => Ok(PathChange::Full(full.clone())),
        ("ReplacePrefixMatch", _, Some(prefix)) => Ok(PathChange::Prefix(prefix.clone())),
        (t, _, _) => Err(format!("{at}.path: {t} without its value")),
    }
}

/// A rule's filters: header modifiers, a redirect, a URL rewrite (`ReplacePrefixMatch` becomes
/// the route's `rewrite`, which AgentRoutes use too). `Err`: a filter that is not served.
#[allow(clippy::type_complexity)]
fn compile_filters(
    filters: &[HTTPRouteFilter],
    ri: usize,
) -> Result<(Option<Box<RouteFilters>>, Option<String>), String> {
    if filters.is_empty() {
        return Ok((None, None));
    }
    let mut out = RouteFilters::default();
    let mut rewrite = None;
    for (fi, f) in filters.iter().enumerate() {
        let at = format!("rules[{ri}].filters[{fi}]");
        let missing = || format!("{at}: {} without its settings", f.type_);
        match f.type_.as_str() {
            "RequestHeaderModifier" => {
                let m = f.request_header_modifier.as_ref().ok_or_else(missing)?;
                out.request_headers = Some(header_edits(m, &at)?);
            }
            "ResponseHeaderModifier" => {
                let m = f.response_header_modifier.as_ref().ok_or_else(missing)?;
                out.response_headers = Some(header_edits(m, &at)?);
            }
            "RequestRedirect" => {
                let r = f.request_redirect.as_ref().ok_or_else(missing)?;
                out.redirect = Some(CompiledRedirect {
                    scheme: r.scheme.clone(),
                    hostname: r.hostname.clone(),
                    port: r.port.and_then(|p| u16::try_from(p).ok()),
                    path: r.path.as_ref().map(|p| path_change(p, &at)).transpose()?,
                    status: r.status_code.unwrap_or(302),
                });
            }
            "URLRewrite" => {
                let r = f.url_rewrite.as_ref().ok_or_else(missing)?;
                if let Some(h) = &r.hostname {
                    out.rewrite_host = Some(
                        HeaderValue::from_str(h).map_err(|_| format!("{at}: invalid hostname"))?,
                    );
                }
                match r.path.as_ref().map(|p| path_change(p, &at)).transpose()? {
                    Some(PathChange::Full(p)) => out.full_path = Some(p),
                    Some(PathChange::Prefix(p)) => rewrite = Some(p),
                    None => {}
                }
            }
            other => return Err(format!("{at}: filter type {other} is not served")),
        }
    }
    Ok((Some(Box::new(out)), rewrite))
}

/// A rule's backends that can take traffic: Services that exist (another namespace's only with
/// a ReferenceGrant), weight above 0. The first reference that fails names `ResolvedRefs`; an
/// empty list answers 500.
fn rule_backends(
    store: &Store,
    opts: &CompileOptions,
    route: &HTTPRoute,
    ri: usize,
    rule: &HTTPRouteRule,
    refs: &mut Condition,
) -> Vec<CompiledBackend> {
    let rns = ns_of(route);
    let mut fail = |reason: &str, msg: String| {
        if refs.status == crate::api::ConditionStatus::True {
            *refs = cond("ResolvedRefs", false, reason, msg);
        }
    };
    let mut out = Vec::new();
    for (bi, b) in rule.backend_refs.iter().enumerate() {
        let at = format!("rules[{ri}].backendRefs[{bi}]");
        let group = b.group.as_deref().unwrap_or("");
        let kind = b.kind.as_deref().unwrap_or("Service");
        if !group.is_empty() || kind != "Service" {
            fail("InvalidKind", format!("{at}: {kind} is not a Service"));
            continue;
        }
        let bns = b.namespace.as_deref().unwrap_or(rns);
        if bns != rns
            && !granted(
                &store.gateway_api.grants,
                "HTTPRoute",
                rns,
                "",
                "Service",
                bns,
                &b.name,
            )
        {
            fail(
                "RefNotPermitted",
                format!(
                    "{at}: Service {bns}/{} needs a ReferenceGrant in {bns}",
                    b.name
                ),
            );
            continue;
        }
        if let Some(services) = &store.services {
            if !services.contains(&ObjectKey::new(bns, &b.name)) {
                fail(
                    "BackendNotFound",
                    format!("{at}: Service {bns}/{} not found", b.name),
                );
                continue;
            }
        }
        let Some(port) = b
            .port
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p > 0)
        else {
            fail("UnsupportedValue", format!("{at}: a Service needs a port"));
            continue;
        };
        let weight = b.weight.unwrap_or(1).max(0) as u32;
        if weight == 0 {
            continue;
        }
        let target = BackendTarget::Service {
            namespace: Arc::from(bns),
            name: Arc::from(b.name.as_str()),
            port,
        };
        let authority = format!(
            "{}.{bns}.svc.{}:{port}",
            b.name,
            opts.cluster_domain.trim_end_matches('.')
        );
        let (Ok(authority), true) = (HeaderValue::from_str(&authority), valid_host(&b.name)) else {
            fail("UnsupportedValue", format!("{at}: invalid Service name"));
            continue;
        };
        out.push(CompiledBackend {
            id: Arc::from(target.label().as_str()),
            authority,
            target,
            weight,
            canary: false,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listener(hostname: Option<&str>, allowed: Option<AllowedRoutes>) -> Listener {
        Listener {
            name: "web".into(),
            hostname: hostname.map(str::to_string),
            port: 80,
            protocol: "HTTP".into(),
            tls: None,
            allowed_routes: allowed,
        }
    }

    #[test]
    fn listener_and_route_hostnames_intersect_as_the_spec_says() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            intersect(None, &s(&["a.example.com"])),
            Some(s(&["a.example.com"]))
        );
        assert_eq!(
            intersect(Some("*.example.com"), &[]),
            Some(s(&["*.example.com"]))
        );
        assert_eq!(
            intersect(
                Some("*.example.com"),
                &s(&["a.example.com", "example.com", "x.org"])
            ),
            Some(s(&["a.example.com"]))
        );
        // A route wildcard narrower than the listener's host: the listener's host.
        assert_eq!(
            intersect(Some("a.example.com"), &s(&["*.example.com"])),
            Some(s(&["a.example.com"]))
        );
        assert_eq!(
            intersect(Some("a.example.com"), &s(&["b.example.com"])),
            None
        );
    }

    #[test]
    fn allowed_routes_namespaces_and_kinds() {
        let same = listener(None, None);
        assert!(allows(&same, "gw", "gw", None));
        assert!(!allows(&same, "gw", "other", None));
        let all = listener(
            None,
            Some(AllowedRoutes {
                namespaces: Some(RouteNamespaces {
                    from: Some("All".into()),
                    selector: None,
                }),
                kinds: None,
            }),
        );
        assert!(allows(&all, "gw", "other", None));
        let grpc_only = listener(
            None,
            Some(AllowedRoutes {
                namespaces: None,
                kinds: Some(vec![RouteGroupKind {
                    group: None,
                    kind: "GRPCRoute".into(),
                }]),
            }),
        );
        assert!(!allows(&grpc_only, "gw", "gw", None));
        let selector = listener(
            None,
            Some(AllowedRoutes {
                namespaces: Some(RouteNamespaces {
                    from: Some("Selector".into()),
                    selector: Some(serde_json::from_value(serde_json::json!({
                        "matchLabels": {"team": "a"},
                        "matchExpressions": [{"key": "env", "operator": "NotIn", "values": ["prod"]}]
                    })).unwrap()),
                }),
                kinds: None,
            }),
        );
        let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let ns: BTreeMap<String, BTreeMap<String, String>> = [
            ("a".to_string(), labels(&[("team", "a")])),
            (
                "a-prod".to_string(),
                labels(&[("team", "a"), ("env", "prod")]),
            ),
            ("b".to_string(), labels(&[("team", "b")])),
        ]
        .into();
        assert!(allows(&selector, "gw", "a", Some(&ns)));
        assert!(!allows(&selector, "gw", "a-prod", Some(&ns)));
        assert!(!allows(&selector, "gw", "b", Some(&ns)));
        assert!(
            !allows(&selector, "gw", "a", None),
            "not watched: admits none"
        );
    }

    #[test]
    fn precedence_orders_exact_then_method_then_headers_then_query() {
        assert!(precedence(true, false, 0, 0) > precedence(false, true, 16, 16));
        assert!(precedence(false, true, 0, 0) > precedence(false, false, 16, 16));
        assert!(precedence(false, false, 2, 0) > precedence(false, false, 1, 9));
    }
}
