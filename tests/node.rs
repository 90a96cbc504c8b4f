//! Tollgate on a real node (`hack/node-rig.sh`: kubelet, containerd, kube-proxy, scheduler and
//! controller-manager beside the usual etcd + kube-apiserver), installed the way the README says,
//! with backends that are Deployments of real pods. Needs root, network namespaces, iptables and
//! containerd: `hack/node-rig.sh check` says whether this host has them, and the node test skips
//! (saying why) when it does not. The gateway's image is the one `hack/node-images.sh gateway`
//! builds as the Dockerfile does (scripts/test.sh builds it first; `TOLLGATE_GATEWAY_IMAGE`
//! names another tar).
//!
//! The image-layout test needs no node: it checks that the image tool lays the gateway out as the
//! Dockerfile's final stage does, so the two cannot drift.
#![forbid(unsafe_code)]

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use support::keepalive::{KeepAlive, Proto, Stats};
use support::process::{run_limited, run_ok};

const TOLLGATE: &str = env!("CARGO_BIN_EXE_tollgate");
const NS: &str = "tollgate-system";
const APPS: &str = "agents-node";
const KEY: &str = "node-test-key-0001";
/// terminationGracePeriodSeconds of the LLM-style backend's pods.
const STREAM_POD_GRACE: u32 = 20;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn hack(script: &str) -> Command {
    Command::new(repo().join("hack").join(script))
}

// ------------------------------------------------------------------------------ the image --

/// A docker-archive tar's config and its layer's entries (path -> `tar -tv` line).
fn read_archive(tar: &Path) -> (Value, BTreeMap<String, String>) {
    let member = |name: &str| {
        let mut cmd = Command::new("tar");
        cmd.arg("-xOf").arg(tar).arg(name);
        let out = run_limited(cmd, Duration::from_secs(60), "tar -xO");
        assert!(out.status.success(), "no {name} in {}", tar.display());
        out.stdout
    };
    let manifest: Value = serde_json::from_slice(&member("manifest.json")).expect("manifest");
    let config: Value =
        serde_json::from_slice(&member(manifest[0]["Config"].as_str().expect("Config")))
            .expect("config");
    let layers = manifest[0]["Layers"].as_array().expect("Layers");
    assert_eq!(layers.len(), 1, "one layer: {manifest}");
    let layer_path =
        std::env::temp_dir().join(format!("tollgate-layer-{}.tar", std::process::id()));
    std::fs::write(&layer_path, member(layers[0].as_str().expect("layer"))).expect("layer");
    let mut cmd = Command::new("tar");
    cmd.arg("-tvf").arg(&layer_path);
    let listing = run_ok(cmd, "tar -tv");
    let _ = std::fs::remove_file(&layer_path);
    let entries = listing
        .lines()
        .filter_map(|l| {
            let path = l.split_whitespace().last()?;
            Some((format!("/{}", path.trim_end_matches('/')), l.to_string()))
        })
        .collect();
    (config, entries)
}

#[test]
fn gateway_image_is_laid_out_as_the_dockerfile_says() {
    let out = std::env::temp_dir().join(format!("tollgate-image-{}.tar", std::process::id()));
    let mut cmd = Command::new("python3");
    cmd.arg(repo().join("hack/docker-archive.py"))
        .args(["gateway", "--dockerfile"])
        .arg(repo().join("Dockerfile"))
        .arg("--binary")
        .arg(TOLLGATE)
        .args(["--tag", "tollgate:layout-test", "--out"])
        .arg(&out);
    run_ok(cmd, "hack/docker-archive.py gateway");
    let (image, entries) = read_archive(&out);
    let _ = std::fs::remove_file(&out);
    let config = &image["config"];

    let stage = support::dockerfile::final_stage();
    assert!(
        stage[0].1.contains("distroless/static") && stage[0].1.contains("nonroot"),
        "the image tool lays out a distroless static nonroot base; the Dockerfile says {:?}",
        stage[0]
    );
    let mut copies = 0;
    for (instr, arg) in &stage[1..] {
        match instr.as_str() {
            "USER" => assert_eq!(config["User"], json!(arg), "USER"),
            "ENTRYPOINT" => {
                let want: Value = serde_json::from_str(arg).expect("ENTRYPOINT is JSON");
                assert_eq!(config["Entrypoint"], want, "ENTRYPOINT");
            }
            "EXPOSE" => {
                for p in arg.split_whitespace() {
                    assert!(
                        config["ExposedPorts"].get(format!("{p}/tcp")).is_some(),
                        "EXPOSE {p}: {config}"
                    );
                }
            }
            "LABEL" => {
                // key="value" pairs; values here have no escaped quotes.
                let mut rest = arg.as_str();
                while let Some((k, v)) = rest.split_once("=\"") {
                    let (val, tail) = v.split_once('"').expect("closing quote");
                    assert_eq!(config["Labels"][k.trim()], json!(val), "LABEL {k}");
                    rest = tail;
                }
            }
            "COPY" => {
                copies += 1;
                let paths: Vec<&str> = arg
                    .split_whitespace()
                    .filter(|t| !t.starts_with("--"))
                    .collect();
                let (src, dst) = (paths[0], paths[paths.len() - 1]);
                if arg.contains("--from=") {
                    let line = entries
                        .get(dst)
                        .unwrap_or_else(|| panic!("{dst} not in the image"));
                    assert!(
                        line.starts_with("-rwxr-xr-x"),
                        "{dst} is an executable: {line}"
                    );
                } else {
                    for f in std::fs::read_dir(repo().join(src)).expect("COPY source dir") {
                        let name = f.expect("entry").file_name();
                        let p = format!("{dst}/{}", name.to_string_lossy());
                        assert!(
                            entries.contains_key(&p),
                            "{p} (COPY {src}) not in the image"
                        );
                    }
                }
            }
            "RUN" => panic!("the final stage runs nothing: RUN {arg}"),
            _ => {}
        }
    }
    assert_eq!(copies, 2, "the final stage copies the binary and the CRDs");
    // The entrypoint resolves through the image's PATH, and the user exists, as on distroless.
    let exe = config["Entrypoint"][0].as_str().expect("entrypoint");
    let path = config["Env"]
        .as_array()
        .expect("Env")
        .iter()
        .filter_map(|e| e.as_str()?.strip_prefix("PATH="))
        .next()
        .expect("PATH in Env");
    assert!(
        path.split(':')
            .any(|d| entries.contains_key(&format!("{d}/{exe}"))),
        "{exe} is on the image's PATH {path}"
    );
    assert!(
        entries.contains_key("/etc/passwd")
            && entries.contains_key("/etc/ssl/certs/ca-certificates.crt")
    );
    assert!(entries["/tmp"].starts_with("drwxrwxrwt"), "/tmp is 1777");
}

