//! The `tollgate` binary as users run it: `check` on good and bad configuration (unknown fields
//! included), `demo`'s listeners, and `crdgen` against the checked-in `crds/tollgate.yaml`.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use serde_json::json;
use support::*;

/// Runs the built binary with `args`; bounded, killed if it hangs.
async fn tollgate(args: &[&str]) -> Output {
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(args)
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(Duration::from_secs(15), child)
        .await
        .unwrap_or_else(|_| panic!("tollgate {args:?} did not finish within 15 s"))
        .expect("run the tollgate binary")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("temporary paths are UTF-8")
}

#[tokio::test]
async fn check_accepts_a_good_configuration() {
    bounded(async {
        let dir = tempfile::tempdir().expect("temporary directory");
        let mut docs = api_key(
            "agents",
            "mobile",
            "mobile-app",
            "tg-cli-key",
            &["user"],
            json!({}),
        );
        docs.push(route_in(
            "agents",
            "chat",
            json!({"hosts": ["api.example.com"],
                   "match": {"pathPrefix": "/api/v1/chat", "methods": ["POST"]},
                   "protocol": "sse",
                   "timeouts": {"firstByte": "10s", "idle": "1m"},
                   "retry": {"attempts": 2, "retryOn": [502, "connect-failure"], "backoff": "50ms"},
                   "rewrite": {"pathPrefix": "/handle"},
                   "backends": [{"url": "http://127.0.0.1:9000"}]}),
        ));
        let file = dir.path().join("good.yaml");
        std::fs::write(&file, yaml(docs)).expect("write the config");

        let out = tollgate(&["check", "--config", path_str(&file)]).await;
        assert_eq!(
            out.status.code(),
            Some(0),
            "stdout: {}\nstderr: {}",
            stdout(&out),
            String::from_utf8_lossy(&out.stderr)
        );
        // A directory holding it checks the same.
        let out = tollgate(&["check", "--config", path_str(dir.path())]).await;
        assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    })
    .await;
}

#[tokio::test]
async fn check_lists_every_problem_with_its_file_and_field() {
    bounded(async {
        let dir = tempfile::tempdir().expect("temporary directory");
        let routes = dir.path().join("routes.yaml");
        let broken = dir.path().join("second.yaml");
        let docs = vec![
            route_in(
                "agents",
                "chat",
                json!({"match": {"pathPrefix": "api/v1/chat"},
                       "backends": [{"service": "conversation", "port": 8000, "url": "http://127.0.0.1:9000"}]}),
            ),
            api_key_spec(
                "agents",
                "mobile",
                json!({"clientId": "mobile-app", "secretRef": {"name": "no-such-secret", "key": "api-key"}}),
            ),
        ];
        std::fs::write(&routes, yaml(docs)).expect("write routes.yaml");
        std::fs::write(&broken, "apiVersion: v1\nkind: Secret\nmetadata: {name: x\n")
            .expect("write second.yaml");

        let out = tollgate(&["check", "--config", path_str(dir.path())]).await;
        let text = stdout(&out);
        assert_eq!(out.status.code(), Some(1), "{text}");
        let routes_file = path_str(&routes);
        let broken_file = path_str(&broken);
        let line_with = |file: &str, needles: &[&str]| {
            text.lines()
                .find(|l| l.starts_with(file) && needles.iter().all(|n| l.contains(n)))
                .unwrap_or_else(|| panic!("no line for {file} with {needles:?} in:\n{text}"))
                .to_string()
        };
        line_with(routes_file, &["AgentRoute agents/chat", "field spec.match.pathPrefix", "must start with '/'"]);
        line_with(routes_file, &["AgentRoute agents/chat", "field spec.backends[0]", "either service and port, or url"]);
        line_with(routes_file, &["AgentApiKey agents/mobile", "field spec.secretRef", "no-such-secret"]);
        line_with(broken_file, &["invalid YAML"]);
        assert!(text.contains("4 problem(s)"), "{text}");
    })
    .await;
}

