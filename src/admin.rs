//! The admin server: `/metrics`, `/healthz` (`/livez`), `/readyz` and `/debug/routes` (also at
//! `/debug`).
//! Read-only; `/debug` output holds no key material (only client ids and fingerprints).
//! A wiring module beside `app`: it reads the proxy's [`Gateway`] and telemetry's registry,
//! so neither of those imports the other.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use crate::proxy::Gateway;

fn respond(
    status: StatusCode,
    ctype: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    r
}

/// The JSON of `/debug/routes`: the compiled table, the keys' public facts, the problems.
pub fn debug_routes(gw: &Gateway) -> serde_json::Value {
    let snap = gw.snapshot();
    let keys: Vec<_> = snap
        .keys
        .entries()
        .map(|k| {
            serde_json::json!({
                "id": k.id, "clientId": k.client_id, "roles": k.roles,
                "fingerprint": k.fingerprint, "expiresAt": k.expires_at, "limits": k.limits,
            })
        })
        .collect();
    let source = gw.source_debug.get().map(|f| f());
    serde_json::json!({
        "source": source,
        "generation": snap.generation,
        "routes": snap.routes.routes(),
        "keys": keys,
        "problems": snap.problems,
        "objects": snap.reports,
    })
}

async fn route(gw: Arc<Gateway>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/metrics" => respond(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            gw.metrics.render(),
        ),
        "/healthz" | "/livez" => respond(StatusCode::OK, "text/plain", "ok\n"),
        "/readyz" => {
            if gw.is_ready() {
                respond(StatusCode::OK, "text/plain", "ready\n")
            } else {
                respond(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready\n")
            }
        }
        "/debug" | "/debug/routes" => respond(
            StatusCode::OK,
            "application/json",
            serde_json::to_vec_pretty(&debug_routes(&gw)).unwrap_or_default(),
        ),
        _ => respond(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}

/// Serves the admin endpoints for the life of the process (probes keep answering while the
/// gateway drains, with `/readyz` false).
pub async fn serve(gw: Arc<Gateway>, listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let gw = gw.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let gw = gw.clone();
                async move { Ok::<_, Infallible>(route(gw, req).await) }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
