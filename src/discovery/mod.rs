//! Endpoint discovery: turns backend targets (a Service port, a host and port) into swapped
//! `balance::EndpointSet`s, from DNS or from the EndpointSlices the Kubernetes source feeds in.
//! Owns the DNS refresh tasks; never sees kube, config or route types (callers convert a route's
//! backend into a [`Target`]), and never picks endpoints.

pub mod dns;
pub mod endpointslices;
pub mod resolver;

pub use dns::{DnsConfig, DnsDiscovery, DnsWatch, WatchStatus};
pub use endpointslices::SliceEndpoints;
pub use resolver::{DiscoveryMode, EndpointHandle, Resolver, Target};

/// What can go wrong when setting up discovery. Lookup failures at run time are not errors
/// here: the watch keeps its last good answer and reports them in [`WatchStatus`].
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// The system resolver configuration (`/etc/resolv.conf`) could not be read or parsed.
    #[error("cannot read the system resolver configuration: {0}")]
    SystemConfig(#[source] hickory_resolver::net::NetError),
    /// The resolver could not be built from the given configuration.
    #[error("cannot build the DNS resolver: {0}")]
    Resolver(#[source] hickory_resolver::net::NetError),
    /// The backend host is neither an IP address nor a valid DNS name.
    #[error("invalid backend host name {host:?}")]
    InvalidName {
        /// The host as given.
        host: String,
    },
    /// A watch was started outside a tokio runtime, so its refresh task cannot run.
    #[error("DNS discovery needs a tokio runtime")]
    NoRuntime,
}

impl DiscoveryError {
    /// A bounded label for metrics and status reasons.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::SystemConfig(_) => "system_config",
            Self::Resolver(_) => "resolver",
            Self::InvalidName { .. } => "invalid_name",
            Self::NoRuntime => "no_runtime",
        }
    }
}

/// The cluster DNS name of a Service: `<service>.<namespace>.svc.<cluster-domain>.`, fully
/// qualified (trailing dot) so resolver search domains never apply.
pub fn service_fqdn(service: &str, namespace: &str, cluster_domain: &str) -> String {
    let domain = cluster_domain.trim_end_matches('.');
    format!("{service}.{namespace}.svc.{domain}.")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_names_are_fully_qualified() {
        assert_eq!(
            service_fqdn("chat", "agents", "cluster.local"),
            "chat.agents.svc.cluster.local."
        );
        assert_eq!(
            service_fqdn("chat", "agents", "cluster.local."),
            "chat.agents.svc.cluster.local."
        );
    }
}
