//! The demo agent services behind `tollgate demo`: conversation (JSON, SSE, WebSocket), tools, RAG, memory.
//! Real hyper 1 HTTP/1.1 servers on 127.0.0.1:0 that echo what the gateway added to each request.

use std::collections::{HashMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// Largest request body any demo service reads (bigger ones get 413).
const MAX_BODY: usize = 1 << 20;
/// Largest WebSocket message the echo accepts.
const MAX_WS_MESSAGE: usize = 1 << 20;
/// Items kept per memory session (oldest dropped first).
const MAX_MEMORY_ITEMS: usize = 100;
/// Sessions kept by the memory service across all clients.
const MAX_MEMORY_SESSIONS: usize = 10_000;
/// Words of the user's message quoted back in a chat reply.
const SNIPPET_WORDS: usize = 6;
/// Characters of the user's message quoted back in a chat reply.
const SNIPPET_CHARS: usize = 80;

type Body = BoxBody<Bytes, Infallible>;

/// How the demo services behave.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// Pause before each token event of a streamed chat reply (`/stream`).
    pub token_delay: Duration,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            token_delay: Duration::from_millis(100),
        }
    }
}

/// The four running demo services; they stop when this is dropped or [`DemoServices::shutdown`] runs.
pub struct DemoServices {
    /// Conversation manager: `POST /handle`, `GET|POST /stream` (SSE), `GET /ws` (WebSocket echo).
    pub conversation: SocketAddr,
    /// Tool executor: `POST /execute`.
    pub tools: SocketAddr,
    /// RAG retrieval: `GET /search?q=` or `POST /search`.
    pub rag: SocketAddr,
    /// Memory store: `GET|POST|DELETE /memory/{session}`, `GET /memory`.
    pub memory: SocketAddr,
    /// An MCP server (Streamable HTTP, JSON answers, sessions) at `/mcp` with two tools:
    /// `add` and `search_docs` (the RAG corpus).
    pub mcp: SocketAddr,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for DemoServices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DemoServices")
            .field("conversation", &self.conversation)
            .field("tools", &self.tools)
            .field("rag", &self.rag)
            .field("memory", &self.memory)
            .field("mcp", &self.mcp)
            .finish_non_exhaustive()
    }
}

impl DemoServices {
    /// Stops every service and waits until their listeners and connections are closed.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// Starts the four demo services on 127.0.0.1 with ports chosen by the system.
pub async fn spawn_demo_services(opts: DemoOptions) -> std::io::Result<DemoServices> {
    let (stop, stopped) = watch::channel(false);
    let mut tasks = Vec::with_capacity(5);
    let mut addrs = Vec::with_capacity(5);
    for kind in [
        Kind::Conversation,
        Kind::Tools,
        Kind::Rag,
        Kind::Memory,
        Kind::Mcp,
    ] {
        let state = Arc::new(State {
            kind,
            token_delay: opts.token_delay,
            seq: AtomicU64::new(1),
            memory: Mutex::new(HashMap::new()),
            mcp_sessions: Mutex::new(HashSet::new()),
            stop: stopped.clone(),
        });
        match serve(state).await {
            Ok((addr, task)) => {
                addrs.push(addr);
                tasks.push(task);
            }
            Err(err) => {
                let _ = stop.send(true);
                return Err(err);
            }
        }
    }
    let [conversation, tools, rag, memory, mcp] = <[SocketAddr; 5]>::try_from(addrs)
        .map_err(|_| std::io::Error::other("demo services did not all start"))?;
    tracing::debug!(%conversation, %tools, %rag, %memory, %mcp, "demo services listening");
    Ok(DemoServices {
        conversation,
        tools,
        rag,
        memory,
        mcp,
        stop,
        tasks,
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Conversation,
    Tools,
    Rag,
    Memory,
    Mcp,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Conversation => "conversation",
            Kind::Tools => "tools",
            Kind::Rag => "rag",
            Kind::Memory => "memory",
            Kind::Mcp => "mcp",
        }
    }
}

/// One stored memory session.
#[derive(Default)]
struct Session {
    items: VecDeque<Value>,
    next_seq: u64,
}

/// Everything one service needs; shared by its connections.
struct State {
    kind: Kind,
    token_delay: Duration,
    /// Completion ids (conversation) and call counts (the `flaky` tool).
    seq: AtomicU64,
    /// (client id, session) → items; used by the memory service only.
    memory: Mutex<HashMap<(String, String), Session>>,
    /// The MCP sessions this server handed out (the mcp service only).
    mcp_sessions: Mutex<HashSet<String>>,
    stop: watch::Receiver<bool>,
}

/// Resolves once shutdown was asked for or the [`DemoServices`] was dropped.
async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

async fn serve(state: Arc<State>) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let mut conns = JoinSet::new();
        let stop = stopped(state.stop.clone());
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = &mut stop => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _peer)) => {
                        conns.spawn(serve_connection(state.clone(), stream));
                    }
                    Err(err) => {
                        // e.g. out of file descriptors: back off instead of spinning.
                        tracing::debug!(service = state.kind.name(), %err, "demo accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
        conns.shutdown().await;
    });
    Ok((addr, task))
}

