//! WebSocket routes: the authenticated upgrade is forwarded, then bytes are relayed both ways
//! (frames pass untouched) until a side closes, the idle timeout passes, or the key is revoked.
//! The phase that replaces `forward` on `websocket` routes; knows nothing of the driver.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::body::ProxyBody;
use super::context::RequestCtx;
use super::error::ProxyError;
use super::outbound::{self, upstream_uri};
use super::pick::pick_upstream;
use super::revocation::revocation;
use crate::config::route::CompiledRoute;
use crate::telemetry::GaugeGuard;

/// Phase 7 of a `websocket` route: forwards the authenticated upgrade (426 for a request that
/// is not one) and, on `101`, relays the two upgraded connections on a task of their own.
pub(crate) async fn run(
    cx: &mut RequestCtx<'_>,
    route: &CompiledRoute,
) -> Result<Response<ProxyBody>, ProxyError> {
    if !super::headers::is_websocket_upgrade(&cx.head.headers) {
        return Err(ProxyError::UpgradeRequired);
    }
    let gw = cx.gw;
    outbound::prepare_headers(cx, true);
    let picked = pick_upstream(
        gw,
        &cx.snap,
        route,
        &cx.head.headers,
        cx.caller.as_ref(),
        &[],
    )?;
    let backend = picked.backend;
    cx.outcome.upstream = Some(backend.id.clone());
    let path = cx
        .normalized
        .as_deref()
        .unwrap_or_else(|| cx.head.uri.path());
    let query = outbound::query(&cx.head.uri, cx.carrier);
    let uri = upstream_uri(backend, &route.rewrite_path(path), query.as_deref())?;
    let client_upgrade = cx
        .head
        .extensions
        .remove::<OnUpgrade>()
        .ok_or(ProxyError::UpgradeRequired)?;
    let mut up = Request::new(ProxyBody::empty());
    *up.method_mut() = cx.head.method.clone();
    *up.uri_mut() = uri;
    *up.version_mut() = Version::HTTP_11;
    *up.headers_mut() = std::mem::take(&mut cx.head.headers);
    up.headers_mut()
        .insert(header::HOST, backend.authority.clone());
    let send = gw.upstream.send(&picked.connect, up);
    let (resp, lease) = match route.timeouts.first_byte {
        Some(fb) => tokio::time::timeout_at(cx.started + fb, send)
            .await
            .map_err(|_| ProxyError::Timeout)??,
        None => send.await?,
    };
    gw.metrics
        .upstream_requests_total
        .with_label_values(&[&route.id, &backend.id, "success"])
        .inc();
    let (mut rparts, rbody) = resp.into_parts();
    if rparts.status != StatusCode::SWITCHING_PROTOCOLS {
        // Not upgraded: pass the answer on as a normal response.
        super::headers::strip_hop_by_hop(&mut rparts.headers, false);
        let mut guard = picked.guard;
        guard.conn = Some(lease);
        let body = ProxyBody::incoming(rbody).with_guard(Box::new(guard));
        return Ok(Response::from_parts(rparts, body));
    }
    // The upgraded connection belongs to the relay now; it never returns to the pool.
    lease.discard();
    let mut upstream_resp = Response::from_parts(rparts.clone(), ());
    let upstream_upgrade = hyper::upgrade::on(&mut upstream_resp);

    let streams = gw.metrics.streams_active.with_label_values(&["websocket"]);
    streams.inc();
    let guards = (picked.guard, GaugeGuard(streams));
    let idle = route.timeouts.idle;
    let deadline = route.timeouts.request.map(|d| cx.started + d);
    let revoked = cx.caller.as_ref().map(|c| revocation(gw.clone(), c));
    tokio::spawn(async move {
        let _guards = guards;
        let (client, upstream) = match tokio::join!(client_upgrade, upstream_upgrade) {
            (Ok(c), Ok(u)) => (c, u),
            _ => {
                tracing::debug!("websocket upgrade did not complete");
                return;
            }
        };
        relay(
            TokioIo::new(client),
            TokioIo::new(upstream),
            idle,
            deadline,
            revoked,
        )
        .await;
    });

    let mut resp = Response::new(ProxyBody::empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    *resp.headers_mut() = rparts.headers;
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    Ok(resp)
}

/// Records the time of the last byte that passed, for the idle timeout.
struct Activity<S> {
    inner: S,
    last: Arc<AtomicU64>,
    epoch: tokio::time::Instant,
}

impl<S> Activity<S> {
    fn touch(&self) {
        self.last
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Activity<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.touch();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Activity<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Copies both ways until both sides finish, or idle/deadline/revocation ends the relay.
pub async fn relay<A, B>(
    a: A,
    b: B,
    idle: Option<std::time::Duration>,
    deadline: Option<tokio::time::Instant>,
    revoked: Option<Pin<Box<dyn std::future::Future<Output = ()> + Send>>>,
) where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let epoch = tokio::time::Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let mut a = Activity {
        inner: a,
        last: last.clone(),
        epoch,
    };
    let mut b = Activity {
        inner: b,
        last: last.clone(),
        epoch,
    };
    let idle_watch = async {
        let Some(idle) = idle else {
            return std::future::pending::<()>().await;
        };
        loop {
            let seen = std::time::Duration::from_millis(last.load(Ordering::Relaxed));
            let due = epoch + seen + idle;
            if tokio::time::Instant::now() >= due {
                return;
            }
            tokio::time::sleep_until(due).await;
        }
    };
    let deadline_watch = async {
        match deadline {
            Some(d) => tokio::time::sleep_until(d).await,
            None => std::future::pending::<()>().await,
        }
    };
    let revoked_watch = async {
        match revoked {
            Some(r) => r.await,
            None => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        r = tokio::io::copy_bidirectional(&mut a, &mut b) => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "websocket relay ended with an error");
            }
        }
        _ = idle_watch => tracing::debug!("websocket idle timeout"),
        _ = deadline_watch => tracing::debug!("websocket request timeout"),
        _ = revoked_watch => tracing::info!("closing a websocket whose API key is no longer valid"),
    }
}
