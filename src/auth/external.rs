//! External auth (`--ext-auth-url`): a key unknown to the key store is asked of the seed's auth
//! service (`POST {"api_key": "..."}` → `200 {"client_id", "roles"}`), the answer cached by the
//! key's SHA-256 digest. Knows nothing of routes or the proxy; never logs or stores a plain key.
//!
//! Promises:
//! - one call per key per TTL: concurrent first requests with the same key wait for one call
//!   (coalesced through a `watch` channel per pending digest), later ones read the cache;
//! - answers: 200 with a usable body admits; 401/403 refuses the key (`invalid_key`); anything
//!   else (connection refused, timeout, 5xx, another status, a malformed body) is "unavailable"
//!   and the gateway fails closed (503 `auth_unavailable`), never open;
//! - admissions are cached for `ttl`, refusals and failures for `failure_ttl`;
//! - at most `max_concurrent` calls are in flight; beyond that a new key is refused as
//!   unavailable at once (not cached), so a flood of distinct unknown keys cannot start more;
//! - the plain key exists only while a call is in flight ([`SecretString`]); the cache holds digests.

use std::collections::HashMap;
use std::fmt;
use std::hash::BuildHasherDefault;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde::Deserialize;
use tokio::sync::watch;
use tokio::time::Instant;

use super::keys::{
    fingerprint, DigestHasher, Fingerprint, KeyDigest, KeyEntry, KeyLimits, SecretString,
};

/// How long an admission is cached unless configured (`--ext-auth-ttl`).
pub const DEFAULT_TTL: Duration = Duration::from_secs(300);
/// How long a refusal or a failure is cached unless configured (`--ext-auth-failure-ttl`): long
/// enough that a client retrying a bad key in a loop costs the auth service one call per 5 s,
/// short enough that a recovered service is used again almost at once.
pub const DEFAULT_FAILURE_TTL: Duration = Duration::from_secs(5);
/// The longest wait for the auth service (`--ext-auth-timeout`), connect and body included.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
/// Cached answers kept at most (admissions are always cached; beyond this, refusals of random
/// keys are not, so a flood of made-up keys cannot grow memory without bound).
pub const DEFAULT_MAX_ENTRIES: usize = 100_000;
/// An answer is a client id and a few roles: 64 KiB is far more than any honest one.
const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// Longest client id accepted (a DNS-label-sized name; it becomes the `X-Client-Id` header).
const MAX_CLIENT_ID_LEN: usize = 253;
/// Calls in flight at most, by default. Each waits up to the timeout (2 s), so this bounds the
/// load a flood of distinct unknown keys can put on the auth service (and on the gateway's own
/// sockets) to about 32 new keys a second when the service hangs, far above what a real
/// population of new keys needs: the cache answers every key seen in the last TTL.
pub const DEFAULT_MAX_CONCURRENT: usize = 64;
/// Expired entries are swept at most this often, and only when the cache is over its cap.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Where the auth service is and how its answers are cached.
#[derive(Clone)]
pub struct ExtAuthConfig {
    /// `http://` or `https://` URL the keys are posted to.
    pub url: String,
    /// How long an admission is cached.
    pub ttl: Duration,
    /// How long a refusal or a failure is cached.
    pub failure_ttl: Duration,
    /// The longest wait for one call.
    pub timeout: Duration,
    /// Cached answers kept at most (see [`DEFAULT_MAX_ENTRIES`]).
    pub max_entries: usize,
    /// Calls in flight at most; a key that would start one more is refused as unavailable
    /// (see [`DEFAULT_MAX_CONCURRENT`]).
    pub max_concurrent: usize,
}

impl ExtAuthConfig {
    /// The defaults for `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            ttl: DEFAULT_TTL,
            failure_ttl: DEFAULT_FAILURE_TTL,
            timeout: DEFAULT_TIMEOUT,
            max_entries: DEFAULT_MAX_ENTRIES,
            max_concurrent: DEFAULT_MAX_CONCURRENT,
        }
    }
}

impl fmt::Debug for ExtAuthConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The URL may carry credentials (`https://user:pass@auth/...`): never printed.
        f.debug_struct("ExtAuthConfig")
            .field("url", &"<redacted>")
            .field("ttl", &self.ttl)
            .field("failure_ttl", &self.failure_ttl)
            .field("timeout", &self.timeout)
            .field("max_entries", &self.max_entries)
            .field("max_concurrent", &self.max_concurrent)
            .finish()
    }
}