// ------------------------------------------------------------------------------- the node --

/// A node from `hack/node-rig.sh up`, torn down (and checked for leftovers) when dropped.
struct Node {
    dir: PathBuf,
    env: BTreeMap<String, String>,
}

impl Node {
    fn up() -> Node {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("node-rig");
        let mut cmd = hack("node-rig.sh");
        cmd.arg("up").arg(&dir);
        // A cold build of the node binaries takes ~5 minutes (hack/README.md).
        let out = run_limited(cmd, Duration::from_secs(900), "hack/node-rig.sh up");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "hack/node-rig.sh up failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("{}", String::from_utf8_lossy(&out.stderr).trim_end());
        let env = stdout
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Node { dir, env }
    }

    fn kubectl(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.env["KUBECTL"]);
        cmd.env("KUBECONFIG", &self.env["KUBECONFIG"]).args(args);
        cmd
    }

    fn k(&self, args: &[&str]) -> String {
        run_ok(self.kubectl(args), &format!("kubectl {}", args.join(" ")))
    }

    /// kubectl that may fail (an object not there yet): its stdout when it succeeded.
    fn k_try(&self, args: &[&str]) -> Option<String> {
        let out = run_limited(self.kubectl(args), Duration::from_secs(30), "kubectl");
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn apply(&self, doc: &Value) {
        let path = self.dir.join(format!("apply-{}.json", std::process::id()));
        std::fs::write(&path, doc.to_string()).expect("write manifest");
        self.k(&["apply", "-f", path.to_str().expect("utf-8 path")]);
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        serde_json::from_str(&self.k(&a)).expect("kubectl json")
    }

    fn import(&self, tar: &Path) {
        let mut cmd = Command::new("ctr");
        cmd.args([
            "--address",
            &self.env["CONTAINERD_SOCK"],
            "-n",
            "k8s.io",
            "images",
            "import",
        ])
        .arg(tar);
        run_ok(cmd, "ctr images import");
    }

    fn helm(&self, args: &[&str]) -> String {
        let mut cmd = Command::new(&self.env["HELM"]);
        cmd.env("KUBECONFIG", &self.env["KUBECONFIG"])
            .env("HELM_CONFIG_HOME", self.dir.join("helm/config"))
            .env("HELM_CACHE_HOME", self.dir.join("helm/cache"))
            .env("HELM_DATA_HOME", self.dir.join("helm/data"))
            .current_dir(repo())
            .args(args);
        run_ok(cmd, &format!("helm {}", args.join(" ")))
    }

    /// The Lease's holder, once someone holds it.
    fn lease_holder(&self) -> Option<String> {
        let h = self.k_try(&[
            "-n",
            NS,
            "get",
            "lease",
            "tollgate-tollgate",
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ])?;
        (!h.is_empty()).then_some(h)
    }

    fn ready_pods(&self, ns: &str, selector: &str) -> BTreeSet<String> {
        let pods = self.json(&["-n", ns, "get", "pods", "-l", selector]);
        pods["items"]
            .as_array()
            .map(|items| {
                items
                    .iter()
                    .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
                    .filter(|p| {
                        p["status"]["conditions"].as_array().is_some_and(|c| {
                            c.iter()
                                .any(|c| c["type"] == "Ready" && c["status"] == "True")
                        })
                    })
                    .filter_map(|p| p["metadata"]["name"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let mut cmd = hack("node-rig.sh");
        cmd.arg("down").arg(&self.dir);
        let out = run_limited(cmd, Duration::from_secs(120), "hack/node-rig.sh down");
        let mut check = hack("node-rig.sh");
        check.arg("leftovers").arg(&self.dir);
        let left = run_limited(check, Duration::from_secs(60), "hack/node-rig.sh leftovers");
        if !std::thread::panicking() {
            assert!(
                out.status.success(),
                "down failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                left.status.success(),
                "the node left traces:\n{}",
                String::from_utf8_lossy(&left.stdout)
            );
        }
    }
}

/// Polls `probe` every 200 ms until it gives `Some`, for at most `within`.
fn wait<T>(within: Duration, what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn condition(obj: &Value, type_: &str) -> Option<String> {
    obj["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .and_then(|c| c["status"].as_str().map(str::to_string))
}

fn gateway_tar() -> PathBuf {
    if let Some(p) = std::env::var_os("TOLLGATE_GATEWAY_IMAGE") {
        return PathBuf::from(p);
    }
    let version = env!("CARGO_PKG_VERSION");
    let p = repo().join(format!("target/node-images/tollgate-{version}.tar"));
    assert!(
        p.is_file(),
        "no gateway image at {}: run `hack/node-images.sh gateway` first (scripts/test.sh does)",
        p.display()
    );
    p
}

fn small_image(name: &str) -> PathBuf {
    let mut cmd = hack("node-images.sh");
    cmd.arg(name);
    let out = run_ok(cmd, "hack/node-images.sh");
    PathBuf::from(out.lines().last().expect("tar path").trim())
}

/// Whether this host can run a node; the reason when it cannot.
fn host_cannot_run_a_node() -> Option<String> {
    let mut cmd = hack("node-rig.sh");
    cmd.arg("check");
    let out = run_limited(cmd, Duration::from_secs(60), "hack/node-rig.sh check");
    (!out.status.success()).then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn deployment(name: &str, image: &str, replicas: u32, env: Value) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": APPS},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "terminationGracePeriodSeconds": 2,
                    "containers": [{
                        "name": name, "image": image, "imagePullPolicy": "Never",
                        "env": env,
                        "ports": [{"containerPort": 8080}],
                        "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8080}, "periodSeconds": 1}
                    }]
                }
            }
        }
    })
}

fn service(name: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": APPS},
        "spec": {"selector": {"app": name}, "ports": [{"port": 80, "targetPort": 8080}]}
    })
}

