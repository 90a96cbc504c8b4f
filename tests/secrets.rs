//! R6 with the real binary: a representative flow carrying distinctive plain keys (header and
//! Bearer, HTTP/1.1 and HTTP/2, an SSE stream, a WebSocket handshake with `?api_key=`, a 403, a
//! 429, failed authentication with another distinctive key, keys checked by the external auth
//! service, a reload), with `RUST_LOG=debug` and JSON logs. Neither plain key (nor its base64)
//! appears in the logs, `/metrics`, `/debug/routes` or `/debug/problems`, and none reaches a
//! backend.

mod support;

use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::StatusCode;
use serde_json::json;
use support::process::GatewayProcess;
use support::*;
use tokio_tungstenite::tungstenite::Message;

/// The key that works.
const CANARY: &str = "tollgate-secret-canary-7f3a9c";
/// A key nobody issued: every use of it fails authentication.
const WRONG: &str = "tollgate-wrong-canary-d41e07";
/// A key only the external auth service knows.
const EXTERNAL: &str = "tollgate-extauth-canary-0b6c5d";

fn forbidden_strings() -> Vec<(String, String)> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut out = Vec::new();
    for key in [CANARY, WRONG, EXTERNAL] {
        out.push((format!("plain {key}"), key.to_string()));
        out.push((format!("base64 of {key}"), b64.encode(key)));
    }
    out
}

