//! P4: compiles 10,000 AgentRoutes + 100,000 AgentApiKeys and prints the time of each compile and
//! the process's peak RSS (VmHWM from /proc/self/status). The peak that matters is a reload's: the
//! snapshot in force stays alive while the next one is compiled, so that is what is measured last.
//!
//! `cargo run --release --example compile_rss [runs]`

#[path = "store.rs"]
mod store;

use std::time::{Duration, Instant};

use tollgate::config::{compile, CompileOptions};

const ROUTES: usize = 10_000;
const KEYS: usize = 100_000;

/// A `/proc/self/status` field in KiB (0 where there is no procfs).
fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(5)
        .max(1);
    let base = status_kib("VmHWM:");
    let st = store::store(ROUTES, KEYS);
    let with_store = status_kib("VmRSS:");

    // First compile, from a process that holds only the store (a cold start).
    let t = Instant::now();
    let first = compile(&st, &CompileOptions::default());
    let first_time = t.elapsed();
    assert_eq!(first.routes.len(), ROUTES, "every route compiles");
    assert_eq!(first.keys.len(), KEYS, "every key compiles");
    let peak_cold = status_kib("VmHWM:");
    let snapshot_kib = status_kib("VmRSS:").saturating_sub(with_store);

    // Reloads: the previous snapshot is alive while the next one is built (as in the gateway).
    let mut live = first;
    let mut times = vec![first_time];
    for _ in 1..runs {
        let t = Instant::now();
        let next = compile(&st, &CompileOptions::default());
        times.push(t.elapsed());
        assert_eq!(next.keys.len(), KEYS);
        live = next;
    }
    drop(live);
    let peak_reload = status_kib("VmHWM:");

    let mut sorted = times.clone();
    sorted.sort();
    let median = sorted[sorted.len() / 2];
    println!(
        "compile {ROUTES} routes + {KEYS} keys: runs={runs} first_ms={:.1} median_ms={:.1} \
         min_ms={:.1} max_ms={:.1}",
        ms(first_time),
        ms(median),
        ms(sorted[0]),
        ms(sorted[sorted.len() - 1]),
    );
    println!(
        "rss_kib: process_start_peak={base} with_store={with_store} snapshot~={snapshot_kib} \
         peak_after_first_compile={peak_cold} peak_with_reloads={peak_reload}"
    );
    println!(
        "P4_RESULT compile_median_ms={:.1} peak_rss_mib={:.1}",
        ms(median),
        peak_reload as f64 / 1024.0
    );
}
