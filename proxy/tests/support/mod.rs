//! End-to-end harness: real docker-registry 2.8, containerd 1.6, skopeo, a token server,
//! and the `berth` binary, each a child process in its own temporary directory.
//!
//! Every process is killed by its PID when its guard is dropped. Every port comes from
//! binding `127.0.0.1:0`. Readiness is polled with a bound, never slept for.
//! When a test panics, the guards print the tail of their process's log.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::Bytes;
use flate2::write::GzEncoder;
use flate2::Compression;
use sha2::{Digest as _, Sha256};
use tempfile::TempDir;

pub mod oidc;

pub use berth_store::oci::{MANIFEST_ACCEPT_DEFAULT as ACCEPT_ALL, OCI_INDEX, OCI_MANIFEST};
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// How long any process gets to become ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------
// Small utilities

pub fn sha256_hex(b: &[u8]) -> String {
    hex(&Sha256::digest(b))
}

pub fn digest_of(b: &[u8]) -> String {
    format!("sha256:{}", sha256_hex(b))
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn b64url(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

pub fn b64std(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// `Basic <base64(user:pass)>`.
pub fn basic_auth(user: &str, pass: &str) -> String {
    format!("Basic {}", b64std(format!("{user}:{pass}").as_bytes()))
}

/// A port that was free a moment ago. Racy (anyone may take it before it is used): never
/// use it for an address a test expects to be closed; see [`ClosedPort`].
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().unwrap().port()
}

/// A loopback port that refuses connections, held for as long as this value lives: a
/// socket bound to `127.0.0.1:0` that never listens. Connecting to it is refused at once,
/// and nothing else can bind the port meanwhile (the socket does not set
/// `SO_REUSEADDR`), so a test can name it as an upstream or a fallback that must never
/// answer, and no traffic can leave the machine through it.
pub struct ClosedPort {
    _socket: tokio::net::TcpSocket,
    port: u16,
}

impl ClosedPort {
    pub fn new() -> ClosedPort {
        let socket = tokio::net::TcpSocket::new_v4().expect("create a TCP socket");
        socket
            .bind("127.0.0.1:0".parse().unwrap())
            .expect("bind 127.0.0.1:0");
        let port = socket.local_addr().unwrap().port();
        ClosedPort {
            _socket: socket,
            port,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Default for ClosedPort {
    fn default() -> Self {
        ClosedPort::new()
    }
}

/// Panics unless every URL in `text` (anything after a `scheme://`) names a loopback
/// host: a test must never configure anything that could contact another machine.
pub fn assert_loopback_only(text: &str, what: &str) {
    for (i, _) in text.match_indices("://") {
        let host = &text[i + 3..];
        assert!(
            host.starts_with("127.0.0.1:")
                || host.starts_with("127.0.0.1/")
                || host.starts_with("[::1]:")
                || host.starts_with("localhost:"),
            "{what} names a host that is not loopback: {:?}",
            host.chars().take(60).collect::<String>()
        );
    }
}

/// A temporary directory with a short path (containerd's socket path must be < 108 bytes).
pub fn tempdir() -> TempDir {
    tempfile::Builder::new()
        .prefix("berth-e2e-")
        .tempdir_in("/tmp")
        .expect("create a temporary directory")
}

/// Runs `fut`, panicking with `what` if it takes longer than `secs`.
pub async fn within<T>(secs: u64, what: &str, fut: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(Duration::from_secs(secs), fut).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: did not finish within {secs} s"),
    }
}

fn tail(path: &Path, max_lines: usize) -> String {
    let text = fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(max_lines);
    lines[start..].join("\n")
}

pub fn require_tool(name: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false);
    assert!(found, "the end-to-end tests need `{name}` on PATH");
}

/// Stops `child`: SIGTERM, then SIGKILL if it has not exited within `grace`; reaps it.
pub fn terminate(child: &mut Child, grace: Duration) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if child.try_wait().ok().flatten().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A child process, killed (SIGKILL) and reaped when dropped.
pub struct ProcGuard {
    child: Option<Child>,
    name: String,
    /// Printed (tail) when the guard is dropped during a panic.
    log: Option<PathBuf>,
}

impl ProcGuard {
    pub fn new(name: &str, child: Child, log: Option<PathBuf>) -> Self {
        ProcGuard {
            child: Some(child),
            name: name.to_owned(),
            log,
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// `Some(status)` if the process has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for ProcGuard {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            if let Some(log) = &self.log {
                eprintln!(
                    "----- {} log ({}), last lines -----\n{}\n-----",
                    self.name,
                    log.display(),
                    tail(log, 40)
                );
            }
        }
    }
}

/// A private Docker Engine: its own data root, exec root, socket and pidfile, no
/// iptables and no bridge, the vfs storage driver (no mounts), configured by the
/// `daemon.json` given. Stopped with SIGTERM (dockerd then stops the containerd it
/// started), and SIGKILL if it has not stopped within 20 s.
pub struct Dockerd {
    child: Option<Child>,
    sock: PathBuf,
    log: PathBuf,
    _dir: TempDir,
}

impl Dockerd {
    pub async fn start(daemon_json: &Path) -> Dockerd {
        require_tool("dockerd");
        require_tool("docker");
        let dir = tempdir();
        let d = dir.path();
        let sock = d.join("docker.sock");
        let log = d.join("dockerd.log");
        let child = Command::new("dockerd")
            .arg("--config-file")
            .arg(daemon_json)
            .arg("--data-root")
            .arg(d.join("data"))
            .arg("--exec-root")
            .arg(d.join("exec"))
            .arg("--pidfile")
            .arg(d.join("docker.pid"))
            .arg("-H")
            .arg(format!("unix://{}", sock.display()))
            .args(["--iptables=false", "--ip6tables=false", "--bridge=none"])
            .args(["--storage-driver", "vfs"])
            .stdin(Stdio::null())
            .stdout(fs::File::create(&log).unwrap())
            .stderr(fs::OpenOptions::new().append(true).open(&log).unwrap())
            .spawn()
            .expect("start dockerd");
        let mut this = Dockerd {
            child: Some(child),
            sock,
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if this.docker(&["version"]).await.status.success() {
                return this;
            }
            if let Some(status) = this
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("dockerd exited ({status}):\n{}", tail(&this.log, 50));
            }
            assert!(
                Instant::now() < deadline,
                "dockerd did not start:\n{}",
                tail(&this.log, 50)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Runs `docker -H unix://SOCK <args>`.
    pub async fn docker(&self, args: &[&str]) -> std::process::Output {
        let mut cmd = tokio::process::Command::new("docker");
        cmd.arg("-H")
            .arg(format!("unix://{}", self.sock.display()))
            .args(args)
            .env("DOCKER_CONFIG", self._dir.path().join("client"))
            .stdin(Stdio::null())
            .kill_on_drop(true);
        within(180, &format!("docker {args:?}"), cmd.output())
            .await
            .expect("run docker")
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        terminate(&mut child, Duration::from_secs(20));
        if std::thread::panicking() {
            eprintln!(
                "----- dockerd log, last lines -----\n{}\n-----",
                tail(&self.log, 40)
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// Image generation

/// Deterministic, incompressible bytes (xorshift64*).
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A tmpfs of a fixed size mounted at a directory (the tests run as root), unmounted
/// when dropped: a small filesystem to fill up.
pub struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    pub fn mount(path: &Path, size: &str) -> Tmpfs {
        fs::create_dir_all(path).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "berth-test"])
            .arg(path)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mounting a {size} tmpfs at {} (the tests run as root): {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs {
            path: path.to_owned(),
        }
    }

    /// Writes a file of zeros at `name` until the filesystem is full; returns its size.
    pub fn fill(&self, name: &str) -> u64 {
        let mut f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path.join(name))
            .unwrap();
        let chunk = vec![0u8; 64 * 1024];
        let mut written = 0u64;
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(28) => break,
                Err(e) => panic!("filling {}: {e}", self.path.display()),
            }
        }
        let _ = f.sync_all();
        written
    }

    /// Bytes still available.
    pub fn available(&self) -> u64 {
        let out = Command::new("df")
            .args(["--output=avail", "-B1"])
            .arg(&self.path)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .and_then(|l| l.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// Content and its digest.
#[derive(Clone, Debug)]
pub struct Blob {
    pub media_type: String,
    pub bytes: Bytes,
    pub digest: String,
}

impl Blob {
    pub fn new(media_type: &str, bytes: impl Into<Bytes>) -> Blob {
        let bytes = bytes.into();
        Blob {
            media_type: media_type.to_owned(),
            digest: digest_of(&bytes),
            bytes,
        }
    }

    pub fn descriptor(&self) -> serde_json::Value {
        serde_json::json!({"mediaType": self.media_type, "digest": self.digest, "size": self.bytes.len()})
    }

    pub fn hex(&self) -> &str {
        self.digest.strip_prefix("sha256:").unwrap()
    }
}

/// A gzip'd tar layer and the digest of the uncompressed tar (its diff_id).
#[derive(Clone, Debug)]
pub struct Layer {
    pub blob: Blob,
    pub diff_id: String,
}

/// A real layer: a tar holding one file of `payload` pseudo-random bytes, gzip'd.
pub fn make_layer(seed: u64, payload: usize, level: Compression) -> Layer {
    let data = random_bytes(seed, payload);
    let mut tar = tar::Builder::new(Vec::with_capacity(payload + 4096));
    let mut dir = tar::Header::new_gnu();
    dir.set_entry_type(tar::EntryType::Directory);
    dir.set_path("berth-e2e/").unwrap();
    dir.set_size(0);
    dir.set_mode(0o755);
    dir.set_mtime(0);
    dir.set_cksum();
    tar.append(&dir, std::io::empty()).unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_path(format!("berth-e2e/layer-{seed}.bin")).unwrap();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_cksum();
    tar.append(&h, &data[..]).unwrap();
    let tar_bytes = tar.into_inner().unwrap();
    drop(data);
    let diff_id = digest_of(&tar_bytes);
    let mut gz = GzEncoder::new(
        Vec::with_capacity(tar_bytes.len() + tar_bytes.len() / 64 + 1024),
        level,
    );
    gz.write_all(&tar_bytes).unwrap();
    let gz = gz.finish().unwrap();
    Layer {
        blob: Blob::new(OCI_LAYER_GZIP, gz),
        diff_id,
    }
}

/// A single-platform OCI image: config, layers and the manifest bytes.
#[derive(Clone, Debug)]
pub struct Image {
    pub arch: String,
    pub config: Blob,
    pub layers: Vec<Layer>,
    pub manifest: Bytes,
    pub digest: String,
}

impl Image {
    /// The config and the layers.
    pub fn blobs(&self) -> Vec<&Blob> {
        std::iter::once(&self.config)
            .chain(self.layers.iter().map(|l| &l.blob))
            .collect()
    }

    pub fn descriptor(&self) -> serde_json::Value {
        serde_json::json!({
            "mediaType": OCI_MANIFEST, "digest": self.digest, "size": self.manifest.len(),
            "platform": {"architecture": self.arch, "os": "linux"}
        })
    }
}

pub fn make_image(arch: &str, layers: Vec<Layer>, label: &str) -> Image {
    let config = serde_json::json!({
        "architecture": arch,
        "os": "linux",
        "created": "2024-01-01T00:00:00Z",
        "config": {"Env": [format!("BERTH_E2E={label}")], "Cmd": ["/bin/true"]},
        "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>()},
        "history": layers.iter().map(|_| serde_json::json!({"created_by": "berth e2e"})).collect::<Vec<_>>(),
    });
    let config = Blob::new(OCI_CONFIG, serde_json::to_vec(&config).unwrap());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config.descriptor(),
        "layers": layers.iter().map(|l| l.blob.descriptor()).collect::<Vec<_>>(),
    });
    let manifest = Bytes::from(serde_json::to_vec_pretty(&manifest).unwrap());
    Image {
        arch: arch.to_owned(),
        digest: digest_of(&manifest),
        config,
        layers,
        manifest,
    }
}

/// An OCI index of images (one per platform).
#[derive(Clone, Debug)]
pub struct Index {
    pub images: Vec<Image>,
    pub bytes: Bytes,
    pub digest: String,
}

impl Index {
    /// Every distinct blob of every image.
    pub fn blobs(&self) -> Vec<&Blob> {
        let mut seen = BTreeMap::new();
        for i in &self.images {
            for b in i.blobs() {
                seen.entry(b.digest.clone()).or_insert(b);
            }
        }
        seen.into_values().collect()
    }

    pub fn image(&self, arch: &str) -> &Image {
        self.images
            .iter()
            .find(|i| i.arch == arch)
            .expect("no image for that arch")
    }
}

pub fn make_index(images: Vec<Image>) -> Index {
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": images.iter().map(Image::descriptor).collect::<Vec<_>>(),
    });
    let bytes = Bytes::from(serde_json::to_vec(&index).unwrap());
    Index {
        digest: digest_of(&bytes),
        images,
        bytes,
    }
}

/// The platform of [`make_multiarch`]'s images that a client on this machine pulls.
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => panic!("no test image for {other}"),
    }
}