async fn serve_connection(state: Arc<State>, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let stop = stopped(state.stop.clone());
    let service = hyper::service::service_fn(move |req| {
        let state = state.clone();
        async move { Ok::<_, Infallible>(handle(state, req).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::select! {
        result = conn => {
            if let Err(err) = result {
                tracing::debug!(%err, "demo connection ended with an error");
            }
        }
        _ = stop => {}
    }
}

/// What reached the service: the headers the gateway adds or must remove, and the rewritten path.
struct Seen {
    service: &'static str,
    method: String,
    path: String,
    query: Option<String>,
    client_id: Option<HeaderValue>,
    request_id: Option<HeaderValue>,
    traceparent: Option<HeaderValue>,
    forwarded_for: Option<HeaderValue>,
    forwarded_proto: Option<HeaderValue>,
    forwarded_host: Option<HeaderValue>,
    api_key_seen: bool,
    authorization_seen: bool,
}

impl Seen {
    fn of(kind: Kind, req: &Request<Incoming>) -> Seen {
        let headers = req.headers();
        let get = |name: &str| headers.get(name).cloned();
        Seen {
            service: kind.name(),
            method: req.method().to_string(),
            path: req.uri().path().to_string(),
            query: req.uri().query().map(str::to_string),
            client_id: get("x-client-id"),
            request_id: get("x-request-id"),
            traceparent: get("traceparent"),
            forwarded_for: get("x-forwarded-for"),
            forwarded_proto: get("x-forwarded-proto"),
            forwarded_host: get("x-forwarded-host"),
            api_key_seen: headers.contains_key("x-api-key"),
            authorization_seen: headers.contains_key(header::AUTHORIZATION),
        }
    }

    /// The client id the gateway forwarded, or `anonymous` when none arrived.
    fn client(&self) -> String {
        self.client_id
            .as_ref()
            .map(text)
            .unwrap_or_else(|| "anonymous".to_string())
    }

    fn json(&self) -> Value {
        let opt = |v: &Option<HeaderValue>| v.as_ref().map(text);
        json!({
            "service": self.service,
            "method": self.method,
            "path": self.path,
            "query": self.query,
            "client_id": opt(&self.client_id),
            "request_id": opt(&self.request_id),
            "traceparent": opt(&self.traceparent),
            "forwarded_for": opt(&self.forwarded_for),
            "forwarded_proto": opt(&self.forwarded_proto),
            "forwarded_host": opt(&self.forwarded_host),
            "api_key_seen": self.api_key_seen,
            "authorization_seen": self.authorization_seen,
        })
    }

    /// Mirrors the essentials into `x-demo-*` response headers (visible on a WebSocket 101 too).
    fn annotate(&self, headers: &mut HeaderMap) {
        headers.insert("x-demo-service", HeaderValue::from_static(self.service));
        if let Ok(path) = HeaderValue::from_str(&self.path) {
            headers.insert("x-demo-path", path);
        }
        let flag = if self.api_key_seen { "true" } else { "false" };
        headers.insert("x-demo-api-key-seen", HeaderValue::from_static(flag));
        for (name, value) in [
            ("x-demo-client-id", &self.client_id),
            ("x-demo-request-id", &self.request_id),
            ("x-demo-traceparent", &self.traceparent),
        ] {
            if let Some(value) = value {
                headers.insert(HeaderName::from_static(name), value.clone());
            }
        }
    }
}

fn text(value: &HeaderValue) -> String {
    String::from_utf8_lossy(value.as_bytes()).into_owned()
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Response<Body> {
    let seen = Seen::of(state.kind, &req);
    let mut resp = if req.uri().path() == "/healthz" {
        if matches!(*req.method(), Method::GET | Method::HEAD) {
            plain(StatusCode::OK, "ok")
        } else {
            method_not_allowed("GET, HEAD")
        }
    } else {
        match state.kind {
            Kind::Conversation => conversation(&state, req, &seen).await,
            Kind::Tools => tools(&state, req, &seen).await,
            Kind::Rag => rag(req, &seen).await,
            Kind::Memory => memory(&state, req, &seen).await,
            Kind::Mcp => mcp(&state, req, &seen).await,
        }
    };
    seen.annotate(resp.headers_mut());
    resp
}

// ---------------------------------------------------------------------------------------------
// Responses and request bodies

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed()
}

fn plain(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn json_response(status: StatusCode, value: &Value) -> Response<Body> {
    let mut resp = Response::new(full(value.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn error_response(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    json_response(
        status,
        &json!({"error": {"code": code, "message": message}}),
    )
}

fn not_found(seen: &Seen) -> Response<Body> {
    let message = format!(
        "the demo {} service has nothing at {}",
        seen.service, seen.path
    );
    error_response(StatusCode::NOT_FOUND, "not_found", &message)
}

fn method_not_allowed(allow: &'static str) -> Response<Body> {
    let mut resp = error_response(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        &format!("allowed methods: {allow}"),
    );
    resp.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    resp
}

/// Reads the whole body, at most [`MAX_BODY`] bytes; the error is the response to send instead.
async fn read_body(req: Request<Incoming>) -> Result<Bytes, Response<Body>> {
    match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(err) if err.downcast_ref::<LengthLimitError>().is_some() => Err(error_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            &format!("the demo services read at most {MAX_BODY} bytes"),
        )),
        Err(err) => Err(error_response(
            StatusCode::BAD_REQUEST,
            "bad_body",
            &format!("could not read the request body: {err}"),
        )),
    }
}

/// `path` is `prefix` or below it (`/handle`, `/handle/x`; not `/handlex`).
fn under(path: &str, prefix: &str) -> bool {
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// Conversation manager

async fn conversation(state: &State, req: Request<Incoming>, seen: &Seen) -> Response<Body> {
    let path = req.uri().path().to_string();
    if under(&path, "/ws") {
        return websocket(state, req);
    }
    let streaming = under(&path, "/stream");
    if streaming {
        if !matches!(*req.method(), Method::GET | Method::POST) {
            return method_not_allowed("GET, POST");
        }
    } else if under(&path, "/handle") {
        if req.method() != Method::POST {
            return method_not_allowed("POST");
        }
    } else {
        return not_found(seen);
    }
    let query_prompt = req
        .uri()
        .query()
        .and_then(|q| query_param(q, "q").or_else(|| query_param(q, "prompt")));
    let body = match read_body(req).await {
        Ok(body) => body,
        Err(resp) => return resp,
    };
    let mut input = ChatInput::parse(&body);
    if input.last_user.is_empty() {
        if let Some(prompt) = query_prompt {
            input.prompt_chars = prompt.chars().count();
            input.last_user = prompt;
        }
    }
    let id = format!(
        "chatcmpl-demo-{}",
        state.seq.fetch_add(1, Ordering::Relaxed)
    );
    if streaming {
        stream_reply(state.token_delay, &id, &input, seen)
    } else {
        let (words, finish) = reply_words(&input);
        let content = words.join(" ");
        let usage = input.usage(words.len());
        json_response(
            StatusCode::OK,
            &json!({
                "id": id,
                "object": "chat.completion",
                "created": unix_now(),
                "model": input.model,
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": finish,
                }],
                "usage": usage,
                "gateway": seen.json(),
            }),
        )
    }
}

/// What the demo reads from a chat request, OpenAI-shaped or not.
struct ChatInput {
    model: String,
    /// The last user message (or the whole body when it is not a chat request).
    last_user: String,
    /// Characters of every message, the basis of `prompt_tokens`.
    prompt_chars: usize,
    max_tokens: Option<u64>,
}

impl ChatInput {
    fn parse(body: &[u8]) -> ChatInput {
        let mut input = ChatInput {
            model: "tollgate-demo".to_string(),
            last_user: String::new(),
            prompt_chars: 0,
            max_tokens: None,
        };
        let Ok(Value::Object(obj)) = serde_json::from_slice::<Value>(body) else {
            let raw = String::from_utf8_lossy(body);
            input.last_user = raw.trim().to_string();
            input.prompt_chars = raw.chars().count();
            return input;
        };
        if let Some(model) = obj.get("model").and_then(Value::as_str) {
            input.model = model.to_string();
        }
        input.max_tokens = obj
            .get("max_tokens")
            .or_else(|| obj.get("max_completion_tokens"))
            .and_then(Value::as_u64);
        if let Some(messages) = obj.get("messages").and_then(Value::as_array) {
            let mut last_any = None;
            let mut last_user = None;
            for message in messages {
                let content = message_text(message.get("content"));
                input.prompt_chars += content.chars().count();
                if message.get("role").and_then(Value::as_str) == Some("user") {
                    last_user = Some(content.clone());
                }
                last_any = Some(content);
            }
            input.last_user = last_user.or(last_any).unwrap_or_default();
        } else if let Some(prompt) = ["prompt", "message", "input", "q"]
            .iter()
            .find_map(|field| obj.get(*field).and_then(Value::as_str))
        {
            input.last_user = prompt.to_string();
            input.prompt_chars = prompt.chars().count();
        }
        input
    }

    /// OpenAI-style usage: prompt ≈ characters / 4, completion = words of the reply.
    fn usage(&self, completion_tokens: usize) -> Value {
        let prompt = self.prompt_chars.div_ceil(4);
        json!({
            "prompt_tokens": prompt,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt + completion_tokens,
        })
    }
}

/// A message's text: a string, or the `text` parts of a multi-part content array.
fn message_text(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

/// The canned reply, one "token" per word, cut at `max_tokens`; with its finish reason.
fn reply_words(input: &ChatInput) -> (Vec<String>, &'static str) {
    let all: Vec<&str> = input.last_user.split_whitespace().collect();
    let joined = all
        .iter()
        .take(SNIPPET_WORDS)
        .copied()
        .collect::<Vec<_>>()
        .join(" ");
    let mut snippet: String = joined.chars().take(SNIPPET_CHARS).collect();
    if snippet.is_empty() {
        snippet = "(nothing)".to_string();
    } else if all.len() > SNIPPET_WORDS || snippet.len() < joined.len() {
        snippet.push('…');
    }
    let reply = format!("You said: \"{snippet}\". Demo agent answering via Tollgate.");
    let mut words: Vec<String> = reply.split_whitespace().map(str::to_string).collect();
    match input.max_tokens.and_then(|max| usize::try_from(max).ok()) {
        Some(max) if max < words.len() => {
            words.truncate(max);
            (words, "length")
        }
        _ => (words, "stop"),
    }
}

fn sse_event(value: &Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

/// A `text/event-stream` whose events are sent through a channel as they are produced.
fn stream_reply(delay: Duration, id: &str, input: &ChatInput, seen: &Seen) -> Response<Body> {
    let (words, finish) = reply_words(input);
    let created = unix_now();
    let count = words.len();
    let tokens: Vec<Bytes> = words
        .iter()
        .enumerate()
        .map(|(i, word)| {
            let content = if i + 1 < count {
                format!("{word} ")
            } else {
                word.clone()
            };
            sse_event(&json!({
                "id": id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": input.model,
                "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": null}],
            }))
        })
        .collect();
    let last = sse_event(&json!({
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": input.model,
        "choices": [{"index": 0, "delta": {}, "finish_reason": finish}],
        "usage": input.usage(count),
        "gateway": seen.json(),
    }));
    let (tx, mut rx) = mpsc::channel::<Bytes>(4);
    tokio::spawn(async move {
        for event in tokens {
            tokio::select! {
                _ = tx.closed() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            if tx.send(event).await.is_err() {
                return;
            }
        }
        for event in [last, Bytes::from_static(b"data: [DONE]\n\n")] {
            if tx.send(event).await.is_err() {
                return;
            }
        }
    });
    let frames = futures_util::stream::poll_fn(move |cx| {
        rx.poll_recv(cx)
            .map(|event| event.map(|bytes| Ok::<_, Infallible>(Frame::data(bytes))))
    });
    let mut resp = Response::new(BodyExt::boxed(StreamBody::new(frames)));
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    resp
}

/// `true` when a comma-separated header holds `token` (case-insensitive).
fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|value| {
        value.to_str().is_ok_and(|v| {
            v.split(',')
                .any(|part| part.trim().eq_ignore_ascii_case(token))
        })
    })
}

/// Answers the upgrade with 101 and echoes text frames (`echo: ...`) and binary frames on a task.
fn websocket(state: &State, mut req: Request<Incoming>) -> Response<Body> {
    if req.method() != Method::GET {
        return method_not_allowed("GET");
    }
    let headers = req.headers();
    let key = headers.get(header::SEC_WEBSOCKET_KEY);
    let (Some(key), true, true) = (
        key,
        has_token(headers, header::UPGRADE, "websocket"),
        has_token(headers, header::CONNECTION, "upgrade"),
    ) else {
        return error_response(
            StatusCode::BAD_REQUEST,
            "not_websocket",
            "GET /ws expects a WebSocket upgrade (Upgrade: websocket, Sec-WebSocket-Key)",
        );
    };
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v.as_bytes() != b"13")
    {
        let mut resp = error_response(
            StatusCode::UPGRADE_REQUIRED,
            "websocket_version",
            "only WebSocket version 13 is supported",
        );
        resp.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        return resp;
    }
    let Ok(accept) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) else {
        return error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "could not compute Sec-WebSocket-Accept",
        );
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    let stop = stopped(state.stop.clone());
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(err) => {
                tracing::debug!(%err, "demo websocket upgrade failed");
                return;
            }
        };
        let config = WebSocketConfig::default()
            .max_message_size(Some(MAX_WS_MESSAGE))
            .max_frame_size(Some(MAX_WS_MESSAGE));
        let ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config))
                .await;
        tokio::select! {
            _ = echo(ws) => {}
            _ = stop => {}
        }
    });
    let mut resp = Response::new(full(Bytes::new()));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = resp.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    resp
}

