//! Backends through the real gateway: DNS discovery against a real dnsmasq (three A records,
//! changed records, a DNS outage), the canary split (A4), `canaryHeader`, sticky clients across a
//! weight change, least connections with a slow endpoint (A5), an endpoint killed under load
//! (R3), `https` backends with a private CA, and the endpoint metrics. Real servers on loopback
//! (127.0.0.1-4 on one port for the endpoints of one name), real clients, bounded in time.
//! Run with `-- --nocapture` to see the measured figures.

mod support;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use support::dnsmasq::Dnsmasq;
use support::metrics::metric;
use support::*;
use tollgate::balance::{BackendWeight, CanaryMode, WeightedBackends};

/// The name the test DNS server answers for, in a domain it is authoritative for.
const NAME: &str = "agents.test";

/// Load tests take longer than [`TEST_TIMEOUT`]; they still finish or fail within this.
const LOAD_TEST_TIMEOUT: Duration = Duration::from_secs(90);

async fn within<F: Future>(limit: Duration, fut: F) -> F::Output {
    tokio::time::timeout(limit, fut)
        .await
        .expect("the test did not finish within its time bound")
}

// ---------------------------------------------------------------------------------------------
// Endpoints: loopback servers that can be killed like a crashed process
// ---------------------------------------------------------------------------------------------

/// One HTTP endpoint on an explicit loopback address. Answers `200` with its IP as the body,
/// after `delay`. Counts requests as they arrive.
struct Endpoint {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    kill: watch::Sender<bool>,
    accept: Option<JoinHandle<()>>,
}

impl Endpoint {
    async fn bind(addr: SocketAddr, delay: Duration) -> std::io::Result<Endpoint> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let hits = Arc::new(AtomicUsize::new(0));
        let (kill, killed) = watch::channel(false);
        let accept = tokio::spawn(serve_endpoint(
            listener,
            addr.ip().to_string(),
            delay,
            hits.clone(),
            killed,
        ));
        Ok(Endpoint {
            addr,
            hits,
            kill,
            accept: Some(accept),
        })
    }

    /// Its IP, which is also what it answers.
    fn name(&self) -> String {
        self.addr.ip().to_string()
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::Relaxed)
    }

    /// Closes the listener (connections are refused from now on) and every open connection,
    /// as a crash would. Returns once the listener is closed.
    async fn kill(&mut self) {
        self.kill.send_replace(true);
        if let Some(accept) = self.accept.take() {
            let _ = accept.await;
        }
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.kill.send_replace(true);
    }
}

async fn serve_endpoint(
    listener: TcpListener,
    name: String,
    delay: Duration,
    hits: Arc<AtomicUsize>,
    mut killed: watch::Receiver<bool>,
) {
    loop {
        let stream = tokio::select! {
            // Returning drops the listener: new connections are refused.
            _ = killed.wait_for(|k| *k) => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
        };
        let (name, hits, mut killed) = (name.clone(), hits.clone(), killed.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |_req: Request<Incoming>| {
                let (name, hits) = (name.clone(), hits.clone());
                async move {
                    hits.fetch_add(1, Ordering::Relaxed);
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(name))))
                }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection(TokioIo::new(stream), svc);
            tokio::select! {
                _ = conn => {}
                // Dropping the connection closes its socket mid-whatever, as a crash would.
                _ = killed.wait_for(|k| *k) => {}
            }
        });
    }
}

