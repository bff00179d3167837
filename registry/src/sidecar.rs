//! What of an upload survives a restart: next to its file `uploads/<id>` in the store, a
//! small state file `uploads/<id>.json` saying whose upload it is and how many of the
//! file's bytes the client was told are kept, and when.
//!
//! The state is a file of its own, not a RocksDB record: writing it needs a few bytes of
//! disk and no database, so an upload goes on (and stays resumable) while the metadata
//! database refuses writes on a full disk, and the upload's file and its state live and
//! go together in one directory.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::PathBuf;

/// The persisted state of one upload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Sidecar {
    pub repo: String,
    /// Bytes acknowledged to the client: the upload resumes after exactly these.
    pub offset: u64,
    /// Wall-clock time of the last acknowledged activity (ms since the epoch); the upload
    /// expires `upload_timeout` after it.
    pub updated_ms: u64,
}

/// The files of upload `id` in the store's `uploads/` directory.
#[derive(Debug)]
pub(crate) struct UploadFiles {
    dir: PathBuf,
    id: String,
}

impl UploadFiles {
    pub fn new(dir: PathBuf, id: &str) -> Self {
        UploadFiles {
            dir,
            id: id.to_owned(),
        }
    }

    /// The upload's bytes (written by the store's upload writer).
    pub fn data(&self) -> PathBuf {
        self.dir.join(&self.id)
    }

    pub fn state(&self) -> PathBuf {
        self.dir.join(format!("{}.json", self.id))
    }

    fn state_tmp(&self) -> PathBuf {
        self.dir.join(format!("{}.json.tmp", self.id))
    }

    /// Replaces the state atomically and durably: written to a temporary file, synced,
    /// renamed over the old one, and the directory synced. A crash leaves the old state
    /// or the new one, never a mix.
    pub fn write(&self, state: &Sidecar) -> io::Result<()> {
        let body = serde_json::json!({
            "repo": state.repo,
            "offset": state.offset,
            "updated_ms": state.updated_ms,
        });
        let tmp = self.state_tmp();
        let mut f = File::create(&tmp)?;
        f.write_all(body.to_string().as_bytes())?;
        f.sync_data()?;
        drop(f);
        fs::rename(&tmp, self.state())?;
        File::open(&self.dir)?.sync_all()
    }

    /// The state, `None` if there is none; an unreadable one is an `InvalidData` error.
    pub fn read(&self) -> io::Result<Option<Sidecar>> {
        let bytes = match fs::read(self.state()) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let invalid = || io::Error::new(io::ErrorKind::InvalidData, "not an upload state");
        let v: serde_json::Value = serde_json::from_slice(&bytes).map_err(|_| invalid())?;
        Ok(Some(Sidecar {
            repo: v["repo"].as_str().ok_or_else(invalid)?.to_owned(),
            offset: v["offset"].as_u64().ok_or_else(invalid)?,
            updated_ms: v["updated_ms"].as_u64().ok_or_else(invalid)?,
        }))
    }

    /// Removes the upload's file and state (what is not there is no error).
    pub fn remove(&self) {
        for path in [self.data(), self.state(), self.state_tmp()] {
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "an upload's file was not removed")
                }
            }
        }
    }
}
