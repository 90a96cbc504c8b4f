//! Go-style durations (`50ms`, `30s`, `10m`, `1h30m`), the form Kubernetes users already write.

use std::time::Duration;

/// The pattern the CRD schema enforces; [`parse_duration`] accepts exactly this language.
pub const DURATION_PATTERN: &str = "^([0-9]+(ms|s|m|h))+$";

/// Why a duration string was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DurationError {
    /// The text is empty or does not follow `<number><unit>...` with units ms, s, m, h.
    #[error("invalid duration {0:?}: expected forms like 50ms, 30s, 10m, 1h30m")]
    Invalid(String),
    /// The value does not fit in a `Duration`.
    #[error("duration {0:?} is too large")]
    Overflow(String),
}

/// Parses `DURATION_PATTERN` into a `Duration`.
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    let invalid = || DurationError::Invalid(text.to_string());
    if text.is_empty() {
        return Err(invalid());
    }
    let bytes = text.as_bytes();
    let mut total: u128 = 0;
    let mut i = 0;
    while i < bytes.len() {
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        if start == i {
            return Err(invalid());
        }
        let n: u128 = text[start..i]
            .parse()
            .map_err(|_| DurationError::Overflow(text.to_string()))?;
        let unit_ms: u128 = if text[i..].starts_with("ms") {
            i += 2;
            1
        } else {
            let unit = match bytes.get(i) {
                Some(b's') => 1_000,
                Some(b'm') => 60_000,
                Some(b'h') => 3_600_000,
                _ => return Err(invalid()),
            };
            i += 1;
            unit
        };
        total = n
            .checked_mul(unit_ms)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(|| DurationError::Overflow(text.to_string()))?;
    }
    let ms = u64::try_from(total).map_err(|_| DurationError::Overflow(text.to_string()))?;
    Ok(Duration::from_millis(ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_forms() {
        assert_eq!(parse_duration("50ms"), Ok(Duration::from_millis(50)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1m500ms"), Ok(Duration::from_millis(60_500)));
    }

    #[test]
    fn refuses_everything_else() {
        for bad in ["", "10", "s", "1.5s", "10 s", "-1s", "1d", "1hm"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be refused");
        }
        assert!(matches!(
            parse_duration("99999999999999999999999h"),
            Err(DurationError::Overflow(_))
        ));
    }
}
