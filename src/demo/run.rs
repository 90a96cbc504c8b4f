//! `tollgate demo` from start to Ctrl-C: the demo services, their configuration file, a
//! standalone gateway on it, and the lines a user copies to try it.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;

use super::{demo_config_yaml, demo_curl_lines, spawn_demo_services};
use crate::app::{self, AppError, ServeOptions};
use crate::discovery::DiscoveryMode;

/// The address every demo listener binds to unless `--bind` says otherwise: the demo's keys are
/// printed and well known, so it is reachable from this machine only.
pub const DEFAULT_BIND: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// The demo gateway's port unless `--port` says otherwise.
pub const DEFAULT_PORT: u16 = 8080;
/// The demo admin port unless `--admin-port` says otherwise.
pub const DEFAULT_ADMIN_PORT: u16 = 9090;

/// Why the demo could not start.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("starting the demo services: {0}")]
    Services(#[source] std::io::Error),
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    App(#[from] AppError),
}

/// Starts the demo services and a standalone gateway in front of them (`opts` gives its
/// listeners; discovery is DNS), prints how to try it, and runs until `stop` completes.
/// The configuration goes to `config_dir` (default: a temporary directory).
pub async fn run(
    config_dir: Option<PathBuf>,
    mut opts: ServeOptions,
    stop: impl Future<Output = ()>,
) -> Result<(), DemoError> {
    opts.discovery = DiscoveryMode::Dns;
    let services = spawn_demo_services(Default::default())
        .await
        .map_err(DemoError::Services)?;
    let dir = config_dir.unwrap_or_else(|| {
        std::env::temp_dir().join(format!("tollgate-demo-{}", std::process::id()))
    });
    let file = dir.join("demo.yaml");
    let write = |r: std::io::Result<()>, path: &PathBuf| {
        r.map_err(|source| DemoError::Write {
            path: path.clone(),
            source,
        })
    };
    write(std::fs::create_dir_all(&dir), &dir)?;
    write(std::fs::write(&file, demo_config_yaml(&services)), &file)?;
    let running = app::start_standalone(file.clone(), &opts).await?;
    println!(
        "\nTollgate demo is running: gateway http://{}, admin http://{} (config: {})\n",
        running.listen,
        running.admin_listen,
        file.display()
    );
    for addr in [running.listen, running.admin_listen] {
        if !addr.ip().is_loopback() {
            tracing::warn!(
                %addr,
                "the demo listens beyond this machine and its API keys are public: anyone who \
                 can reach {addr} can use them"
            );
        }
    }
    println!("{}", demo_curl_lines(running.listen));
    let admin = loopback_if_unspecified(running.admin_listen);
    println!("# Prometheus metrics and the compiled routes on the admin port:");
    println!("curl -s http://{admin}/metrics | grep ^tollgate_");
    println!("curl -s http://{admin}/debug/routes\n");
    println!(
        "Edit {} and watch the gateway reload it. Ctrl-C stops.",
        file.display()
    );
    stop.await;
    running.shutdown().await;
    services.shutdown().await;
    Ok(())
}

/// `0.0.0.0:9090` is printed as `127.0.0.1:9090` so printed commands work as they are.
pub(crate) fn loopback_if_unspecified(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port())
        }
        _ => addr,
    }
}
