//! Phase 7 on `protocol: mcp` routes (instead of plain `forward`): MCP Streamable HTTP. POST
//! (JSON or SSE answers), GET (the server's stream) and DELETE (end of session) go upstream with
//! the route's timeouts, the same as `sse` routes.
//!
//! - **Sessions (2025-11-25 and earlier).** The `Mcp-Session-Id` a server hands out is replaced
//!   by one the gateway seals ([`crate::mcp::session`]): it names the backend and endpoint the
//!   session lives on and carries the server's own id. A request with an id goes to that
//!   endpoint, on any replica with the keys; an id that does not open, or whose endpoint is no
//!   longer listed, is answered 404 with JSON-RPC error -32001, so the client starts anew.
//! - **Stateless (2026-07-28).** A request without a session id is balanced like any other and
//!   its body is not read. Where something already read the body (a `bodyField` match), its
//!   `Mcp-Method`/`Mcp-Name` headers must agree with it: else 400 (-32600), never forwarded.
//! - **Tool access** (`mcp.tools`, `denyUnlisted`). On routes with rules every POST body is
//!   read (up to the 1 MiB inspect limit; 413 above): a `tools/call` of a tool the caller's roles
//!   do not allow is answered 200 with JSON-RPC error -32003 and never forwarded; the answer to
//!   a `tools/list` is cut to the allowed tools as it passes (JSON whole, SSE event by event).

use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Response, StatusCode};

use super::forward::{self, Forwarded, Pin};
use super::respond;
use crate::config::route::CompiledRoute;
use crate::mcp::tools::{ListFilter, ToolVerdict};
use crate::mcp::{self, SessionTarget, ToolAccess};
use crate::proxy::body::{BodyError, BodyMap};
use crate::proxy::context::RequestCtx;
use crate::proxy::{ProxyBody, ProxyError};
use crate::ratelimit::{BucketSpec, Decision};

/// What the metrics of an MCP request say about it.
struct Seen {
    method: &'static str,
    tool: Option<String>,
    tool_forbidden: bool,
    tool_rate_limited: bool,
    session_refused: bool,
}

