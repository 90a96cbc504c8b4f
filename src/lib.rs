//! Tollgate: a Kubernetes ingress controller and API gateway for AI-agent microservices.
//! One crate: sources gather objects, `config::compile` builds a Snapshot, `proxy` serves it.
#![forbid(unsafe_code)]
#![warn(unreachable_pub)]

pub mod admin;
pub mod api;
pub mod app;
pub mod auth;
pub mod balance;
pub mod config;
pub mod demo;
pub mod discovery;
pub mod mcp;
pub mod proxy;
pub mod ratelimit;
pub mod sources;
pub mod telemetry;

/// The integration tests' launchers of real servers (tests/support/), for the unit tests too:
/// one dnsmasq and one redis-server launcher in the repository.
#[cfg(test)]
#[allow(dead_code, unreachable_pub)]
#[path = "../tests/support"]
mod test_support {
    pub mod dnsmasq;
    pub mod ports;
    pub mod redis;
}
