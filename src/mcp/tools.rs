//! Tool access on MCP routes (`mcp.tools`, `denyUnlisted`): who may call a tool, and the
//! `tools/list` answers cut down to what the caller may use, JSON or SSE, holding back at most
//! the one SSE event being filtered.

use std::sync::Arc;

use serde_json::Value;

/// One compiled rule: a name glob and the roles that may use what it matches.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ToolRule {
    pub name: String,
    pub roles: Vec<Arc<str>>,
    /// Calls per client, per tool, per route.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<ToolLimit>,
}

/// A rule's `rateLimit`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ToolLimit {
    pub per_minute: u32,
    pub burst: u32,
}

/// What the rules say about one call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToolVerdict {
    /// Allowed, within this limit when the deciding rule has one.
    Allowed(Option<ToolLimit>),
    Forbidden,
}

/// The compiled `mcp` policy of a route.
#[derive(Clone, Debug, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ToolAccess {
    pub rules: Vec<ToolRule>,
    pub deny_unlisted: bool,
}

impl ToolAccess {
    /// Whether a caller holding `roles` may see and call `tool`: the first rule whose glob
    /// matches decides; no rule matches: allowed unless `denyUnlisted`.
    pub fn allows(&self, tool: &str, roles: &[Arc<str>]) -> bool {
        self.verdict(tool, roles) != ToolVerdict::Forbidden
    }

    /// [`Self::allows`], with the deciding rule's request limit.
    pub fn verdict(&self, tool: &str, roles: &[Arc<str>]) -> ToolVerdict {
        match self.rules.iter().find(|r| glob(&r.name, tool)) {
            Some(rule) if rule.roles.iter().any(|r| roles.contains(r)) => {
                ToolVerdict::Allowed(rule.rate_limit)
            }
            Some(_) => ToolVerdict::Forbidden,
            None if self.deny_unlisted => ToolVerdict::Forbidden,
            None => ToolVerdict::Allowed(None),
        }
    }

    /// Removes from a JSON-RPC `tools/list` result the tools the caller may not use; true when
    /// the message is such a result.
    pub fn filter_list(&self, message: &mut Value, roles: &[Arc<str>]) -> bool {
        let Some(tools) = message
            .get_mut("result")
            .and_then(|r| r.get_mut("tools"))
            .and_then(Value::as_array_mut)
        else {
            return false;
        };
        tools.retain(|t| {
            t.get("name")
                .and_then(Value::as_str)
                .is_some_and(|n| self.allows(n, roles))
        });
        true
    }
}

