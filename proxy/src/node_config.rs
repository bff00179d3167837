//! `berth node-config`: a container runtime's configuration for pulling through berth,
//! for every upstream in berth's configuration.
//!
//! - **containerd**: `<certs.d>/<registry>/hosts.toml`, the upstream as `server` (the
//!   fallback) and berth as a `pull` + `resolve` host. containerd sends the mirror form
//!   `/v2/<repo>/…?ns=<registry>`.
//! - **k3s**: `registries.yaml` with one mirror per upstream (k3s writes the `hosts.toml`
//!   files itself), and a `configs` entry for berth's host when it needs credentials or
//!   a CA.
//! - **minikube**: the containerd files under minikube's file-sync folder
//!   (`~/.minikube/files`, copied into the node at `/`), reaching the host as
//!   `host.minikube.internal`; and the `--registry-mirror` flag for its Docker runtime.
//! - **docker**: `daemon.json` `registry-mirrors`. Docker mirrors docker.io only, and its
//!   requests carry no namespace, so berth's `[server] default_upstream` must be
//!   `docker.io`.
//!
//! `--write DIR` installs the files idempotently. The first time a file is replaced, what
//! was there is kept as `<file>.berth-backup`; a file berth creates is marked by an empty
//! `<file>.berth-created`. `--remove` puts back the backup, or deletes what berth created.
//!
//! The node's credential: containerd never sends a pod's imagePullSecrets to a mirror.
//! Either berth lets anonymous requests read the pull-through namespaces (on a node,
//! berth listens on 127.0.0.1, which only the node's own processes reach), or
//! `--credentials-file` (one `user:secret` line, an htpasswd user or an API key) is
//! written into the runtime's configuration: a `hosts.toml` `Authorization` header for
//! containerd and minikube, `configs.<host>.auth` for k3s. Docker cannot send one to a
//! mirror, so on Docker berth must allow anonymous reads.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use berth_config::Config;

/// The runtimes `node-config` configures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Runtime {
    Containerd,
    K3s,
    Minikube,
    Docker,
}

/// What the configuration is made from.
#[derive(Debug, Default)]
pub struct Options {
    /// berth's URL as the node's runtime reaches it (`http://127.0.0.1:5000`).
    pub url: String,
    /// The CA certificate the runtime checks berth's certificate with (HTTPS only).
    pub ca: Option<PathBuf>,
    /// The node's credential for berth: `(user, secret)`.
    pub credentials: Option<(String, String)>,
    /// The current `daemon.json`, for Docker: its other settings are kept.
    pub daemon_json: Option<String>,
}

/// One file of a runtime's configuration.
#[derive(Debug, PartialEq, Eq)]
pub struct File {
    /// Relative to the directory it is installed in.
    pub path: PathBuf,
    pub contents: String,
    /// It holds a credential: only its owner may read it.
    pub secret: bool,
}

/// The files configuring `runtime` to pull every upstream of `config` through berth.
pub fn render(runtime: Runtime, config: &Config, options: &Options) -> Result<Vec<File>, String> {
    let url = options.url.trim_end_matches('/');
    match runtime {
        Runtime::Containerd => Ok(hosts_files(config, url, options, Path::new(""))),
        Runtime::Minikube => Ok(hosts_files(
            config,
            url,
            options,
            Path::new("etc/containerd/certs.d"),
        )),
        Runtime::K3s => Ok(vec![registries_yaml(config, url, options)?]),
        Runtime::Docker => Ok(vec![daemon_json(url, options)?]),
    }
}

/// Problems a runtime would have with this configuration (printed as warnings).
pub fn warnings(runtime: Runtime, config: &Config, options: &Options) -> Vec<String> {
    let mut w = Vec::new();
    if runtime == Runtime::Docker
        && config.server.default_upstream.as_deref() != Some(crate::route::DOCKER_HUB)
    {
        w.push(
            "Docker's mirror requests carry no namespace: set [server] default_upstream = \"docker.io\" in berth's configuration, or Docker's pulls reach private repositories and fall back to Docker Hub".to_owned(),
        );
    }
    if runtime == Runtime::Docker && options.credentials.is_some() {
        w.push("Docker sends no credentials to a registry mirror: --credentials-file is ignored; let anonymous requests read the pull-through namespaces".to_owned());
    }
    if options.url.starts_with("http://") && options.ca.is_some() {
        w.push("--ca is for an https:// berth; it is ignored for http://".to_owned());
    }
    if runtime == Runtime::Minikube {
        let loopback = config
            .server
            .listen
            .as_deref()
            .unwrap_or("127.0.0.1:5000")
            .parse::<std::net::SocketAddr>()
            .is_ok_and(|a| a.ip().is_loopback());
        if loopback {
            w.push("berth listens on loopback only, which minikube's node cannot reach: listen on 0.0.0.0 (or the address of minikube's network) for host.minikube.internal to reach it".to_owned());
        }
    }
    w
}

