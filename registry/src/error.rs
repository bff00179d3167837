//! What can go wrong in a private repository, in the terms of the OCI error codes.

use berth_store::oci::Digest;
use berth_store::StoreError;

#[derive(Debug)]
pub enum RegistryError {
    /// The repository has no such blob (or the blob is not linked into it).
    BlobUnknown(Digest),
    /// No upload session with this id in this repository.
    UploadUnknown(String),
    /// A chunk does not start where the upload stands.
    ChunkOutOfOrder {
        expected: u64,
        got: u64,
    },
    /// The upload cannot be completed as asked.
    UploadInvalid(String),
    /// A digest does not match the content, or is not a valid digest.
    DigestInvalid(String),
    /// The size does not match the content.
    SizeInvalid(String),
    ManifestUnknown(String),
    ManifestInvalid(String),
    /// A manifest references content the repository does not have.
    ManifestBlobUnknown(Digest),
    /// A manifest body over the limit.
    ManifestTooLarge {
        limit: usize,
    },
    NameUnknown(String),
    /// The push would move `tag`, which names `current`, and the pusher may not.
    TagImmutable {
        tag: String,
        current: Digest,
    },
    /// An upload over the size limit (its bytes are gone).
    UploadTooLarge {
        limit: u64,
    },
    /// Too many uploads are in progress.
    TooManyUploads {
        limit: usize,
    },
    Store(StoreError),
}

impl std::fmt::Display for RegistryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RegistryError::BlobUnknown(d) => write!(f, "blob {d} is not in this repository"),
            RegistryError::UploadUnknown(id) => {
                write!(f, "no upload {id:?} in progress in this repository (it finished, was cancelled, or expired)")
            }
            RegistryError::ChunkOutOfOrder { expected, got } => write!(
                f,
                "the chunk starts at byte {got}, but the upload has {expected} bytes: send the chunk that starts at {expected}"
            ),
            RegistryError::UploadInvalid(m)
            | RegistryError::DigestInvalid(m)
            | RegistryError::SizeInvalid(m)
            | RegistryError::ManifestUnknown(m)
            | RegistryError::ManifestInvalid(m)
            | RegistryError::NameUnknown(m) => f.write_str(m),
            RegistryError::ManifestBlobUnknown(d) => write!(
                f,
                "the manifest references {d}, which is not in this repository: push it first"
            ),
            RegistryError::ManifestTooLarge { limit } => {
                write!(f, "the manifest is larger than the limit of {limit} bytes")
            }
            RegistryError::TagImmutable { tag, current } => write!(
                f,
                "tag {tag} already names {current}: moving it needs the update permission"
            ),
            RegistryError::UploadTooLarge { limit } => write!(
                f,
                "the upload is larger than the limit of {limit} bytes (server.max_upload_size); it was removed"
            ),
            RegistryError::TooManyUploads { limit } => write!(
                f,
                "{limit} uploads are already in progress: finish or cancel some, or retry later"
            ),
            RegistryError::Store(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for RegistryError {}

impl From<StoreError> for RegistryError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::DigestMismatch { expected, actual } => RegistryError::DigestInvalid(
                format!("the content's digest is {actual}, not {expected}"),
            ),
            StoreError::SizeMismatch { expected, actual } => RegistryError::SizeInvalid(format!(
                "the content has {actual} bytes, not {expected}"
            )),
            e => RegistryError::Store(e),
        }
    }
}

impl From<std::io::Error> for RegistryError {
    fn from(e: std::io::Error) -> Self {
        RegistryError::Store(StoreError::Io(e))
    }
}
