//! Eviction: pulled-through content kept within the disk budget (`[cache]`).
//!
//! What is evicted, and in which order:
//! - Only pulled-through content: cached manifests and tags (metadata) and the blobs
//!   the cache fetched. A blob any private repository links is never evicted.
//! - Least recently used first, by each item's *effective* last use: a manifest's is its
//!   own, or its index's if that is later (containerd pulls an index by tag, then its
//!   children by digest); a blob's is its own, or that of the latest cached manifest
//!   referencing it. So an image goes as one: its manifest and tags first, then the
//!   blobs nothing kept references, and a blob shared by several images stays until
//!   the last of them goes.
//! - Nothing used within `keep_recent` is evicted, and neither are the blobs of a
//!   manifest served within it: a pull in progress keeps its whole image. A blob open
//!   for reading is pinned ([`berth_store::BlobStore::delete_unpinned`]).
//! - `max_age`: content unused for longer goes regardless of the budget.
//!
//! Consistency: a manifest and its tags leave the database (and memory) before any of
//! its blobs leave the disk, so a later pull finds no manifest and fetches the image
//! again; it never gets a manifest whose blobs are gone. Blob files are removed holding
//! the store's removal lock exclusively, after checking again that no private
//! repository linked them meanwhile; a blob's record goes only after its file, so a
//! crash in between leaves a record without a file, which a read treats as a miss and
//! the next pass removes.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use berth_store::oci::Digest;
use berth_store::{Batch, Store, StoreError, TagKey};

/// A digest's compact identity in a pass: the first 128 bits of its hex.
pub(crate) type Id = u128;

pub(crate) fn id(d: &Digest) -> Id {
    let hex = d.hex();
    u128::from_str_radix(&hex[..hex.len().min(32)], 16).unwrap_or(0)
}

/// What the store holds, by kind and upstream.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Usage {
    /// Bytes of pulled-through blobs no private repository links.
    pub cached_bytes: u64,
    pub cached_blobs: u64,
    pub cached_manifests: u64,
    pub cached_tags: u64,
    /// Bytes of blobs private repositories link (pushed, or mounted from the cache).
    pub private_bytes: u64,
    pub private_blobs: u64,
    /// Pulled-through content by upstream (a blob counts for the upstream it was first
    /// fetched from).
    pub upstreams: BTreeMap<String, UpstreamUsage>,
}

#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct UpstreamUsage {
    pub bytes: u64,
    pub blobs: u64,
    pub tags: u64,
}

impl Usage {
    /// Bytes of blob files on disk.
    pub fn total_bytes(&self) -> u64 {
        self.cached_bytes + self.private_bytes
    }
}

/// What one pass removed.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Report {
    pub manifests: u64,
    pub tags: u64,
    pub blobs: u64,
    pub bytes: u64,
    /// Candidates left alone because they were being read or a private repository
    /// linked them by the time they were removed.
    pub skipped_in_use: u64,
    /// The store as the pass found it, before it removed anything.
    pub before: Usage,
}

/// What a pass is for.
#[derive(Clone, Debug)]
pub enum Goal {
    /// Free at least this many bytes (least recently used first), and remove what is
    /// older than `max_age`.
    Free(u64),
    /// Remove everything cached through one upstream, or one of its repositories, that
    /// no other repository holds.
    Purge {
        upstream: String,
        repo: Option<String>,
    },
}

/// The references of a manifest, whatever its kind.
#[derive(Deserialize)]
struct Refs {
    #[serde(default)]
    config: Option<Desc>,
    #[serde(default)]
    layers: Vec<Desc>,
    #[serde(default)]
    blobs: Vec<Desc>,
    #[serde(default)]
    manifests: Vec<Desc>,
    #[serde(default, rename = "fsLayers")]
    fs_layers: Vec<FsLayer>,
}

#[derive(Deserialize)]
struct Desc {
    digest: String,
}

