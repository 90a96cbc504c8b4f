//! Rate limiting: request buckets, token budgets, usage accounting; local, or shared via Redis.
//! Must not depend on config snapshots, auth or the proxy: callers pass ids and numbers.
//!
//! State lives here, keyed by stable client/route ids, so a config swap resets no one.
//!
//! How the proxy uses it, per request (after authorisation):
//!
//! 1. `check_requests(&[key bucket, route bucket])` → `Decision`; on `Limited` answer 429
//!    `rate_limited` with `Retry-After` and the `RateLimit-*` values of the returned [`RateInfo`].
//! 2. For token-budgeted routes: `estimate_tokens(client, route, body)` then
//!    `reserve_tokens(&[key budget, route budget], estimate)`; `Err(TokenDecision::Limited)` is a
//!    429 `token_limited`. The [`TokenReservation`] rides inside the response body.
//! 3. Each response chunk goes (by reference, after forwarding) to a [`UsageObserver`]; at the end
//!    `finish()` gives the reported [`Usage`]: `reservation.settle(usage.total_tokens)` and
//!    `completion_stats().record(client, route, usage.completion_tokens)`. When no usage was
//!    reported, drop the reservation: the full reservation stays charged.

pub mod local;
pub mod redis;
pub mod tokens;
pub mod usage;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

pub use self::local::{BucketSpec, LocalLimiter};
pub use self::redis::{RedisConfig, RedisLimitError, RedisLimiter, SharedReservation};
pub use self::tokens::{
    estimate_prompt_tokens, estimate_request, requested_completion_tokens, CompletionStats,
    LocalReservation, LocalTokens, RequestEstimate, TokenBudgetSpec, TokenDecision,
};
pub use self::usage::{Usage, UsageObserver};

/// Monotonic time in nanoseconds since a [`Clock`]'s origin.
pub type Nanos = u64;

/// How often [`RateLimiter::spawn_sweeper`] is usually run: idle state is dropped within this
/// interval of becoming idle, and a sweep of 100,000 buckets costs about a millisecond of one core
/// (one shard locked at a time).
pub const DEFAULT_SWEEP_INTERVAL: Duration = Duration::from_secs(10);

/// The time source of the local limiters: the system's monotonic clock, or a manual clock that
/// tests move by hand so limits are checked exactly, without sleeping.
#[derive(Clone, Debug)]
pub struct Clock {
    kind: ClockKind,
}

#[derive(Clone, Debug)]
enum ClockKind {
    System(Instant),
    Manual(Arc<AtomicU64>),
}

impl Clock {
    /// The monotonic system clock; `now()` counts from this call.
    pub fn system() -> Self {
        Self {
            kind: ClockKind::System(Instant::now()),
        }
    }

    /// A clock that stands still at 0 until moved with [`Clock::advance`] or [`Clock::set`].
    /// Clones share the same time.
    pub fn manual() -> Self {
        Self {
            kind: ClockKind::Manual(Arc::new(AtomicU64::new(0))),
        }
    }

    /// The current time.
    #[inline]
    pub fn now(&self) -> Nanos {
        match &self.kind {
            ClockKind::System(origin) => {
                u64::try_from(origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
            }
            ClockKind::Manual(now) => now.load(Ordering::Acquire),
        }
    }

    /// Moves a manual clock forward; does nothing to the system clock.
    pub fn advance(&self, by: Duration) {
        if let ClockKind::Manual(now) = &self.kind {
            let by = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
            // fetch_update never fails with a closure that always returns Some.
            let _ = now.fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| {
                Some(t.saturating_add(by))
            });
        }
    }

    /// Sets a manual clock to `at`; does nothing to the system clock.
    pub fn set(&self, at: Nanos) {
        if let ClockKind::Manual(now) = &self.kind {
            now.store(at, Ordering::Release);
        }
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::system()
    }
}

/// What the `RateLimit-Limit`, `-Remaining` and `-Reset` headers say (IETF draft semantics).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateInfo {
    /// Capacity of the tightest bucket: `burst` for requests, `tokensPerMinute` for tokens.
    pub limit: u64,
    /// Whole requests (or tokens) left in the tightest bucket after this decision.
    pub remaining: u64,
    /// Seconds (rounded up) until that bucket is full again.
    pub reset_secs: u64,
}

impl RateInfo {
    /// No limit applies (no bucket was given); callers send no `RateLimit-*` headers.
    pub const UNLIMITED: RateInfo = RateInfo {
        limit: u64::MAX,
        remaining: u64::MAX,
        reset_secs: 0,
    };

