//! Metadata in RocksDB, behind typed accessors. No RocksDB type leaves this module.
//!
//! Column families (one per kind of record):
//!
//! | family      | key                                   | value                                   |
//! |-------------|---------------------------------------|-----------------------------------------|
//! | `tags`      | [`TagKey`]: `upstream \0 repo \0 tag \0 variant` | [`TagRecord`]: digest and when confirmed |
//! | `manifests` | digest string                         | [`ManifestRecord`]: media type and bytes |
//! | `blobs`     | digest string                         | [`BlobRecord`]: size, last access, repos |
//! | `cache_links` | `upstream \0 repo \0 digest`       | when the upstream confirmed it (ms)     |
//! | `last_access` | digest string                       | when it was last used (ms), cached or private |
//!
//! `cache_links` is what makes cached content readable through a pull-through
//! repository: a digest is served for `(upstream, repo)` only when it was fetched through
//! that repository or the upstream confirmed that the repository has it. Content stays
//! one copy per digest; the link is per repository.
//!
//! Private repositories (pushed, never evicted) have families of their own; their keys
//! start with the repository name and a `\0`, so one repository's records are one sorted
//! range (tags and links come out in lexical order):
//!
//! | family           | key                        | value                                      |
//! |------------------|----------------------------|--------------------------------------------|
//! | `repos`          | repo                       | when it was created                        |
//! | `repo_tags`      | `repo \0 tag`              | [`RepoTag`]: digest and when it was set    |
//! | `repo_manifests` | `repo \0 digest`           | [`RepoLink`]: when it was pushed           |
//! | `repo_blobs`     | `repo \0 digest`           | [`RepoLink`]: when it was linked, its size |
//! | `blob_owners`    | `digest \0 repo`           | its size: `repo_blobs` the other way round |
//! | `referrers`      | `repo \0 subject \0 digest` | the referrer's descriptor (JSON)          |
//! | `private_manifests` | digest                  | [`ManifestRecord`]: media type and bytes   |
//! | `repo_manifest_types` | `repo \0 digest`       | the media type it was pushed there with    |
//! | `api_keys`       | key id                     | [`ApiKeyRecord`]: owner, name, hash, times |
//!
//! A manifest's bytes are stored once, but its `Content-Type` belongs to each repository
//! it was pushed to (`repo_manifest_types`): pushing the same bytes elsewhere with another
//! type changes nothing another repository answers.
//!
//! Pushed manifests are kept apart from pulled-through ones (`manifests`), so neither
//! side can serve or change the other's. Blob bytes are in the blob store, one copy
//! whether pulled through or pushed; `blobs` records which ones the cache fetched.
//!
//! Every value starts with a format version byte; decoding garbage yields
//! [`StoreError::Corrupt`], never a panic.

use std::path::Path;

use bytes::Bytes;
use rocksdb::{ColumnFamilyDescriptor, Options, DB};

use crate::oci::Digest;
use crate::StoreError;

const CF_TAGS: &str = "tags";
const CF_MANIFESTS: &str = "manifests";
const CF_BLOBS: &str = "blobs";
const CF_REPOS: &str = "repos";
const CF_REPO_TAGS: &str = "repo_tags";
const CF_REPO_MANIFESTS: &str = "repo_manifests";
const CF_REPO_BLOBS: &str = "repo_blobs";
const CF_REFERRERS: &str = "referrers";
const CF_PRIVATE_MANIFESTS: &str = "private_manifests";
const CF_API_KEYS: &str = "api_keys";
const CF_CACHE_LINKS: &str = "cache_links";
const CF_REPO_MANIFEST_TYPES: &str = "repo_manifest_types";
const CF_LAST_ACCESS: &str = "last_access";
const CF_BLOB_OWNERS: &str = "blob_owners";
const FAMILIES: [&str; 14] = [
    CF_TAGS,
    CF_MANIFESTS,
    CF_BLOBS,
    CF_REPOS,
    CF_REPO_TAGS,
    CF_REPO_MANIFESTS,
    CF_REPO_BLOBS,
    CF_REFERRERS,
    CF_PRIVATE_MANIFESTS,
    CF_API_KEYS,
    CF_CACHE_LINKS,
    CF_REPO_MANIFEST_TYPES,
    CF_LAST_ACCESS,
    CF_BLOB_OWNERS,
];
const VERSION: u8 = 1;

/// Which tag of which repository of which upstream, as asked for with which manifest
/// media types (an upstream may answer one tag differently per `Accept`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TagKey {
    pub upstream: String,
    pub repo: String,
    pub tag: String,
    /// The manifest media types the request accepted, as a bitmask
    /// (see `berth_oci::accept_variant`).
    pub variant: u8,
}

/// What a tag pointed to when berth last confirmed it with the upstream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TagRecord {
    pub digest: Digest,
    /// Milliseconds since the Unix epoch.
    pub confirmed_at_ms: u64,
}

/// A manifest exactly as the upstream served it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestRecord {
    pub media_type: String,
    pub body: Bytes,
}

/// What berth knows of a stored blob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobRecord {
    pub size: u64,
    /// Milliseconds since the Unix epoch.
    pub last_access_ms: u64,
    /// The repositories (`upstream/repo`) the blob was fetched for.
    pub repos: Vec<String>,
}

/// A private repository's tag.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RepoTag {
    pub digest: Digest,
    /// Milliseconds since the Unix epoch.
    pub updated_ms: u64,
}

/// An API key: its secret is kept only as a SHA-256 hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiKeyRecord {
    pub owner: String,
    pub name: String,
    pub secret_sha256: [u8; 32],
    /// Milliseconds since the Unix epoch.
    pub created_ms: u64,
    pub expires_ms: u64,
    /// The `[[auth.oidc]]` provider its owner logged in through; empty for an htpasswd
    /// user.
    pub provider: String,
    /// An OIDC owner's groups at their latest login (an htpasswd owner's come from the
    /// configuration at each use, and this is empty).
    pub groups: Vec<String>,
    /// When it was last used, to the minute; 0 for never.
    pub last_used_ms: u64,
}

/// A manifest or blob linked into a private repository: readable through it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RepoLink {
    /// Milliseconds since the Unix epoch.
    pub linked_ms: u64,
    /// The content's size in bytes.
    pub size: u64,
}

/// Encoding of keys and values; each codec round-trips and rejects garbage.
trait Codec: Sized {
    fn encode(&self) -> Vec<u8>;
    fn decode(bytes: &[u8]) -> Result<Self, StoreError>;
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(format!("undecodable {what} record"))
}

