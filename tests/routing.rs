//! The standalone gateway end to end over plain HTTP/1.1: matching (prefix, host, headers, body
//! field), refusals (404, 405, 413, 401, 403), what reaches the backend, CORS, retries,
//! first-byte timeouts and the admin port. Real backends, real client, real sockets.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use serde_json::json;
use support::metrics::metric;
use support::*;

// ---------------------------------------------------------------------------------------------
// Matching
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn longest_prefix_wins_and_matching_is_segment_aware() {
    bounded(async {
        let s = Scenario::new()
            .backend("chat")
            .backend("stream")
            .open_route_to(
                "chat",
                "chat",
                json!({"match": {"pathPrefix": "/api/v1/chat"}}),
            )
            .open_route_to(
                "stream",
                "chat-stream",
                json!({"match": {"pathPrefix": "/api/v1/chat/stream"}}),
            )
            .start()
            .await;
        let (gw, chat, stream) = (&s.gw, s.backend("chat"), s.backend("stream"));

        for (path, want) in [
            ("/api/v1/chat", "chat"),
            ("/api/v1/chat/", "chat"),
            ("/api/v1/chat/other", "chat"),
            ("/api/v1/chat/stream", "stream"),
            ("/api/v1/chat/stream/x/y", "stream"),
            ("/api/v1/chat/streaming", "chat"),
        ] {
            let r = gw.get(path).await;
            assert_eq!(r.status(), StatusCode::OK, "{path}");
            assert_eq!(r.text().await.expect("body"), want, "{path}");
        }
        for path in ["/api/v1/chatty", "/api/v1", "/api/v1/cha"] {
            let r = gw.get(path).await;
            assert_eq!(r.status(), StatusCode::NOT_FOUND, "{path}");
            assert_eq!(error_code(r).await, "no_route", "{path}");
        }
        assert_eq!(chat.count(), 4);
        assert_eq!(stream.count(), 2);
        // The backend sees the path as sent (no rewrite on these routes).
        assert_eq!(stream.last().path_and_query(), "/api/v1/chat/stream/x/y");
    })
    .await;
}

#[tokio::test]
async fn host_matching_prefers_exact_then_wildcard_then_any() {
    bounded(async {
        let s = Scenario::new()
            .backend("exact")
            .backend("wild")
            .backend("any")
            // Listed least specific first: the table, not the file order, decides.
            .open_route_to("any", "any", json!({"match": {"pathPrefix": "/h"}}))
            .open_route_to(
                "wild",
                "wild",
                json!({"hosts": ["*.example.com"], "match": {"pathPrefix": "/h"}}),
            )
            .open_route_to(
                "exact",
                "exact",
                json!({"hosts": ["api.example.com"], "match": {"pathPrefix": "/h"}}),
            )
            .start()
            .await;
        let (gw, exact) = (&s.gw, s.backend("exact"));

        for (host, want) in [
            ("api.example.com", "exact"),
            ("API.Example.com:8080", "exact"),
            ("x.example.com", "wild"),
            ("a.b.example.com", "wild"),
            ("example.com", "any"), // a wildcard never matches its apex
            ("other.org", "any"),
        ] {
            let r = gw
                .http
                .get(gw.url("/h/x"))
                .header("host", host)
                .send()
                .await
                .expect("gateway answers");
            assert_eq!(r.status(), StatusCode::OK, "{host}");
            assert_eq!(r.text().await.expect("body"), want, "{host}");
        }
        // X-Forwarded-Host carries the host as the client sent it, port included.
        assert_eq!(
            exact.last().header("x-forwarded-host").as_deref(),
            Some("API.Example.com:8080")
        );
    })
    .await;
}

