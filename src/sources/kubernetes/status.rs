//! Status written back from the snapshot's per-object reports (conditions, observedGeneration,
//! ready endpoints, fingerprints): by the leader only, only when it differs; Events on transitions.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::health::{is_unreachable, ApiHealth};
use futures_util::StreamExt;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Client, Resource};
use serde_json::{json, Value};
use tokio::sync::watch as signal;

use super::watch::Reflectors;
use super::Handle;
use crate::api::gateway::{Gateway, GatewayClass, HTTPRoute, GATEWAY_CONTROLLER, GATEWAY_GROUP};
use crate::api::{
    AgentApiKey, AgentApiKeyStatus, AgentRoute, AgentRouteStatus, BackendStatus, Condition,
    ConditionStatus,
};
use crate::config::gateway::GatewayApiReport;
use crate::config::ingress::IngressReport;
use crate::config::route::BackendTarget;
use crate::config::{CompiledRoute, ObjectKey, ObjectReport, Snapshot};
use k8s_openapi::api::networking::v1::Ingress;

/// Status passes are debounced: a burst of endpoint changes costs one pass.
const DEBOUNCE: Duration = Duration::from_millis(100);
/// Every so often the leader re-checks everything (endpoint counts under DNS discovery,
/// a status someone else overwrote).
const RESYNC: Duration = Duration::from_secs(60);
/// After a failed pass (API server away, a write refused), try again this soon, doubling up to
/// `RETRY_MAX` while passes keep failing (a missing RBAC grant must not flood the logs).
const RETRY: Duration = Duration::from_secs(2);
const RETRY_MAX: Duration = Duration::from_secs(60);
/// Longest wait for one status patch.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Status patches in flight at once (the first pass after an election may touch every object).
const CONCURRENCY: usize = 8;
/// Condition messages are capped: status is read by humans, and objects have a size limit.
const MAX_MESSAGE: usize = 1024;
/// The field manager of status writes (`kubectl get -o yaml --show-managed-fields`).
pub const FIELD_MANAGER: &str = "tollgate";

/// RFC 3339 at second precision, as Kubernetes writes condition times.
pub fn now_rfc3339() -> String {
    let now = jiff::Timestamp::now();
    jiff::Timestamp::from_second(now.as_second())
        .unwrap_or(now)
        .to_string()
}

fn cap(message: &str) -> String {
    if message.len() <= MAX_MESSAGE {
        return message.to_string();
    }
    let mut end = MAX_MESSAGE;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &message[..end])
}

/// The conditions to write: the report's, stamped with the generation they describe, keeping
/// `lastTransitionTime` of any condition whose status did not change.
pub fn merge_conditions(
    desired: &[Condition],
    current: &[Condition],
    generation: Option<i64>,
    now: &str,
) -> Vec<Condition> {
    desired
        .iter()
        .map(|d| {
            let old = current.iter().find(|c| c.type_ == d.type_);
            let last = match old {
                Some(o) if o.status == d.status && o.last_transition_time.is_some() => {
                    o.last_transition_time.clone()
                }
                _ => Some(now.to_string()),
            };
            Condition {
                type_: d.type_.clone(),
                status: d.status,
                reason: d.reason.clone(),
                message: cap(&d.message),
                last_transition_time: last,
                observed_generation: generation,
            }
        })
        .collect()
}

/// An AgentRoute's status from its report, the compiled route and the live endpoint sets.
pub fn route_status(
    report: &ObjectReport,
    route: Option<&CompiledRoute>,
    snap: &Snapshot,
    current: Option<&AgentRouteStatus>,
    now: &str,
) -> AgentRouteStatus {
    let mut conditions = report.conditions.to_vec();
    // Problems found after compile (a backend host that cannot be resolved) count as refs.
    if let Some(p) = snap.problems.iter().find(|p| {
        p.kind == "AgentRoute" && p.object == report.object && p.reason == "BackendNotResolvable"
    }) {
        for c in conditions.iter_mut().filter(|c| c.type_ == "ResolvedRefs") {
            if c.status == ConditionStatus::True {
                *c = Condition::new("ResolvedRefs", false, &p.reason, p.message.clone());
            }
        }
    }
    let backends = route
        .map(|r| {
            r.backends
                .iter()
                .map(|b| BackendStatus {
                    service: match &b.target {
                        BackendTarget::Service { name, .. } => name.to_string(),
                        BackendTarget::Url { .. } => b.id.to_string(),
                    },
                    ready_endpoints: snap
                        .endpoints
                        .get(&b.id)
                        .map_or(0, |s| s.load().ready_count() as u32),
                })
                .collect()
        })
        .unwrap_or_default();
    let empty = Vec::new();
    AgentRouteStatus {
        observed_generation: report.generation,
        conditions: merge_conditions(
            &conditions,
            current.map_or(&empty, |c| &c.conditions),
            report.generation,
            now,
        ),
        backends,
    }
}

