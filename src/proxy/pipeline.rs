//! The per-request pipeline, in api.md's order: match (404/405) → CORS preflight → authenticate
//! (401) → authorise (403) → request limits → token limits → upstream (timeouts, retries, streams).
//! Every phase reads only the snapshot the request started with.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::body::{BodyTap, ProxyBody};
use super::error::{LimitHeaders, ProxyError};
use super::headers::{self, X_API_KEY, X_CLIENT_ID, X_REQUEST_ID};
use super::upstream::{Connect, Lease, TlsTarget};
use super::Gateway;
use crate::api::{LoadBalancer, Protocol, Sticky};
use crate::auth::external::Refusal;
use crate::auth::keys::{KeyEntry, SecretString};
use crate::balance::endpoints::{InFlightGuard, LbPolicy};
use crate::balance::health::FailureKind;
use crate::balance::weighted::CanaryMode;
use crate::config::route::{BackendTarget, CompiledBackend, CompiledRoute};
use crate::config::table::BodyFields;
use crate::config::{path, Match, Snapshot};
use crate::ratelimit::{
    BucketSpec, Decision, TokenBudgetSpec, TokenDecision, TokenReservation, UsageObserver,
};

/// Facts about the client connection.
#[derive(Clone, Copy, Debug)]
pub struct ConnInfo {
    pub remote: SocketAddr,
    pub tls: bool,
}

/// What the access log and metrics need once a request is answered.
struct Outcome {
    route: Option<Arc<str>>,
    upstream: Option<Arc<str>>,
    client: Option<Arc<str>>,
}

/// Serves one request end to end. Never fails: errors become JSON answers.
pub async fn handle(
    gw: Arc<Gateway>,
    req: Request<Incoming>,
    conn: ConnInfo,
) -> Response<ProxyBody> {
    let start = Instant::now();
    let snap = gw.snapshot();
    let request_id = headers::request_id(req.headers());
    let method = req.method().clone();
    let mut outcome = Outcome {
        route: None,
        upstream: None,
        client: None,
    };
    let mut resp = match serve(&gw, &snap, req, conn, &request_id, &mut outcome).await {
        Ok(r) => r,
        Err(e) => error_response(&e, &request_id),
    };
    resp.headers_mut().insert(&X_REQUEST_ID, request_id.clone());

    let status = resp.status();
    let route_label = outcome.route.as_deref().unwrap_or("");
    let m = &gw.metrics;
    m.requests_total
        .with_label_values(&[route_label, method.as_str(), status.as_str()])
        .inc();
    if !route_label.is_empty() {
        m.request_duration
            .with_label_values(&[route_label])
            .observe(start.elapsed().as_secs_f64());
    }
    if let (Some(c), Some(client)) = (&m.client_requests_total, &outcome.client) {
        c.with_label_values(&[client, route_label, status.as_str()])
            .inc();
    }
    tracing::info!(
        target: "tollgate::access",
        request_id = request_id.to_str().unwrap_or(""),
        method = method.as_str(),
        route = route_label,
        status = status.as_u16(),
        duration_ms = start.elapsed().as_secs_f64() * 1000.0,
        upstream = outcome.upstream.as_deref().unwrap_or(""),
        client_id = outcome.client.as_deref().unwrap_or(""),
        remote = %conn.remote.ip(),
    );
    resp
}

/// A JSON error answer.
pub fn error_response(e: &ProxyError, request_id: &HeaderValue) -> Response<ProxyBody> {
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
    if matches!(
        e,
        ProxyError::MissingKey | ProxyError::InvalidKey | ProxyError::ExpiredKey
    ) {
        h.insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"tollgate\""),
        );
    }
    resp
}

/// The request's host, lower-case, without userinfo, port or trailing dot (absolute-form URI
/// first, else `Host`); empty when there is none.
pub fn host_of(parts: &http::request::Parts) -> Cow<'_, str> {
    let raw = parts
        .uri
        .authority()
        .map(|a| a.as_str())
        .or_else(|| {
            parts
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
        })
        .unwrap_or("");
    // Strip userinfo (absolute-form), a port (not inside an IPv6 literal), a trailing dot.
    let raw = raw.rsplit_once('@').map_or(raw, |(_, h)| h);
    let host = if let Some(rest) = raw.strip_prefix('[') {
        rest.split(']').next().unwrap_or(rest)
    } else {
        raw.rsplit_once(':').map_or(raw, |(h, _)| h)
    };
    let host = host.trim_end_matches('.');
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    }
}

