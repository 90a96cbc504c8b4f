//! Revocation of open streams: a future that completes when the key behind a stream is
//! deleted, disabled or expired. Rides in SSE bodies and WebSocket relays; reads snapshots only.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use super::context::Caller;
use super::Gateway;
use crate::auth::external::Refusal;

/// Completes when the caller's key is no longer valid, checked every `revalidate_interval`
/// against the current snapshot. A key the external auth service admitted stays valid until
/// the service refuses it (its cached answer is reused; after the TTL the service is asked
/// again); an unavailable auth service does not cut established streams.
pub fn revocation(gw: Arc<Gateway>, caller: &Caller) -> Pin<Box<dyn Future<Output = ()> + Send>> {
    let digest = caller.digest;
    let external = caller.external.clone();
    Box::pin(async move {
        let every = gw.options.revalidate_interval;
        loop {
            tokio::time::sleep(every).await;
            let in_store = gw
                .snapshot()
                .keys
                .get(&digest)
                .map(|k| !k.expired_at(jiff::Timestamp::now().as_second()));
            let valid = match (in_store, &external, &gw.ext_auth) {
                (Some(valid), _, _) => valid,
                (None, Some(key), Some(ext)) => {
                    !matches!(ext.lookup(key).await, Err(Refusal::Invalid))
                }
                (None, _, _) => false,
            };
            if !valid {
                tracing::info!("closing a stream whose API key is no longer valid");
                return;
            }
        }
    })
}
