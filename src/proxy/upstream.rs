//! The upstream client: pooled keep-alive connections per endpoint (plain or TLS), and the
//! classification of its failures into `ProxyError`s. Knows nothing of routes or keys.

use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::body::ProxyBody;
use super::error::ProxyError;

type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

/// Upstream client settings.
#[derive(Clone, Debug)]
pub struct UpstreamOptions {
    /// Idle pooled connections kept per endpoint. Generous, because agent traffic is bursty and
    /// a fresh TCP (+TLS) handshake costs far more than an idle socket.
    pub max_idle_per_endpoint: usize,
    pub idle_timeout: Duration,
    pub connect_timeout: Duration,
    /// PEM bundle of extra CAs for `https` backends (besides the Mozilla roots).
    pub ca_bundle: Option<Vec<u8>>,
}

impl Default for UpstreamOptions {
    fn default() -> Self {
        Self {
            max_idle_per_endpoint: 1024,
            idle_timeout: Duration::from_secs(90),
            connect_timeout: Duration::from_secs(5),
            ca_bundle: None,
        }
    }
}

/// The client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The CA bundle holds no usable certificate.
    #[error("invalid CA bundle: {0}")]
    CaBundle(String),
}

/// The pooled client toward backends.
pub struct Upstream {
    client: Client<Connector, ProxyBody>,
}

impl Upstream {
    pub fn new(opts: &UpstreamOptions) -> Result<Self, UpstreamError> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(opts.connect_timeout));
        http.set_keepalive(Some(Duration::from_secs(60)));

        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(pem) = &opts.ca_bundle {
            let mut added = 0;
            for cert in rustls_pemfile::certs(&mut &pem[..]) {
                let cert = cert.map_err(|e| UpstreamError::CaBundle(e.to_string()))?;
                roots
                    .add(cert)
                    .map_err(|e| UpstreamError::CaBundle(e.to_string()))?;
                added += 1;
            }
            if added == 0 {
                return Err(UpstreamError::CaBundle("no certificate found".into()));
            }
        }
        let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| UpstreamError::CaBundle(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(opts.idle_timeout)
            .pool_max_idle_per_host(opts.max_idle_per_endpoint)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(https);
        Ok(Self { client })
    }

    /// Sends one attempt; the URI is absolute (`http://10.1.2.3:8080/path`).
    pub async fn send(&self, req: Request<ProxyBody>) -> Result<Response<Incoming>, ProxyError> {
        self.client.request(req).await.map_err(|e| {
            if e.is_connect() {
                tracing::debug!(error = %e, "upstream connect failed");
                ProxyError::ConnectFailed
            } else if let Some(body_err) = request_body_error(&e) {
                // The client's body failed while streaming upstream: its fault, not the
                // upstream's (502). Over `max_body_bytes` without a Content-Length: 413; badly
                // framed (a chunk size that is not hex) or cut short: 400.
                tracing::debug!(error = %body_err, "request body failed while streaming");
                match body_err {
                    super::body::BodyError::TooLarge => ProxyError::PayloadTooLarge,
                    _ => ProxyError::BadRequest,
                }
            } else {
                tracing::debug!(error = %e, "upstream request failed");
                ProxyError::UpstreamFailed
            }
        })
    }
}

/// The request body's own failure behind a failed send (a `BodyError` somewhere in the error's
/// source chain), if that is what it was.
fn request_body_error<'e>(
    e: &'e (dyn std::error::Error + 'static),
) -> Option<&'e super::body::BodyError> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(b) = err.downcast_ref::<super::body::BodyError>() {
            return Some(b);
        }
        cur = err.source();
    }
    None
}
