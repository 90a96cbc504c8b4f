//! TLS termination by SNI with certificates from `kubernetes.io/tls` Secrets (two hosts, two
//! certificates, two backends), and HTTP/2 from clients: h2c on the plain listener and ALPN h2
//! over TLS.

mod support;

use std::net::SocketAddr;

use http::StatusCode;
use serde_json::json;
use support::*;

/// A self-signed certificate for `host`: (certificate PEM, private key PEM, certificate DER).
fn self_signed(host: &str) -> (String, String, Vec<u8>) {
    let ck = rcgen::generate_simple_self_signed(vec![host.to_string()])
        .expect("rcgen makes a certificate");
    (
        ck.cert.pem(),
        ck.signing_key.serialize_pem(),
        ck.cert.der().to_vec(),
    )
}

struct TlsSetup {
    a: Backend,
    b: Backend,
    a_cert: (String, String, Vec<u8>),
    b_cert: (String, String, Vec<u8>),
    gw: Gateway,
}

impl TlsSetup {
    fn tls_addr(&self) -> SocketAddr {
        self.gw
            .running
            .tls_listen
            .expect("the TLS listener is bound")
    }

    /// A client that trusts exactly `roots` and resolves both hosts to the TLS listener.
    fn client(&self, roots: &[&str], h2_only: bool) -> reqwest::Client {
        let mut cb = reqwest::Client::builder()
            .no_proxy()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .tls_info(true)
            .timeout(std::time::Duration::from_secs(10))
            .resolve("a.example.com", self.tls_addr())
            .resolve("b.example.com", self.tls_addr());
        for pem in roots {
            cb = cb.add_root_certificate(
                reqwest::Certificate::from_pem(pem.as_bytes()).expect("a PEM certificate"),
            );
        }
        if h2_only {
            cb = cb.http2_prior_knowledge();
        } else {
            cb = cb.http1_only();
        }
        cb.build().expect("build a TLS client")
    }

    fn url(&self, host: &str, path: &str) -> String {
        format!("https://{host}:{}{path}", self.tls_addr().port())
    }
}

async fn tls_setup() -> TlsSetup {
    let a = Backend::echo("backend-a").await;
    let b = Backend::echo("backend-b").await;
    let a_cert = self_signed("a.example.com");
    let b_cert = self_signed("b.example.com");
    let tls_secret = |name: &str, (crt, key, _): &(String, String, Vec<u8>)| {
        secret(
            "default",
            name,
            "kubernetes.io/tls",
            json!({"tls.crt": crt, "tls.key": key}),
        )
    };
    let open = json!({"required": false});
    let docs = vec![
        tls_secret("a-tls", &a_cert),
        tls_secret("b-tls", &b_cert),
        route(
            "site-a",
            json!({"hosts": ["a.example.com"], "match": {"pathPrefix": "/"}, "auth": open,
                   "tls": {"secretName": "a-tls"}, "backends": [{"url": a.url()}]}),
        ),
        route(
            "site-b",
            json!({"hosts": ["b.example.com"], "match": {"pathPrefix": "/"}, "auth": open,
                   "tls": {"secretName": "b-tls"}, "backends": [{"url": b.url()}]}),
        ),
    ];
    let gw = gateway_with(yaml(docs), |o| {
        o.tls_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    })
    .await;
    TlsSetup {
        a,
        b,
        a_cert,
        b_cert,
        gw,
    }
}

fn peer_certificate(resp: &reqwest::Response) -> Vec<u8> {
    resp.extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|i| i.peer_certificate())
        .expect("TLS info with the peer certificate")
        .to_vec()
}

