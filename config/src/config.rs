//! berth's configuration: the server settings and the upstream registries.
//!
//! Parsing is strict and complete: every unknown key, wrong type and invalid value is
//! reported at once, each with its path (`upstream[2].prefixes[0]: …`), so an operator
//! fixes a file in one pass.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use toml::{Table, Value};

use crate::access::AccessConfig;
use crate::cache::CacheConfig;
use crate::glob::Glob;
use crate::retention::RetentionPolicy;

/// The configuration shipped with berth and embedded in the binary.
pub const DEFAULT_CONFIG: &str = include_str!("../../upstreams.toml");

/// A whole configuration file.
#[derive(Clone, Debug)]
pub struct Config {
    pub server: ServerConfig,
    /// `[cache]`: the disk budget and eviction of pulled-through content.
    pub cache: CacheConfig,
    pub upstreams: Vec<UpstreamConfig>,
    /// `[auth]` and `[access]`; `None` when neither is given, or with `[access] open = true`.
    pub access: Option<AccessConfig>,
    /// `[access] open = true`: everyone may do everything, anonymously, on any listener.
    /// Default `false`: without `[access]`, a listener beyond loopback serves pulls only.
    pub open: bool,
    /// `[[retention]]`: the policies that delete tags and manifests of private
    /// repositories, in file order (the first that matches a repository applies; see
    /// [`crate::retention`]). Default: none.
    pub retention: Vec<RetentionPolicy>,
}

/// `[server]`: where berth listens and keeps its store.
#[derive(Clone, Debug, Default)]
pub struct ServerConfig {
    /// `listen`: the address to serve on. Default `127.0.0.1:5000`.
    pub listen: Option<String>,
    /// `store`: the store directory. Default `$XDG_CACHE_HOME/berth` or `~/.cache/berth`
    /// (`/var/lib/berth` for root).
    pub store: Option<PathBuf>,
    /// `drain`: how long a stopping berth lets requests in flight finish. Default `5s`.
    pub drain: Option<Duration>,
    /// `upload_timeout`: how long a push's upload may sit idle before it is removed.
    /// Default `1h`.
    pub upload_timeout: Option<Duration>,
    /// `gc_interval`: how often private content nothing references is collected; `"0s"`
    /// turns it off. Default `24h`.
    pub gc_interval: Option<Duration>,
    /// `gc_grace`: content younger than this is never collected (a push uploads its
    /// blobs before the manifest that references them). Default `1h`.
    pub gc_grace: Option<Duration>,
    /// `retention_interval`: how often the `[[retention]]` policies run; `"0s"` turns
    /// them off. Default `24h`.
    pub retention_interval: Option<Duration>,
    /// `max_upload_size`: the most bytes one pushed blob may have, such as `"10GiB"`;
    /// a push over it is refused with 413 `SIZE_INVALID` and its bytes removed.
    /// Default `10GiB`.
    pub max_upload_size: Option<u64>,
    /// `tls = { cert, key }`: serve HTTPS with this certificate chain and key (PEM).
    pub tls: Option<TlsConfig>,
    /// `external_url`: berth's base URL as clients reach it (`https://berth.example:5000`,
    /// no path), for the token realm. Default: the listen address, `https://` with TLS.
    pub external_url: Option<String>,
    /// `default_upstream`: the upstream that pull paths without a namespace mirror, such
    /// as `docker.io` for Docker Engine's `registry-mirrors` (`GET
    /// /v2/library/alpine/manifests/3.19`, no `?ns=`). Such a path goes to that upstream
    /// when its repository matches the upstream's `prefixes`, and to a private repository
    /// otherwise. Default: none (every path without a namespace is private).
    pub default_upstream: Option<String>,
}

