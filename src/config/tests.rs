//! compile() and matching, without sockets or a cluster.

use http::{HeaderMap, HeaderValue, Method};

use super::*;
use crate::api::fixtures::{api_key, secret, RouteBuilder};
use crate::api::{AgentApiKeySpec, SecretKeyRef};

fn snap(store: &Store) -> Snapshot {
    compile(store, &CompileOptions::default())
}

fn find<'a>(s: &'a Snapshot, host: &str, path: &str, method: Method) -> Option<&'a str> {
    match s.routes.find(host, path, &method, &HeaderMap::new(), None) {
        Match::Route(r) => Some(&r.name),
        _ => None,
    }
}

#[test]
fn longest_segment_aware_prefix_wins() {
    let mut st = Store::default();
    st.routes.push(
        RouteBuilder::new("chat")
            .prefix("/api/v1/chat")
            .url("http://127.0.0.1:1")
            .build(),
    );
    st.routes.push(
        RouteBuilder::new("stream")
            .prefix("/api/v1/chat/stream")
            .url("http://127.0.0.1:2")
            .build(),
    );
    st.routes.push(
        RouteBuilder::new("root")
            .prefix("/")
            .url("http://127.0.0.1:3")
            .build(),
    );
    let s = snap(&st);
    assert!(s.problems.is_empty(), "{:?}", s.problems);
    assert_eq!(find(&s, "h", "/api/v1/chat", Method::GET), Some("chat"));
    assert_eq!(find(&s, "h", "/api/v1/chat/", Method::GET), Some("chat"));
    assert_eq!(find(&s, "h", "/api/v1/chat/x", Method::GET), Some("chat"));
    assert_eq!(
        find(&s, "h", "/api/v1/chat/stream/1", Method::GET),
        Some("stream")
    );
    assert_eq!(find(&s, "h", "/api/v1/chatty", Method::GET), Some("root"));
    assert_eq!(find(&s, "h", "/", Method::GET), Some("root"));
}

#[test]
fn hosts_exact_beat_wildcard_beat_any() {
    let mut st = Store::default();
    st.routes.push(
        RouteBuilder::new("any")
            .prefix("/a")
            .url("http://127.0.0.1:1")
            .build(),
    );
    st.routes.push(
        RouteBuilder::new("wild")
            .prefix("/a")
            .host("*.example.com")
            .url("http://127.0.0.1:2")
            .build(),
    );
    st.routes.push(
        RouteBuilder::new("exact")
            .prefix("/a")
            .host("api.example.com")
            .url("http://127.0.0.1:3")
            .build(),
    );
    let s = snap(&st);
    assert!(s.problems.is_empty(), "{:?}", s.problems);
    assert_eq!(
        find(&s, "api.example.com", "/a", Method::GET),
        Some("exact")
    );
    assert_eq!(find(&s, "x.example.com", "/a", Method::GET), Some("wild"));
    assert_eq!(find(&s, "a.b.example.com", "/a", Method::GET), Some("wild"));
    assert_eq!(find(&s, "example.com", "/a", Method::GET), Some("any"));
    assert_eq!(find(&s, "other.org", "/a", Method::GET), Some("any"));
}

#[test]
fn wrong_method_is_405_with_allow() {
    let mut st = Store::default();
    st.routes.push(
        RouteBuilder::new("post")
            .prefix("/x")
            .methods(&["POST"])
            .url("http://127.0.0.1:1")
            .build(),
    );
    st.routes.push(
        RouteBuilder::new("get")
            .prefix("/x")
            .methods(&["GET"])
            .url("http://127.0.0.1:2")
            .build(),
    );
    let s = snap(&st);
    assert!(s.problems.is_empty(), "{:?}", s.problems);
    assert_eq!(find(&s, "h", "/x", Method::GET), Some("get"));
    assert_eq!(find(&s, "h", "/x", Method::POST), Some("post"));
    match s
        .routes
        .find("h", "/x", &Method::DELETE, &HeaderMap::new(), None)
    {
        Match::MethodNotAllowed(allow) => assert_eq!(allow, "GET, POST"),
        other => panic!("expected 405, got {other:?}"),
    }
}