/// `Allow` of a route that names no methods, when CONNECT is refused.
const ALL_BUT_CONNECT: &str = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS, TRACE";

/// Where the presented key came from (the carrier is removed before forwarding).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyCarrier {
    Header,
    Bearer,
    Query,
}

/// The presented API key and its carrier: `X-API-Key`, else `Authorization: Bearer`, else (on a
/// WebSocket handshake only) the `api_key` query parameter, percent-decoded.
pub fn extract_key(
    parts: &http::request::Parts,
    websocket: bool,
) -> Option<(Cow<'_, [u8]>, KeyCarrier)> {
    if let Some(v) = parts.headers.get(&X_API_KEY) {
        return Some((Cow::Borrowed(v.as_bytes().trim_ascii()), KeyCarrier::Header));
    }
    if let Some(v) = parts.headers.get(header::AUTHORIZATION) {
        let b = v.as_bytes();
        if b.len() > 7 && b[..7].eq_ignore_ascii_case(b"bearer ") {
            return Some((Cow::Borrowed(b[7..].trim_ascii()), KeyCarrier::Bearer));
        }
    }
    if websocket {
        let q = parts.uri.query()?;
        for pair in q.split('&') {
            if let Some(v) = pair.strip_prefix("api_key=") {
                return Some((Cow::Owned(percent_decode(v)), KeyCarrier::Query));
            }
        }
    }
    None
}

fn percent_decode(s: &str) -> Vec<u8> {
    // Byte-wise: the query may hold UTF-8, so slicing the `str` at `i + 3` could split a char.
    let b = s.as_bytes();
    let hex = |c: u8| (c as char).to_digit(16);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            if let (Some(h), Some(l)) = (
                b.get(i + 1).and_then(|&c| hex(c)),
                b.get(i + 2).and_then(|&c| hex(c)),
            ) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    out
}

/// Drops `api_key=...` from a query string (it must never reach a backend).
fn strip_api_key_param(q: &str) -> String {
    q.split('&')
        .filter(|p| !p.starts_with("api_key=") && !p.is_empty())
        .collect::<Vec<_>>()
        .join("&")
}

fn content_length(h: &http::HeaderMap) -> Option<u64> {
    h.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

fn check_content_length(h: &http::HeaderMap, max: u64) -> Result<(), ProxyError> {
    match content_length(h) {
        Some(n) if n > max => Err(ProxyError::PayloadTooLarge),
        _ => Ok(()),
    }
}

async fn read_body_capped(body: ProxyBody, cap: u64) -> Result<Bytes, ProxyError> {
    match body.with_limit(cap).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(super::body::BodyError::TooLarge) => Err(ProxyError::PayloadTooLarge),
        Err(_) => Err(ProxyError::BadRequest),
    }
}

fn body_fields(bytes: &[u8]) -> BodyFields {
    match serde_json::from_slice::<serde_json::Value>(bytes) {
        Ok(serde_json::Value::Object(m)) => m,
        _ => BodyFields::new(),
    }
}

/// The authenticated caller.
pub struct Caller {
    pub key: Arc<KeyEntry>,
    pub digest: crate::auth::keys::KeyDigest,
    /// The plain key, kept (redacted in Debug) only while a request or stream of a caller
    /// admitted by the external auth service is open, so a long stream can ask again when the
    /// cached answer expires. `None` for keys of the key store.
    pub external: Option<SecretString>,
}

