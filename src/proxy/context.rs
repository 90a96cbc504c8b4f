//! The per-request context the phases share: the request head and body, what the phases have
//! decided so far (route, caller, limits, reservation), and what the access log needs at the end.
//! Built from `http` types, never from hyper's: the HTTP/1.1 layer below can change under it.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http_body::Body as _;
use http_body_util::BodyExt;
use tokio::time::Instant;

use super::body::{BodyError, ProxyBody};
use super::error::{LimitHeaders, ProxyError};
use super::headers;
use super::Gateway;
use crate::auth::extract::KeyCarrier;
use crate::auth::keys::{KeyDigest, KeyEntry, SecretString};
use crate::config::{path, Snapshot};
use crate::ratelimit::TokenReservation;

/// Facts about the client connection.
#[derive(Clone, Copy, Debug)]
pub struct ConnInfo {
    pub remote: SocketAddr,
    pub tls: bool,
}

/// The authenticated caller.
pub struct Caller {
    pub key: Arc<KeyEntry>,
    pub digest: KeyDigest,
    /// The plain key, kept (redacted in Debug) only while a request or stream of a caller
    /// admitted by the external auth service is open, so a long stream can ask again when the
    /// cached answer expires. `None` for keys of the key store.
    pub external: Option<SecretString>,
}

/// Who the limits count a request against.
pub(crate) enum ClientKey {
    /// No limit applies to this request: nothing to name.
    None,
    /// The caller's client id.
    Caller,
    /// An anonymous caller on a limited route: `ip:<address>`.
    Address(String),
}

/// What the access log and metrics need once a request is answered.
#[derive(Default)]
pub(crate) struct Outcome {
    pub(crate) route: Option<Arc<str>>,
    pub(crate) upstream: Option<Arc<str>>,
    pub(crate) client: Option<Arc<str>>,
    /// MCP routes: the JSON-RPC method label and the tool, for the access line.
    pub(crate) mcp: Option<Box<(&'static str, Option<String>)>>,
}

/// The request body, in the one state it is in.
pub(crate) enum RequestBody {
    /// Not read: forwarded as it arrives, so only one attempt can send it.
    Streaming(ProxyBody),
    /// In memory, read to inspect it (a `bodyField` match, a token estimate) or kept to replay
    /// it: every attempt sends it again (a `Bytes` clone, not a copy).
    Buffered(Bytes),
    /// Sent by an attempt that consumed the stream.
    Taken,
}

impl RequestBody {
    /// The body in memory, read now (at most `cap` bytes: 413 above) unless it already is.
    pub(crate) async fn buffer(&mut self, cap: u64) -> Result<&Bytes, ProxyError> {
        if let RequestBody::Streaming(stream) = self {
            let stream = std::mem::replace(stream, ProxyBody::empty());
            *self = RequestBody::Taken;
            let bytes = match stream.with_limit(cap).collect().await {
                Ok(c) => c.to_bytes(),
                Err(BodyError::TooLarge) => return Err(ProxyError::PayloadTooLarge),
                Err(_) => return Err(ProxyError::BadRequest),
            };
            *self = RequestBody::Buffered(bytes);
        }
        match self {
            RequestBody::Buffered(b) => Ok(b),
            _ => Err(ProxyError::BadRequest),
        }
    }

    /// The body if it is in memory.
    pub(crate) fn buffered(&self) -> Option<&Bytes> {
        match self {
            RequestBody::Buffered(b) => Some(b),
            _ => None,
        }
    }

    /// Keeps the body so that a retry can send it again: an ended body costs nothing; a body
    /// announced at no more than `limit` bytes is read. False when it stays a stream.
    pub(crate) async fn make_replayable(
        &mut self,
        content_length: Option<u64>,
        limit: u64,
    ) -> Result<bool, ProxyError> {
        match self {
            RequestBody::Buffered(_) => Ok(true),
            RequestBody::Taken => Ok(false),
            RequestBody::Streaming(s) if s.is_end_stream() => {
                *self = RequestBody::Buffered(Bytes::new());
                Ok(true)
            }
            RequestBody::Streaming(_) => match content_length {
                Some(n) if n <= limit => self.buffer(n).await.map(|_| true),
                _ => Ok(false),
            },
        }
    }

