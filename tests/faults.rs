//! Faults on either side of the gateway: a backend that resets mid-stream, one that trickles its
//! bytes, a client that trickles its headers (or the HTTP/2 preface), and a client that walks
//! away from an SSE stream. Each is bounded, ends as documented, and leaves the gateway serving
//! with nothing in flight.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::StatusCode;
use serde_json::json;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

const KEY: &str = "tg-faults-key-8d3c";

fn config(prefix: &str, backend: &str, extra: serde_json::Value) -> String {
    let mut docs = api_key("default", "faults", "faults-1", KEY, &[], json!({}));
    let mut spec = json!({"match": {"pathPrefix": prefix}, "backends": [{"url": backend}]});
    if let (Some(s), serde_json::Value::Object(extra)) = (spec.as_object_mut(), extra) {
        s.extend(extra);
    }
    docs.push(route("faulty", spec));
    docs.push(route(
        "healthy",
        json!({"match": {"pathPrefix": "/ok"}, "auth": {"required": false},
               "backends": [{"url": "http://127.0.0.1:1"}]}),
    ));
    yaml(docs)
}

/// Sum of every `tollgate_upstream_in_flight` series on the admin port.
async fn upstream_in_flight(gw: &Gateway) -> i64 {
    support::metrics::metric_sum(&gw.metrics().await, "tollgate_upstream_in_flight") as i64
}

/// A normal request still works: the gateway is serving.
async fn still_serving(gw: &Gateway, backend: &Backend) {
    let r = gw
        .http
        .get(gw.url("/api/v1/echo"))
        .header("x-api-key", KEY)
        .send()
        .await
        .expect("the gateway answers after the fault");
    assert_eq!(r.status(), StatusCode::OK);
    assert!(backend.count() > 0);
}

/// Reads the request head off a raw socket.
async fn read_head(s: &mut TcpStream) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !contains(&buf, b"\r\n\r\n") {
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Config with the faulty route plus `/api/v1/echo` on a healthy backend.
fn config_with_echo(backend: &str, echo: &str, extra: serde_json::Value) -> String {
    let mut text = config("/api/v1/stream", backend, extra);
    text.push_str(&yaml([route(
        "echo",
        json!({"match": {"pathPrefix": "/api/v1/echo"}, "backends": [{"url": echo}]}),
    )]));
    text
}

#[tokio::test]
async fn a_backend_reset_mid_stream_ends_the_clients_stream_with_an_error() {
    bounded(async {
        // Answers 200 with a chunked event stream, sends one event, then resets the connection.
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let resetter = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    read_head(&mut s).await;
                    let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                                transfer-encoding: chunked\r\n\r\n";
                    let event = b"data: one\n\n";
                    let chunk = format!("{:x}\r\n", event.len());
                    let _ = s.write_all(head.as_bytes()).await;
                    let _ = s.write_all(chunk.as_bytes()).await;
                    let _ = s.write_all(event).await;
                    let _ = s.write_all(b"\r\n").await;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    let _ = s.set_zero_linger();
                    drop(s); // RST
                });
            }
        });
        let echo = Backend::echo("echo").await;
        let gw = gateway(config_with_echo(
            &format!("http://{addr}"),
            &echo.url(),
            json!({"protocol": "sse", "timeouts": {"idle": "10s"}}),
        ))
        .await;

        let mut resp = gw
            .http
            .get(gw.url("/api/v1/stream"))
            .header("x-api-key", KEY)
            .send()
            .await
            .expect("the gateway answers");
        assert_eq!(resp.status(), StatusCode::OK);
        let mut buf = Vec::new();
        read_until(&mut resp, &mut buf, b"data: one\n\n").await;
        let started = Instant::now();
        let end = tokio::time::timeout(Duration::from_secs(5), resp.chunk())
            .await
            .expect("the stream ends promptly after the reset, never hangs");
        assert!(
            end.is_err(),
            "a reset upstream ends the client's stream with an error, not a clean end: {end:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );

        still_serving(&gw, &echo).await;
        eventually(
            Duration::from_secs(2),
            "upstream in flight back to 0",
            || async { (upstream_in_flight(&gw).await == 0).then_some(()) },
        )
        .await;
        resetter.abort();
    })
    .await;
}