/// The certificate chain and private key files (PEM) berth serves HTTPS with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// `[[upstream]]`: one upstream registry.
#[derive(Clone, Debug)]
pub struct UpstreamConfig {
    /// `namespace` (required): the registry name clients use, such as `docker.io`; the
    /// first path segment in `/v2/<namespace>/<repo>/…` and the value of containerd's `?ns=`.
    pub namespace: String,
    /// `url` (required): the registry's base URL, `http://` or `https://`, no path.
    pub url: String,
    /// `prefixes` (required): glob patterns of the repositories berth may fetch; `*` spans
    /// one path segment, `**` any number. An empty list allows nothing.
    pub prefixes: Vec<Glob>,
    /// `credentials`: `{ username = "…", password_env = "VAR" }` or
    /// `{ username = "…", password_file = "/path" }`. Default: anonymous.
    pub credentials: Option<Credentials>,
    /// `tag_ttl`: how long a tag is served without asking the upstream. Default `5m`.
    pub tag_ttl: Duration,
    /// `connect_timeout`: Default `5s`.
    pub connect_timeout: Duration,
    /// `read_timeout`: how long berth waits for upstream response headers and between
    /// body chunks. Default `30s`.
    pub read_timeout: Duration,
    /// `token_hosts`: hosts (`host` or `host:port`) besides the upstream's own that may
    /// receive `credentials` as its token realm, such as `auth.docker.io`. A realm
    /// anywhere else gets an anonymous token request. Default: none.
    pub token_hosts: Vec<String>,
    /// `ca_file`: a PEM bundle of certificate authorities trusted for this upstream (and
    /// its token realm), in addition to the public roots. Default: the public roots only.
    pub ca_file: Option<PathBuf>,
}

/// Where an upstream's credentials come from. The password is never in the file itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: SecretSource,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SecretSource {
    Env(String),
    File(PathBuf),
}

impl Credentials {
    /// Reads the password. The error names the source, never the secret.
    pub fn resolve(&self) -> Result<(String, String), String> {
        Ok((self.username.clone(), self.password.read()?))
    }
}

/// The default of `[server] max_upload_size`: the largest blob berth stores.
pub const DEFAULT_MAX_BLOB_SIZE: u64 = 10 << 30;
pub const DEFAULT_TAG_TTL: Duration = Duration::from_secs(300);
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Every problem found in a configuration, one per line, each with its path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<String>);

impl std::fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join("\n"))
    }
}

impl std::error::Error for ConfigErrors {}

impl Config {
    /// Parses and validates a configuration, collecting every problem.
    pub fn parse(text: &str) -> Result<Config, ConfigErrors> {
        let table: Table = text.parse().map_err(|e: toml::de::Error| {
            ConfigErrors(vec![format!("not valid TOML: {}", e.message().trim())])
        })?;
        let mut p = Problems(Vec::new());
        let mut server = ServerConfig::default();
        let mut cache = CacheConfig::default();
        let mut upstreams = Vec::new();
        let mut access = AccessConfig::default();
        for (key, value) in &table {
            match key.as_str() {
                "auth" => crate::access::parse_auth(value, &mut access, &mut p),
                "access" => crate::access::parse_access(value, &mut access, &mut p),
                "server" => server = parse_server(value, &mut p),
                "cache" => cache = crate::cache::parse_cache(value, &mut p),
                "upstream" => match value.as_array() {
                    Some(items) => {
                        for (i, item) in items.iter().enumerate() {
                            if let Some(u) = parse_upstream(&format!("upstream[{i}]"), item, &mut p)
                            {
                                upstreams.push(u);
                            }
                        }
                    }
                    None => p.add("upstream", "must be an array of tables ([[upstream]])"),
                },
                // After the loop: a policy may not name an upstream's namespace.
                "retention" => {}
                other => p.add(other, "unknown key"),
            }
        }
        let retention = match table.get("retention") {
            Some(v) => {
                let namespaces: Vec<&str> =
                    upstreams.iter().map(|u| u.namespace.as_str()).collect();
                crate::retention::parse_retention(v, &namespaces, &mut p)
            }
            None => Vec::new(),
        };
        let mut seen = HashSet::new();
        for (i, u) in upstreams.iter().enumerate() {
            if !seen.insert(u.namespace.clone()) {
                p.add(
                    &format!("upstream[{i}].namespace"),
                    &format!("{:?} is configured twice", u.namespace),
                );
            }
        }
        if let Some(d) = &server.default_upstream {
            if !upstreams.iter().any(|u| u.namespace == *d) {
                let known: Vec<_> = upstreams.iter().map(|u| u.namespace.as_str()).collect();
                p.add(
                    "server.default_upstream",
                    &format!(
                        "{d:?} is not a configured upstream (configured: {})",
                        if known.is_empty() {
                            "none".to_owned()
                        } else {
                            known.join(", ")
                        }
                    ),
                );
            }
        }
        let has_access = table.contains_key("access");
        if table.contains_key("auth") && !has_access {
            p.add(
                "access",
                "is required with [auth]: without it berth would let everyone do everything",
            );
        }
        let open = access.open;
        if open && table.contains_key("auth") {
            p.add(
                "access.open",
                "true lets everyone do everything, so [auth] would have no effect: remove one",
            );
        }
        if p.0.is_empty() {
            Ok(Config {
                server,
                cache,
                upstreams,
                access: (has_access && !open).then_some(access),
                open,
                retention,
            })
        } else {
            Err(ConfigErrors(p.0))
        }
    }

