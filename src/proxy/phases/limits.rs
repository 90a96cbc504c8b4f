//! Phase 5, request limits (429 `rate_limited`): the key's bucket and the route's, all or none
//! consume. State lives in the `RateLimiter`, outside every snapshot.

use crate::config::route::CompiledRoute;
use crate::proxy::context::{ClientKey, RequestCtx};
use crate::proxy::error::LimitHeaders;
use crate::proxy::headers::IpText;
use crate::proxy::ProxyError;
use crate::ratelimit::{BucketSpec, Decision};

/// Admits the request or refuses it with the tightest bucket's `RateLimit-*` values.
pub(crate) async fn run(cx: &mut RequestCtx<'_>, route: &CompiledRoute) -> Result<(), ProxyError> {
    // An anonymous caller is limited by address; only limits read the client id, so a route
    // without any formats (and allocates) nothing.
    if cx.caller.is_none() && route.rate_limit.is_some() {
        cx.client = ClientKey::Address(format!("ip:{}", IpText::new(cx.conn.remote.ip()).as_str()));
    }
    let client = cx.client();
    let key_bucket = cx.caller.as_ref().map(|c| BucketSpec {
        client,
        route: None,
        per_minute: c.key.limits.requests_per_minute,
        burst: c.key.limits.burst,
    });
    let route_bucket = route.rate_limit.as_ref().and_then(|r| {
        r.requests_per_minute.map(|rpm| BucketSpec {
            client,
            route: Some(&route.id),
            per_minute: rpm,
            burst: r.burst.unwrap_or(rpm),
        })
    });
    let limiter = &cx.gw.limiter;
    let decision = match (key_bucket, route_bucket) {
        (Some(a), Some(b)) => limiter.check_requests(&[a, b]).await,
        (Some(a), None) | (None, Some(a)) => limiter.check_requests(&[a]).await,
        (None, None) => return Ok(()),
    };
    match decision {
        Decision::Allowed(info) => {
            cx.rate_headers = Some(LimitHeaders {
                limit: info.limit,
                remaining: info.remaining,
                reset_secs: info.reset_secs,
                retry_after_secs: 0,
            });
            Ok(())
        }
        Decision::Limited {
            info,
            retry_after_secs,
        } => {
            cx.gw
                .metrics
                .rate_limited_total
                .with_label_values(&[&route.id, "requests"])
                .inc();
            Err(ProxyError::RateLimited(LimitHeaders {
                limit: info.limit,
                remaining: info.remaining,
                reset_secs: info.reset_secs,
                retry_after_secs,
            }))
        }
    }
}