fn assert_clean(what: &str, text: &str) {
    for (name, needle) in forbidden_strings() {
        assert!(
            !text.contains(&needle),
            "{name} found in {what}:\n{}",
            text.lines()
                .filter(|l| l.contains(&needle))
                .take(5)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_keys_never_reach_logs_metrics_debug_output_or_backends() {
    bounded(async {
        let echo = Backend::echo("echo").await;
        let sse = Backend::spawn(
            "sse",
            handler(|_, _| async {
                let (tx, resp) = event_stream();
                tokio::spawn(async move {
                    let _ = tx.send(Bytes::from_static(b"data: one\n\n")).await;
                    let _ = tx
                        .send(Bytes::from_static(
                            b"data: {\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4}}\n\n",
                        ))
                        .await;
                });
                resp
            }),
        )
        .await;
        let ws = WsBackend::echo().await;
        // The external auth service: knows EXTERNAL, refuses everything else.
        let auth = Backend::spawn(
            "ext-auth",
            handler(|seen, _| async move {
                if seen.json()["api_key"] == EXTERNAL {
                    respond(
                        StatusCode::OK,
                        json!({"client_id": "external-client", "roles": ["user"]}).to_string(),
                    )
                } else {
                    respond(StatusCode::UNAUTHORIZED, "{}")
                }
            }),
        )
        .await;

        // The key as a base64 Secret (`data`), the way kubectl writes it.
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut docs = vec![
            json!({"apiVersion": "v1", "kind": "Secret",
                   "metadata": {"name": "canary-key", "namespace": "agents"},
                   "type": "Opaque", "data": {"api-key": b64.encode(CANARY)}}),
            api_key_spec(
                "agents",
                "canary",
                json!({"clientId": "canary-client",
                       "secretRef": {"name": "canary-key", "key": "api-key"},
                       "roles": ["user"],
                       "rateLimit": {"requestsPerMinute": 60, "burst": 12}}),
            ),
        ];
        let routes = [
            (
                "chat",
                json!({"match": {"pathPrefix": "/api/v1/chat"}, "auth": {"roles": ["user"]},
                            "backends": [{"url": echo.url()}]}),
            ),
            (
                "tools",
                json!({"match": {"pathPrefix": "/api/v1/tools"}, "auth": {"roles": ["admin"]},
                             "backends": [{"url": echo.url()}]}),
            ),
            (
                "events",
                json!({"match": {"pathPrefix": "/api/v1/events"}, "protocol": "sse",
                              "rateLimit": {"tokensPerMinute": 100000},
                              "backends": [{"url": sse.url()}]}),
            ),
            (
                "ws",
                json!({"match": {"pathPrefix": "/ws"}, "protocol": "websocket",
                          "backends": [{"url": ws.url()}]}),
            ),
            (
                "open",
                json!({"match": {"pathPrefix": "/open"}, "auth": {"required": false},
                            "backends": [{"url": echo.url()}]}),
            ),
        ];
        for (name, spec) in routes {
            docs.push(route_in("agents", name, spec));
        }
        let auth_url = format!("{}/check", auth.url());
        let mut gw = GatewayProcess::start(
            &yaml(docs.clone()),
            // A grace below the 10 s this test waits for the exit: a connection the clients
            // below still hold open must not turn into a failure of a test about secrets
            // (drain behaviour is tests/shutdown.rs's).
            &[
                "--metrics-per-client",
                "--ext-auth-url",
                &auth_url,
                "--shutdown-grace",
                "5s",
            ],
            &[("RUST_LOG", "debug")],
        )
        .await;
        let base = format!("http://{}", gw.listen);
        let h1 = client();
        let h2 = reqwest::Client::builder()
            .no_proxy()
            .http2_prior_knowledge()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("an h2c client");

        let get = |c: &reqwest::Client, path: &str, header: &str, value: String| {
            c.get(format!("{base}{path}")).header(header, value).send()
        };
        // Successes: header and Bearer, HTTP/1.1 and HTTP/2.
        for c in [&h1, &h2] {
            let r = get(c, "/api/v1/chat", "x-api-key", CANARY.into())
                .await
                .expect("answer");
            assert_eq!(r.status(), StatusCode::OK);
            let r = get(
                c,
                "/api/v1/chat/x?y=1",
                "authorization",
                format!("Bearer {CANARY}"),
            )
            .await
            .expect("answer");
            assert_eq!(r.status(), StatusCode::OK);
        }
        // A key on a route that does not need one is still stripped.
        let r = get(&h1, "/open", "x-api-key", CANARY.into())
            .await
            .expect("answer");
        assert_eq!(r.status(), StatusCode::OK);
        // 403: the right key, the wrong role.
        let r = get(&h1, "/api/v1/tools", "x-api-key", CANARY.into())
            .await
            .expect("answer");
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        // Failed authentication with the other key, every carrier, both protocols.
        for c in [&h1, &h2] {
            let r = get(c, "/api/v1/chat", "x-api-key", WRONG.into())
                .await
                .expect("answer");
            assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
            let r = get(
                c,
                "/api/v1/chat",
                "authorization",
                format!("Bearer {WRONG}"),
            )
            .await
            .expect("answer");
            assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        }
        // A key only the external auth service knows.
        let r = get(&h1, "/api/v1/chat", "x-api-key", EXTERNAL.into())
            .await
            .expect("answer");
        assert_eq!(r.status(), StatusCode::OK);
        // An SSE stream with token usage.
        let mut s = get(&h1, "/api/v1/events", "x-api-key", CANARY.into())
            .await
            .expect("answer");
        let mut buf = Vec::new();
        read_until(&mut s, &mut buf, b"usage").await;
        drop(s);
        // WebSocket: the key in the query, then the wrong one.
        let (mut sock, _) = tokio_tungstenite::connect_async(format!(
            "ws://{}/ws/room?api_key={CANARY}&x=1",
            gw.listen
        ))
        .await
        .expect("the upgrade succeeds");
        sock.send(Message::text("hi")).await.expect("send");
        let echoed = sock.next().await.expect("an echo").expect("a frame");
        assert_eq!(echoed, Message::text("hi"));
        drop(sock);
        let refused =
            tokio_tungstenite::connect_async(format!("ws://{}/ws/room?api_key={WRONG}", gw.listen))
                .await;
        assert!(
            refused.is_err(),
            "the wrong key is refused on the handshake"
        );
        // 429: burst 12, so a few more requests run into the limit.
        let mut limited = false;
        for _ in 0..15 {
            let r = get(&h1, "/api/v1/chat", "x-api-key", CANARY.into())
                .await
                .expect("answer");
            limited |= r.status() == StatusCode::TOO_MANY_REQUESTS;
        }
        assert!(limited, "the key ran into its limit");
        // A reload (the configuration logs itself at debug level).
        docs.push(route_in(
            "agents",
            "late",
            json!({"match": {"pathPrefix": "/late"}, "backends": [{"url": echo.url()}]}),
        ));
        std::fs::write(gw.dir.path().join("config.yaml"), yaml(docs)).expect("rewrite config");
        eventually(
            Duration::from_secs(5),
            "the reload serves /late",
            || async {
                let r = get(&h1, "/late", "x-api-key", EXTERNAL.into()).await.ok()?;
                (r.status() != StatusCode::NOT_FOUND).then_some(())
            },
        )
        .await;

        // Now look everywhere.
        let admin = |path: &'static str| {
            let url = format!("http://{}{path}", gw.admin);
            let h1 = h1.clone();
            async move {
                let r = h1.get(url).send().await.expect("the admin port answers");
                assert_eq!(r.status(), StatusCode::OK, "{path}");
                r.text().await.expect("text")
            }
        };
        let metrics = gw.metrics().await;
        assert!(
            metrics.contains("canary-client"),
            "per-client metrics are on"
        );
        assert_clean("/metrics", &metrics);
        let routes = admin("/debug/routes").await;
        assert!(routes.contains("canary-client") && routes.contains("fingerprint"));
        assert_clean("/debug/routes", &routes);
        if let Ok(r) = h1
            .get(format!("http://{}/debug/problems", gw.admin))
            .send()
            .await
        {
            assert_clean("/debug/problems", &r.text().await.unwrap_or_default());
        }

        gw.sigterm();
        let status = match tokio::time::timeout(Duration::from_secs(10), gw.child.wait()).await {
            Ok(status) => status.expect("wait"),
            Err(_) => {
                // Seen once in a fresh-clone CI run, never locally: keep what the gateway was
                // doing (the keys are checked for below only when it exits, so redact here).
                let logs = gw.output();
                let tail: Vec<&str> = logs.lines().rev().take(40).collect();
                let mut tail = tail.into_iter().rev().collect::<Vec<_>>().join("\n");
                for (_, s) in forbidden_strings() {
                    tail = tail.replace(&s, "<key>");
                }
                panic!("the gateway did not exit within 10 s of SIGTERM; its last lines:\n{tail}");
            }
        };
        assert_eq!(status.code(), Some(0));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let logs = gw.output();
        let lines = logs.lines().count();
        assert!(
            lines > 50 && logs.contains("\"level\":\"DEBUG\""),
            "debug logs were captured ({lines} lines)"
        );
        assert!(
            logs.contains("tollgate::access"),
            "access lines were logged"
        );
        assert_clean("the logs", &logs);

        // Backends never saw a key either (the auth service is the one that must).
        for b in [&echo, &sse] {
            for seen in b.requests() {
                let text = format!("{} {:?}", seen.uri, seen.headers);
                assert_clean(&format!("a request to {}", b.name), &text);
            }
        }
        for (uri, headers) in ws.handshakes() {
            assert_clean("the WebSocket handshake", &format!("{uri} {headers:?}"));
        }
        println!(
            "searched {lines} log lines, {} bytes of /metrics, {} bytes of /debug/routes",
            metrics.len(),
            routes.len()
        );
    })
    .await;
}
