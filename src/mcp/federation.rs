//! Federation: one MCP endpoint in front of several servers (every backend of the route has an
//! `mcp.prefix`). The JSON side of it: tool names `<prefix>__<tool>`, the merged answers to
//! `initialize`, `server/discover` and `tools/list`, and the one answer read out of a server's
//! JSON or SSE reply. The HTTP side is the `mcp` phase's.

use std::sync::Arc;

use serde_json::{Map, Value};

/// What joins a server's prefix and its tool's name.
pub const SEPARATOR: &str = "__";

/// One server of a federating route.
#[derive(Clone, Debug, serde::Serialize)]
pub struct FederatedServer {
    pub prefix: Arc<str>,
    /// Its index in the route's backends.
    pub backend: usize,
}

/// The servers of a federating route, in the order of its backends.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Federation {
    pub servers: Vec<FederatedServer>,
}

impl Federation {
    /// The server and the server's own tool name of a federated tool name; `None` when no
    /// server has that prefix (the call never leaves the gateway).
    pub fn split<'a>(&self, tool: &'a str) -> Option<(&FederatedServer, &'a str)> {
        let (prefix, name) = tool.split_once(SEPARATOR)?;
        if name.is_empty() {
            return None;
        }
        let server = self.servers.iter().find(|s| &*s.prefix == prefix)?;
        Some((server, name))
    }
}

/// The JSON-RPC answer with id `id` in a server's reply: the body itself (JSON), or the
/// `data` of the SSE event that carries it (notifications before it are skipped).
pub fn answer_in(body: &[u8], sse: bool, id: &Value) -> Option<Value> {
    if !sse {
        let v: Value = serde_json::from_slice(body).ok()?;
        return (v.get("id") == Some(id)).then_some(v);
    }
    let text = std::str::from_utf8(body).ok()?;
    let text = text.replace("\r\n", "\n");
    for event in text.split("\n\n") {
        let mut data = String::new();
        for line in event.lines() {
            if let Some(v) = line.strip_prefix("data:") {
                if !data.is_empty() {
                    data.push('\n');
                }
                data.push_str(v.strip_prefix(' ').unwrap_or(v));
            }
        }
        let Ok(v) = serde_json::from_str::<Value>(&data) else {
            continue;
        };
        if v.get("id") == Some(id) && (v.get("result").is_some() || v.get("error").is_some()) {
            return Some(v);
        }
    }
    None
}

/// The `result` of each server that answered, with its prefix.
pub type Answers<'a> = [(&'a str, Value)];

/// Capabilities of several servers as one: an object capability is present when any server has
/// it, its flags (`listChanged`, `subscribe`) true when any server's is.
fn merge_capabilities(answers: &Answers<'_>) -> Value {
    let mut out = Map::new();
    for (_, result) in answers {
        let Some(caps) = result.get("capabilities").and_then(Value::as_object) else {
            continue;
        };
        for (name, cap) in caps {
            let slot = out
                .entry(name.clone())
                .or_insert_with(|| Value::Object(Map::new()));
            if let (Value::Object(into), Value::Object(from)) = (slot, cap) {
                for (k, v) in from {
                    let keep = into.get(k).is_some_and(|old| old == &Value::Bool(true));
                    if !keep {
                        into.insert(k.clone(), v.clone());
                    }
                }
            }
        }
    }
    Value::Object(out)
}

/// The instructions of every server that has some, each introduced by its prefix.
fn merge_instructions(answers: &Answers<'_>) -> Option<Value> {
    let parts: Vec<String> = answers
        .iter()
        .filter_map(|(prefix, r)| {
            let text = r.get("instructions")?.as_str()?;
            Some(format!("[{prefix}] {text}"))
        })
        .collect();
    (!parts.is_empty()).then(|| Value::String(parts.join("\n\n")))
}

fn gateway_info() -> Value {
    serde_json::json!({"name": "tollgate", "version": env!("CARGO_PKG_VERSION")})
}

/// `initialize`: the first server's protocol version (servers answer the client's own when
/// they support it), every server's capabilities, the gateway as the server.
pub fn merge_initialize(answers: &Answers<'_>) -> Value {
    let mut out = Map::new();
    if let Some(v) = answers.iter().find_map(|(_, r)| r.get("protocolVersion")) {
        out.insert("protocolVersion".into(), v.clone());
    }
    out.insert("capabilities".into(), merge_capabilities(answers));
    out.insert("serverInfo".into(), gateway_info());
    if let Some(i) = merge_instructions(answers) {
        out.insert("instructions".into(), i);
    }
    Value::Object(out)
}

