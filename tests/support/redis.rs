//! A real `redis-server` of the test's own: a free loopback port, no persistence (its files in a
//! temporary directory), killed when dropped. Blocking (std processes and sockets), so that the
//! unit tests of `src/ratelimit/redis.rs` include this very file (`#[path]`) as well: one
//! launcher for both. Needs nothing from the rest of `support` but [`super::ports`].

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::ports::free_port;

/// A running `redis-server`.
pub struct RedisServer {
    binary: PathBuf,
    port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl RedisServer {
    fn binary() -> Option<PathBuf> {
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .chain(["/usr/bin", "/usr/local/bin", "/usr/sbin"].map(PathBuf::from))
            .map(|dir| dir.join("redis-server"))
            .find(|candidate| candidate.is_file())
    }

    /// Starts one and waits until it answers `PING`; panics when redis-server is not installed
    /// (`apt-get install redis-server`; scripts/test.sh installs it).
    pub fn start() -> RedisServer {
        let binary = Self::binary()
            .expect("redis-server not found on PATH or in /usr/bin: apt-get install redis-server");
        Self::launch(binary)
    }

    /// Like [`RedisServer::start`], or `None` (after a loud message) only when redis-server is
    /// missing and `TOLLGATE_SKIP_REDIS=1`; a missing redis-server fails the test otherwise.
    pub fn start_or_skip() -> Option<RedisServer> {
        let Some(binary) = Self::binary() else {
            if std::env::var("TOLLGATE_SKIP_REDIS").as_deref() == Ok("1") {
                eprintln!("\n!!!!!!!! redis-server not found: SKIPPING this Redis test (TOLLGATE_SKIP_REDIS=1) !!!!!!!!\n");
                return None;
            }
            panic!("redis-server not found on PATH or in /usr/bin: install it (apt-get install redis-server) or set TOLLGATE_SKIP_REDIS=1");
        };
        Some(Self::launch(binary))
    }

    fn launch(binary: PathBuf) -> RedisServer {
        let mut server = RedisServer {
            binary,
            port: free_port(),
            child: None,
            dir: tempfile::tempdir().expect("a directory for redis"),
        };
        server.restart();
        server
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Starts the server (again, after [`RedisServer::kill`]) on the same port, empty.
    pub fn restart(&mut self) {
        let port = self.port.to_string();
        let child = Command::new(&self.binary)
            .args(["--port", &port, "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(["--daemonize", "no", "--loglevel", "warning"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.ping() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("redis-server did not start on port {port}");
    }

    /// Whether the server answers `PING` with `PONG` (within 500 ms).
    pub fn ping(&self) -> bool {
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
        let mut reply = [0u8; 7];
        stream.write_all(b"PING\r\n").is_ok()
            && stream.read_exact(&mut reply).is_ok()
            && &reply == b"+PONG\r\n"
    }

    /// Freezes (`STOP`) or thaws (`CONT`) the server: a hung Redis that accepts connections
    /// but never answers.
    pub fn signal(&self, signal: &str) {
        let pid = self
            .child
            .as_ref()
            .map(Child::id)
            .expect("running redis-server");
        let status = Command::new("kill")
            .args([format!("-{signal}"), pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} {pid}");
    }

    /// Kills the server (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
