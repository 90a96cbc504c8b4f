//! The `tollgate` binary as users run it: `check` on good and bad configuration (unknown fields
//! included), and `crdgen` against the checked-in `crds/tollgate.yaml`.

mod support;

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use serde_json::json;
use support::*;

/// Runs the built binary with `args`; bounded, killed if it hangs.
async fn tollgate(args: &[&str]) -> Output {
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(args)
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(Duration::from_secs(15), child)
        .await
        .unwrap_or_else(|_| panic!("tollgate {args:?} did not finish within 15 s"))
        .expect("run the tollgate binary")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("temporary paths are UTF-8")
}

#[tokio::test]
async fn check_accepts_a_good_configuration() {
    bounded(async {
        let dir = tempfile::tempdir().expect("temporary directory");
        let mut docs = api_key(
            "agents",
            "mobile",
            "mobile-app",
            "tg-cli-key",
            &["user"],
            json!({}),
        );
        docs.push(route_in(
            "agents",
            "chat",
            json!({"hosts": ["api.example.com"],
                   "match": {"pathPrefix": "/api/v1/chat", "methods": ["POST"]},
                   "protocol": "sse",
                   "timeouts": {"firstByte": "10s", "idle": "1m"},
                   "retry": {"attempts": 2, "retryOn": [502, "connect-failure"], "backoff": "50ms"},
                   "rewrite": {"pathPrefix": "/handle"},
                   "backends": [{"url": "http://127.0.0.1:9000"}]}),
        ));
        let file = dir.path().join("good.yaml");
        std::fs::write(&file, yaml(docs)).expect("write the config");

        let out = tollgate(&["check", "--config", path_str(&file)]).await;
        assert_eq!(
            out.status.code(),
            Some(0),
            "stdout: {}\nstderr: {}",
            stdout(&out),
            String::from_utf8_lossy(&out.stderr)
        );
        // A directory holding it checks the same.
        let out = tollgate(&["check", "--config", path_str(dir.path())]).await;
        assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    })
    .await;
}

#[tokio::test]
async fn check_lists_every_problem_with_its_file_and_field() {
    bounded(async {
        let dir = tempfile::tempdir().expect("temporary directory");
        let routes = dir.path().join("routes.yaml");
        let broken = dir.path().join("second.yaml");
        let docs = vec![
            route_in(
                "agents",
                "chat",
                json!({"match": {"pathPrefix": "api/v1/chat"},
                       "backends": [{"service": "conversation", "port": 8000, "url": "http://127.0.0.1:9000"}]}),
            ),
            api_key_spec(
                "agents",
                "mobile",
                json!({"clientId": "mobile-app", "secretRef": {"name": "no-such-secret", "key": "api-key"}}),
            ),
        ];
        std::fs::write(&routes, yaml(docs)).expect("write routes.yaml");
        std::fs::write(&broken, "apiVersion: v1\nkind: Secret\nmetadata: {name: x\n")
            .expect("write second.yaml");

        let out = tollgate(&["check", "--config", path_str(dir.path())]).await;
        let text = stdout(&out);
        assert_eq!(out.status.code(), Some(1), "{text}");
        let routes_file = path_str(&routes);
        let broken_file = path_str(&broken);
        let line_with = |file: &str, needles: &[&str]| {
            text.lines()
                .find(|l| l.starts_with(file) && needles.iter().all(|n| l.contains(n)))
                .unwrap_or_else(|| panic!("no line for {file} with {needles:?} in:\n{text}"))
                .to_string()
        };
        line_with(routes_file, &["AgentRoute agents/chat", "field spec.match.pathPrefix", "must start with '/'"]);
        line_with(routes_file, &["AgentRoute agents/chat", "field spec.backends[0]", "either service and port, or url"]);
        line_with(routes_file, &["AgentApiKey agents/mobile", "field spec.secretRef", "no-such-secret"]);
        line_with(broken_file, &["invalid YAML"]);
        assert!(text.contains("4 problem(s)"), "{text}");
    })
    .await;
}

/// Strict field validation, as `kubectl apply --validate=strict`: every field the gateway does
/// not know is an error with its file, document and path; the rest of the file checks as usual.
#[tokio::test]
async fn check_refuses_unknown_fields_with_their_file_and_path() {
    bounded(async {
        let dir = tempfile::tempdir().expect("temporary directory");
        let routes = dir.path().join("routes.yaml");
        let docs = vec![
            route_in(
                "default",
                "ok",
                json!({"match": {"pathPrefix": "/ok"}, "backends": [{"url": "http://127.0.0.1:9000"}]}),
            ),
            route_in(
                "default",
                "chat",
                json!({"match": {"pathPrefix": "/chat"}, "rateLimt": {"requestsPerMinute": 5},
                       "backends": [{"url": "http://127.0.0.1:9000", "wieght": 3}]}),
            ),
        ];
        std::fs::write(&routes, yaml(docs)).expect("write routes.yaml");

        let out = tollgate(&["check", "--config", path_str(&routes)]).await;
        let text = stdout(&out);
        assert_eq!(out.status.code(), Some(1), "{text}");
        let file = path_str(&routes);
        for field in ["spec.rateLimt", "spec.backends[0].wieght"] {
            let line = format!(
                "{file}: AgentRoute default/chat field {field}: unknown field in document 2; \
                 the object is not served (UnknownField)"
            );
            assert!(text.lines().any(|l| l == line), "no line {line:?} in:\n{text}");
        }
        assert!(text.contains("2 problem(s)"), "{text}");
    })
    .await;
}

#[tokio::test]
async fn crdgen_matches_the_checked_in_crds() {
    bounded(async {
        let out = tollgate(&["crdgen"]).await;
        assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("crds/tollgate.yaml");
        let checked_in = std::fs::read(&path).unwrap_or_default();
        assert!(
            out.stdout == checked_in,
            "crds/tollgate.yaml differs from `tollgate crdgen`: run `cargo run -q -- crdgen > crds/tollgate.yaml`"
        );
    })
    .await;
}
