//! Test support shared by every integration test binary (each includes it with `mod support;`
//! and uses what it needs). Real components only, nothing mocks the gateway:
//!
//! - this file: time bounds and polling, configuration documents written the way users write
//!   them, the standalone gateway started in-process, real clients;
//! - [`backend`]: recording HTTP and WebSocket backends on `127.0.0.1:0` (re-exported here);
//! - [`scenario`]: backends + keys + routes + gateway in one builder, for tests that differ
//!   only in those;
//! - [`raw`]: the raw wire: a strict raw TCP backend and a raw HTTP/1.1 client;
//! - [`keepalive`]: a pooling keep-alive client (HTTP/1.1, h2c) that counts resends;
//! - [`process`]: the built `tollgate` binary as a child process (`standalone` or `run`);
//! - [`k8s`]: a real etcd + kube-apiserver (`hack/controlplane.sh`) and Kubernetes helpers;
//! - [`dockerfile`]: the repository's Dockerfile read as instructions;
//! - [`dnsmasq`], [`redis`]: real DNS and Redis servers of the test's own;
//! - [`metrics`]: `/metrics` fetched and parsed; [`ports`]: free loopback ports.
// Each test binary uses a different part of this tree.
#![allow(dead_code)]

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use serde_json::{json, Value};

use tollgate::app::{Running, ServeOptions};

pub mod backend;
pub mod dnsmasq;
pub mod dockerfile;
pub mod k8s;
pub mod keepalive;
pub mod mcp;
pub mod metrics;
pub mod netns;
pub mod ports;
pub mod process;
pub mod raw;
pub mod redis;
pub mod scenario;

#[allow(unused_imports)]
pub use backend::*;
#[allow(unused_imports)]
pub use scenario::Scenario;

/// Every test finishes within this, or fails saying so.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(20);

/// Runs a whole test body under [`TEST_TIMEOUT`].
pub async fn bounded<F: Future>(fut: F) -> F::Output {
    bounded_for(TEST_TIMEOUT, fut).await
}

/// Runs a test body under `limit`, or fails saying so.
pub async fn bounded_for<F: Future>(limit: Duration, fut: F) -> F::Output {
    tokio::time::timeout(limit, fut)
        .await
        .unwrap_or_else(|_| panic!("the test did not finish within {limit:?}"))
}

/// Locks a mutex even if a panicking test poisoned it (the data is only test records).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

// ---------------------------------------------------------------------------------------------
// Configuration documents
// ---------------------------------------------------------------------------------------------

/// An `AgentRoute` in namespace `default`.
pub fn route(name: &str, spec: Value) -> Value {
    route_in("default", name, spec)
}

/// An `AgentRoute` in `namespace`.
pub fn route_in(namespace: &str, name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "tollgate.dev/v1alpha1",
        "kind": "AgentRoute",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    })
}

/// A `v1` Secret with `stringData`.
pub fn secret(namespace: &str, name: &str, type_: &str, string_data: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace},
        "type": type_,
        "stringData": string_data,
    })
}

/// An `AgentApiKey` with an arbitrary spec.
pub fn api_key_spec(namespace: &str, name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "tollgate.dev/v1alpha1",
        "kind": "AgentApiKey",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    })
}

/// A key held in a Secret (`<name>-key`, key `api-key`) plus its `AgentApiKey`; `extra` is
/// merged into the spec (`expiresAt`, `disabled`, ...).
pub fn api_key(
    namespace: &str,
    name: &str,
    client_id: &str,
    plain: &str,
    roles: &[&str],
    extra: Value,
) -> Vec<Value> {
    let secret_name = format!("{name}-key");
    let mut spec = json!({
        "clientId": client_id,
        "secretRef": {"name": secret_name, "key": "api-key"},
        "roles": roles,
    });
    if let (Some(s), Value::Object(extra)) = (spec.as_object_mut(), extra) {
        s.extend(extra);
    }
    vec![
        secret(namespace, &secret_name, "Opaque", json!({"api-key": plain})),
        api_key_spec(namespace, name, spec),
    ]
}

/// `sha256:<hex>` of a plain key, the form `keyHash` takes.
pub fn key_hash(plain: &str) -> String {
    use sha2::Digest;
    format!(
        "sha256:{}",
        hex::encode(sha2::Sha256::digest(plain.as_bytes()))
    )
}

/// Documents as one multi-document YAML file.
pub fn yaml<I: IntoIterator<Item = Value>>(docs: I) -> String {
    let mut out = String::new();
    for d in docs {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&d).expect("documents serialise to YAML"));
    }
    out
}

