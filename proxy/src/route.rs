//! Parsing a request into a typed, validated route, before anything else happens.
//!
//! Three path forms reach an upstream:
//! - namespaced: `/v2/<namespace>/<repo>/…`, where `<namespace>` is a configured upstream
//!   (`/v2/docker.io/library/nginx/manifests/1.27`);
//! - containerd's mirror form: `/v2/<repo>/…?ns=<namespace>`;
//! - Docker Engine's mirror form: `/v2/<repo>/…` with no namespace at all, for the
//!   `[server] default_upstream`, when `<repo>` matches that upstream's prefixes.
//!
//! On docker.io a single-segment repository means `library/<name>`.
//!
//! Any other repository (its first segment is not a configured upstream namespace, there
//! is no `?ns=`, and the default upstream does not mirror it) is private: pushed to and
//! served by berth itself.

use berth_config::{Config, UpstreamConfig};
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
    /// How the request named the upstream.
    pub form: Form,
}

/// How a request names the upstream of a pull-through repository.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Form {
    /// `/v2/<namespace>/<repo>/…`.
    Namespaced,
    /// `/v2/<repo>/…?ns=<namespace>` (echoed back as `OCI-Namespace`).
    Ns,
    /// `/v2/<repo>/…`: the default upstream's mirror.
    Default,
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
    /// A private repository's endpoint.
    Private {
        repo: String,
        endpoint: Endpoint,
    },
    /// `/v2/_catalog`: the private repositories.
    Catalog,
    /// `/metrics` (Prometheus text format).
    Metrics,
    /// `/healthz`: berth is running.
    Health,
    /// `/readyz`: berth's store answers and berth is not stopping.
    Ready,
    /// `/token`: the Docker token service, when configured.
    Token,
    /// `/api/keys[/<id>]`: API keys of the authenticated user.
    ApiKeys {
        id: Option<String>,
    },
    /// `/admin/…`: the store's upkeep (see `admin.rs`).
    Admin(crate::admin::AdminRoute),
    /// `/login…`, `/logout`, `/ui/keys…`: browser logins and the API-key page (see
    /// `login.rs`).
    Login(crate::login::LoginRoute),
    /// `/`, `/ui…`: the web pages (see `ui/mod.rs`).
    Ui(crate::ui::UiRoute),
}

/// The endpoints of a private repository (`/v2/<repo>/…`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `manifests/<reference>`
    Manifest(Reference),
    /// `blobs/<digest>`
    Blob(Digest),
    /// `tags/list`
    Tags,
    /// `blobs/uploads/`: starting an upload.
    Uploads,
    /// `blobs/uploads/<id>`: an upload in progress.
    Upload(String),
    /// `referrers/<digest>`
    Referrers(Digest),
}

