//! Garbage collection of private content.
//!
//! A blob link is garbage when no manifest of its repository references it and it is
//! older than the grace period (a push uploads its blobs before the manifest that
//! references them; the grace period is how long it may take). A blob file is garbage
//! when no link of any repository remains, the pull-through cache does not index it,
//! and it too is older than the grace period.
//!
//! Collection runs in two phases, so that pushes wait for it only briefly:
//!
//! 1. **Mark**, alongside pushes: every manifest linked in a repository is read and
//!    what it references is noted. A manifest never changes under its digest, so what
//!    is read stays true.
//! 2. **Sweep**, holding the store's removal lock exclusively (pushes, mounts and
//!    manifest pushes hold it shared while they publish or link): the manifest links
//!    are listed again and the ones the mark did not see (pushed meanwhile) are read
//!    too; then links, manifests and files are removed.
//!
//! The invariant: **no blob that a push links, or that a manifest of its repository
//! references, is deleted.** A link is removed only in the sweep, and only if it is
//! older than the grace period and no manifest linked in its repository at that moment
//! references it. A push holds the lock shared from its check to its write, so it
//! either finished before the sweep (and the sweep sees its links and manifests) or
//! starts after it (and finds what the sweep removed missing: an upload writes and
//! links the file again, a manifest push is refused with `MANIFEST_BLOB_UNKNOWN`).
//!
//! Collection fails closed: a manifest it cannot read or parse keeps every blob linked
//! in its repository, and is reported ([`GcReport::unreadable_manifests`] and the log).

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use berth_store::oci::Digest;
use berth_store::{Batch, MetaStore, StoreError};

use crate::{manifest, now_ms, Registry, RegistryError};

/// What a collection did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Manifests no repository holds any more.
    pub manifests_removed: usize,
    /// Repositories left empty, removed from the catalog.
    pub repos_removed: usize,
    /// Blob links removed from repositories.
    pub links_removed: usize,
    /// Blob files deleted.
    pub blobs_removed: usize,
    pub bytes_freed: u64,
    /// `(repository, manifest)` of each linked manifest that could not be read or
    /// parsed: nothing linked in those repositories was collected.
    pub unreadable_manifests: Vec<(String, Digest)>,
}

/// What the manifests of each repository reference.
#[derive(Default)]
struct Mark {
    /// The `(repo, manifest)` links already read.
    seen: HashSet<(String, Digest)>,
    /// `(repo, blob)`: referenced by a manifest of that repository.
    referenced: HashSet<(String, Digest)>,
    /// Repositories with a manifest that could not be read: keep all their blobs.
    pinned: HashSet<String>,
    unreadable: Vec<(String, Digest)>,
}

impl Mark {
    /// Reads the manifests linked now that were not read before; returns every
    /// `(repo, manifest)` linked now.
    fn scan(&mut self, meta: &MetaStore) -> Result<Vec<(String, Digest)>, RegistryError> {
        let mut linked = Vec::new();
        for (repo, digest, _) in meta.all_manifest_links()? {
            let key = (repo, digest);
            if !self.seen.contains(&key) {
                self.read(meta, &key.0, &key.1)?;
                self.seen.insert(key.clone());
            }
            linked.push(key);
        }
        Ok(linked)
    }

    fn read(&mut self, meta: &MetaStore, repo: &str, digest: &Digest) -> Result<(), RegistryError> {
        let parsed = match meta.get_private_manifest(digest) {
            // Parsed as the type it was pushed to this repository with.
            Ok(Some(rec)) => match meta.repo_manifest_type(repo, digest) {
                Ok(t) => manifest::parse(t.as_deref().unwrap_or(&rec.media_type), &rec.body)
                    .map_err(|e| e.to_string()),
                Err(e) => Err(format!("its type in the repository cannot be read: {e}")),
            },
            Ok(None) => Err("its record is missing".to_owned()),
            Err(StoreError::Corrupt(e)) => Err(format!("its record is corrupt: {e}")),
            Err(e) => return Err(e.into()),
        };
        match parsed {
            Ok(parsed) => {
                for d in parsed.blobs {
                    self.referenced.insert((repo.to_owned(), d.digest));
                }
            }
            Err(why) => {
                tracing::warn!(repo, manifest = %digest, reason = %why,
                    "garbage collection cannot read a manifest: nothing linked in its repository is collected");
                self.pinned.insert(repo.to_owned());
                self.unreadable.push((repo.to_owned(), digest.clone()));
            }
        }
        Ok(())
    }
}