/// An AgentApiKey's status from its report: Ready and the fingerprint, never the key.
pub fn key_status(
    report: &ObjectReport,
    current: Option<&AgentApiKeyStatus>,
    now: &str,
) -> AgentApiKeyStatus {
    let empty = Vec::new();
    AgentApiKeyStatus {
        conditions: merge_conditions(
            &report.conditions,
            current.map_or(&empty, |c| &c.conditions),
            report.generation,
            now,
        ),
        fingerprint: report.fingerprint.map(|f| f.to_string()),
    }
}

/// A merge patch that sets `status` to exactly `desired`: absent fields become `null`, so
/// stale ones are removed.
fn status_patch(desired: Value, fields: &[&str]) -> Value {
    let mut status = match desired {
        Value::Object(m) => m,
        _ => serde_json::Map::new(),
    };
    for f in fields {
        status.entry(f.to_string()).or_insert(Value::Null);
    }
    json!({ "status": status })
}

/// Events worth a line in `kubectl describe`: a condition that changed status or reason, or a
/// new object's first verdict (Accepted/Ready always; other conditions only when false).
pub fn transitions(old: &[Condition], new: &[Condition]) -> Vec<Condition> {
    new.iter()
        .filter(|n| match old.iter().find(|o| o.type_ == n.type_) {
            Some(o) => o.status != n.status || o.reason != n.reason,
            None => {
                n.type_ == "Accepted" || n.type_ == "Ready" || n.status != ConditionStatus::True
            }
        })
        .cloned()
        .collect()
}

/// One object whose status must be written.
struct Job {
    kind: &'static str,
    key: ObjectKey,
    resource_version: Option<String>,
    reference: k8s_openapi::api::core::v1::ObjectReference,
    old: Vec<Condition>,
    new: Vec<Condition>,
    patch: Value,
}

