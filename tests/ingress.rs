//! Ingress (networking.k8s.io/v1) as an input of `tollgate run`, against a real kube-apiserver +
//! etcd: Ingresses of an IngressClass of our controller carry traffic to Services whose
//! EndpointSlices point at real backends in network namespaces; the ingress-nginx annotations
//! Tollgate serves work, and any other one is a Warning Event that names it. IngressClasses
//! are cluster-scoped: each test makes its own (one namespace per test).

mod support;

use std::time::Duration;

use k8s_openapi::api::events::v1::Event;
use serde_json::{json, Value};
use support::k8s::*;
use support::netns::NetnsBackend;
use tollgate::config::ingress::INGRESS_CONTROLLER;

const LIMIT: Duration = Duration::from_secs(120);
const SERVED: Duration = Duration::from_secs(10);

/// A Service `name` (port 80) whose one EndpointSlice points at `backend`.
async fn service_for(admin: &kube::Client, ns: &str, name: &str, backend: &NetnsBackend) {
    let port = backend.addr.port();
    apply(
        admin,
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
               "spec": {"ports": [{"name": "http", "port": 80, "targetPort": port}]}}),
    )
    .await;
    apply(
        admin,
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
               "metadata": {"name": format!("{name}-1"), "namespace": ns,
                            "labels": {"kubernetes.io/service-name": name}},
               "addressType": "IPv4",
               "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
               "endpoints": [{"addresses": [backend.addr.ip().to_string()],
                              "conditions": {"ready": true}}]}),
    )
    .await;
}

fn ingress_class(name: &str, default: bool) -> Value {
    let mut c = json!({"apiVersion": "networking.k8s.io/v1", "kind": "IngressClass",
                       "metadata": {"name": name}, "spec": {"controller": INGRESS_CONTROLLER}});
    if default {
        c["metadata"]["annotations"] =
            json!({"ingressclass.kubernetes.io/is-default-class": "true"});
    }
    c
}

fn ingress(ns: &str, name: &str, annotations: Value, spec: Value) -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
           "metadata": {"name": name, "namespace": ns, "annotations": annotations},
           "spec": spec})
}

fn path(p: &str, type_: &str, svc: &str) -> Value {
    json!({"path": p, "pathType": type_,
           "backend": {"service": {"name": svc, "port": {"number": 80}}}})
}

/// (status, body) of a request with this Host.
async fn send(req: reqwest::RequestBuilder, host: &str) -> (u16, String) {
    match req.header("host", host).send().await {
        Ok(r) => {
            let s = r.status().as_u16();
            (s, r.text().await.unwrap_or_default())
        }
        Err(e) => (0, e.to_string()),
    }
}

