//! berth's pull-through cache: upstream registries, verified fills, coalescing and tag
//! freshness, on top of `berth-store`.
//!
//! Invariants this crate keeps:
//! - content is published to the store only after its digest is verified (blobs while
//!   they stream, manifests before they are stored), and a client reading a fill in
//!   progress never receives the last byte of a blob that failed verification;
//! - concurrent misses for one blob, one manifest digest or one tag cost one upstream
//!   fetch ([`fill`]); a fill runs in its own task and finishes even if every client that
//!   wanted it went away;
//! - anything addressed by digest is served locally once stored; tags follow [`tags`];
//! - nothing a client sent is forwarded upstream except the manifest `Accept` header, and
//!   upstream credentials never leave [`upstream`].
//!
//! Use: build a [`Cache`] from a [`config::Config`] and a [`berth_store::Store`], then
//! call [`Cache::manifest`], [`Cache::blob`], [`Cache::blob_size`] and
//! [`Cache::tags_list`] with a configured upstream namespace and a validated repository.

pub mod access;
pub mod clock;
pub mod config;
pub mod fill;
pub mod glob;
pub mod metrics;
pub mod tags;
pub mod upstream;

use std::collections::HashMap;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures_util::{FutureExt, StreamExt};
use reqwest::Method;

use berth_store::oci::{Digest, Reference, MANIFEST_ACCEPT_DEFAULT};
use berth_store::{ManifestRecord, Store, StoreError, StoredBlob, TagKey, TagRecord};

use clock::Clock;
use config::Config;
use fill::{BlobFill, BlobFills, FillLock, FillProgress, Role};
use metrics::CacheMetrics;
use tags::Freshness;
use upstream::{Retry, UpstreamClient};

/// The largest manifest berth accepts from an upstream (the limit registries commonly use).
pub const MAX_MANIFEST_BYTES: usize = 4 * 1024 * 1024;
/// The largest tag list passed through.
const MAX_TAG_LIST_BYTES: usize = 16 * 1024 * 1024;
/// Blob bytes gathered before one write to disk.
const WRITE_BATCH: usize = 1024 * 1024;

/// What went wrong, in terms a caller can act on.
#[derive(Debug)]
pub enum CacheError {
    /// The upstream (or the store, for content addressed by digest) does not have it.
    NotFound,
    /// The bytes an upstream sent do not match the digest that names them.
    DigestMismatch {
        expected: Digest,
        actual: Digest,
    },
    /// The upstream sent a different number of bytes than it announced.
    SizeMismatch {
        expected: u64,
        actual: u64,
    },
    /// The upstream could not be reached or did not answer in time.
    UpstreamUnreachable {
        registry: String,
        reason: String,
    },
    /// The upstream refused berth's (anonymous or configured) credentials.
    UpstreamDenied {
        registry: String,
        repo: String,
    },
    UpstreamRateLimited {
        registry: String,
    },
    /// The upstream answered with an unexpected status.
    Upstream {
        registry: String,
        status: u16,
    },
    /// The upstream sent something berth cannot use.
    UpstreamInvalid {
        registry: String,
        reason: String,
    },
    /// The blob fill this request was reading failed.
    FillFailed(Arc<CacheError>),
    Store(String),
    Internal(String),
}

impl std::fmt::Display for CacheError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CacheError::NotFound => f.write_str("not found"),
            CacheError::DigestMismatch { expected, actual } => write!(
                f,
                "upstream content does not match its digest: expected {expected}, got {actual}"
            ),
            CacheError::SizeMismatch { expected, actual } => write!(
                f,
                "upstream sent {actual} bytes where it announced {expected}"
            ),
            CacheError::UpstreamUnreachable { registry, reason } => {
                write!(f, "upstream {registry} is unreachable: {reason}")
            }
            CacheError::UpstreamDenied { registry, repo } => {
                write!(f, "upstream {registry} refused access to {repo}")
            }
            CacheError::UpstreamRateLimited { registry } => {
                write!(f, "upstream {registry} is rate limiting berth")
            }
            CacheError::Upstream { registry, status } => {
                write!(f, "upstream {registry} answered HTTP {status}")
            }
            CacheError::UpstreamInvalid { registry, reason } => {
                write!(f, "upstream {registry} sent an unusable answer: {reason}")
            }
            CacheError::FillFailed(e) => write!(f, "blob fill failed: {e}"),
            CacheError::Store(e) => write!(f, "store error: {e}"),
            CacheError::Internal(e) => write!(f, "internal error: {e}"),
        }
    }
}

