//! External auth (`--ext-auth-url`) against a real HTTP auth service started by each test: keys
//! unknown to the key store are asked of it once per TTL (concurrent first requests coalesced
//! into one call), refusals are 401, a failing service is 503 `auth_unavailable` (fail closed),
//! and the plain key never shows in logs, metrics or `/debug/routes`.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::StatusCode;
use serde_json::{json, Value};
use support::metrics::metric_sum;
use support::process::GatewayProcess;
use support::*;
use tokio::sync::Notify;
use tollgate::auth::external::ExtAuthConfig;

/// A key the gateway's own store holds.
const STORE_KEY: &str = "tg-store-key-0b6e";

/// The auth service: its answers depend on the key's prefix.
/// `good-<x>` → 200 `{"client_id": "ext-<x>", "roles": ["user"]}`; `admin-<x>` → the same with
/// role `admin`; `bad-` → 401; `forbid-` → 403; `boom-` → 500; `garbage-` → 200 with a body that
/// is not an answer; `slow-` → 200 after 3 s; `stream-` → like `good-` until `refuse_streams`.
struct AuthService {
    backend: Backend,
    /// Added before every answer (lets concurrent lookups overlap).
    delay_ms: Arc<AtomicU64>,
    refuse_streams: Arc<AtomicBool>,
}

