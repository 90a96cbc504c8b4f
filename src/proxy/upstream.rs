//! The upstream client: keep-alive HTTP/1.1 connections (plain or TLS), pooled per endpoint,
//! and the classification of their failures into `ProxyError`s. Knows nothing of routes or keys.
//!
//! Why not hyper-util's pooled `Client`: under load it was the largest piece of the hot path we
//! control (BENCHMARKS.md: ~10,000 instructions per request: SipHash of the pool key byte by
//! byte on checkout and put-back, an absolute URI re-parsed into origin form, a task spawned per
//! request to return the connection, the request moved through several futures). Here a request
//! takes an idle `http1::SendRequest` from its endpoint's pool (one hash of a `SocketAddr`, one
//! uncontended per-endpoint mutex), and the `Lease` that rides in the response body puts it back
//! when the body ends. What the hyper-util client did and is kept:
//! - a request that a reused connection never sent (the server closed it while idle) is sent
//!   again on another connection;
//! - idle connections expire after `idle_timeout` and at most `max_idle_per_endpoint` are kept;
//! - connect timeout, `TCP_NODELAY`, TCP keep-alive, TLS with SNI and certificate checks for
//!   `https` backends, and HTTP upgrades (WebSocket).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::body::ProxyBody;
use super::error::ProxyError;

type Sender = http1::SendRequest<ProxyBody>;
type FastHash = foldhash::fast::RandomState;

/// Upstream client settings.
#[derive(Clone, Debug)]
pub struct UpstreamOptions {
    /// Idle pooled connections kept per endpoint. Generous, because agent traffic is bursty and
    /// a fresh TCP (+TLS) handshake costs far more than an idle socket.
    pub max_idle_per_endpoint: usize,
    pub idle_timeout: Duration,
    pub connect_timeout: Duration,
    /// PEM bundle of extra CAs for `https` backends (besides the Mozilla roots).
    pub ca_bundle: Option<Vec<u8>>,
}

impl Default for UpstreamOptions {
    fn default() -> Self {
        Self {
            max_idle_per_endpoint: 1024,
            idle_timeout: Duration::from_secs(90),
            connect_timeout: Duration::from_secs(5),
            ca_bundle: None,
        }
    }
}

/// The client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The CA bundle holds no usable certificate.
    #[error("invalid CA bundle: {0}")]
    CaBundle(String),
}

/// Where an attempt connects.
pub enum Connect {
    /// Plain HTTP to an endpoint address.
    Addr(SocketAddr),
    /// TLS to an `https` url backend; its certificate is checked against the host.
    Tls(TlsTarget),
}

/// The host (a name or a bare IP literal) and port of an `https` url backend.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TlsTarget {
    pub host: Arc<str>,
    pub port: u16,
}

/// The pooled client toward backends.
pub struct Upstream {
    inner: Arc<Inner>,
}

struct Inner {
    pools: ArcSwap<PoolMap>,
    opts: UpstreamOptions,
    tls: tokio_rustls::TlsConnector,
    h1: http1::Builder,
}

/// The pools by destination. Replaced whole (copy on write) when a destination is added or
/// removed, which is rare; read without a lock on every request.
#[derive(Clone, Default)]
struct PoolMap {
    plain: HashMap<SocketAddr, Arc<EndpointPool>, FastHash>,
    tls: HashMap<TlsTarget, Arc<EndpointPool>, FastHash>,
}

/// Idle connections to one destination, newest last (reused first: the warmest socket, and the
/// oldest ones are left to expire when traffic falls).
struct EndpointPool {
    idle: Mutex<Vec<Idle>>,
    max_idle: usize,
    idle_timeout: Duration,
    /// Sweeps in a row that found the pool empty and unused; it is dropped after two.
    empty_sweeps: AtomicU8,
}

struct Idle {
    sender: Sender,
    since: Instant,
}

impl EndpointPool {
    fn new(opts: &UpstreamOptions) -> Self {
        Self {
            idle: Mutex::new(Vec::new()),
            max_idle: opts.max_idle_per_endpoint,
            idle_timeout: opts.idle_timeout,
            empty_sweeps: AtomicU8::new(0),
        }
    }

