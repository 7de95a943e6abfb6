//! The fake cluster's state: objects under one global resource version, the retained event
//! history that resumed watches replay, the open watches fed live, and the failures a test injects.
//! Everything changes under one lock, so a watch registers and replays without a gap or a
//! duplicate.

use std::collections::{BTreeMap, BTreeSet};
use std::time::SystemTime;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use super::resources::{self, Resource, ResourceId, CRD_GROUPS, RESOURCES};
use super::FakeKubeError;

/// Where an object lives. Ordered as the real server lists: by namespace, then name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    resource: ResourceId,
    /// "" for cluster-scoped resources.
    namespace: String,
    name: String,
}

#[derive(Debug, Clone, Copy)]
enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One retained change; `object` is as stored (its `apiVersion` is rewritten per watch).
struct Change {
    rv: u64,
    key: Key,
    event: EventType,
    object: Value,
}

/// An open watch: its lines go to the HTTP response body. Dropping `tx` ends the response.
struct Watch {
    resource: ResourceId,
    /// Set for a watch of one namespace (`/api/v1/namespaces/<ns>/pods?watch=true`).
    namespace: Option<String>,
    version: &'static str,
    bookmarks: bool,
    tx: mpsc::UnboundedSender<Bytes>,
}

impl Watch {
    fn wants(&self, key: &Key) -> bool {
        self.resource == key.resource
            && self
                .namespace
                .as_deref()
                .is_none_or(|ns| ns == key.namespace)
    }
}

/// Why a list page cannot be served.
pub(super) enum ListError {
    /// Not a token this server handed out.
    BadContinue,
    /// The token's resource version is older than the retained history.
    Expired,
}

/// What a watch request gets.
pub(super) enum WatchStart {
    /// Lines to send first (replayed or synthetic ADDED), then whatever `live` yields.
    Stream {
        initial: Vec<Bytes>,
        live: mpsc::UnboundedReceiver<Bytes>,
    },
    /// The resource version is older than the retained history: one ERROR line, then the end.
    Expired(Bytes),
}

pub(super) struct Cluster {
    /// The last resource version handed out; lists report it.
    rv: u64,
    objects: BTreeMap<Key, Value>,
    /// Every change after `compacted`, oldest first.
    history: Vec<Change>,
    compacted: u64,
    installed: BTreeSet<&'static str>,
    watches: Vec<Watch>,
    /// Group-versions (`v1`, `networking.istio.io/v1`) whose discovery answers 503.
    pub failing_discovery: BTreeSet<String>,
    /// Resources whose lists, watches and gets answer this status code.
    pub failing: BTreeMap<ResourceId, u16>,
    /// `METHOD path?query` of every request, in arrival order.
    pub requests: Vec<String>,
}

impl Cluster {
    /// An empty cluster with every CRD installed.
    pub fn new() -> Self {
        Cluster {
            rv: 1,
            objects: BTreeMap::new(),
            history: Vec::new(),
            compacted: 0,
            installed: CRD_GROUPS.iter().copied().collect(),
            watches: Vec::new(),
            failing_discovery: BTreeSet::new(),
            failing: BTreeMap::new(),
            requests: Vec::new(),
        }
    }

    /// Whether `group` is served now: the core and built-in groups always, a CRD group if installed.
    pub fn group_served(&self, group: &str) -> bool {
        !CRD_GROUPS.contains(&group) || self.installed.contains(group)
    }

