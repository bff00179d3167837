//! Digest-addressed blob files on local disk.
//!
//! Layout under the store root:
//! - `blobs/<algorithm>/<first two hex>/<hex>`: published blobs, each exactly the bytes of
//!   its digest;
//! - `tmp/`: blobs being written. Nothing under `tmp/` is ever served from its path, and
//!   whatever a crash left there is removed when the store is opened.
//! - `uploads/`: the files of push uploads in progress ([`BlobStore::upload_file`]), kept
//!   across restarts so that a client can resume; never served from their path, and
//!   removed only by their owner (the registry, which also keeps its own small state
//!   files there).
//!
//! The invariant: a file exists under `blobs/` only if its bytes were hashed while they
//! were written and matched the digest that names it (see [`BlobWriter::commit`]).
//!
//! Pins: a blob open for reading ([`BlobStore::open_blob`]) is pinned until its
//! [`StoredBlob`] is dropped, and [`BlobStore::delete_unpinned`] (what eviction uses)
//! leaves a pinned blob alone.
//!
//! Durability: every published file is synced before its rename. A push
//! ([`BlobWriter::commit_as`]) also syncs the directory after the rename (and, for a new
//! shard directory, its parents), so an acknowledged push survives a power loss; a
//! pulled-through blob ([`BlobWriter::commit`]) can be fetched again and skips that.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::oci::{Digest, Hasher};
use crate::StoreError;

/// The blob files of one store root.
#[derive(Debug)]
pub struct BlobStore {
    root: PathBuf,
    /// How many readers hold each blob open.
    pins: Arc<Pins>,
    /// Bytes published minus bytes deleted since the store was opened.
    delta: Arc<AtomicI64>,
    /// How many directory syncs commits made (observed by tests).
    #[cfg(test)]
    dir_syncs: AtomicU64,
}

static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// The directory of uploads in progress, under the store root.
const UPLOADS: &str = "uploads";

/// Space the store holds back in files of its own, for a full disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reserve {
    /// Given back while berth runs, when the disk fills up, so that metadata writes go on.
    Running,
    /// Given back only when the store cannot open for lack of space.
    Start,
}

impl Reserve {
    fn file(self) -> &'static str {
        match self {
            Reserve::Running => "reserve-running",
            Reserve::Start => "reserve-start",
        }
    }
}

