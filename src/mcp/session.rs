//! Sealed MCP session ids: the `Mcp-Session-Id` a client sees is minted by the gateway and holds,
//! encrypted and authenticated, which backend and endpoint the session lives on and the
//! upstream server's own session id. Any replica with the keys routes any session; no store.
//!
//! Layout of an id: base64url (no padding) of `nonce (24) || ciphertext || tag (16)`, sealed with
//! XChaCha20-Poly1305 under the first key, the route's id as associated data (an id presented on
//! another route does not open). The plaintext is `version (1) || backend id length (1) ||
//! backend id || address || upstream session id`, the address as `4 || ipv4 (4) || port (2)` or
//! `6 || ipv6 (16) || port (2)`. A federated session (one upstream session per server) is
//! `2 || count (1)` and, per server, the same fields with the upstream id's length (2) before
//! it. Sealing and opening work in place on stack buffers (no allocation for the crypto).
//! Random 192-bit nonces never repeat in practice, whatever the
//! number of sessions sealed under one key.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{Tag, XChaCha20Poly1305, XNonce};

const VERSION: u8 = 1;
/// A federated session: several upstream sessions.
const VERSION_MANY: u8 = 2;
const NONCE: usize = 24;
const TAG: usize = 16;
/// Longest id accepted for opening (an upstream id of up to ~700 bytes): a bigger header is
/// refused before any decoding.
pub const MAX_SEALED_LEN: usize = 1024;

/// Where a session lives, as sealed in its id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionTarget {
    /// The backend's id (`CompiledBackend::id`).
    pub backend: String,
    /// The endpoint the upstream session was made on.
    pub endpoint: SocketAddr,
    /// The upstream server's `Mcp-Session-Id` (visible ASCII, as the spec requires).
    pub upstream_id: String,
}

/// Why the session key material cannot be used.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("holds no key")]
    Empty,
    /// Line numbers start at 1; the key itself is never shown.
    #[error("line {0} is not 32 bytes in standard base64")]
    BadKey(usize),
}

/// The session keys, newest first: the first seals, every one opens.
#[derive(Clone)]
pub struct SessionKeys {
    keys: Vec<XChaCha20Poly1305>,
}

impl fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key material.
        f.debug_struct("SessionKeys")
            .field("keys", &self.keys.len())
            .finish()
    }
}