    pub fn served_groups(&self) -> Vec<&'static str> {
        resources::groups()
            .filter(|g| self.group_served(g))
            .collect()
    }

    /// Creates or replaces every object, after checking them all: a bad one applies none.
    /// `objects` are (where it came from, value) pairs; a `kind: List` is opened.
    pub fn apply(&mut self, objects: Vec<(String, Value)>) -> Result<(), FakeKubeError> {
        let mut checked = Vec::new();
        for (at, value) in objects {
            if value.get("kind").and_then(Value::as_str) == Some("List") {
                let items = match value.get("items") {
                    Some(Value::Array(items)) => items.clone(),
                    None | Some(Value::Null) => Vec::new(),
                    Some(_) => {
                        return Err(FakeKubeError::Invalid {
                            at,
                            message: "`items` of a List must be a sequence".into(),
                        })
                    }
                };
                for (i, item) in items.into_iter().enumerate() {
                    checked.push(self.check(format!("{at}, item {i}"), item)?);
                }
            } else {
                checked.push(self.check(at, value)?);
            }
        }
        for (key, object) in checked {
            self.write(key, object);
        }
        Ok(())
    }

    /// Validates one object and names where it goes; fills in the namespace.
    fn check(&self, at: String, mut value: Value) -> Result<(Key, Value), FakeKubeError> {
        let invalid = |message: &str| FakeKubeError::Invalid {
            at: at.clone(),
            message: message.to_string(),
        };
        let Value::Object(map) = &mut value else {
            return Err(invalid("not a mapping"));
        };
        let text = |map: &Map<String, Value>, field: &str| {
            map.get(field)
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
        };
        let api_version = text(map, "apiVersion").ok_or_else(|| invalid("no `apiVersion`"))?;
        let kind = text(map, "kind").ok_or_else(|| invalid("no `kind`"))?;
        let resource = resources::by_api_version(&api_version, &kind).ok_or_else(|| {
            FakeKubeError::NotServed {
                api_version: api_version.clone(),
                kind: kind.clone(),
            }
        })?;
        let r = &RESOURCES[resource];
        if !self.group_served(r.group) {
            // The real server's words for a kind whose CRD is missing.
            return Err(FakeKubeError::NotInstalled { api_version, kind });
        }
        let meta = match map.get_mut("metadata") {
            Some(Value::Object(meta)) => meta,
            _ => return Err(invalid("no `metadata` mapping")),
        };
        let name = text(meta, "name").ok_or_else(|| invalid("no `metadata.name`"))?;
        if meta
            .get("namespace")
            .is_some_and(|ns| !ns.is_string() && !ns.is_null())
        {
            return Err(invalid("`metadata.namespace` is not a string"));
        }
        let namespace = if r.namespaced {
            let ns = text(meta, "namespace").unwrap_or_else(|| "default".to_string());
            meta.insert("namespace".into(), ns.clone().into());
            ns
        } else {
            meta.remove("namespace");
            String::new()
        };
        Ok((
            Key {
                resource,
                namespace,
                name,
            },
            value,
        ))
    }

    /// Stores the object with a new resource version, unless it is unchanged (then, as on the real
    /// server, nothing happens and no event is sent).
    fn write(&mut self, key: Key, mut object: Value) {
        let old_meta = self.objects.get(&key).map(|o| o["metadata"].clone());
        let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) else {
            return; // `check` made sure it is a mapping.
        };
        let event = match &old_meta {
            Some(old) => {
                // System fields stay the server's: the same uid and creation time, and a
                // deletion once started cannot be taken back.
                for field in [
                    "uid",
                    "creationTimestamp",
                    "deletionTimestamp",
                    "deletionGracePeriodSeconds",
                    "resourceVersion",
                ] {
                    match old.get(field) {
                        Some(v) => meta.insert(field.into(), v.clone()),
                        None => meta.remove(field),
                    };
                }
                if self.objects.get(&key) == Some(&object) {
                    return;
                }
                EventType::Modified
            }
            None => {
                if !meta.get("uid").is_some_and(Value::is_string) {
                    meta.insert("uid".into(), uid().into());
                }
                if !meta.get("creationTimestamp").is_some_and(Value::is_string) {
                    meta.insert("creationTimestamp".into(), now().into());
                }
                EventType::Added
            }
        };
        self.store(key, object, event);
    }

    /// Gives the object the next resource version, stores it and tells the watches.
    fn store(&mut self, key: Key, mut object: Value, event: EventType) {
        self.rv += 1;
        object["metadata"]["resourceVersion"] = self.rv.to_string().into();
        match event {
            EventType::Deleted => self.objects.remove(&key),
            _ => self.objects.insert(key.clone(), object.clone()),
        };
        let change = Change {
            rv: self.rv,
            key,
            event,
            object,
        };
        self.watches.retain(|w| {
            !w.wants(&change.key)
                || w.tx
                    .send(event_line(change.event, &change.object, w))
                    .is_ok()
        });
        self.history.push(change);
    }

    fn find(&self, kind: &str, namespace: &str, name: &str) -> Result<Key, FakeKubeError> {
        let resource = resources::by_kind(kind).ok_or_else(|| FakeKubeError::UnknownKind {
            kind: kind.to_string(),
        })?;
        let key = Key {
            resource,
            namespace: if RESOURCES[resource].namespaced {
                namespace.to_string()
            } else {
                String::new()
            },
            name: name.to_string(),
        };
        if self.objects.contains_key(&key) {
            Ok(key)
        } else {
            Err(FakeKubeError::NotFound {
                kind: kind.to_string(),
                namespace: namespace.to_string(),
                name: name.to_string(),
            })
        }
    }

    /// Removes the object at once (DELETED), as a delete with grace period 0 does.
    pub fn delete(&mut self, kind: &str, namespace: &str, name: &str) -> Result<(), FakeKubeError> {
        let key = self.find(kind, namespace, name)?;
        let object = self.objects[&key].clone();
        self.store(key, object, EventType::Deleted);
        Ok(())
    }

    /// Starts a graceful delete: `deletionTimestamp` set (MODIFIED), the object stays. Again on an
    /// object already terminating changes nothing.
    pub fn set_deleting(
        &mut self,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> Result<(), FakeKubeError> {
        let key = self.find(kind, namespace, name)?;
        let mut object = self.objects[&key].clone();
        if object["metadata"].get("deletionTimestamp").is_some() {
            return Ok(());
        }
        object["metadata"]["deletionTimestamp"] = now().into();
        // Kubernetes' default terminationGracePeriodSeconds.
        object["metadata"]["deletionGracePeriodSeconds"] = 30.into();
        self.store(key, object, EventType::Modified);
        Ok(())
    }

    /// Every stored object of `kind`, as applied plus the server's metadata.
    pub fn objects(&self, kind: &str) -> Result<Vec<Value>, FakeKubeError> {
        let resource = resources::by_kind(kind).ok_or_else(|| FakeKubeError::UnknownKind {
            kind: kind.to_string(),
        })?;
        Ok(self
            .objects
            .iter()
            .filter(|(k, _)| k.resource == resource)
            .map(|(_, o)| o.clone())
            .collect())
    }

    pub fn install(&mut self, group: &str) -> Result<(), FakeKubeError> {
        let group = crd_group(group)?;
        self.installed.insert(group);
        Ok(())
    }

    /// Deletes the group's objects (DELETED to their watches), then ends those watches, as the
    /// real server does when a CRD is deleted.
    pub fn uninstall(&mut self, group: &str) -> Result<(), FakeKubeError> {
        let group = crd_group(group)?;
        if !self.installed.remove(group) {
            return Ok(());
        }
        let gone: Vec<Key> = self
            .objects
            .keys()
            .filter(|k| RESOURCES[k.resource].group == group)
            .cloned()
            .collect();
        for key in gone {
            let object = self.objects[&key].clone();
            self.store(key, object, EventType::Deleted);
        }
        self.watches
            .retain(|w| RESOURCES[w.resource].group != group);
        Ok(())
    }

    /// Forgets the event history: watches resuming from before now get 410 Expired.
    pub fn compact(&mut self) {
        self.history.clear();
        self.compacted = self.rv;
    }

    /// Sends a BOOKMARK with the current resource version to every watch that allowed them.
    pub fn bookmark(&mut self) {
        let rv = self.rv.to_string();
        self.watches.retain(|w| {
            if !w.bookmarks {
                return true;
            }
            let r = &RESOURCES[w.resource];
            let object = json!({
                "kind": r.kind,
                "apiVersion": resources::api_version(r.group, w.version),
                "metadata": {"resourceVersion": rv},
            });
            w.tx.send(line("BOOKMARK", &object)).is_ok()
        });
    }

    /// The list body: the objects of the resource (in `namespace` if given) at `version`; at most
    /// `limit` of them, after the `continue` token of the previous page if given.
    pub fn list(
        &self,
        resource: ResourceId,
        version: &str,
        namespace: Option<&str>,
        limit: Option<usize>,
        continue_token: Option<&str>,
    ) -> Result<Value, ListError> {
        let r = &RESOURCES[resource];
        let (rv, after) = match continue_token {
            None => (self.rv, None),
            Some(token) => {
                let (rv, after) = parse_continue(token).ok_or(ListError::BadContinue)?;
                if rv < self.compacted {
                    return Err(ListError::Expired);
                }
                (rv, Some(after))
            }
        };
        // Pages are not one snapshot (the real server's are): a later page shows objects as they
        // are now. The watch from the list's version replays what changed, so a client converges.
        let mut rest = self.select(resource, namespace).filter(|(k, _)| {
            after
                .as_ref()
                .is_none_or(|(ns, name)| (&k.namespace, &k.name) > (ns, name))
        });
        let mut items = Vec::new();
        let mut last = None;
        for (key, object) in rest.by_ref().take(limit.unwrap_or(usize::MAX)) {
            let mut item = at_version(object, r, version);
            if !r.crd {
                // Built-in list items come without them; CRD items (unstructured) with them.
                if let Some(m) = item.as_object_mut() {
                    m.remove("apiVersion");
                    m.remove("kind");
                }
            }
            items.push(item);
            last = Some(key);
        }
        let mut metadata = json!({"resourceVersion": rv.to_string()});
        if let (Some(key), Some(_)) = (last, rest.next()) {
            metadata["continue"] = continue_token_of(rv, &key.namespace, &key.name).into();
        }
        Ok(json!({
            "kind": format!("{}List", r.kind),
            "apiVersion": resources::api_version(r.group, version),
            "metadata": metadata,
            "items": items,
        }))
    }

    pub fn get(
        &self,
        resource: ResourceId,
        version: &str,
        namespace: &str,
        name: &str,
    ) -> Option<Value> {
        let key = Key {
            resource,
            namespace: namespace.to_string(),
            name: name.to_string(),
        };
        self.objects
            .get(&key)
            .map(|o| at_version(o, &RESOURCES[resource], version))
    }

    /// Opens a watch. `from`: the resource version to resume after; None for "0" or unset, which
    /// start with a synthetic ADDED per current object, as the real server does.
    pub fn watch(
        &mut self,
        resource: ResourceId,
        version: &'static str,
        namespace: Option<&str>,
        from: Option<u64>,
        bookmarks: bool,
    ) -> WatchStart {
        if let Some(from) = from.filter(|rv| *rv < self.compacted) {
            let status = json!({
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Failure",
                "message": format!("too old resource version: {from} ({})", self.compacted),
                "reason": "Expired",
                "code": 410,
            });
            return WatchStart::Expired(line("ERROR", &status));
        }
        let (tx, live) = mpsc::unbounded_channel();
        let watch = Watch {
            resource,
            namespace: namespace.map(str::to_string),
            version,
            bookmarks,
            tx,
        };
        let initial = match from {
            None => self
                .select(resource, namespace)
                .map(|(_, o)| event_line(EventType::Added, o, &watch))
                .collect(),
            Some(from) => self
                .history
                .iter()
                .filter(|c| c.rv > from && watch.wants(&c.key))
                .map(|c| event_line(c.event, &c.object, &watch))
                .collect(),
        };
        self.watches.push(watch);
        WatchStart::Stream { initial, live }
    }

    fn select<'a>(
        &'a self,
        resource: ResourceId,
        namespace: Option<&'a str>,
    ) -> impl Iterator<Item = (&'a Key, &'a Value)> + 'a {
        self.objects.iter().filter(move |(k, _)| {
            k.resource == resource && namespace.is_none_or(|ns| ns == k.namespace)
        })
    }
}