    /// True for [`RateInfo::UNLIMITED`].
    pub fn is_unlimited(&self) -> bool {
        *self == Self::UNLIMITED
    }
}

/// The answer to a request-limit check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Admitted; one request was taken from every applicable bucket.
    Allowed(RateInfo),
    /// Refused; nothing was taken from any bucket.
    Limited {
        /// The bucket that refused (the one that needs longest to admit a request).
        info: RateInfo,
        /// Seconds until one request fits (rounded up, at least 1): the `Retry-After` value.
        retry_after_secs: u64,
    },
}

impl Decision {
    /// True when the request was admitted.
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allowed(_))
    }

    /// The `RateLimit-*` values of this decision.
    pub fn info(&self) -> &RateInfo {
        match self {
            Decision::Allowed(info) | Decision::Limited { info, .. } => info,
        }
    }
}

/// Request limits, token budgets and completion statistics of one gateway process: shared through
/// Redis when one is configured, local otherwise and whenever Redis cannot answer in time.
pub struct RateLimiter {
    local: LocalLimiter,
    tokens: LocalTokens,
    stats: CompletionStats,
    redis: Option<RedisLimiter>,
    clock: Clock,
}

impl RateLimiter {
    /// Limits on the system clock; shared through `redis` when given.
    pub fn new(redis: Option<RedisLimiter>) -> Self {
        Self::with_clock(redis, Clock::system())
    }

    /// Limits whose local state runs on `clock` (a manual clock in tests).
    pub fn with_clock(redis: Option<RedisLimiter>, clock: Clock) -> Self {
        Self {
            local: LocalLimiter::new(),
            tokens: LocalTokens::new(),
            stats: CompletionStats::new(clock.clone()),
            redis,
            clock,
        }
    }

    /// Checks a request against every bucket that applies (the key's, the route's) and takes one
    /// request from each only when all admit it. Answers from local limits when Redis is absent,
    /// down or slower than its call timeout (counted in [`RateLimiter::redis_fallbacks`]).
    pub async fn check_requests(&self, buckets: &[BucketSpec<'_>]) -> Decision {
        if let Some(redis) = &self.redis {
            // Boxed: the Redis round trip's future is large, and inline it would grow every
            // request's future even when Redis is not configured.
            match Box::pin(redis.check(buckets)).await {
                Ok(decision) => return decision,
                Err(err) => redis.note_fallback(&err),
            }
        }
        self.local.check_at(buckets, self.clock.now())
    }

    /// Reserves `estimate` tokens in every budget that applies (see [`tokens`] for the rules).
    /// A refusal reserves nothing anywhere. Falls back to local budgets like `check_requests`.
    pub async fn reserve_tokens(
        &self,
        budgets: &[TokenBudgetSpec<'_>],
        estimate: u64,
    ) -> Result<TokenReservation, TokenDecision> {
        if budgets.is_empty() {
            return Ok(TokenReservation::unlimited());
        }
        if let Some(redis) = &self.redis {
            match Box::pin(redis.reserve(budgets, estimate)).await {
                Ok(Ok(shared)) => {
                    return Ok(TokenReservation {
                        reserved: shared.reserved(),
                        info: shared.info(),
                        kind: ReservationKind::Shared(shared),
                    })
                }
                Ok(Err(limited)) => return Err(limited),
                Err(err) => redis.note_fallback(&err),
            }
        }
        let local = self
            .tokens
            .reserve_at(budgets, estimate, self.clock.now())?;
        Ok(TokenReservation {
            reserved: local.reserved(),
            info: local.info(),
            kind: ReservationKind::Local {
                reservation: local,
                clock: self.clock.clone(),
            },
        })
    }

    /// The tokens a request should reserve: its prompt estimate plus `max_tokens` /
    /// `max_completion_tokens` when the body names one, else this client's recent average
    /// completion size on this route (zero until one is known).
    pub fn estimate_tokens(&self, client: &str, route: Option<&str>, body: &[u8]) -> u64 {
        let estimate = estimate_request(body);
        let completion = estimate
            .completion_tokens
            .unwrap_or_else(|| self.stats.estimate(client, route));
        estimate.prompt_tokens.saturating_add(completion)
    }

    /// Recent completion sizes per client and route; record each reported usage here.
    pub fn completion_stats(&self) -> &CompletionStats {
        &self.stats
    }

    /// The local request limiter (the fallback when Redis is configured).
    pub fn local(&self) -> &LocalLimiter {
        &self.local
    }

    /// The clock of the local state.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// True when limits are shared through Redis (when it answers).
    pub fn is_shared(&self) -> bool {
        self.redis.is_some()
    }

    /// Decisions answered locally because Redis was configured but could not answer.
    pub fn redis_fallbacks(&self) -> u64 {
        self.redis.as_ref().map_or(0, RedisLimiter::fallbacks)
    }

    /// Drops idle local state: full buckets, full budgets, completion stats unused for an hour.
    /// Returns how many entries were dropped.
    pub fn sweep(&self) -> usize {
        let now = self.clock.now();
        self.local.sweep(now) + self.tokens.sweep(now) + self.stats.sweep(now)
    }

    /// Runs [`RateLimiter::sweep`] every `every` until the limiter is dropped.
    pub fn spawn_sweeper(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let weak: Weak<Self> = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks.tick().await;
            loop {
                ticks.tick().await;
                let Some(limiter) = weak.upgrade() else {
                    return;
                };
                let dropped = limiter.sweep();
                tracing::trace!(dropped, "rate-limit sweep");
            }
        })
    }
}

