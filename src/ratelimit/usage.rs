//! Reads the reported LLM `usage` from a response body as it streams past, in bounded memory.
//! Must not depend on the limiters or HTTP/body types; it sees borrowed chunks, never holds them.
//!
//! It never delays or changes what is forwarded, and never panics, whatever the bytes.
//!
//! Two modes. **JSON**: a copy of the body is kept up to [`JSON_BODY_CAP`] (beyond it the usage is
//! given up and the copy freed), and `usage` is read at the end. **SSE** (`text/event-stream`):
//! `data:` lines are parsed incrementally across chunk boundaries (CR, LF or CRLF line ends, even
//! when split between chunks), multi-line data is joined, and an event is parsed only when it
//! mentions `"usage"`; at most [`SSE_LINE_CAP`] bytes of a line and of an event are kept.
//!
//! Usage objects are read OpenAI-style (`prompt_tokens`, `completion_tokens`, `total_tokens`) or
//! Anthropic/Responses-style (`input_tokens`, `output_tokens`), at the top level of an event or
//! under `response` / `message`. Across events the latest value of each field wins, so OpenAI's
//! final usage chunk and Anthropic's split `message_start` / `message_delta` both add up; a
//! missing total is prompt + completion.

use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

/// Largest JSON body copied to find its `usage` (chat completions are far smaller; larger bodies
/// are not worth holding a copy of: their reservation is charged instead).
pub const JSON_BODY_CAP: usize = 1 << 20;
/// Largest SSE line, and largest event data, kept while parsing (a usage event is < 1 KiB).
pub const SSE_LINE_CAP: usize = 64 << 10;
/// Buffers that grew beyond this are freed after use, so an idle stream holds little memory.
const KEEP_CAPACITY: usize = 4 << 10;
const USAGE_MARKER: &[u8] = b"\"usage\"";
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// Token usage reported by the upstream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Input tokens.
    pub prompt_tokens: u64,
    /// Generated tokens.
    pub completion_tokens: u64,
    /// What the request cost: the reported total, else prompt + completion.
    pub total_tokens: u64,
}

/// Watches a response body for its usage. Feed it every chunk (after forwarding it) with
/// [`UsageObserver::observe`], then call [`UsageObserver::finish`].
#[derive(Debug)]
pub struct UsageObserver {
    mode: Mode,
}

#[derive(Debug)]
enum Mode {
    Json(JsonBody),
    Sse(Box<SseStream>),
    Off,
}

impl UsageObserver {
    /// For a JSON body.
    pub fn json() -> Self {
        Self {
            mode: Mode::Json(JsonBody::default()),
        }
    }

    /// For a `text/event-stream` body.
    pub fn sse() -> Self {
        Self {
            mode: Mode::Sse(Box::default()),
        }
    }

    /// Observes nothing (`finish` gives `None`): for bodies that cannot carry usage, such as
    /// compressed ones.
    pub fn off() -> Self {
        Self { mode: Mode::Off }
    }

    /// The mode for a response `Content-Type`: SSE for `text/event-stream`, JSON for `*/json`,
    /// `*+json` or no type at all, off otherwise.
    pub fn for_content_type(content_type: Option<&str>) -> Self {
        let Some(content_type) = content_type else {
            return Self::json();
        };
        let mime = content_type.split(';').next().unwrap_or_default().trim();
        let ends_with = |suffix: &str| {
            mime.len() >= suffix.len()
                && mime
                    .get(mime.len() - suffix.len()..)
                    .is_some_and(|end| end.eq_ignore_ascii_case(suffix))
        };
        if mime.eq_ignore_ascii_case("text/event-stream") {
            Self::sse()
        } else if ends_with("/json") || ends_with("+json") {
            Self::json()
        } else {
            Self::off()
        }
    }

    /// True unless the observer is off.
    pub fn is_active(&self) -> bool {
        !matches!(self.mode, Mode::Off)
    }

