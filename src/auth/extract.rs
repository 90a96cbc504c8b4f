//! Where a presented API key is found in a request: `X-API-Key`, `Authorization: Bearer`, or (on
//! a WebSocket handshake only) the `api_key` query parameter. Pure functions over `http` types;
//! the key is only borrowed or decoded, never logged or kept.

use std::borrow::Cow;

use http::header;

/// `X-API-Key`, the gateway's own key header (removed before forwarding).
pub static X_API_KEY: header::HeaderName = header::HeaderName::from_static("x-api-key");

/// Where the presented key came from (the carrier is removed before forwarding).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyCarrier {
    Header,
    Bearer,
    Query,
}

/// The presented API key and its carrier: `X-API-Key`, else `Authorization: Bearer`, else (on a
/// WebSocket handshake only) the `api_key` query parameter, percent-decoded.
pub fn extract_key(
    parts: &http::request::Parts,
    websocket: bool,
) -> Option<(Cow<'_, [u8]>, KeyCarrier)> {
    if let Some(v) = parts.headers.get(&X_API_KEY) {
        return Some((Cow::Borrowed(v.as_bytes().trim_ascii()), KeyCarrier::Header));
    }
    if let Some(v) = parts.headers.get(header::AUTHORIZATION) {
        let b = v.as_bytes();
        if b.len() > 7 && b[..7].eq_ignore_ascii_case(b"bearer ") {
            return Some((Cow::Borrowed(b[7..].trim_ascii()), KeyCarrier::Bearer));
        }
    }
    if websocket {
        let q = parts.uri.query()?;
        for pair in q.split('&') {
            if let Some(v) = pair.strip_prefix("api_key=") {
                return Some((Cow::Owned(percent_decode(v)), KeyCarrier::Query));
            }
        }
    }
    None
}

fn percent_decode(s: &str) -> Vec<u8> {
    // Byte-wise: the query may hold UTF-8, so slicing the `str` at `i + 3` could split a char.
    let b = s.as_bytes();
    let hex = |c: u8| (c as char).to_digit(16);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            if let (Some(h), Some(l)) = (
                b.get(i + 1).and_then(|&c| hex(c)),
                b.get(i + 2).and_then(|&c| hex(c)),
            ) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    out
}

/// The query without `api_key=...` (a key must never reach a backend); `None` when nothing is left.
pub fn strip_api_key_param(q: &str) -> Option<String> {
    let kept = q
        .split('&')
        .filter(|p| !p.starts_with("api_key=") && !p.is_empty())
        .collect::<Vec<_>>()
        .join("&");
    (!kept.is_empty()).then_some(kept)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_key_query_decoding_is_byte_wise() {
        // A '%' followed by a multi-byte character used to slice the str inside the character.
        assert_eq!(percent_decode("%a\u{e9}"), "%a\u{e9}".as_bytes());
        assert_eq!(percent_decode("%\u{e9}"), "%\u{e9}".as_bytes());
        assert_eq!(percent_decode("tg%2Dkey+1%zz%4"), b"tg-key 1%zz%4");
        assert_eq!(
            strip_api_key_param("a=1&api_key=x&&b=2").as_deref(),
            Some("a=1&b=2")
        );
        assert_eq!(strip_api_key_param("api_key=x"), None);
    }

    #[test]
    fn carriers_in_order() {
        let req = http::Request::builder()
            .uri("/ws?api_key=q")
            .header("authorization", "Bearer b")
            .header("x-api-key", " h ")
            .body(())
            .unwrap();
        let (parts, ()) = req.into_parts();
        let (k, c) = extract_key(&parts, true).unwrap();
        assert_eq!((&*k, c), (&b"h"[..], KeyCarrier::Header));
        let mut parts = parts;
        parts.headers.remove(&X_API_KEY);
        let (k, c) = extract_key(&parts, true).unwrap();
        assert_eq!((&*k, c), (&b"b"[..], KeyCarrier::Bearer));
        parts.headers.remove(header::AUTHORIZATION);
        let (k, c) = extract_key(&parts, true).unwrap();
        assert_eq!((&*k, c), (&b"q"[..], KeyCarrier::Query));
        assert!(extract_key(&parts, false).is_none());
    }
}
