//! The endpoints of private repositories: pulls, pushes (uploads and manifests),
//! deletes, listings and referrers, over [`berth_registry::Registry`].

use bytes::{Bytes, BytesMut};
use pingora::protocols::http::ServerSession;

use berth_cache::BlobSource;
use berth_registry::{Page, RegistryError, MAX_MANIFEST_BYTES};
use berth_store::oci::{Digest, Reference, OCI_INDEX};

use berth_cache::access::Action;

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

impl App {
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
                self.registry.delete_manifest(repo, r).map_err(api)?;
                Ok(accepted(session).await)
            }
            (Endpoint::Blob(d), "GET" | "HEAD") => self.get_blob(session, req, repo, d).await,
            (Endpoint::Blob(d), "DELETE") => {
                self.registry.delete_blob(repo, d).map_err(api)?;
                Ok(accepted(session).await)
            }
            (Endpoint::Tags, "GET" | "HEAD") => {
                let (n, last) = pagination(req)?;
                let page = self
                    .registry
                    .tags(repo, Some(n), last.as_deref())
                    .map_err(api)?;
                let body = serde_json::json!({"name": repo, "tags": page.items});
                let link = format!("/v2/{repo}/tags/list");
                Ok(send_page(session, req, body, &link, n, &page).await)
            }
            (Endpoint::Uploads, "POST") => self.post_upload(session, req, who, repo).await,
            (Endpoint::Upload(id), "GET") => {
                let upload = self.registry.upload(repo, id).map_err(api)?;
                let offset = upload.lock().await.offset();
                Ok(send_head(session, 204, upload_headers(repo, id, offset), 0, None).await)
            }
            (Endpoint::Upload(id), "PATCH") => {
                let upload = self.receive_chunk(session, req, repo, id).await?;
                let headers = upload_headers(repo, id, upload.offset());
                Ok(send_head(session, 202, headers, 0, None).await)
            }
            (Endpoint::Upload(id), "PUT") => {
                let digest = digest_param(req)?;
                let upload = self.receive_chunk(session, req, repo, id).await?;
                self.finish(upload, &digest).await?;
                Ok(blob_created(session, repo, &digest).await)
            }
            (Endpoint::Upload(id), "DELETE") => {
                let upload = self.registry.upload(repo, id).map_err(api)?;
                self.registry.cancel_upload(&mut *upload.lock().await);
                Ok(send_head(session, 204, Vec::new(), 0, None).await)
            }
            (Endpoint::Referrers(subject), "GET" | "HEAD") => {
                let filter = req
                    .query
                    .as_deref()
                    .and_then(|q| query_param(q, "artifactType"));
                let body = self
                    .registry
                    .referrers(repo, subject, filter.as_deref())
                    .map_err(api)?;
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

    /// Appends the request body (a chunk, possibly empty) to upload `id`, checking that
    /// its `Content-Range`, if any, continues the upload. Returns the upload, locked.
    async fn receive_chunk(
        &self,
        session: &mut ServerSession,
        req: &Request,
        repo: &str,
        id: &str,
    ) -> Result<tokio::sync::OwnedMutexGuard<berth_registry::Upload>, ApiError> {
        let upload = self.registry.upload(repo, id).map_err(api)?;
        let mut upload = upload.lock_owned().await;
        let range = content_range(req)?;
        if let Some((start, _)) = range {
            upload
                .check_chunk_start(start)
                .map_err(|e| chunk_error(e, repo, id))?;
        }
        read_body_into(session, &mut upload).await?;
        if let Some((start, end)) = range {
            if upload.offset() != end + 1 {
                let e = ApiError::new(
                    Code::ChunkOutOfOrder,
                    format!(
                        "Content-Range {start}-{end} announced {} bytes, but {} came",
                        end + 1 - start,
                        upload.offset() - start
                    ),
                );
                return Err(e.with_headers(upload_headers(repo, id, upload.offset())));
            }
        }
        Ok(upload)
    }

    /// Completes an upload as `digest`, on the blocking pool (it syncs the file to disk,
    /// and a digest other than sha256 reads it again).
    async fn finish(
        &self,
        mut upload: tokio::sync::OwnedMutexGuard<berth_registry::Upload>,
        digest: &Digest,
    ) -> Result<(), ApiError> {
        let registry = self.registry.clone();
        let digest = digest.clone();
        tokio::task::spawn_blocking(move || registry.finish_upload(&mut upload, &digest, None))
            .await
            .map_err(|e| ApiError::new(Code::Internal, format!("the upload task failed: {e}")))?
            .map(|_| ())
            .map_err(api)
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
            } => grants
                .iter()
                .any(|g| g.kind == "registry" && g.name == "catalog")
                .then(|| Identity::User {
                    name: name.clone(),
                    groups: groups.clone(),
                    grants: None,
                    login: *login,
                }),
            other => Some(other.clone()),
        };
        let readable = |repo: &str| {
            lister
                .as_ref()
                .is_some_and(|w| self.auth.allows(w, repo, Action::Read))
        };
        let (items, next) = self.readable_repos(n, last, readable)?;
        let body = serde_json::json!({"repositories": items});
        Ok(send_page_after(session, req, body, "/v2/_catalog", n, next.as_deref()).await)
    }

    /// Up to `n` repositories after `last` that pass `readable`, and the name to continue
    /// after when the listing goes on.
    fn readable_repos(
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
            let page = self
                .registry
                .catalog(Some(batch), cursor.as_deref())
                .map_err(api)?;
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
        let m = self.registry.manifest(repo, reference).map_err(api)?;
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
            .map(|q| {
                q.split('&')
                    .filter_map(|p| p.strip_prefix("tag="))
                    .map(crate::route::percent_decode)
                    .collect()
            })
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
        // Moving a tag to another manifest needs update as well as create.
        let digest = match reference {
            Reference::Digest(d) => d.clone(),
            Reference::Tag(_) => Digest::sha256_of(&body),
        };
        for tag in tags.iter().chain(main_tag) {
            let moved = self
                .registry
                .tag_target(repo, tag)
                .map_err(api)?
                .is_some_and(|d| d != digest);
            if moved && !self.auth.allows(who, repo, Action::Update) {
                let scope = format!("repository:{repo}:pull,push");
                return Err(self.deny(
                    req,
                    who,
                    &format!("update (move tag {tag}) on {repo}"),
                    Some(scope),
                ));
            }
        }
        let pushed = self
            .registry
            .put_manifest(repo, reference, &tags, &media_type, body)
            .map_err(api)?;
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
        let blob = self.registry.blob(repo, digest).map_err(api)?;
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
                && self.registry.mount(repo, &digest, &from).map_err(api)?
            {
                return Ok(blob_created(session, repo, &digest).await);
            }
            // Otherwise an ordinary upload, as the specification says.
        }
        let digest = query_param(query, "digest")
            .map(|d| parse_digest(&d))
            .transpose()?;
        let upload = self.registry.start_upload(repo).map_err(api)?;
        let mut upload = upload.lock_owned().await;
        let Some(digest) = digest else {
            let headers = upload_headers(repo, upload.id(), 0);
            return Ok(send_head(session, 202, headers, 0, None).await);
        };
        // Monolithic: the client has no Location for this upload, so it must not
        // outlive this request.
        if let Err(e) = read_body_into(session, &mut upload).await {
            self.registry.cancel_upload(&mut upload);
            return Err(e);
        }
        self.finish(upload, &digest).await?;
        Ok(blob_created(session, repo, &digest).await)
    }
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
        RegistryError::TooManyUploads { .. } => Code::TooManyRequests,
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

