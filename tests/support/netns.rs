//! Real backends at real, non-loopback addresses that exist only inside a test: each one is an
//! HTTP server in a network namespace of its own, reached through a veth pair with a private
//! /30 (10.213.0.0/16). The API server refuses loopback addresses in EndpointSlices, so this is
//! how an EndpointSlice carries traffic end to end. Needs root and `ip` (iproute2), `python3`.
//! The namespace (and with it the veth pair) is deleted when the backend is dropped.

#![allow(dead_code)]

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The server inside the namespace: answers every request 200 with its name, the request's
/// path in `x-got-path` and its headers as JSON in `x-got-headers`, and `GET /_seen` with the
/// paths it has served, one per line. A path ending `/slow` is answered after 3 s.
const SERVER: &str = r#"
import http.server, json, sys, time
name, port = sys.argv[1], int(sys.argv[2])
seen = []
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def answer(self):
        n = int(self.headers.get("content-length") or 0)
        if n:
            self.rfile.read(n)
        if self.path.endswith("/slow"):
            time.sleep(3)
        body = ("\n".join(seen) if self.path == "/_seen" else name).encode()
        if self.path != "/_seen":
            seen.append(self.path)
        self.send_response(200)
        self.send_header("x-got-path", self.path)
        got = {}
        for k, v in self.headers.items():
            got.setdefault(k.lower(), []).append(v)
        self.send_header("x-got-headers", json.dumps(got))
        self.send_header("x-from-backend", "yes")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    do_GET = do_POST = do_PUT = do_DELETE = answer
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", port), H).serve_forever()
"#;

/// Port the server listens on inside its namespace.
pub const PORT: u16 = 8080;

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("ip {args:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A backend in its own network namespace.
pub struct NetnsBackend {
    pub name: String,
    pub netns: String,
    /// The server's address (inside the namespace, reachable from the host through the veth).
    pub addr: SocketAddr,
    child: Child,
}

impl NetnsBackend {
    /// Creates the namespace and veth pair, starts the server and waits until it accepts.
    pub fn start(name: &str) -> Self {
        for _ in 0..8 {
            let n: u16 = rand::random::<u16>() % 16_384;
            let netns = format!("tg-{}-{n}", std::process::id());
            // /30 number n of 10.213.0.0/16: .1 on the host side, .2 inside.
            let base = u32::from(Ipv4Addr::new(10, 213, 0, 0)) + u32::from(n) * 4;
            let (host, inner) = (Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2));
            let (hv, nv) = (format!("tgh{n}"), format!("tgn{n}"));
            if ip(&["netns", "add", &netns]).is_err() {
                continue;
            }
            let setup = (|| {
                ip(&["link", "add", &hv, "type", "veth", "peer", "name", &nv])?;
                ip(&["link", "set", &nv, "netns", &netns])?;
                ip(&["addr", "add", &format!("{host}/30"), "dev", &hv])?;
                ip(&["link", "set", &hv, "up"])?;
                let inside = |args: &[&str]| {
                    let mut all = vec!["netns", "exec", &netns, "ip"];
                    all.extend_from_slice(args);
                    ip(&all)
                };
                inside(&["addr", "add", &format!("{inner}/30"), "dev", &nv])?;
                inside(&["link", "set", &nv, "up"])?;
                inside(&["link", "set", "lo", "up"])
            })();
            if let Err(e) = setup {
                let _ = ip(&["link", "del", &hv]);
                let _ = ip(&["netns", "del", &netns]);
                panic!("network namespace setup: {e}");
            }
            let child = Command::new("ip")
                .args(["netns", "exec", &netns, "python3", "-c", SERVER, name])
                .arg(PORT.to_string())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("start the backend in its namespace (python3)");
            let backend = NetnsBackend {
                name: name.to_string(),
                netns,
                addr: SocketAddr::from((inner, PORT)),
                child,
            };
            let until = Instant::now() + Duration::from_secs(10);
            while TcpStream::connect_timeout(&backend.addr, Duration::from_millis(200)).is_err() {
                assert!(
                    Instant::now() < until,
                    "backend {name} at {} did not accept within 10 s",
                    backend.addr
                );
                std::thread::sleep(Duration::from_millis(50));
            }
            return backend;
        }
        panic!("no free network namespace name after 8 tries");
    }

    /// The paths this backend has served.
    pub async fn seen(&self) -> Vec<String> {
        let body = reqwest::get(format!("http://{}/_seen", self.addr))
            .await
            .expect("ask the backend what it served")
            .text()
            .await
            .unwrap_or_default();
        body.lines().map(str::to_string).collect()
    }
}

impl Drop for NetnsBackend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Deleting the namespace deletes its veth end, and with it the host's.
        let _ = ip(&["netns", "del", &self.netns]);
    }
}
