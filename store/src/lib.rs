//! berth's local store: digest-addressed blobs on disk and typed metadata in RocksDB.
//!
//! Invariants this crate keeps:
//! - a blob is visible under its digest only after its bytes were hashed as they were
//!   written and matched ([`BlobWriter::commit`]); partial writes live under `tmp/` and
//!   are removed on drop and on open, except push uploads in progress, which live under
//!   `uploads/` until their owner finishes or removes them ([`BlobStore::upload_file`]);
//! - metadata is reached only through typed records ([`MetaStore`]); no RocksDB type is
//!   exposed;
//! - the shared OCI vocabulary (digests, names, tags, media types) lives in the
//!   `berth-oci` crate, re-exported here as [`oci`]; it does no I/O.
//!
//! ```no_run
//! # use berth_store::{Store, oci::Digest};
//! let store = Store::open(std::path::Path::new("/var/lib/berth")).unwrap();
//! let digest = Digest::sha256_of(b"hi");
//! let mut w = store.blobs.writer(&digest).unwrap();
//! w.write(b"hi").unwrap();
//! w.commit(Some(2)).unwrap();
//! assert_eq!(store.blobs.stat(&digest).unwrap(), Some(2));
//! ```

pub mod access;
pub mod blobs;
pub mod meta;

/// The shared OCI vocabulary (the `berth-oci` crate), re-exported for convenience.
pub use berth_oci as oci;

use std::path::Path;

pub use access::AccessLog;
pub use blobs::{BlobStore, BlobWriter, Reserve, StoredBlob};
pub use meta::{
    ApiKeyRecord, Batch, BlobRecord, ManifestRecord, MetaStore, RepoLink, RepoTag, TagKey,
    TagRecord,
};

use oci::Digest;

/// What can go wrong in the store.
#[derive(Debug)]
pub enum StoreError {
    Io(std::io::Error),
    Database(String),
    /// A record could not be decoded.
    Corrupt(String),
    DigestMismatch {
        expected: Digest,
        actual: Digest,
    },
    SizeMismatch {
        expected: u64,
        actual: u64,
    },
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Io(e) => write!(f, "store I/O error: {e}"),
            StoreError::Database(e) => write!(f, "metadata database error: {e}"),
            StoreError::Corrupt(e) => write!(f, "corrupt metadata: {e}"),
            StoreError::DigestMismatch { expected, actual } => {
                write!(
                    f,
                    "content does not match its digest: expected {expected}, got {actual}"
                )
            }
            StoreError::SizeMismatch { expected, actual } => {
                write!(
                    f,
                    "content size mismatch: expected {expected} bytes, got {actual}"
                )
            }
        }
    }
}

impl std::error::Error for StoreError {}

impl StoreError {
    /// Whether this is the disk being full (of the blob files or the database).
    pub fn is_no_space(&self) -> bool {
        match self {
            StoreError::Io(e) => e.raw_os_error() == Some(28),
            StoreError::Database(m) => m.contains("No space left on device"),
            _ => false,
        }
    }
}

impl From<std::io::Error> for StoreError {
    fn from(e: std::io::Error) -> Self {
        StoreError::Io(e)
    }
}

/// A store root: blob files under `<root>/` and the metadata database in `<root>/meta`.
#[derive(Debug)]
pub struct Store {
    pub blobs: BlobStore,
    pub meta: MetaStore,
    /// Last use of cached and private content, batched in memory (see [`access`]).
    pub access: AccessLog,
    /// Held shared by every operation that publishes or links private content, and
    /// exclusively by whatever removes blob files (garbage collection's sweep and cache
    /// eviction), so that a file a push is linking is never removed under it.
    pub removal_lock: std::sync::RwLock<()>,
}

