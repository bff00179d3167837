//! The endpoints of private repositories: pulls, pushes (uploads and manifests),
//! deletes, listings and referrers, over [`berth_registry::Registry`].
//!
//! Every registry call blocks (RocksDB, files, and a publishing call may wait for
//! garbage collection), so each runs on the blocking pool ([`App::blocking`]) and no
//! async worker ever waits for one: a push stalled behind garbage collection holds a
//! blocking thread, never the workers that serve pulls.

use bytes::{Bytes, BytesMut};
use pingora::protocols::http::ServerSession;

use berth_cache::BlobSource;
use berth_registry::{Page, Registry, RegistryError, SharedUpload, Upload, MAX_MANIFEST_BYTES};
use berth_store::oci::{Digest, Reference, OCI_INDEX};

use berth_config::access::Action;

use crate::auth::Identity;
use crate::errors::{ApiError, Code};
use crate::route::{query_param, Endpoint};
use crate::server::{send_bytes, send_head, App, Headers, Request, Served};

/// Repository names one catalog request looks at, at most (readable or not).
const CATALOG_SCAN_LIMIT: usize = 10_000;
/// Names read from the store at a time while filling a catalog page.
const CATALOG_BATCH: usize = 100;

/// How often a request body is read before it counts as stalled.
const BODY_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// An upload body is written to its file in pieces of up to this many bytes, each on
/// the blocking pool.
const WRITE_PIECE: usize = 1 << 20;

/// An upload, locked by the request feeding it.
type LockedUpload = tokio::sync::OwnedMutexGuard<Upload>;