fn crd_group(group: &str) -> Result<&'static str, FakeKubeError> {
    CRD_GROUPS
        .iter()
        .copied()
        .find(|g| *g == group)
        .ok_or_else(|| FakeKubeError::UnknownGroup {
            group: group.to_string(),
        })
}

/// An opaque page token: the list's resource version and the last key served, in hex so it needs
/// no escaping in a query.
fn continue_token_of(rv: u64, namespace: &str, name: &str) -> String {
    let hex = |s: &str| s.bytes().map(|b| format!("{b:02x}")).collect::<String>();
    format!("{rv}.{}.{}", hex(namespace), hex(name))
}

fn parse_continue(token: &str) -> Option<(u64, (String, String))> {
    let unhex = |s: &str| -> Option<String> {
        let bytes: Option<Vec<u8>> = (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
            .collect();
        String::from_utf8(bytes?).ok()
    };
    let mut parts = token.split('.');
    let (rv, ns, name) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    Some((rv.parse().ok()?, (unhex(ns)?, unhex(name)?)))
}

/// The object as served at `version` of its resource.
fn at_version(object: &Value, r: &Resource, version: &str) -> Value {
    let mut o = object.clone();
    if let Some(m) = o.as_object_mut() {
        m.insert(
            "apiVersion".into(),
            resources::api_version(r.group, version).into(),
        );
        m.insert("kind".into(), r.kind.into());
    }
    o
}

fn event_line(event: EventType, object: &Value, watch: &Watch) -> Bytes {
    let object = at_version(object, &RESOURCES[watch.resource], watch.version);
    line(event.as_str(), &object)
}

/// One newline-terminated watch event.
fn line(event: &str, object: &Value) -> Bytes {
    let mut bytes = json!({"type": event, "object": object})
        .to_string()
        .into_bytes();
    bytes.push(b'\n');
    Bytes::from(bytes)
}

/// The documents of a multi-document YAML stream, empty ones skipped, each named by its position.
pub(super) fn parse_yaml(yaml: &str) -> Result<Vec<(String, Value)>, FakeKubeError> {
    let mut docs = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(yaml).enumerate() {
        let at = format!("YAML document {}", i + 1);
        let value = Value::deserialize(doc).map_err(|source| FakeKubeError::Yaml {
            at: at.clone(),
            source,
        })?;
        if !value.is_null() {
            docs.push((at, value));
        }
    }
    Ok(docs)
}

/// RFC 3339 in seconds, as the API server writes timestamps.
fn now() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// A random UUID (version 4), as the API server gives every object.
fn uid() -> String {
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        fastrand::u32(..),
        fastrand::u16(..),
        fastrand::u16(..0x1000),
        fastrand::u16(0x8000..0xc000),
        fastrand::u64(..1 << 48),
    )
}