impl std::error::Error for CacheError {}

impl From<StoreError> for CacheError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::DigestMismatch { expected, actual } => {
                CacheError::DigestMismatch { expected, actual }
            }
            StoreError::SizeMismatch { expected, actual } => {
                CacheError::SizeMismatch { expected, actual }
            }
            other => CacheError::Store(other.to_string()),
        }
    }
}

/// How a request was served, for logs and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// From the local store, without asking the upstream.
    Hit,
    /// Fetched from the upstream by this request.
    Miss,
    /// Joined another request's upstream fetch.
    Coalesced,
    /// A cached tag confirmed by an upstream `HEAD`.
    Revalidated,
    /// A cached tag served because the upstream could not confirm it.
    Stale,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::Miss => "miss",
            Outcome::Coalesced => "coalesced",
            Outcome::Revalidated => "revalidated",
            Outcome::Stale => "stale",
        }
    }
}

/// A manifest exactly as the upstream served it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    pub digest: Digest,
    pub media_type: String,
    pub body: Bytes,
    /// `digest` as text, made once: it goes into every response.
    pub digest_text: String,
}

impl Manifest {
    pub fn new(digest: Digest, media_type: String, body: Bytes) -> Self {
        Manifest {
            digest_text: digest.to_string(),
            digest,
            media_type,
            body,
        }
    }
}

/// Where a blob's bytes come from.
pub enum BlobSource {
    /// A published, verified blob.
    Stored { blob: StoredBlob },
    /// A fill in progress (or just finished) that this request may read as it grows.
    Filling { fill: Arc<BlobFill>, size: u64 },
}

impl BlobSource {
    pub fn size(&self) -> u64 {
        match self {
            BlobSource::Stored { blob } => blob.size(),
            BlobSource::Filling { size, .. } => *size,
        }
    }
}

/// The pull-through cache over all configured upstreams.
pub struct Cache {
    store: Arc<Store>,
    upstreams: HashMap<String, Arc<UpstreamClient>>,
    blob_fills: BlobFills,
    manifest_lock: FillLock<Digest, Arc<Manifest>>,
    tag_lock: FillLock<TagKey, (Arc<Manifest>, Outcome)>,
    hot_tags: moka::future::Cache<TagKey, TagRecord>,
    hot_manifests: moka::future::Cache<Digest, Arc<Manifest>>,
    /// When (by [`Cache::clock`], in ms) a tag's revalidation last failed (kept for
    /// [`tags::REVALIDATION_BACKOFF`]).
    failed_revalidations: moka::future::Cache<TagKey, u64>,
    /// The time tag freshness and the backoff are judged by.
    clock: Clock,
}

impl Cache {
    /// Builds the cache; fails if an upstream client cannot be built (for example, its
    /// credentials cannot be read).
    pub fn new(
        config: &Config,
        store: Arc<Store>,
        metrics: CacheMetrics,
        clock: Clock,
    ) -> Result<Arc<Cache>, String> {
        let mut upstreams = HashMap::new();
        for u in &config.upstreams {
            upstreams.insert(
                u.namespace.clone(),
                Arc::new(UpstreamClient::new(u.clone(), metrics.clone())?),
            );
        }
        Ok(Arc::new(Cache {
            store,
            upstreams,
            blob_fills: BlobFills::default(),
            manifest_lock: FillLock::default(),
            tag_lock: FillLock::default(),
            hot_tags: moka::future::Cache::builder().max_capacity(100_000).build(),
            hot_manifests: moka::future::Cache::builder()
                .weigher(|_, m: &Arc<Manifest>| m.body.len().try_into().unwrap_or(u32::MAX))
                .max_capacity(16 * 1024 * 1024)
                .build(),
            failed_revalidations: moka::future::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(tags::REVALIDATION_BACKOFF)
                .build(),
            clock,
        }))
    }