#[derive(Deserialize)]
struct FsLayer {
    #[serde(rename = "blobSum")]
    blob_sum: String,
}

/// A cached manifest in a pass.
struct ManifestNode {
    digest: Digest,
    used: u64,
    blobs: Vec<Id>,
    children: Vec<Id>,
}

/// A cached blob in a pass.
struct BlobNode {
    digest: Digest,
    size: u64,
    used: u64,
    upstream: String,
}

/// The pass's decision: what to remove, in order.
#[derive(Default)]
pub(crate) struct Plan {
    pub usage: Usage,
    /// Manifests to remove, with their tags.
    pub manifests: Vec<(Digest, Vec<TagKey>)>,
    /// Blobs to remove, least recently used first.
    pub blobs: Vec<(Digest, u64)>,
    /// Cache links to remove: `(upstream, repo, digest)`.
    pub links: Vec<(String, String, Digest)>,
    /// Tags to remove that name no removed manifest (a purge).
    pub tags: Vec<TagKey>,
}

/// The times a pass judges by, in ms since the epoch.
pub(crate) struct Times {
    /// Used at or after this: never evicted.
    pub keep_after: u64,
    /// Used before this: evicted whatever the budget (`max_age`).
    pub expire_before: Option<u64>,
}

/// Every digest's last use: as written, or pending in the access log if later. Blocks.
pub(crate) fn last_uses(store: &Store) -> Result<HashMap<Id, u64>, StoreError> {
    let mut used: HashMap<Id, u64> = HashMap::new();
    store.meta.visit_last_accesses(|d, t| {
        used.insert(id(&d), t);
        true
    })?;
    for (d, t) in store.access.pending() {
        let slot = used.entry(id(&d)).or_insert(t);
        *slot = (*slot).max(t);
    }
    Ok(used)
}