impl SessionKeys {
    /// From the Secret's `keys` entry: one key per line, each 32 bytes in standard base64,
    /// newest first. Blank lines are skipped.
    pub fn parse(text: &[u8]) -> Result<Self, KeyError> {
        let text = String::from_utf8_lossy(text);
        let mut keys = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let raw = STANDARD.decode(line).map_err(|_| KeyError::BadKey(i + 1))?;
            let key: [u8; 32] = raw.try_into().map_err(|_| KeyError::BadKey(i + 1))?;
            keys.push(XChaCha20Poly1305::new(&key.into()));
        }
        if keys.is_empty() {
            return Err(KeyError::Empty);
        }
        Ok(Self { keys })
    }

    /// One random key (no `--mcp-session-secret`): sessions survive neither a restart nor a
    /// second replica.
    pub fn random() -> Self {
        let key: [u8; 32] = rand::random();
        Self {
            keys: vec![XChaCha20Poly1305::new(&key.into())],
        }
    }

    /// The id the client sees for a session on `target`, on the route `route_id`.
    pub fn seal(&self, route_id: &str, target: &SessionTarget) -> Option<String> {
        let mut plain =
            Vec::with_capacity(2 + target.backend.len() + 19 + target.upstream_id.len());
        plain.push(VERSION);
        push_target(&mut plain, target, false)?;
        self.seal_plain(route_id, plain)
    }

    /// The id of a federated session: one upstream session per server (in any order; a server
    /// that did not answer `initialize` has none).
    pub fn seal_many(&self, route_id: &str, targets: &[SessionTarget]) -> Option<String> {
        let mut plain = Vec::with_capacity(
            2 + targets
                .iter()
                .map(|t| 23 + t.backend.len() + t.upstream_id.len())
                .sum::<usize>(),
        );
        plain.push(VERSION_MANY);
        plain.push(u8::try_from(targets.len()).ok()?);
        for t in targets {
            push_target(&mut plain, t, true)?;
        }
        self.seal_plain(route_id, plain)
    }

    /// Encrypts in place (one allocation for the plaintext, one for the id).
    fn seal_plain(&self, route_id: &str, mut plain: Vec<u8>) -> Option<String> {
        let key = self.keys.first()?;
        let nonce_bytes: [u8; NONCE] = rand::random();
        let tag = key
            .encrypt_in_place_detached(
                XNonce::from_slice(&nonce_bytes),
                route_id.as_bytes(),
                &mut plain,
            )
            .ok()?;
        let total = NONCE + plain.len() + TAG;
        if total.div_ceil(3) * 4 > MAX_SEALED_LEN {
            // It would not open: no id rather than one refused later.
            return None;
        }
        let mut joined = [0u8; MAX_SEALED_LEN];
        let buf = joined.get_mut(..total)?;
        buf[..NONCE].copy_from_slice(&nonce_bytes);
        buf[NONCE..NONCE + plain.len()].copy_from_slice(&plain);
        buf[NONCE + plain.len()..].copy_from_slice(&tag);
        let mut out = String::with_capacity(total.div_ceil(3) * 4);
        URL_SAFE_NO_PAD.encode_string(&*buf, &mut out);
        Some(out)
    }

    /// Decrypts into a stack buffer: no allocation before the id is known to be genuine.
    fn open_plain<'b>(
        &self,
        route_id: &str,
        id: &[u8],
        buf: &'b mut [u8; MAX_SEALED_LEN],
    ) -> Option<&'b [u8]> {
        if id.len() > MAX_SEALED_LEN {
            return None;
        }
        let n = URL_SAFE_NO_PAD.decode_slice(id, &mut buf[..]).ok()?;
        if n < NONCE + TAG {
            return None;
        }
        let (nonce, rest) = buf[..n].split_at_mut(NONCE);
        let (sealed, tag) = rest.split_at_mut(n - NONCE - TAG);
        let nonce = XNonce::from_slice(nonce);
        let tag = Tag::from_slice(tag);
        // A failed attempt leaves the buffer as it was (the tag is checked before decrypting).
        let opened = self.keys.iter().any(|k| {
            k.decrypt_in_place_detached(nonce, route_id.as_bytes(), sealed, tag)
                .is_ok()
        });
        opened.then(|| &buf[NONCE..n - TAG])
    }

    /// The session behind an id, if one of the keys opens it for this route. `None` for a
    /// forged, tampered, foreign (another route) or retired-key id, and for a federated one.
    pub fn open(&self, route_id: &str, id: &[u8]) -> Option<SessionTarget> {
        let mut buf = [0u8; MAX_SEALED_LEN];
        let plain = self.open_plain(route_id, id, &mut buf)?;
        let (&version, rest) = plain.split_first()?;
        if version != VERSION {
            return None;
        }
        let (t, rest) = read_target(rest, false)?;
        rest.is_empty().then_some(t)
    }

    /// The upstream sessions of a federated session id (see [`Self::seal_many`]).
    pub fn open_many(&self, route_id: &str, id: &[u8]) -> Option<Vec<SessionTarget>> {
        let mut buf = [0u8; MAX_SEALED_LEN];
        let plain = self.open_plain(route_id, id, &mut buf)?;
        let (&version, rest) = plain.split_first()?;
        if version != VERSION_MANY {
            return None;
        }
        let (&count, mut rest) = rest.split_first()?;
        let mut out = Vec::with_capacity(usize::from(count));
        for _ in 0..count {
            let (t, r) = read_target(rest, true)?;
            out.push(t);
            rest = r;
        }
        rest.is_empty().then_some(out)
    }
}

/// `backend id length (1) || backend id || address || [upstream id length (2)] || upstream id`.
fn push_target(plain: &mut Vec<u8>, target: &SessionTarget, sized: bool) -> Option<()> {
    let backend = target.backend.as_bytes();
    plain.push(u8::try_from(backend.len()).ok()?);
    plain.extend_from_slice(backend);
    match target.endpoint.ip() {
        IpAddr::V4(ip) => {
            plain.push(4);
            plain.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            plain.push(6);
            plain.extend_from_slice(&ip.octets());
        }
    }
    plain.extend_from_slice(&target.endpoint.port().to_be_bytes());
    if sized {
        plain.extend_from_slice(&u16::try_from(target.upstream_id.len()).ok()?.to_be_bytes());
    }
    plain.extend_from_slice(target.upstream_id.as_bytes());
    Some(())
}

