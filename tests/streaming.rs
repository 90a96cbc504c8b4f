//! Streams through the standalone gateway: SSE events pass one by one as the backend sends them
//! (never buffered), the idle timeout ends a silent stream, and WebSocket upgrades are
//! authenticated (header or `api_key` query parameter) and then relayed both ways.

mod support;

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http::StatusCode;
use serde_json::json;
use support::*;
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const KEY: &str = "tg-stream-key-4e2b";

#[tokio::test]
async fn sse_events_are_forwarded_as_they_arrive() {
    bounded(async {
        let gate = Arc::new(Notify::new());
        let b = Backend::spawn("sse", gated_sse(gate.clone())).await;
        let mut docs = api_key("default", "streamer", "streamer-1", KEY, &[], json!({}));
        docs.push(route(
            "events",
            json!({"match": {"pathPrefix": "/events"}, "protocol": "sse",
                   "timeouts": {"firstByte": "5s", "idle": "10s"},
                   "backends": [{"url": b.url()}]}),
        ));
        let gw = gateway(yaml(docs)).await;

        let mut resp = gw
            .http
            .get(gw.url("/events"))
            .header("x-api-key", KEY)
            .header("accept", "text/event-stream")
            .send()
            .await
            .expect("gateway answers");
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(
            resp.headers().get("content-type").map(|v| v.as_bytes()),
            Some(&b"text/event-stream"[..])
        );
        assert!(resp.headers().contains_key("x-request-id"));
        assert_eq!(
            resp.headers()
                .get("x-accel-buffering")
                .map(|v| v.as_bytes()),
            Some(&b"no"[..]),
            "intermediaries are told not to buffer"
        );

        // Event 1 arrives while the backend still holds event 2.
        let mut buf = Vec::new();
        read_until(&mut resp, &mut buf, b"data: one\n\n").await;
        assert!(!contains(&buf, b"two"), "event 2 cannot have been sent yet");

        gate.notify_one();
        read_until(&mut resp, &mut buf, b"data: two\n\n").await;
        assert_eq!(buf, b"data: one\n\ndata: two\n\n");
        let end = resp.chunk().await.expect("the stream ends cleanly");
        assert_eq!(end, None, "nothing after the last event");
        assert_eq!(
            b.last().header("x-client-id").as_deref(),
            Some("streamer-1")
        );
    })
    .await;
}

#[tokio::test]
async fn a_silent_stream_is_ended_by_the_idle_timeout() {
    bounded(async {
        // Sends one event, then keeps the stream open and silent until the test ends.
        let never = Arc::new(Notify::new());
        let b = Backend::spawn("silent", gated_sse(never.clone())).await;
        let gw = gateway(yaml([route(
            "events",
            json!({"match": {"pathPrefix": "/events"}, "protocol": "sse", "auth": {"required": false},
                   "timeouts": {"idle": "200ms"}, "backends": [{"url": b.url()}]}),
        )]))
        .await;

        let mut resp = gw.get("/events").await;
        assert_eq!(resp.status(), StatusCode::OK);
        let mut buf = Vec::new();
        read_until(&mut resp, &mut buf, b"data: one\n\n").await;
        let silent_since = std::time::Instant::now();
        // The next read ends (error or end of stream) once the stream has been idle 200 ms.
        let next = tokio::time::timeout(Duration::from_secs(2), resp.chunk())
            .await
            .expect("the idle timeout ends the stream well before 2 s");
        let waited = silent_since.elapsed();
        match next {
            Err(_) | Ok(None) => {}
            Ok(Some(c)) => panic!("unexpected data after the silence: {c:?}"),
        }
        assert!(waited < Duration::from_millis(1500), "{waited:?}");
        drop(never);
    })
    .await;
}

/// A WebSocket route in front of an echo server, with one key.
async fn ws_setup() -> (WsBackend, Gateway) {
    let b = WsBackend::echo().await;
    let mut docs = api_key("default", "ws-user", "ws-user-1", KEY, &["user"], json!({}));
    docs.push(route(
        "ws",
        json!({"match": {"pathPrefix": "/ws", "methods": ["GET"]}, "protocol": "websocket",
               "timeouts": {"idle": "30s"}, "rewrite": {"pathPrefix": "/echo"},
               "backends": [{"url": b.url()}]}),
    ));
    let gw = gateway(yaml(docs)).await;
    (b, gw)
}

