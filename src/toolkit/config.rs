//! The config source: configuration values under `<prefix>/config/<name>/`, one key per dotted
//! path, values as JSON text; optionally overlaid on a local file.

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use tokio::sync::mpsc;

use super::{Toolkit, ToolkitError, ToolkitResult};
use crate::client::Client;
use crate::error::ErrorKind;
use crate::txn::Op;
use crate::watch::{EventKind, WatchBatch, Watcher};

impl Toolkit {
    /// The config source `name`: keys under `<prefix>/config/<name>/`.
    pub fn config_source(&self, name: impl Into<String>) -> ConfigSource {
        ConfigSource {
            tk: self.clone(),
            name: name.into(),
            file: None,
        }
    }
}

impl Client {
    /// The config source `name` under the default toolkit prefix; same as
    /// `client.toolkit().config_source(name)`.
    pub fn config_source(&self, name: impl Into<String>) -> ConfigSource {
        self.toolkit().config_source(name)
    }
}

/// Configuration stored in etcd, one key per dotted path (`db.pool.size` is the key
/// `<prefix>/config/<name>/db.pool.size`), each value a JSON document. Reading builds a tree:
/// dotted paths become nested objects (`{"db": {"pool": {"size": ...}}}`). A segment that is
/// the index of an array already at that place (from the file, or stored whole at a shorter
/// path) names its element: `servers.1` replaces the second of `servers`' elements. Any other
/// segment below an array (a name, an index past the end) makes it an object, with its
/// elements under their indexes (`"0"`, `"1"`, ...).
///
/// With [`file`](Self::file) (hybrid mode) a local file is the base and the etcd values are
/// overlaid key by key: the value at a dotted path in etcd replaces the file's value at that
/// path, everything else comes from the file. The file is read by every [`value`](Self::value),
/// [`get`](Self::get) and [`watch`](Self::watch) call (a watch reads it once, at the start).
#[derive(Debug, Clone)]
pub struct ConfigSource {
    tk: Toolkit,
    name: String,
    file: Option<PathBuf>,
}

impl ConfigSource {
    /// Hybrid mode: use the file at `path` as the base, its format picked by its extension:
    /// `.json`; `.yaml`/`.yml` and `.toml` with the feature `toolkit-files`.
    pub fn file(mut self, path: impl Into<PathBuf>) -> Self {
        self.file = Some(path.into());
        self
    }

    /// The config's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The etcd key prefix of this config: `<prefix>/config/<name>/`.
    pub fn key_prefix(&self) -> ToolkitResult<String> {
        self.tk.section_key("config", &self.name)
    }

    /// The etcd key of the dotted `path`.
    pub fn key(&self, path: &str) -> ToolkitResult<String> {
        validate_path(path)?;
        Ok(format!("{}{path}", self.key_prefix()?))
    }

    /// Read the config as a JSON tree (file base, if any, with the etcd values overlaid).
    /// A value in etcd that is not JSON fails with [`ToolkitError::InvalidValue`] naming its
    /// key.
    pub async fn value(&self) -> ToolkitResult<Value> {
        self.read().await?.0.build()
    }

    /// Read the config into `T`.
    pub async fn get<T: DeserializeOwned>(&self) -> ToolkitResult<T> {
        decode(self.value().await?)
    }

    /// Store `value` (as JSON) at the dotted `path`, in one transaction. Returns the revision
    /// of the write.
    pub async fn set(&self, path: &str, value: impl Serialize) -> ToolkitResult<i64> {
        let key = self.key(path)?;
        let json = serde_json::to_string(&value).map_err(|e| ToolkitError::Encode {
            reason: e.to_string(),
        })?;
        let resp = self
            .tk
            .client
            .kv()
            .txn()
            .and_then([Op::put(key, json)])
            .await?;
        Ok(resp.header.revision)
    }