#[tokio::test]
async fn a_trickling_backend_lives_while_it_trickles_and_is_cut_by_the_idle_timeout() {
    bounded(async {
        // One byte-sized event every 100 ms for 1 s (each under the 400 ms idle timeout), then
        // silence.
        let silent_since: Arc<std::sync::Mutex<Option<Instant>>> = Arc::default();
        let s2 = silent_since.clone();
        let b = Backend::spawn(
            "trickle",
            handler(move |_, _| {
                let silent_since = s2.clone();
                async move {
                    let (tx, resp) = event_stream();
                    tokio::spawn(async move {
                        for i in 0..10 {
                            if i > 0 {
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                            if tx.send(Bytes::from_static(b"data: .\n\n")).await.is_err() {
                                return;
                            }
                        }
                        *silent_since.lock().unwrap_or_else(|p| p.into_inner()) =
                            Some(Instant::now());
                        tokio::time::sleep(Duration::from_secs(30)).await;
                        drop(tx);
                    });
                    resp
                }
            }),
        )
        .await;
        let echo = Backend::echo("echo").await;
        let gw = gateway(config_with_echo(
            &b.url(),
            &echo.url(),
            json!({"protocol": "sse", "timeouts": {"idle": "400ms"}}),
        ))
        .await;

        let mut resp = gw
            .http
            .get(gw.url("/api/v1/stream"))
            .header("x-api-key", KEY)
            .send()
            .await
            .expect("the gateway answers");
        assert_eq!(resp.status(), StatusCode::OK);
        let mut events = 0;
        let ended = loop {
            match tokio::time::timeout(Duration::from_secs(5), resp.chunk()).await {
                Err(_) => panic!("the idle timeout did not end the silent stream"),
                Ok(Ok(Some(c))) => events += c.windows(2).filter(|w| w == b"\n\n").count(),
                Ok(Ok(None)) => break Ok(()),
                Ok(Err(e)) => break Err(e),
            }
        };
        let silent_for = silent_since
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map(|t| t.elapsed())
            .expect("the backend went silent before the stream ended");
        assert_eq!(
            events, 10,
            "every trickled event passed while the stream was alive"
        );
        assert!(
            ended.is_err(),
            "an idle cut is an error to the client, not a clean end"
        );
        assert!(
            silent_for >= Duration::from_millis(350) && silent_for < Duration::from_millis(1500),
            "cut {silent_for:?} after the backend went silent (idle timeout 400 ms)"
        );
        still_serving(&gw, &echo).await;
        eventually(
            Duration::from_secs(2),
            "upstream in flight back to 0",
            || async { (upstream_in_flight(&gw).await == 0).then_some(()) },
        )
        .await;
    })
    .await;
}

#[tokio::test]
async fn a_backend_slow_to_answer_is_cut_by_the_first_byte_timeout() {
    bounded(async {
        let b = Backend::spawn(
            "slow",
            handler(|_, _| async {
                tokio::time::sleep(Duration::from_secs(3)).await;
                respond(StatusCode::OK, "late")
            }),
        )
        .await;
        let echo = Backend::echo("echo").await;
        let gw = gateway(config_with_echo(
            &b.url(),
            &echo.url(),
            json!({"timeouts": {"firstByte": "300ms"}}),
        ))
        .await;
        let started = Instant::now();
        let r = gw
            .http
            .get(gw.url("/api/v1/stream"))
            .header("x-api-key", KEY)
            .send()
            .await
            .expect("the gateway answers");
        assert_eq!(r.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(error_code(r).await, "upstream_timeout");
        assert!(
            started.elapsed() < Duration::from_millis(1500),
            "{:?}",
            started.elapsed()
        );
        still_serving(&gw, &echo).await;
    })
    .await;
}

/// Sends `bytes` one at a time, `every` apart, until the peer closes; returns when it closed
/// (from the first byte) and what it answered, if anything.
async fn trickle(addr: std::net::SocketAddr, bytes: &[u8], every: Duration) -> (Duration, Vec<u8>) {
    let s = TcpStream::connect(addr).await.expect("connect");
    trickle_on(s, bytes, every).await
}

/// `trickle` on a connection already open (a kept-alive one, say).
async fn trickle_on(mut s: TcpStream, bytes: &[u8], every: Duration) -> (Duration, Vec<u8>) {
    let started = Instant::now();
    let mut answer = Vec::new();
    let mut chunk = [0u8; 1024];
    for b in bytes.iter().cycle() {
        if s.write_all(&[*b]).await.is_err() {
            break;
        }
        match tokio::time::timeout(every, s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => {
                answer.extend_from_slice(&chunk[..n]);
            }
            Err(_) => {}
        }
        if started.elapsed() > Duration::from_secs(10) {
            break;
        }
    }
    // Drain whatever is left (a 408) until EOF.
    while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(500), s.read(&mut chunk)).await
    {
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&chunk[..n]);
    }
    (started.elapsed(), answer)
}

