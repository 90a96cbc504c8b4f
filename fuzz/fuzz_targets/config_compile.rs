//! Config loading: any text, read as a standalone configuration file (multi-document YAML of
//! AgentRoute, AgentApiKey and Secret), then compiled and rendered as `/debug/routes` renders it.
//! A bad file must come back as an error or as problems, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate::config::{compile, CompileOptions};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(store) = tollgate::sources::files::parse_str(text) else {
        return;
    };
    let snap = compile(&store, &CompileOptions::default());
    // What the admin port serialises must serialise.
    let _ = serde_json::to_vec(snap.routes.routes());
    let _ = serde_json::to_vec(&snap.problems);
    for p in &snap.problems {
        let _ = p.to_string();
    }
    // Every compiled prefix matches itself.
    for route in snap.routes.routes() {
        let _ = serde_json::to_vec(&**route);
    }
});
