//! The configuration core: the `Store` of latest objects, the pure `compile()` to a `Snapshot`
//! (route table, key table, TLS certificates, per-object reports and typed problems), and the
//! path normalisation the matcher and the proxy share. Never sees `kube::Client`, files or
//! sockets: sources feed it, `app` attaches discovery's endpoint sets, the proxy reads it.

pub mod compile;
pub mod gateway;
pub mod ingress;
pub mod path;
pub mod problem;
pub mod route;
pub mod table;
pub mod tls;

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use k8s_openapi::api::core::v1::Secret;
use serde::Serialize;

use crate::api::{AgentApiKey, AgentRoute, Condition};
use crate::auth::keys::{Fingerprint, KeyStore};
use crate::balance::endpoints::EndpointSet;

pub use compile::{compile, CompileOptions};
pub use route::CompiledRoute;
pub use table::{Match, RouteTable};

/// `namespace/name` of an object. `Arc<str>` so that the 100,000 reports of a compile share
/// their namespaces instead of holding a copy each.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ObjectKey {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

impl ObjectKey {
    pub fn new(namespace: impl AsRef<str>, name: impl AsRef<str>) -> Self {
        Self {
            namespace: Arc::from(namespace.as_ref()),
            name: Arc::from(name.as_ref()),
        }
    }
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Everything the sources gathered: the latest version of each object. Sources only fill it.
#[derive(Clone, Debug, Default)]
pub struct Store {
    pub routes: Vec<AgentRoute>,
    pub keys: Vec<AgentApiKey>,
    pub secrets: BTreeMap<ObjectKey, Secret>,
    /// Known Services (Kubernetes mode). `None`: not checked (standalone resolves by DNS).
    pub services: Option<BTreeSet<ObjectKey>>,
    /// Where each object came from (file path), for messages.
    pub origins: BTreeMap<(String, ObjectKey), String>,
    /// The Gateway API objects (Kubernetes mode, when their CRDs are installed).
    pub gateway_api: gateway::GatewayInputs,
    /// Ingresses and IngressClasses (Kubernetes mode).
    pub ingress: ingress::IngressInputs,
}

/// A problem with one object, found by compile or by a source.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Problem {
    /// `AgentRoute`, `AgentApiKey`, `Secret` or `File`.
    pub kind: String,
    pub object: ObjectKey,
    /// The field at fault, as a JSON path (`spec.backends[1].url`), or empty.
    pub field: String,
    /// A CamelCase reason, as in a status condition.
    pub reason: String,
    pub message: String,
    /// The file it came from (standalone).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(o) = &self.origin {
            write!(f, "{o}: ")?;
        }
        if self.kind == "File" {
            return write!(f, "{} ({})", self.message, self.reason);
        }
        write!(f, "{} {}", self.kind, self.object)?;
        if !self.field.is_empty() {
            write!(f, " field {}", self.field)?;
        }
        write!(f, ": {} ({})", self.message, self.reason)
    }
}

/// The compiled view of one object, for status and `/debug`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectReport {
    pub kind: &'static str,
    pub object: ObjectKey,
    pub generation: Option<i64>,
    /// Shared between reports that say the same (every ready key, every accepted route).
    pub conditions: Arc<[Condition]>,
    /// Key fingerprint (AgentApiKey only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<Fingerprint>,
    /// Backend services of a route (for ready endpoint counts in status).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<String>,
}

/// An immutable compiled configuration. Requests hold the one they started with.
#[derive(Default)]
pub struct Snapshot {
    /// Increases with every swap.
    pub generation: u64,
    pub routes: RouteTable,
    pub keys: KeyStore,
    pub certs: tls::CertStore,
    pub problems: Vec<Problem>,
    pub reports: Vec<ObjectReport>,
    /// What the Gateway API objects' status says (GatewayClass, Gateway, HTTPRoute).
    pub gateway_api: gateway::GatewayApiReport,
    /// What each Ingress of our classes was compiled to (warnings become Events).
    pub ingresses: Vec<ingress::IngressReport>,
    /// Live endpoint sets by backend id, attached after compile (discovery swaps them inside).
    pub endpoints: HashMap<Arc<str>, Arc<ArcSwap<EndpointSet>>>,
    /// The MCP session keys of `--mcp-session-secret` (`None`: not set, or its Secret unusable;
    /// the gateway's own random key seals then).
    pub mcp_session_keys: Option<Arc<crate::mcp::SessionKeys>>,
    /// Keeps the discovery watches behind `endpoints` running while this snapshot lives.
    pub keepalive: Vec<Box<dyn std::any::Any + Send + Sync>>,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot")
            .field("generation", &self.generation)
            .field("routes", &self.routes.len())
            .field("keys", &self.keys.len())
            .field("problems", &self.problems)
            .finish_non_exhaustive()
    }
}

impl Snapshot {
    pub fn empty() -> Arc<Self> {
        Arc::new(Self::default())
    }
}

#[cfg(test)]
mod tests;
