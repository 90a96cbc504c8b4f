//! MCP (Model Context Protocol, Streamable HTTP) for `protocol: mcp` routes: the sealed session
//! ids ([`session`]), and the JSON-RPC facts the gateway reads or answers with. The request path
//! itself is the `mcp` phase of `proxy`; nothing here knows HTTP or hyper.

pub mod federation;
pub mod session;
pub mod tools;

use serde_json::Value;

pub use federation::{FederatedServer, Federation};
pub use session::{SessionKeys, SessionTarget};
pub use tools::ToolAccess;

/// `Mcp-Session-Id` (2025-11-25 and earlier).
pub const SESSION_HEADER: &str = "mcp-session-id";
/// `Mcp-Method` (2026-07-28): the JSON-RPC method of the body.
pub const METHOD_HEADER: &str = "mcp-method";
/// `Mcp-Name` (2026-07-28): the tool, prompt (`params.name`) or resource (`params.uri`).
pub const NAME_HEADER: &str = "mcp-name";

/// The `method` label of a JSON-RPC method: the method itself when the protocol defines it,
/// else `other` (labels stay bounded whatever clients send).
pub fn method_label(method: &[u8]) -> &'static str {
    const KNOWN: [&str; 22] = [
        "initialize",
        "ping",
        "server/discover",
        "tools/list",
        "tools/call",
        "resources/list",
        "resources/read",
        "resources/templates/list",
        "resources/subscribe",
        "resources/unsubscribe",
        "prompts/list",
        "prompts/get",
        "completion/complete",
        "logging/setLevel",
        "subscriptions/listen",
        "notifications/initialized",
        "notifications/cancelled",
        "notifications/progress",
        "notifications/roots/list_changed",
        "sampling/createMessage",
        "elicitation/create",
        "roots/list",
    ];
    KNOWN
        .iter()
        .find(|k| k.as_bytes() == method)
        .copied()
        .unwrap_or("other")
}

/// JSON-RPC error codes the gateway answers with.
pub mod code {
    /// The body is not JSON.
    pub const PARSE_ERROR: i64 = -32700;
    /// Not a valid JSON-RPC request (or a header that disagrees with the body).
    pub const INVALID_REQUEST: i64 = -32600;
    /// The session id does not open, or its endpoint is gone.
    pub const SESSION_NOT_FOUND: i64 = -32001;
    /// The caller may not use this tool.
    pub const TOOL_FORBIDDEN: i64 = -32003;
    /// The caller has used up its calls of this tool for now (`mcp.tools[].rateLimit`).
    pub const TOOL_RATE_LIMITED: i64 = -32004;
    /// A federated server that cannot be reached (the others still answer).
    pub const SERVER_UNAVAILABLE: i64 = -32005;
    /// No server of a federating route has this tool.
    pub const INVALID_PARAMS: i64 = -32602;
    /// A method a federating route does not route.
    pub const METHOD_NOT_FOUND: i64 = -32601;
}

/// A JSON-RPC error object, with the request's id where it has one (else `null`).
pub fn error_body(id: Option<&Value>, code: i64, message: &str) -> Vec<u8> {
    let v = serde_json::json!({
        "jsonrpc": "2.0",
        "id": id.cloned().unwrap_or(Value::Null),
        "error": {"code": code, "message": message},
    });
    v.to_string().into_bytes()
}

/// What the gateway reads from a JSON-RPC message body.
#[derive(Debug, Default, PartialEq)]
pub struct Message {
    /// The request's id (absent on notifications and responses).
    pub id: Option<Value>,
    /// `method` (absent on responses).
    pub method: Option<String>,
    /// `params.name`, else `params.uri`.
    pub name: Option<String>,
}

/// Why a body is refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum BodyProblem {
    #[error("Parse error: the body is not JSON")]
    NotJson,
    #[error("Invalid Request: not a JSON-RPC 2.0 message")]
    NotJsonRpc,
    #[error("Invalid Request: JSON-RPC batches are not accepted")]
    Batch,
}

impl BodyProblem {
    pub fn code(&self) -> i64 {
        match self {
            Self::NotJson => code::PARSE_ERROR,
            Self::NotJsonRpc | Self::Batch => code::INVALID_REQUEST,
        }
    }
}