/// `server/discover` (2026-07-28): the versions every server supports, every server's
/// capabilities; other fields (and `_meta`) from the first server.
pub fn merge_discover(answers: &Answers<'_>) -> Value {
    let mut out = match answers.first() {
        Some((_, Value::Object(first))) => first.clone(),
        _ => Map::new(),
    };
    let versions = |r: &Value| -> Vec<Value> {
        r.get("supportedVersions")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    let mut common = answers
        .first()
        .map(|(_, r)| versions(r))
        .unwrap_or_default();
    for (_, r) in answers.iter().skip(1) {
        let theirs = versions(r);
        common.retain(|v| theirs.contains(v));
    }
    out.insert("supportedVersions".into(), Value::Array(common));
    out.insert("capabilities".into(), merge_capabilities(answers));
    match merge_instructions(answers) {
        Some(i) => out.insert("instructions".into(), i),
        None => out.remove("instructions"),
    };
    Value::Object(out)
}

/// `tools/list`: every server's tools, named `<prefix>__<tool>`, those `keep` refuses left out.
/// No `nextCursor`: one page per server is what the gateway lists. Other fields (2026-07-28's
/// `resultType`, `cacheScope`) from the first server, `ttlMs` the shortest of any.
pub fn merge_tools(answers: &Answers<'_>, keep: impl Fn(&str) -> bool) -> Value {
    let mut out = match answers.first() {
        Some((_, Value::Object(first))) => first.clone(),
        _ => Map::new(),
    };
    out.remove("nextCursor");
    if let Some(ttl) = answers
        .iter()
        .filter_map(|(_, r)| r.get("ttlMs").and_then(Value::as_u64))
        .min()
    {
        out.insert("ttlMs".into(), ttl.into());
    }
    let mut tools = Vec::new();
    for (prefix, result) in answers {
        let Some(list) = result.get("tools").and_then(Value::as_array) else {
            continue;
        };
        for tool in list {
            let Some(name) = tool.get("name").and_then(Value::as_str) else {
                continue;
            };
            let full = format!("{prefix}{SEPARATOR}{name}");
            if !keep(&full) {
                continue;
            }
            let mut tool = tool.clone();
            if let Some(o) = tool.as_object_mut() {
                o.insert("name".into(), Value::String(full));
            }
            tools.push(tool);
        }
    }
    out.insert("tools".into(), Value::Array(tools));
    Value::Object(out)
}

/// A JSON-RPC request body with `params.name` set to `name` (a federated tool name made the
/// server's own). `None` when the body is not an object with params.
pub fn with_tool_name(body: &[u8], name: &str) -> Option<Vec<u8>> {
    let mut v: Value = serde_json::from_slice(body).ok()?;
    let params = v.get_mut("params")?.as_object_mut()?;
    params.insert("name".into(), Value::String(name.to_string()));
    serde_json::to_vec(&v).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fed() -> Federation {
        Federation {
            servers: vec![
                FederatedServer {
                    prefix: "github".into(),
                    backend: 0,
                },
                FederatedServer {
                    prefix: "jira".into(),
                    backend: 1,
                },
            ],
        }
    }

    #[test]
    fn tool_names_split_on_the_first_separator() {
        let f = fed();
        let (s, t) = f.split("jira__create_issue").unwrap();
        assert_eq!((&*s.prefix, s.backend, t), ("jira", 1, "create_issue"));
        assert_eq!(f.split("github__a__b").unwrap().1, "a__b");
        assert!(f.split("gitlab__x").is_none());
        assert!(f.split("github__").is_none());
        assert!(f.split("github").is_none());
    }

    #[test]
    fn answers_are_found_in_json_and_sse() {
        let id = json!(3);
        let msg = json!({"jsonrpc": "2.0", "id": 3, "result": {"tools": []}});
        assert_eq!(
            answer_in(msg.to_string().as_bytes(), false, &id),
            Some(msg.clone())
        );
        assert_eq!(
            answer_in(msg.to_string().as_bytes(), false, &json!(4)),
            None
        );
        let sse = format!(
            "event: message\r\ndata: {}\r\n\r\nevent: message\r\ndata: {}\r\n\r\n",
            json!({"jsonrpc": "2.0", "method": "notifications/progress"}),
            msg
        );
        assert_eq!(answer_in(sse.as_bytes(), true, &id), Some(msg));
        assert_eq!(answer_in(b"data: nope\n\n", true, &id), None);
    }

    #[test]
    fn lists_and_handshakes_merge() {
        let answers = [
            (
                "github",
                json!({"protocolVersion": "2025-11-25",
                       "capabilities": {"tools": {"listChanged": false}, "logging": {}},
                       "serverInfo": {"name": "gh"}, "instructions": "use me",
                       "tools": [{"name": "search", "inputSchema": {}}, {"name": "delete"}],
                       "ttlMs": 60000, "nextCursor": "x",
                       "supportedVersions": ["2025-11-25", "2026-07-28"]}),
            ),
            (
                "jira",
                json!({"protocolVersion": "2025-11-25", "ttlMs": 5,
                       "capabilities": {"tools": {"listChanged": true}, "prompts": {}},
                       "tools": [{"name": "search"}],
                       "supportedVersions": ["2026-07-28"]}),
            ),
        ];
        let init = merge_initialize(&answers);
        assert_eq!(init["protocolVersion"], "2025-11-25");
        assert_eq!(init["serverInfo"]["name"], "tollgate");
        assert_eq!(init["capabilities"]["tools"]["listChanged"], true);
        assert!(init["capabilities"]["prompts"].is_object());
        assert!(init["capabilities"]["logging"].is_object());
        assert_eq!(init["instructions"], "[github] use me");
        let d = merge_discover(&answers);
        assert_eq!(d["supportedVersions"], json!(["2026-07-28"]));
        let tools = merge_tools(&answers, |n| n != "github__delete");
        let names: Vec<&str> = tools["tools"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["github__search", "jira__search"]);
        assert!(tools["tools"][0]["inputSchema"].is_object());
        assert_eq!(tools["ttlMs"], 5);
        assert!(tools.get("nextCursor").is_none());
        let body = br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"jira__search","arguments":{"q":1}}}"#;
        let v: Value = serde_json::from_slice(&with_tool_name(body, "search").unwrap()).unwrap();
        assert_eq!(
            v["params"],
            json!({"name": "search", "arguments": {"q": 1}})
        );
    }
}