/// The test hook `BERTH_TEST_GC_HOLD=<dir>`: once `<dir>/arm` exists, a sweep that has
/// taken the exclusive lock creates `<dir>/held` and waits until `<dir>/release` exists
/// (at most two minutes). Tests use it to run requests while a collection holds the
/// lock; it changes nothing but timing, and nothing sets it outside tests.
fn test_hold() {
    let Some(dir) = std::env::var_os("BERTH_TEST_GC_HOLD").map(PathBuf::from) else {
        return;
    };
    if !dir.join("arm").exists() {
        return;
    }
    let _ = std::fs::write(dir.join("held"), b"");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !dir.join("release").exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Registry {
    /// Collects garbage older than `grace`. Blocks: run it on a blocking thread.
    pub fn collect_garbage(&self, grace: Duration) -> Result<GcReport, RegistryError> {
        // Listed first: a blob published after this is not in the list at all.
        let files = self.store.blobs.list()?;
        let meta = &self.store.meta;
        let cutoff_ms = now_ms().saturating_sub(grace.as_millis() as u64);
        let mut mark = Mark::default();
        mark.scan(meta)?;

        let _exclusive = self
            .store
            .removal_lock
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        test_hold();
        let manifest_links = mark.scan(meta)?;
        let mut report = GcReport {
            unreadable_manifests: mark.unreadable.clone(),
            ..GcReport::default()
        };
        // Sweep manifests no repository has any more.
        let linked_manifests: HashSet<&Digest> = manifest_links.iter().map(|(_, d)| d).collect();
        for digest in meta.private_manifest_digests()? {
            if !linked_manifests.contains(&digest) {
                meta.delete_private_manifest(&digest)?;
                report.manifests_removed += 1;
            }
        }
        // Sweep links.
        let mut linked: HashSet<Digest> = HashSet::new();
        let mut live_repos: HashSet<String> =
            manifest_links.into_iter().map(|(repo, _)| repo).collect();
        let mut batch = Batch::default();
        for (repo, digest, link) in meta.all_blob_links()? {
            let key = (repo, digest);
            if mark.pinned.contains(&key.0)
                || mark.referenced.contains(&key)
                || link.linked_ms > cutoff_ms
            {
                linked.insert(key.1);
                live_repos.insert(key.0);
            } else {
                batch.unlink_blob(&key.0, &key.1);
                report.links_removed += 1;
            }
        }
        // Repositories left with nothing leave the catalog.
        for repo in meta.repos(None, usize::MAX)? {
            if !live_repos.contains(&repo) && !mark.pinned.contains(&repo) {
                batch.delete_repo(&repo);
                report.repos_removed += 1;
            }
        }
        meta.write_synced(batch)?;
        // Sweep files.
        let cutoff = SystemTime::now()
            .checked_sub(grace)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        for (digest, size, published) in files {
            if linked.contains(&digest) || published > cutoff || meta.get_blob(&digest)?.is_some() {
                continue;
            }
            self.store.blobs.delete(&digest)?;
            report.blobs_removed += 1;
            report.bytes_freed += size;
        }
        tracing::info!(
            manifests_removed = report.manifests_removed,
            links_removed = report.links_removed,
            blobs_removed = report.blobs_removed,
            bytes_freed = report.bytes_freed,
            unreadable_manifests = report.unreadable_manifests.len(),
            "garbage collected"
        );
        Ok(report)
    }
}
