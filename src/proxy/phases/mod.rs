//! The phases of the request path, one file each, called in order by `pipeline::run`. Each
//! phase reads and fills the shared `RequestCtx`; a refusal is a `ProxyError` value. When each
//! runs and what it may answer:
//!
//! 1. [`route_match`]: always; 400 (malformed), 404, 405. Reads the body only for `bodyField`.
//!    [`filters`]: on HTTPRoute rules with a `RequestRedirect`: the redirect (3xx).
//! 2. [`cors`]: on routes with a CORS policy; answers preflights (204).
//! 3. [`authenticate`]: always; 401, or 503 when the external auth service cannot answer.
//! 4. [`authorize`]: for a known caller; 403.
//! 5. [`limits`]: where a key or route bucket applies; 429 `rate_limited`.
//! 6. [`tokens`]: 413 above the body limit; where a token budget applies, 429 `token_limited`.
//! 7. [`forward`] (or `websocket` on WebSocket routes, [`mcp`] on MCP routes): the attempt
//!    loop; 502, 503, 504. On MCP routes also 404 (a session id that does not open) and 400
//!    (headers that disagree with a body read earlier), as JSON-RPC errors.
//! 8. [`respond`]: the upstream's answer as the client's; usage settled; every answer logged.

pub(crate) mod authenticate;
pub(crate) mod authorize;
pub(crate) mod cors;
pub(crate) mod filters;
pub(crate) mod forward;
pub(crate) mod limits;
pub(crate) mod mcp;
mod mcp_federation;
pub(crate) mod respond;
pub(crate) mod route_match;
pub(crate) mod tokens;
