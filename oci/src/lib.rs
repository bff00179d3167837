//! The OCI distribution vocabulary: digests, repository names, tags and media types.
//!
//! Everything here is pure: values are validated once, at the edge, against the grammar of
//! the OCI distribution specification, and are then safe to use in keys and file paths.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest as _, Sha256, Sha512};

/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index (multi-platform).
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker image manifest, schema 2.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list (multi-platform).
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// The manifest media types berth asks an upstream for when a client names none.
pub const MANIFEST_ACCEPT_DEFAULT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.docker.distribution.manifest.v2+json";

/// Longest repository name accepted, in bytes (the limit most registries enforce).
pub const MAX_NAME_LEN: usize = 255;

/// A digest algorithm berth can verify.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    Sha256,
    Sha512,
}

impl Algorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }

    fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }
}

/// A validated content digest such as `sha256:<64 lowercase hex>`.
///
/// Only algorithms berth can verify are accepted, and the encoded part is exactly the
/// algorithm's length in lowercase hex, so a digest is always safe as a path component.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    algorithm: Algorithm,
    hex: String,
}

/// Why a string is not a digest berth accepts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidDigest(pub String);

impl fmt::Display for InvalidDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for InvalidDigest {}

impl Digest {
    /// Parses and validates `algorithm:hex` (the same as `str::parse`).
    pub fn parse(s: &str) -> Result<Digest, InvalidDigest> {
        s.parse()
    }

    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The encoded (hex) part.
    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// The sha256 digest of `bytes`.
    pub fn sha256_of(bytes: &[u8]) -> Digest {
        Digest {
            algorithm: Algorithm::Sha256,
            hex: hex::encode(Sha256::digest(bytes)),
        }
    }

    /// Whether `bytes` hash to this digest.
    pub fn matches(&self, bytes: &[u8]) -> bool {
        let mut h = Hasher::new(self.algorithm);
        h.update(bytes);
        h.finish() == *self
    }
}

impl FromStr for Digest {
    type Err = InvalidDigest;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (alg, enc) = s
            .split_once(':')
            .ok_or_else(|| InvalidDigest(format!("{s:?} is not of the form algorithm:hex")))?;
        let algorithm = match alg {
            "sha256" => Algorithm::Sha256,
            "sha512" => Algorithm::Sha512,
            other => {
                return Err(InvalidDigest(format!(
                    "unsupported digest algorithm {other:?} (sha256 and sha512 are supported)"
                )))
            }
        };
        let lower_hex = enc
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if enc.len() != algorithm.hex_len() || !lower_hex {
            return Err(InvalidDigest(format!(
                "{alg} digest must be {} lowercase hex characters",
                algorithm.hex_len()
            )));
        }
        Ok(Digest {
            algorithm,
            hex: enc.to_owned(),
        })
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm.as_str(), self.hex)
    }
}

/// Incremental hashing for a digest's algorithm.
pub enum Hasher {
    Sha256(Sha256),
    Sha512(Sha512),
}

impl fmt::Debug for Hasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Hasher")
    }
}

impl Hasher {
    pub fn new(algorithm: Algorithm) -> Self {
        match algorithm {
            Algorithm::Sha256 => Hasher::Sha256(Sha256::new()),
            Algorithm::Sha512 => Hasher::Sha512(Sha512::new()),
        }
    }

    pub fn update(&mut self, bytes: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(bytes),
            Hasher::Sha512(h) => h.update(bytes),
        }
    }

    pub fn finish(self) -> Digest {
        match self {
            Hasher::Sha256(h) => Digest {
                algorithm: Algorithm::Sha256,
                hex: hex::encode(h.finalize()),
            },
            Hasher::Sha512(h) => Digest {
                algorithm: Algorithm::Sha512,
                hex: hex::encode(h.finalize()),
            },
        }
    }
}

/// Whether `name` is a repository name per the distribution spec:
/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_NAME_LEN && name.split('/').all(is_valid_component)
}

