//! Local request limits: exact token buckets in a sharded map keyed by stable client/route ids.
//! Must not depend on config snapshots, Redis or HTTP types: callers pass ids and numbers.
//!
//! # Admission formula
//!
//! A bucket holds at most `burst` tokens and refills continuously at `per_minute / 60` tokens per
//! second. The arithmetic is exact integers: one token is `60 × 10⁹` units and a bucket gains
//! exactly `per_minute` units per elapsed nanosecond, so no rounding accumulates. A bucket seen for
//! the first time is full. A request is admitted when **every** bucket given to the check holds at
//! least one whole token, and then takes one token from each; a refused request takes nothing from
//! any bucket (all buckets of a check are locked together).
//!
//! Hence a client whose bucket is full at time 0 and who keeps sending for `T` seconds is
//! admitted exactly `burst + floor(T × per_minute / 60)` requests, with no ±1 from rounding. With
//! several buckets the tightest one bounds the count.
//!
//! `RateLimit-*` values ([`RateInfo`]): `limit` = `burst`, `remaining` = whole tokens left,
//! `reset_secs` = seconds until full again (rounded up); on refusal `retry_after_secs` = seconds
//! until one token is there (rounded up, at least 1), from the bucket that needs longest.
//!
//! A `per_minute` or `burst` of 0 is treated as 1 (the API refuses 0). When a bucket's
//! `per_minute` or `burst` changes, its tokens carry over (capped at the new `burst`), so editing a
//! route resets no one. Buckets that are full again hold no information and are dropped by
//! [`LocalLimiter::sweep`], which `RateLimiter::spawn_sweeper` runs (the gateway starts it).

use std::borrow::Borrow;
use std::cmp::Reverse;
use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher};
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};

use super::{Decision, Nanos, RateInfo};

/// Units per token: a bucket gains `per_minute` units per nanosecond, i.e. `per_minute` tokens
/// per 60 × 10⁹ ns.
pub(crate) const UNIT: u128 = 60_000_000_000;
const NANOS_PER_SEC: u128 = 1_000_000_000;

/// Number of independently locked shards. 64 keeps the chance that two cores contend for the same
/// shard small (1/64 per pair) while an empty limiter costs only 64 small maps.
const SHARDS: usize = 64;
/// Checks over at most this many buckets keep their scratch space on the stack (a request has two:
/// the key's and the route's).
const INLINE_KEYS: usize = 4;

/// Names a bucket: a client id and, for per-route limits, a route id.
pub(crate) trait BucketName {
    /// The client id (several keys of one client share its limits).
    fn client(&self) -> &str;
    /// The route id, or `None` for the client's own (key) bucket.
    fn route(&self) -> Option<&str>;
}

/// The hash of a bucket name, from one process-wide random seed: a lookup hashes each name once
/// (SipHash, so ids cannot be chosen to collide) and that hash picks both the shard and the slot.
fn hash_name(client: &[u8], route: Option<&[u8]>) -> u64 {
    static SEED: OnceLock<RandomState> = OnceLock::new();
    SEED.get_or_init(RandomState::new).hash_one((client, route))
}

/// A bucket name as the maps compare it. Lookups carry their hash; stored keys recompute theirs
/// only when the map grows.
pub(crate) trait Hashed {
    fn hash64(&self) -> u64;
    fn parts(&self) -> (&[u8], Option<&[u8]>);
}

impl Hash for dyn Hashed + '_ {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash64());
    }
}

impl PartialEq for dyn Hashed + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.parts() == other.parts()
    }
}

impl Eq for dyn Hashed + '_ {}

/// A borrowed bucket name with its hash: what the maps are searched with (no allocation).
#[derive(Clone, Copy, Debug)]
struct Lookup<'a> {
    hash: u64,
    client: &'a [u8],
    route: Option<&'a [u8]>,
}

impl<'a> Lookup<'a> {
    fn of(name: &'a (impl BucketName + ?Sized)) -> Self {
        let (client, route) = (name.client().as_bytes(), name.route().map(str::as_bytes));
        Self {
            hash: hash_name(client, route),
            client,
            route,
        }
    }

    fn with_hash(name: &'a (impl BucketName + ?Sized), hash: u64) -> Self {
        Self {
            hash,
            client: name.client().as_bytes(),
            route: name.route().map(str::as_bytes),
        }
    }
}

impl Hashed for Lookup<'_> {
    fn hash64(&self) -> u64 {
        self.hash
    }
    fn parts(&self) -> (&[u8], Option<&[u8]>) {
        (self.client, self.route)
    }
}

