//! The choice of backend and endpoint for one attempt: weights (canary header, sticky client),
//! then the route's balancing policy over the backend's endpoints. Counts the attempt in flight
//! until its response body ends. Reads the snapshot; changes no configuration.

use std::net::SocketAddr;

use crate::api::{LoadBalancer, Sticky};
use crate::balance::endpoints::{InFlightGuard, LbPolicy};
use crate::balance::weighted::CanaryMode;
use crate::config::route::{BackendTarget, CompiledBackend, CompiledRoute};
use crate::config::Snapshot;
use crate::telemetry::GaugeGuard;

use super::context::Caller;
use super::upstream::{Connect, Lease, TlsTarget};
use super::{Gateway, ProxyError};

/// Counts a request against its backend and endpoint until its response body ends, and holds
/// the upstream connection until then (it goes back to its pool when the body has ended).
pub struct UpstreamGuard {
    pub endpoint: InFlightGuard,
    pub conn: Option<Lease>,
    _gauge: GaugeGuard,
}

/// The chosen backend and endpoint of one attempt.
pub struct Picked<'a> {
    pub backend: &'a CompiledBackend,
    /// Where to connect: the endpoint address, or the host name for `https` url backends
    /// (their certificate is checked against it).
    pub connect: Connect,
    pub guard: UpstreamGuard,
}

/// Picks a backend by weight (canary header, sticky client), then an endpoint of it by the
/// route's balancing policy, avoiding endpoints already tried when another exists.
pub fn pick_upstream<'a>(
    gw: &Gateway,
    snap: &Snapshot,
    route: &'a CompiledRoute,
    headers: &http::HeaderMap,
    caller: Option<&Caller>,
    tried: &[SocketAddr],
) -> Result<Picked<'a>, ProxyError> {
    let canary = route
        .canary_header
        .as_ref()
        .and_then(|n| headers.get(n))
        .map_or(CanaryMode::Default, |v| {
            CanaryMode::from_header_value(v.as_bytes())
        });
    let sticky = match route.sticky {
        Sticky::ClientId => caller.map(|c| &*c.key.client_id),
        Sticky::None => None,
    };
    let rng: u64 = rand::random();
    let idx = route.weighted.pick(canary, sticky, rng).ok_or_else(|| {
        if route.backends.is_empty() {
            ProxyError::NoBackend
        } else {
            ProxyError::NoEndpoint
        }
    })?;
    pick_in_backend(gw, snap, route, idx, sticky, tried)
}

/// An endpoint of backend `idx` by the route's balancing policy (or the sticky client's).
pub fn pick_in_backend<'a>(
    gw: &Gateway,
    snap: &Snapshot,
    route: &'a CompiledRoute,
    idx: usize,
    sticky: Option<&str>,
    tried: &[SocketAddr],
) -> Result<Picked<'a>, ProxyError> {
    let backend = route.backends.get(idx).ok_or(ProxyError::NoEndpoint)?;
    let set = snap
        .endpoints
        .get(&backend.id)
        .ok_or(ProxyError::NoEndpoint)?
        .load_full();
    let lb = match route.load_balancer {
        LoadBalancer::LeastConnections => LbPolicy::LeastConnections,
        LoadBalancer::RoundRobin => LbPolicy::RoundRobin,
        LoadBalancer::Random => LbPolicy::Random,
    };
    // A sticky client keeps its endpoint too, the same on every replica.
    let (endpoint, guard) = match sticky {
        Some(client) => set.pick_sticky(crate::balance::stable_hash(client.as_bytes()), tried),
        None => set.pick_excluding(lb, rand::random(), tried),
    }
    .ok_or(ProxyError::NoEndpoint)?;
    Ok(picked(gw, backend, endpoint.addr, guard))
}

/// The endpoint a session lives on (MCP): backend `backend` of the route, endpoint `addr`,
/// whatever the weights and the balancing policy say. `NoEndpoint` once it is gone.
pub fn pick_pinned<'a>(
    gw: &Gateway,
    snap: &Snapshot,
    route: &'a CompiledRoute,
    backend: usize,
    addr: SocketAddr,
) -> Result<Picked<'a>, ProxyError> {
    let backend = route.backends.get(backend).ok_or(ProxyError::NoEndpoint)?;
    let set = snap
        .endpoints
        .get(&backend.id)
        .ok_or(ProxyError::NoEndpoint)?
        .load_full();
    let (endpoint, guard) = set.pin(addr).ok_or(ProxyError::NoEndpoint)?;
    Ok(picked(gw, backend, endpoint.addr, guard))
}

fn picked<'a>(
    gw: &Gateway,
    backend: &'a CompiledBackend,
    addr: SocketAddr,
    guard: InFlightGuard,
) -> Picked<'a> {
    let gauge = gw
        .metrics
        .upstream_in_flight
        .with_label_values(&[&backend.id]);
    gauge.inc();
    let connect = match &backend.target {
        BackendTarget::Url {
            https: true,
            host,
            port,
            ..
        } => Connect::Tls(TlsTarget {
            host: host.clone(),
            port: *port,
        }),
        _ => Connect::Addr(addr),
    };
    Picked {
        backend,
        connect,
        guard: UpstreamGuard {
            endpoint: guard,
            conn: None,
            _gauge: GaugeGuard(gauge),
        },
    }
}