fn route(name: &str, prefix: &str, backend: &str, extra: Value) -> Value {
    let mut spec =
        json!({"match": {"pathPrefix": prefix}, "backends": [{"service": backend, "port": 80}]});
    if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
        s.extend(e.clone());
    }
    json!({"apiVersion": "tollgate.dev/v1alpha1", "kind": "AgentRoute",
           "metadata": {"name": name, "namespace": APPS}, "spec": spec})
}

/// The route is Accepted, its refs resolved, with `ready` endpoints for its backend.
fn route_ready(node: &Node, name: &str, ready: u64) -> Option<()> {
    let r: Value = serde_json::from_str(&node.k_try(&[
        "-n",
        APPS,
        "get",
        "agentroute",
        name,
        "-o",
        "json",
    ])?)
    .ok()?;
    let n = r["status"]["backends"][0]["readyEndpoints"].as_u64();
    (condition(&r, "Accepted").as_deref() == Some("True")
        && condition(&r, "ResolvedRefs").as_deref() == Some("True")
        && n == Some(ready))
    .then_some(())
}

/// The pod names the EndpointSlices of Service `svc` list as ready.
fn slice_pods(node: &Node, svc: &str) -> BTreeSet<String> {
    let slices = node.json(&[
        "-n",
        APPS,
        "get",
        "endpointslices",
        "-l",
        &format!("kubernetes.io/service-name={svc}"),
    ]);
    let mut pods = BTreeSet::new();
    for s in slices["items"].as_array().into_iter().flatten() {
        for e in s["endpoints"].as_array().into_iter().flatten() {
            if e["conditions"]["ready"] == true {
                if let Some(n) = e["targetRef"]["name"].as_str() {
                    pods.insert(n.to_string());
                }
            }
        }
    }
    pods
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_install_and_the_chart_on_a_real_node() {
    if let Some(why) = host_cannot_run_a_node() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let gateway = gateway_tar();
    let (echo_tar, llm_tar) = (small_image("echo"), small_image("llm"));
    let t0 = Instant::now();
    let node = tokio::task::block_in_place(Node::up);
    eprintln!("node: up in {:.1}s", t0.elapsed().as_secs_f64());
    for tar in [&gateway, &echo_tar, &llm_tar] {
        node.import(tar);
    }
    tokio::task::block_in_place(|| scenario(&node));
}

fn scenario(node: &Node) {
    let selector = "app.kubernetes.io/name=tollgate";
    let version = env!("CARGO_PKG_VERSION");

    // 1. The README's plain-manifests install, as written (the image is the local tag).
    let t = Instant::now();
    let install = repo().join("manifests/install.yaml");
    let install = install.to_str().expect("utf-8 path");
    node.k(&["apply", "-f", install]);
    node.k(&[
        "-n",
        NS,
        "set",
        "image",
        "deployment/tollgate",
        &format!("tollgate=tollgate:{version}"),
    ]);
    node.k(&[
        "-n",
        NS,
        "rollout",
        "status",
        "deployment/tollgate",
        "--timeout=120s",
    ]);
    let pods = node.ready_pods(NS, selector);
    assert_eq!(pods.len(), 2, "manifests: two ready gateway pods: {pods:?}");
    let holder = wait(
        Duration::from_secs(30),
        "manifests: a pod holds the Lease",
        || node.lease_holder(),
    );
    assert!(
        pods.contains(&holder),
        "the Lease holder {holder} is one of {pods:?}"
    );
    eprintln!(
        "manifests/install.yaml: 2 pods Ready, {holder} leads, in {:.1}s",
        t.elapsed().as_secs_f64()
    );
    node.k(&["delete", "-f", install, "--wait=true", "--timeout=120s"]);

    // 2. The chart, as the README installs it, with 2 replicas.
    let t = Instant::now();
    node.helm(&[
        "install",
        "tollgate",
        "charts/tollgate",
        "--namespace",
        NS,
        "--create-namespace",
        "--set",
        "image.repository=tollgate",
        "--set",
        "replicaCount=2",
    ]);
    // Not `helm --wait`: it waits for the LoadBalancer Service's address, which no node-only
    // cluster hands out. The pods' readiness is what counts.
    node.k(&[
        "-n",
        NS,
        "rollout",
        "status",
        "deployment/tollgate",
        "--timeout=120s",
    ]);
    let pods = wait(
        Duration::from_secs(60),
        "chart: two ready gateway pods",
        || {
            let p = node.ready_pods(NS, selector);
            (p.len() == 2).then_some(p)
        },
    );
    let ready_in = t.elapsed();
    let leader = wait(
        Duration::from_secs(30),
        "chart: a pod holds the Lease",
        || node.lease_holder(),
    );
    assert!(
        pods.contains(&leader),
        "the Lease holder {leader} is one of {pods:?}"
    );
    eprintln!(
        "helm install: both pods Ready in {:.1}s; {leader} holds the Lease",
        ready_in.as_secs_f64()
    );

    // 3. Backends are Deployments of real pods; routes and a key get status.
    node.apply(&json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": APPS}}));
    node.apply(&deployment(
        "echo",
        "tollgate-test/echo:1",
        2,
        json!([{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]),
    ));
    let mut llm = deployment(
        "llm",
        "tollgate-test/llm:1",
        1,
        json!([
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "CHUNKS", "value": "5"}, {"name": "DELAY_MS", "value": "150"}]),
    );
    // Long enough for a stream on a deleted pod to finish (the backend ignores SIGTERM).
    llm["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = json!(STREAM_POD_GRACE);
    node.apply(&llm);
    node.apply(&service("echo"));
    node.apply(&service("llm"));
    node.apply(
        &json!({"apiVersion": "tollgate.dev/v1alpha1", "kind": "AgentApiKey",
        "metadata": {"name": "node-test", "namespace": APPS},
        "spec": {"clientId": "node-test", "keyHash": support::key_hash(KEY),
                 "roles": ["user"], "rateLimit": {"requestsPerMinute": 6000}}}),
    );
    node.apply(&route("echo", "/echo", "echo", json!({})));
    node.apply(&route("llm", "/v1/chat", "llm", json!({"protocol": "sse"})));
    node.k(&[
        "-n",
        APPS,
        "rollout",
        "status",
        "deployment/echo",
        "--timeout=60s",
    ]);
    node.k(&[
        "-n",
        APPS,
        "rollout",
        "status",
        "deployment/llm",
        "--timeout=60s",
    ]);
    wait(
        Duration::from_secs(30),
        "route echo Accepted with 2 ready endpoints",
        || route_ready(node, "echo", 2),
    );
    wait(
        Duration::from_secs(30),
        "route llm Accepted with 1 ready endpoint",
        || route_ready(node, "llm", 1),
    );
    wait(Duration::from_secs(30), "key node-test Ready", || {
        let k: Value = serde_json::from_str(&node.k_try(&[
            "-n",
            APPS,
            "get",
            "agentapikey",
            "node-test",
            "-o",
            "json",
        ])?)
        .ok()?;
        (condition(&k, "Ready").as_deref() == Some("True")).then_some(())
    });

    // Traffic through the gateway's Service (kube-proxy) to the pods its EndpointSlices name.
    let svc_ip = node.k(&[
        "-n",
        NS,
        "get",
        "service",
        "tollgate",
        "-o",
        "jsonpath={.spec.clusterIP}",
    ]);
    let base = format!("http://{svc_ip}");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let want = slice_pods(node, "echo");
    assert_eq!(
        want.len(),
        2,
        "two echo pods in the EndpointSlices: {want:?}"
    );
    let reached: BTreeSet<String> = rt.block_on(async {
        let mut seen = BTreeSet::new();
        for i in 0..40 {
            let resp = client
                .get(format!("{base}/echo/{i}"))
                .header("x-api-key", KEY)
                .send()
                .await
                .expect("request");
            assert_eq!(resp.status(), 200, "GET /echo/{i}");
            let body: Value = resp.json().await.expect("echo json");
            seen.insert(body["pod"].as_str().expect("pod").to_string());
        }
        seen
    });
    assert_eq!(
        reached, want,
        "the gateway reached exactly the EndpointSlices' pods"
    );
    let unauth = rt.block_on(async {
        client
            .get(format!("{base}/echo/x"))
            .send()
            .await
            .expect("request")
            .status()
    });
    assert_eq!(unauth, 401, "no key, no entry");

    // A stream from the LLM-style pod arrives event by event, not buffered.
    let (events, spread) = rt.block_on(async {
        let started = Instant::now();
        let mut resp = client
            .post(format!("{base}/v1/chat/completions"))
            .header("x-api-key", KEY)
            .header("content-type", "application/json")
            .body(r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}"#)
            .send()
            .await
            .expect("stream request");
        assert_eq!(resp.status(), 200);
        let mut first = None;
        let mut text = String::new();
        while let Some(chunk) = resp.chunk().await.expect("stream chunk") {
            first.get_or_insert_with(|| started.elapsed());
            text.push_str(&String::from_utf8_lossy(&chunk));
        }
        let spread = started.elapsed() - first.unwrap_or_default();
        (text.matches("data: ").count(), spread)
    });
    assert_eq!(events, 6, "5 chunks and [DONE]");
    assert!(
        spread >= Duration::from_millis(450),
        "events arrived over time, not at once: {spread:?}"
    );

    let gateway_addr = SocketAddr::new(svc_ip.parse().expect("ClusterIP"), 80);

    // 4. The echo backend scaled 2 -> 6 -> 1 under load, an LLM pod deleted mid-stream.
    scale_under_load(node, gateway_addr, &base);

    // 5. A rolling upgrade of the gateway under load, streams open.
    rolling_upgrade_under_load(node, gateway_addr, &base);

    // 6. kill -9 of the leader's process: the Lease is not released, status writes resume.
    hard_crash_takeover(node);

    // 7. Force-delete the leader pod: the other replica takes the Lease over and status
    // writes resume.
    let leader = wait(Duration::from_secs(30), "a pod holds the Lease", || {
        node.lease_holder()
    });
    let t = Instant::now();
    node.k(&[
        "-n",
        NS,
        "delete",
        "pod",
        &leader,
        "--grace-period=0",
        "--force",
        "--wait=false",
    ]);
    let new_leader = wait(
        Duration::from_secs(60),
        "another pod takes the Lease",
        || node.lease_holder().filter(|h| *h != leader),
    );
    let takeover = t.elapsed();
    eprintln!(
        "leader {leader} killed: {new_leader} took the Lease over in {:.1}s",
        takeover.as_secs_f64()
    );
    node.apply(&route("after-takeover", "/after", "echo", json!({})));
    wait(
        Duration::from_secs(30),
        "the new leader writes status",
        || route_ready(node, "after-takeover", 1),
    );
    wait(
        Duration::from_secs(90),
        "the Deployment is back to two ready pods",
        || (node.ready_pods(NS, selector).len() == 2).then_some(()),
    );
    // A fresh client: the old one's pooled connections may lead to the force-deleted pod,
    // which had no time to drain.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let ok = rt.block_on(async {
        client
            .get(format!("{base}/after/x"))
            .header("x-api-key", KEY)
            .send()
            .await
            .expect("request")
            .status()
    });
    assert_eq!(ok, 200, "the new route serves");

    node.helm(&["uninstall", "tollgate", "--namespace", NS]);
}

// ------------------------------------------------------------------------- under load --

fn load_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("load runtime")
}

