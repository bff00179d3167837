//! Coalescing: however many requests miss on the same key at once, one upstream fetch.
//!
//! Two shapes:
//! - [`FillLock`] for values fetched whole (manifests, tag revalidations): the first caller
//!   becomes the writer and runs the fetch in a task of its own; every caller that arrives
//!   while it runs becomes a reader and awaits the same outcome. Every waiter is told the
//!   real outcome, success or error, and the fetch finishes even if all of them go away.
//! - [`BlobFill`] for blobs, which are streamed: the fill publishes its progress (bytes
//!   written to the temporary file so far) and readers serve those bytes as they arrive,
//!   with positional reads on a shared handle of the file being written. The last byte of
//!   a blob is released only once the whole blob is verified, so a client never receives a
//!   complete response with wrong bytes.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::future::Future;
use std::hash::Hash;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use tokio::sync::watch;

use berth_store::oci::Digest;

use crate::CacheError;

/// Whether a caller did the fetch or joined one in progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Writer,
    Reader,
}

type Outcome<V> = Option<Result<V, Arc<CacheError>>>;

/// Coalesces concurrent fetches of whole values by key.
pub struct FillLock<K, V> {
    inflight: Arc<Mutex<HashMap<K, watch::Receiver<Outcome<V>>>>>,
}

impl<K, V> Default for FillLock<K, V> {
    fn default() -> Self {
        FillLock {
            inflight: Arc::new(Mutex::new(HashMap::new())),
        }
    }
}

impl<K, V> FillLock<K, V>
where
    K: Eq + Hash + Clone + Send + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Runs `fetch` for `key` unless a fetch for it is already running, in which case the
    /// caller waits for that one. `fetch` runs in its own task and outlives the caller.
    pub async fn run<F>(&self, key: K, fetch: F) -> (Result<V, Arc<CacheError>>, Role)
    where
        F: Future<Output = Result<V, CacheError>> + Send + 'static,
    {
        let (mut rx, role) = {
            let mut map = self.inflight.lock().expect("fill lock");
            match map.get(&key) {
                Some(rx) => (rx.clone(), Role::Reader),
                None => {
                    let (tx, rx) = watch::channel(None);
                    map.insert(key.clone(), rx.clone());
                    let entry = Entry {
                        inflight: self.inflight.clone(),
                        key,
                        rx: rx.clone(),
                    };
                    tokio::spawn(async move {
                        let result = fetch.await.map_err(Arc::new);
                        // Remove first: a caller that arrives after this sees the stored
                        // value, not a finished fill. (If `fetch` panics, dropping
                        // `entry` removes it too, and the waiters are told it ended.)
                        drop(entry);
                        let _ = tx.send(Some(result));
                    });
                    (rx, Role::Writer)
                }
            }
        };
        let result = match rx.wait_for(Option::is_some).await {
            Ok(v) => v.clone().expect("waited for Some"),
            Err(_) => Err(Arc::new(CacheError::Internal(
                "the fetch this request was waiting for ended without an outcome".into(),
            ))),
        };
        (result, role)
    }
}

/// A running fetch's place in a [`FillLock`]; dropping it (normally or while a panic
/// unwinds) removes the entry, unless another fetch has taken the key since.
struct Entry<K: Eq + Hash, V> {
    inflight: Arc<Mutex<HashMap<K, watch::Receiver<Outcome<V>>>>>,
    key: K,
    rx: watch::Receiver<Outcome<V>>,
}

impl<K: Eq + Hash, V> Drop for Entry<K, V> {
    fn drop(&mut self) {
        if let Ok(mut map) = self.inflight.lock() {
            if map
                .get(&self.key)
                .is_some_and(|rx| rx.same_channel(&self.rx))
            {
                map.remove(&self.key);
            }
        }
    }
}

/// The state of a streaming blob fill.
#[derive(Clone, Debug)]
pub enum FillState {
    /// Waiting for the upstream's response.
    Starting,
    /// Bytes `0..written` of `size` are in the temporary file.
    Streaming {
        size: u64,
        written: u64,
    },
    /// The blob is verified and published.
    Done {
        size: u64,
    },
    Failed(Arc<CacheError>),
}

/// One blob being fetched from upstream into the store.
#[derive(Debug)]
pub struct BlobFill {
    pub digest: Digest,
    /// The repository (`upstream/repo`) whose request started the fill: the upstream
    /// serves the blob to it, which proves that repository has it.
    pub origin: String,
    state: watch::Receiver<FillState>,
    file: Mutex<Option<Arc<File>>>,
    /// Aligned pieces recently read from the file, shared by all readers: a herd of
    /// clients reading one fill in step costs one disk read and one buffer per piece.
    recent: Mutex<VecDeque<(u64, Bytes)>>,
}

