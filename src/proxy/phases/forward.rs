//! Phase 7, forward: the attempt loop. Each attempt picks an endpoint, sends the request within
//! the first-byte and whole-request deadlines, and the error (or the status) says whether the
//! route's retry policy may try again. Retries happen only before any byte reaches the client.

use std::net::SocketAddr;

use http::{header, Request, Response, Version};
use tokio::time::Instant;

use crate::balance::health::FailureKind;
use crate::config::route::CompiledRoute;
use crate::proxy::context::RequestCtx;
use crate::proxy::outbound::{self, upstream_uri};
use crate::proxy::pick::{pick_pinned, pick_upstream, UpstreamGuard};
use crate::proxy::upstream::Connect;
use crate::proxy::{Gateway, ProxyBody, ProxyError};

/// The upstream's answer, and what must ride with its body to the end.
pub(crate) struct Forwarded {
    pub(crate) resp: Response<ProxyBody>,
    pub(crate) guard: UpstreamGuard,
    /// The whole exchange's deadline (`timeouts.request`), which the body keeps to.
    pub(crate) deadline: Option<Instant>,
}

/// Where every attempt of a request must go: backend index and endpoint (an MCP session).
#[derive(Clone, Copy)]
pub(crate) struct Pin {
    pub(crate) backend: usize,
    pub(crate) endpoint: SocketAddr,
}

/// Sends the request until an attempt answers, or the last one fails; every attempt goes to
/// `pin` when given (by reference: the request future of other routes stays as small as it was)
/// instead of being picked by the balancer.
pub(crate) async fn run(
    cx: &mut RequestCtx<'_>,
    route: &CompiledRoute,
    pin: Option<&Pin>,
) -> Result<Forwarded, ProxyError> {
    outbound::prepare_headers(cx, false);
    let gw = cx.gw;
    // A body kept in memory can be sent again; a streaming one only once.
    let max_attempts = route.retry.attempts.max(1);
    let attempts = if max_attempts > 1
        && cx
            .body
            .make_replayable(cx.content_length(), gw.options.replay_limit_bytes)
            .await?
    {
        max_attempts
    } else {
        1
    };
    let path = upstream_path(cx.normalized.as_deref(), &cx.head.uri, route);
    let query = outbound::query(&cx.head.uri, cx.carrier);
    let deadline = route.timeouts.request.map(|d| cx.started + d);
    // Only filled when another attempt may follow (no allocation for a single attempt).
    let mut tried: Vec<SocketAddr> = Vec::new();
    let mut attempt = 0;
    loop {
        attempt += 1;
        let last = attempt >= attempts;
        if attempt > 1 && !route.retry.backoff.is_zero() {
            tokio::time::sleep(route.retry.backoff).await;
        }
        let picked = match pin {
            None => pick_upstream(
                gw,
                &cx.snap,
                route,
                &cx.head.headers,
                cx.caller.as_ref(),
                &tried,
            )?,
            Some(p) => pick_pinned(gw, &cx.snap, route, p.backend, p.endpoint)?,
        };
        let backend = picked.backend;
        cx.outcome.upstream = Some(backend.id.clone());
        let mut up = Request::new(
            cx.body
                .for_attempt(super::filters::max_body(route, gw.options.max_body_bytes)),
        );
        *up.method_mut() = cx.head.method.clone();
        *up.uri_mut() = upstream_uri(backend, &path, query.as_deref())?;
        *up.version_mut() = Version::HTTP_11;
        // The last attempt takes the headers; only an attempt that may be retried copies them.
        *up.headers_mut() = if last {
            std::mem::take(&mut cx.head.headers)
        } else {
            cx.head.headers.clone()
        };
        up.headers_mut()
            .insert(header::HOST, backend.authority.clone());
        if let Some(f) = &route.filters {
            super::filters::request(f, up.headers_mut());
        }
        let mut guard = picked.guard;
        if !last {
            tried.push(guard.endpoint.addr());
        }
        let sent = send(gw, &picked.connect, up, route, deadline).await;
        let count = |outcome: &str| {
            gw.metrics
                .upstream_requests_total
                .with_label_values(&[&route.id, &backend.id, outcome])
                .inc()
        };
        match sent {
            Err(e) => {
                count(e.upstream_outcome());
                if let Some(kind) = e.endpoint_failure() {
                    guard.endpoint.failure(kind);
                }
                if !last && route.retry.on_connect_failure && e.is_retryable(&cx.head.method) {
                    continue;
                }
                return Err(e);
            }
            Ok((resp, lease)) => {
                guard.conn = Some(lease);
                let status = resp.status().as_u16();
                if status >= 500 {
                    guard.endpoint.failure(FailureKind::ServerError);
                } else {
                    guard.endpoint.success();
                }
                if !last && route.retry.retries_status(status) {
                    count("retried");
                    continue;
                }
                count(if status >= 500 { "5xx" } else { "success" });
                return Ok(Forwarded {
                    resp: resp.map(ProxyBody::incoming),
                    guard,
                    deadline,
                });
            }
        }
    }
}

/// The path the upstream is sent (the route's rewrite or filters applied).
pub(crate) fn upstream_path<'a>(
    normalized: Option<&'a str>,
    uri: &'a http::Uri,
    route: &'a CompiledRoute,
) -> std::borrow::Cow<'a, str> {
    let path = normalized.unwrap_or_else(|| uri.path());
    match route.filters.as_ref().and_then(|f| f.full_path.as_deref()) {
        Some(full) => std::borrow::Cow::Borrowed(full),
        None => route.rewrite_path(path),
    }
}

/// One attempt: the upstream's response head within the first-byte timeout and the deadline.
pub(crate) async fn send(
    gw: &Gateway,
    to: &Connect,
    up: Request<ProxyBody>,
    route: &CompiledRoute,
    deadline: Option<Instant>,
) -> Result<
    (
        Response<hyper::body::Incoming>,
        crate::proxy::upstream::Lease,
    ),
    ProxyError,
> {
    let wait = match (route.timeouts.first_byte, deadline) {
        (Some(fb), Some(dl)) => Some((Instant::now() + fb).min(dl)),
        (Some(fb), None) => Some(Instant::now() + fb),
        (None, Some(dl)) => Some(dl),
        (None, None) => None,
    };
    match wait {
        Some(at) => tokio::time::timeout_at(at, gw.upstream.send(to, up))
            .await
            .unwrap_or(Err(ProxyError::Timeout)),
        None => gw.upstream.send(to, up).await,
    }
}
