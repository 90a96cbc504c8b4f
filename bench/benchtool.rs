//! Load tools for `bench/run.sh`; not part of the gateway. Loopback only, one thread each, so a
//! tool takes at most one core of the two the benchmark shares.
//!
//! - `paced`: open-loop HTTP/1.1 load at a fixed rate (P3; Debian has no wrk2).
//! - `sse-backend`: an SSE server stamping each event with the wall-clock time it was written
//!   (P7, P8), plus a fixed small answer on every other path.
//! - `sse-probe`: opens SSE streams and measures how late each event arrives (P7).
//! - `sse-hold`: opens many SSE streams and holds them (P8).
//!
//! `cargo run --release --example benchtool -- <command> --help`

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BytesMut};
use clap::{Parser, Subcommand};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

#[derive(Parser)]
#[command(name = "benchtool", about = "Load tools of bench/run.sh")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Open-loop load: `rate` requests/s spread evenly over `connections` keep-alive connections.
    ///
    /// Latency is counted from the scheduled send time whenever the server made a request wait
    /// (its connection was still busy with the previous answer: the coordinated-omission
    /// correction of wrk2), and from the actual send otherwise (the tool's own 1 ms timer slack
    /// is not charged to the server).
    Paced {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value = "/")]
        path: String,
        #[arg(long, default_value = "bench.local")]
        host: String,
        /// Extra request header, `Name: value` (repeatable).
        #[arg(long = "header")]
        headers: Vec<String>,
        /// Requests per second offered.
        #[arg(long)]
        rate: f64,
        #[arg(long, default_value_t = 64)]
        connections: usize,
        /// Seconds measured (after the warm-up).
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        /// Seconds of load before measuring.
        #[arg(long, default_value_t = 2.0)]
        warmup: f64,
    },
    /// SSE backend: `GET /sse?interval_ms=N&count=M` streams M events (0: forever) N ms apart,
    /// each `data: <unix nanos>`; any other request gets a small fixed answer.
    SseBackend {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Opens `streams` SSE streams at once and reports the arrival delay of their events.
    SseProbe {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        path: String,
        #[arg(long, default_value = "bench.local")]
        host: String,
        #[arg(long, default_value_t = 10)]
        streams: usize,
        /// Events to read per stream.
        #[arg(long, default_value_t = 200)]
        events: usize,
    },
    /// Opens `streams` SSE streams, holds them for `hold` seconds, reports how many stayed open.
    SseHold {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        path: String,
        #[arg(long, default_value = "bench.local")]
        host: String,
        #[arg(long, default_value_t = 10_000)]
        streams: usize,
        /// Seconds to hold all streams once they are open.
        #[arg(long, default_value_t = 10.0)]
        hold: f64,
        /// Connections being opened at the same time.
        #[arg(long, default_value_t = 200)]
        parallel: usize,
        /// Written (empty) once every stream is open or failed; run.sh samples RSS then.
        #[arg(long)]
        ready_file: Option<PathBuf>,
        /// Give up opening after this many seconds.
        #[arg(long, default_value_t = 60.0)]
        open_timeout: f64,
    },
}

fn main() -> io::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match cli.cmd {
            Cmd::Paced {
                addr,
                path,
                host,
                headers,
                rate,
                connections,
                duration,
                warmup,
            } => {
                let req = request(&path, &host, &headers);
                paced(addr, req, rate, connections, duration, warmup).await
            }
            Cmd::SseBackend { listen } => sse_backend(listen).await,
            Cmd::SseProbe {
                addr,
                path,
                host,
                streams,
                events,
            } => {
                let req = request(&path, &host, &["Accept: text/event-stream".into()]);
                sse_probe(addr, req, streams, events).await
            }
            Cmd::SseHold {
                addr,
                path,
                host,
                streams,
                hold,
                parallel,
                ready_file,
                open_timeout,
            } => {
                let req = request(&path, &host, &["Accept: text/event-stream".into()]);
                sse_hold(addr, req, streams, hold, parallel, ready_file, open_timeout).await
            }
        }
    })
}

