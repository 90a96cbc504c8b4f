//! Helpers for tests that need the raw wire: a raw TCP backend that records every byte and parses
//! requests strictly, and a raw HTTP/1.1 client. (The binary as a child process is
//! `support::process::GatewayProcess`.)
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

// ---------------------------------------------------------------------------------------------
// A raw HTTP/1.1 client
// ---------------------------------------------------------------------------------------------

/// One response read off the wire.
#[derive(Clone, Debug)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Sends `bytes` on a new connection and reads one response (the connection is then dropped).
pub async fn raw_request(addr: SocketAddr, bytes: &[u8]) -> std::io::Result<RawResponse> {
    let mut c = Conn::connect(addr).await?;
    c.send(bytes).await?;
    c.next_response(Duration::from_secs(5))
        .await
        .ok_or_else(|| std::io::Error::other("no response"))
}

/// A raw client connection that reads responses one at a time (pipelining-safe: bytes read
/// past one response stay buffered for the next).
pub struct Conn {
    pub stream: TcpStream,
    buf: Vec<u8>,
    /// The peer closed the connection (EOF or reset).
    pub closed: bool,
}

impl Conn {
    pub async fn connect(addr: SocketAddr) -> std::io::Result<Conn> {
        Ok(Conn {
            stream: TcpStream::connect(addr).await?,
            buf: Vec::new(),
            closed: false,
        })
    }

    pub async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// The next response; `None` when the peer closed first or nothing arrived for `idle`.
    pub async fn next_response(&mut self, idle: Duration) -> Option<RawResponse> {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            if let Some((r, n)) = parse_response(&self.buf, self.closed) {
                self.buf.drain(..n);
                return Some(r);
            }
            if self.closed {
                return None;
            }
            match tokio::time::timeout(idle, self.stream.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) => self.closed = true,
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
                Err(_) => return None,
            }
        }
    }
}

/// Parses one response at the start of `buf`: `Some((response, consumed))` when complete.
/// Bodies framed by Content-Length or chunked; anything else is read to EOF by the caller.
pub fn parse_response(buf: &[u8], eof: bool) -> Option<(RawResponse, usize)> {
    let head_end = find(buf, b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next()?;
    let status: u16 = status_line.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let body_start = head_end + 4;
    let get = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    let no_body = status == 204 || status == 304 || (100..200).contains(&status);
    let (body, end) = if no_body {
        (Vec::new(), body_start)
    } else if get("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        decode_chunked(&buf[body_start..]).map(|(b, n)| (b, body_start + n))?
    } else if let Some(cl) = get("content-length") {
        let n: usize = cl.parse().ok()?;
        if buf.len() < body_start + n {
            return None;
        }
        (buf[body_start..body_start + n].to_vec(), body_start + n)
    } else if eof {
        (buf[body_start..].to_vec(), buf.len())
    } else {
        return None;
    };
    Some((
        RawResponse {
            status,
            headers,
            body,
        },
        end,
    ))
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Decodes a complete chunked body (strictly: CRLF everywhere, hex sizes, no extensions games).
/// `Some((body, consumed))` when complete, `None` when more bytes are needed or it is malformed.
pub fn decode_chunked(buf: &[u8]) -> Option<(Vec<u8>, usize)> {
    strict_chunked(buf).ok().flatten()
}

fn strict_chunked(buf: &[u8]) -> Result<Option<(Vec<u8>, usize)>, String> {
    let mut body = Vec::new();
    let mut i = 0;
    loop {
        let Some(eol) = find(&buf[i..], b"\r\n") else {
            return Ok(None);
        };
        let line = &buf[i..i + eol];
        let size_part = line.split(|&b| b == b';').next().unwrap_or_default();
        let size_str = std::str::from_utf8(size_part).map_err(|_| "chunk size not ASCII")?;
        if size_str.is_empty() || !size_str.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("bad chunk size {size_str:?}"));
        }
        let size = usize::from_str_radix(size_str, 16).map_err(|e| e.to_string())?;
        i += eol + 2;
        if size == 0 {
            // Trailer section: lines until an empty one.
            loop {
                let Some(eol) = find(&buf[i..], b"\r\n") else {
                    return Ok(None);
                };
                i += eol + 2;
                if eol == 0 {
                    return Ok(Some((body, i)));
                }
            }
        }
        if buf.len() < i + size + 2 {
            return Ok(None);
        }
        body.extend_from_slice(&buf[i..i + size]);
        if &buf[i + size..i + size + 2] != b"\r\n" {
            return Err("chunk not followed by CRLF".into());
        }
        i += size + 2;
    }
}

// ---------------------------------------------------------------------------------------------
// A raw TCP backend
// ---------------------------------------------------------------------------------------------