async fn echo<S>(mut ws: WebSocketStream<S>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // Pings are answered and a Close is acknowledged by tungstenite itself on the next read.
    while let Some(message) = ws.next().await {
        let reply = match message {
            Ok(Message::Text(text)) => Message::text(format!("echo: {}", text.as_str())),
            Ok(Message::Binary(data)) => Message::Binary(data),
            Ok(_) => continue,
            Err(_) => break,
        };
        if ws.send(reply).await.is_err() {
            break;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tool executor

async fn tools(state: &State, req: Request<Incoming>, seen: &Seen) -> Response<Body> {
    if !under(req.uri().path(), "/execute") {
        return not_found(seen);
    }
    if req.method() != Method::POST {
        return method_not_allowed("POST");
    }
    let body = match read_body(req).await {
        Ok(body) => body,
        Err(resp) => return resp,
    };
    let call: Value = match serde_json::from_slice(&body) {
        Ok(Value::Object(obj)) => Value::Object(obj),
        _ => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "bad_request",
                r#"send JSON like {"tool": "calculator", "input": "2+2"}"#,
            )
        }
    };
    let tool = call
        .get("tool")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let input = call.get("input").cloned().unwrap_or(Value::Null);
    let result = match tool.as_str() {
        "calculator" => match input.as_str().map(calculate) {
            Some(Ok(result)) => Value::String(result),
            Some(Err(message)) => {
                return error_response(StatusCode::BAD_REQUEST, "bad_input", &message)
            }
            None => {
                return error_response(
                    StatusCode::BAD_REQUEST,
                    "bad_input",
                    "calculator input is a string like \"2+2\"",
                )
            }
        },
        "echo" => input.clone(),
        "flaky" => {
            // Fails every other call: a retrying gateway route turns it into a success.
            let call_no = state.seq.fetch_add(1, Ordering::Relaxed);
            if call_no % 2 == 1 {
                return error_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "the flaky tool fails every other call; try again",
                );
            }
            Value::String(format!("succeeded on call {call_no}"))
        }
        "fail" => {
            let code = input
                .as_u64()
                .and_then(|c| u16::try_from(c).ok())
                .filter(|c| (500..600).contains(c))
                .and_then(|c| StatusCode::from_u16(c).ok())
                .unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            return error_response(code, "tool_failed", "the fail tool always fails");
        }
        _ => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "unknown_tool",
                "tools: calculator (\"2+2\"), echo (any JSON), flaky (fails every other call), fail (status 500-599)",
            )
        }
    };
    json_response(
        StatusCode::OK,
        &json!({"tool": tool, "input": input, "result": result, "gateway": seen.json()}),
    )
}