/// A two-platform (linux/amd64, linux/arm64) index: one shared layer plus one layer of
/// its own per platform. `seed` makes every image distinct.
pub fn make_multiarch(seed: u64, layer_size: usize) -> Index {
    let shared = make_layer(seed * 100, layer_size, Compression::fast());
    let images = ["amd64", "arm64"]
        .iter()
        .enumerate()
        .map(|(i, arch)| {
            let own = make_layer(
                seed * 100 + 1 + i as u64,
                layer_size / 2 + 17,
                Compression::fast(),
            );
            make_image(arch, vec![shared.clone(), own], &format!("{seed}-{arch}"))
        })
        .collect();
    make_index(images)
}

/// A single-platform (linux/amd64) image with two layers.
pub fn make_single(seed: u64, layer_size: usize) -> Image {
    let a = make_layer(seed * 100 + 50, layer_size, Compression::fast());
    let b = make_layer(seed * 100 + 51, 1000, Compression::fast());
    make_image("amd64", vec![a, b], &format!("single-{seed}"))
}

/// The large layer (≥ 100 MiB compressed), generated once per test binary.
pub fn big_layer() -> &'static Layer {
    static BIG: OnceLock<Layer> = OnceLock::new();
    BIG.get_or_init(|| {
        // Random data does not compress; store it (gzip level 0) so generating is fast.
        let l = make_layer(0xB16_B10B, (100 << 20) + (1 << 20), Compression::none());
        assert!(l.blob.bytes.len() >= 100 << 20);
        l
    })
}

// ---------------------------------------------------------------------------------------
// Pushing (exactly per the registry's API: POST an upload, PUT it with the digest)

pub struct Pusher {
    base: String,
    client: reqwest::Client,
    token: Option<String>,
}

