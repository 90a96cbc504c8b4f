//! `protocol: mcp` routes with the official MCP Python SDK on both sides: stateful servers
//! (`MCPServer`) behind one route, SDK clients through one or two gateway processes; sealed
//! session ids (forged, tampered, foreign, retired keys, endpoint gone); the stateless
//! 2026-07-28 exchange; header/body disagreement refused before any server sees it.

mod support;

use std::time::Duration;

use base64::Engine as _;
use serde_json::{json, Value};

use support::mcp::{call, client, initialize, McpServer};
use support::process::GatewayProcess;
use support::{bounded_for, route, secret, yaml, Backend};

const LIMIT: Duration = Duration::from_secs(90);

fn new_key() -> String {
    base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 32]>())
}

fn keys_secret(keys: &[&str]) -> Value {
    secret(
        "default",
        "mcp-sessions",
        "Opaque",
        json!({"keys": keys.join("\n")}),
    )
}

fn mcp_route(name: &str, prefix: &str, backends: &[String]) -> Value {
    let backends: Vec<Value> = backends.iter().map(|u| json!({"url": u})).collect();
    route(
        name,
        json!({
            "match": {"pathPrefix": prefix},
            "protocol": "mcp",
            "auth": {"required": false},
            "backends": backends,
        }),
    )
}

/// The acceptance case of the issue (A8): two instances of a stateful server behind one
/// route, two gateway processes sharing the session Secret, 10 SDK sessions whose requests
/// alternate between the gateways. Every session completes and every call is answered by the
/// instance that owns its session. (Without sealed ids, 0-2 of 10 completed.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_stay_on_their_instance_through_two_gateway_processes() {
    bounded_for(LIMIT, async {
        // One server answers with SSE, the other with JSON: both kinds of POST answer.
        let a = McpServer::start("a", false).await;
        let b = McpServer::start("b", true).await;
        let key = new_key();
        let config = yaml([
            keys_secret(&[&key]),
            mcp_route("tools", "/mcp", &[a.url(), b.url()]),
        ]);
        let args = ["--mcp-session-secret", "default/mcp-sessions"];
        let g1 = GatewayProcess::start(&config, &args, &[]).await;
        let g2 = GatewayProcess::start(&config, &args, &[]).await;
        let urls = format!("{},{}", g1.url("/mcp"), g2.url("/mcp"));
        let report = client(&["sessions", &urls, "10", "4"], LIMIT).await;
        assert_eq!(report["completed"], 10, "{report:#}");
        assert_eq!(report["owners"], json!(["a", "b"]), "{report:#}");
        for r in report["results"].as_array().unwrap() {
            assert_eq!(
                r["tools"],
                json!(["add", "delete_repo", "search_docs", "whoami"])
            );
        }
    })
    .await;
}

/// Two gateways that do not share keys (no --mcp-session-secret): a session opened on one is
/// refused by the other with 404, as the spec wants for an unknown session, never sent to a
/// server that does not know it. The control of the test above.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_shared_secret_the_other_replica_answers_404() {
    bounded_for(LIMIT, async {
        let a = McpServer::start("a", true).await;
        let config = yaml([mcp_route("tools", "/mcp", &[a.url()])]);
        let g1 = GatewayProcess::start(&config, &[], &[]).await;
        let g2 = GatewayProcess::start(&config, &[], &[]).await;
        let http = support::client();
        let id = initialize(&http, &g1.url("/mcp")).await;
        assert_eq!(call(&http, &g1.url("/mcp"), &id, 2).await.0, 200);
        let (status, body) = call(&http, &g2.url("/mcp"), &id, 3).await;
        assert_eq!(status, 404);
        assert_eq!(body["error"]["code"], -32001, "{body}");
        assert_eq!(body["id"], 3, "{body}");
        assert!(
            g1.output().contains("sessions survive neither a restart"),
            "the gateway says once that sessions are per process"
        );
    })
    .await;
}