fn answer(status: StatusCode, body: Value) -> http::Response<RespBody> {
    let mut r = respond(status, body.to_string());
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

impl AuthService {
    async fn start() -> AuthService {
        let delay_ms = Arc::new(AtomicU64::new(0));
        let refuse_streams = Arc::new(AtomicBool::new(false));
        let (delay, refuse) = (delay_ms.clone(), refuse_streams.clone());
        let backend = Backend::spawn(
            "auth",
            handler(move |seen, _| {
                let delay = Duration::from_millis(delay.load(Ordering::SeqCst));
                let refuse = refuse.load(Ordering::SeqCst);
                async move {
                    tokio::time::sleep(delay).await;
                    let body: Value = serde_json::from_slice(&seen.body).unwrap_or(Value::Null);
                    let key = body["api_key"].as_str().unwrap_or("").to_string();
                    let ok = |prefix: &str, role: &str| {
                        let name = key.strip_prefix(prefix).unwrap_or("");
                        answer(
                            StatusCode::OK,
                            json!({"client_id": format!("ext-{name}"), "roles": [role]}),
                        )
                    };
                    match key.split_once('-').map(|(p, _)| p) {
                        Some("good") => ok("good-", "user"),
                        Some("admin") => ok("admin-", "admin"),
                        Some("stream") if !refuse => ok("stream-", "user"),
                        Some("bad") | Some("stream") => {
                            answer(StatusCode::UNAUTHORIZED, json!({"error": "invalid key"}))
                        }
                        Some("forbid") => answer(StatusCode::FORBIDDEN, json!({"error": "no"})),
                        Some("garbage") => respond(StatusCode::OK, "<html>oops</html>"),
                        Some("slow") => {
                            tokio::time::sleep(Duration::from_secs(3)).await;
                            ok("slow-", "user")
                        }
                        _ => answer(StatusCode::INTERNAL_SERVER_ERROR, json!({"error": "boom"})),
                    }
                }
            }),
        )
        .await;
        AuthService {
            backend,
            delay_ms,
            refuse_streams,
        }
    }

    fn url(&self) -> String {
        format!("{}/v1/validate", self.backend.url())
    }

    /// Calls made with `key`.
    fn calls(&self, key: &str) -> usize {
        self.backend
            .requests()
            .iter()
            .filter(|s| s.json()["api_key"] == key)
            .count()
    }
}

/// A store key, `/api` (role `user`), `/admin` (role `admin`), `/open` (no key required) and an
/// SSE route `/events`, all to `api` (or `events`).
fn config(api: &Backend, events: Option<&Backend>) -> String {
    let mut docs = api_key(
        "default",
        "store",
        "store-1",
        STORE_KEY,
        &["user"],
        json!({}),
    );
    docs.push(route(
        "api",
        json!({"match": {"pathPrefix": "/api"}, "auth": {"roles": ["user"]},
               "backends": [{"url": api.url()}]}),
    ));
    docs.push(route(
        "admin",
        json!({"match": {"pathPrefix": "/admin"}, "auth": {"roles": ["admin"]},
               "backends": [{"url": api.url()}]}),
    ));
    docs.push(route(
        "open",
        json!({"match": {"pathPrefix": "/open"}, "auth": {"required": false},
               "backends": [{"url": api.url()}]}),
    ));
    if let Some(events) = events {
        docs.push(route(
            "events",
            json!({"match": {"pathPrefix": "/events"}, "protocol": "sse",
                   "backends": [{"url": events.url()}]}),
        ));
    }
    yaml(docs)
}

fn ext(url: String, ttl: Duration, failure_ttl: Duration, timeout: Duration) -> ExtAuthConfig {
    ExtAuthConfig {
        ttl,
        failure_ttl,
        timeout,
        ..ExtAuthConfig::new(url)
    }
}

async fn get_with_key(gw: &Gateway, path: &str, key: &str) -> reqwest::Response {
    gw.http
        .get(gw.url(path))
        .header("x-api-key", key)
        .send()
        .await
        .expect("the gateway answers")
}

#[tokio::test]
async fn unknown_keys_are_admitted_by_the_auth_service_and_cached_for_the_ttl() {
    const TTL: Duration = Duration::from_millis(1200);
    bounded(async {
        let auth = AuthService::start().await;
        let api = Backend::echo("api").await;
        let url = auth.url();
        let gw = gateway_with(config(&api, None), |o| {
            o.ext_auth = Some(ext(
                url,
                TTL,
                Duration::from_secs(5),
                Duration::from_secs(2),
            ));
        })
        .await;

        let first = Instant::now();
        for _ in 0..5 {
            let r = get_with_key(&gw, "/api/x", "good-alpha").await;
            assert_eq!(r.status(), StatusCode::OK);
        }
        // The same key as a bearer token is the same cached caller.
        let r = gw
            .http
            .get(gw.url("/api/x"))
            .bearer_auth("good-alpha")
            .send()
            .await
            .expect("the gateway answers");
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(auth.calls("good-alpha"), 1, "one call for six requests");
        let seen = api.last();
        assert_eq!(seen.header("x-client-id").as_deref(), Some("ext-alpha"));
        assert!(seen.header("x-api-key").is_none());
        assert!(seen.header("authorization").is_none());

        // What the auth service received: a JSON POST naming the key.
        let call = auth.backend.requests()[0].clone();
        assert_eq!(call.method, http::Method::POST);
        assert_eq!(call.uri.path(), "/v1/validate");
        assert_eq!(
            call.header("content-type").as_deref(),
            Some("application/json")
        );
        assert_eq!(call.json(), json!({"api_key": "good-alpha"}));

        // Roles decide where the key goes; no namespace binds it.
        let r = get_with_key(&gw, "/admin", "good-alpha").await;
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        assert_eq!(error_code(r).await, "forbidden");
        assert_eq!(
            get_with_key(&gw, "/admin", "admin-root").await.status(),
            StatusCode::OK
        );

        // Keys of the store never reach the auth service.
        assert_eq!(
            get_with_key(&gw, "/api/x", STORE_KEY).await.status(),
            StatusCode::OK
        );
        assert_eq!(auth.calls(STORE_KEY), 0);

        // Refusals are 401 and cached too.
        for key in ["bad-mallory", "bad-mallory", "forbid-eve"] {
            let r = get_with_key(&gw, "/api/x", key).await;
            assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{key}");
            assert_eq!(error_code(r).await, "invalid_key");
        }
        assert_eq!(auth.calls("bad-mallory"), 1);

        // After the TTL the service is asked again, once.
        let wait = TTL.saturating_sub(first.elapsed()) + Duration::from_millis(100);
        tokio::time::sleep(wait).await;
        for _ in 0..3 {
            assert_eq!(
                get_with_key(&gw, "/api/x", "good-alpha").await.status(),
                StatusCode::OK
            );
        }
        assert_eq!(auth.calls("good-alpha"), 2, "one more call after the TTL");
    })
    .await;
}

#[tokio::test]
async fn concurrent_first_requests_with_one_key_make_one_call() {
    const CONCURRENT: usize = 50;
    bounded(async {
        let auth = AuthService::start().await;
        // Every lookup waits 200 ms for its answer, so all 50 requests overlap.
        auth.delay_ms.store(200, Ordering::SeqCst);
        let api = Backend::echo("api").await;
        let url = auth.url();
        let gw = gateway_with(config(&api, None), |o| {
            o.ext_auth = Some(ext(
                url,
                Duration::from_secs(300),
                Duration::from_secs(5),
                Duration::from_secs(2),
            ));
        })
        .await;
        let started = Instant::now();
        let tasks: Vec<_> = (0..CONCURRENT)
            .map(|_| {
                let (http, url) = (gw.http.clone(), gw.url("/api/x"));
                tokio::spawn(async move {
                    http.get(url)
                        .header("x-api-key", "good-crowd")
                        .send()
                        .await
                        .expect("the gateway answers")
                        .status()
                })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.expect("request task"), StatusCode::OK);
        }
        println!(
            "coalescing: {CONCURRENT} concurrent first requests, {} auth call(s), {:?}",
            auth.calls("good-crowd"),
            started.elapsed()
        );
        assert_eq!(auth.calls("good-crowd"), 1);
        assert_eq!(api.count(), CONCURRENT);
    })
    .await;
}

/// Defect: any number of distinct unknown keys started any number of calls at once. With the
/// cap, calls beyond it are refused at once (503 `auth_unavailable`, counted) and the service
/// sees at most `max_concurrent` of them; once they end, a new key is asked about again.
#[tokio::test]
async fn distinct_unknown_keys_start_a_bounded_number_of_calls() {
    const KEYS: usize = 40;
    const CAP: usize = 4;
    bounded(async {
        let auth = AuthService::start().await;
        // Every answer takes 400 ms, so all the requests below overlap the first calls.
        auth.delay_ms.store(400, Ordering::SeqCst);
        let api = Backend::echo("api").await;
        let url = auth.url();
        let gw = gateway_with(config(&api, None), |o| {
            o.ext_auth = Some(ExtAuthConfig {
                max_concurrent: CAP,
                ..ext(
                    url,
                    Duration::from_secs(300),
                    Duration::from_secs(5),
                    Duration::from_secs(2),
                )
            });
        })
        .await;
        let tasks: Vec<_> = (0..KEYS)
            .map(|i| {
                let (http, url) = (gw.http.clone(), gw.url("/api/x"));
                tokio::spawn(async move {
                    let r = http
                        .get(url)
                        .header("x-api-key", format!("good-flood{i}"))
                        .send()
                        .await
                        .expect("the gateway answers");
                    let status = r.status();
                    let body: Value = r.json().await.unwrap_or(Value::Null);
                    (status, body["error"]["code"].as_str().map(str::to_string))
                })
            })
            .collect();
        let mut admitted = 0;
        let mut refused = 0;
        for t in tasks {
            match t.await.expect("request task") {
                (StatusCode::OK, _) => admitted += 1,
                (StatusCode::SERVICE_UNAVAILABLE, Some(code)) if code == "auth_unavailable" => {
                    refused += 1
                }
                other => panic!("unexpected answer {other:?}"),
            }
        }
        let calls = auth.backend.count();
        let counted = gw.running.gateway.metrics.ext_auth_overloaded_total.get();
        println!(
            "ext-auth cap {CAP}: {KEYS} distinct new keys at once: {admitted} admitted, \
             {refused} refused, {calls} auth calls, counter {counted}"
        );
        assert!(calls <= CAP, "{calls} calls with a cap of {CAP}");
        assert_eq!(admitted, calls, "every call made admitted its key");
        assert_eq!(admitted + refused, KEYS);
        assert_eq!(counted, refused as u64);
        // The permits came back: a new key is asked about again.
        let r = get_with_key(&gw, "/api/x", "good-after-flood").await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(auth.calls("good-after-flood"), 1);
    })
    .await;
}

#[tokio::test]
async fn ext_auth_callers_get_the_default_limits() {
    bounded(async {
        let auth = AuthService::start().await;
        let api = Backend::echo("api").await;
        let url = auth.url();
        let gw = gateway_with(config(&api, None), |o| {
            o.default_rpm = 3;
            o.ext_auth = Some(ext(
                url,
                Duration::from_secs(300),
                Duration::from_secs(5),
                Duration::from_secs(2),
            ));
        })
        .await;
        for _ in 0..3 {
            let r = get_with_key(&gw, "/api/x", "good-limited").await;
            assert_eq!(r.status(), StatusCode::OK);
            assert_eq!(
                r.headers()
                    .get("ratelimit-limit")
                    .and_then(|v| v.to_str().ok()),
                Some("3")
            );
        }
        let r = get_with_key(&gw, "/api/x", "good-limited").await;
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(error_code(r).await, "rate_limited");
    })
    .await;
}

#[tokio::test]
async fn a_failing_auth_service_fails_closed() {
    bounded(async {
        let auth = AuthService::start().await;
        let api = Backend::echo("api").await;
        let url = auth.url();
        let timeout = Duration::from_millis(300);
        let gw = gateway_with(config(&api, None), |o| {
            o.ext_auth = Some(ext(
                url,
                Duration::from_secs(300),
                Duration::from_secs(5),
                timeout,
            ));
        })
        .await;

        for key in ["boom-1", "boom-1", "garbage-1"] {
            let r = get_with_key(&gw, "/api/x", key).await;
            assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE, "{key}");
            assert_eq!(error_code(r).await, "auth_unavailable");
        }
        assert_eq!(auth.calls("boom-1"), 1, "a failure is cached briefly");

        let started = Instant::now();
        let r = get_with_key(&gw, "/api/x", "slow-1").await;
        let waited = started.elapsed();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(error_code(r).await, "auth_unavailable");
        assert!(
            waited >= timeout && waited < timeout + Duration::from_secs(1),
            "answered after the {timeout:?} timeout: {waited:?}"
        );

        // A route that needs no key serves an unverifiable one anonymously.
        let r = get_with_key(&gw, "/open", "boom-2").await;
        assert_eq!(r.status(), StatusCode::OK);
        assert!(api.last().header("x-client-id").is_none());
        assert_eq!(api.count(), 1, "no refused request reached the backend");

        let metrics = gw.metrics().await;
        assert!(
            metric_sum(
                &metrics,
                "tollgate_auth_failures_total{reason=\"auth_unavailable\"}"
            ) >= 4.0,
            "{metrics}"
        );

        // The service down altogether: the port refuses connections.
        let closed = format!("127.0.0.1:{}", support::ports::free_port());
        let down = gateway_with(config(&api, None), |o| {
            o.ext_auth = Some(ext(
                format!("http://{closed}/v1/validate"),
                Duration::from_secs(300),
                Duration::from_secs(5),
                timeout,
            ));
        })
        .await;
        let r = get_with_key(&down, "/api/x", "good-alpha").await;
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(error_code(r).await, "auth_unavailable");
        // The store's keys do not depend on the service.
        assert_eq!(
            get_with_key(&down, "/api/x", STORE_KEY).await.status(),
            StatusCode::OK
        );
    })
    .await;
}

