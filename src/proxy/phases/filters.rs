//! Gateway API filters of HTTPRoute rules: `RequestRedirect` answered here (right after the
//! match, never forwarded), request header edits and `URLRewrite` applied to the upstream
//! request in `forward`, response header edits in `respond`. Routes without filters never call
//! into this file (one `Option` test where each is read).

use http::header::{self, HeaderValue};
use http::{HeaderMap, Response, StatusCode};

use crate::config::route::{CompiledRedirect, CompiledRoute, PathChange, RouteFilters};
use crate::proxy::context::{host_of, RequestCtx};
use crate::proxy::ProxyBody;

/// The redirect's answer: `Location` built from the request, with what the filter replaces.
pub(crate) fn redirect(
    cx: &RequestCtx<'_>,
    route: &CompiledRoute,
    r: &CompiledRedirect,
) -> Response<ProxyBody> {
    let scheme = r
        .scheme
        .as_deref()
        .unwrap_or(if cx.conn.tls { "https" } else { "http" });
    let host = r
        .hostname
        .clone()
        .unwrap_or_else(|| host_of(&cx.head).into_owned());
    // A port given is used; a scheme given without one means its well-known port; else the
    // port the client used (when it named one).
    let port = match (r.port, &r.scheme) {
        (Some(p), _) => Some(p),
        (None, Some(_)) => None,
        (None, None) => cx
            .head
            .headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.rsplit_once(':'))
            .and_then(|(_, p)| p.parse::<u16>().ok()),
    };
    let port = port.filter(|p| !matches!((scheme, p), ("http", 80) | ("https", 443)));
    let path = cx.path();
    let path = match &r.path {
        None => path.to_string(),
        Some(PathChange::Full(p)) => p.clone(),
        Some(PathChange::Prefix(p)) => route.replace_prefix(p, path),
    };
    let mut location = format!("{scheme}://{host}");
    if let Some(p) = port {
        location.push_str(&format!(":{p}"));
    }
    location.push_str(&path);
    if let Some(q) = cx.head.uri.query() {
        location.push('?');
        location.push_str(q);
    }
    let mut resp = Response::new(ProxyBody::empty());
    *resp.status_mut() = StatusCode::from_u16(r.status).unwrap_or(StatusCode::FOUND);
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

/// The upstream request's headers: the rule's edits, then the rewritten `Host`.
pub(crate) fn request(f: &RouteFilters, h: &mut HeaderMap) {
    if let Some(edits) = &f.request_headers {
        edits.apply(h);
    }
    if let Some(host) = &f.rewrite_host {
        h.insert(header::HOST, host.clone());
    }
}