/// `a op b` with two integers and one of `+ - * /`; nothing else is evaluated.
fn calculate(expr: &str) -> Result<String, String> {
    let compact: String = expr.chars().filter(|c| !c.is_whitespace()).collect();
    let bad = || format!("expected two integers and one of + - * /, like \"2+2\", not {expr:?}");
    // The operator is the first + - * / after the first character (which may be a sign).
    let (pos, op) = compact
        .char_indices()
        .skip(1)
        .find(|(_, c)| matches!(c, '+' | '-' | '*' | '/'))
        .ok_or_else(bad)?;
    let a: i64 = compact[..pos].parse().map_err(|_| bad())?;
    let b: i64 = compact[pos + 1..].parse().map_err(|_| bad())?;
    let overflow = || "the result does not fit in 64 bits".to_string();
    let value = match op {
        '+' => a.checked_add(b).ok_or_else(overflow)?,
        '-' => a.checked_sub(b).ok_or_else(overflow)?,
        '*' => a.checked_mul(b).ok_or_else(overflow)?,
        _ => {
            if b == 0 {
                return Err("division by zero".to_string());
            }
            match a.checked_rem(b).ok_or_else(overflow)? {
                0 => a.checked_div(b).ok_or_else(overflow)?,
                _ => return Ok((a as f64 / b as f64).to_string()),
            }
        }
    };
    Ok(value.to_string())
}

// ---------------------------------------------------------------------------------------------
// RAG retrieval

/// (id, title, text): a small corpus about the gateway itself.
const CORPUS: &[(&str, &str, &str)] = &[
    ("doc-routing", "Path-based routing", "An AgentRoute maps a path prefix to backend services; the longest prefix wins and a rewrite replaces the matched prefix before forwarding."),
    ("doc-auth", "API keys and authentication", "Clients send an API key in the X-API-Key header or as a bearer token; the gateway checks the key, adds X-Client-Id and removes the key before the backend sees the request."),
    ("doc-roles", "Roles and authorization", "A route may require roles such as admin; a key without one of them gets 403 forbidden while a missing or unknown key gets 401."),
    ("doc-ratelimit", "Rate limits per client", "Request rate limits are token buckets per client id with requests per minute and a burst; a limited request gets 429 with Retry-After and RateLimit headers."),
    ("doc-tokens", "LLM token budgets", "Tokens per minute limits reserve the estimated prompt and completion tokens at admission and settle against the usage the model reports."),
    ("doc-streaming", "Streaming with SSE and WebSocket", "Server-sent event streams are forwarded event by event without buffering; WebSocket upgrades are authenticated and then frames are relayed both ways."),
    ("doc-retries", "Retries and timeouts", "Routes can retry on 502, 503 or connect failures before the first response byte, and cap the request, the first byte and idle stream time."),
    ("doc-canary", "Canary releases and load balancing", "Weighted backends split traffic for canary releases; endpoints are chosen by least connections, round robin or at random, optionally sticky per client."),
    ("doc-metrics", "Metrics and tracing", "Prometheus metrics on the admin port count requests, upstream outcomes, rate limits and tokens; a W3C traceparent header is passed on or started."),
];

const STOP_WORDS: &[&str] = &[
    "a", "an", "and", "are", "as", "at", "be", "by", "can", "do", "does", "for", "from", "how",
    "i", "in", "is", "it", "me", "my", "of", "on", "or", "the", "to", "what", "when", "with",
];

fn words(text: &str) -> HashSet<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .map(str::to_lowercase)
        .filter(|w| !w.is_empty() && !STOP_WORDS.contains(&w.as_str()))
        .collect()
}

async fn rag(req: Request<Incoming>, seen: &Seen) -> Response<Body> {
    if !under(req.uri().path(), "/search") {
        return not_found(seen);
    }
    let params = req.uri().query().unwrap_or_default().to_string();
    let (query, top_k) = match *req.method() {
        Method::GET => (
            query_param(&params, "q").or_else(|| query_param(&params, "query")),
            query_param(&params, "top_k").and_then(|k| k.parse::<usize>().ok()),
        ),
        Method::POST => {
            let body = match read_body(req).await {
                Ok(body) => body,
                Err(resp) => return resp,
            };
            match serde_json::from_slice::<Value>(&body) {
                Ok(Value::Object(obj)) => (
                    ["query", "q"]
                        .iter()
                        .find_map(|f| obj.get(*f).and_then(Value::as_str))
                        .map(str::to_string),
                    obj.get("top_k")
                        .and_then(Value::as_u64)
                        .and_then(|k| usize::try_from(k).ok()),
                ),
                _ => (
                    Some(String::from_utf8_lossy(&body).trim().to_string()),
                    None,
                ),
            }
        }
        _ => return method_not_allowed("GET, POST"),
    };
    let Some(query) = query.filter(|q| !q.trim().is_empty()) else {
        return error_response(
            StatusCode::BAD_REQUEST,
            "missing_query",
            r#"send GET /search?q=... or POST {"query": "..."}"#,
        );
    };
    let documents = search(&query, top_k.unwrap_or(3).clamp(1, CORPUS.len()));
    json_response(
        StatusCode::OK,
        &json!({"query": query, "documents": documents, "gateway": seen.json()}),
    )
}