    /// The newest idle connection that is open, ready and not expired.
    fn checkout(&self) -> Option<Sender> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let mut now = None;
        while let Some(c) = idle.pop() {
            if c.sender.is_closed() || !c.sender.is_ready() {
                continue;
            }
            let now = *now.get_or_insert_with(Instant::now);
            if now.saturating_duration_since(c.since) >= self.idle_timeout {
                // Everything below it is older still.
                idle.clear();
                return None;
            }
            return Some(c.sender);
        }
        None
    }

    fn put(&self, sender: Sender) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < self.max_idle {
            idle.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }

    /// Drops closed and expired connections; true when nothing is left.
    fn sweep(&self, now: Instant) -> bool {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.retain(|c| {
            !c.sender.is_closed() && now.saturating_duration_since(c.since) < self.idle_timeout
        });
        idle.is_empty()
    }
}

/// A connection in use by one exchange. Rides in the response body; when dropped it returns the
/// connection to its pool if the exchange left it reusable (the response was read to its end).
pub struct Lease {
    pool: Arc<EndpointPool>,
    sender: Option<Sender>,
}

impl Lease {
    /// The connection will not be reused (it was upgraded, or its state is unknown).
    pub fn discard(mut self) {
        self.sender = None;
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let Some(mut sender) = self.sender.take() else {
            return;
        };
        if sender.is_ready() {
            self.pool.put(sender);
        } else if !sender.is_closed() {
            // Usually hyper has already marked the connection idle when the body's last frame
            // arrives; if not yet, wait for it off the request path. A body dropped halfway
            // makes hyper close the connection, which ends the wait.
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let pool = self.pool.clone();
                rt.spawn(async move {
                    let ready = tokio::time::timeout(pool.idle_timeout, sender.ready()).await;
                    if matches!(ready, Ok(Ok(()))) {
                        pool.put(sender);
                    }
                });
            }
        }
    }
}

impl Upstream {
    pub fn new(opts: &UpstreamOptions) -> Result<Self, UpstreamError> {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(pem) = &opts.ca_bundle {
            let mut added = 0;
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|e| UpstreamError::CaBundle(e.to_string()))?;
                roots
                    .add(cert)
                    .map_err(|e| UpstreamError::CaBundle(e.to_string()))?;
                added += 1;
            }
            if added == 0 {
                return Err(UpstreamError::CaBundle("no certificate found".into()));
            }
        }
        let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| UpstreamError::CaBundle(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];

        let inner = Arc::new(Inner {
            pools: ArcSwap::from_pointee(PoolMap::default()),
            opts: opts.clone(),
            tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
            h1: http1::Builder::new(),
        });
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(sweep_pools(Arc::downgrade(&inner)));
        }
        Ok(Self { inner })
    }

    /// Sends one attempt on a pooled connection to `to`, or a new one. The request's URI is in
    /// origin form (`/path?query`) and it carries its own `Host`. The `Lease` must live as long
    /// as the response body (put it in the body's guards).
    pub async fn send(
        &self,
        to: &Connect,
        mut req: Request<ProxyBody>,
    ) -> Result<(Response<Incoming>, Lease), ProxyError> {
        let pool = self.inner.pool(to);
        // Reused connections first. One the server closed while it sat idle gives the request
        // back unsent (hyper knows nothing was written): it goes on the next connection.
        while let Some(mut sender) = pool.checkout() {
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok((resp, lease(pool, sender))),
                Err(mut e) => match e.take_message() {
                    Some(unsent) => {
                        tracing::debug!(error = %e.error(), "pooled connection closed; request not sent");
                        req = unsent;
                    }
                    None => return Err(classify(&e.into_error())),
                },
            }
        }
        // Boxed: connecting (TLS above all) is a large future and rare under keep-alive; inline
        // it would be part of every request's future.
        let mut sender = Box::pin(self.inner.connect(to)).await?;
        // A new connection takes its first request before hyper's task has polled it.
        match sender.try_send_request(req).await {
            Ok(resp) => Ok((resp, lease(pool, sender))),
            Err(e) => Err(classify(&e.into_error())),
        }
    }

    /// Idle connections held now, over all endpoints.
    pub fn idle_connections(&self) -> usize {
        let map = self.inner.pools.load();
        map.plain
            .values()
            .chain(map.tls.values())
            .map(|p| p.idle.lock().map_or(0, |v| v.len()))
            .sum()
    }
}

fn lease(pool: Arc<EndpointPool>, sender: Sender) -> Lease {
    Lease {
        pool,
        sender: Some(sender),
    }
}