/// Client plus route ids up to this many bytes live inside the key itself: no allocation, and a
/// lookup compares them without following a pointer (a third fewer cache misses when many clients
/// are active). 29 bytes keep the key at 32 bytes and a map entry at one 64-byte cache line.
const INLINE_IDS: usize = 29;
const NO_ROUTE_INLINE: u8 = u8::MAX;
const NO_ROUTE_HEAP: u32 = u32::MAX;

/// The owned, stable identity of a bucket as stored in the maps: client id plus optional route id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum BucketKey {
    Inline {
        ids: [u8; INLINE_IDS],
        client_len: u8,
        /// `NO_ROUTE_INLINE` for the client's own bucket.
        route_len: u8,
    },
    Heap {
        ids: Box<[u8]>,
        client_len: u32,
        /// `NO_ROUTE_HEAP` for the client's own bucket.
        route_len: u32,
    },
}

impl BucketKey {
    pub(crate) fn new(client: &str, route: Option<&str>) -> Self {
        Self::from_parts(client.as_bytes(), route.map(str::as_bytes))
    }

    fn from_parts(client: &[u8], route: Option<&[u8]>) -> Self {
        let route_bytes = route.unwrap_or_default();
        let len = client.len() + route_bytes.len();
        if len <= INLINE_IDS {
            let mut ids = [0u8; INLINE_IDS];
            if let Some(slot) = ids.get_mut(..client.len()) {
                slot.copy_from_slice(client);
            }
            if let Some(slot) = ids.get_mut(client.len()..len) {
                slot.copy_from_slice(route_bytes);
            }
            return BucketKey::Inline {
                ids,
                // Both fit: their sum is at most INLINE_IDS.
                client_len: client.len() as u8,
                route_len: route.map_or(NO_ROUTE_INLINE, |r| r.len() as u8),
            };
        }
        let mut ids = Vec::with_capacity(len);
        ids.extend_from_slice(client);
        ids.extend_from_slice(route_bytes);
        BucketKey::Heap {
            ids: ids.into_boxed_slice(),
            // Ids are bounded far below 4 GiB by the request and config size limits.
            client_len: u32::try_from(client.len()).unwrap_or(u32::MAX - 1),
            route_len: route.map_or(NO_ROUTE_HEAP, |r| {
                u32::try_from(r.len()).unwrap_or(u32::MAX - 1)
            }),
        }
    }
}

impl Hashed for BucketKey {
    fn hash64(&self) -> u64 {
        let (client, route) = self.parts();
        hash_name(client, route)
    }

    fn parts(&self) -> (&[u8], Option<&[u8]>) {
        let (ids, client_len, route_len): (&[u8], usize, Option<usize>) = match self {
            BucketKey::Inline {
                ids,
                client_len,
                route_len,
            } => (
                ids,
                usize::from(*client_len),
                (*route_len != NO_ROUTE_INLINE).then_some(usize::from(*route_len)),
            ),
            BucketKey::Heap {
                ids,
                client_len,
                route_len,
            } => (
                ids,
                *client_len as usize,
                (*route_len != NO_ROUTE_HEAP).then_some(*route_len as usize),
            ),
        };
        let client = ids.get(..client_len).unwrap_or_default();
        let route = route_len.map(|len| {
            ids.get(client_len..client_len.saturating_add(len))
                .unwrap_or_default()
        });
        (client, route)
    }
}

impl BucketName for BucketKey {
    fn client(&self) -> &str {
        // The bytes were copied from a `&str`, split at its end: always valid UTF-8.
        std::str::from_utf8(self.parts().0).unwrap_or_default()
    }
    fn route(&self) -> Option<&str> {
        self.parts()
            .1
            .map(|route| std::str::from_utf8(route).unwrap_or_default())
    }
}

impl Hash for BucketKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash64());
    }
}

impl<'a> Borrow<dyn Hashed + 'a> for BucketKey {
    fn borrow(&self) -> &(dyn Hashed + 'a) {
        self
    }
}

/// The maps' hasher: names arrive hashed already, so it passes their hash through.
#[derive(Default)]
struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used; anything else is still folded in correctly.
        for &byte in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(byte);
        }
    }
    fn write_u64(&mut self, hash: u64) {
        self.0 = hash;
    }
}

/// A borrowed bucket name.
#[derive(Clone, Copy, Debug)]
pub(crate) struct NameRef<'a> {
    pub(crate) client: &'a str,
    pub(crate) route: Option<&'a str>,
}

