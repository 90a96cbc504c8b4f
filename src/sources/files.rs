//! The file source of `standalone` and `check`: multi-document YAML files (AgentRoute,
//! AgentApiKey, Secret) from a file or a directory, watched for changes. Only gathers objects.

use k8s_openapi::api::networking::v1::{Ingress, IngressClass};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::api::{AgentApiKey, AgentRoute};
use crate::config::{ObjectKey, Problem, Store};

/// What one file held the last time it parsed.
#[derive(Clone, Debug, Default)]
struct FileObjects {
    routes: Vec<AgentRoute>,
    keys: Vec<AgentApiKey>,
    secrets: Vec<Secret>,
    ingresses: Vec<Ingress>,
    ingress_classes: Vec<IngressClass>,
    /// The documents of the file that are not served, each with why.
    refused: Vec<Problem>,
}

/// Loads configuration files, keeping each file's last good content.
#[derive(Debug)]
pub struct FileSource {
    root: PathBuf,
    last_good: BTreeMap<PathBuf, FileObjects>,
}

/// A load: the store to compile and the problems found reading the files: files that did not
/// parse (their last good version serves) and single documents that were skipped.
#[derive(Debug)]
pub struct Loaded {
    pub store: Store,
    pub problems: Vec<Problem>,
}

fn file_problem(path: &Path, message: String) -> Problem {
    Problem {
        kind: "File".into(),
        object: ObjectKey::new("", path.display().to_string()),
        field: String::new(),
        reason: "ParseError".into(),
        message,
        origin: Some(path.display().to_string()),
    }
}

fn is_yaml(p: &Path) -> bool {
    matches!(
        p.extension().and_then(|e| e.to_str()),
        Some("yaml") | Some("yml")
    )
}

