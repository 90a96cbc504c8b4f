//! One gateway scenario in a builder: the backends, keys and routes a test needs, then the
//! standalone gateway on them, so that each test says only what differs.
//!
//! ```ignore
//! let s = Scenario::new()
//!     .backend("b")
//!     .key("agent", "agent-7", KEY, &["user"])
//!     .route("api", json!({"match": {"pathPrefix": "/api"}}))
//!     .start()
//!     .await;
//! let r = s.gw.get("/api/x").await;
//! assert_eq!(s.backend("b").count(), 1);
//! ```
//!
//! A route whose spec has no `backends` is sent to a backend of the scenario: the first one
//! ([`Scenario::route`]) or a named one ([`Scenario::route_to`]). Documents are written in the
//! order they were added. The gateway fails the test if its configuration has any problem.

use serde_json::{json, Value};

use tollgate::app::ServeOptions;

use super::{api_key, gateway_with, route_in, yaml, Backend, Gateway, Handler};

/// One adjustment of the gateway's options.
type Adjust = Box<dyn FnOnce(&mut ServeOptions)>;

enum Doc {
    Ready(Value),
    Route {
        namespace: String,
        name: String,
        spec: Value,
        /// A backend of the scenario by name; `None`: the first one.
        to: Option<String>,
    },
}

/// What to start; see the module documentation.
#[derive(Default)]
pub struct Scenario {
    backends: Vec<(String, Option<Handler>)>,
    docs: Vec<Doc>,
    options: Vec<Adjust>,
}

/// A started scenario: the gateway and the backends, by name.
pub struct Started {
    pub gw: Gateway,
    backends: Vec<Backend>,
}

impl Started {
    /// The backend added as `name`.
    pub fn backend(&self, name: &str) -> &Backend {
        self.backends
            .iter()
            .find(|b| b.name == name)
            .unwrap_or_else(|| panic!("the scenario has no backend {name:?}"))
    }
}

impl Scenario {
    pub fn new() -> Scenario {
        Scenario::default()
    }

    /// A backend answering `200` with its name ([`Backend::echo`]).
    pub fn backend(mut self, name: &str) -> Scenario {
        self.backends.push((name.to_string(), None));
        self
    }

    /// A backend answering through `handler` ([`Backend::spawn`]).
    pub fn backend_with(mut self, name: &str, handler: Handler) -> Scenario {
        self.backends.push((name.to_string(), Some(handler)));
        self
    }

    /// A key in namespace `default` held in a Secret ([`api_key`]).
    pub fn key(self, name: &str, client_id: &str, plain: &str, roles: &[&str]) -> Scenario {
        self.key_in("default", name, client_id, plain, roles, json!({}))
    }

    /// A key in `namespace`; `extra` is merged into its spec (`expiresAt`, `disabled`, ...).
    pub fn key_in(
        mut self,
        namespace: &str,
        name: &str,
        client_id: &str,
        plain: &str,
        roles: &[&str],
        extra: Value,
    ) -> Scenario {
        let docs = api_key(namespace, name, client_id, plain, roles, extra);
        self.docs.extend(docs.into_iter().map(Doc::Ready));
        self
    }

    /// Other documents, as they are.
    pub fn docs(mut self, docs: impl IntoIterator<Item = Value>) -> Scenario {
        self.docs.extend(docs.into_iter().map(Doc::Ready));
        self
    }

    /// Any other document, as it is.
    pub fn doc(mut self, doc: Value) -> Scenario {
        self.docs.push(Doc::Ready(doc));
        self
    }

    /// A route in namespace `default`, to the first backend unless its spec names backends.
    pub fn route(self, name: &str, spec: Value) -> Scenario {
        self.push_route("default", name, spec, None)
    }

    /// A route in `namespace`, to the first backend unless its spec names backends.
    pub fn route_in(self, namespace: &str, name: &str, spec: Value) -> Scenario {
        self.push_route(namespace, name, spec, None)
    }

    /// A route in namespace `default` to the backend added as `backend`.
    pub fn route_to(self, backend: &str, name: &str, spec: Value) -> Scenario {
        self.push_route("default", name, spec, Some(backend.to_string()))
    }

    /// [`Scenario::route`] that needs no key (`auth.required: false`).
    pub fn open_route(self, name: &str, spec: Value) -> Scenario {
        self.push_route("default", name, open(spec), None)
    }

    /// [`Scenario::route_to`] that needs no key (`auth.required: false`).
    pub fn open_route_to(self, backend: &str, name: &str, spec: Value) -> Scenario {
        self.push_route("default", name, open(spec), Some(backend.to_string()))
    }

    /// Adjusts the gateway's options (limits, timeouts, ...).
    pub fn options(mut self, adjust: impl FnOnce(&mut ServeOptions) + 'static) -> Scenario {
        self.options.push(Box::new(adjust));
        self
    }

    fn push_route(
        mut self,
        namespace: &str,
        name: &str,
        spec: Value,
        to: Option<String>,
    ) -> Scenario {
        self.docs.push(Doc::Route {
            namespace: namespace.to_string(),
            name: name.to_string(),
            spec,
            to,
        });
        self
    }

    /// Starts the backends, then the gateway on the documents.
    pub async fn start(self) -> Started {
        let mut backends = Vec::new();
        for (name, handler) in self.backends {
            backends.push(match handler {
                None => Backend::echo(&name).await,
                Some(h) => Backend::spawn(&name, h).await,
            });
        }
        let docs: Vec<Value> = self
            .docs
            .into_iter()
            .map(|d| match d {
                Doc::Ready(v) => v,
                Doc::Route {
                    namespace,
                    name,
                    mut spec,
                    to,
                } => {
                    if spec.get("backends").is_none() {
                        let backend = match &to {
                            Some(n) => backends.iter().find(|b| &b.name == n),
                            None => backends.first(),
                        }
                        .unwrap_or_else(|| {
                            panic!("route {name}: no backends in its spec and no backend {to:?}")
                        });
                        spec["backends"] = json!([{"url": backend.url()}]);
                    }
                    route_in(&namespace, &name, spec)
                }
            })
            .collect();
        let options = self.options;
        let gw = gateway_with(yaml(docs), move |o| {
            for adjust in options {
                adjust(o);
            }
        })
        .await;
        Started { gw, backends }
    }
}

/// `spec` with `auth.required: false`.
fn open(mut spec: Value) -> Value {
    spec["auth"] = json!({"required": false});
    spec
}