#[tokio::test]
async fn header_conditions_select_a_route() {
    bounded(async {
        let s = Scenario::new()
            .backend("planner")
            .backend("general")
            .open_route_to(
                "general",
                "general",
                json!({"match": {"pathPrefix": "/agents"}}),
            )
            .open_route_to(
                "planner",
                "planner",
                json!({"match": {"pathPrefix": "/agents",
                                 "headers": [{"name": "x-agent", "value": "planner"}]}}),
            )
            .start()
            .await;
        let (gw, planner, general) = (&s.gw, s.backend("planner"), s.backend("general"));

        let send = |value: Option<&'static str>| {
            let mut rb = gw.http.get(gw.url("/agents/run"));
            if let Some(v) = value {
                rb = rb.header("x-agent", v);
            }
            async move {
                let r = rb.send().await.expect("gateway answers");
                assert_eq!(r.status(), StatusCode::OK);
                r.text().await.expect("body")
            }
        };
        assert_eq!(send(Some("planner")).await, "planner");
        assert_eq!(
            send(Some("Planner")).await,
            "general",
            "values match exactly"
        );
        assert_eq!(send(Some("coder")).await, "general");
        assert_eq!(send(None).await, "general");
        assert_eq!(planner.count(), 1);
        assert_eq!(general.count(), 3);
    })
    .await;
}

#[tokio::test]
async fn body_field_routes_by_model_and_forwards_the_whole_body() {
    bounded(async {
        let s = Scenario::new()
            .backend("openai")
            .backend("local")
            .open_route_to(
                "openai",
                "gpt",
                json!({"match": {"pathPrefix": "/v1/chat",
                                 "bodyField": {"name": "model", "values": ["gpt-4o", "gpt-4o-mini"]}}}),
            )
            .open_route_to(
                "local",
                "llama",
                json!({"match": {"pathPrefix": "/v1/chat",
                                 "bodyField": {"name": "model", "values": ["llama-3"]}}}),
            )
            .start()
            .await;
        let (gw, openai, local) = (&s.gw, s.backend("openai"), s.backend("local"));

        let post = |body: serde_json::Value| {
            let rb = gw.http.post(gw.url("/v1/chat/completions")).json(&body);
            async move { rb.send().await.expect("gateway answers") }
        };
        let gpt = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 7});
        let r = post(gpt.clone()).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.text().await.expect("body"), "openai");
        let seen = openai.last();
        assert_eq!(seen.json(), gpt, "the backend receives the whole body");
        assert_eq!(
            seen.header("content-length"),
            Some(seen.body.len().to_string())
        );

        let llama = json!({"messages": [], "model": "llama-3"});
        let r = post(llama.clone()).await;
        assert_eq!(r.text().await.expect("body"), "local");
        assert_eq!(local.last().json(), llama);

        let r = post(json!({"model": "claude"})).await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        assert_eq!(error_code(r).await, "no_route");
        let r = post(json!({"model": 4})).await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "a non-string field matches nothing");
        assert_eq!(openai.count(), 1);
        assert_eq!(local.count(), 1);
    })
    .await;
}

#[tokio::test]
async fn wrong_method_is_405_with_allow() {
    bounded(async {
        let s = Scenario::new()
            .backend("b")
            .open_route(
                "post-only",
                json!({"match": {"pathPrefix": "/submit", "methods": ["POST", "PUT"]}}),
            )
            .start()
            .await;
        let (gw, b) = (&s.gw, s.backend("b"));
        let r = gw.get("/submit/x").await;
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(
            r.headers().get("allow").map(|v| v.as_bytes()),
            Some(&b"POST, PUT"[..])
        );
        assert_eq!(error_code(r).await, "method_not_allowed");
        let r = gw
            .http
            .post(gw.url("/submit/x"))
            .send()
            .await
            .expect("gateway answers");
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(
            b.count(),
            1,
            "the refused request never reached the backend"
        );
    })
    .await;
}

