//! The built `tollgate` binary as a child process, for tests that need several replicas or the
//! process's own output: started on loopback ports (read from its JSON "gateway listening" log
//! line), waited for until `/readyz` answers 200, killed when dropped.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

use super::lock;

/// `tollgate standalone` running as a child process.
pub struct GatewayProcess {
    pub child: Child,
    pub pid: u32,
    pub listen: std::net::SocketAddr,
    pub admin: std::net::SocketAddr,
    /// Everything written to stdout and stderr so far.
    output: Arc<Mutex<Vec<u8>>>,
    readers: Vec<JoinHandle<()>>,
    pub dir: tempfile::TempDir,
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        // `kill_on_drop` stops the child; the readers end with its pipes.
        for r in &self.readers {
            r.abort();
        }
    }
}

fn capture(
    mut stream: impl AsyncRead + Unpin + Send + 'static,
    out: Arc<Mutex<Vec<u8>>>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut buf = [0u8; 8192];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => lock(&out).extend_from_slice(&buf[..n]),
            }
        }
    })
}

impl GatewayProcess {
    /// Writes `config` to a temporary directory and runs `tollgate standalone` on it with JSON
    /// logs, loopback ports and `args`; `envs` are set for the child (`RUST_LOG` is cleared
    /// unless given there). Returns once `/readyz` answers 200.
    pub async fn start(config: &str, args: &[&str], envs: &[(&str, &str)]) -> GatewayProcess {
        let dir = tempfile::tempdir().expect("create a temporary config directory");
        let file = dir.path().join("config.yaml");
        std::fs::write(&file, config).expect("write the config");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tollgate"));
        cmd.arg("standalone")
            .arg("--config")
            .arg(&file)
            .args([
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
                "--log-format",
                "json",
            ])
            .args(args)
            .env_remove("RUST_LOG")
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().expect("start the tollgate binary");
        let pid = child.id().expect("the child has a pid");
        let output: Arc<Mutex<Vec<u8>>> = Arc::default();
        let readers = vec![
            capture(child.stdout.take().expect("piped stdout"), output.clone()),
            capture(child.stderr.take().expect("piped stderr"), output.clone()),
        ];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let (listen, admin) = loop {
            let found = String::from_utf8_lossy(&lock(&output))
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .find(|v| v["message"] == "gateway listening")
                .and_then(|v| {
                    Some((
                        v["listen"].as_str()?.parse().ok()?,
                        v["admin_listen"].as_str()?.parse().ok()?,
                    ))
                });
            if let Some(addrs) = found {
                break addrs;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "tollgate exited early ({status}): {}",
                    String::from_utf8_lossy(&lock(&output))
                );
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "tollgate did not log its addresses: {}",
                String::from_utf8_lossy(&lock(&output))
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let gw = GatewayProcess {
            child,
            pid,
            listen,
            admin,
            output,
            readers,
            dir,
        };
        let http = super::client();
        let ready = gw.admin_url("/readyz");
        super::eventually(Duration::from_secs(10), "/readyz answers 200", || {
            let req = http.get(&ready).send();
            async move { req.await.ok().filter(|r| r.status() == 200).map(|_| ()) }
        })
        .await;
        gw
    }

    /// `http://<listen><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.listen, path)
    }

    /// `http://<admin><path>`.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    /// Everything the process wrote to stdout and stderr so far.
    pub fn output(&self) -> String {
        String::from_utf8_lossy(&lock(&self.output)).into_owned()
    }

    /// Sends SIGTERM (through `kill`, as an orchestrator would).
    pub fn sigterm(&self) {
        let status = std::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM {} failed", self.pid);
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The sum of every series of metric `name` on this process's `/metrics`.
    pub async fn metric(&self, name: &str) -> f64 {
        let text = super::client()
            .get(self.admin_url("/metrics"))
            .send()
            .await
            .expect("the admin port answers")
            .text()
            .await
            .expect("metrics text");
        metric_sum(&text, name)
    }
}

/// The sum of every series of metric `name` in a Prometheus text exposition.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
