//! Reading a pushed manifest: what it is, what it references, what it is about.
//!
//! Only the fields the registry acts on are read; the stored bytes are always exactly
//! the pushed bytes.

use berth_store::oci::{Digest, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_INDEX, OCI_MANIFEST};
use bytes::Bytes;
use serde_json::{Map, Value};

use crate::RegistryError;

/// The largest manifest berth accepts (the distribution spec's suggested minimum limit).
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;

/// A content descriptor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Descriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
}

/// What a pushed manifest references and declares.
#[derive(Clone, Debug)]
pub struct Parsed {
    /// Blobs (config and layers) that must be in the repository.
    pub blobs: Vec<Descriptor>,
    /// Child manifests (of an index) that must be in the repository.
    pub manifests: Vec<Descriptor>,
    pub subject: Option<Descriptor>,
    /// `artifactType`, or for an image manifest without one, its config's media type.
    pub artifact_type: Option<String>,
    pub annotations: Option<Map<String, Value>>,
}

fn invalid(msg: impl Into<String>) -> RegistryError {
    RegistryError::ManifestInvalid(msg.into())
}

/// Parses `body`, pushed with Content-Type `media_type`.
pub fn parse(media_type: &str, body: &[u8]) -> Result<Parsed, RegistryError> {
    let known = [
        OCI_MANIFEST,
        OCI_INDEX,
        DOCKER_MANIFEST,
        DOCKER_MANIFEST_LIST,
    ];
    if !known.contains(&media_type) {
        return Err(invalid(format!(
            "Content-Type {media_type:?} is not a manifest type berth stores (one of {})",
            known.join(", ")
        )));
    }
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| invalid(format!("the manifest is not valid JSON: {e}")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| invalid("the manifest is not a JSON object"))?;
    if obj.get("schemaVersion").and_then(Value::as_u64) != Some(2) {
        return Err(invalid("the manifest's schemaVersion is not 2"));
    }
    if let Some(declared) = obj.get("mediaType") {
        if declared.as_str() != Some(media_type) {
            return Err(invalid(format!(
                "the manifest declares mediaType {declared}, but was pushed as {media_type:?}"
            )));
        }
    }
    let index = media_type == OCI_INDEX || media_type == DOCKER_MANIFEST_LIST;
    let mut parsed = Parsed {
        blobs: Vec::new(),
        manifests: Vec::new(),
        subject: obj
            .get("subject")
            .map(|s| descriptor(s, "subject"))
            .transpose()?,
        artifact_type: obj
            .get("artifactType")
            .and_then(Value::as_str)
            .map(str::to_owned),
        annotations: obj.get("annotations").and_then(Value::as_object).cloned(),
    };
    if index {
        let list = obj
            .get("manifests")
            .and_then(Value::as_array)
            .ok_or_else(|| invalid("the index has no \"manifests\" array"))?;
        for (i, m) in list.iter().enumerate() {
            parsed
                .manifests
                .push(descriptor(m, &format!("manifests[{i}]"))?);
        }
    } else {
        let config = obj
            .get("config")
            .ok_or_else(|| invalid("the manifest has no \"config\""))?;
        let config = descriptor(config, "config")?;
        if parsed.artifact_type.is_none() && media_type == OCI_MANIFEST {
            parsed.artifact_type = Some(config.media_type.clone());
        }
        parsed.blobs.push(config);
        let layers = obj
            .get("layers")
            .and_then(Value::as_array)
            .ok_or_else(|| invalid("the manifest has no \"layers\" array"))?;
        for (i, l) in layers.iter().enumerate() {
            let d = descriptor(l, &format!("layers[{i}]"))?;
            // Layers that may not be distributed (with `urls`) are not pushed.
            if !(l.get("urls").is_some() && is_foreign(&d.media_type)) {
                parsed.blobs.push(d);
            }
        }
    }
    Ok(parsed)
}

fn is_foreign(media_type: &str) -> bool {
    media_type.contains("foreign") || media_type.contains("nondistributable")
}

