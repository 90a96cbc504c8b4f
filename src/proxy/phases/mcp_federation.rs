//! The `mcp` phase on a federating route (every backend has an `mcp.prefix`): one endpoint in
//! front of several MCP servers.
//!
//! - `initialize` goes to every server; the session id the client gets seals each server's own
//!   session (and endpoint). `server/discover` and `tools/list` go to every server (of the
//!   session, when there is one) and their answers are merged, tools named `<prefix>__<tool>`.
//! - `tools/call` of `<prefix>__<tool>` goes to that server alone, as `<tool>`, its answer
//!   streamed back; a name no server has is answered here (-32602) and reaches no server.
//! - Notifications and DELETE reach every server of the session; `ping` is answered here; GET
//!   (a server stream) is 405, which clients take as "no stream"; other methods -32601.
//! - A server that does not answer is left out of merged answers, its calls fail as single
//!   calls (-32005), and it is counted in `tollgate_mcp_server_unavailable_total` and logged.

use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::BodyExt as _;
use serde_json::Value;

use super::forward::{self, Forwarded};
use super::mcp::{caller_roles, jsonrpc_error};
use super::respond;
use crate::balance::health::FailureKind;
use crate::config::route::CompiledRoute;
use crate::config::Snapshot;
use crate::mcp::federation::{self, Federation};
use crate::mcp::{self, SessionTarget};
use crate::proxy::context::RequestCtx;
use crate::proxy::outbound::{self, upstream_uri};
use crate::proxy::pick::{pick_in_backend, pick_pinned};
use crate::proxy::{Gateway, ProxyBody, ProxyError};
use tokio::time::Instant;

/// How long a fanned-out request may take when the route sets no `timeouts.request`.
const FANOUT_LIMIT: Duration = Duration::from_secs(30);

/// What the requests to servers need of the client's request: all `Sync`, so that several
/// can be in flight at once.
struct Env<'a> {
    gw: &'a Gateway,
    snap: &'a Snapshot,
    route: &'a CompiledRoute,
    path: String,
    query: Option<String>,
    deadline: Option<Instant>,
    sticky: Option<&'a str>,
    headers: &'a HeaderMap,
    method: Method,
}

impl<'a> Env<'a> {
    fn new(cx: &'a RequestCtx<'_>, route: &'a CompiledRoute) -> Self {
        Env {
            gw: cx.gw,
            snap: &cx.snap,
            route,
            path: forward::upstream_path(cx.normalized.as_deref(), &cx.head.uri, route)
                .into_owned(),
            query: outbound::query(&cx.head.uri, cx.carrier).map(|q| q.into_owned()),
            deadline: route.timeouts.request.map(|d| cx.started + d),
            sticky: match route.sticky {
                crate::api::Sticky::ClientId => cx.caller.as_ref().map(|c| &*c.key.client_id),
                crate::api::Sticky::None => None,
            },
            headers: &cx.head.headers,
            method: cx.head.method.clone(),
        }
    }
}

/// One server's part of a request: which server, and its session when there is one.
struct Part<'a> {
    prefix: &'a str,
    backend: usize,
    session: Option<&'a SessionTarget>,
}