/// R11: ids that must not open answer 404 (-32001), never reach a server; key rotation keeps
/// live sessions; an id sealed only under a retired key is refused; a session whose endpoint
/// left the route is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_ids_that_must_not_open_and_key_rotation() {
    bounded_for(LIMIT, async {
        let a = McpServer::start("a", true).await;
        let b = McpServer::start("b", true).await;
        let (k1, k2) = (new_key(), new_key());
        let docs = |keys: &[&str], backend: &str| {
            yaml([
                keys_secret(keys),
                mcp_route("tools", "/mcp", &[backend.to_string()]),
                mcp_route("other", "/other", &[backend.to_string()]),
            ])
        };
        let gw = support::gateway_with(docs(&[&k1], &a.url()), |o| {
            o.mcp_session_secret =
                Some(tollgate::config::ObjectKey::new("default", "mcp-sessions"));
        })
        .await;
        let http = support::client();
        let url = gw.url("/mcp");
        let id1 = initialize(&http, &url).await;
        let (status, body) = call(&http, &url, &id1, 2).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["result"]["content"][0]["text"], "a");

        // Forged: an id of the right shape made by no gateway.
        let forged = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode([9u8; 90]);
        let (status, body) = call(&http, &url, &forged, 3).await;
        assert_eq!((status, &body["error"]["code"]), (404, &json!(-32001)));
        assert_eq!(body["id"], 3);
        // Tampered: one character of a real id changed.
        let mut t = id1.clone().into_bytes();
        let i = t.len() / 2;
        t[i] = if t[i] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(t).unwrap();
        assert_eq!(call(&http, &url, &tampered, 4).await.0, 404);
        // The upstream's own id (what a client could learn from a server) does not open either.
        assert_eq!(call(&http, &url, "0123456789abcdef", 5).await.0, 404);
        // Foreign: a real id replayed on another route of the same gateway and server.
        assert_eq!(call(&http, &gw.url("/other"), &id1, 6).await.0, 404);

        // Rotation: k2 first, k1 still opens; the live session goes on.
        gw.write_config(&docs(&[&k2, &k1], &a.url()));
        let id2 = support::eventually(Duration::from_secs(10), "the new key seals", || {
            let http = http.clone();
            let url = url.clone();
            let k1 = k1.clone();
            async move {
                let id = initialize(&http, &url).await;
                let only_k1 = tollgate::mcp::SessionKeys::parse(k1.as_bytes()).unwrap();
                only_k1
                    .open("default/tools", id.as_bytes())
                    .is_none()
                    .then_some(id)
            }
        })
        .await;
        assert_eq!(call(&http, &url, &id1, 7).await.0, 200);
        assert_eq!(call(&http, &url, &id2, 8).await.0, 200);
        // k1 retired: its session is refused, k2's goes on.
        gw.write_config(&docs(&[&k2], &a.url()));
        support::eventually(Duration::from_secs(10), "k1 is retired", || {
            let (http, url, id1) = (http.clone(), url.clone(), id1.clone());
            async move { (call(&http, &url, &id1, 9).await.0 == 404).then_some(()) }
        })
        .await;
        assert_eq!(call(&http, &url, &id2, 10).await.0, 200);

        // The endpoint is gone: the route now goes to b only; a's session is refused.
        gw.write_config(&docs(&[&k2], &b.url()));
        support::eventually(Duration::from_secs(10), "a left the route", || {
            let (http, url, id2) = (http.clone(), url.clone(), id2.clone());
            async move { (call(&http, &url, &id2, 11).await.0 == 404).then_some(()) }
        })
        .await;
        let id3 = initialize(&http, &url).await;
        let (status, body) = call(&http, &url, &id3, 12).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["result"]["content"][0]["text"], "b");
    })
    .await;
}

/// 2026-07-28: the SDK's stateless exchange (server/discover, tools/list, tools/call, no
/// session) through the gateway, balanced over two instances.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stateless_exchange_passes_through() {
    bounded_for(LIMIT, async {
        let a = McpServer::start("a", false).await;
        let b = McpServer::start("b", true).await;
        let gw = support::gateway(yaml([mcp_route("tools", "/mcp", &[a.url(), b.url()])])).await;
        let report = client(&["stateless", &gw.url("/mcp")], LIMIT).await;
        assert_eq!(report["version"], "2026-07-28", "{report}");
        let add = report["add"].as_str().unwrap_or_default();
        assert!(add == "5@a" || add == "5@b", "{report}");
    })
    .await;
}

