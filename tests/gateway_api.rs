//! Gateway API as an input of `tollgate run`, against a real kube-apiserver + etcd with the
//! Gateway API release's standard-channel CRDs (hack/gateway-api-crds.sh): HTTPRoutes attached
//! to Gateways of our GatewayClass carry traffic to Services whose EndpointSlices point at real
//! backends, and status says what the spec asks, with its reasons. One namespace per test,
//! one GatewayClass per test (they are cluster-scoped).

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::k8s::*;
use support::netns::NetnsBackend;
use tollgate::api::gateway::{Gateway, GatewayClass, HTTPRoute, GATEWAY_CONTROLLER};

const LIMIT: Duration = Duration::from_secs(120);
const SERVED: Duration = Duration::from_secs(10);

/// A Service `name` (port 80) whose one EndpointSlice points at `backend`, in its own network
/// namespace: the slice carries a real address.
async fn service_for(admin: &kube::Client, ns: &str, name: &str, backend: &NetnsBackend) {
    service_on(admin, ns, name, 80, backend).await
}

/// [`service_for`] with the Service on `service_port`.
async fn service_on(
    admin: &kube::Client,
    ns: &str,
    name: &str,
    service_port: u16,
    backend: &NetnsBackend,
) {
    let port = backend.addr.port();
    apply(
        admin,
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
               "spec": {"ports": [{"name": "http", "port": service_port, "targetPort": port}]}}),
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

fn class(name: &str) -> Value {
    json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayClass",
           "metadata": {"name": name}, "spec": {"controllerName": GATEWAY_CONTROLLER}})
}

fn http_route(ns: &str, name: &str, spec: Value) -> Value {
    json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
           "metadata": {"name": name, "namespace": ns}, "spec": spec})
}

/// (status, body) of a GET with this Host.
async fn get_host(
    http: &reqwest::Client,
    url: &str,
    host: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let mut req = http.get(url).header("host", host);
    for (n, v) in headers {
        req = req.header(*n, *v);
    }
    match req.send().await {
        Ok(r) => {
            let s = r.status().as_u16();
            (s, r.text().await.unwrap_or_default())
        }
        Err(e) => (0, e.to_string()),
    }
}

async fn status_of<K>(admin: &kube::Client, ns: Option<&str>, name: &str) -> Option<Value>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + serde::Serialize,
{
    let ar = kube::api::ApiResource::erase::<K>(&());
    let api: kube::Api<kube::api::DynamicObject> = match ns {
        Some(ns) => kube::Api::namespaced_with(admin.clone(), ns, &ar),
        None => kube::Api::all_with(admin.clone(), &ar),
    };
    let obj = api.get_opt(name).await.ok()??;
    obj.data.get("status").cloned()
}

/// (status, reason) of condition `type_` in a conditions array.
fn cond_in(conditions: &Value, type_: &str) -> Option<(String, String)> {
    condition(&json!({ "conditions": conditions }), type_)
}