fn is_valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: ".", "_", "__" or one or more "-", followed by an alphanumeric.
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// Whether `tag` matches `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
pub fn is_valid_tag(tag: &str) -> bool {
    let b = tag.as_bytes();
    let word = |x: u8| x.is_ascii_alphanumeric() || x == b'_';
    !b.is_empty()
        && b.len() <= 128
        && word(b[0])
        && b[1..].iter().all(|&x| word(x) || x == b'.' || x == b'-')
}

/// What a manifest request names: a mutable tag or an immutable digest.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Reference {
    Tag(String),
    Digest(Digest),
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => f.write_str(t),
            Reference::Digest(d) => d.fmt(f),
        }
    }
}

/// Which of the four manifest media types an `Accept` header names, as a bitmask (OCI
/// index 1, OCI manifest 2, Docker list 4, Docker manifest 8); 0 when it names none of
/// them (berth then asks for all four). Requests with the same variant may share what
/// an upstream answered for a tag.
pub fn accept_variant(accept: &str) -> u8 {
    let mut v = 0;
    for item in accept.split(',') {
        let media_type = item.split(';').next().unwrap_or("").trim();
        v |= match media_type {
            OCI_INDEX => 1,
            OCI_MANIFEST => 2,
            DOCKER_MANIFEST_LIST => 4,
            DOCKER_MANIFEST => 8,
            _ => 0,
        };
    }
    v
}

/// Whether `media_type` is one of the manifest or index types berth stores.
pub fn is_index(media_type: &str) -> bool {
    media_type == OCI_INDEX || media_type == DOCKER_MANIFEST_LIST
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_parse_and_print() {
        let d: Digest = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
            .parse()
            .unwrap();
        assert_eq!(d, Digest::sha256_of(b""));
        assert!(d.matches(b""));
        assert!(!d.matches(b"x"));
        assert_eq!(d.to_string().parse::<Digest>().unwrap(), d);
    }

    #[test]
    fn bad_digests_are_refused() {
        for s in [
            "",
            "sha256",
            "sha256:",
            "sha256:abc",
            "md5:d41d8cd98f00b204e9800998ecf8427e",
            "sha256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855",
            "sha256:../../../../etc/passwd0000000000000000000000000000000000000000",
        ] {
            assert!(s.parse::<Digest>().is_err(), "{s:?} accepted");
        }
    }

    #[test]
    fn sha512_is_verified() {
        let mut h = Hasher::new(Algorithm::Sha512);
        h.update(b"abc");
        let d = h.finish();
        assert_eq!(d.hex().len(), 128);
        assert!(d.to_string().parse::<Digest>().unwrap().matches(b"abc"));
    }

    #[test]
    fn names_follow_the_spec_grammar() {
        for ok in [
            "library/nginx",
            "a",
            "ghcr.io/a/b/c",
            "a__b",
            "a---b",
            "my.app/x_y",
            "0",
        ] {
            assert!(is_valid_name(ok), "{ok} refused");
        }
        for bad in [
            "",
            "Library/nginx",
            "a//b",
            "/a",
            "a/",
            "a___b",
            "a.-b",
            "-a",
            "a..b",
            "..",
            "a/../b",
            &"a".repeat(256),
        ] {
            assert!(!is_valid_name(bad), "{bad} accepted");
        }
    }

    #[test]
    fn accept_variants() {
        assert_eq!(accept_variant(MANIFEST_ACCEPT_DEFAULT), 15);
        assert_eq!(accept_variant("*/*"), 0);
        assert_eq!(accept_variant(""), 0);
        assert_eq!(accept_variant(&format!("{DOCKER_MANIFEST}; q=0.5, */*")), 8);
        assert_eq!(accept_variant(&format!("{OCI_INDEX},{OCI_MANIFEST}")), 3);
    }

    #[test]
    fn tags_follow_the_spec_grammar() {
        assert!(is_valid_tag("latest"));
        assert!(is_valid_tag("1.27.0-alpine_x"));
        assert!(is_valid_tag(&"a".repeat(128)));
        assert!(!is_valid_tag(&"a".repeat(129)));
        assert!(!is_valid_tag(".hidden"));
        assert!(!is_valid_tag("-x"));
        assert!(!is_valid_tag("a/b"));
        assert!(!is_valid_tag(""));
    }
}