/// Tokens reserved for one request. It rides inside the response body; at the end call
/// [`TokenReservation::settle`] with the reported total. Dropped without settling, the whole
/// reservation stays charged (no usage reported means the estimate is what the request cost).
#[must_use = "settle the reservation with the reported usage, or drop it to charge it in full"]
#[derive(Debug)]
pub struct TokenReservation {
    kind: ReservationKind,
    reserved: u64,
    info: RateInfo,
}

#[derive(Debug)]
enum ReservationKind {
    Unlimited,
    Local {
        reservation: LocalReservation,
        clock: Clock,
    },
    Shared(SharedReservation),
}

impl TokenReservation {
    /// A reservation against no budget at all.
    pub fn unlimited() -> Self {
        Self {
            kind: ReservationKind::Unlimited,
            reserved: 0,
            info: RateInfo::UNLIMITED,
        }
    }

    /// Tokens taken from every applicable budget (the estimate, capped at the smallest budget).
    pub fn reserved(&self) -> u64 {
        self.reserved
    }

    /// The `RateLimit-*` values of the tightest token budget after this reservation.
    pub fn info(&self) -> RateInfo {
        self.info
    }

    /// True when the reservation is held in Redis.
    pub fn is_shared(&self) -> bool {
        matches!(self.kind, ReservationKind::Shared(_))
    }

    /// Replaces the reservation by the actual usage: refunds `reserved - actual` or charges the
    /// difference. Never blocks: a Redis adjustment runs as a background task.
    pub fn settle(self, actual_total_tokens: u64) {
        match self.kind {
            ReservationKind::Unlimited => {}
            ReservationKind::Local { reservation, clock } => {
                reservation.settle_at(actual_total_tokens, clock.now());
            }
            ReservationKind::Shared(shared) => shared.settle_in_background(actual_total_tokens),
        }
    }

    /// Like [`TokenReservation::settle`], but waits for Redis to apply the adjustment.
    pub async fn settle_async(self, actual_total_tokens: u64) -> Result<(), RedisLimitError> {
        match self.kind {
            ReservationKind::Unlimited => Ok(()),
            ReservationKind::Local { reservation, clock } => {
                reservation.settle_at(actual_total_tokens, clock.now());
                Ok(())
            }
            ReservationKind::Shared(shared) => shared.settle(actual_total_tokens).await,
        }
    }

