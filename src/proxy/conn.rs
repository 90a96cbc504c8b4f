//! The life of a client connection apart from its protocol: counters its I/O and requests bump
//! (one relaxed add each), and the watchdog that reads them to close a connection that is idle
//! too long, or that takes too long to send a request head. Knows nothing of HTTP parsing.
//!
//! Why a watchdog of our own: hyper's HTTP/1 `header_read_timeout` starts as soon as the
//! connection waits for a head, so an idle keep-alive connection closed at the header read
//! timeout (10 s); behind a load balancer whose idle timeout is longer, that makes resets.
//! Here the idle time (`--idle-timeout`) and the time to send a head once it has started
//! (`--header-read-timeout`) are separate limits.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// While draining, a connection idle for this long is closed (HTTP/1.1: a keep-alive
/// connection with nothing in flight; HTTP/2 gets GOAWAY at once). A request that arrives
/// before then is served with `Connection: close`. Short, so a pod's drain does not wait the
/// whole grace period for clients that keep idle connections; long enough that a client
/// under load sends its next request on the connection first and learns of the close.
pub const DRAIN_IDLE: Duration = Duration::from_secs(1);

/// What a connection's I/O and requests have done, read by its watchdog.
#[derive(Debug, Default)]
pub struct ConnActivity {
    reads: AtomicU64,
    requests: AtomicU64,
    in_flight: AtomicU32,
    /// An HTTP/2 request was seen: on the plain port, where the protocol is detected from the
    /// first bytes, this is how the watchdog and the drain learn that it is HTTP/2 (h2c).
    multiplexed: AtomicBool,
}

impl ConnActivity {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// A request has arrived; the connection is busy until the returned guard (which rides in
    /// the response body) is dropped.
    pub fn request(self: &Arc<Self>) -> Busy {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        Busy(self.clone())
    }

    /// The connection turned out to be HTTP/2 (called on its HTTP/2 requests only).
    pub fn multiplexed(&self) {
        self.multiplexed.store(true, Ordering::Relaxed);
    }

    pub fn is_multiplexed(&self) -> bool {
        self.multiplexed.load(Ordering::Relaxed)
    }

    fn read(&self) -> (u64, u64, u32) {
        (
            self.reads.load(Ordering::Relaxed),
            self.requests.load(Ordering::Relaxed),
            self.in_flight.load(Ordering::Relaxed),
        )
    }
}

