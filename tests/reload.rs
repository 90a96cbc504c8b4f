//! Reloading the standalone configuration: a changed file takes effect for new requests while an
//! open stream finishes on the snapshot it started with, and a broken file keeps the last good
//! routes serving and is reported on the admin port; a document the gateway does not serve is
//! skipped on its own.

mod support;

use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use serde_json::{json, Value};
use support::*;
use tokio::sync::Notify;

/// `/api` to `api_backend`, and (when given) an SSE route `/stream` to `stream_backend`.
fn config(api_backend: &Backend, stream_backend: Option<&Backend>) -> String {
    let open = json!({"required": false});
    let mut docs = vec![route(
        "api",
        json!({"match": {"pathPrefix": "/api"}, "auth": open, "backends": [{"url": api_backend.url()}]}),
    )];
    if let Some(s) = stream_backend {
        docs.push(route(
            "stream",
            json!({"match": {"pathPrefix": "/stream"}, "protocol": "sse", "auth": open,
                   "backends": [{"url": s.url()}]}),
        ));
    }
    yaml(docs)
}

/// Which backend answers `GET /api` now (its body), or the status if not 200.
async fn api_answer(gw: &Gateway) -> String {
    let r = gw.get("/api/who").await;
    if r.status() != StatusCode::OK {
        return r.status().to_string();
    }
    r.text().await.expect("body")
}

fn file_problems(debug: &Value) -> Vec<Value> {
    debug["problems"]
        .as_array()
        .expect("problems array")
        .iter()
        .filter(|p| p["kind"] == "File")
        .cloned()
        .collect()
}

#[tokio::test]
async fn a_reload_spares_open_streams_and_a_broken_file_spares_the_routes() {
    bounded(async {
        let old = Backend::echo("old").await;
        let new = Backend::echo("new").await;
        let gate = Arc::new(Notify::new());
        let streamer = Backend::spawn("streamer", gated_sse(gate.clone())).await;
        let gw = gateway(config(&old, Some(&streamer))).await;
        assert_eq!(api_answer(&gw).await, "old");
        let first_generation = gw.debug_routes().await["generation"]
            .as_u64()
            .expect("generation");

        // A long stream opens on the old configuration.
        let mut stream = gw.get("/stream/chat").await;
        assert_eq!(stream.status(), StatusCode::OK);
        let mut buf = Vec::new();
        read_until(&mut stream, &mut buf, b"data: one\n\n").await;

        // New configuration: /api moves to the new backend, /stream is gone.
        gw.write_config(&config(&new, None));
        eventually(
            Duration::from_secs(2),
            "new requests follow the new routes",
            || async { (api_answer(&gw).await == "new").then_some(()) },
        )
        .await;
        let r = gw.get("/stream/chat").await;
        assert_eq!(
            r.status(),
            StatusCode::NOT_FOUND,
            "the stream route is gone for new requests"
        );
        assert_eq!(streamer.count(), 1);

        // The open stream still runs to its end on the route it started with.
        gate.notify_one();
        read_until(&mut stream, &mut buf, b"data: two\n\n").await;
        assert_eq!(buf, b"data: one\n\ndata: two\n\n");
        assert_eq!(stream.chunk().await.expect("a clean end"), None);

        // A broken file: the last good routes keep serving and the problem is reported.
        let generation = gw.debug_routes().await["generation"]
            .as_u64()
            .expect("generation");
        assert!(generation > first_generation);
        gw.write_config("apiVersion: tollgate.dev/v1alpha1\nkind: AgentRoute\nspec: [unclosed\n");
        let problems = eventually(
            Duration::from_secs(2),
            "the broken file is reported in /debug/routes",
            || async {
                let p = file_problems(&gw.debug_routes().await);
                (!p.is_empty()).then_some(p)
            },
        )
        .await;
        assert_eq!(problems.len(), 1, "{problems:#?}");
        let p = &problems[0];
        assert_eq!(p["reason"], "ParseError");
        let origin = p["origin"].as_str().expect("origin");
        assert!(origin.ends_with("config.yaml"), "{origin}");
        let message = p["message"].as_str().expect("message");
        assert!(message.contains("invalid YAML"), "{message}");
        assert_eq!(
            api_answer(&gw).await,
            "new",
            "the last good routes keep serving"
        );
        let debug = gw.debug_routes().await;
        let ids: Vec<&str> = debug["routes"]
            .as_array()
            .expect("routes")
            .iter()
            .filter_map(|r| r["id"].as_str())
            .collect();
        assert_eq!(ids, ["default/api"]);

        // Fixing the file clears the problem.
        gw.write_config(&config(&old, None));
        eventually(
            Duration::from_secs(2),
            "the fixed file is served",
            || async {
                let ok = api_answer(&gw).await == "old"
                    && file_problems(&gw.debug_routes().await).is_empty();
                ok.then_some(())
            },
        )
        .await;
    })
    .await;
}