/// Finds the caller behind the presented key: the key store first, then (for a key it does not
/// know, when `--ext-auth-url` is set) the external auth service. Keys the auth service admits
/// are not bound to a namespace: they pass on any route whose roles they hold. A failing auth
/// service refuses with 503 `auth_unavailable` on routes that require a key (fail closed); on
/// routes that do not, an unknown or unverifiable key leaves the caller anonymous.
async fn authenticate(
    gw: &Gateway,
    snap: &Snapshot,
    route: &CompiledRoute,
    parts: &http::request::Parts,
    websocket: bool,
) -> Result<(Option<Caller>, Option<KeyCarrier>), ProxyError> {
    let presented = extract_key(parts, websocket);
    let Some((plain, carrier)) = presented else {
        if route.auth.required {
            gw.metrics
                .auth_failures_total
                .with_label_values(&["missing_key"])
                .inc();
            return Err(ProxyError::MissingKey);
        }
        return Ok((None, None));
    };
    let digest = crate::auth::keys::digest(&plain);
    let fail = |e: ProxyError| {
        gw.metrics
            .auth_failures_total
            .with_label_values(&[e.code()])
            .inc();
        Err(e)
    };
    let (key, external) = match snap.keys.get(&digest) {
        Some(key) => (key.clone(), None),
        None => {
            let Some(ext) = &gw.ext_auth else {
                if route.auth.required {
                    return fail(ProxyError::InvalidKey);
                }
                return Ok((None, Some(carrier)));
            };
            // Only a non-empty UTF-8 key can be sent as a JSON string.
            let verdict = match std::str::from_utf8(&plain) {
                Ok(text) if !text.is_empty() => {
                    let secret = SecretString::new(text);
                    ext.lookup(&secret).await.map(|key| (key, secret))
                }
                _ => Err(Refusal::Invalid),
            };
            match verdict {
                Ok((key, secret)) => (key, Some(secret)),
                Err(_) if !route.auth.required => return Ok((None, Some(carrier))),
                Err(Refusal::Invalid) => return fail(ProxyError::InvalidKey),
                Err(Refusal::Unavailable(_)) => return fail(ProxyError::AuthUnavailable),
            }
        }
    };
    if key.expired_at(jiff::Timestamp::now().as_second()) {
        return fail(ProxyError::ExpiredKey);
    }
    if route.auth.required {
        if external.is_none()
            && !route
                .auth
                .admits_namespace(&route.namespace, &key.namespace)
        {
            return fail(ProxyError::NamespaceForbidden);
        }
        if !key.has_any_role(&route.auth.roles) {
            return fail(ProxyError::Forbidden);
        }
    }
    Ok((
        Some(Caller {
            key,
            digest,
            external,
        }),
        Some(carrier),
    ))
}

fn preflight_response(
    cors: &crate::config::route::CompiledCors,
    origin: Option<&HeaderValue>,
) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::empty());
    *resp.status_mut() = StatusCode::NO_CONTENT;
    let h = resp.headers_mut();
    if let Some(origin) = origin.filter(|o| o.to_str().is_ok_and(|o| cors.allows_origin(o))) {
        h.insert(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            if cors.any_origin {
                HeaderValue::from_static("*")
            } else {
                origin.clone()
            },
        );
        if let Some(v) = &cors.allow_methods {
            h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, v.clone());
        }
        if let Some(v) = &cors.allow_headers {
            h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, v.clone());
        }
        if let Some(v) = &cors.max_age {
            h.insert(header::ACCESS_CONTROL_MAX_AGE, v.clone());
        }
        if cors.allow_credentials {
            h.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
    }
    h.insert(header::VARY, HeaderValue::from_static("Origin"));
    resp
}

fn cors_response_headers(
    cors: &crate::config::route::CompiledCors,
    origin: Option<&HeaderValue>,
    h: &mut http::HeaderMap,
) {
    let Some(origin) = origin.filter(|o| o.to_str().is_ok_and(|o| cors.allows_origin(o))) else {
        return;
    };
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        if cors.any_origin {
            HeaderValue::from_static("*")
        } else {
            origin.clone()
        },
    );
    if let Some(v) = &cors.expose_headers {
        h.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, v.clone());
    }
    if cors.allow_credentials {
        h.insert(
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
    }
    h.append(header::VARY, HeaderValue::from_static("Origin"));
}

