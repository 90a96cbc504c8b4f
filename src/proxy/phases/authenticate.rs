//! Phase 3, authenticate (401): who is calling. The key store first, then (for a key it does
//! not know, with `--ext-auth-url`) the external auth service. Decides nothing about access.

use crate::api::Protocol;
use crate::auth::external::{Failure, Refusal};
use crate::auth::extract::extract_key;
use crate::auth::keys::{self, SecretString};
use crate::config::route::CompiledRoute;
use crate::proxy::context::{Caller, RequestCtx};
use crate::proxy::ProxyError;

/// Sets `cx.caller` (and where the key came from), or refuses. A route that does not require a
/// key serves an unknown or unverifiable key anonymously; one that does fails closed (503
/// `auth_unavailable`) when the auth service cannot answer.
pub(crate) async fn run(cx: &mut RequestCtx<'_>, route: &CompiledRoute) -> Result<(), ProxyError> {
    // The `api_key` query parameter is a carrier on WebSocket handshakes only.
    let websocket = route.protocol == Protocol::Websocket
        && crate::proxy::headers::is_websocket_upgrade(&cx.head.headers);
    let required = route.auth.required;
    let Some((plain, carrier)) = extract_key(&cx.head, websocket) else {
        return if required {
            Err(refused(cx, ProxyError::MissingKey))
        } else {
            Ok(())
        };
    };
    cx.carrier = Some(carrier);
    let digest = keys::digest(&plain);
    if let Some(key) = cx.snap.keys.get(&digest) {
        let key = key.clone();
        if key.expired_at(jiff::Timestamp::now().as_second()) {
            return Err(refused(cx, ProxyError::ExpiredKey));
        }
        cx.caller = Some(Caller {
            key,
            digest,
            external: None,
        });
        return Ok(());
    }
    let Some(ext) = &cx.gw.ext_auth else {
        return if required {
            Err(refused(cx, ProxyError::InvalidKey))
        } else {
            Ok(())
        };
    };
    // Only a non-empty UTF-8 key can be sent as a JSON string.
    let verdict = match std::str::from_utf8(&plain) {
        Ok(text) if !text.is_empty() => {
            let secret = SecretString::new(text);
            ext.lookup(&secret).await.map(|key| (key, secret))
        }
        _ => Err(Refusal::Invalid),
    };
    match verdict {
        Ok((key, secret)) => {
            if key.expired_at(jiff::Timestamp::now().as_second()) {
                return Err(refused(cx, ProxyError::ExpiredKey));
            }
            cx.caller = Some(Caller {
                key,
                digest,
                external: Some(secret),
            });
            Ok(())
        }
        Err(_) if !required => Ok(()),
        Err(Refusal::Invalid) => Err(refused(cx, ProxyError::InvalidKey)),
        Err(Refusal::Unavailable(why)) => {
            if why == Failure::Overloaded {
                cx.gw.metrics.ext_auth_overloaded_total.inc();
            }
            Err(refused(cx, ProxyError::AuthUnavailable))
        }
    }
}

/// Counts an authentication or authorisation refusal by its reason.
pub(crate) fn refused(cx: &RequestCtx<'_>, e: ProxyError) -> ProxyError {
    cx.gw
        .metrics
        .auth_failures_total
        .with_label_values(&[e.code()])
        .inc();
    e
}