/// A cursor over an encoded value.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], StoreError> {
        if self.0.len() < n {
            return Err(corrupt(what));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u64(&mut self, what: &str) -> Result<u64, StoreError> {
        let b = self.take(8, what)?;
        Ok(u64::from_be_bytes(b.try_into().expect("8 bytes")))
    }

    fn u16(&mut self, what: &str) -> Result<u16, StoreError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes(b.try_into().expect("2 bytes")))
    }

    fn str(&mut self, len: usize, what: &str) -> Result<&'a str, StoreError> {
        std::str::from_utf8(self.take(len, what)?).map_err(|_| corrupt(what))
    }

    fn version(&mut self, what: &str) -> Result<(), StoreError> {
        match self.take(1, what)? {
            [VERSION] => Ok(()),
            _ => Err(corrupt(what)),
        }
    }
}

impl Codec for TagKey {
    fn encode(&self) -> Vec<u8> {
        format!(
            "{}\0{}\0{}\0{}",
            self.upstream, self.repo, self.tag, self.variant
        )
        .into_bytes()
    }

    fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        let s = std::str::from_utf8(bytes).map_err(|_| corrupt("tag key"))?;
        let mut parts = s.split('\0');
        match (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next().and_then(|v| v.parse().ok()),
            parts.next(),
        ) {
            (Some(u), Some(r), Some(t), Some(variant), None) => Ok(TagKey {
                upstream: u.into(),
                repo: r.into(),
                tag: t.into(),
                variant,
            }),
            _ => Err(corrupt("tag key")),
        }
    }
}

impl Codec for TagRecord {
    fn encode(&self) -> Vec<u8> {
        let d = self.digest.to_string();
        let mut v = Vec::with_capacity(9 + d.len());
        v.push(VERSION);
        v.extend_from_slice(&self.confirmed_at_ms.to_be_bytes());
        v.extend_from_slice(d.as_bytes());
        v
    }

    fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        let mut r = Reader(bytes);
        r.version("tag")?;
        let confirmed_at_ms = r.u64("tag")?;
        let digest = r.str(r.0.len(), "tag")?;
        Ok(TagRecord {
            digest: digest.parse().map_err(|_| corrupt("tag"))?,
            confirmed_at_ms,
        })
    }
}

impl Codec for ManifestRecord {
    fn encode(&self) -> Vec<u8> {
        let mt = self.media_type.as_bytes();
        // Media types are validated short by the cache; a longer one is cut, never
        // allowed to spill into the body.
        let mt = &mt[..mt.len().min(u16::MAX as usize)];
        let mut v = Vec::with_capacity(3 + mt.len() + self.body.len());
        v.push(VERSION);
        v.extend_from_slice(&(mt.len() as u16).to_be_bytes());
        v.extend_from_slice(mt);
        v.extend_from_slice(&self.body);
        v
    }

    fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        let mut r = Reader(bytes);
        r.version("manifest")?;
        let len = r.u16("manifest")? as usize;
        let media_type = r.str(len, "manifest")?.to_owned();
        Ok(ManifestRecord {
            media_type,
            body: Bytes::copy_from_slice(r.0),
        })
    }
}

impl Codec for BlobRecord {
    fn encode(&self) -> Vec<u8> {
        let mut v = vec![VERSION];
        v.extend_from_slice(&self.size.to_be_bytes());
        v.extend_from_slice(&self.last_access_ms.to_be_bytes());
        v.extend_from_slice(&(self.repos.len() as u16).to_be_bytes());
        for repo in &self.repos {
            v.extend_from_slice(&(repo.len() as u16).to_be_bytes());
            v.extend_from_slice(repo.as_bytes());
        }
        v
    }

    fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        let mut r = Reader(bytes);
        r.version("blob")?;
        let size = r.u64("blob")?;
        let last_access_ms = r.u64("blob")?;
        let n = r.u16("blob")?;
        let mut repos = Vec::with_capacity(n.min(64) as usize);
        for _ in 0..n {
            let len = r.u16("blob")? as usize;
            repos.push(r.str(len, "blob")?.to_owned());
        }
        if !r.0.is_empty() {
            return Err(corrupt("blob"));
        }
        Ok(BlobRecord {
            size,
            last_access_ms,
            repos,
        })
    }
}

impl Codec for RepoTag {
    fn encode(&self) -> Vec<u8> {
        TagRecord {
            digest: self.digest.clone(),
            confirmed_at_ms: self.updated_ms,
        }
        .encode()
    }

    fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        let r = TagRecord::decode(bytes)?;
        Ok(RepoTag {
            digest: r.digest,
            updated_ms: r.confirmed_at_ms,
        })
    }
}

impl Codec for RepoLink {
    fn encode(&self) -> Vec<u8> {
        let mut v = vec![VERSION];
        v.extend_from_slice(&self.linked_ms.to_be_bytes());
        v.extend_from_slice(&self.size.to_be_bytes());
        v
    }

    fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        let mut r = Reader(bytes);
        r.version("link")?;
        let linked_ms = r.u64("link")?;
        let size = r.u64("link")?;
        if !r.0.is_empty() {
            return Err(corrupt("link"));
        }
        Ok(RepoLink { linked_ms, size })
    }
}

impl Codec for ApiKeyRecord {
    fn encode(&self) -> Vec<u8> {
        let mut v = vec![VERSION];
        v.extend_from_slice(&self.created_ms.to_be_bytes());
        v.extend_from_slice(&self.expires_ms.to_be_bytes());
        v.extend_from_slice(&self.secret_sha256);
        let put = |v: &mut Vec<u8>, s: &str| {
            let b = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
            v.extend_from_slice(&(b.len() as u16).to_be_bytes());
            v.extend_from_slice(b);
        };
        put(&mut v, &self.owner);
        put(&mut v, &self.name);
        // Records written before keys had providers, groups and uses end here.
        put(&mut v, &self.provider);
        v.extend_from_slice(&self.last_used_ms.to_be_bytes());
        v.extend_from_slice(&(self.groups.len().min(u16::MAX as usize) as u16).to_be_bytes());
        for g in self.groups.iter().take(u16::MAX as usize) {
            put(&mut v, g);
        }
        v
    }

    fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        let mut r = Reader(bytes);
        r.version("api key")?;
        let created_ms = r.u64("api key")?;
        let expires_ms = r.u64("api key")?;
        let secret_sha256: [u8; 32] = r.take(32, "api key")?.try_into().expect("32 bytes");
        let len = r.u16("api key")? as usize;
        let owner = r.str(len, "api key")?.to_owned();
        let len = r.u16("api key")? as usize;
        let name = r.str(len, "api key")?.to_owned();
        let (mut provider, mut last_used_ms, mut groups) = (String::new(), 0, Vec::new());
        if !r.0.is_empty() {
            let len = r.u16("api key")? as usize;
            provider = r.str(len, "api key")?.to_owned();
            last_used_ms = r.u64("api key")?;
            for _ in 0..r.u16("api key")? {
                let len = r.u16("api key")? as usize;
                groups.push(r.str(len, "api key")?.to_owned());
            }
        }
        if !r.0.is_empty() {
            return Err(corrupt("api key"));
        }
        Ok(ApiKeyRecord {
            owner,
            name,
            secret_sha256,
            created_ms,
            expires_ms,
            provider,
            groups,
            last_used_ms,
        })
    }
}

/// Raw bytes, stored as they are (descriptors the registry built itself).
impl Codec for Bytes {
    fn encode(&self) -> Vec<u8> {
        self.to_vec()
    }

    fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        Ok(Bytes::copy_from_slice(bytes))
    }
}

/// `a \0 b [\0 c]`: the key of a private repository's record.
fn repo_key(repo: &str, parts: &[&str]) -> Vec<u8> {
    let mut k = repo.as_bytes().to_vec();
    for p in parts {
        k.push(0);
        k.extend_from_slice(p.as_bytes());
    }
    k
}

/// `upstream \0 repo \0 digest`: the key of a cache link.
fn cache_link_key(upstream: &str, repo: &str, digest: &Digest) -> Vec<u8> {
    repo_key(upstream, &[repo, &digest.to_string()])
}