/// Naive retrieval: the share of the query's words found in a document, best first.
fn search(query: &str, top_k: usize) -> Vec<Value> {
    let wanted = words(query);
    if wanted.is_empty() {
        return Vec::new();
    }
    let mut scored: Vec<(f64, &(&str, &str, &str))> = CORPUS
        .iter()
        .map(|doc| {
            let have = words(&format!("{} {}", doc.1, doc.2));
            let hits = wanted.iter().filter(|w| have.contains(*w)).count();
            (hits as f64 / wanted.len() as f64, doc)
        })
        .filter(|(score, _)| *score > 0.0)
        .collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| a.1 .0.cmp(b.1 .0)));
    scored
        .into_iter()
        .take(top_k)
        .map(|(score, (id, title, text))| {
            json!({
                "id": id,
                "title": title,
                "score": (score * 1000.0).round() / 1000.0,
                "snippet": text,
            })
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// MCP server

/// Protocol versions the demo MCP server speaks (the client's, when it is one of them).
const MCP_VERSIONS: [&str; 3] = ["2025-11-25", "2025-06-18", "2025-03-26"];

/// `POST /mcp`: one JSON-RPC message, answered with JSON. `initialize` hands out a session id
/// that later requests may carry (an unknown one is 404, as the spec asks); DELETE ends it;
/// GET is 405 (no server stream).
async fn mcp(state: &State, req: Request<Incoming>, seen: &Seen) -> Response<Body> {
    if !under(req.uri().path(), "/mcp") {
        return not_found(seen);
    }
    let session = req
        .headers()
        .get("mcp-session-id")
        .map(text)
        .filter(|s| !s.is_empty());
    let known = |s: &str| {
        state
            .mcp_sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(s)
    };
    if let Some(s) = &session {
        if !known(s) {
            return json_response(
                StatusCode::NOT_FOUND,
                &json!({"jsonrpc": "2.0", "id": null,
                        "error": {"code": -32001, "message": "Session not found"}}),
            );
        }
    }
    match *req.method() {
        Method::POST => {}
        Method::DELETE => {
            if let Some(s) = &session {
                state
                    .mcp_sessions
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(s);
            }
            return plain(StatusCode::OK, "");
        }
        _ => return method_not_allowed("POST, DELETE"),
    }
    let body = match read_body(req).await {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    let rpc_error = |status: StatusCode, id: &Value, code: i64, message: &str| {
        json_response(
            status,
            &json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}}),
        )
    };
    let Ok(Value::Object(msg)) = serde_json::from_slice::<Value>(&body) else {
        return rpc_error(StatusCode::BAD_REQUEST, &Value::Null, -32700, "Parse error");
    };
    let id = msg.get("id").cloned().unwrap_or(Value::Null);
    let method = msg.get("method").and_then(Value::as_str).unwrap_or("");
    if id.is_null() {
        // A notification (or an answer): accepted, nothing to say.
        let mut resp = Response::new(full(Bytes::new()));
        *resp.status_mut() = StatusCode::ACCEPTED;
        return resp;
    }
    let params = msg.get("params").cloned().unwrap_or(Value::Null);
    let result = match method {
        "initialize" => {
            let asked = params.get("protocolVersion").and_then(Value::as_str);
            let version = asked
                .filter(|v| MCP_VERSIONS.contains(v))
                .unwrap_or(MCP_VERSIONS[0]);
            let sid = format!("{:032x}", rand::random::<u128>());
            state
                .mcp_sessions
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(sid.clone());
            let mut resp = json_response(
                StatusCode::OK,
                &json!({"jsonrpc": "2.0", "id": id, "result": {
                    "protocolVersion": version,
                    "capabilities": {"tools": {"listChanged": false}},
                    "serverInfo": {"name": "tollgate-demo-mcp", "version": env!("CARGO_PKG_VERSION")},
                    "instructions": "Demo tools: add two numbers, search the demo documents."}}),
            );
            if let Ok(v) = HeaderValue::from_str(&sid) {
                resp.headers_mut().insert("mcp-session-id", v);
            }
            return resp;
        }
        "ping" => json!({}),
        "tools/list" => json!({"tools": [
            {"name": "add", "description": "Adds two numbers.",
             "inputSchema": {"type": "object", "required": ["a", "b"],
                             "properties": {"a": {"type": "number"}, "b": {"type": "number"}}}},
            {"name": "search_docs", "description": "Searches the demo documents (the RAG corpus).",
             "inputSchema": {"type": "object", "required": ["query"],
                             "properties": {"query": {"type": "string"}}}},
        ]}),
        "tools/call" => {
            let args = params.get("arguments").cloned().unwrap_or(Value::Null);
            let tool_text = match params.get("name").and_then(Value::as_str) {
                Some("add") => {
                    let (a, b) = (
                        args.get("a").and_then(Value::as_f64),
                        args.get("b").and_then(Value::as_f64),
                    );
                    match (a, b) {
                        (Some(a), Some(b)) => Ok(format_number(a + b)),
                        _ => Err("add needs numbers a and b"),
                    }
                }
                Some("search_docs") => match args.get("query").and_then(Value::as_str) {
                    Some(q) => Ok(search(q, 3)
                        .iter()
                        .filter_map(|d| d.get("title").and_then(Value::as_str))
                        .collect::<Vec<_>>()
                        .join("; ")),
                    None => Err("search_docs needs a query"),
                },
                _ => {
                    return rpc_error(StatusCode::OK, &id, -32602, "Unknown tool");
                }
            };
            match tool_text {
                Ok(t) => json!({"content": [{"type": "text", "text": t}], "isError": false}),
                Err(e) => json!({"content": [{"type": "text", "text": e}], "isError": true}),
            }
        }
        _ => return rpc_error(StatusCode::OK, &id, -32601, "Method not found"),
    };
    json_response(
        StatusCode::OK,
        &json!({"jsonrpc": "2.0", "id": id, "result": result}),
    )
}

