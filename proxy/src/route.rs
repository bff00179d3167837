//! Parsing a request into a typed, validated route, before anything else happens.
//!
//! Two path forms reach an upstream:
//! - namespaced: `/v2/<namespace>/<repo>/…`, where `<namespace>` is a configured upstream
//!   (`/v2/docker.io/library/nginx/manifests/1.27`);
//! - containerd's mirror form: `/v2/<repo>/…?ns=<namespace>`.
//!
//! On docker.io a single-segment repository means `library/<name>`.

use berth_cache::config::{Config, UpstreamConfig};
use berth_store::oci::{is_valid_name, is_valid_tag, Digest, Reference};

use crate::errors::{ApiError, Code};

/// The upstream whose repositories are implicitly under `library/`.
pub const DOCKER_HUB: &str = "docker.io";

/// Which repository of which upstream a request is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// The configured upstream namespace.
    pub upstream: String,
    /// The repository name at the upstream.
    pub repo: String,
    /// Whether the request used `?ns=` (echoed back as `OCI-Namespace`).
    pub via_ns: bool,
}

/// What a request asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// `GET /v2/`: the API version check.
    Base,
    Manifest {
        target: Target,
        reference: Reference,
    },
    Blob {
        target: Target,
        digest: Digest,
    },
    TagsList {
        target: Target,
        query: Option<String>,
    },
    /// `/metrics` (Prometheus text format).
    Metrics,
    /// `/healthz`.
    Health,
}

/// Parses the request path and query into a route, checking the repository against its
/// upstream's allowlist. Nothing has been sent anywhere when this returns.
pub fn parse(path: &str, query: Option<&str>, config: &Config) -> Result<Route, ApiError> {
    match path {
        "/v2" | "/v2/" => return Ok(Route::Base),
        "/metrics" => return Ok(Route::Metrics),
        "/healthz" => return Ok(Route::Health),
        _ => {}
    }
    let Some(rest) = path.strip_prefix("/v2/") else {
        return Err(not_found(path));
    };
    let ns = query.and_then(|q| query_param(q, "ns"));
    let (name, kind, last) = if let Some(name) = rest.strip_suffix("/tags/list") {
        (name, "tags", "")
    } else {
        let (prefix, last) = rest.rsplit_once('/').ok_or_else(|| not_found(path))?;
        if let Some(name) = prefix.strip_suffix("/manifests") {
            (name, "manifests", last)
        } else if let Some(name) = prefix.strip_suffix("/blobs") {
            (name, "blobs", last)
        } else if prefix.ends_with("/blobs/uploads") || rest.ends_with("/blobs/uploads/") {
            return Err(ApiError::new(
                Code::Unsupported,
                "pushing is not supported on pull-through upstreams",
            ));
        } else {
            return Err(not_found(path));
        }
    };
    let target = target(name, ns.as_deref(), config)?;
    match kind {
        "tags" => Ok(Route::TagsList {
            target,
            query: query.map(tags_query).filter(|q| !q.is_empty()),
        }),
        "manifests" => Ok(Route::Manifest {
            target,
            reference: reference(last)?,
        }),
        _ => Ok(Route::Blob {
            target,
            digest: last.parse().map_err(|e| {
                ApiError::new(Code::DigestInvalid, format!("invalid blob digest: {e}"))
            })?,
        }),
    }
}

fn not_found(path: &str) -> ApiError {
    ApiError::new(
        Code::NotFound,
        format!("{path} is not an endpoint of the OCI distribution API"),
    )
}

fn reference(s: &str) -> Result<Reference, ApiError> {
    if s.contains(':') {
        return s.parse().map(Reference::Digest).map_err(|e| {
            ApiError::new(Code::DigestInvalid, format!("invalid manifest digest: {e}"))
        });
    }
    if is_valid_tag(s) {
        return Ok(Reference::Tag(s.to_owned()));
    }
    Err(ApiError::new(
        Code::ManifestUnknown,
        format!("{s:?} is neither a valid tag nor a digest"),
    ))
}

