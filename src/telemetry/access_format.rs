//! A faster text formatter for the access lines, byte for byte the line tracing-subscriber's
//! default (`Full`) format writes without colours:
//!
//! ```text
//! 2026-11-27T04:32:01.123456Z  INFO tollgate::access: request_id="…" method="GET" … remote=10.0.0.1
//! ```
//!
//! The generic formatter was a third of the gateway's instructions per request with the access
//! log on (BENCHMARKS.md): a calendar computation for every timestamp, and `core::fmt` with
//! `Debug` escaping for every field. Here the date and time to the second are rendered once per
//! second, and a string field that needs no escaping (almost all of them) is copied as it is.
//! Every other event, and every line when colours are on, goes to the default formatter.

use std::cell::RefCell;
use std::fmt::{self, Write as _};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{Format, Full, Writer};
use tracing_subscriber::fmt::time::SystemTime as DefaultTime;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// The target of access lines.
pub const ACCESS_TARGET: &str = "tollgate::access";

/// Access lines fast, everything else as tracing-subscriber's `Full` format writes it.
pub struct AccessFormat {
    inner: Format<Full, DefaultTime>,
}

impl AccessFormat {
    pub fn new(ansi: bool) -> Self {
        Self {
            inner: tracing_subscriber::fmt::format()
                .with_target(true)
                .with_ansi(ansi),
        }
    }
}

impl<S, N> FormatEvent<S, N> for AccessFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        if meta.target() != ACCESS_TARGET
            || *meta.level() != tracing::Level::INFO
            || writer.has_ansi_escapes()
            || ctx.event_scope().is_some()
        {
            return self.inner.format_event(ctx, writer, event);
        }
        write_timestamp(&mut writer, SystemTime::now())?;
        writer.write_str(" INFO tollgate::access: ")?;
        let mut fields = FieldWriter {
            writer: &mut writer,
            first: true,
            result: Ok(()),
        };
        event.record(&mut fields);
        fields.result?;
        writer.write_char('\n')
    }
}

/// Writes the fields as `DefaultFields` does: `name=value` separated by spaces, strings and
/// other values in their `Debug` form.
struct FieldWriter<'a, 'w> {
    writer: &'a mut Writer<'w>,
    first: bool,
    result: fmt::Result,
}

impl FieldWriter<'_, '_> {
    fn name(&mut self, field: &Field) -> fmt::Result {
        if !self.first {
            self.writer.write_char(' ')?;
        }
        self.first = false;
        let name = field.name();
        self.writer
            .write_str(name.strip_prefix("r#").unwrap_or(name))?;
        self.writer.write_char('=')
    }

    fn put(&mut self, field: &Field, value: impl FnOnce(&mut Writer<'_>) -> fmt::Result) {
        if self.result.is_err() || field.name().starts_with("log.") {
            return;
        }
        self.result = self.name(field).and_then(|()| value(self.writer));
    }
}

impl Visit for FieldWriter<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, |w| {
            // `Debug` of a str escapes quotes, backslashes, control and some Unicode characters:
            // printable ASCII without those two needs nothing but the quotes.
            if value
                .bytes()
                .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
            {
                w.write_char('"')?;
                w.write_str(value)?;
                w.write_char('"')
            } else {
                write!(w, "{value:?}")
            }
        });
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, |w| {
            let mut digits = [0u8; 20];
            let mut i = digits.len();
            let mut n = value;
            loop {
                i -= 1;
                digits[i] = b'0' + (n % 10) as u8;
                n /= 10;
                if n == 0 {
                    break;
                }
            }
            w.write_str(std::str::from_utf8(&digits[i..]).map_err(|_| fmt::Error)?)
        });
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, |w| write!(w, "{value:?}"));
    }
}