impl Store {
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(root)?;
        // The database first: its lock refuses a second process on the same store
        // before the blob store cleans up `tmp/`, where the first may be writing.
        let meta = Self::open_meta(root)?;
        Ok(Store {
            blobs: BlobStore::open(root)?,
            meta,
            access: AccessLog::default(),
            removal_lock: std::sync::RwLock::new(()),
        })
    }

    /// Opens the database, on a full disk too. Opening writes (the log is replayed into
    /// a table file): without room, the start reserve is given back, and if that is not
    /// enough, the least recently used cached blobs are removed (found with the database
    /// opened read-only) until there is room for the reserve twice over.
    fn open_meta(root: &Path) -> Result<MetaStore, StoreError> {
        let path = root.join("meta");
        let e = match MetaStore::open(&path) {
            Err(e) if e.is_no_space() => e,
            other => return other,
        };
        if blobs::release_reserve(root, Reserve::Start) {
            tracing_free_space("gave back the start reserve");
            match MetaStore::open(&path) {
                Err(e) if e.is_no_space() => {}
                other => return other,
            }
        }
        // The database took its lock before it failed: no other berth is writing here,
        // and what a crash left in tmp/ can go too.
        let blobs = BlobStore::open(root)?;
        let freed = MetaStore::evict_offline(&path, &blobs, EMERGENCY_FREE)?;
        if freed == 0 {
            return Err(e);
        }
        tracing_free_space(&format!(
            "removed {freed} bytes of least recently used cached blobs"
        ));
        MetaStore::open(&path)
    }

    /// Makes the index and the files agree after a crash: removes blob files published
    /// before `before` that neither the cache indexes nor a private repository links (a
    /// fill or a push killed between publishing a file and recording it), and cache
    /// records whose file is gone (an eviction killed between the two). Each file is
    /// checked again and removed under the removal lock, so a push publishing now is
    /// never undone. Blocks; reads every file name and record once.
    pub fn reconcile(&self, before: std::time::SystemTime) -> Result<Reconciled, StoreError> {
        let mut done = Reconciled::default();
        self.blobs.list_by_shard(|shard| {
            for (digest, _, published) in shard {
                if published >= before
                    || self.meta.get_blob(&digest)?.is_some()
                    || self.meta.privately_linked(&digest)?
                {
                    continue;
                }
                let _exclusive = self
                    .removal_lock
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if self.meta.get_blob(&digest)?.is_none() && !self.meta.privately_linked(&digest)? {
                    if let Some(freed) = self.blobs.delete_unpinned(&digest)? {
                        done.orphan_files += 1;
                        done.bytes_freed += freed;
                    }
                }
            }
            Ok(())
        })?;
        // Records whose file is gone, removed in batches as the records are read.
        let mut batch = Batch::default();
        let mut failed = None;
        self.meta.visit_cached_blobs(|digest, _| {
            match self.blobs.stat(&digest) {
                Ok(Some(_)) => {}
                Ok(None) => {
                    batch.delete_cached_blob(&digest);
                    done.records_without_files += 1;
                }
                Err(e) => failed = Some(e),
            }
            if batch.len() >= 10_000 {
                if let Err(e) = self.meta.write(std::mem::take(&mut batch)) {
                    failed = Some(e);
                }
            }
            failed.is_none()
        })?;
        if let Some(e) = failed {
            return Err(e);
        }
        self.meta.write(batch)?;
        Ok(done)
    }

    /// Reads a published blob again and checks it against its digest; `pause` is called
    /// after every piece read with its length (to bound the I/O rate). `None` when the
    /// blob is not stored (any more).
    pub fn verify_blob(
        &self,
        digest: &Digest,
        pause: &mut dyn FnMut(u64),
    ) -> Result<Option<bool>, StoreError> {
        use std::io::Read;
        let Some(blob) = self.blobs.open_blob(digest)? else {
            return Ok(None);
        };
        let mut file = blob.file();
        let mut hasher = oci::Hasher::new(digest.algorithm());
        let mut buf = vec![0u8; 1 << 20];
        let mut read = 0u64;
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            read += n as u64;
            pause(n as u64);
        }
        Ok(Some(read == blob.size() && hasher.finish() == *digest))
    }

    /// Removes a damaged blob (one [`verify_blob`](Self::verify_blob) found wrong): its
    /// file, and its cache record. Returns whether a private repository links it (its
    /// content is lost: it must be pushed again).
    pub fn remove_damaged(&self, digest: &Digest) -> Result<bool, StoreError> {
        let _exclusive = self
            .removal_lock
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.blobs.delete(digest)?;
        let mut batch = Batch::default();
        batch.delete_cached_blob(digest);
        self.meta.write(batch)?;
        self.meta.privately_linked(digest)
    }

    /// Whether the store answers: one metadata read and one look at the blob directory
    /// (for a readiness probe).
    pub fn check(&self) -> Result<(), StoreError> {
        self.meta.repo_exists("berth-readiness-probe")?;
        self.blobs
            .stat(&Digest::sha256_of(b"berth-readiness-probe"))?;
        Ok(())
    }
}

/// What [`Store::reconcile`] removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reconciled {
    pub orphan_files: u64,
    pub bytes_freed: u64,
    pub records_without_files: u64,
}

/// How much a store that cannot open for lack of space frees of its cached blobs.
const EMERGENCY_FREE: u64 = 64 << 20;

/// The store crate does not log; what it did to open on a full disk goes to stderr,
/// which is berth's log.
fn tracing_free_space(what: &str) {
    eprintln!("berth: the store's disk is full: {what} to open the metadata database");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_process_cannot_take_a_store_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let d = Digest::sha256_of(b"in flight");
        let mut w = store.blobs.writer(&d).unwrap();
        w.write(b"in flight").unwrap();
        assert!(Store::open(dir.path()).is_err());
        // The refused open left the write in progress alone.
        assert_eq!(w.commit(None).unwrap(), 9);
    }
}
