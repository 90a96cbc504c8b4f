//! The real control plane for the Kubernetes tests: etcd + kube-apiserver started by
//! `hack/controlplane.sh`, torn down by a watchdog when the test process exits (even on a panic
//! or a kill). Either one shared by the tests of a binary ([`shared`], one namespace per test) or
//! one of a test's own ([`ControlPlane::exclusive`], stopped when dropped). The gateway runs
//! in-process or as the binary.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use k8s_openapi::api::core::v1::{Namespace, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{Ingress, IngressClass};
use k8s_openapi::api::rbac::v1::{ClusterRoleBinding, RoleBinding};
use kube::api::{ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{json, Value};

use super::process::{run_limited, run_ok};
use super::{handler, respond, Backend};

use tollgate::api::{gateway, AgentApiKey, AgentRoute};
use tollgate::app::{self, Running, ServeOptions};
use tollgate::discovery::DiscoveryMode;
use tollgate::sources::kubernetes::KubeOptions;

#[allow(unused_imports)]
pub use super::bounded_for as bounded;
#[allow(unused_imports)]
pub use super::eventually;
#[allow(unused_imports)]
pub use super::ports::free_port;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A running etcd + kube-apiserver in its own directory.
pub struct ControlPlane {
    pub dir: PathBuf,
    pub env: HashMap<String, String>,
}

/// A control plane of one test's own ([`ControlPlane::exclusive`]): stopped (and its directory
/// removed) when dropped, also on a panic.
pub struct ExclusiveControlPlane {
    cp: ControlPlane,
    _one_at_a_time: OneAtATime,
}

impl std::ops::Deref for ExclusiveControlPlane {
    type Target = ControlPlane;
    fn deref(&self) -> &ControlPlane {
        &self.cp
    }
}

impl Drop for ExclusiveControlPlane {
    fn drop(&mut self) {
        self.cp.stop();
        let _ = std::fs::remove_dir_all(&self.cp.dir);
    }
}

/// One exclusive control plane at a time: each costs a core while it starts, and the machine
/// has two. Held while one lives (a token, not a `MutexGuard`: the shared one is a `static`).
struct OneAtATime;

static BUSY: Mutex<bool> = Mutex::new(false);
static FREED: Condvar = Condvar::new();

impl OneAtATime {
    fn acquire() -> OneAtATime {
        let mut busy = BUSY.lock().unwrap_or_else(|p| p.into_inner());
        while *busy {
            busy = FREED.wait(busy).unwrap_or_else(|p| p.into_inner());
        }
        *busy = true;
        OneAtATime
    }
}

impl Drop for OneAtATime {
    fn drop(&mut self) {
        *BUSY.lock().unwrap_or_else(|p| p.into_inner()) = false;
        FREED.notify_one();
    }
}

static SHARED: OnceLock<ControlPlane> = OnceLock::new();

/// The control plane shared by the tests of this binary (CRDs installed), started on first use.
pub fn shared() -> &'static ControlPlane {
    SHARED.get_or_init(|| ControlPlane::start("shared", true))
}

static WITH_GATEWAY_API: OnceLock<ControlPlane> = OnceLock::new();

/// The Gateway API standard-channel CRDs: `TOLLGATE_GATEWAY_API_CRDS` (scripts/test.sh sets it),
/// else what `hack/gateway-api-crds.sh` fetches from the Go module proxy (cached).
pub fn gateway_api_crds() -> PathBuf {
    if let Some(dir) = std::env::var_os("TOLLGATE_GATEWAY_API_CRDS") {
        return PathBuf::from(dir);
    }
    let out = run_ok(
        Command::new(repo().join("hack/gateway-api-crds.sh")),
        "hack/gateway-api-crds.sh",
    );
    PathBuf::from(
        out.lines()
            .last()
            .expect("the script prints the CRD dir")
            .trim(),
    )
}

