//! R1: a corpus of hostile requests (`tests/hostile/corpus.txt`) sent as raw bytes over TCP to
//! the real `tollgate` binary, in front of a raw TCP backend that records every byte and parses
//! strictly. Each case gets its documented answer; the backend receives exactly the expected
//! request lines (nothing smuggled, nothing framed ambiguously), never a tools request carried by
//! the user key however a lenient backend would read the path; the process lives and serves.

mod support;

use std::time::Duration;

use serde_json::json;
use support::process::GatewayProcess;
use support::raw::*;
use support::{api_key, route_in, yaml};

const USER: &str = "tg-hostile-user-6b1f0e";
const ADMIN: &str = "tg-hostile-admin-93ad27";
const BAD: &str = "tg-hostile-nobody-000000";
const USER_CLIENT: &str = "user-client";
const ADMIN_CLIENT: &str = "admin-client";
/// `--max-body-bytes` of the gateway under test (the corpus's 413 cases cross it).
const MAX_BODY: &str = "16384";

/// One acceptable outcome for one response slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Want {
    Status(u16),
    AnyClientError,
    Closed,
}

#[derive(Debug)]
struct Case {
    name: String,
    /// One slot per response, each with its alternatives.
    expect: Vec<Vec<Want>>,
    backend: Vec<String>,
    why: String,
    raw: Vec<u8>,
}

fn parse_want(s: &str) -> Want {
    match s {
        "4xx" => Want::AnyClientError,
        "closed" => Want::Closed,
        n => Want::Status(
            n.parse()
                .unwrap_or_else(|_| panic!("bad status {n:?} in the corpus")),
        ),
    }
}

/// Expands `{USER}`, `{ADMIN}`, `{BAD}`, `{rep N TEXT}`, then the backslash escapes, then `{CL}`.
fn expand(raw: &str) -> Vec<u8> {
    let mut text = raw
        .replace("{USER}", USER)
        .replace("{ADMIN}", ADMIN)
        .replace("{BAD}", BAD);
    while let Some(start) = text.find("{rep ") {
        let end = start
            + text[start..]
                .find('}')
                .unwrap_or_else(|| panic!("unclosed {{rep in {raw:?}"));
        let inner = &text[start + 5..end];
        let (n, what) = inner
            .split_once(' ')
            .unwrap_or_else(|| panic!("{{rep N TEXT}} expected in {raw:?}"));
        let n: usize = n.parse().unwrap_or_else(|_| panic!("bad count in {raw:?}"));
        text = format!("{}{}{}", &text[..start], what.repeat(n), &text[end + 1..]);
    }
    let b = text.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'\\' {
            out.push(b[i]);
            i += 1;
            continue;
        }
        let (byte, used) = match b.get(i + 1) {
            Some(b'r') => (b'\r', 2),
            Some(b'n') => (b'\n', 2),
            Some(b't') => (b'\t', 2),
            Some(b'0') => (0, 2),
            Some(b'\\') => (b'\\', 2),
            Some(b'x') => {
                let hex = std::str::from_utf8(&b[i + 2..i + 4]).unwrap_or("zz");
                let v = u8::from_str_radix(hex, 16)
                    .unwrap_or_else(|_| panic!("bad \\x escape in {raw:?}"));
                (v, 4)
            }
            other => panic!("unknown escape \\{other:?} in {raw:?}"),
        };
        out.push(byte);
        i += used;
    }
    const CL: &[u8] = b"{CL}";
    if let Some(at) = find(&out, CL) {
        let body_start = find(&out, b"\r\n\r\n").expect("{CL} needs a blank line") + 4;
        let len = out.len() - body_start;
        let digits = len.to_string();
        // The placeholder sits in the head, so its own size change does not touch the body.
        out.splice(at..at + CL.len(), digits.bytes());
    }
    out
}

fn parse_corpus(text: &str) -> Vec<Case> {
    let mut cases: Vec<Case> = Vec::new();
    let mut raw = String::new();
    let flush = |cases: &mut Vec<Case>, raw: &mut String| {
        if let Some(c) = cases.last_mut() {
            c.raw = expand(raw);
        }
        raw.clear();
    };
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        if let Some(name) = line.strip_prefix("== ") {
            flush(&mut cases, &mut raw);
            cases.push(Case {
                name: name.trim().to_string(),
                expect: Vec::new(),
                backend: Vec::new(),
                why: String::new(),
                raw: Vec::new(),
            });
            continue;
        }
        let case = cases.last_mut().expect("the corpus starts with a case");
        if let Some(e) = line.strip_prefix("expect:") {
            case.expect = e
                .split_whitespace()
                .map(|slot| slot.split('|').map(parse_want).collect())
                .collect();
        } else if let Some(b) = line.strip_prefix("backend:") {
            let b = b.trim();
            if b != "none" {
                case.backend = b.split(" ; ").map(|s| s.trim().to_string()).collect();
            }
        } else if let Some(w) = line.strip_prefix("why:") {
            case.why = w.trim().to_string();
        } else {
            raw.push_str(line);
        }
    }
    flush(&mut cases, &mut raw);
    for c in &cases {
        assert!(
            !c.expect.is_empty() && !c.why.is_empty() && !c.raw.is_empty(),
            "case {} lacks expect, why or bytes",
            c.name
        );
    }
    cases
}

