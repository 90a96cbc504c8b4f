//! Metrics, logging and the access log format; the admin server that serves them is `crate::admin`.
//! Reads snapshots; never changes configuration.

pub mod access_format;
pub mod logging;
pub mod metrics;

pub use metrics::{GaugeGuard, Metrics};
