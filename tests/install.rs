//! The install artefacts against the real tools: the Helm chart (lint, render, accepted by a real
//! kube-apiserver), `manifests/` (a fresh render, RBAC equal to the chart's), the README's install
//! steps as written, the Dockerfile against the binary, and `tollgate run` under the chart's
//! ServiceAccount. helm, kubectl, kube-apiserver: `TOLLGATE_K8S_BIN` (set by scripts/test.sh),
//! else `hack/build-k8s-tools.sh` builds or finds them. Each API-server test starts its own
//! control plane (`hack/controlplane.sh`) and stops it on the way out, pass or fail.
#![forbid(unsafe_code)]

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use serde::Deserialize;
use serde_yaml::Value;

use support::k8s::{ControlPlane, ExclusiveControlPlane};
use support::process::{run_limited, run_ok as ok, GatewayProcess};

const TOLLGATE: &str = env!("CARGO_BIN_EXE_tollgate");
const NS: &str = "tollgate-system";
const ALL_FEATURES: &str = "charts/tollgate/ci/all-features-values.yaml";
/// The metrics the API contract names (shared/design/api.md), all of which the dashboard shows.
const METRICS: &[&str] = &[
    "tollgate_requests_total",
    "tollgate_request_duration_seconds",
    "tollgate_upstream_requests_total",
    "tollgate_upstream_in_flight",
    "tollgate_rate_limited_total",
    "tollgate_auth_failures_total",
    "tollgate_tokens_total",
    "tollgate_streams_active",
    "tollgate_config_reloads_total",
    "tollgate_routes",
    "tollgate_api_keys",
    "tollgate_endpoints_ready",
];

// ------------------------------------------------------------------------------- helpers --

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

/// The directory holding helm, kubectl, kube-apiserver and etcd.
fn tools_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(dir) = std::env::var_os("TOLLGATE_K8S_BIN") {
            let dir = PathBuf::from(dir);
            if ["helm", "kubectl", "kube-apiserver", "etcd"]
                .iter()
                .all(|b| dir.join(b).is_file())
            {
                return dir;
            }
        }
        let mut cmd = Command::new(repo().join("hack/build-k8s-tools.sh"));
        cmd.stderr(Stdio::inherit());
        // A cold build takes ~8 minutes on two cores (hack/README.md).
        let out = run_limited(cmd, Duration::from_secs(1200), "hack/build-k8s-tools.sh");
        assert!(out.status.success(), "hack/build-k8s-tools.sh failed");
        let stdout = String::from_utf8_lossy(&out.stdout);
        PathBuf::from(stdout.lines().last().expect("bin dir line").trim())
    })
}

/// Helm keeps its cache and config here, not in the user's home.
fn helm_home() -> &'static Path {
    static HOME: OnceLock<PathBuf> = OnceLock::new();
    HOME.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("install-helm-home");
        std::fs::create_dir_all(&dir).expect("helm home");
        dir
    })
}

fn helm_cmd() -> Command {
    let mut cmd = Command::new(tools_bin().join("helm"));
    let home = helm_home();
    cmd.current_dir(repo())
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"));
    cmd
}

fn helm(args: &[&str]) -> String {
    let mut cmd = helm_cmd();
    cmd.args(args);
    ok(cmd, &format!("helm {}", args.join(" ")))
}

fn render(extra: &[&str]) -> String {
    let mut args = vec!["template", "tollgate", "charts/tollgate", "--namespace", NS];
    args.extend_from_slice(extra);
    helm(&args)
}