impl Inner {
    fn pool(&self, to: &Connect) -> Arc<EndpointPool> {
        let map = self.pools.load();
        let found = match to {
            Connect::Addr(a) => map.plain.get(a),
            Connect::Tls(t) => map.tls.get(t),
        };
        if let Some(p) = found {
            return p.clone();
        }
        drop(map);
        // A new destination: copy the map with it added (another request may have added it
        // meanwhile; `rcu` retries on a concurrent change).
        let mut created = None;
        self.pools.rcu(|cur| {
            let mut next = PoolMap::clone(cur);
            let pool = match to {
                Connect::Addr(a) => next
                    .plain
                    .entry(*a)
                    .or_insert_with(|| Arc::new(EndpointPool::new(&self.opts))),
                Connect::Tls(t) => next
                    .tls
                    .entry(t.clone())
                    .or_insert_with(|| Arc::new(EndpointPool::new(&self.opts))),
            };
            created = Some(pool.clone());
            next
        });
        created.unwrap_or_else(|| Arc::new(EndpointPool::new(&self.opts)))
    }

    async fn connect(&self, to: &Connect) -> Result<Sender, ProxyError> {
        let attempt = async {
            match to {
                Connect::Addr(addr) => {
                    let tcp = TcpStream::connect(addr).await?;
                    tune(&tcp);
                    self.handshake(tcp).await
                }
                Connect::Tls(t) => {
                    let server_name = ServerName::try_from(t.host.to_string())
                        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
                    let tcp = connect_any(&t.host, t.port).await?;
                    tune(&tcp);
                    let stream = self.tls.connect(server_name, tcp).await?;
                    self.handshake(stream).await
                }
            }
        };
        match tokio::time::timeout(self.opts.connect_timeout, attempt).await {
            Ok(Ok(sender)) => Ok(sender),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "upstream connect failed");
                Err(ProxyError::ConnectFailed)
            }
            Err(_) => {
                tracing::debug!("upstream connect timed out");
                Err(ProxyError::ConnectFailed)
            }
        }
    }

    async fn handshake<T>(&self, io: T) -> std::io::Result<Sender>
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, conn) = self
            .h1
            .handshake(TokioIo::new(io))
            .await
            .map_err(std::io::Error::other)?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }
}

/// `TCP_NODELAY` (requests and responses are written whole) and keep-alive probes, so a
/// half-open idle connection is found before a request is sent on it.
fn tune(tcp: &TcpStream) {
    let _ = tcp.set_nodelay(true);
    let ka = socket2::TcpKeepalive::new().with_time(Duration::from_secs(60));
    let _ = socket2::SockRef::from(tcp).set_tcp_keepalive(&ka);
}

/// Resolves the host and connects to the first address that answers.
async fn connect_any(host: &str, port: u16) -> std::io::Result<TcpStream> {
    let mut last = None;
    for addr in tokio::net::lookup_host((host, port)).await? {
        match TcpStream::connect(addr).await {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no address for the backend host",
        )
    }))
}

/// Prunes expired and closed idle connections, and forgets destinations nobody used for two
/// sweeps (endpoints that left), until the client is dropped.
async fn sweep_pools(inner: Weak<Inner>) {
    let every = match inner.upgrade() {
        Some(i) => (i.opts.idle_timeout / 2).clamp(Duration::from_secs(1), Duration::from_secs(30)),
        None => return,
    };
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let now = Instant::now();
        let mut stale = false;
        let map = inner.pools.load();
        for pool in map.plain.values().chain(map.tls.values()) {
            // Only the map holds it: no request is using the destination right now.
            let unused = pool.sweep(now) && Arc::strong_count(pool) == 1;
            let n = if unused {
                pool.empty_sweeps.fetch_add(1, Ordering::Relaxed) + 1
            } else {
                pool.empty_sweeps.store(0, Ordering::Relaxed);
                0
            };
            stale |= n >= 2;
        }
        drop(map);
        if stale {
            inner.pools.rcu(|cur| {
                let mut next = PoolMap::clone(cur);
                let keep = |p: &Arc<EndpointPool>| p.empty_sweeps.load(Ordering::Relaxed) < 2;
                next.plain.retain(|_, p| keep(p));
                next.tls.retain(|_, p| keep(p));
                next
            });
        }
    }
}