    /// The upstream that pull paths without a namespace mirror, if one is configured.
    pub fn default_upstream(&self) -> Option<&UpstreamConfig> {
        self.upstream(self.server.default_upstream.as_deref()?)
    }

    /// The upstream clients name as `namespace`.
    pub fn upstream(&self, namespace: &str) -> Option<&UpstreamConfig> {
        self.upstreams.iter().find(|u| u.namespace == namespace)
    }
}

pub(crate) struct Problems(Vec<String>);

impl Problems {
    pub(crate) fn add(&mut self, path: &str, msg: &str) {
        self.0.push(format!("{path}: {msg}"));
    }

    /// How many problems were found so far.
    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }
}

pub(crate) fn table<'a>(path: &str, v: &'a Value, p: &mut Problems) -> Option<&'a Table> {
    let t = v.as_table();
    if t.is_none() {
        p.add(path, "must be a table");
    }
    t
}

fn string(path: &str, v: &Value, p: &mut Problems) -> Option<String> {
    match v.as_str() {
        Some(s) if !s.is_empty() => Some(s.to_owned()),
        Some(_) => {
            p.add(path, "must not be empty");
            None
        }
        None => {
            p.add(path, "must be a string");
            None
        }
    }
}

pub(crate) fn duration(path: &str, v: &Value, p: &mut Problems) -> Option<Duration> {
    let s = string(path, v, p)?;
    match parse_duration(&s) {
        Ok(d) => Some(d),
        Err(e) => {
            p.add(path, &e);
            None
        }
    }
}

pub(crate) fn size(path: &str, v: &Value, p: &mut Problems) -> Option<u64> {
    let s = string(path, v, p)?;
    match parse_size(&s) {
        Ok(n) => Some(n),
        Err(e) => {
            p.add(path, &e);
            None
        }
    }
}

/// Parses a size in bytes: a number with a unit, `B`, `KiB`, `MiB`, `GiB` or `TiB` (powers
/// of 1024) or `KB`, `MB`, `GB`, `TB` (powers of 1000), such as `"512MiB"`, `"10GiB"` or
/// `"1.5TB"`. A bare number is refused (bytes or gigabytes?), and so is zero.
pub fn parse_size(s: &str) -> Result<u64, String> {
    if !s.trim_end().ends_with(|c: char| c.is_ascii_alphabetic()) {
        return Err(format!(
            "{s:?} has no unit: write it as \"512MiB\", \"10GiB\" or \"1TiB\""
        ));
    }
    match parse_size::parse_size(s) {
        Ok(0) => Err(format!("{s:?}: the size must be more than zero")),
        Ok(bytes) => Ok(bytes),
        Err(parse_size::Error::PosOverflow) => Err(format!("{s:?} is larger than any disk")),
        Err(e) => Err(format!(
            "{s:?} is not a size such as \"512MiB\", \"10GiB\" or \"1TiB\": {e}"
        )),
    }
}

/// Parses a duration such as `250ms`, `30s`, `5m`, `1h` or `1h30m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| {
        format!("{s:?} is not a duration such as \"500ms\", \"30s\", \"5m\" or \"1h\": {e}")
    })
}