/// The conditions of our `parents[]` entry for Gateway `gateway` of an HTTPRoute's status.
fn parent(status: &Value, gateway: &str) -> Option<Value> {
    status["parents"].as_array()?.iter().find_map(|p| {
        (p["controllerName"] == GATEWAY_CONTROLLER && p["parentRef"]["name"] == gateway)
            .then(|| p["conditions"].clone())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn httproutes_route_by_path_header_method_and_weight_and_status_follows_the_spec() {
    let cp = shared_with_gateway_api();
    bounded(LIMIT, async {
        let admin = cp.admin().await;
        let ns = namespace(&admin, "gwapi").await;
        let cls = format!("tollgate-{ns}");
        let (a, b) = (NetnsBackend::start("a"), NetnsBackend::start("b"));
        service_for(&admin, &ns, "svc-a", &a).await;
        service_for(&admin, &ns, "svc-b", &b).await;
        let mut kube = kube_options(&cp.admin_kubeconfig(), &ns, "gw");
        kube.gateway_addresses = vec!["192.0.2.10".into(), "gw.example.com".into()];
        let gw = gateway(&serve_options(), &kube).await;
        assert!(
            gw.kubernetes.as_ref().is_some_and(|k| k.debug()["synced"] == true),
            "synced"
        );
        apply(&admin, class(&cls)).await;
        apply(
            &admin,
            json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
                   "metadata": {"name": "edge", "namespace": ns},
                   "spec": {"gatewayClassName": cls, "listeners": [
                       {"name": "web", "port": 80, "protocol": "HTTP", "hostname": "*.example.com"},
                       {"name": "raw", "port": 9000, "protocol": "TCP"}]}}),
        )
        .await;
        let backend = |svc: &str, weight: i32| json!({"name": svc, "port": 80, "weight": weight});
        apply(
            &admin,
            http_route(&ns, "app", json!({
                "parentRefs": [{"name": "edge", "sectionName": "web"}],
                "hostnames": ["app.example.com"],
                "rules": [
                    {"matches": [{"path": {"type": "Exact", "value": "/exact"}}],
                     "backendRefs": [backend("svc-b", 1)]},
                    {"matches": [{"path": {"type": "PathPrefix", "value": "/exact"}}],
                     "backendRefs": [backend("svc-a", 1)]},
                    {"matches": [{"path": {"type": "PathPrefix", "value": "/api"},
                                  "headers": [{"name": "x-version", "value": "2"}]}],
                     "backendRefs": [backend("svc-b", 1)]},
                    {"matches": [{"path": {"type": "PathPrefix", "value": "/api"},
                                  "queryParams": [{"name": "v", "value": "2"}]}],
                     "backendRefs": [backend("svc-b", 1)]},
                    {"matches": [{"path": {"type": "PathPrefix", "value": "/api"}, "method": "POST"}],
                     "backendRefs": [backend("svc-b", 1)]},
                    {"matches": [{"path": {"type": "PathPrefix", "value": "/api"}}],
                     "backendRefs": [backend("svc-a", 1)]},
                    {"matches": [{"path": {"type": "PathPrefix", "value": "/split"}}],
                     "backendRefs": [backend("svc-a", 1), backend("svc-b", 0)]},
                    {"matches": [{"path": {"type": "PathPrefix", "value": "/nothing"}}],
                     "backendRefs": [backend("svc-b", 0)]},
                    {"matches": [{"path": {"type": "PathPrefix", "value": "/post-only"},
                                  "method": "POST"}],
                     "backendRefs": [backend("svc-b", 1)]},
                ]})),
        )
        .await;

        let http = http();
        let url = |p: &str| format!("http://{}{p}", gw.listen);
        let host = "app.example.com";
        eventually(SERVED, "the HTTPRoute serves", || async {
            (get_host(&http, &url("/api/x"), host, &[]).await == (200, "a".into())).then_some(())
        })
        .await;
        // Exact beats a prefix of the same path; the prefix still serves what is below it.
        assert_eq!(get_host(&http, &url("/exact"), host, &[]).await, (200, "b".into()));
        assert_eq!(get_host(&http, &url("/exact/more"), host, &[]).await, (200, "a".into()));
        // A header match beats the plain prefix; a method match too.
        assert_eq!(
            get_host(&http, &url("/api/x"), host, &[("x-version", "2")]).await,
            (200, "b".into())
        );
        let posted = http
            .post(url("/api/x"))
            .header("host", host)
            .send()
            .await
            .expect("POST");
        assert_eq!(posted.text().await.unwrap_or_default(), "b");
        // A query parameter match: the first parameter of that name, exactly.
        assert_eq!(get_host(&http, &url("/api/x?v=2"), host, &[]).await, (200, "b".into()));
        assert_eq!(get_host(&http, &url("/api/x?v=3&v=2"), host, &[]).await, (200, "a".into()));
        // A method match is a match like the others: another method is 404, not 405.
        assert_eq!(get_host(&http, &url("/post-only/x"), host, &[]).await.0, 404);
        // Prefixes match whole segments; another host is not this route's.
        assert_eq!(get_host(&http, &url("/apix"), host, &[]).await.0, 404);
        assert_eq!(get_host(&http, &url("/api/x"), "other.example.org", &[]).await.0, 404);
        // Weight 0 gets no traffic; a rule with no backend that can take traffic is a 500.
        for _ in 0..20 {
            assert_eq!(get_host(&http, &url("/split"), host, &[]).await, (200, "a".into()));
        }
        assert_eq!(get_host(&http, &url("/nothing"), host, &[]).await.0, 500);
        assert!(!b.seen().await.iter().any(|p| p == "/split"), "weight 0 got traffic");
        assert!(a.seen().await.iter().filter(|p| *p == "/split").count() >= 20);

        let class_status = eventually(SERVED, "GatewayClass Accepted", || async {
            let s = status_of::<GatewayClass>(&admin, None, &cls).await?;
            (cond_in(&s["conditions"], "Accepted")? == ("True".into(), "Accepted".into()))
                .then_some(s)
        })
        .await;
        assert!(class_status["conditions"][0]["lastTransitionTime"].is_string());
        let gw_status = eventually(SERVED, "Gateway Programmed, one route on web", || async {
            let s = status_of::<Gateway>(&admin, Some(&ns), "edge").await?;
            let web = s["listeners"].as_array()?.iter().find(|l| l["name"] == "web")?.clone();
            (cond_in(&s["conditions"], "Programmed")?.0 == "True" && web["attachedRoutes"] == 1)
                .then_some(s)
        })
        .await;
        assert_eq!(cond_in(&gw_status["conditions"], "Accepted").unwrap().0, "True");
        assert_eq!(
            gw_status["addresses"],
            json!([{"type": "IPAddress", "value": "192.0.2.10"},
                   {"type": "Hostname", "value": "gw.example.com"}])
        );
        let raw = gw_status["listeners"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["name"] == "raw")
            .unwrap()
            .clone();
        assert_eq!(
            cond_in(&raw["conditions"], "Accepted").unwrap(),
            ("False".into(), "UnsupportedProtocol".into())
        );
        assert_eq!(raw["attachedRoutes"], 0);
        let route_status = eventually(SERVED, "HTTPRoute parent Accepted", || async {
            let s = status_of::<HTTPRoute>(&admin, Some(&ns), "app").await?;
            let c = parent(&s, "edge")?;
            (cond_in(&c, "Accepted")?.0 == "True").then_some(c)
        })
        .await;
        assert_eq!(
            cond_in(&route_status, "ResolvedRefs").unwrap(),
            ("True".into(), "ResolvedRefs".into())
        );

        // Status is written once, not on every pass.
        let k8s = gw.kubernetes.clone().expect("the Kubernetes handle");
        let writes = k8s.status_writes();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(k8s.status_writes(), writes, "unchanged status is not written again");

        delete(&admin, "HTTPRoute", &ns, "app").await;
        eventually(SERVED, "deleted: 404", || async {
            (get_host(&http, &url("/api/x"), host, &[]).await.0 == 404).then_some(())
        })
        .await;
        eventually(SERVED, "attachedRoutes back to 0", || async {
            let s = status_of::<Gateway>(&admin, Some(&ns), "edge").await?;
            let web = s["listeners"].as_array()?.iter().find(|l| l["name"] == "web")?.clone();
            (web["attachedRoutes"] == 0).then_some(())
        })
        .await;
        delete(&admin, "GatewayClass", "", &cls).await;
        gw.shutdown().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attachment_and_reference_failures_carry_the_spec_reasons() {
    let cp = shared_with_gateway_api();
    bounded(LIMIT, async {
        let admin = cp.admin().await;
        let ns = namespace(&admin, "gwref").await;
        let other = namespace(&admin, "gwother").await;
        let cls = format!("tollgate-{ns}");
        let a = NetnsBackend::start("a");
        let far = NetnsBackend::start("far");
        service_for(&admin, &ns, "svc-a", &a).await;
        service_for(&admin, &other, "far", &far).await;
        let mut kube = kube_options(&cp.admin_kubeconfig(), &ns, "gw");
        kube.watch_namespaces = vec![ns.clone(), other.clone()];
        let gw = gateway(&serve_options(), &kube).await;
        apply(&admin, class(&cls)).await;
        apply(
            &admin,
            json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
                   "metadata": {"name": "edge", "namespace": ns},
                   "spec": {"gatewayClassName": cls, "listeners": [
                       {"name": "same", "port": 80, "protocol": "HTTP", "hostname": "*.example.com"},
                       {"name": "all", "port": 8080, "protocol": "HTTP",
                        "hostname": "shared.example.net",
                        "allowedRoutes": {"namespaces": {"from": "All"}}}]}}),
        )
        .await;
        let to_a = json!([{"backendRefs": [{"name": "svc-a", "port": 80}]}]);
        let cases = [
            // sectionName names no listener.
            (ns.as_str(), "nosection", json!({"parentRefs": [{"name": "edge", "sectionName": "nope"}],
                "rules": to_a.clone()}), "Accepted", "NoMatchingParent"),
            // port names no listener.
            (ns.as_str(), "noport", json!({"parentRefs": [{"name": "edge", "port": 81}],
                "rules": to_a.clone()}), "Accepted", "NoMatchingParent"),
            // A route of another namespace on a `Same` listener.
            (other.as_str(), "foreign", json!({"parentRefs": [{"name": "edge", "namespace": ns.clone(),
                "sectionName": "same"}], "rules": [{"backendRefs": [{"name": "far", "port": 80}]}]}),
                "Accepted", "NotAllowedByListeners"),
            // No hostname of the route intersects the listener's.
            (ns.as_str(), "elsewhere", json!({"parentRefs": [{"name": "edge", "sectionName": "same"}],
                "hostnames": ["app.example.org"], "rules": to_a.clone()}),
                "Accepted", "NoMatchingListenerHostname"),
            (ns.as_str(), "missing", json!({"parentRefs": [{"name": "edge", "sectionName": "same"}],
                "hostnames": ["missing.example.com"],
                "rules": [{"backendRefs": [{"name": "ghost", "port": 80}]}]}),
                "ResolvedRefs", "BackendNotFound"),
            (ns.as_str(), "crossns", json!({"parentRefs": [{"name": "edge", "sectionName": "same"}],
                "hostnames": ["cross.example.com"],
                "rules": [{"backendRefs": [{"name": "far", "namespace": other.clone(), "port": 80}]}]}),
                "ResolvedRefs", "RefNotPermitted"),
            (ns.as_str(), "kind", json!({"parentRefs": [{"name": "edge", "sectionName": "same"}],
                "hostnames": ["kind.example.com"],
                "rules": [{"backendRefs": [{"group": "example.com", "kind": "Bucket", "name": "x"}]}]}),
                "ResolvedRefs", "InvalidKind"),
        ];
        for (rns, name, spec, _, _) in &cases {
            apply(&admin, http_route(rns, name, spec.clone())).await;
        }
        for (rns, name, _, type_, reason) in &cases {
            eventually(SERVED, &format!("{name}: {type_} {reason}"), || async {
                let s = status_of::<HTTPRoute>(&admin, Some(rns), name).await?;
                let c = parent(&s, "edge")?;
                (cond_in(&c, type_)? == ("False".into(), reason.to_string())).then_some(())
            })
            .await;
        }
        let http = http();
        let url = format!("http://{}/", gw.listen);
        // A route that failed to resolve its only backend answers 500 (no backend to take it).
        assert_eq!(get_host(&http, &url, "missing.example.com", &[]).await.0, 500);
        assert_eq!(get_host(&http, &url, "cross.example.com", &[]).await.0, 500);

        // A ReferenceGrant in the Service's namespace lets the route through.
        apply(
            &admin,
            json!({"apiVersion": "gateway.networking.k8s.io/v1beta1", "kind": "ReferenceGrant",
                   "metadata": {"name": "from-gw", "namespace": other},
                   "spec": {"from": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute",
                                      "namespace": ns}],
                            "to": [{"group": "", "kind": "Service", "name": "far"}]}}),
        )
        .await;
        eventually(SERVED, "granted: the cross-namespace backend serves", || async {
            (get_host(&http, &url, "cross.example.com", &[]).await == (200, "far".into()))
                .then_some(())
        })
        .await;
        eventually(SERVED, "granted: ResolvedRefs True", || async {
            let s = status_of::<HTTPRoute>(&admin, Some(&ns), "crossns").await?;
            (cond_in(&parent(&s, "edge")?, "ResolvedRefs")?.0 == "True").then_some(())
        })
        .await;

        // The `All` listener admits the other namespace's route; its hostname is the
        // listener's, since the route names none.
        apply(
            &admin,
            http_route(&other, "shared", json!({
                "parentRefs": [{"name": "edge", "namespace": ns.clone(), "sectionName": "all"}],
                "rules": [{"backendRefs": [{"name": "far", "port": 80}]}]})),
        )
        .await;
        eventually(SERVED, "All: the foreign route serves the listener's host", || async {
            (get_host(&http, &url, "shared.example.net", &[]).await == (200, "far".into()))
                .then_some(())
        })
        .await;
        assert_eq!(get_host(&http, &url, "other.example.net", &[]).await.0, 404);

        // A route not attached anywhere serves nothing.
        assert_eq!(get_host(&http, &url, "app.example.org", &[]).await.0, 404);
        delete(&admin, "GatewayClass", "", &cls).await;
        gw.shutdown().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_edit_headers_redirect_and_rewrite_and_unknown_ones_are_refused() {
    let cp = shared_with_gateway_api();
    bounded(LIMIT, async {
        let admin = cp.admin().await;
        let ns = namespace(&admin, "gwfilter").await;
        let cls = format!("tollgate-{ns}");
        let a = NetnsBackend::start("a");
        service_for(&admin, &ns, "svc-a", &a).await;
        let gw = gateway(&serve_options(), &kube_options(&cp.admin_kubeconfig(), &ns, "gw")).await;
        apply(&admin, class(&cls)).await;
        apply(
            &admin,
            json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
                   "metadata": {"name": "edge", "namespace": ns},
                   "spec": {"gatewayClassName": cls, "listeners": [
                       {"name": "web", "port": 80, "protocol": "HTTP"}]}}),
        )
        .await;
        let to_a = json!([{"name": "svc-a", "port": 80}]);
        let prefix = |p: &str| json!([{"path": {"type": "PathPrefix", "value": p}}]);
        apply(
            &admin,
            http_route(&ns, "filters", json!({
                "parentRefs": [{"name": "edge"}],
                "hostnames": ["f.example.com"],
                "rules": [
                    {"matches": prefix("/hdr"), "backendRefs": to_a.clone(), "filters": [
                        {"type": "RequestHeaderModifier", "requestHeaderModifier": {
                            "set": [{"name": "x-set", "value": "s"}],
                            "add": [{"name": "x-add", "value": "added"}],
                            "remove": ["x-drop"]}},
                        {"type": "ResponseHeaderModifier", "responseHeaderModifier": {
                            "set": [{"name": "x-resp", "value": "r"}],
                            "remove": ["x-from-backend"]}}]},
                    {"matches": prefix("/redir"), "filters": [
                        {"type": "RequestRedirect", "requestRedirect": {
                            "scheme": "https", "hostname": "new.example.com", "statusCode": 301}}]},
                    {"matches": prefix("/moved"), "filters": [
                        {"type": "RequestRedirect", "requestRedirect": {"path": {
                            "type": "ReplacePrefixMatch", "replacePrefixMatch": "/here"}}}]},
                    {"matches": prefix("/old"), "backendRefs": to_a.clone(), "filters": [
                        {"type": "URLRewrite", "urlRewrite": {"hostname": "rewritten.example.com",
                            "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/new"}}}]},
                    {"matches": prefix("/full"), "backendRefs": to_a.clone(), "filters": [
                        {"type": "URLRewrite", "urlRewrite": {"path": {
                            "type": "ReplaceFullPath", "replaceFullPath": "/only"}}}]},
                    {"matches": prefix("/plain"), "backendRefs": to_a.clone(),
                     "timeouts": {"request": "2s"}},
                ]})),
        )
        .await;
        let http = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(5))
            .build()
            .expect("an HTTP client");
        let url = |p: &str| format!("http://{}{p}", gw.listen);
        let send = |p: &str| {
            http.get(url(p))
                .header("host", "f.example.com")
                .header("x-drop", "gone")
                .header("x-add", "mine")
                .send()
        };
        eventually(SERVED, "the filtered route serves", || async {
            (send("/plain").await.ok()?.status() == 200).then_some(())
        })
        .await;

        let r = send("/hdr/x").await.expect("GET /hdr/x");
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-resp"], "r");
        assert!(r.headers().get("x-from-backend").is_none(), "removed response header");
        let got: Value = serde_json::from_str(r.headers()["x-got-headers"].to_str().unwrap()).unwrap();
        assert_eq!(got["x-set"], json!(["s"]));
        assert_eq!(got["x-add"], json!(["mine", "added"]), "add appends: {got}");
        assert!(got.get("x-drop").is_none(), "removed request header: {got}");

        let r = send("/redir/x?q=1").await.expect("GET /redir/x");
        assert_eq!(r.status(), 301);
        assert_eq!(r.headers()["location"], "https://new.example.com/redir/x?q=1");
        let r = send("/moved/deeper").await.expect("GET /moved/deeper");
        assert_eq!(r.status(), 302);
        assert_eq!(r.headers()["location"], "http://f.example.com/here/deeper");
        assert!(!a.seen().await.iter().any(|p| p.contains("redir") || p.contains("moved")));

        let r = send("/old/x").await.expect("GET /old/x");
        assert_eq!(r.headers()["x-got-path"], "/new/x");
        let got: Value = serde_json::from_str(r.headers()["x-got-headers"].to_str().unwrap()).unwrap();
        assert_eq!(got["host"], json!(["rewritten.example.com"]));
        let r = send("/full/a/b").await.expect("GET /full/a/b");
        assert_eq!(r.headers()["x-got-path"], "/only");

        // A filter type that is not served refuses the route, with the spec's reason.
        apply(
            &admin,
            http_route(&ns, "mirror", json!({
                "parentRefs": [{"name": "edge"}], "hostnames": ["m.example.com"],
                "rules": [{"backendRefs": to_a.clone(), "filters": [
                    {"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "svc-a", "port": 80}}}]}]})),
        )
        .await;
        eventually(SERVED, "RequestMirror: Accepted False UnsupportedValue", || async {
            let s = status_of::<HTTPRoute>(&admin, Some(&ns), "mirror").await?;
            (cond_in(&parent(&s, "edge")?, "Accepted")? == ("False".into(), "UnsupportedValue".into()))
                .then_some(())
        })
        .await;
        let (code, _) = get_host(&http, &url("/"), "m.example.com", &[]).await;
        assert_eq!(code, 404, "a refused route serves nothing");
        delete(&admin, "GatewayClass", "", &cls).await;
        gw.shutdown().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_in_manifests_is_accepted() {
    let cp = shared_with_gateway_api();
    bounded(LIMIT, async {
        let admin = cp.admin().await;
        cp.kubectl(&["apply", "-f", "manifests/examples/00-namespace.yaml"])
            .await;
        let mem = NetnsBackend::start("memory");
        service_on(&admin, "agents", "memory-service", 8003, &mem).await;
        service_on(&admin, "agents", "rag-retrieval", 8002, &mem).await;
        let gw = gateway(
            &serve_options(),
            &kube_options(&cp.admin_kubeconfig(), "agents", "gw"),
        )
        .await;
        cp.kubectl(&["apply", "-f", "manifests/examples/gateway-api/"])
            .await;
        eventually(
            SERVED,
            "the example HTTPRoute is Accepted with its refs resolved",
            || async {
                let s = status_of::<HTTPRoute>(&admin, Some("agents"), "docs").await?;
                let c = parent(&s, "edge")?;
                (cond_in(&c, "Accepted")?.0 == "True" && cond_in(&c, "ResolvedRefs")?.0 == "True")
                    .then_some(())
            },
        )
        .await;
        let http = http();
        let url = format!("http://{}/v2/search", gw.listen);
        assert_eq!(
            get_host(&http, &url, "docs.example.com", &[]).await,
            (200, "memory".into())
        );
        cp.kubectl(&["delete", "-f", "manifests/examples/gateway-api/"])
            .await;
        gw.shutdown().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_listeners_serve_certificates_from_secrets_and_a_missing_one_is_reported() {
    let cp = shared_with_gateway_api();
    bounded(LIMIT, async {
        let admin = cp.admin().await;
        let ns = namespace(&admin, "gwtls").await;
        let cls = format!("tollgate-{ns}");
        let a = NetnsBackend::start("secure");
        service_for(&admin, &ns, "svc-a", &a).await;
        let mut serve = serve_options();
        serve.tls_listen = Some("127.0.0.1:0".parse().unwrap());
        let gw = gateway(&serve, &kube_options(&cp.admin_kubeconfig(), &ns, "gw")).await;
        let host = "tls.example.com";
        let ck = rcgen::generate_simple_self_signed(vec![host.to_string()]).unwrap();
        let (crt, key) = (ck.cert.pem(), ck.signing_key.serialize_pem());
        apply(
            &admin,
            secret(
                &ns,
                "site-tls",
                "kubernetes.io/tls",
                json!({"tls.crt": crt, "tls.key": key}),
            ),
        )
        .await;
        apply(&admin, class(&cls)).await;
        apply(
            &admin,
            json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
                   "metadata": {"name": "edge", "namespace": ns},
                   "spec": {"gatewayClassName": cls, "listeners": [
                       {"name": "https", "port": 443, "protocol": "HTTPS", "hostname": host,
                        "tls": {"certificateRefs": [{"name": "site-tls"}]}},
                       {"name": "broken", "port": 8443, "protocol": "HTTPS",
                        "hostname": "broken.example.com",
                        "tls": {"certificateRefs": [{"name": "no-such-secret"}]}}]}}),
        )
        .await;
        apply(
            &admin,
            http_route(
                &ns,
                "site",
                json!({"parentRefs": [{"name": "edge", "sectionName": "https"}],
                "rules": [{"backendRefs": [{"name": "svc-a", "port": 80}]}]}),
            ),
        )
        .await;
        let tls_addr = gw.tls_listen.expect("TLS listener");
        let client = reqwest::Client::builder()
            .no_proxy()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(crt.as_bytes()).unwrap())
            .resolve(host, tls_addr)
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        let url = format!("https://{host}:{}/", tls_addr.port());
        eventually(
            SERVED,
            "served over TLS with the listener's certificate",
            || async { (get(&client, &url, None).await == (200, "secure".into())).then_some(()) },
        )
        .await;
        let status = eventually(
            SERVED,
            "the broken listener reports its certificate",
            || async {
                let s = status_of::<Gateway>(&admin, Some(&ns), "edge").await?;
                let l = s["listeners"]
                    .as_array()?
                    .iter()
                    .find(|l| l["name"] == "broken")?
                    .clone();
                let https = s["listeners"]
                    .as_array()?
                    .iter()
                    .find(|l| l["name"] == "https")?;
                // The route's attachment may land a status pass after the listener's verdict.
                (cond_in(&l["conditions"], "ResolvedRefs")?.1 == "InvalidCertificateRef"
                    && https["attachedRoutes"] == 1)
                    .then_some(s.clone())
            },
        )
        .await;
        let ok = status["listeners"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["name"] == "https")
            .unwrap()
            .clone();
        assert_eq!(cond_in(&ok["conditions"], "Programmed").unwrap().0, "True");
        assert_eq!(ok["attachedRoutes"], 1);
        delete(&admin, "GatewayClass", "", &cls).await;
        gw.shutdown().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_routes_selector_admits_namespaces_by_their_labels() {
    let cp = shared_with_gateway_api();
    bounded(LIMIT, async {
        let admin = cp.admin().await;
        let ns = namespace(&admin, "gwsel").await;
        let team = namespace(&admin, "gwteam").await;
        let stranger = namespace(&admin, "gwstranger").await;
        let cls = format!("tollgate-{ns}");
        let a = NetnsBackend::start("a");
        service_for(&admin, &team, "svc", &a).await;
        service_for(&admin, &stranger, "svc", &a).await;
        let label = |name: &str, value: Option<&str>| {
            let (admin, name) = (admin.clone(), name.to_string());
            let value = value.map(str::to_string);
            async move {
                let api: kube::Api<k8s_openapi::api::core::v1::Namespace> = kube::Api::all(admin);
                let patch = json!({"metadata": {"labels": {"gw-access": value}}});
                api.patch(
                    &name,
                    &kube::api::PatchParams::default(),
                    &kube::api::Patch::Merge(&patch),
                )
                .await
                .expect("label the namespace");
            }
        };
        label(&team, Some("yes")).await;
        let mut kube = kube_options(&cp.admin_kubeconfig(), &ns, "gw");
        kube.watch_namespaces = vec![ns.clone(), team.clone(), stranger.clone()];
        let gw = gateway(&serve_options(), &kube).await;
        apply(&admin, class(&cls)).await;
        apply(
            &admin,
            json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
                   "metadata": {"name": "edge", "namespace": ns},
                   "spec": {"gatewayClassName": cls, "listeners": [
                       {"name": "web", "port": 80, "protocol": "HTTP",
                        "allowedRoutes": {"namespaces": {"from": "Selector",
                            "selector": {"matchLabels": {"gw-access": "yes"}}}}}]}}),
        )
        .await;
        for (rns, host) in [
            (&team, "team.example.com"),
            (&stranger, "stranger.example.com"),
        ] {
            apply(
                &admin,
                http_route(
                    rns,
                    "r",
                    json!({"parentRefs": [{"name": "edge", "namespace": ns}],
                           "hostnames": [host],
                           "rules": [{"backendRefs": [{"name": "svc", "port": 80}]}]}),
                ),
            )
            .await;
        }
        let http = http();
        let url = format!("http://{}/", gw.listen);
        let accepted = |rns: String| {
            let admin = admin.clone();
            async move {
                let s = status_of::<HTTPRoute>(&admin, Some(&rns), "r").await?;
                cond_in(&parent(&s, "edge")?, "Accepted")
            }
        };
        eventually(SERVED, "the labelled namespace's route serves", || async {
            (get_host(&http, &url, "team.example.com", &[]).await == (200, "a".into()))
                .then_some(())
        })
        .await;
        eventually(SERVED, "the other namespace's route is refused", || async {
            (accepted(stranger.clone()).await? == ("False".into(), "NotAllowedByListeners".into()))
                .then_some(())
        })
        .await;
        assert_eq!(
            accepted(team.clone()).await,
            Some(("True".into(), "Accepted".into()))
        );
        assert_eq!(
            get_host(&http, &url, "stranger.example.com", &[]).await.0,
            404
        );
        // Labels are watched: labelling the namespace admits its route.
        label(&stranger, Some("yes")).await;
        eventually(
            SERVED,
            "the newly labelled namespace's route serves",
            || async {
                (get_host(&http, &url, "stranger.example.com", &[]).await == (200, "a".into()))
                    .then_some(())
            },
        )
        .await;
        label(&team, None).await;
        eventually(SERVED, "an unlabelled namespace's route stops", || async {
            (get_host(&http, &url, "team.example.com", &[]).await.0 == 404).then_some(())
        })
        .await;
        delete(&admin, "GatewayClass", "", &cls).await;
        gw.shutdown().await;
    })
    .await
}