impl App {
    /// Runs `f` on the registry on the blocking pool, and maps its failure.
    pub(crate) async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Registry) -> Result<T, RegistryError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let registry = self.registry.clone();
        tokio::task::spawn_blocking(move || f(&registry))
            .await
            .map_err(task_failed)?
            .map_err(api)
    }

    /// Cancels an upload (removing its file) on the blocking pool.
    async fn cancel(&self, mut upload: LockedUpload) {
        let _ = self
            .blocking(move |r| {
                r.cancel_upload(&mut upload);
                Ok(())
            })
            .await;
    }

    pub(crate) async fn private(
        &self,
        session: &mut ServerSession,
        req: &Request,
        who: &Identity,
        repo: &str,
        endpoint: &Endpoint,
    ) -> Result<Served, ApiError> {
        let method = req.method.as_str();
        match (endpoint, method) {
            (Endpoint::Manifest(r), "GET" | "HEAD") => {
                self.get_manifest(session, req, repo, r).await
            }
            (Endpoint::Manifest(r), "PUT") => self.put_manifest(session, req, who, repo, r).await,
            (Endpoint::Manifest(r), "DELETE") => {
                let (repo, r) = (repo.to_owned(), r.clone());
                self.blocking(move |reg| reg.delete_manifest(&repo, &r))
                    .await?;
                Ok(accepted(session).await)
            }
            (Endpoint::Blob(d), "GET" | "HEAD") => self.get_blob(session, req, repo, d).await,
            (Endpoint::Blob(d), "DELETE") => {
                let (repo, d) = (repo.to_owned(), d.clone());
                self.blocking(move |reg| reg.delete_blob(&repo, &d)).await?;
                Ok(accepted(session).await)
            }
            (Endpoint::Tags, "GET" | "HEAD") => {
                let (n, last) = pagination(req)?;
                let name = repo.to_owned();
                let page = self
                    .blocking(move |reg| reg.tags(&name, Some(n), last.as_deref()))
                    .await?;
                let body = serde_json::json!({"name": repo, "tags": page.items});
                let link = format!("/v2/{repo}/tags/list");
                Ok(send_page(session, req, body, &link, n, &page).await)
            }
            (Endpoint::Uploads, "POST") => self.post_upload(session, req, who, repo).await,
            (Endpoint::Upload(id), "GET") => {
                let upload = self.find_upload(repo, id).await?;
                let upload = upload.lock_owned().await;
                upload.received().map_err(api)?;
                let upload = self.acknowledge_received(upload).await?;
                let headers = upload_headers(repo, id, upload.offset());
                drop(upload);
                Ok(send_head(session, 204, headers, 0, None).await)
            }
            (Endpoint::Upload(id), "PATCH") => {
                let upload = self.receive_chunk(session, req, repo, id).await?;
                let upload = self.acknowledge(upload).await?;
                let headers = upload_headers(repo, id, upload.offset());
                drop(upload);
                Ok(send_head(session, 202, headers, 0, None).await)
            }
            (Endpoint::Upload(id), "PUT") => {
                let digest = digest_param(req)?;
                let upload = self.receive_chunk(session, req, repo, id).await?;
                self.finish(upload, &digest).await?;
                Ok(blob_created(session, repo, &digest).await)
            }
            (Endpoint::Upload(id), "DELETE") => {
                let upload = self.find_upload(repo, id).await?;
                self.cancel(upload.lock_owned().await).await;
                Ok(send_head(session, 204, Vec::new(), 0, None).await)
            }
            (Endpoint::Referrers(subject), "GET" | "HEAD") => {
                let filter = req
                    .query
                    .as_deref()
                    .and_then(|q| query_param(q, "artifactType"));
                let (name, subject, f) = (repo.to_owned(), subject.clone(), filter.clone());
                let body = self
                    .blocking(move |reg| reg.referrers(&name, &subject, f.as_deref()))
                    .await?;
                let mut headers = vec![("Content-Type", OCI_INDEX.to_owned())];
                if filter.is_some() {
                    headers.push(("OCI-Filters-Applied", "artifactType".to_owned()));
                }
                Ok(send_bytes(session, 200, headers, body, req.is_head(), None).await)
            }
            (_, method) => {
                session.set_keepalive(None);
                Err(ApiError::new(
                    Code::Unsupported,
                    format!("{method} is not an operation of {}", req.path),
                ))
            }
        }
    }

    /// Upload `id` of `repo`, resumed from the store if this process does not have it
    /// (on the blocking pool: that reads the upload's bytes again).
    async fn find_upload(&self, repo: &str, id: &str) -> Result<SharedUpload, ApiError> {
        let (repo, id) = (repo.to_owned(), id.to_owned());
        self.blocking(move |r| r.upload(&repo, &id)).await
    }

    /// Persists where `upload` stands (on the blocking pool) before the client is told,
    /// so that after a restart it resumes there. A failure is logged, not answered: the
    /// upload in memory is intact, and an error would have the client send again bytes
    /// the upload already holds.
    async fn acknowledge(&self, mut upload: LockedUpload) -> Result<LockedUpload, ApiError> {
        let (upload, done) = tokio::task::spawn_blocking(move || {
            let done = upload.acknowledge();
            (upload, done)
        })
        .await
        .map_err(task_failed)?;
        if let Err(e) = done {
            tracing::warn!(
                upload = upload.id(),
                error = %e,
                "an upload's progress was not persisted: after a restart it would resume from an earlier offset"
            );
        }
        Ok(upload)
    }

    /// [`Self::acknowledge`], if `upload` holds bytes not acknowledged yet (a chunk cut
    /// short), before an answer reports its offset.
    async fn acknowledge_received(&self, upload: LockedUpload) -> Result<LockedUpload, ApiError> {
        if upload.is_acknowledged() {
            return Ok(upload);
        }
        self.acknowledge(upload).await
    }

    /// Appends the request body (a chunk, possibly empty) to upload `id`, checking that
    /// its `Content-Range`, if any, continues the upload. Returns the upload, locked.
    async fn receive_chunk(
        &self,
        session: &mut ServerSession,
        req: &Request,
        repo: &str,
        id: &str,
    ) -> Result<LockedUpload, ApiError> {
        let upload = self.find_upload(repo, id).await?;
        let upload = upload.lock_owned().await;
        upload.received().map_err(api)?;
        let range = content_range(req).inspect_err(|_| session.set_keepalive(None))?;
        if let Some(range) = range {
            if let Err(e) = upload.check_chunk_start(range.start) {
                self.acknowledge_received(upload).await?;
                return Err(chunk_error(e, repo, id));
            }
        }
        // What the headers announce must fit before any of it is read.
        let announced = range
            .map(|r| r.end)
            .or_else(|| content_length(session).map(|n| upload.offset().saturating_add(n)));
        let upload = self.check_fits(session, upload, announced).await?;
        let upload = self.read_body_into(session, upload, false).await?;
        if let Some(ChunkRange { start, end }) = range {
            if upload.offset() != end {
                let upload = self.acknowledge_received(upload).await?;
                let e = ApiError::new(
                    Code::ChunkOutOfOrder,
                    format!(
                        "Content-Range {start}-{} announced {} bytes, but {} came",
                        end - 1,
                        end - start,
                        upload.offset() - start
                    ),
                );
                return Err(e.with_headers(upload_headers(repo, id, upload.offset())));
            }
        }
        Ok(upload)
    }

    /// Refuses (and cancels) an upload whose total size would be `total`, over the limit,
    /// before its body is read.
    async fn check_fits(
        &self,
        session: &mut ServerSession,
        upload: LockedUpload,
        total: Option<u64>,
    ) -> Result<LockedUpload, ApiError> {
        let Some(Err(e)) = total.map(|t| upload.check_fits(t)) else {
            return Ok(upload);
        };
        session.set_keepalive(None);
        self.cancel(upload).await;
        Err(api(e))
    }

    /// Streams the request body into `upload`, writing it on the blocking pool. An
    /// upload that goes over the size limit is cancelled, and so is any upload that
    /// fails if `cancel_on_error` (a monolithic upload, which the client cannot resume).
    async fn read_body_into(
        &self,
        session: &mut ServerSession,
        mut upload: LockedUpload,
        cancel_on_error: bool,
    ) -> Result<LockedUpload, ApiError> {
        let mut piece = BytesMut::new();
        loop {
            let chunk = match next_chunk(session).await {
                Ok(chunk) => chunk,
                Err(e) => {
                    if cancel_on_error {
                        self.cancel(upload).await;
                    }
                    return Err(e);
                }
            };
            let done = chunk.is_none();
            if let Some(chunk) = chunk {
                piece.extend_from_slice(&chunk);
            }
            if piece.len() >= WRITE_PIECE || (done && !piece.is_empty()) {
                let bytes = piece.split().freeze();
                let (back, written) = tokio::task::spawn_blocking(move || {
                    let written = upload.write(&bytes);
                    (upload, written)
                })
                .await
                .map_err(task_failed)?;
                upload = back;
                if let Err(e) = written {
                    let too_large = matches!(e, RegistryError::UploadTooLarge { .. });
                    if too_large {
                        // The rest of the body is not read.
                        session.set_keepalive(None);
                    }
                    if too_large || cancel_on_error {
                        self.cancel(upload).await;
                    }
                    return Err(api(e));
                }
            }
            if done {
                return Ok(upload);
            }
        }
    }

    /// Completes an upload as `digest`, on the blocking pool (it syncs the file to disk,
    /// and a digest other than sha256 reads it again).
    async fn finish(&self, mut upload: LockedUpload, digest: &Digest) -> Result<(), ApiError> {
        let digest = digest.clone();
        self.blocking(move |r| r.finish_upload(&mut upload, &digest, None))
            .await
            .map(|_| ())
    }

    /// `GET /v2/_catalog`: the private repositories the caller may read. Repositories it
    /// may not read are skipped without ending the page: the scan goes on until `n` are
    /// found or the listing ends, looking at most at [`CATALOG_SCAN_LIMIT`] names per
    /// request; a page cut short by that limit still has a `Link` to go on from.
    pub(crate) async fn catalog(
        &self,
        session: &mut ServerSession,
        req: &Request,
        who: &Identity,
    ) -> Result<Served, ApiError> {
        let (n, last) = pagination(req)?;
        // A token lists only if it was granted the catalog, and then as its user's
        // policies say.
        let lister = match who {
            Identity::User {
                name,
                groups,
                grants: Some(grants),
                login,
                provider,
            } => grants
                .iter()
                .any(|g| g.kind == "registry" && g.name == "catalog")
                .then(|| Identity::User {
                    name: name.clone(),
                    groups: groups.clone(),
                    grants: None,
                    login: *login,
                    provider: provider.clone(),
                }),
            other => Some(other.clone()),
        };
        let readable = |repo: &str| {
            lister
                .as_ref()
                .is_some_and(|w| self.auth.allows(w, repo, Action::Read))
        };
        let (items, next) = self.readable_repos(n, last, readable).await?;
        let body = serde_json::json!({"repositories": items});
        Ok(send_page_after(session, req, body, "/v2/_catalog", n, next.as_deref()).await)
    }

    /// Up to `n` repositories after `last` that pass `readable`, and the name to continue
    /// after when the listing goes on.
    async fn readable_repos(
        &self,
        n: usize,
        last: Option<String>,
        readable: impl Fn(&str) -> bool,
    ) -> Result<(Vec<String>, Option<String>), ApiError> {
        let mut items = Vec::new();
        let mut cursor = last;
        let mut scanned = 0;
        if n == 0 {
            return Ok((items, None));
        }
        loop {
            let batch = (n - items.len())
                .max(CATALOG_BATCH)
                .min(CATALOG_SCAN_LIMIT - scanned);
            let after = cursor.clone();
            let page = self
                .blocking(move |r| r.catalog(Some(batch), after.as_deref()))
                .await?;
            let count = page.items.len();
            for (i, repo) in page.items.into_iter().enumerate() {
                scanned += 1;
                if readable(&repo) {
                    items.push(repo.clone());
                }
                cursor = Some(repo);
                if items.len() == n {
                    let more = i + 1 < count || page.more;
                    return Ok((items, cursor.filter(|_| more)));
                }
            }
            if !page.more {
                return Ok((items, None));
            }
            if scanned >= CATALOG_SCAN_LIMIT {
                return Ok((items, cursor));
            }
        }
    }

    async fn get_manifest(
        &self,
        session: &mut ServerSession,
        req: &Request,
        repo: &str,
        reference: &Reference,
    ) -> Result<Served, ApiError> {
        let (name, r) = (repo.to_owned(), reference.clone());
        let m = self.blocking(move |reg| reg.manifest(&name, &r)).await?;
        let headers = vec![
            ("Content-Type", m.media_type),
            ("Docker-Content-Digest", m.digest.to_string()),
            ("ETag", format!("\"{}\"", m.digest)),
        ];
        Ok(send_bytes(session, 200, headers, m.body, req.is_head(), None).await)
    }

    async fn put_manifest(
        &self,
        session: &mut ServerSession,
        req: &Request,
        who: &Identity,
        repo: &str,
        reference: &Reference,
    ) -> Result<Served, ApiError> {
        let media_type = req
            .content_type
            .as_deref()
            .map(|t| t.split(';').next().unwrap_or("").trim().to_owned())
            .ok_or_else(|| {
                ApiError::new(
                    Code::ManifestInvalid,
                    "a manifest must be pushed with the Content-Type of its media type",
                )
            })?;
        let body = read_body(session, MAX_MANIFEST_BYTES).await?;
        let tags: Vec<String> = req
            .query
            .as_deref()
            .map(|q| crate::route::query_values(q, "tag").collect())
            .unwrap_or_default();
        let main_tag = match reference {
            Reference::Tag(t) => Some(t),
            Reference::Digest(_) => None,
        };
        let mut all_tags = tags.iter().chain(main_tag);
        if let Some(bad) = all_tags.find(|t| !berth_store::oci::is_valid_tag(t)) {
            return Err(ApiError::new(
                Code::TagInvalid,
                format!("{bad:?} is not a valid tag"),
            ));
        }
        // Moving a tag to another manifest needs update as well as create; the registry
        // checks and writes the tags in one step.
        let may_move_tags = self.auth.allows(who, repo, Action::Update);
        let (name, r) = (repo.to_owned(), reference.clone());
        let registry = self.registry.clone();
        let pushed = tokio::task::spawn_blocking(move || {
            registry.put_manifest_with(&name, &r, &tags, &media_type, body, may_move_tags)
        })
        .await
        .map_err(task_failed)?;
        let pushed = match pushed {
            Ok(p) => p,
            Err(RegistryError::TagImmutable { tag, .. }) => {
                let scope = format!("repository:{repo}:pull,push");
                return Err(self.deny(
                    req,
                    who,
                    &format!("update (move tag {tag}) on {repo}"),
                    Some(scope),
                ));
            }
            Err(e) => return Err(api(e)),
        };
        let mut headers = vec![
            (
                "Location",
                format!("/v2/{repo}/manifests/{}", pushed.digest),
            ),
            ("Docker-Content-Digest", pushed.digest.to_string()),
        ];
        if let Some(subject) = pushed.subject {
            headers.push(("OCI-Subject", subject.to_string()));
        }
        Ok(send_head(session, 201, headers, 0, None).await)
    }

    async fn get_blob(
        &self,
        session: &mut ServerSession,
        req: &Request,
        repo: &str,
        digest: &Digest,
    ) -> Result<Served, ApiError> {
        let (name, d) = (repo.to_owned(), digest.clone());
        let blob = self.blocking(move |reg| reg.blob(&name, &d)).await?;
        let headers = vec![
            ("Content-Type", "application/octet-stream".to_owned()),
            ("Docker-Content-Digest", digest.to_string()),
            ("Accept-Ranges", "bytes".to_owned()),
        ];
        if req.is_head() {
            return Ok(send_head(session, 200, headers, blob.size(), None).await);
        }
        let what = format!("blob {digest} of {repo}");
        self.send_blob(
            session,
            req,
            BlobSource::Stored { blob },
            headers,
            None,
            &what,
        )
        .await
    }

    /// `POST /v2/<repo>/blobs/uploads/`: a mount, a monolithic upload (`?digest=`), or
    /// the start of an upload.
    async fn post_upload(
        &self,
        session: &mut ServerSession,
        req: &Request,
        who: &Identity,
        repo: &str,
    ) -> Result<Served, ApiError> {
        let query = req.query.as_deref().unwrap_or("");
        if let (Some(mount), Some(from)) = (query_param(query, "mount"), query_param(query, "from"))
        {
            let digest = parse_digest(&mount)?;
            // A mount from a repository the caller may not read is an ordinary upload:
            // it must not reveal what that repository holds.
            if crate::route::is_private_name(&from, &self.config)
                && self.auth.allows(who, &from, Action::Read)
                && self
                    .blocking({
                        let (repo, digest) = (repo.to_owned(), digest.clone());
                        move |reg| reg.mount(&repo, &digest, &from)
                    })
                    .await?
            {
                return Ok(blob_created(session, repo, &digest).await);
            }
            // Otherwise an ordinary upload, as the specification says.
        }
        let digest = query_param(query, "digest")
            .map(|d| parse_digest(&d))
            .transpose()?;
        let name = repo.to_owned();
        let upload = self.blocking(move |reg| reg.start_upload(&name)).await?;
        let upload = upload.lock_owned().await;
        let Some(digest) = digest else {
            let headers = upload_headers(repo, upload.id(), 0);
            return Ok(send_head(session, 202, headers, 0, None).await);
        };
        // Monolithic: the client has no Location for this upload, so it must not
        // outlive this request.
        let upload = self
            .check_fits(session, upload, content_length(session))
            .await?;
        let upload = self.read_body_into(session, upload, true).await?;
        self.finish(upload, &digest).await?;
        Ok(blob_created(session, repo, &digest).await)
    }
}