/// containerd's view of berth's host: `http://127.0.0.1:5000` → `127.0.0.1:5000`.
fn host_of(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.split('/').next().unwrap_or(rest)
}

fn basic(user: &str, secret: &str) -> String {
    let b64 = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        format!("{user}:{secret}"),
    );
    format!("Basic {b64}")
}

/// A TOML (and YAML, and JSON) string literal.
fn quoted(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
}

fn hosts_files(config: &Config, url: &str, options: &Options, under: &Path) -> Vec<File> {
    config
        .upstreams
        .iter()
        .map(|u| {
            let mut t = String::new();
            let _ = writeln!(
                t,
                "# Written by `berth node-config`: pulls from {} go through berth at {url},\n# and to the registry itself only when berth cannot answer.",
                u.namespace
            );
            let _ = writeln!(t, "server = {}\n", quoted(&u.url));
            let _ = writeln!(t, "[host.{}]", quoted(url));
            let _ = writeln!(t, "  capabilities = [\"pull\", \"resolve\"]");
            if let (Some(ca), true) = (&options.ca, url.starts_with("https://")) {
                let _ = writeln!(t, "  ca = {}", quoted(&ca.display().to_string()));
            }
            if let Some((user, secret)) = &options.credentials {
                let _ = writeln!(t, "\n[host.{}.header]", quoted(url));
                let _ = writeln!(t, "  Authorization = [{}]", quoted(&basic(user, secret)));
            }
            File {
                path: under.join(&u.namespace).join("hosts.toml"),
                contents: t,
                secret: options.credentials.is_some(),
            }
        })
        .collect()
}

fn registries_yaml(config: &Config, url: &str, options: &Options) -> Result<File, String> {
    let mut y = String::from(
        "# Written by `berth node-config k3s`: every upstream of berth's configuration is\n# mirrored through berth.\nmirrors:\n",
    );
    if config.upstreams.is_empty() {
        return Err("berth's configuration has no [[upstream]] to mirror".into());
    }
    for u in &config.upstreams {
        let _ = writeln!(
            y,
            "  {}:\n    endpoint:\n      - {}",
            quoted(&u.namespace),
            quoted(url)
        );
    }
    let ca = options.ca.as_ref().filter(|_| url.starts_with("https://"));
    if options.credentials.is_some() || ca.is_some() {
        let _ = writeln!(y, "configs:\n  {}:", quoted(host_of(url)));
        if let Some((user, secret)) = &options.credentials {
            let _ = writeln!(
                y,
                "    auth:\n      username: {}\n      password: {}",
                quoted(user),
                quoted(secret)
            );
        }
        if let Some(ca) = ca {
            let _ = writeln!(
                y,
                "    tls:\n      ca_file: {}",
                quoted(&ca.display().to_string())
            );
        }
    }
    Ok(File {
        path: PathBuf::from("registries.yaml"),
        contents: y,
        secret: options.credentials.is_some(),
    })
}

fn daemon_json(url: &str, options: &Options) -> Result<File, String> {
    let mut v: serde_json::Value = match options.daemon_json.as_deref().map(str::trim) {
        None | Some("") => serde_json::json!({}),
        Some(text) => serde_json::from_str(text)
            .map_err(|e| format!("the existing daemon.json is not valid JSON: {e}"))?,
    };
    let obj = v
        .as_object_mut()
        .ok_or("the existing daemon.json is not a JSON object")?;
    // berth first; other mirrors the file named stay after it.
    let mut mirrors = vec![serde_json::Value::from(url)];
    if let Some(old) = obj.get("registry-mirrors").and_then(|m| m.as_array()) {
        mirrors.extend(
            old.iter()
                .filter(|m| m.as_str().map(|s| s.trim_end_matches('/')) != Some(url))
                .cloned(),
        );
    }
    obj.insert("registry-mirrors".into(), mirrors.into());
    let mut contents = serde_json::to_string_pretty(&v).expect("JSON serializes");
    contents.push('\n');
    Ok(File {
        path: PathBuf::from("daemon.json"),
        contents,
        secret: false,
    })
}

