//! Garbage collection of private content.
//!
//! A blob link is garbage when no manifest of its repository references it and it is
//! older than the grace period (a push uploads its blobs before the manifest that
//! references them; the grace period is how long it may take). A blob file is garbage
//! when no link of any repository remains, the pull-through cache does not index it,
//! and it too is older than the grace period. Collection holds the registry's write lock,
//! so no upload, mount or manifest push is half done while it decides.

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use berth_store::oci::Digest;
use berth_store::Batch;

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
}

impl Registry {
    /// Collects garbage older than `grace`.
    pub fn collect_garbage(&self, grace: Duration) -> Result<GcReport, RegistryError> {
        // Listed before the lock: a blob published after this is younger than the grace
        // period, or not in the list at all.
        let files = self.store.blobs.list()?;
        let _exclusive = self.gc_lock.write().expect("gc lock");
        let meta = &self.store.meta;
        let cutoff_ms = now_ms().saturating_sub(grace.as_millis() as u64);
        // Mark: what each repository's manifests reference.
        let mut referenced: HashSet<(String, Digest)> = HashSet::new();
        let mut linked_manifests: HashSet<Digest> = HashSet::new();
        for (repo, digest, _) in meta.all_manifest_links()? {
            linked_manifests.insert(digest.clone());
            let Some(rec) = meta.get_private_manifest(&digest)? else {
                continue;
            };
            if let Ok(parsed) = manifest::parse(&rec.media_type, &rec.body) {
                for d in parsed.blobs {
                    referenced.insert((repo.clone(), d.digest));
                }
            }
        }
        // Sweep manifests no repository has any more.
        let mut report = GcReport::default();
        for digest in meta.private_manifest_digests()? {
            if !linked_manifests.contains(&digest) {
                meta.delete_private_manifest(&digest)?;
                report.manifests_removed += 1;
            }
        }
        // Sweep links.
        let mut linked: HashSet<Digest> = HashSet::new();
        let mut live_repos: HashSet<String> = meta
            .all_manifest_links()?
            .into_iter()
            .map(|(repo, _, _)| repo)
            .collect();
        let mut batch = Batch::default();
        for (repo, digest, link) in meta.all_blob_links()? {
            let key = (repo, digest);
            if referenced.contains(&key) || link.linked_ms > cutoff_ms {
                linked.insert(key.1);
                live_repos.insert(key.0);
            } else {
                batch.unlink_blob(&key.0, &key.1);
                report.links_removed += 1;
            }
        }
        // Repositories left with nothing leave the catalog.
        for repo in meta.repos(None, usize::MAX)? {
            if !live_repos.contains(&repo) {
                batch.delete_repo(&repo);
                report.repos_removed += 1;
            }
        }
        meta.write(batch)?;
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
            "garbage collected"
        );
        Ok(report)
    }
}