/// A blocking registry task that panicked or was cancelled.
fn task_failed(e: tokio::task::JoinError) -> ApiError {
    ApiError::new(Code::Internal, format!("a registry task failed: {e}"))
}

/// Maps a registry failure to its OCI error.
pub(crate) fn api(e: RegistryError) -> ApiError {
    let code = match &e {
        RegistryError::BlobUnknown(_) => Code::BlobUnknown,
        RegistryError::UploadUnknown(_) => Code::BlobUploadUnknown,
        RegistryError::ChunkOutOfOrder { .. } => Code::ChunkOutOfOrder,
        RegistryError::UploadInvalid(_) => Code::BlobUploadInvalid,
        RegistryError::DigestInvalid(_) => Code::DigestInvalid,
        RegistryError::SizeInvalid(_) => Code::SizeInvalid,
        RegistryError::ManifestUnknown(_) => Code::ManifestUnknown,
        RegistryError::ManifestInvalid(_) => Code::ManifestInvalid,
        RegistryError::ManifestBlobUnknown(_) => Code::ManifestBlobUnknown,
        RegistryError::ManifestTooLarge { .. } => Code::ManifestTooLarge,
        RegistryError::NameUnknown(_) => Code::NameUnknown,
        RegistryError::TagImmutable { .. } => Code::Denied,
        RegistryError::UploadTooLarge { .. } => Code::UploadTooLarge,
        RegistryError::TooManyUploads { .. } => Code::TooManyRequests,
        RegistryError::Store(s) if s.is_no_space() => {
            tracing::error!(error = %s, "a push failed: the store's disk is full");
            return ApiError::new(
                Code::StoreFull,
                format!("berth's store has no space left for this push ({s}); pushed content is never evicted: free space on the store's disk or delete images, then push again"),
            );
        }
        RegistryError::Store(_) => Code::Internal,
    };
    if code == Code::Internal {
        tracing::error!(error = %e, "private registry storage failure");
    }
    ApiError::new(code, e.to_string())
}