impl Pusher {
    pub fn new(base: &str, token: Option<String>) -> Pusher {
        Pusher {
            base: base.trim_end_matches('/').to_owned(),
            // Test registries on loopback may serve HTTPS with the test CA.
            client: reqwest::Client::builder()
                .danger_accept_invalid_certs(true)
                .build()
                .unwrap(),
            token,
        }
    }

    fn auth(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(t) => rb.bearer_auth(t),
            None => rb,
        }
    }

    pub async fn blob(&self, repo: &str, blob: &Blob) {
        let resp = self
            .auth(
                self.client
                    .post(format!("{}/v2/{repo}/blobs/uploads/", self.base)),
            )
            .send()
            .await
            .expect("POST upload");
        assert_eq!(
            resp.status().as_u16(),
            202,
            "POST blobs/uploads/ of {repo}: {:?}",
            resp.text().await
        );
        let loc = resp
            .headers()
            .get("location")
            .expect("Location")
            .to_str()
            .unwrap()
            .to_owned();
        let loc = if loc.starts_with("http") {
            loc
        } else {
            format!("{}{loc}", self.base)
        };
        let sep = if loc.contains('?') { '&' } else { '?' };
        let resp = self
            .auth(self.client.put(format!("{loc}{sep}digest={}", blob.digest)))
            .header("Content-Type", "application/octet-stream")
            .body(blob.bytes.clone())
            .send()
            .await
            .expect("PUT upload");
        let status = resp.status().as_u16();
        assert_eq!(
            status,
            201,
            "PUT blob {} to {repo}: {:?}",
            blob.digest,
            resp.text().await
        );
    }

    pub async fn manifest(&self, repo: &str, reference: &str, media_type: &str, body: &Bytes) {
        let resp = self
            .auth(
                self.client
                    .put(format!("{}/v2/{repo}/manifests/{reference}", self.base)),
            )
            .header("Content-Type", media_type)
            .body(body.clone())
            .send()
            .await
            .expect("PUT manifest");
        let status = resp.status().as_u16();
        let digest = resp
            .headers()
            .get("docker-content-digest")
            .map(|v| v.to_str().unwrap().to_owned());
        assert_eq!(
            status,
            201,
            "PUT manifest {repo}:{reference}: {:?}",
            resp.text().await
        );
        assert_eq!(
            digest.as_deref(),
            Some(digest_of(body).as_str()),
            "registry's digest of {repo}:{reference}"
        );
    }

    /// Pushes an image's blobs and its manifest, by digest and, if given, by tag.
    pub async fn image(&self, repo: &str, tag: Option<&str>, image: &Image) {
        for b in image.blobs() {
            self.blob(repo, b).await;
        }
        self.manifest(repo, &image.digest, OCI_MANIFEST, &image.manifest)
            .await;
        if let Some(tag) = tag {
            self.manifest(repo, tag, OCI_MANIFEST, &image.manifest)
                .await;
        }
    }

    pub async fn index(&self, repo: &str, tag: &str, index: &Index) {
        for b in index.blobs() {
            self.blob(repo, b).await;
        }
        for i in &index.images {
            self.manifest(repo, &i.digest, OCI_MANIFEST, &i.manifest)
                .await;
        }
        self.manifest(repo, tag, OCI_INDEX, &index.bytes).await;
    }
}

// ---------------------------------------------------------------------------------------
// docker-registry

/// One line of the registry's access log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoggedRequest {
    pub method: String,
    /// Without the query.
    pub path: String,
    pub query: Option<String>,
    pub status: u16,
    pub user_agent: String,
}

/// Parses a Combined Log Format line:
/// `127.0.0.1 - - [date] "GET /path HTTP/1.1" 200 126 "" "ua"`.
pub fn parse_access_line(line: &str) -> Option<LoggedRequest> {
    let open = line.find("] \"")? + 3;
    let rest = &line[open..];
    let close = rest.find('"')?;
    let mut req = rest[..close].split(' ');
    let method = req.next()?.to_owned();
    let target = req.next()?;
    if !req.next()?.starts_with("HTTP/") {
        return None;
    }
    let status = rest[close + 1..].split_whitespace().next()?.parse().ok()?;
    let ua = line
        .trim_end()
        .strip_suffix('"')
        .and_then(|l| l.rfind('"').map(|i| l[i + 1..].to_owned()))?;
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_owned(), Some(q.to_owned())),
        None => (target.to_owned(), None),
    };
    Some(LoggedRequest {
        method,
        path,
        query,
        status,
        user_agent: ua,
    })
}

/// Token authentication for a registry: the token server's realm and its certificate.
pub struct TokenAuthConfig {
    pub realm: String,
    pub service: String,
    pub issuer: String,
    pub bundle: PathBuf,
}

pub struct Registry {
    proc: ProcGuard,
    port: u16,
    scheme: &'static str,
    access_log: PathBuf,
    app_log: PathBuf,
    dir: TempDir,
}

impl Registry {
    pub async fn start() -> Registry {
        Self::start_with(None).await
    }

    /// A registry that requires tokens from `ts`.
    pub async fn start_with_token_auth(ts: &TokenServer) -> Registry {
        Self::start_with(Some(ts.auth_config())).await
    }

    pub async fn start_with(auth: Option<TokenAuthConfig>) -> Registry {
        Self::start_with_tls(auth, None).await
    }

    /// A registry serving HTTPS with `pki`'s `server.pem` and `server.key` (see
    /// [`test_pki`]).
    pub async fn start_tls(pki: &Path) -> Registry {
        Self::start_with_tls(None, Some(pki)).await
    }

    async fn start_with_tls(auth: Option<TokenAuthConfig>, tls: Option<&Path>) -> Registry {
        require_tool("docker-registry");
        let dir = tempdir();
        let data = dir.path().join("data");
        fs::create_dir_all(&data).unwrap();
        let mut yaml = format!(
            "version: 0.1\n\
             log:\n  level: info\n  accesslog:\n    disabled: false\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n  \
             maintenance:\n    uploadpurging:\n      enabled: false\n\
             http:\n  addr: 127.0.0.1:0\n  secret: berth-e2e-secret\n",
            data.display()
        );
        if let Some(pki) = tls {
            yaml.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                pki.join("server.pem").display(),
                pki.join("server.key").display()
            ));
        }
        if let Some(a) = &auth {
            yaml.push_str(&format!(
                "auth:\n  token:\n    realm: {}\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n",
                a.realm,
                a.service,
                a.issuer,
                a.bundle.display()
            ));
        }
        let config = dir.path().join("config.yml");
        fs::write(&config, yaml).unwrap();
        let access_log = dir.path().join("access.log");
        let app_log = dir.path().join("registry.log");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(fs::File::create(&access_log).unwrap())
            .stderr(fs::File::create(&app_log).unwrap())
            .spawn()
            .expect("start docker-registry");
        // On a panic, its access log says the most (the app log is long).
        let mut proc = ProcGuard::new("docker-registry access", child, Some(access_log.clone()));
        let deadline = Instant::now() + READY_TIMEOUT;
        let port = loop {
            let log = fs::read_to_string(&app_log).unwrap_or_default();
            if let Some(i) = log.find("listening on 127.0.0.1:") {
                let digits: String = log[i + "listening on 127.0.0.1:".len()..]
                    .chars()
                    .take_while(|c| c.is_ascii_digit())
                    .collect();
                if let Ok(p) = digits.parse::<u16>() {
                    break p;
                }
            }
            if let Some(status) = proc.exited() {
                panic!("docker-registry exited ({status}) while starting:\n{log}");
            }
            assert!(
                Instant::now() < deadline,
                "docker-registry did not start:\n{log}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        // Ready when /v2/ answers at all (401 under token auth).
        let scheme = if tls.is_some() { "https" } else { "http" };
        let client = reqwest::Client::builder()
            .danger_accept_invalid_certs(tls.is_some())
            .build()
            .unwrap();
        loop {
            if client
                .get(format!("{scheme}://127.0.0.1:{port}/v2/"))
                .send()
                .await
                .is_ok()
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "docker-registry on port {port} never answered"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Registry {
            proc,
            port,
            scheme,
            access_log,
            app_log,
            dir,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme, self.port)
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn pusher(&self, token: Option<String>) -> Pusher {
        Pusher::new(&self.url(), token)
    }

    /// Every request logged so far.
    pub fn requests_now(&self) -> Vec<LoggedRequest> {
        fs::read_to_string(&self.access_log)
            .unwrap_or_default()
            .lines()
            .filter_map(parse_access_line)
            .collect()
    }

    /// Every request, once the log has stopped growing for a moment (lines are written
    /// after each response completes).
    pub async fn requests(&self) -> Vec<LoggedRequest> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut last = self.requests_now();
        let mut stable_since = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = self.requests_now();
            if now.len() != last.len() {
                last = now;
                stable_since = Instant::now();
            } else if stable_since.elapsed() >= Duration::from_millis(500)
                || Instant::now() > deadline
            {
                return now;
            }
        }
    }

    /// How many `method` requests for exactly `path` (query ignored) were logged.
    pub async fn count(&self, method: &str, path: &str) -> usize {
        self.requests()
            .await
            .iter()
            .filter(|r| r.method == method && r.path == path)
            .count()
    }

    /// Kills the registry ("the upstream stopped"); its port stays known.
    pub fn stop(&mut self) {
        self.proc.kill();
    }
}