impl BlobStore {
    /// Opens (creating if needed) the blob directories under `root` and removes any
    /// partially written blob a previous process left behind in `tmp/` (`uploads/` is
    /// left alone).
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        fs::create_dir_all(root.join("blobs"))?;
        fs::create_dir_all(root.join(UPLOADS))?;
        let tmp = root.join("tmp");
        if tmp.exists() {
            for entry in fs::read_dir(&tmp)? {
                let _ = fs::remove_file(entry?.path());
            }
        }
        fs::create_dir_all(&tmp)?;
        Ok(Self::open_unlocked(root))
    }

    /// The blob store at `root` as it is, nothing cleaned (for removing blobs while the
    /// database cannot open).
    pub(crate) fn open_unlocked(root: &Path) -> Self {
        BlobStore {
            root: root.to_owned(),
            pins: Arc::default(),
            delta: Arc::default(),
            #[cfg(test)]
            dir_syncs: AtomicU64::new(0),
        }
    }

    fn path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.root
            .join("blobs")
            .join(digest.algorithm().as_str())
            .join(&hex[..2])
            .join(hex)
    }

    /// The size of a published blob, or `None` if it is not stored.
    pub fn stat(&self, digest: &Digest) -> Result<Option<u64>, StoreError> {
        match fs::metadata(self.path(digest)) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Opens a published blob for reading.
    pub fn open_blob(&self, digest: &Digest) -> Result<Option<StoredBlob>, StoreError> {
        match File::open(self.path(digest)) {
            Ok(file) => self.opened(file, digest).map(Some),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// [`BlobStore::open_blob`] without waiting for the disk: `None` when the kernel
    /// would have to read a directory to find the file (or cannot tell: no `openat2`),
    /// and the caller should call `open_blob` where blocking is allowed. A blob read
    /// moments ago is found from the kernel's cache of names, as an async worker may.
    pub fn open_blob_if_cached(
        &self,
        digest: &Digest,
    ) -> Option<Result<Option<StoredBlob>, StoreError>> {
        use rustix::fs::{openat2, Mode, OFlags, ResolveFlags, CWD};
        let flags = OFlags::RDONLY | OFlags::CLOEXEC;
        match openat2(
            CWD,
            self.path(digest),
            flags,
            Mode::empty(),
            ResolveFlags::CACHED,
        ) {
            Ok(fd) => Some(self.opened(File::from(fd), digest).map(Some)),
            Err(rustix::io::Errno::NOENT) => Some(Ok(None)),
            Err(_) => None,
        }
    }

    /// An opened blob file (its size from the open file, so no path lookup again).
    fn opened(&self, file: File, digest: &Digest) -> Result<StoredBlob, StoreError> {
        let size = file.metadata()?.len();
        Ok(StoredBlob {
            file,
            size,
            _pin: Pin::new(&self.pins, digest),
        })
    }

    /// Starts writing the blob `expected`. The bytes become visible under the digest only
    /// when [`BlobWriter::commit`] has verified them.
    pub fn writer(&self, expected: &Digest) -> Result<BlobWriter, StoreError> {
        let seq = TMP_SEQ.fetch_add(1, Ordering::Relaxed);
        let tmp =
            self.root
                .join("tmp")
                .join(format!("{}-{}-{seq}", expected.hex(), std::process::id()));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        Ok(BlobWriter {
            file,
            tmp,
            dest: self.path(expected),
            hasher: Some(Hasher::new(expected.algorithm())),
            expected: expected.clone(),
            written: 0,
            committed: false,
            keep: false,
            broken: false,
            delta: self.delta.clone(),
            #[cfg(test)]
            fail_after: None,
        })
    }

    /// Starts writing a blob whose digest is known only at the end (a push): the bytes
    /// are hashed with sha256 as they are written, and [`BlobWriter::commit_as`] names,
    /// verifies and publishes them.
    pub fn upload(&self) -> Result<BlobWriter, StoreError> {
        // A placeholder until `commit_as` names the blob.
        let unnamed = Digest::sha256_of(b"");
        let mut w = self.writer(&unnamed)?;
        w.dest = PathBuf::new();
        Ok(w)
    }

    /// The directory of uploads in progress (`<root>/uploads`), which survives restarts.
    pub fn uploads_dir(&self) -> PathBuf {
        self.root.join(UPLOADS)
    }

    /// Starts the upload file `uploads/<name>` (`name` a plain file name that is not there
    /// yet): like [`upload`](Self::upload), but the file outlives the writer and the
    /// process. Dropping the writer leaves it in place (to be resumed with
    /// [`resume_upload_file`](Self::resume_upload_file)); only
    /// [`BlobWriter::discard`] or a commit attempt removes it.
    pub fn upload_file(&self, name: &str) -> Result<BlobWriter, StoreError> {
        let path = self.upload_path(name)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        Ok(self.upload_writer(file, path))
    }

    /// Resumes the upload file `uploads/<name>` after its first `len` bytes: anything
    /// after them is cut off, and the sha256 state is rebuilt by reading those `len` bytes
    /// again (the hash state cannot be saved), so resuming costs one sequential read of
    /// the bytes kept. `None` if the file is not there or holds fewer than `len` bytes.
    pub fn resume_upload_file(
        &self,
        name: &str,
        len: u64,
    ) -> Result<Option<BlobWriter>, StoreError> {
        let path = self.upload_path(name)?;
        let file = match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        if file.metadata()?.len() < len {
            return Ok(None);
        }
        let mut w = self.upload_writer(file, path);
        w.truncate(len)?;
        Ok(Some(w))
    }

    fn upload_path(&self, name: &str) -> Result<PathBuf, StoreError> {
        let plain = !name.is_empty() && !name.starts_with('.') && !name.contains('/');
        if !plain {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name:?} is not a plain file name"),
            )
            .into());
        }
        Ok(self.uploads_dir().join(name))
    }

    fn upload_writer(&self, file: File, path: PathBuf) -> BlobWriter {
        BlobWriter {
            file,
            tmp: path,
            // Named by `commit_as`.
            dest: PathBuf::new(),
            hasher: Some(Hasher::new(crate::oci::Algorithm::Sha256)),
            expected: Digest::sha256_of(b""),
            written: 0,
            committed: false,
            keep: true,
            broken: false,
            delta: self.delta.clone(),
            #[cfg(test)]
            fail_after: None,
        }
    }

    /// Every published blob: its digest, size and when it was published.
    pub fn list(&self) -> Result<Vec<(Digest, u64, std::time::SystemTime)>, StoreError> {
        let mut out = Vec::new();
        self.list_by_shard(|shard| {
            out.extend(shard);
            Ok(())
        })?;
        Ok(out)
    }

    /// [`list`](Self::list), one shard directory (1/256th of the blobs) at a time, so
    /// that a walk of a large store holds little in memory.
    pub fn list_by_shard(
        &self,
        mut f: impl FnMut(Vec<(Digest, u64, std::time::SystemTime)>) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        for algorithm in [crate::oci::Algorithm::Sha256, crate::oci::Algorithm::Sha512] {
            let dir = self.root.join("blobs").join(algorithm.as_str());
            let Ok(shards) = fs::read_dir(&dir) else {
                continue;
            };
            for shard in shards {
                let shard = shard?;
                if !shard.file_type()?.is_dir() {
                    continue;
                }
                let mut out = Vec::new();
                for entry in fs::read_dir(shard.path())? {
                    let entry = entry?;
                    let name = entry.file_name();
                    let Some(name) = name.to_str() else { continue };
                    let Ok(digest) = format!("{}:{name}", algorithm.as_str()).parse::<Digest>()
                    else {
                        continue;
                    };
                    let meta = entry.metadata()?;
                    out.push((digest, meta.len(), meta.modified()?));
                }
                f(out)?;
            }
        }
        Ok(())
    }

    /// Removes a published blob. Removing one that is not there is not an error.
    pub fn delete(&self, digest: &Digest) -> Result<(), StoreError> {
        self.remove(digest).map(|_| ())
    }

    /// Removes a published blob unless a reader holds it open; returns the bytes freed,
    /// `None` if it is pinned. A reader that opens it after this looks finds it gone.
    pub fn delete_unpinned(&self, digest: &Digest) -> Result<Option<u64>, StoreError> {
        let pins = self.pins.0.lock().unwrap_or_else(|e| e.into_inner());
        if pins.contains_key(digest) {
            return Ok(None);
        }
        let freed = self.remove(digest)?;
        drop(pins);
        Ok(Some(freed))
    }

    /// Whether a reader holds `digest` open.
    pub fn is_pinned(&self, digest: &Digest) -> bool {
        self.pins
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(digest)
    }

    fn remove(&self, digest: &Digest) -> Result<u64, StoreError> {
        let path = self.path(digest);
        let size = match fs::metadata(&path) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e.into()),
        };
        match fs::remove_file(path) {
            Ok(()) => {
                self.delta.fetch_sub(size as i64, Ordering::Relaxed);
                Ok(size)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(e.into()),
        }
    }

    /// Bytes published minus bytes deleted since the store was opened: added to a count
    /// of the stored bytes made at some moment, it keeps the count current.
    pub fn bytes_delta(&self) -> i64 {
        self.delta.load(Ordering::Relaxed)
    }

    /// The filesystem the store is on: `(available, total)` bytes, as an unprivileged
    /// process may use them.
    pub fn filesystem(&self) -> Result<(u64, u64), StoreError> {
        let st = rustix::fs::statvfs(&self.root).map_err(io::Error::from)?;
        let block = st.f_frsize.max(1);
        Ok((
            st.f_bavail.saturating_mul(block),
            st.f_blocks.saturating_mul(block),
        ))
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Holds `size` bytes of the filesystem in a file of the store's own (allocated, not
    /// sparse), to be given back with [`release_reserve`](Self::release_reserve) when the
    /// disk is full. Returns whether the reserve is (now) held.
    pub fn hold_reserve(&self, kind: Reserve, size: u64) -> Result<bool, StoreError> {
        let path = self.root.join(kind.file());
        if fs::metadata(&path).is_ok_and(|m| m.len() >= size) {
            return Ok(true);
        }
        let tmp = self.root.join("tmp").join(kind.file());
        let file = File::create(&tmp)?;
        if let Err(e) = rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::empty(), 0, size) {
            drop(file);
            let _ = fs::remove_file(&tmp);
            let e = io::Error::from(e);
            if e.raw_os_error() == Some(28) {
                return Ok(false);
            }
            return Err(e.into());
        }
        fs::rename(&tmp, &path)?;
        Ok(true)
    }

    /// Gives a reserve back to the filesystem; returns whether there was one.
    pub fn release_reserve(&self, kind: Reserve) -> bool {
        release_reserve(&self.root, kind)
    }

    /// Whether a reserve is held.
    pub fn has_reserve(&self, kind: Reserve) -> bool {
        self.root.join(kind.file()).exists()
    }
}

