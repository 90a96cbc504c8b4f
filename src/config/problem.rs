//! What `compile()` finds wrong with one object, as data: a variant per problem, each knowing the
//! field at fault, its bounded [`Reason`] and its message. `compile` renders them into the
//! [`Problem`](super::Problem) records that status, `tollgate check` and the logs read, so the
//! text there is the text of the `#[error]` attributes below.

use std::borrow::Cow;
use std::sync::Arc;

use crate::api::DurationError;

/// The reason of a problem, as the status condition's `reason` (part of the API: users and tools match on it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The object breaks a rule of its schema.
    Invalid,
    /// Another, older object already holds what this one asks for.
    Conflicted,
    /// A backend Service does not exist (Kubernetes mode).
    BackendNotFound,
    /// A referenced Secret, or the key in it, does not exist or is empty.
    SecretNotFound,
    /// The TLS Secret holds no usable certificate and key.
    InvalidCertificate,
}

impl Reason {
    /// The CamelCase text of the condition's `reason`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Invalid => "Invalid",
            Self::Conflicted => "Conflicted",
            Self::BackendNotFound => "BackendNotFound",
            Self::SecretNotFound => "SecretNotFound",
            Self::InvalidCertificate => "InvalidCertificate",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why `spec.match.pathPrefix` (or a url's path) is not a usable prefix.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PrefixProblem {
    #[error("must start with '/'")]
    NotAbsolute,
    #[error(transparent)]
    Path(#[from] super::path::PathError),
    #[error("is not in normal form (would be {0})")]
    NotNormal(String),
}

/// Why a backend `url` cannot be used.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum UrlProblem {
    #[error("invalid url: {0}")]
    Syntax(String),
    #[error("url scheme must be http or https")]
    Scheme,
    #[error("url has no host")]
    NoHost,
    #[error("url must not have a query")]
    Query,
}

/// A problem with one AgentRoute.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RouteProblem {
    #[error("is required")]
    NameRequired,
    #[error(transparent)]
    PathPrefix(PrefixProblem),
    #[error("{host:?} is not a lower-case DNS name or *.name")]
    Host { index: usize, host: String },
    #[error("{method:?} is not an upper-case method")]
    Method { index: usize, method: String },
    #[error("invalid header name or value")]
    MatchHeader { index: usize },
    #[error("needs a name and at least one value")]
    BodyField,
    /// A duration field (`spec.timeouts.request`, `spec.retry.backoff`, `spec.cors.maxAge`...).
    #[error("{error}")]
    Duration {
        field: &'static str,
        error: DurationError,
    },
    #[error("must be between 1 and 10")]
    RetryAttempts,
    #[error("limits must be at least 1")]
    RateLimitZero,
    #[error("must be a normal absolute path")]
    RewritePrefix,
    #[error("at least one backend is required")]
    NoBackends,
    #[error("{error}")]
    BackendUrl { index: usize, error: UrlProblem },
    #[error("a backend is either service and port, or url")]
    BackendShape { index: usize },
    #[error("invalid host")]
    BackendHost { index: usize },
    #[error("at least one backend needs a weight above 0")]
    NoBackendWeight,
    #[error("allowOrigins '*' cannot be combined with allowCredentials")]
    CorsCredentials,
    #[error("invalid header name")]
    CanaryHeader,
    /// An MCP route that cannot take POST (every MCP request but GET streams and DELETE is one).
    #[error(
        "protocol mcp needs POST among the methods (MCP clients send every message as a POST)"
    )]
    McpMethods,
    #[error("mcp is for routes with protocol mcp")]
    McpNotMcp,
    #[error("a tool rule needs a name and at least one role")]
    McpToolRule { index: usize },
    /// Federation: some backends have `mcp.prefix` and others not, or a prefix repeats.
    #[error("{0}")]
    McpPrefix(&'static str),
    /// An older route serves the same prefix, hosts and conditions.
    #[error("prefix {prefix} on the same hosts and conditions is already served by {winner}")]
    Conflicted { prefix: String, winner: Arc<str> },
    /// Backend Services that do not exist (Kubernetes mode).
    #[error("Service not found: {}", .0.join(", "))]
    ServiceNotFound(Vec<String>),
    #[error("TLS Secret not found")]
    TlsSecretNotFound,
    /// The TLS Secret lacks `tls.crt` or `tls.key`.
    #[error("Secret has no {0}")]
    TlsSecretMissing(&'static str),
    /// The certificate and key do not make a usable pair.
    #[error("{0}")]
    InvalidCertificate(String),
}

impl RouteProblem {
    /// The field at fault, as a JSON path, or empty.
    pub fn field(&self) -> Cow<'static, str> {
        match self {
            Self::NameRequired => "metadata.name".into(),
            Self::PathPrefix(_) => "spec.match.pathPrefix".into(),
            Self::Host { index, .. } => format!("spec.hosts[{index}]").into(),
            Self::Method { index, .. } => format!("spec.match.methods[{index}]").into(),
            Self::McpMethods => "spec.match.methods".into(),
            Self::McpNotMcp => "spec.mcp".into(),
            Self::McpToolRule { index } => format!("spec.mcp.tools[{index}]").into(),
            Self::McpPrefix(_) => "spec.backends".into(),
            Self::MatchHeader { index } => format!("spec.match.headers[{index}]").into(),
            Self::BodyField => "spec.match.bodyField".into(),
            Self::Duration { field, .. } => (*field).into(),
            Self::RetryAttempts => "spec.retry.attempts".into(),
            Self::RateLimitZero => "spec.rateLimit".into(),
            Self::RewritePrefix => "spec.rewrite.pathPrefix".into(),
            Self::NoBackends | Self::NoBackendWeight | Self::ServiceNotFound(_) => {
                "spec.backends".into()
            }
            Self::BackendUrl { index, .. } => format!("spec.backends[{index}].url").into(),
            Self::BackendShape { index } | Self::BackendHost { index } => {
                format!("spec.backends[{index}]").into()
            }
            Self::CorsCredentials => "spec.cors".into(),
            Self::CanaryHeader => "spec.canaryHeader".into(),
            Self::Conflicted { .. } => "spec.match".into(),
            Self::TlsSecretNotFound | Self::TlsSecretMissing(_) | Self::InvalidCertificate(_) => {
                "spec.tls.secretName".into()
            }
        }
    }

    pub fn reason(&self) -> Reason {
        match self {
            Self::Conflicted { .. } => Reason::Conflicted,
            Self::ServiceNotFound(_) => Reason::BackendNotFound,
            Self::TlsSecretNotFound => Reason::SecretNotFound,
            Self::TlsSecretMissing(_) | Self::InvalidCertificate(_) => Reason::InvalidCertificate,
            _ => Reason::Invalid,
        }
    }
}