// ---------------------------------------------------------------------------------------
// A token server (Docker token authentication, RS256 JWTs with an x5c header)

#[derive(Clone, Debug)]
pub struct TokenRequest {
    pub target: String,
    pub scopes: Vec<String>,
    pub service: Option<String>,
    pub authorization: Option<String>,
    pub status: u16,
}

struct TokenInner {
    key: PathBuf,
    x5c: String,
    service: String,
    issuer: String,
    required: Option<(String, String)>,
    log: Mutex<Vec<TokenRequest>>,
}

pub struct TokenServer {
    inner: Arc<TokenInner>,
    cert: PathBuf,
    port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    _dir: TempDir,
}

pub const TOKEN_SERVICE: &str = "berth-test-registry";
pub const TOKEN_ISSUER: &str = "berth-test-issuer";

impl TokenServer {
    /// Anonymous pulls allowed.
    pub fn start_anonymous() -> TokenServer {
        Self::start(None)
    }

    /// Only requests with these Basic credentials get tokens; others get 401.
    pub fn start_requiring(user: &str, pass: &str) -> TokenServer {
        Self::start(Some((user.to_owned(), pass.to_owned())))
    }

    fn start(required: Option<(String, String)>) -> TokenServer {
        require_tool("openssl");
        let dir = tempdir();
        let key = dir.path().join("key.pem");
        let cert = dir.path().join("cert.pem");
        let out = Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "3650",
                "-subj",
                "/CN=berth-test-token-issuer",
            ])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .expect("run openssl req");
        assert!(
            out.status.success(),
            "openssl req: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pem = fs::read_to_string(&cert).unwrap();
        // The PEM body is the standard, padded base64 of the DER certificate.
        let x5c: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        let inner = Arc::new(TokenInner {
            key,
            x5c,
            service: TOKEN_SERVICE.into(),
            issuer: TOKEN_ISSUER.into(),
            required,
            log: Mutex::new(Vec::new()),
        });
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let inner = inner.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let inner = inner.clone();
                    std::thread::spawn(move || token_connection(&inner, conn));
                }
            })
        };
        TokenServer {
            inner,
            cert,
            port,
            stop,
            thread: Some(thread),
            _dir: dir,
        }
    }

    pub fn realm(&self) -> String {
        format!("http://127.0.0.1:{}/token", self.port)
    }

    /// `127.0.0.1:<port>`: the realm's host, for `token_hosts`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn auth_config(&self) -> TokenAuthConfig {
        TokenAuthConfig {
            realm: self.realm(),
            service: self.inner.service.clone(),
            issuer: self.inner.issuer.clone(),
            bundle: self.cert.clone(),
        }
    }

    /// A token for `repo` with `actions`, minted directly (for pushing).
    pub fn mint(&self, repo: &str, actions: &[&str]) -> String {
        mint(
            &self.inner,
            &[serde_json::json!({"type": "repository", "name": repo, "actions": actions})],
        )
    }

    /// Every token request so far.
    pub fn requests(&self) -> Vec<TokenRequest> {
        self.inner.log.lock().unwrap().clone()
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn mint(inner: &TokenInner, access: &[serde_json::Value]) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    static JTI: AtomicUsize = AtomicUsize::new(0);
    let header = serde_json::json!({"typ": "JWT", "alg": "RS256", "x5c": [inner.x5c]});
    let claims = serde_json::json!({
        "iss": inner.issuer, "sub": "tester", "aud": inner.service,
        "exp": now + 300, "nbf": now - 10, "iat": now,
        "jti": format!("berth-e2e-{}-{}", std::process::id(), JTI.fetch_add(1, Ordering::SeqCst)),
        "access": access,
    });
    let signing_input = format!(
        "{}.{}",
        b64url(&serde_json::to_vec(&header).unwrap()),
        b64url(&serde_json::to_vec(&claims).unwrap())
    );
    let mut child = Command::new("openssl")
        .args(["dgst", "-sha256", "-sign"])
        .arg(&inner.key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run openssl dgst");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(signing_input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "openssl dgst: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    format!("{signing_input}.{}", b64url(&out.stdout))
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16)
                {
                    Ok(v) => {
                        out.push(v);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads one HTTP request head; returns (request line, headers).
fn read_head(conn: &mut TcpStream) -> Option<(String, Vec<(String, String)>)> {
    conn.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let mut buf = Vec::new();
    let mut byte = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = conn.read(&mut byte).ok()?;
        if n == 0 || buf.len() > 64 * 1024 {
            return None;
        }
        buf.extend_from_slice(&byte[..n]);
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let mut lines = text.split("\r\n");
    let request_line = lines.next()?.to_owned();
    let headers = lines
        .take_while(|l| !l.is_empty())
        .filter_map(|l| {
            l.split_once(':')
                .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        })
        .collect();
    Some((request_line, headers))
}

fn token_connection(inner: &TokenInner, mut conn: TcpStream) {
    let Some((request_line, headers)) = read_head(&mut conn) else {
        return;
    };
    let target = request_line.split(' ').nth(1).unwrap_or("").to_owned();
    let authorization = headers
        .iter()
        .find(|(k, _)| k == "authorization")
        .map(|(_, v)| v.clone());
    let query = target.split_once('?').map(|(_, q)| q).unwrap_or("");
    let mut scopes = Vec::new();
    let mut service = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "scope" => scopes.extend(
                percent_decode(v)
                    .split(' ')
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned),
            ),
            "service" => service = Some(percent_decode(v)),
            _ => {}
        }
    }
    let authorized = match &inner.required {
        None => true,
        Some((u, p)) => authorization.as_deref() == Some(basic_auth(u, p).as_str()),
    };
    let (status, body, extra) = if !target.starts_with("/token") {
        (404, r#"{"error":"not found"}"#.to_owned(), "")
    } else if !authorized {
        (
            401,
            r#"{"errors":[{"code":"UNAUTHORIZED","message":"credentials required"}]}"#.to_owned(),
            "WWW-Authenticate: Basic realm=\"berth-test-token\"\r\n",
        )
    } else {
        // Grant pull on exactly the repositories asked for (no wildcards: the registry
        // matches names exactly).
        let access: Vec<serde_json::Value> = scopes
            .iter()
            .filter_map(|s| {
                let (typ, rest) = s.split_once(':')?;
                let (name, actions) = rest.rsplit_once(':')?;
                let granted: Vec<&str> = actions.split(',').filter(|a| *a == "pull").collect();
                Some(serde_json::json!({"type": typ, "name": name, "actions": granted}))
            })
            .collect();
        let token = mint(inner, &access);
        (
            200,
            serde_json::json!({"token": token, "access_token": token, "expires_in": 300})
                .to_string(),
            "",
        )
    };
    inner.log.lock().unwrap().push(TokenRequest {
        target: target.clone(),
        scopes,
        service,
        authorization,
        status,
    });
    let reason = match status {
        200 => "OK",
        401 => "Unauthorized",
        _ => "Not Found",
    };
    let resp = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = conn.write_all(resp.as_bytes());
    let _ = conn.shutdown(Shutdown::Write);
}

// ---------------------------------------------------------------------------------------
// A TCP tap: forwards to a port and records every byte sent towards it.

/// A loopback port the test holds for its whole life, forwarding each connection to a
/// target port that can be changed ([`TapProxy::retarget`]): so an upstream can stop (a
/// [`ClosedPort`] target: connections are closed at once) or hang (a [`HungListener`])
/// while berth's configuration keeps naming the same address, and no port is ever given
/// up for someone else to take.
pub struct TapProxy {
    port: u16,
    target: Arc<AtomicU16>,
    captured: Arc<Mutex<Vec<u8>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TapProxy {
    pub fn start(target_port: u16) -> TapProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let captured = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let target = Arc::new(AtomicU16::new(target_port));
        let thread = {
            let captured = captured.clone();
            let stop = stop.clone();
            let target = target.clone();
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(client) = conn else { continue };
                    let to = target.load(Ordering::SeqCst);
                    let Ok(server) = TcpStream::connect(("127.0.0.1", to)) else {
                        continue; // the client's connection is closed
                    };
                    let captured = captured.clone();
                    let (mut c_read, mut s_write) =
                        (client.try_clone().unwrap(), server.try_clone().unwrap());
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            match c_read.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    captured.lock().unwrap().extend_from_slice(&buf[..n]);
                                    if s_write.write_all(&buf[..n]).is_err() {
                                        break;
                                    }
                                }
                            }
                        }
                        let _ = s_write.shutdown(Shutdown::Write);
                    });
                    let (mut s_read, mut c_write) = (server, client);
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut s_read, &mut c_write);
                        let _ = c_write.shutdown(Shutdown::Write);
                    });
                }
            })
        };
        TapProxy {
            port,
            target,
            captured,
            stop,
            thread: Some(thread),
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Sends new connections to `target_port` (connections already open stay as they are).
    pub fn retarget(&self, target_port: u16) {
        self.target.store(target_port, Ordering::SeqCst);
    }

    /// Everything sent towards the target so far, as text (bodies are lossy).
    pub fn captured(&self) -> String {
        String::from_utf8_lossy(&self.captured.lock().unwrap()).into_owned()
    }

    /// The values of every `Authorization` header sent towards the target.
    pub fn authorizations(&self) -> Vec<String> {
        self.captured()
            .split("\r\n")
            .filter_map(|l| l.split_once(':'))
            .filter(|(k, _)| k.eq_ignore_ascii_case("authorization"))
            .map(|(_, v)| v.trim().to_owned())
            .collect()
    }
}