    /// Delete the dotted `path` and every path below it (`db` also deletes `db.pool.size`)
    /// in one transaction. Returns how many keys were deleted.
    pub async fn delete(&self, path: &str) -> ToolkitResult<i64> {
        let key = self.key(path)?;
        let below = format!("{key}.");
        let resp = self
            .tk
            .client
            .kv()
            .txn()
            .and_then([Op::delete(key), Op::delete(below).prefix()])
            .await?;
        Ok(resp
            .responses
            .iter()
            .filter_map(|r| r.as_delete().map(|d| d.deleted))
            .sum())
    }

    /// Watch the config: the stream's first item is the config as read now (at revision R);
    /// then, from revision R + 1 on (so no change is missed), one new config after every
    /// change. Changes that arrive together are coalesced into one new config, and so are
    /// changes made while the stream is not read: [`ConfigWatch::current`] is always the
    /// newest config, and the stream holds at most one older config ahead of the newest (a
    /// consumer that reads only `current()` never holds the watch back). A value that is not
    /// JSON, or a tree that does not fit `T`, is reported as an error item and does not
    /// replace the last good config; the stream goes on.
    ///
    /// Should the revision to resume from have been compacted meanwhile (a reconnect after a
    /// quiet spell), the config is read again (a new config if it differs) and watched on
    /// from there; should that read fail for a passing reason (the cluster out of reach, no
    /// leader), the failure is yielded as an error item and the read retried with a growing
    /// back-off. The stream ends after any other terminal watch error (e.g. permission
    /// denied, a closed client), which it yields first.
    ///
    /// The watch runs in a background task that ends when the [`ConfigWatch`] is dropped.
    pub async fn watch<T>(&self) -> ToolkitResult<ConfigWatch<T>>
    where
        T: DeserializeOwned + Clone + Send + 'static,
    {
        let (overlay, revision) = self.read().await?;
        let prefix = self.key_prefix()?;
        let watcher = self
            .tk
            .client
            .watch(prefix.clone())
            .prefix()
            .start_revision(revision + 1)
            .await?;
        let last_good = Arc::new(Mutex::new(None));
        let (tx, rx) = mpsc::channel(1);
        let first = publish::<T>(&overlay, revision, &last_good);
        // The channel is new and has room for one item.
        let _ = tx.try_send(first);
        let task = WatchTask {
            source: self.clone(),
            overlay,
            watcher,
            tx,
            last_good: last_good.clone(),
            _t: PhantomData,
        };
        self.tk.client.shared().spawn(task.run());
        Ok(ConfigWatch { rx, last_good })
    }

    /// The base file (if any) and the etcd values, with the revision of the read.
    async fn read(&self) -> ToolkitResult<(Overlay, i64)> {
        let prefix = self.key_prefix()?;
        let base = match &self.file {
            Some(path) => read_file(path).await?,
            None => Value::Object(Map::new()),
        };
        let resp = self.tk.client.kv().get(prefix.clone()).prefix().await?;
        let mut overlay = Overlay {
            base,
            prefix,
            entries: BTreeMap::new(),
        };
        for kv in &resp.kvs {
            overlay.put(kv.key(), kv.value());
        }
        Ok((overlay, resp.header.revision))
    }
}

fn validate_path(path: &str) -> ToolkitResult<()> {
    let bad = |reason| {
        Err(ToolkitError::InvalidPath {
            path: path.to_owned(),
            reason,
        })
    };
    if path.is_empty() {
        return bad("it is empty");
    }
    if path.split('.').any(str::is_empty) {
        return bad("it has an empty segment");
    }
    if path.contains('/') {
        return bad("it must not contain '/'");
    }
    Ok(())
}

fn decode<T: DeserializeOwned>(value: Value) -> ToolkitResult<T> {
    serde_json::from_value(value).map_err(|e| ToolkitError::Decode {
        reason: e.to_string(),
    })
}