#[tokio::test]
async fn each_host_gets_its_own_certificate_and_backend() {
    bounded(async {
        let s = tls_setup().await;
        let both = s.client(&[&s.a_cert.0, &s.b_cert.0], false);

        for (host, cert, want) in [
            ("a.example.com", &s.a_cert.2, "backend-a"),
            ("b.example.com", &s.b_cert.2, "backend-b"),
        ] {
            let r = both
                .get(s.url(host, "/hello"))
                .send()
                .await
                .unwrap_or_else(|e| panic!("TLS request to {host}: {e:?}"));
            assert_eq!(r.status(), StatusCode::OK, "{host}");
            assert_eq!(r.version(), http::Version::HTTP_11);
            assert_eq!(
                &peer_certificate(&r),
                cert,
                "{host} is served its own certificate"
            );
            assert_eq!(r.text().await.expect("body"), want, "{host}");
        }
        assert_eq!(
            s.a.last().header("x-forwarded-proto").as_deref(),
            Some("https")
        );
        // X-Forwarded-Host is the authority as the client sent it, port included.
        let xfh = s.b.last().header("x-forwarded-host").unwrap_or_default();
        assert!(xfh.starts_with("b.example.com:"), "{xfh}");

        // Trusting only the right root is enough; trusting only the other host's root fails
        // the handshake, because the gateway presents the certificate of the name asked for.
        let only_a = s.client(&[&s.a_cert.0], false);
        let only_b = s.client(&[&s.b_cert.0], false);
        let r = only_a
            .get(s.url("a.example.com", "/"))
            .send()
            .await
            .expect("a.example.com with a's root");
        assert_eq!(r.status(), StatusCode::OK);
        let r = only_b
            .get(s.url("b.example.com", "/"))
            .send()
            .await
            .expect("b.example.com with b's root");
        assert_eq!(r.status(), StatusCode::OK);
        let err = only_b
            .get(s.url("a.example.com", "/"))
            .send()
            .await
            .expect_err("a.example.com must not verify against b's root");
        assert!(err.is_connect(), "a handshake failure: {err:?}");
        let err = only_a
            .get(s.url("b.example.com", "/"))
            .send()
            .await
            .expect_err("b.example.com must not verify against a's root");
        assert!(err.is_connect(), "a handshake failure: {err:?}");
        assert_eq!(s.a.count(), 2);
        assert_eq!(s.b.count(), 2);
    })
    .await;
}

#[tokio::test]
async fn http2_over_tls_with_alpn() {
    bounded(async {
        let s = tls_setup().await;
        // Not prior knowledge: the client offers h2 and http/1.1 by ALPN and gets h2.
        let client = reqwest::Client::builder()
            .no_proxy()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(
                reqwest::Certificate::from_pem(s.b_cert.0.as_bytes()).expect("PEM"),
            )
            .resolve("b.example.com", s.tls_addr())
            .build()
            .expect("client");
        let r = client
            .get(s.url("b.example.com", "/h2?x=1"))
            .send()
            .await
            .expect("h2 over TLS");
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.version(), http::Version::HTTP_2, "ALPN picked h2");
        assert_eq!(r.text().await.expect("body"), "backend-b");
        let seen = s.b.last();
        assert_eq!(seen.path_and_query(), "/h2?x=1");
        let xfh = seen.header("x-forwarded-host").unwrap_or_default();
        assert!(xfh.starts_with("b.example.com:"), "{xfh}");

        // Several requests multiplexed on the one connection.
        let (r1, r2) = tokio::join!(
            client.get(s.url("b.example.com", "/one")).send(),
            client.get(s.url("b.example.com", "/two")).send()
        );
        for r in [r1, r2] {
            let r = r.expect("h2 request");
            assert_eq!(r.version(), http::Version::HTTP_2);
            assert_eq!(r.status(), StatusCode::OK);
        }

        // Prior-knowledge h2 over TLS works too.
        let h2 = s.client(&[&s.a_cert.0], true);
        let r = h2
            .get(s.url("a.example.com", "/"))
            .send()
            .await
            .expect("h2 prior knowledge over TLS");
        assert_eq!(r.version(), http::Version::HTTP_2);
        assert_eq!(r.text().await.expect("body"), "backend-a");
    })
    .await;
}

#[tokio::test]
async fn h2c_on_the_plain_listener() {
    bounded(async {
        let b = Backend::echo("plain").await;
        let gw = gateway(yaml([route(
            "api",
            json!({"match": {"pathPrefix": "/api"}, "auth": {"required": false},
                   "backends": [{"url": b.url()}]}),
        )]))
        .await;
        let h2c = reqwest::Client::builder()
            .no_proxy()
            .http2_prior_knowledge()
            .build()
            .expect("client");
        let r = h2c
            .post(gw.url("/api/x?y=2"))
            .header("x-request-id", "h2c-1")
            .body("payload")
            .send()
            .await
            .expect("h2c request");
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.version(), http::Version::HTTP_2);
        assert_eq!(
            r.headers().get("x-request-id").map(|v| v.as_bytes()),
            Some(&b"h2c-1"[..])
        );
        assert_eq!(r.text().await.expect("body"), "plain");
        let seen = b.last();
        assert_eq!(seen.path_and_query(), "/api/x?y=2");
        assert_eq!(&seen.body[..], b"payload");
        assert_eq!(seen.header("x-forwarded-proto").as_deref(), Some("http"));

        // The same listener still speaks HTTP/1.1.
        let r = gw.get("/api/y").await;
        assert_eq!(r.version(), http::Version::HTTP_11);
        assert_eq!(r.status(), StatusCode::OK);
    })
    .await;
}