async fn serve(
    gw: &Arc<Gateway>,
    snap: &Arc<Snapshot>,
    req: Request<Incoming>,
    conn: ConnInfo,
    request_id: &HeaderValue,
    outcome: &mut Outcome,
) -> Result<Response<ProxyBody>, ProxyError> {
    let started = tokio::time::Instant::now();
    let (mut parts, body) = req.into_parts();
    let mut body = ProxyBody::incoming(body);
    let path = path::normalize(parts.uri.path()).map_err(|_| ProxyError::BadRequest)?;
    // RFC 9112 §3.2: an HTTP/1.1 request with no Host, or more than one, is a 400, so host-based
    // routing never has to guess which Host was meant.
    let hosts = parts.headers.get_all(header::HOST).iter().count();
    if hosts > 1 || (hosts == 0 && parts.version == Version::HTTP_11) {
        return Err(ProxyError::BadRequest);
    }
    // Borrowed: its last use is before the headers are rewritten for the upstream.
    let host = host_of(&parts);

    // CORS preflight matches as the method it announces.
    let preflight = parts.method == Method::OPTIONS
        && parts.headers.contains_key(header::ORIGIN)
        && parts
            .headers
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    let match_method = if preflight {
        parts
            .headers
            .get(header::ACCESS_CONTROL_REQUEST_METHOD)
            .and_then(|m| Method::from_bytes(m.as_bytes()).ok())
            .unwrap_or(Method::OPTIONS)
    } else {
        parts.method.clone()
    };

    // 1. Match. A bodyField route needs the (capped) body first.
    let mut buffered: Option<Bytes> = None;
    let found = snap
        .routes
        .find(&host, &path, &match_method, &parts.headers, None);
    let route: Arc<CompiledRoute> = match found {
        Match::Route(r) => r.clone(),
        Match::MethodNotAllowed(allow) => return Err(ProxyError::MethodNotAllowed(allow)),
        Match::NotFound => return Err(ProxyError::NoRoute),
        Match::NeedBody => {
            check_content_length(&parts.headers, gw.options.max_body_bytes)?;
            // The body is forwarded from this buffer, so `max_body_bytes` must bind here too
            // (a chunked body has no Content-Length for the check above).
            let cap = gw.options.max_inspect_bytes.min(gw.options.max_body_bytes);
            let bytes = read_body_capped(body, cap).await?;
            body = ProxyBody::full(bytes.clone());
            let fields = body_fields(&bytes);
            buffered = Some(bytes);
            match snap
                .routes
                .find(&host, &path, &match_method, &parts.headers, Some(&fields))
            {
                Match::Route(r) => r.clone(),
                Match::MethodNotAllowed(allow) => return Err(ProxyError::MethodNotAllowed(allow)),
                Match::NotFound | Match::NeedBody => return Err(ProxyError::NoRoute),
            }
        }
    };
    outcome.route = Some(route.id.clone());
    // CONNECT asks for a tunnel, which a reverse proxy never opens (even on a route admitting
    // every method): 405 with what the route does allow.
    if parts.method == Method::CONNECT {
        return Err(ProxyError::MethodNotAllowed(
            route
                .methods
                .allow
                .clone()
                .unwrap_or_else(|| HeaderValue::from_static(ALL_BUT_CONNECT)),
        ));
    }

    // 2. CORS preflight: answered here, never forwarded.
    let origin = parts.headers.get(header::ORIGIN).cloned();
    if preflight {
        if let Some(cors) = &route.cors {
            return Ok(preflight_response(cors, origin.as_ref()));
        }
    }

    // 3-4. Authenticate and authorise.
    let websocket = route.protocol == Protocol::Websocket;
    let is_upgrade = headers::is_websocket_upgrade(&parts.headers);
    let (caller, carrier) = authenticate(gw, snap, &route, &parts, websocket && is_upgrade).await?;
    outcome.client = caller.as_ref().map(|c| c.key.client_id.clone());

    // 5. Request limits, then 6. token budgets. An anonymous caller is limited by address, and
    // only limits read `client`: no formatting (or allocation) for a route without any.
    let client: Cow<'_, str> = match &caller {
        Some(c) => Cow::Borrowed(&*c.key.client_id),
        None if route.rate_limit.is_some() => Cow::Owned(format!(
            "ip:{}",
            headers::IpText::new(conn.remote.ip()).as_str()
        )),
        None => Cow::Borrowed(""),
    };
    let rate_headers = check_request_limits(gw, &route, caller.as_ref(), &client).await?;
    check_content_length(&parts.headers, gw.options.max_body_bytes)?;
    let mut reservation = ReservationGuard(None);
    let key_tpm = caller.as_ref().and_then(|c| c.key.limits.tokens_per_minute);
    let route_tpm = route.rate_limit.as_ref().and_then(|r| r.tokens_per_minute);
    if (key_tpm.is_some() || route_tpm.is_some()) && !websocket {
        let estimate = match content_length(&parts.headers) {
            Some(n) if n > gw.options.max_inspect_bytes => {
                // Too large to inspect: ~4 bytes a token, plus the usual completion size.
                n / 4
                    + gw.limiter
                        .completion_stats()
                        .estimate(&client, Some(&route.id))
            }
            _ => {
                let bytes = match buffered.take() {
                    Some(b) => b,
                    None => read_body_capped(body, gw.options.max_inspect_bytes).await?,
                };
                body = ProxyBody::full(bytes.clone());
                let est = gw.limiter.estimate_tokens(&client, Some(&route.id), &bytes);
                buffered = Some(bytes);
                est
            }
        };
        let key_budget = key_tpm.map(|tpm| TokenBudgetSpec {
            client: &client,
            route: None,
            per_minute: tpm,
        });
        let route_budget = route_tpm.map(|tpm| TokenBudgetSpec {
            client: &client,
            route: Some(&route.id),
            per_minute: tpm,
        });
        let reserved = match (key_budget, route_budget) {
            (Some(a), Some(b)) => gw.limiter.reserve_tokens(&[a, b], estimate).await,
            (Some(a), None) | (None, Some(a)) => gw.limiter.reserve_tokens(&[a], estimate).await,
            (None, None) => Ok(TokenReservation::unlimited()),
        };
        match reserved {
            Ok(r) => reservation.0 = Some(r),
            Err(TokenDecision::Limited {
                info,
                retry_after_secs,
            }) => {
                gw.metrics
                    .rate_limited_total
                    .with_label_values(&[&route.id, "tokens"])
                    .inc();
                return Err(ProxyError::TokenLimited(LimitHeaders {
                    limit: info.limit,
                    remaining: info.remaining,
                    reset_secs: info.reset_secs,
                    retry_after_secs,
                }));
            }
        }
    }

    // The host as the client sent it, port included (what Envoy and nginx's $http_host pass).
    // Read before the headers change below (none of those changes touches Host).
    let sent_host = parts
        .uri
        .authority()
        .map(|a| HeaderValue::from_str(a.as_str()).ok())
        .unwrap_or_else(|| parts.headers.get(header::HOST).cloned())
        .or_else(|| HeaderValue::from_str(&host).ok());

    // Request headers toward the upstream.
    let h = &mut parts.headers;
    headers::strip_hop_by_hop(h, websocket && is_upgrade);
    match carrier {
        Some(KeyCarrier::Header) => {
            h.remove(&X_API_KEY);
        }
        Some(KeyCarrier::Bearer) => {
            h.remove(header::AUTHORIZATION);
        }
        _ => {}
    }
    h.remove(&X_API_KEY);
    h.remove(&X_CLIENT_ID);
    if let Some(c) = &caller {
        if let Ok(v) = HeaderValue::from_str(&c.key.client_id) {
            h.insert(&X_CLIENT_ID, v);
        }
    }
    h.insert(&X_REQUEST_ID, request_id.clone());
    let tp = headers::traceparent(h);
    h.insert(&headers::TRACEPARENT, tp);
    headers::forwarded_for(h, conn.remote.ip(), gw.options.trust_forwarded);
    h.insert(
        &headers::X_FORWARDED_PROTO,
        HeaderValue::from_static(if conn.tls { "https" } else { "http" }),
    );
    if let Some(v) = sent_host {
        if !v.is_empty() {
            parts.headers.insert(&headers::X_FORWARDED_HOST, v);
        }
    }

    // The forwarded path and query.
    let fwd_path = route.rewrite_path(&path);
    let query = match parts.uri.query() {
        Some(q) if carrier == Some(KeyCarrier::Query) => {
            let q = strip_api_key_param(q);
            (!q.is_empty()).then_some(q)
        }
        Some(q) => Some(q.to_string()),
        None => None,
    };

    if websocket {
        if !is_upgrade {
            return Err(ProxyError::UpgradeRequired);
        }
        let picked = pick_upstream(gw, snap, &route, &parts.headers, caller.as_ref(), &[])?;
        outcome.upstream = Some(picked.backend.id.clone());
        let uri = upstream_uri(picked.backend, &fwd_path, query.as_deref())?;
        // Boxed: the relay's future is large and rare; inline it would grow every request's
        // future (and the per-connection slot hyper keeps for it) by ~4 KiB.
        return Box::pin(super::websocket::proxy(
            gw, &route, parts, uri, picked, caller, started,
        ))
        .await;
    }

    // Keep small bodies so a retry can replay them.
    let max_attempts = route.retry.attempts.max(1);
    let mut replay: Option<Bytes> = buffered;
    if replay.is_none() {
        if body.is_end_stream() {
            replay = Some(Bytes::new());
        } else if max_attempts > 1 {
            if let Some(n) = content_length(&parts.headers) {
                if n <= gw.options.replay_limit_bytes {
                    replay = Some(read_body_capped(body, n).await?);
                    body = ProxyBody::empty();
                }
            }
        }
    }
    let attempts = if replay.is_some() { max_attempts } else { 1 };
    let mut streaming_body = Some(body.with_limit(gw.options.max_body_bytes));

    let deadline = route.timeouts.request.map(|d| started + d);
    let mut last_err = ProxyError::UpstreamFailed;
    // Only filled when another attempt may follow (no allocation for a single attempt).
    let mut tried: Vec<SocketAddr> = Vec::new();
    for attempt in 1..=attempts {
        if attempt > 1 && !route.retry.backoff.is_zero() {
            tokio::time::sleep(route.retry.backoff).await;
        }
        let body = match &replay {
            Some(b) => ProxyBody::full(b.clone()),
            None => streaming_body.take().unwrap_or_else(ProxyBody::empty),
        };
        let picked = pick_upstream(gw, snap, &route, &parts.headers, caller.as_ref(), &tried)?;
        let backend = picked.backend;
        outcome.upstream = Some(backend.id.clone());
        let uri = upstream_uri(picked.backend, &fwd_path, query.as_deref())?;
        let mut up = Request::new(body);
        *up.method_mut() = parts.method.clone();
        *up.uri_mut() = uri;
        *up.version_mut() = Version::HTTP_11;
        // The last attempt takes the headers; only an attempt that may be retried copies them.
        *up.headers_mut() = if attempt == attempts {
            std::mem::take(&mut parts.headers)
        } else {
            parts.headers.clone()
        };
        up.headers_mut()
            .insert(header::HOST, backend.authority.clone());
        let mut guard = picked.guard;
        let connect = picked.connect;
        if attempt < attempts {
            tried.push(guard.endpoint.addr());
        }

        let wait = match (route.timeouts.first_byte, deadline) {
            (Some(fb), Some(dl)) => Some((tokio::time::Instant::now() + fb).min(dl)),
            (Some(fb), None) => Some(tokio::time::Instant::now() + fb),
            (None, Some(dl)) => Some(dl),
            (None, None) => None,
        };
        let sent = match wait {
            Some(at) => match tokio::time::timeout_at(at, gw.upstream.send(&connect, up)).await {
                Ok(r) => r,
                Err(_) => Err(ProxyError::Timeout),
            },
            None => gw.upstream.send(&connect, up).await,
        };
        let outcome_label = |o: &str| {
            gw.metrics
                .upstream_requests_total
                .with_label_values(&[&route.id, &backend.id, o])
                .inc()
        };
        match sent {
            Err(e) => {
                // A client's bad or oversized body is no fault of the endpoint: counting it
                // would let a client eject healthy endpoints with a few broken uploads.
                let client_fault =
                    matches!(e, ProxyError::BadRequest | ProxyError::PayloadTooLarge);
                outcome_label(match e {
                    ProxyError::ConnectFailed => "connect_failure",
                    ProxyError::Timeout => "timeout",
                    _ if client_fault => "client_error",
                    _ => "error",
                });
                if !client_fault {
                    guard.endpoint.failure(match e {
                        ProxyError::ConnectFailed => FailureKind::Connect,
                        ProxyError::Timeout => FailureKind::Timeout,
                        _ => FailureKind::ServerError,
                    });
                }
                // `connect-failure` covers every connection that failed before a response:
                // one that could not be opened (nothing was sent: any method), and one that
                // broke before the response head, like an endpoint killed mid-request (it may
                // have acted on the request: only methods safe to repeat, RFC 9110 §9.2.2, as
                // nginx's `proxy_next_upstream error` does). R3: no client error for those.
                let retry = route.retry.on_connect_failure
                    && match e {
                        ProxyError::ConnectFailed => true,
                        ProxyError::UpstreamFailed => parts.method.is_idempotent(),
                        _ => false,
                    };
                last_err = e;
                if retry && attempt < attempts {
                    continue;
                }
                return Err(last_err);
            }
            Ok((resp, lease)) => {
                guard.conn = Some(lease);
                let status = resp.status().as_u16();
                if status >= 500 {
                    guard.endpoint.failure(FailureKind::ServerError);
                } else {
                    guard.endpoint.success();
                }
                if route.retry.retries_status(status) && attempt < attempts {
                    outcome_label("retried");
                    continue;
                }
                outcome_label(if status >= 500 { "5xx" } else { "success" });
                let tap = reservation.0.take().map(|r| {
                    Box::new(UsageTap::new(gw, &route, &client, r, &resp)) as Box<dyn BodyTap>
                });
                let mut resp = finish_response(
                    gw,
                    &route,
                    resp,
                    parts.version,
                    origin.as_ref(),
                    deadline,
                    guard,
                    caller,
                    tap,
                );
                if let Some(l) = &rate_headers {
                    l.write(resp.headers_mut(), false);
                }
                return Ok(resp);
            }
        }
    }
    Err(last_err)
}