/// Reads the store and decides what `goal` removes. Blocks.
pub(crate) fn plan(store: &Store, goal: &Goal, times: &Times) -> Result<Plan, StoreError> {
    let meta = &store.meta;
    let keep_after = times.keep_after;
    let mut used = last_uses(store)?;

    let mut usage = Usage::default();
    let mut private: HashSet<Id> = HashSet::new();
    meta.visit_private_blobs(|d, size| {
        private.insert(id(&d));
        usage.private_bytes += size;
        usage.private_blobs += 1;
        true
    })?;

    // Tags, by the manifest they name; a tag's confirmation counts as a use of it.
    let mut tags: HashMap<Id, Vec<TagKey>> = HashMap::new();
    meta.visit_cache_tags(|key, rec| {
        usage.cached_tags += 1;
        usage
            .upstreams
            .entry(key.upstream.clone())
            .or_default()
            .tags += 1;
        let m = id(&rec.digest);
        let slot = used.entry(m).or_insert(rec.confirmed_at_ms);
        *slot = (*slot).max(rec.confirmed_at_ms);
        tags.entry(m).or_default().push(key);
        true
    })?;

    let mut manifests: HashMap<Id, ManifestNode> = HashMap::new();
    meta.visit_cached_manifests(|digest, rec| {
        let refs: Option<Refs> = serde_json::from_slice(&rec.body).ok();
        let parse = |d: &str| d.parse::<Digest>().ok().map(|d| id(&d));
        let (mut blobs, mut children) = (Vec::new(), Vec::new());
        if let Some(r) = refs {
            blobs.extend(r.config.iter().filter_map(|c| parse(&c.digest)));
            blobs.extend(r.layers.iter().filter_map(|c| parse(&c.digest)));
            blobs.extend(r.blobs.iter().filter_map(|c| parse(&c.digest)));
            blobs.extend(r.fs_layers.iter().filter_map(|c| parse(&c.blob_sum)));
            children.extend(r.manifests.iter().filter_map(|c| parse(&c.digest)));
        }
        let i = id(&digest);
        manifests.insert(
            i,
            ManifestNode {
                used: used.get(&i).copied().unwrap_or(0),
                digest,
                blobs,
                children,
            },
        );
        true
    })?;
    usage.cached_manifests = manifests.len() as u64;
    // An index's use is its children's too (twice: an index of indexes).
    for _ in 0..2 {
        let lifts: Vec<(Id, u64)> = manifests
            .values()
            .flat_map(|m| m.children.iter().map(move |c| (*c, m.used)))
            .collect();
        for (c, t) in lifts {
            if let Some(child) = manifests.get_mut(&c) {
                child.used = child.used.max(t);
            }
        }
    }
    // A blob's use is that of the latest manifest referencing it; and how many cached
    // manifests reference it.
    let mut blob_used: HashMap<Id, u64> = HashMap::new();
    let mut refcount: HashMap<Id, u32> = HashMap::new();
    for m in manifests.values() {
        for b in &m.blobs {
            let slot = blob_used.entry(*b).or_insert(0);
            *slot = (*slot).max(m.used);
            *refcount.entry(*b).or_insert(0) += 1;
        }
    }

    let mut blobs: Vec<BlobNode> = Vec::new();
    meta.visit_cached_blobs(|digest, rec| {
        let i = id(&digest);
        if private.contains(&i) {
            return true;
        }
        let upstream = rec
            .repos
            .first()
            .and_then(|r| r.split('/').next())
            .unwrap_or("")
            .to_owned();
        usage.cached_bytes += rec.size;
        usage.cached_blobs += 1;
        let u = usage.upstreams.entry(upstream.clone()).or_default();
        u.bytes += rec.size;
        u.blobs += 1;
        let own = used.get(&i).copied().unwrap_or(rec.last_access_ms);
        let used = own.max(blob_used.get(&i).copied().unwrap_or(0));
        // Only what may go is kept in memory: a large store's recent blobs are counted.
        if used < keep_after || matches!(goal, Goal::Purge { .. }) {
            blobs.push(BlobNode {
                used,
                digest,
                size: rec.size,
                upstream,
            });
        }
        true
    })?;

    let mut plan = Plan {
        usage,
        ..Plan::default()
    };
    match goal {
        Goal::Free(need) => choose_lru(&mut plan, manifests, blobs, tags, refcount, *need, times),
        Goal::Purge { upstream, repo } => choose_purge(
            store,
            &mut plan,
            manifests,
            blobs,
            tags,
            upstream,
            repo.as_deref(),
        )?,
    }
    // The cache links of what goes (a purge chose its own).
    if matches!(goal, Goal::Free(_)) {
        let gone: HashSet<Id> = plan
            .manifests
            .iter()
            .map(|(d, _)| id(d))
            .chain(plan.blobs.iter().map(|(d, _)| id(d)))
            .collect();
        if !gone.is_empty() {
            meta.visit_cache_links(None, None, |u, r, d| {
                if gone.contains(&id(&d)) {
                    plan.links.push((u.to_owned(), r.to_owned(), d));
                }
                true
            })?;
        }
    }
    Ok(plan)
}

/// Least recently used first, until `need` bytes are chosen and nothing older than
/// `max_age` is left.
fn choose_lru(
    plan: &mut Plan,
    manifests: HashMap<Id, ManifestNode>,
    blobs: Vec<BlobNode>,
    mut tags: HashMap<Id, Vec<TagKey>>,
    mut refcount: HashMap<Id, u32>,
    need: u64,
    times: &Times,
) {
    enum Item {
        Manifest(ManifestNode),
        Blob(BlobNode),
    }
    let mut items: Vec<(u64, u8, Item)> = manifests
        .into_values()
        .map(|m| (m.used, 0, Item::Manifest(m)))
        .chain(blobs.into_iter().map(|b| (b.used, 1, Item::Blob(b))))
        .collect();
    // Oldest first; at the same time, a manifest before the blobs it references.
    items.sort_by_key(|i| (i.0, i.1));
    let mut chosen = 0u64;
    for (used, _, item) in items {
        if used >= times.keep_after {
            break;
        }
        let expired = times.expire_before.is_some_and(|t| used < t);
        if chosen >= need && !expired {
            break;
        }
        match item {
            Item::Manifest(m) => {
                for b in &m.blobs {
                    if let Some(n) = refcount.get_mut(b) {
                        *n = n.saturating_sub(1);
                    }
                }
                let t = tags.remove(&id(&m.digest)).unwrap_or_default();
                plan.manifests.push((m.digest, t));
            }
            Item::Blob(b) => {
                if refcount.get(&id(&b.digest)).is_some_and(|n| *n > 0) {
                    continue;
                }
                chosen += b.size;
                plan.blobs.push((b.digest, b.size));
            }
        }
    }
}