thread_local! {
    /// The last second rendered (`YYYY-MM-DDTHH:MM:SS`) and its Unix time.
    static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

/// `2026-11-27T04:32:01.123456Z ` (microseconds, UTC, then a space), as tracing-subscriber's
/// `SystemTime` timer writes it.
fn write_timestamp(w: &mut Writer<'_>, now: SystemTime) -> fmt::Result {
    let Ok(since) = now.duration_since(UNIX_EPOCH) else {
        return w.write_str("<unknown time> ");
    };
    let secs = since.as_secs();
    SECOND.with(|cell| {
        let mut cached = cell.borrow_mut();
        if cached.0 != secs {
            let (y, mo, d) = civil_from_days((secs / 86_400) as i64);
            let s = secs % 86_400;
            cached.1.clear();
            write!(
                cached.1,
                "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}",
                s / 3600,
                s / 60 % 60,
                s % 60
            )?;
            cached.0 = secs;
        }
        w.write_str(&cached.1)
    })?;
    let micros = since.subsec_micros();
    let mut frac = *b".000000Z ";
    let mut n = micros;
    for i in (1..7).rev() {
        frac[i] = b'0' + (n % 10) as u8;
        n /= 10;
    }
    w.write_str(std::str::from_utf8(&frac).map_err(|_| fmt::Error)?)
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::fmt::MakeWriter;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Captured {
        type Writer = Captured;
        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    fn emit(status: u16, odd: &str) {
        let ip: std::net::IpAddr = "10.1.2.3".parse().unwrap();
        tracing::info!(
            target: "tollgate::access",
            request_id = "0af7651916cd43dd8448eb211c80319c",
            method = "GET",
            route = odd,
            status = status,
            duration_ms = 0.523_f64,
            upstream = "",
            client_id = "client-a",
            remote = %ip,
        );
        tracing::info!(target: "tollgate::other", answer = 42, "not an access line");
    }

    fn lines(fast: bool, odd: &str) -> Vec<String> {
        let out = Captured::default();
        let builder = tracing_subscriber::fmt()
            .with_target(true)
            .with_ansi(false)
            .with_writer(out.clone());
        let dispatch = if fast {
            tracing::Dispatch::new(builder.event_format(AccessFormat::new(false)).finish())
        } else {
            tracing::Dispatch::new(builder.finish())
        };
        tracing::dispatcher::with_default(&dispatch, || emit(200, odd));
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        text.lines().map(str::to_string).collect()
    }

    #[test]
    fn access_lines_match_the_default_format_byte_for_byte() {
        for odd in [
            "bench/plain",
            "quote\"and\\slash",
            "tab\there",
            "caf\u{e9}",
            "bell\u{7}",
            "",
        ] {
            let (fast, slow) = (lines(true, odd), lines(false, odd));
            assert_eq!(fast.len(), 2, "{fast:?}");
            assert_eq!(slow.len(), 2, "{slow:?}");
            for (f, s) in fast.iter().zip(&slow) {
                // The timestamps differ by the time between the two calls; their shape may not.
                assert_eq!(f.len(), s.len(), "{f}\n{s}");
                assert_eq!(f[27..], s[27..], "{f}\n{s}");
                assert_eq!(&f[..2], &s[..2]);
                assert!(f.as_bytes()[26] == b'Z' && f.as_bytes()[19] == b'.', "{f}");
            }
        }
    }

    #[test]
    fn timestamps_are_rfc3339_utc_with_microseconds() {
        let at = UNIX_EPOCH + std::time::Duration::new(1_795_753_921, 123_456_789);
        // Render through a Writer the way the formatter does.
        let mut s = String::new();
        write_timestamp(&mut Writer::new(&mut s), at).unwrap();
        assert_eq!(s, "2026-11-27T04:32:01.123456Z ");
        let mut s = String::new();
        write_timestamp(&mut Writer::new(&mut s), UNIX_EPOCH).unwrap();
        assert_eq!(s, "1970-01-01T00:00:00.000000Z ");
        // 2000-02-29 and the day after: leap years.
        let mut s = String::new();
        write_timestamp(
            &mut Writer::new(&mut s),
            UNIX_EPOCH + std::time::Duration::from_secs(951_782_400),
        )
        .unwrap();
        assert_eq!(s, "2000-02-29T00:00:00.000000Z ");
        let mut s = String::new();
        write_timestamp(
            &mut Writer::new(&mut s),
            UNIX_EPOCH + std::time::Duration::from_secs(951_868_800),
        )
        .unwrap();
        assert_eq!(s, "2000-03-01T00:00:00.000000Z ");
    }

    #[test]
    fn civil_dates_agree_with_jiff_over_four_centuries() {
        for day in (-200_000i64..200_000).step_by(97) {
            let (y, m, d) = civil_from_days(day);
            let j = jiff::Timestamp::from_second(day * 86_400)
                .unwrap()
                .to_zoned(jiff::tz::TimeZone::UTC)
                .date();
            assert_eq!(
                (y, m, d),
                (j.year() as i64, j.month() as u32, j.day() as u32),
                "day {day}"
            );
        }
    }
}
