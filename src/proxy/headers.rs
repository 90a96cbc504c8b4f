//! Header handling on the way through: hop-by-hop removal (RFC 9110 §7.6.1), forwarding headers,
//! request ids and W3C trace context. Pure functions over `HeaderMap`.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use rand::RngCore;

pub static X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
pub static X_CLIENT_ID: HeaderName = HeaderName::from_static("x-client-id");
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
pub static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
pub static RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
pub static RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
pub static RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");

/// Removes hop-by-hop headers, including those named in `Connection`. With `keep_upgrade`, the
/// `Connection: upgrade` / `Upgrade` pair survives (WebSocket handshakes).
pub fn strip_hop_by_hop(h: &mut HeaderMap, keep_upgrade: bool) {
    if let Some(conn) = h.get(header::CONNECTION).cloned() {
        if let Ok(list) = conn.to_str() {
            for name in list.split(',') {
                let name = name.trim();
                if name.is_empty() || (keep_upgrade && name.eq_ignore_ascii_case("upgrade")) {
                    continue;
                }
                if let Ok(n) = HeaderName::from_bytes(name.as_bytes()) {
                    // Never let a client strip the gateway's own headers via Connection.
                    if n != X_CLIENT_ID && n != X_REQUEST_ID && n != header::HOST {
                        h.remove(n);
                    }
                }
            }
        }
    }
    h.remove(&KEEP_ALIVE);
    h.remove(&PROXY_CONNECTION);
    h.remove(header::TRANSFER_ENCODING);
    h.remove(header::TRAILER);
    h.remove(header::PROXY_AUTHORIZATION);
    h.remove(header::PROXY_AUTHENTICATE);
    if let Some(te) = h.get(header::TE) {
        if te.as_bytes() != b"trailers" {
            h.remove(header::TE);
        }
    }
    if keep_upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        h.remove(header::CONNECTION);
        h.remove(header::UPGRADE);
    }
}

/// Whether the request asks for a WebSocket upgrade.
pub fn is_websocket_upgrade(h: &HeaderMap) -> bool {
    let conn_upgrade = h.get_all(header::CONNECTION).iter().any(|v| {
        v.to_str()
            .map(|s| {
                s.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
            .unwrap_or(false)
    });
    let upgrade_ws = h
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    conn_upgrade && upgrade_ws
}

/// A fresh 128-bit id in hex.
pub fn new_request_id() -> HeaderValue {
    let mut b = [0u8; 16];
    rand::rng().fill_bytes(&mut b);
    let mut out = [0u8; 32];
    // hex::encode_to_slice cannot fail for a buffer of exactly twice the input length.
    if hex::encode_to_slice(b, &mut out).is_err() {
        return HeaderValue::from_static("00000000000000000000000000000000");
    }
    HeaderValue::from_bytes(&out).unwrap_or_else(|_| HeaderValue::from_static("0"))
}

/// The client's `X-Request-Id` if it is sane (1-128 visible ASCII chars), else a new one.
pub fn request_id(h: &HeaderMap) -> HeaderValue {
    match h.get(&X_REQUEST_ID) {
        Some(v)
            if !v.is_empty()
                && v.len() <= 128
                && v.as_bytes().iter().all(|b| b.is_ascii_graphic()) =>
        {
            v.clone()
        }
        _ => new_request_id(),
    }
}

fn valid_traceparent(v: &[u8]) -> bool {
    // version "00": 2-32-16-2 lower-case hex, all-zero ids invalid.
    if v.len() != 55 || v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return false;
    }
    let hexok = |s: &[u8]| s.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    let (ver, trace, span, flags) = (&v[0..2], &v[3..35], &v[36..52], &v[53..55]);
    hexok(ver)
        && ver != b"ff"
        && hexok(trace)
        && hexok(span)
        && hexok(flags)
        && trace.iter().any(|b| *b != b'0')
        && span.iter().any(|b| *b != b'0')
}

/// Passes a valid `traceparent` on with a new parent span id (the gateway is a hop), or starts one.
pub fn traceparent(h: &HeaderMap) -> HeaderValue {
    let mut rng = rand::rng();
    let mut span = [0u8; 8];
    rng.fill_bytes(&mut span);
    span[0] |= 1; // never all zero
    let span_hex = hex::encode(span);
    if let Some(v) = h.get(&TRACEPARENT) {
        let b = v.as_bytes();
        if valid_traceparent(b) {
            let trace = &v.to_str().unwrap_or_default()[3..35];
            let flags = &v.to_str().unwrap_or_default()[53..55];
            if let Ok(hv) = HeaderValue::from_str(&format!("00-{trace}-{span_hex}-{flags}")) {
                return hv;
            }
        }
    }
    let mut trace = [0u8; 16];
    rng.fill_bytes(&mut trace);
    trace[0] |= 1;
    HeaderValue::from_str(&format!("00-{}-{span_hex}-01", hex::encode(trace)))
        .unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Appends the client address to `X-Forwarded-For` (or replaces it when not trusted).
pub fn forwarded_for(h: &mut HeaderMap, client: IpAddr, trust: bool) {
    let ip = client.to_string();
    let value = match (trust, h.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok())) {
        (true, Some(prev)) if !prev.is_empty() => format!("{prev}, {ip}"),
        _ => ip,
    };
    if let Ok(v) = HeaderValue::from_str(&value) {
        h.insert(&X_FORWARDED_FOR, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_connection_listed_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-foo, x-client-id"),
        );
        h.insert("x-foo", HeaderValue::from_static("1"));
        h.insert("x-client-id", HeaderValue::from_static("gw"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        strip_hop_by_hop(&mut h, false);
        assert!(h.get("x-foo").is_none());
        assert!(h.get("keep-alive").is_none());
        assert!(h.get(header::TE).is_none());
        assert!(h.get(header::CONNECTION).is_none());
        assert_eq!(h.get("x-client-id").map(|v| v.as_bytes()), Some(&b"gw"[..]));
    }

    #[test]
    fn traceparent_is_continued_or_started() {
        let mut h = HeaderMap::new();
        h.insert(
            &TRACEPARENT,
            HeaderValue::from_static("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        );
        let v = traceparent(&h);
        let s = v.to_str().unwrap_or_default();
        assert!(s.starts_with("00-0af7651916cd43dd8448eb211c80319c-"));
        assert!(!s.contains("b7ad6b7169203331"));
        assert!(valid_traceparent(v.as_bytes()));
        let fresh = traceparent(&HeaderMap::new());
        assert!(valid_traceparent(fresh.as_bytes()));
        h.insert(&TRACEPARENT, HeaderValue::from_static("garbage"));
        assert!(valid_traceparent(traceparent(&h).as_bytes()));
    }

    #[test]
    fn request_ids() {
        let mut h = HeaderMap::new();
        assert_eq!(request_id(&h).len(), 32);
        h.insert(&X_REQUEST_ID, HeaderValue::from_static("abc-123"));
        assert_eq!(request_id(&h), "abc-123");
        h.insert(&X_REQUEST_ID, HeaderValue::from_static("has space"));
        assert_eq!(request_id(&h).len(), 32);
    }
}