/// The notes of the Warning Events about Ingress `name`.
async fn warnings(admin: &kube::Client, ns: &str, name: &str) -> Vec<(String, String)> {
    let api: kube::Api<Event> = kube::Api::namespaced(admin.clone(), ns);
    let list = api.list(&Default::default()).await.expect("list Events");
    list.items
        .into_iter()
        .filter(|e| e.type_.as_deref() == Some("Warning"))
        .filter(|e| {
            e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
                && e.regarding.as_ref().and_then(|r| r.kind.as_deref()) == Some("Ingress")
        })
        .map(|e| (e.reason.unwrap_or_default(), e.note.unwrap_or_default()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingresses_route_by_path_type_with_tls_default_class_and_backend_and_status() {
    let cp = shared();
    bounded(LIMIT, async {
        let admin = cp.admin().await;
        let ns = namespace(&admin, "ing").await;
        let cls = format!("tollgate-{ns}");
        let (a, b) = (NetnsBackend::start("a"), NetnsBackend::start("b"));
        service_for(&admin, &ns, "svc-a", &a).await;
        service_for(&admin, &ns, "svc-b", &b).await;
        let host = "app.example.com";
        let ck = rcgen::generate_simple_self_signed(vec![host.to_string()]).unwrap();
        let (crt, key) = (ck.cert.pem(), ck.signing_key.serialize_pem());
        apply(
            &admin,
            json!({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
                   "metadata": {"name": "app-tls", "namespace": ns},
                   "stringData": {"tls.crt": crt, "tls.key": key}}),
        )
        .await;
        let mut serve = serve_options();
        serve.tls_listen = Some("127.0.0.1:0".parse().unwrap());
        let mut kube = kube_options(&cp.admin_kubeconfig(), &ns, "gw");
        kube.gateway_addresses = vec!["192.0.2.10".into(), "lb.example.com".into()];
        let gw = gateway(&serve, &kube).await;
        apply(&admin, ingress_class(&cls, false)).await;
        apply(
            &admin,
            ingress(
                &ns,
                "app",
                json!({}),
                json!({"ingressClassName": cls,
                "tls": [{"hosts": [host], "secretName": "app-tls"}],
                "rules": [{"host": host, "http": {"paths": [
                    path("/exact", "Exact", "svc-b"),
                    path("/exact", "Prefix", "svc-a"),
                    path("/impl", "ImplementationSpecific", "svc-b"),
                ]}}]}),
            ),
        )
        .await;
        // Another controller's class: not ours, never served.
        apply(
            &admin,
            ingress(
                &ns,
                "theirs",
                json!({}),
                json!({"ingressClassName": "nginx",
                       "rules": [{"host": "theirs.example.com", "http": {"paths": [
                           path("/", "Prefix", "svc-a")]}}]}),
            ),
        )
        .await;

        let tls_addr = gw.tls_listen.expect("TLS listener");
        let https = reqwest::Client::builder()
            .no_proxy()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(crt.as_bytes()).unwrap())
            .resolve(host, tls_addr)
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        let surl = |p: &str| format!("https://{host}:{}{p}", tls_addr.port());
        eventually(SERVED, "the Ingress serves over TLS", || async {
            (send(https.get(surl("/exact/x")), host).await == (200, "a".into())).then_some(())
        })
        .await;
        // Exact beats the prefix of the same path; ImplementationSpecific is a prefix.
        assert_eq!(
            send(https.get(surl("/exact")), host).await,
            (200, "b".into())
        );
        assert_eq!(
            send(https.get(surl("/impl/deep")), host).await,
            (200, "b".into())
        );
        assert_eq!(send(https.get(surl("/implx")), host).await.0, 404);

        // With TLS, plain HTTP is redirected to https (ingress-nginx's default ssl-redirect).
        let http = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        let url = |p: &str| format!("http://{}{p}", gw.listen);
        let r = http
            .get(url("/exact?q=1"))
            .header("host", host)
            .send()
            .await
            .expect("plain GET");
        assert_eq!(r.status().as_u16(), 308);
        assert_eq!(
            r.headers()["location"].to_str().unwrap(),
            "https://app.example.com/exact?q=1"
        );
        assert_eq!(send(http.get(url("/")), "theirs.example.com").await.0, 404);

        // A rule-less Ingress without a class, under a default class: its defaultBackend
        // catches what nothing else matched.
        apply(&admin, ingress_class(&format!("{cls}-default"), true)).await;
        apply(
            &admin,
            ingress(
                &ns,
                "fallback",
                json!({}),
                json!({"defaultBackend": {"service": {"name": "svc-b", "port": {"number": 80}}}}),
            ),
        )
        .await;
        eventually(SERVED, "the default backend catches the rest", || async {
            (send(http.get(url("/anything")), "nobody.example.org").await == (200, "b".into()))
                .then_some(())
        })
        .await;
        // It does not take what a rule serves.
        assert_eq!(
            send(https.get(surl("/exact")), host).await,
            (200, "b".into())
        );
        assert_eq!(
            send(https.get(surl("/exact/y")), host).await,
            (200, "a".into())
        );

        // status.loadBalancer from --gateway-address, written once.
        let lb_of = |name: &'static str| {
            let (admin, ns) = (admin.clone(), ns.clone());
            async move {
                let api: kube::Api<k8s_openapi::api::networking::v1::Ingress> =
                    kube::Api::namespaced(admin, &ns);
                let i = api.get(name).await.ok()?;
                let lb = serde_json::to_value(i.status?.load_balancer?).ok()?;
                lb.get("ingress").is_some().then_some(lb)
            }
        };
        let lb = eventually(SERVED, "status.loadBalancer", || lb_of("app")).await;
        eventually(SERVED, "status.loadBalancer of the fallback", || {
            lb_of("fallback")
        })
        .await;
        assert_eq!(
            lb["ingress"],
            json!([{"ip": "192.0.2.10"}, {"hostname": "lb.example.com"}])
        );
        let api: kube::Api<k8s_openapi::api::networking::v1::Ingress> =
            kube::Api::namespaced(admin.clone(), &ns);
        let theirs = api.get("theirs").await.expect("theirs");
        assert!(
            theirs
                .status
                .and_then(|s| s.load_balancer)
                .and_then(|l| l.ingress)
                .is_none(),
            "another controller's Ingress gets no status from us"
        );
        let k8s = gw.kubernetes.clone().expect("the Kubernetes handle");
        let writes = k8s.status_writes();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(
            k8s.status_writes(),
            writes,
            "unchanged status is not written again"
        );

        delete(&admin, "Ingress", &ns, "app").await;
        eventually(SERVED, "deleted: the default backend answers", || async {
            (send(http.get(url("/exact")), host).await == (200, "b".into())).then_some(())
        })
        .await;
        delete(&admin, "IngressClass", "", &format!("{cls}-default")).await;
        delete(&admin, "IngressClass", "", &cls).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingress_nginx_annotations_work_and_unknown_ones_are_warning_events() {
    let cp = shared();
    bounded(LIMIT, async {
        let admin = cp.admin().await;
        let ns = namespace(&admin, "ingann").await;
        let cls = format!("tollgate-{ns}");
        let a = NetnsBackend::start("a");
        service_for(&admin, &ns, "svc-a", &a).await;
        let gw = gateway(
            &serve_options(),
            &kube_options(&cp.admin_kubeconfig(), &ns, "gw"),
        )
        .await;
        apply(&admin, ingress_class(&cls, false)).await;
        let n = |k: &str| format!("nginx.ingress.kubernetes.io/{k}");
        let one = |name: &str, host: &str, ann: Value| {
            ingress(
                &ns,
                name,
                ann,
                json!({"ingressClassName": cls, "rules": [{"host": host, "http": {"paths": [
                    path("/api", "Prefix", "svc-a")]}}]}),
            )
        };
        apply(
            &admin,
            one(
                "rewrite",
                "rewrite.example.com",
                json!({n("rewrite-target"): "/v2"}),
            ),
        )
        .await;
        apply(
            &admin,
            one(
                "body",
                "body.example.com",
                json!({n("proxy-body-size"): "1k"}),
            ),
        )
        .await;
        apply(
            &admin,
            one(
                "slow",
                "slow.example.com",
                json!({n("proxy-read-timeout"): "1"}),
            ),
        )
        .await;
        apply(
            &admin,
            one(
                "limited",
                "limited.example.com",
                json!({n("limit-rpm"): "2"}),
            ),
        )
        .await;
        apply(
            &admin,
            one(
                "cors",
                "cors.example.com",
                json!({n("enable-cors"): "true", n("cors-allow-origin"): "https://app.example"}),
            ),
        )
        .await;
        apply(
            &admin,
            one(
                "forced",
                "forced.example.com",
                json!({n("force-ssl-redirect"): "true", n("backend-protocol"): "HTTP"}),
            ),
        )
        .await;
        apply(
            &admin,
            one(
                "grpc",
                "grpc.example.com",
                json!({n("backend-protocol"): "GRPC"}),
            ),
        )
        .await;
        apply(
            &admin,
            one(
                "snippet",
                "snippet.example.com",
                json!({n("configuration-snippet"): "more_set_headers \"x: y\";"}),
            ),
        )
        .await;

        let http = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        let url = |p: &str| format!("http://{}{p}", gw.listen);
        // rewrite-target: the matched prefix becomes the target.
        eventually(SERVED, "the annotated Ingresses serve", || async {
            (send(http.get(url("/api/x")), "rewrite.example.com").await == (200, "a".into()))
                .then_some(())
        })
        .await;
        assert!(
            a.seen().await.contains(&"/v2/x".to_string()),
            "{:?}",
            a.seen().await
        );
        // proxy-body-size: over it is 413, under it passes.
        let big = "x".repeat(2048);
        assert_eq!(
            send(http.post(url("/api")).body(big), "body.example.com")
                .await
                .0,
            413
        );
        assert_eq!(
            send(http.post(url("/api")).body("small"), "body.example.com").await,
            (200, "a".into())
        );
        // proxy-read-timeout: a backend slower than it is 504.
        assert_eq!(
            send(http.get(url("/api/slow")), "slow.example.com").await.0,
            504
        );
        assert_eq!(
            send(http.get(url("/api/ok")), "slow.example.com").await,
            (200, "a".into())
        );
        // limit-rpm, per client address, burst 5× as ingress-nginx: the 11th in a row is 429.
        let mut codes = Vec::new();
        for _ in 0..11 {
            codes.push(send(http.get(url("/api")), "limited.example.com").await.0);
        }
        assert_eq!(&codes[..10], &[200; 10], "{codes:?}");
        assert_eq!(codes[10], 429, "{codes:?}");
        // enable-cors with an origin: the preflight is answered, another origin is not allowed.
        let pre = http
            .request(reqwest::Method::OPTIONS, url("/api"))
            .header("host", "cors.example.com")
            .header("origin", "https://app.example")
            .header("access-control-request-method", "POST")
            .send()
            .await
            .expect("preflight");
        assert!(pre.status().is_success(), "{}", pre.status());
        assert_eq!(
            pre.headers()["access-control-allow-origin"],
            "https://app.example"
        );
        let other = http
            .get(url("/api"))
            .header("host", "cors.example.com")
            .header("origin", "https://evil.example")
            .send()
            .await
            .expect("GET");
        assert!(other.headers().get("access-control-allow-origin").is_none());
        // force-ssl-redirect: redirected without TLS of its own; backend-protocol HTTP is plain.
        let r = http
            .get(url("/api"))
            .header("host", "forced.example.com")
            .send()
            .await
            .expect("GET");
        assert_eq!(r.status().as_u16(), 308);
        // backend-protocol GRPC is not served: nothing of that Ingress is, and it is told.
        assert_eq!(send(http.get(url("/api")), "grpc.example.com").await.0, 404);
        let grpc = eventually(SERVED, "a Warning Event on the GRPC Ingress", || async {
            let w = warnings(&admin, &ns, "grpc").await;
            (!w.is_empty()).then_some(w)
        })
        .await;
        assert_eq!(grpc[0].0, "NotServed");
        assert!(grpc[0].1.contains("backend-protocol"), "{grpc:?}");
        // An annotation Tollgate does not serve: the Ingress still routes, and an Event names it.
        assert_eq!(
            send(http.get(url("/api")), "snippet.example.com").await,
            (200, "a".into())
        );
        let snippet = eventually(SERVED, "a Warning Event naming the annotation", || async {
            let w = warnings(&admin, &ns, "snippet").await;
            (!w.is_empty()).then_some(w)
        })
        .await;
        assert_eq!(snippet.len(), 1, "{snippet:?}");
        assert_eq!(snippet[0].0, "UnsupportedAnnotation");
        assert!(
            snippet[0]
                .1
                .contains("nginx.ingress.kubernetes.io/configuration-snippet"),
            "{snippet:?}"
        );
        // The served annotations raise no Event.
        assert!(warnings(&admin, &ns, "rewrite").await.is_empty());
        delete(&admin, "IngressClass", "", &cls).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_in_manifests_is_served() {
    let cp = shared();
    bounded(LIMIT, async {
        let admin = cp.admin().await;
        cp.kubectl(&["apply", "-f", "manifests/examples/00-namespace.yaml"])
            .await;
        let (mem, rag) = (NetnsBackend::start("memory"), NetnsBackend::start("rag"));
        for (name, port, b) in [
            ("memory-service", 8003, &mem),
            ("rag-retrieval", 8002, &rag),
        ] {
            let target = b.addr.port();
            apply(
                &admin,
                json!({"apiVersion": "v1", "kind": "Service",
                       "metadata": {"name": name, "namespace": "agents"},
                       "spec": {"ports": [{"name": "http", "port": port, "targetPort": target}]}}),
            )
            .await;
            apply(
                &admin,
                json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                       "metadata": {"name": format!("{name}-1"), "namespace": "agents",
                                    "labels": {"kubernetes.io/service-name": name}},
                       "addressType": "IPv4",
                       "ports": [{"name": "http", "port": target, "protocol": "TCP"}],
                       "endpoints": [{"addresses": [b.addr.ip().to_string()],
                                      "conditions": {"ready": true}}]}),
            )
            .await;
        }
        let gw = gateway(
            &serve_options(),
            &kube_options(&cp.admin_kubeconfig(), "agents", "gw"),
        )
        .await;
        apply(&admin, ingress_class("tollgate", false)).await;
        cp.kubectl(&["apply", "-f", "manifests/examples/ingress/"])
            .await;
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        let url = |p: &str| format!("http://{}{p}", gw.listen);
        eventually(SERVED, "the example Ingress serves", || async {
            (send(http.get(url("/v2/search")), "docs.example.com").await == (200, "rag".into()))
                .then_some(())
        })
        .await;
        assert_eq!(
            send(http.get(url("/notes")), "docs.example.com").await,
            (200, "memory".into())
        );
        assert!(warnings(&admin, "agents", "docs").await.is_empty());
        cp.kubectl(&["delete", "-f", "manifests/examples/ingress/"])
            .await;
        delete(&admin, "IngressClass", "", "tollgate").await;
    })
    .await;
}