/// Idempotent GETs through the gateway by a keep-alive pool: `workers` loops, each pausing
/// `pause` between requests, until stopped. Records the pods that answered and every failure.
struct Load {
    pool: KeepAlive,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    pods: Arc<Mutex<BTreeMap<String, u64>>>,
    failures: Arc<Mutex<Vec<String>>>,
}

impl Load {
    fn start(
        rt: &tokio::runtime::Runtime,
        addr: SocketAddr,
        proto: Proto,
        path: &str,
        workers: usize,
        pause: Duration,
    ) -> Load {
        let pool = KeepAlive::new(addr, proto);
        let stop = Arc::new(AtomicBool::new(false));
        let pods: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
        let failures: Arc<Mutex<Vec<String>>> = Arc::default();
        let tasks = (0..workers)
            .map(|w| {
                let (pool, stop, pods, failures) =
                    (pool.clone(), stop.clone(), pods.clone(), failures.clone());
                let path = path.to_string();
                rt.spawn(async move {
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        i += 1;
                        let p = format!("{path}/{w}-{i}");
                        match pool.get(&p, &[("x-api-key", KEY)]).await {
                            Ok(r) if r.status == 200 => {
                                let pod = serde_json::from_slice::<Value>(&r.body)
                                    .ok()
                                    .and_then(|v| v["pod"].as_str().map(str::to_string))
                                    .unwrap_or_default();
                                *lock(&pods).entry(pod).or_default() += 1;
                            }
                            Ok(r) => lock(&failures).push(format!("GET {p}: {}", r.status)),
                            Err(e) => lock(&failures).push(format!("GET {p}: {e}")),
                        }
                        tokio::time::sleep(pause).await;
                    }
                })
            })
            .collect();
        Load {
            pool,
            stop,
            tasks,
            pods,
            failures,
        }
    }

    /// The pods that answered since the last call, and how often.
    fn take_pods(&self) -> BTreeMap<String, u64> {
        std::mem::take(&mut *lock(&self.pods))
    }

    fn finish(self, rt: &tokio::runtime::Runtime) -> (Stats, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            rt.block_on(t).expect("load worker");
        }
        let failures = std::mem::take(&mut *lock(&self.failures));
        (self.pool.stats(), failures)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One streamed chat completion of `tokens` events through the gateway: the pod that streamed