/// The external auth client could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ExtAuthError {
    /// The URL is not an absolute `http://` or `https://` URL.
    #[error("--ext-auth-url must be an absolute http:// or https:// URL")]
    InvalidUrl,
    /// The TLS client could not be configured.
    #[error("TLS set-up for the auth service failed: {0}")]
    Tls(#[from] rustls::Error),
}

/// Why a key was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The auth service answered 401 or 403: the key is not valid.
    #[error("the auth service refused the key")]
    Invalid,
    /// The auth service could not give an answer; the gateway fails closed.
    #[error("the auth service is unavailable ({0})")]
    Unavailable(Failure),
}

/// How a call to the auth service failed (a bounded label for logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No connection, or the connection broke.
    Connect,
    /// No complete answer within the timeout.
    Timeout,
    /// A 5xx answer.
    ServerError,
    /// A status other than 200, 401, 403 or 5xx.
    UnexpectedStatus,
    /// A 200 whose body is not `{"client_id": "...", "roles": [...]}` with a usable client id.
    BadAnswer,
    /// No call was made: `max_concurrent` calls were already in flight.
    Overloaded,
}

impl Failure {
    pub fn label(&self) -> &'static str {
        match self {
            Failure::Connect => "connect",
            Failure::Timeout => "timeout",
            Failure::ServerError => "server_error",
            Failure::UnexpectedStatus => "unexpected_status",
            Failure::BadAnswer => "bad_answer",
            Failure::Overloaded => "overloaded",
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// One cached or pending answer.
type Verdict = Result<Arc<KeyEntry>, Refusal>;

enum Slot {
    /// A call is in flight; its result arrives on the channel (`None` until then).
    Pending(watch::Receiver<Option<Verdict>>),
    Done {
        verdict: Verdict,
        until: Instant,
    },
}

type Cache = HashMap<KeyDigest, Slot, BuildHasherDefault<DigestHasher>>;

type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

/// The auth service's 200 answer.
#[derive(Deserialize)]
struct Answer {
    client_id: String,
    #[serde(default)]
    roles: Vec<String>,
}

/// The client of the external auth service, with its answer cache.
pub struct ExtAuth {
    client: Client<Connector, Full<Bytes>>,
    uri: Uri,
    /// `scheme://host:port` for logs (never the path or userinfo).
    target: String,
    config: ExtAuthConfig,
    limits: KeyLimits,
    cache: Mutex<Cache>,
    next_sweep: Mutex<Instant>,
    calls: AtomicU64,
    in_flight: AtomicUsize,
    overloaded: AtomicU64,
}

impl fmt::Debug for ExtAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExtAuth")
            .field("target", &self.target)
            .field("config", &self.config)
            .field("calls", &self.calls())
            .finish_non_exhaustive()
    }
}

fn parse_url(url: &str) -> Result<(Uri, String), ExtAuthError> {
    let uri: Uri = url.parse().map_err(|_| ExtAuthError::InvalidUrl)?;
    let scheme = uri.scheme_str().ok_or(ExtAuthError::InvalidUrl)?;
    if scheme != "http" && scheme != "https" {
        return Err(ExtAuthError::InvalidUrl);
    }
    let authority = uri.authority().ok_or(ExtAuthError::InvalidUrl)?;
    let host_port = authority
        .as_str()
        .rsplit_once('@')
        .map_or(authority.as_str(), |(_, h)| h);
    if host_port.is_empty() {
        return Err(ExtAuthError::InvalidUrl);
    }
    Ok((uri.clone(), format!("{scheme}://{host_port}")))
}

/// Turns a 200 body into the caller it admits; `None` when the body is unusable.
fn parse_answer(body: &[u8], digest: &KeyDigest, limits: &KeyLimits) -> Option<KeyEntry> {
    let answer: Answer = serde_json::from_slice(body).ok()?;
    let client_id = answer.client_id.trim();
    // The client id is sent upstream as `X-Client-Id` and keys the rate limits.
    if client_id.is_empty()
        || client_id.len() > MAX_CLIENT_ID_LEN
        || HeaderValue::from_str(client_id).is_err()
    {
        return None;
    }
    Some(KeyEntry {
        id: Arc::from("ext-auth"),
        namespace: Arc::from(""),
        client_id: Arc::from(client_id),
        roles: answer.roles.into_iter().map(Arc::from).collect(),
        expires_at: None,
        limits: limits.clone(),
        fingerprint: Fingerprint::of(digest),
    })
}

/// One of the `max_concurrent` calls; given back when dropped (even if the call's task panics).
struct CallPermit(Arc<ExtAuth>);