#[test]
fn header_conditions_are_more_specific() {
    let mut st = Store::default();
    st.routes.push(
        RouteBuilder::new("plain")
            .prefix("/x")
            .url("http://127.0.0.1:1")
            .build(),
    );
    st.routes.push(
        RouteBuilder::new("planner")
            .prefix("/x")
            .header("x-agent", "planner")
            .url("http://127.0.0.1:2")
            .build(),
    );
    let s = snap(&st);
    let mut h = HeaderMap::new();
    h.insert("x-agent", HeaderValue::from_static("planner"));
    assert!(
        matches!(s.routes.find("h", "/x", &Method::GET, &h, None), Match::Route(r) if r.name == "planner")
    );
    h.insert("x-agent", HeaderValue::from_static("other"));
    assert!(
        matches!(s.routes.find("h", "/x", &Method::GET, &h, None), Match::Route(r) if r.name == "plain")
    );
}

#[test]
fn conflicts_go_to_the_oldest_and_the_loser_is_reported() {
    let mut st = Store::default();
    st.routes.push(
        RouteBuilder::new("first")
            .prefix("/x")
            .url("http://127.0.0.1:1")
            .build(),
    );
    st.routes.push(
        RouteBuilder::new("second")
            .prefix("/x/")
            .url("http://127.0.0.1:2")
            .build(),
    );
    let s = snap(&st);
    assert_eq!(find(&s, "h", "/x", Method::GET), Some("first"));
    let loser = s
        .reports
        .iter()
        .find(|r| &*r.object.name == "second")
        .expect("report for the loser");
    assert_eq!(loser.conditions[0].reason, "Conflicted");
    assert!(s.problems.iter().any(|p| p.reason == "Conflicted"));
}

#[test]
fn a_broken_route_never_breaks_the_others() {
    let mut st = Store::default();
    st.routes.push(
        RouteBuilder::new("good")
            .prefix("/good")
            .url("http://127.0.0.1:1")
            .build(),
    );
    let mut bad = RouteBuilder::new("bad")
        .prefix("/bad")
        .url("ftp://nope")
        .build();
    bad.spec.timeouts = Some(crate::api::Timeouts {
        request: Some("10 parsecs".into()),
        ..Default::default()
    });
    st.routes.push(bad);
    st.routes.push(
        RouteBuilder::new("noprefix")
            .prefix("api")
            .url("http://127.0.0.1:1")
            .build(),
    );
    let s = snap(&st);
    assert_eq!(s.routes.len(), 1);
    assert_eq!(find(&s, "h", "/good", Method::GET), Some("good"));
    let fields: Vec<&str> = s.problems.iter().map(|p| p.field.as_str()).collect();
    assert!(fields.contains(&"spec.backends[0].url"), "{fields:?}");
    assert!(fields.contains(&"spec.timeouts.request"), "{fields:?}");
    assert!(fields.contains(&"spec.match.pathPrefix"), "{fields:?}");
}

#[test]
fn gateway_class_filters_routes() {
    let mut st = Store::default();
    let mut other = RouteBuilder::new("other")
        .prefix("/o")
        .url("http://127.0.0.1:1")
        .build();
    other.spec.gateway_class = Some("internal".into());
    st.routes.push(other);
    st.routes.push(
        RouteBuilder::new("mine")
            .prefix("/m")
            .url("http://127.0.0.1:1")
            .build(),
    );
    let s = snap(&st);
    assert_eq!(s.routes.len(), 1);
    assert!(s.reports.iter().all(|r| &*r.object.name != "other"));
}