    /// Looks at the next chunk of the body.
    pub fn observe(&mut self, chunk: &[u8]) {
        match &mut self.mode {
            Mode::Json(body) => body.observe(chunk),
            Mode::Sse(stream) => stream.observe(chunk),
            Mode::Off => {}
        }
    }

    /// The usage the body reported, if any was found.
    pub fn finish(self) -> Option<Usage> {
        match self.mode {
            Mode::Json(body) => body.finish(),
            Mode::Sse(stream) => stream.finish(),
            Mode::Off => None,
        }
    }
}

#[derive(Debug, Default)]
struct JsonBody {
    copy: Vec<u8>,
    overflowed: bool,
}

impl JsonBody {
    fn observe(&mut self, chunk: &[u8]) {
        if self.overflowed {
            return;
        }
        if chunk.len() > JSON_BODY_CAP.saturating_sub(self.copy.len()) {
            self.overflowed = true;
            self.copy = Vec::new();
            return;
        }
        self.copy.extend_from_slice(chunk);
    }

    fn finish(self) -> Option<Usage> {
        if self.overflowed || !contains(&self.copy, USAGE_MARKER) {
            return None;
        }
        let mut parts = UsageParts::default();
        parts.merge(parse_usage(&self.copy)?);
        parts.usage()
    }
}

#[derive(Debug, Default)]
struct SseStream {
    /// The start of a line whose end has not arrived yet.
    line: Vec<u8>,
    /// The current line is longer than the cap: it is skipped.
    line_overflow: bool,
    /// The previous chunk ended with CR: a LF at the start of the next one ends no new line.
    after_cr: bool,
    /// A line has been seen (a byte-order mark is skipped only before the first).
    started: bool,
    /// Data of the current event, lines joined by LF.
    data: Vec<u8>,
    has_data: bool,
    /// The current event is too large (or lost a line): it is skipped.
    data_overflow: bool,
    usage: UsageParts,
}

impl SseStream {
    fn observe(&mut self, chunk: &[u8]) {
        let mut rest = chunk;
        if self.after_cr && !rest.is_empty() {
            self.after_cr = false;
            if let Some((b'\n', tail)) = rest.split_first() {
                rest = tail;
            }
        }
        while !rest.is_empty() {
            let Some(end) = rest.iter().position(|&b| b == b'\n' || b == b'\r') else {
                self.push_partial(rest);
                return;
            };
            let (head, tail) = rest.split_at(end);
            let Some((&eol, mut after)) = tail.split_first() else {
                return;
            };
            if self.line.is_empty() && !self.line_overflow {
                self.line_done(head);
            } else {
                self.push_partial(head);
                self.partial_done();
            }
            if eol == b'\r' {
                match after.split_first() {
                    Some((b'\n', tail)) => after = tail,
                    Some(_) => {}
                    None => self.after_cr = true,
                }
            }
            rest = after;
        }
    }

    fn finish(mut self) -> Option<Usage> {
        if !self.line.is_empty() || self.line_overflow {
            self.partial_done();
        }
        // A stream may end without the blank line after its last event: read that event too.
        self.dispatch();
        self.usage.usage()
    }

    fn push_partial(&mut self, bytes: &[u8]) {
        if self.line_overflow {
            return;
        }
        if bytes.len() > SSE_LINE_CAP.saturating_sub(self.line.len()) {
            self.line_overflow = true;
            self.line = Vec::new();
            return;
        }
        self.line.extend_from_slice(bytes);
    }

    /// The carried-over line is complete.
    fn partial_done(&mut self) {
        let line = std::mem::take(&mut self.line);
        if std::mem::replace(&mut self.line_overflow, false) {
            // Part of the event is lost: whatever it says cannot be trusted.
            self.started = true;
            self.data_overflow = true;
            self.has_data = true;
        } else {
            self.line_done(&line);
        }
        if line.capacity() <= KEEP_CAPACITY {
            self.line = line;
            self.line.clear();
        }
    }

