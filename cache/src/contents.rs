//! What the cache holds, by repository: each pulled-through repository's size and last
//! pull, for the status page. One read of the index (blobs, manifests, access times,
//! tags and cache links); it blocks, so callers run it on the blocking pool, and they
//! keep the answer a while rather than read the index on every page view.
//!
//! A repository holds what its cache links name: the manifests and blobs fetched through
//! it or confirmed there by the upstream. A blob several repositories share counts in
//! each one's size, so the sizes add up to more than the disk holds. The last pull is the
//! latest use of one of the repository's manifests or confirmation of one of its tags
//! (layers are shared, manifests rarely are); a repository with blobs only goes by its
//! blobs' uses.

use std::collections::HashMap;

use berth_store::oci::Digest;
use berth_store::{Store, StoreError};

use crate::evict::{id, last_uses, Id};

/// One pulled-through repository.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CachedRepo {
    pub upstream: String,
    pub repo: String,
    /// Bytes of the manifests and blobs it holds (shared ones included).
    pub bytes: u64,
    pub manifests: u64,
    pub blobs: u64,
    /// Milliseconds since the Unix epoch; `None` when no use was recorded.
    pub last_pull_ms: Option<u64>,
}

/// What one repository's cache links added up to so far.
#[derive(Default)]
struct Acc {
    bytes: u64,
    manifests: u64,
    blobs: u64,
    manifest_used: Option<u64>,
    blob_used: Option<u64>,
}

