//! Hot-path micro-benchmarks (targets P4, P5 in shared/design/targets.md): route match among
//! 10,000 routes, key lookup among 100,000 keys, compile of 10,000 routes + 100,000 keys.
//! Figures are printed by criterion; nothing here fails on a slow machine.

use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, Method};
use std::hint::black_box;
use tollgate::api::fixtures::{api_key, RouteBuilder};
use tollgate::config::{compile, CompileOptions, Match, Store};

fn store(routes: usize, keys: usize) -> Store {
    let mut s = Store::default();
    for i in 0..routes {
        // Realistic shapes: a few segments, a tenth with hosts, some with methods.
        let mut b = RouteBuilder::new(&format!("r{i}"))
            .namespace(&format!("ns{}", i % 50))
            .prefix(&format!("/api/v{}/svc{}/op{}", i % 3, i / 10, i % 10))
            .url(&format!(
                "http://10.0.{}.{}:8080",
                (i / 250) % 250,
                i % 250 + 1
            ));
        if i % 10 == 0 {
            b = b.host(&format!("tenant{}.example.com", i % 100));
        }
        if i % 4 == 0 {
            b = b.methods(&["POST"]);
        }
        s.routes.push(b.build());
    }
    for i in 0..keys {
        s.keys.push(api_key(
            &format!("k{i}"),
            &format!("ns{}", i % 50),
            &format!("client-{}", i % 20_000),
            &format!("plain-key-{i:08}"),
            &["user"],
        ));
    }
    s
}

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

criterion_group!(hot_path, benches);
criterion_main!(hot_path);
