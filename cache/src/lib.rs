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
//! - anything addressed by digest is served locally once stored, but only through a
//!   repository it was fetched through or that the upstream confirmed has it (one `HEAD`,
//!   remembered in the store's `cache_links`): content cached through one repository is
//!   never served through another without the upstream's word; tags follow [`tags`];
//! - nothing a client sent is forwarded upstream except the manifest `Accept` header, and
//!   upstream credentials never leave [`upstream`].
//!
//! Use: build a [`Cache`] from a [`berth_config::Config`] and a [`berth_store::Store`], then
//! call [`Cache::manifest`], [`Cache::blob`], [`Cache::blob_size`] and
//! [`Cache::tags_list`] with a configured upstream namespace and a validated repository.

pub mod breaker;
pub mod clock;
pub mod contents;
pub mod direct;
pub mod evict;
pub mod fill;
pub mod metrics;
pub mod resume;
pub mod stats;
pub mod tags;
pub mod upstream;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::{FutureExt, StreamExt};
use reqwest::Method;

use berth_store::oci::{Digest, Reference, MANIFEST_ACCEPT_DEFAULT};
use berth_store::{ManifestRecord, Reserve, Store, StoreError, StoredBlob, TagKey, TagRecord};

use berth_config::{CacheConfig, Config};
use clock::Clock;
use direct::DirectBlob;
use evict::{Goal, Measured, Report, Usage};
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
    /// The disk has no room to store this blob (the fill's readers then stream it
    /// straight from the upstream instead).
    NoSpace,
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
            CacheError::NoSpace => f.write_str("the store has no room for this blob"),
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
    /// The values of its response headers, made once: they go into every response.
    pub headers: ManifestHeaders,
}

/// A manifest's `Content-Type`, `Docker-Content-Digest` and `ETag` values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestHeaders {
    /// `None` if the upstream's media type is not a valid header value.
    pub content_type: Option<http::HeaderValue>,
    pub digest: http::HeaderValue,
    pub etag: http::HeaderValue,
}

impl Manifest {
    pub fn new(digest: Digest, media_type: String, body: Bytes) -> Self {
        let text = digest.to_string();
        let value = |s: String| {
            http::HeaderValue::from_maybe_shared(Bytes::from(s))
                .expect("a digest is a valid header value")
        };
        Manifest {
            headers: ManifestHeaders {
                content_type: http::HeaderValue::from_str(&media_type).ok(),
                etag: value(format!("\"{text}\"")),
                digest: value(text),
            },
            digest,
            media_type,
            body,
        }
    }
}

/// A manifest held in memory, with the repositories it was served for.
struct HotManifest {
    manifest: Arc<Manifest>,
    /// `(upstream, repository)` pairs with a cache link to this manifest, found or made
    /// while the manifest was in memory: a hit by digest through one of them needs no
    /// other lookup. At most [`SERVED_FOR_MAX`]; past that, [`Cache::confirm`] answers.
    served_for: std::sync::RwLock<Vec<(Box<str>, Box<str>)>>,
    /// The second (since the epoch) of the last use recorded in the access log.
    touched_s: AtomicU64,
}

/// How many repositories a manifest in memory remembers being linked to.
const SERVED_FOR_MAX: usize = 16;

impl HotManifest {
    fn new(manifest: Arc<Manifest>) -> Self {
        HotManifest {
            manifest,
            served_for: Default::default(),
            touched_s: AtomicU64::new(0),
        }
    }

    /// Records a use in `log`, at most once a second: on the hot path this is one atomic
    /// swap.
    fn touch(&self, log: &berth_store::AccessLog, now_ms: u64) {
        let s = now_ms / 1000;
        // Read first: a write every time would take the line away from the other cores,
        // and most uses fall in the second already recorded.
        if self.touched_s.load(Ordering::Relaxed) != s
            && self.touched_s.swap(s, Ordering::Relaxed) != s
        {
            log.touch(&self.manifest.digest, now_ms);
        }
    }

    fn served_for(&self, namespace: &str, repo: &str) -> bool {
        let list = self.served_for.read().unwrap_or_else(|e| e.into_inner());
        list.iter().any(|(n, r)| **n == *namespace && **r == *repo)
    }

    /// Remembers that a cache link of `(namespace, repo)` names this manifest. Links are
    /// never removed while the manifest stays stored; whatever removes one must drop the
    /// manifest from memory too.
    fn remember(&self, namespace: &str, repo: &str) {
        let mut list = self.served_for.write().unwrap_or_else(|e| e.into_inner());
        if list.len() < SERVED_FOR_MAX
            && !list.iter().any(|(n, r)| **n == *namespace && **r == *repo)
        {
            list.push((namespace.into(), repo.into()));
        }
    }
}

/// Where a blob's bytes come from.
pub enum BlobSource {
    /// A published, verified blob.
    Stored { blob: StoredBlob },
    /// A fill in progress (or just finished) that this request may read as it grows.
    Filling { fill: Arc<BlobFill>, size: u64 },
    /// Straight from the upstream, not stored: the disk has no room for it.
    Direct(Box<DirectBlob>),
}

impl BlobSource {
    pub fn size(&self) -> u64 {
        match self {
            BlobSource::Stored { blob } => blob.size(),
            BlobSource::Filling { size, .. } => *size,
            BlobSource::Direct(d) => d.size(),
        }
    }
}

/// An in-memory map looked up on every request, hashed with foldhash (randomly seeded per
/// map, as std's SipHash is) rather than SipHash: the keys are repository paths, tags
/// and digests, and hashing them was a tenth of a cached manifest's cost.
type Hot<K, V> = moka::future::Cache<K, V, foldhash::quality::RandomState>;

static NEXT_CACHE_ID: AtomicU64 = AtomicU64::new(0);

/// How long a hit [`Cache::manifest_answer`] gave stays the answer to the same request:
/// until anything in memory changes (a tag confirmed, moved or removed, a manifest
/// stored or evicted; [`Cache::still_valid`]), and for a tag, until it is no longer
/// fresh. A server may keep a ready answer for as long as this holds.
#[derive(Clone)]
pub struct HitValidity {
    cache: u64,
    generation: u64,
    /// For a tag: its record as the hit read it, and its TTL.
    tag: Option<(TagRecord, Duration)>,
    /// The manifest in memory, whose every use eviction must hear of.
    hot: Arc<HotManifest>,
}