impl BucketName for NameRef<'_> {
    fn client(&self) -> &str {
        self.client
    }
    fn route(&self) -> Option<&str> {
        self.route
    }
}

type Map<S> = HashMap<BucketKey, S, BuildHasherDefault<PassThrough>>;

#[repr(align(128))] // one shard per cache-line pair: no false sharing between shard locks
struct Shard<S>(Mutex<Map<S>>);

type ShardGuard<'a, S> = MutexGuard<'a, Map<S>>;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The maps hold plain numbers that are consistent after every statement: a panic elsewhere
    // while holding the lock cannot leave one half-written, so a poisoned lock is safe to reuse.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The shard of a hash: bits 32..38. The maps inside use the low bits for the slot and the top 7
/// bits as a tag, so the shard choice takes neither (keys of one shard still spread fully).
#[inline]
fn shard_of(hash: u64) -> usize {
    (hash >> 32) as usize % SHARDS
}

/// Per-bucket state in `SHARDS` independently locked maps, chosen by the hash of the bucket name.
/// No global lock: a check locks only the shards of its own buckets, in ascending order.
pub(crate) struct ShardedMap<S> {
    shards: Box<[Shard<S>]>,
}

impl<S: Copy + Default> ShardedMap<S> {
    pub(crate) fn new() -> Self {
        Self {
            shards: (0..SHARDS)
                .map(|_| Shard(Mutex::new(Map::default())))
                .collect(),
        }
    }

    fn shard(&self, hash: u64) -> &Mutex<Map<S>> {
        &self.shards[shard_of(hash)].0
    }

    /// The state of one bucket, if it has any.
    pub(crate) fn get(&self, name: &impl BucketName) -> Option<S> {
        let lookup = Lookup::of(name);
        let key: &dyn Hashed = &lookup;
        lock(self.shard(lookup.hash)).get(key).copied()
    }

    /// Runs `f` on copies of the states of all `keys` (absent ones from `init`) while holding the
    /// locks of all their shards, then stores the states back when `f` says so. Keys should be
    /// distinct; a repeated key sees its state twice and the last copy wins.
    pub(crate) fn transact<K: BucketName, R>(
        &self,
        keys: &[K],
        init: impl Fn(&K) -> S,
        f: impl FnOnce(&mut [S]) -> (R, bool),
    ) -> R {
        match keys {
            [] => f(&mut []).0,
            [key] => self.transact_one(key, init, f),
            _ if keys.len() <= INLINE_KEYS => {
                let n = keys.len();
                let mut states = [S::default(); INLINE_KEYS];
                let mut hashes = [0u64; INLINE_KEYS];
                let mut guards: [Option<ShardGuard<'_, S>>; INLINE_KEYS] = Default::default();
                let scratch = Scratch {
                    states: &mut states[..n],
                    hashes: &mut hashes[..n],
                    guards: &mut guards[..n],
                };
                self.transact_many(keys, scratch, init, f)
            }
            _ => {
                let n = keys.len();
                let mut states = vec![S::default(); n];
                let mut hashes = vec![0u64; n];
                let mut guards: Vec<Option<ShardGuard<'_, S>>> = (0..n).map(|_| None).collect();
                let scratch = Scratch {
                    states: &mut states,
                    hashes: &mut hashes,
                    guards: &mut guards,
                };
                self.transact_many(keys, scratch, init, f)
            }
        }
    }

    #[inline]
    fn transact_one<K: BucketName, R>(
        &self,
        key: &K,
        init: impl Fn(&K) -> S,
        f: impl FnOnce(&mut [S]) -> (R, bool),
    ) -> R {
        let lookup = Lookup::of(key);
        let mut map = lock(self.shard(lookup.hash));
        if let Some(stored) = map.get_mut(&lookup as &dyn Hashed) {
            let mut state = [*stored];
            let (result, write) = f(&mut state);
            if write {
                *stored = state[0];
            }
            return result;
        }
        let mut state = [init(key)];
        let (result, write) = f(&mut state);
        if write {
            map.insert(BucketKey::from_parts(lookup.client, lookup.route), state[0]);
        }
        result
    }

    fn transact_many<'s, K: BucketName, R>(
        &'s self,
        keys: &[K],
        scratch: Scratch<'_, 's, S>,
        init: impl Fn(&K) -> S,
        f: impl FnOnce(&mut [S]) -> (R, bool),
    ) -> R {
        let Scratch {
            states,
            hashes,
            guards,
        } = scratch;
        for (hash, key) in hashes.iter_mut().zip(keys) {
            *hash = Lookup::of(key).hash;
        }
        let shard_at = |i: usize| hashes.get(i).map(|&h| shard_of(h));
        // The guard of a shard sits at the position of the first key in that shard.
        let owner_of = |i: usize| (0..=i).find(|&j| shard_at(j) == shard_at(i));
        // Lock each distinct shard once, in ascending order (no deadlock between checks).
        let mut previous: Option<usize> = None;
        while let Some(next) = (0..keys.len())
            .filter_map(shard_at)
            .filter(|&s| previous.is_none_or(|p| s > p))
            .min()
        {
            if let Some(owner) = (0..keys.len()).find(|&j| shard_at(j) == Some(next)) {
                if let Some(guard) = guards.get_mut(owner) {
                    *guard = Some(lock(&self.shards[next].0));
                }
            }
            previous = Some(next);
        }
        for (i, key) in keys.iter().enumerate() {
            let lookup = Lookup::with_hash(key, hashes.get(i).copied().unwrap_or_default());
            let stored = owner_of(i)
                .and_then(|o| guards.get(o))
                .and_then(Option::as_ref)
                .and_then(|map| map.get(&lookup as &dyn Hashed).copied());
            if let Some(state) = states.get_mut(i) {
                *state = stored.unwrap_or_else(|| init(key));
            }
        }
        let (result, write) = f(states);
        if write {
            for (i, key) in keys.iter().enumerate() {
                let lookup = Lookup::with_hash(key, hashes.get(i).copied().unwrap_or_default());
                let (Some(map), Some(&state)) = (
                    owner_of(i)
                        .and_then(|o| guards.get_mut(o))
                        .and_then(Option::as_mut),
                    states.get(i),
                ) else {
                    continue;
                };
                if let Some(stored) = map.get_mut(&lookup as &dyn Hashed) {
                    *stored = state;
                } else {
                    map.insert(BucketKey::from_parts(lookup.client, lookup.route), state);
                }
            }
        }
        result
    }