/// Parses the request path and query into a route, checking the repository against its
/// upstream's allowlist. Nothing has been sent anywhere when this returns.
pub fn parse(path: &str, query: Option<&str>, config: &Config) -> Result<Route, ApiError> {
    match path {
        "/v2" | "/v2/" => return Ok(Route::Base),
        "/metrics" => return Ok(Route::Metrics),
        "/healthz" => return Ok(Route::Health),
        "/readyz" => return Ok(Route::Ready),
        "/token" => return Ok(Route::Token),
        "/api/keys" => return Ok(Route::ApiKeys { id: None }),
        _ => {}
    }
    if let Some(id) = path.strip_prefix("/api/keys/") {
        if !id.is_empty() && id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(Route::ApiKeys {
                id: Some(id.to_owned()),
            });
        }
    }
    if let Some(page) = crate::login::parse(path) {
        return Ok(Route::Login(page));
    }
    if let Some(ui) = crate::ui::parse(path) {
        return Ok(Route::Ui(ui));
    }
    if let Some(rest) = path.strip_prefix("/admin/") {
        return crate::admin::parse(rest)
            .map(Route::Admin)
            .ok_or_else(|| not_found(path));
    }
    let Some(rest) = path.strip_prefix("/v2/") else {
        return Err(not_found(path));
    };
    if rest == "_catalog" {
        return Ok(Route::Catalog);
    }
    let ns = query.and_then(|q| query_param(q, "ns"));
    let (name, kind, last) = if let Some(name) = rest.strip_suffix("/tags/list") {
        (name, "tags", "")
    } else {
        let (prefix, last) = rest.rsplit_once('/').ok_or_else(|| not_found(path))?;
        if let Some(name) = prefix.strip_suffix("/blobs/uploads") {
            (name, "upload", last)
        } else if let Some(name) = prefix.strip_suffix("/manifests") {
            (name, "manifests", last)
        } else if let Some(name) = prefix.strip_suffix("/blobs") {
            (name, "blobs", last)
        } else if let Some(name) = prefix.strip_suffix("/referrers") {
            (name, "referrers", last)
        } else {
            return Err(not_found(path));
        }
    };
    let Some(target) = target(name, ns.as_deref(), config)? else {
        return private(name, kind, last);
    };
    match kind {
        "tags" => Ok(Route::TagsList {
            target,
            query: query.map(tags_query).filter(|q| !q.is_empty()),
        }),
        "manifests" => Ok(Route::Manifest {
            target,
            reference: reference(last)?,
        }),
        "blobs" => Ok(Route::Blob {
            target,
            digest: blob_digest(last)?,
        }),
        // A 404 sends OCI 1.1 clients to the referrers tag schema, which is proxied.
        "referrers" => Err(ApiError::new(
            Code::NotFound,
            format!(
                "the referrers API is not proxied for the upstream namespace {}; clients fall back to the referrers tag schema",
                target.upstream
            ),
        )),
        _ => Err(read_only(&target)),
    }
}

/// Whether `name` is a private repository (no upstream namespace claims it).
pub fn is_private_name(name: &str, config: &Config) -> bool {
    is_valid_name(name)
        && name
            .split_once('/')
            .is_none_or(|(first, _)| config.upstream(first).is_none())
}

/// The refusal of a push, delete or referrers request to an upstream namespace.
pub fn read_only(target: &Target) -> ApiError {
    let message = match target.form {
        Form::Default => format!(
            "{} mirrors {} ([server] default_upstream, whose prefixes include it) and is read-only: push to a private repository whose name is outside {}'s prefixes",
            target.repo, target.upstream, target.upstream
        ),
        _ => format!(
            "{}/{} is in the pull-through namespace {}, which is read-only: push to a private repository (one whose first path segment is not an upstream namespace)",
            target.upstream, target.repo, target.upstream
        ),
    };
    ApiError::new(Code::Unsupported, message)
}

fn blob_digest(s: &str) -> Result<Digest, ApiError> {
    s.parse()
        .map_err(|e| ApiError::new(Code::DigestInvalid, format!("invalid blob digest: {e}")))
}

fn private(name: &str, kind: &str, last: &str) -> Result<Route, ApiError> {
    if !is_valid_name(name) {
        return Err(invalid_name(name));
    }
    let endpoint = match kind {
        "tags" => Endpoint::Tags,
        // An invalid tag is left for the handler: a push of it is TAG_INVALID, a pull
        // MANIFEST_UNKNOWN.
        "manifests" if !last.contains(':') && !last.is_empty() => {
            Endpoint::Manifest(Reference::Tag(last.to_owned()))
        }
        "manifests" => Endpoint::Manifest(reference(last)?),
        "blobs" => Endpoint::Blob(blob_digest(last)?),
        "upload" if last.is_empty() => Endpoint::Uploads,
        "upload" => Endpoint::Upload(last.to_owned()),
        _ => Endpoint::Referrers(blob_digest(last)?),
    };
    Ok(Route::Private {
        repo: name.to_owned(),
        endpoint,
    })
}

