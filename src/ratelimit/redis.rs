//! Limits shared by all replicas through Redis: one atomic Lua script per check, on Redis time.
//! Must not depend on config snapshots or HTTP types, nor fall back itself (`RateLimiter` does).
//!
//! The formula is the local one (see `local`): a token is `60 × 10⁶` units and a bucket gains
//! `per_minute` units per microsecond of Redis `TIME`, so replicas with skewed clocks agree. Keys
//! hold only ids: `tollgate:rl:req:{<client>}` / `tollgate:rl:req:{<client>}|<route>` for request
//! buckets and `tollgate:rl:tok:…` for token budgets (the `{client}` hash tag keeps one client's
//! keys in one Redis Cluster slot; `{`, `}`, `|` and `%` in client ids are percent-encoded). Each
//! write sets `PEXPIRE` to when the bucket is full again (plus a second), so idle keys vanish.
//!
//! Failure handling: every call has a short timeout (default 50 ms). A failed or slow call marks
//! Redis down for `retry_interval` (default 1 s): meanwhile calls fail at once (the caller answers
//! from local limits) and then a single call probes again. The connection is a redis
//! `ConnectionManager`, which reconnects after a broken connection; if Redis is unreachable at
//! start, a background task keeps trying to connect.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{Client, FromRedisValue, RedisError, Script, ScriptInvocation};

use super::tokens::effective_cost;
use super::{BucketSpec, Decision, RateInfo, TokenBudgetSpec, TokenDecision};

/// Default prefix of every key this module writes.
pub const DEFAULT_KEY_PREFIX: &str = "tollgate:rl:";
/// A healthy Redis next to the gateway answers in well under a millisecond; one that needs 50 ms
/// is not healthy, and no request should wait longer than that for its limit decision.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_millis(50);
/// While Redis is down, one call per second probes it; all others answer locally at once.
pub const DEFAULT_RETRY_INTERVAL: Duration = Duration::from_secs(1);
/// Connecting (TCP, TLS, AUTH, SELECT) may take longer than a call, but not long.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// At most one warning about falling back per this interval (with the count since the last one).
const WARN_EVERY: Duration = Duration::from_secs(10);

const REQUESTS: &str = "req";
const TOKENS: &str = "tok";

/// Shared by the scripts: Redis server time in microseconds, and bucket refill. A bucket is a hash
/// `{l = units available at t, t = microseconds}`; a missing bucket is full. Numbers are written
/// with `%.17g` because Lua's default formatting keeps only 14 digits.
const LUA_PRELUDE: &str = r#"
if redis.replicate_commands then pcall(redis.replicate_commands) end
local UNIT = 60000000
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local function load(key, per_minute, cap)
  local state = redis.call('HMGET', key, 'l', 't')
  local level, last = tonumber(state[1]), tonumber(state[2])
  if level == nil or last == nil then return cap, now end
  if now > last then
    level = level + (now - last) * per_minute
    last = now
  end
  if level > cap then level = cap end
  return level, last
end
local function store(key, level, last, per_minute, cap)
  redis.call('HSET', key, 'l', string.format('%.17g', level), 't', string.format('%.17g', last))
  local full_in_ms = math.ceil((cap - level) / per_minute / 1000)
  redis.call('PEXPIRE', key, string.format('%.0f', full_in_ms + 1000))
end
"#;

/// Request buckets, all or nothing. `ARGV[2i-1]`, `ARGV[2i]`: per minute and burst of `KEYS[i]`.
/// Returns `{admitted, limit, remaining, reset_us, retry_us}` of the deciding bucket.
const CHECK_BODY: &str = r#"
local levels, lasts = {}, {}
local refused, r_limit, r_remaining, r_reset, r_retry = false, 0, 0, 0, -1
for i = 1, #KEYS do
  local per_minute = tonumber(ARGV[2 * i - 1])
  local cap = tonumber(ARGV[2 * i]) * UNIT
  local level, last = load(KEYS[i], per_minute, cap)
  levels[i], lasts[i] = level, last
  if level < UNIT then
    refused = true
    local retry = math.ceil((UNIT - level) / per_minute)
    if retry > r_retry then
      r_limit, r_remaining = cap / UNIT, math.floor(level / UNIT)
      r_reset, r_retry = math.ceil((cap - level) / per_minute), retry
    end
  end
end
if refused then return {0, r_limit, r_remaining, r_reset, r_retry} end
local b_limit, b_remaining, b_reset = 0, -1, 0
for i = 1, #KEYS do
  local per_minute = tonumber(ARGV[2 * i - 1])
  local cap = tonumber(ARGV[2 * i]) * UNIT
  local level = levels[i] - UNIT
  store(KEYS[i], level, lasts[i], per_minute, cap)
  local remaining, reset = math.floor(level / UNIT), math.ceil((cap - level) / per_minute)
  if b_remaining < 0 or remaining < b_remaining
      or (remaining == b_remaining and reset > b_reset) then
    b_limit, b_remaining, b_reset = cap / UNIT, remaining, reset
  end