/// Gives the reserve `kind` of the store at `root` back; returns whether there was one.
pub fn release_reserve(root: &Path, kind: Reserve) -> bool {
    fs::remove_file(root.join(kind.file())).is_ok()
}

impl BlobStore {}

/// Readers per pinned blob.
#[derive(Debug, Default)]
struct Pins(Mutex<HashMap<Digest, usize>>);

/// One reader's pin, released when dropped.
#[derive(Debug)]
struct Pin {
    pins: Arc<Pins>,
    digest: Digest,
}

impl Pin {
    fn new(pins: &Arc<Pins>, digest: &Digest) -> Self {
        *pins
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(digest.clone())
            .or_insert(0) += 1;
        Pin {
            pins: pins.clone(),
            digest: digest.clone(),
        }
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        let mut pins = self.pins.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = pins.get_mut(&self.digest) {
            *n -= 1;
            if *n == 0 {
                pins.remove(&self.digest);
            }
        }
    }
}

/// A published blob, open for reading. The open file stays valid even if the blob is
/// deleted meanwhile.
#[derive(Debug)]
pub struct StoredBlob {
    file: File,
    size: u64,
    /// Keeps eviction off the blob while it is read.
    _pin: Pin,
}

impl StoredBlob {
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The open file, for reads at an offset or for `sendfile`.
    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn into_file(self) -> File {
        self.file
    }