/// it and the number of `data:` events, `[DONE]` included; `Err` if it did not end cleanly.
async fn stream_once(
    client: &reqwest::Client,
    base: &str,
    tokens: u32,
    mut on_first: impl FnMut(&str),
) -> Result<(String, usize), String> {
    let body = format!(
        r#"{{"model":"m","stream":true,"max_tokens":{tokens},"messages":[{{"role":"user","content":"hi"}}]}}"#
    );
    let mut resp = client
        .post(format!("{base}/v1/chat/completions"))
        .header("x-api-key", KEY)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .map_err(|e| format!("stream request: {e}"))?;
    if resp.status() != 200 {
        return Err(format!("stream status {}", resp.status()));
    }
    let mut text = String::new();
    let mut pod = None::<String>;
    loop {
        match resp.chunk().await {
            Ok(Some(c)) => {
                text.push_str(&String::from_utf8_lossy(&c));
                if pod.is_none() {
                    if let Some(p) = text
                        .split("\"pod\":\"")
                        .nth(1)
                        .and_then(|r| r.split('"').next())
                    {
                        on_first(p);
                        pod = Some(p.to_string());
                    }
                }
            }
            Ok(None) => break,
            Err(e) => {
                return Err(format!(
                    "stream cut after {} events: {e}",
                    text.matches("data: ").count()
                ))
            }
        }
    }
    let events = text.matches("data: ").count();
    if !text.contains("data: [DONE]") {
        return Err(format!("stream ended without [DONE] after {events} events"));
    }
    Ok((pod.unwrap_or_default(), events))
}

