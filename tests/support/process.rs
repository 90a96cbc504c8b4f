//! Child processes: the built `tollgate` binary (`standalone` or `run`), for tests that need
//! several replicas or the process's own output: started on loopback ports (read from its JSON
//! "gateway listening" log line), waited for until `/readyz` answers 200, killed when dropped;
//! and bounded runs of other commands (kubectl, helm, scripts).

use std::io::Read;
use std::net::SocketAddr;
use std::process::{Output, Stdio};
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
    pub listen: SocketAddr,
    pub admin: SocketAddr,
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
    /// `tollgate SUBCOMMAND` on loopback ports with JSON logs, `RUST_LOG` cleared (set it in
    /// `envs` to get one), its output captured.
    fn command(subcommand: &str) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tollgate"));
        cmd.arg(subcommand)
            .args([
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
                "--log-format",
                "json",
            ])
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        cmd
    }

    /// Writes `config` to a temporary directory and runs `tollgate standalone` on it with JSON
    /// logs, loopback ports and `args`; `envs` are set for the child (`RUST_LOG` is cleared
    /// unless given there). Returns once `/readyz` answers 200.
    pub async fn start(config: &str, args: &[&str], envs: &[(&str, &str)]) -> GatewayProcess {
        let dir = tempfile::tempdir().expect("create a temporary config directory");
        let file = dir.path().join("config.yaml");
        std::fs::write(&file, config).expect("write the config");
        let mut cmd = Self::command("standalone");
        cmd.arg("--config")
            .arg(&file)
            .args(args)
            .envs(envs.iter().copied());
        Self::launch(cmd, dir, Duration::from_secs(10)).await
    }

    /// `tollgate run` (Kubernetes mode) with `args` and `envs`, as outside a cluster (the
    /// in-cluster variables removed). Returns once `/readyz` answers 200, within `ready_within`.
    pub async fn run(
        args: &[&str],
        envs: &[(&str, &str)],
        ready_within: Duration,
    ) -> GatewayProcess {
        let dir = tempfile::tempdir().expect("create a temporary directory");
        let mut cmd = Self::command("run");
        cmd.args(args)
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("KUBERNETES_SERVICE_PORT")
            .env_remove("POD_NAMESPACE")
            .env_remove("POD_NAME")
            .envs(envs.iter().copied());
        Self::launch(cmd, dir, ready_within).await
    }

    async fn launch(
        mut cmd: Command,
        dir: tempfile::TempDir,
        ready_within: Duration,
    ) -> GatewayProcess {
        let mut child = cmd.spawn().expect("start the tollgate binary");
        let pid = child.id().expect("the child has a pid");
        let output: Arc<Mutex<Vec<u8>>> = Arc::default();
        let readers = vec![
            capture(child.stdout.take().expect("piped stdout"), output.clone()),
            capture(child.stderr.take().expect("piped stderr"), output.clone()),
        ];
        let deadline = tokio::time::Instant::now() + ready_within;
        let (listen, admin) = loop {
            let found = String::from_utf8_lossy(&lock(&output))
                .lines()
                .find_map(listening);
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
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let what = format!("/readyz answers 200 (output: {})", gw.output());
        super::eventually(left.max(Duration::from_secs(10)), &what, || {
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

    /// Sends SIGKILL: the process dies at once, without releasing anything.
    pub fn sigkill(&self) {
        let status = std::process::Command::new("kill")
            .args(["-KILL", &self.pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -KILL {} failed", self.pid);
    }

    /// The JSON log lines written so far.
    pub fn log_lines(&self) -> Vec<serde_json::Value> {
        self.output()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM, then the exit status; SIGKILL and `None` if it has not exited within 15 s.
    pub async fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return Some(status);
        }
        self.sigterm();
        match tokio::time::timeout(Duration::from_secs(15), self.child.wait()).await {
            Ok(Ok(status)) => Some(status),
            _ => {
                let _ = self.child.kill().await;
                None
            }
        }
    }

    /// This process's `/metrics` text.
    pub async fn metrics(&self) -> String {
        super::metrics::fetch(&self.admin_url("")).await
    }

    /// The sum of every series of metric `name` on this process's `/metrics`.
    pub async fn metric(&self, name: &str) -> f64 {
        metric_sum(&self.metrics().await, name)
    }
}

#[allow(unused_imports)]
pub use super::metrics::metric_sum;

/// The addresses of the `gateway listening` JSON log line (fields flattened into the line, or
/// nested under "fields", tracing-subscriber's default).
fn listening(line: &str) -> Option<(SocketAddr, SocketAddr)> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let fields = if v["fields"].is_object() {
        &v["fields"]
    } else {
        &v
    };
    if fields["message"] != "gateway listening" {
        return None;
    }
    let addr = |k: &str| fields[k].as_str()?.parse::<SocketAddr>().ok();
    Some((addr("listen")?, addr("admin_listen")?))
}

/// Runs `cmd` to the end (blocking), killing it and failing the test if it takes longer than
/// `limit`; stdin is closed, stdout and stderr captured.
pub fn run_limited(mut cmd: std::process::Command, limit: Duration, what: &str) -> Output {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("starting {what}: {e}"));
    let pipe = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            buf
        })
    };
    let out = pipe(Box::new(child.stdout.take().expect("stdout")));
    let err = pipe(Box::new(child.stderr.take().expect("stderr")));
    let deadline = std::time::Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting") {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out.join().expect("stdout reader"),
        stderr: err.join().expect("stderr reader"),
    }
}

/// Runs `cmd` (bounded to 120 s), fails the test with its output unless it succeeds, returns
/// its stdout.
pub fn run_ok(cmd: std::process::Command, what: &str) -> String {
    let out = run_limited(cmd, Duration::from_secs(120), what);
    assert!(
        out.status.success(),
        "{what} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}