/// Everything cached through `upstream` (or its `repo`) that no other repository of the
/// cache holds.
fn choose_purge(
    store: &Store,
    plan: &mut Plan,
    manifests: HashMap<Id, ManifestNode>,
    blobs: Vec<BlobNode>,
    mut tags: HashMap<Id, Vec<TagKey>>,
    upstream: &str,
    repo: Option<&str>,
) -> Result<(), StoreError> {
    let in_scope = |u: &str, r: &str| u == upstream && repo.is_none_or(|p| p == r);
    // Digests some repository outside the purge still holds.
    let mut kept: HashSet<Id> = HashSet::new();
    let mut scoped: HashSet<Id> = HashSet::new();
    store.meta.visit_cache_links(None, None, |u, r, d| {
        if in_scope(u, r) {
            scoped.insert(id(&d));
            plan.links.push((u.to_owned(), r.to_owned(), d));
        } else {
            kept.insert(id(&d));
        }
        true
    })?;
    for list in tags.values_mut() {
        list.retain(|k| {
            let purge = in_scope(&k.upstream, &k.repo);
            if purge {
                plan.tags.push(k.clone());
            }
            !purge
        });
    }
    // Blobs a manifest that stays references stay too.
    let mut referenced: HashSet<Id> = HashSet::new();
    for m in manifests.into_values() {
        let i = id(&m.digest);
        if scoped.contains(&i) && !kept.contains(&i) {
            let t = tags.remove(&i).unwrap_or_default();
            plan.manifests.push((m.digest, t));
        } else {
            referenced.extend(m.blobs);
        }
    }
    for b in blobs {
        let i = id(&b.digest);
        let fetched_here = b.upstream == upstream && repo.is_none();
        if (scoped.contains(&i) || fetched_here) && !kept.contains(&i) && !referenced.contains(&i) {
            plan.blobs.push((b.digest, b.size));
        }
    }
    Ok(())
}

/// Removes the metadata of the planned manifests and tags, and the planned cache links.
/// Blocks.
pub(crate) fn remove_manifests(store: &Store, plan: &Plan) -> Result<(u64, u64), StoreError> {
    let mut batch = Batch::default();
    let mut tags = 0u64;
    for (digest, keys) in &plan.manifests {
        batch.delete_cached_manifest(digest);
        batch.delete_last_access(digest);
        for k in keys {
            batch.delete_cache_tag(k);
            tags += 1;
        }
        store.access.forget(digest);
    }
    for k in &plan.tags {
        batch.delete_cache_tag(k);
        tags += 1;
    }
    let blobs: HashSet<&Digest> = plan.blobs.iter().map(|(d, _)| d).collect();
    for (u, r, d) in &plan.links {
        // A blob's links go with its file (it may turn out to be in use).
        if !blobs.contains(d) {
            batch.delete_cache_link(u, r, d);
        }
    }
    store.meta.write(batch)?;
    Ok((plan.manifests.len() as u64, tags))
}

