//! Hot-path micro-benchmarks (targets P4, P5 in shared/design/targets.md): route match among
//! 10,000 routes, key lookup among 100,000 keys, compile of 10,000 routes + 100,000 keys, and the
//! local request limiter with 100,000 active clients. Figures are printed by criterion; nothing
//! here fails on a slow machine. Peak RSS of the compile: `bench/compile_rss.rs`.

#[path = "../store.rs"]
mod store;

use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, Method};
use std::hint::black_box;
use store::store;
use tollgate::config::{compile, CompileOptions, Match};
use tollgate::ratelimit::{BucketSpec, Clock, LocalLimiter};

/// Active clients in the limiter benches: every check finds an existing bucket among this many,
/// so the figure includes the cache misses of a large table, not one hot bucket.
const CLIENTS: usize = 100_000;

fn benches(c: &mut Criterion) {
    let st = store(10_000, 100_000);
    let snap = compile(&st, &CompileOptions::default());
    assert_eq!(snap.routes.len(), 10_000, "every route compiles");
    assert_eq!(snap.keys.len(), 100_000, "every key compiles");
    let headers = HeaderMap::new();

    c.bench_function("match/10k_routes/hit_deep_path", |b| {
        b.iter(|| {
            let m = snap.routes.find(
                black_box("api.example.com"),
                black_box("/api/v1/svc512/op3/items/42"),
                &Method::POST,
                &headers,
                None,
            );
            black_box(matches!(m, Match::Route(_)))
        })
    });
    c.bench_function("match/10k_routes/miss", |b| {
        b.iter(|| {
            let m = snap.routes.find(
                black_box("api.example.com"),
                black_box("/nothing/here/at/all"),
                &Method::GET,
                &headers,
                None,
            );
            black_box(matches!(m, Match::NotFound))
        })
    });
    c.bench_function("auth/100k_keys/lookup_hit", |b| {
        b.iter(|| black_box(snap.keys.lookup(black_box(b"plain-key-00054321")).is_some()))
    });
    c.bench_function("auth/100k_keys/lookup_miss", |b| {
        b.iter(|| black_box(snap.keys.lookup(black_box(b"not-a-key-at-all")).is_none()))
    });
    c.bench_function("path/normalize_clean", |b| {
        b.iter(|| {
            black_box(tollgate::config::path::normalize(black_box(
                "/api/v1/chat/stream",
            )))
        })
    });

    let mut g = c.benchmark_group("compile");
    g.sample_size(10);
    g.bench_function("10k_routes_100k_keys", |b| {
        b.iter(|| black_box(compile(&st, &CompileOptions::default()).routes.len()))
    });
    g.finish();
}

/// A limit far above what a benchmark can spend, so every check admits (the "not hit" case).
const UNHIT: u32 = 1_000_000_000;

fn key_bucket(client: &str) -> BucketSpec<'_> {
    BucketSpec {
        client,
        route: None,
        per_minute: UNHIT,
        burst: UNHIT,
    }
}

fn route_bucket(client: &str) -> BucketSpec<'_> {
    BucketSpec {
        client,
        route: Some("bench/chat"),
        per_minute: UNHIT,
        burst: UNHIT,
    }
}

fn limiter_benches(c: &mut Criterion) {
    let clients: Vec<String> = (0..CLIENTS).map(|i| format!("client-{i}")).collect();
    let clock = Clock::system();
    let limiter = LocalLimiter::new();
    // Steady state: every client already holds its key bucket and its route bucket.
    for cl in &clients {
        let d = limiter.check_at(&[key_bucket(cl), route_bucket(cl)], clock.now());
        assert!(d.is_allowed());
    }
    assert_eq!(limiter.len(), 2 * CLIENTS);

    // Clients in a scattered order (a stride coprime with CLIENTS), as concurrent traffic is.
    let mut i = 0usize;
    let mut next = move || {
        i = (i + 7_919) % CLIENTS;
        i
    };
    c.bench_function("limiter/local/1_bucket_100k_clients", |b| {
        b.iter(|| {
            let cl = &clients[next()];
            black_box(
                limiter
                    .check_at(&[key_bucket(cl)], clock.now())
                    .is_allowed(),
            )
        })
    });
    c.bench_function("limiter/local/2_buckets_100k_clients", |b| {
        b.iter(|| {
            let cl = &clients[next()];
            black_box(
                limiter
                    .check_at(&[key_bucket(cl), route_bucket(cl)], clock.now())
                    .is_allowed(),
            )
        })
    });
}

/// MCP: sealing and opening a session id (issue 13: under 1 µs each), and cutting a `tools/list`
/// answer of 100 tools to what a caller may use.
fn mcp_benches(c: &mut Criterion) {
    use std::sync::Arc;
    use tollgate::mcp::tools::{ListFilter, ToolAccess, ToolRule};
    use tollgate::mcp::{SessionKeys, SessionTarget};

    let keys = SessionKeys::random();
    let target = SessionTarget {
        backend: "agents/github-mcp:8080".into(),
        endpoint: "10.0.3.17:8080".parse().expect("an address"),
        upstream_id: "6f9b1c0e2d8a4b7c9e1f3a5b7d9c0e2f".into(),
    };
    c.bench_function("mcp/session/seal", |b| {
        b.iter(|| keys.seal(black_box("agents/tools"), black_box(&target)))
    });
    let id = keys.seal("agents/tools", &target).expect("seals");
    c.bench_function("mcp/session/open", |b| {
        b.iter(|| keys.open(black_box("agents/tools"), black_box(id.as_bytes())))
    });
    let tools: Vec<serde_json::Value> = (0..100)
        .map(|i| {
            serde_json::json!({"name": if i % 2 == 0 { format!("search_{i}") } else { format!("delete_{i}") },
                "description": "a tool of the benchmark", "inputSchema": {"type": "object",
                "properties": {"query": {"type": "string"}}, "required": ["query"]}})
        })
        .collect();
    let answer =
        serde_json::json!({"jsonrpc": "2.0", "id": 2, "result": {"tools": tools}}).to_string();
    let access = Arc::new(ToolAccess {
        rules: vec![
            ToolRule {
                name: "search_*".into(),
                roles: vec![Arc::from("user")],
                rate_limit: None,
            },
            ToolRule {
                name: "delete_*".into(),
                roles: vec![Arc::from("admin")],
                rate_limit: None,
            },
        ],
        deny_unlisted: true,
    });
    let roles: Arc<[Arc<str>]> = Arc::from(vec![Arc::from("user")]);
    let sse = format!("event: message\ndata: {answer}\n\n");
    c.bench_function("mcp/tools_list_filter/100_tools_json", |b| {
        b.iter(|| {
            let mut f = ListFilter::new(access.clone(), roles.clone(), false, 1 << 20);
            let mut out = f.push(black_box(answer.as_bytes())).expect("fits");
            out.extend(f.finish());
            out
        })
    });
    c.bench_function("mcp/tools_list_filter/100_tools_sse", |b| {
        b.iter(|| {
            let mut f = ListFilter::new(access.clone(), roles.clone(), true, 1 << 20);
            let mut out = f.push(black_box(sse.as_bytes())).expect("fits");
            out.extend(f.finish());
            out
        })
    });
}

criterion_group!(hot_path, benches, limiter_benches, mcp_benches);
criterion_main!(hot_path);