/// The documents of a multi-document YAML stream, empty ones left out.
fn docs(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| Value::deserialize(d).expect("valid YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

fn kinds(docs: &[Value]) -> Vec<String> {
    docs.iter().map(|d| s(&d["kind"]).to_string()).collect()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in {:?}", kinds(docs)))
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or("")
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .map(|seq| seq.iter().map(|x| s(x).to_string()).collect())
        .unwrap_or_default()
}

fn container(docs: &[Value]) -> &Value {
    &find(docs, "Deployment", "tollgate")["spec"]["template"]["spec"]["containers"][0]
}

/// `tollgate run --help`, once.
fn run_help() -> &'static str {
    static HELP: OnceLock<String> = OnceLock::new();
    HELP.get_or_init(|| {
        let mut cmd = Command::new(TOLLGATE);
        cmd.args(["run", "--help"]);
        ok(cmd, "tollgate run --help")
    })
}

/// Every `--flag` a rendered container passes must be a flag of `tollgate run`.
fn assert_flags_exist(args: &[String]) {
    let help = run_help();
    for arg in args {
        let flag = arg.split('=').next().unwrap_or(arg);
        assert!(flag.starts_with("--"), "argument {arg:?} is not a --flag");
        assert!(
            help.split(|c: char| c.is_whitespace() || c == ',' || c == '[' || c == ']')
                .any(|w| w == flag),
            "the chart passes {flag}, which `tollgate run --help` does not know:\n{help}"
        );
    }
}

/// `helm ARGS` as cluster admin of `cp`.
fn helm_on(cp: &ExclusiveControlPlane, args: &[&str]) -> String {
    let mut cmd = helm_cmd();
    cmd.env("KUBECONFIG", cp.var("ADMIN_KUBECONFIG")).args(args);
    ok(cmd, &format!("helm {}", args.join(" ")))
}

// ------------------------------------------------------------------------ the chart alone --

#[test]
fn helm_lint_passes_with_defaults_and_with_every_feature() {
    helm(&["lint", "--strict", "charts/tollgate"]);
    helm(&["lint", "--strict", "charts/tollgate", "-f", ALL_FEATURES]);
}

#[test]
fn default_render_is_a_hardened_gateway_with_cluster_wide_read_rights() {
    let d = docs(&render(&[]));
    let mut k = kinds(&d);
    k.sort();
    assert_eq!(
        k,
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "Deployment",
            "IngressClass",
            "PodDisruptionBudget",
            "Role",
            "RoleBinding",
            "Service",
            "Service",
            "ServiceAccount"
        ]
    );
    for doc in &d {
        let cluster_scoped = matches!(
            s(&doc["kind"]),
            "ClusterRole" | "ClusterRoleBinding" | "IngressClass"
        );
        assert_eq!(
            doc["metadata"]["namespace"].as_str().is_some(),
            !cluster_scoped,
            "namespace of {} {}",
            s(&doc["kind"]),
            s(&doc["metadata"]["name"])
        );
    }

    let deploy = find(&d, "Deployment", "tollgate");
    let pod = &deploy["spec"]["template"]["spec"];
    assert_eq!(deploy["spec"]["replicas"], 2);
    assert_eq!(pod["serviceAccountName"], "tollgate");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let c = container(&d);
    let sc = &c["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"]);
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["readinessProbe"]["httpGet"]["port"], "admin");
    assert!(c["resources"]["requests"]["cpu"].as_str().is_some());
    assert!(
        c["command"].is_null(),
        "the image's entrypoint (`tollgate run`) is kept"
    );

    // Leader election identity from the downward API.
    let env = c["env"].as_sequence().expect("env");
    for (name, path) in [
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
    ] {
        let e = env
            .iter()
            .find(|e| e["name"] == name)
            .unwrap_or_else(|| panic!("{name} missing"));
        assert_eq!(e["valueFrom"]["fieldRef"]["fieldPath"], path);
    }

    // The kubelet waits for the preStop sleep plus the gateway's drain, with slack.
    let args = strings(&c["args"]);
    assert!(
        args.contains(&"--shutdown-grace=30s".to_string()),
        "{args:?}"
    );
    assert_eq!(c["lifecycle"]["preStop"]["sleep"]["seconds"], 5);
    assert_eq!(pod["terminationGracePeriodSeconds"], 5 + 30 + 5);
    assert_flags_exist(&args);

    // Scrape annotations are the default way to be found; the spread fills in its selector.
    let ann = &deploy["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(ann["prometheus.io/scrape"], "true");
    assert_eq!(ann["prometheus.io/port"], "9090");
    assert_eq!(
        pod["topologySpreadConstraints"][0]["labelSelector"]["matchLabels"]
            ["app.kubernetes.io/name"],
        "tollgate"
    );

    let proxy = find(&d, "Service", "tollgate");
    assert_eq!(proxy["spec"]["type"], "LoadBalancer");
    assert_eq!(proxy["spec"]["ports"][0]["targetPort"], "http");
    let admin = find(&d, "Service", "tollgate-admin");
    assert_eq!(admin["spec"]["type"], "ClusterIP");
    assert_eq!(admin["spec"]["ports"][0]["port"], 9090);

    let binding = find(&d, "ClusterRoleBinding", "tollgate");
    assert_eq!(binding["subjects"][0]["name"], "tollgate");
    assert_eq!(binding["subjects"][0]["namespace"], NS);
    let lease = find(&d, "Role", "tollgate-leader-election");
    assert_eq!(lease["metadata"]["namespace"], NS);
    assert_eq!(
        rule_set(&[lease]),
        triples(&[(
            "coordination.k8s.io",
            "leases",
            &["get", "create", "update"]
        )])
    );
    assert_eq!(
        rule_set(&[find(&d, "ClusterRole", "tollgate")]),
        expected_watch_rules()
    );
}