/// The size of the aligned pieces readers share.
const SHARED_PIECE: u64 = 128 * 1024;
/// How many shared pieces a fill keeps.
const SHARED_PIECES: usize = 64;

/// The writing side of a [`BlobFill`], held by the fill task.
pub struct FillProgress {
    tx: watch::Sender<FillState>,
    fill: Arc<BlobFill>,
}

impl FillProgress {
    /// The upstream answered: `size` bytes will be written to `file`.
    pub fn streaming(&self, size: u64, file: File) {
        *self.fill.file.lock().expect("fill file") = Some(Arc::new(file));
        let _ = self.tx.send(FillState::Streaming { size, written: 0 });
    }

    pub fn written(&self, n: u64) {
        self.tx.send_modify(|s| {
            if let FillState::Streaming { written, .. } = s {
                *written = n;
            }
        });
    }

    pub fn finish(&self, result: Result<u64, CacheError>) {
        let _ = self.tx.send(match result {
            Ok(size) => FillState::Done { size },
            Err(e) => FillState::Failed(Arc::new(e)),
        });
    }

    /// The fill this progress drives.
    pub fn fill(&self) -> &Arc<BlobFill> {
        &self.fill
    }
}

impl Drop for FillProgress {
    /// A fill dropped before it finished (its task panicked or was cancelled) fails its
    /// readers rather than leaving them waiting.
    fn drop(&mut self) {
        self.tx.send_if_modified(|s| {
            if matches!(s, FillState::Starting | FillState::Streaming { .. }) {
                *s = FillState::Failed(Arc::new(ended()));
                true
            } else {
                false
            }
        });
    }
}

impl BlobFill {
    pub fn state(&self) -> FillState {
        self.state.borrow().clone()
    }

    /// Waits until the fill is past [`FillState::Starting`] and returns the blob's size.
    pub async fn size(&self) -> Result<u64, Arc<CacheError>> {
        let mut rx = self.state.clone();
        let state = rx
            .wait_for(|s| !matches!(s, FillState::Starting))
            .await
            .map(|s| s.clone())
            .unwrap_or_else(|_| FillState::Failed(Arc::new(ended())));
        match state {
            FillState::Streaming { size, .. } | FillState::Done { size } => Ok(size),
            FillState::Failed(e) => Err(e),
            FillState::Starting => unreachable!("waited past Starting"),
        }
    }

    /// Waits until the fill is published (or failed).
    pub async fn done(&self) -> Result<u64, Arc<CacheError>> {
        let mut rx = self.state.clone();
        let state = rx
            .wait_for(|s| matches!(s, FillState::Done { .. } | FillState::Failed(_)))
            .await
            .map(|s| s.clone())
            .unwrap_or_else(|_| FillState::Failed(Arc::new(ended())));
        match state {
            FillState::Done { size } => Ok(size),
            FillState::Failed(e) => Err(e),
            _ => unreachable!("waited for an end"),
        }
    }

    /// Bytes from `offset` on, of those readable now (`..available` of `size`): the rest
    /// of a shared aligned piece if that piece is wholly readable, otherwise what there is.
    async fn read(&self, offset: u64, available: u64, size: u64) -> Result<Bytes, CacheError> {
        let file = self.file.lock().expect("fill file").clone();
        let Some(file) = file else {
            return Err(ended());
        };
        let base = offset - offset % SHARED_PIECE;
        let piece_end = (base + SHARED_PIECE).min(size);
        if piece_end > available {
            // The piece is still arriving: read what there is, unshared.
            let len = (available - offset).min(SHARED_PIECE) as usize;
            return read_chunk(file, offset, len).await;
        }
        let start = (offset - base) as usize;
        let cached = {
            let recent = self.recent.lock().expect("shared pieces");
            recent
                .iter()
                .find(|(b, _)| *b == base)
                .map(|(_, p)| p.clone())
        };
        let piece = match cached {
            Some(p) => p,
            None => {
                let p = read_chunk(file, base, (piece_end - base) as usize).await?;
                let mut recent = self.recent.lock().expect("shared pieces");
                if !recent.iter().any(|(b, _)| *b == base) {
                    if recent.len() == SHARED_PIECES {
                        recent.pop_front();
                    }
                    recent.push_back((base, p.clone()));
                }
                p
            }
        };
        Ok(piece.slice(start..))
    }