fn invalid_name(name: &str) -> ApiError {
    ApiError::new(
        Code::NameInvalid,
        format!("{name:?} is not a valid repository name (lowercase letters, digits and separators, segments joined by '/')"),
    )
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

/// Resolves the upstream and repository and applies the allowlist; `None` for a private
/// repository.
fn target(name: &str, ns: Option<&str>, config: &Config) -> Result<Option<Target>, ApiError> {
    let (upstream, repo, form) = match ns {
        Some(ns) => {
            let up = config
                .upstream(ns)
                .ok_or_else(|| unknown_upstream(ns, config))?;
            (up, name, Form::Ns)
        }
        None => {
            let upstream = name
                .split_once('/')
                .and_then(|(first, repo)| Some((config.upstream(first)?, repo)));
            match (upstream, config.default_upstream()) {
                (Some((up, repo)), _) => (up, repo, Form::Namespaced),
                (None, Some(up)) => return Ok(mirrored(up, name)),
                (None, None) => return Ok(None),
            }
        }
    };
    if !is_valid_name(repo) {
        return Err(invalid_name(repo));
    }
    let repo = upstream_repo(upstream, repo);
    allow(upstream, &repo)?;
    Ok(Some(Target {
        upstream: upstream.namespace.clone(),
        repo,
        form,
    }))
}

/// The repository's name at `upstream` (on docker.io, `nginx` is `library/nginx`).
fn upstream_repo(upstream: &UpstreamConfig, repo: &str) -> String {
    if upstream.namespace == DOCKER_HUB && !repo.contains('/') {
        format!("library/{repo}")
    } else {
        repo.to_owned()
    }
}

/// The default upstream's repository for `name` (a path without a namespace), if the
/// upstream's prefixes admit it. Anything else stays private (`None`), so private
/// repositories keep names outside the mirrored prefixes, and a mirrored name can never be
/// pushed.
fn mirrored(upstream: &UpstreamConfig, name: &str) -> Option<Target> {
    if !is_valid_name(name) {
        return None;
    }
    let repo = upstream_repo(upstream, name);
    admits(upstream, &repo).then(|| Target {
        upstream: upstream.namespace.clone(),
        repo,
        form: Form::Default,
    })
}

/// Whether one of the upstream's prefixes matches `repo`.
fn admits(upstream: &UpstreamConfig, repo: &str) -> bool {
    upstream.prefixes.iter().any(|g| g.matches(repo))
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
    if admits(upstream, repo) {
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

/// The first value of `key` in a query string, decoded.
pub fn query_param(query: &str, key: &str) -> Option<String> {
    query_values(query, key).next()
}

/// Every value of `key` in a query string (`?tag=a&tag=b`), decoded.
pub fn query_values<'a>(query: &'a str, key: &'a str) -> impl Iterator<Item = String> + 'a {
    form_urlencoded::parse(query.as_bytes())
        .filter(move |(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
}

/// The `tags/list` pagination parameters, without berth's own (`ns`).
fn tags_query(query: &str) -> String {
    query
        .split('&')
        .filter(|p| p.starts_with("n=") || p.starts_with("last="))
        .collect::<Vec<_>>()
        .join("&")
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
            form: if via_ns { Form::Ns } else { Form::Namespaced },
        }
    }

    fn p(repo: &str, endpoint: Endpoint) -> Route {
        Route::Private {
            repo: repo.into(),
            endpoint,
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
            ("/", None, Route::Ui(crate::ui::UiRoute::Root)),
            ("/ui", None, Route::Ui(crate::ui::UiRoute::Status)),
            // Private repositories: any first segment that is not an upstream namespace.
            ("/v2/_catalog", Some("n=5"), Route::Catalog),
            ("/v2/nginx/manifests/latest", None, p("nginx", Endpoint::Manifest(tag("latest")))),
            ("/v2/quay.io/a/manifests/latest", None, p("quay.io/a", Endpoint::Manifest(tag("latest")))),
            ("/v2/team/app/tags/list", Some("n=1"), p("team/app", Endpoint::Tags)),
            ("/v2/team/app/blobs/uploads/", Some("digest=x"), p("team/app", Endpoint::Uploads)),
            ("/v2/team/app/blobs/uploads/abc", None, p("team/app", Endpoint::Upload("abc".into()))),
            (
                "/v2/team/app/blobs/sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
                None,
                p("team/app", Endpoint::Blob(D.parse().unwrap())),
            ),
            (
                "/v2/team/app/referrers/sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
                Some("artifactType=x"),
                p("team/app", Endpoint::Referrers(D.parse().unwrap())),
            ),
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
            code("/v2/Team/App/manifests/latest", None),
            Code::NameInvalid
        );
        assert_eq!(
            code("/v2/team/app/referrers/latest", None),
            Code::DigestInvalid
        );
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

    /// Docker Engine's mirror form: with `default_upstream`, a path without a namespace
    /// whose repository the upstream's prefixes match is that upstream's; any other stays
    /// private, and a push to a mirrored name is refused naming the rule.
    #[test]
    fn the_default_upstream_mirrors_its_prefixes_only() {
        let text = format!(
            "[server]\ndefault_upstream = \"docker.io\"\n{}",
            "[[upstream]]\nnamespace = \"docker.io\"\nurl = \"https://registry-1.docker.io\"\nprefixes = [\"library/**\"]\n[[upstream]]\nnamespace = \"ghcr.io\"\nurl = \"https://ghcr.io\"\nprefixes = [\"a/**\"]\n"
        );
        let c = Config::parse(&text).unwrap();
        let mirror = |repo: &str| Target {
            upstream: "docker.io".into(),
            repo: repo.into(),
            form: Form::Default,
        };
        let tag = |s: &str| Reference::Tag(s.into());
        assert_eq!(
            parse("/v2/library/alpine/manifests/3.19", None, &c).unwrap(),
            Route::Manifest {
                target: mirror("library/alpine"),
                reference: tag("3.19")
            }
        );
        assert_eq!(
            parse(&format!("/v2/library/alpine/blobs/{D}"), None, &c).unwrap(),
            Route::Blob {
                target: mirror("library/alpine"),
                digest: D.parse().unwrap()
            }
        );
        // A single name is library/<name> on docker.io.
        assert_eq!(
            parse("/v2/alpine/manifests/3.19", None, &c).unwrap(),
            Route::Manifest {
                target: mirror("library/alpine"),
                reference: tag("3.19")
            }
        );
        // Outside the prefixes: private, as without a default upstream.
        assert_eq!(
            parse("/v2/team/app/manifests/v1", None, &c).unwrap(),
            p("team/app", Endpoint::Manifest(tag("v1")))
        );
        // The other forms are unchanged.
        assert_eq!(
            parse("/v2/a/b/manifests/v1", Some("ns=ghcr.io"), &c).unwrap(),
            Route::Manifest {
                target: t("ghcr.io", "a/b", true),
                reference: tag("v1")
            }
        );
        assert_eq!(
            parse("/v2/docker.io/library/alpine/manifests/v1", None, &c).unwrap(),
            Route::Manifest {
                target: t("docker.io", "library/alpine", false),
                reference: tag("v1")
            }
        );
        let e = read_only(&mirror("library/alpine"));
        assert!(format!("{e:?}").contains("default_upstream"), "{e:?}");
        // Without default_upstream, the same path is private.
        assert_eq!(
            parse("/v2/library/alpine/manifests/3.19", None, &config()).unwrap(),
            p("library/alpine", Endpoint::Manifest(tag("3.19")))
        );
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
        assert_eq!(
            query_values("tag=a&n=1&tag=b%2Bc", "tag").collect::<Vec<_>>(),
            ["a", "b+c"]
        );
    }
}