/// Ingresses (with their IngressClass) are checked in files too: one that serves passes, an
/// ingress-nginx annotation Tollgate does not serve is named with its file.
#[tokio::test]
async fn check_validates_ingresses_and_names_unsupported_annotations() {
    bounded(async {
        let dir = tempfile::tempdir().expect("temporary directory");
        let class = "apiVersion: networking.k8s.io/v1
kind: IngressClass
metadata: {name: tollgate}
spec: {controller: tollgate.dev/ingress-controller}
";
        let ingress = |annotation: &str| {
            format!(
                "---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata:
  name: web
  namespace: agents
  annotations: {{nginx.ingress.kubernetes.io/{annotation}: \"30\"}}
spec:
  ingressClassName: tollgate
  rules:
    - host: web.example.com
      http:
        paths:
          - {{path: /api, pathType: Prefix, backend: {{service: {{name: api, port: {{number: 80}}}}}}}}
"
            )
        };
        let good = dir.path().join("good.yaml");
        std::fs::write(&good, format!("{class}{}", ingress("limit-rpm"))).expect("write");
        let out = tollgate(&["check", "--config", path_str(&good)]).await;
        assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
        let bad = dir.path().join("bad.yaml");
        std::fs::write(&bad, format!("{class}{}", ingress("proxy-send-timeout"))).expect("write");
        let out = tollgate(&["check", "--config", path_str(&bad)]).await;
        let text = stdout(&out);
        assert_eq!(out.status.code(), Some(1), "{text}");
        assert!(
            text.lines().any(|l| l.starts_with(path_str(&bad))
                && l.contains("Ingress agents/web")
                && l.contains("nginx.ingress.kubernetes.io/proxy-send-timeout")
                && l.contains("UnsupportedAnnotation")),
            "{text}"
        );
    })
    .await;
}

/// MCP configuration that cannot work is refused by `check`: an mcp route that cannot take
/// POST, and a session key Secret whose keys are not 32-byte base64 (named by line, never shown).
#[tokio::test]
async fn check_refuses_bad_mcp_configuration() {
    bounded(async {
        let dir = tempfile::tempdir().expect("temporary directory");
        let file = dir.path().join("mcp.yaml");
        let docs = vec![
            route_in(
                "agents",
                "tools",
                json!({"match": {"pathPrefix": "/mcp", "methods": ["GET"]}, "protocol": "mcp",
                       "backends": [{"url": "http://127.0.0.1:9000"}]}),
            ),
            route_in(
                "agents",
                "plain",
                json!({"match": {"pathPrefix": "/plain"},
                       "mcp": {"tools": [{"name": "x", "roles": ["admin"]}]},
                       "backends": [{"url": "http://127.0.0.1:9000"}]}),
            ),
            route_in(
                "agents",
                "ruled",
                json!({"match": {"pathPrefix": "/ruled"}, "protocol": "mcp",
                       "mcp": {"tools": [{"name": "x", "roles": []}]},
                       "backends": [{"url": "http://127.0.0.1:9000"}]}),
            ),
            support::secret(
                "agents",
                "mcp-sessions",
                "Opaque",
                json!({"keys": "c2hvcnQta2V5\n"}),
            ),
        ];
        std::fs::write(&file, yaml(docs)).expect("write mcp.yaml");
        let args = [
            "check",
            "--config",
            path_str(&file),
            "--mcp-session-secret",
            "agents/mcp-sessions",
        ];
        let out = tollgate(&args).await;
        let text = stdout(&out);
        assert_eq!(out.status.code(), Some(1), "{text}");
        assert!(
            text.lines().any(|l| l.contains("AgentRoute agents/tools")
                && l.contains("field spec.match.methods")
                && l.contains("needs POST")),
            "{text}"
        );
        assert!(
            text.lines()
                .any(|l| l.contains("Secret agents/mcp-sessions")
                    && l.contains("line 1 is not 32 bytes")),
            "{text}"
        );
        assert!(
            text.contains(
                "AgentRoute agents/plain field spec.mcp: mcp is for routes with protocol mcp"
            ),
            "{text}"
        );
        assert!(
            text.contains("AgentRoute agents/ruled field spec.mcp.tools[0]: a tool rule needs"),
            "{text}"
        );
        assert!(!text.contains("c2hvcnQta2V5"), "a key was printed: {text}");
        let missing = [
            "check",
            "--config",
            path_str(&file),
            "--mcp-session-secret",
            "agents/nope",
        ];
        let text = stdout(&tollgate(&missing).await);
        assert!(
            text.contains("Secret agents/nope") && text.contains("missing"),
            "{text}"
        );
    })
    .await;
}

/// Strict field validation, as `kubectl apply --validate=strict`: every field the gateway does
/// not know is an error with its file, document and path; the rest of the file checks as usual.
#[tokio::test]
async fn check_refuses_unknown_fields_with_their_file_and_path() {
    bounded(async {
        let dir = tempfile::tempdir().expect("temporary directory");
        let routes = dir.path().join("routes.yaml");
        let docs = vec![
            route_in(
                "default",
                "ok",
                json!({"match": {"pathPrefix": "/ok"}, "backends": [{"url": "http://127.0.0.1:9000"}]}),
            ),
            route_in(
                "default",
                "chat",
                json!({"match": {"pathPrefix": "/chat"}, "rateLimt": {"requestsPerMinute": 5},
                       "backends": [{"url": "http://127.0.0.1:9000", "wieght": 3}]}),
            ),
        ];
        std::fs::write(&routes, yaml(docs)).expect("write routes.yaml");

        let out = tollgate(&["check", "--config", path_str(&routes)]).await;
        let text = stdout(&out);
        assert_eq!(out.status.code(), Some(1), "{text}");
        let file = path_str(&routes);
        for field in ["spec.rateLimt", "spec.backends[0].wieght"] {
            let line = format!(
                "{file}: AgentRoute default/chat field {field}: unknown field in document 2; \
                 the object is not served (UnknownField)"
            );
            assert!(text.lines().any(|l| l == line), "no line {line:?} in:\n{text}");
        }
        assert!(text.contains("2 problem(s)"), "{text}");
    })
    .await;
}

/// Starts `tollgate demo` with `args` and returns it with the gateway and admin addresses of its
/// "Tollgate demo is running" line. Killed when dropped.
async fn start_demo(args: &[&str]) -> (tokio::process::Child, SocketAddr, SocketAddr) {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .arg("demo")
        .args(args)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start tollgate demo");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(15), async {
        while let Some(line) = lines.next_line().await.expect("read the demo's output") {
            if line.starts_with("Tollgate demo is running") {
                return line;
            }
        }
        panic!("tollgate demo {args:?} ended without saying it runs");
    })
    .await
    .expect("the demo starts within 15 s");
    // Keep draining its output so it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let addr_after = |label: &str| -> SocketAddr {
        let rest = &line[line
            .find(label)
            .unwrap_or_else(|| panic!("{label} in {line}"))
            + label.len()..];
        let end = rest.find([',', ' ']).unwrap_or(rest.len());
        rest[..end]
            .parse()
            .unwrap_or_else(|e| panic!("address in {line}: {e}"))
    };
    let gateway = addr_after("gateway http://");
    let admin = addr_after("admin http://");
    (child, gateway, admin)
}

