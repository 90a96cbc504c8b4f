//! Key extraction and header handling: any request URI and header list through the functions the
//! pipeline applies to every request: `extract_key` (X-API-Key, Bearer, `api_key` query),
//! `host_of`, `request_id`, `traceparent`, `forwarded_for`, `strip_hop_by_hop`,
//! `is_websocket_upgrade`. Besides "no panic", it checks what the backend is promised.
//!
//! Input: fields separated by `\n`: the request target, then `name:value` header lines (values
//! may hold any byte but `\n`; invalid names or values are skipped, as hyper would refuse them).
#![no_main]

use std::net::{IpAddr, Ipv4Addr};

use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Uri};
use libfuzzer_sys::fuzz_target;
use tollgate::proxy::headers;
use tollgate::auth::extract::{extract_key, KeyCarrier};
use tollgate::proxy::context::host_of;

fn valid_traceparent(v: &[u8]) -> bool {
    let hex = |s: &[u8]| s.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    v.len() == 55
        && v[2] == b'-'
        && v[35] == b'-'
        && v[52] == b'-'
        && hex(&v[0..2])
        && hex(&v[3..35])
        && hex(&v[36..52])
        && hex(&v[53..55])
        && v[3..35].iter().any(|&b| b != b'0')
        && v[36..52].iter().any(|&b| b != b'0')
}

fuzz_target!(|data: &[u8]| {
    let mut fields = data.split(|&b| b == b'\n');
    let target = fields.next().unwrap_or_default();
    let Ok(uri) = Uri::try_from(target) else {
        return;
    };
    let mut req = Request::new(());
    *req.uri_mut() = uri;
    for line in fields {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(&line[colon + 1..]),
        ) else {
            continue;
        };
        req.headers_mut().append(name, value);
    }
    let (mut parts, ()) = req.into_parts();

    for websocket in [false, true] {
        if let Some((key, carrier)) = extract_key(&parts, websocket) {
            if carrier != KeyCarrier::Query {
                assert_eq!(key.trim_ascii(), &*key, "keys are trimmed");
            } else {
                assert!(
                    websocket,
                    "the query carries a key only on a WebSocket handshake"
                );
            }
        }
    }
    let host = host_of(&parts);
    assert!(!host.bytes().any(|b| b.is_ascii_uppercase()), "{host:?}");
    assert!(!host.ends_with('.'), "{host:?}");

    let id = headers::request_id(&parts.headers);
    assert!(!id.is_empty() && id.len() <= 128, "{id:?}");
    assert!(id.as_bytes().iter().all(u8::is_ascii_graphic), "{id:?}");

    let tp = headers::traceparent(&parts.headers);
    assert!(valid_traceparent(tp.as_bytes()), "{tp:?}");

    let upgrade = headers::is_websocket_upgrade(&parts.headers);
    let h = &mut parts.headers;
    headers::forwarded_for(h, IpAddr::V4(Ipv4Addr::LOCALHOST), data.len() % 2 == 0);
    assert!(h.contains_key(&headers::X_FORWARDED_FOR));
    headers::strip_hop_by_hop(h, upgrade);
    for name in [
        header::TRANSFER_ENCODING,
        header::TRAILER,
        header::PROXY_AUTHORIZATION,
        headers::KEEP_ALIVE.clone(),
        headers::PROXY_CONNECTION.clone(),
    ] {
        assert!(!h.contains_key(&name), "{name} survived");
    }
    if let Some(te) = h.get(header::TE) {
        assert_eq!(te.as_bytes(), b"trailers");
    }
    if !upgrade {
        assert!(!h.contains_key(header::CONNECTION) && !h.contains_key(header::UPGRADE));
    }
});