/// Where the gateway reads the body (here a `bodyField` match), `Mcp-Method`/`Mcp-Name` that
/// disagree with it are refused with 400 and a JSON-RPC error, and nothing reaches the server;
/// a body that is not JSON-RPC likewise. Methods MCP does not use are 405.
#[tokio::test]
async fn headers_that_disagree_with_the_body_are_refused() {
    support::bounded(async {
        let backend = Backend::echo("mcp").await;
        let r = route(
            "tools",
            json!({
                "match": {"pathPrefix": "/mcp",
                          "bodyField": {"name": "jsonrpc", "values": ["2.0"]}},
                "protocol": "mcp",
                "auth": {"required": false},
                "backends": [{"url": backend.url()}],
            }),
        );
        let gw = support::gateway(yaml([r])).await;
        let url = gw.url("/mcp");
        let post = |body: Value, method: &str, name: Option<&str>| {
            let mut req = gw
                .http
                .post(&url)
                .header("mcp-method", method)
                .header("mcp-protocol-version", "2026-07-28")
                .json(&body);
            if let Some(n) = name {
                req = req.header("mcp-name", n);
            }
            req.send()
        };
        let call = json!({"jsonrpc": "2.0", "id": 5, "method": "tools/call",
                          "params": {"name": "search_docs", "arguments": {}}});
        let lying = post(call.clone(), "tools/list", None).await.unwrap();
        assert_eq!(lying.status(), 400);
        let v: Value = lying.json().await.unwrap();
        assert_eq!((&v["error"]["code"], &v["id"]), (&json!(-32600), &json!(5)));
        let lying_name = post(call.clone(), "tools/call", Some("delete_repo"))
            .await
            .unwrap();
        assert_eq!(lying_name.status(), 400);
        assert_eq!(backend.count(), 0, "a refused request reached the server");
        let honest = post(call, "tools/call", Some("search_docs")).await.unwrap();
        assert_eq!(honest.status(), 200);
        assert_eq!(backend.count(), 1);
        let put = gw
            .http
            .put(&url)
            .body(r#"{"jsonrpc": "2.0"}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(put.status(), 405);
        assert_eq!(put.headers()["allow"], "GET, POST, DELETE");
    })
    .await;
}

/// Tool access by role, over an SSE-answering and a JSON-answering server: `tools/list` shows a
/// user key only the tools it may use and an admin key all of them; a refused `tools/call`
/// fails as that call only (the SDK raises for it, the session goes on) and never reaches the
/// server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tools_are_listed_and_called_by_role_over_json_and_sse() {
    bounded_for(LIMIT, async {
        let a = McpServer::start("a", false).await;
        let b = McpServer::start("b", true).await;
        let ruled = |name: &str, prefix: &str, url: String| {
            route(
                name,
                json!({
                    "match": {"pathPrefix": prefix},
                    "rewrite": {"pathPrefix": "/mcp"},
                    "protocol": "mcp",
                    "mcp": {"tools": [
                        {"name": "search_*", "roles": ["user", "admin"]},
                        {"name": "delete_*", "roles": ["admin"]},
                    ]},
                    "backends": [{"url": url}],
                }),
            )
        };
        let mut docs = vec![
            ruled("sse", "/sse", a.url()),
            ruled("json", "/json", b.url()),
        ];
        docs.extend(support::api_key(
            "default",
            "user",
            "user-app",
            "user-key-0123456789",
            &["user"],
            json!({}),
        ));
        docs.extend(support::api_key(
            "default",
            "admin",
            "admin-app",
            "admin-key-0123456789",
            &["admin"],
            json!({}),
        ));
        let gw = support::gateway(yaml(docs)).await;
        for (path, owner) in [("/sse", "a"), ("/json", "b")] {
            let user = client(&["tools", &gw.url(path), "user-key-0123456789"], LIMIT).await;
            assert_eq!(
                user["tools"],
                json!(["add", "search_docs", "whoami"]),
                "{path}: {user}"
            );
            assert_eq!(user["delete"]["code"], -32003, "{path}: {user}");
            assert_eq!(user["after"], format!("found q@{owner}"), "{path}: {user}");
            let admin = client(&["tools", &gw.url(path), "admin-key-0123456789"], LIMIT).await;
            assert_eq!(
                admin["tools"],
                json!(["add", "delete_repo", "search_docs", "whoami"]),
                "{path}: {admin}"
            );
            assert_eq!(
                admin["delete"]["ok"],
                format!("deleted x@{owner}"),
                "{path}: {admin}"
            );
        }
    })
    .await;
}