/// A local address of this machine other than 127.0.0.1 (the one its default route would use,
/// found without sending anything; else 127.0.0.2, which a socket bound to 127.0.0.1 does not
/// accept either). A listener on 0.0.0.0 accepts connections to it.
fn other_local_ip() -> IpAddr {
    let routed = std::net::UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| s.connect("203.0.113.1:9").and_then(|()| s.local_addr()))
        .map(|a| a.ip());
    match routed {
        Ok(ip) if !ip.is_loopback() && !ip.is_unspecified() => ip,
        _ => IpAddr::from([127, 0, 0, 2]),
    }
}

async fn connects(addr: SocketAddr) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr)).await,
        Ok(Ok(_))
    )
}

/// The demo prints well-known keys: by default it must not be reachable from the network.
#[tokio::test]
async fn demo_listens_on_loopback_only_unless_bind_says_otherwise() {
    bounded(async {
        let dir = tempfile::tempdir().expect("temporary directory");
        let config_dir = path_str(dir.path());
        let (_demo, gateway, admin) = start_demo(&[
            "--port",
            "0",
            "--admin-port",
            "0",
            "--config-dir",
            config_dir,
        ])
        .await;
        let other = other_local_ip();
        for addr in [gateway, admin] {
            assert_eq!(addr.ip(), IpAddr::from([127, 0, 0, 1]), "{addr}");
            assert!(connects(addr).await, "the demo answers on {addr}");
            let outside = SocketAddr::new(other, addr.port());
            assert!(
                !connects(outside).await,
                "the demo must not be reachable on {outside}"
            );
        }
        // --bind chooses the address (here the IPv6 loopback, so the test opens nothing).
        let (_demo6, gateway6, admin6) = start_demo(&[
            "--bind",
            "::1",
            "--port",
            "0",
            "--admin-port",
            "0",
            "--config-dir",
            config_dir,
        ])
        .await;
        for addr in [gateway6, admin6] {
            assert_eq!(
                addr.ip(),
                IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
                "{addr}"
            );
            assert!(connects(addr).await, "the demo answers on {addr}");
        }
    })
    .await;
}

#[tokio::test]
async fn crdgen_matches_the_checked_in_crds() {
    bounded(async {
        let out = tollgate(&["crdgen"]).await;
        assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("crds/tollgate.yaml");
        let checked_in = std::fs::read(&path).unwrap_or_default();
        assert!(
            out.stdout == checked_in,
            "crds/tollgate.yaml differs from `tollgate crdgen`: run `cargo run -q -- crdgen > crds/tollgate.yaml`"
        );
    })
    .await;
}
