//! The backend pick of a route: weighted split, canary header modes and sticky clients
//! (weighted rendezvous hashing). Pure and precomputed; never sees kube or config types.

use crate::balance::{mix64, stable_hash, BalanceError};

/// What the route's `canaryHeader` asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum CanaryMode {
    /// No (or an unknown) header value: split by weights.
    #[default]
    Default,
    /// `always`: canary backends only (all backends if the route has none), whatever their
    /// weight, so a canary at weight 0 can be tried before it gets traffic.
    Always,
    /// `never`: non-canary backends only (all backends if every backend is a canary).
    Never,
}

impl CanaryMode {
    /// Reads a canary header value: `always` / `never` (ASCII case-insensitive, surrounding
    /// blanks ignored); anything else is [`CanaryMode::Default`].
    pub fn from_header_value(value: &[u8]) -> Self {
        let value = value.trim_ascii();
        if value.eq_ignore_ascii_case(b"always") {
            Self::Always
        } else if value.eq_ignore_ascii_case(b"never") {
            Self::Never
        } else {
            Self::Default
        }
    }

    /// A bounded label for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Default => "default",
            Self::Always => "always",
            Self::Never => "never",
        }
    }
}

/// One backend of a route as the weighted pick sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendWeight {
    /// The caller's index of the backend (returned by [`WeightedBackends::pick`]).
    pub index: usize,
    /// Relative share of traffic; 0 = none unless a canary header asks for it.
    pub weight: u32,
    /// Whether this is a canary backend.
    pub canary: bool,
    /// A stable name of the backend (for example `namespace/service:port` or its URL): sticky
    /// clients are hashed against it, so reordering the route's backends moves nobody.
    pub identity: String,
}

#[derive(Debug, Clone)]
struct Member {
    index: usize,
    weight: u32,
    /// Mixed hash of the identity, combined with the client's hash per request.
    id_hash: u64,
}

/// Members of one canary mode, with cumulative weights for the weighted random pick.
#[derive(Debug, Clone, Default)]
struct Group {
    members: Vec<Member>,
    /// `cumulative[i]` = sum of weights of members `0..=i`.
    cumulative: Vec<u64>,
    total: u64,
}

impl Group {
    /// `uniform_if_unweighted`: when every member has weight 0, weigh them equally instead of
    /// refusing (header-forced canary modes).
    fn new(members: Vec<Member>, uniform_if_unweighted: bool) -> Self {
        let mut members = members;
        if uniform_if_unweighted && members.iter().all(|m| m.weight == 0) {
            for m in &mut members {
                m.weight = 1;
            }
        }
        let mut total = 0u64;
        let cumulative = members
            .iter()
            .map(|m| {
                total += u64::from(m.weight);
                total
            })
            .collect();
        Self {
            members,
            cumulative,
            total,
        }
    }

    fn weighted_random(&self, rng: u64) -> Option<usize> {
        if self.total == 0 {
            return None;
        }
        // Multiply-shift maps the 64-bit draw onto [0, total) without modulo bias.
        let r = u64::try_from((u128::from(mix64(rng)) * u128::from(self.total)) >> 64).ok()?;
        let pos = self.cumulative.partition_point(|&c| c <= r);
        self.members.get(pos).map(|m| m.index)
    }

    /// Weighted rendezvous (highest random weight) hashing: every member scores
    /// `w / -ln(u)` with `u` in (0, 1) hashed from (client, member); the highest wins.
    /// P(member wins) = w / Σw, and a weight change moves only the clients that must move.
    fn rendezvous(&self, client_hash: u64) -> Option<usize> {
        let mut best: Option<(f64, usize)> = None;
        for m in &self.members {
            if m.weight == 0 {
                continue;
            }
            let h = mix64(client_hash ^ m.id_hash);
            // The top 53 bits as a float strictly inside (0, 1).
            let u = ((h >> 11) as f64 + 0.5) * (1.0 / (1u64 << 53) as f64);
            let score = f64::from(m.weight) / -u.ln();
            if best.is_none_or(|(s, _)| score > s) {
                best = Some((score, m.index));
            }
        }
        best.map(|(_, index)| index)
    }
}

/// The backends of a route, precomputed for the per-request pick: cumulative weights per
/// canary mode for the random split, identity hashes for sticky clients. Built with the
/// route; immutable; the pick allocates nothing.
#[derive(Debug, Clone)]
pub struct WeightedBackends {
    all: Group,
    canary: Group,
    stable: Group,
}