#[tokio::test]
async fn oversized_bodies_are_refused_with_413() {
    bounded(async {
        let s = Scenario::new()
            .backend("b")
            .open_route("upload", json!({"match": {"pathPrefix": "/upload"}}))
            .open_route(
                "by-model",
                json!({"match": {"pathPrefix": "/model",
                                 "bodyField": {"name": "model", "values": ["m"]}}}),
            )
            .options(|o| o.proxy.max_body_bytes = 1024)
            .start()
            .await;
        let (gw, b) = (&s.gw, s.backend("b"));

        // At the limit: forwarded.
        let r = gw
            .http
            .post(gw.url("/upload"))
            .body(vec![b'a'; 1024])
            .send()
            .await
            .expect("gateway answers");
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(b.last().body.len(), 1024);

        // Content-Length over the limit: refused before a byte goes upstream.
        let r = gw
            .http
            .post(gw.url("/upload"))
            .body(vec![b'a'; 1025])
            .send()
            .await
            .expect("gateway answers");
        assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(error_code(r).await, "payload_too_large");
        assert_eq!(b.count(), 1);

        // Chunked (no Content-Length) and over the limit: also 413.
        let chunks: Vec<Result<Bytes, std::io::Error>> =
            (0..4).map(|_| Ok(Bytes::from(vec![b'c'; 512]))).collect();
        let r = gw
            .http
            .post(gw.url("/upload"))
            .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
                chunks,
            )))
            .send()
            .await
            .expect("gateway answers");
        assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(error_code(r).await, "payload_too_large");
        assert!(
            b.requests().iter().skip(1).all(|s| s.body_failed),
            "no backend ever got a complete oversized body"
        );

        // A bodyField route reads the body to match it: the same limit applies.
        let big = format!("{{\"model\": \"m\", \"pad\": \"{}\"}}", "p".repeat(2048));
        let chunks: Vec<Result<Bytes, std::io::Error>> = vec![Ok(Bytes::from(big))];
        let r = gw
            .http
            .post(gw.url("/model"))
            .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
                chunks,
            )))
            .send()
            .await
            .expect("gateway answers");
        assert_eq!(
            r.status(),
            StatusCode::PAYLOAD_TOO_LARGE,
            "bodyField route, chunked"
        );
        assert_eq!(error_code(r).await, "payload_too_large");
        assert!(b.requests().iter().skip(1).all(|s| s.body_failed));

        // A chunked body within the limit passes whole.
        let chunks: Vec<Result<Bytes, std::io::Error>> =
            (0..2).map(|_| Ok(Bytes::from(vec![b'c'; 512]))).collect();
        let r = gw
            .http
            .post(gw.url("/upload"))
            .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
                chunks,
            )))
            .send()
            .await
            .expect("gateway answers");
        assert_eq!(r.status(), StatusCode::OK);
        let whole = b
            .requests()
            .iter()
            .filter(|s| !s.body_failed && s.body.len() == 1024)
            .count();
        assert_eq!(
            whole, 2,
            "only the two bodies within the limit arrived whole"
        );
    })
    .await;
}

