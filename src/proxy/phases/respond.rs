//! Phase 8, respond and settle: the upstream's answer made the client's (hop-by-hop headers,
//! CORS, `RateLimit-*`, stream timeouts, guards, revocation), token usage settled as the body
//! passes, and every answer (the gateway's own refusals too) counted and logged once.

use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::{Response, StatusCode};

use super::forward::Forwarded;
use crate::api::Protocol;
use crate::config::route::CompiledRoute;
use crate::proxy::body::BodyTap;
use crate::proxy::context::RequestCtx;
use crate::proxy::headers::{self, X_REQUEST_ID};
use crate::proxy::revocation::revocation;
use crate::proxy::{Gateway, ProxyBody, ProxyError};
use crate::ratelimit::{TokenReservation, UsageObserver};
use crate::telemetry::GaugeGuard;

/// The client's response from the upstream's.
pub(crate) fn upstream(
    cx: &mut RequestCtx<'_>,
    route: &CompiledRoute,
    fwd: Forwarded,
) -> Response<ProxyBody> {
    let gw = cx.gw;
    let Forwarded {
        resp,
        guard,
        deadline,
    } = fwd;
    let tap = cx
        .reservation
        .0
        .take()
        .map(|r| Box::new(UsageTap::new(gw, route, cx.client(), r, &resp)) as Box<dyn BodyTap>);
    let (mut parts, body) = resp.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers, false);
    if let Some(edits) = route
        .filters
        .as_ref()
        .and_then(|f| f.response_headers.as_ref())
    {
        edits.apply(&mut parts.headers);
    }
    if let Some(cors) = &route.cors {
        super::cors::response_headers(cors, cx.origin.take(), &mut parts.headers);
    }
    parts.version = cx.head.version;
    let is_stream = route.protocol == Protocol::Sse
        || parts
            .headers
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    let mut body = body
        .with_idle_timeout(route.timeouts.idle)
        .with_deadline(deadline)
        .with_guard(Box::new(guard))
        .with_tap(tap);
    if is_stream {
        let g = gw.metrics.streams_active.with_label_values(&["sse"]);
        g.inc();
        body = body.with_guard(Box::new(GaugeGuard(g)));
        if let Some(c) = &cx.caller {
            body = body.with_revocation(Some(revocation(gw.clone(), c)));
        }
        // Tell intermediaries not to buffer the stream.
        parts
            .headers
            .insert("x-accel-buffering", HeaderValue::from_static("no"));
    }
    if let Some(l) = &cx.rate_headers {
        l.write(&mut parts.headers, false);
    }
    Response::from_parts(parts, body)
}

/// Turns the outcome of the phases into the answer, and counts and logs it.
pub(crate) fn finish(
    cx: &RequestCtx<'_>,
    answer: Result<Response<ProxyBody>, ProxyError>,
) -> Response<ProxyBody> {
    let mut resp = answer.unwrap_or_else(|e| error_response(&e, &cx.request_id));
    resp.headers_mut()
        .insert(&X_REQUEST_ID, cx.request_id.clone());
    let status = resp.status();
    let route = cx.outcome.route.as_deref().unwrap_or("");
    let method = cx.head.method.as_str();
    let elapsed = cx.started.elapsed();
    let m = &cx.gw.metrics;
    m.requests_total
        .with_label_values(&[route, method, status.as_str()])
        .inc();
    if !route.is_empty() {
        m.request_duration
            .with_label_values(&[route])
            .observe(elapsed.as_secs_f64());
    }
    if let (Some(c), Some(client)) = (&m.client_requests_total, &cx.outcome.client) {
        c.with_label_values(&[client, route, status.as_str()]).inc();
    }
    if let Some(mcp) = &cx.outcome.mcp {
        tracing::info!(
            target: "tollgate::access",
            request_id = cx.request_id.to_str().unwrap_or(""),
            method,
            route,
            status = status.as_u16(),
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            upstream = cx.outcome.upstream.as_deref().unwrap_or(""),
            client_id = cx.outcome.client.as_deref().unwrap_or(""),
            remote = %cx.conn.remote.ip(),
            mcp_method = mcp.0,
            mcp_tool = mcp.1.as_deref().unwrap_or(""),
        );
        return resp;
    }
    tracing::info!(
        target: "tollgate::access",
        request_id = cx.request_id.to_str().unwrap_or(""),
        method,
        route,
        status = status.as_u16(),
        duration_ms = elapsed.as_secs_f64() * 1000.0,
        upstream = cx.outcome.upstream.as_deref().unwrap_or(""),
        client_id = cx.outcome.client.as_deref().unwrap_or(""),
        remote = %cx.conn.remote.ip(),
    );
    resp
}

/// A JSON error answer.
pub(crate) fn error_response(e: &ProxyError, request_id: &HeaderValue) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::full(e.body(request_id.to_str().unwrap_or(""))));
    *resp.status_mut() = e.status();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    match e {
        ProxyError::MethodNotAllowed(allow) => {
            h.insert(header::ALLOW, allow.clone());
        }
        ProxyError::RateLimited(l) | ProxyError::TokenLimited(l) => l.write(h, true),
        _ => {}
    }
    if e.status() == StatusCode::UNAUTHORIZED {
        h.insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"tollgate\""),
        );
    }
    resp
}

/// Watches a response for the upstream's reported `usage` and settles the token reservation
/// when it ends, without holding a byte back.
struct UsageTap {
    observer: Option<UsageObserver>,
    reservation: Option<TokenReservation>,
    limiter: Arc<crate::ratelimit::RateLimiter>,
    client: Arc<str>,
    route: Arc<str>,
    prompt: prometheus::IntCounter,
    completion: prometheus::IntCounter,
}

impl UsageTap {
    fn new(
        gw: &Gateway,
        route: &CompiledRoute,
        client: &str,
        reservation: TokenReservation,
        resp: &Response<ProxyBody>,
    ) -> Self {
        let compressed = resp
            .headers()
            .get(header::CONTENT_ENCODING)
            .is_some_and(|v| v.as_bytes() != b"identity");
        let ctype = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok());
        Self {
            observer: Some(if compressed {
                UsageObserver::off()
            } else {
                UsageObserver::for_content_type(ctype)
            }),
            reservation: Some(reservation),
            limiter: gw.limiter.clone(),
            client: Arc::from(client),
            route: route.id.clone(),
            prompt: gw
                .metrics
                .tokens_total
                .with_label_values(&[&route.id, "prompt"]),
            completion: gw
                .metrics
                .tokens_total
                .with_label_values(&[&route.id, "completion"]),
        }
    }
}

impl BodyTap for UsageTap {
    fn on_data(&mut self, data: &[u8]) {
        if let Some(o) = &mut self.observer {
            o.observe(data);
        }
    }

    fn on_end(&mut self, _complete: bool) {
        let usage = self.observer.take().and_then(UsageObserver::finish);
        let Some(reservation) = self.reservation.take() else {
            return;
        };
        match usage {
            Some(u) => {
                self.prompt.inc_by(u.prompt_tokens);
                self.completion.inc_by(u.completion_tokens);
                self.limiter.completion_stats().record(
                    &self.client,
                    Some(&self.route),
                    u.completion_tokens,
                );
                // Upstream-reported numbers: saturate rather than overflow (a wrapped sum would
                // undercharge the budget).
                let total = u
                    .total_tokens
                    .max(u.prompt_tokens.saturating_add(u.completion_tokens));
                reservation.settle(total);
            }
            // No usage reported (an error, a client gone mid-stream): the reservation stands.
            None => drop(reservation),
        }
    }
}
