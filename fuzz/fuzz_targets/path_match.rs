//! Path matching: any request path through `path::normalize`, then `RouteTable::find` on a fixed
//! table where `/api/v1/tools` needs role admin and `/api/v1/chat` is open to users. Besides "no
//! panic", it checks the properties the gateway's authorisation rests on:
//! - a normalised path is a fixed point, absolute, without empty, `.` or `..` segments, and
//!   without an escaped separator or NUL;
//! - the tools route is chosen exactly when the normalised path is `/api/v1/tools` or under it.
#![no_main]

use std::sync::{Arc, OnceLock};

use http::{HeaderMap, Method};
use libfuzzer_sys::fuzz_target;
use tollgate::config::path::normalize;
use tollgate::config::{compile, CompileOptions, Match, Snapshot};

const TABLE: &str = r#"
apiVersion: tollgate.dev/v1alpha1
kind: AgentRoute
metadata: {name: tools, namespace: agents}
spec:
  match: {pathPrefix: /api/v1/tools}
  auth: {roles: [admin]}
  backends: [{url: "http://127.0.0.1:9001"}]
---
apiVersion: tollgate.dev/v1alpha1
kind: AgentRoute
metadata: {name: chat, namespace: agents}
spec:
  match: {pathPrefix: /api/v1/chat, methods: [GET, POST]}
  auth: {roles: [user, admin]}
  backends: [{url: "http://127.0.0.1:9002"}]
---
apiVersion: tollgate.dev/v1alpha1
kind: AgentRoute
metadata: {name: chat-stream, namespace: agents}
spec:
  match: {pathPrefix: /api/v1/chat/stream}
  protocol: sse
  backends: [{url: "http://127.0.0.1:9003"}]
---
apiVersion: tollgate.dev/v1alpha1
kind: AgentRoute
metadata: {name: public, namespace: agents}
spec:
  hosts: [public.example.com]
  match: {pathPrefix: /}
  auth: {required: false}
  backends: [{url: "http://127.0.0.1:9004"}]
"#;

fn table() -> &'static Arc<Snapshot> {
    static SNAP: OnceLock<Arc<Snapshot>> = OnceLock::new();
    SNAP.get_or_init(|| {
        let store = tollgate::sources::files::parse_str(TABLE).expect("the fixed table parses");
        let snap = compile(&store, &CompileOptions::default());
        assert!(snap.problems.is_empty(), "{:?}", snap.problems);
        Arc::new(snap)
    })
}

fn under(path: &str, prefix: &str) -> bool {
    path == prefix
        || path
            .strip_prefix(prefix)
            .is_some_and(|r| r.starts_with('/'))
}

fuzz_target!(|data: &[u8]| {
    // First byte picks the method and host; the rest is the path.
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let Ok(raw) = std::str::from_utf8(rest) else {
        return;
    };
    let method = match sel % 5 {
        0 => Method::GET,
        1 => Method::POST,
        2 => Method::DELETE,
        3 => Method::OPTIONS,
        _ => Method::PUT,
    };
    let host = if sel & 0x80 != 0 {
        "public.example.com"
    } else {
        "api.example.com"
    };
    let Ok(path) = normalize(raw) else {
        return;
    };
    assert!(path.starts_with('/'), "{raw:?} -> {path:?}");
    assert_eq!(
        normalize(&path).as_deref(),
        Ok(&*path),
        "not a fixed point: {raw:?}"
    );
    let inner = path.strip_prefix('/').unwrap_or(&path);
    let inner = inner.strip_suffix('/').unwrap_or(inner);
    if !inner.is_empty() {
        for seg in inner.split('/') {
            assert!(
                !matches!(seg, "" | "." | ".."),
                "segment {seg:?} in {path:?} from {raw:?}"
            );
        }
    }
    for bad in ["%2F", "%5C", "%00", "\\"] {
        assert!(
            !path.contains(bad),
            "{bad} survived in {path:?} from {raw:?}"
        );
    }

    let snap = table();
    let found = snap
        .routes
        .find(host, &path, &method, &HeaderMap::new(), None);
    let tools = matches!(&found, Match::Route(r) if r.name.as_str() == "tools");
    assert_eq!(
        tools,
        under(&path, "/api/v1/tools"),
        "{raw:?} normalised to {path:?} on {host}"
    );
    if let Match::Route(r) = &found {
        // The forwarded path keeps the normalised form under the route's rewrite.
        let _ = r.rewrite_path(&path);
    }
});
