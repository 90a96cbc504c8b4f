//! `ProxyError`: every way a request can be refused or fail, as data: its status, a bounded
//! reason (metrics label and JSON `error.code`), who is at fault, whether a retry may help.
//! The attempt loop and passive health ask the error; internal text never leaks to a client.

use http::{HeaderValue, Method, StatusCode};

use crate::balance::health::FailureKind;

/// Who caused a failure: it decides whether an endpoint's health pays for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The request itself (bad, too large, not allowed): never counted against an endpoint.
    Client,
    /// The upstream (refused, broke, too slow).
    Upstream,
    /// The gateway's own state (no endpoint, auth service down, shutting down).
    Gateway,
}

/// Whether another attempt may be made after a failed one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Nothing reached the upstream: any method may be sent again.
    Safe,
    /// The upstream may have acted on the request: only methods safe to repeat (RFC 9110
    /// §9.2.2), as nginx's `proxy_next_upstream error` does.
    IfIdempotent,
    /// Another attempt cannot help (or would repeat work already done).
    Never,
}

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
    /// A Gateway API rule with no backend that can take traffic (the spec's 500).
    #[error("no backend of this route can take traffic")]
    NoBackend,
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
            ProxyError::NoBackend => StatusCode::INTERNAL_SERVER_ERROR,
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
            ProxyError::NoBackend => "no_backend",
            ProxyError::Timeout => "upstream_timeout",
            ProxyError::UpgradeRequired => "upgrade_required",
            ProxyError::ShuttingDown => "shutting_down",
        }
    }

    /// Who is at fault.
    pub fn fault(&self) -> Fault {
        match self {
            ProxyError::UpstreamFailed | ProxyError::ConnectFailed | ProxyError::Timeout => {
                Fault::Upstream
            }
            ProxyError::NoEndpoint
            | ProxyError::NoBackend
            | ProxyError::AuthUnavailable
            | ProxyError::ShuttingDown => Fault::Gateway,
            _ => Fault::Client,
        }
    }

    /// Whether a `connect-failure` retry may follow this failure of an attempt.
    pub fn retry(&self) -> Retry {
        match self {
            ProxyError::ConnectFailed => Retry::Safe,
            // The connection broke before the response head: it may have been acted on.
            ProxyError::UpstreamFailed => Retry::IfIdempotent,
            _ => Retry::Never,
        }
    }

    /// Whether an attempt of `method` that failed this way may be retried, when the route's
    /// policy retries connection failures.
    pub fn is_retryable(&self, method: &Method) -> bool {
        match self.retry() {
            Retry::Safe => true,
            Retry::IfIdempotent => method.is_idempotent(),
            Retry::Never => false,
        }
    }

    /// What the failure of an attempt costs its endpoint's passive health (nothing when the
    /// client was at fault: a few broken uploads must not eject a healthy endpoint).
    pub fn endpoint_failure(&self) -> Option<FailureKind> {
        match self {
            ProxyError::ConnectFailed => Some(FailureKind::Connect),
            ProxyError::Timeout => Some(FailureKind::Timeout),
            _ if self.fault() == Fault::Client => None,
            _ => Some(FailureKind::ServerError),
        }
    }

    /// The `outcome` label of `tollgate_upstream_requests_total` for a failed attempt.
    pub fn upstream_outcome(&self) -> &'static str {
        match self {
            ProxyError::ConnectFailed => "connect_failure",
            ProxyError::Timeout => "timeout",
            _ if self.fault() == Fault::Client => "client_error",
            _ => "error",
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_retry_rule_lives_in_the_error() {
        let post = Method::POST;
        let get = Method::GET;
        assert!(ProxyError::ConnectFailed.is_retryable(&post));
        assert!(ProxyError::UpstreamFailed.is_retryable(&get));
        assert!(!ProxyError::UpstreamFailed.is_retryable(&post));
        assert!(!ProxyError::Timeout.is_retryable(&get));
        assert!(!ProxyError::BadRequest.is_retryable(&get));
    }

    #[test]
    fn client_faults_cost_no_endpoint_health() {
        for e in [ProxyError::BadRequest, ProxyError::PayloadTooLarge] {
            assert_eq!(e.fault(), Fault::Client);
            assert_eq!(e.endpoint_failure(), None);
            assert_eq!(e.upstream_outcome(), "client_error");
        }
        assert_eq!(
            ProxyError::ConnectFailed.endpoint_failure(),
            Some(FailureKind::Connect)
        );
        assert_eq!(
            ProxyError::UpstreamFailed.endpoint_failure(),
            Some(FailureKind::ServerError)
        );
        assert_eq!(ProxyError::Timeout.upstream_outcome(), "timeout");
        assert_eq!(ProxyError::NoEndpoint.fault(), Fault::Gateway);
    }
}