/// The failure of a sent request: the client's own body (413, 400), or the upstream (502).
fn classify(e: &hyper::Error) -> ProxyError {
    if let Some(body_err) = request_body_error(e) {
        // The client's body failed while streaming upstream: its fault, not the upstream's
        // (502). Over `max_body_bytes` without a Content-Length: 413; badly framed (a chunk
        // size that is not hex) or cut short: 400.
        tracing::debug!(error = %body_err, "request body failed while streaming");
        match body_err {
            super::body::BodyError::TooLarge => ProxyError::PayloadTooLarge,
            _ => ProxyError::BadRequest,
        }
    } else {
        tracing::debug!(error = %e, "upstream request failed");
        ProxyError::UpstreamFailed
    }
}

/// The request body's own failure behind a failed send (a `BodyError` somewhere in the error's
/// source chain), if that is what it was.
fn request_body_error<'e>(
    e: &'e (dyn std::error::Error + 'static),
) -> Option<&'e super::body::BodyError> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(b) = err.downcast_ref::<super::body::BodyError>() {
            return Some(b);
        }
        cur = err.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Uri;
    use http_body_util::BodyExt;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A real HTTP/1.1 keep-alive server on 127.0.0.1:0 that counts its connections. Each
    /// response is `body`; with `close_after`, the server closes every connection after that
    /// many responses without saying so (as a backend's idle timeout does).
    async fn backend(
        body: &'static [u8],
        close_after: Option<usize>,
    ) -> (SocketAddr, Arc<AtomicUsize>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut served = 0;
                    let mut chunk = [0u8; 4096];
                    loop {
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            let head = format!(
                                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n",
                                body.len()
                            );
                            if s.write_all(head.as_bytes()).await.is_err()
                                || s.write_all(body).await.is_err()
                            {
                                return;
                            }
                            served += 1;
                            if close_after == Some(served) {
                                return;
                            }
                        }
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    fn get(addr: SocketAddr) -> Request<ProxyBody> {
        let mut r = Request::new(ProxyBody::empty());
        *r.uri_mut() = Uri::from_static("/x");
        r.headers_mut()
            .insert(http::header::HOST, addr.to_string().parse().unwrap());
        r
    }

    async fn exchange(up: &Upstream, addr: SocketAddr) -> Vec<u8> {
        let (resp, lease) = up.send(&Connect::Addr(addr), get(addr)).await.unwrap();
        let body = resp
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec();
        drop(lease);
        body
    }

    #[tokio::test]
    async fn sequential_requests_reuse_one_connection() {
        let (addr, accepted) = backend(b"hello", None).await;
        let up = Upstream::new(&UpstreamOptions::default()).unwrap();
        for _ in 0..20 {
            assert_eq!(exchange(&up, addr).await, b"hello");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(up.idle_connections(), 1);
    }

    #[tokio::test]
    async fn a_connection_the_backend_closed_is_not_reused() {
        let (addr, accepted) = backend(b"ok", Some(1)).await;
        let up = Upstream::new(&UpstreamOptions::default()).unwrap();
        for i in 1..=5 {
            assert_eq!(exchange(&up, addr).await, b"ok");
            // Let the client see the close before the next request (a close racing the next
            // request is the unsent-retry path; either way no request may fail).
            if i % 2 == 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 5);
    }

    #[tokio::test]
    async fn a_body_dropped_halfway_does_not_return_its_connection() {
        let big: &'static [u8] = Box::leak(vec![b'x'; 1 << 20].into_boxed_slice());
        let (addr, accepted) = backend(big, None).await;
        let up = Upstream::new(&UpstreamOptions::default()).unwrap();
        let (resp, lease) = up.send(&Connect::Addr(addr), get(addr)).await.unwrap();
        let mut body = resp.into_body();
        let _first = body.frame().await.unwrap().unwrap();
        drop(body);
        drop(lease);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(up.idle_connections(), 0);
        assert_eq!(exchange(&up, addr).await.len(), 1 << 20);
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn idle_connections_expire() {
        let (addr, accepted) = backend(b"ok", None).await;
        let opts = UpstreamOptions {
            idle_timeout: Duration::from_millis(100),
            ..UpstreamOptions::default()
        };
        let up = Upstream::new(&opts).unwrap();
        exchange(&up, addr).await;
        exchange(&up, addr).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        tokio::time::sleep(Duration::from_millis(150)).await;
        exchange(&up, addr).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn connect_failures_are_classified() {
        // A port nothing listens on (bound, then released).
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let up = Upstream::new(&UpstreamOptions::default()).unwrap();
        let err = up.send(&Connect::Addr(addr), get(addr)).await.err();
        assert!(matches!(err, Some(ProxyError::ConnectFailed)));
    }
}