/// What installing or removing one file did.
#[derive(Debug, PartialEq, Eq)]
pub enum Change {
    Created,
    /// Replaced; what was there is in the backup.
    Replaced,
    Unchanged,
    /// The backup was put back.
    Restored,
    /// berth had created it.
    Deleted,
    /// Nothing of berth's was there.
    Absent,
}

const BACKUP: &str = "berth-backup";
const CREATED: &str = "berth-created";

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".");
    name.push(suffix);
    path.with_file_name(name)
}

fn io(path: &Path, what: &str, e: std::io::Error) -> String {
    format!("cannot {what} {}: {e}", path.display())
}

/// Writes `file` under `dir`, keeping what was there the first time.
pub fn install(dir: &Path, file: &File) -> Result<Change, String> {
    let path = dir.join(&file.path);
    let parent = path.parent().unwrap_or(dir);
    std::fs::create_dir_all(parent).map_err(|e| io(parent, "create", e))?;
    let current = match std::fs::read(&path) {
        Ok(c) => Some(c),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(io(&path, "read", e)),
    };
    if current.as_deref() == Some(file.contents.as_bytes()) {
        return Ok(Change::Unchanged);
    }
    let (backup, created) = (sibling(&path, BACKUP), sibling(&path, CREATED));
    let ours_before = backup.exists() || created.exists();
    let change = match (&current, ours_before) {
        (_, true) => Change::Replaced,
        (Some(old), false) => {
            std::fs::write(&backup, old).map_err(|e| io(&backup, "write", e))?;
            Change::Replaced
        }
        (None, false) => {
            std::fs::write(&created, b"").map_err(|e| io(&created, "write", e))?;
            Change::Created
        }
    };
    // Whole or not at all: the runtime never reads half a file.
    let tmp = sibling(&path, "berth-tmp");
    std::fs::write(&tmp, &file.contents).map_err(|e| io(&tmp, "write", e))?;
    let mode = if file.secret { 0o600 } else { 0o644 };
    std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(mode))
        .map_err(|e| io(&tmp, "set the mode of", e))?;
    std::fs::rename(&tmp, &path).map_err(|e| io(&path, "write", e))?;
    Ok(change)
}

/// Undoes [`install`]: puts back the backup, or deletes the file berth created.
pub fn uninstall(dir: &Path, file: &File) -> Result<Change, String> {
    let path = dir.join(&file.path);
    let (backup, created) = (sibling(&path, BACKUP), sibling(&path, CREATED));
    if backup.exists() {
        std::fs::rename(&backup, &path).map_err(|e| io(&path, "restore", e))?;
        return Ok(Change::Restored);
    }
    if created.exists() {
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&path, "remove", e)),
        }
        std::fs::remove_file(&created).map_err(|e| io(&created, "remove", e))?;
        // The registry's folder, if berth's file was all it held.
        if let Some(parent) = path.parent().filter(|p| *p != dir) {
            let _ = std::fs::remove_dir(parent);
        }
        return Ok(Change::Deleted);
    }
    Ok(Change::Absent)
}