impl FileSource {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            last_good: BTreeMap::new(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The YAML files under the root, sorted (order decides ties between equal routes).
    fn files(&self) -> Result<Vec<PathBuf>, std::io::Error> {
        let meta = std::fs::metadata(&self.root)?;
        if meta.is_file() {
            return Ok(vec![self.root.clone()]);
        }
        let mut out = Vec::new();
        let mut dirs = vec![self.root.clone()];
        while let Some(d) = dirs.pop() {
            for entry in std::fs::read_dir(&d)? {
                let entry = entry?;
                let p = entry.path();
                let name = entry.file_name();
                if name.to_string_lossy().starts_with('.') {
                    continue;
                }
                if entry.file_type()?.is_dir() {
                    dirs.push(p);
                } else if is_yaml(&p) {
                    out.push(p);
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// Reads every file. A file that fails to parse keeps its previous content (if any) and is
    /// reported; a file that disappeared is dropped; a document that is not served is reported
    /// with its file and index while the file's other documents serve.
    pub fn load(&mut self) -> Loaded {
        let mut problems = Vec::new();
        let files = match self.files() {
            Ok(f) => f,
            Err(e) => {
                problems.push(file_problem(&self.root, format!("cannot read: {e}")));
                // Keep serving what we had.
                return Loaded {
                    store: self.store(),
                    problems,
                };
            }
        };
        self.last_good.retain(|p, _| files.contains(p));
        for path in files {
            match std::fs::read_to_string(&path)
                .map_err(|e| e.to_string())
                .and_then(|t| parse(&t, &path.display().to_string()))
            {
                Ok(objs) => {
                    self.last_good.insert(path, objs);
                }
                Err(msg) => {
                    let kept = if self.last_good.contains_key(&path) {
                        "; its last good version keeps serving"
                    } else {
                        ""
                    };
                    problems.push(file_problem(&path, format!("{msg}{kept}")));
                }
            }
        }
        for objs in self.last_good.values() {
            problems.extend(objs.refused.iter().cloned());
        }
        Loaded {
            store: self.store(),
            problems,
        }
    }

    fn store(&self) -> Store {
        let mut store = Store::default();
        for (path, objs) in &self.last_good {
            let origin = path.display().to_string();
            for r in &objs.routes {
                let k = key_of(&r.metadata);
                store
                    .origins
                    .insert(("AgentRoute".into(), k), origin.clone());
                store.routes.push(r.clone());
            }
            for k in &objs.keys {
                let key = key_of(&k.metadata);
                store
                    .origins
                    .insert(("AgentApiKey".into(), key), origin.clone());
                store.keys.push(k.clone());
            }
            for s in &objs.secrets {
                store.secrets.insert(key_of(&s.metadata), s.clone());
            }
            for i in &objs.ingresses {
                let key = key_of(&i.metadata);
                store
                    .origins
                    .insert(("Ingress".into(), key), origin.clone());
                store.ingress.ingresses.push(i.clone());
            }
            store
                .ingress
                .classes
                .extend(objs.ingress_classes.iter().cloned());
        }
        store
    }
}

/// Parses the text of one configuration file into a `Store`, exactly as `standalone` reads each
/// file (multi-document YAML of AgentRoute, AgentApiKey and Secret): documents `standalone` would
/// skip are left out. For tools and fuzzing.
pub fn parse_str(text: &str) -> Result<Store, String> {
    let mut source = FileSource::new(PathBuf::new());
    source
        .last_good
        .insert(PathBuf::from("<text>"), parse(text, "<text>")?);
    Ok(source.store())
}

fn key_of(m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> ObjectKey {
    ObjectKey::new(
        m.namespace.clone().unwrap_or_else(|| "default".into()),
        m.name.clone().unwrap_or_default(),
    )
}

/// One document of a file, for its problems.
struct Document<'a> {
    origin: &'a str,
    /// 0-based; messages count from 1.
    index: usize,
    kind: &'a str,
    key: ObjectKey,
}

impl Document<'_> {
    /// Deserializes the document as strictly as the API server's strict field validation
    /// (`kubectl apply --validate=strict`): a field the type does not know, like a wrong type or
    /// a missing field, refuses the object. Each problem goes to `refused`; `None` means the
    /// object is not served.
    fn strict<T: DeserializeOwned>(
        &self,
        value: serde_yaml::Value,
        refused: &mut Vec<Problem>,
    ) -> Option<T> {
        let mut unknown = Vec::new();
        let parsed = serde_ignored::deserialize(value, |path| {
            let field = json_path(&path);
            // The custom resources' generated types take these two as given (the caller has
            // matched them already) and skip them.
            if field != "apiVersion" && field != "kind" {
                unknown.push(field);
            }
        });
        let n = self.index + 1;
        match parsed {
            Ok(object) if unknown.is_empty() => Some(object),
            Ok(_) => {
                for field in unknown {
                    refused.push(self.problem(
                        field,
                        "UnknownField",
                        format!("unknown field in document {n}; the object is not served"),
                    ));
                }
                None
            }
            Err(e) => {
                refused.push(self.problem(
                    String::new(),
                    "InvalidObject",
                    format!("document {n}: {e}; the object is not served"),
                ));
                None
            }
        }
    }

    fn problem(&self, field: String, reason: &str, message: String) -> Problem {
        Problem {
            kind: self.kind.to_string(),
            object: self.key.clone(),
            field,
            reason: reason.into(),
            message,
            origin: Some(self.origin.to_string()),
        }
    }
}

/// A path of `serde_ignored` as `Problem::field` writes paths: `spec.backends[1].weigth`.
fn json_path(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", json_path(parent)),
        Path::Map { parent, key } => {
            let parent = json_path(parent);
            if parent.is_empty() {
                key.clone()
            } else {
                format!("{parent}.{key}")
            }
        }
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => json_path(parent),
    }
}

/// Parses one file. A YAML syntax error fails the whole file (its documents cannot be told apart
/// reliably after one); a document of a kind the gateway does not serve is skipped and reported
/// in `refused`, and so is a document that does not deserialize strictly (unknown fields, wrong
/// types); the file's other documents are kept.
fn parse(text: &str, origin: &str) -> Result<FileObjects, String> {
    let mut out = FileObjects::default();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = serde_yaml::Value::deserialize(doc)
            .map_err(|e| format!("document {}: invalid YAML: {e}", i + 1))?;
        if value.is_null() {
            continue;
        }
        let text_at =
            |v: Option<&serde_yaml::Value>| v.and_then(|k| k.as_str()).unwrap_or("").to_string();
        let kind = text_at(value.get("kind"));
        let api = text_at(value.get("apiVersion"));
        let metadata = value.get("metadata");
        let name = metadata
            .and_then(|m| m.get("name"))
            .and_then(|n| n.as_str())
            .unwrap_or("?")
            .to_string();
        let namespace = metadata
            .and_then(|m| m.get("namespace"))
            .and_then(|n| n.as_str())
            .unwrap_or("default")
            .to_string();
        let doc = Document {
            origin,
            index: i,
            kind: &kind,
            key: ObjectKey::new(&namespace, &name),
        };
        match (api.as_str(), kind.as_str()) {
            ("tollgate.dev/v1alpha1", "AgentRoute") => {
                if let Some(mut r) = doc.strict::<AgentRoute>(value, &mut out.refused) {
                    r.metadata.namespace.get_or_insert_with(|| "default".into());
                    out.routes.push(r);
                }
            }
            ("tollgate.dev/v1alpha1", "AgentApiKey") => {
                if let Some(mut k) = doc.strict::<AgentApiKey>(value, &mut out.refused) {
                    k.metadata.namespace.get_or_insert_with(|| "default".into());
                    out.keys.push(k);
                }
            }
            ("networking.k8s.io/v1", "Ingress") => {
                if let Some(mut i) = doc.strict::<Ingress>(value, &mut out.refused) {
                    i.metadata.namespace.get_or_insert_with(|| "default".into());
                    out.ingresses.push(i);
                }
            }
            ("networking.k8s.io/v1", "IngressClass") => {
                if let Some(c) = doc.strict::<IngressClass>(value, &mut out.refused) {
                    out.ingress_classes.push(c);
                }
            }
            ("v1", "Secret") => {
                if let Some(mut s) = doc.strict::<Secret>(value, &mut out.refused) {
                    s.metadata.namespace.get_or_insert_with(|| "default".into());
                    out.secrets.push(s);
                }
            }
            _ => {
                // Like an invalid object: this one document is not served, the rest of the
                // file is.
                let mut p = file_problem(
                    Path::new(origin),
                    format!(
                        "document {} (apiVersion {api:?}, kind {kind:?}, {namespace}/{name}): \
                         unsupported kind, skipped; expected tollgate.dev/v1alpha1 AgentRoute \
                         or AgentApiKey, networking.k8s.io/v1 Ingress or IngressClass, or v1 \
                         Secret",
                        i + 1
                    ),
                );
                p.reason = "UnsupportedKind".into();
                out.refused.push(p);
            }
        }
    }
    Ok(out)
}

/// Calls `on_change` (debounced) whenever something under `root` changes. Runs until the
/// returned watcher is dropped.
pub fn watch(
    root: &Path,
    debounce: Duration,
    on_change: Arc<dyn Fn() + Send + Sync>,
) -> Result<notify::RecommendedWatcher, notify::Error> {
    use notify::{RecursiveMode, Watcher};
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(ev) = res {
            if !ev.kind.is_access() {
                let _ = tx.send(());
            }
        }
    })?;
    // Watch the directory holding a single file, so editors' rename-into-place is seen.
    // A single file's directory is watched without recursion: it may be /tmp or $HOME.
    let (target, mode) = if root.is_file() {
        (
            root.parent().unwrap_or(root).to_path_buf(),
            RecursiveMode::NonRecursive,
        )
    } else {
        (root.to_path_buf(), RecursiveMode::Recursive)
    };
    watcher.watch(&target, mode)?;
    tokio::spawn(async move {
        while rx.recv().await.is_some() {
            // Debounce: a burst of events (an editor's save) costs one reload.
            tokio::time::sleep(debounce).await;
            while rx.try_recv().is_ok() {}
            // Reading files blocks: keep it off the async workers.
            let f = on_change.clone();
            let _ = tokio::task::spawn_blocking(move || f()).await;
        }
    });
    Ok(watcher)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROUTE: &str = "apiVersion: tollgate.dev/v1alpha1
kind: AgentRoute
metadata: {name: chat, namespace: agents}
spec:
  match: {pathPrefix: /chat}
  backends: [{url: 'http://127.0.0.1:9000'}]
";

