//! The custom resources Tollgate serves: `AgentRoute` and `AgentApiKey` (`tollgate.dev/v1alpha1`).
//! Types, schemas, the CEL rules the API server enforces and the duration syntax they share; no
//! gateway behaviour lives here. `fixtures` (unit tests and dev builds only) builds objects.

mod duration;
#[cfg(any(test, feature = "fixtures"))]
pub mod fixtures;
#[allow(unreachable_pub)]
pub mod gateway;
// kube's `KubeSchema` derive (x_kube validation rules) emits `pub` helper items inside these
// private modules, which `unreachable_pub` flags; their public types are re-exported below.
#[allow(unreachable_pub)]
mod key;
#[allow(unreachable_pub)]
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
        let mut value =
            serde_json::to_value(&crd).map_err(<serde_yaml::Error as serde::ser::Error>::custom)?;
        strip_rust_formats(&mut value);
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&value)?);
    }
    Ok(out)
}

/// schemars marks Rust integer widths as `format: uint16/uint32/uint64`, which the API server
/// does not know and warns about on every apply; the `minimum`/`maximum` bounds stay.
fn strip_rust_formats(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(map) => {
            let rust_format = map
                .get("format")
                .and_then(|f| f.as_str())
                .is_some_and(|f| matches!(f, "uint8" | "uint16" | "uint32" | "uint64" | "uint"));
            if rust_format {
                map.remove("format");
            }
            for child in map.values_mut() {
                strip_rust_formats(child);
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(strip_rust_formats),
        _ => {}
    }
}