/// An out-of-order chunk: 416, with where the upload stands.
fn chunk_error(e: RegistryError, repo: &str, id: &str) -> ApiError {
    let headers = match &e {
        RegistryError::ChunkOutOfOrder { expected, .. } => upload_headers(repo, id, *expected),
        _ => upload_headers_for(repo, id),
    };
    api(e).with_headers(headers)
}

fn upload_headers_for(repo: &str, id: &str) -> Headers {
    vec![
        ("Location", format!("/v2/{repo}/blobs/uploads/{id}")),
        ("Docker-Upload-UUID", id.to_owned()),
    ]
}

/// `Location`, `Range` (the bytes received: `0-<last>`) and the upload id.
fn upload_headers(repo: &str, id: &str, offset: u64) -> Headers {
    let mut h = upload_headers_for(repo, id);
    h.push(("Range", format!("0-{}", offset.saturating_sub(1))));
    h
}

async fn blob_created(session: &mut ServerSession, repo: &str, digest: &Digest) -> Served {
    let headers = vec![
        ("Location", format!("/v2/{repo}/blobs/{digest}")),
        ("Docker-Content-Digest", digest.to_string()),
    ];
    send_head(session, 201, headers, 0, None).await
}

async fn accepted(session: &mut ServerSession) -> Served {
    send_head(session, 202, Vec::new(), 0, None).await
}