impl CallPermit {
    fn take(auth: &Arc<ExtAuth>) -> Option<Self> {
        let max = auth.config.max_concurrent;
        auth.in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| CallPermit(auth.clone()))
    }
}

impl Drop for CallPermit {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

fn lock(m: &Mutex<Cache>) -> MutexGuard<'_, Cache> {
    // The cache holds only answers: after a panic elsewhere it is still consistent.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl ExtAuth {
    /// A client for `config.url`; keys it admits get `limits` (the `--default-rpm` ones).
    pub fn new(config: ExtAuthConfig, limits: KeyLimits) -> Result<Arc<Self>, ExtAuthError> {
        let (uri, target) = parse_url(&config.url)?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(config.timeout));
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(https);
        Ok(Arc::new(Self {
            client,
            uri,
            target,
            config,
            limits,
            cache: Mutex::new(Cache::default()),
            next_sweep: Mutex::new(Instant::now()),
            calls: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            overloaded: AtomicU64::new(0),
        }))
    }

    /// Calls made to the auth service so far.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    /// Lookups refused without a call because `max_concurrent` calls were in flight.
    pub fn overloaded(&self) -> u64 {
        self.overloaded.load(Ordering::Relaxed)
    }

    /// `scheme://host:port` of the auth service (for logs).
    pub fn target(&self) -> &str {
        &self.target
    }

    /// The caller `key` stands for: from the cache, else from one call to the auth service
    /// shared with every concurrent lookup of the same key.
    pub async fn lookup(self: &Arc<Self>, key: &SecretString) -> Verdict {
        let digest = key.digest();
        let mut rx = {
            let mut cache = lock(&self.cache);
            match cache.get(&digest) {
                Some(Slot::Done { verdict, until }) if Instant::now() < *until => {
                    return verdict.clone();
                }
                // A pending call whose task is gone without answering (runtime shutting down)
                // is started again rather than waited for.
                Some(Slot::Pending(rx)) if rx.has_changed().is_ok() => rx.clone(),
                _ => {
                    // The cap: a flood of distinct unknown keys must not start unbounded calls.
                    // A refused lookup is not cached, so the key is asked about once the
                    // service has room again.
                    let Some(permit) = CallPermit::take(self) else {
                        self.overloaded.fetch_add(1, Ordering::Relaxed);
                        return Err(Refusal::Unavailable(Failure::Overloaded));
                    };
                    let (tx, rx) = watch::channel(None);
                    cache.insert(digest, Slot::Pending(rx.clone()));
                    let this = self.clone();
                    let key = key.clone();
                    // A task of its own: the call completes (and is cached) even when every
                    // request waiting for it has gone away.
                    tokio::spawn(async move {
                        let _permit = permit;
                        let verdict = this.call(&key, &digest).await;
                        this.store(digest, verdict.clone());
                        let _ = tx.send(Some(verdict));
                    });
                    rx
                }
            }
        };
        let answer = match rx.wait_for(Option::is_some).await {
            Ok(v) => (*v).clone(),
            Err(_) => None,
        };
        // No answer only when the call's task died (the runtime is shutting down): fail closed.
        answer.unwrap_or(Err(Refusal::Unavailable(Failure::Connect)))
    }

    fn store(&self, digest: KeyDigest, verdict: Verdict) {
        let now = Instant::now();
        let ttl = if verdict.is_ok() {
            self.config.ttl
        } else {
            self.config.failure_ttl
        };
        let mut cache = lock(&self.cache);
        if cache.len() >= self.config.max_entries {
            let sweep = {
                let mut next = self
                    .next_sweep
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                let due = now >= *next;
                if due {
                    *next = now + SWEEP_EVERY;
                }
                due
            };
            if sweep {
                cache.retain(|_, slot| match slot {
                    Slot::Pending(_) => true,
                    Slot::Done { until, .. } => *until > now,
                });
            }
            if cache.len() >= self.config.max_entries && verdict.is_err() {
                // Full of fresh answers: a refusal is answered but not remembered.
                cache.remove(&digest);
                return;
            }
        }
        cache.insert(
            digest,
            Slot::Done {
                verdict,
                until: now + ttl,
            },
        );
    }

    /// One call to the auth service, bounded by the timeout (connect, headers and body).
    async fn call(&self, key: &SecretString, digest: &KeyDigest) -> Verdict {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let fp = fingerprint(digest);
        let outcome = tokio::time::timeout(self.config.timeout, self.exchange(key, digest)).await;
        let verdict = match outcome {
            Ok(v) => v,
            Err(_) => Err(Refusal::Unavailable(Failure::Timeout)),
        };
        match &verdict {
            Ok(entry) => tracing::debug!(
                key = %fp,
                client_id = %entry.client_id,
                "the auth service admitted a key"
            ),
            Err(Refusal::Invalid) => tracing::debug!(key = %fp, "the auth service refused a key"),
            Err(Refusal::Unavailable(why)) => tracing::warn!(
                key = %fp,
                auth_service = %self.target,
                reason = %why,
                "the auth service could not answer; refusing the request (503)"
            ),
        }
        verdict
    }

    async fn exchange(&self, key: &SecretString, digest: &KeyDigest) -> Verdict {
        let body = serde_json::json!({ "api_key": key.expose() }).to_string();
        let mut req = Request::new(Full::new(Bytes::from(body)));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = self.uri.clone();
        let h = req.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        let resp = match self.client.request(req).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, auth_service = %self.target, "auth service call failed");
                return Err(Refusal::Unavailable(Failure::Connect));
            }
        };
        match resp.status() {
            StatusCode::OK => {
                let body = Limited::new(resp.into_body(), MAX_ANSWER_BYTES)
                    .collect()
                    .await
                    .map_err(|_| Refusal::Unavailable(Failure::BadAnswer))?
                    .to_bytes();
                parse_answer(&body, digest, &self.limits)
                    .map(Arc::new)
                    .ok_or(Refusal::Unavailable(Failure::BadAnswer))
            }
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Err(Refusal::Invalid),
            s if s.is_server_error() => Err(Refusal::Unavailable(Failure::ServerError)),
            _ => Err(Refusal::Unavailable(Failure::UnexpectedStatus)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> KeyLimits {
        KeyLimits {
            requests_per_minute: 60,
            burst: 60,
            tokens_per_minute: None,
        }
    }

    #[test]
    fn urls_must_be_absolute_http() {
        assert!(matches!(
            parse_url("ftp://auth/x"),
            Err(ExtAuthError::InvalidUrl)
        ));
        assert!(matches!(
            parse_url("/validate"),
            Err(ExtAuthError::InvalidUrl)
        ));
        assert!(matches!(
            parse_url("not a url"),
            Err(ExtAuthError::InvalidUrl)
        ));
        let (uri, target) = parse_url("https://user:pw@auth.internal:8443/v1/validate")
            .unwrap_or_else(|e| panic!("valid url refused: {e}"));
        assert_eq!(uri.path(), "/v1/validate");
        assert_eq!(
            target, "https://auth.internal:8443",
            "no credentials, no path"
        );
    }

    #[test]
    fn answers_become_callers_with_default_limits() {
        let d = crate::auth::keys::digest(b"k");
        let entry = parse_answer(
            br#"{"client_id":"svc-a","roles":["user","admin"]}"#,
            &d,
            &limits(),
        )
        .unwrap_or_else(|| panic!("a good answer was refused"));
        assert_eq!(&*entry.client_id, "svc-a");
        assert!(entry.has_any_role(&[Arc::from("admin")]));
        assert_eq!(entry.limits, limits());
        assert_eq!(entry.fingerprint.to_string(), fingerprint(&d));
        let no_roles = parse_answer(br#"{"client_id":"svc-b"}"#, &d, &limits());
        assert!(no_roles.is_some_and(|e| e.roles.is_empty()));
        for bad in [
            &br#"{"roles":["user"]}"#[..],
            br#"{"client_id":""}"#,
            br#"{"client_id":"a\nb"}"#,
            br#"{"client_id":42}"#,
            b"not json",
        ] {
            assert!(
                parse_answer(bad, &d, &limits()).is_none(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn config_debug_hides_the_url() {
        let c = ExtAuthConfig::new("https://user:secret@auth/validate");
        assert!(!format!("{c:?}").contains("secret"));
    }

    #[tokio::test]
    async fn a_closed_port_is_unavailable_and_cached_briefly() {
        let listener =
            std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("bind: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("addr: {e}"));
        drop(listener);
        let mut config = ExtAuthConfig::new(format!("http://{addr}/validate"));
        config.timeout = Duration::from_millis(500);
        let ext = ExtAuth::new(config, limits()).unwrap_or_else(|e| panic!("{e}"));
        let key = SecretString::new("tg-unknown");
        assert_eq!(
            ext.lookup(&key).await.err(),
            Some(Refusal::Unavailable(Failure::Connect))
        );
        assert_eq!(
            ext.lookup(&key).await.err(),
            Some(Refusal::Unavailable(Failure::Connect))
        );
        assert_eq!(ext.calls(), 1, "the failure is cached");
    }
}
