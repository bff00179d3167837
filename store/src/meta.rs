//! Metadata in RocksDB, behind typed accessors. No RocksDB type leaves this module.
//!
//! Column families (one per kind of record):
//!
//! | family      | key                                   | value                                   |
//! |-------------|---------------------------------------|-----------------------------------------|
//! | `tags`      | [`TagKey`]: `upstream \0 repo \0 tag \0 variant` | [`TagRecord`]: digest and when confirmed |
//! | `manifests` | digest string                         | [`ManifestRecord`]: media type and bytes |
//! | `blobs`     | digest string                         | [`BlobRecord`]: size, last access, repos |
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

/// How many repositories a blob record remembers; older ones are dropped first.
const MAX_BLOB_REPOS: usize = 64;

/// The metadata database.
pub struct MetaStore {
    db: DB,
}

impl std::fmt::Debug for MetaStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetaStore").finish_non_exhaustive()
    }
}

impl MetaStore {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_max_open_files(256);
        opts.set_keep_log_file_num(4);
        let cfs = [CF_TAGS, CF_MANIFESTS, CF_BLOBS]
            .into_iter()
            .map(|name| ColumnFamilyDescriptor::new(name, Options::default()));
        let db = DB::open_cf_descriptors(&opts, path, cfs).map_err(db_err)?;
        Ok(MetaStore { db })
    }

    fn get<K: ?Sized + AsRef<[u8]>, V: Codec>(
        &self,
        cf: &str,
        key: &K,
    ) -> Result<Option<V>, StoreError> {
        let handle = self.db.cf_handle(cf).expect("column family opened");
        match self.db.get_pinned_cf(&handle, key).map_err(db_err)? {
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
        let handle = self.db.cf_handle(cf).expect("column family opened");
        self.db.put_cf(&handle, key, value.encode()).map_err(db_err)
    }

    fn delete(&self, cf: &str, key: &[u8]) -> Result<(), StoreError> {
        let handle = self.db.cf_handle(cf).expect("column family opened");
        self.db.delete_cf(&handle, key).map_err(db_err)
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

    /// How many blob records the index holds (an estimate from RocksDB's statistics).
    pub fn blob_count_estimate(&self) -> u64 {
        let handle = self.db.cf_handle(CF_BLOBS).expect("column family opened");
        self.db
            .property_int_value_cf(&handle, "rocksdb.estimate-num-keys")
            .ok()
            .flatten()
            .unwrap_or(0)
    }
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
}