fn parse_digest(s: &str) -> Result<Digest, ApiError> {
    s.parse()
        .map_err(|e| ApiError::new(Code::DigestInvalid, format!("invalid digest {s:?}: {e}")))
}

fn digest_param(req: &Request) -> Result<Digest, ApiError> {
    let d = req
        .query
        .as_deref()
        .and_then(|q| query_param(q, "digest"))
        .ok_or_else(|| {
            ApiError::new(
                Code::DigestInvalid,
                "closing an upload needs ?digest=<digest of the whole blob>",
            )
        })?;
    parse_digest(&d)
}

/// The bytes `start..end` (end exclusive) an upload chunk's `Content-Range` announces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ChunkRange {
    start: u64,
    end: u64,
}

/// `Content-Range: <first>-<last>` of an upload chunk, if given.
fn content_range(req: &Request) -> Result<Option<ChunkRange>, ApiError> {
    req.content_range
        .as_deref()
        .map(parse_content_range)
        .transpose()
}

fn parse_content_range(v: &str) -> Result<ChunkRange, ApiError> {
    let v = v.trim().strip_prefix("bytes ").unwrap_or(v.trim());
    let (first, last) = v
        .split_once('-')
        .and_then(|(s, e)| {
            let (s, e) = (s.parse::<u64>().ok()?, e.parse::<u64>().ok()?);
            (s <= e).then_some((s, e))
        })
        .ok_or_else(|| {
            ApiError::new(
                Code::BlobUploadInvalid,
                format!("Content-Range {v:?} is not <first byte>-<last byte>"),
            )
        })?;
    // The last byte is inclusive: one past it must still be a size.
    let end = last.checked_add(1).ok_or_else(|| {
        ApiError::new(
            Code::BlobUploadInvalid,
            format!("Content-Range {v:?} ends past the largest possible blob"),
        )
    })?;
    Ok(ChunkRange { start: first, end })
}