/// Streams opened one after another by `workers` loops until stopped: (completed, failures).
struct Streams {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<(u64, Vec<String>)>>,
}

impl Streams {
    fn start(rt: &tokio::runtime::Runtime, base: &str, workers: usize, tokens: u32) -> Streams {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..workers)
            .map(|_| {
                let (stop, base) = (stop.clone(), base.to_string());
                rt.spawn(async move {
                    // Its own connections, as a separate client of the gateway would have.
                    let client = reqwest::Client::builder()
                        .timeout(Duration::from_secs(30))
                        .build()
                        .expect("client");
                    let (mut done, mut failed) = (0, Vec::new());
                    while !stop.load(Ordering::Relaxed) {
                        match stream_once(&client, &base, tokens, |_| {}).await {
                            Ok((_, n)) if n == tokens as usize + 1 => done += 1,
                            Ok((pod, n)) => failed.push(format!("{pod}: {n} events")),
                            Err(e) => failed.push(e),
                        }
                    }
                    (done, failed)
                })
            })
            .collect();
        Streams { stop, tasks }
    }

    fn finish(self, rt: &tokio::runtime::Runtime) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let (mut done, mut failed) = (0, Vec::new());
        for t in self.tasks {
            let (d, f) = rt.block_on(t).expect("stream worker");
            done += d;
            failed.extend(f);
        }
        (done, failed)
    }
}

fn scale_echo(node: &Node, replicas: u32) {
    node.k(&[
        "-n",
        APPS,
        "scale",
        "deployment/echo",
        &format!("--replicas={replicas}"),
    ]);
}