/// A control plane shared by a test binary, with Tollgate's CRDs and the Gateway API's.
pub fn shared_with_gateway_api() -> &'static ControlPlane {
    WITH_GATEWAY_API.get_or_init(|| {
        let cp = ControlPlane::start("gateway-api", true);
        let dir = gateway_api_crds();
        let dir = dir.to_str().expect("a UTF-8 path");
        cp.kubectl_blocking(&["apply", "--server-side", "-f", dir]);
        cp.kubectl_blocking(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/gatewayclasses.gateway.networking.k8s.io",
            "crd/gateways.gateway.networking.k8s.io",
            "crd/httproutes.gateway.networking.k8s.io",
            "crd/referencegrants.gateway.networking.k8s.io",
        ]);
        cp
    })
}

impl ControlPlane {
    /// A control plane of one test's own, without the CRDs (the test installs what it
    /// installs), stopped when dropped, also on a panic; one at a time in a test binary.
    pub fn exclusive(label: &str) -> ExclusiveControlPlane {
        let one_at_a_time = OneAtATime::acquire();
        ExclusiveControlPlane {
            cp: ControlPlane::start(label, false),
            _one_at_a_time: one_at_a_time,
        }
    }

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

    /// kubectl as cluster admin, run from the repository root.
    pub fn kubectl_cmd(&self) -> Command {
        let mut cmd = Command::new(self.var("KUBECTL"));
        cmd.current_dir(repo())
            .arg("--kubeconfig")
            .arg(self.admin_kubeconfig())
            .arg("--request-timeout=30s")
            .stdin(Stdio::null());
        cmd
    }