fn request(path: &str, host: &str, headers: &[String]) -> Arc<[u8]> {
    let mut r = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n");
    for h in headers {
        r.push_str(h);
        r.push_str("\r\n");
    }
    r.push_str("\r\n");
    Arc::from(r.into_bytes())
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Reads more bytes into `buf`; end of stream is an error.
async fn fill(s: &mut TcpStream, buf: &mut BytesMut) -> io::Result<()> {
    if buf.capacity() - buf.len() < 4096 {
        buf.reserve(16 * 1024);
    }
    if s.read_buf(buf).await? == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// Response head: status, `Content-Length`, chunked?
struct Head {
    status: u16,
    content_length: Option<usize>,
    chunked: bool,
}

/// Reads a response head off `buf` (filling it from `s`) and consumes it.
async fn read_head(s: &mut TcpStream, buf: &mut BytesMut) -> io::Result<Head> {
    let end = loop {
        if let Some(i) = find(buf, b"\r\n\r\n") {
            break i + 4;
        }
        fill(s, buf).await?;
    };
    let text = std::str::from_utf8(&buf[..end]).map_err(|_| invalid("head is not UTF-8"))?;
    let status = text
        .get(9..12)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| invalid("bad status line"))?;
    let mut head = Head {
        status,
        content_length: None,
        chunked: false,
    };
    for line in text.split("\r\n").skip(1) {
        if let Some((name, value)) = line.split_once(':') {
            let name = name.trim();
            if name.eq_ignore_ascii_case("content-length") {
                head.content_length = value.trim().parse().ok();
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                head.chunked = value.to_ascii_lowercase().contains("chunked");
            }
        }
    }
    buf.advance(end);
    Ok(head)
}

/// Reads one whole response (Content-Length or chunked body) and returns its status.
async fn read_response(s: &mut TcpStream, buf: &mut BytesMut) -> io::Result<u16> {
    let head = read_head(s, buf).await?;
    if head.chunked {
        loop {
            let line = loop {
                if let Some(i) = find(buf, b"\r\n") {
                    break i;
                }
                fill(s, buf).await?;
            };
            let size_text = std::str::from_utf8(&buf[..line]).map_err(|_| invalid("chunk"))?;
            let size_text = size_text.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size_text, 16).map_err(|_| invalid("chunk size"))?;
            buf.advance(line + 2);
            while buf.len() < size + 2 {
                fill(s, buf).await?;
            }
            buf.advance(size + 2);
            if size == 0 {
                return Ok(head.status);
            }
        }
    }
    let n = head.content_length.unwrap_or(0);
    while buf.len() < n {
        fill(s, buf).await?;
    }
    buf.advance(n);
    Ok(head.status)
}

fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[derive(Default)]
struct PacedStats {
    latencies_us: Vec<u32>,
    ok: u64,
    non2xx: u64,
    errors: u64,
    /// Sends more than 2 ms behind schedule on an idle connection: the tool could not keep up.
    tool_late: u64,
}

async fn paced(
    addr: SocketAddr,
    req: Arc<[u8]>,
    rate: f64,
    connections: usize,
    duration: f64,
    warmup: f64,
) -> io::Result<()> {
    let connections = connections.max(1);
    // Each connection sends every `interval`, offset so the whole set sends evenly.
    let interval_ns = (connections as f64 / rate * 1e9) as u64;
    let start = Instant::now() + Duration::from_millis(200);
    let measure_from = start + Duration::from_secs_f64(warmup);
    let end = measure_from + Duration::from_secs_f64(duration);
    let mut tasks = Vec::with_capacity(connections);
    for i in 0..connections {
        let req = req.clone();
        let offset = interval_ns * i as u64 / connections as u64;
        tasks.push(tokio::spawn(async move {
            let mut st = PacedStats::default();
            let mut conn: Option<TcpStream> = None;
            let mut buf = BytesMut::with_capacity(16 * 1024);
            let mut free_at = Instant::now();
            for k in 0u64.. {
                let sched = start + Duration::from_nanos(offset + interval_ns * k);
                if sched >= end {
                    break;
                }
                if sched > Instant::now() {
                    tokio::time::sleep_until(sched).await;
                }
                let sent = Instant::now();
                let busy = free_at > sched;
                if !busy && sent.duration_since(sched) > Duration::from_millis(2) {
                    st.tool_late += 1;
                }
                let reference = if busy { sched } else { sent };
                let result = async {
                    if conn.is_none() {
                        let s = TcpStream::connect(addr).await?;
                        s.set_nodelay(true)?;
                        buf.clear();
                        conn = Some(s);
                    }
                    let s = conn.as_mut().ok_or_else(|| invalid("no connection"))?;
                    s.write_all(&req).await?;
                    read_response(s, &mut buf).await
                }
                .await;
                let done = Instant::now();
                free_at = done;
                let measured = sched >= measure_from;
                match result {
                    Ok(status) => {
                        if measured {
                            let us = done.duration_since(reference).as_micros();
                            st.latencies_us.push(u32::try_from(us).unwrap_or(u32::MAX));
                            if (200..300).contains(&status) {
                                st.ok += 1;
                            } else {
                                st.non2xx += 1;
                            }
                        }
                    }
                    Err(_) => {
                        conn = None;
                        if measured {
                            st.errors += 1;
                        }
                    }
                }
            }
            st
        }));
    }
    let mut all = PacedStats::default();
    for t in tasks {
        let st = t.await.map_err(io::Error::other)?;
        all.latencies_us.extend(st.latencies_us);
        all.ok += st.ok;
        all.non2xx += st.non2xx;
        all.errors += st.errors;
        all.tool_late += st.tool_late;
    }
    all.latencies_us.sort_unstable();
    let l = &all.latencies_us;
    println!(
        "PACED rate_target={rate:.0} achieved={:.0} requests={} ok={} non2xx={} errors={} \
         tool_late={} p50_us={} p90_us={} p99_us={} p999_us={} max_us={}",
        (all.ok + all.non2xx) as f64 / duration,
        l.len(),
        all.ok,
        all.non2xx,
        all.errors,
        all.tool_late,
        percentile(l, 0.50),
        percentile(l, 0.90),
        percentile(l, 0.99),
        percentile(l, 0.999),
        l.last().copied().unwrap_or(0),
    );
    Ok(())
}

