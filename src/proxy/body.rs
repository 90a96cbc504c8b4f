//! `ProxyBody`: the one body type the proxy sends either way. It streams frame by frame (never
//! buffers), enforces size limits, idle and total deadlines, and carries guards and taps to the end.

use std::any::Any;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use super::conn::Busy;

/// What can go wrong while a body streams.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The peer's body failed (reset, protocol error).
    #[error("body stream failed: {0}")]
    Stream(#[from] hyper::Error),
    /// More bytes than allowed.
    #[error("body exceeds the size limit")]
    TooLarge,
    /// No frame for longer than the idle timeout.
    #[error("stream idle for too long")]
    Idle,
    /// The whole-exchange deadline passed.
    #[error("request deadline passed")]
    Deadline,
    /// The key that opened the stream is no longer valid.
    #[error("credentials revoked")]
    Revoked,
}

/// Watches the bytes of a body as they pass (token usage, for example); must not hold them up.
pub trait BodyTap: Send {
    fn on_data(&mut self, data: &[u8]);
    /// Called once: `complete` is false when the stream failed or was dropped early.
    fn on_end(&mut self, complete: bool);
}

/// Rewrites a body's data as it passes (an MCP `tools/list` answer cut to what the caller may
/// use); may hold bytes back until it has a whole unit, and give them at the end.
pub trait BodyMap: Send {
    fn data(&mut self, data: &[u8]) -> Result<Bytes, BodyError>;
    fn end(&mut self) -> Bytes;
}

/// A body whose data goes through a [`BodyMap`].
struct Mapped {
    inner: ProxyBody,
    map: Box<dyn BodyMap>,
    done: bool,
}

enum Inner {
    Empty,
    Full(Option<Bytes>),
    Incoming(Incoming),
    Mapped(Box<Mapped>),
}

struct Extras {
    idle: Option<(Duration, Pin<Box<Sleep>>)>,
    deadline: Option<Pin<Box<Sleep>>>,
    tap: Option<Box<dyn BodyTap>>,
    /// Dropped with the body: in-flight counts, stream gauges.
    _guards: Vec<Box<dyn Any + Send>>,
    revoked: Option<Pin<Box<dyn std::future::Future<Output = ()> + Send>>>,
    ended: bool,
}

/// A streaming body with optional limits, timers and guards.
pub struct ProxyBody {
    inner: Inner,
    limit: Option<u64>,
    extras: Option<Box<Extras>>,
    /// Keeps the client connection busy until the response body is gone (not in `extras`: every
    /// response carries one, and it must cost no allocation).
    busy: Option<Busy>,
}

impl ProxyBody {
    pub fn empty() -> Self {
        Self {
            inner: Inner::Empty,
            limit: None,
            extras: None,
            busy: None,
        }
    }
    pub fn full(b: impl Into<Bytes>) -> Self {
        let b = b.into();
        Self {
            inner: if b.is_empty() {
                Inner::Empty
            } else {
                Inner::Full(Some(b))
            },
            limit: None,
            extras: None,
            busy: None,
        }
    }
    pub fn incoming(b: Incoming) -> Self {
        Self {
            inner: Inner::Incoming(b),
            limit: None,
            extras: None,
            busy: None,
        }
    }
    /// `inner`'s data rewritten by `map` (its limits, timers and guards stay with `inner`).
    pub fn mapped(inner: ProxyBody, map: Box<dyn BodyMap>) -> Self {
        Self {
            inner: Inner::Mapped(Box::new(Mapped {
                inner,
                map,
                done: false,
            })),
            limit: None,
            extras: None,
            busy: None,
        }
    }
    /// Holds the client connection busy (for its idle watchdog) until the body is gone.
    pub fn with_busy(mut self, busy: Busy) -> Self {
        self.busy = Some(busy);
        self
    }
    /// Refuses to stream more than `max` bytes.
    pub fn with_limit(mut self, max: u64) -> Self {
        self.limit = Some(max);
        self
    }
    fn extras(&mut self) -> &mut Extras {
        self.extras.get_or_insert_with(|| {
            Box::new(Extras {
                idle: None,
                deadline: None,
                tap: None,
                _guards: Vec::new(),
                revoked: None,
                ended: false,
            })
        })
    }
    pub fn with_idle_timeout(mut self, d: Option<Duration>) -> Self {
        if let Some(d) = d {
            self.extras().idle = Some((d, Box::pin(tokio::time::sleep(d))));
        }
        self
    }
    pub fn with_deadline(mut self, at: Option<Instant>) -> Self {
        if let Some(at) = at {
            self.extras().deadline = Some(Box::pin(tokio::time::sleep_until(at)));
        }
        self
    }
    pub fn with_tap(mut self, tap: Option<Box<dyn BodyTap>>) -> Self {
        if tap.is_some() {
            self.extras().tap = tap;
        }
        self
    }
    pub fn with_guard(mut self, g: Box<dyn Any + Send>) -> Self {
        self.extras()._guards.push(g);
        self
    }
    /// Ends the stream with an error once `revoked` completes (key revoked mid-stream).
    pub fn with_revocation(
        mut self,
        revoked: Option<Pin<Box<dyn std::future::Future<Output = ()> + Send>>>,
    ) -> Self {
        if revoked.is_some() {
            self.extras().revoked = revoked;
        }
        self
    }
    /// Whether this body is already fully in memory (a replayable request body).
    pub fn as_full(&self) -> Option<Bytes> {
        match &self.inner {
            Inner::Empty => Some(Bytes::new()),
            Inner::Full(b) => Some(b.clone().unwrap_or_default()),
            Inner::Incoming(_) | Inner::Mapped(_) => None,
        }
    }
}