/// A refused `tools/call` never reaches the server; `denyUnlisted` refuses what no rule names.
#[tokio::test]
async fn a_refused_tool_call_never_reaches_a_server() {
    support::bounded(async {
        let backend = Backend::echo("mcp").await;
        let r = route(
            "tools",
            json!({
                "match": {"pathPrefix": "/mcp"},
                "protocol": "mcp",
                "auth": {"required": false},
                "mcp": {"tools": [{"name": "search_*", "roles": ["user"]}], "denyUnlisted": true},
                "backends": [{"url": backend.url()}],
            }),
        );
        let gw = support::gateway(yaml([r])).await;
        let call = |name: &str| {
            gw.http
                .post(gw.url("/mcp"))
                .json(&json!({"jsonrpc": "2.0", "id": 9, "method": "tools/call",
                              "params": {"name": name, "arguments": {}}}))
                .send()
        };
        for tool in ["search_docs", "whoami"] {
            let resp = call(tool).await.unwrap();
            assert_eq!(resp.status(), 200);
            let v: Value = resp.json().await.unwrap();
            assert_eq!(
                (&v["error"]["code"], &v["id"]),
                (&json!(-32003), &json!(9)),
                "{tool}"
            );
        }
        assert_eq!(backend.count(), 0);
        let not_json = gw
            .http
            .post(gw.url("/mcp"))
            .body("{nope")
            .send()
            .await
            .unwrap();
        assert_eq!(not_json.status(), 400);
        let v: Value = not_json.json().await.unwrap();
        assert_eq!(v["error"]["code"], -32700);
        let batch = gw
            .http
            .post(gw.url("/mcp"))
            .body("[]")
            .send()
            .await
            .unwrap();
        assert_eq!(batch.status(), 400);
        // A real batch, under a version that forbids batches (2025-06-18 and later).
        let batch = gw
            .http
            .post(gw.url("/mcp"))
            .header("mcp-protocol-version", "2025-11-25")
            .json(&json!([{"jsonrpc": "2.0", "id": 1, "method": "ping"},
                          {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}]))
            .send()
            .await
            .unwrap();
        assert_eq!(batch.status(), 400);
        let v: Value = batch.json().await.unwrap();
        assert_eq!(v["error"]["code"], -32600, "{v}");
        // JSON, but not JSON-RPC: no "jsonrpc": "2.0".
        let not_rpc = gw
            .http
            .post(gw.url("/mcp"))
            .json(&json!({"id": 3, "method": "tools/call", "params": {"name": "search_docs"}}))
            .send()
            .await
            .unwrap();
        assert_eq!(not_rpc.status(), 400);
        let v: Value = not_rpc.json().await.unwrap();
        assert_eq!(v["error"]["code"], -32600, "{v}");
        // Over the size the gateway reads: 413 with a JSON-RPC error.
        let huge = format!(
            r#"{{"jsonrpc":"2.0","id":4,"method":"tools/call","params":{{"name":"search_docs","arguments":{{"q":"{}"}}}}}}"#,
            "x".repeat(2 << 20)
        );
        let big = gw
            .http
            .post(gw.url("/mcp"))
            .header("content-type", "application/json")
            .body(huge)
            .send()
            .await
            .unwrap();
        assert_eq!(big.status(), 413);
        let v: Value = big.json().await.unwrap();
        assert_eq!(v["error"]["code"], -32600, "{v}");
        assert_eq!(backend.count(), 0);
        // Not a tools/call: forwarded.
        let ping = gw
            .http
            .post(gw.url("/mcp"))
            .json(&json!({"jsonrpc": "2.0", "id": 1, "method": "ping"}))
            .send()
            .await
            .unwrap();
        assert_eq!(ping.status(), 200);
        assert_eq!(backend.count(), 1);
        let text = gw.metrics().await;
        for line in [
            r#"tollgate_mcp_tool_calls_total{outcome="tool_forbidden",route="default/tools",tool="whoami"} 1"#,
            r#"tollgate_mcp_tool_calls_total{outcome="tool_forbidden",route="default/tools",tool="search_docs"} 1"#,
            r#"tollgate_mcp_requests_total{method="tools/call",outcome="tool_forbidden",route="default/tools"} 2"#,
            r#"tollgate_mcp_requests_total{method="ping",outcome="ok",route="default/tools"} 1"#,
            r#"tollgate_mcp_requests_total{method="unknown",outcome="refused",route="default/tools"} 5"#,
        ] {
            assert!(text.contains(line), "no {line} in:\n{text}");
        }
    })
    .await;
}