    /// The configured upstream clients call `namespace`.
    pub fn upstream(&self, namespace: &str) -> Option<&Arc<UpstreamClient>> {
        self.upstreams.get(namespace)
    }

    fn client(&self, namespace: &str) -> Result<Arc<UpstreamClient>, CacheError> {
        self.upstreams
            .get(namespace)
            .cloned()
            .ok_or_else(|| CacheError::Internal(format!("no upstream {namespace:?}")))
    }

    async fn stored_manifest(&self, digest: &Digest) -> Result<Option<Arc<Manifest>>, CacheError> {
        if let Some(m) = self.hot_manifests.get(digest).await {
            return Ok(Some(m));
        }
        let Some(rec) = self.store.meta.get_manifest(digest)? else {
            return Ok(None);
        };
        let m = Arc::new(Manifest::new(digest.clone(), rec.media_type, rec.body));
        self.hot_manifests.insert(digest.clone(), m.clone()).await;
        Ok(Some(m))
    }

    async fn tag_record(&self, key: &TagKey) -> Result<Option<TagRecord>, CacheError> {
        if let Some(r) = self.hot_tags.get(key).await {
            return Ok(Some(r));
        }
        let rec = self.store.meta.get_tag(key)?;
        if let Some(r) = &rec {
            self.hot_tags.insert(key.clone(), r.clone()).await;
        }
        Ok(rec)
    }

    async fn confirm_tag(&self, key: &TagKey, digest: &Digest) -> Result<(), CacheError> {
        let rec = TagRecord {
            digest: digest.clone(),
            confirmed_at_ms: self.clock.now_ms(),
        };
        self.store.meta.put_tag(key, &rec)?;
        self.hot_tags.insert(key.clone(), rec).await;
        Ok(())
    }

    /// A manifest by tag or digest. `accept` is the client's `Accept` header, forwarded
    /// to the upstream when berth has to ask it.
    pub async fn manifest(
        self: &Arc<Self>,
        namespace: &str,
        repo: &str,
        reference: &Reference,
        accept: Option<&str>,
    ) -> Result<(Arc<Manifest>, Outcome), CacheError> {
        let client = self.client(namespace)?;
        let accept = accept
            .filter(|a| !a.trim().is_empty() && *a != "*/*")
            .unwrap_or(MANIFEST_ACCEPT_DEFAULT)
            .to_owned();
        match reference {
            Reference::Digest(digest) => {
                if let Some(m) = self.stored_manifest(digest).await? {
                    return Ok((m, Outcome::Hit));
                }
                let this = self.clone();
                let (repo2, digest2) = (repo.to_owned(), digest.clone());
                let (result, role) = self
                    .manifest_lock
                    .run(digest.clone(), async move {
                        this.fetch_manifest(
                            &client,
                            &repo2,
                            &Reference::Digest(digest2),
                            &accept,
                            Retry::Yes,
                        )
                        .await
                    })
                    .await;
                let m = result.map_err(unshare)?;
                Ok((m, coalesced(Outcome::Miss, role)))
            }
            Reference::Tag(tag) => {
                let key = TagKey {
                    upstream: namespace.to_owned(),
                    repo: repo.to_owned(),
                    tag: tag.clone(),
                    variant: berth_store::oci::accept_variant(&accept),
                };
                let cached = match self.tag_record(&key).await? {
                    Some(rec) => self.stored_manifest(&rec.digest).await?.map(|m| {
                        (
                            m,
                            tags::freshness(&rec, self.clock.now_ms(), client.config.tag_ttl),
                        )
                    }),
                    None => None,
                };
                let this = self.clone();
                let (result, role) = match cached {
                    Some((m, Freshness::Fresh)) => return Ok((m, Outcome::Hit)),
                    Some((m, Freshness::Revalidate))
                        if self.failed_revalidations.get(&key).await.is_some_and(|at| {
                            tags::in_backoff(at, self.clock.now_ms(), client.config.tag_ttl)
                        }) =>
                    {
                        // The upstream failed to confirm this tag moments ago: serve it
                        // stale at once rather than wait out another timeout.
                        return Ok((m, Outcome::Stale));
                    }
                    Some((m, Freshness::Revalidate)) => {
                        self.tag_lock
                            .run(key.clone(), async move {
                                this.revalidate(&client, &key, m, &accept).await
                            })
                            .await
                    }
                    None => {
                        self.tag_lock
                            .run(key.clone(), async move {
                                let m = this
                                    .fetch_manifest(
                                        &client,
                                        &key.repo,
                                        &Reference::Tag(key.tag.clone()),
                                        &accept,
                                        Retry::Yes,
                                    )
                                    .await?;
                                this.confirm_tag(&key, &m.digest).await?;
                                Ok((m, Outcome::Miss))
                            })
                            .await
                    }
                };
                let (m, outcome) = result.map_err(unshare)?;
                Ok((m, coalesced(outcome, role)))
            }
        }
    }

