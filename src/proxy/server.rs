//! Listeners: plain (HTTP/1.1 and h2c, detected per connection) and TLS (rustls, certificate by
//! SNI from the current snapshot, served as the protocol ALPN chose), each connection watched
//! for its header read and idle timeouts, and drained gracefully on shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::{Request, Response, Version};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper::service::HttpService;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::conn::{ConnActivity, ConnTimeouts, Expiry, Watchdog, Watched};
use super::pipeline::{handle, ConnInfo};
use super::Gateway;

/// Picks the certificate for a TLS handshake from the snapshot in force.
#[derive(Debug)]
struct SniResolver(Arc<Gateway>);

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway").finish_non_exhaustive()
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.snapshot().certs.resolve(hello.server_name())
    }
}

/// The TLS acceptor config for `--tls-listen`.
pub fn tls_config(gw: Arc<Gateway>) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_cert_resolver(Arc::new(SniResolver(gw)));
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// The limits every HTTP/1.1 connection gets, plain or TLS, applied to both of hyper's
/// builder types (the auto-detecting one and the HTTP/1-only one).
macro_rules! http1_settings {
    ($b:expr) => {
        $b.timer(TokioTimer::new())
            // The watchdog (conn.rs) enforces the header read and idle timeouts: hyper's own
            // header timeout also runs while a keep-alive connection waits idle.
            .header_read_timeout(None)
            // 64 KiB of request line and headers is plenty for API traffic and bounds memory;
            // beyond it hyper answers 431 (414 for a target alone above 64 KiB).
            .max_buf_size(MAX_HEAD_BYTES)
            // hyper's default, stated: 100 header lines, 431 above. Real clients send ~20.
            .max_headers(MAX_HEADERS)
            .keep_alive(true)
    };
}

/// The same for HTTP/2.
macro_rules! http2_settings {
    ($b:expr) => {
        $b.timer(TokioTimer::new())
            .max_concurrent_streams(MAX_H2_STREAMS)
            .keep_alive_interval(Some(H2_KEEPALIVE))
    };
}

const MAX_HEAD_BYTES: usize = 64 * 1024;
const MAX_HEADERS: usize = 100;
const MAX_H2_STREAMS: u32 = 256;
const H2_KEEPALIVE: Duration = Duration::from_secs(30);

/// The connection builders. Plain TCP detects HTTP/1.1 or HTTP/2 with prior knowledge (h2c)
/// from the preface. A TLS connection is served as the protocol ALPN chose: with `h2`, bytes
/// that are not the HTTP/2 preface are a connection error (RFC 9113 §3.4), never an HTTP/1.1
/// request. hyper-util's auto builder cannot be held to one protocol when upgrades are on, so
/// TLS uses hyper's single-protocol builders.
struct Builders {
    plain: auto::Builder<TokioExecutor>,
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
}

impl Builders {
    fn new() -> Self {
        let mut plain = auto::Builder::new(TokioExecutor::new());
        http1_settings!(plain.http1());
        http2_settings!(plain.http2());
        let mut h1 = http1::Builder::new();
        http1_settings!(h1);
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        http2_settings!(h2);
        Self {
            plain,
            http1: h1,
            http2: h2,
        }
    }
}

/// Serves `listener` until `shutdown` turns true, then drains connections for up to `grace`:
/// HTTP/2 connections get GOAWAY at once; an HTTP/1.1 connection answers its next request with
/// `Connection: close` and is closed once idle for [`super::conn::DRAIN_IDLE`]; in-flight requests and
/// streams finish.
pub async fn serve(
    gw: Arc<Gateway>,
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
) {
    // Every connection task holds a receiver: `closed()` completes when the last has ended.
    let (drain_tx, drain_rx) = watch::channel(false);
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let builders = Arc::new(Builders::new());
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, remote) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        // EMFILE and friends: back off briefly instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                spawn_connection(&gw, &builders, acceptor.clone(), stream, remote, drain_rx.clone());
            }
            _ = shutdown.changed() => {
                if *shutdown.borrow() {
                    break;
                }
            }
        }
    }
    drop(listener);
    drop(drain_rx);
    let _ = drain_tx.send(true);
    tokio::select! {
        _ = drain_tx.closed() => tracing::debug!("all connections drained"),
        _ = tokio::time::sleep(grace) => tracing::warn!("grace period over; closing remaining connections"),
    }
}