/// Read and parse the base file, picking the format by extension.
async fn read_file(path: &Path) -> ToolkitResult<Value> {
    let err = |reason: String| ToolkitError::File {
        path: path.to_owned(),
        reason,
    };
    let text = tokio::fs::read_to_string(path)
        .await
        .map_err(|e| err(e.to_string()))?;
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .unwrap_or_default();
    let value: Value = match ext.as_str() {
        "json" => serde_json::from_str(&text).map_err(|e| err(e.to_string()))?,
        #[cfg(feature = "toolkit-files")]
        "yaml" | "yml" => serde_norway::from_str(&text).map_err(|e| err(e.to_string()))?,
        #[cfg(feature = "toolkit-files")]
        "toml" => toml::from_str(&text).map_err(|e| err(e.to_string()))?,
        #[cfg(not(feature = "toolkit-files"))]
        "yaml" | "yml" | "toml" => {
            return Err(err(
                "YAML and TOML files need the feature `toolkit-files`".to_owned()
            ));
        }
        _ => {
            return Err(err(format!(
                "unknown format {ext:?} (use .json, .yaml, .yml or .toml)"
            )));
        }
    };
    match value {
        Value::Object(_) => Ok(value),
        Value::Null => Ok(Value::Object(Map::new())),
        _ => Err(err("the top level is not a map".to_owned())),
    }
}

/// The base tree and the etcd entries (dotted path -> parsed value or the parse error).
struct Overlay {
    base: Value,
    prefix: String,
    entries: BTreeMap<String, (String, Result<Value, String>)>,
}

impl Overlay {
    /// Record the put of `key`; false when the key is not a config path.
    fn put(&mut self, key: &[u8], value: &[u8]) -> bool {
        let Some(path) = self.path_of(key) else {
            return false;
        };
        let parsed = std::str::from_utf8(value)
            .map_err(|e| e.to_string())
            .and_then(|s| serde_json::from_str::<Value>(s).map_err(|e| e.to_string()));
        let key = String::from_utf8_lossy(key).into_owned();
        self.entries.insert(path, (key, parsed));
        true
    }

    fn delete(&mut self, key: &[u8]) -> bool {
        match self.path_of(key) {
            Some(path) => self.entries.remove(&path).is_some(),
            None => false,
        }
    }

    fn path_of(&self, key: &[u8]) -> Option<String> {
        let rest = key.strip_prefix(self.prefix.as_bytes())?;
        let path = std::str::from_utf8(rest).ok()?;
        validate_path(path).ok()?;
        Some(path.to_owned())
    }

    /// The tree: the base with every etcd value set at its path, shorter paths first (so
    /// `db.pool.size` lands inside a `db` object stored as a whole).
    fn build(&self) -> ToolkitResult<Value> {
        let mut tree = self.base.clone();
        for (path, (key, parsed)) in &self.entries {
            let value = parsed
                .as_ref()
                .map_err(|reason| ToolkitError::InvalidValue {
                    key: key.clone(),
                    reason: reason.clone(),
                })?;
            set_path(&mut tree, path, value.clone());
        }
        Ok(tree)
    }
}

/// Set `value` at the dotted `path` of `tree`, creating (or replacing non-object) parents. A
/// segment that is an index of an array already there (from the base file, or from a value
/// stored whole at a shorter path) stands for that element: `servers.1` replaces the second
/// of `servers`' elements. Any other segment below an array makes it an object with the
/// elements under their indexes; below a scalar, an empty object.
fn set_path(tree: &mut Value, path: &str, value: Value) {
    let mut node = tree;
    let mut segments = path.split('.').peekable();
    while let Some(seg) = segments.next() {
        let last = segments.peek().is_none();
        let index = match &*node {
            Value::Array(items) => array_index(seg, items.len()),
            _ => None,
        };
        if let Some(i) = index {
            let Some(item) = node.as_array_mut().and_then(|items| items.get_mut(i)) else {
                return;
            };
            if last {
                *item = value;
                return;
            }
            node = item;
            continue;
        }
        match node {
            Value::Object(_) => {}
            // Its elements stay, keyed by their index: an element set at an earlier path
            // (`servers.1`, which sorts first) is not lost to `servers.x`.
            Value::Array(items) => {
                let map = std::mem::take(items)
                    .into_iter()
                    .enumerate()
                    .map(|(i, v)| (i.to_string(), v))
                    .collect();
                *node = Value::Object(map);
            }
            _ => *node = Value::Object(Map::new()),
        }
        let Value::Object(map) = node else { return };
        if last {
            map.insert(seg.to_owned(), value);
            return;
        }
        node = map
            .entry(seg.to_owned())
            .or_insert_with(|| Value::Object(Map::new()));
    }
}