#[test]
fn keys_by_secret_or_hash_and_their_problems() {
    let mut st = Store::default();
    st.keys
        .push(api_key("by-hash", "agents", "c1", "hash-key", &["user"]));
    let mut by_secret = api_key("by-secret", "agents", "c2", "unused", &["admin"]);
    by_secret.spec = AgentApiKeySpec {
        key_hash: None,
        secret_ref: Some(SecretKeyRef {
            name: "s".into(),
            key: "api-key".into(),
        }),
        ..by_secret.spec
    };
    st.keys.push(by_secret.clone());
    let mut missing = by_secret.clone();
    missing.metadata.name = Some("missing".into());
    missing.spec.secret_ref = Some(SecretKeyRef {
        name: "nope".into(),
        key: "api-key".into(),
    });
    st.keys.push(missing);
    st.secrets.insert(
        ObjectKey::new("agents", "s"),
        secret("s", "agents", "api-key", "secret-key\n"),
    );
    let s = snap(&st);
    assert_eq!(s.keys.len(), 2);
    assert_eq!(
        s.keys.lookup(b"hash-key").map(|k| &*k.client_id),
        Some("c1")
    );
    assert_eq!(
        s.keys.lookup(b"secret-key").map(|k| &*k.client_id),
        Some("c2"),
        "trailing newline of the Secret value is trimmed"
    );
    assert!(s
        .problems
        .iter()
        .any(|p| p.reason == "SecretNotFound" && &*p.object.name == "missing"));
    // Nothing in the snapshot's debug output holds a plain key.
    let dbg = format!("{s:?} {:?}", s.keys);
    assert!(!dbg.contains("secret-key") && !dbg.contains("hash-key"));
}

#[test]
fn rewrite_replaces_the_prefix() {
    let mut st = Store::default();
    let mut r = RouteBuilder::new("chat")
        .prefix("/api/v1/chat")
        .url("http://127.0.0.1:1")
        .build();
    r.spec.rewrite = Some(crate::api::Rewrite {
        path_prefix: "/handle".into(),
    });
    st.routes.push(r);
    let s = snap(&st);
    let route = &s.routes.routes()[0];
    assert_eq!(route.rewrite_path("/api/v1/chat"), "/handle");
    assert_eq!(route.rewrite_path("/api/v1/chat/x/y"), "/handle/x/y");
}

#[test]
fn federation_needs_a_distinct_prefix_on_every_backend_of_an_mcp_route() {
    let fed = |name: &str, prefixes: &[Option<&str>], protocol: crate::api::Protocol| {
        let mut b = RouteBuilder::new(name).prefix(&format!("/{name}"));
        for (i, _) in prefixes.iter().enumerate() {
            b = b.url(&format!("http://127.0.0.1:{}", 9000 + i));
        }
        let mut r = b.build();
        r.spec.protocol = protocol;
        for (backend, p) in r.spec.backends.iter_mut().zip(prefixes) {
            backend.mcp = p.map(|p| crate::api::BackendMcp { prefix: p.into() });
        }
        r
    };
    use crate::api::Protocol::{Http, Mcp};
    let mut st = Store::default();
    st.routes
        .push(fed("ok", &[Some("github"), Some("jira")], Mcp));
    st.routes.push(fed("replicas", &[None, None], Mcp));
    st.routes.push(fed("mixed", &[Some("github"), None], Mcp));
    st.routes.push(fed("twice", &[Some("a"), Some("a")], Mcp));
    st.routes.push(fed("sep", &[Some("a__b")], Mcp));
    st.routes.push(fed("http", &[Some("a")], Http));
    let s = snap(&st);
    let names: Vec<&str> = s.routes.routes().iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names.len(), 2, "{names:?}");
    let ok = s.routes.routes().iter().find(|r| r.name == "ok").unwrap();
    let servers = &ok.mcp_federation.as_ref().unwrap().servers;
    assert_eq!(
        servers
            .iter()
            .map(|s| (&*s.prefix, s.backend))
            .collect::<Vec<_>>(),
        [("github", 0), ("jira", 1)]
    );
    let replicas = s
        .routes
        .routes()
        .iter()
        .find(|r| r.name == "replicas")
        .unwrap();
    assert!(replicas.mcp_federation.is_none());
    for bad in ["mixed", "twice", "sep", "http"] {
        let p = s
            .problems
            .iter()
            .find(|p| &*p.object.name == bad)
            .unwrap_or_else(|| panic!("{bad} is reported"));
        assert_eq!(p.field, "spec.backends", "{bad}");
    }
}