/// Endpoints on 127.0.0.1, 127.0.0.2, ... (one per delay), all on the same port, as the pods
/// behind one DNS name would be. Returns the port and the endpoints in address order.
async fn endpoints_on_one_port(delays: &[Duration]) -> (u16, Vec<Endpoint>) {
    'again: for _ in 0..50 {
        let Some((&first_delay, rest)) = delays.split_first() else {
            panic!("at least one endpoint");
        };
        let first = Endpoint::bind(SocketAddr::from(([127, 0, 0, 1], 0)), first_delay)
            .await
            .expect("bind 127.0.0.1");
        let port = first.addr.port();
        let mut all = vec![first];
        for (i, &delay) in rest.iter().enumerate() {
            let last = u8::try_from(i + 2).expect("a few endpoints");
            // Someone else holds this port on that address: start over with a new port.
            let Ok(e) = Endpoint::bind(SocketAddr::from(([127, 0, 0, last], port)), delay).await
            else {
                continue 'again;
            };
            all.push(e);
        }
        return (port, all);
    }
    panic!("no port free on every loopback address");
}

/// `(ip, NAME)` records for the test DNS server.
fn records<'a>(ips: &[&'a str]) -> Vec<(&'a str, &'a str)> {
    ips.iter().map(|ip| (*ip, NAME)).collect()
}

/// A gateway resolving backend names through `dns` only.
async fn gateway_on_dns(docs: Vec<Value>, dns: &Dnsmasq) -> Gateway {
    let server = dns.server();
    gateway_with(yaml(docs), move |o| {
        o.dns.nameservers = vec![server];
        // A stopped server fails a lookup fast; the refresh goes on in the background anyway.
        o.dns.lookup_timeout = Duration::from_millis(300);
        o.dns.lookup_attempts = 1;
    })
    .await
}