/// Serves one request of an MCP route, from the upstream or with the gateway's own JSON-RPC
/// answer, and counts it in `tollgate_mcp_requests_total` (and `_tool_calls_total`).
pub(crate) async fn run(
    cx: &mut RequestCtx<'_>,
    route: &CompiledRoute,
) -> Result<Response<ProxyBody>, ProxyError> {
    let h = &cx.head.headers;
    let mut seen = Seen {
        method: match (&cx.head.method, h.get(mcp::METHOD_HEADER)) {
            (&Method::GET, _) => "GET",
            (&Method::DELETE, _) => "DELETE",
            (_, Some(m)) => mcp::method_label(m.as_bytes()),
            _ => "unknown",
        },
        tool: h
            .get(mcp::NAME_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        tool_forbidden: false,
        tool_rate_limited: false,
        session_refused: false,
    };
    let answer = serve(cx, route, &mut seen).await;
    let status = match &answer {
        Ok(r) => r.status(),
        Err(e) => e.status(),
    };
    let outcome = if seen.tool_forbidden {
        "tool_forbidden"
    } else if seen.tool_rate_limited {
        "tool_rate_limited"
    } else if seen.session_refused {
        "session_not_found"
    } else if status.is_success() {
        "ok"
    } else if status.is_client_error() {
        "refused"
    } else {
        "error"
    };
    let m = &cx.gw.metrics;
    let tool_label = (seen.method == "tools/call")
        .then(|| seen.tool.as_deref().map(|t| m.mcp_tool_label(&route.id, t)))
        .flatten();
    if let Some(label) = &tool_label {
        m.mcp_tool_calls_total
            .with_label_values(&[&*route.id, label.as_str(), outcome])
            .inc();
    }
    cx.outcome.mcp = Some(Box::new((seen.method, tool_label)));
    m.mcp_requests_total
        .with_label_values(&[&*route.id, seen.method, outcome])
        .inc();
    answer
}

async fn serve(
    cx: &mut RequestCtx<'_>,
    route: &CompiledRoute,
    seen: &mut Seen,
) -> Result<Response<ProxyBody>, ProxyError> {
    let mut list_filter = None;
    if !matches!(cx.head.method, Method::POST | Method::GET | Method::DELETE) {
        return Err(ProxyError::MethodNotAllowed(HeaderValue::from_static(
            "GET, POST, DELETE",
        )));
    }
    // Tool rules and federation read the body, whatever the headers say.
    let reads_body = route.mcp_tools.is_some() || route.mcp_federation.is_some();
    if reads_body && cx.head.method == Method::POST {
        if let Err(e) = cx.body.buffer(cx.gw.options.max_inspect_bytes).await {
            return Ok(match e {
                ProxyError::PayloadTooLarge => jsonrpc_error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    None,
                    mcp::code::INVALID_REQUEST,
                    "Request body too large",
                ),
                other => return Err(other),
            });
        }
    }
    let message = match read_message(cx) {
        Err(refused) => return Ok(refused.answer()),
        Ok(m) => m,
    };
    if let Some(message) = &message {
        seen.method = mcp::method_label(message.method.as_deref().unwrap_or("").as_bytes());
        seen.tool.clone_from(&message.name);
        if let Some(access) = &route.mcp_tools {
            if let Some(refused) = tool_decision(cx, route, access, message, seen).await {
                return Ok(refused);
            }
            if message.method.as_deref() == Some("tools/list") {
                list_filter = Some(access.clone());
            }
        }
    }
    if let Some(fed) = &route.mcp_federation {
        return super::mcp_federation::serve(cx, route, fed, message, &mut seen.session_refused)
            .await;
    }
    let Some(client_id) = cx.head.headers.get(mcp::SESSION_HEADER).cloned() else {
        // No session (initialize, or a stateless request): balanced, a new session sealed.
        let mut fwd = forward::run(cx, route, None).await?;
        seal_new_session(cx, route, &mut fwd, None);
        filter_list(cx, &mut fwd, list_filter);
        return Ok(respond::upstream(cx, route, fwd));
    };
    let keys = cx.gw.mcp_keys(&cx.snap);
    let pinned = keys
        .open(&route.id, client_id.as_bytes())
        .and_then(|t| Some((live_endpoint(cx, route, &t)?, t)))
        .and_then(|(pin, t)| Some((pin, HeaderValue::from_str(&t.upstream_id).ok()?, t)));
    let Some((pin, upstream_id, target)) = pinned else {
        seen.session_refused = true;
        return Ok(session_not_found(cx).await);
    };
    cx.head.headers.insert(mcp::SESSION_HEADER, upstream_id);
    let mut fwd = forward::run(cx, route, Some(&pin)).await?;
    seal_new_session(cx, route, &mut fwd, Some((&target, client_id)));
    filter_list(cx, &mut fwd, list_filter);
    Ok(respond::upstream(cx, route, fwd))
}

/// The backend index and endpoint of a session, if the route still has that backend and
/// discovery still lists that endpoint.
fn live_endpoint(
    cx: &RequestCtx<'_>,
    route: &CompiledRoute,
    target: &SessionTarget,
) -> Option<Pin> {
    let backend = route
        .backends
        .iter()
        .position(|b| *b.id == *target.backend)?;
    let set = cx.snap.endpoints.get(&route.backends.get(backend)?.id)?;
    set.load().contains(target.endpoint).then_some(Pin {
        backend,
        endpoint: target.endpoint,
    })
}