    /// Asks the upstream whether a cached tag still names `cached`; see [`tags`].
    async fn revalidate(
        &self,
        client: &UpstreamClient,
        key: &TagKey,
        cached: Arc<Manifest>,
        accept: &str,
    ) -> Result<(Arc<Manifest>, Outcome), CacheError> {
        let suffix = format!("manifests/{}", key.tag);
        let head = client
            .request(Method::HEAD, &key.repo, &suffix, Some(accept), Retry::No)
            .await;
        let result = match head {
            Ok(resp) => {
                let current = header_digest(resp.headers());
                if current.as_ref() == Some(&cached.digest) {
                    self.confirm_tag(key, &cached.digest).await?;
                    return Ok((cached, Outcome::Revalidated));
                }
                let tag = Reference::Tag(key.tag.clone());
                match self
                    .fetch_manifest(client, &key.repo, &tag, accept, Retry::No)
                    .await
                {
                    Ok(m) => {
                        self.confirm_tag(key, &m.digest).await?;
                        return Ok((m, Outcome::Miss));
                    }
                    Err(e) => e,
                }
            }
            Err(CacheError::NotFound) => {
                self.store.meta.delete_tag(key)?;
                self.hot_tags.invalidate(key).await;
                return Err(CacheError::NotFound);
            }
            Err(e) => e,
        };
        tracing::warn!(
            upstream = %key.upstream, repo = %key.repo, tag = %key.tag, error = %result,
            "serving a stale tag: the upstream could not confirm it"
        );
        self.failed_revalidations
            .insert(key.clone(), self.clock.now_ms())
            .await;
        Ok((cached, Outcome::Stale))
    }