/// `Content-Range: <first>-<last>` of an upload chunk, if given.
fn content_range(req: &Request) -> Result<Option<(u64, u64)>, ApiError> {
    let Some(v) = req.content_range.as_deref() else {
        return Ok(None);
    };
    let v = v.trim().strip_prefix("bytes ").unwrap_or(v.trim());
    let range = v
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
    Ok(Some(range))
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
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
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

/// Streams the request body into an upload.
async fn read_body_into(
    session: &mut ServerSession,
    upload: &mut berth_registry::Upload,
) -> Result<(), ApiError> {
    while let Some(chunk) = next_chunk(session).await? {
        upload.write(&chunk).map_err(api)?;
    }
    Ok(())
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

/// Private-registry upkeep in the background: removes abandoned uploads (checked every
/// minute, or every upload timeout if shorter) and, every `gc_interval`, collects
/// garbage older than `gc_grace`.
pub struct Maintenance {
    pub registry: std::sync::Arc<berth_registry::Registry>,
    pub gc_interval: Option<std::time::Duration>,
    pub gc_grace: std::time::Duration,
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
        let mut gc = self.gc_interval.map(tokio::time::interval);
        if let Some(gc) = gc.as_mut() {
            gc.tick().await;
        }
        loop {
            let gc_due = async {
                match gc.as_mut() {
                    Some(gc) => {
                        gc.tick().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = uploads.tick() => {
                    let removed = self.registry.expire_uploads();
                    if removed > 0 {
                        tracing::info!(removed, "abandoned uploads removed");
                    }
                }
                _ = gc_due => {
                    let registry = self.registry.clone();
                    let grace = self.gc_grace;
                    let result = tokio::task::spawn_blocking(move || registry.collect_garbage(grace)).await;
                    match result {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => tracing::error!(error = %e, "garbage collection failed"),
                        Err(e) => tracing::error!(error = %e, "garbage collection task failed"),
                    }
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}