impl WeightedBackends {
    /// From `(backend_index, weight, canary)`; the index doubles as the sticky identity, so
    /// prefer [`with_identities`](Self::with_identities) when backends have stable names.
    pub fn new(backends: impl IntoIterator<Item = (usize, u32, bool)>) -> Self {
        Self::with_identities(
            backends
                .into_iter()
                .map(|(index, weight, canary)| BackendWeight {
                    index,
                    weight,
                    canary,
                    identity: format!("#{index}"),
                }),
        )
    }

    /// From backends with stable identities.
    pub fn with_identities(backends: impl IntoIterator<Item = BackendWeight>) -> Self {
        let (mut all, mut canary, mut stable) = (Vec::new(), Vec::new(), Vec::new());
        for b in backends {
            let member = Member {
                index: b.index,
                weight: b.weight,
                id_hash: mix64(stable_hash(b.identity.as_bytes())),
            };
            if b.canary {
                canary.push(member.clone());
            } else {
                stable.push(member.clone());
            }
            all.push(member);
        }
        Self {
            all: Group::new(all, false),
            canary: Group::new(canary, true),
            stable: Group::new(stable, true),
        }
    }

    fn group(&self, mode: CanaryMode) -> &Group {
        let preferred = match mode {
            CanaryMode::Default => &self.all,
            CanaryMode::Always => &self.canary,
            CanaryMode::Never => &self.stable,
        };
        if preferred.members.is_empty() {
            &self.all
        } else {
            preferred
        }
    }

    /// The backend index for one request. `sticky` is the client id when the route is sticky
    /// (the same client then always lands on the same backend while the backends stay the
    /// same); otherwise `rng`, a fresh random number, splits by weight. `None` when no backend
    /// carries weight.
    pub fn pick(&self, canary: CanaryMode, sticky: Option<&str>, rng: u64) -> Option<usize> {
        let group = self.group(canary);
        match sticky {
            Some(client) => group.rendezvous(stable_hash(client.as_bytes())),
            None => group.weighted_random(rng),
        }
    }

    /// [`pick`](Self::pick) with the error for "nothing to pick".
    pub fn try_pick(
        &self,
        canary: CanaryMode,
        sticky: Option<&str>,
        rng: u64,
    ) -> Result<usize, BalanceError> {
        self.pick(canary, sticky, rng)
            .ok_or(BalanceError::NoWeightedBackend)
    }

    /// Number of backends.
    pub fn len(&self) -> usize {
        self.all.members.len()
    }

