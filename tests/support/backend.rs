//! Real backends on `127.0.0.1:0`: hyper 1 servers (HTTP/1.1 and h2c) that record every request
//! and answer through a [`Handler`], and a WebSocket echo server.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use http_body::{Body, Frame};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;

use super::lock;

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