    fn line_done(&mut self, line: &[u8]) {
        let line = if self.started {
            line
        } else {
            self.started = true;
            line.strip_prefix(BOM).unwrap_or(line)
        };
        if line.is_empty() {
            self.dispatch();
            return;
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(0) => return, // a comment
            Some(colon) => {
                let (field, value) = line.split_at(colon);
                let value = value.get(1..).unwrap_or_default();
                (field, value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &[][..]),
        };
        if field == b"data" {
            self.push_data(value);
        }
    }

    fn push_data(&mut self, value: &[u8]) {
        if self.data_overflow {
            return;
        }
        let separator = usize::from(self.has_data);
        self.has_data = true;
        if value.len().saturating_add(separator) > SSE_LINE_CAP.saturating_sub(self.data.len()) {
            self.data_overflow = true;
            self.data = Vec::new();
            return;
        }
        if separator == 1 {
            self.data.push(b'\n');
        }
        self.data.extend_from_slice(value);
    }

    /// The current event is complete.
    fn dispatch(&mut self) {
        if self.has_data && !self.data_overflow && contains(&self.data, USAGE_MARKER) {
            if let Some(raw) = parse_usage(&self.data) {
                self.usage.merge(raw);
            }
        }
        self.has_data = false;
        self.data_overflow = false;
        if self.data.capacity() > KEEP_CAPACITY {
            self.data = Vec::new();
        } else {
            self.data.clear();
        }
    }
}

/// True when `needle` (non-empty) occurs in `haystack`.
fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    let Some((&first, tail)) = needle.split_first() else {
        return true;
    };
    let mut from = 0;
    while let Some(found) = haystack
        .get(from..)
        .and_then(|h| h.iter().position(|&b| b == first))
    {
        let start = from + found;
        if haystack
            .get(start + 1..)
            .is_some_and(|after| after.starts_with(tail))
        {
            return true;
        }
        from = start + 1;
    }
    false
}

/// The fields of one usage object, each absent unless reported.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct RawUsage {
    prompt: Option<u64>,
    completion: Option<u64>,
    total: Option<u64>,
}

/// What the events reported so far: the latest value of each field.
#[derive(Clone, Copy, Debug, Default)]
struct UsageParts {
    prompt: Option<u64>,
    completion: Option<u64>,
    total: Option<u64>,
}

impl UsageParts {
    fn merge(&mut self, raw: RawUsage) {
        if raw == RawUsage::default() {
            return;
        }
        self.prompt = raw.prompt.or(self.prompt);
        self.completion = raw.completion.or(self.completion);
        // A total belongs to the event that carried it; a later event without one recomputes it.
        self.total = raw.total;
    }

    fn usage(&self) -> Option<Usage> {
        if self.prompt.is_none() && self.completion.is_none() && self.total.is_none() {
            return None;
        }
        let prompt_tokens = self.prompt.unwrap_or(0);
        let completion_tokens = self.completion.unwrap_or(0);
        Some(Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: self
                .total
                .unwrap_or_else(|| prompt_tokens.saturating_add(completion_tokens)),
        })
    }
}

/// The usage object of a JSON document: its own `usage`, else one under `response`/`message`.
fn parse_usage(json: &[u8]) -> Option<RawUsage> {
    serde_json::from_slice::<UsageHolder>(json).ok()?.0
}

/// A JSON value that may hold a usage object; any other shape holds none.
struct UsageHolder(Option<RawUsage>);

impl<'de> Deserialize<'de> for UsageHolder {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(HolderVisitor)
    }
}

struct HolderVisitor;