/// An SSE stream of a key the auth service admitted stays open while the service keeps
/// admitting the key (asked again after each TTL) and closes once it refuses it.
#[tokio::test]
async fn an_ext_auth_stream_closes_when_the_service_refuses_its_key() {
    const TTL: Duration = Duration::from_millis(300);
    const REVALIDATE: Duration = Duration::from_millis(200);
    bounded(async {
        let auth = AuthService::start().await;
        let api = Backend::echo("api").await;
        let gate = Arc::new(Notify::new());
        let events = Backend::spawn("events", gated_sse(gate.clone())).await;
        let url = auth.url();
        let gw = gateway_with(config(&api, Some(&events)), |o| {
            o.proxy.revalidate_interval = REVALIDATE;
            o.ext_auth = Some(ext(url, TTL, TTL, Duration::from_secs(2)));
        })
        .await;
        let mut sse = get_with_key(&gw, "/events", "stream-alice").await;
        assert_eq!(sse.status(), StatusCode::OK);
        let mut buf = Vec::new();
        read_until(&mut sse, &mut buf, b"data: one\n\n").await;

        // Three TTLs later the stream is still open: each expiry asked the service again.
        let quiet = tokio::time::timeout(TTL * 3, sse.chunk()).await;
        assert!(quiet.is_err(), "the stream stays open: {quiet:?}");
        assert!(auth.calls("stream-alice") >= 2, "re-asked after the TTL");

        auth.refuse_streams.store(true, Ordering::SeqCst);
        let refused = Instant::now();
        let closed =
            tokio::time::timeout(TTL + REVALIDATE * 2 + Duration::from_millis(500), async {
                loop {
                    match sse.chunk().await {
                        Ok(Some(_)) => continue,
                        Ok(None) | Err(_) => return,
                    }
                }
            })
            .await;
        assert!(closed.is_ok(), "the stream closes once the key is refused");
        println!(
            "ext-auth stream closed {:?} after the service began refusing",
            refused.elapsed()
        );
        let r = get_with_key(&gw, "/events", "stream-alice").await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        gate.notify_one();
    })
    .await;
}

