//! Tollgate: a Kubernetes ingress controller and API gateway for AI-agent microservices.
//! One crate: sources gather objects, `config::compile` builds a Snapshot, `proxy` serves it.
#![forbid(unsafe_code)]

pub mod api;