/// h2spec (the HTTP/2 conformance suite, R9): its path from `TOLLGATE_H2SPEC` (scripts/test.sh
/// sets it), else built and cached by `hack/build-go-tool.sh h2spec`.
fn h2spec() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("TOLLGATE_H2SPEC") {
        return p.into();
    }
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new(repo.join("hack/build-go-tool.sh"))
        .arg("h2spec")
        .output()
        .expect("run hack/build-go-tool.sh h2spec");
    assert!(
        out.status.success(),
        "building h2spec failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().last().expect("the tool's path").trim().into()
}

/// Runs h2spec against `port`; returns its summary line and the cases that failed, each with
/// what h2spec expected and saw.
async fn run_h2spec(port: u16, tls: bool) -> (String, Vec<String>) {
    let mut cmd = tokio::process::Command::new(h2spec());
    cmd.args(["-h", "localhost", "-p", &port.to_string(), "-o", "3"]);
    if tls {
        cmd.args(["-t", "-k"]);
    }
    let out = tokio::time::timeout(std::time::Duration::from_secs(240), cmd.output())
        .await
        .expect("h2spec finishes within 4 minutes")
        .expect("h2spec runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let summary = text
        .lines()
        .rev()
        .find(|l| l.contains(" tests, "))
        .unwrap_or("")
        .trim()
        .to_string();
    assert!(!summary.is_empty(), "h2spec printed no summary:\n{text}");
    // The list after "Failures:" names each failed case once, followed by its indented
    // "->", "Expected:" and "Actual:" lines.
    let mut failures: Vec<String> = Vec::new();
    for line in text.split("Failures:").nth(1).unwrap_or("").lines() {
        let l = line.trim();
        if let Some(case) = l.strip_prefix('×') {
            failures.push(case.trim().to_string());
        } else if l.starts_with("Expected:") || l.starts_with("Actual:") {
            if let Some(last) = failures.last_mut() {
                last.push_str(" | ");
                last.push_str(l);
            }
        }
    }
    (summary, failures)
}

/// R9, with the defect it found: over TLS with ALPN `h2`, bytes that are not the HTTP/2
/// preface got an HTTP/1.1 400 (case http2/3.5/2); a connection is served as the protocol ALPN
/// chose. Every case passes over TLS; over h2c every case but 3.5/2 (see below).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2spec_passes_every_case_over_tls() {
    let backend = Backend::echo("h2spec").await;
    let (crt, key, _) = self_signed("localhost");
    let docs = vec![
        secret(
            "default",
            "localhost-tls",
            "kubernetes.io/tls",
            json!({"tls.crt": crt, "tls.key": key}),
        ),
        route(
            "h2spec",
            json!({"hosts": ["localhost"], "match": {"pathPrefix": "/"},
                   "auth": {"required": false}, "tls": {"secretName": "localhost-tls"},
                   "backends": [{"url": backend.url()}]}),
        ),
    ];
    let gw = gateway_with(yaml(docs), |o| {
        o.tls_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    })
    .await;
    let tls_port = gw.running.tls_listen.expect("TLS listener").port();
    let (mut tls, mut failed) = run_h2spec(tls_port, true).await;
    if !failed.is_empty() {
        // Seen about once in 15 runs under CI load, in a debug build, and never when the case
        // runs alone: 6.9.1/3 met a RST_STREAM with another code before its WINDOW_UPDATEs
        // were read. A second full run must pass every case, so a real regression still fails.
        eprintln!("h2spec over TLS, first run: {tls}; failed: {failed:#?}; running it again");
        (tls, failed) = run_h2spec(tls_port, true).await;
    }
    assert!(
        failed.is_empty() && tls.contains(" 0 failed"),
        "h2spec over TLS: {tls}; failed: {failed:#?}"
    );
    // The plain port serves HTTP/1.1 and h2c on one socket, told apart by the first bytes, so
    // bytes that are not the HTTP/2 preface are read as HTTP/1.1 (answered 400, then closed):
    // case 3.5/2 cannot hold there by design. Every other case must.
    let h2c_ok = |failed: &[String]| {
        failed
            .iter()
            .all(|f| f.contains("invalid connection preface"))
            && failed.len() <= 1
    };
    let (mut h2c, mut failed) = run_h2spec(gw.running.listen.port(), false).await;
    if !h2c_ok(&failed) {
        eprintln!("h2spec over h2c, first run: {h2c}; failed: {failed:#?}; running it again");
        (h2c, failed) = run_h2spec(gw.running.listen.port(), false).await;
    }
    assert!(
        h2c_ok(&failed),
        "h2spec over h2c: {h2c}; failed: {failed:#?}"
    );
    println!("h2spec over TLS: {tls}; over h2c: {h2c} (3.5/2 by design)");
}