/// Removes planned blob files (and then their records and links), holding the store's
/// removal lock. Returns `(blobs, bytes, skipped)`. Blocks.
pub(crate) fn remove_blobs(
    store: &Store,
    blobs: &[(Digest, u64)],
    links: &HashMap<Digest, Vec<(String, String)>>,
    filling: &HashSet<Digest>,
) -> Result<(u64, u64, u64), StoreError> {
    let _exclusive = store
        .removal_lock
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let (mut removed, mut bytes, mut skipped) = (0, 0, 0);
    let mut batch = Batch::default();
    for (digest, _) in blobs {
        if filling.contains(digest) || store.meta.privately_linked(digest)? {
            skipped += 1;
            continue;
        }
        match store.blobs.delete_unpinned(digest)? {
            None => skipped += 1,
            Some(freed) => {
                removed += 1;
                bytes += freed;
                batch.delete_cached_blob(digest);
                batch.delete_last_access(digest);
                for (u, r) in links.get(digest).into_iter().flatten() {
                    batch.delete_cache_link(u, r, digest);
                }
                store.access.forget(digest);
            }
        }
    }
    store.meta.write(batch)?;
    Ok((removed, bytes, skipped))
}

/// The planned links of blobs, by blob.
pub(crate) fn blob_links(plan: &Plan) -> HashMap<Digest, Vec<(String, String)>> {
    let blobs: HashSet<&Digest> = plan.blobs.iter().map(|(d, _)| d).collect();
    let mut out: HashMap<Digest, Vec<(String, String)>> = HashMap::new();
    for (u, r, d) in &plan.links {
        if blobs.contains(d) {
            out.entry(d.clone())
                .or_default()
                .push((u.clone(), r.clone()));
        }
    }
    out
}