    /// GETs a manifest, verifies it, and stores it under its digest.
    async fn fetch_manifest(
        &self,
        client: &UpstreamClient,
        repo: &str,
        reference: &Reference,
        accept: &str,
        retry: Retry,
    ) -> Result<Arc<Manifest>, CacheError> {
        let suffix = format!("manifests/{reference}");
        let resp = client
            .request(Method::GET, repo, &suffix, Some(accept), retry)
            .await?;
        let registry = &client.config.namespace;
        let invalid = |reason: &str| CacheError::UpstreamInvalid {
            registry: registry.clone(),
            reason: reason.to_owned(),
        };
        let media_type = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or("").trim().to_owned())
            .filter(|v| is_media_type(v))
            .ok_or_else(|| invalid("manifest without a valid Content-Type"))?;
        let announced = header_digest(resp.headers());
        let body = read_limited(resp, MAX_MANIFEST_BYTES, client).await?;
        let expected = match reference {
            Reference::Digest(d) => Some(d.clone()),
            Reference::Tag(_) => announced,
        };
        let digest = match expected {
            Some(d) if d.matches(&body) => d,
            Some(d) => {
                let actual = Digest::sha256_of(&body);
                tracing::error!(upstream = %registry, repo, expected = %d, actual = %actual,
                    "manifest does not match its digest; not cached");
                return Err(CacheError::DigestMismatch {
                    expected: d,
                    actual,
                });
            }
            None => Digest::sha256_of(&body),
        };
        self.store.meta.put_manifest(
            &digest,
            &ManifestRecord {
                media_type: media_type.clone(),
                body: body.clone(),
            },
        )?;
        let m = Arc::new(Manifest::new(digest.clone(), media_type, body));
        self.hot_manifests.insert(digest, m.clone()).await;
        Ok(m)
    }

    /// A stored blob this cache fetched from an upstream. The store also holds blobs
    /// pushed to private repositories; those are not readable through an upstream
    /// namespace (the upstream must serve it once, which also proves it has it).
    fn cached_blob(&self, digest: &Digest) -> Result<Option<StoredBlob>, CacheError> {
        if self.store.meta.get_blob(digest)?.is_none() {
            return Ok(None);
        }
        Ok(self.store.blobs.open_blob(digest)?)
    }

    /// The size of a blob: from the store, a fill in progress, or an upstream `HEAD`.
    pub async fn blob_size(
        self: &Arc<Self>,
        namespace: &str,
        repo: &str,
        digest: &Digest,
    ) -> Result<(u64, Outcome), CacheError> {
        if let Some(blob) = self.cached_blob(digest)? {
            return Ok((blob.size(), Outcome::Hit));
        }
        let client = self.client(namespace)?;
        let resp = client
            .request(
                Method::HEAD,
                repo,
                &format!("blobs/{digest}"),
                None,
                Retry::Yes,
            )
            .await?;
        let size = resp
            .headers()
            .get(reqwest::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .ok_or_else(|| CacheError::UpstreamInvalid {
                registry: namespace.to_owned(),
                reason: "blob HEAD without Content-Length".into(),
            })?;
        Ok((size, Outcome::Miss))
    }

    /// A blob: the stored file, or a fill of it from the upstream that the caller reads as
    /// it arrives (started by this call or joined).
    pub async fn blob(
        self: &Arc<Self>,
        namespace: &str,
        repo: &str,
        digest: &Digest,
    ) -> Result<(BlobSource, Outcome), CacheError> {
        if let Some(blob) = self.cached_blob(digest)? {
            return Ok((BlobSource::Stored { blob }, Outcome::Hit));
        }
        let client = self.client(namespace)?;
        let (fill, progress) = self.blob_fills.join_or_start(digest);
        let outcome = match progress {
            Some(progress) => {
                let this = self.clone();
                let repo_key = format!("{namespace}/{repo}");
                let repo = repo.to_owned();
                let digest = digest.clone();
                tokio::spawn(async move {
                    // Forgets the fill however this task ends, even by a panic (and then
                    // dropping `progress` fails its readers).
                    let registered = RegisteredFill {
                        cache: this.clone(),
                        fill: progress.fill().clone(),
                    };
                    let result = this
                        .fill_blob(&client, &repo, &repo_key, &digest, &progress)
                        .await;
                    if let Err(e) = &result {
                        tracing::error!(upstream = %client.config.namespace, repo = %repo,
                            digest = %digest, error = %e, "blob fill failed; nothing cached");
                    }
                    client
                        .metrics
                        .fill(&client.config.namespace, result.is_ok());
                    drop(registered);
                    progress.finish(result);
                });
                Outcome::Miss
            }
            None => Outcome::Coalesced,
        };
        let size = fill.size().await.map_err(unshare)?;
        Ok((BlobSource::Filling { fill, size }, outcome))
    }

    /// Streams a blob from the upstream into the store, publishing progress as it goes.
    async fn fill_blob(
        &self,
        client: &UpstreamClient,
        repo: &str,
        repo_key: &str,
        digest: &Digest,
        progress: &FillProgress,
    ) -> Result<u64, CacheError> {
        // Published while this fill was being registered: serve that.
        if let Some(blob) = self.cached_blob(digest)? {
            let size = blob.size();
            progress.streaming(size, blob.into_file());
            return Ok(size);
        }
        let resp = client
            .request(
                Method::GET,
                repo,
                &format!("blobs/{digest}"),
                None,
                Retry::Yes,
            )
            .await?;
        let announced = resp.content_length();
        let mut writer = self.store.blobs.writer(digest)?;
        if let Some(size) = announced {
            progress.streaming(size, writer.reader()?);
        }
        let read_timeout = client.config.read_timeout;
        let mut stream = resp.bytes_stream();
        let mut written = 0u64;
        let mut ended = false;
        while !ended {
            let first = match tokio::time::timeout(read_timeout, stream.next()).await {
                Err(_) => return Err(unreachable(client, "blob download stalled")),
                Ok(None) => break,
                Ok(Some(chunk)) => {
                    chunk.map_err(|e| unreachable(client, &upstream::describe(&e)))?
                }
            };
            let mut batch = vec![first];
            let mut len = batch[0].len();
            while len < WRITE_BATCH {
                match stream.next().now_or_never() {
                    Some(Some(chunk)) => {
                        let chunk =
                            chunk.map_err(|e| unreachable(client, &upstream::describe(&e)))?;
                        len += chunk.len();
                        batch.push(chunk);
                    }
                    Some(None) => {
                        ended = true;
                        break;
                    }
                    None => break,
                }
            }
            if let Some(size) = announced {
                if written + len as u64 > size {
                    return Err(CacheError::SizeMismatch {
                        expected: size,
                        actual: written + len as u64,
                    });
                }
            }
            writer = tokio::task::spawn_blocking(move || {
                for chunk in &batch {
                    writer.write(chunk)?;
                }
                Ok::<_, StoreError>(writer)
            })
            .await
            .map_err(|e| CacheError::Internal(format!("write task failed: {e}")))??;
            written += len as u64;
            client.metrics.bytes(&client.config.namespace, len as u64);
            progress.written(written);
        }
        let reader = if announced.is_none() {
            Some(writer.reader()?)
        } else {
            None
        };
        let size = tokio::task::spawn_blocking(move || writer.commit(announced))
            .await
            .map_err(|e| CacheError::Internal(format!("commit task failed: {e}")))??;
        if let Some(file) = reader {
            progress.streaming(size, file);
        }
        // The blob is verified and published: a failure to index it must not fail the
        // clients reading it.
        if let Err(e) = self
            .store
            .meta
            .record_blob(digest, size, repo_key, self.clock.now_ms())
        {
            tracing::error!(digest = %digest, error = %e, "could not index a stored blob");
        }
        Ok(size)
    }

    /// `tags/list` passed through from the upstream: the body, its content type and the
    /// `Link` header (as the upstream wrote it).
    pub async fn tags_list(
        &self,
        namespace: &str,
        repo: &str,
        query: Option<&str>,
    ) -> Result<(Bytes, Option<String>, Option<String>), CacheError> {
        let client = self.client(namespace)?;
        let suffix = match query {
            Some(q) if !q.is_empty() => format!("tags/list?{q}"),
            _ => "tags/list".to_owned(),
        };
        let resp = client
            .request(Method::GET, repo, &suffix, None, Retry::Yes)
            .await?;
        let header = |name| {
            resp.headers()
                .get(name)
                .and_then(|v: &reqwest::header::HeaderValue| v.to_str().ok())
                .map(str::to_owned)
        };
        let content_type = header(reqwest::header::CONTENT_TYPE);
        let link = header(reqwest::header::LINK);
        let body = read_limited(resp, MAX_TAG_LIST_BYTES, &client).await?;
        Ok((body, content_type, link))
    }

    /// How many blob fills are running.
    pub fn fills_in_progress(&self) -> usize {
        self.blob_fills.len()
    }
}