/// Serves one accepted connection on its own task. Plain and TLS connections get separate
/// tasks: one task type for both would size every plain connection's task for the TLS stream
/// too (hyper's connection state is kept inline in the task, for the connection's whole life).
fn spawn_connection(
    gw: &Arc<Gateway>,
    builders: &Arc<Builders>,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    stream: TcpStream,
    remote: SocketAddr,
    drain: watch::Receiver<bool>,
) {
    let builders = builders.clone();
    let limits = ConnTimeouts {
        header: gw.options.header_read_timeout,
        idle: gw.options.idle_timeout,
    };
    let info = ConnInfo {
        remote,
        tls: acceptor.is_some(),
    };
    let activity = ConnActivity::new();
    let svc_gw = gw.clone();
    let svc_activity = activity.clone();
    let svc = service_fn(move |req: Request<Incoming>| {
        let busy = svc_activity.request();
        if req.version() >= Version::HTTP_2 {
            svc_activity.multiplexed();
        }
        let gw = svc_gw.clone();
        async move {
            let http1 = req.version() < Version::HTTP_2;
            let mut resp = handle(gw.clone(), req, info).await;
            // Draining: the client learns from this answer that the connection closes, so it
            // never sends another request into a connection about to be closed under it.
            if http1 && gw.is_shutting_down() {
                resp.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            Ok::<_, Infallible>(resp.map(|b| b.with_busy(busy)))
        }
    });
    match acceptor {
        None => {
            tokio::spawn(async move {
                let io = TokioIo::new(Watched::new(stream, activity.clone()));
                let conn = builders.plain.serve_connection_with_upgrades(io, svc);
                drive(conn, &activity, limits, false, drain).await;
            });
        }
        Some(acceptor) => {
            tokio::spawn(async move {
                let tls = match tokio::time::timeout(limits.header, acceptor.accept(stream)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
                // Served as the protocol ALPN chose, never guessed from the first bytes.
                let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                let io = TokioIo::new(Watched::new(tls, activity.clone()));
                if h2 {
                    let conn = builders.http2.serve_connection(io, svc);
                    drive(conn, &activity, limits, true, drain).await;
                } else {
                    let conn = builders.http1.serve_connection(io, svc).with_upgrades();
                    drive(conn, &activity, limits, false, drain).await;
                }
            });
        }
    }
}

/// Drives a connection until it ends, its watchdog expires it, or the drain closes it.
async fn drive<C, E>(
    conn: C,
    activity: &ConnActivity,
    limits: ConnTimeouts,
    http2: bool,
    mut drain: watch::Receiver<bool>,
) where
    C: Future<Output = Result<(), E>> + GracefulConnection,
    E: std::fmt::Display,
{
    tokio::pin!(conn);
    let mut watchdog = Watchdog::new(limits, http2);
    let mut draining = *drain.borrow();
    // Set once the connection was asked to close cleanly: from then on only its end counts.
    let mut closing = false;
    let result = loop {
        tokio::select! {
            // The connection first: when a request's bytes and a watchdog tick are ready at the
            // same wake-up, hyper reads the request (and the connection is busy) before the
            // watchdog can call it idle. Otherwise an idle close would drop a request already
            // in the socket's buffer, and the client would have to resend it.
            biased;
            r = conn.as_mut() => break r,
            expiry = watchdog.expired(activity, draining), if !closing => match expiry {
                // A head that never completes: nothing to finish cleanly.
                Expiry::Header => {
                    tracing::debug!("request head not complete within the header read timeout; closing");
                    return;
                }
                Expiry::Idle => {
                    conn.as_mut().close_gracefully();
                    closing = true;
                }
            },
            changed = drain.changed(), if !draining => {
                draining = changed.is_err() || *drain.borrow();
                // HTTP/2 clients learn from GOAWAY which streams were served (on the plain
                // port, h2c is known from its first request; the watchdog sends GOAWAY to one
                // whose first request comes later); an HTTP/1.1 connection is told on its next
                // answer, or closed by the watchdog once idle.
                if draining && (http2 || activity.is_multiplexed()) {
                    conn.as_mut().close_gracefully();
                    closing = true;
                }
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "connection ended with an error");
    }
    tracing::debug!(
        TMPDBG = true,
        multiplexed = activity.is_multiplexed(),
        draining,
        closing,
        "connection ended"
    );
}

/// A connection that can be asked to finish what is in flight and close.
trait GracefulConnection {
    fn close_gracefully(self: Pin<&mut Self>);
}

impl<I, S, B> GracefulConnection for auto::UpgradeableConnection<'_, I, S, TokioExecutor>
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>>,
    S::Future: 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    TokioExecutor: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    fn close_gracefully(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<I, S, B> GracefulConnection for http1::UpgradeableConnection<I, S>
where
    S: HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    B: http_body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn close_gracefully(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<I, S, B> GracefulConnection for http2::Connection<I, S, TokioExecutor>
where
    S: HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    B: http_body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    TokioExecutor: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    fn close_gracefully(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}