impl Drop for TapProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------------------
// A hung upstream: accepts connections and never answers.

pub struct HungListener {
    port: u16,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl HungListener {
    /// Listens on a port of its own, chosen at run time ([`HungListener::port`]).
    pub fn start() -> HungListener {
        Self::bind(0)
    }

    /// Binds `127.0.0.1:port` (retrying briefly while the old owner lets go of it). A port
    /// another process let go of may be taken by anyone: prefer [`HungListener::start`].
    pub fn bind(port: u16) -> HungListener {
        let deadline = Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match TcpListener::bind(("127.0.0.1", port)) {
                Ok(l) => break l,
                Err(e) => {
                    assert!(
                        Instant::now() < deadline,
                        "cannot bind the hung listener on {port}: {e}"
                    );
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        };
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let accepted = accepted.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut open = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((s, _)) => {
                            accepted.fetch_add(1, Ordering::SeqCst);
                            open.push(s); // kept open, never answered
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
            })
        };
        HungListener {
            port,
            accepted,
            stop,
            thread: Some(thread),
        }
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for HungListener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------------------
// berth

/// The port process `pid` accepts TCP connections on, once it listens: the LISTEN entry of
/// `/proc/<pid>/net/tcp` whose socket is one of the process's open files. `None` before it
/// listens; panics if it listens on more than one port.
pub fn listening_port(pid: u32) -> Option<u16> {
    let inodes: std::collections::HashSet<String> = fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()?
        .filter_map(|e| fs::read_link(e.ok()?.path()).ok())
        .filter_map(|target| {
            let t = target.to_str()?;
            Some(t.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
        })
        .collect();
    let table = fs::read_to_string(format!("/proc/{pid}/net/tcp")).ok()?;
    let mut ports: Vec<u16> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            // sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid
            // timeout inode ...; state 0A is LISTEN, addresses are hex IP:port.
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() > 9 && f[3] == "0A" && inodes.contains(f[9]) {
                u16::from_str_radix(f[1].split_once(':')?.1, 16).ok()
            } else {
                None
            }
        })
        .collect();
    ports.sort_unstable();
    ports.dedup();
    assert!(
        ports.len() <= 1,
        "process {pid} listens on several ports: {ports:?}"
    );
    ports.first().copied()
}

/// One `[[upstream]]` entry.
#[derive(Clone, Debug)]
pub struct Upstream {
    pub namespace: String,
    pub url: String,
    pub prefixes: Vec<String>,
    pub tag_ttl: String,
    pub connect_timeout: String,
    pub read_timeout: String,
    /// (username, name of the environment variable holding the password)
    pub credentials: Option<(String, String)>,
    /// Hosts besides the upstream's own that may receive the credentials as a token realm.
    pub token_hosts: Vec<String>,
    /// A PEM bundle of CAs to trust for this upstream.
    pub ca_file: Option<PathBuf>,
}

impl Upstream {
    pub fn new(namespace: &str, url: &str, prefixes: &[&str]) -> Upstream {
        Upstream {
            namespace: namespace.into(),
            url: url.into(),
            prefixes: prefixes.iter().map(|s| s.to_string()).collect(),
            tag_ttl: "5m".into(),
            connect_timeout: "1s".into(),
            read_timeout: "2s".into(),
            credentials: None,
            token_hosts: Vec::new(),
            ca_file: None,
        }
    }

    pub fn ca_file(mut self, path: &Path) -> Self {
        self.ca_file = Some(path.to_owned());
        self
    }

    /// Lets the credentials go to a token realm on `host` (`host:port`).
    pub fn token_host(mut self, host: &str) -> Self {
        self.token_hosts.push(host.into());
        self
    }

    pub fn tag_ttl(mut self, d: &str) -> Self {
        self.tag_ttl = d.into();
        self
    }

    pub fn read_timeout(mut self, d: &str) -> Self {
        self.read_timeout = d.into();
        self
    }