impl<'de> Visitor<'de> for HolderVisitor {
    type Value = UsageHolder;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<UsageHolder, A::Error> {
        let mut own = None;
        let mut nested = None;
        while let Some(key) = map.next_key::<Key>()? {
            match key {
                Key::Usage => own = map.next_value::<UsageObject>()?.0.or(own),
                Key::Holder => nested = map.next_value::<UsageHolder>()?.0.or(nested),
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(UsageHolder(own.or(nested)))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<UsageHolder, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(UsageHolder(None))
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<UsageHolder, E> {
        Ok(UsageHolder(None))
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<UsageHolder, E> {
        Ok(UsageHolder(None))
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<UsageHolder, E> {
        Ok(UsageHolder(None))
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<UsageHolder, E> {
        Ok(UsageHolder(None))
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<UsageHolder, E> {
        Ok(UsageHolder(None))
    }

    fn visit_unit<E: de::Error>(self) -> Result<UsageHolder, E> {
        Ok(UsageHolder(None))
    }
}

/// The value of a `usage` member: an object of counts, or anything else (no usage).
struct UsageObject(Option<RawUsage>);

impl<'de> Deserialize<'de> for UsageObject {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ObjectVisitor;
        impl<'de> Visitor<'de> for ObjectVisitor {
            type Value = UsageObject;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a usage object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<UsageObject, A::Error> {
                let mut raw = RawUsage::default();
                while let Some(key) = map.next_key::<Key>()? {
                    let slot = match key {
                        Key::Prompt => &mut raw.prompt,
                        Key::Completion => &mut raw.completion,
                        Key::Total => &mut raw.total,
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                            continue;
                        }
                    };
                    *slot = map.next_value::<Count>()?.0.or(*slot);
                }
                Ok(UsageObject(Some(raw)))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<UsageObject, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(UsageObject(None))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<UsageObject, E> {
                Ok(UsageObject(None))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<UsageObject, E> {
                Ok(UsageObject(None))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<UsageObject, E> {
                Ok(UsageObject(None))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<UsageObject, E> {
                Ok(UsageObject(None))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<UsageObject, E> {
                Ok(UsageObject(None))
            }
            fn visit_unit<E: de::Error>(self) -> Result<UsageObject, E> {
                Ok(UsageObject(None))
            }
        }
        deserializer.deserialize_any(ObjectVisitor)
    }
}

/// A token count: a non-negative integer (a float is rounded up); anything else counts as absent.
struct Count(Option<u64>);

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct CountVisitor;
        impl<'de> Visitor<'de> for CountVisitor {
            type Value = Count;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a token count")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Count, E> {
                Ok(Count(Some(v)))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Count, E> {
                Ok(Count(u64::try_from(v).ok()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Count, E> {
                // `as` saturates and maps NaN to 0; a negative count is absent.
                Ok(Count((v >= 0.0).then(|| v.ceil() as u64)))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Count, E> {
                Ok(Count(None))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Count, E> {
                Ok(Count(None))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Count, E> {
                Ok(Count(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Count, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Count(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Count, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Count(None))
            }
        }
        deserializer.deserialize_any(CountVisitor)
    }
}

/// Member names that matter here.
enum Key {
    Usage,
    Holder,
    Prompt,
    Completion,
    Total,
    Other,
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl Visitor<'_> for KeyVisitor {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a member name")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key, E> {
                Ok(match v {
                    "usage" => Key::Usage,
                    "response" | "message" => Key::Holder,
                    "prompt_tokens" | "input_tokens" => Key::Prompt,
                    "completion_tokens" | "output_tokens" => Key::Completion,
                    "total_tokens" => Key::Total,
                    _ => Key::Other,
                })
            }
        }
        deserializer.deserialize_identifier(KeyVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPENAI_STREAM: &str = concat!(
        ": keep-alive\n\n",
        "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}],\"usage\":null}\n\n",
        "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hello \\\"usage\\\" world\"}}],\"usage\":null}\n\n",
        "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n",
        "data: {\"id\":\"c1\",\"choices\":[],\"usage\":{\"prompt_tokens\":17,\"completion_tokens\":5,\"total_tokens\":22,\"prompt_tokens_details\":{\"cached_tokens\":0}}}\n\n",
        "data: [DONE]\n\n",
    );

    const OPENAI_USAGE: Usage = Usage {
        prompt_tokens: 17,
        completion_tokens: 5,
        total_tokens: 22,
    };

    fn feed(mut observer: UsageObserver, chunks: &[&[u8]]) -> Option<Usage> {
        for chunk in chunks {
            observer.observe(chunk);
        }
        observer.finish()
    }

    /// The usage found for `body` split at every point into two chunks, and byte by byte;
    /// asserts they all agree and returns it.
    fn every_split(make: fn() -> UsageObserver, body: &[u8]) -> Option<Usage> {
        let whole = feed(make(), &[body]);
        for at in 0..=body.len() {
            let (a, b) = body.split_at(at);
            assert_eq!(feed(make(), &[a, b]), whole, "split at {at}");
            assert_eq!(
                feed(make(), &[a, &[], b, &[]]),
                whole,
                "split at {at} with empty chunks"
            );
        }
        let bytes: Vec<&[u8]> = body.chunks(1).collect();
        assert_eq!(feed(make(), &bytes), whole, "byte by byte");
        for size in [2, 3, 7, 64] {
            let chunks: Vec<&[u8]> = body.chunks(size).collect();
            assert_eq!(feed(make(), &chunks), whole, "chunks of {size}");
        }
        whole
    }

    #[test]
    fn sse_usage_at_every_split_point() {
        assert_eq!(
            every_split(UsageObserver::sse, OPENAI_STREAM.as_bytes()),
            Some(OPENAI_USAGE)
        );
        let crlf = OPENAI_STREAM.replace('\n', "\r\n");
        assert_eq!(
            every_split(UsageObserver::sse, crlf.as_bytes()),
            Some(OPENAI_USAGE)
        );
        let cr = OPENAI_STREAM.replace('\n', "\r");
        assert_eq!(
            every_split(UsageObserver::sse, cr.as_bytes()),
            Some(OPENAI_USAGE)
        );
    }

    #[test]
    fn sse_without_usage_reports_none() {
        let without: String = OPENAI_STREAM
            .split_inclusive("\n\n")
            .filter(|event| !event.contains("prompt_tokens"))
            .collect();
        assert_eq!(every_split(UsageObserver::sse, without.as_bytes()), None);
        assert_eq!(
            feed(UsageObserver::sse(), &[b"data: {\"usage\":{}}\n\n"]),
            None
        );
        assert_eq!(
            feed(UsageObserver::sse(), &[b"data: {\"usage\":\"n/a\"}\n\n"]),
            None
        );
        assert_eq!(feed(UsageObserver::sse(), &[]), None);
    }

    #[test]
    fn sse_multi_line_data_split_inside_crlf_is_one_event() {
        // The usage JSON spans two data lines; a CR at a chunk end followed by LF in the next chunk
        // must not be read as a blank line (which would split the event).
        let chunks: [&[u8]; 4] = [
            b"event: done\r\ndata: {\"usage\":\r",
            b"\ndata: {\"prompt_tokens\":3,\"completion_tokens\":4}}\r",
            b"\n\r",
            b"\n",
        ];
        assert_eq!(
            feed(UsageObserver::sse(), &chunks),
            Some(Usage {
                prompt_tokens: 3,
                completion_tokens: 4,
                total_tokens: 7
            })
        );
    }

    #[test]
    fn sse_field_syntax_variants() {
        let body = "\u{feff}data:{\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":1,\"total_tokens\":2}}\n\ndata\n\n";
        assert_eq!(
            every_split(UsageObserver::sse, body.as_bytes()),
            Some(Usage {
                prompt_tokens: 1,
                completion_tokens: 1,
                total_tokens: 2
            })
        );
        // "data" must be the whole field name; the last event needs no trailing blank line.
        let body = "datax: {\"usage\":{\"total_tokens\":9}}\n\nid: 1\ndata: {\"usage\":{\"total_tokens\":4}}";
        assert_eq!(
            every_split(UsageObserver::sse, body.as_bytes()),
            Some(Usage {
                prompt_tokens: 0,
                completion_tokens: 0,
                total_tokens: 4
            })
        );
    }

    #[test]
    fn anthropic_stream_adds_up_its_split_usage() {
        let body = concat!(
            "event: message_start\n",
            "data: {\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\n",
            "event: content_block_delta\n",
            "data: {\"type\":\"content_block_delta\",\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\n",
            "event: message_delta\n",
            "data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":15}}\n\n",
            "event: message_stop\n",
            "data: {\"type\":\"message_stop\"}\n\n",
        );
        assert_eq!(
            every_split(UsageObserver::sse, body.as_bytes()),
            Some(Usage {
                prompt_tokens: 25,
                completion_tokens: 15,
                total_tokens: 40
            })
        );
    }

    #[test]
    fn responses_api_usage_is_read_under_response() {
        let body = concat!(
            "event: response.output_text.delta\n",
            "data: {\"type\":\"response.output_text.delta\",\"delta\":\"4\"}\n\n",
            "event: response.completed\n",
            "data: {\"type\":\"response.completed\",\"response\":{\"id\":\"r\",\"usage\":{\"input_tokens\":10,\"output_tokens\":2,\"total_tokens\":12}}}\n\n",
        );
        assert_eq!(
            every_split(UsageObserver::sse, body.as_bytes()),
            Some(Usage {
                prompt_tokens: 10,
                completion_tokens: 2,
                total_tokens: 12
            })
        );
    }

    #[test]
    fn oversized_sse_lines_are_skipped_in_bounded_memory() {
        let mut observer = UsageObserver::sse();
        observer.observe(b"data: {\"usage\":{\"prompt_tokens\":1000000},\"pad\":\"");
        let pad = vec![b'x'; 8 << 10];
        for _ in 0..20 {
            observer.observe(&pad);
        }
        observer.observe(b"\"}\n\n");
        if let Mode::Sse(stream) = &observer.mode {
            assert!(
                stream.line.capacity() <= KEEP_CAPACITY && stream.data.capacity() <= KEEP_CAPACITY
            );
        }
        // The oversized event is ignored; the next one is read.
        observer.observe(b"data: {\"usage\":{\"prompt_tokens\":2,\"completion_tokens\":3}}\n\n");
        assert_eq!(
            observer.finish(),
            Some(Usage {
                prompt_tokens: 2,
                completion_tokens: 3,
                total_tokens: 5
            })
        );

        // An event made of many data lines is capped as a whole.
        let mut observer = UsageObserver::sse();
        observer.observe(b"data: {\"usage\":{\"total_tokens\":1},\n");
        for _ in 0..10_000 {
            observer.observe(b"data: \"pad\":\"xxxxxxxxxxxxxxxx\",\n");
        }
        observer.observe(b"data: \"end\":1}\n\n");
        assert_eq!(observer.finish(), None);
    }

    #[test]
    fn json_body_usage_at_every_split_point() {
        let body = br#"{"id":"c","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"Hi there"},"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":12,"total_tokens":21}}"#;
        assert_eq!(
            every_split(UsageObserver::json, body),
            Some(Usage {
                prompt_tokens: 9,
                completion_tokens: 12,
                total_tokens: 21
            })
        );
        let anthropic = br#"{"id":"m","type":"message","content":[{"type":"text","text":"x"}],"usage":{"input_tokens":4,"output_tokens":6}}"#;
        assert_eq!(
            every_split(UsageObserver::json, anthropic),
            Some(Usage {
                prompt_tokens: 4,
                completion_tokens: 6,
                total_tokens: 10
            })
        );
    }

    #[test]
    fn json_body_without_usage_or_too_large_reports_none() {
        assert_eq!(feed(UsageObserver::json(), &[br#"{"choices":[]}"#]), None);
        assert_eq!(feed(UsageObserver::json(), &[br#"{"usage":null}"#]), None);
        assert_eq!(
            feed(UsageObserver::json(), &[br#"{"error":{"message":"bad"}}"#]),
            None
        );
        assert_eq!(
            feed(UsageObserver::json(), &[br#"{"usage":{"total_tokens":5}"#]),
            None
        );
        assert_eq!(feed(UsageObserver::json(), &[b"<html>usage</html>"]), None);
        assert_eq!(
            feed(
                UsageObserver::json(),
                &[b"[1,2,{\"usage\":{\"total_tokens\":1}}]"]
            ),
            None
        );
        let mut observer = UsageObserver::json();
        observer.observe(br#"{"usage":{"total_tokens":5},"pad":""#);
        let pad = vec![b'x'; 64 << 10];
        for _ in 0..17 {
            observer.observe(&pad);
        }
        observer.observe(br#""}"#);
        assert_eq!(observer.finish(), None);
        // Odd counts: floats round up, negatives and strings are absent.
        assert_eq!(
            feed(
                UsageObserver::json(),
                &[br#"{"usage":{"prompt_tokens":1.5,"completion_tokens":-1,"total_tokens":"7"}}"#]
            ),
            Some(Usage {
                prompt_tokens: 2,
                completion_tokens: 0,
                total_tokens: 2
            })
        );
    }

    #[test]
    fn content_type_picks_the_mode() {
        let sse = [
            Some("text/event-stream"),
            Some("Text/Event-Stream; charset=utf-8"),
        ];
        for ct in sse {
            assert!(
                matches!(UsageObserver::for_content_type(ct).mode, Mode::Sse(_)),
                "{ct:?}"
            );
        }
        let json = [
            None,
            Some("application/json"),
            Some("application/problem+json ; q=1"),
            Some("APPLICATION/JSON"),
        ];
        for ct in json {
            assert!(
                matches!(UsageObserver::for_content_type(ct).mode, Mode::Json(_)),
                "{ct:?}"
            );
        }
        for ct in [
            Some("text/html"),
            Some(""),
            Some("json"),
            Some("\u{e9}/json"),
        ] {
            let observer = UsageObserver::for_content_type(ct);
            assert!(!matches!(observer.mode, Mode::Sse(_)), "{ct:?}");
            let _ = observer.is_active();
        }
        let mut off = UsageObserver::off();
        off.observe(b"data: {\"usage\":{\"total_tokens\":1}}\n\n");
        assert!(!off.is_active());
        assert_eq!(off.finish(), None);
    }

    /// A small deterministic generator (xorshift) for garbage input.
    struct Noise(u64);

    impl Noise {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    #[test]
    fn garbage_never_panics() {
        // Bytes drawn from an alphabet rich in the characters the parsers care about.
        const ALPHABET: &[u8] =
            b"data:usage\"{}[],:0123456789 \r\n\r\n-.eE\\u\xEF\xBB\xBF\xff\x00prompt_tokenstotal_";
        let mut noise = Noise(0x9E37_79B9_7F4A_7C15);
        for round in 0..300 {
            let len = (noise.next() % 4096) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    let r = noise.next();
                    if r.is_multiple_of(4) {
                        (r >> 8) as u8
                    } else {
                        ALPHABET[(r >> 8) as usize % ALPHABET.len()]
                    }
                })
                .collect();
            for make in [UsageObserver::sse, UsageObserver::json] {
                let mut observer = make();
                let mut rest = &bytes[..];
                while !rest.is_empty() {
                    let take = ((noise.next() % 97) as usize).min(rest.len());
                    let (chunk, tail) = rest.split_at(take);
                    observer.observe(chunk);
                    rest = tail;
                }
                let _ = observer.finish();
            }
            // Valid usage events buried in garbage are still found.
            if round % 10 == 0 {
                let mut observer = UsageObserver::sse();
                observer.observe(&bytes);
                observer.observe(b"\n\ndata: {\"usage\":{\"total_tokens\":3}}\n\n");
                observer.observe(&bytes);
                let found = observer.finish();
                assert_eq!(found.map(|u| u.total_tokens), Some(3), "round {round}");
            }
        }
    }

    #[test]
    fn deep_nesting_is_refused_not_overflowing_the_stack() {
        let deep = format!(
            "{{\"usage\":{}1{}}}",
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        assert_eq!(feed(UsageObserver::json(), &[deep.as_bytes()]), None);
        let deep = format!(
            "data: {{\"response\":{}}}\n\n",
            "{\"response\":".repeat(5_000) + "1" + &"}".repeat(5_000)
        );
        assert_eq!(feed(UsageObserver::sse(), &[deep.as_bytes()]), None);
    }
}
