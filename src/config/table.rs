//! The route table and its matcher: a hash map from normalised prefix to candidate entries.
//! Matching a path costs one lookup per path segment, longest first, and allocates nothing.

use std::collections::HashMap;
use std::sync::Arc;

use http::{HeaderMap, HeaderValue, Method};

use super::route::{CompiledRoute, HostPattern};

/// One (route, host pattern) pair under a prefix; a route with several hosts has several entries.
#[derive(Debug, Clone)]
pub struct Entry {
    pub host: HostPattern,
    pub route: Arc<CompiledRoute>,
    /// Sort key: higher host specificity, then more conditions, then older (lower order).
    pub specificity: u32,
    pub order: u64,
}

/// Top-level JSON fields of a request body, for `bodyField` routes.
pub type BodyFields = serde_json::Map<String, serde_json::Value>;

/// What the table says about a request.
#[derive(Debug)]
pub enum Match<'a> {
    Route(&'a Arc<CompiledRoute>),
    /// The path matched, the method did not: answer 405 with this `Allow`.
    MethodNotAllowed(HeaderValue),
    NotFound,
    /// A candidate routes on the body: read it (capped) and match again with `body`.
    NeedBody,
}

/// The compiled route table.
#[derive(Debug, Default)]
pub struct RouteTable {
    by_prefix: HashMap<Box<str>, Vec<Entry>>,
    routes: Vec<Arc<CompiledRoute>>,
}

impl RouteTable {
    /// From the entries of each prefix (any order); sorts each prefix's entries.
    pub(crate) fn new(
        mut by_prefix: HashMap<Box<str>, Vec<Entry>>,
        routes: Vec<Arc<CompiledRoute>>,
    ) -> Self {
        for entries in by_prefix.values_mut() {
            entries.sort_by(|a, b| {
                b.specificity
                    .cmp(&a.specificity)
                    .then(b.route.conditions.cmp(&a.route.conditions))
                    .then(a.order.cmp(&b.order))
            });
        }
        Self { by_prefix, routes }
    }

    pub fn routes(&self) -> &[Arc<CompiledRoute>] {
        &self.routes
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// Finds the route for a request. `host` is lower-case without port; `path` is normalised.
    /// The longest matching prefix decides: at that level the first entry whose host, headers
    /// and body match wins, and if only the method is wrong the answer is 405.
    pub fn find<'a>(
        &'a self,
        host: &str,
        path: &str,
        method: &Method,
        headers: &HeaderMap,
        body: Option<&BodyFields>,
    ) -> Match<'a> {
        self.find_with_query(host, path, None, method, headers, body)
    }

    /// [`RouteTable::find`] that also checks the query parameter matches of Gateway API routes
    /// against the request's raw query.
    pub fn find_with_query<'a>(
        &'a self,
        host: &str,
        path: &str,
        query: Option<&str>,
        method: &Method,
        headers: &HeaderMap,
        body: Option<&BodyFields>,
    ) -> Match<'a> {
        let mut candidate = path;
        loop {
            if let Some(entries) = self.by_prefix.get(candidate) {
                match Self::find_in(entries, host, path, query, method, headers, body) {
                    Match::NotFound => {}
                    found => return found,
                }
            }
            if candidate.len() <= 1 {
                return Match::NotFound;
            }
            // Cut the last segment; a trailing slash counts as a segment of its own. A byte
            // search: `/` is one byte and never part of another UTF-8 character, and unlike
            // `rfind('/')` it does not depend on the generic char searcher being inlined (when
            // it was not, every cut cost a memcmp call: +25 % on the match benches).
            candidate = match candidate.as_bytes().iter().rposition(|&b| b == b'/') {
                Some(0) => "/",
                Some(i) => &candidate[..i],
                None => return Match::NotFound,
            };
        }
    }

    fn find_in<'a>(
        entries: &'a [Entry],
        host: &str,
        path: &str,
        query: Option<&str>,
        method: &Method,
        headers: &HeaderMap,
        body: Option<&BodyFields>,
    ) -> Match<'a> {
        let mut wrong_method: Option<&'a Entry> = None;
        let mut extra_wrong = false;
        for e in entries {
            if !e.host.matches(host) {
                continue;
            }
            let r = &e.route;
            if r.exact.as_deref().is_some_and(|x| x != path) {
                continue;
            }
            if !r.query.is_empty() && !query_matches(&r.query, query) {
                continue;
            }
            if !r
                .headers
                .iter()
                .all(|(n, v)| headers.get_all(n).iter().any(|x| x == v))
            {
                continue;
            }
            if let Some((field, values)) = &r.body_field {
                let Some(body) = body else {
                    return Match::NeedBody;
                };
                let ok = body
                    .get(field)
                    .and_then(|v| v.as_str())
                    .is_some_and(|v| values.iter().any(|x| x == v));
                if !ok {
                    continue;
                }
            }
            if r.methods.allows(method) {
                return Match::Route(&e.route);
            }
            if r.methods.mismatch_is_no_match {
                continue;
            }
            if wrong_method.is_some() {
                extra_wrong = true;
            } else {
                wrong_method = Some(e);
            }
        }
        match wrong_method {
            None => Match::NotFound,
            Some(e) if !extra_wrong => Match::MethodNotAllowed(
                e.route
                    .methods
                    .allow
                    .clone()
                    .unwrap_or_else(|| HeaderValue::from_static("")),
            ),
            Some(_) => {
                // Several routes share the prefix with different methods: the union.
                let mut all: Vec<&str> = Vec::new();
                for e in entries.iter().filter(|e| e.host.matches(host)) {
                    for m in &e.route.methods.methods {
                        if !all.contains(&m.as_str()) {
                            all.push(m);
                        }
                    }
                }
                all.sort_unstable();
                let joined = all.join(", ");
                Match::MethodNotAllowed(
                    HeaderValue::from_str(&joined).unwrap_or_else(|_| HeaderValue::from_static("")),
                )
            }
        }
    }

    /// Whether any route would need the body for this path (cheap pre-check for the pipeline).
    pub fn routes_on_body(&self) -> bool {
        self.routes.iter().any(|r| r.body_field.is_some())
    }
}

/// Whether every `(name, value)` is in the raw query: the first parameter of that name, compared
/// exactly (names are case-sensitive, as the Gateway API says; values are not decoded).
fn query_matches(wanted: &[(Box<str>, Box<str>)], query: Option<&str>) -> bool {
    let Some(q) = query else {
        return false;
    };
    wanted.iter().all(|(name, value)| {
        q.split('&')
            .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
            .find(|(n, _)| *n == &**name)
            .is_some_and(|(_, v)| v == &**value)
    })
}

#[cfg(test)]
mod query_tests {
    use super::query_matches;

    #[test]
    fn query_parameters_match_the_first_of_their_name_exactly() {
        let w: Vec<(Box<str>, Box<str>)> = vec![("v".into(), "2".into()), ("a".into(), "".into())];
        assert!(query_matches(&w, Some("a&v=2")));
        assert!(query_matches(&w, Some("x=1&v=2&a=")));
        assert!(!query_matches(&w, Some("v=3&v=2&a")), "the first v decides");
        assert!(
            !query_matches(&w, Some("V=2&a")),
            "names are case-sensitive"
        );
        assert!(!query_matches(&w, None));
    }
}
