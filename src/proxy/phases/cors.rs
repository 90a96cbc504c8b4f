//! Phase 2, CORS: a preflight on a route with a CORS policy is answered here (204) and never
//! forwarded; answers to actual requests get the allow/expose headers in `respond`.

use http::header::{self, HeaderValue};
use http::{HeaderMap, Response, StatusCode};

use crate::config::route::{CompiledCors, CompiledRoute};
use crate::proxy::context::RequestCtx;
use crate::proxy::ProxyBody;

/// On a route with a CORS policy: keeps the request's `Origin` for the answer, and answers a
/// preflight.
pub(crate) fn run(cx: &mut RequestCtx<'_>, route: &CompiledRoute) -> Option<Response<ProxyBody>> {
    let cors = route.cors.as_ref()?;
    if !cx.preflight {
        cx.origin = cx.head.headers.get(header::ORIGIN).cloned();
        return None;
    }
    let mut resp = Response::new(ProxyBody::empty());
    *resp.status_mut() = StatusCode::NO_CONTENT;
    let h = resp.headers_mut();
    if let Some(origin) = allowed_origin(cors, &cx.head.headers) {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        if let Some(v) = &cors.allow_methods {
            h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, v.clone());
        }
        if let Some(v) = &cors.allow_headers {
            h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, v.clone());
        }
        if let Some(v) = &cors.max_age {
            h.insert(header::ACCESS_CONTROL_MAX_AGE, v.clone());
        }
        if cors.allow_credentials {
            h.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
    }
    h.insert(header::VARY, HeaderValue::from_static("Origin"));
    Some(resp)
}

/// Adds the CORS headers of an actual (not preflight) request's answer, for an allowed origin.
pub(crate) fn response_headers(
    cors: &CompiledCors,
    origin: Option<HeaderValue>,
    h: &mut HeaderMap,
) {
    let Some(origin) = origin.filter(|o| o.to_str().is_ok_and(|o| cors.allows_origin(o))) else {
        return;
    };
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        if cors.any_origin {
            HeaderValue::from_static("*")
        } else {
            origin
        },
    );
    if let Some(v) = &cors.expose_headers {
        h.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, v.clone());
    }
    if cors.allow_credentials {
        h.insert(
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
    }
    h.append(header::VARY, HeaderValue::from_static("Origin"));
}

/// The `Access-Control-Allow-Origin` value for the request's `Origin`, if the policy allows it.
fn allowed_origin(cors: &CompiledCors, h: &HeaderMap) -> Option<HeaderValue> {
    let origin = h.get(header::ORIGIN)?;
    if !origin.to_str().is_ok_and(|o| cors.allows_origin(o)) {
        return None;
    }
    Some(if cors.any_origin {
        HeaderValue::from_static("*")
    } else {
        origin.clone()
    })
}