    /// Maps the blob read-only, for serving without copying it through a buffer. The
    /// pages come from the page cache (file-backed, not heap).
    pub fn map(&self) -> Result<Bytes, StoreError> {
        if self.size == 0 {
            return Ok(Bytes::new());
        }
        Ok(Bytes::from_owner(map_readonly(&self.file)?))
    }
}

/// Maps `file` read-only.
#[allow(unsafe_code)]
fn map_readonly(file: &File) -> Result<memmap2::Mmap, StoreError> {
    // SAFETY: the mapping is undefined behaviour only if the file is modified or
    // truncated while mapped. Published blob files never are: they are written under
    // tmp/ or uploads/ (where alone a writer truncates them), verified, renamed into
    // place, and afterwards only ever unlinked, which leaves existing mappings intact.
    Ok(unsafe { memmap2::Mmap::map(file)? })
}

/// A blob being written.
///
/// Contract: every byte passed to [`write`](Self::write) is hashed as it is written, and
/// the file holds exactly the bytes hashed (a failed write is cut off again);
/// [`commit`](Self::commit) syncs the file, checks size and digest, and publishes it with
/// an atomic rename, so a reader of the published path never sees a partial or wrong
/// blob. Dropping a writer that was not committed (including after a failed commit)
/// deletes its temporary file, except the file of an upload ([`BlobStore::upload_file`]),
/// which stays until it is discarded or a commit is attempted.
#[derive(Debug)]
pub struct BlobWriter {
    file: File,
    tmp: PathBuf,
    dest: PathBuf,
    hasher: Option<Hasher>,
    expected: Digest,
    written: u64,
    committed: bool,
    /// The file outlives the writer (an upload's).
    keep: bool,
    /// A failed write could not be cut off: the file is not what was hashed.
    broken: bool,
    delta: Arc<AtomicI64>,
    /// Test hook: the next write stores this many of its bytes, then fails.
    #[cfg(test)]
    fail_after: Option<usize>,
}