/// Resolves the upstream and repository and applies the allowlist.
fn target(name: &str, ns: Option<&str>, config: &Config) -> Result<Target, ApiError> {
    let (upstream, repo, via_ns) = match ns {
        Some(ns) => {
            let up = config
                .upstream(ns)
                .ok_or_else(|| unknown_upstream(ns, config))?;
            (up, name, true)
        }
        None => {
            let (first, repo) = name.split_once('/').ok_or_else(|| {
                ApiError::new(
                    Code::NameUnknown,
                    format!("{name:?} names no upstream: use /v2/<registry>/<repository>/… (for example /v2/docker.io/library/nginx/…) or add ?ns=<registry>"),
                )
            })?;
            let up = config
                .upstream(first)
                .ok_or_else(|| unknown_upstream(first, config))?;
            (up, repo, false)
        }
    };
    if !is_valid_name(repo) {
        return Err(ApiError::new(
            Code::NameInvalid,
            format!("{repo:?} is not a valid repository name (lowercase letters, digits and separators, segments joined by '/')"),
        ));
    }
    let repo = if upstream.namespace == DOCKER_HUB && !repo.contains('/') {
        format!("library/{repo}")
    } else {
        repo.to_owned()
    };
    allow(upstream, &repo)?;
    Ok(Target {
        upstream: upstream.namespace.clone(),
        repo,
        via_ns,
    })
}

fn unknown_upstream(ns: &str, config: &Config) -> ApiError {
    let known: Vec<_> = config
        .upstreams
        .iter()
        .map(|u| u.namespace.as_str())
        .collect();
    ApiError::new(
        Code::NameUnknown,
        format!(
            "no upstream registry {ns:?} is configured (configured: {})",
            known.join(", ")
        ),
    )
}

/// Refuses a repository that none of the upstream's prefixes match.
pub fn allow(upstream: &UpstreamConfig, repo: &str) -> Result<(), ApiError> {
    if upstream.prefixes.iter().any(|g| g.matches(repo)) {
        return Ok(());
    }
    let rule = if upstream.prefixes.is_empty() {
        format!(
            "upstream {} allows no repositories (its prefixes list is empty)",
            upstream.namespace
        )
    } else {
        let list: Vec<_> = upstream.prefixes.iter().map(|g| g.as_str()).collect();
        format!(
            "{repo} matches none of upstream {}'s allowed prefixes [{}]",
            upstream.namespace,
            list.join(", ")
        )
    };
    Err(ApiError::new(
        Code::Denied,
        format!(
            "repository {}/{repo} is not allowed: {rule}",
            upstream.namespace
        ),
    ))
}

/// The value of `key` in a query string, percent-decoded.
pub fn query_param(query: &str, key: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == key).then(|| percent_decode(v))
    })
}