impl Drop for ProxyBody {
    fn drop(&mut self) {
        if let Some(x) = &mut self.extras {
            if !x.ended {
                x.ended = true;
                if let Some(t) = &mut x.tap {
                    t.on_end(false);
                }
            }
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        if let Some(x) = &mut this.extras {
            if x.ended {
                return Poll::Ready(None);
            }
            if let Some(d) = &mut x.deadline {
                if d.as_mut().poll(cx).is_ready() {
                    x.ended = true;
                    if let Some(t) = &mut x.tap {
                        t.on_end(false);
                    }
                    return Poll::Ready(Some(Err(BodyError::Deadline)));
                }
            }
            if let Some(r) = &mut x.revoked {
                if r.as_mut().poll(cx).is_ready() {
                    x.ended = true;
                    if let Some(t) = &mut x.tap {
                        t.on_end(false);
                    }
                    return Poll::Ready(Some(Err(BodyError::Revoked)));
                }
            }
        }
        let polled = match &mut this.inner {
            Inner::Empty => Poll::Ready(None),
            Inner::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Inner::Incoming(i) => Pin::new(i)
                .poll_frame(cx)
                .map(|o| o.map(|r| r.map_err(BodyError::from))),
            Inner::Mapped(m) => m.poll_mapped(cx),
        };
        match polled {
            Poll::Pending => {
                if let Some(x) = &mut this.extras {
                    if let Some((_, sleep)) = &mut x.idle {
                        if sleep.as_mut().poll(cx).is_ready() {
                            x.ended = true;
                            if let Some(t) = &mut x.tap {
                                t.on_end(false);
                            }
                            return Poll::Ready(Some(Err(BodyError::Idle)));
                        }
                    }
                }
                Poll::Pending
            }
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if let Some(limit) = &mut this.limit {
                        let n = data.len() as u64;
                        if n > *limit {
                            return Poll::Ready(Some(Err(BodyError::TooLarge)));
                        }
                        *limit -= n;
                    }
                    if let Some(x) = &mut this.extras {
                        if let Some((d, sleep)) = &mut x.idle {
                            sleep.as_mut().reset(Instant::now() + *d);
                        }
                        if let Some(t) = &mut x.tap {
                            t.on_data(data);
                        }
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                if let Some(x) = &mut this.extras {
                    x.ended = true;
                    if let Some(t) = &mut x.tap {
                        t.on_end(true);
                    }
                }
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                if let Some(x) = &mut this.extras {
                    x.ended = true;
                    if let Some(t) = &mut x.tap {
                        t.on_end(false);
                    }
                }
                Poll::Ready(Some(Err(e)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Empty => true,
            Inner::Full(b) => b.is_none(),
            Inner::Incoming(i) => i.is_end_stream(),
            Inner::Mapped(m) => m.done,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Empty => SizeHint::with_exact(0),
            Inner::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Inner::Incoming(i) => i.size_hint(),
            Inner::Mapped(_) => SizeHint::default(),
        }
    }
}

impl Mapped {
    fn poll_mapped(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        loop {
            if self.done {
                return Poll::Ready(None);
            }
            match Pin::new(&mut self.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => match self.map.data(&data) {
                        Ok(out) if out.is_empty() => continue,
                        Ok(out) => return Poll::Ready(Some(Ok(Frame::data(out)))),
                        Err(e) => {
                            self.done = true;
                            return Poll::Ready(Some(Err(e)));
                        }
                    },
                    // Trailers pass as they are.
                    Err(frame) => return Poll::Ready(Some(Ok(frame))),
                },
                Poll::Ready(Some(Err(e))) => {
                    self.done = true;
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(None) => {
                    self.done = true;
                    let rest = self.map.end();
                    if rest.is_empty() {
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(rest))));
                }
            }
        }
    }
}