    /// Gives the whole reservation back (the request never reached a backend).
    pub fn release(self) {
        self.settle(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket<'a>(client: &'a str, route: Option<&'a str>, rpm: u32, burst: u32) -> BucketSpec<'a> {
        BucketSpec {
            client,
            route,
            per_minute: rpm,
            burst,
        }
    }

    #[tokio::test]
    async fn checks_requests_locally_on_the_injected_clock() {
        let clock = Clock::manual();
        let limiter = RateLimiter::with_clock(None, clock.clone());
        let specs = [bucket("c", None, 60, 3), bucket("c", Some("r"), 120, 10)];
        for left in (0..3).rev() {
            let decision = limiter.check_requests(&specs).await;
            assert_eq!(
                decision,
                Decision::Allowed(RateInfo {
                    limit: 3,
                    remaining: left,
                    reset_secs: 3 - left
                })
            );
        }
        let refused = limiter.check_requests(&specs).await;
        assert_eq!(
            refused,
            Decision::Limited {
                info: RateInfo {
                    limit: 3,
                    remaining: 0,
                    reset_secs: 3
                },
                retry_after_secs: 1
            }
        );
        clock.advance(Duration::from_secs(1));
        assert!(limiter.check_requests(&specs).await.is_allowed());
        assert!(!limiter.check_requests(&specs).await.is_allowed());
        assert_eq!(limiter.redis_fallbacks(), 0);
        assert!(!limiter.is_shared());
    }

    #[tokio::test]
    async fn no_buckets_means_unlimited() {
        let limiter = RateLimiter::with_clock(None, Clock::manual());
        let decision = limiter.check_requests(&[]).await;
        assert!(decision.is_allowed());
        assert!(decision.info().is_unlimited());
        let reservation = limiter.reserve_tokens(&[], 1_000_000).await;
        assert!(matches!(reservation, Ok(ref r) if r.reserved() == 0 && r.info().is_unlimited()));
    }

    #[tokio::test]
    async fn token_reservation_settles_through_the_limiter() {
        let clock = Clock::manual();
        let limiter = RateLimiter::with_clock(None, clock.clone());
        let budgets = [TokenBudgetSpec {
            client: "c",
            route: Some("chat"),
            per_minute: 1_000,
        }];
        let body = br#"{"messages":[{"role":"user","content":"abcdefgh"}],"max_tokens":600}"#;
        let estimate = limiter.estimate_tokens("c", Some("chat"), body);
        assert_eq!(estimate, 2 + 4 + 600);
        let first = limiter.reserve_tokens(&budgets, estimate).await;
        let Ok(first) = first else {
            panic!("first reservation refused: {first:?}");
        };
        assert_eq!(first.info().remaining, 1_000 - 606);
        let second = limiter.reserve_tokens(&budgets, estimate).await;
        assert!(
            matches!(
                second,
                Err(TokenDecision::Limited {
                    retry_after_secs: 13,
                    ..
                })
            ),
            "{second:?}"
        );
        // The first request used only 100 tokens: 506 come back and the second one fits.
        first.settle(100);
        limiter.completion_stats().record("c", Some("chat"), 94);
        let second = limiter.reserve_tokens(&budgets, estimate).await;
        assert!(second.is_ok(), "{second:?}");
        // Without max_tokens the completion estimate is the recent average.
        let body = br#"{"messages":[{"role":"user","content":"abcdefgh"}]}"#;
        assert_eq!(limiter.estimate_tokens("c", Some("chat"), body), 2 + 4 + 94);
        assert_eq!(limiter.estimate_tokens("c", Some("other"), body), 2 + 4);
    }

    #[tokio::test]
    async fn sweep_drops_idle_state() {
        let clock = Clock::manual();
        let limiter = RateLimiter::with_clock(None, clock.clone());
        assert!(limiter
            .check_requests(&[bucket("c", None, 60, 5)])
            .await
            .is_allowed());
        let reservation = limiter
            .reserve_tokens(
                &[TokenBudgetSpec {
                    client: "c",
                    route: None,
                    per_minute: 600,
                }],
                60,
            )
            .await;
        assert!(reservation.is_ok());
        drop(reservation);
        assert_eq!(limiter.sweep(), 0);
        clock.advance(Duration::from_secs(6));
        assert_eq!(limiter.sweep(), 2);
        assert!(limiter.local().is_empty());
    }

    #[tokio::test]
    async fn sweeper_task_stops_with_the_limiter() {
        let limiter = Arc::new(RateLimiter::new(None));
        let task = limiter.spawn_sweeper(Duration::from_millis(5));
        drop(limiter);
        let ended = tokio::time::timeout(Duration::from_secs(2), task).await;
        assert!(matches!(ended, Ok(Ok(()))));
    }

    #[test]
    fn manual_clock_moves_only_by_hand() {
        let clock = Clock::manual();
        let other = clock.clone();
        assert_eq!(clock.now(), 0);
        other.advance(Duration::from_millis(1500));
        assert_eq!(clock.now(), 1_500_000_000);
        clock.set(7);
        assert_eq!(other.now(), 7);
        let system = Clock::system();
        system.advance(Duration::from_secs(100));
        assert!(system.now() < 50_000_000_000);
    }
}
