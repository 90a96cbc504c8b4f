//! Shared helpers for the integration tests: real backends on `127.0.0.1:0` (hyper 1 servers
//! that record what reached them), configuration files written the way users write them, the
//! standalone gateway started in-process, and real clients. Nothing here mocks the gateway.
#![allow(dead_code)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use http_body::{Body, Frame};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;

use tollgate::app::{Running, ServeOptions};

pub mod dnsmasq;
pub mod process;

/// Every test finishes within this, or fails saying so.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(20);

/// Runs a whole test body under [`TEST_TIMEOUT`].
pub async fn bounded<F: Future>(fut: F) -> F::Output {
    tokio::time::timeout(TEST_TIMEOUT, fut)
        .await
        .expect("the test did not finish within its time bound")
}

/// Locks a mutex even if a panicking test poisoned it (the data is only test records).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

// ---------------------------------------------------------------------------------------------
// Backends
// ---------------------------------------------------------------------------------------------

/// The body type test backends answer with.
pub type RespBody = BoxBody<Bytes, Infallible>;

/// One request as a backend received it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: Method,
    pub uri: Uri,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The request body ended with an error (the sender gave up mid-body).
    pub body_failed: bool,
}

impl Seen {
    /// Path and query as the backend saw them (`/handle/x?q=1`).
    pub fn path_and_query(&self) -> String {
        self.uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_default()
    }

    /// A header as a string, if present (and visible ASCII).
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| v.to_str().expect("header is ASCII").to_string())
    }

    /// The body as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("the backend received a JSON body")
    }
}

/// What a backend does with a request: given the request and its index (0 for the first one
/// this backend received), produce the response.
pub type Handler = Arc<
    dyn Fn(Seen, usize) -> Pin<Box<dyn Future<Output = Response<RespBody>> + Send>> + Send + Sync,
>;

/// Wraps an async closure as a [`Handler`].
pub fn handler<F, Fut>(f: F) -> Handler
where
    F: Fn(Seen, usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<RespBody>> + Send + 'static,
{
    Arc::new(move |seen, n| Box::pin(f(seen, n)))
}

/// A complete response.
pub fn respond(status: StatusCode, body: impl Into<Bytes>) -> Response<RespBody> {
    let mut r = Response::new(Full::new(body.into()).boxed());
    *r.status_mut() = status;
    r
}

/// A streamed body fed from a channel: each `Bytes` sent is one frame, dropping the sender
/// ends the body.
pub struct ChannelBody(mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

/// A `200 text/event-stream` response and the sender that feeds it.
pub fn event_stream() -> (mpsc::Sender<Bytes>, Response<RespBody>) {
    let (tx, rx) = mpsc::channel(16);
    let mut r = Response::new(BodyExt::boxed(ChannelBody(rx)));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/event-stream"),
    );
    r.headers_mut().insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-cache"),
    );
    (tx, r)
}

/// An SSE handler that sends `data: one`, then holds the stream open until `gate` is notified,
/// then sends `data: two` and ends. Never sleeps: the test decides when event 2 goes out.
pub fn gated_sse(gate: Arc<Notify>) -> Handler {
    handler(move |_, _| {
        let gate = gate.clone();
        async move {
            let (tx, resp) = event_stream();
            tokio::spawn(async move {
                if tx.send(Bytes::from_static(b"data: one\n\n")).await.is_err() {
                    return;
                }
                gate.notified().await;
                let _ = tx.send(Bytes::from_static(b"data: two\n\n")).await;
            });
            resp
        }
    })
}

/// A real HTTP server (HTTP/1.1 and h2c) on `127.0.0.1:0` that records every request.
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Backend {
    /// Answers every request `200` with its own name as the body and in `x-backend`.
    pub async fn echo(name: &str) -> Backend {
        let label = name.to_string();
        Backend::spawn(
            name,
            handler(move |_, _| {
                let label = label.clone();
                async move {
                    let mut r = respond(StatusCode::OK, label.clone());
                    r.headers_mut().insert(
                        "x-backend",
                        http::HeaderValue::from_str(&label)
                            .expect("backend name is a header value"),
                    );
                    r
                }
            }),
        )
        .await
    }

    /// Serves with `handler`; the request body is read fully (and recorded) before it runs.
    pub async fn spawn(name: &str, handler: Handler) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a backend port");
        let addr = listener.local_addr().expect("backend address");
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let seen2 = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let seen = seen2.clone();
                let handler = handler.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let seen = seen.clone();
                        let handler = handler.clone();
                        async move {
                            let (parts, body) = req.into_parts();
                            let (body, body_failed) = match body.collect().await {
                                Ok(c) => (c.to_bytes(), false),
                                Err(_) => (Bytes::new(), true),
                            };
                            let s = Seen {
                                method: parts.method,
                                uri: parts.uri,
                                headers: parts.headers,
                                body,
                                body_failed,
                            };
                            let n = {
                                let mut v = lock(&seen);
                                v.push(s.clone());
                                v.len() - 1
                            };
                            Ok::<_, Infallible>(handler(s, n).await)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Backend {
            name: name.to_string(),
            addr,
            seen,
            task,
        }
    }

    /// `http://127.0.0.1:port`, for a route's `backends[].url`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// How many requests reached this backend.
    pub fn count(&self) -> usize {
        lock(&self.seen).len()
    }

    /// Every request so far, oldest first.
    pub fn requests(&self) -> Vec<Seen> {
        lock(&self.seen).clone()
    }

    /// The most recent request.
    pub fn last(&self) -> Seen {
        lock(&self.seen)
            .last()
            .cloned()
            .unwrap_or_else(|| panic!("backend {} received no request", self.name))
    }
}

/// A WebSocket echo server on `127.0.0.1:0` that records each handshake's URI and headers.
pub struct WsBackend {
    pub addr: SocketAddr,
    handshakes: Arc<Mutex<Vec<(Uri, HeaderMap)>>>,
    task: JoinHandle<()>,
}

impl Drop for WsBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl WsBackend {
    pub async fn echo() -> WsBackend {
        use futures_util::{SinkExt, StreamExt};
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a websocket backend port");
        let addr = listener.local_addr().expect("websocket backend address");
        let handshakes: Arc<Mutex<Vec<(Uri, HeaderMap)>>> = Arc::default();
        let hs = handshakes.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let hs = hs.clone();
                tokio::spawn(async move {
                    // The error type is tungstenite's `Callback` contract, not ours to shrink.
                    #[allow(clippy::result_large_err)]
                    let record =
                        |req: &tokio_tungstenite::tungstenite::handshake::server::Request, resp| {
                            lock(&hs).push((req.uri().clone(), req.headers().clone()));
                            Ok(resp)
                        };
                    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, record).await
                    else {
                        return;
                    };
                    while let Some(Ok(msg)) = ws.next().await {
                        if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        WsBackend {
            addr,
            handshakes,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The handshakes completed so far: (request URI, headers).
    pub fn handshakes(&self) -> Vec<(Uri, HeaderMap)> {
        lock(&self.handshakes).clone()
    }
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