/// Replaces the upstream's `Mcp-Session-Id` in its answer by the id the client sees: the one
/// the client sent when the session is the same, else one sealed now for the endpoint that
/// answered.
fn seal_new_session(
    cx: &RequestCtx<'_>,
    route: &CompiledRoute,
    fwd: &mut Forwarded,
    current: Option<(&SessionTarget, HeaderValue)>,
) {
    let headers = fwd.resp.headers_mut();
    let Some(upstream) = headers.get(mcp::SESSION_HEADER) else {
        return;
    };
    let Ok(upstream) = upstream.to_str() else {
        // Not visible ASCII, as the spec requires: the client gets no session id.
        headers.remove(mcp::SESSION_HEADER);
        return;
    };
    if let Some((target, client_id)) = current {
        if target.upstream_id == upstream {
            headers.insert(mcp::SESSION_HEADER, client_id);
            return;
        }
    }
    let target = SessionTarget {
        backend: cx.outcome.upstream.as_deref().unwrap_or("").to_string(),
        endpoint: fwd.guard.endpoint.addr(),
        upstream_id: upstream.to_string(),
    };
    let sealed = cx
        .gw
        .mcp_keys(&cx.snap)
        .seal(&route.id, &target)
        .and_then(|s| HeaderValue::from_str(&s).ok());
    match sealed {
        Some(v) => {
            headers.insert(mcp::SESSION_HEADER, v);
        }
        None => {
            headers.remove(mcp::SESSION_HEADER);
        }
    }
}

/// 404 with JSON-RPC error -32001 and the request's id when its body has one.
async fn session_not_found(cx: &mut RequestCtx<'_>) -> Response<ProxyBody> {
    let id = if cx.head.method == Method::POST {
        let cap = cx.gw.options.max_inspect_bytes;
        match cx.body.buffer(cap).await {
            Ok(b) => mcp::parse_message(b).ok().and_then(|m| m.id),
            Err(_) => None,
        }
    } else {
        None
    };
    jsonrpc_error(
        StatusCode::NOT_FOUND,
        id.as_ref(),
        mcp::code::SESSION_NOT_FOUND,
        "Session not found",
    )
}

/// When the body has been read (tool rules, a `bodyField` match), it must be one JSON-RPC
/// message that the `Mcp-Method`/`Mcp-Name` headers agree with: the message, or the refusal.
fn read_message(cx: &RequestCtx<'_>) -> Result<Option<mcp::Message>, Refusal> {
    if cx.head.method != Method::POST {
        return Ok(None);
    }
    let Some(body) = cx.body.buffered() else {
        return Ok(None);
    };
    let message = mcp::parse_message(body).map_err(|p| Refusal {
        id: None,
        code: p.code(),
        message: p.to_string(),
    })?;
    let h = &cx.head.headers;
    let method = h.get(mcp::METHOD_HEADER).map(HeaderValue::as_bytes);
    let name = h.get(mcp::NAME_HEADER).map(HeaderValue::as_bytes);
    if !mcp::headers_agree(&message, method, name) {
        return Err(Refusal {
            id: message.id,
            code: mcp::code::INVALID_REQUEST,
            message: "Invalid Request: Mcp-Method or Mcp-Name does not match the body".into(),
        });
    }
    Ok(Some(message))
}

/// A body the gateway refuses with 400 and a JSON-RPC error.
struct Refusal {
    id: Option<serde_json::Value>,
    code: i64,
    message: String,
}

impl Refusal {
    fn answer(&self) -> Response<ProxyBody> {
        jsonrpc_error(
            StatusCode::BAD_REQUEST,
            self.id.as_ref(),
            self.code,
            &self.message,
        )
    }
}

/// The caller's roles (none for an anonymous caller).
pub(super) fn caller_roles(cx: &RequestCtx<'_>) -> Arc<[Arc<str>]> {
    cx.caller
        .as_ref()
        .map_or_else(|| Arc::from([]), |c| c.key.roles.clone())
}