/// A write we made, and the object version we made it against: until the watch shows a newer
/// version, the store still holds the old status and must not trigger the same write again.
type Written = HashMap<(&'static str, ObjectKey), (Option<String>, Value)>;

/// A status without its transition times (a pass a second later stamps new ones on the same
/// unwritten change) and without nulls: what identifies a write.
fn identity_of(status: &Value) -> Value {
    let mut s = status.clone();
    if let Value::Object(m) = &mut s {
        m.retain(|_, v| !v.is_null());
        if let Some(Value::Array(cs)) = m.get_mut("conditions") {
            for c in cs {
                if let Value::Object(c) = c {
                    c.remove("lastTransitionTime");
                }
            }
        }
    }
    s
}

fn plan(
    reflectors: &Reflectors,
    snap: &Snapshot,
    written: &Written,
    addresses: &[String],
) -> Vec<Job> {
    let now = now_rfc3339();
    let compiled: HashMap<&str, &CompiledRoute> = snap
        .routes
        .routes()
        .iter()
        .map(|r| (&*r.id, &**r))
        .collect();
    let mut jobs = Vec::new();
    for report in &snap.reports {
        let oref = |k: &ObjectKey| (k.name.clone(), k.namespace.clone());
        let (name, ns) = oref(&report.object);
        let (kind, obj_meta, reference, old, desired, fields): (
            &'static str,
            kube::api::ObjectMeta,
            _,
            Vec<Condition>,
            Value,
            &[&str],
        ) = match report.kind {
            "AgentRoute" => {
                let r = ObjectRef::<AgentRoute>::new(&name).within(&ns);
                let Some(obj) = reflectors.routes.iter().find_map(|s| s.get(&r)) else {
                    continue;
                };
                let id = report.object.to_string();
                let desired = route_status(
                    report,
                    compiled.get(id.as_str()).copied(),
                    snap,
                    obj.status.as_ref(),
                    &now,
                );
                if obj.status.as_ref() == Some(&desired) {
                    continue;
                }
                (
                    "AgentRoute",
                    obj.metadata.clone(),
                    obj.object_ref(&()),
                    obj.status.clone().unwrap_or_default().conditions,
                    serde_json::to_value(&desired).unwrap_or(Value::Null),
                    &["observedGeneration", "conditions", "backends"],
                )
            }
            "AgentApiKey" => {
                let r = ObjectRef::<AgentApiKey>::new(&name).within(&ns);
                let Some(obj) = reflectors.keys.iter().find_map(|s| s.get(&r)) else {
                    continue;
                };
                let desired = key_status(report, obj.status.as_ref(), &now);
                if obj.status.as_ref() == Some(&desired) {
                    continue;
                }
                (
                    "AgentApiKey",
                    obj.metadata.clone(),
                    obj.object_ref(&()),
                    obj.status.clone().unwrap_or_default().conditions,
                    serde_json::to_value(&desired).unwrap_or(Value::Null),
                    &["conditions", "fingerprint"],
                )
            }
            _ => continue,
        };
        // The report describes an older generation than the store holds: a compile is on its
        // way; writing now would report stale conditions against the new spec.
        if obj_meta.generation != report.generation {
            continue;
        }
        let key = (kind, report.object.clone());
        let rv = obj_meta.resource_version.clone();
        let new: Vec<Condition> = desired
            .get("conditions")
            .and_then(|c| serde_json::from_value(c.clone()).ok())
            .unwrap_or_default();
        if written.get(&key) == Some(&(rv.clone(), identity_of(&desired))) {
            continue;
        }
        jobs.push(Job {
            kind,
            key: report.object.clone(),
            resource_version: rv,
            reference,
            old,
            new,
            patch: status_patch(desired, fields),
        });
    }
    plan_gateway_api(
        reflectors,
        &snap.gateway_api,
        written,
        addresses,
        &now,
        &mut jobs,
    );
    plan_ingresses(reflectors, &snap.ingresses, written, addresses, &mut jobs);
    jobs
}

/// An Ingress's `status.loadBalancer` from `--gateway-address`: an IP, else a host name.
fn load_balancer_json(addresses: &[String]) -> Value {
    let ingress: Vec<Value> = addresses
        .iter()
        .map(|a| {
            if a.parse::<std::net::IpAddr>().is_ok() {
                json!({ "ip": a })
            } else {
                json!({ "hostname": a })
            }
        })
        .collect();
    if ingress.is_empty() {
        json!({})
    } else {
        json!({ "ingress": ingress })
    }
}

/// Jobs for our Ingresses: `status.loadBalancer` where it differs, and the Warning Events of
/// each generation's warnings, once (an events-only job of kind `IngressEvents`).
fn plan_ingresses(
    reflectors: &Reflectors,
    reports: &[IngressReport],
    written: &Written,
    addresses: &[String],
    jobs: &mut Vec<Job>,
) {
    let lb = load_balancer_json(addresses);
    for i in reports {
        let r = ObjectRef::<Ingress>::new(&i.object.name).within(&i.object.namespace);
        let Some(obj) = reflectors.ingresses.iter().find_map(|s| s.get(&r)) else {
            continue;
        };
        let current = obj
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .map(|l| serde_json::to_value(l).unwrap_or(Value::Null))
            .unwrap_or(json!({}));
        let same = current == lb
            || (current
                .get("ingress")
                .is_none_or(|v| v.as_array().is_some_and(Vec::is_empty))
                && lb.get("ingress").is_none());
        if !same {
            push_job(
                jobs,
                written,
                "Ingress",
                i.object.clone(),
                &obj.metadata,
                i.generation,
                obj.object_ref(&()),
                json!({ "loadBalancer": lb }),
            );
        }
        if i.warnings.is_empty() {
            continue;
        }
        let warnings: Vec<Condition> = i
            .warnings
            .iter()
            .map(|(reason, message)| Condition::new(message, false, reason, message.clone()))
            .collect();
        let seen = json!(i.warnings.iter().map(|w| &w.1).collect::<Vec<_>>());
        let version = i.generation.map(|g| g.to_string());
        let key = ("IngressEvents", i.object.clone());
        if written.get(&key) == Some(&(version.clone(), identity_of(&seen))) {
            continue;
        }
        jobs.push(Job {
            kind: "IngressEvents",
            key: i.object.clone(),
            resource_version: version,
            reference: obj.object_ref(&()),
            old: Vec::new(),
            new: warnings,
            patch: json!({ "status": seen }),
        });
    }
}

/// Gateway API conditions as JSON: `message` is required there (may be empty), and each keeps
/// its `lastTransitionTime` while its status holds.
fn gw_conditions(
    desired: &[Condition],
    current: Option<&Value>,
    generation: Option<i64>,
    now: &str,
) -> Value {
    let current: Vec<Condition> = current
        .and_then(|c| serde_json::from_value(c.clone()).ok())
        .unwrap_or_default();
    let merged = merge_conditions(desired, &current, generation, now);
    let mut out = serde_json::to_value(merged).unwrap_or(Value::Array(Vec::new()));
    if let Value::Array(cs) = &mut out {
        for c in cs {
            if let Value::Object(m) = c {
                m.entry("message").or_insert(Value::String(String::new()));
            }
        }
    }
    out
}

/// `status.addresses` from `--gateway-address`: an IP address, else a host name.
fn addresses_json(addresses: &[String]) -> Value {
    Value::Array(
        addresses
            .iter()
            .map(|a| {
                let type_ = if a.parse::<std::net::IpAddr>().is_ok() {
                    "IPAddress"
                } else {
                    "Hostname"
                };
                json!({"type": type_, "value": a})
            })
            .collect(),
    )
}

#[allow(clippy::too_many_arguments)]
fn push_job(
    jobs: &mut Vec<Job>,
    written: &Written,
    kind: &'static str,
    key: ObjectKey,
    meta: &kube::api::ObjectMeta,
    generation: Option<i64>,
    reference: k8s_openapi::api::core::v1::ObjectReference,
    desired: Value,
) {
    if meta.generation != generation {
        return;
    }
    let rv = meta.resource_version.clone();
    if written.get(&(kind, key.clone())) == Some(&(rv.clone(), identity_of(&desired))) {
        return;
    }
    jobs.push(Job {
        kind,
        key,
        resource_version: rv,
        reference,
        old: Vec::new(),
        new: Vec::new(),
        patch: json!({ "status": desired }),
    });
}

/// Jobs for the GatewayClasses, Gateways and HTTPRoutes whose status differs from the report.
/// Only our parts are written: an HTTPRoute's `parents[]` entries of other controllers stay.
fn plan_gateway_api(
    reflectors: &Reflectors,
    report: &GatewayApiReport,
    written: &Written,
    addresses: &[String],
    now: &str,
    jobs: &mut Vec<Job>,
) {
    plan_classes(reflectors, report, written, now, jobs);
    plan_gateways(reflectors, report, written, addresses, now, jobs);
    plan_http_routes(reflectors, report, written, now, jobs);
}

/// GatewayClass `conditions`.
fn plan_classes(
    reflectors: &Reflectors,
    report: &GatewayApiReport,
    written: &Written,
    now: &str,
    jobs: &mut Vec<Job>,
) {
    for c in &report.classes {
        let r = ObjectRef::<GatewayClass>::new(&c.name);
        let Some(obj) = reflectors.classes.iter().find_map(|s| s.get(&r)) else {
            continue;
        };
        let current = obj.status.as_ref().and_then(|s| s.get("conditions"));
        let conditions = gw_conditions(&c.conditions, current, c.generation, now);
        if current == Some(&conditions) {
            continue;
        }
        push_job(
            jobs,
            written,
            "GatewayClass",
            ObjectKey::new("", &c.name),
            &obj.metadata,
            c.generation,
            obj.object_ref(&()),
            json!({ "conditions": conditions }),
        );
    }
}

/// Gateway `addresses`, `conditions` and `listeners`.
fn plan_gateways(
    reflectors: &Reflectors,
    report: &GatewayApiReport,
    written: &Written,
    addresses: &[String],
    now: &str,
    jobs: &mut Vec<Job>,
) {
    for g in &report.gateways {
        let r = ObjectRef::<Gateway>::new(&g.object.name).within(&g.object.namespace);
        let Some(obj) = reflectors.gateways.iter().find_map(|s| s.get(&r)) else {
            continue;
        };
        let status = obj.status.clone().unwrap_or(Value::Null);
        let listeners: Vec<Value> = g
            .listeners
            .iter()
            .map(|l| {
                let current = status["listeners"]
                    .as_array()
                    .and_then(|ls| ls.iter().find(|x| x["name"] == *l.name))
                    .and_then(|x| x.get("conditions"));
                json!({
                    "name": l.name,
                    "supportedKinds": l.supported_kinds.iter()
                        .map(|k| json!({"group": GATEWAY_GROUP, "kind": k}))
                        .collect::<Vec<_>>(),
                    "attachedRoutes": l.attached_routes,
                    "conditions": gw_conditions(&l.conditions, current, g.generation, now),
                })
            })
            .collect();
        let desired = json!({
            "addresses": addresses_json(addresses),
            "conditions": gw_conditions(&g.conditions, status.get("conditions"), g.generation, now),
            "listeners": listeners,
        });
        let same = ["addresses", "conditions", "listeners"].iter().all(|f| {
            let cur = status.get(*f).cloned().unwrap_or(Value::Null);
            let want = &desired[*f];
            cur == *want || (cur.is_null() && want.as_array().is_some_and(Vec::is_empty))
        });
        if same {
            continue;
        }
        push_job(
            jobs,
            written,
            "Gateway",
            g.object.clone(),
            &obj.metadata,
            g.generation,
            obj.object_ref(&()),
            desired,
        );
    }
}

/// HTTPRoute `parents` of our controller (other controllers' entries kept).
fn plan_http_routes(
    reflectors: &Reflectors,
    report: &GatewayApiReport,
    written: &Written,
    now: &str,
    jobs: &mut Vec<Job>,
) {
    for h in &report.http_routes {
        let r = ObjectRef::<HTTPRoute>::new(&h.object.name).within(&h.object.namespace);
        let Some(obj) = reflectors.http_routes.iter().find_map(|s| s.get(&r)) else {
            continue;
        };
        let current: Vec<Value> = obj
            .status
            .as_ref()
            .and_then(|s| s["parents"].as_array().cloned())
            .unwrap_or_default();
        let mut parents: Vec<Value> = current
            .iter()
            .filter(|p| p["controllerName"] != GATEWAY_CONTROLLER)
            .cloned()
            .collect();
        for p in &h.parents {
            let parent_ref = serde_json::to_value(&p.parent_ref).unwrap_or(Value::Null);
            let old = current
                .iter()
                .find(|c| {
                    c["controllerName"] == GATEWAY_CONTROLLER
                        && same_ref(&c["parentRef"], &parent_ref)
                })
                .and_then(|c| c.get("conditions"));
            parents.push(json!({
                "parentRef": parent_ref,
                "controllerName": GATEWAY_CONTROLLER,
                "conditions": gw_conditions(&p.conditions, old, h.generation, now),
            }));
        }
        if parents == current {
            continue;
        }
        push_job(
            jobs,
            written,
            "HTTPRoute",
            h.object.clone(),
            &obj.metadata,
            h.generation,
            obj.object_ref(&()),
            json!({ "parents": parents }),
        );
    }
}

/// Two parentRefs name the same parent (the API server fills in defaults on one of them).
fn same_ref(a: &Value, b: &Value) -> bool {
    let field = |v: &Value, f: &str, default: &str| {
        v.get(f)
            .and_then(Value::as_str)
            .unwrap_or(default)
            .to_string()
    };
    ["name", "namespace", "sectionName"]
        .iter()
        .all(|f| field(a, f, "") == field(b, f, ""))
        && field(a, "group", GATEWAY_GROUP) == field(b, "group", GATEWAY_GROUP)
        && field(a, "kind", "Gateway") == field(b, "kind", "Gateway")
        && a.get("port") == b.get("port")
}

/// Outcome of one status write.
enum Outcome {
    Written,
    /// The object is gone: nothing to do.
    Gone,
    /// The API server refused or was away: retry later.
    Failed,
}

async fn write(client: &Client, job: &Job, health: &ApiHealth) -> Outcome {
    let pp = PatchParams {
        field_manager: Some(FIELD_MANAGER.to_string()),
        ..PatchParams::default()
    };
    let patch = Patch::Merge(&job.patch);
    let ns = &job.key.namespace;
    let call = async {
        match job.kind {
            "AgentRoute" => Api::<AgentRoute>::namespaced(client.clone(), ns)
                .patch_status(&job.key.name, &pp, &patch)
                .await
                .map(|_| ()),
            "GatewayClass" => Api::<GatewayClass>::all(client.clone())
                .patch_status(&job.key.name, &pp, &patch)
                .await
                .map(|_| ()),
            "Gateway" => Api::<Gateway>::namespaced(client.clone(), ns)
                .patch_status(&job.key.name, &pp, &patch)
                .await
                .map(|_| ()),
            "HTTPRoute" => Api::<HTTPRoute>::namespaced(client.clone(), ns)
                .patch_status(&job.key.name, &pp, &patch)
                .await
                .map(|_| ()),
            "Ingress" => Api::<Ingress>::namespaced(client.clone(), ns)
                .patch_status(&job.key.name, &pp, &patch)
                .await
                .map(|_| ()),
            // Events only: nothing of the object is written.
            "IngressEvents" => Ok(()),
            _ => Api::<AgentApiKey>::namespaced(client.clone(), ns)
                .patch_status(&job.key.name, &pp, &patch)
                .await
                .map(|_| ()),
        }
    };
    match tokio::time::timeout(REQUEST_TIMEOUT, call).await {
        Ok(Ok(())) => {
            health.reached();
            Outcome::Written
        }
        Ok(Err(kube::Error::Api(s))) if s.code == 404 => Outcome::Gone,
        Ok(Err(e)) if is_unreachable(&e) => {
            health.unreachable("status write", &e);
            Outcome::Failed
        }
        Ok(Err(e)) => {
            tracing::warn!(kind = job.kind, object = %job.key, error = %e, "status write failed");
            Outcome::Failed
        }
        Err(_) => {
            health.unreachable("status write", &"timed out");
            Outcome::Failed
        }
    }
}

async fn publish(recorder: &Recorder, job: &Job) -> usize {
    let mut n = 0;
    for c in transitions(&job.old, &job.new) {
        let ok = c.status == ConditionStatus::True;
        let note = if c.message.is_empty() {
            format!(
                "{} {}: {}",
                job.kind,
                c.type_,
                if ok { "True" } else { "False" }
            )
        } else {
            c.message.clone()
        };
        let ev = Event {
            type_: if ok {
                EventType::Normal
            } else {
                EventType::Warning
            },
            reason: c.reason.clone(),
            note: Some(note),
            action: "Compile".to_string(),
            secondary: None,
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, recorder.publish(&ev, &job.reference)).await {
            Ok(Ok(())) => n += 1,
            Ok(Err(e)) => tracing::debug!(object = %job.key, error = %e, "event not published"),
            Err(_) => tracing::debug!(object = %job.key, "event publish timed out"),
        }
    }
    n
}

/// Writes status while this replica leads: after each compile, endpoint change, election, and
/// every minute. Followers only wait.
pub async fn run(
    client: Client,
    reflectors: Arc<Reflectors>,
    mut trigger: signal::Receiver<u64>,
    current: Arc<dyn Fn() -> Arc<Snapshot> + Send + Sync>,
    handle: Arc<Handle>,
) {
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "tollgate".to_string(),
            instance: Some(handle.identity().to_string()),
        },
    );
    let mut written: Written = HashMap::new();
    let mut resync = tokio::time::interval(RESYNC);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut retry = false;
    let mut retry_after = RETRY;
    loop {
        tokio::select! {
            r = trigger.changed() => if r.is_err() { return },
            _ = resync.tick() => {},
            _ = tokio::time::sleep(retry_after), if retry => {},
        }
        tokio::time::sleep(DEBOUNCE).await;
        trigger.borrow_and_update();
        let was_retrying = std::mem::take(&mut retry);
        if !handle.is_synced() {
            continue;
        }
        if !handle.is_leader() {
            written.clear();
            continue;
        }
        let snap = current();
        let jobs = plan(&reflectors, &snap, &written, handle.gateway_addresses());
        if jobs.is_empty() {
            continue;
        }
        let results: Vec<(Job, Outcome, usize)> = futures_util::stream::iter(jobs)
            .map(|job| {
                let client = client.clone();
                let recorder = recorder.clone();
                let handle = handle.clone();
                async move {
                    // Leadership may have moved while the pass ran.
                    if !handle.is_leader() {
                        return (job, Outcome::Failed, 0);
                    }
                    let outcome = write(&client, &job, &handle.health).await;
                    let events = if matches!(outcome, Outcome::Written) {
                        publish(&recorder, &job).await
                    } else {
                        0
                    };
                    (job, outcome, events)
                }
            })
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
        for (job, outcome, events) in results {
            match outcome {
                Outcome::Written => {
                    if job.kind != "IngressEvents" {
                        handle.status_writes.fetch_add(1, Ordering::Relaxed);
                    }
                    handle.events.fetch_add(events as u64, Ordering::Relaxed);
                    tracing::debug!(kind = job.kind, object = %job.key, "status written");
                    let desired = identity_of(job.patch.get("status").unwrap_or(&Value::Null));
                    written.insert((job.kind, job.key), (job.resource_version, desired));
                }
                Outcome::Gone => {}
                Outcome::Failed => retry = true,
            }
        }
        retry_after = if retry && was_retrying {
            (retry_after * 2).min(RETRY_MAX)
        } else {
            RETRY
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cond(t: &str, ok: bool, reason: &str, ltt: Option<&str>) -> Condition {
        let mut c = Condition::new(t, ok, reason, "");
        c.last_transition_time = ltt.map(str::to_string);
        c
    }

    #[test]
    fn transition_time_is_kept_while_status_holds() {
        let current = vec![
            cond("Accepted", true, "Accepted", Some("2026-01-01T00:00:00Z")),
            cond(
                "ResolvedRefs",
                true,
                "ResolvedRefs",
                Some("2026-01-01T00:00:00Z"),
            ),
        ];
        let desired = vec![
            cond("Accepted", true, "Accepted", None),
            cond("ResolvedRefs", false, "BackendNotFound", None),
        ];
        let got = merge_conditions(&desired, &current, Some(3), "2026-02-02T00:00:00Z");
        assert_eq!(
            got[0].last_transition_time.as_deref(),
            Some("2026-01-01T00:00:00Z")
        );
        assert_eq!(
            got[1].last_transition_time.as_deref(),
            Some("2026-02-02T00:00:00Z")
        );
        assert!(got.iter().all(|c| c.observed_generation == Some(3)));
    }

    #[test]
    fn unchanged_status_compares_equal() {
        let report = ObjectReport {
            kind: "AgentApiKey",
            object: ObjectKey::new("ns", "k"),
            generation: Some(1),
            conditions: [Condition::new("Ready", true, "Ready", "")].into(),
            fingerprint: Some(crate::auth::keys::Fingerprint::of(&[0xab; 32])),
            backends: vec![],
        };
        let first = key_status(&report, None, "2026-01-01T00:00:00Z");
        let again = key_status(&report, Some(&first), "2026-05-05T00:00:00Z");
        assert_eq!(first, again, "a second pass must not write");
    }

    #[test]
    fn patch_nulls_absent_fields() {
        let p = status_patch(json!({"conditions": []}), &["conditions", "fingerprint"]);
        assert_eq!(
            p,
            json!({"status": {"conditions": [], "fingerprint": null}})
        );
    }

    #[test]
    fn events_only_on_transitions() {
        let old = vec![cond("Accepted", true, "Accepted", None)];
        assert!(transitions(&old, &old).is_empty());
        let new = vec![cond("Accepted", false, "Conflicted", None)];
        assert_eq!(transitions(&old, &new).len(), 1);
        let fresh = vec![
            cond("Accepted", true, "Accepted", None),
            cond("ResolvedRefs", true, "ResolvedRefs", None),
        ];
        assert_eq!(
            transitions(&[], &fresh).len(),
            1,
            "first verdict: Accepted only"
        );
    }

    #[test]
    fn long_messages_are_capped_on_a_char_boundary() {
        let m = "é".repeat(MAX_MESSAGE);
        let c = cap(&m);
        assert!(c.len() <= MAX_MESSAGE + '…'.len_utf8());
    }
}