async fn sse_backend(listen: SocketAddr) -> io::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    loop {
        let (s, _) = match listener.accept().await {
            Ok(x) => x,
            Err(_) => {
                // Out of descriptors: wait instead of spinning.
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let _ = s.set_nodelay(true);
        tokio::spawn(async move {
            let _ = serve_sse(s).await;
        });
    }
}

fn query_param(target: &str, name: &str) -> Option<u64> {
    let (_, q) = target.split_once('?')?;
    q.split('&')
        .filter_map(|p| p.split_once('='))
        .find(|(k, _)| *k == name)
        .and_then(|(_, v)| v.parse().ok())
}

async fn serve_sse(mut s: TcpStream) -> io::Result<()> {
    let mut buf = BytesMut::with_capacity(2048);
    loop {
        let end = loop {
            if let Some(i) = find(&buf, b"\r\n\r\n") {
                break i + 4;
            }
            if s.read_buf(&mut buf).await? == 0 {
                return Ok(());
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.advance(end);
        let target = head.split(' ').nth(1).unwrap_or("/").to_string();
        if !target.starts_with("/sse") {
            s.write_all(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 3\r\n\r\nok\n",
            )
            .await?;
            continue;
        }
        let interval = Duration::from_millis(query_param(&target, "interval_ms").unwrap_or(1000));
        let count = query_param(&target, "count").unwrap_or(0);
        s.write_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n\
              transfer-encoding: chunked\r\n\r\n",
        )
        .await?;
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut n = 0u64;
        while count == 0 || n < count {
            ticks.tick().await;
            let event = format!("id: {n}\ndata: {}\n\n", unix_nanos());
            s.write_all(format!("{:x}\r\n{event}\r\n", event.len()).as_bytes())
                .await?;
            n += 1;
        }
        s.write_all(b"0\r\n\r\n").await?;
    }
}

/// Parses complete `data: <nanos>\n` lines out of `buf`; returns the stamps found.
fn take_stamps(buf: &mut BytesMut, out: &mut Vec<u64>) {
    loop {
        let Some(i) = find(buf, b"data: ") else {
            // Keep a possible partial "data: " at the end.
            let keep = buf.len().min(5);
            buf.advance(buf.len() - keep);
            return;
        };
        let Some(j) = find(&buf[i..], b"\n") else {
            buf.advance(i);
            return;
        };
        if let Some(stamp) = std::str::from_utf8(&buf[i + 6..i + j])
            .ok()
            .and_then(|t| t.trim().parse().ok())
        {
            out.push(stamp);
        }
        buf.advance(i + j + 1);
    }
}

async fn sse_probe(
    addr: SocketAddr,
    req: Arc<[u8]>,
    streams: usize,
    events: usize,
) -> io::Result<()> {
    let mut tasks = Vec::new();
    for _ in 0..streams {
        let req = req.clone();
        tasks.push(tokio::spawn(async move {
            let mut delays = Vec::with_capacity(events);
            let mut coalesced = 0u64;
            let mut s = TcpStream::connect(addr).await?;
            s.set_nodelay(true)?;
            s.write_all(&req).await?;
            let mut buf = BytesMut::with_capacity(16 * 1024);
            let head = read_head(&mut s, &mut buf).await?;
            if head.status != 200 {
                return Err(invalid(&format!("status {}", head.status)));
            }
            let mut stamps = Vec::new();
            let mut first = true;
            while delays.len() < events {
                // The first event may have come with the head.
                if !first {
                    fill(&mut s, &mut buf).await?;
                }
                first = false;
                let now = unix_nanos();
                take_stamps(&mut buf, &mut stamps);
                if stamps.len() > 1 {
                    coalesced += 1;
                }
                for st in &stamps {
                    let us = now.saturating_sub(*st) / 1000;
                    delays.push(u32::try_from(us).unwrap_or(u32::MAX));
                }
                stamps.clear();
            }
            Ok::<_, io::Error>((delays, coalesced))
        }));
    }
    let mut all = Vec::new();
    let mut coalesced = 0;
    let mut failed = 0;
    for t in tasks {
        match t.await.map_err(io::Error::other)? {
            Ok((d, c)) => {
                all.extend(d);
                coalesced += c;
            }
            Err(e) => {
                eprintln!("stream failed: {e}");
                failed += 1;
            }
        }
    }
    all.sort_unstable();
    println!(
        "SSE events={} failed_streams={failed} reads_with_several_events={coalesced} \
         p50_us={} p90_us={} p99_us={} max_us={}",
        all.len(),
        percentile(&all, 0.50),
        percentile(&all, 0.90),
        percentile(&all, 0.99),
        all.last().copied().unwrap_or(0),
    );
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn sse_hold(
    addr: SocketAddr,
    req: Arc<[u8]>,
    streams: usize,
    hold: f64,
    parallel: usize,
    ready_file: Option<PathBuf>,
    open_timeout: f64,
) -> io::Result<()> {
    let open = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let closed = Arc::new(AtomicUsize::new(0));
    let events = Arc::new(AtomicU64::new(0));
    let gate = Arc::new(tokio::sync::Semaphore::new(parallel.max(1)));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(streams);
    for _ in 0..streams {
        let (req, open, failed, closed, events, gate) = (
            req.clone(),
            open.clone(),
            failed.clone(),
            closed.clone(),
            events.clone(),
            gate.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let opened = async {
                let _permit = gate.acquire().await.map_err(io::Error::other)?;
                let mut s = TcpStream::connect(addr).await?;
                s.write_all(&req).await?;
                let mut buf = BytesMut::with_capacity(1024);
                let head = read_head(&mut s, &mut buf).await?;
                if head.status != 200 {
                    return Err(invalid("not 200"));
                }
                Ok::<_, io::Error>((s, buf))
            }
            .await;
            let Ok((mut s, mut buf)) = opened else {
                failed.fetch_add(1, Ordering::Relaxed);
                return;
            };
            open.fetch_add(1, Ordering::Relaxed);
            loop {
                buf.clear();
                match s.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let n = buf.windows(6).filter(|w| w == b"data: ").count();
                        events.fetch_add(n as u64, Ordering::Relaxed);
                    }
                }
            }
            closed.fetch_add(1, Ordering::Relaxed);
        }));
    }
    let deadline = started + Duration::from_secs_f64(open_timeout);
    while open.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed) < streams
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let opened = open.load(Ordering::Relaxed);
    println!(
        "HOLD_OPEN opened={opened} failed={} pending={} open_secs={:.1}",
        failed.load(Ordering::Relaxed),
        streams.saturating_sub(opened + failed.load(Ordering::Relaxed)),
        started.elapsed().as_secs_f64()
    );
    if let Some(f) = &ready_file {
        std::fs::write(f, b"")?;
    }
    let before = events.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs_f64(hold)).await;
    let during = events.load(Ordering::Relaxed) - before;
    let still = opened.saturating_sub(closed.load(Ordering::Relaxed));
    println!(
        "HOLD_RESULT streams={streams} opened={opened} still_open={still} \
         events_during_hold={during} hold_secs={hold}"
    );
    for t in tasks {
        t.abort();
    }
    Ok(())
}
