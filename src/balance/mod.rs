//! Balancing: the weighted backend pick (canary, sticky) and the endpoint pick (least
//! connections, passive health), lock-free per request. Never sees kube or config types.

pub mod endpoints;
pub mod health;
pub mod weighted;

pub use endpoints::{
    Endpoint, EndpointRegistry, EndpointSet, EndpointState, InFlightGuard, LbPolicy, EXACT_SCAN_MAX,
};
pub use health::{FailureKind, HealthPolicy, PassiveHealth};
pub use weighted::{BackendWeight, CanaryMode, WeightedBackends};

/// Why no backend or endpoint could be picked. Each maps to a 503 for the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BalanceError {
    /// The backend has no endpoint at all (not resolved yet, or scaled to zero).
    #[error("backend has no endpoints")]
    NoEndpoints,
    /// The backend has endpoints, but every one of them is terminating.
    #[error("every endpoint of the backend is terminating")]
    NoServingEndpoints,
    /// No backend of the route carries weight for this request (every weight is 0).
    #[error("no backend of the route carries weight")]
    NoWeightedBackend,
}

impl BalanceError {
    /// A bounded label for metrics and the JSON error's code.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::NoEndpoints => "no_endpoints",
            Self::NoServingEndpoints => "no_serving_endpoints",
            Self::NoWeightedBackend => "no_weighted_backend",
        }
    }
}

/// FNV-1a, 64 bits: a fixed, documented hash of bytes. Sticky routing hashes client ids with
/// it because the result must agree across gateway replicas and releases; std's
/// `DefaultHasher` may change algorithm between Rust releases, and `RandomState` differs per
/// process.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes
        .iter()
        .fold(OFFSET, |h, &b| (h ^ u64::from(b)).wrapping_mul(PRIME))
}

/// The SplitMix64 output function: a bijective 64-bit mixer with full avalanche. Turns
/// correlated inputs (FNV of similar ids, a caller's counter used as `rng`) into independent-
/// looking bits.
pub fn mix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Maps the high 32 bits of `x` onto `0..n` (Lemire's multiply-shift: no division, and no
/// modulo bias worth the name for endpoint counts).
pub(crate) fn reduce(x: u64, n: usize) -> usize {
    let n = u64::try_from(n).unwrap_or(u64::MAX);
    usize::try_from(((x >> 32) * n.min(u64::from(u32::MAX))) >> 32).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_hash_is_pinned() {
        // Published FNV-1a test vectors: if these change, every sticky client moves.
        assert_eq!(stable_hash(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(stable_hash(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(stable_hash(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn reduce_stays_in_range() {
        for n in [1usize, 2, 3, 7, 8, 9, 1000] {
            for x in [0u64, 1, u64::MAX, u64::MAX / 2, 0xdead_beef_0000_0000] {
                assert!(reduce(x, n) < n);
            }
        }
    }
}