    /// A body that streams the whole blob as it arrives.
    pub fn reader(self: &Arc<Self>) -> FillReader {
        FillReader {
            fill: self.clone(),
            rx: self.state.clone(),
            offset: 0,
        }
    }
}

fn ended() -> CacheError {
    CacheError::Internal("the blob fill ended without an outcome".into())
}

/// Coalesces blob fills by digest.
#[derive(Default)]
pub struct BlobFills {
    inflight: Mutex<HashMap<Digest, Arc<BlobFill>>>,
}

impl BlobFills {
    /// Joins the fill of `digest` in progress, or registers a new one (for `origin`, the
    /// repository asking) and returns its writing side, which the caller must drive to an
    /// end in a task of its own.
    pub fn join_or_start(
        &self,
        digest: &Digest,
        origin: &str,
    ) -> (Arc<BlobFill>, Option<FillProgress>) {
        let mut map = self.inflight.lock().expect("blob fills");
        if let Some(fill) = map.get(digest) {
            return (fill.clone(), None);
        }
        let (tx, rx) = watch::channel(FillState::Starting);
        let fill = Arc::new(BlobFill {
            digest: digest.clone(),
            origin: origin.to_owned(),
            state: rx,
            file: Mutex::new(None),
            recent: Mutex::new(VecDeque::with_capacity(SHARED_PIECES)),
        });
        map.insert(digest.clone(), fill.clone());
        (fill.clone(), Some(FillProgress { tx, fill }))
    }

    /// Forgets `fill` (if it is still the one registered for its digest); later requests
    /// look in the store again.
    pub fn remove(&self, fill: &Arc<BlobFill>) {
        if let Ok(mut map) = self.inflight.lock() {
            if map.get(&fill.digest).is_some_and(|f| Arc::ptr_eq(f, fill)) {
                map.remove(&fill.digest);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.inflight.lock().expect("blob fills").len()
    }

    /// The digests being filled now.
    pub fn digests(&self) -> std::collections::HashSet<Digest> {
        self.inflight
            .lock()
            .expect("blob fills")
            .keys()
            .cloned()
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Reads `len` bytes at `offset` of `file` on the blocking pool.
async fn read_chunk(file: Arc<File>, offset: u64, len: usize) -> Result<Bytes, CacheError> {
    tokio::task::spawn_blocking(move || {
        let mut buf = BytesMut::zeroed(len);
        let mut filled = 0;
        while filled < len {
            let n = file.read_at(&mut buf[filled..], offset + filled as u64)?;
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "blob file is shorter than its size",
                ));
            }
            filled += n;
        }
        Ok(buf.freeze())
    })
    .await
    .map_err(|e| CacheError::Internal(format!("read task failed: {e}")))?
    .map_err(|e| CacheError::Store(e.to_string()))
}

/// Streams a blob from a fill in progress. The final byte is held back until the fill has
/// verified and published the blob; if the fill fails, the reader fails.
pub struct FillReader {
    fill: Arc<BlobFill>,
    rx: watch::Receiver<FillState>,
    offset: u64,
}

impl FillReader {
    /// The next chunk, `None` at the end of a verified blob.
    pub async fn next(&mut self) -> Result<Option<Bytes>, CacheError> {
        let Some((available, size)) = self.wait().await? else {
            return Ok(None);
        };
        let chunk = self.fill.read(self.offset, available, size).await?;
        self.offset += chunk.len() as u64;
        Ok(Some(chunk))
    }

    /// The next span that may be sent, as `(file, offset, length)`: everything readable
    /// now, to be sent straight from the file (with `sendfile`, without a buffer). `None`
    /// at the end of a verified blob. The same rule holds as for [`next`](Self::next):
    /// the final byte comes only once the blob is verified.
    pub async fn next_span(&mut self) -> Result<Option<(Arc<File>, u64, u64)>, CacheError> {
        let Some((available, _)) = self.wait().await? else {
            return Ok(None);
        };
        let file = self.fill.file.lock().expect("fill file").clone();
        let file = file.ok_or_else(ended)?;
        let span = (file, self.offset, available - self.offset);
        self.offset = available;
        Ok(Some(span))
    }

