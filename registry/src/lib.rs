//! berth's private repositories: the push side of the OCI distribution API over the
//! store the pull-through cache uses.
//!
//! A repository is private when its first path segment is not a configured upstream
//! namespace. Its content lives in the shared store (one file per digest, whether pulled
//! through or pushed); what makes content readable through a repository is a link: a
//! blob is linked when it is uploaded or mounted there, a manifest when it is pushed
//! there. Nothing is readable through a repository it is not linked into.
//!
//! Every method of [`Registry`] blocks: it reads or writes RocksDB, opens or writes files,
//! and a publishing one may wait for garbage collection. Call them from a blocking thread
//! (`tokio::task::spawn_blocking`), never from an async worker.
//!
//! Writes of private content are durable when they return: blob files are synced before
//! and their directory after the rename that publishes them, and metadata batches are
//! written with a synced write-ahead log.

mod error;
mod gc;
pub mod manifest;
pub mod retention;
mod sidecar;
mod upload;

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, PoisonError, RwLockReadGuard, TryLockError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use berth_store::oci::{Digest, Reference};
use berth_store::{Batch, ManifestRecord, RepoLink, RepoTag, Store, StoredBlob};

pub use error::RegistryError;
pub use gc::GcReport;
pub use manifest::MAX_MANIFEST_BYTES;
pub use retention::{RepoRetention, RetentionReport};
pub use upload::{SharedUpload, Upload};

/// Settings of the private registry.
#[derive(Clone, Debug)]
pub struct Options {
    /// An upload with no activity for this long is removed.
    pub upload_timeout: Duration,
    /// At most this many uploads are in progress at once.
    pub max_uploads: usize,
    /// An upload (and so a pushed blob) may hold at most this many bytes.
    pub max_upload_size: u64,
}

/// The default [`Options::max_upload_size`]: 10 GiB.
pub const DEFAULT_MAX_UPLOAD_SIZE: u64 = 10 << 30;

impl Default for Options {
    fn default() -> Self {
        Options {
            upload_timeout: Duration::from_secs(3600),
            max_uploads: 1024,
            max_upload_size: DEFAULT_MAX_UPLOAD_SIZE,
        }
    }
}

/// How many locks the tags of all repositories share (by hash of the repository).
const TAG_LOCKS: usize = 64;

/// The private repositories of one store.
pub struct Registry {
    store: Arc<Store>,
    options: Options,
    /// Held from reading a repository's tags to writing a manifest push, so that the
    /// check "this push does not move a tag" and the write are one step.
    tag_locks: [Mutex<()>; TAG_LOCKS],
    /// Upload sessions by id, with their repository.
    uploads: Mutex<HashMap<String, (String, SharedUpload)>>,
}

/// A manifest read from a private repository.
#[derive(Clone, Debug)]
pub struct Manifest {
    pub digest: Digest,
    pub media_type: String,
    pub body: Bytes,
}

/// What a manifest push did.
#[derive(Clone, Debug)]
pub struct Pushed {
    pub digest: Digest,
    /// The manifest's `subject`, if it has one (answered as `OCI-Subject`).
    pub subject: Option<Digest>,
}

/// One page of a sorted listing.
#[derive(Clone, Debug)]
pub struct Page {
    pub items: Vec<String>,
    /// Whether there are more after the last item.
    pub more: bool,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Registry {
    pub fn new(store: Arc<Store>, options: Options) -> Self {
        Registry {
            store,
            options,
            tag_locks: std::array::from_fn(|_| Mutex::new(())),
            uploads: Mutex::new(HashMap::new()),
        }
    }

    pub fn options(&self) -> &Options {
        &self.options
    }

    /// The shared side of the store's removal lock, for publishing or linking content.
    /// Waits while garbage collection sweeps or eviction removes files (and says so in
    /// the log).
    fn publishing(&self) -> RwLockReadGuard<'_, ()> {
        match self.store.removal_lock.try_read() {
            Ok(guard) => guard,
            Err(TryLockError::WouldBlock) => {
                tracing::info!(
                    "a push waits for garbage collection or eviction to finish removing files"
                );
                self.store
                    .removal_lock
                    .read()
                    .unwrap_or_else(PoisonError::into_inner)
            }
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
        }
    }

