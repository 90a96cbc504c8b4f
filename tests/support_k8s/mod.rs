//! The real control plane for the Kubernetes tests: etcd + kube-apiserver started once per test
//! binary by `hack/controlplane.sh`, torn down by a watchdog when the test process exits (even
//! on a panic or a kill). One namespace per test; the gateway runs in-process or as the binary.
#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use k8s_openapi::api::core::v1::{Namespace, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::rbac::v1::{ClusterRoleBinding, RoleBinding};
use kube::api::{ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use tollgate::api::{AgentApiKey, AgentRoute};
use tollgate::app::{self, Running, ServeOptions};
use tollgate::discovery::DiscoveryMode;
use tollgate::sources::kubernetes::KubeOptions;

/// Runs a test body under a time bound, or fails saying so.
pub async fn bounded<F: Future>(limit: Duration, fut: F) -> F::Output {
    tokio::time::timeout(limit, fut)
        .await
        .unwrap_or_else(|_| panic!("the test did not finish within {limit:?}"))
}

/// Polls `check` every 10 ms until it returns `Some`, or panics with `what` after `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {limit:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A running etcd + kube-apiserver in its own directory.
pub struct ControlPlane {
    pub dir: PathBuf,
    pub env: HashMap<String, String>,
}

static SHARED: OnceLock<ControlPlane> = OnceLock::new();

/// The control plane shared by the tests of this binary (CRDs installed), started on first use.
pub fn shared() -> &'static ControlPlane {
    SHARED.get_or_init(|| ControlPlane::start("shared", true))
}

impl ControlPlane {
    /// Starts a control plane (CRDs from `crds/` when `crds`). Blocking; a few seconds with the
    /// tools cached (`TOLLGATE_K8S_BIN`, else `hack/build-k8s-tools.sh` builds or finds them).
    pub fn start(label: &str, crds: bool) -> ControlPlane {
        let dir = std::env::temp_dir().join(format!(
            "tollgate-k8s-{}-{label}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).expect("create the control plane dir");
        let script = repo().join("hack/controlplane.sh");
        // The watchdog outlives this process: when the test binary exits, however it exits,
        // it stops etcd and kube-apiserver by their PID files and removes the directory.
        // `setsid -f`: the watchdog is not our child (no zombie, not killed with our group).
        Command::new("setsid")
            .arg("-f")
            .arg("bash")
            .arg("-c")
            .arg(
                r#"while kill -0 "$1" 2>/dev/null; do sleep 0.2; done
                   "$2" stop "$3" >/dev/null 2>&1; rm -rf "$3""#,
            )
            .arg("tollgate-k8s-watchdog")
            .arg(std::process::id().to_string())
            .arg(&script)
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("start the control-plane watchdog (needs setsid and bash)");
        let mut cmd = Command::new(&script);
        cmd.arg("start").arg(&dir).stdin(Stdio::null());
        if crds {
            cmd.env("INSTALL_CRDS_DIR", repo().join("crds"));
        }
        let out = cmd.output().expect("run hack/controlplane.sh");
        assert!(
            out.status.success(),
            "hack/controlplane.sh start failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let env = std::fs::read_to_string(dir.join("env"))
            .expect("controlplane.sh writes DIR/env")
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        ControlPlane { dir, env }
    }

    pub fn var(&self, key: &str) -> &str {
        self.env
            .get(key)
            .unwrap_or_else(|| panic!("{key} in the control plane env"))
    }

    pub fn admin_kubeconfig(&self) -> PathBuf {
        PathBuf::from(self.var("ADMIN_KUBECONFIG"))
    }

    pub fn user_kubeconfig(&self) -> PathBuf {
        PathBuf::from(self.var("USER_KUBECONFIG"))
    }

    /// Stops etcd and kube-apiserver now (the watchdog would do it at exit).
    pub fn stop(&self) {
        let _ = Command::new(repo().join("hack/controlplane.sh"))
            .arg("stop")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .output();
    }

    /// A client with the admin identity.
    pub async fn admin(&self) -> Client {
        client_for(&self.admin_kubeconfig()).await
    }

    /// `kubectl --kubeconfig admin ARGS`; panics with kubectl's output on failure.
    pub async fn kubectl(&self, args: &[&str]) -> String {
        let out = tokio::process::Command::new(self.var("KUBECTL"))
            .arg("--kubeconfig")
            .arg(self.admin_kubeconfig())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .await
            .expect("run kubectl");
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// A kubeconfig that acts as `user` (admin impersonating it: RBAC applies to `user`).
    pub fn impersonating(&self, user: &str) -> PathBuf {
        let text = std::fs::read_to_string(self.admin_kubeconfig()).expect("read admin kubeconfig");
        let mut kc: serde_yaml::Value = serde_yaml::from_str(&text).expect("kubeconfig YAML");
        kc["users"][0]["user"]["as"] = serde_yaml::Value::String(user.to_string());
        let path = self.dir.join(format!("as-{user}.kubeconfig"));
        std::fs::write(&path, serde_yaml::to_string(&kc).expect("YAML")).expect("write kubeconfig");
        path
    }

    /// Kills kube-apiserver (etcd keeps running) and returns what restarts it on the same port.
    pub fn kill_apiserver(&self) -> StoppedApiServer {
        let pidfile = self.dir.join("kube-apiserver.pid");
        let pid = std::fs::read_to_string(&pidfile)
            .expect("kube-apiserver.pid")
            .trim()
            .to_string();
        let argv: Vec<String> = std::fs::read(format!("/proc/{pid}/cmdline"))
            .expect("read the apiserver command line")
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).to_string())
            .collect();
        assert!(
            argv.first().is_some_and(|a| a.ends_with("kube-apiserver")),
            "pid {pid} is kube-apiserver: {argv:?}"
        );
        // TERM, then KILL: a terminating kube-apiserver keeps open watches for up to 60 s
        // while it drains; the outage under test is the server gone, connections and all.
        let _ = Command::new("kill").arg("-TERM").arg(&pid).status();
        let deadline = Instant::now() + Duration::from_secs(3);
        while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("kill").arg("-KILL").arg(&pid).status();
        }
        StoppedApiServer {
            argv,
            pidfile,
            log: self.dir.join("kube-apiserver.log"),
        }
    }
}

/// A kube-apiserver that was stopped, with its exact command line.
pub struct StoppedApiServer {
    argv: Vec<String>,
    pidfile: PathBuf,
    log: PathBuf,
}

impl StoppedApiServer {
    /// Starts it again with the same flags (same port, same certificates), detached like
    /// controlplane.sh does, its PID in the same file so `stop` and the watchdog find it.
    pub fn restart(self) {
        let log = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&self.log)
            .expect("open the apiserver log");
        let log2 = log.try_clone().expect("clone the log handle");
        // `setsid -f` forks and exits at once: the apiserver is re-parented to init, never
        // left a zombie of the test process once stopped.
        let status = Command::new("setsid")
            .arg("-f")
            .arg("bash")
            .arg("-c")
            .arg(r#"echo $$ >"$0.tmp" && mv -f "$0.tmp" "$0" && exec "$@""#)
            .arg(&self.pidfile)
            .args(&self.argv)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .status()
            .expect("restart kube-apiserver");
        assert!(status.success(), "setsid -f kube-apiserver: {status}");
    }
}

/// A kube client for a kubeconfig file.
pub async fn client_for(kubeconfig: &Path) -> Client {
    tollgate::sources::kubernetes::client(&KubeOptions {
        kubeconfig: Some(kubeconfig.to_path_buf()),
        ..KubeOptions::default()
    })
    .await
    .expect("a kube client from the kubeconfig")
}

/// Creates a fresh namespace (deleted namespaces stay Terminating here: never reuse one).
pub async fn namespace(client: &Client, prefix: &str) -> String {
    let name = format!("{prefix}-{:06x}", rand::random::<u32>() & 0xff_ffff);
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).expect("ns");
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .expect("create the test namespace");
    name
}

