//! The programs inside the node rig's test images, std only so that `rustc` alone builds them
//! as static binaries (hack/node-images.sh):
//!
//!   backend pause   the pod sandbox: sleeps until it is killed
//!   backend echo    HTTP/1.1 on $PORT (8080): answers every request with a JSON description of
//!                   it and of the pod ($POD_NAME, else the host name)
//!   backend llm     an OpenAI-style chat completion server: POST /v1/chat/completions answers
//!                   with JSON, or with `"stream": true` with $CHUNKS (5) SSE chunks $DELAY_MS
//!                   (100) apart and `data: [DONE]`; a request's `max_tokens` overrides $CHUNKS
//!
//! Both servers answer GET /healthz with 200 for probes, keep connections alive, and exit on
//! stdin EOF only if $EXIT_ON_EOF is set (PID 1 in a container ignores SIGTERM without a
//! handler; the kubelet's SIGKILL after the grace period ends them).
#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Echo,
    Llm,
}

struct Request {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn pod_name() -> String {
    std::env::var("POD_NAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown".to_string())
}

fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn read_request(reader: &mut BufReader<TcpStream>) -> std::io::Result<Option<Request>> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut parts = line.split_whitespace();
    let (Some(method), Some(path)) = (parts.next(), parts.next()) else {
        return Err(std::io::Error::other("bad request line"));
    };
    let (method, path) = (method.to_string(), path.to_string());
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 {
            return Ok(None);
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len.min(16 << 20)];
    reader.read_exact(&mut body)?;
    Ok(Some(Request {
        method,
        path,
        headers,
        body,
    }))
}

fn respond(out: &mut TcpStream, status: &str, ctype: &str, body: &str) -> std::io::Result<()> {
    write!(
        out,
        "HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )?;
    out.flush()
}

fn chunk(out: &mut TcpStream, data: &str) -> std::io::Result<()> {
    write!(out, "{:x}\r\n{data}\r\n", data.len())?;
    out.flush()
}

fn echo(out: &mut TcpStream, req: &Request, pod: &str) -> std::io::Result<()> {
    let headers: Vec<String> = req
        .headers
        .iter()
        .map(|(k, v)| format!("{}:{}", json_string(k), json_string(v)))
        .collect();
    let body = format!(
        "{{\"pod\":{},\"method\":{},\"path\":{},\"headers\":{{{}}},\"body_bytes\":{}}}\n",
        json_string(pod),
        json_string(&req.method),
        json_string(&req.path),
        headers.join(","),
        req.body.len()
    );
    respond(out, "200 OK", "application/json", &body)
}

fn llm(out: &mut TcpStream, req: &Request, pod: &str) -> std::io::Result<()> {
    if req.method != "POST" || !req.path.starts_with("/v1/chat/completions") {
        return respond(out, "404 Not Found", "text/plain", "not found\n");
    }
    let body = String::from_utf8_lossy(&req.body);
    let compact: String = body.chars().filter(|c| !c.is_whitespace()).collect();
    let words = ["Tollgate", " routes", " agent", " traffic", " on", " a", " real", " node", "."];
    // `max_tokens` in the request (a test asking for a longer stream), else $CHUNKS.
    let chunks: usize = compact
        .split_once("\"max_tokens\":")
        .and_then(|(_, rest)| {
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
        .unwrap_or_else(|| env_or("CHUNKS", 5));
    if !compact.contains("\"stream\":true") {
        let text: String = (0..chunks).map(|i| words[i % words.len()]).collect();
        let reply = format!(
            "{{\"object\":\"chat.completion\",\"pod\":{},\"choices\":[{{\"index\":0,\"message\":{{\"role\":\"assistant\",\"content\":{}}},\"finish_reason\":\"stop\"}}]}}\n",
            json_string(pod),
            json_string(&text)
        );
        return respond(out, "200 OK", "application/json", &reply);
    }
    let delay = Duration::from_millis(env_or("DELAY_MS", 100));
    write!(
        out,
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n"
    )?;
    for i in 0..chunks {
        let event = format!(
            "data: {{\"object\":\"chat.completion.chunk\",\"pod\":{},\"index\":{i},\"choices\":[{{\"index\":0,\"delta\":{{\"content\":{}}}}}]}}\n\n",
            json_string(pod),
            json_string(words[i % words.len()])
        );
        chunk(out, &event)?;
        std::thread::sleep(delay);
    }
    chunk(out, "data: [DONE]\n\n")?;
    write!(out, "0\r\n\r\n")?;
    out.flush()
}

fn serve_conn(stream: TcpStream, mode: Mode, pod: &str) -> std::io::Result<()> {
    let mut out = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    while let Some(req) = read_request(&mut reader)? {
        let close = req
            .headers
            .iter()
            .any(|(k, v)| k == "connection" && v.eq_ignore_ascii_case("close"));
        if req.path == "/healthz" {
            respond(&mut out, "200 OK", "text/plain", "ok\n")?;
        } else if mode == Mode::Echo {
            echo(&mut out, &req, pod)?;
        } else {
            llm(&mut out, &req, pod)?;
        }
        if close {
            break;
        }
    }
    Ok(())
}

fn serve(mode: Mode) -> std::io::Result<()> {
    let port: u16 = env_or("PORT", 8080);
    let listener = TcpListener::bind(("0.0.0.0", port))?;
    let pod = pod_name();
    eprintln!("backend: serving on :{port} as {pod}");
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let pod = pod.clone();
        std::thread::spawn(move || {
            // A client that goes away mid-answer is not an error worth reporting.
            let _ = serve_conn(stream, mode, &pod);
        });
    }
    Ok(())
}

fn main() {
    let mode = std::env::args().nth(1).unwrap_or_default();
    let result = match mode.as_str() {
        "pause" => loop {
            std::thread::park();
        },
        "echo" => serve(Mode::Echo),
        "llm" => serve(Mode::Llm),
        other => {
            eprintln!("usage: backend pause|echo|llm (got {other:?})");
            std::process::exit(2);
        }
    };
    if let Err(e) = result {
        eprintln!("backend: {e}");
        std::process::exit(1);
    }
}
