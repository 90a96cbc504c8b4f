//! A keep-alive client that counts what a drain does to it: hyper's own client connections
//! (HTTP/1.1, or HTTP/2 with prior knowledge) in a pool of our own, so that every request sent
//! into a connection the server then closed without answering is seen and counted as a
//! *resend*, as a pooling client (hyper-util's, Go's, urllib3's) would silently resend it.
//!
//! - HTTP/1.1: a LIFO pool of idle connections; a connection goes back to the pool after its
//!   response unless the response said `Connection: close` (counted as `told_close`) or the
//!   server has closed it. A connection found closed when taken from the pool is dropped
//!   (counted as `closed_idle`: the server closed it while nobody was using it, which no client
//!   meets).
//! - HTTP/2: one shared connection, replaced once it is closed. A stream the server's GOAWAY
//!   says it did not process (or that hyper cancelled before sending, the connection closing)
//!   is retried and counted as `refused`, not as a resend: RFC 9113 §6.8 tells the client it
//!   was not processed, so its retry is safe for any method. (hyper's client keeps opening
//!   streams after the first, "shutdown imminent" GOAWAY, which RFC 9113 asks clients not to
//!   do, so a busy connection meets a few of these at every drain.)
//!
//! New connections go to the current target (`retarget` moves it, as a load balancer's
//! endpoint list would). Used by tests/shutdown.rs (locally) and tests/node.rs (through a
//! Service's ClusterIP).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Version};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};

use super::lock;

/// The wire protocol of the pool's connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Http1,
    /// HTTP/2 over plain TCP with prior knowledge (h2c).
    Http2,
}

/// How long one attempt (connect, request, whole body) may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts per request: the first, and resends on a fresh connection.
const ATTEMPTS: u32 = 3;

/// What the pool has seen so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Requests asked of the pool.
    pub requests: u64,
    /// Requests answered (any status).
    pub answered: u64,
    /// Requests sent into a kept-alive connection that the server closed (or reset, or refused
    /// the stream of) without an answer, and sent again.
    pub resends: u64,
    /// HTTP/2 requests refused by GOAWAY (known not processed) and sent again.
    pub refused: u64,
    /// Requests that got no answer in [`ATTEMPTS`] attempts.
    pub failed: u64,
    /// New connections that could not be made (refused, reset during the handshake).
    pub connect_errors: u64,
    /// Connections opened.
    pub connections: u64,
    /// HTTP/1.1 answers that carried `Connection: close`.
    pub told_close: u64,
    /// Pooled connections found closed by the server while idle in the pool.
    pub closed_idle: u64,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    answered: AtomicU64,
    resends: AtomicU64,
    refused: AtomicU64,
    failed: AtomicU64,
    connect_errors: AtomicU64,
    connections: AtomicU64,
    told_close: AtomicU64,
    closed_idle: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// One answer.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: Bytes,
    /// The answer said `Connection: close`.
    pub close: bool,
    /// The address the connection was opened to.
    pub peer: SocketAddr,
    /// Attempts it took (1 unless resent).
    pub attempts: u32,
}

struct H1 {
    sender: http1::SendRequest<Empty<Bytes>>,
    peer: SocketAddr,
}

#[derive(Clone)]
struct H2 {
    sender: http2::SendRequest<Empty<Bytes>>,
    peer: SocketAddr,
}

enum Pooled {
    H1(H1),
    H2(H2),
}

/// The pool. Cheap to clone; clones share connections and counters.
#[derive(Clone)]
pub struct KeepAlive {
    inner: Arc<Inner>,
}

struct Inner {
    proto: Proto,
    target: Mutex<SocketAddr>,
    idle: Mutex<Vec<H1>>,
    shared: Mutex<Option<H2>>,
    counters: Counters,
    /// Why requests were resent (the first few).
    resend_causes: Mutex<Vec<String>>,
}

/// Why one attempt got no answer.
enum Miss {
    /// The connection could not be opened: nothing was sent.
    Connect(String),
    /// Sent into a connection that had already served (a kept-alive one), no answer.
    Reused(String),
    /// Sent into a fresh connection, no answer.
    Fresh(String),
    /// HTTP/2: GOAWAY says the stream was not processed.
    Refused(String),
}

impl KeepAlive {
    pub fn new(target: SocketAddr, proto: Proto) -> Self {
        Self {
            inner: Arc::new(Inner {
                proto,
                target: Mutex::new(target),
                idle: Mutex::new(Vec::new()),
                shared: Mutex::new(None),
                counters: Counters::default(),
                resend_causes: Mutex::new(Vec::new()),
            }),
        }
    }

    /// New connections go to `addr` from now on; open ones stay where they are.
    pub fn retarget(&self, addr: SocketAddr) {
        *lock(&self.inner.target) = addr;
    }

    pub fn stats(&self) -> Stats {
        let c = &self.inner.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Stats {
            requests: l(&c.requests),
            answered: l(&c.answered),
            resends: l(&c.resends),
            refused: l(&c.refused),
            failed: l(&c.failed),
            connect_errors: l(&c.connect_errors),
            connections: l(&c.connections),
            told_close: l(&c.told_close),
            closed_idle: l(&c.closed_idle),
        }
    }

    /// Why requests were resent (the first ten).
    pub fn resend_causes(&self) -> Vec<String> {
        lock(&self.inner.resend_causes).clone()
    }