/// A problem with one AgentApiKey. Each one makes the key not Ready.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyProblem {
    #[error("is required")]
    ClientIdRequired,
    #[error("not an RFC 3339 time: {0}")]
    ExpiresAt(String),
    #[error("Secret {name} key {key} is empty")]
    SecretEmpty { name: String, key: String },
    #[error("Secret {name} with key {key} not found")]
    SecretNotFound { name: String, key: String },
    #[error("must be sha256: followed by 64 lower-case hex digits")]
    KeyHash,
    #[error("set exactly one of secretRef and keyHash")]
    SecretSource,
    /// An older key has the same secret.
    #[error("the same key is already defined by {owner}")]
    Duplicate { owner: Arc<str> },
}

impl KeyProblem {
    /// The field at fault, as a JSON path.
    pub fn field(&self) -> &'static str {
        match self {
            Self::ClientIdRequired => "spec.clientId",
            Self::ExpiresAt(_) => "spec.expiresAt",
            Self::SecretEmpty { .. } | Self::SecretNotFound { .. } => "spec.secretRef",
            Self::KeyHash => "spec.keyHash",
            Self::SecretSource | Self::Duplicate { .. } => "spec",
        }
    }

    pub fn reason(&self) -> Reason {
        match self {
            Self::SecretEmpty { .. } | Self::SecretNotFound { .. } => Reason::SecretNotFound,
            Self::Duplicate { .. } => Reason::Conflicted,
            _ => Reason::Invalid,
        }
    }

    /// The message of the key's Ready condition: the problem's, with the field where the
    /// message alone would not say which (`spec.clientId is required`).
    pub fn condition_message(&self) -> String {
        match self {
            Self::ClientIdRequired => format!("{} {self}", self.field()),
            _ => self.to_string(),
        }
    }
}