async fn echo_round_trip<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    for text in ["hello", "second frame"] {
        ws.send(Message::text(text))
            .await
            .expect("send a text frame");
        let back = ws
            .next()
            .await
            .expect("an echo frame")
            .expect("a valid frame");
        assert_eq!(back, Message::text(text));
    }
    ws.send(Message::binary(vec![0u8, 1, 2, 255]))
        .await
        .expect("send a binary frame");
    let back = ws.next().await.expect("an echo frame").expect("valid");
    assert_eq!(back, Message::binary(vec![0u8, 1, 2, 255]));
    ws.close(None).await.expect("close");
}

#[tokio::test]
async fn websocket_echo_with_a_key_header() {
    bounded(async {
        let (b, gw) = ws_setup().await;
        let mut req = format!("ws://{}/ws/room?x=1", gw.running.listen)
            .into_client_request()
            .expect("a client request");
        req.headers_mut()
            .insert("x-api-key", KEY.parse().expect("header value"));
        let (mut ws, resp) = tokio_tungstenite::connect_async(req)
            .await
            .expect("the upgrade succeeds through the gateway");
        assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
        echo_round_trip(&mut ws).await;

        let hs = b.handshakes();
        assert_eq!(hs.len(), 1);
        let (uri, headers) = &hs[0];
        assert_eq!(
            uri.path_and_query().map(|p| p.as_str()),
            Some("/echo/room?x=1")
        );
        assert_eq!(
            headers.get("x-client-id").map(|v| v.as_bytes()),
            Some(&b"ws-user-1"[..])
        );
        assert!(
            headers.get("x-api-key").is_none(),
            "the key never reaches a backend"
        );
    })
    .await;
}

#[tokio::test]
async fn websocket_key_in_the_query_is_accepted_and_stripped() {
    bounded(async {
        let (b, gw) = ws_setup().await;
        let url = format!(
            "ws://{}/ws/room?room=7&api_key={KEY}&lang=en",
            gw.running.listen
        );
        let (mut ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("the upgrade succeeds with ?api_key=");
        echo_round_trip(&mut ws).await;

        let hs = b.handshakes();
        assert_eq!(hs.len(), 1);
        let (uri, headers) = &hs[0];
        let pq = uri.path_and_query().map(|p| p.as_str()).unwrap_or("");
        assert_eq!(pq, "/echo/room?room=7&lang=en");
        assert!(!pq.contains(KEY), "the backend never sees the key: {pq}");
        assert_eq!(
            headers.get("x-client-id").map(|v| v.as_bytes()),
            Some(&b"ws-user-1"[..])
        );
    })
    .await;
}

#[tokio::test]
async fn websocket_without_a_key_is_refused_before_the_upgrade() {
    bounded(async {
        let (b, gw) = ws_setup().await;
        for url in [
            format!("ws://{}/ws/room", gw.running.listen),
            format!("ws://{}/ws/room?api_key=tg-wrong", gw.running.listen),
        ] {
            let err = tokio_tungstenite::connect_async(url.as_str())
                .await
                .expect_err("no upgrade without a valid key");
            match err {
                tokio_tungstenite::tungstenite::Error::Http(resp) => {
                    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{url}");
                    let body: serde_json::Value =
                        serde_json::from_slice(resp.body().as_deref().expect("an error body"))
                            .expect("a JSON error");
                    let code = body["error"]["code"].as_str().unwrap_or("");
                    assert!(code == "missing_key" || code == "invalid_key", "{body}");
                }
                other => panic!("expected an HTTP 401, got {other:?}"),
            }
        }
        assert!(b.handshakes().is_empty(), "nothing reached the backend");

        // A plain GET on a websocket route is not an upgrade.
        let r = gw
            .http
            .get(gw.url("/ws/room"))
            .header("x-api-key", KEY)
            .send()
            .await
            .expect("gateway answers");
        assert_eq!(r.status(), StatusCode::UPGRADE_REQUIRED);
        assert_eq!(error_code(r).await, "upgrade_required");
    })
    .await;
}