fn descriptor(v: &Value, what: &str) -> Result<Descriptor, RegistryError> {
    let media_type = v
        .get("mediaType")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid(format!("{what} has no mediaType")))?;
    let digest = v
        .get("digest")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid(format!("{what} has no digest")))?;
    let digest = digest
        .parse()
        .map_err(|e| invalid(format!("{what} has an invalid digest: {e}")))?;
    let size = v
        .get("size")
        .and_then(Value::as_u64)
        .ok_or_else(|| invalid(format!("{what} has no size")))?;
    Ok(Descriptor {
        media_type: media_type.to_owned(),
        digest,
        size,
    })
}

/// The descriptor of a referrer, as listed by the referrers API.
pub fn referrer_descriptor(
    media_type: &str,
    digest: &Digest,
    size: usize,
    parsed: &Parsed,
) -> Bytes {
    let mut d = Map::new();
    d.insert("mediaType".into(), media_type.into());
    d.insert("digest".into(), digest.to_string().into());
    d.insert("size".into(), size.into());
    if let Some(t) = &parsed.artifact_type {
        d.insert("artifactType".into(), t.as_str().into());
    }
    if let Some(a) = &parsed.annotations {
        d.insert("annotations".into(), Value::Object(a.clone()));
    }
    Bytes::from(serde_json::to_vec(&Value::Object(d)).expect("serializable"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &[u8]) -> String {
        Digest::sha256_of(s).to_string()
    }

    #[test]
    fn an_image_manifest_lists_its_config_and_layers() {
        let body = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","artifactType":"application/x.sig",
            "config":{{"mediaType":"application/vnd.oci.empty.v1+json","digest":"{}","size":2}},
            "layers":[{{"mediaType":"application/x","digest":"{}","size":3}},
                      {{"mediaType":"application/vnd.docker.image.rootfs.foreign.diff.tar.gzip","digest":"{}","size":4,"urls":["https://x"]}}],
            "subject":{{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":9}},
            "annotations":{{"a":"b"}}}}"#,
            d(b"{}"),
            d(b"abc"),
            d(b"foreign"),
            d(b"subject")
        );
        let p = parse(OCI_MANIFEST, body.as_bytes()).unwrap();
        assert_eq!(p.blobs.len(), 2, "the foreign layer is not required");
        assert_eq!(p.blobs[1].size, 3);
        assert_eq!(p.subject.unwrap().digest.to_string(), d(b"subject"));
        assert_eq!(p.artifact_type.as_deref(), Some("application/x.sig"));
        assert_eq!(p.annotations.unwrap()["a"], "b");
    }

    #[test]
    fn an_index_lists_its_manifests() {
        let body = format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":5}}]}}"#,
            d(b"m")
        );
        let p = parse(OCI_INDEX, body.as_bytes()).unwrap();
        assert_eq!((p.blobs.len(), p.manifests.len()), (0, 1));
    }

    #[test]
    fn bad_manifests_are_invalid_with_a_reason() {
        let cases: [(&str, &str, &str); 7] = [
            ("text/plain", "{}", "not a manifest type"),
            (OCI_MANIFEST, "{", "not valid JSON"),
            (OCI_MANIFEST, "[]", "not a JSON object"),
            (OCI_MANIFEST, r#"{"schemaVersion":1}"#, "schemaVersion"),
            (
                OCI_MANIFEST,
                r#"{"schemaVersion":2,"mediaType":"x"}"#,
                "declares mediaType",
            ),
            (OCI_MANIFEST, r#"{"schemaVersion":2}"#, "no \"config\""),
            (OCI_INDEX, r#"{"schemaVersion":2}"#, "no \"manifests\""),
        ];
        for (mt, body, want) in cases {
            match parse(mt, body.as_bytes()) {
                Err(RegistryError::ManifestInvalid(m)) => {
                    assert!(m.contains(want), "{body}: {m}")
                }
                other => panic!("{body}: {other:?}"),
            }
        }
    }
}