#[test]
fn every_optional_feature_renders() {
    let d = docs(&render(&["-f", ALL_FEATURES]));
    let k = kinds(&d);
    for kind in [
        "ServiceMonitor",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "ConfigMap",
    ] {
        assert!(k.iter().any(|x| x == kind), "{kind} missing from {k:?}");
    }
    // watchNamespaces: a Role in each watched namespace and no cluster-wide rights.
    assert!(!k.iter().any(|x| x.starts_with("Cluster")), "{k:?}");
    for ns in ["agents", "agents-canary"] {
        let role = d
            .iter()
            .find(|x| x["kind"] == "Role" && x["metadata"]["namespace"] == ns)
            .unwrap_or_else(|| panic!("no Role in {ns}"));
        assert_eq!(rule_set(&[role]), expected_watch_rules());
        assert!(d
            .iter()
            .any(|x| x["kind"] == "RoleBinding" && x["metadata"]["namespace"] == ns));
    }

    let deploy = find(&d, "Deployment", "tollgate");
    assert!(
        deploy["spec"]["replicas"].is_null(),
        "the HPA owns replicas"
    );
    let meta = &deploy["spec"]["template"]["metadata"];
    assert!(
        meta["annotations"]["prometheus.io/scrape"].is_null(),
        "no scrape annotations next to a ServiceMonitor"
    );
    assert_eq!(meta["labels"]["team"], "platform");
    let pod = &deploy["spec"]["template"]["spec"];
    assert_eq!(pod["terminationGracePeriodSeconds"], 10 + 60 + 5);
    assert_eq!(pod["nodeSelector"]["kubernetes.io/os"], "linux");
    assert_eq!(pod["tolerations"][0]["key"], "dedicated");
    assert!(pod["affinity"]["podAntiAffinity"].is_mapping());
    assert_eq!(
        pod["topologySpreadConstraints"].as_sequence().map(Vec::len),
        Some(2)
    );
    assert_eq!(pod["priorityClassName"], "system-cluster-critical");

    let c = container(&d);
    let args = strings(&c["args"]);
    for want in [
        "--tls-listen=0.0.0.0:8443",
        "--gateway-class=tollgate-internal",
        "--watch-namespace=agents",
        "--watch-namespace=agents-canary",
        "--default-rpm=120",
        "--redis-url=$(TOLLGATE_REDIS_URL)",
        "--log-format=text",
        "--shutdown-grace=60s",
        "--max-body-bytes=1048576",
        "--trust-forwarded",
    ] {
        assert!(
            args.iter().any(|a| a == want),
            "{want} missing from {args:?}"
        );
    }
    assert_flags_exist(&args);
    let redis = c["env"]
        .as_sequence()
        .expect("env")
        .iter()
        .find(|e| e["name"] == "TOLLGATE_REDIS_URL")
        .expect("redis env");
    assert_eq!(redis["valueFrom"]["secretKeyRef"]["name"], "tollgate-redis");

    let proxy = find(&d, "Service", "tollgate");
    let https = proxy["spec"]["ports"]
        .as_sequence()
        .expect("ports")
        .iter()
        .find(|p| p["name"] == "https")
        .expect("https port");
    assert_eq!(https["port"], 443);
    assert_eq!(https["nodePort"], 30443);
    assert_eq!(proxy["spec"]["externalTrafficPolicy"], "Local");

    let sm = find(&d, "ServiceMonitor", "tollgate");
    assert_eq!(sm["spec"]["endpoints"][0]["port"], "admin");
    assert_eq!(sm["metadata"]["labels"]["release"], "kube-prometheus-stack");
    assert_eq!(
        sm["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"],
        "admin"
    );
    let admin = find(&d, "Service", "tollgate-admin");
    assert_eq!(
        admin["metadata"]["labels"]["app.kubernetes.io/component"],
        "admin"
    );

    let cm = find(&d, "ConfigMap", "tollgate-dashboard");
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    let dash: serde_json::Value =
        serde_json::from_str(s(&cm["data"]["tollgate.json"])).expect("dashboard JSON");
    assert_eq!(dash["uid"], "tollgate-gateway");

    let hpa = find(&d, "HorizontalPodAutoscaler", "tollgate");
    assert_eq!(hpa["spec"]["scaleTargetRef"]["name"], "tollgate");
    assert_eq!(hpa["spec"]["metrics"].as_sequence().map(Vec::len), Some(2));
    assert_eq!(
        find(&d, "PodDisruptionBudget", "tollgate")["spec"]["minAvailable"],
        1
    );
}

#[test]
fn service_types_and_their_guards() {
    for ty in ["ClusterIP", "NodePort"] {
        let set = format!("service.type={ty}");
        let d = docs(&render(&[
            "--set",
            &set,
            "--set",
            "service.nodePorts.http=30080",
        ]));
        let svc = find(&d, "Service", "tollgate");
        assert_eq!(svc["spec"]["type"], ty);
        assert_eq!(
            svc["spec"]["ports"][0]["nodePort"].is_null(),
            ty == "ClusterIP"
        );
    }
    let mut cmd = helm_cmd();
    cmd.args([
        "template",
        "tollgate",
        "charts/tollgate",
        "--set",
        "service.type=Ingress",
    ]);
    let out = run_limited(cmd, Duration::from_secs(60), "helm template");
    assert!(!out.status.success(), "an unknown service type must fail");
    assert!(String::from_utf8_lossy(&out.stderr).contains("service.type must be"));
    // No preStop sleep when turned off; the grace period follows.
    let d = docs(&render(&["--set", "lifecycle.preStopSleepSeconds=0"]));
    assert!(container(&d)["lifecycle"].is_null());
    assert_eq!(
        find(&d, "Deployment", "tollgate")["spec"]["template"]["spec"]
            ["terminationGracePeriodSeconds"],
        35
    );
}

// ------------------------------------------------------------------------- RBAC as a set --

fn triples(rules: &[(&str, &str, &[&str])]) -> BTreeSet<(String, String, String)> {
    let mut out = BTreeSet::new();
    for (group, resource, verbs) in rules {
        for verb in *verbs {
            out.insert((group.to_string(), resource.to_string(), verb.to_string()));
        }
    }
    out
}

/// What `tollgate run` needs wherever it watches (what src/sources/kubernetes calls): reflectors
/// list and watch, status is a merge patch, Events go through events.k8s.io. The Gateway API
/// kinds are read when their CRDs are installed.
fn expected_watch_rules() -> BTreeSet<(String, String, String)> {
    let read: &[&str] = &["list", "watch"];
    triples(&[
        ("tollgate.dev", "agentroutes", read),
        ("tollgate.dev", "agentapikeys", read),
        ("tollgate.dev", "agentroutes/status", &["patch"]),
        ("tollgate.dev", "agentapikeys/status", &["patch"]),
        ("", "secrets", read),
        ("", "services", read),
        ("discovery.k8s.io", "endpointslices", read),
        ("events.k8s.io", "events", &["create", "patch"]),
        ("gateway.networking.k8s.io", "gatewayclasses", read),
        ("gateway.networking.k8s.io", "gateways", read),
        ("gateway.networking.k8s.io", "httproutes", read),
        ("gateway.networking.k8s.io", "referencegrants", read),
        (
            "gateway.networking.k8s.io",
            "gatewayclasses/status",
            &["patch"],
        ),
        ("gateway.networking.k8s.io", "gateways/status", &["patch"]),
        ("gateway.networking.k8s.io", "httproutes/status", &["patch"]),
        ("networking.k8s.io", "ingressclasses", read),
        ("networking.k8s.io", "ingresses", read),
        ("networking.k8s.io", "ingresses/status", &["patch"]),
        ("", "namespaces", read),
    ])
}

