//! Sources gather objects into a `config::Store`: files (standalone) and Kubernetes watchers.
//! They know nothing of routing; compile does.

pub mod files;
pub mod kubernetes;

use std::path::Path;

use crate::config::{compile, CompileOptions, ObjectKey, Problem};

/// Everything `tollgate check` reports for a file or directory: parse errors and the problems
/// compile finds, each with its file and field; with `mcp_session_secret`, that Secret's keys
/// too.
pub fn check(
    path: &Path,
    gateway_class: &str,
    mcp_session_secret: Option<ObjectKey>,
) -> Vec<Problem> {
    let mut source = files::FileSource::new(path);
    let loaded = source.load();
    let snap = compile(
        &loaded.store,
        &CompileOptions {
            gateway_class: gateway_class.to_string(),
            mcp_session_secret,
            ..CompileOptions::default()
        },
    );
    let mut problems = loaded.problems;
    problems.extend(snap.problems);
    problems
}
