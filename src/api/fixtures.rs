//! Builders for tests, benches and examples: `RouteBuilder::new("chat").prefix("/api/v1/chat")`.
//! Produce the same objects a user would apply; no shortcuts around compile(). Compiled only for
//! unit tests and with the `fixtures` feature, which the crate's dev-dependency on itself enables.

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::*;

/// Builds an `AgentRoute`.
#[derive(Clone, Debug)]
pub struct RouteBuilder {
    route: AgentRoute,
}

impl RouteBuilder {
    /// A route in namespace `default` matching `/` with no backends yet.
    pub fn new(name: &str) -> Self {
        let mut route = AgentRoute::new(
            name,
            AgentRouteSpec {
                gateway_class: None,
                hosts: Vec::new(),
                match_: RouteMatch {
                    path_prefix: "/".into(),
                    ..RouteMatch::default()
                },
                protocol: Protocol::Http,
                timeouts: None,
                retry: None,
                auth: None,
                rate_limit: None,
                rewrite: None,
                backends: Vec::new(),
                cors: None,
                tls: None,
                canary_header: None,
                sticky: None,
                load_balancer: None,
                mcp: None,
            },
        );
        route.metadata.namespace = Some("default".into());
        Self { route }
    }
    pub fn namespace(mut self, ns: &str) -> Self {
        self.route.metadata.namespace = Some(ns.into());
        self
    }
    pub fn prefix(mut self, p: &str) -> Self {
        self.route.spec.match_.path_prefix = p.into();
        self
    }
    pub fn host(mut self, h: &str) -> Self {
        self.route.spec.hosts.push(h.into());
        self
    }
    pub fn methods(mut self, m: &[&str]) -> Self {
        self.route.spec.match_.methods = m.iter().map(|s| s.to_string()).collect();
        self
    }
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.route.spec.match_.headers.push(HeaderMatch {
            name: name.into(),
            value: value.into(),
        });
        self
    }
    pub fn url(mut self, url: &str) -> Self {
        self.route.spec.backends.push(Backend {
            service: None,
            port: None,
            url: Some(url.into()),
            weight: None,
            canary: false,
            mcp: None,
        });
        self
    }
    pub fn backend(mut self, service: &str, port: u16, weight: u32) -> Self {
        self.route.spec.backends.push(Backend {
            service: Some(service.into()),
            port: Some(port),
            url: None,
            weight: Some(weight),
            canary: false,
            mcp: None,
        });
        self
    }
    pub fn roles(mut self, roles: &[&str]) -> Self {
        self.route
            .spec
            .auth
            .get_or_insert_with(RouteAuth::default)
            .roles = roles.iter().map(|s| s.to_string()).collect();
        self
    }
    pub fn public(mut self) -> Self {
        self.route
            .spec
            .auth
            .get_or_insert_with(RouteAuth::default)
            .required = Some(false);
        self
    }
    pub fn rate_limit(mut self, rpm: u32, burst: Option<u32>, tpm: Option<u64>) -> Self {
        self.route.spec.rate_limit = Some(RateLimitSpec {
            requests_per_minute: Some(rpm),
            burst,
            tokens_per_minute: tpm,
        });
        self
    }
    pub fn protocol(mut self, p: Protocol) -> Self {
        self.route.spec.protocol = p;
        self
    }
    pub fn build(self) -> AgentRoute {
        self.route
    }
}

/// Builds an `AgentApiKey` by hash (`sha256:` of the plain key).
pub fn api_key(
    name: &str,
    namespace: &str,
    client_id: &str,
    plain: &str,
    roles: &[&str],
) -> AgentApiKey {
    let digest = crate::auth::keys::digest(plain.as_bytes());
    let mut k = AgentApiKey::new(
        name,
        AgentApiKeySpec {
            client_id: client_id.into(),
            secret_ref: None,
            key_hash: Some(format!("sha256:{}", hex::encode(digest))),
            roles: roles.iter().map(|s| s.to_string()).collect(),
            rate_limit: None,
            expires_at: None,
            disabled: false,
        },
    );
    k.metadata.namespace = Some(namespace.into());
    k
}

/// An Opaque Secret with one string entry.
pub fn secret(name: &str, namespace: &str, key: &str, value: &str) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            ..ObjectMeta::default()
        },
        string_data: Some([(key.to_string(), value.to_string())].into()),
        type_: Some("Opaque".into()),
        ..Secret::default()
    }
}