/// The test hook `BERTH_TEST_EVICT_HOLD=<dir>`: once `<dir>/arm` exists, a pass that
/// has removed its manifests and tags, and no blob yet, creates `<dir>/held` and waits
/// until `<dir>/release` exists (at most two minutes). Tests use it to kill berth at that
/// moment; it changes nothing but timing, and nothing sets it outside tests. Blocks.
pub(crate) fn test_hold() {
    let Some(dir) = std::env::var_os("BERTH_TEST_EVICT_HOLD").map(std::path::PathBuf::from) else {
        return;
    };
    if !dir.join("arm").exists() {
        return;
    }
    let _ = std::fs::write(dir.join("held"), b"");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !dir.join("release").exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A shared handle on the usage last measured, kept current between passes.
#[derive(Default)]
pub(crate) struct Measured {
    /// The usage a pass measured, and the store's byte delta at that moment.
    pub last: std::sync::Mutex<Option<(Usage, i64)>>,
}

impl Measured {
    /// Bytes of blob files now: the last measurement plus what was published and
    /// removed since. `None` before the first pass.
    pub fn total_now(&self, store: &Store) -> Option<u64> {
        let last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let (usage, delta) = last.as_ref()?;
        let now = store.blobs.bytes_delta();
        Some((usage.total_bytes() as i64 + (now - delta)).max(0) as u64)
    }

    pub fn set(&self, usage: Usage, delta: i64) {
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some((usage, delta));
    }

    pub fn get(&self) -> Option<Usage> {
        self.last
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|(u, _)| u.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_store::{Batch, ManifestRecord, RepoLink, TagRecord};
    use bytes::Bytes;

    const HOUR: u64 = 3_600_000;
    const NOW: u64 = 1_000 * HOUR;

    fn times() -> Times {
        Times {
            keep_after: NOW - HOUR,
            expire_before: None,
        }
    }

    /// A store seeded the way fills leave it.
    struct Seed {
        _dir: tempfile::TempDir,
        store: Store,
    }

    impl Seed {
        fn new() -> Seed {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(dir.path()).unwrap();
            Seed { _dir: dir, store }
        }

        /// A cached blob of `size` bytes, last used at `used`.
        fn blob(&self, name: &str, size: usize, used: u64) -> Digest {
            let bytes = vec![name.as_bytes()[0]; size];
            let d = Digest::sha256_of(&bytes);
            let mut w = self.store.blobs.writer(&d).unwrap();
            w.write(&bytes).unwrap();
            w.commit(None).unwrap();
            self.store
                .meta
                .record_blob(&d, size as u64, "docker.io/library/app", used)
                .unwrap();
            self.store
                .meta
                .put_cache_link("docker.io", "library/app", &d, used)
                .unwrap();
            d
        }

        /// A cached image manifest of `layers`, tagged `tag` in `repo`, last used at `used`.
        fn image(&self, repo: &str, tag: &str, layers: &[&Digest], used: u64) -> Digest {
            let layers: Vec<_> = layers
                .iter()
                .map(|d| serde_json::json!({"digest": d.to_string(), "size": 1, "mediaType": "x"}))
                .collect();
            let body = serde_json::to_vec(&serde_json::json!({
                "schemaVersion": 2, "layers": layers, "tag": tag
            }))
            .unwrap();
            self.manifest(repo, tag, body, used)
        }

        fn manifest(&self, repo: &str, tag: &str, body: Vec<u8>, used: u64) -> Digest {
            let d = Digest::sha256_of(&body);
            let record = ManifestRecord {
                media_type: berth_store::oci::OCI_MANIFEST.into(),
                body: Bytes::from(body),
            };
            self.store.meta.put_manifest(&d, &record).unwrap();
            self.store
                .meta
                .put_cache_link("docker.io", repo, &d, used)
                .unwrap();
            if !tag.is_empty() {
                let key = TagKey {
                    upstream: "docker.io".into(),
                    repo: repo.into(),
                    tag: tag.into(),
                    variant: 0,
                };
                let rec = TagRecord {
                    digest: d.clone(),
                    confirmed_at_ms: used,
                };
                self.store.meta.put_tag(&key, &rec).unwrap();
            }
            self.store.access.touch(&d, used);
            d
        }

        fn plan(&self, goal: Goal, times: &Times) -> Plan {
            plan(&self.store, &goal, times).unwrap()
        }
    }

    fn blobs(p: &Plan) -> Vec<Digest> {
        p.blobs.iter().map(|(d, _)| d.clone()).collect()
    }

    fn manifests(p: &Plan) -> Vec<Digest> {
        p.manifests.iter().map(|(d, _)| d.clone()).collect()
    }

    #[test]
    fn the_least_recently_used_image_goes_first_and_whole() {
        let s = Seed::new();
        let (old_layer, shared, new_layer) = (
            s.blob("o", 100, NOW - 50 * HOUR),
            s.blob("s", 100, NOW - 50 * HOUR),
            s.blob("n", 100, NOW - 50 * HOUR),
        );
        let old = s.image("library/old", "1", &[&old_layer, &shared], NOW - 10 * HOUR);
        let new = s.image("library/new", "1", &[&new_layer, &shared], NOW - 5 * HOUR);
        let p = s.plan(Goal::Free(100), &times());
        // The old image: its manifest and tag, and the layer only it uses. The shared
        // layer stays: the newer image still needs it.
        assert_eq!(manifests(&p), vec![old.clone()]);
        assert_eq!(p.manifests[0].1.len(), 1, "its tag goes with it");
        assert_eq!(blobs(&p), vec![old_layer.clone()]);
        assert!(p
            .links
            .iter()
            .any(|(_, r, d)| r == "library/old" && *d == old));
        assert_eq!(p.usage.cached_bytes, 300);
        assert_eq!(p.usage.cached_manifests, 2);
        assert_eq!(p.usage.cached_tags, 2);
        // Asked for everything: the shared layer goes once, after the last image using it.
        let p = s.plan(Goal::Free(u64::MAX), &times());
        assert_eq!(manifests(&p), vec![old, new]);
        let b = blobs(&p);
        assert_eq!(b.len(), 3);
        assert_eq!(b[0], old_layer);
        assert!(b[1..].contains(&shared) && b[1..].contains(&new_layer));
    }

    #[test]
    fn private_recent_and_fetched_by_digest_content_is_kept() {
        let s = Seed::new();
        let private = s.blob("p", 100, NOW - 50 * HOUR);
        let mut b = Batch::default();
        b.link_blob(
            "team/app",
            &private,
            RepoLink {
                linked_ms: 1,
                size: 100,
            },
        );
        s.store.meta.write(b).unwrap();
        let recent = s.blob("r", 100, NOW - 50 * HOUR);
        // Used recently only through its manifest, pulled by digest (no tag).
        let m = s.image("library/recent", "", &[&recent], NOW - 60_000);
        let loose = s.blob("l", 100, NOW - 50 * HOUR);
        let p = s.plan(Goal::Free(u64::MAX), &times());
        assert_eq!(blobs(&p), vec![loose]);
        assert!(manifests(&p).is_empty(), "{:?} was used a minute ago", m);
        assert_eq!(p.usage.private_bytes, 100);
        assert_eq!(p.usage.cached_bytes, 200);
    }

    #[test]
    fn an_index_lends_its_use_to_its_children() {
        let s = Seed::new();
        let (la, lb) = (
            s.blob("a", 100, NOW - 50 * HOUR),
            s.blob("b", 100, NOW - 50 * HOUR),
        );
        let child_a = s.image("library/multi", "", &[&la], NOW - 40 * HOUR);
        let child_b = s.image("library/multi", "", &[&lb], NOW - 40 * HOUR);
        let index = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "manifests": [
                {"digest": child_a.to_string(), "size": 1, "mediaType": "x"},
                {"digest": child_b.to_string(), "size": 1, "mediaType": "x"},
            ]
        }))
        .unwrap();
        // The index was pulled by tag 10 minutes ago: its children and layers are in use.
        s.manifest("library/multi", "latest", index, NOW - 600_000);
        let stale = s.blob("z", 100, NOW - 45 * HOUR);
        let p = s.plan(Goal::Free(u64::MAX), &times());
        assert_eq!(blobs(&p), vec![stale]);
        assert!(manifests(&p).is_empty());
    }

    #[test]
    fn max_age_evicts_old_content_whatever_the_budget() {
        let s = Seed::new();
        let ancient = s.blob("a", 100, NOW - 800 * HOUR);
        let m = s.image("library/ancient", "v1", &[&ancient], NOW - 700 * HOUR);
        s.blob("y", 100, NOW - 20 * HOUR);
        let t = Times {
            keep_after: NOW - HOUR,
            expire_before: Some(NOW - 24 * HOUR),
        };
        let p = s.plan(Goal::Free(0), &t);
        assert_eq!(manifests(&p), vec![m]);
        assert_eq!(blobs(&p), vec![ancient]);
    }

    #[test]
    fn a_purge_removes_only_what_no_other_repository_holds() {
        let s = Seed::new();
        // Every seeded blob is linked in library/app, the repository purged.
        let (own, shared, used) = (
            s.blob("o", 100, NOW),
            s.blob("s", 100, NOW),
            s.blob("u", 100, NOW),
        );
        let gone = s.image("library/app", "1", &[&own, &shared], NOW);
        // `shared` is also linked in another repository; `used` is referenced by an
        // image that stays.
        s.store
            .meta
            .put_cache_link("docker.io", "library/kept", &shared, NOW)
            .unwrap();
        let stays = s.image("library/kept", "1", &[&used], NOW);
        let p = s.plan(
            Goal::Purge {
                upstream: "docker.io".into(),
                repo: Some("library/app".into()),
            },
            &times(),
        );
        assert_eq!(manifests(&p), vec![gone]);
        assert_eq!(blobs(&p), vec![own]);
        assert!(!manifests(&p).contains(&stays));
        assert!(p.links.iter().all(|(_, r, _)| r == "library/app"));
        assert!(
            p.links.iter().any(|(_, _, d)| *d == shared),
            "the purged repository's link to a kept blob goes"
        );
        assert_eq!(p.tags.len(), 1, "the purged repository's tag");
    }
}