    /// `GET path` with `headers`, resent on a fresh connection when a kept-alive one is closed
    /// under it; `Err` (counted as failed) when no attempt got an answer.
    pub async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Result<Reply, String> {
        let c = &self.inner.counters;
        bump(&c.requests);
        let mut last = String::new();
        for attempt in 1..=ATTEMPTS {
            let outcome = tokio::time::timeout(ATTEMPT_TIMEOUT, self.attempt(path, headers))
                .await
                .unwrap_or_else(|_| Err(Miss::Fresh(format!("no answer in {ATTEMPT_TIMEOUT:?}"))));
            match outcome {
                Ok(mut reply) => {
                    bump(&c.answered);
                    reply.attempts = attempt;
                    return Ok(reply);
                }
                Err(Miss::Reused(e)) => {
                    bump(&c.resends);
                    let mut causes = lock(&self.inner.resend_causes);
                    if causes.len() < 10 {
                        causes.push(e.clone());
                    }
                    last = format!("kept-alive connection closed under the request: {e}");
                }
                Err(Miss::Refused(e)) => {
                    bump(&c.refused);
                    last = format!("refused by GOAWAY: {e}");
                }
                Err(Miss::Connect(e)) => {
                    bump(&c.connect_errors);
                    last = format!("connect: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(Miss::Fresh(e)) => last = format!("fresh connection: {e}"),
            }
        }
        bump(&c.failed);
        Err(last)
    }

    async fn attempt(&self, path: &str, headers: &[(&str, &str)]) -> Result<Reply, Miss> {
        let (conn, reused) = self.checkout().await?;
        let peer = match &conn {
            Pooled::H1(h) => h.peer,
            Pooled::H2(h) => h.peer,
        };
        let mut req = Request::get(path);
        if self.inner.proto == Proto::Http2 {
            req = req
                .version(Version::HTTP_2)
                .uri(format!("http://{peer}{path}"));
        } else {
            req = req.header(http::header::HOST, peer.to_string());
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req
            .body(Empty::<Bytes>::new())
            .map_err(|e| Miss::Fresh(e.to_string()))?;
        let miss = |e: String| {
            if reused {
                Miss::Reused(e)
            } else {
                Miss::Fresh(e)
            }
        };
        let (resp, h1) = match conn {
            Pooled::H1(mut h) => {
                let r = h.sender.send_request(req).await;
                (r, Some(h))
            }
            Pooled::H2(mut h) => (h.sender.send_request(req).await, None),
        };
        let resp = resp.map_err(|e| {
            let text = format!("{e:?}");
            // hyper hides h2's error type: its Debug names the GOAWAY and its code.
            let unprocessed = e.is_canceled()
                || (text.contains("GoAway(") && text.contains("NO_ERROR"))
                || text.contains("REFUSED_STREAM");
            if self.inner.proto == Proto::Http2 && unprocessed {
                Miss::Refused(text)
            } else {
                miss(text)
            }
        })?;
        let status = resp.status().as_u16();
        let close = resp
            .headers()
            .get(http::header::CONNECTION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| Miss::Fresh(format!("body: {e}")))?
            .to_bytes();
        if close {
            bump(&self.inner.counters.told_close);
        }
        if let Some(h) = h1 {
            if !close && !h.sender.is_closed() {
                lock(&self.inner.idle).push(h);
            }
        }
        Ok(Reply {
            status,
            body,
            close,
            peer,
            attempts: 1,
        })
    }

    /// A connection to send on, and whether it has served before.
    async fn checkout(&self) -> Result<(Pooled, bool), Miss> {
        match self.inner.proto {
            Proto::Http1 => {
                loop {
                    let Some(mut h) = lock(&self.inner.idle).pop() else {
                        break;
                    };
                    // As a pooling client does on checkout: is it still usable?
                    let usable = !h.sender.is_closed()
                        && tokio::time::timeout(Duration::from_millis(1), h.sender.ready())
                            .await
                            .is_ok_and(|r| r.is_ok());
                    if usable {
                        return Ok((Pooled::H1(h), true));
                    }
                    bump(&self.inner.counters.closed_idle);
                }
                let (io, peer) = self.connect().await?;
                let (sender, conn) = http1::handshake(io)
                    .await
                    .map_err(|e| Miss::Connect(e.to_string()))?;
                tokio::spawn(conn);
                Ok((Pooled::H1(H1 { sender, peer }), false))
            }
            Proto::Http2 => {
                let current = lock(&self.inner.shared).clone();
                if let Some(h) = current {
                    if !h.sender.is_closed() && h.sender.is_ready() {
                        return Ok((Pooled::H2(h), true));
                    }
                    bump(&self.inner.counters.closed_idle);
                }
                let (io, peer) = self.connect().await?;
                let (sender, conn) = http2::handshake(TokioExecutor::new(), io)
                    .await
                    .map_err(|e| Miss::Connect(e.to_string()))?;
                tokio::spawn(conn);
                let h = H2 { sender, peer };
                *lock(&self.inner.shared) = Some(h.clone());
                // Its first request is a fresh one; later ones reuse it.
                Ok((Pooled::H2(h), false))
            }
        }
    }

    async fn connect(&self) -> Result<(TokioIo<tokio::net::TcpStream>, SocketAddr), Miss> {
        let addr = *lock(&self.inner.target);
        let s = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| Miss::Connect(e.to_string()))?;
        let _ = s.set_nodelay(true);
        bump(&self.inner.counters.connections);
        Ok((TokioIo::new(s), addr))
    }
}
