//! Gateway API filters of HTTPRoute rules: `RequestRedirect` answered here (right after the
//! match, never forwarded), request header edits and `URLRewrite` applied to the upstream
//! request in `forward`, response header edits in `respond`. Routes without filters never call
//! into this file (one `Option` test where each is read).

use http::header::{self, HeaderValue};
use http::{HeaderMap, Response, StatusCode};

use crate::config::route::{CompiledRedirect, CompiledRoute, PathChange, RouteFilters};
use crate::proxy::context::{host_of, RequestCtx};
use crate::proxy::{ProxyBody, ProxyError};

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

/// What the filters answer before anything else runs: a redirect (the rule's, or to `https`
/// for a request that did not arrive over TLS), or 413 for a body over the route's limit.
pub(crate) fn early(
    cx: &RequestCtx<'_>,
    route: &CompiledRoute,
    f: &RouteFilters,
) -> Result<Option<Response<ProxyBody>>, ProxyError> {
    if f.ssl_redirect && !cx.conn.tls {
        let to_https = CompiledRedirect {
            scheme: Some("https".to_string()),
            hostname: None,
            port: None,
            path: None,
            status: 308,
        };
        return Ok(Some(redirect(cx, route, &to_https)));
    }
    if let Some(r) = &f.redirect {
        return Ok(Some(redirect(cx, route, r)));
    }
    if let Some(max) = f.max_body {
        cx.check_content_length(max)?;
    }
    Ok(None)
}

/// The body limit of a route: its own (`proxy-body-size`), else the gateway's.
pub(crate) fn max_body(route: &CompiledRoute, gateway_max: u64) -> u64 {
    route
        .filters
        .as_ref()
        .and_then(|f| f.max_body)
        .map_or(gateway_max, |m| m.min(gateway_max))
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
