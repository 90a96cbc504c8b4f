//! R7 with the real binary: SIGTERM while a slow request and an SSE stream are in flight. The
//! gateway turns `/readyz` 503 (the admin port keeps answering), refuses new connections on the
//! proxy port, lets the request and the stream finish, and exits 0 within `--shutdown-grace`.
//! Kept-alive client connections are never closed under a request during the drain: HTTP/1.1
//! answers say `Connection: close` first, HTTP/2 gets GOAWAY, and a pooling client resends
//! nothing.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::StatusCode;
use serde_json::json;
use support::keepalive::{KeepAlive, Proto, Stats};
use support::process::GatewayProcess;
use support::raw::raw_request;
use support::*;

const KEY: &str = "tg-shutdown-key-5e0a";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_work_and_exits_zero() {
    bounded(async {
        let slow = Backend::spawn(
            "slow",
            handler(|_, _| async {
                tokio::time::sleep(Duration::from_secs(1)).await;
                respond(StatusCode::OK, "slow answer")
            }),
        )
        .await;
        // Five events 300 ms apart: the stream ends ~1.5 s after it starts.
        let sse = Backend::spawn(
            "sse",
            handler(|_, _| async {
                let (tx, resp) = event_stream();
                tokio::spawn(async move {
                    for i in 1..=5 {
                        let ev = Bytes::from(format!("data: {i}\n\n"));
                        if tx.send(ev).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                });
                resp
            }),
        )
        .await;
        let mut docs = api_key("default", "drain", "drain-1", KEY, &[], json!({}));
        docs.push(route(
            "slow",
            json!({"match": {"pathPrefix": "/slow"}, "backends": [{"url": slow.url()}]}),
        ));
        docs.push(route(
            "events",
            json!({"match": {"pathPrefix": "/events"}, "protocol": "sse",
                   "backends": [{"url": sse.url()}]}),
        ));
        let mut gw = GatewayProcess::start(&yaml(docs), &["--shutdown-grace", "5s"], &[]).await;
        let http = client();
        let base = format!("http://{}", gw.listen);

        let slow_req = {
            let (http, url) = (http.clone(), format!("{base}/slow"));
            tokio::spawn(async move {
                let r = http.get(url).header("x-api-key", KEY).send().await?;
                let status = r.status();
                Ok::<_, reqwest::Error>((status, r.text().await?))
            })
        };
        let mut stream = http
            .get(format!("{base}/events"))
            .header("x-api-key", KEY)
            .send()
            .await
            .expect("the stream opens");
        assert_eq!(stream.status(), StatusCode::OK);
        let mut events = Vec::new();
        read_until(&mut stream, &mut events, b"data: 1\n\n").await;
        eventually(
            Duration::from_secs(5),
            "the slow request reached its backend",
            || async { (slow.count() == 1).then_some(()) },
        )
        .await;

        let term = Instant::now();
        gw.sigterm();

        // The admin port keeps answering, with /readyz false.
        let not_ready = eventually(Duration::from_secs(2), "/readyz turns 503", || async {
            let r = raw_request(
                gw.admin,
                b"GET /readyz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
            )
            .await
            .ok()?;
            (r.status == 503).then(|| term.elapsed())
        })
        .await;
        // The proxy port refuses new connections.
        let refused = eventually(
            Duration::from_secs(2),
            "new connections are refused",
            || async {
                tokio::net::TcpStream::connect(gw.listen)
                    .await
                    .is_err()
                    .then(|| term.elapsed())
            },
        )
        .await;
        let healthz = raw_request(
            gw.admin,
            b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        )
        .await
        .expect("the admin port answers while draining");
        assert_eq!(healthz.status, 200);

        // In-flight work completes.
        let (status, body) = slow_req
            .await
            .expect("the slow request task")
            .expect("the slow request completes during the drain");
        assert_eq!((status, body.as_str()), (StatusCode::OK, "slow answer"));
        let slow_done = term.elapsed();
        loop {
            match stream.chunk().await {
                Ok(Some(c)) => events.extend_from_slice(&c),
                Ok(None) => break,
                Err(e) => panic!(
                    "the stream failed during the drain: {e}; got {:?}",
                    String::from_utf8_lossy(&events)
                ),
            }
        }
        assert_eq!(
            String::from_utf8_lossy(&events),
            "data: 1\n\ndata: 2\n\ndata: 3\n\ndata: 4\n\ndata: 5\n\n",
            "the whole stream arrived"
        );
        let stream_done = term.elapsed();

        // And the process exits 0, well within the grace period.
        let status = tokio::time::timeout(Duration::from_secs(6), gw.child.wait())
            .await
            .expect("the gateway exits within the grace period")
            .expect("wait for the gateway");
        let exited = term.elapsed();
        println!(
            "SIGTERM +{not_ready:?}: /readyz 503; +{refused:?}: connections refused; \
             +{slow_done:?}: slow request 200; +{stream_done:?}: stream complete; \
             +{exited:?}: exit {status}"
        );
        assert_eq!(status.code(), Some(0), "{}", gw.output());
        assert!(
            exited < Duration::from_secs(5),
            "exited after {exited:?} (grace 5 s)"
        );
        let output = gw.output();
        assert!(output.contains("shutting down"), "{output}");
        assert!(!output.contains("panicked"), "{output}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_longer_than_the_grace_is_cut_and_the_process_still_exits_zero() {
    bounded(async {
        // A stream that would never end on its own.
        let sse = Backend::spawn(
            "endless",
            handler(|_, _| async {
                let (tx, resp) = event_stream();
                tokio::spawn(async move {
                    loop {
                        if tx.send(Bytes::from_static(b"data: x\n\n")).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                });
                resp
            }),
        )
        .await;
        let mut docs = api_key("default", "drain", "drain-1", KEY, &[], json!({}));
        docs.push(route(
            "events",
            json!({"match": {"pathPrefix": "/events"}, "protocol": "sse",
                   "backends": [{"url": sse.url()}]}),
        ));
        let mut gw = GatewayProcess::start(&yaml(docs), &["--shutdown-grace", "1s"], &[]).await;
        let mut stream = client()
            .get(format!("http://{}/events", gw.listen))
            .header("x-api-key", KEY)
            .send()
            .await
            .expect("the stream opens");
        let mut buf = Vec::new();
        read_until(&mut stream, &mut buf, b"data: x\n\n").await;
        let term = Instant::now();
        gw.sigterm();
        let status = tokio::time::timeout(Duration::from_secs(4), gw.child.wait())
            .await
            .expect("the gateway exits once the grace period is over")
            .expect("wait for the gateway");
        let exited = term.elapsed();
        assert_eq!(status.code(), Some(0), "{}", gw.output());
        assert!(
            exited >= Duration::from_millis(900) && exited < Duration::from_secs(3),
            "exited {exited:?} after SIGTERM (grace 1 s)"
        );
        // The client's stream ends (it is cut, not left hanging).
        let end = tokio::time::timeout(Duration::from_secs(2), async {
            loop {
                match stream.chunk().await {
                    Ok(Some(_)) => {}
                    other => return other.map(|_| ()),
                }
            }
        })
        .await
        .expect("the client's stream ends when the process exits");
        assert!(end.is_err(), "a cut stream ends with an error");
    })
    .await;
}

/// One pool of the drain test: its protocol, how many workers share it, and each worker's
/// pause between requests.
struct Lane {
    name: &'static str,
    proto: Proto,
    workers: usize,
    pause: Duration,
}

/// Issue 18: a rolling upgrade resent 5 requests because the drain closed a kept-alive
/// connection under the client. Here a pooling client keeps sending through old gateway A
/// (HTTP/1.1 at several paces, around the drain's 1 s idle close too, and HTTP/2) when A gets
/// SIGTERM; new connections go to B from then on, as a load balancer's endpoints would. Every
/// request is answered, none is resent, the HTTP/1.1 connections to A are told
/// `Connection: close`, HTTP/2 moves on after GOAWAY, and A exits long before its grace period.
/// (HTTP/2 streams that hyper's client opens after the first GOAWAY and that the final one
/// refuses are counted apart: the client knows they were not processed.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_closes_no_kept_alive_connection_under_a_request() {
    bounded_for(Duration::from_secs(40), async {
        let echo = Backend::spawn(
            "echo",
            handler(|_, _| async { respond(StatusCode::OK, "ok") }),
        )
        .await;
        let mut docs = api_key(
            "default",
            "drain",
            "drain-1",
            KEY,
            &[],
            json!({"rateLimit": {"requestsPerMinute": 1000000, "burst": 100000}}),
        );
        docs.push(route(
            "ka",
            json!({"match": {"pathPrefix": "/ka"}, "backends": [{"url": echo.url()}]}),
        ));
        let config = yaml(docs);
        let mut old = GatewayProcess::start(&config, &["--shutdown-grace", "10s"], &[]).await;
        let new = GatewayProcess::start(&config, &["--shutdown-grace", "10s"], &[]).await;

        let lanes = [
            Lane {
                name: "h1 busy",
                proto: Proto::Http1,
                workers: 4,
                pause: Duration::from_millis(10),
            },
            Lane {
                name: "h1 300ms",
                proto: Proto::Http1,
                workers: 1,
                pause: Duration::from_millis(300),
            },
            Lane {
                name: "h1 800ms",
                proto: Proto::Http1,
                workers: 1,
                pause: Duration::from_millis(800),
            },
            Lane {
                name: "h1 950ms",
                proto: Proto::Http1,
                workers: 1,
                pause: Duration::from_millis(950),
            },
            Lane {
                name: "h1 1100ms",
                proto: Proto::Http1,
                workers: 1,
                pause: Duration::from_millis(1100),
            },
            Lane {
                name: "h1 1600ms",
                proto: Proto::Http1,
                workers: 1,
                pause: Duration::from_millis(1600),
            },
            Lane {
                name: "h2 busy",
                proto: Proto::Http2,
                workers: 4,
                pause: Duration::from_millis(10),
            },
        ];
        let stop = Arc::new(AtomicBool::new(false));
        let mut pools = Vec::new();
        let mut tasks = Vec::new();
        for lane in &lanes {
            let pool = KeepAlive::new(old.listen, lane.proto);
            // Idle connections besides the busy ones: five opened at once, most then left in
            // the pool untouched (the drain closes those; no request meets them closed).
            let warm: Vec<_> = (0..5)
                .map(|_| {
                    let pool = pool.clone();
                    tokio::spawn(async move { pool.get("/ka/warm", &[("x-api-key", KEY)]).await })
                })
                .collect();
            for w in warm {
                let r = w.await.expect("warm-up task").expect("warm-up request");
                assert_eq!(r.status, 200, "{}: warm-up", lane.name);
            }
            for _ in 0..lane.workers {
                let (pool, stop, pause) = (pool.clone(), stop.clone(), lane.pause);
                tasks.push(tokio::spawn(async move {
                    let mut errors = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        match pool.get("/ka/x", &[("x-api-key", KEY)]).await {
                            Ok(r) if r.status == 200 => {}
                            Ok(r) => errors.push(format!("status {}", r.status)),
                            Err(e) => errors.push(e),
                        }
                        tokio::time::sleep(pause).await;
                    }
                    errors
                }));
            }
            pools.push((lane.name, pool));
        }

        // Traffic through A for a while, then A leaves the endpoints and gets SIGTERM.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let before: Vec<Stats> = pools.iter().map(|(_, p)| p.stats()).collect();
        for (_, p) in &pools {
            p.retarget(new.listen);
        }
        let term = Instant::now();
        old.sigterm();
        let status = tokio::time::timeout(Duration::from_secs(8), old.child.wait()).await;
        let exited = term.elapsed();
        // Traffic goes on through B for a moment, then stops.
        tokio::time::sleep(Duration::from_millis(1000)).await;
        stop.store(true, Ordering::Relaxed);
        let mut errors = Vec::new();
        for t in tasks {
            errors.extend(t.await.expect("worker task"));
        }

        let mut total = Stats::default();
        let mut problems = Vec::new();
        for ((name, p), before) in pools.iter().zip(&before) {
            let s = p.stats();
            println!(
                "{name}: {} requests ({} after SIGTERM), {} answered, {} resent, \
                 {} refused by GOAWAY, {} failed, {} connect errors, {} connections, \
                 {} told close, {} found closed idle",
                s.requests,
                s.requests - before.requests,
                s.answered,
                s.resends,
                s.refused,
                s.failed,
                s.connect_errors,
                s.connections,
                s.told_close,
                s.closed_idle
            );
            if s.resends > 0 {
                println!("{name}: resent because {:?}", p.resend_causes());
            }
            total.requests += s.requests;
            total.answered += s.answered;
            total.resends += s.resends;
            total.refused += s.refused;
            total.failed += s.failed;
            total.connect_errors += s.connect_errors;
            total.told_close += s.told_close;
            if name.starts_with("h1") && s.told_close == 0 {
                problems.push(format!(
                    "{name}: the connection to the draining gateway was not told Connection: close"
                ));
            }
            if name.starts_with("h2") && s.connections < 2 {
                problems.push(format!(
                    "{name}: after GOAWAY the client opened no connection to the new gateway"
                ));
            }
            if s.requests == before.requests {
                problems.push(format!("{name}: no request after SIGTERM"));
            }
        }
        println!(
            "drain: old gateway done {exited:?} after SIGTERM; {} requests, {} resends, \
             {} HTTP/2 streams refused by GOAWAY (retried), {} failed, {} told close",
            total.requests, total.resends, total.refused, total.failed, total.told_close
        );
        let status = status
            .unwrap_or_else(|_| {
                panic!(
                    "the old gateway exits well within its 10 s grace:\n{}",
                    old.output()
                )
            })
            .expect("wait for the old gateway");
        for l in old
            .output()
            .lines()
            .filter(|l| !l.contains("tollgate::access"))
        {
            eprintln!("DBG {l}");
        }
        assert!(errors.is_empty(), "requests failed: {errors:?}");
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(total.failed, 0, "no request failed");
        assert_eq!(total.connect_errors, 0, "no connection was refused");
        assert_eq!(
            total.resends, 0,
            "no request was sent into a kept-alive connection closed under it"
        );
        assert_eq!(total.answered, total.requests);
        assert_eq!(status.code(), Some(0), "{}", old.output());
        assert!(
            exited < Duration::from_secs(4),
            "the drain ended once the connections were closed, not at the grace: {exited:?}"
        );
    })
    .await;
}
