//! The data plane: listeners, the request path (a driver and its phases), the upstream client,
//! retries and streams. Reads the current `Snapshot` through arc-swap; never compiles or
//! mutates configuration.

pub mod body;
pub mod conn;
pub mod context;
pub mod error;
pub mod headers;
mod outbound;
mod phases;
pub mod pick;
pub mod pipeline;
pub mod revocation;
pub mod server;
pub mod upstream;
pub mod websocket;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::auth::external::ExtAuth;
use crate::config::Snapshot;
use crate::ratelimit::RateLimiter;
use crate::telemetry::Metrics;

pub use body::ProxyBody;
pub use error::ProxyError;

/// How long an idle client keep-alive connection is kept: longer than the 60 s idle timeout
/// of the common cloud load balancers (AWS ALB, GCP, Azure's 4 min aside), so that the load
/// balancer, not the gateway, closes an idle connection, and never a request is sent into a
/// connection the gateway has just closed. nginx's `keepalive_timeout` is 75 s for the same reason.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(75);

/// Data-plane settings from the command line.
#[derive(Clone, Debug)]
pub struct ProxyOptions {
    /// Largest request body accepted (413 above).
    pub max_body_bytes: u64,
    /// Bodies up to this size are kept so a retry can replay them.
    pub replay_limit_bytes: u64,
    /// Largest body read to match `bodyField` routes or estimate tokens.
    pub max_inspect_bytes: u64,
    /// How often open streams re-check that their key is still valid.
    pub revalidate_interval: Duration,
    /// Time allowed for a client to send a request head, from its first byte (for a new
    /// connection: from the connection's start).
    pub header_read_timeout: Duration,
    /// A client connection with nothing in flight is closed after this long.
    pub idle_timeout: Duration,
    /// Trust an incoming `X-Forwarded-For` (behind another proxy) instead of replacing it.
    pub trust_forwarded: bool,
}

impl Default for ProxyOptions {
    fn default() -> Self {
        Self {
            max_body_bytes: 10 * 1024 * 1024,
            replay_limit_bytes: 64 * 1024,
            max_inspect_bytes: 1024 * 1024,
            revalidate_interval: Duration::from_secs(30),
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            trust_forwarded: false,
        }
    }
}

/// Everything the data plane shares across requests.
pub struct Gateway {
    snapshot: ArcSwap<Snapshot>,
    /// True once the first snapshot is in and every source has synced.
    ready: AtomicBool,
    shutting_down: AtomicBool,
    swaps: AtomicU64,
    pub metrics: Metrics,
    pub options: ProxyOptions,
    pub upstream: upstream::Upstream,
    /// Request and token limits; state lives here, outside every snapshot.
    pub limiter: Arc<RateLimiter>,
    /// The external auth service asked about keys the snapshot does not know (`--ext-auth-url`).
    pub ext_auth: Option<Arc<ExtAuth>>,
    /// What the configuration source shows in `/debug/routes` (`tollgate run`: leadership).
    pub source_debug: std::sync::OnceLock<Arc<dyn Fn() -> serde_json::Value + Send + Sync>>,
    /// Seals MCP session ids when the snapshot has no keys of `--mcp-session-secret`: made at
    /// start, so such sessions survive neither a restart nor a second replica.
    pub mcp_fallback_keys: crate::mcp::SessionKeys,
}

impl Gateway {
    pub fn new(
        metrics: Metrics,
        options: ProxyOptions,
        upstream: upstream::Upstream,
        limiter: Arc<RateLimiter>,
        ext_auth: Option<Arc<ExtAuth>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            snapshot: ArcSwap::new(Snapshot::empty()),
            ready: AtomicBool::new(false),
            shutting_down: AtomicBool::new(false),
            swaps: AtomicU64::new(0),
            metrics,
            options,
            upstream,
            limiter,
            ext_auth,
            source_debug: std::sync::OnceLock::new(),
            mcp_fallback_keys: crate::mcp::SessionKeys::random(),
        })
    }

    /// The snapshot new requests will use.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Swaps in a new snapshot; requests in flight keep theirs. Marks the gateway ready.
    pub fn swap(&self, snap: Snapshot) {
        self.metrics.routes.set(snap.routes.len() as i64);
        self.metrics.api_keys.set(snap.keys.len() as i64);
        self.snapshot.store(Arc::new(snap));
        self.swaps.fetch_add(1, Ordering::Relaxed);
        self.ready.store(true, Ordering::Release);
    }

    /// The keys that seal and open MCP session ids for requests on `snap`.
    pub fn mcp_keys<'a>(&'a self, snap: &'a Snapshot) -> &'a crate::mcp::SessionKeys {
        snap.mcp_session_keys
            .as_deref()
            .unwrap_or(&self.mcp_fallback_keys)
    }

    /// Number of swaps so far.
    pub fn swaps(&self) -> u64 {
        self.swaps.load(Ordering::Relaxed)
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && !self.shutting_down.load(Ordering::Acquire)
    }

    /// Holds readiness false even after a swap (a source not synced yet).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Release);
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }
}