end
return {1, b_limit, b_remaining, b_reset, 0}
"#;

/// Token budgets, all or nothing. `ARGV[1]`: tokens to reserve; `ARGV[i+1]`: per minute of
/// `KEYS[i]`. Levels may be negative (overcharged). Same reply as the check.
const RESERVE_BODY: &str = r#"
local cost = tonumber(ARGV[1]) * UNIT
local levels, lasts = {}, {}
local refused, r_limit, r_remaining, r_reset, r_retry = false, 0, 0, 0, -1
for i = 1, #KEYS do
  local per_minute = tonumber(ARGV[i + 1])
  local cap = per_minute * UNIT
  local level, last = load(KEYS[i], per_minute, cap)
  levels[i], lasts[i] = level, last
  if level < cost then
    refused = true
    local retry = math.ceil((cost - level) / per_minute)
    if retry > r_retry then
      r_limit, r_remaining = per_minute, math.max(0, math.floor(level / UNIT))
      r_reset, r_retry = math.ceil((cap - level) / per_minute), retry
    end
  end
end
if refused then return {0, r_limit, r_remaining, r_reset, r_retry} end
local b_limit, b_remaining, b_reset = 0, -1, 0
for i = 1, #KEYS do
  local per_minute = tonumber(ARGV[i + 1])
  local cap = per_minute * UNIT
  local level = levels[i] - cost
  store(KEYS[i], level, lasts[i], per_minute, cap)
  local remaining = math.max(0, math.floor(level / UNIT))
  local reset = math.ceil((cap - level) / per_minute)
  if b_remaining < 0 or remaining < b_remaining
      or (remaining == b_remaining and reset > b_reset) then
    b_limit, b_remaining, b_reset = per_minute, remaining, reset
  end
end
return {1, b_limit, b_remaining, b_reset, 0}
"#;

/// Settles a reservation. `ARGV[1]`: tokens to charge on top of the reservation (negative:
/// refund); `ARGV[i+1]`: per minute of `KEYS[i]`. A refund never fills a budget beyond capacity.
const SETTLE_BODY: &str = r#"
local delta = tonumber(ARGV[1]) * UNIT
for i = 1, #KEYS do
  local per_minute = tonumber(ARGV[i + 1])
  local cap = per_minute * UNIT
  local level, last = load(KEYS[i], per_minute, cap)
  level = level - delta
  if level > cap then level = cap end
  store(KEYS[i], level, last, per_minute, cap)
end
return 1
"#;

/// Where and how to reach Redis.
#[derive(Clone)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]`, or `rediss://` for TLS.
    pub url: String,
    /// Longest wait for one script call before answering locally.
    pub call_timeout: Duration,
    /// Longest wait for a connection.
    pub connect_timeout: Duration,
    /// How long Redis is skipped after a failure before one call tries it again; also the pause
    /// between background connection attempts.
    pub retry_interval: Duration,
    /// Prefix of every key.
    pub key_prefix: String,
}

impl RedisConfig {
    /// The defaults for `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            call_timeout: DEFAULT_CALL_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            retry_interval: DEFAULT_RETRY_INTERVAL,
            key_prefix: DEFAULT_KEY_PREFIX.to_owned(),
        }
    }
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The URL may hold a password: it is never printed.
        f.debug_struct("RedisConfig")
            .field("url", &"<redacted>")
            .field("call_timeout", &self.call_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("retry_interval", &self.retry_interval)
            .field("key_prefix", &self.key_prefix)
            .finish()
    }
}

/// Why Redis could not answer a call (the caller then answers from local limits).
#[derive(Debug, thiserror::Error)]
pub enum RedisLimitError {
    /// The Redis URL cannot be used (bad syntax, unknown scheme, TLS not built in).
    #[error("invalid redis url: {0}")]
    InvalidUrl(#[source] RedisError),
    /// The first connection has not been made yet (it is retried in the background).
    #[error("redis is not connected yet")]
    NotConnected,
    /// A recent call failed; Redis is skipped until the retry interval has passed.
    #[error("redis is marked down after a recent failure")]
    Down,
    /// Redis did not answer within the call (or connect) timeout.
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    /// Redis answered with an error, or the connection failed.
    #[error("redis error: {0}")]
    Redis(#[from] RedisError),
    /// The script answered something this version does not understand.
    #[error("unexpected reply from the rate-limit script")]
    BadReply,
}

impl RedisLimitError {
    /// A bounded label for metrics and logs.
    pub fn metric_label(&self) -> &'static str {
        match self {
            RedisLimitError::InvalidUrl(_) => "invalid_url",
            RedisLimitError::NotConnected => "not_connected",
            RedisLimitError::Down => "down",
            RedisLimitError::Timeout(_) => "timeout",
            RedisLimitError::Redis(_) => "redis_error",
            RedisLimitError::BadReply => "bad_reply",
        }
    }
}

/// A handle on the shared limits; cheap to clone (all clones share one connection).
#[derive(Clone)]
pub struct RedisLimiter {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    manager: OnceLock<ConnectionManager>,
    config: RedisConfig,
    /// `host:port` for logs (never the URL: it may hold a password).
    addr: String,
    check: Script,
    reserve: Script,
    settle: Script,
    origin: Instant,
    /// Nanoseconds since `origin` until which Redis is skipped; 0 = healthy.
    down_until: AtomicU64,
    fallbacks: AtomicU64,
    /// Nanoseconds since `origin` before which no new fallback warning is logged.
    next_warning: AtomicU64,
    /// `fallbacks` when the last warning was logged.
    warned_fallbacks: AtomicU64,
    counter: OnceLock<prometheus::IntCounter>,
}

impl fmt::Debug for RedisLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisLimiter")
            .field("addr", &self.inner.addr)
            .field("connected", &self.inner.manager.get().is_some())
            .field("fallbacks", &self.fallbacks())
            .finish_non_exhaustive()
    }
}

fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

fn micros_to_secs_ceil(micros: u64) -> u64 {
    micros.div_ceil(1_000_000)
}

/// Appends `id` with the characters that would confuse the key layout percent-encoded.
fn push_escaped(key: &mut String, id: &str) {
    for c in id.chars() {
        match c {
            '{' => key.push_str("%7B"),
            '}' => key.push_str("%7D"),
            '|' => key.push_str("%7C"),
            '%' => key.push_str("%25"),
            c => key.push(c),
        }
    }
}

/// The Redis key of a bucket: `<prefix><kind>:{<client>}[|<route>]`.
fn bucket_key(prefix: &str, kind: &str, client: &str, route: Option<&str>) -> String {
    let mut key = String::with_capacity(
        prefix.len() + kind.len() + client.len() + route.map_or(0, str::len) + 8,
    );
    key.push_str(prefix);
    key.push_str(kind);
    key.push_str(":{");
    push_escaped(&mut key, client);
    key.push('}');
    if let Some(route) = route {
        key.push('|');
        key.push_str(route);
    }
    key
}

/// `{admitted, limit, remaining, reset_us, retry_us}` from a script.
fn parse_reply(reply: &[i64]) -> Result<(bool, RateInfo, u64), RedisLimitError> {
    let [admitted, limit, remaining, reset_us, retry_us] = reply else {
        return Err(RedisLimitError::BadReply);
    };
    let count = |v: &i64| u64::try_from(*v).unwrap_or(0);
    let info = RateInfo {
        limit: count(limit),
        remaining: count(remaining),
        reset_secs: micros_to_secs_ceil(count(reset_us)),
    };
    Ok((*admitted == 1, info, count(retry_us)))
}

impl RedisLimiter {
    /// Connects to Redis. Only an unusable URL is an error: when Redis cannot be reached within
    /// the connect timeout, this logs a warning, returns a limiter whose calls fail (so the caller
    /// answers locally) and keeps connecting in the background. Must run inside a tokio runtime.
    pub async fn connect(config: RedisConfig) -> Result<Self, RedisLimitError> {
        let client = Client::open(config.url.as_str()).map_err(RedisLimitError::InvalidUrl)?;
        let addr = client.get_connection_info().addr.to_string();
        let limiter = Self {
            inner: Arc::new(Inner {
                client,
                manager: OnceLock::new(),
                config,
                addr,
                check: Script::new(&format!("{LUA_PRELUDE}{CHECK_BODY}")),
                reserve: Script::new(&format!("{LUA_PRELUDE}{RESERVE_BODY}")),
                settle: Script::new(&format!("{LUA_PRELUDE}{SETTLE_BODY}")),
                origin: Instant::now(),
                down_until: AtomicU64::new(0),
                fallbacks: AtomicU64::new(0),
                next_warning: AtomicU64::new(0),
                warned_fallbacks: AtomicU64::new(0),
                counter: OnceLock::new(),
            }),
        };
        match limiter.try_connect().await {
            Ok(()) => {
                tracing::info!(redis = %limiter.inner.addr, "rate limits are shared through redis")
            }
            Err(err) => {
                tracing::warn!(
                    redis = %limiter.inner.addr,
                    error = %err,
                    "redis unreachable; answering from local limits, connecting in the background"
                );
                limiter.spawn_connector();
            }
        }
        Ok(limiter)
    }

    fn manager_config(&self) -> ConnectionManagerConfig {
        let config = &self.inner.config;
        // No retries inside the manager: a failed attempt surfaces at once, and the pace of new
        // attempts is ours (`retry_interval`), not an exponential backoff hidden in the client.
        ConnectionManagerConfig::new()
            .set_connection_timeout(config.connect_timeout)
            .set_response_timeout(config.call_timeout)
            .set_number_of_retries(0)
    }

    async fn try_connect(&self) -> Result<(), RedisLimitError> {
        let timeout = self.inner.config.connect_timeout;
        let manager = tokio::time::timeout(
            timeout,
            ConnectionManager::new_with_config(self.inner.client.clone(), self.manager_config()),
        )
        .await
        .map_err(|_| RedisLimitError::Timeout(timeout))??;
        // Only the first connection is kept; a racing second one is dropped.
        let _ = self.inner.manager.set(manager);
        Ok(())
    }