/// Held while a request (and its response body) is in flight on a connection.
#[derive(Debug)]
pub struct Busy(Arc<ConnActivity>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connection's stream, counting the reads that brought bytes.
pub struct Watched<S> {
    inner: S,
    activity: Arc<ConnActivity>,
}

impl<S> Watched<S> {
    pub fn new(inner: S, activity: Arc<ConnActivity>) -> Self {
        Self { inner, activity }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.reads.fetch_add(1, Ordering::Relaxed);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The two limits a watchdog enforces.
#[derive(Clone, Copy, Debug)]
pub struct ConnTimeouts {
    /// From the first byte of a request head (or from the connection's start, for the first
    /// request: TLS handshake and HTTP/2 preface included) to the whole head.
    pub header: Duration,
    /// Nothing in flight and nothing read: the connection is closed after this long.
    pub idle: Duration,
}

/// Why a watchdog ended a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expiry {
    /// A request head was not complete in time (slow or silent client): close at once.
    Header,
    /// Idle too long: close cleanly (HTTP/2: GOAWAY).
    Idle,
}

#[derive(Clone, Copy, Debug)]
enum State {
    /// A request is in flight.
    Busy,
    /// Nothing in flight or being read since `since`.
    Idle { since: Instant },
    /// Bytes of a head have arrived since `since`; no request yet.
    Head { since: Instant },
}

/// Watches one connection's activity. Checks are ticks (a quarter of the limit that applies),
/// so a limit is enforced within 1.25 × its value and an idle connection costs a timer wake-up
/// every quarter limit, never work per byte.
#[derive(Debug)]
pub struct Watchdog {
    limits: ConnTimeouts,
    /// HTTP/2: reads while idle are PINGs and SETTINGS, not request heads; as for Envoy's
    /// `idle_timeout`, a connection without a stream for the idle limit is idle.
    multiplexed: bool,
    state: State,
    seen_reads: u64,
    seen_requests: u64,
}

impl Watchdog {
    /// A new connection: its first request head must be complete within the header limit.
    pub fn new(limits: ConnTimeouts, multiplexed: bool) -> Self {
        Self {
            limits,
            multiplexed,
            state: State::Head {
                since: Instant::now(),
            },
            seen_reads: 0,
            seen_requests: 0,
        }
    }

    /// Completes when the connection should end. `draining`: the gateway is shutting down, so
    /// an idle connection is closed after [`DRAIN_IDLE`] instead of the idle timeout, and an
    /// HTTP/2 connection at the next tick (GOAWAY: its streams finish, no new ones come).
    pub async fn expired(&mut self, activity: &ConnActivity, draining: bool) -> Expiry {
        let idle = if draining {
            self.limits.idle.min(DRAIN_IDLE)
        } else {
            self.limits.idle
        };
        loop {
            let limit = match self.state {
                State::Head { .. } => self.limits.header,
                State::Busy | State::Idle { .. } => idle,
            };
            // Draining: short ticks in every state, so that a connection that has just served
            // its first request is seen idle (and closed) within the drain's idle limit.
            let tick = if draining { limit.min(idle) } else { limit };
            tokio::time::sleep((tick / 4).max(Duration::from_millis(10))).await;
            if activity.is_multiplexed() {
                if draining {
                    return Expiry::Idle;
                }
                self.multiplexed = true;
            }
            if let Some(e) = self.check(activity.read(), Instant::now(), idle) {
                return e;
            }
        }
    }

    fn check(
        &mut self,
        (reads, requests, in_flight): (u64, u64, u32),
        now: Instant,
        idle: Duration,
    ) -> Option<Expiry> {
        let new_request = requests != self.seen_requests;
        let new_bytes = reads != self.seen_reads;
        self.seen_requests = requests;
        self.seen_reads = reads;
        self.state = match self.state {
            _ if in_flight > 0 => State::Busy,
            // A request came and went since the last look, or one just ended.
            _ if new_request => State::Idle { since: now },
            State::Busy => State::Idle { since: now },
            State::Idle { .. } if new_bytes && !self.multiplexed => State::Head { since: now },
            s => s,
        };
        match self.state {
            State::Head { since } if now.duration_since(since) >= self.limits.header => {
                Some(Expiry::Header)
            }
            State::Idle { since } if now.duration_since(since) >= idle => Some(Expiry::Idle),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: ConnTimeouts = ConnTimeouts {
        header: Duration::from_secs(10),
        idle: Duration::from_secs(60),
    };

    #[test]
    fn a_first_request_must_arrive_within_the_header_limit() {
        let mut w = Watchdog::new(LIMITS, false);
        let t0 = Instant::now();
        let idle = LIMITS.idle;
        assert_eq!(w.check((1, 0, 0), t0 + Duration::from_secs(9), idle), None);
        assert_eq!(
            w.check((2, 0, 0), t0 + Duration::from_secs(11), idle),
            Some(Expiry::Header)
        );
    }

    #[test]
    fn keep_alive_waits_for_the_idle_limit_not_the_header_limit() {
        let mut w = Watchdog::new(LIMITS, false);
        let t0 = Instant::now();
        let idle = LIMITS.idle;
        let s = |n| t0 + Duration::from_secs(n);
        assert_eq!(w.check((1, 1, 1), s(1), idle), None); // busy
        assert_eq!(w.check((1, 1, 0), s(2), idle), None); // idle from 2 s
        assert_eq!(w.check((1, 1, 0), s(30), idle), None); // 28 s idle: still open
        assert_eq!(w.check((1, 1, 0), s(62), idle), Some(Expiry::Idle));
    }

    #[test]
    fn a_head_started_on_a_keep_alive_connection_gets_the_header_limit() {
        let mut w = Watchdog::new(LIMITS, false);
        let t0 = Instant::now();
        let idle = LIMITS.idle;
        let s = |n| t0 + Duration::from_secs(n);
        assert_eq!(w.check((1, 1, 0), s(1), idle), None); // a request came and went
        assert_eq!(w.check((2, 1, 0), s(20), idle), None); // bytes, no request: a head
        assert_eq!(w.check((3, 1, 0), s(25), idle), None);
        assert_eq!(w.check((4, 1, 0), s(31), idle), Some(Expiry::Header));
    }

    #[test]
    fn http2_pings_do_not_count_as_a_head() {
        let mut w = Watchdog::new(LIMITS, true);
        let t0 = Instant::now();
        let idle = LIMITS.idle;
        let s = |n| t0 + Duration::from_secs(n);
        assert_eq!(w.check((1, 1, 0), s(1), idle), None);
        assert_eq!(w.check((2, 1, 0), s(20), idle), None);
        assert_eq!(w.check((3, 1, 0), s(40), idle), None);
        assert_eq!(w.check((3, 1, 0), s(95), idle), Some(Expiry::Idle));
    }

    #[test]
    fn draining_shortens_the_idle_limit() {
        let mut w = Watchdog::new(LIMITS, false);
        let t0 = Instant::now();
        let s = |ms| t0 + Duration::from_millis(ms);
        assert_eq!(w.check((1, 1, 0), s(100), DRAIN_IDLE), None);
        assert_eq!(w.check((1, 1, 0), s(1200), DRAIN_IDLE), Some(Expiry::Idle));
    }
}