impl BlobWriter {
    /// Appends `bytes`. On an error, whatever part of them reached the file is cut off
    /// again, and the writer stands where it stood before the call; if even that fails,
    /// it is [broken](Self::is_broken) and takes no more.
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        if self.broken {
            return Err(broken());
        }
        if let Err(e) = self.write_file(bytes) {
            let cut = self
                .file
                .set_len(self.written)
                .and_then(|()| self.file.seek(SeekFrom::Start(self.written)));
            if cut.is_err() {
                self.broken = true;
            }
            return Err(e.into());
        }
        if let Some(h) = self.hasher.as_mut() {
            h.update(bytes);
        }
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn write_file(&mut self, bytes: &[u8]) -> io::Result<()> {
        #[cfg(test)]
        if let Some(n) = self.fail_after.take() {
            self.file.write_all(&bytes[..n.min(bytes.len())])?;
            return Err(io::Error::other("injected write failure"));
        }
        self.file.write_all(bytes)
    }

    /// Whether a failed write left bytes in the file that could not be cut off: the
    /// writer refuses to write or commit.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Cuts the file back to its first `len` bytes (at most what it holds) and goes on
    /// writing after them. The hash state is rebuilt by reading those bytes again.
    pub fn truncate(&mut self, len: u64) -> Result<(), StoreError> {
        let len = len.min(self.file.metadata()?.len());
        self.file.set_len(len)?;
        let mut hasher = Hasher::new(self.expected.algorithm());
        let mut buf = vec![0u8; 1 << 20];
        let mut at = 0;
        while at < len {
            let n = (len - at).min(buf.len() as u64) as usize;
            self.file.read_exact_at(&mut buf[..n], at)?;
            hasher.update(&buf[..n]);
            at += n as u64;
        }
        self.file.seek(SeekFrom::Start(len))?;
        self.hasher = Some(hasher);
        self.written = len;
        self.broken = false;
        Ok(())
    }

    /// Flushes the bytes written so far to disk (before telling a client they are kept).
    pub fn sync(&self) -> Result<(), StoreError> {
        Ok(self.file.sync_data()?)
    }

    /// Removes the file, an upload's too.
    pub fn discard(mut self) {
        self.keep = false;
    }

    /// How many bytes have been written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// A second handle on the file being written, for readers that serve the bytes
    /// written so far (with positional reads) while the blob is still arriving. It stays
    /// valid after the blob is published or discarded.
    pub fn reader(&self) -> Result<File, StoreError> {
        Ok(File::open(&self.tmp)?)
    }