    /// Waits until there are bytes past this reader's offset that it may send, and
    /// returns how far they go and the blob's size; `None` at the end of a verified blob.
    async fn wait(&mut self) -> Result<Option<(u64, u64)>, CacheError> {
        loop {
            let state = self.rx.borrow_and_update().clone();
            let (size, available) = match state {
                FillState::Starting => (None, 0),
                FillState::Streaming { size, written } => {
                    (Some(size), written.min(size.saturating_sub(1)))
                }
                FillState::Done { size } => (Some(size), size),
                FillState::Failed(e) => return Err(CacheError::FillFailed(e)),
            };
            if let Some(size) = size {
                if self.offset >= size && matches!(self.rx.borrow().clone(), FillState::Done { .. })
                {
                    return Ok(None);
                }
                if self.offset < available {
                    return Ok(Some((available, size)));
                }
            }
            if self.rx.changed().await.is_err() {
                // The fill task is gone; its last state decides.
                if !matches!(self.rx.borrow().clone(), FillState::Done { .. }) {
                    return Err(ended());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_fetch_for_many_waiters_and_all_see_the_outcome() {
        let lock: Arc<FillLock<String, u32>> = Arc::new(FillLock::default());
        let calls = Arc::new(AtomicUsize::new(0));
        let barrier = Arc::new(tokio::sync::Barrier::new(20));
        let mut tasks = Vec::new();
        for _ in 0..20 {
            let (lock, calls, barrier) = (lock.clone(), calls.clone(), barrier.clone());
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                lock.run("k".to_string(), async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    Ok(7)
                })
                .await
            }));
        }
        let mut writers = 0;
        for t in tasks {
            let (v, role) = t.await.unwrap();
            assert_eq!(*v.as_ref().unwrap(), 7);
            writers += (role == Role::Writer) as usize;
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(writers, 1);
    }

    #[tokio::test]
    async fn errors_reach_every_waiter_and_the_next_call_retries() {
        let lock: Arc<FillLock<u8, u8>> = Arc::new(FillLock::default());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let l2 = lock.clone();
        let first = tokio::spawn(async move {
            l2.run(1, async move {
                let _ = rx.await;
                Err(CacheError::NotFound)
            })
            .await
        });
        tokio::task::yield_now().await;
        let l3 = lock.clone();
        let second = tokio::spawn(async move { l3.run(1, async { Ok(1) }).await });
        tokio::task::yield_now().await;
        tx.send(()).unwrap();
        let (a, _) = first.await.unwrap();
        let (b, role) = second.await.unwrap();
        assert!(matches!(*a.unwrap_err(), CacheError::NotFound));
        assert_eq!(role, Role::Reader);
        assert!(matches!(*b.unwrap_err(), CacheError::NotFound));
        let (c, role) = lock.run(1, async { Ok(2) }).await;
        assert_eq!((c.unwrap(), role), (2, Role::Writer));
    }

    #[tokio::test]
    async fn a_panicking_fetch_fails_its_waiters_and_frees_the_key() {
        let lock: Arc<FillLock<u8, u8>> = Arc::new(FillLock::default());
        let (result, _) = lock
            .run(1, async {
                if true {
                    panic!("fetch panicked");
                }
                Ok(0)
            })
            .await;
        assert!(matches!(*result.unwrap_err(), CacheError::Internal(_)));
        let (again, role) = lock.run(1, async { Ok(5) }).await;
        assert_eq!((again.unwrap(), role), (5, Role::Writer));
    }

    #[tokio::test]
    async fn a_dropped_blob_fill_fails_its_readers() {
        let fills = BlobFills::default();
        let d = Digest::sha256_of(b"abcd");
        let (fill, progress) = fills.join_or_start(&d, "docker.io/library/a");
        let progress = progress.unwrap();
        let (_tmp, file) = temp_file_with(b"ab");
        progress.streaming(4, file);
        progress.written(2);
        let task = tokio::spawn(drain(fill.reader()));
        drop(progress);
        assert!(task.await.unwrap().is_err());
        fills.remove(&fill);
        assert!(fills.is_empty());
    }

    #[tokio::test]
    async fn a_fetch_outlives_a_caller_that_goes_away() {
        let lock: Arc<FillLock<u8, u8>> = Arc::new(FillLock::default());
        let done = Arc::new(AtomicUsize::new(0));
        let d = done.clone();
        let l = lock.clone();
        let caller = tokio::spawn(async move {
            l.run(1, async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                d.fetch_add(1, Ordering::SeqCst);
                Ok(1)
            })
            .await
        });
        tokio::task::yield_now().await;
        caller.abort();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(done.load(Ordering::SeqCst), 1);
    }

    fn temp_file_with(bytes: &[u8]) -> (tempfile::NamedTempFile, File) {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut f, bytes).unwrap();
        let r = File::open(f.path()).unwrap();
        (f, r)
    }

    async fn drain(mut r: FillReader) -> Result<Vec<u8>, CacheError> {
        let mut out = Vec::new();
        while let Some(c) = r.next().await? {
            out.extend_from_slice(&c);
        }
        Ok(out)
    }

