//! `ProxyError`: every way a request can be refused or fail, as data: its status, a bounded
//! reason (metrics label and JSON `error.code`), whether a retry may help. Internal text never leaks.

use http::{HeaderValue, StatusCode};

/// The `RateLimit-*` and `Retry-After` values of a limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitHeaders {
    pub limit: u64,
    pub remaining: u64,
    pub reset_secs: u64,
    pub retry_after_secs: u64,
}

impl LimitHeaders {
    /// Writes `RateLimit-Limit/-Remaining/-Reset` (and `Retry-After` when refused).
    pub fn write(&self, h: &mut http::HeaderMap, refused: bool) {
        use super::headers::{RATELIMIT_LIMIT, RATELIMIT_REMAINING, RATELIMIT_RESET};
        h.insert(&RATELIMIT_LIMIT, HeaderValue::from(self.limit));
        h.insert(&RATELIMIT_REMAINING, HeaderValue::from(self.remaining));
        h.insert(&RATELIMIT_RESET, HeaderValue::from(self.reset_secs));
        if refused {
            h.insert(
                http::header::RETRY_AFTER,
                HeaderValue::from(self.retry_after_secs.max(1)),
            );
        }
    }
}

/// A refusal or failure the gateway answers itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    /// The request is malformed (bad path, bad header).
    #[error("bad request")]
    BadRequest,
    /// No route matches host and path.
    #[error("no route for this path")]
    NoRoute,
    /// The path matched, the method did not.
    #[error("method not allowed")]
    MethodNotAllowed(HeaderValue),
    /// No API key was presented.
    #[error("an API key is required")]
    MissingKey,
    /// The key is not known.
    #[error("the API key is not valid")]
    InvalidKey,
    /// The key has expired.
    #[error("the API key has expired")]
    ExpiredKey,
    /// The key lacks every role the route wants.
    #[error("the API key lacks a required role")]
    Forbidden,
    /// The key belongs to a namespace the route does not admit.
    #[error("the API key is not allowed on this route")]
    NamespaceForbidden,
    /// The body exceeds the size limit.
    #[error("request body too large")]
    PayloadTooLarge,
    /// A request limit refused the request.
    #[error("rate limit exceeded")]
    RateLimited(LimitHeaders),
    /// A token budget refused the request.
    #[error("token budget exceeded")]
    TokenLimited(LimitHeaders),
    /// The external auth service is down or failing: fail closed.
    #[error("authentication service unavailable")]
    AuthUnavailable,
    /// The upstream failed (connection refused or reset, bad response).
    #[error("upstream request failed")]
    UpstreamFailed,
    /// Could not connect to any endpoint.
    #[error("could not connect to the upstream")]
    ConnectFailed,
    /// No endpoint is ready.
    #[error("no ready endpoint for this route")]
    NoEndpoint,
    /// The upstream did not answer in time.
    #[error("upstream timed out")]
    Timeout,
    /// A WebSocket route got a request that is not an upgrade.
    #[error("this route expects a WebSocket upgrade")]
    UpgradeRequired,
    /// The gateway is shutting down.
    #[error("the gateway is shutting down")]
    ShuttingDown,
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BadRequest => StatusCode::BAD_REQUEST,
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::MissingKey | ProxyError::InvalidKey | ProxyError::ExpiredKey => {
                StatusCode::UNAUTHORIZED
            }
            ProxyError::Forbidden | ProxyError::NamespaceForbidden => StatusCode::FORBIDDEN,
            ProxyError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::RateLimited(_) | ProxyError::TokenLimited(_) => {
                StatusCode::TOO_MANY_REQUESTS
            }
            ProxyError::UpstreamFailed | ProxyError::ConnectFailed => StatusCode::BAD_GATEWAY,
            ProxyError::NoEndpoint | ProxyError::AuthUnavailable | ProxyError::ShuttingDown => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::Timeout => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::UpgradeRequired => StatusCode::UPGRADE_REQUIRED,
        }
    }

    /// A bounded label: the JSON `error.code` and the metrics reason.
    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::BadRequest => "bad_request",
            ProxyError::NoRoute => "no_route",
            ProxyError::MethodNotAllowed(_) => "method_not_allowed",
            ProxyError::MissingKey => "missing_key",
            ProxyError::InvalidKey => "invalid_key",
            ProxyError::ExpiredKey => "expired_key",
            ProxyError::Forbidden => "forbidden",
            ProxyError::NamespaceForbidden => "namespace_forbidden",
            ProxyError::PayloadTooLarge => "payload_too_large",
            ProxyError::RateLimited(_) => "rate_limited",
            ProxyError::TokenLimited(_) => "token_limited",
            ProxyError::AuthUnavailable => "auth_unavailable",
            ProxyError::UpstreamFailed => "upstream_failed",
            ProxyError::ConnectFailed => "connect_failed",
            ProxyError::NoEndpoint => "no_endpoint",
            ProxyError::Timeout => "upstream_timeout",
            ProxyError::UpgradeRequired => "upgrade_required",
            ProxyError::ShuttingDown => "shutting_down",
        }
    }

    /// Whether another try at the upstream may succeed (and the route's policy decides).
    pub fn is_retryable(&self) -> bool {
        matches!(self, ProxyError::ConnectFailed)
    }

    /// The JSON body: `{"error": {"code", "message", "request_id"}}`.
    pub fn body(&self, request_id: &str) -> bytes::Bytes {
        let v = serde_json::json!({
            "error": {
                "code": self.code(),
                "message": self.to_string(),
                "request_id": request_id,
            }
        });
        bytes::Bytes::from(v.to_string())
    }
}