#[tokio::test]
async fn prefix_rewrite_keeps_the_rest_and_the_query() {
    bounded(async {
        let s = Scenario::new()
            .backend("b")
            .open_route(
                "chat",
                json!({"match": {"pathPrefix": "/api/v1/chat"}, "rewrite": {"pathPrefix": "/handle"}}),
            )
            .start()
            .await;
        let (gw, b) = (&s.gw, s.backend("b"));
        for (path, want) in [
            ("/api/v1/chat/x?q=1", "/handle/x?q=1"),
            ("/api/v1/chat", "/handle"),
            ("/api/v1/chat/a/b?x=1&y=2", "/handle/a/b?x=1&y=2"),
        ] {
            let r = gw.get(path).await;
            assert_eq!(r.status(), StatusCode::OK, "{path}");
            assert_eq!(b.last().path_and_query(), want, "{path}");
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// What the backend receives
// ---------------------------------------------------------------------------------------------

const CLIENT_KEY: &str = "tg-routing-key-31d7";

#[tokio::test]
async fn gateway_headers_reach_the_backend_and_credentials_do_not() {
    bounded(async {
        let s = Scenario::new()
            .backend("b")
            .key("agent", "agent-7", CLIENT_KEY, &["user"])
            .route("api", json!({"match": {"pathPrefix": "/api"}}))
            .start()
            .await;
        let (gw, b) = (&s.gw, s.backend("b"));

        let trace = "0af7651916cd43dd8448eb211c80319c";
        let r = gw
            .http
            .get(gw.url("/api/x"))
            .header("host", "api.example.com")
            .header("x-api-key", CLIENT_KEY)
            .header("x-client-id", "spoofed")
            .header("x-request-id", "req-abc-123")
            .header("x-forwarded-for", "203.0.113.9")
            .header("traceparent", format!("00-{trace}-b7ad6b7169203331-01"))
            .header("connection", "x-hop, keep-alive")
            .header("x-hop", "secret-hop")
            .header("keep-alive", "timeout=5")
            .header("x-end-to-end", "kept")
            .send()
            .await
            .expect("gateway answers");
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(
            r.headers().get("x-request-id").map(|v| v.as_bytes()),
            Some(&b"req-abc-123"[..]),
            "the client's request id is echoed"
        );
        let seen = b.last();
        assert_eq!(seen.header("x-client-id").as_deref(), Some("agent-7"));
        assert_eq!(seen.headers.get_all("x-client-id").iter().count(), 1);
        assert_eq!(seen.header("x-request-id").as_deref(), Some("req-abc-123"));
        assert_eq!(
            seen.header("x-forwarded-for").as_deref(),
            Some("127.0.0.1"),
            "an untrusted X-Forwarded-For is replaced by the peer address"
        );
        assert_eq!(seen.header("x-forwarded-proto").as_deref(), Some("http"));
        assert_eq!(
            seen.header("x-forwarded-host").as_deref(),
            Some("api.example.com")
        );
        let tp = seen.header("traceparent").expect("traceparent forwarded");
        assert_eq!(tp.len(), 55, "{tp}");
        assert_eq!(&tp[..36], format!("00-{trace}-"), "same trace id: {tp}");
        assert_ne!(
            &tp[36..52],
            "b7ad6b7169203331",
            "the gateway is a new span: {tp}"
        );
        assert_eq!(&tp[52..], "-01");
        assert_eq!(
            seen.header("x-api-key"),
            None,
            "the key never reaches a backend"
        );
        assert_eq!(
            seen.header("x-hop"),
            None,
            "Connection-listed headers are hop-by-hop"
        );
        assert_eq!(seen.header("keep-alive"), None);
        assert_eq!(seen.header("x-end-to-end").as_deref(), Some("kept"));

        // The key as a Bearer token: accepted, and Authorization is removed.
        let r = gw
            .http
            .get(gw.url("/api/y"))
            .bearer_auth(CLIENT_KEY)
            .send()
            .await
            .expect("gateway answers");
        assert_eq!(r.status(), StatusCode::OK);
        let generated = r
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .expect("a generated request id is echoed")
            .to_string();
        let seen = b.last();
        assert_eq!(seen.header("authorization"), None);
        assert_eq!(seen.header("x-client-id").as_deref(), Some("agent-7"));
        // No X-Request-Id or traceparent from the client: both are started.
        assert_eq!(generated.len(), 32, "{generated}");
        assert!(
            generated.bytes().all(|c| c.is_ascii_hexdigit()),
            "{generated}"
        );
        assert_eq!(seen.header("x-request-id"), Some(generated));
        let tp = seen.header("traceparent").expect("traceparent started");
        let parts: Vec<&str> = tp.split('-').collect();
        assert_eq!(parts.len(), 4, "{tp}");
        assert_eq!(parts[0], "00");
        assert_eq!(parts[1].len(), 32);
        assert_eq!(parts[2].len(), 16);
        assert_ne!(parts[1], "0".repeat(32));
        assert_eq!(b.count(), 2);
    })
    .await;
}

#[tokio::test]
async fn client_id_is_never_spoofed_on_open_routes() {
    bounded(async {
        let s = Scenario::new()
            .backend("b")
            .open_route("open", json!({"match": {"pathPrefix": "/open"}}))
            .start()
            .await;
        let (gw, b) = (&s.gw, s.backend("b"));
        let r = gw
            .http
            .get(gw.url("/open"))
            .header("x-client-id", "admin")
            .send()
            .await
            .expect("gateway answers");
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(b.last().header("x-client-id"), None);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Authentication and authorisation
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn auth_refusals_are_401_and_403_and_never_reach_the_backend() {
    bounded(async {
        let none = json!({});
        let s = Scenario::new()
            .backend("b")
            .key_in(
                "agents",
                "user",
                "user-1",
                "tg-user-key-1",
                &["user"],
                none.clone(),
            )
            .key_in(
                "agents",
                "admin",
                "admin-1",
                "tg-admin-key-1",
                &["admin"],
                none.clone(),
            )
            .key_in(
                "agents",
                "old",
                "old-1",
                "tg-expired-key-1",
                &["admin"],
                json!({"expiresAt": "2020-01-01T00:00:00Z"}),
            )
            .key_in(
                "agents",
                "off",
                "off-1",
                "tg-disabled-key-1",
                &["admin"],
                json!({"disabled": true}),
            )
            .key_in(
                "other",
                "foreign",
                "foreign-1",
                "tg-foreign-key-1",
                &["admin"],
                none,
            )
            .route_in(
                "agents",
                "tools",
                json!({"match": {"pathPrefix": "/tools"}, "auth": {"roles": ["admin"]}}),
            )
            .start()
            .await;
        let (gw, b) = (&s.gw, s.backend("b"));

        let call = |key: Option<&'static str>| {
            let mut rb = gw.http.post(gw.url("/tools/run")).body("{}");
            if let Some(k) = key {
                rb = rb.header("x-api-key", k);
            }
            async move { rb.send().await.expect("gateway answers") }
        };
        for (key, status, code) in [
            (None, StatusCode::UNAUTHORIZED, "missing_key"),
            (Some("tg-nobody"), StatusCode::UNAUTHORIZED, "invalid_key"),
            (
                Some("tg-expired-key-1"),
                StatusCode::UNAUTHORIZED,
                "expired_key",
            ),
            (
                Some("tg-disabled-key-1"),
                StatusCode::UNAUTHORIZED,
                "invalid_key",
            ),
            (Some("tg-user-key-1"), StatusCode::FORBIDDEN, "forbidden"),
            (
                Some("tg-foreign-key-1"),
                StatusCode::FORBIDDEN,
                "namespace_forbidden",
            ),
        ] {
            let r = call(key).await;
            assert_eq!(r.status(), status, "{key:?}");
            if status == StatusCode::UNAUTHORIZED {
                assert!(r.headers().contains_key("www-authenticate"), "{key:?}");
            }
            assert_eq!(error_code(r).await, code, "{key:?}");
        }
        assert_eq!(b.count(), 0, "no refused request reached the backend");

        let r = call(Some("tg-admin-key-1")).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(b.last().header("x-client-id").as_deref(), Some("admin-1"));
    })
    .await;
}

#[tokio::test]
async fn auth_admits_bearer_key_hash_other_namespaces_and_open_routes() {
    bounded(async {
        let user = &["user"];
        let s = Scenario::new()
            .backend("b")
            .key_in("agents", "user", "user-1", "tg-user-key-2", user, json!({}))
            .doc(api_key_spec(
                "agents",
                "hashed",
                json!({"clientId": "hashed-1", "keyHash": key_hash("tg-hashed-key-2"), "roles": ["user"]}),
            ))
            .key_in("partners", "partner", "partner-1", "tg-partner-key-2", user, json!({}))
            .key_in("elsewhere", "stranger", "stranger-1", "tg-stranger-key-2", user, json!({}))
            .route_in(
                "agents",
                "shared",
                json!({"match": {"pathPrefix": "/shared"}, "auth": {"allowNamespaces": ["partners"]}}),
            )
            .route_in(
                "agents",
                "public",
                json!({"match": {"pathPrefix": "/public"}, "auth": {"required": false}}),
            )
            .start()
            .await;
        let (gw, b) = (&s.gw, s.backend("b"));

        let ok = |path: &'static str, auth: Option<(&'static str, String)>| {
            let mut rb = gw.http.get(gw.url(path));
            if let Some((h, v)) = auth {
                rb = rb.header(h, v);
            }
            async move { rb.send().await.expect("gateway answers") }
        };
        let r = ok("/shared", Some(("authorization", "Bearer tg-user-key-2".into()))).await;
        assert_eq!(r.status(), StatusCode::OK, "Bearer key");
        assert_eq!(b.last().header("x-client-id").as_deref(), Some("user-1"));
        let r = ok("/shared", Some(("x-api-key", "tg-hashed-key-2".into()))).await;
        assert_eq!(r.status(), StatusCode::OK, "keyHash key");
        assert_eq!(b.last().header("x-client-id").as_deref(), Some("hashed-1"));
        let r = ok("/shared", Some(("x-api-key", "tg-partner-key-2".into()))).await;
        assert_eq!(r.status(), StatusCode::OK, "allowNamespaces admits partners");
        assert_eq!(b.last().header("x-client-id").as_deref(), Some("partner-1"));
        let r = ok("/shared", Some(("x-api-key", "tg-stranger-key-2".into()))).await;
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        assert_eq!(error_code(r).await, "namespace_forbidden");
        let r = ok("/public", None).await;
        assert_eq!(r.status(), StatusCode::OK, "auth.required: false needs no key");
        assert_eq!(b.last().header("x-client-id"), None);
        assert_eq!(b.count(), 4);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// CORS
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn cors_preflight_is_answered_by_the_gateway() {
    bounded(async {
        let s = Scenario::new()
            .backend("b")
            .key("web", "web-1", "tg-cors-key-1", &[])
            .route(
                "chat",
                json!({"match": {"pathPrefix": "/chat", "methods": ["POST"]},
                       "cors": {"allowOrigins": ["https://app.example.com"], "allowMethods": ["POST"],
                                "allowHeaders": ["content-type", "x-api-key"],
                                "exposeHeaders": ["x-request-id"], "maxAge": "10m"}}),
            )
            .start()
            .await;
        let (gw, b) = (&s.gw, s.backend("b"));

        let preflight = |origin: &'static str| {
            let rb = gw
                .http
                .request(reqwest::Method::OPTIONS, gw.url("/chat/send"))
                .header("origin", origin)
                .header("access-control-request-method", "POST")
                .header("access-control-request-headers", "content-type, x-api-key");
            async move { rb.send().await.expect("gateway answers") }
        };
        // No key: a preflight is answered before authentication.
        let r = preflight("https://app.example.com").await;
        assert_eq!(r.status(), StatusCode::NO_CONTENT);
        let h = r.headers();
        let get = |n: &str| h.get(n).map(|v| v.to_str().unwrap_or("<binary>").to_string());
        assert_eq!(get("access-control-allow-origin").as_deref(), Some("https://app.example.com"));
        assert_eq!(get("access-control-allow-methods").as_deref(), Some("POST"));
        assert_eq!(get("access-control-allow-headers").as_deref(), Some("content-type, x-api-key"));
        assert_eq!(get("access-control-max-age").as_deref(), Some("600"));
        assert_eq!(get("access-control-allow-credentials"), None);
        assert_eq!(get("vary").as_deref(), Some("Origin"));

        let r = preflight("https://evil.example.net").await;
        assert_eq!(r.status(), StatusCode::NO_CONTENT);
        assert!(!r.headers().contains_key("access-control-allow-origin"));
        assert!(!r.headers().contains_key("access-control-allow-methods"));

        assert_eq!(b.count(), 0, "preflights never reach the backend");

        // The actual request: forwarded, and the answer carries the CORS response headers.
        let actual = |origin: &'static str| {
            let rb = gw
                .http
                .post(gw.url("/chat/send"))
                .header("origin", origin)
                .header("x-api-key", "tg-cors-key-1")
                .body("{}");
            async move { rb.send().await.expect("gateway answers") }
        };
        let r = actual("https://app.example.com").await;
        assert_eq!(r.status(), StatusCode::OK);
        let h = r.headers();
        let get = |n: &str| h.get(n).map(|v| v.to_str().unwrap_or("<binary>").to_string());
        assert_eq!(get("access-control-allow-origin").as_deref(), Some("https://app.example.com"));
        assert_eq!(get("access-control-expose-headers").as_deref(), Some("x-request-id"));
        assert_eq!(get("vary").as_deref(), Some("Origin"));
        let r = actual("https://evil.example.net").await;
        assert_eq!(r.status(), StatusCode::OK, "CORS is the browser's check, not an auth rule");
        assert!(!r.headers().contains_key("access-control-allow-origin"));
        assert_eq!(b.count(), 2);
        assert_eq!(b.last().header("origin").as_deref(), Some("https://evil.example.net"));
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Retries and timeouts
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_503_is_retried_with_the_body_replayed() {
    bounded(async {
        let busy_once = handler(|_, n| async move {
            if n == 0 {
                respond(StatusCode::SERVICE_UNAVAILABLE, "busy")
            } else {
                respond(StatusCode::OK, "done")
            }
        });
        let s = Scenario::new()
            .backend_with("flaky", busy_once)
            .open_route(
                "tools",
                json!({"match": {"pathPrefix": "/tools"},
                       "retry": {"attempts": 2, "retryOn": [502, 503, "connect-failure"], "backoff": "10ms"}}),
            )
            .start()
            .await;
        let (gw, flaky) = (&s.gw, s.backend("flaky"));
        let body = json!({"tool": "calculator", "input": "6*7"});
        let r = gw
            .http
            .post(gw.url("/tools/run"))
            .json(&body)
            .send()
            .await
            .expect("gateway answers");
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.text().await.expect("body"), "done");
        let seen = flaky.requests();
        assert_eq!(seen.len(), 2, "one try and one retry");
        for s in &seen {
            assert_eq!(s.method, http::Method::POST);
            assert_eq!(s.path_and_query(), "/tools/run");
            assert_eq!(s.json(), body, "the body is replayed intact");
        }
        assert_eq!(seen[0].header("x-request-id"), seen[1].header("x-request-id"));
    })
    .await;
}

#[tokio::test]
async fn with_one_attempt_a_503_passes_through() {
    bounded(async {
        let busy = handler(|_, _| async move {
            let mut r = respond(StatusCode::SERVICE_UNAVAILABLE, "busy, try later");
            r.headers_mut()
                .insert("retry-after", http::HeaderValue::from_static("3"));
            r
        });
        let s = Scenario::new()
            .backend_with("flaky", busy)
            .open_route(
                "tools",
                json!({"match": {"pathPrefix": "/tools"}, "retry": {"attempts": 1, "retryOn": [503]}}),
            )
            .start()
            .await;
        let (gw, flaky) = (&s.gw, s.backend("flaky"));
        let r = gw
            .http
            .post(gw.url("/tools/run"))
            .json(&json!({"x": 1}))
            .send()
            .await
            .expect("gateway answers");
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            r.headers().get("retry-after").map(|v| v.as_bytes()),
            Some(&b"3"[..])
        );
        assert_eq!(r.text().await.expect("body"), "busy, try later");
        assert_eq!(flaky.count(), 1);
    })
    .await;
}

#[tokio::test]
async fn a_slow_upstream_hits_the_first_byte_timeout() {
    bounded(async {
        let too_late = handler(|_, _| async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            respond(StatusCode::OK, "too late")
        });
        let s = Scenario::new()
            .backend_with("slow", too_late)
            .open_route(
                "slow",
                json!({"match": {"pathPrefix": "/slow"}, "timeouts": {"firstByte": "200ms"}}),
            )
            .start()
            .await;
        let (gw, slow) = (&s.gw, s.backend("slow"));
        let started = std::time::Instant::now();
        let r = gw.get("/slow").await;
        let took = started.elapsed();
        assert_eq!(r.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(error_code(r).await, "upstream_timeout");
        assert!(took >= Duration::from_millis(190), "{took:?}");
        assert!(took < Duration::from_millis(1500), "{took:?}");
        assert_eq!(slow.count(), 1);
    })
    .await;
}

#[tokio::test]
async fn an_unreachable_backend_is_502_after_the_connect_failure_retries() {
    bounded(async {
        // A port that was just free: nothing listens there.
        let closed = format!("127.0.0.1:{}", support::ports::free_port());
        let s = Scenario::new()
            .open_route(
                "gone",
                json!({"match": {"pathPrefix": "/gone"},
                       "retry": {"attempts": 3, "retryOn": ["connect-failure"]},
                       "backends": [{"url": format!("http://{closed}")}]}),
            )
            .start()
            .await;
        let gw = &s.gw;
        let r = gw.get("/gone").await;
        assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(error_code(r).await, "connect_failed");
        let metrics = gw.metrics().await;
        let tries = metric(
            &metrics,
            "tollgate_upstream_requests_total",
            &["outcome=\"connect_failure\""],
        );
        assert_eq!(tries, Some(3.0), "three tries in all:\n{metrics}");
    })
    .await;
}

#[tokio::test]
async fn hop_by_hop_response_headers_are_removed() {
    bounded(async {
        let hoppy = handler(|_, _| async move {
            let mut r = respond(StatusCode::OK, "ok");
            let h = r.headers_mut();
            h.insert("connection", http::HeaderValue::from_static("x-internal"));
            h.insert("x-internal", http::HeaderValue::from_static("backend-only"));
            h.insert("x-public", http::HeaderValue::from_static("yes"));
            r
        });
        let s = Scenario::new()
            .backend_with("hoppy", hoppy)
            .open_route("hoppy", json!({"match": {"pathPrefix": "/hoppy"}}))
            .start()
            .await;
        let gw = &s.gw;
        let r = gw.get("/hoppy").await;
        assert_eq!(r.status(), StatusCode::OK);
        assert!(!r.headers().contains_key("x-internal"));
        assert_eq!(
            r.headers().get("x-public").map(|v| v.as_bytes()),
            Some(&b"yes"[..])
        );
        assert_eq!(r.text().await.expect("body"), "ok");
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Admin
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn admin_reports_health_metrics_and_routes_without_key_material() {
    const PLAIN: &str = "tg-PLAIN-never-print-9b41e7";
    bounded(async {
        let s = Scenario::new()
            .backend("b")
            .key("watched", "watched-1", PLAIN, &["user"])
            .route("chat", json!({"match": {"pathPrefix": "/chat"}}))
            .start()
            .await;
        let gw = &s.gw;
        let admin = |path: &'static str| {
            let rb = gw.http.get(gw.admin_url(path));
            async move { rb.send().await.expect("admin answers") }
        };

        let r = admin("/healthz").await;
        assert_eq!(r.status(), StatusCode::OK);
        let r = admin("/readyz").await;
        assert_eq!(
            r.status(),
            StatusCode::OK,
            "ready once the first snapshot is in"
        );

        let r = gw
            .http
            .get(gw.url("/chat/hello"))
            .header("x-api-key", PLAIN)
            .send()
            .await
            .expect("gateway answers");
        assert_eq!(r.status(), StatusCode::OK);
        let r = gw.get("/nowhere").await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND);

        let metrics = gw.metrics().await;
        let served = metric(
            &metrics,
            "tollgate_requests_total",
            &["route=\"default/chat\"", "code=\"200\"", "method=\"GET\""],
        );
        assert_eq!(served, Some(1.0), "the route's request counter:\n{metrics}");
        assert!(
            metric(&metrics, "tollgate_requests_total", &["code=\"404\""]).is_some(),
            "{metrics}"
        );

        let debug = admin("/debug/routes").await;
        assert_eq!(debug.status(), StatusCode::OK);
        let text = debug.text().await.expect("debug text");
        let v: serde_json::Value = serde_json::from_str(&text).expect("/debug/routes is JSON");
        let routes = v["routes"].as_array().expect("routes array");
        assert_eq!(routes.len(), 1, "{v}");
        assert_eq!(routes[0]["id"], "default/chat");
        assert_eq!(routes[0]["prefix"], "/chat");
        let keys = v["keys"].as_array().expect("keys array");
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0]["clientId"], "watched-1");
        let fp = keys[0]["fingerprint"].as_str().expect("fingerprint");
        assert!(fp.starts_with("sha256:") && fp.len() == 15, "{fp}");
        assert_eq!(v["problems"].as_array().map(Vec::len), Some(0));

        for (what, text) in [("/debug/routes", &text), ("/metrics", &metrics)] {
            assert!(!text.contains(PLAIN), "{what} leaks the plain key");
            assert!(
                !text.contains(&key_hash(PLAIN)[7..]),
                "{what} leaks the full digest"
            );
        }
    })
    .await;
}