/// (apiGroup, resource, verb) for every rule of these roles: grouping and order do not matter.
fn rule_set(roles: &[&Value]) -> BTreeSet<(String, String, String)> {
    let mut out = BTreeSet::new();
    for role in roles {
        for rule in role["rules"].as_sequence().into_iter().flatten() {
            for g in strings(&rule["apiGroups"]) {
                for r in strings(&rule["resources"]) {
                    for v in strings(&rule["verbs"]) {
                        out.insert((g.clone(), r.clone(), v));
                    }
                }
            }
        }
    }
    out
}

#[test]
fn manifests_rbac_grants_exactly_what_the_chart_grants() {
    let dir = repo().join("manifests/rbac");
    let mut yaml = String::new();
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    files.sort();
    for f in &files {
        yaml.push_str(&std::fs::read_to_string(f).expect("rbac file"));
        yaml.push_str("\n---\n");
    }
    let theirs = docs(&yaml);
    let chart = docs(&render(&[]));
    let chart_ns = docs(&render(&["--set", "watchNamespaces={agents}"]));
    // Roles are told apart by what they grant: the Lease, or the watched kinds.
    let pick =
        |d: &[Value], kind: &str, lease: Option<bool>| -> BTreeSet<(String, String, String)> {
            let roles: Vec<&Value> = d
                .iter()
                .filter(|x| x["kind"] == kind)
                .filter(|x| {
                    lease.is_none_or(|want| {
                        let rules = serde_yaml::to_string(&x["rules"]).unwrap_or_default();
                        rules.contains("leases") == want
                    })
                })
                .collect();
            rule_set(&roles)
        };
    for (what, ours, theirs) in [
        (
            "ClusterRole (every namespace)",
            pick(&chart, "ClusterRole", None),
            pick(&theirs, "ClusterRole", None),
        ),
        (
            "Role of a watched namespace",
            pick(&chart_ns, "Role", Some(false)),
            pick(&theirs, "Role", Some(false)),
        ),
        (
            "leader-election Role",
            pick(&chart, "Role", Some(true)),
            pick(&theirs, "Role", Some(true)),
        ),
    ] {
        assert!(!ours.is_empty(), "the chart renders no {what}");
        assert_eq!(
            theirs, ours,
            "manifests/rbac/ and the chart grant different rules in the {what} (left: manifests/rbac, right: chart)"
        );
    }
    // Bound to a ServiceAccount, cluster-wide and for the Lease.
    for kind in ["ClusterRoleBinding", "RoleBinding"] {
        let b: Vec<&Value> = theirs.iter().filter(|x| x["kind"] == kind).collect();
        assert!(!b.is_empty(), "manifests/rbac/ has no {kind}");
        assert!(b
            .iter()
            .all(|b| b["subjects"][0]["kind"] == "ServiceAccount"));
    }
}

// ---------------------------------------------------------------- generated files, docs --

#[test]
fn chart_crds_and_install_yaml_are_fresh() {
    let mut cmd = Command::new(repo().join("scripts/render-manifests.sh"));
    cmd.arg("--check").env("HELM", tools_bin().join("helm"));
    let home = helm_home();
    cmd.env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"));
    ok(cmd, "scripts/render-manifests.sh --check");
    // And crds/ itself is what the binary prints (the chart's copy follows from it).
    let mut crdgen = Command::new(TOLLGATE);
    crdgen.arg("crdgen");
    assert_eq!(
        ok(crdgen, "tollgate crdgen"),
        read("charts/tollgate/crds/tollgate.yaml")
    );

    let d = docs(&read("manifests/install.yaml"));
    assert_eq!(d[0]["kind"], "Namespace");
    assert_eq!(d[0]["metadata"]["name"], NS);
    assert_eq!(
        d.iter()
            .filter(|x| x["kind"] == "CustomResourceDefinition")
            .count(),
        2
    );
}

#[test]
fn chart_readme_documents_every_value() {
    let values: Value = serde_yaml::from_str(&read("charts/tollgate/values.yaml")).expect("values");
    let readme = read("charts/tollgate/README.md");
    let mut missing = Vec::new();
    // Maps whose keys are settings of their own are documented key by key; the rest as a whole.
    fn walk(prefix: &str, v: &Value, out: &mut Vec<String>) {
        const WHOLE: &[&str] = &[
            "resources",
            "podSecurityContext",
            "securityContext",
            "probes.startup",
            "probes.liveness",
            "probes.readiness",
            "updateStrategy",
        ];
        match v {
            Value::Mapping(m) if !m.is_empty() && !WHOLE.contains(&prefix) => {
                for (k, v) in m {
                    let k = s(k);
                    let key = if prefix.is_empty() {
                        k.to_string()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&key, v, out);
                }
            }
            _ => out.push(prefix.to_string()),
        }
    }
    let mut keys = Vec::new();
    walk("", &values, &mut keys);
    for key in &keys {
        if !readme.contains(&format!("| `{key}` |")) {
            missing.push(key.clone());
        }
    }
    assert!(
        missing.is_empty(),
        "charts/tollgate/README.md lacks rows for {missing:?}"
    );
    assert!(keys.len() > 60, "walked only {} keys", keys.len());
}

