//! Listeners: plain (HTTP/1.1 and h2c, detected per connection) and TLS (rustls, certificate by
//! SNI from the current snapshot, ALPN h2/http1.1), with graceful shutdown of every connection.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

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

fn builder(gw: &Gateway) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(gw.options.header_read_timeout)
        // 64 KiB of request line and headers is plenty for API traffic and bounds memory;
        // beyond it hyper answers 431 (414 for a target alone above 64 KiB).
        .max_buf_size(64 * 1024)
        // hyper's default, stated: 100 header lines, 431 above. Real clients send ~20.
        .max_headers(100)
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256)
        .keep_alive_interval(Some(Duration::from_secs(30)));
    b
}

/// Serves `listener` until `shutdown` turns true, then drains connections for up to `grace`.
pub async fn serve(
    gw: Arc<Gateway>,
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
) {
    let graceful = GracefulShutdown::new();
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let conn_builder = Arc::new(builder(&gw));
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
                spawn_connection(&gw, &graceful, &conn_builder, acceptor.clone(), stream, remote);
            }
            _ = shutdown.changed() => {
                if *shutdown.borrow() {
                    break;
                }
            }
        }
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => tracing::debug!("all connections drained"),
        _ = tokio::time::sleep(grace) => tracing::warn!("grace period over; closing remaining connections"),
    }
}

/// Serves one accepted connection on its own task. Plain and TLS connections get separate
/// tasks: one task type for both would size every plain connection's task for the TLS stream
/// too (hyper's connection state is kept inline in the task, for the connection's whole life).
fn spawn_connection(
    gw: &Arc<Gateway>,
    graceful: &GracefulShutdown,
    builder: &Arc<auto::Builder<TokioExecutor>>,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    stream: TcpStream,
    remote: SocketAddr,
) {
    let builder = builder.clone();
    let watcher = graceful.watcher();
    let hs_timeout = gw.options.header_read_timeout;
    let info = ConnInfo {
        remote,
        tls: acceptor.is_some(),
    };
    let first_request = Arc::new(AtomicBool::new(false));
    let seen = first_request.clone();
    let svc_gw = gw.clone();
    let svc = service_fn(move |req| {
        seen.store(true, Ordering::Release);
        let gw = svc_gw.clone();
        async move { Ok::<_, Infallible>(handle(gw, req, info).await) }
    });
    match acceptor {
        None => {
            tokio::spawn(async move {
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
                let conn = watcher.watch(conn.into_owned());
                serve_bounded(conn, hs_timeout, &first_request).await;
            });
        }
        Some(acceptor) => {
            tokio::spawn(async move {
                let tls = match tokio::time::timeout(hs_timeout, acceptor.accept(stream)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), svc);
                let conn = watcher.watch(conn.into_owned());
                serve_bounded(conn, hs_timeout, &first_request).await;
            });
        }
    }
}

/// Drives a connection, closing it if no request has arrived within `first_request_within`.
///
/// hyper's `header_read_timeout` starts only once hyper-util has told HTTP/1 from the HTTP/2
/// preface, and that detection has no deadline of its own: a client trickling the 24-byte
/// preface (or sending nothing after a TLS handshake, or opening HTTP/2 and never a stream)
/// would hold the connection as long as it liked. Once a request has arrived, hyper's own
/// timeouts and the graceful drain govern the connection.
async fn serve_bounded<F, E>(conn: F, first_request_within: Duration, first_request: &AtomicBool)
where
    F: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    tokio::pin!(conn);
    let ended = tokio::select! {
        r = &mut conn => Some(r),
        () = tokio::time::sleep(first_request_within) => None,
    };
    let result = match ended {
        Some(r) => r,
        None if first_request.load(Ordering::Acquire) => conn.await,
        None => {
            tracing::debug!("no request within the header read timeout; closing the connection");
            return;
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}