/// Serves a request of a federating route. `message` is the POST body's JSON-RPC message
/// (already read and checked against the headers by the caller).
pub(super) async fn serve(
    cx: &mut RequestCtx<'_>,
    route: &CompiledRoute,
    fed: &Federation,
    message: Option<mcp::Message>,
    seen_session_refused: &mut bool,
) -> Result<Response<ProxyBody>, ProxyError> {
    if cx.head.method == Method::GET {
        return Err(ProxyError::MethodNotAllowed(HeaderValue::from_static(
            "POST, DELETE",
        )));
    }
    let client_id = cx.head.headers.get(mcp::SESSION_HEADER).cloned();
    let sessions = match &client_id {
        None => None,
        Some(id) => {
            let opened = cx
                .gw
                .mcp_keys(&cx.snap)
                .open_many(&route.id, id.as_bytes())
                .filter(|s| !s.is_empty());
            match opened {
                Some(s) => Some(s),
                None => {
                    *seen_session_refused = true;
                    let rpc_id = message.as_ref().and_then(|m| m.id.clone());
                    return Ok(jsonrpc_error(
                        StatusCode::NOT_FOUND,
                        rpc_id.as_ref(),
                        mcp::code::SESSION_NOT_FOUND,
                        "Session not found",
                    ));
                }
            }
        }
    };
    // Which servers this request may reach: those of the session, else every one.
    let parts: Vec<Part<'_>> = fed
        .servers
        .iter()
        .filter_map(|s| {
            let backend = route.backends.get(s.backend)?;
            let session = sessions
                .as_ref()
                .map(|all| all.iter().find(|t| *t.backend == *backend.id));
            match session {
                Some(None) => None,
                Some(Some(t)) => Some(Part {
                    prefix: &s.prefix,
                    backend: s.backend,
                    session: Some(t),
                }),
                None => Some(Part {
                    prefix: &s.prefix,
                    backend: s.backend,
                    session: None,
                }),
            }
        })
        .collect();
    outbound::prepare_headers(cx, false);
    let body = cx.body.buffered().cloned().unwrap_or_default();
    if cx.head.method == Method::DELETE {
        let results = fan_out(&Env::new(cx, route), &parts, &body, None).await;
        let any = results.iter().any(Option::is_some);
        let mut resp = Response::new(ProxyBody::empty());
        *resp.status_mut() = if any {
            StatusCode::OK
        } else {
            StatusCode::BAD_GATEWAY
        };
        return Ok(resp);
    }
    let Some(message) = message else {
        return Ok(jsonrpc_error(
            StatusCode::BAD_REQUEST,
            None,
            mcp::code::INVALID_REQUEST,
            "Invalid Request: not a JSON-RPC 2.0 message",
        ));
    };
    let method = message.method.as_deref().unwrap_or("");
    let Some(rpc_id) = message.id.clone() else {
        if message.method.is_none() {
            // An answer to a server's request: which server asked is not known here.
            return Ok(jsonrpc_error(
                StatusCode::BAD_REQUEST,
                None,
                mcp::code::INVALID_REQUEST,
                "Invalid Request: a federating route does not pass answers to servers",
            ));
        }
        // A notification: to every server of the session.
        fan_out(&Env::new(cx, route), &parts, &body, None).await;
        let mut resp = Response::new(ProxyBody::empty());
        *resp.status_mut() = StatusCode::ACCEPTED;
        return Ok(resp);
    };
    let answer = |result: Value| {
        let v = serde_json::json!({"jsonrpc": "2.0", "id": rpc_id, "result": result});
        let mut resp = Response::new(ProxyBody::full(v.to_string()));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(id) = &client_id {
            resp.headers_mut().insert(mcp::SESSION_HEADER, id.clone());
        }
        resp
    };
    match method {
        "ping" => Ok(answer(serde_json::json!({}))),
        "initialize" | "server/discover" | "tools/list" => {
            let results = fan_out(&Env::new(cx, route), &parts, &body, Some(&rpc_id)).await;
            let mut answers = Vec::with_capacity(results.len());
            let mut upstream_sessions = Vec::new();
            for (part, r) in parts.iter().zip(results) {
                let Some(r) = r else { continue };
                let Some(result) = r.message.get("result") else {
                    continue;
                };
                answers.push((part.prefix, result.clone()));
                if let Some(s) = r.session {
                    upstream_sessions.push(s);
                }
            }
            if answers.is_empty() {
                return Ok(jsonrpc_error(
                    StatusCode::BAD_GATEWAY,
                    Some(&rpc_id),
                    mcp::code::SERVER_UNAVAILABLE,
                    "No MCP server of this route answered",
                ));
            }
            let merged = match method {
                "initialize" => federation::merge_initialize(&answers),
                "server/discover" => federation::merge_discover(&answers),
                _ => {
                    let access = route.mcp_tools.as_deref();
                    let roles = caller_roles(cx);
                    federation::merge_tools(&answers, |name| {
                        access.is_none_or(|a| a.allows(name, &roles))
                    })
                }
            };
            let mut resp = answer(merged);
            if method == "initialize" && !upstream_sessions.is_empty() {
                let sealed = cx
                    .gw
                    .mcp_keys(&cx.snap)
                    .seal_many(&route.id, &upstream_sessions)
                    .and_then(|s| HeaderValue::from_str(&s).ok());
                if let Some(v) = sealed {
                    resp.headers_mut().insert(mcp::SESSION_HEADER, v);
                }
            }
            Ok(resp)
        }
        "tools/call" => {
            let name = message.name.as_deref().unwrap_or("");
            let Some((server, tool)) = fed.split(name) else {
                return Ok(jsonrpc_error(
                    StatusCode::OK,
                    Some(&rpc_id),
                    mcp::code::INVALID_PARAMS,
                    "Unknown tool: no server of this route has it",
                ));
            };
            let unavailable = || {
                jsonrpc_error(
                    StatusCode::OK,
                    Some(&rpc_id),
                    mcp::code::SERVER_UNAVAILABLE,
                    "The MCP server of this tool is unavailable",
                )
            };
            let Some(part) = parts.iter().find(|p| p.backend == server.backend) else {
                // The server did not answer this session's initialize.
                down(cx.gw, route, &server.prefix);
                return Ok(unavailable());
            };
            let (Some(body), Ok(tool_header)) = (
                federation::with_tool_name(&body, tool),
                HeaderValue::from_str(tool),
            ) else {
                return Ok(jsonrpc_error(
                    StatusCode::BAD_REQUEST,
                    Some(&rpc_id),
                    mcp::code::INVALID_REQUEST,
                    "Invalid Request: tools/call without params",
                ));
            };
            let sent = {
                let env = Env::new(cx, route);
                let mut headers = part_headers(env.headers, part);
                if headers.contains_key(mcp::NAME_HEADER) {
                    headers.insert(mcp::NAME_HEADER, tool_header);
                }
                send_to(&env, part, Method::POST, headers, body.into()).await
            };
            let mut fwd = match sent {
                Ok(f) if !f.resp.status().is_server_error() => f,
                _ => {
                    down(cx.gw, route, part.prefix);
                    return Ok(unavailable());
                }
            };
            let h = fwd.resp.headers_mut();
            h.remove(mcp::SESSION_HEADER);
            if let Some(id) = &client_id {
                h.insert(mcp::SESSION_HEADER, id.clone());
            }
            Ok(respond::upstream(cx, route, fwd))
        }
        _ => Ok(jsonrpc_error(
            StatusCode::OK,
            Some(&rpc_id),
            mcp::code::METHOD_NOT_FOUND,
            "Method not found: a federating route serves tools",
        )),
    }
}