/// Federation over three SDK servers (a, b, c) behind one route, for a 2025-11-25 session and
/// a 2026-07-28 stateless client: tools are listed as `<prefix>__<tool>`, each call reaches its
/// own server, and once c is killed mid-session the others keep working: c's tools leave the
/// list, a call of one fails as that call only, and the outage is counted. A tool no server
/// has never leaves the gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_endpoint_federates_three_servers_and_survives_one_going_down() {
    bounded_for(LIMIT, async {
        for era in ["legacy", "modern"] {
            let a = McpServer::start("a", false).await;
            let b = McpServer::start("b", true).await;
            let c = McpServer::start("c", false).await;
            let backends: Vec<Value> = [("a", &a), ("b", &b), ("c", &c)]
                .iter()
                .map(|(p, s)| json!({"url": s.url(), "mcp": {"prefix": p}}))
                .collect();
            let r = route(
                "fed",
                json!({
                    "match": {"pathPrefix": "/mcp"},
                    "protocol": "mcp",
                    "auth": {"required": false},
                    "backends": backends,
                }),
            );
            let gw = support::gateway(yaml([r])).await;
            let pid = c.pid().to_string();
            let report = client(&["federation", &gw.url("/mcp"), era, &pid], LIMIT).await;
            let all: Vec<String> = ["a", "b", "c"]
                .iter()
                .flat_map(|p| {
                    ["add", "delete_repo", "search_docs", "whoami"]
                        .iter()
                        .map(move |t| format!("{p}__{t}"))
                })
                .collect();
            assert_eq!(report["before"], json!(all), "{era}: {report:#}");
            assert_eq!(
                report["who"],
                json!({"a": "a", "b": "b", "c": "c"}),
                "{era}: {report:#}"
            );
            let after: Vec<&String> = all.iter().filter(|n| !n.starts_with("c__")).collect();
            assert_eq!(report["after"], json!(after), "{era}: {report:#}");
            let calls = &report["calls"];
            assert_eq!(calls["a__whoami"]["ok"], "a", "{era}: {report:#}");
            assert_eq!(calls["a__whoami#2"]["ok"], "a", "{era}: {report:#}");
            assert_eq!(calls["b__add"]["ok"], "5@b", "{era}: {report:#}");
            assert_eq!(calls["c__whoami"]["code"], -32005, "{era}: {report:#}");
            assert_eq!(calls["nosuch__whoami"]["code"], -32602, "{era}: {report:#}");
            assert_eq!(calls["whoami"]["code"], -32602, "{era}: {report:#}");
            if era == "legacy" {
                assert_eq!(report["version"], "2025-11-25", "{report:#}");
                assert_eq!(report["server"], "tollgate", "{report:#}");
            } else {
                assert_eq!(report["version"], "2026-07-28", "{report:#}");
                assert!(
                    report["supported"]
                        .as_array()
                        .is_some_and(|v| v.contains(&json!("2026-07-28"))),
                    "{report:#}"
                );
            }
            let text = gw.metrics().await;
            assert!(
                text.lines().any(|l| l.starts_with(
                    r#"tollgate_mcp_server_unavailable_total{route="default/fed",server="c"}"#
                )),
                "{era}: the outage is counted:\n{text}"
            );
            assert!(
                !text.contains(r#"server="a"}"#) && !text.contains(r#"server="b"}"#),
                "{era}: only c was down:\n{text}"
            );
        }
    })
    .await;
}