#[tokio::test]
async fn a_client_trickling_its_headers_is_cut_at_the_header_read_timeout() {
    bounded(async {
        let echo = Backend::echo("echo").await;
        let gw = gateway_with(config_with_echo(&echo.url(), &echo.url(), json!({})), |o| {
            o.proxy.header_read_timeout = Duration::from_millis(500);
        })
        .await;

        // An HTTP/1.1 head, one byte every 100 ms: it would take ~6 s to complete.
        let head = format!(
            "GET /api/v1/echo HTTP/1.1\r\nHost: gw\r\nX-API-Key: {KEY}\r\nX-Pad: {}\r\n\r\n",
            "a".repeat(20)
        );
        let (took, answer) = trickle(
            gw.running.listen,
            head.as_bytes(),
            Duration::from_millis(100),
        )
        .await;
        let text = String::from_utf8_lossy(&answer);
        assert!(
            answer.is_empty() || text.starts_with("HTTP/1.1 408"),
            "closed, or 408: {text:?}"
        );
        assert!(
            took >= Duration::from_millis(400) && took < Duration::from_millis(1500),
            "the trickling client was cut after {took:?} (timeout 500 ms)"
        );

        // The same with the HTTP/2 preface (the protocol is not known until it completes).
        let (took, _) = trickle(
            gw.running.listen,
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            Duration::from_millis(100),
        )
        .await;
        assert!(
            took < Duration::from_millis(1500),
            "a trickled HTTP/2 preface was cut after {took:?} (timeout 500 ms)"
        );

        still_serving(&gw, &echo).await;
    })
    .await;
}

