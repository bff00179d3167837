//! The one place where failures become OCI error responses.
//!
//! Codes and statuses follow the OCI distribution specification; a body is always
//! `{"errors":[{"code","message","detail"}]}`.

use berth_cache::CacheError;

/// An OCI error code, with the HTTP status berth answers it with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    BlobUnknown,
    DigestInvalid,
    ManifestUnknown,
    NameInvalid,
    NameUnknown,
    Denied,
    /// No or bad credentials where they are needed.
    Unauthorized,
    Unsupported,
    TooManyRequests,
    /// The range asked for lies outside the blob.
    RangeInvalid,
    /// The path is not part of the API.
    NotFound,
    /// A malformed request to berth's own API (not the distribution API).
    BadRequest,
    BlobUploadUnknown,
    BlobUploadInvalid,
    /// A chunk that does not continue its upload.
    ChunkOutOfOrder,
    SizeInvalid,
    ManifestInvalid,
    ManifestBlobUnknown,
    /// A manifest body over the size limit.
    ManifestTooLarge,
    /// An upload over `server.max_upload_size`.
    UploadTooLarge,
    TagInvalid,
    PaginationInvalid,
    /// An upstream failed or sent bad content.
    BadGateway,
    /// An upstream did not answer in time.
    GatewayTimeout,
    /// The store's disk is full.
    StoreFull,
    Internal,
}

/// The table: code → (OCI code string, HTTP status).
const TABLE: &[(Code, &str, u16)] = &[
    (Code::BlobUnknown, "BLOB_UNKNOWN", 404),
    (Code::DigestInvalid, "DIGEST_INVALID", 400),
    (Code::ManifestUnknown, "MANIFEST_UNKNOWN", 404),
    (Code::NameInvalid, "NAME_INVALID", 400),
    (Code::NameUnknown, "NAME_UNKNOWN", 404),
    (Code::Denied, "DENIED", 403),
    (Code::Unauthorized, "UNAUTHORIZED", 401),
    (Code::Unsupported, "UNSUPPORTED", 405),
    (Code::TooManyRequests, "TOOMANYREQUESTS", 429),
    (Code::RangeInvalid, "BLOB_UNKNOWN", 416),
    (Code::NotFound, "NOT_FOUND", 404),
    (Code::BadRequest, "BAD_REQUEST", 400),
    (Code::BlobUploadUnknown, "BLOB_UPLOAD_UNKNOWN", 404),
    (Code::BlobUploadInvalid, "BLOB_UPLOAD_INVALID", 400),
    (Code::ChunkOutOfOrder, "BLOB_UPLOAD_INVALID", 416),
    (Code::SizeInvalid, "SIZE_INVALID", 400),
    (Code::ManifestInvalid, "MANIFEST_INVALID", 400),
    (Code::ManifestBlobUnknown, "MANIFEST_BLOB_UNKNOWN", 400),
    (Code::ManifestTooLarge, "SIZE_INVALID", 413),
    (Code::UploadTooLarge, "SIZE_INVALID", 413),
    (Code::TagInvalid, "TAG_INVALID", 400),
    (Code::PaginationInvalid, "PAGINATION_NUMBER_INVALID", 400),
    (Code::BadGateway, "UNKNOWN", 502),
    (Code::GatewayTimeout, "UNKNOWN", 504),
    (Code::StoreFull, "UNKNOWN", 507),
    (Code::Internal, "UNKNOWN", 500),
];

impl Code {
    fn entry(self) -> (&'static str, u16) {
        TABLE
            .iter()
            .find(|(c, _, _)| *c == self)
            .map(|(_, s, st)| (*s, *st))
            .expect("every code is in the table")
    }

    pub fn as_str(self) -> &'static str {
        self.entry().0
    }

    pub fn status(self) -> u16 {
        self.entry().1
    }
}

/// An error response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    pub code: Code,
    pub message: String,
    /// Headers the error response carries besides its body's.
    pub headers: Vec<(&'static str, String)>,
}

/// What a request was about, to pick the right "unknown" code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Subject {
    Manifest,
    Blob,
    Tags,
}

impl ApiError {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
            headers: Vec::new(),
        }
    }

    pub fn with_headers(mut self, headers: Vec<(&'static str, String)>) -> Self {
        self.headers = headers;
        self
    }

    pub fn status(&self) -> u16 {
        self.code.status()
    }

    /// The JSON body.
    pub fn body(&self) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "errors": [{"code": self.code.as_str(), "message": self.message, "detail": null}]
        }))
        .expect("serializable")
    }

    /// Maps a cache failure for `subject` to a response.
    pub fn from_cache(e: &CacheError, subject: Subject, what: &str) -> ApiError {
        let code = match e {
            CacheError::NotFound => {
                return ApiError::new(
                    match subject {
                        Subject::Manifest => Code::ManifestUnknown,
                        Subject::Blob => Code::BlobUnknown,
                        Subject::Tags => Code::NameUnknown,
                    },
                    format!("{what} is not known to the upstream registry"),
                )
            }
            CacheError::UpstreamDenied { .. } => Code::Denied,
            CacheError::UpstreamRateLimited { .. } => Code::TooManyRequests,
            CacheError::UpstreamUnreachable { reason, .. }
                if reason.contains("timed out") || reason.contains("stalled") =>
            {
                Code::GatewayTimeout
            }
            CacheError::UpstreamUnreachable { .. }
            | CacheError::Upstream { .. }
            | CacheError::UpstreamInvalid { .. }
            | CacheError::DigestMismatch { .. }
            | CacheError::SizeMismatch { .. }
            | CacheError::FillFailed(_) => Code::BadGateway,
            CacheError::NoSpace => Code::StoreFull,
            CacheError::Store(_) | CacheError::Internal(_) => Code::Internal,
        };
        ApiError::new(code, format!("{what}: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_oci_errors() {
        let e = ApiError::new(Code::Denied, "no");
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(v["errors"][0]["code"], "DENIED");
        assert_eq!(v["errors"][0]["message"], "no");
        assert_eq!(e.status(), 403);
    }

    #[test]
    fn cache_errors_map_to_codes() {
        let nf = CacheError::NotFound;
        assert_eq!(
            ApiError::from_cache(&nf, Subject::Manifest, "x").code,
            Code::ManifestUnknown
        );
        assert_eq!(
            ApiError::from_cache(&nf, Subject::Blob, "x").code,
            Code::BlobUnknown
        );
        let rl = CacheError::UpstreamRateLimited {
            registry: "docker.io".into(),
        };
        assert_eq!(ApiError::from_cache(&rl, Subject::Blob, "x").status(), 429);
        let to = CacheError::UpstreamUnreachable {
            registry: "r".into(),
            reason: "timed out waiting for a response".into(),
        };
        assert_eq!(
            ApiError::from_cache(&to, Subject::Manifest, "x").status(),
            504
        );
    }
}