fn parse_server(v: &Value, p: &mut Problems) -> ServerConfig {
    let mut s = ServerConfig::default();
    let Some(t) = table("server", v, p) else {
        return s;
    };
    for (key, value) in t {
        let path = format!("server.{key}");
        match key.as_str() {
            "listen" => {
                s.listen = string(&path, value, p);
                if let Some(l) = &s.listen {
                    if l.parse::<std::net::SocketAddr>().is_err() {
                        p.add(
                            &path,
                            &format!("{l:?} is not an address such as 0.0.0.0:5000"),
                        );
                    }
                }
            }
            "store" => s.store = string(&path, value, p).map(PathBuf::from),
            "drain" => s.drain = duration(&path, value, p),
            "upload_timeout" => s.upload_timeout = duration(&path, value, p),
            "gc_interval" => s.gc_interval = duration(&path, value, p),
            "gc_grace" => s.gc_grace = duration(&path, value, p),
            "retention_interval" => s.retention_interval = duration(&path, value, p),
            "max_upload_size" => s.max_upload_size = size(&path, value, p),
            "default_upstream" => s.default_upstream = string(&path, value, p),
            "external_url" => {
                s.external_url = string(&path, value, p);
                if let Some(u) = &s.external_url {
                    match check_url(u) {
                        Ok(()) => s.external_url = Some(u.trim_end_matches('/').to_owned()),
                        Err(_) => p.add(
                            &path,
                            &format!("{u:?} must be berth's base URL as clients reach it, such as https://berth.example:5000, without path"),
                        ),
                    }
                }
            }
            "tls" => {
                let Some(t) = table(&path, value, p) else {
                    continue;
                };
                let mut files = (None, None);
                for (k, v) in t {
                    let kpath = format!("{path}.{k}");
                    match k.as_str() {
                        "cert" => files.0 = string(&kpath, v, p).map(PathBuf::from),
                        "key" => files.1 = string(&kpath, v, p).map(PathBuf::from),
                        _ => p.add(&kpath, "unknown key"),
                    }
                }
                match files {
                    (Some(cert), Some(key)) => s.tls = Some(TlsConfig { cert, key }),
                    _ => p.add(&path, "needs both cert and key (PEM files)"),
                }
            }
            _ => p.add(&path, "unknown key"),
        }
    }
    s
}

fn parse_upstream(path: &str, v: &Value, p: &mut Problems) -> Option<UpstreamConfig> {
    let t = table(path, v, p)?;
    let mut namespace = None;
    let mut url = None;
    let mut prefixes = None;
    let mut credentials = None;
    let mut tag_ttl = DEFAULT_TAG_TTL;
    let mut connect_timeout = DEFAULT_CONNECT_TIMEOUT;
    let mut read_timeout = DEFAULT_READ_TIMEOUT;
    let mut token_hosts = Vec::new();
    let mut ca_file = None;
    let before = p.0.len();
    for (key, value) in t {
        let kpath = format!("{path}.{key}");
        match key.as_str() {
            "namespace" => {
                namespace = string(&kpath, value, p);
                if let Some(n) = &namespace {
                    if !is_registry_host(n) {
                        p.add(&kpath, &format!("{n:?} is not a registry host name such as docker.io or registry.local:5000"));
                    }
                }
            }
            "url" => {
                url = string(&kpath, value, p);
                if let Some(u) = &url {
                    if let Err(e) = check_url(u) {
                        p.add(&kpath, &e);
                    }
                }
            }
            "prefixes" => match value.as_array() {
                Some(items) => {
                    let mut globs = Vec::new();
                    for (i, item) in items.iter().enumerate() {
                        let ipath = format!("{kpath}[{i}]");
                        if let Some(s) = string(&ipath, item, p) {
                            match Glob::new(&s) {
                                Ok(g) => globs.push(g),
                                Err(e) => p.add(&ipath, &e),
                            }
                        }
                    }
                    prefixes = Some(globs);
                }
                None => p.add(&kpath, "must be an array of glob patterns"),
            },
            "credentials" => credentials = parse_credentials(&kpath, value, p),
            "tag_ttl" => tag_ttl = duration(&kpath, value, p).unwrap_or(tag_ttl),
            "connect_timeout" => {
                connect_timeout = duration(&kpath, value, p).unwrap_or(connect_timeout)
            }
            "read_timeout" => read_timeout = duration(&kpath, value, p).unwrap_or(read_timeout),
            "token_hosts" => match value.as_array() {
                Some(items) => {
                    for (i, item) in items.iter().enumerate() {
                        let ipath = format!("{kpath}[{i}]");
                        match string(&ipath, item, p) {
                            Some(h) if is_registry_host(&h) => token_hosts.push(h),
                            Some(h) => p.add(
                                &ipath,
                                &format!("{h:?} is not a host name such as auth.docker.io"),
                            ),
                            None => {}
                        }
                    }
                }
                None => p.add(&kpath, "must be an array of host names"),
            },
            "ca_file" => ca_file = string(&kpath, value, p).map(PathBuf::from),
            _ => p.add(&kpath, "unknown key"),
        }
    }
    for (name, missing) in [
        ("namespace", namespace.is_none()),
        ("url", url.is_none()),
        ("prefixes", prefixes.is_none()),
    ] {
        if missing && !t.contains_key(name) {
            p.add(&format!("{path}.{name}"), "is required");
        }
    }
    if p.0.len() > before {
        return None;
    }
    Some(UpstreamConfig {
        namespace: namespace?,
        url: url?.trim_end_matches('/').to_owned(),
        prefixes: prefixes?,
        credentials,
        tag_ttl,
        connect_timeout,
        read_timeout,
        token_hosts,
        ca_file,
    })
}