/// Defect: idle keep-alive connections were closed at `--header-read-timeout` (hyper's header
/// timer also runs while a connection waits idle), so a load balancer with a longer idle
/// timeout met resets. Now an idle connection lives until `--idle-timeout`, and a head started
/// on a kept-alive connection still has only the header read timeout to complete.
#[tokio::test]
async fn keep_alive_connections_idle_until_the_idle_timeout_not_the_header_timeout() {
    const HEADER: Duration = Duration::from_millis(400);
    const IDLE: Duration = Duration::from_millis(2000);
    bounded(async {
        let echo = Backend::echo("echo").await;
        let gw = gateway_with(config_with_echo(&echo.url(), &echo.url(), json!({})), |o| {
            o.proxy.header_read_timeout = HEADER;
            o.proxy.idle_timeout = IDLE;
        })
        .await;
        let request = format!("GET /api/v1/echo HTTP/1.1\r\nHost: gw\r\nX-API-Key: {KEY}\r\n\r\n");
        let mut c = support::raw::Conn::connect(gw.running.listen)
            .await
            .expect("connect");
        c.send(request.as_bytes()).await.expect("send");
        let r = c
            .next_response(Duration::from_secs(5))
            .await
            .expect("an answer");
        assert_eq!(r.status, 200);
        // Idle for three header timeouts: the connection is still there and serves again.
        tokio::time::sleep(HEADER * 3).await;
        c.send(request.as_bytes())
            .await
            .expect("send after an idle pause");
        let r = c
            .next_response(Duration::from_secs(5))
            .await
            .expect("the kept-alive connection answers after 1.2 s idle");
        assert_eq!(r.status, 200);
        // Then left idle: closed after the idle timeout (checks are a quarter of it apart).
        let idle_from = Instant::now();
        assert!(c.next_response(IDLE * 2).await.is_none());
        assert!(c.closed, "the idle connection was closed");
        let idle_for = idle_from.elapsed();
        println!("idle keep-alive connection closed after {idle_for:?} (idle timeout {IDLE:?})");
        assert!(
            idle_for >= IDLE && idle_for < IDLE + IDLE / 2,
            "idle keep-alive connection closed after {idle_for:?}"
        );

        // A head begun on a kept-alive connection must still complete within the header
        // timeout, not the idle one.
        let mut s = tokio::net::TcpStream::connect(gw.running.listen)
            .await
            .expect("connect");
        s.write_all(request.as_bytes()).await.expect("send");
        let mut buf = vec![0u8; 4096];
        let n = s.read(&mut buf).await.expect("first answer");
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        let (took, _) = trickle_on(s, request.as_bytes(), Duration::from_millis(100)).await;
        assert!(
            took >= HEADER && took < HEADER * 3,
            "a second head trickled on a kept-alive connection was cut after {took:?}"
        );

        still_serving(&gw, &echo).await;
    })
    .await;
}

#[tokio::test]
async fn a_client_leaving_mid_sse_cancels_the_upstream_request() {
    bounded(async {
        let receiver_gone = Arc::new(Notify::new());
        let gone_flag = Arc::new(AtomicBool::new(false));
        let (n2, f2) = (receiver_gone.clone(), gone_flag.clone());
        let b = Backend::spawn(
            "sse",
            handler(move |_, _| {
                let (gone, flag) = (n2.clone(), f2.clone());
                async move {
                    let (tx, resp) = event_stream();
                    tokio::spawn(async move {
                        loop {
                            if tx
                                .send(Bytes::from_static(b"data: tick\n\n"))
                                .await
                                .is_err()
                            {
                                // The gateway dropped the upstream response body.
                                flag.store(true, Ordering::SeqCst);
                                gone.notify_one();
                                return;
                            }
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    });
                    resp
                }
            }),
        )
        .await;
        let echo = Backend::echo("echo").await;
        let gw = gateway(config_with_echo(
            &b.url(),
            &echo.url(),
            json!({"protocol": "sse", "timeouts": {"idle": "30s"}}),
        ))
        .await;

        let mut resp = gw
            .http
            .get(gw.url("/api/v1/stream"))
            .header("x-api-key", KEY)
            .send()
            .await
            .expect("the gateway answers");
        let mut buf = Vec::new();
        read_until(&mut resp, &mut buf, b"data: tick\n\ndata: tick\n\n").await;
        assert_eq!(upstream_in_flight(&gw).await, 1, "one stream in flight");
        // The client walks away: reqwest closes its connection.
        drop(resp);
        let left = Instant::now();
        tokio::time::timeout(Duration::from_secs(3), async {
            while !gone_flag.load(Ordering::SeqCst) {
                receiver_gone.notified().await;
            }
        })
        .await
        .expect("the backend's stream was dropped after the client left");
        assert!(
            left.elapsed() < Duration::from_secs(2),
            "{:?}",
            left.elapsed()
        );
        eventually(
            Duration::from_secs(2),
            "upstream in flight back to 0",
            || async { (upstream_in_flight(&gw).await == 0).then_some(()) },
        )
        .await;
        still_serving(&gw, &echo).await;
    })
    .await;
}
