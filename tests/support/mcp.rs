//! MCP servers and clients made with the official Python SDK (`mcp`, pinned in scripts/test.sh,
//! which installs it into a virtualenv under /var/cache/tollgate-tools): `tests/mcp/server.py`
//! as stateful servers on loopback ports, `tests/mcp/client.py` as clients whose JSON report a
//! test reads.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
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