/// Reads one JSON-RPC message (Streamable HTTP since 2025-06-18 carries one per POST; a batch
/// is refused).
pub fn parse_message(body: &[u8]) -> Result<Message, BodyProblem> {
    let v: Value = serde_json::from_slice(body).map_err(|_| BodyProblem::NotJson)?;
    let obj = match v {
        Value::Object(o) => o,
        Value::Array(_) => return Err(BodyProblem::Batch),
        _ => return Err(BodyProblem::NotJsonRpc),
    };
    if obj.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return Err(BodyProblem::NotJsonRpc);
    }
    let method = match obj.get("method") {
        None => None,
        Some(Value::String(m)) => Some(m.clone()),
        Some(_) => return Err(BodyProblem::NotJsonRpc),
    };
    let id = match obj.get("id") {
        None => None,
        Some(v @ (Value::String(_) | Value::Number(_))) => Some(v.clone()),
        Some(Value::Null) if method.is_none() => None,
        Some(_) => return Err(BodyProblem::NotJsonRpc),
    };
    // A response (no method) has a result or an error; a request or notification a method.
    if method.is_none() && !(obj.contains_key("result") || obj.contains_key("error")) {
        return Err(BodyProblem::NotJsonRpc);
    }
    let params = obj.get("params");
    let name = params
        .and_then(|p| p.get("name").or_else(|| p.get("uri")))
        .and_then(Value::as_str)
        .map(str::to_owned);
    Ok(Message { id, method, name })
}

/// Whether the `Mcp-Method` and `Mcp-Name` headers (where present) agree with the body. The
/// name is compared only for the methods that carry one.
pub fn headers_agree(message: &Message, method: Option<&[u8]>, name: Option<&[u8]>) -> bool {
    if let Some(h) = method {
        if message.method.as_deref().map(str::as_bytes) != Some(h) {
            return false;
        }
    }
    if let Some(h) = name {
        if message.name.as_deref().map(str::as_bytes) != Some(h) {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn messages_are_read_and_bad_bodies_named() {
        let m = parse_message(
            br#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"add"}}"#,
        )
        .unwrap();
        assert_eq!(m.id, Some(json!(7)));
        assert_eq!(m.method.as_deref(), Some("tools/call"));
        assert_eq!(m.name.as_deref(), Some("add"));
        let r = parse_message(
            br#"{"jsonrpc":"2.0","method":"resources/read","params":{"uri":"file:///a"}}"#,
        )
        .unwrap();
        assert_eq!(r.name.as_deref(), Some("file:///a"));
        assert!(parse_message(br#"{"jsonrpc":"2.0","id":"x","result":{}}"#).is_ok());
        assert_eq!(parse_message(b"{nope"), Err(BodyProblem::NotJson));
        assert_eq!(parse_message(b"[]"), Err(BodyProblem::Batch));
        assert_eq!(
            parse_message(br#"{"id":1,"method":"ping"}"#),
            Err(BodyProblem::NotJsonRpc)
        );
        assert_eq!(
            parse_message(br#"{"jsonrpc":"2.0","id":{},"method":"ping"}"#),
            Err(BodyProblem::NotJsonRpc)
        );
        assert_eq!(
            parse_message(br#"{"jsonrpc":"2.0","id":1}"#),
            Err(BodyProblem::NotJsonRpc)
        );
    }

    #[test]
    fn headers_must_agree_with_the_body() {
        let m = Message {
            id: None,
            method: Some("tools/call".into()),
            name: Some("add".into()),
        };
        assert!(headers_agree(&m, Some(b"tools/call"), Some(b"add")));
        assert!(headers_agree(&m, None, None));
        assert!(!headers_agree(&m, Some(b"tools/list"), None));
        assert!(!headers_agree(&m, Some(b"tools/call"), Some(b"delete")));
        let body = error_body(
            Some(&json!(3)),
            code::SESSION_NOT_FOUND,
            "Session not found",
        );
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["id"], 3);
        assert_eq!(v["error"]["code"], -32001);
    }
}