/// Issue 18: the echo backend scaled 2 -> 6 -> 1 under ~50 req/s: no request fails, the new
/// pods get traffic, the removed ones stop getting it. An LLM-style pod deleted mid-stream
/// finishes the stream.
fn scale_under_load(node: &Node, gateway: SocketAddr, base: &str) {
    let rt = load_runtime();
    let t = Instant::now();
    // 5 loops, 100 ms apart: ~50 requests a second.
    let load = Load::start(
        &rt,
        gateway,
        Proto::Http1,
        "/echo",
        5,
        Duration::from_millis(100),
    );
    std::thread::sleep(Duration::from_secs(2));
    let before = load.take_pods();
    assert_eq!(
        before.len(),
        2,
        "the load reaches both echo pods: {before:?}"
    );

    scale_echo(node, 6);
    wait(
        Duration::from_secs(60),
        "route echo with 6 ready endpoints",
        || route_ready(node, "echo", 6),
    );
    load.take_pods();
    let six = wait(
        Duration::from_secs(20),
        "the load reaches all 6 pods",
        || {
            std::thread::sleep(Duration::from_secs(1));
            let seen = lock(&load.pods).clone();
            (seen.len() == 6).then_some(seen)
        },
    );
    assert_eq!(
        six.keys().cloned().collect::<BTreeSet<_>>(),
        slice_pods(node, "echo")
    );
    let at_six = t.elapsed();

    // A stream from the LLM pod; the pod is deleted once the first event has arrived.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    let deleted = Arc::new(Mutex::new(None::<String>));
    let kubectl = node.env["KUBECTL"].clone();
    let kubeconfig = node.env["KUBECONFIG"].clone();
    let d = deleted.clone();
    let (pod, events) = rt
        .block_on(stream_once(&client, base, 30, move |pod| {
            let out = Command::new(&kubectl)
                .env("KUBECONFIG", &kubeconfig)
                .args(["-n", APPS, "delete", "pod", pod, "--wait=false"])
                .output();
            assert!(
                out.as_ref().is_ok_and(|o| o.status.success()),
                "kubectl delete pod {pod}: {out:?}"
            );
            *lock(&d) = Some(pod.to_string());
        }))
        .expect("the stream on the deleted pod finishes");
    assert_eq!(events, 31, "30 chunks and [DONE] from {pod}");
    assert_eq!(lock(&deleted).as_deref(), Some(pod.as_str()));

    scale_echo(node, 1);
    wait(
        Duration::from_secs(60),
        "route echo with 1 ready endpoint",
        || route_ready(node, "echo", 1),
    );
    // The removed pods are killed 2 s after their deletion (terminationGracePeriodSeconds).
    std::thread::sleep(Duration::from_secs(3));
    load.take_pods();
    std::thread::sleep(Duration::from_secs(2));
    let after = load.take_pods();
    let (stats, failures) = load.finish(&rt);
    eprintln!(
        "scale 2 -> 6 -> 1 under load: {} requests in {:.1}s ({} failed, {} resent); \
         6 pods served after {:.1}s; a stream of 30 events on deleted pod {pod} finished",
        stats.requests,
        t.elapsed().as_secs_f64(),
        stats.failed,
        stats.resends,
        at_six.as_secs_f64()
    );
    assert!(failures.is_empty(), "failed requests: {failures:?}");
    assert_eq!(stats.failed, 0);
    assert_eq!(
        after.keys().cloned().collect::<BTreeSet<_>>(),
        slice_pods(node, "echo"),
        "only the remaining pod serves"
    );
    assert!(
        stats.requests as f64 / t.elapsed().as_secs_f64() > 30.0,
        "the load ran at ~50 req/s: {} in {:?}",
        stats.requests,
        t.elapsed()
    );
    wait(
        Duration::from_secs(60),
        "route llm with its new pod",
        || route_ready(node, "llm", 1),
    );
}

/// The gateway pods and their images: (name, image, being deleted).
fn gateway_pods(node: &Node) -> Vec<(String, String, bool)> {
    let pods = node.json(&[
        "-n",
        NS,
        "get",
        "pods",
        "-l",
        "app.kubernetes.io/name=tollgate",
    ]);
    pods["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            (
                p["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                p["spec"]["containers"][0]["image"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                !p["metadata"]["deletionTimestamp"].is_null(),
            )
        })
        .collect()
}

