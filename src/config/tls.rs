//! Certificates for TLS termination, chosen by SNI; built from `kubernetes.io/tls` Secrets at
//! compile time. Parses PEM; never opens files or sockets.

use std::collections::HashMap;
use std::sync::Arc;

use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Why a certificate could not be used.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// `tls.crt` holds no certificate.
    #[error("tls.crt holds no PEM certificate")]
    NoCertificate,
    /// `tls.key` holds no private key.
    #[error("tls.key holds no PEM private key")]
    NoKey,
    /// The PEM text could not be read.
    #[error("invalid PEM: {0}")]
    Pem(String),
    /// rustls refused the key.
    #[error("unsupported private key: {0}")]
    Key(String),
}

/// Parses a PEM chain and key into a rustls `CertifiedKey`.
pub fn certified_key(cert_pem: &[u8], key_pem: &[u8]) -> Result<Arc<CertifiedKey>, CertError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| CertError::Pem(e.to_string()))?;
    if certs.is_empty() {
        return Err(CertError::NoCertificate);
    }
    let key = match PrivateKeyDer::from_pem_slice(key_pem) {
        Ok(key) => key,
        Err(pem::Error::NoItemsFound) => return Err(CertError::NoKey),
        Err(e) => return Err(CertError::Pem(e.to_string())),
    };
    let signer = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| CertError::Key(e.to_string()))?;
    Ok(Arc::new(CertifiedKey::new(certs, signer)))
}

/// Certificates by host name; wildcards by suffix.
#[derive(Default)]
pub struct CertStore {
    exact: HashMap<String, Arc<CertifiedKey>>,
    wildcard: Vec<(String, Arc<CertifiedKey>)>,
    /// Served when the client sends no SNI (or an unknown one) and exactly one cert exists.
    fallback: Option<Arc<CertifiedKey>>,
}

impl std::fmt::Debug for CertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertStore")
            .field("exact", &self.exact.keys().collect::<Vec<_>>())
            .field(
                "wildcard",
                &self.wildcard.iter().map(|(s, _)| s).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl CertStore {
    /// Adds a certificate for `host` (`name` or `*.suffix`); the first one for a host stays.
    pub fn insert(&mut self, host: &str, cert: Arc<CertifiedKey>) {
        let host = host.to_ascii_lowercase();
        if let Some(suffix) = host.strip_prefix('*') {
            if !self.wildcard.iter().any(|(s, _)| s == suffix) {
                self.wildcard.push((suffix.to_string(), cert));
                self.wildcard.sort_by_key(|w| std::cmp::Reverse(w.0.len()));
            }
        } else {
            self.exact.entry(host).or_insert(cert);
        }
    }

    pub fn finish(&mut self) {
        let mut all = self
            .exact
            .values()
            .chain(self.wildcard.iter().map(|(_, c)| c));
        if let (Some(first), None) = (all.next(), all.next()) {
            self.fallback = Some(first.clone());
        }
    }

    pub fn resolve(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        if let Some(name) = sni {
            let name = name.to_ascii_lowercase();
            if let Some(c) = self.exact.get(&name) {
                return Some(c.clone());
            }
            if let Some((_, c)) = self
                .wildcard
                .iter()
                .find(|(s, _)| name.len() > s.len() && name.ends_with(s.as_str()))
            {
                return Some(c.clone());
            }
        }
        self.fallback.clone()
    }

    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.wildcard.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The PEM forms the gateway reads (certificate chain, PKCS#8 key) and the three ways a
    /// Secret can be wrong, each its own error.
    #[test]
    fn certified_key_reads_pem_and_names_what_is_missing() {
        let ck = rcgen::generate_simple_self_signed(vec!["api.example.com".to_string()])
            .expect("rcgen makes a certificate");
        let (cert, key) = (ck.cert.pem(), ck.signing_key.serialize_pem());
        let parsed = certified_key(cert.as_bytes(), key.as_bytes()).expect("a valid pair");
        assert_eq!(parsed.cert.len(), 1);
        assert_eq!(parsed.cert[0].as_ref(), ck.cert.der().as_ref());

        let no_key = certified_key(cert.as_bytes(), cert.as_bytes());
        assert!(
            matches!(no_key, Err(CertError::NoKey)),
            "{:?}",
            no_key.err()
        );
        let no_cert = certified_key(key.as_bytes(), key.as_bytes());
        assert!(
            matches!(no_cert, Err(CertError::NoCertificate)),
            "{:?}",
            no_cert.err()
        );
        let garbage = "-----BEGIN CERTIFICATE-----\n!!!not base64!!!\n-----END CERTIFICATE-----\n";
        let bad = certified_key(garbage.as_bytes(), key.as_bytes());
        assert!(matches!(bad, Err(CertError::Pem(_))), "{:?}", bad.err());
    }
}