/// A `tools/call` of a tool the caller may not use, or has called too often: answered here,
/// HTTP 200 with JSON-RPC error -32003 (-32004 for the limit) for that call alone (its session
/// goes on), never forwarded.
async fn tool_decision(
    cx: &mut RequestCtx<'_>,
    route: &CompiledRoute,
    access: &ToolAccess,
    message: &mcp::Message,
    seen: &mut Seen,
) -> Option<Response<ProxyBody>> {
    if message.method.as_deref() != Some("tools/call") {
        return None;
    }
    let tool = message.name.as_deref().unwrap_or("");
    let limit = match access.verdict(tool, &caller_roles(cx)) {
        ToolVerdict::Forbidden => {
            seen.tool_forbidden = true;
            return Some(jsonrpc_error(
                StatusCode::OK,
                message.id.as_ref(),
                mcp::code::TOOL_FORBIDDEN,
                "Tool not allowed for this caller",
            ));
        }
        ToolVerdict::Allowed(None) => return None,
        ToolVerdict::Allowed(Some(limit)) => limit,
    };
    // Per client, per tool, per route: the bucket's route part names the tool too.
    let client = match &cx.caller {
        Some(c) => c.key.client_id.to_string(),
        None => format!(
            "ip:{}",
            crate::proxy::headers::IpText::new(cx.conn.remote.ip()).as_str()
        ),
    };
    let bucket = format!("{}\u{1f}tool:{tool}", route.id);
    let decision = cx
        .gw
        .limiter
        .check_requests(&[BucketSpec {
            client: &client,
            route: Some(&bucket),
            per_minute: limit.per_minute,
            burst: limit.burst,
        }])
        .await;
    let Decision::Limited {
        retry_after_secs, ..
    } = decision
    else {
        return None;
    };
    seen.tool_rate_limited = true;
    cx.gw
        .metrics
        .rate_limited_total
        .with_label_values(&[&route.id, "mcp_tool"])
        .inc();
    let body = serde_json::json!({
        "jsonrpc": "2.0",
        "id": message.id.clone().unwrap_or(serde_json::Value::Null),
        "error": {"code": mcp::code::TOOL_RATE_LIMITED,
                  "message": "Tool rate limit exceeded",
                  "data": {"retryAfterSeconds": retry_after_secs}},
    });
    let mut resp = Response::new(ProxyBody::full(body.to_string()));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Ok(v) = HeaderValue::from_str(&retry_after_secs.to_string()) {
        resp.headers_mut().insert(header::RETRY_AFTER, v);
    }
    Some(resp)
}

/// Cuts the answer to a `tools/list` to the tools the caller may use, JSON or SSE.
fn filter_list(cx: &RequestCtx<'_>, fwd: &mut Forwarded, access: Option<Arc<ToolAccess>>) {
    let Some(access) = access else {
        return;
    };
    let headers = fwd.resp.headers_mut();
    let sse = headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    // The filtered answer is shorter than the announced one.
    headers.remove(header::CONTENT_LENGTH);
    let max = usize::try_from(cx.gw.options.max_inspect_bytes).unwrap_or(usize::MAX);
    let filter = ListFilter::new(access, caller_roles(cx), sse, max);
    let body = std::mem::replace(fwd.resp.body_mut(), ProxyBody::empty());
    *fwd.resp.body_mut() = ProxyBody::mapped(body, Box::new(ListMap(filter)));
}

struct ListMap(ListFilter);

impl BodyMap for ListMap {
    fn data(&mut self, data: &[u8]) -> Result<Bytes, BodyError> {
        self.0
            .push(data)
            .map(Bytes::from)
            .map_err(|_| BodyError::TooLarge)
    }
    fn end(&mut self) -> Bytes {
        Bytes::from(self.0.finish())
    }
}

pub(super) fn jsonrpc_error(
    status: StatusCode,
    id: Option<&serde_json::Value>,
    code: i64,
    message: &str,
) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::full(mcp::error_body(id, code, message)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}