    /// Keeps only the states for which `keep` is true; returns how many were dropped. Locks one
    /// shard at a time.
    pub(crate) fn retain(&self, mut keep: impl FnMut(&S) -> bool) -> usize {
        let mut dropped = 0;
        for shard in self.shards.iter() {
            let mut map = lock(&shard.0);
            let before = map.len();
            map.retain(|_, state| keep(state));
            dropped += before - map.len();
        }
        dropped
    }

    /// Number of states held.
    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(|shard| lock(&shard.0).len()).sum()
    }
}

/// Scratch space of a check over several buckets: on the stack for a few, on the heap for many.
struct Scratch<'a, 's, S> {
    states: &'a mut [S],
    hashes: &'a mut [u64],
    guards: &'a mut [Option<ShardGuard<'s, S>>],
}

/// `a / b` rounded up, on 64-bit division when the numbers fit (the common case).
#[inline]
pub(crate) fn div_ceil(a: u128, b: u128) -> u128 {
    match (u64::try_from(a), u64::try_from(b)) {
        (Ok(a), Ok(b)) if b > 0 => u128::from(a.div_ceil(b)),
        _ if b > 0 => a.div_ceil(b),
        _ => u128::MAX,
    }
}

/// `a / b` rounded down, on 64-bit division when the numbers fit.
#[inline]
pub(crate) fn div_floor(a: u128, b: u128) -> u128 {
    match (u64::try_from(a), u64::try_from(b)) {
        (Ok(a), Ok(b)) if b > 0 => u128::from(a / b),
        _ if b > 0 => a / b,
        _ => u128::MAX,
    }
}

/// Nanoseconds to whole seconds, rounded up.
#[inline]
pub(crate) fn secs_ceil(nanos: u128) -> u64 {
    u64::try_from(div_ceil(nanos, NANOS_PER_SEC)).unwrap_or(u64::MAX)
}

/// One request bucket to check: whose it is and its limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BucketSpec<'a> {
    /// Client id (of the API key).
    pub client: &'a str,
    /// Route id for the route's per-client bucket; `None` for the key's own bucket.
    pub route: Option<&'a str>,
    /// Refill rate: requests per minute (0 is treated as 1).
    pub per_minute: u32,
    /// Capacity (0 is treated as 1).
    pub burst: u32,
}