/// Every pulled-through repository, the most recently pulled first (then by name).
/// Blocks.
pub fn cached_repositories(store: &Store) -> Result<Vec<CachedRepo>, StoreError> {
    let meta = &store.meta;
    let used = last_uses(store)?;
    // Size, and whether it is a manifest.
    let mut sizes: HashMap<Id, (u64, bool)> = HashMap::new();
    meta.visit_cached_blobs(|d, rec| {
        sizes.insert(id(&d), (rec.size, false));
        true
    })?;
    meta.visit_cached_manifests(|d, rec| {
        sizes.insert(id(&d), (rec.body.len() as u64, true));
        true
    })?;
    // The latest tag confirmation by `upstream \0 repo`.
    let mut confirmed: HashMap<String, u64> = HashMap::new();
    meta.visit_cache_tags(|key, rec| {
        let slot = confirmed
            .entry(format!("{}\0{}", key.upstream, key.repo))
            .or_insert(0);
        *slot = (*slot).max(rec.confirmed_at_ms);
        true
    })?;

    let mut out = Vec::new();
    // Links come in key order, so one repository's are together.
    let mut current: Option<(String, String, Acc)> = None;
    let finish = |(upstream, repo, acc): (String, String, Acc), out: &mut Vec<CachedRepo>| {
        let tag = confirmed.get(&format!("{upstream}\0{repo}")).copied();
        let last_pull_ms = match acc.manifest_used.max(tag) {
            Some(t) => Some(t),
            None => acc.blob_used,
        };
        out.push(CachedRepo {
            upstream,
            repo,
            bytes: acc.bytes,
            manifests: acc.manifests,
            blobs: acc.blobs,
            last_pull_ms,
        });
    };
    meta.visit_cache_links(None, None, |u, r, d: Digest| {
        if current
            .as_ref()
            .is_none_or(|(cu, cr, _)| cu != u || cr != r)
        {
            if let Some(done) = current.take() {
                finish(done, &mut out);
            }
            current = Some((u.to_owned(), r.to_owned(), Acc::default()));
        }
        let acc = &mut current.as_mut().expect("set above").2;
        let i = id(&d);
        let use_ = used.get(&i).copied();
        match sizes.get(&i) {
            Some(&(size, true)) => {
                acc.bytes += size;
                acc.manifests += 1;
                acc.manifest_used = acc.manifest_used.max(use_);
            }
            Some(&(size, false)) => {
                acc.bytes += size;
                acc.blobs += 1;
                acc.blob_used = acc.blob_used.max(use_);
            }
            // Confirmed by the upstream but not stored (a HEAD only), or evicted.
            None => {}
        }
        true
    })?;
    if let Some(done) = current.take() {
        finish(done, &mut out);
    }
    out.retain(|r| r.manifests + r.blobs > 0);
    out.sort_by(|a, b| {
        b.last_pull_ms
            .cmp(&a.last_pull_ms)
            .then_with(|| (&a.upstream, &a.repo).cmp(&(&b.upstream, &b.repo)))
    });
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_store::{ManifestRecord, TagKey, TagRecord};
    use bytes::Bytes;

    fn blob(store: &Store, content: &[u8], repo: (&str, &str), used: u64) -> Digest {
        let d = Digest::sha256_of(content);
        let mut w = store.blobs.writer(&d).unwrap();
        w.write(content).unwrap();
        w.commit(Some(content.len() as u64)).unwrap();
        let key = format!("{}/{}", repo.0, repo.1);
        store
            .meta
            .record_blob(&d, content.len() as u64, &key, used)
            .unwrap();
        store.meta.put_cache_link(repo.0, repo.1, &d, used).unwrap();
        store.access.touch(&d, used);
        d
    }

    fn manifest(store: &Store, body: &[u8], repo: (&str, &str), used: u64) -> Digest {
        let d = Digest::sha256_of(body);
        let rec = ManifestRecord {
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            body: Bytes::copy_from_slice(body),
        };
        store.meta.put_manifest(&d, &rec).unwrap();
        store.meta.put_cache_link(repo.0, repo.1, &d, used).unwrap();
        store.access.touch(&d, used);
        d
    }

    #[test]
    fn sizes_and_last_pulls_by_repository() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let nginx = ("docker.io", "library/nginx");
        let alpine = ("docker.io", "library/alpine");
        let layer = blob(&store, &[1u8; 1000], nginx, 50_000);
        manifest(&store, b"{\"nginx\":1}", nginx, 10_000);
        // The layer is shared: it counts for alpine too, but its use is not a pull of
        // alpine.
        store
            .meta
            .put_cache_link(alpine.0, alpine.1, &layer, 1)
            .unwrap();
        manifest(&store, b"{\"alpine\":22}", alpine, 20_000);
        // A tag confirmed later than its manifest's last use.
        let key = TagKey {
            upstream: "docker.io".into(),
            repo: "library/alpine".into(),
            tag: "3".into(),
            variant: 0,
        };
        let rec = TagRecord {
            digest: layer.clone(),
            confirmed_at_ms: 30_000,
        };
        store.meta.put_tag(&key, &rec).unwrap();
        // Blobs only: goes by the blob's use.
        blob(&store, &[2u8; 10], ("ghcr.io", "a/b"), 5_000);
        // A link to what is not stored counts for nothing.
        let gone = Digest::sha256_of(b"gone");
        store.meta.put_cache_link("quay.io", "x", &gone, 1).unwrap();
        store.access.flush(&store.meta).unwrap();

        let repos = cached_repositories(&store).unwrap();
        let names: Vec<_> = repos
            .iter()
            .map(|r| format!("{}/{}", r.upstream, r.repo))
            .collect();
        assert_eq!(
            names,
            [
                "docker.io/library/alpine",
                "docker.io/library/nginx",
                "ghcr.io/a/b"
            ]
        );
        assert_eq!(repos[0].bytes, 1000 + 13);
        assert_eq!((repos[0].manifests, repos[0].blobs), (1, 1));
        assert_eq!(repos[0].last_pull_ms, Some(30_000));
        assert_eq!(repos[1].bytes, 1000 + 11);
        assert_eq!(repos[1].last_pull_ms, Some(10_000));
        assert_eq!(repos[2].last_pull_ms, Some(5_000));
    }
}