/// The element `seg` names in an array of `len`: a decimal index below `len`, written without
/// leading zeros.
fn array_index(seg: &str, len: usize) -> Option<usize> {
    if seg.len() > 1 && seg.starts_with('0') {
        return None;
    }
    if !seg.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    seg.parse::<usize>().ok().filter(|&i| i < len)
}

fn publish<T: DeserializeOwned + Clone>(
    overlay: &Overlay,
    revision: i64,
    last_good: &Mutex<Option<ConfigUpdate<T>>>,
) -> ToolkitResult<ConfigUpdate<T>> {
    let config: T = decode(overlay.build()?)?;
    let update = ConfigUpdate { config, revision };
    if let Ok(mut g) = last_good.lock() {
        *g = Some(update.clone());
    }
    Ok(update)
}

/// A new config and the etcd revision it reflects.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigUpdate<T> {
    /// The config.
    pub config: T,
    /// The store revision the config was read or last changed at.
    pub revision: i64,
}

/// A stream of new typed configs, from [`ConfigSource::watch`]. Also readable with
/// [`next`](Self::next). Dropping it ends its background task.
pub struct ConfigWatch<T> {
    rx: mpsc::Receiver<ToolkitResult<ConfigUpdate<T>>>,
    last_good: Arc<Mutex<Option<ConfigUpdate<T>>>>,
}

impl<T> fmt::Debug for ConfigWatch<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConfigWatch").finish_non_exhaustive()
    }
}

impl<T: Clone> ConfigWatch<T> {
    /// The next config (or error), or `None` once the watch has ended.
    pub async fn next(&mut self) -> Option<ToolkitResult<ConfigUpdate<T>>> {
        self.rx.recv().await
    }

    /// The last good config produced by the watch (errors never replace it).
    pub fn current(&self) -> Option<ConfigUpdate<T>> {
        self.last_good.lock().ok().and_then(|g| g.clone())
    }
}

impl<T> futures_core::Stream for ConfigWatch<T> {
    type Item = ToolkitResult<ConfigUpdate<T>>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().rx.poll_recv(cx)
    }
}

struct WatchTask<T> {
    source: ConfigSource,
    overlay: Overlay,
    watcher: Watcher,
    tx: mpsc::Sender<ToolkitResult<ConfigUpdate<T>>>,
    last_good: Arc<Mutex<Option<ConfigUpdate<T>>>>,
    _t: PhantomData<fn() -> T>,
}

type Item<T> = ToolkitResult<ConfigUpdate<T>>;

/// What the consumer has not taken yet: the newest config, then an error that came after
/// it. A newer config replaces both (it is the state now, and the stream holds at most one
/// config ahead of it); a newer error replaces only the error, so that a config is never
/// lost behind an error.
struct Pending<T> {
    config: Option<ConfigUpdate<T>>,
    error: Option<ToolkitError>,
}

impl<T> Pending<T> {
    fn new() -> Self {
        Pending {
            config: None,
            error: None,
        }
    }

    fn put(&mut self, item: Item<T>) {
        match item {
            Ok(update) => {
                self.config = Some(update);
                self.error = None;
            }
            Err(e) => self.error = Some(e),
        }
    }

    /// The next item to deliver: the config first.
    fn take(&mut self) -> Option<Item<T>> {
        match self.config.take() {
            Some(update) => Some(Ok(update)),
            None => self.error.take().map(Err),
        }
    }

    fn is_some(&self) -> bool {
        self.config.is_some() || self.error.is_some()
    }
}

/// Why a wait of the watch task ended.
enum Waited {
    /// The consumer is gone: the task ends.
    Gone,
    /// The wait is over.
    Done,
}

