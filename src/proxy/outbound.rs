//! The request as the upstream sees it: hop-by-hop headers and the key's carrier removed,
//! `X-Client-Id`, `X-Request-Id`, `traceparent` and `X-Forwarded-*` set, the path rewritten and
//! the `api_key` query parameter dropped. Shared by the attempt loop and the WebSocket relay.

use std::borrow::Cow;

use http::header::{self, HeaderValue};
use http::Uri;

use super::context::RequestCtx;
use super::headers::{self, X_CLIENT_ID, X_REQUEST_ID};
use super::ProxyError;
use crate::auth::extract::{strip_api_key_param, KeyCarrier, X_API_KEY};
use crate::config::route::{BackendTarget, CompiledBackend};

/// Rewrites `cx.head.headers` into the upstream's request headers (the `Host` is set per
/// attempt, from the backend). `upgrade` keeps `Connection: upgrade` and `Upgrade`.
pub(crate) fn prepare_headers(cx: &mut RequestCtx<'_>, upgrade: bool) {
    // The host as the client sent it, port included (what Envoy and nginx's $http_host pass).
    let sent_host = match cx.head.uri.authority() {
        Some(a) => HeaderValue::from_str(a.as_str()).ok(),
        None => cx.head.headers.get(header::HOST).cloned(),
    };
    let h = &mut cx.head.headers;
    headers::strip_hop_by_hop(h, upgrade);
    if cx.carrier == Some(KeyCarrier::Bearer) {
        h.remove(header::AUTHORIZATION);
    }
    h.remove(&X_API_KEY);
    h.remove(&X_CLIENT_ID);
    if let Some(c) = &cx.caller {
        if let Ok(v) = HeaderValue::from_str(&c.key.client_id) {
            h.insert(&X_CLIENT_ID, v);
        }
    }
    h.insert(&X_REQUEST_ID, cx.request_id.clone());
    let tp = headers::traceparent(h);
    h.insert(&headers::TRACEPARENT, tp);
    headers::forwarded_for(h, cx.conn.remote.ip(), cx.gw.options.trust_forwarded);
    h.insert(
        &headers::X_FORWARDED_PROTO,
        HeaderValue::from_static(if cx.conn.tls { "https" } else { "http" }),
    );
    if let Some(v) = sent_host.filter(|v| !v.is_empty()) {
        h.insert(&headers::X_FORWARDED_HOST, v);
    }
}

/// The query forwarded upstream: the client's, without the key when the query carried it.
pub(crate) fn query<'a>(uri: &'a Uri, carrier: Option<KeyCarrier>) -> Option<Cow<'a, str>> {
    let q = uri.query()?;
    if carrier == Some(KeyCarrier::Query) {
        strip_api_key_param(q).map(Cow::Owned)
    } else {
        Some(Cow::Borrowed(q))
    }
}

/// The origin-form request target toward the upstream (`/base/path?query`); the connection
/// and the `Host` header say where it goes.
pub(crate) fn upstream_uri(
    backend: &CompiledBackend,
    path: &str,
    query: Option<&str>,
) -> Result<Uri, ProxyError> {
    let base = match &backend.target {
        BackendTarget::Url { base_path, .. } => &**base_path,
        BackendTarget::Service { .. } => "",
    };
    let mut s = String::with_capacity(base.len() + path.len() + query.map_or(0, |q| q.len() + 1));
    s.push_str(base);
    s.push_str(path);
    if let Some(q) = query {
        s.push('?');
        s.push_str(q);
    }
    Uri::try_from(s).map_err(|_| ProxyError::BadRequest)
}
