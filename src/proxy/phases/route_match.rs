//! Phase 1, match: host, path and method (404, 405), headers, and a top-level body field for
//! `bodyField` routes (the only phase that reads the body to decide). CONNECT is never routed.

use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::{Method, Version};

use crate::config::route::CompiledRoute;
use crate::config::table::BodyFields;
use crate::config::Match;
use crate::proxy::context::{host_of, RequestCtx};
use crate::proxy::ProxyError;

/// `Allow` of a route that names no methods, when CONNECT is refused.
const ALL_BUT_CONNECT: &str = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS, TRACE";

/// Finds the request's route, or refuses it (400 malformed, 404, 405).
pub(crate) async fn run(cx: &mut RequestCtx<'_>) -> Result<Arc<CompiledRoute>, ProxyError> {
    cx.normalize_path()?;
    // RFC 9112 §3.2: an HTTP/1.1 request with no Host, or more than one, is a 400, so host-based
    // routing never has to guess which Host was meant.
    let hosts = cx.head.headers.get_all(header::HOST).iter().count();
    if hosts > 1 || (hosts == 0 && cx.head.version == Version::HTTP_11) {
        return Err(ProxyError::BadRequest);
    }
    // A CORS preflight matches as the method it announces.
    let h = &cx.head.headers;
    cx.preflight = cx.head.method == Method::OPTIONS
        && h.contains_key(header::ORIGIN)
        && h.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    let announced = if cx.preflight {
        h.get(header::ACCESS_CONTROL_REQUEST_METHOD)
            .and_then(|m| Method::from_bytes(m.as_bytes()).ok())
    } else {
        None
    };
    let method = announced.as_ref().unwrap_or(&cx.head.method);

    let host = host_of(&cx.head);
    let query = cx.head.uri.query();
    let first = match cx
        .snap
        .routes
        .find_with_query(&host, cx.path(), query, method, h, None)
    {
        Match::NeedBody => None,
        m => Some(found(m)?),
    };
    let route = match first {
        Some(route) => route,
        None => {
            // The body is forwarded from this buffer, so `max_body_bytes` binds here too (a
            // chunked body has no Content-Length for the first check).
            let opts = &cx.gw.options;
            cx.check_content_length(opts.max_body_bytes)?;
            let cap = opts.max_inspect_bytes.min(opts.max_body_bytes);
            let method = method.clone();
            let fields = body_fields(cx.body.buffer(cap).await?);
            let host = host_of(&cx.head);
            match cx.snap.routes.find_with_query(
                &host,
                cx.path(),
                cx.head.uri.query(),
                &method,
                &cx.head.headers,
                Some(&fields),
            ) {
                Match::NeedBody => return Err(ProxyError::NoRoute),
                m => found(m)?,
            }
        }
    };
    cx.outcome.route = Some(route.id.clone());
    // CONNECT asks for a tunnel, which a reverse proxy never opens (even on a route admitting
    // every method): 405 with what the route does allow.
    if cx.head.method == Method::CONNECT {
        return Err(ProxyError::MethodNotAllowed(
            route
                .methods
                .allow
                .clone()
                .unwrap_or_else(|| HeaderValue::from_static(ALL_BUT_CONNECT)),
        ));
    }
    Ok(route)
}

fn found(m: Match<'_>) -> Result<Arc<CompiledRoute>, ProxyError> {
    match m {
        Match::Route(r) => Ok(r.clone()),
        Match::MethodNotAllowed(allow) => Err(ProxyError::MethodNotAllowed(allow)),
        Match::NotFound | Match::NeedBody => Err(ProxyError::NoRoute),
    }
}

fn body_fields(bytes: &[u8]) -> BodyFields {
    match serde_json::from_slice::<serde_json::Value>(bytes) {
        Ok(serde_json::Value::Object(m)) => m,
        _ => BodyFields::new(),
    }
}
