//! The little of the OCI/Docker manifest vocabulary a pull needs: telling an index from
//! a manifest, picking a platform, and listing the blobs a manifest references.

use std::fmt;
use std::str::FromStr;

use serde::Deserialize;

use crate::digest::Digest;

pub use berth_oci::{
    DOCKER_MANIFEST, DOCKER_MANIFEST_LIST as DOCKER_LIST,
    MANIFEST_ACCEPT_DEFAULT as ACCEPT_MANIFESTS, OCI_INDEX, OCI_MANIFEST,
};

/// Manifest bodies larger than this are refused (the distribution spec's usual limit).
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;

/// An image platform: `os/architecture[/variant]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl FromStr for Platform {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split('/').collect();
        if parts.len() < 2 || parts.len() > 3 || parts.iter().any(|p| p.is_empty()) {
            return Err(format!(
                "platform {s:?}: expected os/architecture[/variant], e.g. linux/amd64"
            ));
        }
        Ok(Platform {
            os: parts[0].to_owned(),
            architecture: parts[1].to_owned(),
            variant: parts.get(2).map(|v| (*v).to_owned()),
        })
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Deserialize)]
struct RawPlatform {
    #[serde(default)]
    os: String,
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    variant: Option<String>,
}

impl Platform {
    /// Whether an index entry's platform `p` satisfies this (wanted) platform.
    pub fn matches(&self, p: &Platform) -> bool {
        if p.os != self.os || p.architecture != self.architecture {
            return false;
        }
        match (&self.variant, &p.variant) {
            (None, _) => true,
            (Some(want), Some(have)) => want == have,
            // arm64 images often leave out the (only) variant v8.
            (Some(want), None) => self.architecture == "arm64" && want == "v8",
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
struct RawDescriptor {
    digest: String,
    #[serde(default)]
    platform: Option<RawPlatform>,
}

#[derive(Clone, Debug, Deserialize)]
struct RawManifest {
    #[serde(rename = "schemaVersion", default)]
    schema_version: Option<u32>,
    #[serde(rename = "mediaType", default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<Vec<RawDescriptor>>,
    #[serde(default)]
    config: Option<RawDescriptor>,
    #[serde(default)]
    layers: Option<Vec<RawDescriptor>>,
}

/// A parsed manifest body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// An index (or Docker manifest list): its entries.
    Index(Vec<IndexEntry>),
    /// An image manifest: its config and layers, in order.
    Manifest { config: Digest, layers: Vec<Digest> },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexEntry {
    pub digest: Digest,
    pub platform: Option<Platform>,
}

fn base_media_type(content_type: &str) -> &str {
    content_type.split(';').next().unwrap_or("").trim()
}

/// Parses a manifest body. The body's own `mediaType` decides its kind; without one, the
/// response's `Content-Type`; without a known one of those, whether it lists
/// `manifests` or `layers`.
pub fn parse(content_type: Option<&str>, body: &[u8]) -> Result<Parsed, String> {
    let raw: RawManifest =
        serde_json::from_slice(body).map_err(|e| format!("manifest is not JSON: {e}"))?;
    if raw.schema_version != Some(2) {
        return Err(format!(
            "unsupported schemaVersion {:?}",
            raw.schema_version
        ));
    }
    let declared = raw
        .media_type
        .as_deref()
        .or(content_type.map(base_media_type))
        .unwrap_or("");
    let is_index = match declared {
        OCI_INDEX | DOCKER_LIST => true,
        OCI_MANIFEST | DOCKER_MANIFEST => false,
        _ => raw.manifests.is_some(),
    };
    let digest = |d: &RawDescriptor| Digest::parse(&d.digest).map_err(|e| e.to_string());
    if is_index {
        let entries = raw.manifests.ok_or("index without manifests")?;
        entries
            .iter()
            .map(|d| {
                Ok(IndexEntry {
                    digest: digest(d)?,
                    platform: d.platform.as_ref().map(|p| Platform {
                        os: p.os.clone(),
                        architecture: p.architecture.clone(),
                        variant: p.variant.clone(),
                    }),
                })
            })
            .collect::<Result<_, String>>()
            .map(Parsed::Index)
    } else {
        let config = raw.config.as_ref().ok_or("manifest without config")?;
        let layers = raw.layers.as_deref().unwrap_or_default();
        Ok(Parsed::Manifest {
            config: digest(config)?,
            layers: layers.iter().map(digest).collect::<Result<_, _>>()?,
        })
    }
}

/// The digest of the first index entry for `platform`.
pub fn select<'a>(entries: &'a [IndexEntry], platform: &Platform) -> Option<&'a Digest> {
    entries
        .iter()
        .find(|e| e.platform.as_ref().is_some_and(|p| platform.matches(p)))
        .map(|e| &e.digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    fn index() -> String {
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[
              {{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":1,"platform":{{"os":"linux","architecture":"arm","variant":"v7"}}}},
              {{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":1,"platform":{{"os":"linux","architecture":"arm64"}}}},
              {{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":1,"platform":{{"os":"linux","architecture":"amd64"}}}},
              {{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":1,"platform":{{"os":"unknown","architecture":"unknown"}}}}
            ]}}"#,
            d('1'),
            d('2'),
            d('3'),
            d('4')
        )
    }

    #[test]
    fn platforms() {
        let p: Platform = "linux/arm64/v8".parse().unwrap();
        assert_eq!(p.variant.as_deref(), Some("v8"));
        assert_eq!(p.to_string(), "linux/arm64/v8");
        assert!("linux".parse::<Platform>().is_err());
        assert!("linux//x".parse::<Platform>().is_err());
    }

    #[test]
    fn selects_from_an_index() {
        let Parsed::Index(entries) = parse(None, index().as_bytes()).unwrap() else {
            panic!("not an index")
        };
        assert_eq!(entries.len(), 4);
        let pick = |p: &str| select(&entries, &p.parse().unwrap()).map(|d| d.to_string());
        assert_eq!(pick("linux/amd64"), Some(d('3')));
        assert_eq!(pick("linux/arm64"), Some(d('2')));
        assert_eq!(pick("linux/arm64/v8"), Some(d('2')));
        assert_eq!(pick("linux/arm/v7"), Some(d('1')));
        assert_eq!(pick("linux/arm/v6"), None);
        assert_eq!(pick("windows/amd64"), None);
    }

    #[test]
    fn parses_manifests() {
        let body = format!(
            r#"{{"schemaVersion":2,"config":{{"digest":"{}","size":2}},"layers":[{{"digest":"{}","size":3}},{{"digest":"{}","size":4}}]}}"#,
            d('a'),
            d('b'),
            d('c')
        );
        // No mediaType in the body: the Content-Type decides.
        let parsed = parse(
            Some(&format!("{DOCKER_MANIFEST}; charset=utf-8")),
            body.as_bytes(),
        );
        assert_eq!(
            parsed.unwrap(),
            Parsed::Manifest {
                config: Digest::parse(&d('a')).unwrap(),
                layers: vec![
                    Digest::parse(&d('b')).unwrap(),
                    Digest::parse(&d('c')).unwrap()
                ],
            }
        );
        assert!(parse(None, b"not json").is_err());
        assert!(parse(None, br#"{"schemaVersion":1,"fsLayers":[]}"#).is_err());
        assert!(parse(None, br#"{"schemaVersion":2,"layers":[]}"#).is_err());
        let bad_digest = br#"{"schemaVersion":2,"config":{"digest":"sha256:xyz"},"layers":[]}"#;
        assert!(parse(None, bad_digest).is_err());
    }
}