/// Warnings about containerd's own configuration: the mirrors in `certs.d` are used only
/// when the CRI plugin's `config_path` names that folder.
pub fn containerd_config_warnings(
    config_toml: Option<&str>,
    certs_d: Option<&Path>,
) -> Vec<String> {
    let Some(text) = config_toml else {
        return vec!["containerd's config.toml was not found: make sure the CRI plugin's registry config_path names the certs.d folder (ctr needs --hosts-dir)".to_owned()];
    };
    let value: toml::Table = match text.parse() {
        Ok(v) => v,
        Err(e) => return vec![format!("containerd's config.toml is not valid TOML ({}): check its registry config_path by hand", e.message().trim())],
    };
    let mut paths = Vec::new();
    find_config_paths(&toml::Value::Table(value), false, &mut paths);
    let mut w = Vec::new();
    match paths.as_slice() {
        [] => w.push("containerd's config.toml sets no registry config_path: containerd then ignores the hosts.toml mirrors (set config_path = \"/etc/containerd/certs.d\" under the CRI plugin's registry section)".to_owned()),
        list => {
            for p in list {
                if p.contains(':') {
                    w.push(format!("containerd's registry config_path {p:?} is a colon-separated list: containerd 2.1 and 2.2 then ignore the mirrors; name one folder"));
                } else if let Some(dir) = certs_d {
                    if Path::new(p) != dir {
                        w.push(format!("containerd's registry config_path is {p:?}, not {}: containerd will not see these files", dir.display()));
                    }
                }
            }
        }
    }
    w
}

