//! Endpoint sets fed from Kubernetes EndpointSlices, one per (namespace, service, service port).
//! The Kubernetes source writes here; the proxy reads the swapped sets. Never sees routes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use crate::balance::endpoints::{EndpointRegistry, EndpointSet};

/// (namespace, service, service port).
pub type ServicePortKey = (String, String, u16);

/// One endpoint as a slice describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceEndpoint {
    pub addr: SocketAddr,
    /// `ready` (or unset) and not terminating: takes new requests.
    pub serving: bool,
}

/// The sets of every Service port a route refers to, swapped whole when slices change.
#[derive(Default)]
pub struct SliceEndpoints {
    registry: Arc<EndpointRegistry>,
    sets: Mutex<HashMap<ServicePortKey, Arc<ArcSwap<EndpointSet>>>>,
}

impl std::fmt::Debug for SliceEndpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SliceEndpoints").finish_non_exhaustive()
    }
}

impl SliceEndpoints {
    pub fn new(registry: Arc<EndpointRegistry>) -> Self {
        Self {
            registry,
            sets: Mutex::new(HashMap::new()),
        }
    }

    /// The swapped set for a Service port (empty until slices arrive). Called at attach time,
    /// never per request.
    pub fn handle(&self, key: &ServicePortKey) -> Arc<ArcSwap<EndpointSet>> {
        let mut sets = match self.sets.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        sets.entry(key.clone())
            .or_insert_with(|| Arc::new(ArcSwap::from_pointee(EndpointSet::empty())))
            .clone()
    }

    /// Replaces the endpoints of one Service port (a terminating endpoint stays in the set,
    /// not serving, so it finishes what it has but takes nothing new).
    pub fn update(&self, key: &ServicePortKey, endpoints: &[SliceEndpoint]) {
        let set = EndpointSet::new(
            endpoints
                .iter()
                .map(|e| self.registry.endpoint(e.addr, e.serving))
                .collect(),
        );
        let handle = self.handle(key);
        let current = handle.load();
        if current.same_endpoints(&set)
            && current
                .endpoints()
                .iter()
                .zip(set.endpoints())
                .all(|(a, b)| a.serving == b.serving)
        {
            return;
        }
        handle.store(Arc::new(set));
    }

    /// Ready endpoints of a Service port, for status.
    pub fn ready_count(&self, key: &ServicePortKey) -> usize {
        let sets = match self.sets.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        sets.get(key).map_or(0, |s| s.load().ready_count())
    }
}
