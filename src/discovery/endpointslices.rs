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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::LbPolicy;

    /// TEST-NET-1 (RFC 5737): documentation addresses, never routed.
    fn addr(last: u8) -> SocketAddr {
        SocketAddr::from(([192, 0, 2, last], 8000))
    }

    fn key() -> ServicePortKey {
        ("agents".into(), "chat".into(), 80)
    }

    fn ep(last: u8, serving: bool) -> SliceEndpoint {
        SliceEndpoint {
            addr: addr(last),
            serving,
        }
    }

    #[test]
    fn update_sets_serving_flags_and_picks_skip_terminating_endpoints() {
        let slices = SliceEndpoints::new(Arc::new(EndpointRegistry::new()));
        // What the Kubernetes source hands over (its own tests cover the conditions): ready
        // endpoints serve, terminating ones stay without serving, not-ready ones are left out.
        let endpoints = [
            ep(4, false), // terminating, still draining
            ep(1, true),  // ready
            ep(3, false), // terminating
            ep(2, true),  // ready (condition unknown)
            ep(2, false), // the same address in a second slice, mid-rebalance: serving wins
        ];
        slices.update(&key(), &endpoints);

        let set = slices.handle(&key()).load_full();
        let flags: Vec<(SocketAddr, bool)> = set
            .endpoints()
            .iter()
            .map(|e| (e.addr, e.serving))
            .collect();
        assert_eq!(
            flags,
            vec![
                (addr(1), true),
                (addr(2), true),
                (addr(3), false),
                (addr(4), false)
            ]
        );
        assert_eq!(slices.ready_count(&key()), 2);
        assert_eq!(
            slices.ready_count(&("agents".into(), "other".into(), 80)),
            0
        );

        for lb in [
            LbPolicy::LeastConnections,
            LbPolicy::RoundRobin,
            LbPolicy::Random,
        ] {
            let mut held = Vec::new();
            for i in 0..200u64 {
                let (e, guard) = set.pick(lb, i.wrapping_mul(0x9e37_79b9)).expect("a pick");
                assert!(
                    e.addr == addr(1) || e.addr == addr(2),
                    "{lb:?} picked {}",
                    e.addr
                );
                // Hold some, so least connections sees the serving ones loaded.
                if i % 3 == 0 {
                    held.push(guard);
                }
            }
            // Not even a retry that excludes every serving endpoint lands on a terminating one.
            let (e, _g) = set
                .pick_excluding(lb, 7, &[addr(1), addr(2)])
                .expect("a pick");
            assert!(e.serving, "{lb:?} picked terminating {}", e.addr);
        }
    }

    #[test]
    fn updates_keep_per_address_in_flight_state() {
        let registry = Arc::new(EndpointRegistry::new());
        let slices = SliceEndpoints::new(Arc::clone(&registry));
        let serving = |last| ep(last, true);
        slices.update(&key(), &[serving(1), serving(2)]);
        let handle = slices.handle(&key());
        let before = handle.load_full();
        // A request in flight to .1, picked from the first set.
        let (_, guard) = before
            .pick_excluding(LbPolicy::RoundRobin, 0, &[addr(2)])
            .expect("a pick");
        assert_eq!(guard.addr(), addr(1));

        // .1 starts terminating, .3 joins: a new set is swapped in.
        slices.update(&key(), &[ep(1, false), serving(2), serving(3)]);
        let after = handle.load_full();
        assert!(!Arc::ptr_eq(&before, &after), "the set was swapped");
        let one = after
            .endpoints()
            .iter()
            .find(|e| e.addr == addr(1))
            .expect(".1 stays while terminating");
        assert!(!one.serving);
        // Same state object, so the in-flight count carried over into the new set.
        assert!(Arc::ptr_eq(&one.state, &before.endpoints()[0].state));
        assert_eq!(one.state.in_flight(), 1);
        // Least connections on the new set sees .1's load but never picks it.
        for i in 0..20 {
            let (e, _g) = after.pick(LbPolicy::LeastConnections, i).expect("a pick");
            assert_ne!(e.addr, addr(1));
        }
        // The request finishes: counted down in the state every set shares.
        drop(guard);
        assert_eq!(one.state.in_flight(), 0);

        // An identical update swaps nothing (the round-robin cursor and the Arc stay).
        slices.update(&key(), &[ep(1, false), serving(3), serving(2)]);
        assert!(Arc::ptr_eq(&after, &handle.load_full()));

        // .1 is gone, and with no set or guard holding it, so is its state.
        slices.update(&key(), &[serving(2), serving(3)]);
        drop(before);
        drop(after);
        registry.sweep();
        assert!(registry.get(addr(1)).is_none());
        assert!(registry.get(addr(2)).is_some());
    }
}