fn find_config_paths(v: &toml::Value, in_registry: bool, out: &mut Vec<String>) {
    if let toml::Value::Table(t) = v {
        for (k, v) in t {
            if k == "config_path" && in_registry {
                if let Some(s) = v.as_str() {
                    out.push(s.to_owned());
                }
            } else {
                find_config_paths(v, k == "registry", out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Config {
        Config::parse(&format!(
            "{extra}\n[[upstream]]\nnamespace = \"docker.io\"\nurl = \"https://registry-1.docker.io\"\nprefixes = [\"library/**\"]\n[[upstream]]\nnamespace = \"ghcr.io\"\nurl = \"https://ghcr.io\"\nprefixes = [\"a/**\"]\n"
        ))
        .unwrap()
    }

    #[test]
    fn containerd_hosts_files_name_berth_and_fall_back_to_the_upstream() {
        let options = Options {
            url: "http://127.0.0.1:5000/".into(),
            ..Options::default()
        };
        let files = render(Runtime::Containerd, &config(""), &options).unwrap();
        assert_eq!(files.len(), 2);
        assert_eq!(files[0].path, Path::new("docker.io/hosts.toml"));
        let parsed: toml::Table = files[0].contents.parse().unwrap();
        assert_eq!(
            parsed["server"].as_str(),
            Some("https://registry-1.docker.io")
        );
        let host = &parsed["host"]["http://127.0.0.1:5000"];
        assert_eq!(
            host["capabilities"].as_array().unwrap(),
            &vec![toml::Value::from("pull"), toml::Value::from("resolve")]
        );
        assert!(host.get("header").is_none() && host.get("ca").is_none());
        assert_eq!(files[1].path, Path::new("ghcr.io/hosts.toml"));

        let options = Options {
            url: "https://berth.node:5443".into(),
            ca: Some("/etc/berth/ca.pem".into()),
            credentials: Some(("node".into(), "s3cret".into())),
            ..Options::default()
        };
        let files = render(Runtime::Minikube, &config(""), &options).unwrap();
        assert_eq!(
            files[0].path,
            Path::new("etc/containerd/certs.d/docker.io/hosts.toml")
        );
        assert!(files[0].secret);
        let parsed: toml::Table = files[0].contents.parse().unwrap();
        let host = &parsed["host"]["https://berth.node:5443"];
        assert_eq!(host["ca"].as_str(), Some("/etc/berth/ca.pem"));
        assert_eq!(
            host["header"]["Authorization"][0].as_str(),
            Some("Basic bm9kZTpzM2NyZXQ=")
        );
    }

    #[test]
    fn k3s_mirrors_every_upstream() {
        let options = Options {
            url: "https://127.0.0.1:5443".into(),
            ca: Some("/etc/berth/ca.pem".into()),
            credentials: Some(("node".into(), "pw \"x\"".into())),
            ..Options::default()
        };
        let file = &render(Runtime::K3s, &config(""), &options).unwrap()[0];
        assert_eq!(
            file.contents,
            "# Written by `berth node-config k3s`: every upstream of berth's configuration is\n# mirrored through berth.\nmirrors:\n  \"docker.io\":\n    endpoint:\n      - \"https://127.0.0.1:5443\"\n  \"ghcr.io\":\n    endpoint:\n      - \"https://127.0.0.1:5443\"\nconfigs:\n  \"127.0.0.1:5443\":\n    auth:\n      username: \"node\"\n      password: \"pw \\\"x\\\"\"\n    tls:\n      ca_file: \"/etc/berth/ca.pem\"\n"
        );
        assert!(file.secret);
    }

    #[test]
    fn docker_keeps_the_daemon_s_other_settings() {
        let options = Options {
            url: "http://127.0.0.1:5000".into(),
            daemon_json: Some(
                r#"{"log-driver": "local", "registry-mirrors": ["https://mirror.example", "http://127.0.0.1:5000/"]}"#
                    .into(),
            ),
            ..Options::default()
        };
        let file = &render(Runtime::Docker, &config(""), &options).unwrap()[0];
        let v: serde_json::Value = serde_json::from_str(&file.contents).unwrap();
        assert_eq!(v["log-driver"], "local");
        assert_eq!(
            v["registry-mirrors"],
            serde_json::json!(["http://127.0.0.1:5000", "https://mirror.example"])
        );
        assert!(warnings(Runtime::Docker, &config(""), &options)[0].contains("default_upstream"));
        let ok = config("[server]\ndefault_upstream = \"docker.io\"");
        assert!(warnings(Runtime::Docker, &ok, &options).is_empty());
        let bad = Options {
            daemon_json: Some("[1]".into()),
            ..options
        };
        assert!(render(Runtime::Docker, &ok, &bad).is_err());
    }

    #[test]
    fn install_is_idempotent_and_remove_puts_back_what_was_there() {
        let dir = tempfile::tempdir().unwrap();
        let file = |contents: &str| File {
            path: "docker.io/hosts.toml".into(),
            contents: contents.into(),
            secret: false,
        };
        let other = File {
            path: "ghcr.io/hosts.toml".into(),
            contents: "new".into(),
            secret: true,
        };
        std::fs::create_dir_all(dir.path().join("docker.io")).unwrap();
        std::fs::write(dir.path().join("docker.io/hosts.toml"), "theirs").unwrap();

        assert_eq!(
            install(dir.path(), &file("ours")).unwrap(),
            Change::Replaced
        );
        assert_eq!(
            install(dir.path(), &file("ours")).unwrap(),
            Change::Unchanged
        );
        // A changed configuration replaces berth's file; the backup stays the original.
        assert_eq!(
            install(dir.path(), &file("ours, v2")).unwrap(),
            Change::Replaced
        );
        assert_eq!(install(dir.path(), &other).unwrap(), Change::Created);
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.path().join("ghcr.io/hosts.toml"))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);

        assert_eq!(uninstall(dir.path(), &file("")).unwrap(), Change::Restored);
        assert_eq!(
            std::fs::read_to_string(dir.path().join("docker.io/hosts.toml")).unwrap(),
            "theirs"
        );
        assert_eq!(uninstall(dir.path(), &other).unwrap(), Change::Deleted);
        assert!(!dir.path().join("ghcr.io").exists());
        assert_eq!(uninstall(dir.path(), &other).unwrap(), Change::Absent);
        assert_eq!(uninstall(dir.path(), &file("")).unwrap(), Change::Absent);
        let left: Vec<_> = std::fs::read_dir(dir.path().join("docker.io"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("hosts.toml")]);
    }

    #[test]
    fn containerd_config_path_is_checked() {
        let certs = Path::new("/etc/containerd/certs.d");
        let v2 = "version = 3\n[plugins.\"io.containerd.cri.v1.images\".registry]\nconfig_path = \"/etc/containerd/certs.d\"\n";
        assert!(containerd_config_warnings(Some(v2), Some(certs)).is_empty());
        let v1 = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\nconfig_path = \"/etc/containerd/certs.d:/etc/docker/certs.d\"\n";
        assert!(containerd_config_warnings(Some(v1), Some(certs))[0].contains("colon-separated"));
        let unset = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\"]\nsandbox_image = \"x\"\n";
        assert!(containerd_config_warnings(Some(unset), Some(certs))[0]
            .contains("sets no registry config_path"));
        let elsewhere = v2.replace("/etc/containerd/certs.d", "/other");
        assert!(containerd_config_warnings(Some(&elsewhere), Some(certs))[0].contains("/other"));
        assert!(containerd_config_warnings(None, None)[0].contains("not found"));
    }
}