    /// Verifies the bytes written against `digest` and publishes them under it (see
    /// [`BlobStore::upload`]), durably: when it returns, the blob survives a power loss.
    /// A digest of another algorithm than sha256 is checked by reading the file again.
    pub fn commit_as(
        mut self,
        store: &BlobStore,
        digest: &Digest,
        expected_size: Option<u64>,
    ) -> Result<u64, StoreError> {
        // Whatever happens now, an upload's file is published or removed.
        self.keep = false;
        if self.broken {
            return Err(broken());
        }
        if digest.algorithm() != self.expected.algorithm() {
            let mut hasher = Hasher::new(digest.algorithm());
            let mut reader = File::open(&self.tmp)?;
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                let n = io::Read::read(&mut reader, &mut buf)?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
            }
            self.hasher = Some(hasher);
        }
        self.expected = digest.clone();
        self.dest = store.path(digest);
        self.publish(expected_size, Some(store))
    }

    /// Verifies and publishes the blob. `expected_size`, when known, must match too.
    /// On any error nothing is published and the temporary file is removed.
    pub fn commit(self, expected_size: Option<u64>) -> Result<u64, StoreError> {
        self.publish(expected_size, None)
    }

    /// [`commit`](Self::commit); with `durable` (the store), the rename is synced too.
    fn publish(
        mut self,
        expected_size: Option<u64>,
        durable: Option<&BlobStore>,
    ) -> Result<u64, StoreError> {
        if self.broken {
            return Err(broken());
        }
        if let Some(size) = expected_size {
            if size != self.written {
                return Err(StoreError::SizeMismatch {
                    expected: size,
                    actual: self.written,
                });
            }
        }
        let actual = self
            .hasher
            .take()
            .expect("hasher present until commit")
            .finish();
        if actual != self.expected {
            return Err(StoreError::DigestMismatch {
                expected: self.expected.clone(),
                actual,
            });
        }
        self.file.sync_data()?;
        let parent = self.dest.parent().unwrap_or(Path::new("."));
        let new_shard = !parent.exists();
        fs::create_dir_all(parent)?;
        let replaced = fs::metadata(&self.dest).map(|m| m.len()).unwrap_or(0);
        fs::rename(&self.tmp, &self.dest)?;
        self.committed = true;
        self.delta
            .fetch_add(self.written as i64 - replaced as i64, Ordering::Relaxed);
        if let Some(store) = durable {
            // The rename is a change of the shard directory; a new shard is a change of
            // the algorithm directory, and a new algorithm directory one of `blobs/`.
            let dirs = if new_shard { 3 } else { 1 };
            for dir in parent.ancestors().take(dirs) {
                File::open(dir)?.sync_all()?;
                #[cfg(test)]
                store.dir_syncs.fetch_add(1, Ordering::Relaxed);
            }
            #[cfg(not(test))]
            let _ = store;
        }
        Ok(self.written)
    }
}