/// The pull-through cache over all configured upstreams.
pub struct Cache {
    store: Arc<Store>,
    /// Looked up twice per request, hence foldhash (see [`Hot`]).
    upstreams: HashMap<String, Arc<UpstreamClient>, foldhash::quality::RandomState>,
    blob_fills: BlobFills,
    /// Keyed by repository and digest: a fetch for one repository is never handed to
    /// another.
    manifest_lock: FillLock<String, Arc<Manifest>>,
    /// Upstream confirmations that a repository has a digest, coalesced.
    confirm_lock: FillLock<String, ()>,
    /// Cache links recently read or written (see [`link_key`]).
    hot_links: Hot<String, ()>,
    tag_lock: FillLock<TagKey, (Arc<Manifest>, Outcome)>,
    hot_tags: Hot<TagKey, TagRecord>,
    hot_manifests: Hot<Digest, Arc<HotManifest>>,
    /// When (by [`Cache::clock`], in ms) a tag's revalidation last failed (kept for
    /// [`tags::REVALIDATION_BACKOFF`]).
    failed_revalidations: moka::future::Cache<TagKey, u64>,
    /// The time tag freshness and the backoff are judged by.
    clock: Clock,
    /// The largest blob a fill stores (`[server] max_upload_size`), whether or not the
    /// upstream announced its length.
    max_blob_size: u64,
    /// `[cache]`: the disk budget.
    budget: CacheConfig,
    metrics: CacheMetrics,
    /// This cache among the caches of the process (tests run several), for [`HitValidity`].
    id: u64,
    /// Counts the changes to the in-memory tags and manifests (see [`HitValidity`]):
    /// bumped after each one, so that an answer read before a change is not taken for one
    /// read after it.
    generation: AtomicU64,
    /// The store's usage as the last eviction pass measured it, kept current.
    measured: Measured,
    /// One eviction pass at a time.
    evicting: tokio::sync::Mutex<()>,
    /// Wakes the budget loop (after a fill, or when a write found the disk full).
    poke: tokio::sync::Notify,
    /// The last pass could not free what the budget asked: nothing more is evictable
    /// now, and fills that would take the disk past the budget stream through instead.
    stuck: AtomicBool,
    /// The second of the last "could not record" line logged.
    write_failure_logged: AtomicU64,
    /// One scrub at a time.
    scrubbing: tokio::sync::Mutex<()>,
}

/// The store's disk against its budget, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Disk {
    /// Blob files in the store, pulled through and pushed.
    pub used: u64,
    pub budget: Budget,
    /// Free on the store's filesystem.
    pub available: u64,
    /// The filesystem's size.
    pub total: u64,
}

/// How much the store may hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Budget {
    /// `[cache] max_size`.
    MaxSize(u64),
    /// No `max_size`: the filesystem less `[cache] min_free`.
    Filesystem(u64),
}

impl Budget {
    pub fn bytes(self) -> u64 {
        match self {
            Budget::MaxSize(b) | Budget::Filesystem(b) => b,
        }
    }
}

/// What a scrub found.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ScrubReport {
    /// Blobs read and checked.
    pub blobs: u64,
    pub bytes: u64,
    pub damaged: Vec<Damaged>,
}