/// A first start on a file whose second document is of a kind the gateway does not know: the
/// routes around it serve and that one document is reported with its file and index.
#[tokio::test]
async fn a_document_of_an_unknown_kind_is_skipped_and_the_rest_of_its_file_serves() {
    bounded(async {
        let api = Backend::echo("api").await;
        let open = json!({"required": false});
        // A kind the gateway does not read (Ingress it now does).
        let policy = json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                            "metadata": {"name": "web"}, "spec": {}});
        let after = route(
            "after",
            json!({"match": {"pathPrefix": "/after"}, "auth": open, "backends": [{"url": api.url()}]}),
        );
        let docs = vec![
            route(
                "api",
                json!({"match": {"pathPrefix": "/api"}, "auth": open, "backends": [{"url": api.url()}]}),
            ),
            policy,
            after,
        ];
        let gw = gateway_allowing_problems(yaml(docs), |_| {}).await;
        assert_eq!(api_answer(&gw).await, "api");
        assert_eq!(gw.get("/after/x").await.status(), StatusCode::OK);

        let problems = file_problems(&gw.debug_routes().await);
        assert_eq!(problems.len(), 1, "{problems:#?}");
        assert_eq!(problems[0]["reason"], "UnsupportedKind");
        let origin = problems[0]["origin"].as_str().expect("origin");
        assert!(origin.ends_with("config.yaml"), "{origin}");
        let message = problems[0]["message"].as_str().expect("message");
        assert!(
            message.contains("document 2") && message.contains("NetworkPolicy"),
            "{message}"
        );
    })
    .await;
}

/// Standalone applies strict field validation: a route with a misspelt field is refused (not
/// served with the field silently ignored) and reported with its path; the others serve.
#[tokio::test]
async fn a_route_with_an_unknown_field_is_refused_and_the_others_serve() {
    bounded(async {
        let api = Backend::echo("api").await;
        let open = json!({"required": false});
        let docs = vec![
            route(
                "api",
                json!({"match": {"pathPrefix": "/api"}, "auth": open, "backends": [{"url": api.url()}]}),
            ),
            route(
                "limited",
                json!({"match": {"pathPrefix": "/limited"}, "auth": open,
                       "rateLimt": {"requestsPerMinute": 1}, "backends": [{"url": api.url()}]}),
            ),
        ];
        let gw = gateway_allowing_problems(yaml(docs), |_| {}).await;
        assert_eq!(api_answer(&gw).await, "api");
        assert_eq!(
            gw.get("/limited/x").await.status(),
            StatusCode::NOT_FOUND,
            "the route with the unknown field is not served"
        );
        let debug = gw.debug_routes().await;
        let problems: Vec<&Value> = debug["problems"]
            .as_array()
            .expect("problems array")
            .iter()
            .filter(|p| p["reason"] == "UnknownField")
            .collect();
        assert_eq!(problems.len(), 1, "{debug:#}");
        assert_eq!(problems[0]["kind"], "AgentRoute");
        assert_eq!(problems[0]["field"], "spec.rateLimt");
        let origin = problems[0]["origin"].as_str().expect("origin");
        assert!(origin.ends_with("config.yaml"), "{origin}");
    })
    .await;
}