/// One request as a strict HTTP/1.1 parser read it off the backend's socket.
#[derive(Clone, Debug)]
pub struct RawRequest {
    /// `GET /path HTTP/1.1`.
    pub line: String,
    /// Names lower-cased, in arrival order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawRequest {
    pub fn header_values(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    pub fn path(&self) -> &str {
        self.line.split(' ').nth(1).unwrap_or("")
    }
}

/// What the backend saw.
#[derive(Clone, Debug, Default)]
pub struct RawLog {
    /// Every byte received, per connection, in accept order.
    pub connections: Vec<Vec<u8>>,
    /// Complete requests, in order.
    pub requests: Vec<RawRequest>,
    /// Requests whose body never completed (the connection closed first); body empty.
    pub partial: Vec<RawRequest>,
    /// Anything a strict parser refuses: bare LF, CL with TE, duplicate CL, bad chunking, ...
    pub anomalies: Vec<String>,
}

/// A TCP backend that records every byte, parses requests strictly and answers each complete
/// request `200 ok` (keep-alive).
pub struct RawBackend {
    pub addr: SocketAddr,
    log: Arc<Mutex<RawLog>>,
    task: JoinHandle<()>,
}

impl Drop for RawBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

enum Parsed {
    Complete(RawRequest, usize),
    /// The head is complete, the body is not (yet).
    NeedBody(RawRequest),
    NeedHead,
}

fn parse_request(buf: &[u8]) -> Result<Parsed, String> {
    let Some(head_end) = find(buf, b"\r\n\r\n") else {
        if let Some(lf) = buf.iter().position(|&b| b == b'\n') {
            if lf == 0 || buf[lf - 1] != b'\r' {
                return Err("bare LF in the request head".into());
            }
        }
        return Ok(Parsed::NeedHead);
    };
    let head = &buf[..head_end];
    for (i, &b) in head.iter().enumerate() {
        if b == b'\n' && (i == 0 || head[i - 1] != b'\r') {
            return Err("bare LF in the request head".into());
        }
        if b == b'\r' && head.get(i + 1) != Some(&b'\n') {
            return Err("bare CR in the request head".into());
        }
        if b == 0 {
            return Err("NUL in the request head".into());
        }
    }
    let head = std::str::from_utf8(head).map_err(|_| "request head is not UTF-8".to_string())?;
    let mut lines = head.split("\r\n");
    let line = lines.next().unwrap_or_default().to_string();
    let parts: Vec<&str> = line.split(' ').collect();
    if parts.len() != 3 || parts[2] != "HTTP/1.1" || !parts[1].starts_with('/') {
        return Err(format!("odd request line {line:?}"));
    }
    let mut headers = Vec::new();
    for l in lines {
        if l.starts_with([' ', '\t']) {
            return Err(format!("obs-fold line {l:?}"));
        }
        let Some((n, v)) = l.split_once(':') else {
            return Err(format!("header line without colon {l:?}"));
        };
        if n.is_empty() || n.bytes().any(|b| !b.is_ascii_graphic()) {
            return Err(format!("bad header name {n:?}"));
        }
        headers.push((n.to_ascii_lowercase(), v.trim().to_string()));
    }
    let req = RawRequest {
        line,
        headers,
        body: Vec::new(),
    };
    let cl = req.header_values("content-length");
    let te = req.header_values("transfer-encoding");
    if !te.is_empty() && !cl.is_empty() {
        return Err(format!(
            "both Transfer-Encoding and Content-Length: {}",
            req.line
        ));
    }
    if cl.len() > 1 {
        return Err(format!("{} Content-Length headers: {}", cl.len(), req.line));
    }
    if te.len() > 1 || te.first().is_some_and(|t| *t != "chunked") {
        return Err(format!("Transfer-Encoding {te:?}: {}", req.line));
    }
    let body_start = head_end + 4;
    if !te.is_empty() {
        return match strict_chunked(&buf[body_start..])? {
            Some((body, n)) => Ok(Parsed::Complete(RawRequest { body, ..req }, body_start + n)),
            None => Ok(Parsed::NeedBody(req)),
        };
    }
    let len: usize = match cl.first() {
        Some(v) => {
            if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!("Content-Length {v:?}"));
            }
            v.parse().map_err(|_| format!("Content-Length {v:?}"))?
        }
        None => 0,
    };
    if buf.len() < body_start + len {
        return Ok(Parsed::NeedBody(req));
    }
    let body = buf[body_start..body_start + len].to_vec();
    Ok(Parsed::Complete(
        RawRequest { body, ..req },
        body_start + len,
    ))
}

impl RawBackend {
    pub async fn start() -> RawBackend {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the raw backend");
        let addr = listener.local_addr().expect("raw backend address");
        let log: Arc<Mutex<RawLog>> = Arc::default();
        let log2 = log.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let log = log2.clone();
                let idx = {
                    let mut l = lock(&log);
                    l.connections.push(Vec::new());
                    l.connections.len() - 1
                };
                tokio::spawn(serve_raw(stream, log, idx));
            }
        });
        RawBackend { addr, log, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn log(&self) -> RawLog {
        lock(&self.log).clone()
    }
}

async fn serve_raw(mut stream: TcpStream, log: Arc<Mutex<RawLog>>, idx: usize) {
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let n = match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => 0,
            Ok(n) => n,
        };
        if n == 0 {
            if !buf.is_empty() {
                let mut l = lock(&log);
                match parse_request(&buf) {
                    Ok(Parsed::NeedBody(req)) => l.partial.push(req),
                    Ok(Parsed::NeedHead) => l.anomalies.push(format!(
                        "connection closed inside a request head: {:?}",
                        String::from_utf8_lossy(&buf)
                    )),
                    Ok(Parsed::Complete(..)) => {}
                    Err(e) => l.anomalies.push(e),
                }
            }
            return;
        }
        lock(&log).connections[idx].extend_from_slice(&chunk[..n]);
        buf.extend_from_slice(&chunk[..n]);
        loop {
            match parse_request(&buf) {
                Ok(Parsed::Complete(req, used)) => {
                    buf.drain(..used);
                    lock(&log).requests.push(req);
                    let resp = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok";
                    if stream.write_all(resp).await.is_err() {
                        return;
                    }
                }
                Ok(_) => break,
                Err(e) => {
                    lock(&log).anomalies.push(e);
                    return;
                }
            }
        }
    }
}