/// Issue 18: a rolling upgrade of the gateway (a new image tag) under ~50 req/s of HTTP/1.1
/// and HTTP/2 keep-alive traffic with streams open: no request lost, none resent, every stream
/// finishes.
fn rolling_upgrade_under_load(node: &Node, gateway: SocketAddr, base: &str) {
    let version = env!("CARGO_PKG_VERSION");
    // containerd keeps the imported image under its normalized name.
    let new_tag = format!("docker.io/library/tollgate:{version}-upgrade");
    let mut cmd = Command::new("ctr");
    cmd.args([
        "--address",
        &node.env["CONTAINERD_SOCK"],
        "-n",
        "k8s.io",
        "images",
        "tag",
        "--force",
        &format!("docker.io/library/tollgate:{version}"),
        &new_tag,
    ]);
    run_ok(cmd, "ctr images tag");

    let rt = load_runtime();
    // ~50 req/s of HTTP/1.1 and ~10 of h2c: loops 100 ms apart.
    let h1 = Load::start(
        &rt,
        gateway,
        Proto::Http1,
        "/echo",
        5,
        Duration::from_millis(100),
    );
    let h2 = Load::start(
        &rt,
        gateway,
        Proto::Http2,
        "/echo",
        1,
        Duration::from_millis(100),
    );
    let streams = Streams::start(&rt, base, 3, 20);
    let load_start = Instant::now();
    std::thread::sleep(Duration::from_secs(2));

    let t = Instant::now();
    node.k(&[
        "-n",
        NS,
        "set",
        "image",
        "deployment/tollgate",
        &format!("tollgate={new_tag}"),
    ]);
    node.k(&[
        "-n",
        NS,
        "rollout",
        "status",
        "deployment/tollgate",
        "--timeout=180s",
    ]);
    // Done when only new pods are left: the old ones drained and exited.
    wait(
        Duration::from_secs(90),
        "the old gateway pods are gone",
        || {
            let pods = gateway_pods(node);
            (pods.len() == 2
                && pods
                    .iter()
                    .all(|(_, image, deleting)| *image == new_tag && !deleting))
            .then_some(())
        },
    );
    let rolled = t.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    let loaded = load_start.elapsed();
    let (s1, f1) = h1.finish(&rt);
    let (s2, f2) = h2.finish(&rt);
    let (streamed, stream_failures) = streams.finish(&rt);
    eprintln!(
        "rolling upgrade under load: rolled in {:.1}s ({:.0} req/s); HTTP/1.1 {} requests, {} failed, \
         {} resent, {} told close, {} connections; HTTP/2 {} requests, {} failed, {} resent, \
         {} connections; {} streams finished, {} failed",
        rolled.as_secs_f64(),
        (s1.requests + s2.requests) as f64 / loaded.as_secs_f64(),
        s1.requests,
        s1.failed,
        s1.resends,
        s1.told_close,
        s1.connections,
        s2.requests,
        s2.failed,
        s2.resends,
        s2.connections,
        streamed,
        stream_failures.len()
    );
    assert!(
        f1.is_empty() && f2.is_empty(),
        "lost requests: {f1:?} {f2:?}"
    );
    assert_eq!((s1.failed, s2.failed), (0, 0), "no request lost");
    assert_eq!((s1.resends, s2.resends), (0, 0), "no request resent");
    assert!(
        stream_failures.is_empty(),
        "streams cut: {stream_failures:?}"
    );
    assert!(streamed >= 3, "streams ran through the upgrade: {streamed}");
    assert!(
        s1.told_close >= 1 && s1.connections >= 2,
        "the old pods told their HTTP/1.1 clients Connection: close: {s1:?}"
    );
    assert!(
        s2.connections >= 2,
        "HTTP/2 moved to a new pod after GOAWAY: {s2:?}"
    );
}

/// Issue 18: SIGKILL of the leader's process (no Lease release, no drain). A live replica
/// (the other pod, or the killed one's restarted container) holds the Lease again and writes
/// status; the time it took is reported.
fn hard_crash_takeover(node: &Node) {
    let leader = wait(Duration::from_secs(30), "a pod holds the Lease", || {
        node.lease_holder()
    });
    let pod = node.json(&["-n", NS, "get", "pod", &leader]);
    let restarts = pod["status"]["containerStatuses"][0]["restartCount"]
        .as_u64()
        .unwrap_or_default();
    let container = pod["status"]["containerStatuses"][0]["containerID"]
        .as_str()
        .and_then(|c| c.strip_prefix("containerd://"))
        .expect("the leader's containerd id")
        .to_string();
    let renewed_before = node.k(&[
        "-n",
        NS,
        "get",
        "lease",
        "tollgate-tollgate",
        "-o",
        "jsonpath={.spec.renewTime}",
    ]);
    let mut kill = Command::new("ctr");
    kill.args([
        "--address",
        &node.env["CONTAINERD_SOCK"],
        "-n",
        "k8s.io",
        "tasks",
        "kill",
        "--signal",
        "SIGKILL",
        &container,
    ]);
    let t = Instant::now();
    run_ok(kill, "ctr tasks kill -s SIGKILL");
    // A renewal by a live process: another holder, or the same pod's restarted container.
    let (holder, how) = wait(
        Duration::from_secs(60),
        "a live replica renews the Lease",
        || {
            let lease = node.json(&["-n", NS, "get", "lease", "tollgate-tollgate"]);
            let holder = lease["spec"]["holderIdentity"].as_str()?.to_string();
            let renewed = lease["spec"]["renewTime"].as_str()?.to_string();
            if renewed == renewed_before {
                return None;
            }
            if holder != leader {
                return Some((holder, "the other replica"));
            }
            let p = node.json(&["-n", NS, "get", "pod", &leader]);
            let now = p["status"]["containerStatuses"][0]["restartCount"].as_u64()?;
            (now > restarts).then_some((holder, "the restarted container"))
        },
    );
    let takeover = t.elapsed();
    node.apply(&route("after-crash", "/crash", "echo", json!({})));
    wait(
        Duration::from_secs(30),
        "status writes resume after the crash",
        || route_ready(node, "after-crash", 1),
    );
    let status = t.elapsed();
    eprintln!(
        "leader {leader} SIGKILLed: {holder} ({how}) renewed the Lease after {:.1}s; \
         status written {:.1}s after the kill",
        takeover.as_secs_f64(),
        status.as_secs_f64()
    );
    wait(
        Duration::from_secs(90),
        "both gateway pods Ready again",
        || (node.ready_pods(NS, "app.kubernetes.io/name=tollgate").len() == 2).then_some(()),
    );
}