/// A whole number without `.0`; others as they are.
fn format_number(n: f64) -> String {
    if n.fract() == 0.0 && n.abs() < 1e15 {
        format!("{}", n as i64)
    } else {
        n.to_string()
    }
}

/// The first value of `name` in a query string, percent-decoded (`+` is a space).
fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(key) == name).then(|| percent_decode(value))
    })
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                if let Some(decoded) = hex {
                    out.push(decoded);
                    i += 3;
                    continue;
                }
                out.push(b'%');
            }
            _ => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

// ---------------------------------------------------------------------------------------------
// Memory store

async fn memory(state: &State, req: Request<Incoming>, seen: &Seen) -> Response<Body> {
    let path = req.uri().path().to_string();
    let client = seen.client();
    if path == "/memory" || path == "/memory/" {
        if !matches!(*req.method(), Method::GET | Method::HEAD) {
            return method_not_allowed("GET, HEAD");
        }
        let store = state.memory.lock().unwrap_or_else(|e| e.into_inner());
        let mut sessions: Vec<&str> = store
            .keys()
            .filter(|(c, _)| *c == client)
            .map(|(_, s)| s.as_str())
            .collect();
        sessions.sort_unstable();
        return json_response(
            StatusCode::OK,
            &json!({"client_id": client, "sessions": sessions, "gateway": seen.json()}),
        );
    }
    let Some(session) = path.strip_prefix("/memory/") else {
        return not_found(seen);
    };
    let valid = !session.is_empty()
        && session.len() <= 128
        && session
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if !valid {
        return error_response(
            StatusCode::BAD_REQUEST,
            "bad_session",
            "a session name is 1-128 characters of letters, digits, '-', '_' and '.'",
        );
    }
    let key = (client.clone(), session.to_string());
    let method = req.method().clone();
    let status = match method {
        Method::GET | Method::HEAD => StatusCode::OK,
        Method::DELETE => {
            let mut store = state.memory.lock().unwrap_or_else(|e| e.into_inner());
            store.remove(&key);
            StatusCode::OK
        }
        Method::POST => {
            let body = match read_body(req).await {
                Ok(body) => body,
                Err(resp) => return resp,
            };
            let Ok(value) = serde_json::from_slice::<Value>(&body) else {
                return error_response(
                    StatusCode::BAD_REQUEST,
                    "bad_json",
                    "POST /memory/{session} stores a JSON value",
                );
            };
            let mut store = state.memory.lock().unwrap_or_else(|e| e.into_inner());
            if !store.contains_key(&key) && store.len() >= MAX_MEMORY_SESSIONS {
                return error_response(
                    StatusCode::INSUFFICIENT_STORAGE,
                    "memory_full",
                    "the demo memory store holds no more sessions",
                );
            }
            let entry = store.entry(key.clone()).or_default();
            entry.next_seq += 1;
            let item = json!({"seq": entry.next_seq, "stored_at": unix_now(), "value": value});
            entry.items.push_back(item);
            while entry.items.len() > MAX_MEMORY_ITEMS {
                entry.items.pop_front();
            }
            StatusCode::CREATED
        }
        _ => return method_not_allowed("GET, POST, DELETE"),
    };
    let store = state.memory.lock().unwrap_or_else(|e| e.into_inner());
    let items: Vec<Value> = store
        .get(&key)
        .map(|s| s.items.iter().cloned().collect())
        .unwrap_or_default();
    drop(store);
    json_response(
        status,
        &json!({
            "client_id": client,
            "session": session,
            "count": items.len(),
            "items": items,
            "gateway": seen.json(),
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// Bounds every test: a hang fails instead of blocking the suite.
    async fn bounded<F: std::future::Future>(fut: F) -> F::Output {
        tokio::time::timeout(Duration::from_secs(20), fut)
            .await
            .expect("test took longer than 20 s")
    }

    fn client() -> reqwest::Client {
        reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("reqwest client")
    }

    async fn start() -> DemoServices {
        spawn_demo_services(DemoOptions {
            token_delay: Duration::from_millis(5),
        })
        .await
        .expect("demo services start")
    }

    #[tokio::test]
    async fn every_service_answers_healthz() {
        bounded(async {
            let svc = start().await;
            let http = client();
            for addr in [svc.conversation, svc.tools, svc.rag, svc.memory] {
                let resp = http
                    .get(format!("http://{addr}/healthz"))
                    .send()
                    .await
                    .expect("healthz");
                assert_eq!(resp.status(), 200);
                assert_eq!(resp.text().await.expect("body"), "ok");
            }
            let resp = http
                .get(format!("http://{}/nowhere", svc.rag))
                .send()
                .await
                .expect("404");
            assert_eq!(resp.status(), 404);
            svc.shutdown().await;
        })
        .await;
    }

    #[tokio::test]
    async fn chat_completion_reports_usage_and_what_the_gateway_added() {
        bounded(async {
            let svc = start().await;
            let http = client();
            let url = format!("http://{}/handle", svc.conversation);
            let body = json!({
                "model": "gpt-4o-mini",
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "What is the weather in Paris?"},
                ],
            });
            let resp = http
                .post(&url)
                .header("x-client-id", "demo-user")
                .header("x-request-id", "req-123")
                .header(
                    "traceparent",
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                )
                .json(&body)
                .send()
                .await
                .expect("chat");
            assert_eq!(resp.status(), 200);
            assert_eq!(resp.headers()["x-demo-client-id"], "demo-user");
            assert_eq!(resp.headers()["x-demo-api-key-seen"], "false");
            let v: Value = resp.json().await.expect("json");
            let content = v["choices"][0]["message"]["content"]
                .as_str()
                .expect("content");
            assert!(
                content.contains("What is the weather in Paris?"),
                "{content}"
            );
            assert_eq!(v["model"], "gpt-4o-mini");
            assert_eq!(v["choices"][0]["finish_reason"], "stop");
            let chars = "Be brief.".len() + "What is the weather in Paris?".len();
            assert_eq!(v["usage"]["prompt_tokens"], chars.div_ceil(4));
            assert_eq!(
                v["usage"]["completion_tokens"],
                content.split_whitespace().count()
            );
            assert_eq!(
                v["usage"]["total_tokens"].as_u64(),
                Some(
                    v["usage"]["prompt_tokens"].as_u64().unwrap_or(0)
                        + v["usage"]["completion_tokens"].as_u64().unwrap_or(0)
                )
            );
            let g = &v["gateway"];
            assert_eq!(g["client_id"], "demo-user");
            assert_eq!(g["request_id"], "req-123");
            assert_eq!(
                g["traceparent"],
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            );
            assert_eq!(g["path"], "/handle");
            assert_eq!(g["api_key_seen"], false);

            // A leaked key is reported; any body works; max_tokens cuts the reply.
            let resp = http
                .post(&url)
                .header("x-api-key", "leaked")
                .body("just some text")
                .send()
                .await
                .expect("chat text");
            let v: Value = resp.json().await.expect("json");
            assert_eq!(v["gateway"]["api_key_seen"], true);
            assert!(v["choices"][0]["message"]["content"]
                .as_str()
                .is_some_and(|c| c.contains("just some text")));
            let resp = http
                .post(&url)
                .json(&json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}))
                .send()
                .await
                .expect("chat max_tokens");
            let v: Value = resp.json().await.expect("json");
            assert_eq!(v["usage"]["completion_tokens"], 3);
            assert_eq!(v["choices"][0]["finish_reason"], "length");

            let resp = http.get(&url).send().await.expect("GET /handle");
            assert_eq!(resp.status(), 405);
            assert_eq!(resp.headers()["allow"], "POST");
            svc.shutdown().await;
        })
        .await;
    }

    #[tokio::test]
    async fn sse_events_arrive_one_by_one_as_produced() {
        bounded(async {
            let delay = Duration::from_millis(150);
            let svc = spawn_demo_services(DemoOptions { token_delay: delay })
                .await
                .expect("start");
            let started = Instant::now();
            let resp = client()
                .post(format!("http://{}/stream", svc.conversation))
                .header("x-client-id", "streamer")
                .json(&json!({"messages": [{"role": "user", "content": "stream please"}]}))
                .send()
                .await
                .expect("stream");
            assert_eq!(resp.status(), 200);
            assert_eq!(resp.headers()["content-type"], "text/event-stream");
            let mut chunks = resp.bytes_stream();
            let mut arrivals = Vec::new();
            let mut text = String::new();
            while let Some(chunk) = chunks.next().await {
                let chunk = chunk.expect("chunk");
                arrivals.push(started.elapsed());
                text.push_str(std::str::from_utf8(&chunk).expect("utf-8"));
            }
            let events: Vec<&str> = text
                .split("\n\n")
                .filter(|e| !e.is_empty())
                .map(|e| e.strip_prefix("data: ").expect("data event"))
                .collect();
            assert_eq!(events.last(), Some(&"[DONE]"));
            let tokens = events.len() - 2;
            assert!((6..=14).contains(&tokens), "{tokens} token events");
            // Every token event came in its own chunk, spaced by the delay: not buffered.
            assert!(arrivals.len() >= tokens, "{} chunks", arrivals.len());
            assert!(
                arrivals[0] < delay * 6,
                "first event after {:?}",
                arrivals[0]
            );
            let last = arrivals[arrivals.len() - 1];
            assert!(
                last >= delay * (tokens as u32 - 1),
                "last event after {last:?}"
            );
            assert!(last - arrivals[0] >= delay * 5);
            let mut reply = String::new();
            for event in &events[..tokens] {
                let v: Value = serde_json::from_str(event).expect("token json");
                reply.push_str(v["choices"][0]["delta"]["content"].as_str().expect("delta"));
            }
            assert!(reply.contains("stream please"), "{reply}");
            let fin: Value = serde_json::from_str(events[tokens]).expect("final json");
            assert_eq!(fin["usage"]["completion_tokens"], tokens);
            assert_eq!(
                fin["usage"]["prompt_tokens"],
                "stream please".len().div_ceil(4)
            );
            assert_eq!(fin["choices"][0]["finish_reason"], "stop");
            assert_eq!(fin["gateway"]["client_id"], "streamer");
            assert_eq!(fin["gateway"]["path"], "/stream");
            svc.shutdown().await;
        })
        .await;
    }

    #[tokio::test]
    async fn sse_stream_also_answers_get_with_a_query_prompt() {
        bounded(async {
            let svc = start().await;
            let text = client()
                .get(format!("http://{}/stream?q=hello+there", svc.conversation))
                .send()
                .await
                .expect("stream")
                .text()
                .await
                .expect("text");
            assert!(text.ends_with("data: [DONE]\n\n"));
            assert!(text.contains("\"hello \"") && text.contains("\"there\\\"."));
            svc.shutdown().await;
        })
        .await;
    }

    #[tokio::test]
    async fn websocket_echoes_text_and_binary() {
        bounded(async {
            let svc = start().await;
            let url = format!("ws://{}/ws?api_key=x", svc.conversation);
            let mut request =
                tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
                    url.as_str(),
                )
                .expect("request");
            request
                .headers_mut()
                .insert("x-client-id", HeaderValue::from_static("ws-client"));
            let (mut ws, resp) = tokio_tungstenite::connect_async(request)
                .await
                .expect("connect");
            assert_eq!(resp.status(), 101);
            assert_eq!(resp.headers()["x-demo-client-id"], "ws-client");
            assert_eq!(resp.headers()["x-demo-path"], "/ws");
            ws.send(Message::text("hello")).await.expect("send");
            let reply = ws.next().await.expect("reply").expect("frame");
            assert_eq!(reply, Message::text("echo: hello"));
            ws.send(Message::Binary(Bytes::from_static(b"\x01\x02")))
                .await
                .expect("send binary");
            let reply = ws.next().await.expect("reply").expect("frame");
            assert_eq!(reply, Message::Binary(Bytes::from_static(b"\x01\x02")));
            ws.close(None).await.expect("close");
            // The server acknowledges the close; the stream then ends.
            while let Some(Ok(_)) = ws.next().await {}

            let resp = client()
                .get(format!("http://{}/ws", svc.conversation))
                .send()
                .await
                .expect("plain GET /ws");
            assert_eq!(resp.status(), 400);
            svc.shutdown().await;
        })
        .await;
    }

    #[tokio::test]
    async fn tools_calculate_echo_and_fail() {
        bounded(async {
            let svc = start().await;
            let http = client();
            let url = format!("http://{}/execute", svc.tools);
            let call = |body: Value| {
                let req = http.post(&url).json(&body);
                async move {
                    let resp = req.send().await.expect("tool call");
                    let status = resp.status().as_u16();
                    (status, resp.json::<Value>().await.expect("json"))
                }
            };
            let (status, v) = call(json!({"tool": "calculator", "input": "2+2"})).await;
            assert_eq!(status, 200);
            assert_eq!(v["tool"], "calculator");
            assert_eq!(v["result"], "4");
            assert_eq!(v["gateway"]["path"], "/execute");
            assert_eq!(
                call(json!({"tool": "calculator", "input": " -6 * 7 "}))
                    .await
                    .1["result"],
                "-42"
            );
            assert_eq!(
                call(json!({"tool": "calculator", "input": "10-3"})).await.1["result"],
                "7"
            );
            assert_eq!(
                call(json!({"tool": "calculator", "input": "7/2"})).await.1["result"],
                "3.5"
            );
            let (status, v) = call(json!({"tool": "calculator", "input": "1/0"})).await;
            assert_eq!(
                (status, v["error"]["message"].as_str()),
                (400, Some("division by zero"))
            );
            let (status, _) = call(json!({"tool": "calculator", "input": "system('rm')"})).await;
            assert_eq!(status, 400);
            let (status, _) =
                call(json!({"tool": "calculator", "input": "9223372036854775807+1"})).await;
            assert_eq!(status, 400);
            let (status, v) = call(json!({"tool": "echo", "input": {"a": [1, 2]}})).await;
            assert_eq!((status, &v["result"]), (200, &json!({"a": [1, 2]})));
            let flaky: Vec<u16> = [
                call(json!({"tool": "flaky"})).await.0,
                call(json!({"tool": "flaky"})).await.0,
                call(json!({"tool": "flaky"})).await.0,
            ]
            .to_vec();
            assert_eq!(flaky, vec![503, 200, 503]);
            assert_eq!(call(json!({"tool": "fail", "input": 502})).await.0, 502);
            assert_eq!(call(json!({"tool": "nope"})).await.0, 400);
            let resp = http.get(&url).send().await.expect("GET");
            assert_eq!(resp.status(), 405);
            svc.shutdown().await;
        })
        .await;
    }

    #[tokio::test]
    async fn rag_ranks_by_word_overlap() {
        bounded(async {
            let svc = start().await;
            let http = client();
            let v: Value = http
                .get(format!(
                    "http://{}/search?q=rate%20limits+per+client",
                    svc.rag
                ))
                .send()
                .await
                .expect("search")
                .json()
                .await
                .expect("json");
            assert_eq!(v["query"], "rate limits per client");
            let docs = v["documents"].as_array().expect("documents");
            assert!(!docs.is_empty() && docs.len() <= 3);
            assert_eq!(docs[0]["id"], "doc-ratelimit");
            assert_eq!(docs[0]["score"], 1.0);
            let v: Value = http
                .post(format!("http://{}/search", svc.rag))
                .json(&json!({"query": "websocket streaming", "top_k": 1}))
                .send()
                .await
                .expect("search")
                .json()
                .await
                .expect("json");
            assert_eq!(v["documents"][0]["id"], "doc-streaming");
            assert_eq!(v["documents"].as_array().map(Vec::len), Some(1));
            let v: Value = http
                .get(format!("http://{}/search?q=zebra", svc.rag))
                .send()
                .await
                .expect("search")
                .json()
                .await
                .expect("json");
            assert_eq!(v["documents"], json!([]));
            let resp = http
                .get(format!("http://{}/search", svc.rag))
                .send()
                .await
                .expect("search");
            assert_eq!(resp.status(), 400);
            svc.shutdown().await;
        })
        .await;
    }

    #[tokio::test]
    async fn memory_is_kept_per_client_and_session() {
        bounded(async {
            let svc = start().await;
            let http = client();
            let url = format!("http://{}/memory/s1", svc.memory);
            for note in ["likes tea", "lives in Oslo"] {
                let resp = http
                    .post(&url)
                    .header("x-client-id", "alice")
                    .json(&json!({"note": note}))
                    .send()
                    .await
                    .expect("post");
                assert_eq!(resp.status(), 201);
            }
            let v: Value = http
                .get(&url)
                .header("x-client-id", "alice")
                .send()
                .await
                .expect("get")
                .json()
                .await
                .expect("json");
            assert_eq!(v["count"], 2);
            assert_eq!(v["items"][1]["value"]["note"], "lives in Oslo");
            assert_eq!(v["items"][1]["seq"], 2);
            assert_eq!(v["gateway"]["path"], "/memory/s1");
            let v: Value = http
                .get(&url)
                .header("x-client-id", "bob")
                .send()
                .await
                .expect("get")
                .json()
                .await
                .expect("json");
            assert_eq!(v["count"], 0);
            let v: Value = http
                .get(format!("http://{}/memory", svc.memory))
                .header("x-client-id", "alice")
                .send()
                .await
                .expect("list")
                .json()
                .await
                .expect("json");
            assert_eq!(v["sessions"], json!(["s1"]));
            let v: Value = http
                .delete(&url)
                .header("x-client-id", "alice")
                .send()
                .await
                .expect("delete")
                .json()
                .await
                .expect("json");
            assert_eq!(v["count"], 0);
            let resp = http.post(&url).body("not json").send().await.expect("bad");
            assert_eq!(resp.status(), 400);
            let resp = http
                .post(&url)
                .body(vec![b'1'; MAX_BODY + 1])
                .send()
                .await
                .expect("big");
            assert_eq!(resp.status(), 413);
            svc.shutdown().await;
        })
        .await;
    }

    #[tokio::test]
    async fn shutdown_closes_the_listeners() {
        bounded(async {
            let svc = start().await;
            let addr = svc.tools;
            svc.shutdown().await;
            assert!(TcpStream::connect(addr).await.is_err());
            let svc = start().await;
            let addr = svc.memory;
            drop(svc);
            // Dropping signals the tasks; give them a moment to close the listener.
            let mut closed = false;
            for _ in 0..100 {
                if TcpStream::connect(addr).await.is_err() {
                    closed = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert!(closed, "listener still open after drop");
        })
        .await;
    }

    #[test]
    fn helpers() {
        assert!(under("/handle", "/handle"));
        assert!(under("/handle/x", "/handle"));
        assert!(!under("/handlex", "/handle"));
        assert_eq!(percent_decode("a%20b+c%zz%4"), "a b c%zz%4");
        assert_eq!(query_param("x=1&q=hi%21", "q").as_deref(), Some("hi!"));
        assert_eq!(query_param("q", "q").as_deref(), Some(""));
        assert_eq!(calculate("-3--4"), Ok("1".to_string()));
        assert!(calculate("2+").is_err());
        assert!(calculate("+").is_err());
        assert!(calculate("1+2+3").is_err());
        assert!(calculate("-9223372036854775808/-1").is_err());
    }
}