/// Checks the key's and the route's request buckets (all or none consume).
async fn check_request_limits(
    gw: &Gateway,
    route: &CompiledRoute,
    caller: Option<&Caller>,
    client: &str,
) -> Result<Option<LimitHeaders>, ProxyError> {
    let key_bucket = caller.map(|c| BucketSpec {
        client,
        route: None,
        per_minute: c.key.limits.requests_per_minute,
        burst: c.key.limits.burst,
    });
    let route_bucket = route.rate_limit.as_ref().and_then(|r| {
        r.requests_per_minute.map(|rpm| BucketSpec {
            client,
            route: Some(&route.id),
            per_minute: rpm,
            burst: r.burst.unwrap_or(rpm),
        })
    });
    let decision = match (key_bucket, route_bucket) {
        (Some(a), Some(b)) => gw.limiter.check_requests(&[a, b]).await,
        (Some(a), None) | (None, Some(a)) => gw.limiter.check_requests(&[a]).await,
        (None, None) => return Ok(None),
    };
    match decision {
        Decision::Allowed(info) => Ok(Some(LimitHeaders {
            limit: info.limit,
            remaining: info.remaining,
            reset_secs: info.reset_secs,
            retry_after_secs: 0,
        })),
        Decision::Limited {
            info,
            retry_after_secs,
        } => {
            gw.metrics
                .rate_limited_total
                .with_label_values(&[&route.id, "requests"])
                .inc();
            Err(ProxyError::RateLimited(LimitHeaders {
                limit: info.limit,
                remaining: info.remaining,
                reset_secs: info.reset_secs,
                retry_after_secs,
            }))
        }
    }
}

