//! A real DNS server for the integration tests: Debian's dnsmasq on a loopback port, serving A
//! records from a hosts file with a 1 s TTL, authoritative for one test domain (other names in
//! it get NXDOMAIN; nothing is forwarded anywhere). The same setup as the unit tests of
//! `src/discovery/dns.rs`, which include this very file (`#[path]`): one launcher for both.
//! Needs nothing from the rest of `support` but [`super::ports`].

use std::io::Write;
use std::net::{SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::ports::free_udp_tcp_port;

/// A running dnsmasq; stopped when dropped.
pub struct Dnsmasq {
    child: Option<Child>,
    port: u16,
    hosts: tempfile::NamedTempFile,
}

impl Dnsmasq {
    /// Starts dnsmasq answering for `domain` (e.g. `test`) with `records` as `(ip, name)`.
    /// Panics when dnsmasq is not installed (`apt-get install -y dnsmasq-base`; scripts/test.sh
    /// installs it).
    pub fn start(domain: &str, records: &[(&str, &str)]) -> Dnsmasq {
        let binary = binary().expect("dnsmasq not found: apt-get install -y dnsmasq-base");
        launch(binary, domain, records)
    }

    /// Like [`Dnsmasq::start`], but `None` (with a message) when dnsmasq is missing and
    /// `TOLLGATE_SKIP_DNS=1`; a missing dnsmasq still fails the test otherwise.
    pub fn start_or_skip(domain: &str, records: &[(&str, &str)]) -> Option<Dnsmasq> {
        let Some(binary) = binary() else {
            if std::env::var("TOLLGATE_SKIP_DNS").as_deref() == Ok("1") {
                eprintln!("dnsmasq not installed and TOLLGATE_SKIP_DNS=1: skipping");
                return None;
            }
            panic!("dnsmasq not found: apt-get install -y dnsmasq-base (or TOLLGATE_SKIP_DNS=1)");
        };
        Some(launch(binary, domain, records))
    }

    /// Where to send queries (`ServeOptions.dns.nameservers`).
    pub fn server(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Replaces the records and makes dnsmasq reread them (SIGHUP); resolvers see the change
    /// once their cached answer's TTL (1 s) has run out.
    pub fn rewrite(&self, records: &[(&str, &str)]) {
        write_hosts(self.hosts.path(), records);
        let pid = self.child.as_ref().expect("dnsmasq is running").id();
        let status = Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .expect("run kill -HUP");
        assert!(status.success(), "SIGHUP to dnsmasq failed");
    }

    /// Stops the server: queries go unanswered from now on.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        self.stop();
    }
}

fn write_hosts(path: &std::path::Path, records: &[(&str, &str)]) {
    // Written in place: dnsmasq reads the file only on start and on SIGHUP.
    let mut f = std::fs::File::create(path).expect("open the hosts file");
    for (ip, name) in records {
        writeln!(f, "{ip} {name}").expect("write the hosts file");
    }
    f.sync_all().expect("sync the hosts file");
}

fn binary() -> Option<&'static str> {
    ["/usr/sbin/dnsmasq", "/usr/bin/dnsmasq", "/sbin/dnsmasq"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
}

fn launch(binary: &str, domain: &str, records: &[(&str, &str)]) -> Dnsmasq {
    let hosts = tempfile::NamedTempFile::new().expect("create the hosts file");
    write_hosts(hosts.path(), records);
    for _ in 0..20 {
        let port = free_udp_tcp_port();
        let mut child = Command::new(binary)
            .args([
                "--no-daemon",
                "--conf-file=/dev/null",
                "--user=root",
                "--group=root",
                "--pid-file=",
                "--bind-interfaces",
                "--listen-address=127.0.0.1",
                "--no-resolv",
                "--no-hosts",
                "--local-ttl=1",
                "--log-facility=-",
            ])
            .arg(format!("--local=/{domain}/"))
            .arg(format!("--port={port}"))
            .arg(format!("--addn-hosts={}", hosts.path().display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn dnsmasq");
        // Ready once it holds the port (we can no longer bind it).
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                break; // the port was taken meanwhile: try another one
            }
            if UdpSocket::bind(("127.0.0.1", port)).is_err() {
                return Dnsmasq {
                    child: Some(child),
                    port,
                    hosts,
                };
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    panic!("dnsmasq did not start");
}