/// One write of a batch: family, key, and the value (`None` deletes).
type Op = (&'static str, Vec<u8>, Option<Vec<u8>>);

/// A key and its value, as stored.
type Record = (Vec<u8>, Vec<u8>);

/// Several private-registry writes applied atomically (see [`MetaStore::write`]).
#[derive(Default)]
pub struct Batch {
    ops: Vec<Op>,
}

impl Batch {
    pub fn put_repo(&mut self, repo: &str, now_ms: u64) -> &mut Self {
        self.ops.push((
            CF_REPOS,
            repo.as_bytes().to_vec(),
            Some(now_ms.to_be_bytes().to_vec()),
        ));
        self
    }

    pub fn delete_repo(&mut self, repo: &str) -> &mut Self {
        self.ops.push((CF_REPOS, repo.as_bytes().to_vec(), None));
        self
    }

    pub fn put_private_manifest(&mut self, digest: &Digest, record: &ManifestRecord) -> &mut Self {
        self.ops.push((
            CF_PRIVATE_MANIFESTS,
            digest.to_string().into_bytes(),
            Some(record.encode()),
        ));
        self
    }

    pub fn link_manifest(&mut self, repo: &str, digest: &Digest, link: RepoLink) -> &mut Self {
        self.ops.push((
            CF_REPO_MANIFESTS,
            repo_key(repo, &[&digest.to_string()]),
            Some(link.encode()),
        ));
        self
    }

    /// Unlinks a manifest from `repo`, with the media type it was pushed there with.
    pub fn unlink_manifest(&mut self, repo: &str, digest: &Digest) -> &mut Self {
        let key = repo_key(repo, &[&digest.to_string()]);
        self.ops.push((CF_REPO_MANIFEST_TYPES, key.clone(), None));
        self.ops.push((CF_REPO_MANIFESTS, key, None));
        self
    }

    /// The media type `repo` serves its manifest `digest` with.
    pub fn put_manifest_type(
        &mut self,
        repo: &str,
        digest: &Digest,
        media_type: &str,
    ) -> &mut Self {
        self.ops.push((
            CF_REPO_MANIFEST_TYPES,
            repo_key(repo, &[&digest.to_string()]),
            Some(media_type.as_bytes().to_vec()),
        ));
        self
    }

    pub fn link_blob(&mut self, repo: &str, digest: &Digest, link: RepoLink) -> &mut Self {
        let d = digest.to_string();
        self.ops
            .push((CF_REPO_BLOBS, repo_key(repo, &[&d]), Some(link.encode())));
        self.ops.push((
            CF_BLOB_OWNERS,
            repo_key(&d, &[repo]),
            Some(encode_ms(link.size)),
        ));
        self
    }

    pub fn unlink_blob(&mut self, repo: &str, digest: &Digest) -> &mut Self {
        let d = digest.to_string();
        self.ops.push((CF_REPO_BLOBS, repo_key(repo, &[&d]), None));
        self.ops.push((CF_BLOB_OWNERS, repo_key(&d, &[repo]), None));
        self
    }

    pub fn put_tag(&mut self, repo: &str, tag: &str, record: &RepoTag) -> &mut Self {
        self.ops
            .push((CF_REPO_TAGS, repo_key(repo, &[tag]), Some(record.encode())));
        self
    }

    pub fn delete_tag(&mut self, repo: &str, tag: &str) -> &mut Self {
        self.ops.push((CF_REPO_TAGS, repo_key(repo, &[tag]), None));
        self
    }

    pub fn put_referrer(
        &mut self,
        repo: &str,
        subject: &Digest,
        referrer: &Digest,
        descriptor: Bytes,
    ) -> &mut Self {
        self.ops.push((
            CF_REFERRERS,
            repo_key(repo, &[&subject.to_string(), &referrer.to_string()]),
            Some(descriptor.to_vec()),
        ));
        self
    }

    pub fn delete_referrer(
        &mut self,
        repo: &str,
        subject: &Digest,
        referrer: &Digest,
    ) -> &mut Self {
        self.ops.push((
            CF_REFERRERS,
            repo_key(repo, &[&subject.to_string(), &referrer.to_string()]),
            None,
        ));
        self
    }
}

/// Removals of pulled-through records, for eviction and purges (applied with
/// [`MetaStore::write`] like any batch).
impl Batch {
    pub fn delete_cached_manifest(&mut self, digest: &Digest) -> &mut Self {
        self.ops
            .push((CF_MANIFESTS, digest.to_string().into_bytes(), None));
        self
    }

    pub fn delete_cached_blob(&mut self, digest: &Digest) -> &mut Self {
        self.ops
            .push((CF_BLOBS, digest.to_string().into_bytes(), None));
        self
    }

    pub fn delete_cache_tag(&mut self, key: &TagKey) -> &mut Self {
        self.ops.push((CF_TAGS, key.encode(), None));
        self
    }

    pub fn delete_cache_link(&mut self, upstream: &str, repo: &str, digest: &Digest) -> &mut Self {
        self.ops
            .push((CF_CACHE_LINKS, cache_link_key(upstream, repo, digest), None));
        self
    }

    pub fn delete_last_access(&mut self, digest: &Digest) -> &mut Self {
        self.ops
            .push((CF_LAST_ACCESS, digest.to_string().into_bytes(), None));
        self
    }

    /// How many writes the batch holds.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// How many repositories a blob record remembers; older ones are dropped first.
const MAX_BLOB_REPOS: usize = 64;

/// The metadata database.
///
/// RocksDB stops taking writes for good after a write to its log fails for lack of
/// space (a "background error" it does not recover from by itself). Such a failure is
/// remembered, and [`MetaStore::recover`] (called once the disk has room again) reopens
/// the database in place: requests wait for the moment it takes, and reads go on from a
/// read-only instance meanwhile.
pub struct MetaStore {
    db: std::sync::RwLock<std::sync::Arc<DB>>,
    path: std::path::PathBuf,
    /// A write failed for lack of space since the database was (re)opened.
    out_of_space: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for MetaStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetaStore").finish_non_exhaustive()
    }
}

impl MetaStore {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Self::open_db(path)?;
        let meta = MetaStore::from_db(db, path);
        meta.index_blob_owners()?;
        Ok(meta)
    }

    fn open_db(path: &Path) -> Result<DB, StoreError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_max_open_files(256);
        opts.set_keep_log_file_num(4);
        let cfs = FAMILIES
            .into_iter()
            .map(|name| ColumnFamilyDescriptor::new(name, Options::default()));
        DB::open_cf_descriptors(&opts, path, cfs).map_err(db_err)
    }

    fn open_read_only(path: &Path) -> Result<DB, StoreError> {
        let cfs = FAMILIES
            .into_iter()
            .map(|name| ColumnFamilyDescriptor::new(name, Options::default()));
        DB::open_cf_descriptors_read_only(&Options::default(), path, cfs, false).map_err(db_err)
    }

    fn from_db(db: DB, path: &Path) -> Self {
        MetaStore {
            db: std::sync::RwLock::new(std::sync::Arc::new(db)),
            path: path.to_owned(),
            out_of_space: Default::default(),
        }
    }

    /// The database, for one operation.
    fn db(&self) -> std::sync::Arc<DB> {
        self.db.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Notes a write that failed for lack of space.
    fn wrote(&self, r: Result<(), rocksdb::Error>) -> Result<(), StoreError> {
        let r = r.map_err(db_err);
        if let Err(e) = &r {
            if e.is_no_space() {
                self.out_of_space
                    .store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
        r
    }

    /// Whether a write failed for lack of space since the database was last opened: it
    /// takes no more writes until [`recover`](Self::recover).
    pub fn out_of_space(&self) -> bool {
        self.out_of_space.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Reopens the database after a write failed for lack of space, once the disk has
    /// room again. Reads go on from a read-only instance while it reopens; if reopening
    /// fails, that instance stays (reads work, writes fail) and a later call tries again.
    pub fn recover(&self) -> Result<(), StoreError> {
        let fallback = Self::open_read_only(&self.path)?;
        let mut slot = self.db.write().unwrap_or_else(|e| e.into_inner());
        // Operations in flight hold the old instance briefly; wait for them (new ones
        // wait for this lock).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::sync::Arc::strong_count(&slot) > 1 {
            if std::time::Instant::now() > deadline {
                return Err(StoreError::Database(
                    "the database is still in use; reopening later".into(),
                ));
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        // Dropping the old instance releases its lock for the new one.
        *slot = std::sync::Arc::new(fallback);
        let db = Self::open_db(&self.path)?;
        *slot = std::sync::Arc::new(db);
        self.out_of_space
            .store(false, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Removes least recently used cached blob files, never one a private repository
    /// links, until `target` bytes are free; returns the bytes freed. Opens the database
    /// read-only, which needs no space: for a store too full to open. The records of the
    /// removed files stay (a read finds no file and fetches the blob again; the next
    /// eviction pass drops them).
    pub fn evict_offline(
        path: &Path,
        blobs: &crate::BlobStore,
        target: u64,
    ) -> Result<u64, StoreError> {
        let meta = MetaStore::from_db(Self::open_read_only(path)?, path);
        let mut used = std::collections::HashMap::new();
        meta.visit_last_accesses(|d, t| {
            used.insert(d, t);
            true
        })?;
        let mut candidates = Vec::new();
        meta.visit_cached_blobs(|d, rec| {
            let t = used.get(&d).copied().unwrap_or(rec.last_access_ms);
            candidates.push((t, d));
            true
        })?;
        candidates.sort();
        let mut freed = 0;
        for (_, digest) in candidates {
            if freed >= target {
                break;
            }
            if meta.privately_linked(&digest)? {
                continue;
            }
            freed += blobs.delete_unpinned(&digest)?.unwrap_or(0);
        }
        Ok(freed)
    }

    /// Builds `blob_owners` from `repo_blobs` for a store made before it existed (once:
    /// afterwards every link writes both).
    fn index_blob_owners(&self) -> Result<(), StoreError> {
        let mut empty = true;
        self.visit(CF_BLOB_OWNERS, b"", |_, _| {
            empty = false;
            Ok(false)
        })?;
        if !empty {
            return Ok(());
        }
        let mut batch = Batch::default();
        self.visit_blob_links(|repo, digest, link| {
            batch.ops.push((
                CF_BLOB_OWNERS,
                repo_key(&digest.to_string(), &[repo]),
                Some(encode_ms(link.size)),
            ));
            true
        })?;
        if !batch.is_empty() {
            self.write_synced(batch)?;
        }
        Ok(())
    }

    /// Whether any private repository links `digest`.
    pub fn privately_linked(&self, digest: &Digest) -> Result<bool, StoreError> {
        let mut found = false;
        self.visit(
            CF_BLOB_OWNERS,
            &repo_key(&digest.to_string(), &[""]),
            |_, _| {
                found = true;
                Ok(false)
            },
        )?;
        Ok(found)
    }

    /// Calls `f(digest, size)` once for every blob some private repository links, in
    /// digest order; `f` returns `false` to stop.
    pub fn visit_private_blobs(
        &self,
        mut f: impl FnMut(Digest, u64) -> bool,
    ) -> Result<(), StoreError> {
        let mut last: Option<Vec<u8>> = None;
        self.visit(CF_BLOB_OWNERS, b"", |k, v| {
            let end = k
                .iter()
                .position(|&b| b == 0)
                .ok_or_else(|| corrupt("owner key"))?;
            if last.as_deref() == Some(&k[..end]) {
                return Ok(true);
            }
            last = Some(k[..end].to_vec());
            Ok(f(parse_digest_key(&k[..end])?, decode_ms(v)?))
        })
    }

    fn get<K: ?Sized + AsRef<[u8]>, V: Codec>(
        &self,
        cf: &str,
        key: &K,
    ) -> Result<Option<V>, StoreError> {
        let db = self.db();
        let handle = db.cf_handle(cf).expect("column family opened");
        let value = db.get_pinned_cf(&handle, key).map_err(db_err)?;
        match value {
            Some(v) => V::decode(&v).map(Some),
            None => Ok(None),
        }
    }

    fn put<K: ?Sized + AsRef<[u8]>, V: Codec>(
        &self,
        cf: &str,
        key: &K,
        value: &V,
    ) -> Result<(), StoreError> {
        let db = self.db();
        let handle = db.cf_handle(cf).expect("column family opened");
        self.wrote(db.put_cf(&handle, key, value.encode()))
    }

    fn delete(&self, cf: &str, key: &[u8]) -> Result<(), StoreError> {
        let db = self.db();
        let handle = db.cf_handle(cf).expect("column family opened");
        self.wrote(db.delete_cf(&handle, key))
    }

    pub fn get_tag(&self, key: &TagKey) -> Result<Option<TagRecord>, StoreError> {
        self.get(CF_TAGS, &key.encode())
    }

    pub fn put_tag(&self, key: &TagKey, record: &TagRecord) -> Result<(), StoreError> {
        self.put(CF_TAGS, &key.encode(), record)
    }

    pub fn delete_tag(&self, key: &TagKey) -> Result<(), StoreError> {
        self.delete(CF_TAGS, &key.encode())
    }

    pub fn get_manifest(&self, digest: &Digest) -> Result<Option<ManifestRecord>, StoreError> {
        self.get(CF_MANIFESTS, &digest.to_string())
    }

    pub fn put_manifest(&self, digest: &Digest, record: &ManifestRecord) -> Result<(), StoreError> {
        self.put(CF_MANIFESTS, &digest.to_string(), record)
    }

    pub fn get_api_key(&self, id: &str) -> Result<Option<ApiKeyRecord>, StoreError> {
        self.get(CF_API_KEYS, id.as_bytes())
    }

    pub fn put_api_key(&self, id: &str, record: &ApiKeyRecord) -> Result<(), StoreError> {
        self.put(CF_API_KEYS, id.as_bytes(), record)
    }

    pub fn delete_api_key(&self, id: &str) -> Result<(), StoreError> {
        self.delete(CF_API_KEYS, id.as_bytes())
    }

    /// Every API key, by id.
    pub fn api_keys(&self) -> Result<Vec<(String, ApiKeyRecord)>, StoreError> {
        self.scan(CF_API_KEYS, b"", None, usize::MAX)?
            .into_iter()
            .map(|(k, v)| {
                let id = String::from_utf8(k).map_err(|_| corrupt("api key id"))?;
                Ok((id, ApiKeyRecord::decode(&v)?))
            })
            .collect()
    }

    pub fn get_private_manifest(
        &self,
        digest: &Digest,
    ) -> Result<Option<ManifestRecord>, StoreError> {
        self.get(CF_PRIVATE_MANIFESTS, &digest.to_string())
    }

    pub fn delete_private_manifest(&self, digest: &Digest) -> Result<(), StoreError> {
        self.delete(CF_PRIVATE_MANIFESTS, digest.to_string().as_bytes())
    }

    /// The digests of every stored private manifest.
    pub fn private_manifest_digests(&self) -> Result<Vec<Digest>, StoreError> {
        self.scan(CF_PRIVATE_MANIFESTS, b"", None, usize::MAX)?
            .into_iter()
            .map(|(k, _)| {
                std::str::from_utf8(&k)
                    .ok()
                    .and_then(|k| k.parse().ok())
                    .ok_or_else(|| corrupt("private manifest key"))
            })
            .collect()
    }

    pub fn get_blob(&self, digest: &Digest) -> Result<Option<BlobRecord>, StoreError> {
        self.get(CF_BLOBS, &digest.to_string())
    }

    /// Records that `digest` (of `size` bytes) is stored and was used for `repo` at `now_ms`.
    pub fn record_blob(
        &self,
        digest: &Digest,
        size: u64,
        repo: &str,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let mut record = self.get_blob(digest)?.unwrap_or(BlobRecord {
            size,
            last_access_ms: now_ms,
            repos: Vec::new(),
        });
        record.size = size;
        record.last_access_ms = record.last_access_ms.max(now_ms);
        if !record.repos.iter().any(|r| r == repo) {
            if record.repos.len() >= MAX_BLOB_REPOS {
                record.repos.remove(0);
            }
            record.repos.push(repo.to_owned());
        }
        self.put(CF_BLOBS, &digest.to_string(), &record)
    }

    /// Whether `digest` is known to be in `repo` of `upstream`: fetched through it, or
    /// confirmed by the upstream.
    pub fn cache_link(
        &self,
        upstream: &str,
        repo: &str,
        digest: &Digest,
    ) -> Result<bool, StoreError> {
        let db = self.db();
        let handle = db.cf_handle(CF_CACHE_LINKS).expect("column family opened");
        let found = db
            .get_pinned_cf(&handle, cache_link_key(upstream, repo, digest))
            .map_err(db_err)?
            .is_some();
        Ok(found)
    }

    /// Records that `repo` of `upstream` has `digest`, as the upstream said at `now_ms`.
    pub fn put_cache_link(
        &self,
        upstream: &str,
        repo: &str,
        digest: &Digest,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let db = self.db();
        let v = encode_ms(now_ms);
        let handle = db.cf_handle(CF_CACHE_LINKS).expect("column family opened");
        self.wrote(db.put_cf(&handle, cache_link_key(upstream, repo, digest), v))
    }

    /// When `digest` was last used, as flushed by [`crate::AccessLog`].
    pub fn last_access(&self, digest: &Digest) -> Result<Option<u64>, StoreError> {
        let db = self.db();
        let handle = db.cf_handle(CF_LAST_ACCESS).expect("column family opened");
        let value = db
            .get_pinned_cf(&handle, digest.to_string())
            .map_err(db_err)?;
        match value {
            Some(v) => decode_ms(&v).map(Some),
            None => Ok(None),
        }
    }

    /// Writes access times in one batch, never moving a stored time back.
    pub fn put_last_accesses(
        &self,
        times: &std::collections::HashMap<Digest, u64>,
    ) -> Result<(), StoreError> {
        let mut batch = Batch::default();
        for (digest, &at) in times {
            if self.last_access(digest)?.is_some_and(|t| t >= at) {
                continue;
            }
            batch.ops.push((
                CF_LAST_ACCESS,
                digest.to_string().into_bytes(),
                Some(encode_ms(at)),
            ));
        }
        self.write(batch)
    }

    /// Calls `f` with every stored access time; `f` returns `false` to stop.
    pub fn visit_last_accesses(
        &self,
        mut f: impl FnMut(Digest, u64) -> bool,
    ) -> Result<(), StoreError> {
        self.visit(CF_LAST_ACCESS, b"", |k, v| {
            Ok(f(parse_digest_key(k)?, decode_ms(v)?))
        })
    }

    /// Calls `f` with every pulled-through blob record; `f` returns `false` to stop.
    pub fn visit_cached_blobs(
        &self,
        mut f: impl FnMut(Digest, BlobRecord) -> bool,
    ) -> Result<(), StoreError> {
        self.visit(CF_BLOBS, b"", |k, v| {
            Ok(f(parse_digest_key(k)?, BlobRecord::decode(v)?))
        })
    }

    /// Calls `f` with every pulled-through manifest; `f` returns `false` to stop.
    pub fn visit_cached_manifests(
        &self,
        mut f: impl FnMut(Digest, ManifestRecord) -> bool,
    ) -> Result<(), StoreError> {
        self.visit(CF_MANIFESTS, b"", |k, v| {
            Ok(f(parse_digest_key(k)?, ManifestRecord::decode(v)?))
        })
    }

    /// Calls `f` with every cached tag; `f` returns `false` to stop.
    pub fn visit_cache_tags(
        &self,
        mut f: impl FnMut(TagKey, TagRecord) -> bool,
    ) -> Result<(), StoreError> {
        self.visit(CF_TAGS, b"", |k, v| {
            Ok(f(TagKey::decode(k)?, TagRecord::decode(v)?))
        })
    }

    /// Calls `f` with `(upstream, repo, digest)` of every cache link (of `upstream`, and
    /// of only its `repo`, if given); `f` returns `false` to stop.
    pub fn visit_cache_links(
        &self,
        upstream: Option<&str>,
        repo: Option<&str>,
        mut f: impl FnMut(&str, &str, Digest) -> bool,
    ) -> Result<(), StoreError> {
        let prefix = match (upstream, repo) {
            (None, _) => Vec::new(),
            (Some(u), Some(r)) => repo_key(u, &[r, ""]),
            (Some(u), None) => repo_key(u, &[""]),
        };
        self.visit(CF_CACHE_LINKS, &prefix, |k, _| {
            let k = std::str::from_utf8(k).map_err(|_| corrupt("cache link key"))?;
            let mut parts = k.split('\0');
            match (parts.next(), parts.next(), parts.next(), parts.next()) {
                (Some(u), Some(r), Some(d), None) => {
                    let d = d.parse().map_err(|_| corrupt("cache link key"))?;
                    Ok(f(u, r, d))
                }
                _ => Err(corrupt("cache link key")),
            }
        })
    }

    /// Calls `f` with every `(repo, digest)` of the private repositories' blob links.
    pub fn visit_blob_links(
        &self,
        mut f: impl FnMut(&str, Digest, RepoLink) -> bool,
    ) -> Result<(), StoreError> {
        self.visit(CF_REPO_BLOBS, b"", |k, v| {
            let k = std::str::from_utf8(k).map_err(|_| corrupt("link key"))?;
            let (repo, digest) = k.rsplit_once('\0').ok_or_else(|| corrupt("link key"))?;
            let digest = digest.parse().map_err(|_| corrupt("link key"))?;
            Ok(f(repo, digest, RepoLink::decode(v)?))
        })
    }

    /// Calls `f(key, value)` for every record of `cf` whose key starts with `prefix` (the
    /// whole key is passed), in key order, until `f` returns `false`.
    fn visit(
        &self,
        cf: &'static str,
        prefix: &[u8],
        mut f: impl FnMut(&[u8], &[u8]) -> Result<bool, StoreError>,
    ) -> Result<(), StoreError> {
        let db = self.db();
        let handle = db.cf_handle(cf).expect("column family opened");
        let iter = db.iterator_cf(
            &handle,
            rocksdb::IteratorMode::From(prefix, rocksdb::Direction::Forward),
        );
        for item in iter {
            let (k, v) = item.map_err(db_err)?;
            if !k.starts_with(prefix) || !f(&k, &v)? {
                break;
            }
        }
        Ok(())
    }

    /// Applies `batch` atomically.
    pub fn write(&self, batch: Batch) -> Result<(), StoreError> {
        self.write_batch(batch, false)
    }

    /// Applies `batch` atomically and durably: the write-ahead log is synced before it
    /// returns, so the batch survives a power loss (for private content).
    pub fn write_synced(&self, batch: Batch) -> Result<(), StoreError> {
        self.write_batch(batch, true)
    }

    fn write_batch(&self, batch: Batch, sync: bool) -> Result<(), StoreError> {
        let db = self.db();
        let mut wb = rocksdb::WriteBatch::default();
        for (cf, key, value) in batch.ops {
            let handle = db.cf_handle(cf).expect("column family opened");
            match value {
                Some(v) => wb.put_cf(&handle, key, v),
                None => wb.delete_cf(&handle, key),
            }
        }
        let mut opts = rocksdb::WriteOptions::default();
        opts.set_sync(sync);
        self.wrote(db.write_opt(wb, &opts))
    }

    pub fn repo_exists(&self, repo: &str) -> Result<bool, StoreError> {
        let db = self.db();
        let handle = db.cf_handle(CF_REPOS).expect("column family opened");
        let found = db
            .get_pinned_cf(&handle, repo.as_bytes())
            .map_err(db_err)?
            .is_some();
        Ok(found)
    }

    pub fn repo_tag(&self, repo: &str, tag: &str) -> Result<Option<RepoTag>, StoreError> {
        self.get(CF_REPO_TAGS, &repo_key(repo, &[tag]))
    }

    pub fn repo_manifest(
        &self,
        repo: &str,
        digest: &Digest,
    ) -> Result<Option<RepoLink>, StoreError> {
        self.get(CF_REPO_MANIFESTS, &repo_key(repo, &[&digest.to_string()]))
    }

    /// The media type `digest` was pushed to `repo` with (`None` for a manifest stored
    /// before types were kept per repository: the stored record's type applies).
    pub fn repo_manifest_type(
        &self,
        repo: &str,
        digest: &Digest,
    ) -> Result<Option<String>, StoreError> {
        let db = self.db();
        let handle = db
            .cf_handle(CF_REPO_MANIFEST_TYPES)
            .expect("column family opened");
        let value = db
            .get_pinned_cf(&handle, repo_key(repo, &[&digest.to_string()]))
            .map_err(db_err)?;
        match value {
            Some(v) => String::from_utf8(v.to_vec())
                .map(Some)
                .map_err(|_| corrupt("manifest type")),
            None => Ok(None),
        }
    }

    pub fn repo_blob(&self, repo: &str, digest: &Digest) -> Result<Option<RepoLink>, StoreError> {
        self.get(CF_REPO_BLOBS, &repo_key(repo, &[&digest.to_string()]))
    }

    /// Up to `limit` tags of `repo` in lexical order, after `last` if given.
    pub fn repo_tags(
        &self,
        repo: &str,
        last: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, RepoTag)>, StoreError> {
        let prefix = repo_key(repo, &[""]);
        self.scan(
            CF_REPO_TAGS,
            &prefix,
            last.map(|l| repo_key(repo, &[l])),
            limit,
        )?
        .into_iter()
        .map(|(k, v)| {
            let tag = String::from_utf8(k).map_err(|_| corrupt("tag key"))?;
            Ok((tag, RepoTag::decode(&v)?))
        })
        .collect()
    }

    /// Every tag of `repo` that points at `digest`.
    pub fn repo_tags_of(&self, repo: &str, digest: &Digest) -> Result<Vec<String>, StoreError> {
        Ok(self
            .repo_tags(repo, None, usize::MAX)?
            .into_iter()
            .filter(|(_, t)| t.digest == *digest)
            .map(|(tag, _)| tag)
            .collect())
    }

    /// Every manifest linked into `repo`, in digest order.
    pub fn repo_manifests(&self, repo: &str) -> Result<Vec<(Digest, RepoLink)>, StoreError> {
        self.scan(CF_REPO_MANIFESTS, &repo_key(repo, &[""]), None, usize::MAX)?
            .into_iter()
            .map(|(k, v)| {
                let digest = std::str::from_utf8(&k)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| corrupt("manifest link key"))?;
                Ok((digest, RepoLink::decode(&v)?))
            })
            .collect()
    }

    /// Up to `limit` private repositories in lexical order, after `last` if given.
    pub fn repos(&self, last: Option<&str>, limit: usize) -> Result<Vec<String>, StoreError> {
        self.scan(CF_REPOS, b"", last.map(|l| l.as_bytes().to_vec()), limit)?
            .into_iter()
            .map(|(k, _)| String::from_utf8(k).map_err(|_| corrupt("repository key")))
            .collect()
    }

    /// The descriptors of the manifests in `repo` whose subject is `subject`.
    pub fn referrers(&self, repo: &str, subject: &Digest) -> Result<Vec<Bytes>, StoreError> {
        let prefix = repo_key(repo, &[&subject.to_string(), ""]);
        Ok(self
            .scan(CF_REFERRERS, &prefix, None, usize::MAX)?
            .into_iter()
            .map(|(_, v)| Bytes::from(v))
            .collect())
    }

    /// Every `(repo, digest, link)` of the private repositories' blob links.
    pub fn all_blob_links(&self) -> Result<Vec<(String, Digest, RepoLink)>, StoreError> {
        self.all_links(CF_REPO_BLOBS)
    }

    /// Every `(repo, digest, link)` of the private repositories' manifests.
    pub fn all_manifest_links(&self) -> Result<Vec<(String, Digest, RepoLink)>, StoreError> {
        self.all_links(CF_REPO_MANIFESTS)
    }

    fn all_links(&self, cf: &'static str) -> Result<Vec<(String, Digest, RepoLink)>, StoreError> {
        self.scan(cf, b"", None, usize::MAX)?
            .into_iter()
            .map(|(k, v)| {
                let k = String::from_utf8(k).map_err(|_| corrupt("link key"))?;
                let (repo, digest) = k.rsplit_once('\0').ok_or_else(|| corrupt("link key"))?;
                let digest = digest.parse().map_err(|_| corrupt("link key"))?;
                Ok((repo.to_owned(), digest, RepoLink::decode(&v)?))
            })
            .collect()
    }

    /// Up to `limit` records of `cf` whose keys start with `prefix`, in key order,
    /// strictly after `after` if given; keys are returned without the prefix.
    fn scan(
        &self,
        cf: &'static str,
        prefix: &[u8],
        after: Option<Vec<u8>>,
        limit: usize,
    ) -> Result<Vec<Record>, StoreError> {
        let db = self.db();
        let handle = db.cf_handle(cf).expect("column family opened");
        let start = after.clone().unwrap_or_else(|| prefix.to_vec());
        let iter = db.iterator_cf(
            &handle,
            rocksdb::IteratorMode::From(&start, rocksdb::Direction::Forward),
        );
        let mut out = Vec::new();
        for item in iter {
            if out.len() >= limit {
                break;
            }
            let (k, v) = item.map_err(db_err)?;
            if !k.starts_with(prefix) {
                break;
            }
            if after.as_deref() == Some(&k[..]) {
                continue;
            }
            out.push((k[prefix.len()..].to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    /// How many blob records the index holds (an estimate from RocksDB's statistics).
    pub fn blob_count_estimate(&self) -> u64 {
        let db = self.db();
        let handle = db.cf_handle(CF_BLOBS).expect("column family opened");
        db.property_int_value_cf(&handle, "rocksdb.estimate-num-keys")
            .ok()
            .flatten()
            .unwrap_or(0)
    }
}

fn encode_ms(ms: u64) -> Vec<u8> {
    let mut v = vec![VERSION];
    v.extend_from_slice(&ms.to_be_bytes());
    v
}

fn decode_ms(bytes: &[u8]) -> Result<u64, StoreError> {
    let mut r = Reader(bytes);
    r.version("time")?;
    let ms = r.u64("time")?;
    if !r.0.is_empty() {
        return Err(corrupt("time"));
    }
    Ok(ms)
}

fn parse_digest_key(k: &[u8]) -> Result<Digest, StoreError> {
    std::str::from_utf8(k)
        .ok()
        .and_then(|k| k.parse().ok())
        .ok_or_else(|| corrupt("digest key"))
}

fn db_err(e: rocksdb::Error) -> StoreError {
    StoreError::Database(e.into_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip<T: Codec + PartialEq + std::fmt::Debug>(v: T) {
        let enc = v.encode();
        assert_eq!(T::decode(&enc).unwrap(), v);
        // Every strict prefix is garbage, not a panic.
        for n in 0..enc.len() {
            let _ = T::decode(&enc[..n]);
        }
    }

    #[test]
    fn codecs_round_trip() {
        let d = Digest::sha256_of(b"m");
        round_trip(TagKey {
            upstream: "docker.io".into(),
            repo: "library/nginx".into(),
            tag: "1.27".into(),
            variant: 15,
        });
        round_trip(TagRecord {
            digest: d.clone(),
            confirmed_at_ms: 1_700_000_000_123,
        });
        round_trip(ManifestRecord {
            media_type: crate::oci::OCI_INDEX.into(),
            body: Bytes::from_static(b"{\"schemaVersion\":2}"),
        });
        round_trip(ApiKeyRecord {
            owner: "ci-robot".into(),
            name: "pipeline".into(),
            secret_sha256: [9; 32],
            created_ms: 1,
            expires_ms: 2,
            provider: "corp".into(),
            groups: vec!["ci".into(), "admins".into()],
            last_used_ms: 3,
        });
        // A record written before keys had providers, groups and uses still reads.
        let mut old = ApiKeyRecord {
            owner: "ci-robot".into(),
            name: "pipeline".into(),
            secret_sha256: [9; 32],
            created_ms: 1,
            expires_ms: 2,
            provider: String::new(),
            groups: Vec::new(),
            last_used_ms: 0,
        };
        let mut enc = old.encode();
        enc.truncate(enc.len() - 12);
        assert_eq!(ApiKeyRecord::decode(&enc).unwrap(), old);
        old.groups.push("ci".into());
        round_trip(old);
        round_trip(BlobRecord {
            size: 42,
            last_access_ms: 7,
            repos: vec!["docker.io/library/nginx".into(), "ghcr.io/a/b".into()],
        });
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for junk in [&b""[..], b"\x00", b"\x02abc", b"\x01\xff", &[0xff; 40]] {
            assert!(TagRecord::decode(junk).is_err());
            assert!(BlobRecord::decode(junk).is_err());
            assert!(ManifestRecord::decode(junk).is_err());
        }
        assert!(TagKey::decode(b"a\0b").is_err());
        assert!(TagKey::decode(b"a\0b\0c").is_err());
        assert!(TagKey::decode(b"a\0b\0c\0x").is_err());
        assert!(TagKey::decode(b"a\0b\0c\x00300").is_err());
        assert!(TagKey::decode(b"\xff\0b\0c\x001").is_err());
    }

    #[test]
    fn records_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let key = TagKey {
            upstream: "docker.io".into(),
            repo: "library/nginx".into(),
            tag: "latest".into(),
            variant: 0,
        };
        let d = Digest::sha256_of(b"manifest");
        {
            let m = MetaStore::open(dir.path()).unwrap();
            m.put_tag(
                &key,
                &TagRecord {
                    digest: d.clone(),
                    confirmed_at_ms: 5,
                },
            )
            .unwrap();
            m.put_manifest(
                &d,
                &ManifestRecord {
                    media_type: "x".into(),
                    body: Bytes::from_static(b"manifest"),
                },
            )
            .unwrap();
            m.record_blob(&d, 8, "docker.io/library/nginx", 10).unwrap();
            m.record_blob(&d, 8, "docker.io/library/nginx", 20).unwrap();
            m.record_blob(&d, 8, "ghcr.io/a/b", 15).unwrap();
        }
        let m = MetaStore::open(dir.path()).unwrap();
        assert_eq!(m.get_tag(&key).unwrap().unwrap().digest, d);
        assert_eq!(&m.get_manifest(&d).unwrap().unwrap().body[..], b"manifest");
        let b = m.get_blob(&d).unwrap().unwrap();
        assert_eq!(b.last_access_ms, 20);
        assert_eq!(b.repos, vec!["docker.io/library/nginx", "ghcr.io/a/b"]);
        m.delete_tag(&key).unwrap();
        assert_eq!(m.get_tag(&key).unwrap(), None);
    }

    #[test]
    fn private_links_are_indexed_by_digest_too() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (Digest::sha256_of(b"a"), Digest::sha256_of(b"b"));
        let link = |size| RepoLink { linked_ms: 1, size };
        {
            let m = MetaStore::open(dir.path()).unwrap();
            let mut batch = Batch::default();
            batch.link_blob("team/app", &a, link(1));
            batch.link_blob("team/other", &a, link(1));
            batch.link_blob("team/app", &b, link(2));
            m.write(batch).unwrap();
            let mut batch = Batch::default();
            batch.unlink_blob("team/app", &b);
            m.write(batch).unwrap();
            // A store from before the index: only `repo_blobs`.
            let db = m.db();
            let handle = db.cf_handle(CF_BLOB_OWNERS).unwrap();
            db.delete_cf(&handle, repo_key(&a.to_string(), &["team/app"]))
                .unwrap();
            db.delete_cf(&handle, repo_key(&a.to_string(), &["team/other"]))
                .unwrap();
            assert!(!m.privately_linked(&a).unwrap());
        }
        let m = MetaStore::open(dir.path()).unwrap();
        assert!(m.privately_linked(&a).unwrap(), "rebuilt on open");
        assert!(!m.privately_linked(&b).unwrap());
        let mut seen = Vec::new();
        m.visit_private_blobs(|d, size| {
            seen.push((d, size));
            true
        })
        .unwrap();
        assert_eq!(seen, vec![(a, 1)]);
    }

    #[test]
    fn cache_links_are_per_upstream_and_repository() {
        let dir = tempfile::tempdir().unwrap();
        let d = Digest::sha256_of(b"layer");
        {
            let m = MetaStore::open(dir.path()).unwrap();
            m.put_cache_link("ghcr.io", "acme/secret/app", &d, 1)
                .unwrap();
        }
        let m = MetaStore::open(dir.path()).unwrap();
        assert!(m.cache_link("ghcr.io", "acme/secret/app", &d).unwrap());
        assert!(!m.cache_link("ghcr.io", "acme/secret", &d).unwrap());
        assert!(!m.cache_link("docker.io", "acme/secret/app", &d).unwrap());
        assert!(!m.cache_link("docker.io", "library/alpine", &d).unwrap());
        let other = Digest::sha256_of(b"other");
        assert!(!m.cache_link("ghcr.io", "acme/secret/app", &other).unwrap());
    }

    #[test]
    fn a_repository_lists_only_its_own_manifests() {
        let dir = tempfile::tempdir().unwrap();
        let m = MetaStore::open(dir.path()).unwrap();
        let (a, b) = (Digest::sha256_of(b"a"), Digest::sha256_of(b"b"));
        let link = |ms| RepoLink {
            linked_ms: ms,
            size: 1,
        };
        let mut batch = Batch::default();
        batch
            .link_manifest("team/app", &a, link(1))
            .link_manifest("team/app/sub", &b, link(2))
            .link_manifest("team/ap", &b, link(3));
        m.write(batch).unwrap();
        assert_eq!(m.repo_manifests("team/app").unwrap(), vec![(a, link(1))]);
        assert!(m.repo_manifests("team").unwrap().is_empty());
    }
}