/// `*` matches any run of characters (none included); every other character itself.
pub fn glob(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    // Where the last `*` was, and the text position it has consumed up to.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        match p.get(pi) {
            Some(b'*') => {
                star = Some((pi, ti));
                pi += 1;
            }
            Some(&c) if c == t[ti] => {
                pi += 1;
                ti += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    pi = sp + 1;
                    ti = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// An answer held back longer than allowed: more than `max` bytes in one SSE event (or one
/// JSON answer) cannot be filtered, and is never passed on unfiltered.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("a tools/list answer exceeds the size the gateway filters")]
pub struct TooLarge;

/// Filters the answer to a `tools/list` request as its bytes pass.
pub struct ListFilter {
    access: Arc<ToolAccess>,
    roles: Arc<[Arc<str>]>,
    sse: bool,
    buf: Vec<u8>,
    max: usize,
}

impl ListFilter {
    /// `sse`: the answer is an event stream (else one JSON message); `max`: the largest event
    /// (or JSON answer) held.
    pub fn new(access: Arc<ToolAccess>, roles: Arc<[Arc<str>]>, sse: bool, max: usize) -> Self {
        Self {
            access,
            roles,
            sse,
            buf: Vec::new(),
            max,
        }
    }

    /// Takes the next bytes of the answer; returns what can be passed on now.
    pub fn push(&mut self, data: &[u8]) -> Result<Vec<u8>, TooLarge> {
        self.buf.extend_from_slice(data);
        let mut out = Vec::new();
        if self.sse {
            while let Some(end) = event_end(&self.buf) {
                let event: Vec<u8> = self.buf.drain(..end).collect();
                out.extend_from_slice(&self.rewrite_event(&event));
            }
        }
        if self.buf.len() > self.max {
            return Err(TooLarge);
        }
        Ok(out)
    }

    /// The end of the answer: what is left, filtered.
    pub fn finish(&mut self) -> Vec<u8> {
        let rest = std::mem::take(&mut self.buf);
        if self.sse {
            return self.rewrite_event(&rest);
        }
        let Ok(mut v) = serde_json::from_slice::<Value>(&rest) else {
            return rest;
        };
        if self.access.filter_list(&mut v, &self.roles) {
            v.to_string().into_bytes()
        } else {
            rest
        }
    }

    /// One whole event (its blank line included): its `data` filtered when it is a
    /// `tools/list` result, every other line as it was.
    fn rewrite_event(&self, event: &[u8]) -> Vec<u8> {
        let Ok(text) = std::str::from_utf8(event) else {
            return event.to_vec();
        };
        let mut data: Option<String> = None;
        for line in text.lines() {
            if let Some(v) = line.strip_prefix("data:") {
                let v = v.strip_prefix(' ').unwrap_or(v);
                match &mut data {
                    Some(d) => {
                        d.push('\n');
                        d.push_str(v);
                    }
                    None => data = Some(v.to_string()),
                }
            }
        }
        let Some(data) = data else {
            return event.to_vec();
        };
        let mut v: Value = match serde_json::from_str(&data) {
            Ok(v) => v,
            Err(_) => return event.to_vec(),
        };
        if !self.access.filter_list(&mut v, &self.roles) {
            return event.to_vec();
        }
        let mut out = String::with_capacity(event.len());
        let mut wrote_data = false;
        for line in text.lines() {
            if line.starts_with("data:") {
                if !wrote_data {
                    out.push_str("data: ");
                    out.push_str(&v.to_string());
                    out.push('\n');
                    wrote_data = true;
                }
            } else if !line.is_empty() {
                out.push_str(line);
                out.push('\n');
            }
        }
        out.push('\n');
        out.into_bytes()
    }
}

/// The end of the first whole event in `buf` (after its blank line), if there is one.
fn event_end(buf: &[u8]) -> Option<usize> {
    let mut i = 0;
    while i + 1 < buf.len() {
        match (buf[i], buf[i + 1]) {
            (b'\n', b'\n') => return Some(i + 2),
            (b'\r', b'\n') if buf.get(i + 2..i + 4) == Some(b"\r\n") => return Some(i + 4),
            _ => {}
        }
        i += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn access(deny_unlisted: bool) -> Arc<ToolAccess> {
        Arc::new(ToolAccess {
            rules: vec![
                ToolRule {
                    name: "search_*".into(),
                    roles: vec!["user".into(), "admin".into()],
                    rate_limit: None,
                },
                ToolRule {
                    name: "delete_*".into(),
                    roles: vec!["admin".into()],
                    rate_limit: Some(ToolLimit {
                        per_minute: 10,
                        burst: 2,
                    }),
                },
            ],
            deny_unlisted,
        })
    }

    fn roles(r: &[&str]) -> Arc<[Arc<str>]> {
        r.iter().map(|s| Arc::from(*s)).collect()
    }

    #[test]
    fn globs() {
        assert!(glob("search_*", "search_docs"));
        assert!(glob("search_*", "search_"));
        assert!(glob("*", ""));
        assert!(glob("a*b*c", "axxbyyc"));
        assert!(glob("exact", "exact"));
        assert!(!glob("exact", "exactly"));
        assert!(!glob("search_*", "research_docs"));
        assert!(!glob("a*b", "a"));
    }

    #[test]
    fn the_first_matching_rule_decides_and_unlisted_tools_follow_deny_unlisted() {
        let open = access(false);
        let user = roles(&["user"]);
        let admin = roles(&["admin"]);
        assert!(open.allows("search_docs", &user));
        assert!(!open.allows("delete_repo", &user));
        assert!(open.allows("delete_repo", &admin));
        assert!(open.allows("whoami", &user));
        assert!(open.allows("whoami", &roles(&[])));
        assert!(!access(true).allows("whoami", &admin));
        let limit = ToolLimit {
            per_minute: 10,
            burst: 2,
        };
        assert_eq!(
            open.verdict("delete_repo", &admin),
            ToolVerdict::Allowed(Some(limit))
        );
        assert_eq!(
            open.verdict("search_docs", &user),
            ToolVerdict::Allowed(None)
        );
        assert_eq!(open.verdict("delete_repo", &user), ToolVerdict::Forbidden);
    }

    fn list() -> Value {
        json!({"jsonrpc": "2.0", "id": 2, "result": {"tools": [
            {"name": "search_docs"}, {"name": "delete_repo"}, {"name": "whoami"}]}})
    }

    fn names(v: &Value) -> Vec<&str> {
        v["result"]["tools"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap())
            .collect()
    }

    #[test]
    fn a_json_answer_is_filtered_whole() {
        let mut f = ListFilter::new(access(false), roles(&["user"]), false, 1 << 20);
        let body = list().to_string();
        let (a, b) = body.as_bytes().split_at(10);
        assert!(f.push(a).unwrap().is_empty());
        assert!(f.push(b).unwrap().is_empty());
        let v: Value = serde_json::from_slice(&f.finish()).unwrap();
        assert_eq!(names(&v), ["search_docs", "whoami"]);
    }

    #[test]
    fn an_sse_answer_is_filtered_event_by_event_in_any_chunking() {
        let stream = format!(
            "event: message\r\nid: 1\r\ndata: {{\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\"}}\r\n\r\n\
             event: message\r\ndata: {}\r\n\r\n: keep-alive\n\n",
            list()
        );
        for chunk in [1, 7, 64, stream.len()] {
            let mut f = ListFilter::new(access(false), roles(&["admin"]), true, 1 << 20);
            let mut out = Vec::new();
            for c in stream.as_bytes().chunks(chunk) {
                out.extend(f.push(c).unwrap());
            }
            out.extend(f.finish());
            let text = String::from_utf8(out).unwrap().replace("\r\n", "\n");
            let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
            assert_eq!(events.len(), 3, "{text:?}");
            assert!(events[0].contains("notifications/progress"));
            let data = events[1]
                .lines()
                .find_map(|l| l.strip_prefix("data: "))
                .unwrap();
            let v: Value = serde_json::from_str(data).unwrap();
            assert_eq!(names(&v), ["search_docs", "delete_repo", "whoami"]);
            assert!(events[1].starts_with("event: message"));
            assert_eq!(events[2], ": keep-alive");
        }
        // A user sees less; an event larger than the limit is refused, never passed unfiltered.
        let mut f = ListFilter::new(access(false), roles(&["user"]), true, 1 << 20);
        let mut out = f.push(stream.as_bytes()).unwrap();
        out.extend(f.finish());
        assert!(!String::from_utf8(out).unwrap().contains("delete_repo"));
        let mut small = ListFilter::new(access(false), roles(&["user"]), true, 16);
        assert_eq!(small.push(list().to_string().as_bytes()), Err(TooLarge));
    }
}