impl<T: DeserializeOwned + Clone + Send + 'static> WatchTask<T> {
    async fn run(mut self) {
        // What the consumer has not taken: newer items replace older ones, so a consumer that
        // reads only `current()` never holds the watch back.
        let mut pending = Pending::new();
        loop {
            let first = tokio::select! {
                _ = self.tx.closed() => return,
                permit = self.tx.reserve(), if pending.is_some() => {
                    match permit {
                        Ok(p) => {
                            if let Some(item) = pending.take() {
                                p.send(item);
                            }
                            continue;
                        }
                        Err(_) => return,
                    }
                }
                b = self.watcher.next() => b,
            };
            let mut batches = Vec::new();
            let mut end = None;
            match first {
                Some(Ok(b)) => batches.push(b),
                Some(Err(e)) => end = Some(e),
                None => return,
            }
            // Coalesce: everything already delivered becomes one new config.
            if end.is_none() {
                end = drain_ready(&mut self.watcher, &mut batches).await;
            }
            let mut changed = false;
            let mut revision = 0;
            for b in &batches {
                for ev in b.events() {
                    changed |= match ev.kind {
                        EventKind::Put => self.overlay.put(ev.kv.key(), ev.kv.value()),
                        EventKind::Delete => self.overlay.delete(ev.kv.key()),
                    };
                    revision = revision.max(ev.kv.mod_revision());
                }
            }
            if changed {
                pending.put(publish::<T>(&self.overlay, revision, &self.last_good));
            }
            let Some(e) = end else { continue };
            let last = if e.kind() == ErrorKind::Compacted {
                // Changes since the resume point are gone from the history: read again.
                match self.read_again(&mut pending).await {
                    Ok(Waited::Done) => continue,
                    Ok(Waited::Gone) => return,
                    Err(e) => e,
                }
            } else {
                ToolkitError::Etcd(e)
            };
            // The end: what is pending, then the error.
            while let Some(item) = pending.take() {
                if self.tx.send(item).await.is_err() {
                    return;
                }
            }
            let _ = self.tx.send(Err(last)).await;
            return;
        }
    }

    /// [`reread`](Self::reread) until it succeeds, with a growing back-off while it fails for
    /// a passing reason (the cluster out of reach, no leader), each failure reported as an
    /// error item; items are delivered meanwhile. Ends early when the consumer is gone, and
    /// with the error when one is final.
    async fn read_again(&mut self, pending: &mut Pending<T>) -> ToolkitResult<Waited> {
        let mut failures = 0u32;
        loop {
            let tx = self.tx.clone();
            let r = tokio::select! {
                _ = tx.closed() => return Ok(Waited::Gone),
                r = self.reread() => r,
            };
            match r {
                Ok(item) => {
                    if let Some(item) = item {
                        pending.put(item);
                    }
                    return Ok(Waited::Done);
                }
                Err(ToolkitError::Etcd(e)) if e.is_retryable() || e.is_deadline() => {
                    pending.put(Err(ToolkitError::Etcd(e)));
                }
                Err(e) => return Err(e),
            }
            failures = failures.saturating_add(1);
            let pause = crate::balancer::jitter(Duration::from_millis(100u64 << failures.min(6)));
            if let Waited::Gone = self.deliver_for(pause, pending).await {
                return Ok(Waited::Gone);
            }
        }
    }

    /// Deliver pending items for `pause`.
    async fn deliver_for(&mut self, pause: Duration, pending: &mut Pending<T>) -> Waited {
        let sleep = tokio::time::sleep(pause);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = self.tx.closed() => return Waited::Gone,
                () = &mut sleep => return Waited::Done,
                permit = self.tx.reserve(), if pending.is_some() => match permit {
                    Ok(p) => {
                        if let Some(item) = pending.take() {
                            p.send(item);
                        }
                    }
                    Err(_) => return Waited::Gone,
                },
            }
        }
    }

    /// Read the etcd values again and watch on from that read; the new config when it
    /// differs from the one before.
    async fn reread(&mut self) -> ToolkitResult<Option<Item<T>>> {
        let prefix = self.source.key_prefix()?;
        let resp = self
            .source
            .tk
            .client
            .kv()
            .get(prefix.clone())
            .prefix()
            .await?;
        let watcher = self
            .source
            .tk
            .client
            .watch(prefix.clone())
            .prefix()
            .start_revision(resp.header.revision + 1)
            .await?;
        let mut fresh = Overlay {
            base: self.overlay.base.clone(),
            prefix,
            entries: BTreeMap::new(),
        };
        for kv in &resp.kvs {
            fresh.put(kv.key(), kv.value());
        }
        let changed = fresh.entries != self.overlay.entries;
        self.overlay = fresh;
        self.watcher = watcher;
        Ok(changed.then(|| publish::<T>(&self.overlay, resp.header.revision, &self.last_good)))
    }
}