    const KEY: &str = "apiVersion: tollgate.dev/v1alpha1
kind: AgentApiKey
metadata: {name: mobile}
spec: {clientId: mobile, keyHash: 'sha256:00'}
";

    /// Loads `text` as the one file of a fresh directory.
    fn load_one(text: &str) -> (tempfile::TempDir, PathBuf, Loaded) {
        let dir = tempfile::tempdir().expect("temporary directory");
        let file = dir.path().join("routes.yaml");
        std::fs::write(&file, text).expect("write routes.yaml");
        let loaded = FileSource::new(dir.path()).load();
        (dir, file, loaded)
    }

    #[test]
    fn a_document_of_an_unknown_kind_is_skipped_and_the_rest_of_the_file_serves() {
        let text = format!(
            "{ROUTE}---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web}}\n---\n{KEY}"
        );
        let (_dir, file, loaded) = load_one(&text);
        let routes: Vec<_> = loaded
            .store
            .routes
            .iter()
            .map(|r| key_of(&r.metadata))
            .collect();
        assert_eq!(routes, vec![ObjectKey::new("agents", "chat")]);
        assert_eq!(loaded.store.keys.len(), 1, "the key after it is kept");
        assert_eq!(loaded.problems.len(), 1, "{:#?}", loaded.problems);
        let p = &loaded.problems[0];
        assert_eq!(p.reason, "UnsupportedKind");
        assert_eq!(p.origin.as_deref(), file.to_str());
        let line = p.to_string();
        for needle in ["document 2", "\"apps/v1\"", "\"Deployment\"", "default/web"] {
            assert!(line.contains(needle), "{needle} in {line}");
        }
    }