/// Refunds a token reservation if the request never reached a response (the upstream did no
/// work); a response takes the reservation over in its `UsageTap`.
struct ReservationGuard(Option<TokenReservation>);

impl Drop for ReservationGuard {
    fn drop(&mut self) {
        if let Some(r) = self.0.take() {
            r.release();
        }
    }
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
        resp: &Response<Incoming>,
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

/// Decrements a gauge when dropped (rides inside response bodies).
pub struct GaugeGuard(pub prometheus::IntGauge);

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[allow(clippy::too_many_arguments)]
fn finish_response(
    gw: &Arc<Gateway>,
    route: &CompiledRoute,
    resp: Response<Incoming>,
    version: Version,
    origin: Option<&HeaderValue>,
    deadline: Option<tokio::time::Instant>,
    guard: UpstreamGuard,
    caller: Option<Caller>,
    tap: Option<Box<dyn BodyTap>>,
) -> Response<ProxyBody> {
    let (mut parts, body) = resp.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers, false);
    if let Some(cors) = &route.cors {
        cors_response_headers(cors, origin, &mut parts.headers);
    }
    parts.version = version;
    let is_stream = route.protocol == Protocol::Sse
        || parts
            .headers
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    let mut body = ProxyBody::incoming(body)
        .with_idle_timeout(route.timeouts.idle)
        .with_deadline(deadline)
        .with_guard(Box::new(guard))
        .with_tap(tap);
    if is_stream {
        let g = gw.metrics.streams_active.with_label_values(&["sse"]);
        g.inc();
        body = body.with_guard(Box::new(GaugeGuard(g)));
        if let Some(c) = caller {
            body = body.with_revocation(Some(revocation(gw.clone(), &c)));
        }
        // Tell intermediaries not to buffer the stream.
        parts
            .headers
            .insert("x-accel-buffering", HeaderValue::from_static("no"));
    }
    Response::from_parts(parts, body)
}