/// How a lenient backend (servlet-style parameters, backslashes as separators, case-insensitive,
/// one round of percent-decoding) would read a path: used to prove the user key never reaches
/// tools under any reading.
fn lenient(path: &str) -> String {
    let path = path.split(['?', '#']).next().unwrap_or_default();
    let b = path.as_bytes();
    let mut decoded = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&String::from_utf8_lossy(&b[i + 1..i + 3]), 16) {
                decoded.push(v);
                i += 3;
                continue;
            }
        }
        decoded.push(b[i]);
        i += 1;
    }
    let s = String::from_utf8_lossy(&decoded)
        .replace('\\', "/")
        .to_ascii_lowercase();
    let mut segs: Vec<&str> = Vec::new();
    for seg in s.split('/') {
        match seg.split(';').next().unwrap_or_default() {
            "" | "." => {}
            ".." => {
                segs.pop();
            }
            other => segs.push(other),
        }
    }
    format!("/{}", segs.join("/"))
}

fn config(backend: &str) -> String {
    let mut docs = api_key("agents", "user", USER_CLIENT, USER, &["user"], json!({}));
    docs.extend(api_key(
        "agents",
        "admin",
        ADMIN_CLIENT,
        ADMIN,
        &["admin", "user"],
        json!({"rateLimit": {"requestsPerMinute": 100000}}),
    ));
    // The user key gets a generous limit too: the corpus sends ~100 requests.
    docs[1]["spec"]["rateLimit"] = json!({"requestsPerMinute": 100000});
    docs.push(route_in(
        "agents",
        "tools",
        json!({"match": {"pathPrefix": "/api/v1/tools"},
               "auth": {"roles": ["admin"]},
               "backends": [{"url": backend}]}),
    ));
    docs.push(route_in(
        "agents",
        "chat",
        json!({"match": {"pathPrefix": "/api/v1/chat", "methods": ["GET", "POST"]},
               "auth": {"roles": ["user"]},
               "backends": [{"url": backend}]}),
    ));
    yaml(docs)
}

fn slot_ok(slot: &[Want], got: Option<u16>) -> bool {
    slot.iter().any(|w| match (w, got) {
        (Want::Status(s), Some(g)) => *s == g,
        (Want::AnyClientError, Some(g)) => (400..500).contains(&g),
        (Want::Closed, None) => true,
        _ => false,
    })
}

