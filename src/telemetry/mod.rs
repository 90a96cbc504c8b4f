//! Metrics, logging and the admin server (`/metrics`, `/healthz`, `/readyz`, `/debug/routes`).
//! Reads snapshots; never changes configuration.

pub mod access_format;
pub mod admin;
pub mod logging;
pub mod metrics;

pub use metrics::{GaugeGuard, Metrics};