/// Completes when the key behind a stream is deleted, disabled or expired, checked every
/// `revalidate_interval` against the current snapshot. A key the external auth service admitted
/// stays valid until the service refuses it (its cached answer is reused; after the TTL the
/// service is asked again); an unavailable auth service does not cut established streams.
pub fn revocation(
    gw: Arc<Gateway>,
    caller: &Caller,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    let digest = caller.digest;
    let external = caller.external.clone();
    Box::pin(async move {
        let every = gw.options.revalidate_interval;
        loop {
            tokio::time::sleep(every).await;
            let in_store = gw
                .snapshot()
                .keys
                .get(&digest)
                .map(|k| !k.expired_at(jiff::Timestamp::now().as_second()));
            let valid = match (in_store, &external, &gw.ext_auth) {
                (Some(valid), _, _) => valid,
                (None, Some(key), Some(ext)) => {
                    !matches!(ext.lookup(key).await, Err(Refusal::Invalid))
                }
                (None, _, _) => false,
            };
            if !valid {
                tracing::info!("closing a stream whose API key is no longer valid");
                return;
            }
        }
    })
}

/// Counts a request against its backend and endpoint until its response body ends, and holds
/// the upstream connection until then (it goes back to its pool when the body has ended).
pub struct UpstreamGuard {
    pub endpoint: InFlightGuard,
    pub conn: Option<Lease>,
    _gauge: GaugeGuard,
}

