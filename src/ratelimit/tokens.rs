//! LLM token budgets with reservations, request-size estimates and recent completion sizes.
//! Must not depend on Redis, config snapshots or HTTP types: callers pass ids, numbers and bytes.
//!
//! # Budgets
//!
//! A budget (`tokensPerMinute` of a key or of a route) is a bucket of capacity `tpm` refilled
//! continuously at `tpm / 60` tokens per second (same exact arithmetic as request buckets: one
//! token is `60 × 10⁹` units, a budget gains `tpm` units per nanosecond). A request reserves its
//! estimate in every applicable budget at admission; reservations in flight count as spent, so
//! concurrent requests cannot overrun a budget. It is admitted only when the reservation fits the
//! remaining tokens of **every** budget; a refused request reserves nothing anywhere.
//!
//! * An estimate larger than a whole budget is capped at the smallest budget's capacity: such a
//!   request waits until that budget is full, instead of being refused for ever.
//! * Settling replaces the reservation by the actual usage: the difference is refunded (never
//!   above capacity) or charged extra, which may leave a budget in debt: further requests then
//!   wait until it has refilled.
//! * A reservation dropped without settling stays charged in full.

use std::fmt;
use std::sync::Arc;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use super::local::{
    div_ceil, div_floor, secs_ceil, tighter, BucketKey, BucketName, NameRef, ShardedMap, UNIT,
};
use super::{Clock, Nanos, RateInfo};

/// [`UNIT`] as a signed number (budgets can be in debt).
const UNIT_I: i128 = UNIT as i128;

/// One token budget to reserve from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenBudgetSpec<'a> {
    /// Client id (of the API key).
    pub client: &'a str,
    /// Route id for the route's per-client budget; `None` for the key's own budget.
    pub route: Option<&'a str>,
    /// Capacity and refill per minute (0 is treated as 1).
    pub per_minute: u64,
}

impl BucketName for TokenBudgetSpec<'_> {
    fn client(&self) -> &str {
        self.client
    }
    fn route(&self) -> Option<&str> {
        self.route
    }
}

/// A refused token reservation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenDecision {
    /// The estimate does not fit a budget; nothing was reserved anywhere.
    Limited {
        /// The budget that refused (the one that needs longest to fit the estimate), in tokens.
        info: RateInfo,
        /// Seconds until the estimate fits (rounded up, at least 1): the `Retry-After` value.
        retry_after_secs: u64,
    },
}

impl TokenDecision {
    /// The `RateLimit-*` values (in tokens) of the refusing budget.
    pub fn info(&self) -> &RateInfo {
        match self {
            TokenDecision::Limited { info, .. } => info,
        }
    }

    /// Seconds until the request would fit.
    pub fn retry_after_secs(&self) -> u64 {
        match self {
            TokenDecision::Limited {
                retry_after_secs, ..
            } => *retry_after_secs,
        }
    }
}

