//! The file source of `standalone` and `check`: multi-document YAML files (AgentRoute,
//! AgentApiKey, Secret) from a file or a directory, watched for changes. Only gathers objects.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use serde::Deserialize;

use crate::api::{AgentApiKey, AgentRoute};
use crate::config::{ObjectKey, Problem, Store};

/// What one file held the last time it parsed.
#[derive(Clone, Debug, Default)]
struct FileObjects {
    routes: Vec<AgentRoute>,
    keys: Vec<AgentApiKey>,
    secrets: Vec<Secret>,
}

/// Loads configuration files, keeping each file's last good content.
#[derive(Debug)]
pub struct FileSource {
    root: PathBuf,
    last_good: BTreeMap<PathBuf, FileObjects>,
}

/// A load: the store to compile and the file-level problems found.
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
    /// reported; a file that disappeared is dropped.
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
                .and_then(|t| parse(&t))
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
        }
        store
    }
}

/// Parses the text of one configuration file into a `Store`, exactly as `standalone` reads each
/// file (multi-document YAML of AgentRoute, AgentApiKey and Secret). For tools and fuzzing.
pub fn parse_str(text: &str) -> Result<Store, String> {
    let mut source = FileSource::new(PathBuf::new());
    source
        .last_good
        .insert(PathBuf::from("<text>"), parse(text)?);
    Ok(source.store())
}

fn key_of(m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> ObjectKey {
    ObjectKey::new(
        m.namespace.clone().unwrap_or_else(|| "default".into()),
        m.name.clone().unwrap_or_default(),
    )
}

fn parse(text: &str) -> Result<FileObjects, String> {
    let mut out = FileObjects::default();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = serde_yaml::Value::deserialize(doc)
            .map_err(|e| format!("document {}: invalid YAML: {e}", i + 1))?;
        if value.is_null() {
            continue;
        }
        let kind = value
            .get("kind")
            .and_then(|k| k.as_str())
            .unwrap_or("")
            .to_string();
        let api = value
            .get("apiVersion")
            .and_then(|k| k.as_str())
            .unwrap_or("")
            .to_string();
        let name = value
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(|n| n.as_str())
            .unwrap_or("?")
            .to_string();
        let ctx = |e: serde_yaml::Error| format!("document {} ({kind} {name}): {e}", i + 1);
        match (api.as_str(), kind.as_str()) {
            ("tollgate.dev/v1alpha1", "AgentRoute") => {
                let mut r: AgentRoute = serde_yaml::from_value(value).map_err(ctx)?;
                r.metadata.namespace.get_or_insert_with(|| "default".into());
                out.routes.push(r);
            }
            ("tollgate.dev/v1alpha1", "AgentApiKey") => {
                let mut k: AgentApiKey = serde_yaml::from_value(value).map_err(ctx)?;
                k.metadata.namespace.get_or_insert_with(|| "default".into());
                out.keys.push(k);
            }
            ("v1", "Secret") => {
                let mut s: Secret = serde_yaml::from_value(value).map_err(ctx)?;
                s.metadata.namespace.get_or_insert_with(|| "default".into());
                out.secrets.push(s);
            }
            _ => {
                return Err(format!(
                    "document {}: unsupported kind {kind:?} (apiVersion {api:?}); expected \
                     tollgate.dev/v1alpha1 AgentRoute or AgentApiKey, or v1 Secret",
                    i + 1
                ))
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