/// A blob fill's registration, removed when dropped.
struct RegisteredFill {
    cache: Arc<Cache>,
    fill: Arc<BlobFill>,
}

impl Drop for RegisteredFill {
    fn drop(&mut self) {
        self.cache.blob_fills.remove(&self.fill);
    }
}

fn coalesced(outcome: Outcome, role: Role) -> Outcome {
    match (role, outcome) {
        (Role::Reader, Outcome::Miss | Outcome::Revalidated) => Outcome::Coalesced,
        _ => outcome,
    }
}

/// Turns a shared error (from a coalesced fetch) back into an owned one.
fn unshare(e: Arc<CacheError>) -> CacheError {
    match Arc::try_unwrap(e) {
        Ok(e) => e,
        Err(shared) => match &*shared {
            CacheError::NotFound => CacheError::NotFound,
            CacheError::DigestMismatch { expected, actual } => CacheError::DigestMismatch {
                expected: expected.clone(),
                actual: actual.clone(),
            },
            CacheError::UpstreamUnreachable { registry, reason } => {
                CacheError::UpstreamUnreachable {
                    registry: registry.clone(),
                    reason: reason.clone(),
                }
            }
            CacheError::UpstreamDenied { registry, repo } => CacheError::UpstreamDenied {
                registry: registry.clone(),
                repo: repo.clone(),
            },
            CacheError::UpstreamRateLimited { registry } => CacheError::UpstreamRateLimited {
                registry: registry.clone(),
            },
            CacheError::Upstream { registry, status } => CacheError::Upstream {
                registry: registry.clone(),
                status: *status,
            },
            CacheError::Store(e) => CacheError::Store(e.clone()),
            CacheError::Internal(e) => CacheError::Internal(e.clone()),
            _ => CacheError::FillFailed(shared),
        },
    }
}

