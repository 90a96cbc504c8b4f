//! MCP servers and clients made with the official Python SDK (`mcp`, pinned in scripts/test.sh,
//! which installs it into a virtualenv under /var/cache/tollgate-tools): `tests/mcp/server.py`
//! as stateful servers on loopback ports, `tests/mcp/client.py` as clients whose JSON report a
//! test reads.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::process::{Child, Command};

/// The virtualenv's Python: `TOLLGATE_MCP_PYTHON`, else the one scripts/test.sh makes.
pub fn python() -> PathBuf {
    let p = std::env::var_os("TOLLGATE_MCP_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/tollgate-tools/py-mcp-2.3.0/bin/python"));
    assert!(
        p.exists(),
        "no Python with the MCP SDK at {} (scripts/test.sh installs it; or set TOLLGATE_MCP_PYTHON)",
        p.display()
    );
    p
}

fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/mcp")
        .join(name)
}

/// A stateful MCP server (the SDK's `MCPServer`) on `127.0.0.1:<port>/mcp`, killed when dropped.
pub struct McpServer {
    pub name: String,
    pub port: u16,
    _child: Child,
}

impl McpServer {
    /// Starts instance `name`; `json` makes it answer POSTs with JSON rather than SSE. Returns
    /// once it accepts connections.
    pub async fn start(name: &str, json: bool) -> McpServer {
        let port = super::ports::free_port();
        let mut cmd = Command::new(python());
        cmd.arg(script("server.py"))
            .arg(name)
            .arg(port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        if json {
            cmd.arg("--json");
        }
        let child = cmd.spawn().expect("start the MCP server");
        super::eventually(
            Duration::from_secs(20),
            "the MCP server accepts connections",
            || async move {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .ok()
                    .map(|_| ())
            },
        )
        .await;
        McpServer {
            name: name.to_string(),
            port,
            _child: child,
        }
    }

    /// The server's process id (a test may kill it mid-session).
    pub fn pid(&self) -> u32 {
        self._child.id().unwrap_or(0)
    }

    /// `http://127.0.0.1:<port>`: the backend url of a route.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

/// Runs `client.py` with `args` (bounded) and returns its JSON report.
pub async fn client(args: &[&str], limit: Duration) -> Value {
    let mut cmd = Command::new(python());
    cmd.arg(script("client.py"))
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(limit, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("client.py {args:?} did not finish within {limit:?}"))
        .expect("run client.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|_| {
        panic!(
            "client.py {args:?} printed no report ({}): {stdout} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// initialize over raw JSON (the server answers JSON); returns the session id the client sees.
pub async fn initialize(http: &reqwest::Client, url: &str) -> String {
    let resp = http
        .post(url)
        .header("accept", "application/json, text/event-stream")
        .json(
            &json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-11-25", "capabilities": {},
            "clientInfo": {"name": "raw", "version": "1"}}}),
        )
        .send()
        .await
        .expect("initialize answers");
    assert_eq!(resp.status(), 200);
    let id = resp
        .headers()
        .get("mcp-session-id")
        .expect("a session id")
        .to_str()
        .unwrap()
        .to_string();
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["result"]["protocolVersion"], "2025-11-25", "{v}");
    let n = http
        .post(url)
        .header("accept", "application/json, text/event-stream")
        .header("mcp-session-id", &id)
        .header("mcp-protocol-version", "2025-11-25")
        .json(&json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))
        .send()
        .await
        .unwrap();
    assert_eq!(n.status(), 202);
    id
}

/// `tools/call whoami` in session `id`: status and JSON body.
pub async fn call(http: &reqwest::Client, url: &str, id: &str, rpc_id: u64) -> (u16, Value) {
    let resp = http
        .post(url)
        .header("accept", "application/json, text/event-stream")
        .header("mcp-session-id", id)
        .header("mcp-protocol-version", "2025-11-25")
        .json(
            &json!({"jsonrpc": "2.0", "id": rpc_id, "method": "tools/call",
            "params": {"name": "whoami", "arguments": {}}}),
        )
        .send()
        .await
        .expect("the gateway answers");
    let status = resp.status().as_u16();
    if status == 200 {
        assert_eq!(
            resp.headers().get("mcp-session-id").map(|v| v.as_bytes()),
            Some(id.as_bytes()),
            "the answer carries the client's session id, not the server's"
        );
    }
    (status, resp.json().await.unwrap_or(Value::Null))
}
