//! Blob upload sessions: started with `POST`, fed with `PATCH` (and the closing `PUT`),
//! streamed to a temporary file of the store while being hashed, and published only when
//! the digest the client names at the end matches.
//!
//! Sessions live in memory: an upload in progress does not survive a restart (its
//! temporary file is removed when the store is opened), and the client starts again.

use std::sync::Arc;
use std::time::Instant;

use berth_store::oci::Digest;
use berth_store::BlobWriter;

use crate::{Registry, RegistryError};

/// An upload, locked by the request feeding it.
pub type SharedUpload = Arc<tokio::sync::Mutex<Upload>>;

/// One upload in progress.
pub struct Upload {
    id: String,
    repo: String,
    writer: Option<BlobWriter>,
    /// The most bytes it may hold ([`crate::Options::max_upload_size`]).
    limit: u64,
    last_activity: Instant,
}

impl Upload {
    pub fn id(&self) -> &str {
        &self.id
    }

    /// How many bytes have been received.
    pub fn offset(&self) -> u64 {
        self.writer.as_ref().map_or(0, BlobWriter::written)
    }

    /// Checks that an upload of `total` bytes in all would be within the size limit
    /// ([`crate::Options::max_upload_size`]). Does no I/O; on an error the caller
    /// cancels the upload.
    pub fn check_fits(&self, total: u64) -> Result<(), RegistryError> {
        if total > self.limit {
            return Err(RegistryError::UploadTooLarge { limit: self.limit });
        }
        Ok(())
    }

    /// Appends `bytes` (a blocking file write). Bytes past the size limit are not
    /// written: the upload's file is removed and it takes no more.
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), RegistryError> {
        self.last_activity = Instant::now();
        if self.writer.is_none() {
            return Err(RegistryError::UploadUnknown(self.id.clone()));
        }
        if let Err(e) = self.check_fits(self.offset().saturating_add(bytes.len() as u64)) {
            self.writer = None;
            return Err(e);
        }
        let writer = self
            .writer
            .as_mut()
            .ok_or_else(|| RegistryError::UploadUnknown(self.id.clone()))?;
        if let Err(e) = writer.write(bytes) {
            // Part of the chunk may be in the file but not in the hash: the upload cannot
            // go on, and its file goes with it.
            self.writer = None;
            return Err(e.into());
        }
        Ok(())
    }

    /// Checks that a chunk claiming to start at `start` continues the upload.
    pub fn check_chunk_start(&self, start: u64) -> Result<(), RegistryError> {
        let expected = self.offset();
        if start != expected {
            return Err(RegistryError::ChunkOutOfOrder {
                expected,
                got: start,
            });
        }
        Ok(())
    }
}

/// A fresh upload id: 128 random bits in hex.
fn new_id() -> Result<String, RegistryError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes)
        .map_err(|e| std::io::Error::other(format!("no system randomness: {e}")))?;
    Ok(hex::encode(bytes))
}

fn valid_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

impl Registry {
    /// Starts an upload into `repo`.
    pub fn start_upload(&self, repo: &str) -> Result<SharedUpload, RegistryError> {
        let limit = self.options.max_uploads;
        if self.uploads_in_progress() >= limit {
            return Err(RegistryError::TooManyUploads { limit });
        }
        let id = new_id()?;
        let upload = Arc::new(tokio::sync::Mutex::new(Upload {
            id: id.clone(),
            repo: repo.to_owned(),
            writer: Some(self.store.blobs.upload()?),
            limit: self.options.max_upload_size,
            last_activity: Instant::now(),
        }));
        self.uploads
            .lock()
            .expect("uploads")
            .insert(id, (repo.to_owned(), upload.clone()));
        Ok(upload)
    }

    /// The upload `id` of `repo`.
    pub fn upload(&self, repo: &str, id: &str) -> Result<SharedUpload, RegistryError> {
        let unknown = || RegistryError::UploadUnknown(id.to_owned());
        if !valid_id(id) {
            return Err(unknown());
        }
        match self.uploads.lock().expect("uploads").get(id) {
            // Another repository's upload is not reachable through this one.
            Some((r, upload)) if r == repo => Ok(upload.clone()),
            _ => Err(unknown()),
        }
    }

    /// Completes `upload` as the blob `digest` (whose size, if given, must match): on
    /// success the blob is published and linked into the upload's repository; on any
    /// failure nothing is published and the upload is gone.
    pub fn finish_upload(
        &self,
        upload: &mut Upload,
        digest: &Digest,
        size: Option<u64>,
    ) -> Result<u64, RegistryError> {
        self.uploads.lock().expect("uploads").remove(&upload.id);
        let writer = upload
            .writer
            .take()
            .ok_or_else(|| RegistryError::UploadUnknown(upload.id.clone()))?;
        let _shared = self.publishing();
        let size = writer.commit_as(&self.store.blobs, digest, size)?;
        self.link_blob(&upload.repo, digest, size)?;
        Ok(size)
    }

    /// Cancels `upload`, removing what it received (a blocking file removal).
    pub fn cancel_upload(&self, upload: &mut Upload) {
        self.uploads.lock().expect("uploads").remove(&upload.id);
        upload.writer = None;
    }

    /// Removes the uploads idle for longer than the upload timeout; returns how many.
    pub fn expire_uploads(&self) -> usize {
        let timeout = self.options.upload_timeout;
        let mut uploads = self.uploads.lock().expect("uploads");
        let before = uploads.len();
        uploads.retain(|_, (_, u)| match u.try_lock() {
            // Busy: a request is feeding it right now.
            Err(_) => true,
            Ok(mut u) => {
                let keep = u.last_activity.elapsed() < timeout;
                if !keep {
                    u.writer = None;
                }
                keep
            }
        });
        before - uploads.len()
    }

    /// How many uploads are in progress.
    pub fn uploads_in_progress(&self) -> usize {
        self.uploads.lock().expect("uploads").len()
    }
}