    #[tokio::test]
    async fn readers_get_bytes_as_they_arrive_but_the_last_only_when_verified() {
        let fills = BlobFills::default();
        let d = Digest::sha256_of(b"abcd");
        let (fill, progress) = fills.join_or_start(&d, "docker.io/library/a");
        let progress = progress.unwrap();
        let (again, none) = fills.join_or_start(&d, "docker.io/library/a");
        assert!(none.is_none() && Arc::ptr_eq(&fill, &again));
        let (_tmp, file) = temp_file_with(b"abcd");
        progress.streaming(4, file);
        progress.written(4);
        let mut r = fill.reader();
        assert_eq!(&r.next().await.unwrap().unwrap()[..], b"abc");
        let pending = tokio::time::timeout(Duration::from_millis(50), r.next()).await;
        assert!(pending.is_err(), "last byte released before verification");
        progress.finish(Ok(4));
        assert_eq!(&r.next().await.unwrap().unwrap()[..], b"d");
        assert!(r.next().await.unwrap().is_none());
        assert_eq!(drain(fill.reader()).await.unwrap(), b"abcd");
    }

    #[tokio::test]
    async fn spans_cover_what_is_written_but_the_last_byte_only_when_verified() {
        let fills = BlobFills::default();
        let d = Digest::sha256_of(b"abcdef");
        let (fill, progress) = fills.join_or_start(&d, "docker.io/library/a");
        let progress = progress.unwrap();
        let (_tmp, file) = temp_file_with(b"abcdef");
        progress.streaming(6, file);
        progress.written(2);
        let mut r = fill.reader();
        let (_, offset, len) = r.next_span().await.unwrap().unwrap();
        assert_eq!((offset, len), (0, 2));
        progress.written(6);
        let (file, offset, len) = r.next_span().await.unwrap().unwrap();
        assert_eq!(
            (offset, len),
            (2, 3),
            "the last byte came before verification"
        );
        let mut buf = [0u8; 3];
        file.read_exact_at(&mut buf, offset).unwrap();
        assert_eq!(&buf, b"cde");
        let pending = tokio::time::timeout(Duration::from_millis(50), r.next_span()).await;
        assert!(pending.is_err(), "last byte released before verification");
        progress.finish(Ok(6));
        let (_, offset, len) = r.next_span().await.unwrap().unwrap();
        assert_eq!((offset, len), (5, 1));
        assert!(r.next_span().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn readers_in_step_share_one_read_per_piece() {
        let fills = BlobFills::default();
        let bytes: Vec<u8> = (0..(3 * SHARED_PIECE + 5))
            .map(|i| (i % 251) as u8)
            .collect();
        let d = Digest::sha256_of(&bytes);
        let (fill, progress) = fills.join_or_start(&d, "docker.io/library/a");
        let progress = progress.unwrap();
        let (_tmp, file) = temp_file_with(&bytes);
        progress.streaming(bytes.len() as u64, file);
        progress.written(bytes.len() as u64);
        progress.finish(Ok(bytes.len() as u64));
        let (mut a, mut b) = (fill.reader(), fill.reader());
        let (first_a, first_b) = (
            a.next().await.unwrap().unwrap(),
            b.next().await.unwrap().unwrap(),
        );
        assert_eq!(first_a.len() as u64, SHARED_PIECE);
        assert_eq!(
            first_a.as_ptr(),
            first_b.as_ptr(),
            "the two readers did not share a piece"
        );
        let mut got = first_a.to_vec();
        while let Some(c) = a.next().await.unwrap() {
            got.extend_from_slice(&c);
        }
        assert_eq!(got, bytes);
        assert_eq!(
            drain(b).await.unwrap().len(),
            bytes.len() - SHARED_PIECE as usize
        );
    }

    #[tokio::test]
    async fn a_failed_fill_fails_its_readers() {
        let fills = BlobFills::default();
        let d = Digest::sha256_of(b"abcd");
        let (fill, progress) = fills.join_or_start(&d, "docker.io/library/a");
        let progress = progress.unwrap();
        let (_tmp, file) = temp_file_with(b"abcX");
        progress.streaming(4, file);
        progress.written(4);
        let reader = fill.reader();
        let task = tokio::spawn(drain(reader));
        tokio::time::sleep(Duration::from_millis(20)).await;
        progress.finish(Err(CacheError::DigestMismatch {
            expected: d.clone(),
            actual: Digest::sha256_of(b"abcX"),
        }));
        assert!(matches!(
            task.await.unwrap(),
            Err(CacheError::FillFailed(_))
        ));
        drop(progress);
        assert!(fill.done().await.is_err());
    }
}