/// The request's `Content-Length`, if it has a valid one.
fn content_length(session: &ServerSession) -> Option<u64> {
    session
        .req_header()
        .headers
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

/// `?n=` and `?last=` of a listing.
/// Without `?n=`, a listing page holds at most this many (and links to the next).
const DEFAULT_PAGE: usize = 1000;

fn pagination(req: &Request) -> Result<(usize, Option<String>), ApiError> {
    let q = req.query.as_deref().unwrap_or("");
    let n = match query_param(q, "n") {
        None => DEFAULT_PAGE,
        Some(n) => n.parse::<usize>().map_err(|_| {
            ApiError::new(
                Code::PaginationInvalid,
                format!("n={n:?} is not a number of results"),
            )
        })?,
    };
    Ok((n, query_param(q, "last")))
}

/// A listing page as JSON, with a `Link` to the next page when there is one.
async fn send_page(
    session: &mut ServerSession,
    req: &Request,
    body: serde_json::Value,
    path: &str,
    n: usize,
    page: &Page,
) -> Served {
    let next = page.items.last().filter(|_| page.more);
    send_page_after(session, req, body, path, n, next.map(String::as_str)).await
}

/// A listing page as JSON, with a `Link` to the page after `next` when there is one.
async fn send_page_after(
    session: &mut ServerSession,
    req: &Request,
    body: serde_json::Value,
    path: &str,
    n: usize,
    next: Option<&str>,
) -> Served {
    let mut headers = vec![("Content-Type", "application/json".to_owned())];
    if let Some(last) = next {
        headers.push((
            "Link",
            format!("<{path}?n={n}&last={}>; rel=\"next\"", percent_encode(last)),
        ));
    }
    let body = Bytes::from(serde_json::to_vec(&body).expect("serializable"));
    send_bytes(session, 200, headers, body, req.is_head(), None).await
}

fn percent_encode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// Reads the whole request body, refusing one over `limit` bytes.
pub(crate) async fn read_body(
    session: &mut ServerSession,
    limit: usize,
) -> Result<Bytes, ApiError> {
    let mut body = BytesMut::new();
    while let Some(chunk) = next_chunk(session).await? {
        if body.len() + chunk.len() > limit {
            session.set_keepalive(None);
            return Err(ApiError::new(
                Code::ManifestTooLarge,
                format!("the body is larger than the limit of {limit} bytes"),
            ));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

async fn next_chunk(session: &mut ServerSession) -> Result<Option<Bytes>, ApiError> {
    let read = tokio::time::timeout(BODY_READ_TIMEOUT, session.read_request_body()).await;
    match read {
        Ok(Ok(chunk)) => Ok(chunk),
        Ok(Err(e)) => {
            session.set_keepalive(None);
            Err(ApiError::new(
                Code::BlobUploadInvalid,
                format!("reading the request body failed: {e}"),
            ))
        }
        Err(_) => {
            session.set_keepalive(None);
            Err(ApiError::new(
                Code::BlobUploadInvalid,
                format!("the request body stalled for {BODY_READ_TIMEOUT:?}"),
            ))
        }
    }
}

/// The disk budget in the background ([`berth_cache::Cache::run_budget`]).
pub struct Budget {
    pub cache: std::sync::Arc<berth_cache::Cache>,
    /// `[cache] scrub_interval` (zero: no background scrub) and `scrub_rate`.
    pub scrub_interval: std::time::Duration,
    pub scrub_rate: u64,
}

#[async_trait::async_trait]
impl pingora::services::background::BackgroundService for Budget {
    async fn start(&self, mut shutdown: pingora::server::ShutdownWatch) {
        let scrub = async {
            let (interval, rate) = (self.scrub_interval, self.scrub_rate);
            if interval.is_zero() {
                std::future::pending::<()>().await;
            }
            self.cache.clone().run_scrub(interval, rate).await
        };
        tokio::select! {
            _ = self.cache.clone().run_budget() => {}
            _ = scrub => {}
            _ = shutdown.changed() => {}
        }
        // What was used since the last flush is not lost on a clean stop.
        let cache = self.cache.clone();
        let _ = tokio::task::spawn_blocking(move || cache.flush_access_log()).await;
    }
}

/// Private-registry upkeep in the background: removes abandoned uploads (checked every
/// minute, or every upload timeout if shorter), every `gc_interval` collects garbage
/// older than `gc_grace`, and every `retention_interval` applies the `retention`
/// policies (as of `clock`).
pub struct Maintenance {
    pub registry: std::sync::Arc<berth_registry::Registry>,
    pub gc_interval: Option<std::time::Duration>,
    pub gc_grace: std::time::Duration,
    /// `None`, or no policies: retention never runs.
    pub retention_interval: Option<std::time::Duration>,
    pub retention: std::sync::Arc<Vec<berth_config::RetentionPolicy>>,
    pub clock: berth_cache::clock::Clock,
}

/// A `tokio::time::interval` whose first (immediate) tick is already taken.
async fn interval_after_first(
    period: Option<std::time::Duration>,
) -> Option<tokio::time::Interval> {
    let mut i = tokio::time::interval(period?);
    i.tick().await;
    Some(i)
}

/// Waits for the next tick of `interval`, forever if there is none.
async fn next_tick(interval: &mut Option<tokio::time::Interval>) {
    match interval.as_mut() {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending::<()>().await,
    }
}

#[async_trait::async_trait]
impl pingora::services::background::BackgroundService for Maintenance {
    async fn start(&self, mut shutdown: pingora::server::ShutdownWatch) {
        use std::time::Duration;
        let sweep = self
            .registry
            .options()
            .upload_timeout
            .clamp(Duration::from_millis(100), Duration::from_secs(60));
        let mut uploads = tokio::time::interval(sweep);
        uploads.tick().await;
        let mut gc = interval_after_first(self.gc_interval).await;
        let retention_interval = self
            .retention_interval
            .filter(|_| !self.retention.is_empty());
        let mut retention = interval_after_first(retention_interval).await;
        loop {
            tokio::select! {
                _ = uploads.tick() => {
                    // Expiring removes files: on the blocking pool.
                    let registry = self.registry.clone();
                    match tokio::task::spawn_blocking(move || registry.expire_uploads()).await {
                        Ok(0) => {}
                        Ok(removed) => tracing::info!(removed, "abandoned uploads removed"),
                        Err(e) => tracing::error!(error = %e, "upload expiry task failed"),
                    }
                }
                _ = next_tick(&mut gc) => {
                    let registry = self.registry.clone();
                    let grace = self.gc_grace;
                    let result = tokio::task::spawn_blocking(move || registry.collect_garbage(grace)).await;
                    match result {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => tracing::error!(error = %e, "garbage collection failed"),
                        Err(e) => tracing::error!(error = %e, "garbage collection task failed"),
                    }
                }
                _ = next_tick(&mut retention) => {
                    let (registry, policies) = (self.registry.clone(), self.retention.clone());
                    let now = self.clock.now_ms();
                    let result = tokio::task::spawn_blocking(move || registry.apply_retention(&policies, now, false)).await;
                    match result {
                        Ok(Ok(r)) => tracing::info!(
                            repositories = r.repositories_checked,
                            tags_deleted = r.tags_deleted(),
                            manifests_deleted = r.manifests_deleted(),
                            referrers_deleted = r.referrers_deleted(),
                            "retention applied"
                        ),
                        Ok(Err(e)) => tracing::error!(error = %e, "retention failed"),
                        Err(e) => tracing::error!(error = %e, "retention task failed"),
                    }
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_ranges_never_overflow() {
        let ok = |v: &str| parse_content_range(v).map_err(|e| e.code);
        assert_eq!(ok("0-9"), Ok(ChunkRange { start: 0, end: 10 }));
        assert_eq!(ok("bytes 5-5"), Ok(ChunkRange { start: 5, end: 6 }));
        assert_eq!(
            ok("0-18446744073709551614"),
            Ok(ChunkRange {
                start: 0,
                end: u64::MAX
            })
        );
        for bad in [
            "0-18446744073709551615",
            "18446744073709551615-18446744073709551615",
            "0-18446744073709551616",
            "9-3",
            "-3",
            "x-1",
        ] {
            assert_eq!(ok(bad), Err(Code::BlobUploadInvalid), "{bad}");
        }
    }
}