fn resource(kind: &str) -> (ApiResource, bool) {
    match kind {
        "AgentRoute" => (ApiResource::erase::<AgentRoute>(&()), true),
        "AgentApiKey" => (ApiResource::erase::<AgentApiKey>(&()), true),
        "Secret" => (ApiResource::erase::<Secret>(&()), true),
        "Service" => (ApiResource::erase::<Service>(&()), true),
        "EndpointSlice" => (ApiResource::erase::<EndpointSlice>(&()), true),
        "RoleBinding" => (ApiResource::erase::<RoleBinding>(&()), true),
        "ClusterRoleBinding" => (ApiResource::erase::<ClusterRoleBinding>(&()), false),
        other => panic!("no ApiResource for {other} in the test harness"),
    }
}

fn dynamic_api(client: &Client, obj: &Value) -> (Api<DynamicObject>, String) {
    let kind = obj["kind"].as_str().expect("kind");
    let name = obj["metadata"]["name"].as_str().expect("metadata.name");
    let (ar, namespaced) = resource(kind);
    let api = if namespaced {
        let ns = obj["metadata"]["namespace"]
            .as_str()
            .expect("metadata.namespace");
        Api::namespaced_with(client.clone(), ns, &ar)
    } else {
        Api::all_with(client.clone(), &ar)
    };
    (api, name.to_string())
}

/// Server-side apply of one object given as JSON (`apiVersion`, `kind`, `metadata`...).
pub async fn try_apply(client: &Client, obj: &Value) -> Result<DynamicObject, kube::Error> {
    let (api, name) = dynamic_api(client, obj);
    api.patch(
        &name,
        &PatchParams::apply("tollgate-tests").force(),
        &Patch::Apply(obj),
    )
    .await
}

/// [`try_apply`] that must succeed.
pub async fn apply(client: &Client, obj: Value) -> DynamicObject {
    try_apply(client, &obj)
        .await
        .unwrap_or_else(|e| panic!("apply {}: {e}", obj["metadata"]["name"]))
}

