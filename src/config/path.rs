//! Request-path normalisation: the one form that is both matched and forwarded.
//! Pure string work; knows nothing of routes.
//!
//! The rules (the user documentation repeats them under "Path normalisation"):
//! - the path must start with `/`;
//! - `%XX` escapes of unreserved characters (`A-Z a-z 0-9 - . _ ~`) are decoded, other escapes are
//!   kept with upper-case hex, and an escaped `/`, `\` or NUL (`%2F`, `%5C`, `%00`) is refused, so a
//!   segment can never hide a separator;
//! - runs of `/` collapse into one;
//! - `.` and `..` segments are resolved (RFC 3986 §5.2.4); `..` above the root is refused;
//! - a `.` or `..` segment carrying `;parameters` (`..;x`, `..%3B`) is refused: servlet-style
//!   backends strip the parameters and would resolve it, the matcher would not;
//! - a raw `\`, control character or space is refused.
//!
//! Because the matcher and the backend see the same bytes, no encoding reaches a route other than
//! the one that was authorised.

use std::borrow::Cow;

/// Why a path was refused (answered with 400).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// The path does not start with `/`.
    #[error("path must start with '/'")]
    NotAbsolute,
    /// A `%` escape is malformed, or encodes a separator or NUL.
    #[error("path holds a forbidden or malformed escape")]
    BadEscape,
    /// A `..` segment climbs above the root.
    #[error("path climbs above the root")]
    AboveRoot,
    /// A backslash, control character or space.
    #[error("path holds a forbidden character")]
    BadCharacter,
    /// A `.` or `..` segment with `;` parameters, which some backends read as the bare dot
    /// segment.
    #[error("path holds a dot segment with parameters")]
    DotSegmentParams,
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Normalises `path` (without the query). Borrows when the path is already normal, which is the
/// common case, so most requests allocate nothing here.
pub fn normalize(path: &str) -> Result<Cow<'_, str>, PathError> {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    let mut needs_work = false;
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'\\' | b' ' | 0..=0x1f | 0x7f => return Err(PathError::BadCharacter),
            b'%' => needs_work = true,
            b'/' => {
                let next = bytes.get(i + 1).copied();
                let next2 = bytes.get(i + 2).copied();
                let next3 = bytes.get(i + 3).copied();
                if next == Some(b'/')
                    || (next == Some(b'.') && matches!(next2, None | Some(b'/' | b';')))
                    || (next == Some(b'.')
                        && next2 == Some(b'.')
                        && matches!(next3, None | Some(b'/' | b';')))
                {
                    needs_work = true;
                }
            }
            _ => {}
        }
    }
    if !needs_work {
        return Ok(Cow::Borrowed(path));
    }

    // Decode unreserved escapes; keep the rest canonical.
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let (Some(h), Some(l)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            ) else {
                return Err(PathError::BadEscape);
            };
            let value = h * 16 + l;
            if matches!(value, b'/' | b'\\' | 0) {
                return Err(PathError::BadEscape);
            }
            if is_unreserved(value) {
                decoded.push(value as char);
            } else {
                decoded.push('%');
                decoded.push(char::from(b"0123456789ABCDEF"[(value >> 4) as usize]));
                decoded.push(char::from(b"0123456789ABCDEF"[(value & 15) as usize]));
            }
            i += 3;
        } else {
            // Multi-byte UTF-8 passes through byte-for-byte: copy the whole char.
            let ch_len = path[i..].chars().next().map_or(1, char::len_utf8);
            decoded.push_str(&path[i..i + ch_len]);
            i += ch_len;
        }
    }

    // Resolve segments.
    let trailing_slash =
        decoded.ends_with('/') || decoded.ends_with("/.") || decoded.ends_with("/..");
    let mut segments: Vec<&str> = Vec::new();
    for seg in decoded.split('/') {
        // `..;x` is `..` to a backend that strips path parameters (`;` raw or escaped).
        let bare = seg.split(';').next().and_then(|s| s.split("%3B").next());
        if matches!(bare, Some("." | "..")) && bare != Some(seg) {
            return Err(PathError::DotSegmentParams);
        }
        match seg {
            "" | "." => {}
            ".." => {
                if segments.pop().is_none() {
                    return Err(PathError::AboveRoot);
                }
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for seg in &segments {
        out.push('/');
        out.push_str(seg);
    }
    if out.is_empty() || trailing_slash {
        out.push('/');
    }
    Ok(Cow::Owned(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(p: &str) -> Result<String, PathError> {
        normalize(p).map(|c| c.into_owned())
    }

    #[test]
    fn normal_paths_are_borrowed() {
        assert!(matches!(normalize("/api/v1/chat"), Ok(Cow::Borrowed(_))));
        assert!(matches!(normalize("/a/b.c/..d"), Ok(Cow::Borrowed(_))));
    }

    #[test]
    fn resolves_dots_and_slashes() {
        assert_eq!(n("/api/v1/tools/../chat"), Ok("/api/v1/chat".into()));
        assert_eq!(n("//api/v1/tools"), Ok("/api/v1/tools".into()));
        assert_eq!(n("/api/./v1//x/"), Ok("/api/v1/x/".into()));
        assert_eq!(n("/api/v1/.."), Ok("/api/".into()));
        assert_eq!(n("/.."), Err(PathError::AboveRoot));
        assert_eq!(n("/a/../../b"), Err(PathError::AboveRoot));
    }

    #[test]
    fn decodes_unreserved_only() {
        assert_eq!(n("/api/v1/%74ools"), Ok("/api/v1/tools".into()));
        assert_eq!(n("/api/%2e%2e/x"), Ok("/x".into()));
        assert_eq!(n("/%2e%2e/x"), Err(PathError::AboveRoot));
        assert_eq!(n("/a/%2e%2E/x"), Ok("/x".into()));
        assert_eq!(n("/a%20b"), Ok("/a%20b".into()));
        assert_eq!(n("/a%3fb"), Ok("/a%3Fb".into()));
        assert_eq!(n("/api%2Fv1"), Err(PathError::BadEscape));
        assert_eq!(n("/api%5cv1"), Err(PathError::BadEscape));
        assert_eq!(n("/api%00"), Err(PathError::BadEscape));
        assert_eq!(n("/api%zz"), Err(PathError::BadEscape));
        assert_eq!(n("/api%4"), Err(PathError::BadEscape));
    }

    #[test]
    fn refuses_dot_segments_with_parameters() {
        assert_eq!(
            n("/api/v1/chat/..;/tools"),
            Err(PathError::DotSegmentParams)
        );
        assert_eq!(n("/a/..;x"), Err(PathError::DotSegmentParams));
        assert_eq!(n("/a/.;x/b"), Err(PathError::DotSegmentParams));
        assert_eq!(n("/a/..%3b/b"), Err(PathError::DotSegmentParams));
        assert_eq!(n("/a/%2e%2e%3B/b"), Err(PathError::DotSegmentParams));
        // Parameters on ordinary segments stay part of the segment.
        assert_eq!(n("/api/v1/tools;x"), Ok("/api/v1/tools;x".into()));
        assert_eq!(n("/a;x/../b"), Ok("/b".into()));
        assert_eq!(n("/a/...;x"), Ok("/a/...;x".into()));
    }

    #[test]
    fn refuses_bad_characters() {
        assert_eq!(n("api"), Err(PathError::NotAbsolute));
        assert_eq!(n("/a\\b"), Err(PathError::BadCharacter));
        assert_eq!(n("/a b"), Err(PathError::BadCharacter));
        assert_eq!(n("/a\tb"), Err(PathError::BadCharacter));
    }

    #[test]
    fn keeps_unicode() {
        assert_eq!(n("/caf\u{e9}//x"), Ok("/caf\u{e9}/x".into()));
    }
}
