//! Turns a backend [`Target`] into the handle of its swapped endpoint set: EndpointSlices or DNS
//! for Services, DNS for hosts, a fixed set for IP literals. Used at attach time; the caller
//! (`app::attach_endpoints`) converts a route's backend into a `Target`.

use std::sync::Arc;

use arc_swap::ArcSwap;

use super::dns::{DnsDiscovery, DnsWatch};
use super::endpointslices::SliceEndpoints;
use super::{service_fqdn, DiscoveryError};
use crate::balance::endpoints::{EndpointRegistry, EndpointSet};

/// What to discover, as discovery sees it: a Service port or a host and port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target<'a> {
    /// A Kubernetes Service port.
    Service {
        namespace: &'a str,
        name: &'a str,
        port: u16,
    },
    /// A DNS name or an IP literal (bracketed or not) and a port.
    Host { host: &'a str, port: u16 },
}

/// How Service backends are discovered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum DiscoveryMode {
    /// Pod endpoints from EndpointSlices (Kubernetes mode).
    #[default]
    Endpointslices,
    /// `<service>.<namespace>.svc.<cluster-domain>` through DNS.
    Dns,
}

/// A backend's live endpoint set; holding it keeps its DNS watch running.
#[derive(Clone, Debug)]
pub struct EndpointHandle {
    pub set: Arc<ArcSwap<EndpointSet>>,
    _watch: Option<DnsWatch>,
}

impl EndpointHandle {
    pub fn fixed(set: EndpointSet) -> Self {
        Self {
            set: Arc::new(ArcSwap::from_pointee(set)),
            _watch: None,
        }
    }
}

/// Resolves backend targets to endpoint handles.
pub struct Resolver {
    registry: Arc<EndpointRegistry>,
    dns: DnsDiscovery,
    slices: Option<Arc<SliceEndpoints>>,
    mode: DiscoveryMode,
    cluster_domain: String,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver")
            .field("mode", &self.mode)
            .field("cluster_domain", &self.cluster_domain)
            .finish_non_exhaustive()
    }
}

impl Resolver {
    pub fn new(
        registry: Arc<EndpointRegistry>,
        dns: DnsDiscovery,
        slices: Option<Arc<SliceEndpoints>>,
        mode: DiscoveryMode,
        cluster_domain: impl Into<String>,
    ) -> Self {
        Self {
            registry,
            dns,
            slices,
            mode,
            cluster_domain: cluster_domain.into(),
        }
    }

    pub fn registry(&self) -> &Arc<EndpointRegistry> {
        &self.registry
    }

    /// The endpoint handle of a target.
    pub fn handle(&self, target: Target<'_>) -> Result<EndpointHandle, DiscoveryError> {
        match target {
            Target::Service {
                namespace,
                name,
                port,
            } => match (&self.slices, self.mode) {
                (Some(slices), DiscoveryMode::Endpointslices) => Ok(EndpointHandle {
                    set: slices.handle(&(namespace.to_string(), name.to_string(), port)),
                    _watch: None,
                }),
                _ => {
                    let fqdn = service_fqdn(name, namespace, &self.cluster_domain);
                    let watch = self.dns.watch(&fqdn, port)?;
                    Ok(EndpointHandle {
                        set: watch.endpoints().clone(),
                        _watch: Some(watch),
                    })
                }
            },
            Target::Host { host, port } => {
                let watch = self.dns.watch(host, port)?;
                Ok(EndpointHandle {
                    set: watch.endpoints().clone(),
                    _watch: Some(watch),
                })
            }
        }
    }
}