    /// Whether there is no backend.
    pub fn is_empty(&self) -> bool {
        self.all.members.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn canary_split(stable: u32, canary: u32) -> WeightedBackends {
        WeightedBackends::with_identities([
            BackendWeight {
                index: 0,
                weight: stable,
                canary: false,
                identity: "agents/conversation-manager:8000".into(),
            },
            BackendWeight {
                index: 1,
                weight: canary,
                canary: true,
                identity: "agents/conversation-manager-canary:8000".into(),
            },
        ])
    }

    fn client(i: usize) -> String {
        format!("client-{i}")
    }

    #[test]
    fn ninety_ten_within_one_and_a_half_points_a4() {
        let w = canary_split(90, 10);
        let mut rng = StdRng::seed_from_u64(42);
        let n = 10_000;
        let canary = (0..n)
            .filter(|_| w.pick(CanaryMode::Default, None, rng.random()) == Some(1))
            .count();
        let share = canary as f64 / n as f64 * 100.0;
        assert!((share - 10.0).abs() <= 1.5, "canary share {share:.2} %");
    }

    #[test]
    fn three_way_split_follows_weights() {
        let w = WeightedBackends::new([(0, 50, false), (1, 30, false), (2, 20, true)]);
        let mut rng = StdRng::seed_from_u64(3);
        let mut counts = [0usize; 3];
        for _ in 0..20_000 {
            if let Some(i) = w.pick(CanaryMode::Default, None, rng.random()) {
                counts[i] += 1;
            }
        }
        let expect = [0.5, 0.3, 0.2];
        for (c, e) in counts.iter().zip(expect) {
            let share = *c as f64 / 20_000.0;
            assert!((share - e).abs() < 0.015, "{counts:?}");
        }
    }

    #[test]
    fn sticky_clients_always_land_on_the_same_backend() {
        let w = canary_split(90, 10);
        let rebuilt = canary_split(90, 10);
        let mut rng = StdRng::seed_from_u64(9);
        for i in 0..100 {
            let id = client(i);
            let first = w.pick(CanaryMode::Default, Some(&id), rng.random());
            assert!(first.is_some());
            for _ in 0..20 {
                assert_eq!(w.pick(CanaryMode::Default, Some(&id), rng.random()), first);
            }
            // Another replica, or the same route rebuilt, agrees.
            assert_eq!(rebuilt.pick(CanaryMode::Default, Some(&id), 0), first);
        }
    }

    #[test]
    fn sticky_split_follows_weights() {
        let w = canary_split(90, 10);
        let n = 10_000;
        let canary = (0..n)
            .filter(|&i| w.pick(CanaryMode::Default, Some(&client(i)), 0) == Some(1))
            .count();
        let share = canary as f64 / n as f64 * 100.0;
        assert!(
            (share - 10.0).abs() <= 1.5,
            "sticky canary share {share:.2} %"
        );
    }

    #[test]
    fn weight_change_moves_only_the_needed_share_toward_canary() {
        let before = canary_split(90, 10);
        let after = canary_split(80, 20);
        let n = 10_000;
        let mut moved = 0;
        for i in 0..n {
            let id = client(i);
            let a = before.pick(CanaryMode::Default, Some(&id), 0);
            let b = after.pick(CanaryMode::Default, Some(&id), 0);
            if a != b {
                moved += 1;
                assert_eq!(
                    (a, b),
                    (Some(0), Some(1)),
                    "{id} moved away from the canary"
                );
            }
        }
        let share = moved as f64 / n as f64;
        assert!((0.05..=0.15).contains(&share), "moved {share:.3}");
    }

    #[test]
    fn reordering_backends_moves_no_sticky_client() {
        let a = canary_split(50, 50);
        let b = WeightedBackends::with_identities([
            BackendWeight {
                index: 0,
                weight: 50,
                canary: true,
                identity: "agents/conversation-manager-canary:8000".into(),
            },
            BackendWeight {
                index: 1,
                weight: 50,
                canary: false,
                identity: "agents/conversation-manager:8000".into(),
            },
        ]);
        for i in 0..1_000 {
            let id = client(i);
            // Index 1 in `a` is index 0 in `b` (the canary), and the other way round.
            let in_a = a.pick(CanaryMode::Default, Some(&id), 0);
            let in_b = b.pick(CanaryMode::Default, Some(&id), 0).map(|x| 1 - x);
            assert_eq!(in_a, in_b);
        }
    }

    #[test]
    fn canary_header_modes() {
        let w = canary_split(90, 10);
        let mut rng = StdRng::seed_from_u64(5);
        for i in 0..500 {
            let r = rng.random();
            assert_eq!(w.pick(CanaryMode::Always, None, r), Some(1));
            assert_eq!(w.pick(CanaryMode::Never, None, r), Some(0));
            let id = client(i);
            assert_eq!(w.pick(CanaryMode::Always, Some(&id), r), Some(1));
            assert_eq!(w.pick(CanaryMode::Never, Some(&id), r), Some(0));
        }
        // A canary at weight 0 gets no traffic, but the header still reaches it.
        let dark = canary_split(100, 0);
        for i in 0..500u64 {
            assert_eq!(dark.pick(CanaryMode::Default, None, i), Some(0));
            assert_eq!(dark.pick(CanaryMode::Always, None, i), Some(1));
        }
        // No canary at all: `always` falls back to every backend.
        let plain = WeightedBackends::new([(0, 1, false), (1, 1, false)]);
        assert!(plain.pick(CanaryMode::Always, None, 1).is_some());
        // Only canaries: `never` falls back too.
        let only = WeightedBackends::new([(3, 5, true)]);
        assert_eq!(only.pick(CanaryMode::Never, None, 1), Some(3));
    }

    #[test]
    fn header_values_parse() {
        assert_eq!(CanaryMode::from_header_value(b"always"), CanaryMode::Always);
        assert_eq!(CanaryMode::from_header_value(b" Never "), CanaryMode::Never);
        assert_eq!(CanaryMode::from_header_value(b"yes"), CanaryMode::Default);
        assert_eq!(CanaryMode::from_header_value(b""), CanaryMode::Default);
    }

    #[test]
    fn no_weight_no_pick() {
        let w = WeightedBackends::new([(0, 0, false), (1, 0, false)]);
        assert_eq!(w.pick(CanaryMode::Default, None, 7), None);
        assert_eq!(w.pick(CanaryMode::Default, Some("c"), 7), None);
        assert_eq!(
            w.try_pick(CanaryMode::Default, None, 7),
            Err(BalanceError::NoWeightedBackend)
        );
        let empty = WeightedBackends::new([]);
        assert!(empty.is_empty());
        assert_eq!(empty.pick(CanaryMode::Always, Some("c"), 1), None);
    }
}