    #[test]
    fn ingresses_and_their_class_are_read_from_files_and_compiled() {
        let text = "apiVersion: networking.k8s.io/v1
kind: IngressClass
metadata: {name: tollgate}
spec: {controller: tollgate.dev/ingress-controller}
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata:
  name: web
  namespace: agents
  annotations: {nginx.ingress.kubernetes.io/server-snippet: x}
spec:
  ingressClassName: tollgate
  rules:
    - host: web.example.com
      http:
        paths:
          - {path: /api, pathType: Prefix, backend: {service: {name: api, port: {number: 80}}}}
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: typo}
spec: {ingressClassName: tollgate, rulez: []}
";
        let (_dir, _file, loaded) = load_one(text);
        assert_eq!(loaded.store.ingress.classes.len(), 1);
        assert_eq!(
            loaded.store.ingress.ingresses.len(),
            1,
            "the strict parse refuses `rulez`"
        );
        assert_eq!(loaded.problems.len(), 1, "{:#?}", loaded.problems);
        assert!(
            loaded.problems[0].to_string().contains("rulez"),
            "{}",
            loaded.problems[0]
        );
        let snap = crate::config::compile(&loaded.store, &Default::default());
        assert_eq!(snap.routes.len(), 1);
        assert_eq!(snap.ingresses.len(), 1);
        assert_eq!(snap.ingresses[0].warnings[0].0, "UnsupportedAnnotation");
        // `tollgate check` and standalone report it like any problem, with its file.
        let p = snap
            .problems
            .iter()
            .find(|p| p.kind == "Ingress")
            .expect("a problem");
        assert_eq!(p.reason, "UnsupportedAnnotation");
        assert!(p.origin.is_some());
    }

    #[test]
    fn a_yaml_syntax_error_still_fails_the_whole_file() {
        let text = format!("{ROUTE}---\nkind: [unclosed\n");
        let (_dir, _file, loaded) = load_one(&text);
        assert!(loaded.store.routes.is_empty());
        assert_eq!(loaded.problems.len(), 1, "{:#?}", loaded.problems);
        assert_eq!(loaded.problems[0].reason, "ParseError");
    }
    #[test]
    fn every_unknown_field_is_reported_with_its_path_and_refuses_its_object() {
        let typo = "apiVersion: tollgate.dev/v1alpha1
kind: AgentRoute
metadata: {name: typo, namespace: agents, labelz: {a: b}}
spec:
  match: {pathPrefix: /typo}
  rateLimt: {requestsPerMinute: 5}
  backends: [{url: 'http://127.0.0.1:9000'}, {url: 'http://127.0.0.1:9001', weigth: 2}]
";
        let secret = "apiVersion: v1
kind: Secret
metadata: {name: s}
stringDta: {api-key: x}
";
        let text = format!("{ROUTE}---\n{typo}---\n{KEY}---\n{secret}");
        let (_dir, file, loaded) = load_one(&text);
        // The objects without unknown fields serve; the two with them do not.
        let routes: Vec<_> = loaded
            .store
            .routes
            .iter()
            .map(|r| key_of(&r.metadata))
            .collect();
        assert_eq!(routes, vec![ObjectKey::new("agents", "chat")]);
        assert_eq!(loaded.store.keys.len(), 1);
        assert!(loaded.store.secrets.is_empty());
        let found: Vec<_> = loaded
            .problems
            .iter()
            .map(|p| {
                (
                    p.kind.as_str(),
                    p.object.to_string(),
                    p.field.as_str(),
                    p.reason.as_str(),
                )
            })
            .collect();
        assert_eq!(
            found,
            vec![
                (
                    "AgentRoute",
                    "agents/typo".to_string(),
                    "metadata.labelz",
                    "UnknownField"
                ),
                (
                    "AgentRoute",
                    "agents/typo".to_string(),
                    "spec.rateLimt",
                    "UnknownField"
                ),
                (
                    "AgentRoute",
                    "agents/typo".to_string(),
                    "spec.backends[1].weigth",
                    "UnknownField"
                ),
                (
                    "Secret",
                    "default/s".to_string(),
                    "stringDta",
                    "UnknownField"
                ),
            ]
        );
        let line = loaded.problems[1].to_string();
        let origin = file.display().to_string();
        assert_eq!(
            line,
            format!("{origin}: AgentRoute agents/typo field spec.rateLimt: unknown field in document 2; the object is not served (UnknownField)")
        );
    }

    #[test]
    fn a_document_of_the_wrong_shape_is_refused_alone() {
        let bad = "apiVersion: tollgate.dev/v1alpha1
kind: AgentApiKey
metadata: {name: bad}
spec: {clientId: [not, a, string]}
";
        let (_dir, _file, loaded) = load_one(&format!("{bad}---\n{ROUTE}"));
        assert_eq!(loaded.store.routes.len(), 1, "{:#?}", loaded.problems);
        assert!(loaded.store.keys.is_empty());
        assert_eq!(loaded.problems.len(), 1, "{:#?}", loaded.problems);
        let p = &loaded.problems[0];
        assert_eq!(
            (p.kind.as_str(), p.reason.as_str()),
            ("AgentApiKey", "InvalidObject")
        );
        assert!(p.message.starts_with("document 1: "), "{}", p.message);
    }
}
