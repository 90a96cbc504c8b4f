//! `tollgate demo`: built-in agent services plus the routes and keys that put the gateway in front.
//! [`spawn_demo_services`] runs the backends; [`demo_config_yaml`] and [`demo_curl_lines`] wire them up;
//! [`run`] is the whole command (on 127.0.0.1 unless told otherwise: the demo keys are public).
#![forbid(unsafe_code)]

mod run;
mod services;

pub use run::{run, DemoError, DEFAULT_ADMIN_PORT, DEFAULT_BIND, DEFAULT_PORT};
pub use services::{spawn_demo_services, DemoOptions, DemoServices};

use std::fmt::Write as _;
use std::net::SocketAddr;

use sha2::{Digest, Sha256};

/// Namespace of every demo resource.
pub const DEMO_NAMESPACE: &str = "demo";
/// Plain key of `demo-user` (roles `user`), held in the Secret `demo-user-key`.
pub const DEMO_USER_KEY: &str = "demo-user-key-0001";
/// Plain key of `demo-admin` (roles `admin`, `user`); the config carries only its SHA-256.
pub const DEMO_ADMIN_KEY: &str = "demo-admin-key-0001";

/// `sha256:<64 hex>` of a plain key, the form `keyHash` takes.
fn key_hash(key: &str) -> String {
    let digest = Sha256::digest(key.as_bytes());
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256:");
    for byte in digest {
        let _ = write!(out, "{byte:02x}");
    }
    out
}

