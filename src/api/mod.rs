//! The custom resources Tollgate serves: `AgentRoute` and `AgentApiKey` (`tollgate.dev/v1alpha1`).
//! Types, schemas and the CEL rules the API server enforces; no behaviour lives here.

mod duration;
pub mod fixtures;
mod key;
mod route;
mod status;

pub use duration::{parse_duration, DurationError, DURATION_PATTERN};
pub use key::{AgentApiKey, AgentApiKeySpec, AgentApiKeyStatus, KeyRateLimit, SecretKeyRef};
pub use route::*;
pub use status::{Condition, ConditionStatus};

use kube::CustomResourceExt;

/// API group of every Tollgate resource.
pub const GROUP: &str = "tollgate.dev";
/// The served (and stored) version.
pub const VERSION: &str = "v1alpha1";
/// `gatewayClass` a route gets when it names none, and the one a gateway serves by default.
pub const DEFAULT_GATEWAY_CLASS: &str = "tollgate";

/// The CRDs as multi-document YAML, exactly what `tollgate crdgen` prints and `crds/` holds.
pub fn crds_yaml() -> Result<String, serde_yaml::Error> {
    let mut out = String::new();
    for crd in [AgentRoute::crd(), AgentApiKey::crd()] {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd)?);
    }
    Ok(out)
}