fn read_target(rest: &[u8], sized: bool) -> Option<(SessionTarget, &[u8])> {
    let (&blen, rest) = rest.split_first()?;
    let (backend, rest) = rest.split_at_checked(usize::from(blen))?;
    let (&family, rest) = rest.split_first()?;
    let (ip, rest): (IpAddr, &[u8]) = match family {
        4 => {
            let (ip, rest) = rest.split_first_chunk::<4>()?;
            (Ipv4Addr::from(*ip).into(), rest)
        }
        6 => {
            let (ip, rest) = rest.split_first_chunk::<16>()?;
            (Ipv6Addr::from(*ip).into(), rest)
        }
        _ => return None,
    };
    let (port, rest) = rest.split_first_chunk::<2>()?;
    let (upstream, rest) = if sized {
        let (len, rest) = rest.split_first_chunk::<2>()?;
        rest.split_at_checked(usize::from(u16::from_be_bytes(*len)))?
    } else {
        (rest, &[][..])
    };
    Some((
        SessionTarget {
            backend: std::str::from_utf8(backend).ok()?.to_owned(),
            endpoint: SocketAddr::new(ip, u16::from_be_bytes(*port)),
            upstream_id: std::str::from_utf8(upstream).ok()?.to_owned(),
        },
        rest,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_line() -> String {
        STANDARD.encode(rand::random::<[u8; 32]>())
    }

    fn target(addr: &str) -> SessionTarget {
        SessionTarget {
            backend: "http://127.0.0.1:9000".into(),
            endpoint: addr.parse().unwrap(),
            upstream_id: "0f1e2d3c4b5a69788796a5b4c3d2e1f0".into(),
        }
    }

    #[test]
    fn an_id_opens_to_what_was_sealed_v4_and_v6() {
        let keys = SessionKeys::parse(key_line().as_bytes()).unwrap();
        for addr in ["10.0.0.7:8080", "[fd00::1]:9000"] {
            let id = keys.seal("ns/route", &target(addr)).unwrap();
            assert!(id.bytes().all(|b| (0x21..=0x7e).contains(&b)), "{id}");
            assert_eq!(
                keys.open("ns/route", id.as_bytes()),
                Some(target(addr)),
                "{addr}"
            );
        }
    }

    #[test]
    fn forged_tampered_foreign_and_retired_ids_do_not_open() {
        let (old, new) = (key_line(), key_line());
        let keys = SessionKeys::parse(old.as_bytes()).unwrap();
        let id = keys.seal("ns/a", &target("10.0.0.1:80")).unwrap();
        // Forged: any base64 of the right size.
        let forged = URL_SAFE_NO_PAD.encode([7u8; 80]);
        assert_eq!(keys.open("ns/a", forged.as_bytes()), None);
        assert_eq!(keys.open("ns/a", b"not base64 at all!"), None);
        // Tampered: one bit flipped anywhere.
        let mut raw = URL_SAFE_NO_PAD.decode(&id).unwrap();
        for i in [0, NONCE, raw.len() - 1] {
            raw[i] ^= 1;
            let t = URL_SAFE_NO_PAD.encode(&raw);
            assert_eq!(keys.open("ns/a", t.as_bytes()), None, "byte {i}");
            raw[i] ^= 1;
        }
        // Foreign: the same id on another route.
        assert_eq!(keys.open("ns/b", id.as_bytes()), None);
        // Rotation: new key first, old still opens; old removed, the id no longer opens.
        let rotated = SessionKeys::parse(format!("{new}\n{old}\n").as_bytes()).unwrap();
        assert!(rotated.open("ns/a", id.as_bytes()).is_some());
        let fresh = rotated.seal("ns/a", &target("10.0.0.1:80")).unwrap();
        let retired = SessionKeys::parse(new.as_bytes()).unwrap();
        assert_eq!(retired.open("ns/a", id.as_bytes()), None);
        assert!(retired.open("ns/a", fresh.as_bytes()).is_some());
        // Oversized input is refused before decoding.
        assert_eq!(keys.open("ns/a", &[b'A'; MAX_SEALED_LEN + 1]), None);
    }

    #[test]
    fn a_federated_id_holds_every_upstream_session() {
        let keys = SessionKeys::parse(key_line().as_bytes()).unwrap();
        let parts = [
            target("10.0.0.7:8080"),
            SessionTarget {
                backend: "agents/jira-mcp:8080".into(),
                endpoint: "[fd00::9]:81".parse().unwrap(),
                upstream_id: String::new(),
            },
            target("10.0.0.8:8080"),
        ];
        let id = keys.seal_many("ns/fed", &parts).unwrap();
        assert_eq!(
            keys.open_many("ns/fed", id.as_bytes()),
            Some(parts.to_vec())
        );
        // The two kinds do not open as each other, nor on another route.
        assert_eq!(keys.open("ns/fed", id.as_bytes()), None);
        assert_eq!(keys.open_many("ns/other", id.as_bytes()), None);
        let single = keys.seal("ns/fed", &parts[0]).unwrap();
        assert_eq!(keys.open_many("ns/fed", single.as_bytes()), None);
        // Too much to seal into an id that would open: no id at all.
        let big = SessionTarget {
            upstream_id: "x".repeat(400),
            ..target("10.0.0.1:1")
        };
        assert_eq!(keys.seal_many("ns/fed", &[big.clone(), big]), None);
    }

    #[test]
    fn key_files_that_cannot_be_used_say_which_line() {
        assert_eq!(SessionKeys::parse(b"\n\n").err(), Some(KeyError::Empty));
        let short = STANDARD.encode([1u8; 16]);
        let text = format!("{}\n{short}\n", key_line());
        assert_eq!(
            SessionKeys::parse(text.as_bytes()).err(),
            Some(KeyError::BadKey(2))
        );
        let keys = SessionKeys::parse(key_line().as_bytes()).unwrap();
        assert_eq!(format!("{keys:?}"), "SessionKeys { keys: 1 }");
    }
}