    pub fn credentials(mut self, user: &str, password_env: &str) -> Self {
        self.credentials = Some((user.into(), password_env.into()));
        self
    }
}

fn toml_str(s: &str) -> String {
    serde_json::to_string(s).unwrap() // a JSON string is a valid TOML basic string here
}

pub fn berth_config(upstreams: &[Upstream]) -> String {
    let mut out = String::new();
    for u in upstreams {
        out.push_str("[[upstream]]\n");
        out.push_str(&format!("namespace = {}\n", toml_str(&u.namespace)));
        out.push_str(&format!("url = {}\n", toml_str(&u.url)));
        let prefixes: Vec<String> = u.prefixes.iter().map(|p| toml_str(p)).collect();
        out.push_str(&format!("prefixes = [{}]\n", prefixes.join(", ")));
        out.push_str(&format!("tag_ttl = {}\n", toml_str(&u.tag_ttl)));
        out.push_str(&format!(
            "connect_timeout = {}\n",
            toml_str(&u.connect_timeout)
        ));
        out.push_str(&format!("read_timeout = {}\n", toml_str(&u.read_timeout)));
        if let Some((user, env)) = &u.credentials {
            out.push_str(&format!(
                "credentials = {{ username = {}, password_env = {} }}\n",
                toml_str(user),
                toml_str(env)
            ));
        }
        if !u.token_hosts.is_empty() {
            let hosts: Vec<String> = u.token_hosts.iter().map(|h| toml_str(h)).collect();
            out.push_str(&format!("token_hosts = [{}]\n", hosts.join(", ")));
        }
        if let Some(ca) = &u.ca_file {
            out.push_str(&format!("ca_file = {}\n", toml_str(&ca.to_string_lossy())));
        }
        out.push('\n');
    }
    out
}

/// The berth binary the tests run: this build's, or the one `BERTH_TEST_BINARY` names.
/// Pointing it at an older build shows which tests fail without a change.
pub fn berth_binary() -> PathBuf {
    match std::env::var_os("BERTH_TEST_BINARY") {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => PathBuf::from(env!("CARGO_BIN_EXE_berth")),
    }
}

/// The file, in berth's test directory, holding its clock offset in milliseconds.
const CLOCK_FILE: &str = "clock-offset-ms";

pub struct Berth {
    proc: ProcGuard,
    port: u16,
    log: PathBuf,
    pub client: reqwest::Client,
    /// Extra environment for every start (kept for restarts).
    env: Vec<(String, String)>,
    dir: TempDir,
}

impl Berth {
    pub async fn start(upstreams: &[Upstream]) -> Berth {
        Self::start_with_env(upstreams, &[]).await
    }

    pub async fn start_with_env(upstreams: &[Upstream], env: &[(&str, &str)]) -> Berth {
        Self::start_with_config(&berth_config(upstreams), env).await
    }

    /// Starts berth with the configuration file `config`.
    pub async fn start_with_config(config: &str, env: &[(&str, &str)]) -> Berth {
        Self::start_with_store(config, env, |_| {}).await
    }

    /// Starts berth with the configuration file `config`, after `prepare` has had the
    /// store directory's path (not yet created), for example to mount a small
    /// filesystem there.
    pub async fn start_with_store(
        config: &str,
        env: &[(&str, &str)],
        prepare: impl FnOnce(&Path),
    ) -> Berth {
        assert_loopback_only(config, "berth's test configuration");
        let dir = tempdir();
        prepare(&dir.path().join("store"));
        fs::write(dir.path().join("berth.toml"), config).unwrap();
        let log = dir.path().join("berth.log");
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(64)
            // A TLS berth's test certificate (its tests check the chain themselves).
            .danger_accept_invalid_certs(true)
            .build()
            .unwrap();
        let (proc, port) = Self::spawn(dir.path(), &log, &env, &client).await;
        Berth {
            proc,
            port,
            log,
            client,
            env,
            dir,
        }
    }

