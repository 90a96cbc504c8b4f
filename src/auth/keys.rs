//! The compiled key store: API keys held only as SHA-256 digests, looked up in O(1).
//! Built by `config::compile`; read by the proxy. Never holds or prints a plain key.

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use serde::Serialize;
use sha2::{Digest as _, Sha256};

/// A SHA-256 digest of a key.
pub type KeyDigest = [u8; 32];

/// A plain key on its way through: Debug and Serialize never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretString(String);

impl SecretString {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    /// The plain value, for hashing or for forwarding to an external auth service only.
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn digest(&self) -> KeyDigest {
        digest(self.0.as_bytes())
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretString(<redacted>)")
    }
}

impl Serialize for SecretString {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<redacted>")
    }
}

/// SHA-256 of a key's bytes.
pub fn digest(key: &[u8]) -> KeyDigest {
    Sha256::digest(key).into()
}

/// `sha256:` + the first 8 hex digits of the digest: identifies a key, never reveals it.
pub fn fingerprint(d: &KeyDigest) -> String {
    Fingerprint::of(d).to_string()
}

/// A key's [`fingerprint`], held as the 4 digest bytes it shows (no allocation per key);
/// displays and serializes as `sha256:` + 8 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 4]);

impl Fingerprint {
    pub fn of(d: &KeyDigest) -> Self {
        Self([d[0], d[1], d[2], d[3]])
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d] = self.0;
        write!(f, "sha256:{a:02x}{b:02x}{c:02x}{d:02x}")
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

impl Serialize for Fingerprint {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Parses `sha256:<64 hex>` (either case, as `hex::decode` did). By hand: the hex crate's
/// decoder took a sixth of a 100,000-key compile.
pub fn parse_key_hash(text: &str) -> Option<KeyDigest> {
    /// The value of each hex digit; 0xFF for every other byte.
    const NIBBLE: [u8; 256] = {
        let mut t = [0xFFu8; 256];
        let mut i = 0;
        while i < 10 {
            t[b'0' as usize + i] = i as u8;
            i += 1;
        }
        let mut i = 0;
        while i < 6 {
            t[b'a' as usize + i] = 10 + i as u8;
            t[b'A' as usize + i] = 10 + i as u8;
            i += 1;
        }
        t
    };
    let hex_part = text.strip_prefix("sha256:")?.as_bytes();
    if hex_part.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    let mut invalid = 0u8;
    for (byte, pair) in out.iter_mut().zip(hex_part.chunks_exact(2)) {
        let (hi, lo) = (NIBBLE[usize::from(pair[0])], NIBBLE[usize::from(pair[1])]);
        invalid |= hi | lo;
        *byte = (hi << 4) | (lo & 0x0F);
    }
    // A valid digit is below 16: any high bit seen means a byte that is not a hex digit.
    (invalid & 0xF0 == 0).then_some(out)
}

/// Digests are already uniformly distributed: use 8 of their bytes as the hash instead of
/// running SipHash over all 32 (measured in `bench/micro/hot_path.rs`, key lookup).
#[derive(Default)]
pub struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // `[u8; 32]` hashes as its bytes (arrays do not write a length prefix).
        for chunk in bytes.chunks(8) {
            let mut buf = [0u8; 8];
            buf[..chunk.len()].copy_from_slice(chunk);
            self.0 ^= u64::from_le_bytes(buf);
            // One round is enough: only the first chunk carries entropy worth keeping distinct,
            // the XOR of the rest keeps the full digest in play for adversarial inputs.
            self.0 = self.0.rotate_left(5);
        }
    }
}

/// Limits a key brings (already defaulted by `compile`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KeyLimits {
    pub requests_per_minute: u32,
    pub burst: u32,
    pub tokens_per_minute: Option<u64>,
}

/// One usable key, by digest.
#[derive(Debug, Serialize)]
pub struct KeyEntry {
    /// `namespace/name` of the AgentApiKey (or `ext-auth` for keys admitted by the auth service).
    pub id: Arc<str>,
    pub namespace: Arc<str>,
    pub client_id: Arc<str>,
    /// Shared between keys with the same roles.
    pub roles: Arc<[Arc<str>]>,
    /// Unix seconds after which the key no longer works.
    pub expires_at: Option<i64>,
    pub limits: KeyLimits,
    pub fingerprint: Fingerprint,
}

impl KeyEntry {
    pub fn has_any_role(&self, wanted: &[Arc<str>]) -> bool {
        wanted.is_empty() || wanted.iter().any(|w| self.roles.iter().any(|r| r == w))
    }
    pub fn expired_at(&self, now_unix: i64) -> bool {
        self.expires_at.is_some_and(|t| now_unix >= t)
    }
}

/// Keys by digest.
#[derive(Debug, Default)]
pub struct KeyStore {
    by_digest: HashMap<KeyDigest, Arc<KeyEntry>, BuildHasherDefault<DigestHasher>>,
}

impl KeyStore {
    /// An empty store with room for `n` keys (compile knows how many it may insert).
    pub fn with_capacity(n: usize) -> Self {
        Self {
            by_digest: HashMap::with_capacity_and_hasher(n, BuildHasherDefault::default()),
        }
    }
    pub fn insert(&mut self, d: KeyDigest, entry: Arc<KeyEntry>) -> bool {
        use std::collections::hash_map::Entry;
        match self.by_digest.entry(d) {
            Entry::Occupied(_) => false,
            Entry::Vacant(v) => {
                v.insert(entry);
                true
            }
        }
    }
    pub fn get(&self, d: &KeyDigest) -> Option<&Arc<KeyEntry>> {
        self.by_digest.get(d)
    }
    /// Looks a plain key up by its digest.
    pub fn lookup(&self, plain: &[u8]) -> Option<&Arc<KeyEntry>> {
        self.by_digest.get(&digest(plain))
    }
    pub fn len(&self) -> usize {
        self.by_digest.len()
    }
    pub fn is_empty(&self) -> bool {
        self.by_digest.is_empty()
    }
    pub fn entries(&self) -> impl Iterator<Item = &Arc<KeyEntry>> {
        self.by_digest.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_string_never_prints() {
        let s = SecretString::new("super-secret-value");
        assert!(!format!("{s:?}").contains("super"));
        assert!(!serde_json::to_string(&s)
            .unwrap_or_default()
            .contains("super"));
    }

    #[test]
    fn key_hash_round_trip() {
        let d = digest(b"abc");
        let text = format!("sha256:{}", hex::encode(d));
        assert_eq!(parse_key_hash(&text), Some(d));
        assert_eq!(parse_key_hash("sha256:zz"), None);
        assert_eq!(
            parse_key_hash(&text.to_uppercase().replace("SHA", "sha")),
            Some(d)
        );
        assert_eq!(parse_key_hash(&format!("{text}0")), None);
        assert_eq!(parse_key_hash(&text[..text.len() - 2]), None);
        assert_eq!(parse_key_hash(&text.replace("sha256:", "sha256: ")), None);
        let mut bad = text.clone().into_bytes();
        bad[20] = b'g';
        assert_eq!(
            parse_key_hash(&String::from_utf8(bad).unwrap_or_default()),
            None
        );
        assert_eq!(fingerprint(&d), "sha256:ba7816bf");
        let fp = Fingerprint::of(&d);
        assert_eq!(format!("{fp:?}"), "\"sha256:ba7816bf\"");
        assert_eq!(
            serde_json::to_string(&fp).unwrap_or_default(),
            "\"sha256:ba7816bf\""
        );
    }
}
