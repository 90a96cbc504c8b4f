//! Phase 4, authorise (403): may this caller use this route. Reads the route's auth policy and
//! the caller found by `authenticate`; no I/O.

use super::authenticate::refused;
use crate::config::route::CompiledRoute;
use crate::proxy::context::{ClientKey, RequestCtx};
use crate::proxy::ProxyError;

/// Refuses a caller outside the route's namespaces or without one of its roles. Keys the
/// external auth service admits are bound to no namespace: they pass wherever their roles do.
pub(crate) fn run(cx: &mut RequestCtx<'_>, route: &CompiledRoute) -> Result<(), ProxyError> {
    if let Some(c) = &cx.caller {
        cx.outcome.client = Some(c.key.client_id.clone());
        if route.auth.required {
            if c.external.is_none()
                && !route
                    .auth
                    .admits_namespace(&route.namespace, &c.key.namespace)
            {
                return Err(refused(cx, ProxyError::NamespaceForbidden));
            }
            if !c.key.has_any_role(&route.auth.roles) {
                return Err(refused(cx, ProxyError::Forbidden));
            }
        }
        cx.client = ClientKey::Caller;
    }
    Ok(())
}