/// A tool name no server has is refused by the gateway itself: over raw HTTP, with an echo
/// backend that counts what reaches it.
#[tokio::test]
async fn an_unknown_federated_tool_never_reaches_a_server() {
    support::bounded(async {
        let one = Backend::echo("one").await;
        let two = Backend::echo("two").await;
        let r = route(
            "fed",
            json!({
                "match": {"pathPrefix": "/mcp"},
                "protocol": "mcp",
                "auth": {"required": false},
                "backends": [{"url": one.url(), "mcp": {"prefix": "one"}},
                             {"url": two.url(), "mcp": {"prefix": "two"}}],
            }),
        );
        let gw = support::gateway(yaml([r])).await;
        for name in ["three__x", "x", "one__", "__x"] {
            let resp = gw
                .http
                .post(gw.url("/mcp"))
                .header("mcp-protocol-version", "2026-07-28")
                .header("mcp-method", "tools/call")
                .header("mcp-name", name)
                .json(&json!({"jsonrpc": "2.0", "id": 4, "method": "tools/call",
                              "params": {"name": name, "arguments": {}}}))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 200, "{name}");
            let v: Value = resp.json().await.unwrap();
            assert_eq!(
                (&v["error"]["code"], &v["id"]),
                (&json!(-32602), &json!(4)),
                "{name}"
            );
        }
        // A header that disagrees with the body is refused before any server sees it.
        let lying = gw
            .http
            .post(gw.url("/mcp"))
            .header("mcp-method", "tools/call")
            .header("mcp-name", "two__x")
            .json(&json!({"jsonrpc": "2.0", "id": 5, "method": "tools/call",
                          "params": {"name": "one__x", "arguments": {}}}))
            .send()
            .await
            .unwrap();
        assert_eq!(lying.status(), 400);
        assert_eq!((one.count(), two.count()), (0, 0));
    })
    .await;
}

/// `mcp.tools[].rateLimit`: a client's calls of a limited tool past its burst fail as those
/// calls only (the SDK raises -32004 for each), never reach the server, and the session goes
/// on with other tools; the refusals are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_tool_limit_refuses_single_calls() {
    bounded_for(LIMIT, async {
        let a = McpServer::start("a", false).await;
        let r = route(
            "limited",
            json!({
                "match": {"pathPrefix": "/mcp"},
                "protocol": "mcp",
                "mcp": {"tools": [
                    {"name": "delete_*", "roles": ["user"], "rateLimit": {"requestsPerMinute": 2}},
                    {"name": "*", "roles": ["user"]},
                ]},
                "backends": [{"url": a.url()}],
            }),
        );
        let mut docs = vec![r];
        docs.extend(support::api_key(
            "default",
            "user",
            "user-app",
            "user-key-0123456789",
            &["user"],
            json!({}),
        ));
        let gw = support::gateway(yaml(docs)).await;
        let report = client(
            &["limited-key", &gw.url("/mcp"), "4", "user-key-0123456789"],
            LIMIT,
        )
        .await;
        let results = report["results"].as_array().unwrap();
        assert_eq!(results[0]["ok"], "deleted 0@a", "{report:#}");
        assert_eq!(results[1]["ok"], "deleted 1@a", "{report:#}");
        for r in &results[2..] {
            assert_eq!(r["code"], -32004, "{report:#}");
        }
        assert_eq!(report["after"]["ok"], "found q@a", "{report:#}");
        let text = gw.metrics().await;
        let line = r#"tollgate_mcp_tool_calls_total{outcome="tool_rate_limited",route="default/limited",tool="delete_repo"} 2"#;
        assert!(text.contains(line), "no {line} in:\n{text}");
    })
    .await;
}

/// `tollgate demo`'s MCP server (built into the binary) behind the demo's own configuration,
/// used by the official SDK with the demo user's key: its two tools listed and called; and the
/// call its printed curl line makes answers 13.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_mcp_server_works_through_the_demo_config() {
    bounded_for(LIMIT, async {
        let svc = tollgate::demo::spawn_demo_services(tollgate::demo::DemoOptions {
            token_delay: Duration::from_millis(1),
        })
        .await
        .unwrap();
        let gw = support::gateway(tollgate::demo::demo_config_yaml(&svc)).await;
        let key = tollgate::demo::DEMO_USER_KEY;
        let report = client(&["demo", &gw.url("/mcp"), key], LIMIT).await;
        assert_eq!(report["tools"], json!(["add", "search_docs"]), "{report:#}");
        assert_eq!(report["add"], "13", "{report:#}");
        assert!(
            report["search"].as_str().is_some_and(|s| !s.is_empty()),
            "{report:#}"
        );
        let lines = tollgate::demo::demo_curl_lines(gw.running.listen);
        let body = lines
            .lines()
            .find(|l| l.starts_with("curl") && l.contains("tools/call"))
            .and_then(|l| l.split_once(" -d '"))
            .and_then(|(_, b)| b.strip_suffix('\''))
            .expect("a printed tools/call line");
        let v: Value = gw
            .http
            .post(gw.url("/mcp"))
            .header("x-api-key", key)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(v["result"]["content"][0]["text"], "13", "{v}");
    })
    .await;
}