impl BucketName for BucketSpec<'_> {
    fn client(&self) -> &str {
        self.client
    }
    fn route(&self) -> Option<&str> {
        self.route
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct BucketState {
    /// Units available at `last` (at most `burst × UNIT`).
    level: u128,
    /// When `level` was last brought up to date.
    last: Nanos,
    /// The limits last seen (for the sweep).
    per_minute: u32,
    burst: u32,
}

impl BucketState {
    fn full(spec: &BucketSpec<'_>, now: Nanos) -> Self {
        let burst = spec.burst.max(1);
        Self {
            level: u128::from(burst) * UNIT,
            last: now,
            per_minute: spec.per_minute.max(1),
            burst,
        }
    }

    #[inline]
    fn cap(&self) -> u128 {
        u128::from(self.burst) * UNIT
    }

    #[inline]
    fn refill(&mut self, spec: &BucketSpec<'_>, now: Nanos) {
        self.per_minute = spec.per_minute.max(1);
        self.burst = spec.burst.max(1);
        let cap = self.cap();
        if now > self.last {
            let gained = u128::from(now - self.last) * u128::from(self.per_minute);
            self.level = self.level.saturating_add(gained);
            self.last = now;
        }
        self.level = self.level.min(cap);
    }

    fn is_full_at(&self, now: Nanos) -> bool {
        let gained = u128::from(now.saturating_sub(self.last)) * u128::from(self.per_minute.max(1));
        self.level.saturating_add(gained) >= self.cap()
    }

    /// Nanoseconds until `level` reaches `target` units.
    #[inline]
    fn nanos_until(&self, target: u128) -> u128 {
        div_ceil(
            target.saturating_sub(self.level),
            u128::from(self.per_minute.max(1)),
        )
    }

    #[inline]
    fn info(&self) -> RateInfo {
        RateInfo {
            limit: u64::from(self.burst),
            remaining: u64::try_from(div_floor(self.level, UNIT)).unwrap_or(u64::MAX),
            reset_secs: secs_ceil(self.nanos_until(self.cap())),
        }
    }
}

/// The tighter of two `RateInfo`s of admitted requests: fewer remaining, then longer to reset.
#[inline]
pub(crate) fn tighter(a: Option<RateInfo>, b: RateInfo) -> Option<RateInfo> {
    let order = |info: &RateInfo| (info.remaining, Reverse(info.reset_secs));
    match a {
        Some(a) if order(&a) <= order(&b) => Some(a),
        _ => Some(b),
    }
}

/// Request limits of this process (see the module doc for the formula).
pub struct LocalLimiter {
    buckets: ShardedMap<BucketState>,
}

impl Default for LocalLimiter {
    fn default() -> Self {
        Self::new()
    }
}

impl LocalLimiter {
    /// An empty limiter (every bucket starts full).
    pub fn new() -> Self {
        Self {
            buckets: ShardedMap::new(),
        }
    }

    /// Checks one request against all `buckets` at time `now`; takes a token from each only when
    /// every one has one. No allocation unless a bucket is seen for the first time.
    pub fn check_at(&self, buckets: &[BucketSpec<'_>], now: Nanos) -> Decision {
        self.buckets.transact(
            buckets,
            |spec| BucketState::full(spec, now),
            |states| {
                let mut refused: Option<(RateInfo, u128)> = None;
                for (state, spec) in states.iter_mut().zip(buckets) {
                    state.refill(spec, now);
                    if state.level < UNIT {
                        let wait = state.nanos_until(UNIT);
                        if refused.is_none_or(|(_, longest)| wait > longest) {
                            refused = Some((state.info(), wait));
                        }
                    }
                }
                if let Some((info, wait)) = refused {
                    let retry_after_secs = secs_ceil(wait).max(1);
                    return (
                        Decision::Limited {
                            info,
                            retry_after_secs,
                        },
                        false,
                    );
                }
                let mut tightest = None;
                for state in states.iter_mut() {
                    state.level -= UNIT;
                    tightest = tighter(tightest, state.info());
                }
                (
                    Decision::Allowed(tightest.unwrap_or(RateInfo::UNLIMITED)),
                    true,
                )
            },
        )
    }

    /// Drops the buckets that are full at `now` (a full bucket is the same as none); returns how
    /// many were dropped.
    pub fn sweep(&self, now: Nanos) -> usize {
        self.buckets.retain(|state| !state.is_full_at(now))
    }

    /// Number of buckets held.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// True when no bucket is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Nanos = 1_000_000_000;

    fn spec<'a>(
        client: &'a str,
        route: Option<&'a str>,
        per_minute: u32,
        burst: u32,
    ) -> BucketSpec<'a> {
        BucketSpec {
            client,
            route,
            per_minute,
            burst,
        }
    }

    /// Sends as fast as possible: at every `step` ns from 0 to `duration` ns (both included),
    /// requests until refused. Returns the number admitted.
    fn hammer(
        limiter: &LocalLimiter,
        buckets: &[BucketSpec<'_>],
        duration: Nanos,
        step: Nanos,
    ) -> u64 {
        let mut admitted = 0;
        let mut now = 0;
        loop {
            while limiter.check_at(buckets, now).is_allowed() {
                admitted += 1;
            }
            if now == duration {
                return admitted;
            }
            now = (now + step).min(duration);
        }
    }

    #[test]
    fn admits_burst_plus_refill_exactly() {
        // (per_minute, burst, T in ms)
        let cases: [(u32, u32, u64); 10] = [
            (60, 10, 30_000),
            (60, 60, 90_500),
            (7, 3, 100_000),
            (600, 1, 5_000),
            (100_000, 50, 7_000),
            (1, 1, 3_600_000),
            (3, 5, 59_999),
            (59, 2, 61_000),
            (6_000_000, 1_000, 1_234),
            (1_000, 200, 12_345),
        ];
        for (per_minute, burst, t_ms) in cases {
            let limiter = LocalLimiter::new();
            let buckets = [spec("client", None, per_minute, burst)];
            // Steps small enough that the bucket never fills up between two attempts.
            let step = (60 * SEC / u64::from(per_minute)).clamp(1, 10_000_000);
            let admitted = hammer(&limiter, &buckets, t_ms * 1_000_000, step);
            let expected = u64::from(burst) + t_ms * u64::from(per_minute) / 60_000;
            assert_eq!(
                admitted, expected,
                "rpm {per_minute}, burst {burst}, T {t_ms} ms"
            );
        }
    }

    #[test]
    fn tightest_of_two_buckets_bounds_the_count() {
        let limiter = LocalLimiter::new();
        let buckets = [spec("c", None, 120, 5), spec("c", Some("route"), 60, 10)];
        // Route bucket: 10 + 30 = 40; client bucket: 5 + 60 = 65, so the route bucket decides.
        assert_eq!(hammer(&limiter, &buckets, 30 * SEC, SEC / 10), 40);
    }

    #[test]
    fn refused_request_consumes_from_no_bucket() {
        let limiter = LocalLimiter::new();
        let key = spec("c", None, 60, 5);
        let route = spec("c", Some("r"), 60, 2);
        assert!(limiter.check_at(&[key, route], 0).is_allowed());
        assert!(limiter.check_at(&[key, route], 0).is_allowed());
        for _ in 0..10 {
            assert!(!limiter.check_at(&[key, route], 0).is_allowed());
        }
        // The key bucket lost only the two admitted requests.
        assert_eq!(hammer(&limiter, &[key], 0, 1), 3);
        // And the other way round: the key bucket is now empty, the route bucket must stay as is.
        let other_route = spec("c", Some("r2"), 60, 4);
        assert!(!limiter.check_at(&[key, other_route], 0).is_allowed());
        assert_eq!(hammer(&limiter, &[other_route], 0, 1), 4);
    }

    #[test]
    fn reports_remaining_reset_and_retry_after() {
        let limiter = LocalLimiter::new();
        let b = [spec("c", None, 60, 2)];
        assert_eq!(
            limiter.check_at(&b, 0),
            Decision::Allowed(RateInfo {
                limit: 2,
                remaining: 1,
                reset_secs: 1
            })
        );
        assert_eq!(
            limiter.check_at(&b, 0),
            Decision::Allowed(RateInfo {
                limit: 2,
                remaining: 0,
                reset_secs: 2
            })
        );
        assert_eq!(
            limiter.check_at(&b, SEC / 4),
            Decision::Limited {
                info: RateInfo {
                    limit: 2,
                    remaining: 0,
                    reset_secs: 2
                },
                retry_after_secs: 1
            }
        );
        let slow = [spec("slow", None, 1, 1)];
        assert!(limiter.check_at(&slow, 0).is_allowed());
        assert_eq!(
            limiter.check_at(&slow, SEC),
            Decision::Limited {
                info: RateInfo {
                    limit: 1,
                    remaining: 0,
                    reset_secs: 59
                },
                retry_after_secs: 59
            }
        );
        // Of two refusing buckets, the one that needs longest answers.
        let both = [spec("slow", None, 1, 1), b[0]];
        let Decision::Limited {
            retry_after_secs,
            info,
        } = limiter.check_at(&both, SEC)
        else {
            panic!("expected a refusal");
        };
        assert_eq!((retry_after_secs, info.limit), (59, 1));
    }

    #[test]
    fn limit_changes_keep_the_bucket_state() {
        let limiter = LocalLimiter::new();
        for _ in 0..5 {
            assert!(limiter.check_at(&[spec("c", None, 60, 10)], 0).is_allowed());
        }
        // A larger burst does not refill the bucket: 5 tokens are left, not 20.
        assert_eq!(hammer(&limiter, &[spec("c", None, 60, 20)], 0, 1), 5);
        // A new rate applies from now on: 10 s at 120/min = 20 tokens.
        assert_eq!(
            hammer(&limiter, &[spec("c", None, 120, 20)], 10 * SEC, 10 * SEC),
            20
        );
        // A smaller burst caps what has accumulated since.
        assert_eq!(
            hammer(&limiter, &[spec("c", None, 120, 3)], 100 * SEC, 100 * SEC),
            3
        );
    }

    #[test]
    fn time_going_backwards_neither_refills_nor_panics() {
        let limiter = LocalLimiter::new();
        let b = [spec("c", None, 60, 1)];
        assert!(limiter.check_at(&b, 10 * SEC).is_allowed());
        assert!(!limiter.check_at(&b, 5 * SEC).is_allowed());
        assert!(!limiter.check_at(&b, 10 * SEC + SEC / 2).is_allowed());
        assert!(limiter.check_at(&b, 11 * SEC).is_allowed());
    }

    #[test]
    fn zero_limits_are_treated_as_one() {
        let limiter = LocalLimiter::new();
        let b = [spec("c", None, 0, 0)];
        assert!(limiter.check_at(&b, 0).is_allowed());
        assert!(!limiter.check_at(&b, 0).is_allowed());
        assert!(limiter.check_at(&b, 60 * SEC).is_allowed());
    }

    #[test]
    fn huge_limits_do_not_overflow() {
        let limiter = LocalLimiter::new();
        let b = [spec("c", None, u32::MAX, u32::MAX)];
        assert_eq!(
            limiter.check_at(&b, u64::MAX),
            Decision::Allowed(RateInfo {
                limit: u64::from(u32::MAX),
                remaining: u64::from(u32::MAX) - 1,
                reset_secs: 1
            })
        );
    }

    #[test]
    fn sweep_evicts_only_full_buckets() {
        let limiter = LocalLimiter::new();
        let names: Vec<String> = (0..100).map(|i| format!("client-{i}")).collect();
        for (i, name) in names.iter().enumerate() {
            // Even clients refill one token per second, odd ones one per minute.
            let per_minute = if i % 2 == 0 { 60 } else { 1 };
            assert!(limiter
                .check_at(&[spec(name, Some("r"), per_minute, 3)], 0)
                .is_allowed());
        }
        assert_eq!(limiter.len(), 100);
        assert_eq!(limiter.sweep(0), 0);
        assert_eq!(limiter.sweep(SEC), 50);
        assert_eq!(limiter.len(), 50);
        assert_eq!(limiter.sweep(60 * SEC), 50);
        assert!(limiter.is_empty());
        // An evicted bucket comes back full, exactly as if it had been kept.
        assert_eq!(
            hammer(&limiter, &[spec(&names[1], Some("r"), 1, 3)], 0, 1),
            3
        );
    }

    #[test]
    fn refused_first_sight_stores_nothing() {
        let limiter = LocalLimiter::new();
        let key = spec("c", None, 60, 1);
        assert!(limiter.check_at(&[key], 0).is_allowed());
        assert!(!limiter
            .check_at(&[key, spec("c", Some("new"), 60, 5)], 0)
            .is_allowed());
        assert_eq!(limiter.len(), 1);
    }

    #[test]
    fn many_buckets_use_the_heap_path_atomically() {
        let limiter = LocalLimiter::new();
        let routes: Vec<String> = (0..9).map(|i| format!("r{i}")).collect();
        let mut buckets: Vec<BucketSpec<'_>> = routes
            .iter()
            .map(|r| spec("c", Some(r.as_str()), 60, 10))
            .collect();
        buckets.push(spec("c", None, 60, 3));
        assert_eq!(hammer(&limiter, &buckets, 0, 1), 3);
        // Every route bucket lost exactly 3.
        for r in &routes {
            assert_eq!(
                hammer(&limiter, &[spec("c", Some(r.as_str()), 60, 10)], 0, 1),
                7
            );
        }
        // Three buckets (inline path), then more than fit inline.
        let three = [
            spec("x", None, 60, 2),
            spec("x", Some("a"), 60, 2),
            spec("x", Some("b"), 60, 1),
        ];
        assert_eq!(hammer(&limiter, &three, 0, 1), 1);
        assert_eq!(hammer(&limiter, &three[..2], 0, 1), 1);
    }

    #[test]
    fn concurrent_checks_admit_exactly_the_burst() {
        let limiter = LocalLimiter::new();
        let admitted = std::sync::atomic::AtomicU64::new(0);
        std::thread::scope(|scope| {
            for t in 0..4 {
                let limiter = &limiter;
                let admitted = &admitted;
                scope.spawn(move || {
                    let route = format!("route-{}", t % 2);
                    for _ in 0..5_000 {
                        let b = [
                            spec("shared", None, 60, 1_000),
                            spec("shared", Some(&route), 60, 100_000),
                        ];
                        if limiter.check_at(&b, 0).is_allowed() {
                            admitted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(admitted.into_inner(), 1_000);
    }

    #[test]
    fn borrowed_and_owned_names_hash_alike() {
        let map = ShardedMap::<u8>::new();
        let key = BucketKey::new("c", Some("r"));
        assert_eq!(
            (BucketName::client(&key), BucketName::route(&key)),
            ("c", Some("r"))
        );
        map.transact(std::slice::from_ref(&key), |_| 7, |s| ((), s.len() == 1));
        assert_eq!(
            map.get(&NameRef {
                client: "c",
                route: Some("r")
            }),
            Some(7)
        );
        assert_eq!(
            map.get(&NameRef {
                client: "c",
                route: None
            }),
            None
        );
        assert_eq!(
            map.get(&NameRef {
                client: "cr",
                route: None
            }),
            None
        );
        assert_eq!(
            map.get(&NameRef {
                client: "",
                route: Some("cr")
            }),
            None
        );
        assert_eq!(map.get(&key), Some(7));
        let plain = BucketKey::new("cr", None);
        assert_eq!(
            (BucketName::client(&plain), BucketName::route(&plain)),
            ("cr", None)
        );
        assert_ne!(plain, BucketKey::new("c", Some("r")));
        // Many keys spread over all shards and each still finds its own state.
        let names: Vec<String> = (0..5_000).map(|i| format!("client-{i}")).collect();
        let state_of = |i: usize| u8::try_from(i % 200).ok();
        for (i, name) in names.iter().enumerate() {
            let state = state_of(i).unwrap_or_default();
            map.transact(
                &[NameRef {
                    client: name,
                    route: Some("r"),
                }],
                |_| state,
                |_| ((), true),
            );
        }
        for (i, name) in names.iter().enumerate() {
            assert_eq!(
                map.get(&NameRef {
                    client: name,
                    route: Some("r")
                }),
                state_of(i)
            );
        }
        let used = map
            .shards
            .iter()
            .filter(|shard| !lock(&shard.0).is_empty())
            .count();
        assert_eq!(used, SHARDS);
        // Long ids live on the heap and compare the same way.
        let long = "x".repeat(40);
        for (client, route) in [
            (long.as_str(), Some("r")),
            ("c", Some(long.as_str())),
            (long.as_str(), None),
        ] {
            let key = BucketKey::new(client, route);
            assert!(matches!(key, BucketKey::Heap { .. }));
            assert_eq!(
                (BucketName::client(&key), BucketName::route(&key)),
                (client, route)
            );
            map.transact(&[NameRef { client, route }], |_| 9, |_| ((), true));
            assert_eq!(map.get(&key), Some(9));
        }
        let edge = "y".repeat(INLINE_IDS);
        let key = BucketKey::new(&edge, Some(""));
        assert!(matches!(key, BucketKey::Inline { .. }));
        assert_eq!(
            (BucketName::client(&key), BucketName::route(&key)),
            (edge.as_str(), Some(""))
        );
        assert_ne!(key, BucketKey::new(&edge, None));
    }

    #[test]
    fn a_map_entry_is_one_cache_line() {
        assert_eq!(std::mem::size_of::<BucketKey>(), 32);
        assert_eq!(std::mem::size_of::<(BucketKey, BucketState)>(), 64);
    }
}