    /// The lock of `repo`'s tags.
    fn tag_lock(&self, repo: &str) -> std::sync::MutexGuard<'_, ()> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        repo.hash(&mut h);
        self.tag_locks[(h.finish() % TAG_LOCKS as u64) as usize]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the store answers (see [`berth_store::Store::check`]).
    pub fn check_store(&self) -> Result<(), RegistryError> {
        Ok(self.store.check()?)
    }

    // --- blobs ---------------------------------------------------------------------

    /// A blob linked into `repo`.
    pub fn blob(&self, repo: &str, digest: &Digest) -> Result<StoredBlob, RegistryError> {
        if self.store.meta.repo_blob(repo, digest)?.is_none() {
            return Err(RegistryError::BlobUnknown(digest.clone()));
        }
        self.store
            .blobs
            .open_blob(digest)?
            .ok_or_else(|| RegistryError::BlobUnknown(digest.clone()))
    }

    /// The size of a blob linked into `repo`.
    pub fn blob_size(&self, repo: &str, digest: &Digest) -> Result<u64, RegistryError> {
        Ok(self.blob(repo, digest)?.size())
    }

    /// Unlinks a blob from `repo`. The file goes when garbage collection finds no
    /// other reference to it.
    pub fn delete_blob(&self, repo: &str, digest: &Digest) -> Result<(), RegistryError> {
        if self.store.meta.repo_blob(repo, digest)?.is_none() {
            return Err(RegistryError::BlobUnknown(digest.clone()));
        }
        let mut b = Batch::default();
        b.unlink_blob(repo, digest);
        self.store.meta.write_synced(b)?;
        Ok(())
    }

    /// Links `digest` from repository `from` into `repo`, if `from` has it. Returns
    /// whether it did.
    pub fn mount(&self, repo: &str, digest: &Digest, from: &str) -> Result<bool, RegistryError> {
        let _shared = self.publishing();
        let Some(link) = self.store.meta.repo_blob(from, digest)? else {
            return Ok(false);
        };
        if self.store.blobs.stat(digest)?.is_none() {
            return Ok(false);
        }
        self.link_blob(repo, digest, link.size)?;
        Ok(true)
    }

    fn link_blob(&self, repo: &str, digest: &Digest, size: u64) -> Result<(), RegistryError> {
        let now = now_ms();
        let mut b = Batch::default();
        b.put_repo(repo, now).link_blob(
            repo,
            digest,
            RepoLink {
                linked_ms: now,
                size,
            },
        );
        self.store.meta.write_synced(b)?;
        Ok(())
    }

    // --- manifests -----------------------------------------------------------------

    /// The digest a reference names in `repo`.
    fn resolve(&self, repo: &str, reference: &Reference) -> Result<Digest, RegistryError> {
        match reference {
            Reference::Tag(tag) => match self.store.meta.repo_tag(repo, tag)? {
                // A tag counts only while its manifest is in the repository.
                Some(t) if self.store.meta.repo_manifest(repo, &t.digest)?.is_some() => {
                    Ok(t.digest)
                }
                _ => Err(self.manifest_unknown(repo, reference)),
            },
            Reference::Digest(d) => match self.store.meta.repo_manifest(repo, d)? {
                Some(_) => Ok(d.clone()),
                None => Err(self.manifest_unknown(repo, reference)),
            },
        }
    }

    fn manifest_unknown(&self, repo: &str, reference: &Reference) -> RegistryError {
        RegistryError::ManifestUnknown(format!(
            "manifest {repo}:{reference} is not in this registry"
        ))
    }