/// The plain keys never appear in the gateway's logs (debug level), metrics or `/debug/routes`;
/// the logs name keys by fingerprint. Runs the binary with `--ext-auth-url` and friends.
#[tokio::test]
async fn plain_keys_never_leak_into_logs_metrics_or_debug_output() {
    const GOOD: &str = "good-leakcheck-7f3a91";
    const BAD: &str = "bad-leakcheck-c0ffee";
    const BOOM: &str = "boom-leakcheck-5eed";
    const STORE: &str = "tg-leak-store-key-e11a";
    bounded(async {
        let auth = AuthService::start().await;
        let api = Backend::echo("api").await;
        let mut docs = api_key("default", "store", "store-1", STORE, &["user"], json!({}));
        docs.push(route(
            "api",
            json!({"match": {"pathPrefix": "/api"}, "backends": [{"url": api.url()}]}),
        ));
        let url = auth.url();
        let gw = GatewayProcess::start(
            &yaml(docs),
            &[
                "--ext-auth-url",
                &url,
                "--ext-auth-ttl",
                "1s",
                "--ext-auth-failure-ttl",
                "1s",
                "--ext-auth-timeout",
                "500ms",
                "--metrics-per-client",
            ],
            &[("RUST_LOG", "debug")],
        )
        .await;
        let http = client();
        for (key, status) in [
            (GOOD, StatusCode::OK),
            (BAD, StatusCode::UNAUTHORIZED),
            (BOOM, StatusCode::SERVICE_UNAVAILABLE),
            (STORE, StatusCode::OK),
        ] {
            for carrier in ["x-api-key", "authorization"] {
                let value = if carrier == "authorization" {
                    format!("Bearer {key}")
                } else {
                    key.to_string()
                };
                let r = http
                    .get(gw.url("/api/x"))
                    .header(carrier, value)
                    .send()
                    .await
                    .expect("the gateway answers");
                assert_eq!(r.status(), status, "{key} in {carrier}");
            }
        }
        assert_eq!(auth.calls(GOOD), 1);
        let metrics = gw.metrics().await;
        let debug = http
            .get(gw.admin_url("/debug/routes"))
            .send()
            .await
            .expect("debug")
            .text()
            .await
            .expect("debug text");
        // Logs are written as requests finish; the last access line shows they are all in.
        eventually(
            Duration::from_secs(2),
            "the access lines are written",
            || {
                let n = gw.output().matches("tollgate::access").count();
                async move { (n >= 8).then_some(()) }
            },
        )
        .await;
        let logs = gw.output();
        for key in [GOOD, BAD, BOOM, STORE] {
            for (what, text) in [
                ("logs", &logs),
                ("metrics", &metrics),
                ("/debug/routes", &debug),
            ] {
                assert!(
                    !text.contains(key),
                    "the plain key {key} appears in the {what}"
                );
            }
        }
        // Keys are named by fingerprint instead.
        let fingerprint = &key_hash(BAD)[..15];
        assert!(
            logs.contains(fingerprint),
            "logs name {BAD} as {fingerprint}: {logs}"
        );
        assert!(
            metrics.contains("ext-leakcheck-7f3a91"),
            "per-client metrics use the client id"
        );
    })
    .await;
}