#[test]
fn dashboard_shows_every_contract_metric_and_only_registered_ones() {
    let text = read("charts/tollgate/dashboards/tollgate.json");
    let dash: serde_json::Value = serde_json::from_str(&text).expect("dashboard JSON");
    let registered = read("src/telemetry/metrics.rs");
    let mut exprs = Vec::new();
    let mut ids = BTreeSet::new();
    let mut titles = Vec::new();
    for p in dash["panels"].as_array().expect("panels") {
        assert!(
            ids.insert(p["id"].as_i64().expect("panel id")),
            "duplicate panel id"
        );
        titles.push(p["title"].as_str().unwrap_or("").to_string());
        for t in p["targets"].as_array().into_iter().flatten() {
            exprs.push(t["expr"].as_str().expect("expr").to_string());
        }
    }
    let used: BTreeSet<String> = exprs
        .iter()
        .flat_map(|e| {
            e.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("tollgate_"))
                .map(|w| w.to_string())
                .collect::<Vec<_>>()
        })
        .collect();
    for m in &used {
        let base = m
            .strip_suffix("_bucket")
            .or_else(|| m.strip_suffix("_sum"))
            .or_else(|| m.strip_suffix("_count"))
            .unwrap_or(m);
        assert!(
            registered.contains(&format!("\"{base}\"")),
            "the dashboard queries {m}, which src/telemetry/metrics.rs does not register"
        );
    }
    for m in METRICS {
        assert!(
            used.iter()
                .any(|u| u == m || u.starts_with(&format!("{m}_"))),
            "the dashboard never shows {m}"
        );
    }
    // What the issue asks the dashboard to show.
    let all = titles.join(" | ").to_lowercase();
    for topic in [
        "by route",
        "latency",
        "rate-limited",
        "auth failures",
        "tokens",
        "ready endpoints",
        "reloads",
    ] {
        assert!(all.contains(topic), "no panel about {topic}: {all}");
    }
    // A data-source variable, so the dashboard works with any Prometheus data source name.
    assert!(dash["templating"]["list"]
        .as_array()
        .expect("variables")
        .iter()
        .any(|v| v["type"] == "datasource"));
}

#[test]
fn examples_are_the_seeds_routes_and_pass_tollgate_check() {
    let dir = tempfile::tempdir().expect("tempdir");
    for f in ["keys.yaml", "routes.yaml"] {
        std::fs::copy(
            repo().join("manifests/examples").join(f),
            dir.path().join(f),
        )
        .expect("copy");
    }
    let mut cmd = Command::new(TOLLGATE);
    cmd.arg("check").arg("--config").arg(dir.path());
    ok(cmd, "tollgate check manifests/examples");

    let routes = docs(&read("manifests/examples/routes.yaml"));
    let route = |name: &str| find(&routes, "AgentRoute", name)["spec"].clone();
    assert_eq!(
        route("chat")["backends"][0]["service"],
        "conversation-manager"
    );
    assert_eq!(route("chat-stream")["protocol"], "sse");
    assert_eq!(
        route("chat-stream")["match"]["pathPrefix"],
        "/api/v1/chat/stream"
    );
    assert_eq!(route("tools")["backends"][0]["service"], "tool-executor");
    assert_eq!(strings(&route("tools")["auth"]["roles"]), ["admin"]);
    assert_eq!(route("search")["backends"][0]["service"], "rag-retrieval");
    assert!(route("search")["rateLimit"]["requestsPerMinute"]
        .as_u64()
        .is_some());
    assert_eq!(route("memory")["backends"][0]["service"], "memory-service");
    let keys = docs(&read("manifests/examples/keys.yaml"));
    let akeys: Vec<&Value> = keys.iter().filter(|k| k["kind"] == "AgentApiKey").collect();
    assert!(akeys
        .iter()
        .any(|k| k["spec"]["secretRef"]["name"].is_string()));
    assert!(akeys
        .iter()
        .any(|k| s(&k["spec"]["keyHash"]).starts_with("sha256:")));
}

// ------------------------------------------------------------------------------ Dockerfile --

fn version_tuple(v: &str) -> Vec<u32> {
    v.split('.')
        .map(|p| p.parse().expect("numeric version part"))
        .collect()
}