fn broken() -> StoreError {
    io::Error::other("an earlier write failed and could not be undone").into()
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if !self.committed && !self.keep {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn store() -> (tempfile::TempDir, BlobStore) {
        let dir = tempfile::tempdir().unwrap();
        let s = BlobStore::open(dir.path()).unwrap();
        (dir, s)
    }

    fn tmp_is_empty(dir: &Path) -> bool {
        fs::read_dir(dir.join("tmp")).unwrap().next().is_none()
    }

    /// Right after a blob is written its name is in the kernel's cache, so it opens
    /// without the blocking pool, with the same size and bytes as `open_blob` gives; a
    /// blob never stored is not found, by either way.
    #[test]
    fn a_blob_just_written_opens_without_blocking() {
        let (_dir, s) = store();
        let d = Digest::sha256_of(b"hello world");
        let mut w = s.writer(&d).unwrap();
        w.write(b"hello world").unwrap();
        w.commit(Some(11)).unwrap();
        let blob = s
            .open_blob_if_cached(&d)
            .expect("the name just written is cached (Linux 5.12 or later)")
            .unwrap()
            .expect("the blob is stored");
        assert_eq!(blob.size(), 11);
        let mut buf = vec![0; 11];
        blob.file().read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(buf, b"hello world");
        let missing = Digest::sha256_of(b"never stored");
        assert!(s.open_blob(&missing).unwrap().is_none());
        assert!(
            !matches!(s.open_blob_if_cached(&missing), Some(Ok(Some(_)))),
            "a blob never stored was found"
        );
    }

    #[test]
    fn a_verified_blob_is_published() {
        let (dir, s) = store();
        let d = Digest::sha256_of(b"hello world");
        let mut w = s.writer(&d).unwrap();
        w.write(b"hello ").unwrap();
        assert_eq!(s.stat(&d).unwrap(), None, "visible before commit");
        w.write(b"world").unwrap();
        assert_eq!(w.commit(Some(11)).unwrap(), 11);
        assert_eq!(s.stat(&d).unwrap(), Some(11));
        let blob = s.open_blob(&d).unwrap().unwrap();
        let mut buf = vec![0; blob.size() as usize];
        blob.file().read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(buf, b"hello world");
        assert!(tmp_is_empty(dir.path()));
    }

    #[test]
    fn wrong_bytes_are_never_published() {
        let (dir, s) = store();
        let d = Digest::sha256_of(b"right");
        let mut w = s.writer(&d).unwrap();
        w.write(b"wrong").unwrap();
        match w.commit(None) {
            Err(StoreError::DigestMismatch { expected, actual }) => {
                assert_eq!(expected, d);
                assert_eq!(actual, Digest::sha256_of(b"wrong"));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(s.stat(&d).unwrap(), None);
        assert!(tmp_is_empty(dir.path()));
    }

    #[test]
    fn a_short_blob_is_never_published() {
        let (dir, s) = store();
        let d = Digest::sha256_of(b"right");
        let mut w = s.writer(&d).unwrap();
        w.write(b"right").unwrap();
        assert!(matches!(
            w.commit(Some(6)),
            Err(StoreError::SizeMismatch {
                expected: 6,
                actual: 5
            })
        ));
        assert_eq!(s.stat(&d).unwrap(), None);
        assert!(tmp_is_empty(dir.path()));
    }

    #[test]
    fn a_dropped_writer_leaves_nothing() {
        let (dir, s) = store();
        let d = Digest::sha256_of(b"x");
        let mut w = s.writer(&d).unwrap();
        w.write(b"x").unwrap();
        let reader = w.reader().unwrap();
        drop(w);
        assert!(tmp_is_empty(dir.path()));
        assert_eq!(s.stat(&d).unwrap(), None);
        // A reader opened during the write still reads what was written.
        let mut b = [0u8; 1];
        reader.read_exact_at(&mut b, 0).unwrap();
        assert_eq!(&b, b"x");
    }

    #[test]
    fn leftovers_of_a_crash_are_removed_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let s = BlobStore::open(dir.path()).unwrap();
        let w = s.writer(&Digest::sha256_of(b"x")).unwrap();
        std::mem::forget(w);
        assert!(!tmp_is_empty(dir.path()));
        BlobStore::open(dir.path()).unwrap();
        assert!(tmp_is_empty(dir.path()));
    }

    #[test]
    fn mapped_blobs_read_back_and_survive_deletion() {
        let (_dir, s) = store();
        let d = Digest::sha256_of(b"mapped bytes");
        let mut w = s.writer(&d).unwrap();
        w.write(b"mapped bytes").unwrap();
        w.commit(None).unwrap();
        let blob = s.open_blob(&d).unwrap().unwrap();
        s.delete(&d).unwrap();
        assert_eq!(&blob.map().unwrap()[..], b"mapped bytes");
        assert!(s.open_blob(&d).unwrap().is_none());
        let empty = Digest::sha256_of(b"");
        s.writer(&empty).unwrap().commit(Some(0)).unwrap();
        let blob = s.open_blob(&empty).unwrap().unwrap();
        assert!(blob.map().unwrap().is_empty());
    }

    #[test]
    fn a_push_syncs_its_directory_and_a_fill_does_not() {
        let (_dir, s) = store();
        let d = Digest::sha256_of(b"fill");
        let mut w = s.writer(&d).unwrap();
        w.write(b"fill").unwrap();
        w.commit(None).unwrap();
        assert_eq!(s.dir_syncs.load(Ordering::Relaxed), 0);
        // The first push into a new shard syncs the shard, sha256/ and blobs/.
        let mut w = s.upload().unwrap();
        w.write(b"pushed").unwrap();
        let pushed = Digest::sha256_of(b"pushed");
        w.commit_as(&s, &pushed, Some(6)).unwrap();
        assert_eq!(s.dir_syncs.load(Ordering::Relaxed), 3);
        assert_eq!(s.stat(&pushed).unwrap(), Some(6));
        // Pushing it again (the shard exists): only the shard.
        let mut w = s.upload().unwrap();
        w.write(b"pushed").unwrap();
        w.commit_as(&s, &pushed, None).unwrap();
        assert_eq!(s.dir_syncs.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn a_blob_being_read_is_not_deleted_by_eviction() {
        let (_dir, s) = store();
        let d = Digest::sha256_of(b"in use");
        let mut w = s.writer(&d).unwrap();
        w.write(b"in use").unwrap();
        w.commit(None).unwrap();
        assert_eq!(s.bytes_delta(), 6);
        let reader = s.open_blob(&d).unwrap().unwrap();
        let second = s.open_blob(&d).unwrap().unwrap();
        assert!(s.is_pinned(&d));
        assert_eq!(s.delete_unpinned(&d).unwrap(), None);
        drop(reader);
        assert_eq!(s.delete_unpinned(&d).unwrap(), None, "one reader is left");
        drop(second);
        assert!(!s.is_pinned(&d));
        assert_eq!(s.delete_unpinned(&d).unwrap(), Some(6));
        assert_eq!(s.stat(&d).unwrap(), None);
        assert_eq!(s.bytes_delta(), 0);
        let (available, total) = s.filesystem().unwrap();
        assert!(total > 0 && available <= total);
    }

    fn uploads(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir.join("uploads"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn an_upload_file_outlives_its_writer_and_the_store_and_resumes() {
        let (dir, s) = store();
        let mut w = s.upload_file("u1").unwrap();
        w.write(b"hello ").unwrap();
        w.write(b"world, and more").unwrap();
        drop(w);
        drop(s);
        let s = BlobStore::open(dir.path()).unwrap();
        assert_eq!(uploads(dir.path()), ["u1"], "opening removed the upload");
        // Resumed after its first 6 bytes: the rest is cut off and the hash rebuilt.
        let mut w = s.resume_upload_file("u1", 6).unwrap().unwrap();
        assert_eq!(w.written(), 6);
        w.write(b"world").unwrap();
        let d = Digest::sha256_of(b"hello world");
        assert_eq!(w.commit_as(&s, &d, Some(11)).unwrap(), 11);
        assert_eq!(s.stat(&d).unwrap(), Some(11));
        assert!(uploads(dir.path()).is_empty(), "the upload's file stayed");
        // Gone, or shorter than asked: nothing to resume.
        assert!(s.resume_upload_file("u1", 0).unwrap().is_none());
        let mut w = s.upload_file("u2").unwrap();
        w.write(b"abc").unwrap();
        drop(w);
        assert!(s.resume_upload_file("u2", 4).unwrap().is_none());
        assert!(s.upload_file("u2").is_err(), "an upload file was replaced");
        for bad in ["", "../u2", "a/b", ".hidden"] {
            assert!(s.upload_file(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn an_upload_file_goes_with_discard_or_a_failed_commit() {
        let (dir, s) = store();
        let mut w = s.upload_file("gone").unwrap();
        w.write(b"x").unwrap();
        w.discard();
        let mut w = s.upload_file("wrong").unwrap();
        w.write(b"x").unwrap();
        assert!(w.commit_as(&s, &Digest::sha256_of(b"y"), None).is_err());
        assert!(uploads(dir.path()).is_empty());
    }

    #[test]
    fn a_failed_write_is_cut_off_and_the_writer_goes_on() {
        let (dir, s) = store();
        let mut w = s.upload_file("torn").unwrap();
        w.write(b"kept ").unwrap();
        w.fail_after = Some(3);
        assert!(w.write(b"lost bytes").is_err());
        assert_eq!(w.written(), 5);
        assert_eq!(fs::read(dir.path().join("uploads/torn")).unwrap(), b"kept ");
        w.write(b"then these").unwrap();
        let d = Digest::sha256_of(b"kept then these");
        assert_eq!(w.commit_as(&s, &d, None).unwrap(), 15);
        let blob = s.open_blob(&d).unwrap().unwrap();
        let mut buf = vec![0; 15];
        blob.file().read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(buf, b"kept then these");
    }

    #[test]
    fn delete_is_idempotent() {
        let (_dir, s) = store();
        let d = Digest::sha256_of(b"z");
        let mut w = s.writer(&d).unwrap();
        w.write(b"z").unwrap();
        w.commit(None).unwrap();
        s.delete(&d).unwrap();
        s.delete(&d).unwrap();
        assert_eq!(s.stat(&d).unwrap(), None);
    }
}