/// Take every batch the watcher has ready without waiting; the watch error if one is ready.
async fn drain_ready(
    watcher: &mut Watcher,
    batches: &mut Vec<WatchBatch>,
) -> Option<crate::error::Error> {
    use futures_core::Stream;
    std::future::poll_fn(|cx| {
        for _ in 0..1024 {
            match Pin::new(&mut *watcher).poll_next(cx) {
                Poll::Ready(Some(Ok(b))) => batches.push(b),
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(e)),
                Poll::Ready(None) | Poll::Pending => return Poll::Ready(None),
            }
        }
        Poll::Ready(None)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dotted_paths_become_nested_objects_and_overlay_the_base() {
        let mut o = Overlay {
            base: serde_json::json!({"db": {"host": "file", "port": 1}, "name": "x"}),
            prefix: "/p/config/a/".into(),
            entries: BTreeMap::new(),
        };
        assert!(o.put(b"/p/config/a/db.port", b"2"));
        assert!(o.put(b"/p/config/a/db.pool.size", b"10"));
        assert!(!o.put(b"/p/config/a/bad..path", b"1"));
        assert_eq!(
            o.build().unwrap(),
            serde_json::json!({"db": {"host": "file", "port": 2, "pool": {"size": 10}}, "name": "x"})
        );
        assert!(o.put(b"/p/config/a/name", b"not json"));
        match o.build() {
            Err(ToolkitError::InvalidValue { key, .. }) => assert_eq!(key, "/p/config/a/name"),
            other => panic!("{other:?}"),
        }
        assert!(o.delete(b"/p/config/a/name"));
        assert_eq!(o.build().unwrap()["name"], "x");
    }

    /// An index segment names an element of an array already there; anything else below an
    /// array (a name, an index past the end, a padded index) makes an object of it.
    #[test]
    fn an_index_segment_names_an_array_element() {
        let mut t = serde_json::json!({"s": ["a", {"h": "b"}, "c"]});
        set_path(&mut t, "s.0", serde_json::json!("A"));
        set_path(&mut t, "s.1.h", serde_json::json!("B"));
        assert_eq!(t, serde_json::json!({"s": ["A", {"h": "B"}, "c"]}));
        for seg in ["3", "01", "x", "-1", "+1"] {
            let mut t = serde_json::json!({"s": ["a"]});
            set_path(&mut t, &format!("s.{seg}"), serde_json::json!(1));
            assert_eq!(t, serde_json::json!({"s": {"0": "a", seg: 1}}), "{seg}");
        }
        // Paths apply in key order: an element set before a name below the same array is
        // kept, and so is one set after an index past the end (`s.10` sorts before `s.2`).
        let mut o = Overlay {
            base: serde_json::json!({"s": ["a", "b", "c"]}),
            prefix: "/p/".into(),
            entries: BTreeMap::new(),
        };
        for (path, value) in [
            ("s.1", "\"B\""),
            ("s.x", "1"),
            ("s.10", "2"),
            ("s.2", "\"C\""),
        ] {
            assert!(o.put(format!("/p/{path}").as_bytes(), value.as_bytes()));
        }
        assert_eq!(
            o.build().unwrap(),
            serde_json::json!({"s": {"0": "a", "1": "B", "2": "C", "10": 2, "x": 1}})
        );
    }
}