#[test]
fn dockerfile_agrees_with_the_repo_and_the_binary() {
    let inst = support::dockerfile::instructions();
    let froms: Vec<&String> = inst
        .iter()
        .filter(|(i, _)| i == "FROM")
        .map(|(_, r)| r)
        .collect();
    assert!(froms.len() >= 2, "multi-stage: {froms:?}");

    // The Rust image is not older than Cargo.toml's rust-version.
    let rust_version = cargo_rust_version();
    let rust_from = froms
        .iter()
        .find_map(|f| f.strip_prefix("rust:"))
        .expect("a rust: build stage");
    let image_version = rust_from.split(['-', ' ']).next().expect("version");
    let (have, need) = (version_tuple(image_version), version_tuple(&rust_version));
    assert!(
        have[..2] >= need[..2],
        "FROM rust:{image_version} is older than rust-version {}",
        rust_version
    );

    // Everything it COPYs from the context exists.
    let final_stage = inst
        .iter()
        .rposition(|(i, _)| i == "FROM")
        .expect("final FROM");
    for (i, rest) in &inst {
        if i != "COPY" || rest.starts_with("--from") {
            continue;
        }
        let parts: Vec<&str> = rest
            .split_whitespace()
            .filter(|p| !p.starts_with("--"))
            .collect();
        for src in &parts[..parts.len() - 1] {
            assert!(
                repo().join(src).exists(),
                "Dockerfile COPYs {src}, which is not in the repo"
            );
        }
    }
    // The build builds the binary the final stage copies, for the target it added.
    let run = inst
        .iter()
        .filter(|(i, _)| i == "RUN")
        .map(|(_, r)| r.as_str())
        .collect::<Vec<_>>()
        .join(" ");
    assert!(run.contains("--bin tollgate"), "{run}");
    let target = run
        .split("--target ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .expect("--target");
    assert!(
        run.contains(&format!("rustup target add {target}")),
        "{run}"
    );
    assert!(
        run.contains(&format!("target/{target}/release/tollgate")),
        "{run}"
    );

    // The final stage: non-root, `tollgate` on the PATH, entrypoint `tollgate run`.
    let last = &inst[final_stage..];
    let user = last
        .iter()
        .rev()
        .find(|(i, _)| i == "USER")
        .map(|(_, r)| r.clone())
        .expect("USER in the final stage");
    let uid = user.split(':').next().unwrap_or("");
    assert!(
        uid != "0" && uid != "root" && !uid.is_empty(),
        "USER {user} is root"
    );
    assert!(
        last.iter()
            .any(|(i, r)| i == "COPY" && r.ends_with("/usr/local/bin/tollgate")),
        "the final stage puts tollgate in /usr/local/bin (on distroless' PATH)"
    );
    let entrypoint: Vec<String> = last
        .iter()
        .find(|(i, _)| i == "ENTRYPOINT")
        .map(|(_, r)| serde_json::from_str(r).expect("ENTRYPOINT in exec (JSON) form"))
        .expect("ENTRYPOINT");
    assert_eq!(entrypoint[..2], ["tollgate", "run"]);
    let mut flags: Vec<String> = entrypoint[2..].to_vec();
    if let Some((_, cmd)) = last.iter().find(|(i, _)| i == "CMD") {
        flags.extend(serde_json::from_str::<Vec<String>>(cmd).expect("CMD in exec form"));
    }
    assert_flags_exist(&flags);
    // The subcommand exists in the binary's own help.
    let mut help = Command::new(TOLLGATE);
    help.arg("--help");
    let help = ok(help, "tollgate --help");
    assert!(
        help.lines().any(|l| l.trim_start().starts_with("run ")),
        "`tollgate --help` lists no `run`:\n{help}"
    );
    // The ports it EXPOSEs are the listeners' defaults, which the chart uses too.
    let exposed: BTreeSet<String> = last
        .iter()
        .filter(|(i, _)| i == "EXPOSE")
        .flat_map(|(_, r)| r.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .collect();
    let rh = run_help();
    for (port, flag_default) in [("8080", "0.0.0.0:8080"), ("9090", "0.0.0.0:9090")] {
        assert!(exposed.contains(port), "EXPOSE lacks {port}");
        assert!(
            rh.contains(flag_default),
            "`tollgate run --help` has no default {flag_default}"
        );
    }
    assert!(exposed.contains("8443"));
    let values: Value = serde_yaml::from_str(&read("charts/tollgate/values.yaml")).expect("values");
    assert_eq!(values["containerPort"], 8080);
    assert_eq!(values["adminPort"], 9090);
    assert_eq!(values["tls"]["containerPort"], 8443);
    assert_eq!(
        values["podSecurityContext"]["runAsUser"]
            .as_u64()
            .map(|u| u.to_string()),
        Some(uid.to_string())
    );
}

/// Cargo.toml's `rust-version` (no TOML parser among the dependencies; the line is simple).
fn cargo_rust_version() -> String {
    read("Cargo.toml")
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k.trim() == "rust-version").then(|| v.trim().trim_matches('"').to_string())
        })
        .expect("rust-version in Cargo.toml")
}

// ------------------------------------------------------------------ on a real API server --

#[test]
fn the_api_server_accepts_every_rendering() {
    let cp = ControlPlane::exclusive("install");
    // The CRDs as users get them, and a stand-in for the Prometheus Operator's ServiceMonitor CRD.
    cp.kubectl_blocking(&[
        "apply",
        "-f",
        "charts/tollgate/crds/",
        "-f",
        "tests/install/servicemonitor-crd.yaml",
    ]);
    cp.kubectl_blocking(&[
        "wait",
        "--for=condition=Established",
        "crd",
        "--all",
        "--timeout=60s",
    ]);
    for ns in [NS, "agents", "agents-canary"] {
        cp.kubectl_blocking(&["create", "namespace", ns]);
    }
    // Server-side dry runs: schema, defaulting, validation and admission, strict field checks.
    let defaults = render(&[]);
    let out = cp.kubectl_stdin(
        &["apply", "--dry-run=server", "--validate=strict"],
        &defaults,
    );
    assert!(
        out.contains("deployment.apps/tollgate created (server dry run)"),
        "{out}"
    );
    let all = render(&["-f", ALL_FEATURES]);
    let out = cp.kubectl_stdin(&["apply", "--dry-run=server", "--validate=strict"], &all);
    for obj in [
        "servicemonitor.monitoring.coreos.com/tollgate",
        "horizontalpodautoscaler.autoscaling/tollgate",
        "configmap/tollgate-dashboard",
        "poddisruptionbudget.policy/tollgate",
        "role.rbac.authorization.k8s.io/tollgate",
    ] {
        assert!(
            out.contains(&format!("{obj} created (server dry run)")),
            "{obj}: {out}"
        );
    }
    for ty in ["ClusterIP", "NodePort"] {
        let set = format!("service.type={ty}");
        cp.kubectl_stdin(
            &["apply", "--dry-run=server", "--validate=strict"],
            &render(&["--set", &set]),
        );
    }
    // A misspelt field is refused, so the dry runs above do check something.
    let bad = defaults.replacen(
        "terminationGracePeriodSeconds",
        "terminationGraceSeconds",
        1,
    );
    let mut cmd = cp.kubectl_cmd();
    let path = cp.dir.join("bad.yaml");
    std::fs::write(&path, bad).expect("write");
    cmd.args(["apply", "--dry-run=server", "--validate=strict", "-f"])
        .arg(&path);
    let out = run_limited(cmd, Duration::from_secs(60), "kubectl apply bad");
    assert!(!out.status.success(), "a misspelt field was accepted");

    // The plain manifests and the examples, for real.
    cp.kubectl_blocking(&["apply", "-f", "manifests/install.yaml"]);
    cp.kubectl_blocking(&["apply", "-f", "manifests/examples/"]);
    let routes = cp.kubectl_blocking(&["get", "agentroutes", "-n", "agents", "-o", "name"]);
    assert_eq!(routes.lines().count(), 5, "{routes}");
}