/// Writes `text` to `path` the way editors do: a hidden temporary file renamed into place,
/// so the watcher never reads a half-written file.
pub fn write_atomic(path: &Path, text: &str) {
    let dir = path.parent().expect("config file has a directory");
    let name = path
        .file_name()
        .expect("config file has a name")
        .to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).expect("write the temporary config file");
    std::fs::rename(&tmp, path).expect("rename the config file into place");
}

// ---------------------------------------------------------------------------------------------
// The gateway
// ---------------------------------------------------------------------------------------------

/// A standalone gateway running in this process, fed from a temporary config directory.
pub struct Gateway {
    pub running: Running,
    pub dir: tempfile::TempDir,
    /// `<dir>/config.yaml`: the file the gateway was started with.
    pub file: PathBuf,
    pub http: reqwest::Client,
}

/// Starts a gateway on loopback with `yaml` as its only file; fails the test if the
/// configuration has any problem (a typo in a test would otherwise show up as a 404).
pub async fn gateway(yaml: String) -> Gateway {
    gateway_with(yaml, |_| {}).await
}

/// Like [`gateway`], with adjusted options.
pub async fn gateway_with(yaml: String, adjust: impl FnOnce(&mut ServeOptions)) -> Gateway {
    let gw = gateway_allowing_problems(yaml, adjust).await;
    let problems = gw.running.gateway.snapshot().problems.clone();
    assert!(
        problems.is_empty(),
        "the test configuration has problems: {problems:#?}"
    );
    gw
}

/// Starts a gateway whatever problems its configuration has.
pub async fn gateway_allowing_problems(
    yaml: String,
    adjust: impl FnOnce(&mut ServeOptions),
) -> Gateway {
    let dir = tempfile::tempdir().expect("create a temporary config directory");
    let file = dir.path().join("config.yaml");
    write_atomic(&file, &yaml);
    let mut opts = ServeOptions::loopback();
    // Tests never wait for a drain.
    opts.shutdown_grace = Duration::from_millis(200);
    adjust(&mut opts);
    let running = tollgate::app::start_standalone(dir.path().to_path_buf(), &opts)
        .await
        .expect("the standalone gateway starts");
    Gateway {
        running,
        dir,
        file,
        http: client(),
    }
}

impl Gateway {
    /// `http://<listen><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.running.listen, path)
    }

    /// `http://<admin_listen><path>`.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.running.admin_listen, path)
    }

    /// Replaces the config file (atomically); the gateway's watcher picks it up.
    pub fn write_config(&self, yaml: &str) {
        write_atomic(&self.file, yaml);
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(self.url(path))
            .send()
            .await
            .expect("the gateway answers")
    }

    /// The admin port's `/metrics` text.
    pub async fn metrics(&self) -> String {
        metrics::fetch(&self.admin_url("")).await
    }

    /// `GET /debug/routes` on the admin port, as JSON.
    pub async fn debug_routes(&self) -> Value {
        self.http
            .get(self.admin_url("/debug/routes"))
            .send()
            .await
            .expect("the admin port answers")
            .json()
            .await
            .expect("/debug/routes is JSON")
    }
}

/// A plain HTTP client that ignores proxy settings of the environment.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("build a reqwest client")
}

/// Reads a gateway error answer: checks it is JSON with the documented shape, returns its code.
pub async fn error_code(resp: reqwest::Response) -> String {
    let ct = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap_or("").to_string());
    assert_eq!(
        ct.as_deref(),
        Some("application/json"),
        "error content type"
    );
    let request_id = resp
        .headers()
        .get("x-request-id")
        .map(|v| v.to_str().unwrap_or("").to_string())
        .expect("error answers carry X-Request-Id");
    let v: Value = resp.json().await.expect("an error answer is JSON");
    assert_eq!(
        v["error"]["request_id"].as_str(),
        Some(request_id.as_str()),
        "error.request_id is the X-Request-Id: {v}"
    );
    assert!(v["error"]["message"].is_string(), "error.message: {v}");
    v["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("error.code missing in {v}"))
        .to_string()
}

/// Reads from a streaming response until `needle` has arrived; returns everything read.
pub async fn read_until(resp: &mut reqwest::Response, buf: &mut Vec<u8>, needle: &[u8]) {
    while !contains(buf, needle) {
        match resp.chunk().await {
            Ok(Some(c)) => buf.extend_from_slice(&c),
            Ok(None) => panic!(
                "stream ended before {:?}; got {:?}",
                String::from_utf8_lossy(needle),
                String::from_utf8_lossy(buf)
            ),
            Err(e) => panic!(
                "stream failed before {:?}: {e}; got {:?}",
                String::from_utf8_lossy(needle),
                String::from_utf8_lossy(buf)
            ),
        }
    }
}

pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Repeats `probe` until it returns `Some`, for at most `within`; the probe runs every 20 ms
/// (polling an observable result, not sleeping in place of a signal).
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("{what}: not within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
