//! SSE and usage parsing: any response body, fed to `UsageObserver` in any chunking. Besides "no
//! panic", the usage found must not depend on where the chunk boundaries fall (CR/LF pairs and
//! multi-byte characters split between chunks).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate::ratelimit::usage::{UsageObserver, SSE_LINE_CAP};

fn observer(mode: u8) -> UsageObserver {
    match mode % 4 {
        0 => UsageObserver::sse(),
        1 => UsageObserver::json(),
        2 => UsageObserver::for_content_type(Some("text/event-stream; charset=utf-8")),
        _ => UsageObserver::for_content_type(Some("application/vnd.api+json")),
    }
}

fuzz_target!(|data: &[u8]| {
    // Byte 0: the mode. Byte 1: a seed for the chunk sizes. The rest: the body.
    let [mode, seed, body @ ..] = data else {
        return;
    };
    let mut whole = observer(*mode);
    whole.observe(body);
    let whole = whole.finish();

    let mut chunked = observer(*mode);
    let mut rest = body;
    let mut state = u32::from(*seed) | 1;
    while !rest.is_empty() {
        // xorshift: deterministic, varied chunk sizes from 0 to 16 bytes.
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let n = (state % 17) as usize;
        let (head, tail) = rest.split_at(n.min(rest.len()));
        chunked.observe(head);
        rest = tail;
    }
    let chunked = chunked.finish();

    if body.len() < SSE_LINE_CAP {
        assert_eq!(whole, chunked, "chunking changed the usage");
    }
    if let Some(u) = whole {
        // Without a reported total, the total is prompt + completion (saturating).
        let _ = u.prompt_tokens.saturating_add(u.completion_tokens);
    }
});