/// The reservation actually taken for `estimate` from `budgets`: capped at the smallest budget.
pub(crate) fn effective_cost(budgets: &[TokenBudgetSpec<'_>], estimate: u64) -> u64 {
    budgets
        .iter()
        .map(|b| b.per_minute.max(1))
        .min()
        .map_or(estimate, |smallest| estimate.min(smallest))
}

#[derive(Clone, Copy, Debug, Default)]
struct BudgetState {
    /// Units available at `last`; negative when overcharged.
    level: i128,
    last: Nanos,
    per_minute: u64,
}

impl BudgetState {
    fn full(per_minute: u64, now: Nanos) -> Self {
        let per_minute = per_minute.max(1);
        Self {
            level: i128::from(per_minute) * UNIT_I,
            last: now,
            per_minute,
        }
    }

    fn cap(&self) -> i128 {
        i128::from(self.per_minute.max(1)) * UNIT_I
    }

    /// Units missing until `target`, as an unsigned number (0 when already there).
    fn deficit(&self, target: i128) -> u128 {
        u128::try_from(target.saturating_sub(self.level)).unwrap_or(0)
    }

    fn refill(&mut self, per_minute: u64, now: Nanos) {
        self.per_minute = per_minute.max(1);
        let cap = self.cap();
        if now > self.last {
            let gained = u128::from(now - self.last) * u128::from(self.per_minute);
            // `gained` may exceed i128: compare before adding.
            self.level = if gained >= self.deficit(cap) {
                cap
            } else {
                self.level + i128::try_from(gained).unwrap_or(0)
            };
            self.last = now;
        }
        self.level = self.level.min(cap);
    }

    fn is_full_at(&self, now: Nanos) -> bool {
        let gained = u128::from(now.saturating_sub(self.last)) * u128::from(self.per_minute.max(1));
        gained >= self.deficit(self.cap())
    }

    fn nanos_until(&self, target: i128) -> u128 {
        div_ceil(self.deficit(target), u128::from(self.per_minute.max(1)))
    }

    fn info(&self) -> RateInfo {
        let available = u128::try_from(self.level).unwrap_or(0);
        RateInfo {
            limit: self.per_minute,
            remaining: u64::try_from(div_floor(available, UNIT)).unwrap_or(u64::MAX),
            reset_secs: secs_ceil(self.nanos_until(self.cap())),
        }
    }
}

/// Token budgets of this process.
#[derive(Clone)]
pub struct LocalTokens {
    budgets: Arc<ShardedMap<BudgetState>>,
}

impl Default for LocalTokens {
    fn default() -> Self {
        Self::new()
    }
}

impl LocalTokens {
    /// No budget used yet (every budget starts full).
    pub fn new() -> Self {
        Self {
            budgets: Arc::new(ShardedMap::new()),
        }
    }

    /// Reserves `estimate` tokens (capped at the smallest budget) in every one of `budgets` at
    /// time `now`, or none at all.
    pub fn reserve_at(
        &self,
        budgets: &[TokenBudgetSpec<'_>],
        estimate: u64,
        now: Nanos,
    ) -> Result<LocalReservation, TokenDecision> {
        let reserved = effective_cost(budgets, estimate);
        let cost = i128::from(reserved) * UNIT_I;
        let info = self.budgets.transact(
            budgets,
            |spec| BudgetState::full(spec.per_minute, now),
            |states| {
                let mut refused: Option<(RateInfo, u128)> = None;
                for (state, spec) in states.iter_mut().zip(budgets) {
                    state.refill(spec.per_minute, now);
                    if state.level < cost {
                        let wait = state.nanos_until(cost);
                        if refused.is_none_or(|(_, longest)| wait > longest) {
                            refused = Some((state.info(), wait));
                        }
                    }
                }
                if let Some((info, wait)) = refused {
                    let retry_after_secs = secs_ceil(wait).max(1);
                    return (
                        Err(TokenDecision::Limited {
                            info,
                            retry_after_secs,
                        }),
                        false,
                    );
                }
                let mut tightest = None;
                for state in states.iter_mut() {
                    state.level -= cost;
                    tightest = tighter(tightest, state.info());
                }
                (Ok(tightest.unwrap_or(RateInfo::UNLIMITED)), true)
            },
        )?;
        Ok(LocalReservation {
            budgets: Arc::clone(&self.budgets),
            held: budgets
                .iter()
                .map(|b| HeldBudget {
                    key: BucketKey::new(b.client, b.route),
                    per_minute: b.per_minute.max(1),
                })
                .collect(),
            reserved,
            info,
        })
    }

    /// Drops the budgets that are full at `now`; returns how many were dropped.
    pub fn sweep(&self, now: Nanos) -> usize {
        self.budgets.retain(|state| !state.is_full_at(now))
    }

    /// Number of budgets held.
    pub fn len(&self) -> usize {
        self.budgets.len()
    }

    /// True when no budget is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug)]
struct HeldBudget {
    key: BucketKey,
    per_minute: u64,
}

impl BucketName for HeldBudget {
    fn client(&self) -> &str {
        self.key.client()
    }
    fn route(&self) -> Option<&str> {
        self.key.route()
    }
}

/// Tokens reserved in local budgets. Dropping it keeps the reservation charged.
#[must_use = "settle the reservation with the reported usage, or drop it to charge it in full"]
pub struct LocalReservation {
    budgets: Arc<ShardedMap<BudgetState>>,
    held: Box<[HeldBudget]>,
    reserved: u64,
    info: RateInfo,
}

impl fmt::Debug for LocalReservation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalReservation")
            .field("held", &self.held)
            .field("reserved", &self.reserved)
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl LocalReservation {
    /// Tokens taken from each budget.
    pub fn reserved(&self) -> u64 {
        self.reserved
    }

    /// `RateLimit-*` values (tokens) of the tightest budget right after reserving.
    pub fn info(&self) -> RateInfo {
        self.info
    }

    /// Replaces the reservation by `actual` tokens: refunds the rest (up to each budget's
    /// capacity) or charges the excess. `now` matters only for a budget swept meanwhile.
    pub fn settle_at(self, actual: u64, now: Nanos) {
        let delta = i128::from(actual) - i128::from(self.reserved);
        if delta == 0 || self.held.is_empty() {
            return;
        }
        let adjust = delta.saturating_mul(UNIT_I);
        self.budgets.transact(
            &self.held,
            |held| BudgetState::full(held.per_minute, now),
            |states| {
                // Adding before or after refilling gives the same level (the cap applies either
                // way), so no refill is needed here.
                for state in states.iter_mut() {
                    state.level = state.level.saturating_sub(adjust).min(state.cap());
                }
                ((), true)
            },
        );
    }
}

/// Smoothing of the recent completion size: each new completion moves the average a quarter of
/// the way, so it follows a change within a few requests without jumping on one outlier.
const EWMA_WEIGHT: f64 = 0.25;
/// Completion statistics unused this long are forgotten by the sweep (bounded memory).
const STATS_IDLE: Nanos = 3_600 * 1_000_000_000;

#[derive(Clone, Copy, Debug, Default)]
struct Ewma {
    average: f64,
    samples: u64,
    last_seen: Nanos,
}

/// Recent average completion size per (client, route): the completion estimate of requests
/// that name no `max_tokens` (zero until one is known). Local to this process.
pub struct CompletionStats {
    averages: ShardedMap<Ewma>,
    clock: Clock,
}

impl CompletionStats {
    /// Empty statistics whose idle time runs on `clock`.
    pub fn new(clock: Clock) -> Self {
        Self {
            averages: ShardedMap::new(),
            clock,
        }
    }

    /// The recent average completion size of `client` on `route`, rounded up; 0 when unknown.
    pub fn estimate(&self, client: &str, route: Option<&str>) -> u64 {
        self.averages
            .get(&NameRef { client, route })
            .map_or(0, |ewma| {
                // Finite and non-negative by construction; `as` saturates anyway.
                ewma.average.ceil() as u64
            })
    }

    /// Records one reported completion size.
    pub fn record(&self, client: &str, route: Option<&str>, completion_tokens: u64) {
        let now = self.clock.now();
        let sample = completion_tokens as f64;
        self.averages.transact(
            &[NameRef { client, route }],
            |_| Ewma::default(),
            |states| {
                for ewma in states.iter_mut() {
                    ewma.average = if ewma.samples == 0 {
                        sample
                    } else {
                        ewma.average + EWMA_WEIGHT * (sample - ewma.average)
                    };
                    ewma.samples = ewma.samples.saturating_add(1);
                    ewma.last_seen = now;
                }
                ((), true)
            },
        );
    }

    /// Forgets the pairs not recorded for an hour; returns how many were dropped.
    pub fn sweep(&self, now: Nanos) -> usize {
        self.averages
            .retain(|ewma| now.saturating_sub(ewma.last_seen) < STATS_IDLE)
    }

    /// Number of (client, route) pairs known.
    pub fn len(&self) -> usize {
        self.averages.len()
    }

    /// True when nothing is known.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Characters per token of the prompt estimate: the usual rule of thumb for English text with
/// OpenAI/Anthropic tokenizers. Only the reservation uses it; settling uses the reported usage.
pub const CHARS_PER_TOKEN: u64 = 4;
/// Tokens added per chat message for its role and separators (OpenAI counts 3 to 4).
pub const MESSAGE_OVERHEAD: u64 = 4;

/// What a request body says about its size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestEstimate {
    /// Estimated prompt tokens.
    pub prompt_tokens: u64,
    /// Completion tokens the request asks for at most (`max_completion_tokens`, `max_tokens` or
    /// `max_output_tokens`, times `n`), if it names any.
    pub completion_tokens: Option<u64>,
}

/// Estimates a request body in one parse. For an OpenAI-style JSON body (chat/completions,
/// completions, responses, Anthropic messages): the text of `messages[].content` (a string, or
/// parts whose `text` counts), `prompt`, `input` and `system`, at [`CHARS_PER_TOKEN`] characters
/// per token rounded up, plus [`MESSAGE_OVERHEAD`] per message; explicit token ids count one each.
/// Any other body (not JSON, or JSON without those fields): its length / 4, rounded up.
pub fn estimate_request(body: &[u8]) -> RequestEstimate {
    let by_length = (body.len() as u64).div_ceil(CHARS_PER_TOKEN);
    // Only a JSON object is a request body (serde would also read a struct from an array).
    let is_object = body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
    let Some(request) = is_object
        .then(|| serde_json::from_slice::<RequestBody>(body).ok())
        .flatten()
    else {
        return RequestEstimate {
            prompt_tokens: by_length,
            completion_tokens: None,
        };
    };
    let completion_tokens = request
        .max_completion_tokens
        .or(request.max_tokens)
        .or(request.max_output_tokens)
        .and_then(|Lenient(limit)| limit)
        .map(|limit| {
            let n = request.n.and_then(|Lenient(n)| n).unwrap_or(1).max(1);
            limit.saturating_mul(n)
        });
    let texts = [
        request.messages,
        request.prompt,
        request.input,
        request.system,
    ];
    if texts.iter().all(Option::is_none) {
        return RequestEstimate {
            prompt_tokens: by_length,
            completion_tokens,
        };
    }
    let mut total = TextCount::default();
    for text in texts.iter().flatten() {
        total.add(text);
    }
    let messages = request.messages.map_or(0, |m| m.items);
    let prompt_tokens = total
        .chars
        .div_ceil(CHARS_PER_TOKEN)
        .saturating_add(total.token_ids)
        .saturating_add(messages.saturating_mul(MESSAGE_OVERHEAD));
    RequestEstimate {
        prompt_tokens,
        completion_tokens,
    }
}

/// Estimated prompt tokens of a request body (see [`estimate_request`]).
pub fn estimate_prompt_tokens(body: &[u8]) -> u64 {
    estimate_request(body).prompt_tokens
}

/// `max_completion_tokens`, `max_tokens` or `max_output_tokens` of a JSON body (times `n`), if any.
pub fn requested_completion_tokens(body: &[u8]) -> Option<u64> {
    estimate_request(body).completion_tokens
}

/// The fields of a request body that size it; everything else is skipped without allocating.
#[derive(Deserialize)]
struct RequestBody {
    #[serde(default)]
    messages: Option<TextCount>,
    #[serde(default)]
    prompt: Option<TextCount>,
    #[serde(default)]
    input: Option<TextCount>,
    #[serde(default)]
    system: Option<TextCount>,
    #[serde(default)]
    max_tokens: Option<Lenient>,
    #[serde(default)]
    max_completion_tokens: Option<Lenient>,
    #[serde(default)]
    max_output_tokens: Option<Lenient>,
    #[serde(default)]
    n: Option<Lenient>,
}

/// Text found in a JSON value: characters of strings, explicit token ids, and (for an array) the
/// number of items. Objects count their `text` and `content` members and tool-call arguments.
#[derive(Clone, Copy, Debug, Default)]
struct TextCount {
    chars: u64,
    token_ids: u64,
    items: u64,
}

impl TextCount {
    fn add(&mut self, other: &TextCount) {
        self.chars = self.chars.saturating_add(other.chars);
        self.token_ids = self.token_ids.saturating_add(other.token_ids);
    }
}

impl<'de> Deserialize<'de> for TextCount {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(TextVisitor)
    }
}

struct TextVisitor;

impl<'de> Visitor<'de> for TextVisitor {
    type Value = TextCount;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("text, an array of parts or messages, or a message")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<TextCount, E> {
        Ok(TextCount {
            chars: v.chars().count() as u64,
            ..TextCount::default()
        })
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<TextCount, E> {
        Ok(TextCount {
            token_ids: 1,
            ..TextCount::default()
        })
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<TextCount, E> {
        self.visit_u64(0)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<TextCount, E> {
        Ok(TextCount::default())
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<TextCount, E> {
        Ok(TextCount::default())
    }

    fn visit_unit<E: de::Error>(self) -> Result<TextCount, E> {
        Ok(TextCount::default())
    }

    fn visit_none<E: de::Error>(self) -> Result<TextCount, E> {
        Ok(TextCount::default())
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<TextCount, D::Error> {
        TextCount::deserialize(deserializer)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<TextCount, A::Error> {
        let mut total = TextCount::default();
        while let Some(item) = seq.next_element::<TextCount>()? {
            total.add(&item);
            total.items = total.items.saturating_add(1);
        }
        Ok(total)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<TextCount, A::Error> {
        let mut total = TextCount::default();
        while let Some(field) = map.next_key::<TextField>()? {
            match field {
                TextField::Text => total.add(&map.next_value::<TextCount>()?),
                TextField::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(total)
    }
}

/// A member name: one that holds text, or any other.
enum TextField {
    Text,
    Other,
}

impl<'de> Deserialize<'de> for TextField {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct FieldVisitor;
        impl Visitor<'_> for FieldVisitor {
            type Value = TextField;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a member name")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<TextField, E> {
                Ok(match v {
                    "text" | "content" | "tool_calls" | "function" | "arguments" => TextField::Text,
                    _ => TextField::Other,
                })
            }
        }
        deserializer.deserialize_identifier(FieldVisitor)
    }
}

/// A token count that tolerates odd JSON: negative → 0, fractions round up, non-numbers → none.
#[derive(Clone, Copy, Debug)]
struct Lenient(Option<u64>);

impl<'de> Deserialize<'de> for Lenient {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(LenientVisitor)
    }
}

struct LenientVisitor;

impl<'de> Visitor<'de> for LenientVisitor {
    type Value = Lenient;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a token count")
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Lenient, E> {
        Ok(Lenient(Some(v)))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Lenient, E> {
        Ok(Lenient(Some(u64::try_from(v).unwrap_or(0))))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Lenient, E> {
        // `as` saturates (NaN → 0): a float count is an odd body, not an error.
        Ok(Lenient(Some(v.ceil().max(0.0) as u64)))
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Lenient, E> {
        Ok(Lenient(None))
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Lenient, E> {
        Ok(Lenient(None))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Lenient, E> {
        Ok(Lenient(None))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Lenient, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Lenient(None))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Lenient, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Lenient(None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    const SEC: Nanos = 1_000_000_000;

    fn budget<'a>(client: &'a str, route: Option<&'a str>, per_minute: u64) -> TokenBudgetSpec<'a> {
        TokenBudgetSpec {
            client,
            route,
            per_minute,
        }
    }

    /// Tokens a fresh reservation attempt finds left, without keeping anything.
    fn remaining(tokens: &LocalTokens, b: TokenBudgetSpec<'_>, now: Nanos) -> u64 {
        match tokens.reserve_at(&[b], 0, now) {
            Ok(r) => r.info().remaining,
            Err(_) => 0,
        }
    }

    #[test]
    fn reservation_fits_or_is_refused() {
        let tokens = LocalTokens::new();
        let b = [budget("c", None, 1_000)];
        let first = tokens.reserve_at(&b, 700, 0);
        let Ok(first) = first else {
            panic!("refused: {first:?}")
        };
        assert_eq!(first.reserved(), 700);
        assert_eq!(
            first.info(),
            RateInfo {
                limit: 1_000,
                remaining: 300,
                reset_secs: 42
            }
        );
        // 400 > 300 left: refused; 100 tokens take 6 s to refill at 1000/min.
        assert_eq!(
            tokens.reserve_at(&b, 400, 0).map(|r| r.reserved()),
            Err(TokenDecision::Limited {
                info: RateInfo {
                    limit: 1_000,
                    remaining: 300,
                    reset_secs: 42
                },
                retry_after_secs: 6
            })
        );
        assert!(tokens.reserve_at(&b, 400, 6 * SEC).is_ok());
    }

    #[test]
    fn refused_reservation_takes_from_no_budget() {
        let tokens = LocalTokens::new();
        let key = budget("c", None, 1_000);
        let route = budget("c", Some("r"), 100);
        assert!(tokens.reserve_at(&[key, route], 80, 0).is_ok());
        assert!(tokens.reserve_at(&[key, route], 80, 0).is_err());
        assert_eq!(remaining(&tokens, key, 0), 920);
        assert_eq!(remaining(&tokens, route, 0), 20);
    }

    #[test]
    fn settle_refunds_and_overcharges() {
        let tokens = LocalTokens::new();
        let b = budget("c", Some("r"), 1_000);
        let r = tokens.reserve_at(&[b], 500, 0);
        let Ok(r) = r else { panic!("refused") };
        assert_eq!(remaining(&tokens, b, 0), 500);
        r.settle_at(120, 0);
        assert_eq!(remaining(&tokens, b, 0), 880);

        let r = tokens.reserve_at(&[b], 100, 0);
        let Ok(r) = r else { panic!("refused") };
        r.settle_at(1_500, 0);
        // 880 - 1500 = -620: in debt, even a zero estimate waits until the debt is repaid.
        let refused = tokens.reserve_at(&[b], 0, 0);
        assert!(
            matches!(
                refused,
                Err(TokenDecision::Limited {
                    retry_after_secs: 38,
                    ..
                })
            ),
            "{refused:?}"
        );
        assert_eq!(remaining(&tokens, b, 38 * SEC), 13);
    }

    #[test]
    fn refund_never_exceeds_capacity() {
        let tokens = LocalTokens::new();
        let b = budget("c", None, 600);
        let Ok(r) = tokens.reserve_at(&[b], 600, 0) else {
            panic!("refused")
        };
        // A minute later the budget is full again; the refund cannot push it over.
        r.settle_at(0, 60 * SEC);
        assert_eq!(remaining(&tokens, b, 60 * SEC), 600);
    }

    #[test]
    fn dropping_a_reservation_charges_it_in_full() {
        let tokens = LocalTokens::new();
        let b = budget("c", None, 1_000);
        drop(tokens.reserve_at(&[b], 300, 0));
        assert_eq!(remaining(&tokens, b, 0), 700);
    }

    #[test]
    fn settling_after_a_sweep_still_charges_the_excess() {
        let tokens = LocalTokens::new();
        let b = budget("c", None, 600);
        let Ok(r) = tokens.reserve_at(&[b], 100, 0) else {
            panic!("refused")
        };
        assert_eq!(tokens.sweep(10 * SEC), 1);
        assert!(tokens.is_empty());
        r.settle_at(400, 10 * SEC);
        assert_eq!(remaining(&tokens, b, 10 * SEC), 300);
    }

    #[test]
    fn estimate_above_the_budget_waits_for_a_full_budget() {
        let tokens = LocalTokens::new();
        let b = [budget("c", None, 1_000), budget("c", Some("r"), 5_000)];
        let Ok(r) = tokens.reserve_at(&b, 4_096, 0) else {
            panic!("refused")
        };
        assert_eq!(r.reserved(), 1_000);
        let refused = tokens.reserve_at(&b, 4_096, SEC);
        assert!(matches!(
            refused,
            Err(TokenDecision::Limited {
                retry_after_secs: 59,
                ..
            })
        ));
        assert!(tokens.reserve_at(&b, 4_096, 60 * SEC).is_ok());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_reservations_never_overrun_the_budget() {
        // A3: 50 concurrent requests naming max_tokens against a small budget.
        let tokens = LocalTokens::new();
        let body = br#"{"messages":[{"role":"user","content":"Write a haiku about rate limits."}],"max_tokens":90}"#;
        let estimate =
            estimate_prompt_tokens(body) + requested_completion_tokens(body).unwrap_or(0);
        assert_eq!(estimate, 8 + 4 + 90);
        let charged = Arc::new(AtomicU64::new(0));
        let barrier = Arc::new(tokio::sync::Barrier::new(50));
        let tasks: Vec<_> = (0..50u64)
            .map(|i| {
                let tokens = tokens.clone();
                let charged = Arc::clone(&charged);
                let barrier = Arc::clone(&barrier);
                tokio::spawn(async move {
                    barrier.wait().await;
                    let Ok(reservation) =
                        tokens.reserve_at(&[budget("agent", Some("chat"), 1_000)], estimate, 0)
                    else {
                        return false;
                    };
                    tokio::task::yield_now().await;
                    // Streams report at most what they reserved; a third report nothing.
                    let actual = match i % 3 {
                        0 => None,
                        1 => Some(estimate),
                        _ => Some(estimate / 2 + i),
                    };
                    charged.fetch_add(actual.unwrap_or(reservation.reserved()), Ordering::Relaxed);
                    match actual {
                        Some(actual) => reservation.settle_at(actual, 0),
                        None => drop(reservation),
                    }
                    true
                })
            })
            .collect();
        let mut admitted = 0;
        for task in tasks {
            if matches!(task.await, Ok(true)) {
                admitted += 1;
            }
        }
        // 1000 / 102 = 9 reservations fit at once; settled refunds let a few late ones in, but
        // what was charged never exceeds the budget.
        assert!(admitted >= 9, "admitted {admitted}");
        let total = charged.load(Ordering::Relaxed);
        assert!(total <= 1_000, "charged {total}");
        assert_eq!(
            remaining(&tokens, budget("agent", Some("chat"), 1_000), 0),
            1_000 - total
        );
    }

    #[test]
    fn estimates_chat_completion_and_other_bodies() {
        let chat = br#"{"model":"gpt-4o","messages":[
            {"role":"system","content":"You are terse."},
            {"role":"user","content":[{"type":"text","text":"Hello, world"},{"type":"image_url","image_url":{"url":"https://x/y.png"}}]}
        ],"max_completion_tokens":256,"n":2}"#;
        // 14 + 12 = 26 chars → 7 tokens, plus 2 × 4 overhead.
        assert_eq!(
            estimate_request(chat),
            RequestEstimate {
                prompt_tokens: 15,
                completion_tokens: Some(512)
            }
        );

        let completions = br#"{"prompt":"abcdefghi","max_tokens":16}"#;
        assert_eq!(
            estimate_request(completions),
            RequestEstimate {
                prompt_tokens: 3,
                completion_tokens: Some(16)
            }
        );
        let token_ids = br#"{"prompt":[[1,2,3],[4,5]]}"#;
        assert_eq!(estimate_prompt_tokens(token_ids), 5);

        let escaped = br#"{"messages":[{"role":"user","content":"\u00e9\u00e9\"\n"}]}"#;
        assert_eq!(estimate_prompt_tokens(escaped), 1 + 4);
        let tool_call = br#"{"messages":[{"role":"assistant","content":null,"tool_calls":[{"function":{"name":"f","arguments":"{\"a\":1}"}}]}]}"#;
        assert_eq!(estimate_prompt_tokens(tool_call), 2 + 4);
        let anthropic = br#"{"system":"Be brief.","messages":[{"role":"user","content":"Hi"}],"max_tokens":100}"#;
        assert_eq!(
            estimate_request(anthropic),
            RequestEstimate {
                prompt_tokens: 3 + 4,
                completion_tokens: Some(100)
            }
        );
        let responses = br#"{"input":"What is 2+2?","max_output_tokens":50}"#;
        assert_eq!(
            estimate_request(responses),
            RequestEstimate {
                prompt_tokens: 3,
                completion_tokens: Some(50)
            }
        );

        // Not JSON, or JSON without text: length / 4, rounded up.
        assert_eq!(
            estimate_request(b"plain text body"),
            RequestEstimate {
                prompt_tokens: 4,
                completion_tokens: None
            }
        );
        assert_eq!(estimate_prompt_tokens(b""), 0);
        assert_eq!(
            estimate_request(br#"{"model":"m","max_tokens":7}"#).prompt_tokens,
            7
        );
        assert_eq!(
            requested_completion_tokens(br#"{"model":"m","max_tokens":7}"#),
            Some(7)
        );
        assert_eq!(estimate_prompt_tokens(b"[1,2,3]"), 2);
        assert_eq!(
            estimate_prompt_tokens(br#"{"messages":[{"content":"x"}"#),
            7
        );
    }

    #[test]
    fn odd_completion_limits_are_tolerated() {
        assert_eq!(
            requested_completion_tokens(br#"{"max_tokens":12.5}"#),
            Some(13)
        );
        assert_eq!(
            requested_completion_tokens(br#"{"max_tokens":-3}"#),
            Some(0)
        );
        assert_eq!(
            requested_completion_tokens(br#"{"max_tokens":"lots"}"#),
            None
        );
        assert_eq!(requested_completion_tokens(br#"{"max_tokens":null}"#), None);
        assert_eq!(
            requested_completion_tokens(br#"{"max_tokens":[1],"n":{"a":1}}"#),
            None
        );
        assert_eq!(
            requested_completion_tokens(br#"{"max_tokens":10,"n":0}"#),
            Some(10)
        );
        assert_eq!(
            requested_completion_tokens(br#"{"max_tokens":18446744073709551615,"n":3}"#),
            Some(u64::MAX)
        );
        assert_eq!(
            requested_completion_tokens(br#"{"max_tokens":1,"max_completion_tokens":2}"#),
            Some(2)
        );
        // Deeply nested input is refused by the parser's depth limit, not by a stack overflow.
        let deep = format!(
            "{{\"messages\":{}{}}}",
            "[".repeat(10_000),
            "]".repeat(10_000)
        );
        assert_eq!(
            estimate_prompt_tokens(deep.as_bytes()),
            (deep.len() as u64).div_ceil(4)
        );
    }

    #[test]
    fn completion_stats_follow_recent_sizes() {
        let clock = Clock::manual();
        let stats = CompletionStats::new(clock.clone());
        assert_eq!(stats.estimate("c", Some("r")), 0);
        stats.record("c", Some("r"), 100);
        assert_eq!(stats.estimate("c", Some("r")), 100);
        stats.record("c", Some("r"), 200);
        assert_eq!(stats.estimate("c", Some("r")), 125);
        assert_eq!(stats.estimate("c", None), 0);
        assert_eq!(stats.estimate("c", Some("other")), 0);
        clock.advance(std::time::Duration::from_secs(1_800));
        stats.record("d", None, 5);
        assert_eq!(stats.sweep(clock.now()), 0);
        clock.advance(std::time::Duration::from_secs(1_800));
        assert_eq!(stats.sweep(clock.now()), 1);
        assert_eq!(stats.len(), 1);
        assert_eq!(stats.estimate("d", None), 5);
    }
}