/// A server's reply to a fanned-out request: the JSON-RPC answer, and the upstream session it
/// made (on `initialize`).
struct Reply {
    message: Value,
    session: Option<SessionTarget>,
}

/// Sends the request to every part at once. With `id`, each reply's answer is read (JSON or
/// SSE, up to the inspect limit); a part that fails yields `None`, and is reported as down
/// unless the server answered 4xx itself.
async fn fan_out(
    env: &Env<'_>,
    parts: &[Part<'_>],
    body: &Bytes,
    id: Option<&Value>,
) -> Vec<Option<Reply>> {
    let route = env.route;
    let limit = route.timeouts.request.unwrap_or(FANOUT_LIMIT);
    let max = usize::try_from(env.gw.options.max_inspect_bytes).unwrap_or(usize::MAX);
    let one = |part| async move {
        {
            let work = async {
                let headers = part_headers(env.headers, part);
                let Ok(fwd) = send_to(env, part, env.method.clone(), headers, body.clone()).await
                else {
                    // Not reached (no endpoint, refused, reset, timed out): down.
                    return Err(true);
                };
                let status = fwd.resp.status();
                if !status.is_success() {
                    // A 4xx is the server's own answer to this request; a 5xx says it is down.
                    return Err(status.is_server_error());
                }
                let Some(id) = id else {
                    return Ok(Reply {
                        message: Value::Null,
                        session: None,
                    });
                };
                let endpoint = fwd.guard.endpoint.addr();
                let sse = fwd
                    .resp
                    .headers()
                    .get(header::CONTENT_TYPE)
                    .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
                let session = fwd
                    .resp
                    .headers()
                    .get(mcp::SESSION_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                let Forwarded { resp, guard, .. } = fwd;
                // A reply cut off or without the answer: the server failed this request.
                let bytes = read_until_answer(resp.into_body(), sse, id, max)
                    .await
                    .ok_or(true)?;
                drop(guard);
                let message = federation::answer_in(&bytes, sse, id).ok_or(true)?;
                let backend = route.backends.get(part.backend).ok_or(false)?;
                Ok(Reply {
                    message,
                    session: session.map(|upstream_id| SessionTarget {
                        backend: backend.id.to_string(),
                        endpoint: part.session.map_or(endpoint, |s| s.endpoint),
                        upstream_id,
                    }),
                })
            };
            match tokio::time::timeout(limit, work).await {
                Ok(Ok(reply)) => Some(reply),
                Ok(Err(false)) => None,
                Ok(Err(true)) | Err(_) => {
                    down(env.gw, route, part.prefix);
                    None
                }
            }
        }
    };
    futures_util::future::join_all(parts.iter().map(one)).await
}

/// Reads a reply body until it holds the answer with `id` (an SSE reply may stay open after
/// it), or ends; `None` past `max` bytes or on an error.
async fn read_until_answer(
    mut body: ProxyBody,
    sse: bool,
    id: &Value,
    max: usize,
) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.ok()?;
        if let Some(data) = frame.data_ref() {
            buf.extend_from_slice(data);
            if buf.len() > max {
                return None;
            }
            if sse && federation::answer_in(&buf, true, id).is_some() {
                break;
            }
        }
    }
    Some(buf)
}

