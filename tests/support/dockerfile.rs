//! The repository's Dockerfile as instructions, for the tests that hold the build, the image
//! tool and the docs to it (tests/install.rs, tests/node.rs).

use std::path::Path;

/// Every instruction of the Dockerfile in order: (INSTRUCTION, argument), line continuations
/// joined, comments and blank lines dropped, the instruction upper-cased.
pub fn instructions() -> Vec<(String, String)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("Dockerfile");
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    parse(&text)
}

fn parse(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('#') || (t.is_empty() && cur.is_empty()) {
            continue;
        }
        if let Some(head) = t.strip_suffix('\\') {
            cur.push_str(head);
            cur.push(' ');
            continue;
        }
        cur.push_str(t);
        let (inst, rest) = cur.split_once(' ').unwrap_or((&cur, ""));
        out.push((inst.to_ascii_uppercase(), rest.trim().to_string()));
        cur.clear();
    }
    out
}

/// The final stage: its `FROM` and every instruction after it.
pub fn final_stage() -> Vec<(String, String)> {
    let all = instructions();
    let from = all.iter().rposition(|(i, _)| i == "FROM").unwrap_or(0);
    all[from..].to_vec()
}
