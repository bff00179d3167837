//! When content was last used, tracked cheaply.
//!
//! Every hit of a blob or a manifest (by tag, by digest, or as an index's child) calls
//! [`AccessLog::touch`], which only updates a map in memory. [`AccessLog::flush`] writes
//! what changed since the last flush to the `last_access` column family in one batch, so
//! the request path never waits for a database write. What a crash loses is at most one
//! flush interval of access times, which only makes content look older than it is to
//! eviction and retention.
//!
//! Times are kept to the second: a digest hit many times in one second is one update.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::oci::Digest;
use crate::{MetaStore, StoreError};

/// Access times not yet written, by digest (milliseconds since the Unix epoch).
#[derive(Debug, Default)]
pub struct AccessLog {
    pending: Mutex<HashMap<Digest, u64>>,
}

/// Access times are rounded down to this many milliseconds.
const RESOLUTION_MS: u64 = 1000;

impl AccessLog {
    /// Records that `digest` was used at `now_ms`.
    pub fn touch(&self, digest: &Digest, now_ms: u64) {
        let at = now_ms - now_ms % RESOLUTION_MS;
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        match pending.get_mut(digest) {
            Some(t) => *t = (*t).max(at),
            None => {
                pending.insert(digest.clone(), at);
            }
        }
    }

    /// The last use of `digest` known, pending or written.
    pub fn last(&self, meta: &MetaStore, digest: &Digest) -> Result<Option<u64>, StoreError> {
        let pending = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(digest)
            .copied();
        let stored = meta.last_access(digest)?;
        Ok(pending.max(stored))
    }

    /// The access times not yet written.
    pub fn pending(&self) -> HashMap<Digest, u64> {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Writes the pending access times (keeping a later one already stored). On failure
    /// they stay pending for the next flush. Returns how many were written.
    pub fn flush(&self, meta: &MetaStore) -> Result<usize, StoreError> {
        let taken = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
        if taken.is_empty() {
            return Ok(0);
        }
        match meta.put_last_accesses(&taken) {
            Ok(()) => Ok(taken.len()),
            Err(e) => {
                let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
                for (d, t) in taken {
                    let slot = pending.entry(d).or_insert(t);
                    *slot = (*slot).max(t);
                }
                Err(e)
            }
        }
    }

    /// Forgets a pending access of `digest` (it was evicted or deleted).
    pub fn forget(&self, digest: &Digest) {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(digest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn touches_are_kept_in_memory_until_flushed() {
        let dir = tempfile::tempdir().unwrap();
        let meta = MetaStore::open(dir.path()).unwrap();
        let log = AccessLog::default();
        let d = Digest::sha256_of(b"layer");
        log.touch(&d, 5_500);
        log.touch(&d, 3_000);
        assert_eq!(
            meta.last_access(&d).unwrap(),
            None,
            "written before a flush"
        );
        assert_eq!(log.last(&meta, &d).unwrap(), Some(5_000));
        assert_eq!(log.flush(&meta).unwrap(), 1);
        assert_eq!(meta.last_access(&d).unwrap(), Some(5_000));
        assert_eq!(log.flush(&meta).unwrap(), 0);
        // A later flush never moves a time back.
        log.touch(&d, 1_000);
        log.flush(&meta).unwrap();
        assert_eq!(meta.last_access(&d).unwrap(), Some(5_000));
        log.touch(&d, 9_000);
        log.flush(&meta).unwrap();
        assert_eq!(log.last(&meta, &d).unwrap(), Some(9_000));
    }
}