fn parse_credentials(path: &str, v: &Value, p: &mut Problems) -> Option<Credentials> {
    let t = table(path, v, p)?;
    let mut username = None;
    let mut password = None;
    let mut inline_refused = false;
    for (key, value) in t {
        let kpath = format!("{path}.{key}");
        let source = match key.as_str() {
            "username" => {
                username = string(&kpath, value, p);
                continue;
            }
            "password_env" => string(&kpath, value, p).map(SecretSource::Env),
            "password_file" => string(&kpath, value, p).map(|s| SecretSource::File(s.into())),
            "password" => {
                p.add(&kpath, "secrets are never written in the configuration; use password_env or password_file");
                inline_refused = true;
                continue;
            }
            _ => {
                p.add(&kpath, "unknown key");
                continue;
            }
        };
        if password.is_some() {
            p.add(&kpath, "give only one of password_env and password_file");
        }
        password = source.or(password);
    }
    match (username, password) {
        (Some(username), Some(password)) => Some(Credentials { username, password }),
        (None, _) => {
            p.add(&format!("{path}.username"), "is required");
            None
        }
        (_, None) => {
            if !inline_refused {
                p.add(path, "needs password_env or password_file");
            }
            None
        }
    }
}

fn is_registry_host(s: &str) -> bool {
    let (host, port) = match s.rsplit_once(':') {
        Some((h, port)) => (h, Some(port)),
        None => (s, None),
    };
    let port_ok = port.is_none_or(|p| !p.is_empty() && p.parse::<u16>().is_ok());
    port_ok
        && !host.is_empty()
        && host.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

fn check_url(u: &str) -> Result<(), String> {
    let rest = u
        .strip_prefix("https://")
        .or_else(|| u.strip_prefix("http://"))
        .ok_or_else(|| format!("{u:?} must start with http:// or https://"))?;
    let host = rest.trim_end_matches('/');
    if host.is_empty() || host.contains(['/', '?', '#', '@', ' ']) {
        return Err(format!(
            "{u:?} must be a registry base URL such as https://registry-1.docker.io, without path, query or user"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_default_is_valid() {
        let c = Config::parse(DEFAULT_CONFIG).unwrap();
        let names: Vec<_> = c.upstreams.iter().map(|u| u.namespace.as_str()).collect();
        assert_eq!(
            names,
            [
                "docker.io",
                "ghcr.io",
                "quay.io",
                "public.ecr.aws",
                "registry.k8s.io",
                "gcr.io"
            ]
        );
        let docker = c.upstream("docker.io").unwrap();
        assert_eq!(docker.url, "https://registry-1.docker.io");
        assert!(docker.prefixes.iter().any(|g| g.matches("library/nginx")));
        assert!(!docker.prefixes.iter().any(|g| g.matches("evil/nginx")));
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let text = r#"
colour = "blue"
[server]
listen = "nowhere"
[[upstream]]
namespace = "docker.io"
url = "ftp://x"
prefixes = ["library/**", "Bad/**", "a//b"]
tag_ttl = "five minutes"
wat = 1
[[upstream]]
namespace = "docker.io"
url = "https://r"
prefixes = []
credentials = { username = "u", password = "hunter2" }
[[upstream]]
url = "https://r"
"#;
        let errs = Config::parse(text).unwrap_err().0;
        let expect = [
            "colour: unknown key",
            "server.listen: \"nowhere\" is not an address",
            "upstream[0].url: \"ftp://x\" must start with http:// or https://",
            "upstream[0].prefixes[1]:",
            "upstream[0].prefixes[2]:",
            "upstream[0].tag_ttl:",
            "upstream[0].wat: unknown key",
            "upstream[1].credentials.password: secrets are never written",
            "upstream[2].namespace: is required",
            "upstream[2].prefixes: is required",
        ];
        for e in expect {
            assert!(
                errs.iter().any(|x| x.starts_with(e)),
                "missing {e:?} in {errs:#?}"
            );
        }
        assert!(!errs.iter().any(|x| x.contains("hunter2")), "secret echoed");
        assert_eq!(errs.len(), expect.len(), "{errs:#?}");
    }

    #[test]
    fn duplicate_namespaces_are_refused() {
        let text = r#"
[[upstream]]
namespace = "ghcr.io"
url = "https://ghcr.io"
prefixes = []
[[upstream]]
namespace = "ghcr.io"
url = "https://ghcr.io"
prefixes = []
"#;
        assert_eq!(
            Config::parse(text).unwrap_err().0,
            ["upstream[1].namespace: \"ghcr.io\" is configured twice"]
        );
    }

    #[test]
    fn defaults_and_credentials() {
        let text = r#"
[[upstream]]
namespace = "registry.local:5000"
url = "http://127.0.0.1:5001/"
prefixes = ["**"]
credentials = { username = "bot", password_env = "BERTH_TEST_CONFIG_PW" }
read_timeout = "250ms"
"#;
        let c = Config::parse(text).unwrap();
        let u = &c.upstreams[0];
        assert_eq!(u.url, "http://127.0.0.1:5001");
        assert_eq!(u.tag_ttl, DEFAULT_TAG_TTL);
        assert_eq!(u.read_timeout, Duration::from_millis(250));
        let creds = u.credentials.as_ref().unwrap();
        assert_eq!(
            creds.password,
            SecretSource::Env("BERTH_TEST_CONFIG_PW".into())
        );
        assert!(creds
            .resolve()
            .unwrap_err()
            .contains("BERTH_TEST_CONFIG_PW"));
    }

    #[test]
    fn passwords_come_from_files_without_their_newline() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "s3cret\n").unwrap();
        let text = format!(
            r#"
[[upstream]]
namespace = "ghcr.io"
url = "https://ghcr.io"
prefixes = ["org/**"]
credentials = {{ username = "bot", password_file = "{}" }}
"#,
            file.display()
        );
        let c = Config::parse(&text).unwrap();
        let creds = c.upstreams[0].credentials.as_ref().unwrap();
        assert_eq!(creds.resolve().unwrap(), ("bot".into(), "s3cret".into()));
        std::fs::remove_file(&file).unwrap();
        let e = creds.resolve().unwrap_err();
        assert!(e.contains("cannot read") && !e.contains("s3cret"), "{e}");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("10GiB").unwrap(), 10 << 30);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("1B").unwrap(), 1);
        assert_eq!(parse_size("3KiB").unwrap(), 3072);
        assert_eq!(parse_size("10GB").unwrap(), 10_000_000_000);
        assert_eq!(parse_size("1.5 KiB").unwrap(), 1536);
        for bad in [
            "10",
            "GiB",
            "-1MiB",
            "0GiB",
            "99999999999TiB",
            "",
            "10 parsecs",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
        let c = Config::parse("[server]\nmax_upload_size = \"1MiB\"\n").unwrap();
        assert_eq!(c.server.max_upload_size, Some(1 << 20));
        let e = Config::parse("[server]\nmax_upload_size = \"lots\"\n").unwrap_err();
        assert!(e.0[0].contains("server.max_upload_size"), "{:?}", e.0);
    }

    #[test]
    fn default_upstream_must_be_configured() {
        let up = "[[upstream]]\nnamespace = \"docker.io\"\nurl = \"https://registry-1.docker.io\"\nprefixes = [\"library/**\"]\n";
        let c =
            Config::parse(&format!("[server]\ndefault_upstream = \"docker.io\"\n{up}")).unwrap();
        assert_eq!(c.default_upstream().unwrap().namespace, "docker.io");
        let e =
            Config::parse(&format!("[server]\ndefault_upstream = \"quay.io\"\n{up}")).unwrap_err();
        assert!(
            e.0[0].contains("server.default_upstream") && e.0[0].contains("docker.io"),
            "{:?}",
            e.0
        );
        assert!(Config::parse(up).unwrap().default_upstream().is_none());
    }

    #[test]
    fn external_url() {
        let c =
            Config::parse("[server]\nexternal_url = \"https://berth.example:5000/\"\n").unwrap();
        assert_eq!(
            c.server.external_url.as_deref(),
            Some("https://berth.example:5000")
        );
        let e = Config::parse("[server]\nexternal_url = \"https://b.example/v2\"\n").unwrap_err();
        assert!(e.0[0].starts_with("server.external_url:"), "{e}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("-1s").is_err());
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert!(parse_duration("5 parsecs").is_err());
    }
}