/// The request's headers as one server gets them: its own session id, a length of its own.
fn part_headers(headers: &HeaderMap, part: &Part<'_>) -> HeaderMap {
    let mut h = headers.clone();
    h.remove(header::CONTENT_LENGTH);
    h.remove(mcp::SESSION_HEADER);
    if let Some(v) = part
        .session
        .and_then(|s| HeaderValue::from_str(&s.upstream_id).ok())
    {
        h.insert(mcp::SESSION_HEADER, v);
    }
    h
}

/// One request to one server: its session's endpoint, else one picked in its backend.
async fn send_to(
    env: &Env<'_>,
    part: &Part<'_>,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Forwarded, ProxyError> {
    let (gw, route) = (env.gw, env.route);
    let picked = match part.session {
        Some(s) => pick_pinned(gw, env.snap, route, part.backend, s.endpoint)?,
        None => pick_in_backend(gw, env.snap, route, part.backend, env.sticky, &[])?,
    };
    let backend = picked.backend;
    let mut up = Request::new(ProxyBody::full(body));
    *up.method_mut() = method;
    *up.uri_mut() = upstream_uri(backend, &env.path, env.query.as_deref())?;
    *up.version_mut() = Version::HTTP_11;
    *up.headers_mut() = headers;
    up.headers_mut()
        .insert(header::HOST, backend.authority.clone());
    if let Some(f) = &route.filters {
        super::filters::request(f, up.headers_mut());
    }
    let deadline = env.deadline;
    let mut guard = picked.guard;
    let sent = forward::send(gw, &picked.connect, up, route, deadline).await;
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
            Err(e)
        }
        Ok((resp, lease)) => {
            guard.conn = Some(lease);
            if resp.status().is_server_error() {
                guard.endpoint.failure(FailureKind::ServerError);
                count("5xx");
            } else {
                guard.endpoint.success();
                count("success");
            }
            Ok(Forwarded {
                resp: resp.map(ProxyBody::incoming),
                guard,
                deadline,
            })
        }
    }
}

/// A federated server that did not answer: counted and logged; the others go on.
fn down(gw: &Gateway, route: &CompiledRoute, prefix: &str) {
    gw.metrics
        .mcp_server_unavailable_total
        .with_label_values(&[&route.id, prefix])
        .inc();
    tracing::warn!(
        route = %route.id,
        server = prefix,
        "federated MCP server unavailable; the route's other servers go on"
    );
}