    /// `kubectl --kubeconfig admin ARGS`; panics with kubectl's output on failure.
    pub async fn kubectl(&self, args: &[&str]) -> String {
        let mut cmd = tokio::process::Command::from(self.kubectl_cmd());
        let out = cmd.args(args).output().await.expect("run kubectl");
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// [`ControlPlane::kubectl`] for tests without a runtime (bounded to 120 s).
    pub fn kubectl_blocking(&self, args: &[&str]) -> String {
        let mut cmd = self.kubectl_cmd();
        cmd.args(args);
        run_ok(cmd, &format!("kubectl {}", args.join(" ")))
    }

    /// `kubectl ARGS -f FILE` with `yaml` written to a file first (blocking).
    pub fn kubectl_stdin(&self, args: &[&str], yaml: &str) -> String {
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let path = self.dir.join(format!(
            "stdin-{}.yaml",
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, yaml).expect("writing manifest");
        let mut cmd = self.kubectl_cmd();
        cmd.args(args).arg("-f").arg(&path);
        run_ok(
            cmd,
            &format!("kubectl {} -f <{} bytes>", args.join(" "), yaml.len()),
        )
    }

    /// Waits until `kubectl ARGS` (e.g. `get ... -o jsonpath=...`) prints `want`, or panics
    /// after `limit` with what it printed last (blocking).
    pub fn wait_for(&self, args: &[&str], want: &str, limit: Duration) {
        self.wait_until(args, limit, &format!("{want:?}"), |out| out.trim() == want);
    }

    /// Waits until `kubectl ARGS` succeeds printing something on stdout (blocking).
    pub fn wait_for_nonempty(&self, args: &[&str], limit: Duration) {
        self.wait_until(args, limit, "anything", |out| !out.trim().is_empty());
    }

    fn wait_until(&self, args: &[&str], limit: Duration, want: &str, done: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + limit;
        let mut last = String::new();
        while Instant::now() < deadline {
            let mut cmd = self.kubectl_cmd();
            cmd.args(args);
            let out = run_limited(cmd, Duration::from_secs(40), "kubectl");
            last = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            if out.status.success() && done(&String::from_utf8_lossy(&out.stdout)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!(
            "kubectl {} never printed {want}; last: {last}",
            args.join(" ")
        );
    }

    /// The admin kubeconfig (server and CA) with another user and context namespace, written
    /// to `DIR/<name>.kubeconfig`: the one place kubeconfigs for tests are written.
    fn kubeconfig_as(&self, name: &str, user: serde_yaml::Value, ns: Option<&str>) -> PathBuf {
        let text = std::fs::read_to_string(self.admin_kubeconfig()).expect("read admin kubeconfig");
        let mut kc: serde_yaml::Value = serde_yaml::from_str(&text).expect("kubeconfig YAML");
        kc["users"][0]["user"] = user;
        if let Some(ns) = ns {
            kc["contexts"][0]["context"]["namespace"] = serde_yaml::Value::String(ns.to_string());
        }
        let path = self.dir.join(format!("{name}.kubeconfig"));
        std::fs::write(&path, serde_yaml::to_string(&kc).expect("YAML")).expect("write kubeconfig");
        path
    }

    /// A kubeconfig that acts as `user` (admin impersonating it: RBAC applies to `user`).
    pub fn impersonating(&self, user: &str) -> PathBuf {
        let text = std::fs::read_to_string(self.admin_kubeconfig()).expect("read admin kubeconfig");
        let kc: serde_yaml::Value = serde_yaml::from_str(&text).expect("kubeconfig YAML");
        let mut admin = kc["users"][0]["user"].clone();
        admin["as"] = serde_yaml::Value::String(user.to_string());
        self.kubeconfig_as(&format!("as-{user}"), admin, None)
    }

    /// A kubeconfig that authenticates as ServiceAccount `namespace/sa` with a TokenRequest
    /// token (1 h), its context in `namespace` (blocking).
    pub fn service_account_kubeconfig(&self, namespace: &str, sa: &str) -> PathBuf {
        let token =
            self.kubectl_blocking(&["create", "token", sa, "-n", namespace, "--duration=1h"]);
        let mut user = serde_yaml::Mapping::new();
        user.insert("token".into(), token.trim().into());
        self.kubeconfig_as(sa, user.into(), Some(namespace))
    }

    /// The admin kubeconfig with its context's namespace set to `ns`.
    pub fn admin_in_namespace(&self, ns: &str) -> PathBuf {
        let text = std::fs::read_to_string(self.admin_kubeconfig()).expect("read admin kubeconfig");
        let mut kc: serde_yaml::Value = serde_yaml::from_str(&text).expect("kubeconfig YAML");
        kc["contexts"][0]["context"]["namespace"] = serde_yaml::Value::String(ns.to_string());
        let path = self.dir.join(format!("admin-in-{ns}.kubeconfig"));
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
        "GatewayClass" => (ApiResource::erase::<gateway::GatewayClass>(&()), false),
        "Gateway" => (ApiResource::erase::<gateway::Gateway>(&()), true),
        "HTTPRoute" => (ApiResource::erase::<gateway::HTTPRoute>(&()), true),
        "ReferenceGrant" => (ApiResource::erase::<gateway::ReferenceGrant>(&()), true),
        "Ingress" => (ApiResource::erase::<Ingress>(&()), true),
        "IngressClass" => (ApiResource::erase::<IngressClass>(&()), false),
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

/// The configuration documents of `support`, named as these tests call them.
#[allow(unused_imports)]
pub use super::{api_key_spec as api_key, route_in as route, secret};

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
        lease_namespace: Some(ns.to_string()),
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
pub struct Echo;

impl Echo {
    pub async fn start(name: &str) -> Backend {
        let label = Bytes::from(name.to_string());
        Backend::spawn(
            name,
            handler(move |seen, _| {
                let label = label.clone();
                async move {
                    let mut r = respond(http::StatusCode::OK, label);
                    if let Some(c) = seen.headers.get("x-client-id") {
                        r.headers_mut().insert("x-seen-client-id", c.clone());
                    }
                    r
                }
            }),
        )
        .await
    }
}

/// A child process killed when dropped (the `tollgate run` binary under test).
pub struct ChildGuard(pub tokio::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.start_kill();
    }
}

/// Percentile (0..=100) of sorted samples, nearest rank.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}