/// Sends one case on a fresh connection; returns the final statuses (1xx skipped) and whether
/// the gateway closed the connection.
async fn send_case(gw: std::net::SocketAddr, case: &Case) -> (Vec<u16>, bool) {
    let mut c = Conn::connect(gw).await.expect("connect to the gateway");
    // The gateway may answer and close before reading everything (a refused head): fine.
    let _ = c.send(&case.raw).await;
    let mut statuses = Vec::new();
    // Until the expected answers are in, wait generously; then briefly, to catch an extra one.
    loop {
        let idle = if statuses.len() < case.expect.len() {
            Duration::from_secs(5)
        } else {
            Duration::from_millis(300)
        };
        match c.next_response(idle).await {
            Some(r) if (100..200).contains(&r.status) => {}
            Some(r) => statuses.push(r.status),
            None => break,
        }
    }
    (statuses, c.closed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_corpus_is_refused_or_normalised_and_nothing_is_smuggled() {
    let corpus = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/hostile/corpus.txt"),
    )
    .expect("read tests/hostile/corpus.txt");
    let cases = parse_corpus(&corpus);
    assert!(cases.len() >= 50, "the corpus holds {} cases", cases.len());

    let backend = RawBackend::start().await;
    let mut gw = GatewayProcess::start(
        &config(&backend.url()),
        &["--max-body-bytes", MAX_BODY, "--header-read-timeout", "2s"],
        &[],
    )
    .await;

    let run = async {
        let mut failures = Vec::new();
        let mut expected_lines: Vec<String> = Vec::new();
        println!("{:<34} {:<14} {:<14} backend", "case", "expected", "got");
        for case in &cases {
            let before = backend.log().requests.len();
            let (statuses, closed) = send_case(gw.listen, case).await;
            let got: Vec<Option<u16>> = if statuses.is_empty() && closed {
                vec![None]
            } else {
                statuses.iter().copied().map(Some).collect()
            };
            let status_ok = got.len() == case.expect.len()
                && case
                    .expect
                    .iter()
                    .zip(&got)
                    .all(|(slot, g)| slot_ok(slot, *g));
            let seen: Vec<String> = backend.log().requests[before..]
                .iter()
                .map(|r| r.line.clone())
                .collect();
            let got_text = got
                .iter()
                .map(|g| g.map_or("closed".to_string(), |s| s.to_string()))
                .collect::<Vec<_>>()
                .join(" ");
            let want_text = case
                .expect
                .iter()
                .map(|slot| {
                    slot.iter()
                        .map(|w| match w {
                            Want::Status(s) => s.to_string(),
                            Want::AnyClientError => "4xx".into(),
                            Want::Closed => "closed".into(),
                        })
                        .collect::<Vec<_>>()
                        .join("|")
                })
                .collect::<Vec<_>>()
                .join(" ");
            println!(
                "{:<34} {:<14} {:<14} {}",
                case.name,
                want_text,
                got_text,
                if seen.is_empty() {
                    "-".into()
                } else {
                    seen.join(" ; ")
                }
            );
            if !status_ok {
                failures.push(format!(
                    "{}: expected {want_text}, got {got_text} ({})",
                    case.name, case.why
                ));
            }
            if seen != case.backend {
                failures.push(format!(
                    "{}: the backend received {seen:?}, expected {:?} ({})",
                    case.name, case.backend, case.why
                ));
            }
            expected_lines.extend(case.backend.iter().cloned());
        }

        // Anything smuggled would arrive late: give it a moment, then account for every byte.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let log = backend.log();
        let all: Vec<String> = log.requests.iter().map(|r| r.line.clone()).collect();
        if all != expected_lines {
            failures.push(format!(
                "the backend's request lines differ from the corpus's:\n  got      {all:?}\n  expected {expected_lines:?}"
            ));
        }
        if !log.anomalies.is_empty() {
            failures.push(format!(
                "the backend's strict parser found: {:?}",
                log.anomalies
            ));
        }
        for r in log.requests.iter().chain(&log.partial) {
            let clients = r.header_values("x-client-id");
            if clients.len() != 1 || ![USER_CLIENT, ADMIN_CLIENT].contains(&clients[0]) {
                failures.push(format!("{}: X-Client-Id {clients:?}", r.line));
            }
            let under_tools = {
                let p = lenient(r.path());
                p == "/api/v1/tools" || p.starts_with("/api/v1/tools/")
            };
            if under_tools && clients != [ADMIN_CLIENT] {
                failures.push(format!(
                    "{}: a tools request authorised with {clients:?}",
                    r.line
                ));
            }
            for h in ["x-api-key", "upgrade", "http2-settings", "keep-alive"] {
                if !r.header_values(h).is_empty() {
                    failures.push(format!("{}: {h} reached the backend", r.line));
                }
            }
            for (n, v) in &r.headers {
                if v.contains(USER) || v.contains(ADMIN) {
                    failures.push(format!("{}: a key reached the backend in {n}", r.line));
                }
            }
        }
        let raw_total: usize = log.connections.iter().map(Vec::len).sum();
        println!(
            "{} cases; backend: {} requests ({} incomplete), {} connections, {raw_total} bytes",
            cases.len(),
            log.requests.len(),
            log.partial.len(),
            log.connections.len()
        );

        // The process lives and still serves.
        let ok = raw_request(
            gw.listen,
            format!(
                "GET /api/v1/chat HTTP/1.1\r\nHost: gw\r\nX-API-Key: {USER}\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .expect("the gateway answers after the corpus");
        if ok.status != 200 {
            failures.push(format!(
                "a normal request after the corpus got {}",
                ok.status
            ));
        }
        failures
    };
    let failures = tokio::time::timeout(Duration::from_secs(25), run)
        .await
        .expect("the corpus ran within 25 s");
    assert!(gw.alive(), "the gateway process died: {}", gw.output());
    let output = gw.output();
    assert!(
        !output.contains("panicked"),
        "the gateway panicked:\n{output}"
    );
    assert!(
        failures.is_empty(),
        "{} failure(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn lenient_reading_sees_through_tricks() {
    assert_eq!(lenient("/api/v1/chat/..;/tools"), "/api/v1/tools");
    assert_eq!(lenient("/API/v1/chat\\..\\Tools"), "/api/v1/tools");
    assert_eq!(lenient("/api/v1/chat/%2e%2e%3b/tools?x"), "/api/v1/tools");
    assert_eq!(
        lenient("/api/v1/chat/%252e%252e/tools"),
        "/api/v1/chat/%2e%2e/tools"
    );
}

#[test]
fn corpus_expansion() {
    assert_eq!(expand("a\\r\\n\\x41{rep 3 b\\0}"), b"a\r\nAb\0b\0b\0");
    let v = expand("P\\r\\nContent-Length: {CL}\\r\\n\\r\\nhello");
    assert_eq!(v, b"P\r\nContent-Length: 5\r\n\r\nhello");
}