/// A blob scrub found not matching its digest, and removed.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Damaged {
    pub digest: String,
    /// A private repository linked it: it must be pushed again.
    pub private: bool,
    /// It was fetched again from its upstream.
    pub refetched: bool,
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
        let mut upstreams = HashMap::with_hasher(foldhash::quality::RandomState::default());
        for u in &config.upstreams {
            upstreams.insert(
                u.namespace.clone(),
                Arc::new(UpstreamClient::new(
                    u.clone(),
                    metrics.clone(),
                    clock.clone(),
                )?),
            );
        }
        Ok(Arc::new(Cache {
            store,
            upstreams,
            blob_fills: BlobFills::default(),
            manifest_lock: FillLock::default(),
            confirm_lock: FillLock::default(),
            hot_links: moka::future::Cache::builder()
                .max_capacity(200_000)
                .build_with_hasher(Default::default()),
            tag_lock: FillLock::default(),
            hot_tags: moka::future::Cache::builder()
                .max_capacity(100_000)
                .build_with_hasher(Default::default()),
            hot_manifests: moka::future::Cache::builder()
                .weigher(|_, m: &Arc<HotManifest>| {
                    m.manifest.body.len().try_into().unwrap_or(u32::MAX)
                })
                .max_capacity(16 * 1024 * 1024)
                .build_with_hasher(Default::default()),
            failed_revalidations: moka::future::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(tags::REVALIDATION_BACKOFF)
                .build(),
            max_blob_size: config
                .server
                .max_upload_size
                .unwrap_or(berth_config::DEFAULT_MAX_BLOB_SIZE),
            clock,
            budget: config.cache.clone(),
            metrics: metrics.clone(),
            measured: Measured::default(),
            evicting: tokio::sync::Mutex::new(()),
            poke: tokio::sync::Notify::new(),
            stuck: AtomicBool::new(false),
            write_failure_logged: AtomicU64::new(0),
            scrubbing: tokio::sync::Mutex::new(()),
            id: NEXT_CACHE_ID.fetch_add(1, Ordering::Relaxed),
            generation: AtomicU64::new(0),
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

    /// Runs `f` on the store from the blocking pool: RocksDB calls and file opens never
    /// hold up an async worker (and with it every other request on that worker).
    async fn on_store<T, F>(&self, f: F) -> Result<T, CacheError>
    where
        T: Send + 'static,
        F: FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| CacheError::Internal(format!("store task failed: {e}")))?
            .map_err(CacheError::from)
    }

    async fn stored_manifest(&self, digest: &Digest) -> Result<Option<Arc<Manifest>>, CacheError> {
        Ok(self.hot_manifest(digest).await?.map(|h| h.manifest.clone()))
    }

    /// A stored manifest, from memory if it is there.
    async fn hot_manifest(&self, digest: &Digest) -> Result<Option<Arc<HotManifest>>, CacheError> {
        if let Some(m) = self.hot_manifests.get(digest).await {
            m.touch(&self.store.access, self.clock.now_ms());
            return Ok(Some(m));
        }
        let d = digest.clone();
        let Some(rec) = self.on_store(move |s| s.meta.get_manifest(&d)).await? else {
            return Ok(None);
        };
        let m = Manifest::new(digest.clone(), rec.media_type, rec.body);
        let hot = Arc::new(HotManifest::new(Arc::new(m)));
        hot.touch(&self.store.access, self.clock.now_ms());
        self.hot_manifests.insert(digest.clone(), hot.clone()).await;
        self.changed();
        Ok(Some(hot))
    }

    async fn tag_record(&self, key: &TagKey) -> Result<Option<TagRecord>, CacheError> {
        if let Some(r) = self.hot_tags.get(key).await {
            return Ok(Some(r));
        }
        let k = key.clone();
        let rec = self.on_store(move |s| s.meta.get_tag(&k)).await?;
        if let Some(r) = &rec {
            self.hot_tags.insert(key.clone(), r.clone()).await;
            self.changed();
        }
        Ok(rec)
    }

    /// Whether `digest` may be served from the store for `repo` of `namespace`: it was
    /// fetched through that repository, or the upstream confirmed the repository has it.
    async fn linked(
        &self,
        namespace: &str,
        repo: &str,
        digest: &Digest,
    ) -> Result<bool, CacheError> {
        let key = link_key(namespace, repo, digest);
        if self.hot_links.get(&key).await.is_some() {
            return Ok(true);
        }
        let (ns, r, d) = (namespace.to_owned(), repo.to_owned(), digest.clone());
        if self
            .on_store(move |s| s.meta.cache_link(&ns, &r, &d))
            .await?
        {
            self.hot_links.insert(key, ()).await;
            return Ok(true);
        }
        Ok(false)
    }

    /// Remembers that the upstream has `digest` in `repo`: in memory, and in the store if
    /// it can write (a failed write costs one more `HEAD` later, never this request).
    async fn link(&self, namespace: &str, repo: &str, digest: &Digest) -> Result<(), CacheError> {
        let (ns, r, d) = (namespace.to_owned(), repo.to_owned(), digest.clone());
        let now = self.clock.now_ms();
        if let Err(e) = self
            .on_store(move |s| s.meta.put_cache_link(&ns, &r, &d, now))
            .await
        {
            self.write_failed("a cache link", &e);
        }
        self.hot_links
            .insert(link_key(namespace, repo, digest), ())
            .await;
        Ok(())
    }

    /// Logs a metadata write the read path did without (the content is served anyway)
    /// and wakes the budget loop, which frees space if the disk is full.
    fn write_failed(&self, what: &str, e: &CacheError) {
        // At most one line a second: on a full disk every request would log one.
        let now_s = self.clock.now_ms() / 1000;
        if self.write_failure_logged.swap(now_s, Ordering::Relaxed) != now_s {
            tracing::warn!(error = %e, "could not record {what}; serving without it");
        }
        self.poke.notify_one();
    }

    /// Makes sure `digest` may be served for `repo`: if it is not linked there yet, asks
    /// the upstream with one `HEAD` (coalesced; registries do not count a `HEAD` against
    /// rate limits) and remembers a yes. A no is [`CacheError::NotFound`].
    async fn confirm(
        self: &Arc<Self>,
        client: &Arc<UpstreamClient>,
        repo: &str,
        digest: &Digest,
        kind: Kind,
    ) -> Result<(), CacheError> {
        let namespace = &client.config.namespace;
        if self.linked(namespace, repo, digest).await? {
            return Ok(());
        }
        let (this, client2) = (self.clone(), client.clone());
        let (repo2, digest2) = (repo.to_owned(), digest.clone());
        let (result, _) = self
            .confirm_lock
            .run(link_key(namespace, repo, digest), async move {
                let (suffix, accept) = match kind {
                    Kind::Blob => (format!("blobs/{digest2}"), None),
                    Kind::Manifest => (
                        format!("manifests/{digest2}"),
                        Some(MANIFEST_ACCEPT_DEFAULT),
                    ),
                };
                client2
                    .request(Method::HEAD, &repo2, &suffix, accept, Retry::Yes)
                    .await?;
                this.link(&client2.config.namespace, &repo2, &digest2).await
            })
            .await;
        result.map_err(unshare)
    }

    async fn confirm_tag(&self, key: &TagKey, digest: &Digest) -> Result<(), CacheError> {
        let rec = TagRecord {
            digest: digest.clone(),
            confirmed_at_ms: self.clock.now_ms(),
        };
        let (k, r) = (key.clone(), rec.clone());
        if let Err(e) = self.on_store(move |s| s.meta.put_tag(&k, &r)).await {
            self.write_failed("a tag", &e);
        }
        self.hot_tags.insert(key.clone(), rec).await;
        self.changed();
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
        let (m, outcome, _) = self
            .manifest_answer(namespace, repo, reference, accept)
            .await?;
        Ok((m, outcome))
    }

    /// [`Cache::manifest`], and for a hit answered from memory, how long the same request
    /// gets the same answer (see [`HitValidity`]).
    pub async fn manifest_answer(
        self: &Arc<Self>,
        namespace: &str,
        repo: &str,
        reference: &Reference,
        accept: Option<&str>,
    ) -> Result<(Arc<Manifest>, Outcome, Option<HitValidity>), CacheError> {
        // Read before the lookup: a change made during it makes the answer invalid.
        let generation = self.generation.load(Ordering::Acquire);
        let client = self.client(namespace)?;
        let accept = accept
            .filter(|a| !a.trim().is_empty() && *a != "*/*")
            .unwrap_or(MANIFEST_ACCEPT_DEFAULT);
        // A hit is answered here. Everything else goes on in a boxed future: the future
        // of a fetch is several kilobytes, and a request's future, which holds this one,
        // is moved into a box of its own on every request.
        match reference {
            Reference::Digest(digest) => {
                let hot = self.hot_manifest(digest).await?;
                if let Some(hot) = &hot {
                    if hot.served_for(namespace, repo) {
                        let valid = self.validity(generation, None, hot.clone());
                        return Ok((hot.manifest.clone(), Outcome::Hit, Some(valid)));
                    }
                }
                let (m, outcome) =
                    Box::pin(self.manifest_by_digest(client, namespace, repo, digest, hot, accept))
                        .await?;
                Ok((m, outcome, None))
            }
            Reference::Tag(tag) => {
                let key = TagKey {
                    upstream: namespace.to_owned(),
                    repo: repo.to_owned(),
                    tag: tag.clone(),
                    variant: berth_store::oci::accept_variant(accept),
                };
                let ttl = client.config.tag_ttl;
                let found = match self.tag_record(&key).await? {
                    Some(rec) => self.hot_manifest(&rec.digest).await?.map(|hot| (rec, hot)),
                    None => None,
                };
                let cached = match found {
                    Some((rec, hot)) => {
                        let fresh = tags::freshness(&rec, self.clock.now_ms(), ttl);
                        if fresh == Freshness::Fresh {
                            let m = hot.manifest.clone();
                            let valid = self.validity(generation, Some((rec, ttl)), hot);
                            return Ok((m, Outcome::Hit, Some(valid)));
                        }
                        Some((hot.manifest.clone(), fresh))
                    }
                    None => None,
                };
                let (m, outcome) =
                    Box::pin(self.manifest_by_tag(client, key, cached, accept)).await?;
                Ok((m, outcome, None))
            }
        }
    }

    fn validity(
        &self,
        generation: u64,
        tag: Option<(TagRecord, Duration)>,
        hot: Arc<HotManifest>,
    ) -> HitValidity {
        HitValidity {
            cache: self.id,
            generation,
            tag,
            hot,
        }
    }

    /// Whether a hit this cache answered is still the answer: nothing in memory has
    /// changed since, and a tag is still fresh. If so, the manifest is used again, and
    /// that use is recorded as a hit's is (eviction goes least recently used first).
    pub fn still_valid(&self, v: &HitValidity) -> bool {
        let now = self.clock.now_ms();
        let valid = v.cache == self.id
            && v.generation == self.generation.load(Ordering::Acquire)
            && v.tag
                .as_ref()
                .is_none_or(|(rec, ttl)| tags::freshness(rec, now, *ttl) == Freshness::Fresh);
        if valid {
            v.hot.touch(&self.store.access, now);
        }
        valid
    }

    /// Called after every insert or removal of an in-memory tag or manifest, and after an
    /// eviction pass removed any.
    fn changed(&self) {
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// [`Cache::manifest`] by digest, past a hit: a manifest in memory that this
    /// repository has not been confirmed to hold, or one to look up or fetch.
    async fn manifest_by_digest(
        self: &Arc<Self>,
        client: Arc<UpstreamClient>,
        namespace: &str,
        repo: &str,
        digest: &Digest,
        hot: Option<Arc<HotManifest>>,
        accept: &str,
    ) -> Result<(Arc<Manifest>, Outcome), CacheError> {
        if let Some(hot) = hot {
            self.confirm(&client, repo, digest, Kind::Manifest).await?;
            hot.remember(namespace, repo);
            return Ok((hot.manifest.clone(), Outcome::Hit));
        }
        let this = self.clone();
        let (repo2, digest2, accept) = (repo.to_owned(), digest.clone(), accept.to_owned());
        let (result, role) = self
            .manifest_lock
            .run(link_key(namespace, repo, digest), async move {
                // Stored by a fetch that ended between the look above and
                // this one taking the lock.
                let ns = &client.config.namespace;
                if let Some(m) = this.stored_manifest(&digest2).await? {
                    if this.linked(ns, &repo2, &digest2).await? {
                        return Ok(m);
                    }
                }
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

    /// [`Cache::manifest`] by tag, past a hit: a tag to revalidate, or one to fetch.
    async fn manifest_by_tag(
        self: &Arc<Self>,
        client: Arc<UpstreamClient>,
        key: TagKey,
        cached: Option<(Arc<Manifest>, Freshness)>,
        accept: &str,
    ) -> Result<(Arc<Manifest>, Outcome), CacheError> {
        let this = self.clone();
        let accept = accept.to_owned();
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
                        if let Some(m) = this.fresh_tag(&key, &client).await? {
                            return Ok((m, Outcome::Hit));
                        }
                        this.revalidate(&client, &key, m, &accept).await
                    })
                    .await
            }
            None => {
                self.tag_lock
                    .run(key.clone(), async move {
                        if let Some(m) = this.fresh_tag(&key, &client).await? {
                            return Ok((m, Outcome::Hit));
                        }
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

    /// The manifest a tag names if the tag is fresh: confirmed by a fetch that ended
    /// between a request's first look and its taking the tag's lock.
    async fn fresh_tag(
        &self,
        key: &TagKey,
        client: &UpstreamClient,
    ) -> Result<Option<Arc<Manifest>>, CacheError> {
        match self.tag_record(key).await? {
            Some(rec)
                if matches!(
                    tags::freshness(&rec, self.clock.now_ms(), client.config.tag_ttl),
                    Freshness::Fresh
                ) =>
            {
                self.stored_manifest(&rec.digest).await
            }
            _ => Ok(None),
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
                let k = key.clone();
                if let Err(e) = self.on_store(move |s| s.meta.delete_tag(&k)).await {
                    self.write_failed("a tag's removal", &e);
                }
                self.hot_tags.invalidate(key).await;
                self.changed();
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

    /// GETs a manifest, verifies it, and stores it under its digest, linked to `repo`.
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
        let record = ManifestRecord {
            media_type: media_type.clone(),
            body: body.clone(),
        };
        let d = digest.clone();
        let m = Arc::new(Manifest::new(digest.clone(), media_type, body));
        if let Err(e) = self
            .on_store(move |s| s.meta.put_manifest(&d, &record))
            .await
        {
            // Served, not cached: the next request asks the upstream again.
            self.write_failed("a manifest", &e);
            return Ok(m);
        }
        self.link(registry, repo, &digest).await?;
        let hot = HotManifest::new(m.clone());
        hot.remember(registry, repo);
        hot.touch(&self.store.access, self.clock.now_ms());
        self.hot_manifests.insert(digest, Arc::new(hot)).await;
        self.changed();
        Ok(m)
    }

    /// A stored blob that may be served for `repo`: linked there, or stored for another
    /// repository (or pushed to a private one) and now confirmed by the upstream. `None`
    /// when the store does not have it.
    async fn cached_blob(
        self: &Arc<Self>,
        client: &Arc<UpstreamClient>,
        repo: &str,
        digest: &Digest,
    ) -> Result<Option<StoredBlob>, CacheError> {
        // Opened here when the kernel knows the file's name: a trip to the blocking pool
        // and back costs two thread wakeups, which on an idle machine is most of the
        // time to the first byte.
        let found = match self.store.blobs.open_blob_if_cached(digest) {
            Some(found) => found?,
            None => {
                let d = digest.clone();
                self.on_store(move |s| s.blobs.open_blob(&d)).await?
            }
        };
        let Some(blob) = found else {
            return Ok(None);
        };
        self.confirm(client, repo, digest, Kind::Blob).await?;
        self.store.access.touch(digest, self.clock.now_ms());
        Ok(Some(blob))
    }

    /// The size of a blob: from the store, a fill in progress, or an upstream `HEAD`.
    pub async fn blob_size(
        self: &Arc<Self>,
        namespace: &str,
        repo: &str,
        digest: &Digest,
    ) -> Result<(u64, Outcome), CacheError> {
        let client = self.client(namespace)?;
        if let Some(blob) = self.cached_blob(&client, repo, digest).await? {
            return Ok((blob.size(), Outcome::Hit));
        }
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
        self.link(namespace, repo, digest).await?;
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
        let client = self.client(namespace)?;
        if let Some(blob) = self.cached_blob(&client, repo, digest).await? {
            return Ok((BlobSource::Stored { blob }, Outcome::Hit));
        }
        let repo_key = format!("{namespace}/{repo}");
        let (fill, progress) = self.blob_fills.join_or_start(digest, &repo_key);
        let outcome = match progress {
            Some(progress) => {
                let this = self.clone();
                let repo = repo.to_owned();
                let digest = digest.clone();
                let client = client.clone();
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
            None => {
                // Another repository's fill: its bytes are ours only if the upstream
                // says this repository has the blob too.
                if fill.origin != repo_key {
                    self.confirm(&client, repo, digest, Kind::Blob).await?;
                }
                Outcome::Coalesced
            }
        };
        match fill.size().await {
            Ok(size) => Ok((BlobSource::Filling { fill, size }, outcome)),
            Err(e) if matches!(*e, CacheError::NoSpace) => {
                Ok((self.direct(&client, repo, digest).await?, Outcome::Miss))
            }
            Err(e) => Err(unshare(e)),
        }
    }

    /// The blob straight from the upstream, not stored.
    async fn direct(
        &self,
        client: &UpstreamClient,
        repo: &str,
        digest: &Digest,
    ) -> Result<BlobSource, CacheError> {
        let resp = get_blob(client, repo, digest).await?;
        let size = resp.content_length().ok_or(CacheError::NoSpace)?;
        tracing::warn!(upstream = %client.config.namespace, repo, digest = %digest, size,
            "the store has no room: streaming the blob without caching it");
        Ok(BlobSource::Direct(Box::new(DirectBlob::new(
            resp,
            digest,
            size,
            client.config.read_timeout,
            &client.config.namespace,
            client.fetched_counter(),
        ))))
    }

    /// Whether a new blob of `size` bytes may be stored: the filesystem has room for it
    /// beyond a margin, and, if the last eviction pass could not free what the budget
    /// asked, storing it keeps the store within `max_size` and the disk above
    /// `min_free`.
    fn room_for(&self, size: u64) -> bool {
        let Ok((available, total)) = self.store.blobs.filesystem() else {
            return true;
        };
        if available < size.saturating_add(FILL_MARGIN) {
            return false;
        }
        if !self.stuck.load(Ordering::Relaxed) {
            return true;
        }
        let within_size = match (self.budget.max_size, self.measured.total_now(&self.store)) {
            (Some(max), Some(used)) => used + size <= max,
            _ => true,
        };
        within_size && available - size >= self.budget.min_free.bytes(total)
    }

    /// Streams a blob from the upstream into the store, publishing progress as it goes.
    /// A body that breaks off is resumed with a Range request where it stopped, within the
    /// bounds of [`resume`]; the digest is verified over the whole blob at commit.
    async fn fill_blob(
        self: &Arc<Self>,
        client: &Arc<UpstreamClient>,
        repo: &str,
        repo_key: &str,
        digest: &Digest,
        progress: &FillProgress,
    ) -> Result<u64, CacheError> {
        // Published while this fill was being registered: serve that.
        if let Some(blob) = self.cached_blob(client, repo, digest).await? {
            let size = blob.size();
            progress.streaming(size, blob.into_file());
            return Ok(size);
        }
        let resp = get_blob(client, repo, digest).await?;
        let announced = resp.content_length();
        let too_large = |size: u64| {
            CacheError::UpstreamInvalid {
            registry: client.config.namespace.clone(),
            reason: format!(
                "the blob is larger than the {} bytes of [server] max_upload_size ({size} bytes or more)",
                self.max_blob_size
            ),
        }
        };
        if let Some(size) = announced.filter(|&n| n > self.max_blob_size) {
            return Err(too_large(size));
        }
        if !self.room_for(announced.unwrap_or(0)) {
            self.poke.notify_one();
            return Err(CacheError::NoSpace);
        }
        let d = digest.clone();
        let (mut writer, reader) = match self
            .on_store(move |s| {
                let writer = s.blobs.writer(&d)?;
                let reader = match announced {
                    Some(_) => Some(writer.reader()?),
                    None => None,
                };
                Ok((writer, reader))
            })
            .await
        {
            Err(e) if is_no_space(&e) => {
                self.poke.notify_one();
                return Err(CacheError::NoSpace);
            }
            other => other?,
        };
        if let (Some(size), Some(reader)) = (announced, reader) {
            progress.streaming(size, reader);
        }
        let read_timeout = client.config.read_timeout;
        let namespace = &client.config.namespace;
        // A body that breaks off is resumed where it stopped (see [`resume`]).
        let resumable = announced.is_some() && !resume::refuses_ranges(resp.headers());
        let mut stream = resp.bytes_stream();
        let mut written = 0u64;
        // Where the answer being read started, and how many of its bytes to drop first
        // (a `200` answering a Range request carries the whole blob again).
        let mut answer_from = 0u64;
        let mut skip = 0u64;
        let mut resumes = 0u32;
        loop {
            let (mut batch, end) = next_batch(&mut stream, read_timeout, client).await;
            let received: usize = batch.iter().map(Bytes::len).sum();
            if received > 0 {
                client.received(received as u64);
            }
            if skip > 0 {
                batch = skip_bytes(batch, &mut skip);
            }
            let len: usize = batch.iter().map(Bytes::len).sum();
            if len > 0 {
                if written + len as u64 > self.max_blob_size {
                    return Err(too_large(written + len as u64));
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
                progress.written(written);
            }
            let broke = match (end, announced) {
                (BodyEnd::More, _) => continue,
                (BodyEnd::Ended, Some(size)) if written < size => CacheError::SizeMismatch {
                    expected: size,
                    actual: written,
                },
                (BodyEnd::Ended, _) => break,
                (BodyEnd::Broke(e), _) => e,
            };
            let size = match announced {
                Some(size)
                    if resumable && resumes < resume::MAX_RESUMES && written > answer_from =>
                {
                    size
                }
                _ => return Err(broke),
            };
            resumes += 1;
            tracing::warn!(upstream = %namespace, repo, digest = %digest, offset = written,
                size, attempt = resumes, error = %broke,
                "blob download broke off; resuming it with a Range request");
            client.metrics.resumed(namespace);
            // The broken connection goes before the new one is asked for.
            drop(stream);
            let resp = client
                .get_from(repo, &format!("blobs/{digest}"), written, Retry::Yes)
                .await?;
            match resume::check(resp.status(), resp.headers(), written, size) {
                Ok(resume::Resumed::Tail) => skip = 0,
                Ok(resume::Resumed::Whole) => skip = written,
                Err(why) => {
                    tracing::error!(upstream = %namespace, repo, digest = %digest,
                        offset = written, answer = %why, "cannot resume the blob download");
                    return Err(CacheError::UpstreamInvalid {
                        registry: namespace.clone(),
                        reason: format!("resuming the blob at byte {written}: {why}"),
                    });
                }
            }
            answer_from = written;
            stream = resp.bytes_stream();
        }
        let (size, reader) = tokio::task::spawn_blocking(move || {
            // A fill of unknown size is readable once it is verified, from here.
            let reader = match announced {
                None => Some(writer.reader()?),
                Some(_) => None,
            };
            Ok::<_, StoreError>((writer.commit(announced)?, reader))
        })
        .await
        .map_err(|e| CacheError::Internal(format!("commit task failed: {e}")))??;
        if let Some(file) = reader {
            progress.streaming(size, file);
        }
        // The blob is verified and published: a failure to index it must not fail the
        // clients reading it.
        let (d, r, now) = (digest.clone(), repo_key.to_owned(), self.clock.now_ms());
        if let Err(e) = self
            .on_store(move |s| s.meta.record_blob(&d, size, &r, now))
            .await
        {
            tracing::error!(digest = %digest, error = %e, "could not index a stored blob");
            self.poke.notify_one();
        }
        self.store.access.touch(digest, now);
        self.poke.notify_one();
        if let Err(e) = self.link(&client.config.namespace, repo, digest).await {
            tracing::error!(digest = %digest, error = %e, "could not link a stored blob");
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

    // --- the status page ---------------------------------------------------------------

    /// Counts a request served for a repository of upstream `namespace` (see
    /// [`stats::UpstreamStats::served`]); an unknown namespace is ignored.
    pub fn served(&self, namespace: &str, outcome: Option<Outcome>, bytes: u64) {
        if let Some(client) = self.upstreams.get(namespace) {
            client.stats.served(outcome, bytes, self.clock.now_ms());
        }
    }

    /// Every upstream's figures now, by namespace.
    pub fn upstream_status(&self) -> Vec<stats::UpstreamStatus> {
        let mut all: Vec<_> = self.upstreams.values().map(|c| c.status()).collect();
        all.sort_by(|a, b| a.namespace.cmp(&b.namespace));
        all
    }

    /// Every pulled-through repository with its size and last pull (one read of the
    /// index, on the blocking pool: see [`contents`]).
    pub async fn cached_repositories(&self) -> Result<Vec<contents::CachedRepo>, CacheError> {
        self.on_store(contents::cached_repositories).await
    }

    /// The disk against the budget: the store's blob bytes as last measured and kept
    /// current (measured now if no pass has yet), and the filesystem's room.
    pub async fn disk(&self) -> Result<Disk, CacheError> {
        let used = match self.usage_estimate() {
            Some((_, total)) => total,
            None => self.usage().await?.total_bytes(),
        };
        let (available, total) = self.store.blobs.filesystem()?;
        let budget = match self.budget.max_size {
            Some(max) => Budget::MaxSize(max),
            None => Budget::Filesystem(total.saturating_sub(self.budget.min_free.bytes(total))),
        };
        Ok(Disk {
            used,
            budget,
            available,
            total,
        })
    }

    // --- the disk budget ---------------------------------------------------------------

    /// The times an eviction pass judges by.
    fn times(&self) -> evict::Times {
        let now = self.clock.now_ms();
        evict::Times {
            keep_after: now.saturating_sub(self.budget.keep_recent.as_millis() as u64),
            expire_before: self
                .budget
                .max_age
                .map(|age| now.saturating_sub(age.as_millis() as u64)),
        }
    }

    /// Runs one eviction pass for `goal` (one at a time) and returns what it removed.
    pub async fn evict(&self, goal: Goal) -> Result<Report, CacheError> {
        self.evict_with(goal, self.times()).await
    }

    async fn evict_with(&self, goal: Goal, times: evict::Times) -> Result<Report, CacheError> {
        let _one = self.evicting.lock().await;
        let delta = self.store.blobs.bytes_delta();
        let g = goal.clone();
        let plan = Arc::new(
            self.on_store(move |s| {
                if let Err(e) = s.access.flush(&s.meta) {
                    tracing::warn!(error = %e, "could not write access times");
                }
                evict::plan(s, &g, &times)
            })
            .await?,
        );
        let mut report = Report {
            before: plan.usage.clone(),
            ..Report::default()
        };
        if !plan.manifests.is_empty() || !plan.tags.is_empty() || !plan.links.is_empty() {
            let p = plan.clone();
            let (manifests, tags) = self
                .on_store(move |s| evict::remove_manifests(s, &p))
                .await?;
            report.manifests = manifests;
            report.tags = tags;
            // Out of memory too, before any blob goes.
            for (digest, keys) in &plan.manifests {
                self.hot_manifests.invalidate(digest).await;
                for k in keys {
                    self.hot_tags.invalidate(k).await;
                }
            }
            for k in &plan.tags {
                self.hot_tags.invalidate(k).await;
            }
            self.hot_links.invalidate_all();
            self.changed();
        }
        let _ = tokio::task::spawn_blocking(evict::test_hold).await;
        let links = Arc::new(evict::blob_links(&plan));
        for chunk in plan.blobs.chunks(EVICT_CHUNK) {
            let filling = self.blob_fills.digests();
            let (chunk, links) = (chunk.to_vec(), links.clone());
            let (blobs, bytes, skipped) = self
                .on_store(move |s| evict::remove_blobs(s, &chunk, &links, &filling))
                .await?;
            report.blobs += blobs;
            report.bytes += bytes;
            report.skipped_in_use += skipped;
        }
        let mut after = plan.usage.clone();
        after.cached_bytes = after.cached_bytes.saturating_sub(report.bytes);
        after.cached_blobs = after.cached_blobs.saturating_sub(report.blobs);
        after.cached_manifests = after.cached_manifests.saturating_sub(report.manifests);
        after.cached_tags = after.cached_tags.saturating_sub(report.tags);
        self.metrics.evicted(&report, &after);
        self.measured.set(after, delta - report.bytes as i64);
        if let Goal::Free(need) = goal {
            self.stuck.store(report.bytes < need, Ordering::Relaxed);
        }
        if report.blobs + report.manifests + report.tags > 0 {
            tracing::info!(
                manifests = report.manifests,
                tags = report.tags,
                blobs = report.blobs,
                bytes = report.bytes,
                skipped_in_use = report.skipped_in_use,
                "evicted cached content"
            );
        }
        Ok(report)
    }

    /// What the store holds now (one full read of the index; for the admin endpoint).
    pub async fn usage(&self) -> Result<Usage, CacheError> {
        let times = evict::Times {
            keep_after: 0,
            expire_before: None,
        };
        Ok(self.evict_with(Goal::Free(0), times).await?.before)
    }

    /// The time policy code goes by (berth's clock), in ms since the epoch.
    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// `(available, total)` bytes of the store's filesystem.
    pub fn store_filesystem(&self) -> Result<(u64, u64), StoreError> {
        self.store.blobs.filesystem()
    }

    /// How many bytes the budget asks to free now (0 within it).
    pub fn budget_need(&self) -> u64 {
        self.need()
    }

    /// Holds `metadata_reserve` bytes back, in two files (see [`Reserve`]), while the disk
    /// has room for them twice over, and gives the running half back when the disk is
    /// (nearly) full, so that the metadata database can still write. Blocks.
    fn keep_reserve(&self) {
        let half = self.budget.metadata_reserve / 2;
        let Ok((available, _)) = self.store.blobs.filesystem() else {
            return;
        };
        let blobs = &self.store.blobs;
        // The database stops writing after a write failed for lack of space, until it is
        // reopened: once there is room again, it is.
        // Reopening needs little room: half of what giving back the running reserve
        // frees is enough. (Asking for more left a store full of berth's own content
        // stuck: eviction writes metadata first, which the database refused.)
        if self.store.meta.out_of_space() && available >= (half / 2).max(1 << 20) {
            match self.store.meta.recover() {
                Ok(()) => tracing::info!(
                    available,
                    "the store's disk has room again: the metadata database takes writes again"
                ),
                Err(e) => tracing::warn!(error = %e, "could not reopen the metadata database"),
            }
        }
        let held = [Reserve::Start, Reserve::Running].map(|k| blobs.has_reserve(k));
        if held[1] && available < (half / 4).max(1 << 20) {
            if blobs.release_reserve(Reserve::Running) {
                tracing::warn!(
                    available,
                    reserve = half,
                    "the store's disk is full: gave back the space reserved for metadata"
                );
            }
            self.poke.notify_one();
        } else if held != [true, true] && available >= half * 4 + FILL_MARGIN {
            for kind in [Reserve::Start, Reserve::Running] {
                match blobs.hold_reserve(kind, half) {
                    Ok(true) => {}
                    Ok(false) => return,
                    Err(e) => {
                        tracing::warn!(error = %e, "could not reserve space for metadata");
                        return;
                    }
                }
            }
            tracing::info!(reserve = half * 2, "space reserved for metadata");
        }
    }

    /// Writes the access times not yet written. Blocks.
    pub fn flush_access_log(&self) {
        if let Err(e) = self.store.access.flush(&self.store.meta) {
            tracing::warn!(error = %e, "could not write access times");
        }
    }

    /// Reads every stored blob again and checks it against its digest, at most
    /// `rate` bytes a second (`None`: as fast as the disk goes). A damaged blob is
    /// removed; a cached one is fetched again from the upstream it came from, a private
    /// one is reported (it must be pushed again). One pass at a time.
    pub async fn scrub(self: &Arc<Self>, rate: Option<u64>) -> Result<ScrubReport, CacheError> {
        let _one = self.scrubbing.lock().await;
        // One shard directory's names at a time: a large store's file list stays on disk.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<Digest>>(1);
        let store = self.store.clone();
        let lister = tokio::task::spawn_blocking(move || {
            store.blobs.list_by_shard(|shard| {
                let digests = shard.into_iter().map(|(d, _, _)| d).collect();
                // The scrub stopped: so does the listing.
                tx.blocking_send(digests)
                    .map_err(|_| StoreError::Corrupt("scrub stopped".into()))
            })
        });
        let mut report = ScrubReport::default();
        while let Some(shard) = rx.recv().await {
            for digest in shard {
                self.scrub_one(digest, rate, &mut report).await?;
            }
        }
        lister
            .await
            .map_err(|e| CacheError::Internal(format!("scrub listing failed: {e}")))??;
        tracing::info!(
            blobs = report.blobs,
            bytes = report.bytes,
            damaged = report.damaged.len(),
            "scrub finished"
        );
        Ok(report)
    }

    /// Checks one blob for [`scrub`](Self::scrub), and repairs it if it is damaged.
    async fn scrub_one(
        self: &Arc<Self>,
        digest: Digest,
        rate: Option<u64>,
        report: &mut ScrubReport,
    ) -> Result<(), CacheError> {
        let d = digest.clone();
        let verdict = self
            .on_store(move |s| {
                let started = std::time::Instant::now();
                let mut read = 0u64;
                s.verify_blob(&d, &mut |n| {
                    read += n;
                    if let Some(rate) = rate.filter(|r| *r > 0) {
                        let due = Duration::from_secs_f64(read as f64 / rate as f64);
                        if let Some(wait) = due.checked_sub(started.elapsed()) {
                            std::thread::sleep(wait);
                        }
                    }
                })
                .map(|v| (v, read))
            })
            .await?;
        let (ok, read) = match verdict {
            (None, _) => return Ok(()),
            (Some(ok), read) => (ok, read),
        };
        report.blobs += 1;
        report.bytes += read;
        if ok {
            return Ok(());
        }
        let d = digest.clone();
        let record = self.on_store(move |s| s.meta.get_blob(&d)).await?;
        let d = digest.clone();
        let private = self.on_store(move |s| s.remove_damaged(&d)).await?;
        tracing::error!(digest = %digest, private,
                "scrub: a stored blob does not match its digest; removed");
        let refetch = record.and_then(|r| r.repos.first().cloned()).and_then(|r| {
            let (ns, repo) = r.split_once('/')?;
            self.upstreams
                .contains_key(ns)
                .then(|| (ns.to_owned(), repo.to_owned()))
        });
        let refetched = match refetch {
            Some((ns, repo)) => self.refetch(&ns, &repo, &digest).await,
            None => false,
        };
        report.damaged.push(Damaged {
            digest: digest.to_string(),
            private,
            refetched,
        });
        Ok(())
    }

    /// Fetches a cached blob again (after scrub removed a damaged copy); whether it
    /// is stored again.
    async fn refetch(self: &Arc<Self>, namespace: &str, repo: &str, digest: &Digest) -> bool {
        match self.blob(namespace, repo, digest).await {
            Ok((BlobSource::Filling { fill, .. }, _)) => fill.done().await.is_ok(),
            Ok((BlobSource::Stored { .. }, _)) => true,
            Ok((BlobSource::Direct(_), _)) => false,
            Err(e) => {
                tracing::warn!(digest = %digest, error = %e, "scrub: could not fetch a damaged blob again");
                false
            }
        }
    }

    /// Scrubs the store every `interval` at `rate` bytes a second, for as long as berth
    /// runs.
    pub async fn run_scrub(self: Arc<Self>, interval: Duration, rate: u64) {
        loop {
            tokio::time::sleep(interval).await;
            if let Err(e) = self.scrub(Some(rate)).await {
                tracing::error!(error = %e, "scrub failed");
            }
        }
    }

    /// The usage last measured, kept current (`None` before the first pass).
    pub fn usage_estimate(&self) -> Option<(Usage, u64)> {
        Some((self.measured.get()?, self.measured.total_now(&self.store)?))
    }

    /// How many bytes the budget asks to free now.
    fn need(&self) -> u64 {
        let c = &self.budget;
        let mut need = 0;
        if let (Some(max), Some(used)) = (c.max_size, self.measured.total_now(&self.store)) {
            if used as f64 > max as f64 * c.high_watermark {
                need = used.saturating_sub((max as f64 * c.low_watermark) as u64);
            }
        }
        if let Ok((available, total)) = self.store.blobs.filesystem() {
            let min_free = c.min_free.bytes(total);
            if available < min_free {
                let band =
                    c.max_size.unwrap_or(total) as f64 * (c.high_watermark - c.low_watermark);
                need = need.max(min_free + band as u64 - available);
            }
        }
        need
    }

    /// Keeps the store within its budget, for as long as berth runs: flushes the access
    /// log every few seconds, and every `eviction_interval` (or when a fill or a failed
    /// write wakes it) evicts what the budget asks. `max_age` is applied hourly.
    pub async fn run_budget(self: Arc<Self>) {
        // Whatever a crash left half-recorded, from before this start.
        let started = std::time::SystemTime::now();
        let this = self.clone();
        match tokio::task::spawn_blocking(move || this.store.reconcile(started)).await {
            Ok(Ok(r)) => tracing::info!(
                orphan_files = r.orphan_files,
                bytes_freed = r.bytes_freed,
                records_without_files = r.records_without_files,
                "store index and files reconciled"
            ),
            Ok(Err(e)) => tracing::warn!(error = %e, "could not reconcile the store"),
            Err(e) => tracing::warn!(error = %e, "store reconciliation failed"),
        }
        let mut last_check = None::<std::time::Instant>;
        let mut last_age_pass = None::<std::time::Instant>;
        let mut last_measure = None::<std::time::Instant>;
        loop {
            let poked = tokio::select! {
                _ = tokio::time::sleep(ACCESS_FLUSH) => false,
                _ = self.poke.notified() => true,
            };
            let this = self.clone();
            let _ = tokio::task::spawn_blocking(move || {
                this.keep_reserve();
                this.flush_access_log();
            })
            .await;
            if let Ok((available, _)) = self.store.blobs.filesystem() {
                self.metrics
                    .filesystem_free_bytes
                    .set(available.try_into().unwrap_or(i64::MAX));
            }
            let since = last_check.map(|t| t.elapsed());
            let due = since.is_none_or(|t| t >= self.budget.eviction_interval);
            // A wake-up (after a fill, or a failed write) checks at most once a second.
            let woken = poked && since.is_none_or(|t| t >= Duration::from_secs(1));
            if !due && !woken {
                continue;
            }
            last_check = Some(std::time::Instant::now());
            let age_due = self.budget.max_age.is_some()
                && last_age_pass.is_none_or(|t| t.elapsed() >= MAX_AGE_EVERY);
            let measure_due = last_measure.is_none_or(|t| t.elapsed() >= MEASURE_EVERY);
            let need = self.need();
            if need == 0 && !age_due && !measure_due {
                self.stuck.store(false, Ordering::Relaxed);
                continue;
            }
            if age_due {
                last_age_pass = Some(std::time::Instant::now());
            }
            last_measure = Some(std::time::Instant::now());
            if let Err(e) = self.evict(Goal::Free(need)).await {
                tracing::error!(error = %e, "eviction failed");
            }
            // A pass that measured a store over budget for the first time goes again.
            let again = self.need();
            if again > 0 && need == 0 {
                if let Err(e) = self.evict(Goal::Free(again)).await {
                    tracing::error!(error = %e, "eviction failed");
                }
            }
        }
    }
}

/// How much room a fill leaves on the filesystem beyond its own bytes.
const FILL_MARGIN: u64 = 16 << 20;
/// Blobs removed per hold of the removal lock.
const EVICT_CHUNK: usize = 256;
/// How often access times are written.
const ACCESS_FLUSH: Duration = Duration::from_secs(5);
/// How often `max_age` is applied when the budget does not call for a pass.
const MAX_AGE_EVERY: Duration = Duration::from_secs(3600);
/// How often the store is measured again when the budget does not call for a pass (the
/// measure is kept current in between from the bytes published and removed).
const MEASURE_EVERY: Duration = Duration::from_secs(600);

/// `GET` of a blob from the upstream, with retries.
async fn get_blob(
    client: &UpstreamClient,
    repo: &str,
    digest: &Digest,
) -> Result<reqwest::Response, CacheError> {
    client
        .request(
            Method::GET,
            repo,
            &format!("blobs/{digest}"),
            None,
            Retry::Yes,
        )
        .await
}

/// Whether a store error is the disk being full.
fn is_no_space(e: &CacheError) -> bool {
    matches!(e, CacheError::Store(m) if m.contains("No space left on device"))
}

/// What a digest names, for an upstream confirmation.
#[derive(Clone, Copy)]
enum Kind {
    Blob,
    Manifest,
}

/// The key of a cache link in memory: which digest is in which repository of which
/// upstream.
fn link_key(namespace: &str, repo: &str, digest: &Digest) -> String {
    let algorithm = digest.algorithm().as_str();
    let mut key = String::with_capacity(
        namespace.len() + repo.len() + algorithm.len() + digest.hex().len() + 3,
    );
    for part in [namespace, "\0", repo, "\0", algorithm, ":", digest.hex()] {
        key.push_str(part);
    }
    key
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
                client.received(chunk.len() as u64);
                body.extend_from_slice(&chunk);
            }
        }
    }
}

/// How a batch of a blob body ended.
enum BodyEnd {
    /// The body goes on.
    More,
    /// The body ended (complete or not).
    Ended,
    /// The connection broke, or no byte came within the read timeout.
    Broke(CacheError),
}

/// The next bytes of a blob body: what arrives within the read timeout, and then whatever
/// more is ready at once, up to [`WRITE_BATCH`]. Bytes that came before the body broke
/// are returned with the break.
async fn next_batch<S>(
    stream: &mut S,
    read_timeout: Duration,
    client: &UpstreamClient,
) -> (Vec<Bytes>, BodyEnd)
where
    S: futures_util::Stream<Item = reqwest::Result<Bytes>> + Unpin,
{
    let broke = |e: reqwest::Error| BodyEnd::Broke(unreachable(client, &upstream::describe(&e)));
    let first = match tokio::time::timeout(read_timeout, stream.next()).await {
        Err(_) => {
            return (
                Vec::new(),
                BodyEnd::Broke(unreachable(client, "blob download stalled")),
            )
        }
        Ok(None) => return (Vec::new(), BodyEnd::Ended),
        Ok(Some(Err(e))) => return (Vec::new(), broke(e)),
        Ok(Some(Ok(chunk))) => chunk,
    };
    let mut len = first.len();
    let mut batch = vec![first];
    while len < WRITE_BATCH {
        match stream.next().now_or_never() {
            Some(Some(Ok(chunk))) => {
                len += chunk.len();
                batch.push(chunk);
            }
            Some(Some(Err(e))) => return (batch, broke(e)),
            Some(None) => return (batch, BodyEnd::Ended),
            None => break,
        }
    }
    (batch, BodyEnd::More)
}

/// Drops the first `*skip` bytes of `batch` (fewer if it is shorter), counting them off.
fn skip_bytes(batch: Vec<Bytes>, skip: &mut u64) -> Vec<Bytes> {
    let mut out = Vec::with_capacity(batch.len());
    for mut chunk in batch {
        if *skip > 0 {
            let n = (*skip).min(chunk.len() as u64) as usize;
            chunk = chunk.slice(n..);
            *skip -= n as u64;
        }
        if !chunk.is_empty() {
            out.push(chunk);
        }
    }
    out
}