/// The seed's routes and two keys as multi-document YAML (Secret, AgentApiKey, AgentRoute),
/// every backend an explicit `url` of the running demo services.
pub fn demo_config_yaml(svc: &DemoServices) -> String {
    let ns = DEMO_NAMESPACE;
    let url = |addr: SocketAddr| format!("http://{addr}");
    let conversation = url(svc.conversation);
    let tools = url(svc.tools);
    let rag = url(svc.rag);
    let memory = url(svc.memory);
    let mcp = url(svc.mcp);
    let admin_hash = key_hash(DEMO_ADMIN_KEY);
    let route = |name: &str, body: &str, backend: &str| {
        format!(
            "---\napiVersion: tollgate.dev/v1alpha1\nkind: AgentRoute\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n{body}  backends:\n    - url: {backend}\n"
        )
    };
    let mut out = format!(
        "---
# Tollgate demo: the seed's agent services behind one gateway (namespace {ns}).
# demo-user's key lives in a Secret; demo-admin's is given only by its SHA-256.
apiVersion: v1
kind: Secret
metadata:
  name: demo-user-key
  namespace: {ns}
type: Opaque
stringData:
  api-key: {DEMO_USER_KEY}
---
apiVersion: tollgate.dev/v1alpha1
kind: AgentApiKey
metadata:
  name: demo-user
  namespace: {ns}
spec:
  clientId: demo-user
  secretRef: {{name: demo-user-key, key: api-key}}
  roles: [user]
  rateLimit: {{requestsPerMinute: 60}}
---
apiVersion: tollgate.dev/v1alpha1
kind: AgentApiKey
metadata:
  name: demo-admin
  namespace: {ns}
spec:
  clientId: demo-admin
  keyHash: \"{admin_hash}\"
  roles: [admin, user]
  rateLimit: {{requestsPerMinute: 600}}
"
    );
    out.push_str(&route(
        "chat",
        "  match:
    pathPrefix: /api/v1/chat
    methods: [POST]
  protocol: http
  timeouts:
    request: 30s
  rateLimit:
    requestsPerMinute: 30
    tokensPerMinute: 20000
  rewrite:
    pathPrefix: /handle
",
        &conversation,
    ));
    out.push_str(&route(
        "chat-stream",
        "  match:
    pathPrefix: /api/v1/chat/stream
    methods: [GET, POST]
  protocol: sse
  timeouts:
    firstByte: 10s
    idle: 30s
  rateLimit:
    requestsPerMinute: 30
    tokensPerMinute: 20000
  rewrite:
    pathPrefix: /stream
",
        &conversation,
    ));
    out.push_str(&route(
        "chat-ws",
        "  match:
    pathPrefix: /api/v1/chat/ws
    methods: [GET]
  protocol: websocket
  timeouts:
    idle: 5m
  rewrite:
    pathPrefix: /ws
",
        &conversation,
    ));
    out.push_str(&route(
        "tools",
        "  match:
    pathPrefix: /api/v1/tools
    methods: [POST]
  protocol: http
  timeouts:
    request: 10s
  auth:
    roles: [admin]
  retry:
    attempts: 2
    retryOn: [502, 503, connect-failure]
    backoff: 50ms
  rewrite:
    pathPrefix: /execute
",
        &tools,
    ));
    out.push_str(&route(
        "search",
        "  match:
    pathPrefix: /api/v1/search
    methods: [GET, POST]
  protocol: http
  timeouts:
    request: 15s
  rateLimit:
    requestsPerMinute: 10
    burst: 5
  rewrite:
    pathPrefix: /search
",
        &rag,
    ));
    out.push_str(&route(
        "memory",
        "  match:
    pathPrefix: /api/v1/memory
    methods: [GET, POST, DELETE]
  protocol: http
  timeouts:
    request: 5s
  rewrite:
    pathPrefix: /memory
",
        &memory,
    ));
    out.push_str(&route(
        "mcp",
        "  match:
    pathPrefix: /mcp
  protocol: mcp
  timeouts:
    idle: 5m
  mcp:
    tools:
      - {name: add, roles: [user], rateLimit: {requestsPerMinute: 30}}
      - {name: \"search_*\", roles: [user]}
    denyUnlisted: true
",
        &mcp,
    ));
    out
}

/// Curl commands (with a `#` line saying what each shows) that work as printed against a
/// gateway listening on `listen`; an unspecified address is reached through loopback.
pub fn demo_curl_lines(listen: SocketAddr) -> String {
    let reach = run::loopback_if_unspecified(listen);
    let base = format!("http://{reach}");
    let user = format!("-H 'X-API-Key: {DEMO_USER_KEY}'");
    let admin = format!("-H 'X-API-Key: {DEMO_ADMIN_KEY}'");
    let json = "-H 'content-type: application/json'";
    let ws_url = format!("ws://{reach}");
    format!(
        "# Chat: an OpenAI-style completion; \"gateway\" shows what Tollgate added (X-Client-Id, X-Request-Id, traceparent)
curl -s {base}/api/v1/chat {user} {json} -d '{{\"model\":\"demo\",\"messages\":[{{\"role\":\"user\",\"content\":\"Hello gateway\"}}],\"max_tokens\":64}}'
# Chat, streamed token by token as server-sent events
curl -N {base}/api/v1/chat/stream {user} {json} -d '{{\"messages\":[{{\"role\":\"user\",\"content\":\"Stream me a reply\"}}]}}'
# Tools as admin: 200 with result \"42\"
curl -s {base}/api/v1/tools {admin} {json} -d '{{\"tool\":\"calculator\",\"input\":\"6*7\"}}'
# Tools as a plain user: 403 (the route needs the admin role)
curl -s -i {base}/api/v1/tools {user} {json} -d '{{\"tool\":\"calculator\",\"input\":\"6*7\"}}'
# A flaky tool that fails every other call: the route's retry hides it
curl -s {base}/api/v1/tools {admin} {json} -d '{{\"tool\":\"flaky\"}}'
# Search the RAG corpus (10 per minute, burst 5: repeat it to see 429)
curl -s '{base}/api/v1/search?q=rate+limits+per+client' {user}
# Memory: store a note in session s1, then read the session back
curl -s {base}/api/v1/memory/s1 {user} {json} -d '{{\"note\":\"prefers short answers\"}}'
curl -s {base}/api/v1/memory/s1 {user}
# MCP: the demo MCP server's two tools, then a call of one (or point any MCP client at {base}/mcp with the X-API-Key header)
curl -s {base}/mcp {user} {json} -d '{{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/list\"}}'
curl -s {base}/mcp {user} {json} -d '{{\"jsonrpc\":\"2.0\",\"id\":2,\"method\":\"tools/call\",\"params\":{{\"name\":\"add\",\"arguments\":{{\"a\":6,\"b\":7}}}}}}'
# No key: 401
curl -s -i {base}/api/v1/chat {json} -d '{{\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}]}}'
# WebSocket echo (needs websocat; the key may also ride in the api_key query parameter)
websocat '{ws_url}/api/v1/chat/ws?api_key={DEMO_USER_KEY}'
"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn docs(yaml: &str) -> Vec<serde_yaml::Value> {
        serde_yaml::Deserializer::from_str(yaml)
            .map(|doc| serde::Deserialize::deserialize(doc).expect("valid YAML document"))
            .collect()
    }

    fn port_of(url: &serde_yaml::Value) -> u16 {
        let url = url.as_str().expect("url string");
        url.strip_prefix("http://127.0.0.1:")
            .and_then(|p| p.parse().ok())
            .expect("http://127.0.0.1:PORT")
    }

    #[tokio::test]
    async fn config_yaml_holds_the_seed_routes_and_keys() {
        let svc = spawn_demo_services(DemoOptions {
            token_delay: Duration::from_millis(1),
        })
        .await
        .expect("demo services");
        let yaml = demo_config_yaml(&svc);
        let docs = docs(&yaml);
        let names: Vec<(String, String)> = docs
            .iter()
            .map(|d| {
                assert_eq!(d["metadata"]["namespace"], "demo");
                (
                    d["kind"].as_str().expect("kind").to_string(),
                    d["metadata"]["name"].as_str().expect("name").to_string(),
                )
            })
            .collect();
        let expected = [
            ("Secret", "demo-user-key"),
            ("AgentApiKey", "demo-user"),
            ("AgentApiKey", "demo-admin"),
            ("AgentRoute", "chat"),
            ("AgentRoute", "chat-stream"),
            ("AgentRoute", "chat-ws"),
            ("AgentRoute", "tools"),
            ("AgentRoute", "search"),
            ("AgentRoute", "memory"),
            ("AgentRoute", "mcp"),
        ];
        let expected: Vec<(String, String)> = expected
            .iter()
            .map(|(k, n)| (k.to_string(), n.to_string()))
            .collect();
        assert_eq!(names, expected);
        for doc in &docs[1..] {
            assert_eq!(doc["apiVersion"], "tollgate.dev/v1alpha1");
        }
        assert_eq!(docs[0]["apiVersion"], "v1");
        assert_eq!(docs[0]["stringData"]["api-key"], DEMO_USER_KEY);
        assert_eq!(docs[1]["spec"]["secretRef"]["name"], "demo-user-key");
        assert_eq!(docs[1]["spec"]["secretRef"]["key"], "api-key");
        assert_eq!(docs[1]["spec"]["roles"][0], "user");
        let hash = docs[2]["spec"]["keyHash"].as_str().expect("keyHash");
        assert_eq!(hash, key_hash(DEMO_ADMIN_KEY));
        assert_eq!(hash.len(), 7 + 64);
        assert_eq!(
            docs[2]["spec"]["roles"],
            serde_yaml::from_str::<serde_yaml::Value>("[admin, user]").expect("roles")
        );

        let route = |name: &str| {
            docs.iter()
                .find(|d| d["kind"] == "AgentRoute" && d["metadata"]["name"] == name)
                .map(|d| &d["spec"])
                .expect("route")
        };
        let chat = route("chat");
        assert_eq!(chat["match"]["pathPrefix"], "/api/v1/chat");
        assert_eq!(chat["match"]["methods"][0], "POST");
        assert_eq!(chat["rewrite"]["pathPrefix"], "/handle");
        assert_eq!(chat["rateLimit"]["requestsPerMinute"], 30);
        assert_eq!(chat["rateLimit"]["tokensPerMinute"], 20000);
        assert_eq!(chat["timeouts"]["request"], "30s");
        assert_eq!(
            port_of(&chat["backends"][0]["url"]),
            svc.conversation.port()
        );
        let stream = route("chat-stream");
        assert_eq!(stream["protocol"], "sse");
        assert_eq!(stream["rewrite"]["pathPrefix"], "/stream");
        assert_eq!(stream["timeouts"]["idle"], "30s");
        let ws = route("chat-ws");
        assert_eq!(ws["protocol"], "websocket");
        assert_eq!(ws["rewrite"]["pathPrefix"], "/ws");
        let mcp = route("mcp");
        assert_eq!(mcp["protocol"], "mcp");
        assert_eq!(mcp["mcp"]["tools"][0]["name"], "add");
        assert_eq!(port_of(&mcp["backends"][0]["url"]), svc.mcp.port());
        let tools = route("tools");
        assert_eq!(tools["auth"]["roles"][0], "admin");
        assert_eq!(tools["retry"]["attempts"], 2);
        assert_eq!(tools["retry"]["retryOn"][0], 502);
        assert_eq!(tools["retry"]["retryOn"][2], "connect-failure");
        assert_eq!(tools["rewrite"]["pathPrefix"], "/execute");
        assert_eq!(port_of(&tools["backends"][0]["url"]), svc.tools.port());
        let search = route("search");
        assert_eq!(search["rateLimit"]["requestsPerMinute"], 10);
        assert_eq!(search["rateLimit"]["burst"], 5);
        assert_eq!(port_of(&search["backends"][0]["url"]), svc.rag.port());
        let memory = route("memory");
        assert_eq!(memory["rewrite"]["pathPrefix"], "/memory");
        assert_eq!(port_of(&memory["backends"][0]["url"]), svc.memory.port());
        svc.shutdown().await;
    }

    #[test]
    fn key_hash_is_sha256_hex() {
        assert_eq!(
            key_hash("test"),
            "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
        );
    }

    #[test]
    fn curl_lines_name_the_gateway_and_keys() {
        let lines = demo_curl_lines("0.0.0.0:8080".parse().expect("addr"));
        assert!(lines.contains("curl -s http://127.0.0.1:8080/api/v1/chat "));
        assert!(lines.contains("curl -N http://127.0.0.1:8080/api/v1/chat/stream "));
        assert!(lines.contains(DEMO_USER_KEY) && lines.contains(DEMO_ADMIN_KEY));
        // Every JSON body is single-quoted and valid.
        for line in lines.lines().filter(|l| l.starts_with("curl")) {
            if let Some((_, rest)) = line.split_once(" -d '") {
                let body = rest.strip_suffix('\'').expect("body is the last argument");
                serde_json::from_str::<serde_json::Value>(body).expect("valid JSON body");
            }
        }
        let v6 = demo_curl_lines("[::]:9000".parse().expect("addr"));
        assert!(v6.contains("http://[::1]:9000/api/v1/search"));
    }
}