    /// The manifest a tag of `repo` points at, if the tag exists.
    pub fn tag_target(&self, repo: &str, tag: &str) -> Result<Option<Digest>, RegistryError> {
        match self.resolve(repo, &Reference::Tag(tag.to_owned())) {
            Ok(d) => Ok(Some(d)),
            Err(RegistryError::ManifestUnknown(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// A manifest of `repo`, by tag or digest. Every successful read counts as a use of
    /// the manifest in the store's access log (what retention's `keep_pulled_within`
    /// and `untagged_grace` judge by): GET and HEAD alike (a HEAD by tag is how `docker
    /// pull` and containerd check a tag, so it is counted, erring on the side of
    /// keeping), by tag and by digest, which records the manifests of an index that
    /// clients fetch by digest after it.
    pub fn manifest(&self, repo: &str, reference: &Reference) -> Result<Manifest, RegistryError> {
        let manifest = self.read_manifest(repo, reference)?;
        self.store.access.touch(&manifest.digest, now_ms());
        Ok(manifest)
    }

    fn read_manifest(&self, repo: &str, reference: &Reference) -> Result<Manifest, RegistryError> {
        let digest = self.resolve(repo, reference)?;
        let rec = self
            .store
            .meta
            .get_private_manifest(&digest)?
            .ok_or_else(|| self.manifest_unknown(repo, reference))?;
        // The type it was pushed to this repository with, whatever another repository
        // pushed the same bytes as.
        let media_type = self
            .store
            .meta
            .repo_manifest_type(repo, &digest)?
            .unwrap_or(rec.media_type);
        Ok(Manifest {
            digest,
            media_type,
            body: rec.body,
        })
    }

    /// Stores a pushed manifest under `reference` (a tag, or the digest of the body) and
    /// under each of `extra_tags`, after checking that it parses as `media_type` and
    /// that everything it references is in `repo`. Tags may move to it.
    pub fn put_manifest(
        &self,
        repo: &str,
        reference: &Reference,
        extra_tags: &[String],
        media_type: &str,
        body: Bytes,
    ) -> Result<Pushed, RegistryError> {
        self.put_manifest_with(repo, reference, extra_tags, media_type, body, true)
    }

    /// [`put_manifest`](Self::put_manifest); unless `may_move_tags`, a tag that already
    /// names another manifest is refused ([`RegistryError::TagImmutable`]). The check
    /// and the write are one step with respect to every other push to `repo`.
    pub fn put_manifest_with(
        &self,
        repo: &str,
        reference: &Reference,
        extra_tags: &[String],
        media_type: &str,
        body: Bytes,
        may_move_tags: bool,
    ) -> Result<Pushed, RegistryError> {
        if body.len() > MAX_MANIFEST_BYTES {
            return Err(RegistryError::ManifestTooLarge {
                limit: MAX_MANIFEST_BYTES,
            });
        }
        let digest = match reference {
            Reference::Digest(d) => {
                if !d.matches(&body) {
                    return Err(RegistryError::DigestInvalid(format!(
                        "the manifest's digest is {}, not {d}",
                        Digest::sha256_of(&body)
                    )));
                }
                d.clone()
            }
            Reference::Tag(_) => Digest::sha256_of(&body),
        };
        let parsed = manifest::parse(media_type, &body)?;
        let tags = match reference {
            Reference::Tag(t) => std::iter::once(t).chain(extra_tags).collect::<Vec<_>>(),
            Reference::Digest(_) => extra_tags.iter().collect(),
        };
        let _shared = self.publishing();
        let _tags = self.tag_lock(repo);
        if !may_move_tags {
            for tag in &tags {
                if let Some(current) = self.tag_target(repo, tag)? {
                    if current != digest {
                        return Err(RegistryError::TagImmutable {
                            tag: (*tag).clone(),
                            current,
                        });
                    }
                }
            }
        }
        for blob in &parsed.blobs {
            match self.store.meta.repo_blob(repo, &blob.digest)? {
                Some(link) if link.size == blob.size => {}
                Some(link) => {
                    return Err(RegistryError::ManifestInvalid(format!(
                        "the manifest gives {} a size of {}, but it has {} bytes",
                        blob.digest, blob.size, link.size
                    )))
                }
                None => return Err(RegistryError::ManifestBlobUnknown(blob.digest.clone())),
            }
        }
        for child in &parsed.manifests {
            if self
                .store
                .meta
                .repo_manifest(repo, &child.digest)?
                .is_none()
            {
                return Err(RegistryError::ManifestBlobUnknown(child.digest.clone()));
            }
        }
        let now = now_ms();
        let mut b = Batch::default();
        b.put_repo(repo, now)
            .put_private_manifest(
                &digest,
                &ManifestRecord {
                    media_type: media_type.to_owned(),
                    body: body.clone(),
                },
            )
            .link_manifest(
                repo,
                &digest,
                RepoLink {
                    linked_ms: now,
                    size: body.len() as u64,
                },
            )
            .put_manifest_type(repo, &digest, media_type);
        for tag in tags {
            b.put_tag(
                repo,
                tag,
                &RepoTag {
                    digest: digest.clone(),
                    updated_ms: now,
                },
            );
        }
        if let Some(subject) = &parsed.subject {
            let descriptor =
                manifest::referrer_descriptor(media_type, &digest, body.len(), &parsed);
            b.put_referrer(repo, &subject.digest, &digest, descriptor);
        }
        self.store.meta.write_synced(b)?;
        Ok(Pushed {
            digest,
            subject: parsed.subject.map(|s| s.digest),
        })
    }

    /// Deletes a manifest by digest (with every tag pointing at it), or a tag.
    pub fn delete_manifest(&self, repo: &str, reference: &Reference) -> Result<(), RegistryError> {
        // Held from resolving to writing: a concurrent push cannot move a tag in between
        // (a deleted tag would take the new manifest with it) or tag the manifest being
        // deleted (the tag would name a manifest the repository no longer holds).
        let _tags = self.tag_lock(repo);
        let digest = self.resolve(repo, reference)?;
        let mut b = Batch::default();
        match reference {
            Reference::Tag(tag) => {
                b.delete_tag(repo, tag);
            }
            Reference::Digest(d) => {
                for tag in self.store.meta.repo_tags_of(repo, d)? {
                    b.delete_tag(repo, &tag);
                }
                b.unlink_manifest(repo, d);
                if let Some(rec) = self.store.meta.get_private_manifest(d)? {
                    let media_type = self.store.meta.repo_manifest_type(repo, d)?;
                    let media_type = media_type.as_deref().unwrap_or(&rec.media_type);
                    if let Ok(parsed) = manifest::parse(media_type, &rec.body) {
                        if let Some(subject) = parsed.subject {
                            b.delete_referrer(repo, &subject.digest, &digest);
                        }
                    }
                }
            }
        }
        self.store.meta.write_synced(b)?;
        Ok(())
    }

    // --- listings ------------------------------------------------------------------

    /// Tags of `repo` in lexical order: at most `n` after `last`.
    pub fn tags(
        &self,
        repo: &str,
        n: Option<usize>,
        last: Option<&str>,
    ) -> Result<Page, RegistryError> {
        if !self.store.meta.repo_exists(repo)? {
            return Err(RegistryError::NameUnknown(format!(
                "repository {repo} is not in this registry"
            )));
        }
        let limit = n.unwrap_or(usize::MAX);
        let mut items: Vec<String> = self
            .store
            .meta
            .repo_tags(repo, last, limit.saturating_add(1))?
            .into_iter()
            .map(|(t, _)| t)
            .collect();
        let more = items.len() > limit;
        items.truncate(limit);
        Ok(Page { items, more })
    }

    /// Private repositories in lexical order: at most `n` after `last`.
    pub fn catalog(&self, n: Option<usize>, last: Option<&str>) -> Result<Page, RegistryError> {
        let limit = n.unwrap_or(usize::MAX);
        let mut items = self.store.meta.repos(last, limit.saturating_add(1))?;
        let more = items.len() > limit;
        items.truncate(limit);
        Ok(Page { items, more })
    }

    /// The referrers of `subject` in `repo` as an OCI image index, keeping only those of
    /// `artifact_type` if given.
    pub fn referrers(
        &self,
        repo: &str,
        subject: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<Bytes, RegistryError> {
        let mut manifests = Vec::new();
        for d in self.store.meta.referrers(repo, subject)? {
            let v: serde_json::Value = serde_json::from_slice(&d).map_err(|e| {
                RegistryError::Store(berth_store::StoreError::Corrupt(e.to_string()))
            })?;
            if artifact_type
                .is_none_or(|t| v.get("artifactType").and_then(|a| a.as_str()) == Some(t))
            {
                manifests.push(v);
            }
        }
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": berth_store::oci::OCI_INDEX,
            "manifests": manifests,
        });
        Ok(Bytes::from(
            serde_json::to_vec(&index).expect("serializable"),
        ))
    }
}

#[cfg(test)]
mod tests;