    /// Starts the berth binary with the configuration and store under `dir`, listening on
    /// `127.0.0.1:0` (the kernel picks the port, so no other process can hold it), learns
    /// the port it got from `/proc`, and waits until `/v2/` answers 200 (or 401).
    async fn spawn(
        dir: &Path,
        log: &Path,
        env: &[(String, String)],
        client: &reqwest::Client,
    ) -> (ProcGuard, u16) {
        let config = dir.join("berth.toml");
        let store = dir.join("store");
        let deadline = Instant::now() + READY_TIMEOUT;
        let logf = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let mut cmd = Command::new(berth_binary());
        cmd.arg("serve")
            .arg("--config")
            .arg(&config)
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--store")
            .arg(&store)
            .env_remove("BERTH_CONFIG")
            .env_remove("BERTH_LISTEN")
            .env_remove("BERTH_STORE")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(logf.try_clone().unwrap())
            .stderr(logf);
        // berth's clock follows this file (see `Berth::advance_clock`).
        cmd.env("BERTH_TEST_CLOCK_FILE", dir.join(CLOCK_FILE));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let log_start = fs::metadata(log).map(|m| m.len()).unwrap_or(0) as usize;
        let child = cmd.spawn().expect("start berth");
        let mut proc = ProcGuard::new("berth", child, Some(log.to_owned()));
        let pid = proc.pid().unwrap();
        let scheme = if fs::read_to_string(&config).is_ok_and(|c| c.contains("tls = {")) {
            "https"
        } else {
            "http"
        };
        let mut port = None;
        loop {
            if let Some(status) = proc.exited() {
                let text = fs::read(log).unwrap_or_default();
                let text = String::from_utf8_lossy(&text[log_start.min(text.len())..]).into_owned();
                panic!("berth exited ({status}) while starting:\n{text}");
            }
            if port.is_none() {
                port = listening_port(pid);
            }
            if let Some(port) = port {
                if let Ok(r) = client
                    .get(format!("{scheme}://127.0.0.1:{port}/v2/"))
                    .send()
                    .await
                {
                    // 401: serving, and asking for credentials.
                    if matches!(r.status().as_u16(), 200 | 401) {
                        return (proc, port);
                    }
                }
            }
            if Instant::now() > deadline {
                panic!(
                    "berth did not become ready (listening port: {port:?}):\n{}",
                    tail(log, 100)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops berth with SIGTERM and waits (bounded) for it to exit; panics if it does not
    /// exit or exits unsuccessfully.
    pub async fn stop(&mut self) {
        let pid = self.pid();
        let status = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM {pid} failed");
        let deadline = Instant::now() + Duration::from_secs(20);
        let exit = loop {
            if let Some(s) = self.exited() {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "berth did not exit after SIGTERM:\n{}",
                tail(&self.log, 40)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(exit.success(), "berth exited with {exit} after SIGTERM");
        self.proc.kill(); // reaps it
    }

    /// Kills berth at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// Starts berth again, after [`Berth::stop`] or [`Berth::kill`], with the same
    /// configuration, environment and store directory (on a new port).
    pub async fn restart(&mut self) {
        assert!(
            self.proc.child.is_none() || self.proc.exited().is_some(),
            "restart: berth is still running"
        );
        self.proc.kill();
        let (proc, port) = Self::spawn(self.dir.path(), &self.log, &self.env, &self.client).await;
        self.proc = proc;
        self.port = port;
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid().expect("berth is running")
    }

    /// `Some(status)` once berth has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.proc.exited()
    }

    /// `127.0.0.1:PORT`, the registry host clients use.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// berth's log, without terminal colour codes.
    pub fn log(&self) -> String {
        strip_ansi(&fs::read_to_string(&self.log).unwrap_or_default())
    }

    /// The length in bytes of berth's log so far (a mark for [`Berth::log_since`]).
    pub fn log_len(&self) -> usize {
        fs::metadata(&self.log)
            .map(|m| m.len() as usize)
            .unwrap_or(0)
    }

    /// berth's log after the mark `offset` (from [`Berth::log_len`]), without colour codes.
    pub fn log_since(&self, offset: usize) -> String {
        let b = fs::read(&self.log).unwrap_or_default();
        strip_ansi(&String::from_utf8_lossy(&b[offset.min(b.len())..]))
    }

    /// berth's configuration file.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("berth.toml")
    }

    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    /// Moves berth's clock (the one tag TTLs, revalidation backoff, and token and API key
    /// expiry are judged by) `by` forward, through its `BERTH_TEST_CLOCK_FILE` testing
    /// hook, and waits (bounded) until berth has logged that it adopted the new offset.
    /// The offset is kept across restarts.
    pub async fn advance_clock(&self, by: Duration) {
        assert!(
            !by.is_zero(),
            "advance_clock: a zero step would never be logged"
        );
        let file = self.dir.path().join(CLOCK_FILE);
        let now: u64 = fs::read_to_string(&file)
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0);
        let next = now + u64::try_from(by.as_millis()).unwrap();
        let mark = self.log_len();
        // Written whole, then renamed: berth never reads half a number.
        let tmp = file.with_extension("tmp");
        fs::write(&tmp, next.to_string()).unwrap();
        fs::rename(&tmp, &file).unwrap();
        let adopted = format!("offset_ms={next}");
        let deadline = Instant::now() + READY_TIMEOUT;
        while !self.log_since(mark).contains(&adopted) {
            assert!(
                Instant::now() < deadline,
                "berth never adopted the test clock offset {next} ms:\n{}",
                tail(&self.log, 40)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn get(&self, path: &str, headers: &[(&str, &str)]) -> reqwest::Response {
        self.request(reqwest::Method::GET, path, headers).await
    }

    pub async fn head(&self, path: &str, headers: &[(&str, &str)]) -> reqwest::Response {
        self.request(reqwest::Method::HEAD, path, headers).await
    }

    pub async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        headers: &[(&str, &str)],
    ) -> reqwest::Response {
        let mut rb = self
            .client
            .request(method.clone(), format!("{}{path}", self.url()));
        for (k, v) in headers {
            rb = rb.header(*k, *v);
        }
        match rb.send().await {
            Ok(r) => r,
            Err(e) => panic!(
                "{method} {path} to berth failed: {e}\nberth log:\n{}",
                tail(&self.log, 40)
            ),
        }
    }

    /// GETs `path` and returns (status, headers, body).
    pub async fn fetch(
        &self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (u16, reqwest::header::HeaderMap, Bytes) {
        let r = self.get(path, headers).await;
        let status = r.status().as_u16();
        let h = r.headers().clone();
        let body = r
            .bytes()
            .await
            .unwrap_or_else(|e| panic!("body of GET {path}: {e}"));
        (status, h, body)
    }
}

/// Fetches `tag` of `/v2/<ns>/<repo>` through berth, then every child manifest and blob,
/// and checks each is byte-identical to `index`. `extra` headers go with every request.
pub async fn pull_index_through(
    berth: &Berth,
    ns: &str,
    repo: &str,
    tag: &str,
    index: &Index,
    extra: &[(&str, &str)],
) {
    let mut h: Vec<(&str, &str)> = vec![("Accept", ACCEPT_ALL)];
    h.extend_from_slice(extra);
    let path = format!("/v2/{ns}/{repo}/manifests/{tag}");
    let (status, headers, body) = berth.fetch(&path, &h).await;
    assert_eq!(
        status,
        200,
        "GET {path}: {}",
        String::from_utf8_lossy(&body)
    );
    assert_eq!(body, index.bytes, "GET {path}: the index bytes differ");
    assert_eq!(
        header_str(&headers, "docker-content-digest"),
        Some(index.digest.as_str())
    );
    assert_eq!(header_str(&headers, "content-type"), Some(OCI_INDEX));
    for image in &index.images {
        let path = format!("/v2/{ns}/{repo}/manifests/{}", image.digest);
        let (status, _, body) = berth.fetch(&path, &h).await;
        assert_eq!(
            status,
            200,
            "GET {path}: {}",
            String::from_utf8_lossy(&body)
        );
        assert_eq!(body, image.manifest, "GET {path}");
    }
    for blob in index.blobs() {
        let path = format!("/v2/{ns}/{repo}/blobs/{}", blob.digest);
        let (status, _, body) = berth.fetch(&path, extra).await;
        assert_eq!(
            status,
            200,
            "GET {path}: {}",
            String::from_utf8_lossy(&body[..body.len().min(500)])
        );
        assert_eq!(body.len(), blob.bytes.len(), "GET {path}: length");
        assert_eq!(digest_of(&body), blob.digest, "GET {path}: content");
    }
}

/// Removes ANSI escape sequences (`ESC [ ... letter`).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Sends `request` (a complete HTTP/1.1 request head; use `Connection: close`) to
/// `127.0.0.1:port` over a plain TCP connection and returns the response head and every
/// byte that followed it until the server closed the connection (or nothing more arrived
/// for 2 s). For checking what a server really wrote, e.g. that a HEAD had no body.
pub async fn raw_http(port: u16, request: &str) -> (String, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut sock = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect for a raw request");
    sock.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let idle = if buf.windows(4).any(|w| w == b"\r\n\r\n") {
            Duration::from_secs(2)
        } else {
            Duration::from_secs(20)
        };
        match tokio::time::timeout(idle, sock.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
        if Instant::now() > deadline {
            break;
        }
    }
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| {
            panic!(
                "no complete response head: {:?}",
                String::from_utf8_lossy(&buf)
            )
        });
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    (head, buf[end + 4..].to_vec())
}

/// The value of header `name` in a raw response head.
pub fn raw_header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.split("\r\n")
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim())
}

/// Parses an OCI error body and returns its first error's code and message; panics with
/// `what` if the body is not one.
pub fn oci_error(body: &[u8], what: &str) -> (String, String) {
    let text = String::from_utf8_lossy(body);
    let v: serde_json::Value = serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("{what}: the body is not JSON ({e}): {text}"));
    let e = &v["errors"][0];
    let code = e["code"]
        .as_str()
        .unwrap_or_else(|| panic!("{what}: no errors[0].code in {text}"));
    let message = e["message"]
        .as_str()
        .unwrap_or_else(|| panic!("{what}: no errors[0].message in {text}"));
    (code.to_owned(), message.to_owned())
}

pub fn header_str<'a>(h: &'a reqwest::header::HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

// ---------------------------------------------------------------------------------------
// skopeo

/// `skopeo copy docker://<src> dir:<dest>` over plain HTTP, anonymously, keeping digests.
/// Copies `src` (with `--all` if asked) into a skopeo `dir:` layout; panics with skopeo's
/// output if it fails.
pub async fn skopeo_copy(src: &str, dest: &Path, all: bool) {
    skopeo(
        &format!("docker://{src}"),
        &format!("dir:{}", dest.display()),
        all,
    )
    .await;
}

/// `skopeo copy` from `src` to `dest` (any transports), anonymous and over plain HTTP,
/// keeping digests; asserts that it succeeded.
pub async fn skopeo(src: &str, dest: &str, all: bool) {
    skopeo_with(
        src,
        dest,
        if all {
            &["--all", "--src-no-creds", "--dest-no-creds"]
        } else {
            &["--src-no-creds", "--dest-no-creds"]
        },
    )
    .await;
}

/// `skopeo copy` over plain HTTP keeping digests, with `extra` options (credentials).
pub async fn skopeo_with(src: &str, dest: &str, extra: &[&str]) {
    require_tool("skopeo");
    let mut cmd = tokio::process::Command::new("skopeo");
    cmd.args([
        "--insecure-policy",
        "copy",
        "--retry-times",
        "0",
        "--preserve-digests",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
    ]);
    cmd.args(extra);
    cmd.arg(src)
        .arg(dest)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = within(180, &format!("skopeo copy {src} {dest}"), cmd.output())
        .await
        .expect("run skopeo");
    assert!(
        out.status.success(),
        "skopeo copy {src} {dest} failed:\n{}",
        output_text(&out)
    );
}

/// Checks an OCI image layout written by skopeo: its index names `top` (by digest), and
/// `top`, every one of `children` and every one of `blobs` is in `blobs/` byte for byte.
pub fn assert_oci_layout(dir: &Path, top: &Bytes, children: &[&Image], blobs: &[&Blob]) {
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.join("index.json")).expect("index.json")).unwrap();
    let top_digest = digest_of(top);
    assert!(
        index["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["digest"] == top_digest.as_str()),
        "the layout's index.json does not name {top_digest}: {index}"
    );
    let blob_path = |digest: &str| {
        dir.join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"))
    };
    let read = |digest: &str| {
        fs::read(blob_path(digest))
            .unwrap_or_else(|e| panic!("{digest} missing from the layout: {e}"))
    };
    assert_eq!(
        Bytes::from(read(&top_digest)),
        *top,
        "the top manifest's bytes"
    );
    for child in children {
        assert_eq!(
            Bytes::from(read(&child.digest)),
            child.manifest,
            "{}",
            child.digest
        );
    }
    for blob in blobs {
        assert_eq!(digest_of(&read(&blob.digest)), blob.digest);
    }
}

/// Checks a skopeo `dir:` copy: `manifest.json` is `top`, each `<hex>.manifest.json` is
/// one of `children`, and every blob file is exactly one of `blobs`, all present.
pub fn assert_skopeo_dir(dir: &Path, top: &Bytes, children: &[&Image], blobs: &[&Blob]) {
    let top_got = fs::read(dir.join("manifest.json")).expect("manifest.json");
    assert_eq!(
        digest_of(&top_got),
        digest_of(top),
        "skopeo's manifest.json is not the pushed manifest"
    );
    for child in children {
        let p = dir.join(format!(
            "{}.manifest.json",
            child.digest.trim_start_matches("sha256:")
        ));
        let got = fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert_eq!(Bytes::from(got), child.manifest, "{}", p.display());
    }
    for blob in blobs {
        let p = dir.join(blob.hex());
        let got = fs::read(&p)
            .unwrap_or_else(|e| panic!("blob {} missing from the copy: {e}", blob.digest));
        assert_eq!(got.len(), blob.bytes.len(), "{}", p.display());
        assert_eq!(digest_of(&got), blob.digest, "{}", p.display());
    }
    // And nothing unexpected: every file named by a digest hashes to its name.
    for entry in fs::read_dir(dir).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        let hexname = name.trim_end_matches(".manifest.json");
        if hexname.len() == 64 && hexname.chars().all(|c| c.is_ascii_hexdigit()) {
            let got = fs::read(dir.join(&name)).unwrap();
            assert_eq!(
                sha256_hex(&got),
                hexname,
                "{name} does not hash to its name"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// containerd

pub struct Containerd {
    proc: ProcGuard,
    sock: PathBuf,
    dir: TempDir,
}

impl Containerd {
    pub async fn start() -> Containerd {
        require_tool("containerd");
        require_tool("ctr");
        let dir = tempdir();
        let d = dir.path();
        let sock = d.join("containerd.sock");
        assert!(
            sock.as_os_str().len() < 100,
            "socket path too long: {}",
            sock.display()
        );
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = [
  "io.containerd.grpc.v1.cri",
  "io.containerd.internal.v1.opt",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
]
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[plugins."io.containerd.metadata.v1.bolt"]
  content_sharing_policy = "isolated"
"#,
            root = d.join("root").display(),
            state = d.join("state").display(),
            sock = sock.display(),
        );
        let cfg = d.join("config.toml");
        fs::write(&cfg, config).unwrap();
        let log = d.join("containerd.log");
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(fs::File::create(&log).unwrap())
            .stderr(fs::OpenOptions::new().append(true).open(&log).unwrap())
            .spawn()
            .expect("start containerd");
        let mut proc = ProcGuard::new("containerd", child, Some(log.clone()));
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let out = tokio::process::Command::new("ctr")
                .arg("--address")
                .arg(&sock)
                .arg("version")
                .output()
                .await
                .expect("run ctr version");
            if out.status.success() {
                break;
            }
            if let Some(status) = proc.exited() {
                panic!("containerd exited ({status}):\n{}", tail(&log, 50));
            }
            assert!(
                Instant::now() < deadline,
                "containerd did not start:\n{}",
                tail(&log, 50)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Containerd { proc, sock, dir }
    }

    /// Writes `<dir>/hosts/<registry>/hosts.toml` sending each registry to `mirror`;
    /// returns the hosts directory.
    pub fn hosts_dir(&self, mirror: &str, registries: &[(&str, &str)]) -> PathBuf {
        let hosts = self.dir.path().join("hosts");
        assert_loopback_only(mirror, "the containerd mirror");
        for (registry, server) in registries {
            assert_loopback_only(server, "a containerd fallback server");
            let d = hosts.join(registry);
            fs::create_dir_all(&d).unwrap();
            fs::write(
                d.join("hosts.toml"),
                format!("server = \"{server}\"\n\n[host.\"{mirror}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"),
            )
            .unwrap();
        }
        hosts
    }

    /// Runs `ctr --address SOCK -n NS <args>`.
    pub async fn ctr(&self, namespace: &str, args: &[&str]) -> std::process::Output {
        let mut cmd = tokio::process::Command::new("ctr");
        cmd.arg("--address")
            .arg(&self.sock)
            .args(["-n", namespace])
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        within(180, &format!("ctr {args:?}"), cmd.output())
            .await
            .expect("run ctr")
    }

    /// `ctr images pull --hosts-dir HOSTS <image>` (native snapshotter: no mounts).
    pub async fn pull(&self, namespace: &str, image: &str, hosts: &Path) -> std::process::Output {
        let hosts = hosts.display().to_string();
        self.ctr(
            namespace,
            &[
                "images",
                "pull",
                "--snapshotter",
                "native",
                "--hosts-dir",
                &hosts,
                image,
            ],
        )
        .await
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.proc.kill();
    }
}

pub fn output_text(o: &std::process::Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs openssl with `args` in `dir`.
pub fn openssl(dir: &Path, args: &[&str]) {
    require_tool("openssl");
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        output_text(&out)
    );
}

/// A test certificate authority (`ca.pem`, `ca.key`) and a server certificate it signed
/// for `127.0.0.1` (`server.pem`, `server.key`), valid for two days.
pub fn test_pki() -> TempDir {
    let pki = tempdir();
    let d = pki.path();
    let subj_ca = "/CN=berth test CA";
    openssl(
        d,
        &[
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
            "-days", "2", "-subj", subj_ca,
        ],
    );
    openssl(
        d,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    );
    fs::write(
        d.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        d,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ],
    );
    pki
}