    fn spawn_connector(&self) {
        let weak = Arc::downgrade(&self.inner);
        let every = self.inner.config.retry_interval;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(inner) = weak.upgrade() else {
                    return;
                };
                let limiter = RedisLimiter { inner };
                match limiter.try_connect().await {
                    Ok(()) => {
                        let redis = &limiter.inner.addr;
                        tracing::info!(%redis, "connected to redis; rate limits are shared again");
                        return;
                    }
                    Err(err) => {
                        let redis = &limiter.inner.addr;
                        tracing::debug!(%redis, error = %err, "redis still unreachable");
                    }
                }
            }
        });
    }

    fn elapsed(&self) -> u64 {
        nanos(self.inner.origin.elapsed())
    }

    /// The connection, unless Redis is not connected or marked down. After the retry interval
    /// exactly one caller gets through to probe it.
    fn acquire(&self) -> Result<ConnectionManager, RedisLimitError> {
        let manager = self
            .inner
            .manager
            .get()
            .ok_or(RedisLimitError::NotConnected)?;
        let until = self.inner.down_until.load(Ordering::Acquire);
        if until != 0 {
            let now = self.elapsed();
            if now < until {
                return Err(RedisLimitError::Down);
            }
            let next = now
                .saturating_add(nanos(self.inner.config.retry_interval))
                .max(1);
            if self
                .inner
                .down_until
                .compare_exchange(until, next, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
            {
                return Err(RedisLimitError::Down);
            }
        }
        Ok(manager.clone())
    }

    async fn run<T: FromRedisValue>(
        &self,
        invocation: &ScriptInvocation<'_>,
        connection: &mut ConnectionManager,
    ) -> Result<T, RedisLimitError> {
        let timeout = self.inner.config.call_timeout;
        match tokio::time::timeout(timeout, invocation.invoke_async::<T>(connection)).await {
            Ok(Ok(value)) => {
                if self.inner.down_until.swap(0, Ordering::AcqRel) != 0 {
                    let redis = &self.inner.addr;
                    tracing::info!(%redis, "redis answers again; rate limits are shared again");
                }
                Ok(value)
            }
            Ok(Err(err)) => {
                self.mark_down();
                Err(err.into())
            }
            Err(_) => {
                self.mark_down();
                Err(RedisLimitError::Timeout(timeout))
            }
        }
    }

    fn mark_down(&self) {
        let until = self
            .elapsed()
            .saturating_add(nanos(self.inner.config.retry_interval))
            .max(1);
        self.inner.down_until.store(until, Ordering::Release);
    }

    fn key(&self, kind: &str, client: &str, route: Option<&str>) -> String {
        bucket_key(&self.inner.config.key_prefix, kind, client, route)
    }

    /// Checks one request against all `buckets` in one script call (see `local` for the rules).
    pub async fn check(&self, buckets: &[BucketSpec<'_>]) -> Result<Decision, RedisLimitError> {
        if buckets.is_empty() {
            return Ok(Decision::Allowed(RateInfo::UNLIMITED));
        }
        let mut connection = self.acquire()?;
        let mut invocation = self.inner.check.prepare_invoke();
        for bucket in buckets {
            invocation.key(self.key(REQUESTS, bucket.client, bucket.route));
        }
        for bucket in buckets {
            invocation
                .arg(bucket.per_minute.max(1))
                .arg(bucket.burst.max(1));
        }
        let reply: Vec<i64> = self.run(&invocation, &mut connection).await?;
        let (admitted, info, retry_us) = parse_reply(&reply)?;
        Ok(if admitted {
            Decision::Allowed(info)
        } else {
            Decision::Limited {
                info,
                retry_after_secs: micros_to_secs_ceil(retry_us).max(1),
            }
        })
    }

    /// Reserves `estimate` tokens (capped at the smallest budget) in all `budgets`, or none.
    pub async fn reserve(
        &self,
        budgets: &[TokenBudgetSpec<'_>],
        estimate: u64,
    ) -> Result<Result<SharedReservation, TokenDecision>, RedisLimitError> {
        let reserved = effective_cost(budgets, estimate);
        let keys: Box<[String]> = budgets
            .iter()
            .map(|b| self.key(TOKENS, b.client, b.route))
            .collect();
        let per_minute: Box<[u64]> = budgets.iter().map(|b| b.per_minute.max(1)).collect();
        if keys.is_empty() {
            return Ok(Ok(SharedReservation {
                limiter: self.clone(),
                keys,
                per_minute,
                reserved,
                info: RateInfo::UNLIMITED,
            }));
        }
        let mut connection = self.acquire()?;
        let mut invocation = self.inner.reserve.prepare_invoke();
        for key in keys.iter() {
            invocation.key(key.as_str());
        }
        invocation.arg(reserved);
        for per_minute in per_minute.iter() {
            invocation.arg(*per_minute);
        }
        let reply: Vec<i64> = self.run(&invocation, &mut connection).await?;
        let (admitted, info, retry_us) = parse_reply(&reply)?;
        if !admitted {
            return Ok(Err(TokenDecision::Limited {
                info,
                retry_after_secs: micros_to_secs_ceil(retry_us).max(1),
            }));
        }
        Ok(Ok(SharedReservation {
            limiter: self.clone(),
            keys,
            per_minute,
            reserved,
            info,
        }))
    }

    /// Counts one decision answered locally instead of by Redis, and warns at most once per
    /// 10 seconds (with how many fell back since the previous warning).
    pub(crate) fn note_fallback(&self, err: &RedisLimitError) {
        let total = self.inner.fallbacks.fetch_add(1, Ordering::Relaxed) + 1;
        if let Some(counter) = self.inner.counter.get() {
            counter.inc();
        }
        let now = self.elapsed();
        let next = self.inner.next_warning.load(Ordering::Relaxed);
        if now >= next
            && self
                .inner
                .next_warning
                .compare_exchange(
                    next,
                    now.saturating_add(nanos(WARN_EVERY)),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            let previous = self.inner.warned_fallbacks.swap(total, Ordering::Relaxed);
            tracing::warn!(
                redis = %self.inner.addr,
                reason = err.metric_label(),
                error = %err,
                fallbacks = total.saturating_sub(previous),
                "redis cannot answer; rate limits come from this replica's local state"
            );
        }
    }

    /// Decisions answered locally because Redis could not answer.
    pub fn fallbacks(&self) -> u64 {
        self.inner.fallbacks.load(Ordering::Relaxed)
    }

    /// Also counts fallbacks in `counter` (for example `tollgate_ratelimit_redis_fallbacks_total`).
    /// Returns false when a counter was already set.
    pub fn set_fallback_counter(&self, counter: prometheus::IntCounter) -> bool {
        self.inner.counter.set(counter).is_ok()
    }

    /// True when connected and not marked down.
    pub fn is_available(&self) -> bool {
        self.inner.manager.get().is_some() && self.inner.down_until.load(Ordering::Acquire) == 0
    }
}

/// Tokens reserved in Redis. Dropping it keeps the reservation charged.
#[must_use = "settle the reservation with the reported usage, or drop it to charge it in full"]
pub struct SharedReservation {
    limiter: RedisLimiter,
    keys: Box<[String]>,
    per_minute: Box<[u64]>,
    reserved: u64,
    info: RateInfo,
}

impl fmt::Debug for SharedReservation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedReservation")
            .field("keys", &self.keys)
            .field("reserved", &self.reserved)
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl SharedReservation {
    /// Tokens taken from each budget.
    pub fn reserved(&self) -> u64 {
        self.reserved
    }

    /// `RateLimit-*` values (tokens) of the tightest budget right after reserving.
    pub fn info(&self) -> RateInfo {
        self.info
    }

    /// Replaces the reservation by `actual` tokens in Redis (one script call). When Redis cannot
    /// be reached the adjustment is lost: the reservation stays charged as it was.
    pub async fn settle(self, actual: u64) -> Result<(), RedisLimitError> {
        let delta = i128::from(actual) - i128::from(self.reserved);
        if delta == 0 || self.keys.is_empty() {
            return Ok(());
        }
        let delta = i64::try_from(delta).unwrap_or(if delta < 0 { i64::MIN } else { i64::MAX });
        let mut connection = self.limiter.acquire()?;
        let mut invocation = self.limiter.inner.settle.prepare_invoke();
        for key in self.keys.iter() {
            invocation.key(key.as_str());
        }
        invocation.arg(delta);
        for per_minute in self.per_minute.iter() {
            invocation.arg(*per_minute);
        }
        let _: i64 = self.limiter.run(&invocation, &mut connection).await?;
        Ok(())
    }

    /// [`SharedReservation::settle`] as a background task (it is called at the end of a stream,
    /// which must not wait for Redis).
    pub fn settle_in_background(self, actual: u64) {
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    if let Err(err) = self.settle(actual).await {
                        tracing::debug!(
                            error = %err,
                            "token usage not settled in redis; the reservation stays charged"
                        );
                    }
                });
            }
            Err(_) => {
                tracing::warn!(
                    "no tokio runtime to settle token usage in redis; the reservation stays charged"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ratelimit::{Clock, RateLimiter};
    use crate::test_support::redis::RedisServer;

    async fn direct(server: &RedisServer) -> ::redis::aio::MultiplexedConnection {
        Client::open(server.url())
            .expect("client")
            .get_multiplexed_async_connection()
            .await
            .expect("direct connection")
    }

    async fn server_micros(connection: &mut ::redis::aio::MultiplexedConnection) -> u64 {
        let (secs, micros): (u64, u64) = ::redis::cmd("TIME")
            .query_async(connection)
            .await
            .expect("TIME");
        secs * 1_000_000 + micros
    }

    fn patient(url: String) -> RedisConfig {
        // Accuracy tests must not fall back because a shared 2-core machine paused for 50 ms.
        RedisConfig {
            call_timeout: Duration::from_secs(2),
            ..RedisConfig::new(url)
        }
    }

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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn three_replicas_share_one_limit() {
        // A2: three replicas (separate connections) hammering one client's bucket admit
        // burst + T × rpm / 60 in total, T measured on the Redis clock.
        let Some(server) = RedisServer::start_or_skip() else {
            return;
        };
        let mut replicas = Vec::new();
        for _ in 0..3 {
            replicas.push(
                RedisLimiter::connect(patient(server.url()))
                    .await
                    .expect("connect"),
            );
        }
        let mut time = direct(&server).await;
        const PER_MINUTE: u32 = 60_000;
        const BURST: u32 = 100;
        let start = server_micros(&mut time).await;
        let deadline = Instant::now() + Duration::from_millis(1_500);
        let tasks: Vec<_> = (0..6)
            .map(|i| {
                let replica = replicas[i % 3].clone();
                tokio::spawn(async move {
                    let (mut admitted, mut checks) = (0u64, 0u64);
                    while Instant::now() < deadline {
                        let buckets = [
                            spec("agent", None, PER_MINUTE, BURST),
                            spec("agent", Some("chat"), 600_000, 10_000),
                        ];
                        match replica.check(&buckets).await {
                            Ok(decision) => admitted += u64::from(decision.is_allowed()),
                            Err(err) => panic!("redis check failed: {err}"),
                        }
                        checks += 1;
                    }
                    (admitted, checks)
                })
            })
            .collect();
        let (mut admitted, mut checks) = (0, 0);
        for task in tasks {
            let (a, c) = task.await.expect("task");
            admitted += a;
            checks += c;
        }
        let elapsed = server_micros(&mut time).await - start;
        let expected = u64::from(BURST) + elapsed * u64::from(PER_MINUTE) / 60_000_000;
        eprintln!("A2: {checks} checks over {elapsed} µs, admitted {admitted}, limit {expected}");
        assert!(
            checks > 2 * expected,
            "not hammering hard enough: {checks} checks"
        );
        assert!(
            admitted <= expected + 1,
            "admitted {admitted} > limit {expected}"
        );
        assert!(
            admitted * 100 >= expected * 98,
            "admitted {admitted} < 98% of {expected}"
        );
        assert!(replicas.iter().all(|r| r.fallbacks() == 0));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn refused_check_takes_from_no_bucket_and_keys_expire() {
        let Some(server) = RedisServer::start_or_skip() else {
            return;
        };
        let redis = RedisLimiter::connect(patient(server.url()))
            .await
            .expect("connect");
        let key = spec("mobile-app", None, 1, 5);
        let route = spec("mobile-app", Some("agents/chat"), 1, 2);
        let mut decisions = Vec::new();
        for _ in 0..4 {
            decisions.push(redis.check(&[key, route]).await.expect("check"));
        }
        assert_eq!(
            decisions[..2],
            [
                Decision::Allowed(RateInfo {
                    limit: 2,
                    remaining: 1,
                    reset_secs: 60
                }),
                Decision::Allowed(RateInfo {
                    limit: 2,
                    remaining: 0,
                    reset_secs: 120
                }),
            ]
        );
        assert!(matches!(
            decisions[2],
            Decision::Limited {
                retry_after_secs: 60,
                info: RateInfo {
                    limit: 2,
                    remaining: 0,
                    ..
                }
            }
        ));
        // The key bucket lost only the two admitted requests.
        let mut admitted = 0;
        while redis.check(&[key]).await.expect("check").is_allowed() {
            admitted += 1;
        }
        assert_eq!(admitted, 3);
        // Keys name only ids, and expire when the bucket would be full again.
        let mut connection = direct(&server).await;
        let mut keys: Vec<String> = ::redis::cmd("KEYS")
            .arg("*")
            .query_async(&mut connection)
            .await
            .expect("KEYS");
        keys.sort();
        assert_eq!(
            keys,
            [
                "tollgate:rl:req:{mobile-app}",
                "tollgate:rl:req:{mobile-app}|agents/chat"
            ]
        );
        for (key, full_in_ms) in [(&keys[0], 300_000), (&keys[1], 120_000)] {
            let ttl: i64 = ::redis::cmd("PTTL")
                .arg(key)
                .query_async(&mut connection)
                .await
                .expect("PTTL");
            assert!(
                ttl > full_in_ms - 1_000 && ttl <= full_in_ms + 1_000,
                "{key}: ttl {ttl}"
            );
        }
        assert_eq!(redis.fallbacks(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn falls_back_to_local_limits_while_redis_is_down() {
        let Some(mut server) = RedisServer::start_or_skip() else {
            return;
        };
        let config = RedisConfig {
            retry_interval: Duration::from_millis(200),
            ..RedisConfig::new(server.url())
        };
        let limiter = RateLimiter::with_clock(
            Some(RedisLimiter::connect(config).await.expect("connect")),
            Clock::manual(),
        );
        let bucket = [spec("c", None, 60, 5)];
        assert!(limiter.check_requests(&bucket).await.is_allowed());
        assert_eq!(limiter.redis_fallbacks(), 0);

        server.kill();
        let started = Instant::now();
        let (mut admitted, mut slowest) = (0, Duration::ZERO);
        for _ in 0..200 {
            let call = Instant::now();
            admitted += u32::from(limiter.check_requests(&bucket).await.is_allowed());
            slowest = slowest.max(call.elapsed());
        }
        eprintln!(
            "while down: 200 checks in {:?}, slowest {slowest:?}",
            started.elapsed()
        );
        // The local bucket (its own state, full at first; the manual clock stands still) decides.
        assert_eq!(admitted, 5);
        assert_eq!(limiter.redis_fallbacks(), 200);
        assert!(
            slowest < Duration::from_millis(500),
            "a check stalled for {slowest:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(3));

        // Redis comes back: within a few retry intervals decisions are shared again.
        server.restart();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let before = limiter.redis_fallbacks();
            let decision = limiter.check_requests(&bucket).await;
            if limiter.redis_fallbacks() == before {
                // Answered by the fresh Redis: a new, full bucket there.
                assert_eq!(decision.info().remaining, 4);
                break;
            }
            assert!(Instant::now() < deadline, "redis never used again");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hung_redis_costs_one_short_timeout_per_retry_interval() {
        let Some(server) = RedisServer::start_or_skip() else {
            return;
        };
        let config = RedisConfig {
            retry_interval: Duration::from_millis(300),
            ..RedisConfig::new(server.url())
        };
        let limiter = RateLimiter::with_clock(
            Some(RedisLimiter::connect(config).await.expect("connect")),
            Clock::manual(),
        );
        let bucket = [spec("c", None, 60, 5)];
        assert!(limiter.check_requests(&bucket).await.is_allowed());

        server.signal("STOP");
        let started = Instant::now();
        let (mut slow, mut slowest) = (0u32, Duration::ZERO);
        for _ in 0..300 {
            let call = Instant::now();
            let _ = limiter.check_requests(&bucket).await;
            let took = call.elapsed();
            slow += u32::from(took > Duration::from_millis(20));
            slowest = slowest.max(took);
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let elapsed = started.elapsed();
        server.signal("CONT");
        eprintln!(
            "hung: 300 checks in {elapsed:?}, {slow} waited for the timeout, slowest {slowest:?}"
        );
        assert_eq!(limiter.redis_fallbacks(), 300);
        assert!(
            slowest < Duration::from_millis(300),
            "a check stalled for {slowest:?}"
        );
        // Only the probes (one per retry interval) wait for the 50 ms timeout.
        let probes = u32::try_from(elapsed.as_millis() / 300).unwrap_or(u32::MAX) + 1;
        assert!(
            slow <= probes + 1,
            "{slow} slow checks, expected at most {probes} probes"
        );

        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let before = limiter.redis_fallbacks();
            let _ = limiter.check_requests(&bucket).await;
            if limiter.redis_fallbacks() == before {
                break;
            }
            assert!(Instant::now() < deadline, "redis never used again");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn starts_without_redis_and_connects_later() {
        let Some(mut server) = RedisServer::start_or_skip() else {
            return;
        };
        server.kill();
        let config = RedisConfig {
            retry_interval: Duration::from_millis(100),
            connect_timeout: Duration::from_millis(200),
            ..RedisConfig::new(server.url())
        };
        let started = Instant::now();
        let redis = RedisLimiter::connect(config)
            .await
            .expect("an unreachable redis is not an error");
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(!redis.is_available());
        let counter = prometheus::IntCounter::new("fallbacks_total", "fallbacks").expect("counter");
        assert!(redis.set_fallback_counter(counter.clone()));
        let limiter = RateLimiter::with_clock(Some(redis.clone()), Clock::manual());
        assert!(limiter
            .check_requests(&[spec("c", None, 60, 1)])
            .await
            .is_allowed());
        assert_eq!((limiter.redis_fallbacks(), counter.get()), (1, 1));

        server.restart();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !redis.is_available() {
            assert!(Instant::now() < deadline, "never connected");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Redis has its own (full) bucket for this client.
        assert!(limiter
            .check_requests(&[spec("c", None, 60, 1)])
            .await
            .is_allowed());
        assert_eq!(limiter.redis_fallbacks(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn token_reservations_settle_through_redis() {
        let Some(server) = RedisServer::start_or_skip() else {
            return;
        };
        let redis = RedisLimiter::connect(patient(server.url()))
            .await
            .expect("connect");
        let limiter = RateLimiter::with_clock(Some(redis), Clock::manual());
        let budgets = [
            TokenBudgetSpec {
                client: "c",
                route: None,
                per_minute: 1_000,
            },
            TokenBudgetSpec {
                client: "c",
                route: Some("chat"),
                per_minute: 100_000,
            },
        ];
        let first = limiter.reserve_tokens(&budgets, 600).await.expect("fits");
        assert!(first.is_shared());
        assert_eq!(
            (first.reserved(), first.info().limit, first.info().remaining),
            (600, 1_000, 400)
        );
        let refused = limiter.reserve_tokens(&budgets, 600).await;
        let Err(TokenDecision::Limited {
            info,
            retry_after_secs,
        }) = refused
        else {
            panic!("expected a refusal: {refused:?}");
        };
        assert_eq!((info.limit, info.remaining), (1_000, 400));
        assert!(
            (11..=12).contains(&retry_after_secs),
            "retry after {retry_after_secs}"
        );

        // Only 100 were used: 500 come back, and the next reservation fits.
        first.settle_async(100).await.expect("settle");
        let second = limiter
            .reserve_tokens(&budgets, 600)
            .await
            .expect("fits after the refund");
        assert!(
            (299..=300).contains(&second.info().remaining),
            "{:?}",
            second.info()
        );
        // Twice the reservation was used: the budget goes into debt and refuses even 0 tokens.
        second.settle_async(1_200).await.expect("settle");
        assert!(limiter.reserve_tokens(&budgets, 0).await.is_err());
        // The background settle (what streams use) lands too; a slow budget (1 token/s) makes it
        // visible in the stored level.
        let mut connection = direct(&server).await;
        let slow = [TokenBudgetSpec {
            client: "bg",
            route: None,
            per_minute: 60,
        }];
        let reservation = limiter.reserve_tokens(&slow, 10).await.expect("fits");
        reservation.settle(40);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let level: String = ::redis::cmd("HGET")
                .arg("tollgate:rl:tok:{bg}")
                .arg("l")
                .query_async(&mut connection)
                .await
                .expect("HGET");
            let tokens = level.parse::<f64>().expect("a number") / 60_000_000.0;
            if tokens < 30.0 {
                assert!(tokens >= 20.0, "{tokens}");
                break;
            }
            assert!(Instant::now() < deadline, "background settle never applied");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let ttl: i64 = ::redis::cmd("PTTL")
            .arg("tollgate:rl:tok:{c}")
            .query_async(&mut connection)
            .await
            .expect("PTTL");
        assert!(ttl > 0);
        assert_eq!(limiter.redis_fallbacks(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_reservations_through_redis_never_overrun() {
        // A3 across replicas: 50 concurrent reservations of 100 tokens against a 1000-token budget.
        let Some(server) = RedisServer::start_or_skip() else {
            return;
        };
        let mut replicas = Vec::new();
        for _ in 0..3 {
            replicas.push(
                RedisLimiter::connect(patient(server.url()))
                    .await
                    .expect("connect"),
            );
        }
        let started = Instant::now();
        let tasks: Vec<_> = (0..50)
            .map(|i| {
                let replica = replicas[i % 3].clone();
                tokio::spawn(async move {
                    let budgets = [TokenBudgetSpec {
                        client: "agent",
                        route: Some("chat"),
                        per_minute: 1_000,
                    }];
                    match replica.reserve(&budgets, 100).await.expect("redis answers") {
                        Ok(reservation) => {
                            reservation.settle(100).await.expect("settle");
                            true
                        }
                        Err(_) => false,
                    }
                })
            })
            .collect();
        let mut admitted = 0;
        for task in tasks {
            admitted += u32::from(task.await.expect("task"));
        }
        // 10 fit; another 100 tokens take 6 s to refill.
        if started.elapsed() < Duration::from_secs(5) {
            assert_eq!(admitted, 10);
        } else {
            assert!(admitted <= 11);
        }
    }

    #[tokio::test]
    async fn unusable_urls_are_refused_at_once() {
        for url in ["not a url", "http://127.0.0.1:6379"] {
            let result = RedisLimiter::connect(RedisConfig::new(url)).await;
            assert!(
                matches!(result, Err(RedisLimitError::InvalidUrl(_))),
                "{url}: {result:?}"
            );
        }
    }

    #[test]
    fn keys_hold_escaped_ids_only() {
        assert_eq!(
            bucket_key("tollgate:rl:", "req", "app", None),
            "tollgate:rl:req:{app}"
        );
        assert_eq!(
            bucket_key("tollgate:rl:", "tok", "a{b}|c%", Some("ns/route|x")),
            "tollgate:rl:tok:{a%7Bb%7D%7Cc%25}|ns/route|x"
        );
        // No collision between a client id with a separator and a client + route.
        assert_ne!(
            bucket_key("p:", "req", "a|b", None),
            bucket_key("p:", "req", "a", Some("b"))
        );
        let config = RedisConfig::new("redis://user:secret@host:6379/2");
        assert!(!format!("{config:?}").contains("secret"));
    }

    #[test]
    fn replies_are_validated() {
        assert!(matches!(
            parse_reply(&[1, 2]),
            Err(RedisLimitError::BadReply)
        ));
        let (admitted, info, retry) = parse_reply(&[0, 60, -3, 1_500_001, 2]).expect("reply");
        assert!(!admitted);
        assert_eq!(
            info,
            RateInfo {
                limit: 60,
                remaining: 0,
                reset_secs: 2
            }
        );
        assert_eq!(retry, 2);
    }
}
