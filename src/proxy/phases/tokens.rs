//! Phase 6, token admission (429 `token_limited`): a request on a token-limited route reserves
//! its estimate (prompt from the body, completion from `max_tokens` or the client's average)
//! before it is forwarded; `respond` settles the reservation from the reported usage.

use crate::api::Protocol;
use crate::config::route::CompiledRoute;
use crate::proxy::context::RequestCtx;
use crate::proxy::error::LimitHeaders;
use crate::proxy::ProxyError;
use crate::ratelimit::{TokenBudgetSpec, TokenDecision, TokenReservation};

/// Checks the body's size (413), then reserves tokens where a token budget applies.
pub(crate) async fn run(cx: &mut RequestCtx<'_>, route: &CompiledRoute) -> Result<(), ProxyError> {
    let gw = cx.gw;
    let opts = &gw.options;
    cx.check_content_length(opts.max_body_bytes)?;
    let key_tpm = cx
        .caller
        .as_ref()
        .and_then(|c| c.key.limits.tokens_per_minute);
    let route_tpm = route.rate_limit.as_ref().and_then(|r| r.tokens_per_minute);
    if (key_tpm.is_none() && route_tpm.is_none()) || route.protocol == Protocol::Websocket {
        return Ok(());
    }
    let limiter = &gw.limiter;
    let estimate = match cx.content_length() {
        Some(n) if n > opts.max_inspect_bytes => {
            // Too large to inspect: ~4 bytes a token, plus the usual completion size.
            n / 4
                + limiter
                    .completion_stats()
                    .estimate(cx.client(), Some(&route.id))
        }
        _ => {
            cx.body.buffer(opts.max_inspect_bytes).await?;
            let body = cx.body.buffered().map_or(&[][..], |b| &b[..]);
            limiter.estimate_tokens(cx.client(), Some(&route.id), body)
        }
    };
    let client = cx.client();
    let key_budget = key_tpm.map(|tpm| TokenBudgetSpec {
        client,
        route: None,
        per_minute: tpm,
    });
    let route_budget = route_tpm.map(|tpm| TokenBudgetSpec {
        client,
        route: Some(&route.id),
        per_minute: tpm,
    });
    let reserved = match (key_budget, route_budget) {
        (Some(a), Some(b)) => limiter.reserve_tokens(&[a, b], estimate).await,
        (Some(a), None) | (None, Some(a)) => limiter.reserve_tokens(&[a], estimate).await,
        (None, None) => Ok(TokenReservation::unlimited()),
    };
    match reserved {
        Ok(r) => {
            cx.reservation.0 = Some(r);
            Ok(())
        }
        Err(TokenDecision::Limited {
            info,
            retry_after_secs,
        }) => {
            cx.gw
                .metrics
                .rate_limited_total
                .with_label_values(&[&route.id, "tokens"])
                .inc();
            Err(ProxyError::TokenLimited(LimitHeaders {
                limit: info.limit,
                remaining: info.remaining,
                reset_secs: info.reset_secs,
                retry_after_secs,
            }))
        }
    }
}