/// Waits until the gateway's endpoint set of `backend` (its id, e.g. `http://agents.test:80`)
/// holds exactly these addresses.
async fn wait_for_endpoints(gw: &Gateway, backend: &str, want: &[SocketAddr]) {
    let mut want = want.to_vec();
    want.sort();
    eventually(
        Duration::from_secs(8),
        &format!("endpoints of {backend} = {want:?}"),
        || {
            let snap = gw.running.gateway.snapshot();
            let have: Option<Vec<SocketAddr>> = snap
                .endpoints
                .get(backend)
                .map(|set| set.load().endpoints().iter().map(|e| e.addr).collect());
            let done = have.as_deref() == Some(&want[..]);
            async move { done.then_some(()) }
        },
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// Load
// ---------------------------------------------------------------------------------------------

/// What a load run saw at the client side.
#[derive(Debug, Default)]
struct Tally {
    /// 2xx answers by body (the endpoint or backend that answered).
    ok: BTreeMap<String, usize>,
    /// Everything else: status and body, or the transport error.
    failed: Vec<String>,
}

impl Tally {
    fn ok_total(&self) -> usize {
        self.ok.values().sum()
    }

    fn merge(&mut self, other: Tally) {
        for (k, v) in other.ok {
            *self.ok.entry(k).or_default() += v;
        }
        self.failed.extend(other.failed);
    }
}

#[derive(Clone, Copy)]
enum Until {
    /// This many requests in all.
    Count(usize),
    /// Until this moment.
    Deadline(Instant),
}

/// GETs `url` from `workers` concurrent clients (keep-alive) until `until`.
async fn hammer(
    http: &reqwest::Client,
    url: &str,
    workers: usize,
    until: Until,
    header: Option<(&'static str, &'static str)>,
) -> Tally {
    let sent = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<JoinHandle<Tally>> = (0..workers)
        .map(|_| {
            let (http, url, sent) = (http.clone(), url.to_string(), sent.clone());
            tokio::spawn(async move {
                let mut tally = Tally::default();
                loop {
                    match until {
                        Until::Count(n) if sent.fetch_add(1, Ordering::Relaxed) >= n => break,
                        Until::Deadline(d) if Instant::now() >= d => break,
                        _ => {}
                    }
                    let mut req = http.get(&url);
                    if let Some((name, value)) = header {
                        req = req.header(name, value);
                    }
                    match req.send().await {
                        Ok(r) => {
                            let status = r.status();
                            let body = r.text().await.unwrap_or_else(|e| format!("<{e}>"));
                            if status.is_success() {
                                *tally.ok.entry(body).or_default() += 1;
                            } else {
                                tally.failed.push(format!("{status} {body}"));
                            }
                        }
                        Err(e) => tally.failed.push(format!("transport: {e}")),
                    }
                }
                tally
            })
        })
        .collect();
    let mut all = Tally::default();
    for t in tasks {
        all.merge(t.await.expect("a load worker finished"));
    }
    all
}

fn percent(part: usize, whole: usize) -> f64 {
    if whole == 0 {
        return 0.0;
    }
    // Counts here stay far below 2^52: exact as f64.
    part as f64 * 100.0 / whole as f64
}

// ---------------------------------------------------------------------------------------------
// DNS discovery
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_spreads_over_every_record_follows_changes_and_survives_an_outage() {
    within(LOAD_TEST_TIMEOUT, async {
        let (port, eps) = endpoints_on_one_port(&[Duration::ZERO; 4]).await;
        let mut dns = Dnsmasq::start("test", &records(&["127.0.0.1", "127.0.0.2", "127.0.0.3"]));
        let backend = format!("http://{NAME}:{port}");
        let gw = gateway_on_dns(
            vec![route(
                "agents",
                json!({"match": {"pathPrefix": "/agents"}, "auth": {"required": false},
                       "backends": [{"url": backend}]}),
            )],
            &dns,
        )
        .await;
        let addrs = |lasts: &[u8]| -> Vec<SocketAddr> {
            lasts
                .iter()
                .map(|l| SocketAddr::from(([127, 0, 0, *l], port)))
                .collect()
        };
        wait_for_endpoints(&gw, &backend, &addrs(&[1, 2, 3])).await;
        let url = gw.url("/agents/run");

        // Three records: traffic over all three, none to the fourth server.
        let t = hammer(&gw.http, &url, 4, Until::Count(600), None).await;
        assert!(t.failed.is_empty(), "{:?}", t.failed);
        println!("DNS, three A records: {:?}", t.ok);
        for e in &eps[..3] {
            let share = percent(t.ok.get(&e.name()).copied().unwrap_or(0), 600);
            assert!(share > 20.0, "{} got {share:.1} %: {:?}", e.name(), t.ok);
        }
        assert_eq!(eps[3].hits(), 0);

        // Changed records: .1 leaves, .4 joins; used once the 1 s TTL has run out.
        let changed = Instant::now();
        dns.rewrite(&records(&["127.0.0.2", "127.0.0.3", "127.0.0.4"]));
        wait_for_endpoints(&gw, &backend, &addrs(&[2, 3, 4])).await;
        let took = changed.elapsed();
        println!("DNS, changed records in use after {took:?} (TTL 1 s)");
        assert!(took < Duration::from_secs(5), "{took:?}");
        let before = eps[0].hits();
        let t = hammer(&gw.http, &url, 4, Until::Count(600), None).await;
        assert!(t.failed.is_empty(), "{:?}", t.failed);
        println!("DNS, after the change: {:?}", t.ok);
        assert_eq!(
            eps[0].hits(),
            before,
            "the removed record still got traffic"
        );
        for e in &eps[1..] {
            let share = percent(t.ok.get(&e.name()).copied().unwrap_or(0), 600);
            assert!(share > 20.0, "{} got {share:.1} %: {:?}", e.name(), t.ok);
        }

        // The DNS server stops: lookups fail, the last good answer keeps serving. Three
        // seconds cover several failed refreshes (1 s floor + 300 ms timeout each).
        dns.stop();
        let t = hammer(
            &gw.http,
            &url,
            4,
            Until::Deadline(Instant::now() + Duration::from_secs(3)),
            None,
        )
        .await;
        println!(
            "DNS stopped, 3 s of traffic: {} ok, {} failed: {:?}",
            t.ok_total(),
            t.failed.len(),
            t.ok
        );
        assert!(t.failed.is_empty(), "{:?}", t.failed);
        for e in &eps[1..] {
            assert!(t.ok.get(&e.name()).copied().unwrap_or(0) > 0, "{:?}", t.ok);
        }
        wait_for_endpoints(&gw, &backend, &addrs(&[2, 3, 4])).await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Canary and sticky
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_split_is_within_one_and_a_half_points_a4_and_the_header_forces_either_side() {
    within(LOAD_TEST_TIMEOUT, async {
        let stable = Backend::echo("stable").await;
        let canary = Backend::echo("canary").await;
        let gw = gateway(yaml([route(
            "chat",
            json!({"match": {"pathPrefix": "/chat"}, "auth": {"required": false},
                   "canaryHeader": "x-canary",
                   "backends": [{"url": stable.url(), "weight": 90},
                                {"url": canary.url(), "weight": 10, "canary": true}]}),
        )]))
        .await;
        let url = gw.url("/chat");

        const N: usize = 10_000;
        let t = hammer(&gw.http, &url, 16, Until::Count(N), None).await;
        assert!(
            t.failed.is_empty(),
            "{:?}",
            &t.failed[..t.failed.len().min(5)]
        );
        // Counted where the requests arrived.
        let (s, c) = (stable.count(), canary.count());
        assert_eq!(s + c, N);
        let share = percent(c, N);
        println!("A4: canary got {c} of {N} requests = {share:.2} % (target 10 ± 1.5)");
        assert!((share - 10.0).abs() <= 1.5, "canary share {share:.2} %");

        // `always` goes to the canary, `never` keeps away from it, whatever the weights.
        let t = hammer(
            &gw.http,
            &url,
            4,
            Until::Count(200),
            Some(("x-canary", "always")),
        )
        .await;
        assert!(t.failed.is_empty(), "{:?}", t.failed);
        assert_eq!(t.ok.get("canary"), Some(&200), "{:?}", t.ok);
        assert_eq!(canary.count(), c + 200);
        let t = hammer(
            &gw.http,
            &url,
            4,
            Until::Count(200),
            Some(("x-canary", "never")),
        )
        .await;
        assert!(t.failed.is_empty(), "{:?}", t.failed);
        assert_eq!(t.ok.get("stable"), Some(&200), "{:?}", t.ok);
        assert_eq!(canary.count(), c + 200);
        assert_eq!(stable.count(), s + 200);
    })
    .await;
}

/// 100 clients (distinct client ids, one key each) on a sticky route, stable/canary at the
/// given weights.
fn sticky_config(stable: &Backend, canary: &Backend, weights: (u32, u32)) -> String {
    let mut docs: Vec<Value> = (0..100)
        .map(|i| {
            api_key_spec(
                "default",
                &format!("client-{i:03}"),
                json!({"clientId": format!("client-{i:03}"),
                       "keyHash": key_hash(&format!("tg-sticky-{i:03}"))}),
            )
        })
        .collect();
    docs.push(route(
        "sticky",
        json!({"match": {"pathPrefix": "/sticky"}, "sticky": "clientId",
               "backends": [{"url": stable.url(), "weight": weights.0},
                            {"url": canary.url(), "weight": weights.1, "canary": true}]}),
    ));
    yaml(docs)
}

/// Where each of the 100 clients lands: 3 requests each, which must all land on one backend.
async fn sticky_landings(gw: &Gateway) -> Vec<String> {
    use futures_util::stream::{self, StreamExt};
    let url = gw.url("/sticky");
    stream::iter(0..100)
        .map(|i| {
            let (http, url) = (gw.http.clone(), url.clone());
            async move {
                let mut seen = Vec::new();
                for _ in 0..3 {
                    let r = http
                        .get(&url)
                        .header("x-api-key", format!("tg-sticky-{i:03}"))
                        .send()
                        .await
                        .expect("the gateway answers");
                    assert_eq!(r.status(), StatusCode::OK, "client {i}");
                    seen.push(r.text().await.expect("body"));
                }
                seen.dedup();
                assert_eq!(
                    seen.len(),
                    1,
                    "client-{i:03} moved between requests: {seen:?}"
                );
                seen.remove(0)
            }
        })
        .buffered(16)
        .collect()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sticky_clients_stay_put_and_a_weight_change_moves_only_a_tenth_toward_the_canary() {
    within(LOAD_TEST_TIMEOUT, async {
        let stable = Backend::echo("stable").await;
        let canary = Backend::echo("canary").await;
        let gw = gateway(sticky_config(&stable, &canary, (90, 10))).await;
        let before = sticky_landings(&gw).await;

        gw.write_config(&sticky_config(&stable, &canary, (80, 20)));
        eventually(Duration::from_secs(5), "the 80/20 reload", || {
            let snap = gw.running.gateway.snapshot();
            let done =
                snap.routes.routes().iter().any(|r| {
                    &*r.id == "default/sticky" && r.backends.iter().any(|b| b.weight == 80)
                });
            async move { done.then_some(()) }
        })
        .await;
        let after = sticky_landings(&gw).await;

        let on_canary = |v: &[String]| v.iter().filter(|b| *b == "canary").count();
        let moved: Vec<usize> = (0..100).filter(|&i| before[i] != after[i]).collect();
        println!(
            "sticky: canary held {} of 100 clients at 90/10, {} at 80/20; {} clients moved \
             ({} %), all toward the canary",
            on_canary(&before),
            on_canary(&after),
            moved.len(),
            moved.len()
        );
        for &i in &moved {
            assert_eq!(
                (before[i].as_str(), after[i].as_str()),
                ("stable", "canary"),
                "client-{i:03} moved away from the canary"
            );
        }
        // The gateway lands each client exactly where the weighted rendezvous hash says
        // (identities are the backend ids), so these figures are the design's, not luck's.
        let model = |w: (u32, u32)| {
            WeightedBackends::with_identities([
                BackendWeight {
                    index: 0,
                    weight: w.0,
                    canary: false,
                    identity: stable.url(),
                },
                BackendWeight {
                    index: 1,
                    weight: w.1,
                    canary: true,
                    identity: canary.url(),
                },
            ])
        };
        for (weights, seen) in [((90, 10), &before), ((80, 20), &after)] {
            let m = model(weights);
            for (i, landed) in seen.iter().enumerate() {
                let want = match m.pick(CanaryMode::Default, Some(&format!("client-{i:03}")), 0) {
                    Some(0) => "stable",
                    Some(_) => "canary",
                    None => "none",
                };
                assert_eq!(landed, want, "client-{i:03} at {weights:?}");
            }
        }
        // About a tenth: Binomial(100, 0.1) stays within 1..=25 with probability > 0.9999.
        assert!(
            (1..=25).contains(&moved.len()),
            "{} clients moved",
            moved.len()
        );
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Least connections (A5) and a killed endpoint (R3)
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_connections_gives_a_slow_endpoint_under_fifteen_percent_a5() {
    within(LOAD_TEST_TIMEOUT, async {
        let slow = Duration::from_millis(200);
        let (port, eps) = endpoints_on_one_port(&[Duration::ZERO, Duration::ZERO, slow]).await;
        let dns = Dnsmasq::start("test", &records(&["127.0.0.1", "127.0.0.2", "127.0.0.3"]));
        let backend = format!("http://{NAME}:{port}");
        let gw = gateway_on_dns(
            vec![route(
                "agents",
                json!({"match": {"pathPrefix": "/agents"}, "auth": {"required": false},
                       "loadBalancer": "leastConnections", "backends": [{"url": backend}]}),
            )],
            &dns,
        )
        .await;
        let all: Vec<SocketAddr> = eps.iter().map(|e| e.addr).collect();
        wait_for_endpoints(&gw, &backend, &all).await;

        let t = hammer(
            &gw.http,
            &gw.url("/agents"),
            16,
            Until::Deadline(Instant::now() + Duration::from_secs(3)),
            None,
        )
        .await;
        assert!(
            t.failed.is_empty(),
            "{:?}",
            &t.failed[..t.failed.len().min(5)]
        );
        let hits: Vec<usize> = eps.iter().map(Endpoint::hits).collect();
        let total: usize = hits.iter().sum();
        let share = percent(hits[2], total);
        println!(
            "A5: 16 clients for 3 s, {total} requests; per endpoint {hits:?}; the slow one \
             (200 ms) got {share:.2} % (target < 15 %)"
        );
        assert!(share < 15.0, "slow endpoint got {share:.2} %");
        assert!(hits[2] > 0, "the slow endpoint is still used");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_endpoint_is_avoided_within_a_second_with_no_client_error_r3() {
    within(LOAD_TEST_TIMEOUT, async {
        let (port, mut eps) = endpoints_on_one_port(&[Duration::ZERO; 3]).await;
        let dns = Dnsmasq::start("test", &records(&["127.0.0.1", "127.0.0.2", "127.0.0.3"]));
        let backend = format!("http://{NAME}:{port}");
        let gw = gateway_on_dns(
            vec![route(
                "agents",
                json!({"match": {"pathPrefix": "/agents"}, "auth": {"required": false},
                       "retry": {"attempts": 3, "retryOn": ["connect-failure", 502, 503]},
                       "backends": [{"url": backend}]}),
            )],
            &dns,
        )
        .await;
        let all: Vec<SocketAddr> = eps.iter().map(|e| e.addr).collect();
        wait_for_endpoints(&gw, &backend, &all).await;

        // Failed attempts on the backend, sampled every 10 ms: after the kill only the dead
        // endpoint fails, so each increase is an attempt that went to it.
        let failed_attempts = {
            let m = &gw.running.gateway.metrics.upstream_requests_total;
            let series: Vec<_> = ["connect_failure", "error", "timeout"]
                .iter()
                .map(|o| m.with_label_values(&["default/agents", &backend, o]))
                .collect();
            move || series.iter().map(|c| c.get()).sum::<u64>()
        };
        let (stop_tx, mut stop_rx) = watch::channel(false);
        let sampler = tokio::spawn(async move {
            let mut samples = Vec::new();
            loop {
                samples.push((Instant::now(), failed_attempts()));
                tokio::select! {
                    _ = stop_rx.wait_for(|s| *s) => return samples,
                    _ = tokio::time::sleep(Duration::from_millis(10)) => {}
                }
            }
        });

        // 8 clients: one second of traffic, the kill, two and a half seconds more.
        let start = Instant::now();
        let end = start + Duration::from_millis(3_500);
        let load = {
            let (http, url) = (gw.http.clone(), gw.url("/agents"));
            tokio::spawn(async move { hammer(&http, &url, 8, Until::Deadline(end), None).await })
        };
        tokio::time::sleep_until(start + Duration::from_secs(1)).await;
        let before_kill = eps[2].hits();
        let killed_at = Instant::now();
        eps[2].kill().await;
        let t = load.await.expect("the load finished");
        let _ = stop_tx.send(true);
        let samples = sampler.await.expect("the sampler finished");

        let at_kill = samples
            .iter()
            .take_while(|(at, _)| *at < killed_at)
            .last()
            .map_or(0, |(_, n)| *n);
        let mut increases = Vec::new();
        let mut prev = at_kill;
        for (at, n) in samples.iter().filter(|(at, _)| *at >= killed_at) {
            if *n > prev {
                increases.push((at.duration_since(killed_at), n - prev));
                prev = *n;
            }
        }
        let dead_attempts = prev - at_kill;
        let last_second = end - Duration::from_secs(1);
        let in_last_second: u64 = increases
            .iter()
            .filter(|(after, _)| killed_at + *after >= last_second)
            .map(|(_, n)| n)
            .sum();
        println!(
            "R3: {} requests by 8 clients, {} non-2xx; the killed endpoint had {before_kill} \
             before the kill; attempts on it after the kill: {dead_attempts} in all, at \
             (ms after the kill, attempts): {:?}; in the last second: {in_last_second}",
            t.ok_total() + t.failed.len(),
            t.failed.len(),
            increases
                .iter()
                .map(|(d, n)| (d.as_millis(), *n))
                .collect::<Vec<_>>()
        );
        assert!(
            t.failed.is_empty(),
            "client errors: {:?}",
            &t.failed[..t.failed.len().min(5)]
        );
        assert!(before_kill > 0, "the endpoint served before the kill");
        assert!(dead_attempts > 0, "the kill was noticed");
        // Every attempt on it but probation probes came within the first second.
        let late: Vec<_> = increases
            .iter()
            .filter(|(after, _)| *after >= Duration::from_secs(1))
            .collect();
        assert!(late.iter().map(|(_, n)| n).sum::<u64>() <= 4, "{late:?}");
        assert_eq!(in_last_second, 0, "the dead endpoint still gets attempts");
        // The two live endpoints took the whole last stretch.
        assert!(eps[0].hits() > 0 && eps[1].hits() > 0);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// https backends
// ---------------------------------------------------------------------------------------------

/// An HTTPS server on 127.0.0.1:0 with a self-signed certificate for `localhost`. Returns its
/// port and the certificate's PEM (the CA to trust).
async fn tls_backend() -> (u16, String, JoinHandle<()>) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])
        .expect("rcgen makes a certificate");
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(rustls::pki_types::PrivatePkcs8KeyDer::from(
        ck.signing_key.serialize_der(),
    ));
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_no_client_auth()
    .with_single_cert(vec![ck.cert.der().clone()], key)
    .expect("a server certificate");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("address").port();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                // A client that does not trust us aborts the handshake: nothing to serve.
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let body = format!("tls-backend saw {}", req.uri().path());
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (port, ck.cert.pem(), task)
}

#[tokio::test]
async fn https_backend_with_the_private_ca_is_200_and_without_it_502() {
    bounded(async {
        let (port, ca_pem, _server) = tls_backend().await;
        let config = || {
            yaml([route(
                "secure",
                json!({"match": {"pathPrefix": "/secure"}, "auth": {"required": false},
                       "backends": [{"url": format!("https://localhost:{port}")}]}),
            )])
        };
        // `localhost` is answered by the resolver itself (RFC 6761); a dead loopback server
        // keeps any other query from leaving the machine.
        let no_dns = |o: &mut tollgate::app::ServeOptions| {
            o.dns.nameservers = vec![SocketAddr::from(([127, 0, 0, 1], 9))];
        };
        let trusting = gateway_with(config(), |o| {
            no_dns(o);
            o.upstream.ca_bundle = Some(ca_pem.clone().into_bytes());
        })
        .await;
        let backend = format!("https://localhost:{port}");
        eventually(Duration::from_secs(5), "localhost resolved", || {
            let snap = trusting.running.gateway.snapshot();
            let n = snap
                .endpoints
                .get(backend.as_str())
                .map_or(0, |s| s.load().len());
            async move { (n > 0).then_some(()) }
        })
        .await;
        let r = trusting.get("/secure/x").await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.text().await.expect("body"), "tls-backend saw /secure/x");

        let untrusting = gateway_with(config(), no_dns).await;
        eventually(Duration::from_secs(5), "localhost resolved", || {
            let snap = untrusting.running.gateway.snapshot();
            let n = snap
                .endpoints
                .get(backend.as_str())
                .map_or(0, |s| s.load().len());
            async move { (n > 0).then_some(()) }
        })
        .await;
        let r = untrusting.get("/secure/x").await;
        assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn endpoints_ready_follows_dns_and_config_and_drops_removed_backends() {
    within(Duration::from_secs(40), async {
        let (port, eps) = endpoints_on_one_port(&[Duration::ZERO; 3]).await;
        let dns = Dnsmasq::start("test", &records(&["127.0.0.1", "127.0.0.2", "127.0.0.3"]));
        let backend = format!("http://{NAME}:{port}");
        let docs = |url: &str| {
            vec![route(
                "agents",
                json!({"match": {"pathPrefix": "/agents"}, "auth": {"required": false},
                       "backends": [{"url": url}]}),
            )]
        };
        let gw = gateway_on_dns(docs(&backend), &dns).await;
        let label = format!("backend=\"{backend}\"");
        let ready = |want: f64| {
            let gw = &gw;
            let label = label.clone();
            async move {
                eventually(
                    Duration::from_secs(8),
                    &format!("tollgate_endpoints_ready{{{label}}} = {want}"),
                    || async {
                        let text = gw.metrics().await;
                        (metric(&text, "tollgate_endpoints_ready", &[&label]) == Some(want))
                            .then_some(())
                    },
                )
                .await;
            }
        };
        // Resolved after the first swap: the periodic pass (2 s) reports the three.
        ready(3.0).await;
        // A DNS change, no config change: the periodic pass follows it.
        dns.rewrite(&records(&["127.0.0.1", "127.0.0.2"]));
        ready(2.0).await;

        // The route moves to an IP literal backend: reported right after the swap, and the
        // old backend's series is gone.
        let generation = gw.running.gateway.snapshot().generation;
        let literal = format!("http://{}", eps[0].addr);
        gw.write_config(&yaml(docs(&literal)));
        eventually(Duration::from_secs(5), "the reload", || {
            let g = gw.running.gateway.snapshot().generation;
            async move { (g > generation).then_some(()) }
        })
        .await;
        // Within a second of the swap (the periodic pass alone may take 2 s).
        let new_label = format!("backend=\"{literal}\"");
        eventually(
            Duration::from_secs(1),
            "the new backend reported",
            || async {
                let text = gw.metrics().await;
                let new = metric(&text, "tollgate_endpoints_ready", &[&new_label]);
                let old = metric(&text, "tollgate_endpoints_ready", &[&label]);
                (new == Some(1.0) && old.is_none()).then_some(())
            },
        )
        .await;
    })
    .await;
}

#[tokio::test]
async fn upstream_in_flight_counts_a_slow_request_until_it_ends() {
    bounded(async {
        let gate = Arc::new(Notify::new());
        let g2 = gate.clone();
        let slow = Backend::spawn(
            "slow",
            handler(move |_, _| {
                let gate = g2.clone();
                async move {
                    gate.notified().await;
                    respond(StatusCode::OK, "done")
                }
            }),
        )
        .await;
        let gw = gateway(yaml([route(
            "slow",
            json!({"match": {"pathPrefix": "/slow"}, "auth": {"required": false},
                   "backends": [{"url": slow.url()}]}),
        )]))
        .await;
        let label = format!("backend=\"{}\"", slow.url());
        let in_flight = |want: f64| {
            let gw = &gw;
            let label = label.clone();
            async move {
                eventually(
                    Duration::from_secs(5),
                    &format!("tollgate_upstream_in_flight{{{label}}} = {want}"),
                    || async {
                        let text = gw.metrics().await;
                        (metric(&text, "tollgate_upstream_in_flight", &[&label]) == Some(want))
                            .then_some(())
                    },
                )
                .await;
            }
        };
        let request = {
            let (http, url) = (gw.http.clone(), gw.url("/slow"));
            tokio::spawn(async move {
                let r = http.get(url).send().await.expect("the gateway answers");
                (r.status(), r.text().await.expect("body"))
            })
        };
        in_flight(1.0).await;
        gate.notify_one();
        let (status, body) = request.await.expect("the request finished");
        assert_eq!((status, body.as_str()), (StatusCode::OK, "done"));
        in_flight(0.0).await;
    })
    .await;
}
