//! The configuration the P4/P5 figures are measured on: 10,000 AgentRoutes of realistic shapes and
//! 100,000 AgentApiKeys. Shared by `bench/micro/hot_path.rs` and `bench/compile_rss.rs` through
//! `#[path]`, so both measure the very same objects.

use tollgate::api::fixtures::{api_key, RouteBuilder};
use tollgate::config::Store;

/// `routes` routes (a few path segments, a tenth with hosts, a quarter POST-only) and `keys` keys
/// spread over 50 namespaces and 20,000 clients.
pub fn store(routes: usize, keys: usize) -> Store {
    let mut s = Store::default();
    for i in 0..routes {
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