fn unreachable(client: &UpstreamClient, why: &str) -> CacheError {
    CacheError::UpstreamUnreachable {
        registry: client.config.namespace.clone(),
        reason: why.to_owned(),
    }
}

/// `type/subtype`, short and printable: what berth stores and hands back to clients.
fn is_media_type(v: &str) -> bool {
    v.len() <= 255
        && v.split_once('/')
            .is_some_and(|(t, st)| !t.is_empty() && !st.is_empty())
        && v.bytes().all(|b| b.is_ascii_graphic())
}

fn header_digest(h: &reqwest::header::HeaderMap) -> Option<Digest> {
    h.get("docker-content-digest")?.to_str().ok()?.parse().ok()
}

/// Reads a whole response body of at most `limit` bytes, each chunk within the read timeout.
async fn read_limited(
    resp: reqwest::Response,
    limit: usize,
    client: &UpstreamClient,
) -> Result<Bytes, CacheError> {
    if resp.content_length().is_some_and(|n| n > limit as u64) {
        return Err(CacheError::UpstreamInvalid {
            registry: client.config.namespace.clone(),
            reason: format!("response larger than {limit} bytes"),
        });
    }
    let mut stream = resp.bytes_stream();
    let mut body = BytesMut::new();
    loop {
        match tokio::time::timeout(client.config.read_timeout, stream.next()).await {
            Err(_) => return Err(unreachable(client, "response body stalled")),
            Ok(None) => return Ok(body.freeze()),
            Ok(Some(chunk)) => {
                let chunk = chunk.map_err(|e| unreachable(client, &upstream::describe(&e)))?;
                if body.len() + chunk.len() > limit {
                    return Err(CacheError::UpstreamInvalid {
                        registry: client.config.namespace.clone(),
                        reason: format!("response larger than {limit} bytes"),
                    });
                }
                client
                    .metrics
                    .bytes(&client.config.namespace, chunk.len() as u64);
                body.extend_from_slice(&chunk);
            }
        }
    }
}