/// The README's install section, run as written with `kubectl`/`helm` on the PATH; `docker`
/// lines cannot run here (no engine) and are the only ones skipped.
#[test]
fn readme_install_steps_work_as_written() {
    let readme = read("README.md");
    let section = readme
        .split("\n## Install on Kubernetes\n")
        .nth(1)
        .expect("README has `## Install on Kubernetes`")
        .split("\n## ")
        .next()
        .expect("section");
    // Shell blocks, continuation lines joined.
    let mut blocks: Vec<Vec<String>> = Vec::new();
    let mut in_block = false;
    let mut cur = String::new();
    for line in section.lines() {
        if line.trim_start().starts_with("```") {
            in_block = !in_block && line.trim() == "```sh";
            if in_block {
                blocks.push(Vec::new());
            }
            continue;
        }
        if !in_block || line.trim().is_empty() {
            continue;
        }
        if let Some(stripped) = line.trim_end().strip_suffix('\\') {
            cur.push_str(stripped);
            continue;
        }
        cur.push_str(line);
        blocks
            .last_mut()
            .expect("block")
            .push(cur.trim().to_string());
        cur.clear();
    }
    assert_eq!(
        blocks.len(),
        4,
        "image, helm, manifests, examples: {blocks:?}"
    );
    for cmd in blocks.iter().flatten() {
        let tool = cmd.split_whitespace().next().unwrap_or("");
        assert!(
            matches!(tool, "docker" | "helm" | "kubectl"),
            "README install step {cmd:?} is neither docker, helm nor kubectl"
        );
    }
    let is = |b: &Vec<String>, word: &str| b.iter().any(|c| c.contains(word));
    let helm_way = blocks
        .iter()
        .find(|b| is(b, "helm install"))
        .expect("helm block");
    let kubectl_way = blocks
        .iter()
        .find(|b| is(b, "manifests/install.yaml"))
        .expect("manifests block");
    let then = blocks
        .iter()
        .find(|b| is(b, "manifests/examples"))
        .expect("examples block");

    // Each way on its own fresh control plane: they create the same objects.
    for way in [helm_way, kubectl_way] {
        let cp = ControlPlane::exclusive("install");
        let path = format!(
            "{}:{}",
            tools_bin().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        for step in way.iter().chain(then.iter()) {
            let mut cmd = Command::new("bash");
            cmd.args(["-euo", "pipefail", "-c", step])
                .current_dir(repo())
                .env("PATH", &path)
                .env("KUBECONFIG", cp.var("ADMIN_KUBECONFIG"))
                .env("HELM_CACHE_HOME", helm_home().join("cache"))
                .env("HELM_CONFIG_HOME", helm_home().join("config"))
                .env("HELM_DATA_HOME", helm_home().join("data"));
            ok(cmd, step);
        }
        // Up to the point where a kubelet would start pods: the objects are there and right.
        cp.wait_for(
            &[
                "get",
                "crd",
                "agentroutes.tollgate.dev",
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Established\")].status}",
            ],
            "True",
            Duration::from_secs(30),
        );
        let image = cp.kubectl_blocking(&[
            "get",
            "deployment",
            "tollgate",
            "-n",
            NS,
            "-o",
            "jsonpath={.spec.template.spec.containers[0].image}",
        ]);
        assert_eq!(image, "registry.example.com/tollgate:0.1.0");
        let sa =
            cp.kubectl_blocking(&["get", "serviceaccount", "tollgate", "-n", NS, "-o", "name"]);
        assert_eq!(sa.trim(), "serviceaccount/tollgate");
        let can = cp.kubectl_blocking(&[
            "auth",
            "can-i",
            "watch",
            "agentroutes.tollgate.dev",
            "--all-namespaces",
            "--as=system:serviceaccount:tollgate-system:tollgate",
        ]);
        assert_eq!(can.trim(), "yes");
        let keys = cp.kubectl_blocking(&["get", "agentapikeys", "-n", "agents", "-o", "name"]);
        assert_eq!(keys.lines().count(), 2, "{keys}");
    }
}

/// Installs the chart with `extra` values, runs `tollgate run` on the host as the chart's
/// ServiceAccount (a TokenRequest token), applies a key and a route with kubectl, and sends a
/// request through the gateway. Any right the chart forgot shows up as a refusal here.
fn operator_serves_with_chart_identity(extra_values: &[&str], watch: Option<&str>, ns: &str) {
    let cp = ControlPlane::exclusive("install");
    // The routes' namespace first: with watchNamespaces the chart puts a Role in it.
    cp.kubectl_blocking(&["create", "namespace", ns]);
    let mut args = vec![
        "install",
        "tollgate",
        "charts/tollgate",
        "--namespace",
        NS,
        "--create-namespace",
    ];
    args.extend_from_slice(extra_values);
    helm_on(&cp, &args);
    cp.kubectl_blocking(&[
        "wait",
        "--for=condition=Established",
        "crd",
        "--all",
        "--timeout=60s",
    ]);

    let kubeconfig = cp.service_account_kubeconfig(NS, "tollgate");
    let mut whoami = Command::new(cp.var("KUBECTL"));
    whoami.arg("--kubeconfig").arg(&kubeconfig).args([
        "auth",
        "whoami",
        "-o",
        "jsonpath={.status.userInfo.username}",
    ]);
    assert_eq!(
        ok(whoami, "kubectl auth whoami"),
        "system:serviceaccount:tollgate-system:tollgate"
    );

    // The gateway, its backend and the requests run on a runtime of their own; the kubectl
    // calls block this thread meanwhile.
    let rt = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let backend = rt.block_on(support::Backend::spawn(
        "install",
        support::handler(|seen, _| async move {
            let body = format!(
                "backend saw {} client={}",
                seen.path_and_query(),
                seen.header("x-client-id").unwrap_or_default()
            );
            support::respond(http::StatusCode::OK, body)
        }),
    ));
    let watch_flag = watch.map(|ns| format!("--watch-namespace={ns}"));
    let mut args = vec!["--shutdown-grace=2s"];
    args.extend(watch_flag.iter().map(String::as_str));
    let kubeconfig_env = kubeconfig.to_str().expect("a UTF-8 path");
    let envs = [
        ("KUBECONFIG", kubeconfig_env),
        ("POD_NAME", "tollgate-test-0"),
        ("POD_NAMESPACE", NS),
    ];
    let mut gw = rt.block_on(GatewayProcess::run(&args, &envs, Duration::from_secs(60)));

    cp.kubectl_stdin(
        &["apply"],
        &format!(
            "apiVersion: v1
kind: Secret
metadata: {{name: install-test-key, namespace: {ns}}}
stringData: {{api-key: install-test-key-0001}}
---
apiVersion: tollgate.dev/v1alpha1
kind: AgentApiKey
metadata: {{name: install-test, namespace: {ns}}}
spec: {{clientId: install-test, secretRef: {{name: install-test-key, key: api-key}}, roles: [user]}}
---
apiVersion: tollgate.dev/v1alpha1
kind: AgentRoute
metadata: {{name: hello, namespace: {ns}}}
spec:
  match: {{pathPrefix: /api/v1/hello}}
  rewrite: {{pathPrefix: /hello}}
  backends: [{{url: \"{}\"}}]
",
            backend.url()
        ),
    );
    let http = support::client();
    let url = gw.url("/api/v1/hello/x");
    let body = rt.block_on(support::eventually(
        Duration::from_secs(20),
        "the route serving 200",
        || async {
            let r = http
                .get(&url)
                .header("X-API-Key", "install-test-key-0001")
                .send()
                .await
                .ok()?;
            if r.status() != 200 {
                return None;
            }
            r.text().await.ok()
        },
    ));
    assert_eq!(body, "backend saw /hello/x client=install-test");
    let status = rt
        .block_on(async { http.get(&url).send().await })
        .expect("request")
        .status();
    assert_eq!(status, 401, "no key, no entry");

    // The writes the chart's RBAC must allow: the Lease, status, Events.
    cp.wait_for(
        &[
            "get",
            "lease",
            "tollgate-tollgate",
            "-n",
            NS,
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ],
        "tollgate-test-0",
        Duration::from_secs(20),
    );
    cp.wait_for(
        &[
            "get",
            "agentroute",
            "hello",
            "-n",
            ns,
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Accepted\")].status}",
        ],
        "True",
        Duration::from_secs(20),
    );
    cp.wait_for(
        &[
            "get",
            "agentapikey",
            "install-test",
            "-n",
            ns,
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
        ],
        "True",
        Duration::from_secs(20),
    );
    cp.wait_for_nonempty(
        &["get", "events", "-n", ns, "-o", "name"],
        Duration::from_secs(20),
    );

    let status = rt.block_on(gw.terminate());
    let log = gw.output();
    let lower = log.to_lowercase();
    assert!(
        !lower.contains("forbidden") && !lower.contains("\"code\":403"),
        "the gateway was refused something under the chart's RBAC:\n{log}"
    );
    assert!(
        status.is_some_and(|s| s.success()),
        "tollgate run exited with {status:?}:\n{log}"
    );
}

#[test]
fn operator_runs_with_the_charts_cluster_role() {
    operator_serves_with_chart_identity(
        &["--set", "image.repository=registry.example.com/tollgate"],
        None,
        "agents",
    );
}

#[test]
fn operator_runs_with_the_charts_namespaced_roles() {
    operator_serves_with_chart_identity(
        &["--set", "watchNamespaces={team-a}"],
        Some("team-a"),
        "team-a",
    );
}