/// Create (not apply) one object: for the API server's validation answer.
pub async fn try_create(client: &Client, obj: &Value) -> Result<DynamicObject, kube::Error> {
    let (api, _) = dynamic_api(client, obj);
    let o: DynamicObject = serde_json::from_value(obj.clone()).expect("a DynamicObject");
    api.create(&PostParams::default(), &o).await
}

pub async fn delete(client: &Client, kind: &str, ns: &str, name: &str) {
    let obj = json!({"kind": kind, "metadata": {"name": name, "namespace": ns}});
    let (api, _) = dynamic_api(client, &obj);
    api.delete(name, &DeleteParams::default())
        .await
        .unwrap_or_else(|e| panic!("delete {kind} {ns}/{name}: {e}"));
}

pub fn route(ns: &str, name: &str, spec: Value) -> Value {
    json!({"apiVersion": "tollgate.dev/v1alpha1", "kind": "AgentRoute",
           "metadata": {"name": name, "namespace": ns}, "spec": spec})
}

pub fn api_key(ns: &str, name: &str, spec: Value) -> Value {
    json!({"apiVersion": "tollgate.dev/v1alpha1", "kind": "AgentApiKey",
           "metadata": {"name": name, "namespace": ns}, "spec": spec})
}

pub fn secret(ns: &str, name: &str, type_: &str, string_data: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Secret", "type": type_,
           "metadata": {"name": name, "namespace": ns}, "stringData": string_data})
}

pub async fn route_status(client: &Client, ns: &str, name: &str) -> Option<Value> {
    let r = Api::<AgentRoute>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .ok()??;
    serde_json::to_value(r.status?).ok()
}

pub async fn key_status(client: &Client, ns: &str, name: &str) -> Option<Value> {
    let k = Api::<AgentApiKey>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .ok()??;
    serde_json::to_value(k.status?).ok()
}

/// The condition of `type_` in a status JSON, as (status, reason).
pub fn condition(status: &Value, type_: &str) -> Option<(String, String)> {
    status["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .map(|c| {
            (
                c["status"].as_str().unwrap_or_default().to_string(),
                c["reason"].as_str().unwrap_or_default().to_string(),
            )
        })
}

/// Gateway options for a test: loopback ports, EndpointSlice discovery.
pub fn serve_options() -> ServeOptions {
    ServeOptions {
        discovery: DiscoveryMode::Endpointslices,
        ..ServeOptions::loopback()
    }
}

/// Kubernetes options for a test: its namespace only, its own Lease there.
pub fn kube_options(kubeconfig: &Path, ns: &str, identity: &str) -> KubeOptions {
    KubeOptions {
        kubeconfig: Some(kubeconfig.to_path_buf()),
        watch_namespaces: vec![ns.to_string()],
        lease_namespace: ns.to_string(),
        lease_name: "tollgate".to_string(),
        identity: identity.to_string(),
        ..KubeOptions::default()
    }
}

/// Starts the gateway in-process and waits for `/readyz`.
pub async fn gateway(serve: &ServeOptions, kube: &KubeOptions) -> Running {
    let running = app::start_kubernetes(serve, kube)
        .await
        .expect("start the gateway in Kubernetes mode");
    let gw = running.gateway.clone();
    eventually(Duration::from_secs(20), "the gateway becomes ready", || {
        let gw = gw.clone();
        async move { gw.is_ready().then_some(()) }
    })
    .await;
    running
}

/// An HTTP client for the gateway (no proxies, short timeouts, keep-alive).
pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("an HTTP client")
}

/// GET through the gateway: (status, body); status 0 on a transport error.
pub async fn get(client: &reqwest::Client, url: &str, key: Option<&str>) -> (u16, String) {
    let mut req = client.get(url);
    if let Some(k) = key {
        req = req.header("x-api-key", k);
    }
    match req.send().await {
        Ok(r) => {
            let s = r.status().as_u16();
            (s, r.text().await.unwrap_or_default())
        }
        Err(_) => (0, String::new()),
    }
}

/// A real HTTP backend on 127.0.0.1:0 that answers 200 with its name (and echoes the client id
/// the gateway sent in `x-seen-client-id`).
pub struct Echo {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Echo {
    pub async fn start(name: &str) -> Echo {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let name = Bytes::from(name.to_string());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let name = name.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let name = name.clone();
                        async move {
                            let mut r = Response::new(Full::new(name.clone()));
                            if let Some(c) = req.headers().get("x-client-id") {
                                r.headers_mut().insert("x-seen-client-id", c.clone());
                            }
                            Ok::<_, Infallible>(r)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Echo { addr, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// A child process killed when dropped (the `tollgate run` binary under test).
pub struct ChildGuard(pub tokio::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.start_kill();
    }
}

/// A free loopback port (bound then released: fine for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Percentile (0..=100) of sorted samples, nearest rank.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}
