//! The request path: one driver calling the phases (`phases/`, one file each) in the documented
//! order of decisions. Every phase reads only the snapshot the request started with; nothing
//! here knows hyper beyond the entry point's request type.

use std::sync::Arc;

use http::{Request, Response};
use hyper::body::Incoming;

use super::context::RequestCtx;
use super::phases::{
    authenticate, authorize, cors, filters, forward, limits, mcp, respond, route_match, tokens,
};
use super::{Gateway, ProxyBody, ProxyError};
use crate::api::Protocol;

pub use super::context::ConnInfo;

/// Serves one request end to end. Never fails: a refusal becomes its JSON answer.
pub async fn handle(
    gw: Arc<Gateway>,
    req: Request<Incoming>,
    conn: ConnInfo,
) -> Response<ProxyBody> {
    let (head, body) = req.into_parts();
    let mut cx = RequestCtx::new(&gw, head, ProxyBody::incoming(body), conn);
    let answer = run(&mut cx).await;
    respond::finish(&cx, answer)
}

/// The phases, in the order of decisions of docs/configuration.md: route match (404, 405) →
/// CORS preflight → authentication (401) → authorisation (403) → request limits (429
/// `rate_limited`) → token limits (429 `token_limited`) → upstream. A request refused at any
/// step never reaches a backend.
async fn run(cx: &mut RequestCtx<'_>) -> Result<Response<ProxyBody>, ProxyError> {
    let route = route_match::run(cx).await?;
    if let Some(f) = route.filters.as_deref() {
        if let Some(answer) = filters::early(cx, &route, f)? {
            return Ok(answer);
        }
    }
    if let Some(preflight) = cors::run(cx, &route) {
        return Ok(preflight);
    }
    authenticate::run(cx, &route).await?;
    authorize::run(cx, &route)?;
    limits::run(cx, &route).await?;
    tokens::run(cx, &route).await?;
    if route.protocol == Protocol::Websocket {
        // Boxed: the relay's future is large and rare; inline it would grow every request's
        // future (and the per-connection slot hyper keeps for it) by ~4 KiB.
        return Box::pin(super::websocket::run(cx, &route)).await;
    }
    if route.protocol == Protocol::Mcp {
        // Boxed like the WebSocket relay: other routes' futures stay as they were.
        return Box::pin(mcp::run(cx, &route)).await;
    }
    let upstream = forward::run(cx, &route, None).await?;
    Ok(respond::upstream(cx, &route, upstream))
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