/// The `tags/list` pagination parameters, without berth's own (`ns`).
fn tags_query(query: &str) -> String {
    query
        .split('&')
        .filter(|p| p.starts_with("n=") || p.starts_with("last="))
        .collect::<Vec<_>>()
        .join("&")
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config::parse(
            r#"
[[upstream]]
namespace = "docker.io"
url = "https://registry-1.docker.io"
prefixes = ["library/**", "bitnami/**"]
[[upstream]]
namespace = "ghcr.io"
url = "https://ghcr.io"
prefixes = ["a/**"]
[[upstream]]
namespace = "closed.example"
url = "https://closed.example"
prefixes = []
"#,
        )
        .unwrap()
    }

    fn t(upstream: &str, repo: &str, via_ns: bool) -> Target {
        Target {
            upstream: upstream.into(),
            repo: repo.into(),
            via_ns,
        }
    }

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn routes() {
        let c = config();
        let tag = |s: &str| Reference::Tag(s.into());
        let cases: Vec<(&str, Option<&str>, Route)> = vec![
            ("/v2/", None, Route::Base),
            ("/v2", None, Route::Base),
            (
                "/v2/docker.io/library/nginx/manifests/1.27",
                None,
                Route::Manifest { target: t("docker.io", "library/nginx", false), reference: tag("1.27") },
            ),
            (
                "/v2/docker.io/nginx/manifests/latest",
                None,
                Route::Manifest { target: t("docker.io", "library/nginx", false), reference: tag("latest") },
            ),
            (
                "/v2/library/nginx/manifests/latest",
                Some("ns=docker.io"),
                Route::Manifest { target: t("docker.io", "library/nginx", true), reference: tag("latest") },
            ),
            (
                "/v2/nginx/manifests/latest",
                Some("ns=docker.io"),
                Route::Manifest { target: t("docker.io", "library/nginx", true), reference: tag("latest") },
            ),
            (
                "/v2/ghcr.io/a/b/c/blobs/sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
                None,
                Route::Blob { target: t("ghcr.io", "a/b/c", false), digest: D.parse().unwrap() },
            ),
            (
                "/v2/a/b/manifests/sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
                Some("ns=ghcr.io"),
                Route::Manifest { target: t("ghcr.io", "a/b", true), reference: Reference::Digest(D.parse().unwrap()) },
            ),
            (
                "/v2/ghcr.io/a/manifests/tags/list",
                Some("n=10&last=x"),
                Route::TagsList { target: t("ghcr.io", "a/manifests", false), query: Some("n=10&last=x".into()) },
            ),
            ("/metrics", None, Route::Metrics),
        ];
        for (path, query, want) in cases {
            assert_eq!(parse(path, query, &c).unwrap(), want, "{path}?{query:?}");
        }
    }

    fn code(path: &str, query: Option<&str>) -> Code {
        parse(path, query, &config()).unwrap_err().code
    }

    #[test]
    fn refusals() {
        assert_eq!(
            code("/v2/docker.io/evil/x/manifests/latest", None),
            Code::Denied
        );
        assert_eq!(
            code("/v2/evil/x/manifests/latest", Some("ns=docker.io")),
            Code::Denied
        );
        assert_eq!(
            code("/v2/closed.example/a/manifests/latest", None),
            Code::Denied
        );
        assert_eq!(
            code("/v2/library/x/manifests/latest", Some("ns=evil.example")),
            Code::NameUnknown
        );
        assert_eq!(
            code("/v2/quay.io/a/manifests/latest", None),
            Code::NameUnknown
        );
        assert_eq!(code("/v2/nginx/manifests/latest", None), Code::NameUnknown);
        assert_eq!(
            code("/v2/docker.io/Library/Nginx/manifests/latest", None),
            Code::NameInvalid
        );
        assert_eq!(
            code("/v2/docker.io/library/../x/manifests/latest", None),
            Code::NameInvalid
        );
        assert_eq!(
            code("/v2/docker.io/library/nginx/manifests/-bad", None),
            Code::ManifestUnknown
        );
        assert_eq!(
            code("/v2/docker.io/library/nginx/manifests/sha256:abc", None),
            Code::DigestInvalid
        );
        assert_eq!(
            code("/v2/docker.io/library/nginx/blobs/latest", None),
            Code::DigestInvalid
        );
        assert_eq!(
            code(
                "/v2/docker.io/library/nginx/blobs/sha256:..%2F..%2Fetc",
                None
            ),
            Code::DigestInvalid
        );
        assert_eq!(
            code("/v2/docker.io/library/nginx/blobs/sha256:../../etc", None),
            Code::NotFound
        );
        assert_eq!(
            code("/v2/docker.io/library/nginx/blobs/uploads/", None),
            Code::Unsupported
        );
        assert_eq!(
            code("/v2/docker.io/library/nginx/whatever/x", None),
            Code::NotFound
        );
        assert_eq!(code("/etc/passwd", None), Code::NotFound);
    }

    #[test]
    fn denial_names_the_rule() {
        let e = parse("/v2/docker.io/evil/x/manifests/latest", None, &config()).unwrap_err();
        assert!(
            e.message.contains("library/**, bitnami/**"),
            "{}",
            e.message
        );
        assert!(e.message.contains("docker.io/evil/x"), "{}", e.message);
    }

    #[test]
    fn query_params_decode() {
        assert_eq!(
            query_param("a=1&ns=registry.local%3A5000", "ns").unwrap(),
            "registry.local:5000"
        );
        assert_eq!(query_param("ns=docker.io", "ns").unwrap(), "docker.io");
        assert_eq!(query_param("x=%", "x").unwrap(), "%");
        assert_eq!(query_param("x=%4", "x").unwrap(), "%4");
        assert_eq!(query_param("x", "ns"), None);
    }
}
