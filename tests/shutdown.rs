//! R7 with the real binary: SIGTERM while a slow request and an SSE stream are in flight. The
//! gateway turns `/readyz` 503 (the admin port keeps answering), refuses new connections on the
//! proxy port, lets the request and the stream finish, and exits 0 within `--shutdown-grace`.

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::StatusCode;
use serde_json::json;
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