    /// The body for one attempt: a copy when in memory, else the stream itself (once), capped
    /// at `max` bytes as it passes.
    pub(crate) fn for_attempt(&mut self, max: u64) -> ProxyBody {
        match std::mem::replace(self, RequestBody::Taken) {
            RequestBody::Buffered(b) => {
                let body = ProxyBody::full(b.clone());
                *self = RequestBody::Buffered(b);
                body
            }
            RequestBody::Streaming(s) => s.with_limit(max),
            RequestBody::Taken => ProxyBody::empty(),
        }
    }
}

/// Refunds a token reservation if the request never reached a response (the upstream did no
/// work); a response takes the reservation over and settles it from the reported usage.
#[derive(Default)]
pub(crate) struct ReservationGuard(pub(crate) Option<TokenReservation>);

impl Drop for ReservationGuard {
    fn drop(&mut self) {
        if let Some(r) = self.0.take() {
            r.release();
        }
    }
}

/// One request on its way through the phases.
pub(crate) struct RequestCtx<'g> {
    pub(crate) gw: &'g Arc<Gateway>,
    /// The snapshot the request started with; every phase reads this one.
    pub(crate) snap: Arc<Snapshot>,
    pub(crate) conn: ConnInfo,
    pub(crate) request_id: HeaderValue,
    pub(crate) started: Instant,
    /// Method, target, version and headers; the headers become the upstream's in `forward`.
    pub(crate) head: http::request::Parts,
    pub(crate) body: RequestBody,
    /// The normalised path, when it differs from the target's (else the target's is used).
    pub(crate) normalized: Option<Box<str>>,
    /// A CORS preflight (OPTIONS with `Origin` and `Access-Control-Request-Method`).
    pub(crate) preflight: bool,
    /// The request's `Origin`, kept on routes with a CORS policy for the answer's headers.
    pub(crate) origin: Option<HeaderValue>,
    pub(crate) caller: Option<Caller>,
    pub(crate) carrier: Option<KeyCarrier>,
    pub(crate) client: ClientKey,
    /// The `RateLimit-*` values of the tightest request bucket, sent on the answer.
    pub(crate) rate_headers: Option<LimitHeaders>,
    pub(crate) reservation: ReservationGuard,
    pub(crate) outcome: Outcome,
}

impl<'g> RequestCtx<'g> {
    pub(crate) fn new(
        gw: &'g Arc<Gateway>,
        head: http::request::Parts,
        body: ProxyBody,
        conn: ConnInfo,
    ) -> Self {
        Self {
            gw,
            snap: gw.snapshot(),
            conn,
            request_id: headers::request_id(&head.headers),
            started: Instant::now(),
            head,
            body: RequestBody::Streaming(body),
            normalized: None,
            preflight: false,
            origin: None,
            caller: None,
            carrier: None,
            client: ClientKey::None,
            rate_headers: None,
            reservation: ReservationGuard::default(),
            outcome: Outcome::default(),
        }
    }

    /// Normalises the target's path once (400 when it cannot be); `path()` returns it after.
    pub(crate) fn normalize_path(&mut self) -> Result<(), ProxyError> {
        self.normalized = match path::normalize(self.head.uri.path()) {
            Ok(Cow::Borrowed(_)) => None,
            Ok(Cow::Owned(p)) => Some(p.into_boxed_str()),
            Err(_) => return Err(ProxyError::BadRequest),
        };
        Ok(())
    }

    /// The normalised path: what is matched and forwarded.
    pub(crate) fn path(&self) -> &str {
        self.normalized
            .as_deref()
            .unwrap_or_else(|| self.head.uri.path())
    }

    /// The id limits count this request against (empty when no limit applies).
    pub(crate) fn client(&self) -> &str {
        match (&self.client, &self.caller) {
            (ClientKey::Caller, Some(c)) => &c.key.client_id,
            (ClientKey::Address(a), _) => a,
            _ => "",
        }
    }

    /// The announced body length, if any.
    pub(crate) fn content_length(&self) -> Option<u64> {
        self.head
            .headers
            .get(header::CONTENT_LENGTH)?
            .to_str()
            .ok()?
            .parse()
            .ok()
    }

    /// 413 when the announced body is larger than `max`.
    pub(crate) fn check_content_length(&self, max: u64) -> Result<(), ProxyError> {
        match self.content_length() {
            Some(n) if n > max => Err(ProxyError::PayloadTooLarge),
            _ => Ok(()),
        }
    }
}

/// The request's host, lower-case, without userinfo, port or trailing dot (absolute-form URI
/// first, else `Host`); empty when there is none.
pub fn host_of(parts: &http::request::Parts) -> Cow<'_, str> {
    let raw = parts
        .uri
        .authority()
        .map(|a| a.as_str())
        .or_else(|| {
            parts
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
        })
        .unwrap_or("");
    // Strip userinfo (absolute-form), a port (not inside an IPv6 literal), a trailing dot.
    let raw = raw.rsplit_once('@').map_or(raw, |(_, h)| h);
    let host = if let Some(rest) = raw.strip_prefix('[') {
        rest.split(']').next().unwrap_or(rest)
    } else {
        raw.rsplit_once(':').map_or(raw, |(h, _)| h)
    };
    let host = host.trim_end_matches('.');
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    }
}