/// The chosen backend and endpoint of one attempt.
pub struct Picked<'a> {
    pub backend: &'a CompiledBackend,
    /// Where to connect: the endpoint address, or the host name for `https` url backends
    /// (their certificate is checked against it).
    pub connect: Connect,
    pub guard: UpstreamGuard,
}

/// Picks a backend by weight (canary header, sticky client), then an endpoint of it by the
/// route's balancing policy, avoiding endpoints already tried when another exists.
pub fn pick_upstream<'a>(
    gw: &Gateway,
    snap: &Snapshot,
    route: &'a CompiledRoute,
    headers: &http::HeaderMap,
    caller: Option<&Caller>,
    tried: &[SocketAddr],
) -> Result<Picked<'a>, ProxyError> {
    let canary = route
        .canary_header
        .as_ref()
        .and_then(|n| headers.get(n))
        .map_or(CanaryMode::Default, |v| {
            CanaryMode::from_header_value(v.as_bytes())
        });
    let sticky = match route.sticky {
        Sticky::ClientId => caller.map(|c| &*c.key.client_id),
        Sticky::None => None,
    };
    let rng: u64 = rand::random();
    let idx = route
        .weighted
        .pick(canary, sticky, rng)
        .ok_or(ProxyError::NoEndpoint)?;
    let backend = route.backends.get(idx).ok_or(ProxyError::NoEndpoint)?;
    let set = snap
        .endpoints
        .get(&backend.id)
        .ok_or(ProxyError::NoEndpoint)?
        .load_full();
    let lb = match route.load_balancer {
        LoadBalancer::LeastConnections => LbPolicy::LeastConnections,
        LoadBalancer::RoundRobin => LbPolicy::RoundRobin,
        LoadBalancer::Random => LbPolicy::Random,
    };
    let (endpoint, guard) = set
        .pick_excluding(lb, rand::random(), tried)
        .ok_or(ProxyError::NoEndpoint)?;
    let addr = endpoint.addr;
    let gauge = gw
        .metrics
        .upstream_in_flight
        .with_label_values(&[&backend.id]);
    gauge.inc();
    let connect = match &backend.target {
        BackendTarget::Url {
            https: true,
            host,
            port,
            ..
        } => Connect::Tls(TlsTarget {
            host: host.clone(),
            port: *port,
        }),
        _ => Connect::Addr(addr),
    };
    Ok(Picked {
        backend,
        connect,
        guard: UpstreamGuard {
            endpoint: guard,
            conn: None,
            _gauge: GaugeGuard(gauge),
        },
    })
}

/// The origin-form request target toward the upstream (`/base/path?query`); the connection
/// and the `Host` header say where it goes.
fn upstream_uri(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_key_query_decoding_is_byte_wise() {
        // A '%' followed by a multi-byte character used to slice the str inside the character.
        assert_eq!(percent_decode("%a\u{e9}"), "%a\u{e9}".as_bytes());
        assert_eq!(percent_decode("%\u{e9}"), "%\u{e9}".as_bytes());
        assert_eq!(percent_decode("tg%2Dkey+1%zz%4"), b"tg-key 1%zz%4");
        assert_eq!(strip_api_key_param("a=1&api_key=x&&b=2"), "a=1&b=2");
    }
}

#[cfg(test)]
mod future_size {
    use super::*;

    fn size_of_future<A, B, C, F>(_: fn(A, B, C) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// hyper keeps a slot of this size per client connection for its whole life, and moves the
    /// future into it on every request (BENCHMARKS.md, P8 and the profile). Large, rare paths
    /// (the WebSocket relay, new upstream connections, Redis round trips) are boxed so they do
    /// not grow it: 7,184 bytes before they were, 3,808 after (rustc 1.95).
    #[test]
    fn the_request_future_stays_small() {
        let handle_size = size_of_future(handle);
        eprintln!("request future: {handle_size} bytes");
        assert!(
            handle_size <= 4608,
            "request future grew to {handle_size} bytes"
        );
    }
}
