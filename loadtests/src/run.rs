//! Running a load: the workers, their bounds, and each mode's unit of work.

use std::collections::HashSet;
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::{self, StreamExt};

use crate::accesslog::LogTail;
use crate::digest::Digest;
use crate::h1;
use crate::http::{self, ClientOptions, Expect};
use crate::metrics::{self, UpstreamCounters};
use crate::oci::{self, Parsed, Platform, ACCEPT_MANIFESTS};
use crate::report::{ColdClient, ColdReport, Report, UpstreamReport};
use crate::stats::{ErrorKind, Kind, Recorder, Stats, UnitOutcome};

/// The registry: its base URL and, optionally, the containerd namespace (`?ns=`)
/// appended to every request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    base: String,
    ns: Option<String>,
}

impl Target {
    pub fn new(registry: &str, ns: Option<String>) -> Result<Target, String> {
        let url = reqwest::Url::parse(registry)
            .map_err(|e| format!("--registry {registry:?} is not a URL: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!("--registry {registry:?}: use http:// or https://"));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(format!(
                "--registry {registry:?}: no query or fragment (use --ns)"
            ));
        }
        if ns.as_deref().is_some_and(|n| {
            n.is_empty()
                || !n
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-_:".contains(&b))
        }) {
            return Err(format!("--ns {ns:?}: not a registry host name"));
        }
        Ok(Target {
            base: registry.trim_end_matches('/').to_owned(),
            ns,
        })
    }

    fn with_ns(&self, mut url: String) -> String {
        if let Some(ns) = &self.ns {
            url.push_str("?ns=");
            url.push_str(ns);
        }
        url
    }

    pub fn manifest_url(&self, repo: &str, reference: &str) -> String {
        self.with_ns(format!("{}/v2/{repo}/manifests/{reference}", self.base))
    }

    pub fn blob_url(&self, repo: &str, digest: &Digest) -> String {
        self.with_ns(format!("{}/v2/{repo}/blobs/{digest}", self.base))
    }
}

/// A manifest reference: a tag or a digest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reference {
    Tag(String),
    Digest(Digest),
}

impl Reference {
    pub fn parse(s: &str) -> Result<Reference, String> {
        if crate::digest::is_digest_reference(s) {
            return Digest::parse(s)
                .map(Reference::Digest)
                .map_err(|e| e.to_string());
        }
        let valid = !s.is_empty()
            && s.len() <= 128
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
            && !s.starts_with(['.', '-']);
        if valid {
            Ok(Reference::Tag(s.to_owned()))
        } else {
            Err(format!("{s:?} is neither a tag nor a digest"))
        }
    }

    /// The kind of a request for this reference.
    pub fn kind(&self) -> Kind {
        match self {
            Reference::Tag(_) => Kind::TagManifest,
            Reference::Digest(_) => Kind::Manifest,
        }
    }

    /// What the body must hash to.
    pub fn expect(&self) -> Expect {
        match self {
            Reference::Tag(_) => Expect::HeaderDigest,
            Reference::Digest(d) => Expect::Digest(d.clone()),
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => f.write_str(t),
            Reference::Digest(d) => d.fmt(f),
        }
    }
}

/// Splits `REPO:TAG`, `REPO@DIGEST` or `REPO` (tag `latest`).
pub fn split_image(image: &str) -> Result<(String, Reference), String> {
    let (repo, reference) = if let Some((repo, digest)) = image.split_once('@') {
        (repo, digest)
    } else {
        let last_segment = image.rfind('/').map_or(0, |i| i + 1);
        match image[last_segment..].rfind(':') {
            Some(i) => (&image[..last_segment + i], &image[last_segment + i + 1..]),
            None => (image, "latest"),
        }
    };
    let valid_repo = !repo.is_empty()
        && repo.split('/').all(|seg| {
            !seg.is_empty()
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-:".contains(&b))
        });
    if !valid_repo {
        return Err(format!("--image {image:?}: invalid repository {repo:?}"));
    }
    let reference = Reference::parse(reference).map_err(|e| format!("--image {image:?}: {e}"))?;
    Ok((repo.to_owned(), reference))
}

/// What to load.
#[derive(Clone, Debug)]
pub enum Mode {
    /// Whole pulls: the tag (or digest), the platform's manifest if it is an index, then
    /// the config and every layer.
    Pull {
        repo: String,
        reference: Reference,
        platform: Platform,
        /// Blobs of one pull fetched at once (containerd's default is 3).
        layer_concurrency: usize,
    },
    /// One blob, over and over; `verify` hashes every body (otherwise the bytes are
    /// only counted).
    Blob {
        repo: String,
        digest: Digest,
        verify: bool,
    },
    /// One manifest, by tag or by digest, over and over; `verify` hashes every body.
    /// Over plain HTTP each worker keeps one connection of [`crate::h1`]'s lean client.
    Manifests {
        repo: String,
        reference: Reference,
        verify: bool,
    },
    /// `clients` clients released at the same instant, each GETting the blob once.
    Cold {
        repo: String,
        digest: Digest,
        clients: usize,
    },
}

impl Mode {
    pub fn name(&self) -> &'static str {
        match self {
            Mode::Pull { .. } => "pull",
            Mode::Blob { .. } => "blob",
            Mode::Manifests { .. } => "manifests",
            Mode::Cold { .. } => "cold",
        }
    }

    /// What one unit of work is called in the report.
    pub fn unit_name(&self) -> &'static str {
        match self {
            Mode::Pull { .. } => "pull",
            Mode::Blob { .. } => "blob_get",
            Mode::Manifests { .. } => "manifest_get",
            Mode::Cold { .. } => "client",
        }
    }
}

/// A whole run's settings.
#[derive(Clone, Debug)]
pub struct Config {
    pub target: Target,
    pub mode: Mode,
    /// Concurrent workers (ignored by `cold`, which has one per client).
    pub concurrency: usize,
    /// At most this many units (pulls, requests) are started.
    pub count: u64,
    /// No unit is started after this long.
    pub duration: Duration,
    /// Units still running this long after `duration` are cancelled.
    pub grace: Duration,
    pub client: ClientOptions,
    /// A test upstream's access log to count upstream requests and bytes from.
    pub upstream_log: Option<PathBuf>,
    /// berth's `/metrics` URL, to read its upstream counters from.
    pub metrics_url: Option<String>,
    /// How long to wait after the run for logs and counters to settle.
    pub settle: Duration,
}

impl Config {
    /// A config with the defaults of the command line for everything but the target and
    /// the mode.
    pub fn new(target: Target, mode: Mode) -> Config {
        Config {
            target,
            mode,
            concurrency: 8,
            count: 100,
            duration: Duration::from_secs(60),
            grace: Duration::from_secs(10),
            client: ClientOptions {
                pool: 8,
                connect_timeout: Duration::from_secs(10),
                read_timeout: Duration::from_secs(30),
                insecure: false,
            },
            upstream_log: None,
            metrics_url: None,
            settle: Duration::from_millis(500),
        }
    }

    /// The URL the mode starts from, for the report.
    pub fn target_url(&self) -> String {
        match &self.mode {
            Mode::Pull {
                repo, reference, ..
            }
            | Mode::Manifests {
                repo, reference, ..
            } => self.target.manifest_url(repo, &reference.to_string()),
            Mode::Blob { repo, digest, .. } | Mode::Cold { repo, digest, .. } => {
                self.target.blob_url(repo, digest)
            }
        }
    }
}

/// Hands out units until the count is used up or the deadline has passed.
struct Limits {
    count: u64,
    issued: AtomicU64,
    deadline: Instant,
    hard_deadline: tokio::time::Instant,
}

impl Limits {
    fn take(&self) -> bool {
        Instant::now() < self.deadline && self.issued.fetch_add(1, Ordering::Relaxed) < self.count
    }
}

struct Shared {
    http: reqwest::Client,
    config: Config,
    limits: Limits,
}

/// Runs the load `config` describes and reports on it.
pub async fn run(config: &Config) -> Result<Report, String> {
    let mut client_opts = config.client.clone();
    client_opts.pool = client_opts.pool.max(config.concurrency);
    let http = http::client(&client_opts)?;

    let log_tail = match &config.upstream_log {
        Some(path) => Some(
            LogTail::begin(path).map_err(|e| format!("--upstream-log {}: {e}", path.display()))?,
        ),
        None => None,
    };
    let metrics_before = match &config.metrics_url {
        Some(url) => Some(metrics::scrape(&http, url).await),
        None => None,
    };

    let started = Instant::now();
    let (stats, cold) = match &config.mode {
        Mode::Cold {
            repo,
            digest,
            clients,
        } => {
            let (stats, cold) = run_cold(config, &client_opts, repo, digest, *clients).await?;
            (stats, Some(cold))
        }
        _ => (run_workers(config, http.clone(), started).await, None),
    };
    let elapsed = started.elapsed();

    let upstream = if log_tail.is_some() || metrics_before.is_some() {
        tokio::time::sleep(config.settle).await;
        let mut up = UpstreamReport::default();
        if let Some(tail) = &log_tail {
            match tail.read() {
                Ok(totals) => up.access_log = Some(totals),
                Err(e) => up.notes.push(format!("reading the upstream log: {e}")),
            }
        }
        if let (Some(url), Some(before)) = (&config.metrics_url, metrics_before) {
            let after = metrics::scrape(&http, url).await;
            match (before, after) {
                (Ok(before), Ok(after)) => {
                    up.metrics = Some(UpstreamCounters::delta(&before, &after));
                }
                (Err(e), _) | (_, Err(e)) => up.notes.push(e),
            }
        }
        Some(up)
    } else {
        None
    };

    Ok(Report::build(config, stats, elapsed, upstream, cold))
}

async fn run_workers(config: &Config, http: reqwest::Client, started: Instant) -> Stats {
    let deadline = started + config.duration;
    let shared = Arc::new(Shared {
        http,
        config: config.clone(),
        limits: Limits {
            count: config.count,
            issued: AtomicU64::new(0),
            deadline,
            hard_deadline: tokio::time::Instant::from_std(deadline + config.grace),
        },
    });
    let workers: Vec<_> = (0..config.concurrency.max(1))
        .map(|_| {
            let shared = Arc::clone(&shared);
            tokio::spawn(async move {
                let rec = Recorder::default();
                worker(&shared, &rec).await;
                rec.into_stats()
            })
        })
        .collect();
    let mut stats = Stats::default();
    for w in workers {
        match w.await {
            Ok(s) => stats.merge(s),
            Err(e) => eprintln!("berth-load: a worker failed: {e}"),
        }
    }
    stats
}

/// What a manifest body must hash to, if it is verified.
fn manifest_expect(reference: &Reference, verify: bool) -> Expect {
    if verify {
        reference.expect()
    } else {
        Expect::Nothing
    }
}

async fn worker(shared: &Shared, rec: &Recorder) {
    if let Mode::Manifests {
        repo,
        reference,
        verify,
    } = &shared.config.mode
    {
        let url = shared
            .config
            .target
            .manifest_url(repo, &reference.to_string());
        if let Some(endpoint) = h1::Endpoint::new(&url, ACCEPT_MANIFESTS) {
            let mut conn = h1::Connection::new(endpoint, shared.config.client.connect_timeout);
            let (kind, expect) = (reference.kind(), manifest_expect(reference, *verify));
            let all = async {
                while shared.limits.take() {
                    let ok = conn.fetch(rec, kind, &expect).await;
                    rec.unit(if ok {
                        UnitOutcome::Ok
                    } else {
                        UnitOutcome::Failed
                    });
                }
            };
            if tokio::time::timeout_at(shared.limits.hard_deadline, all)
                .await
                .is_err()
            {
                rec.unit(UnitOutcome::Cancelled);
            }
            return;
        }
    }
    while shared.limits.take() {
        let unit = unit(shared, rec);
        match tokio::time::timeout_at(shared.limits.hard_deadline, unit).await {
            Ok(true) => rec.unit(UnitOutcome::Ok),
            Ok(false) => rec.unit(UnitOutcome::Failed),
            Err(_) => {
                rec.unit(UnitOutcome::Cancelled);
                break;
            }
        }
    }
}

/// One unit of work; true if it succeeded.
async fn unit(shared: &Shared, rec: &Recorder) -> bool {
    let target = &shared.config.target;
    match &shared.config.mode {
        Mode::Pull {
            repo,
            reference,
            platform,
            layer_concurrency,
        } => {
            pull(
                &shared.http,
                rec,
                target,
                repo,
                reference,
                platform,
                *layer_concurrency,
            )
            .await
        }
        Mode::Blob {
            repo,
            digest,
            verify,
        } => http::fetch(
            &shared.http,
            rec,
            &target.blob_url(repo, digest),
            Kind::Blob,
            None,
            &if *verify {
                Expect::Digest(digest.clone())
            } else {
                Expect::Nothing
            },
            false,
        )
        .await
        .is_ok(),
        Mode::Manifests {
            repo,
            reference,
            verify,
        } => http::fetch(
            &shared.http,
            rec,
            &target.manifest_url(repo, &reference.to_string()),
            reference.kind(),
            Some(ACCEPT_MANIFESTS),
            &manifest_expect(reference, *verify),
            false,
        )
        .await
        .is_ok(),
        // Cold runs have their own driver.
        Mode::Cold { .. } => false,
    }
}

/// One pull, as a node would do it. Every body is verified; the pull fails if any
/// request fails, any digest does not match, or the manifests are unusable.
pub async fn pull(
    client: &reqwest::Client,
    rec: &Recorder,
    target: &Target,
    repo: &str,
    reference: &Reference,
    platform: &Platform,
    layer_concurrency: usize,
) -> bool {
    let Ok(top) = http::fetch(
        client,
        rec,
        &target.manifest_url(repo, &reference.to_string()),
        reference.kind(),
        Some(ACCEPT_MANIFESTS),
        &reference.expect(),
        true,
    )
    .await
    else {
        return false;
    };
    let body = top.body.unwrap_or_default();
    let (config, layers) = match oci::parse(top.content_type.as_deref(), &body) {
        Ok(Parsed::Manifest { config, layers }) => (config, layers),
        Ok(Parsed::Index(entries)) => {
            let Some(digest) = oci::select(&entries, platform) else {
                rec.error(ErrorKind::PlatformNotFound);
                return false;
            };
            let Ok(m) = http::fetch(
                client,
                rec,
                &target.manifest_url(repo, &digest.to_string()),
                Kind::Manifest,
                Some(ACCEPT_MANIFESTS),
                &Expect::Digest(digest.clone()),
                true,
            )
            .await
            else {
                return false;
            };
            match oci::parse(m.content_type.as_deref(), &m.body.unwrap_or_default()) {
                Ok(Parsed::Manifest { config, layers }) => (config, layers),
                Ok(Parsed::Index(_)) | Err(_) => {
                    rec.error(ErrorKind::ManifestInvalid);
                    return false;
                }
            }
        }
        Err(_) => {
            rec.error(ErrorKind::ManifestInvalid);
            return false;
        }
    };
    // The config and each distinct layer, once.
    let mut seen = HashSet::new();
    let blobs: Vec<Digest> = std::iter::once(config)
        .chain(layers)
        .filter(|d| seen.insert(d.to_string()))
        .collect();
    let results: Vec<bool> = stream::iter(blobs)
        .map(move |digest: Digest| async move {
            let url = target.blob_url(repo, &digest);
            let expect = Expect::Digest(digest);
            http::fetch(client, rec, &url, Kind::Blob, None, &expect, false)
                .await
                .is_ok()
        })
        .buffer_unordered(layer_concurrency.max(1))
        .collect()
        .await;
    results.into_iter().all(|ok| ok)
}

async fn run_cold(
    config: &Config,
    client_opts: &ClientOptions,
    repo: &str,
    digest: &Digest,
    clients: usize,
) -> Result<(Stats, ColdReport), String> {
    let clients = clients.max(1);
    let barrier = Arc::new(tokio::sync::Barrier::new(clients));
    let url = Arc::new(config.target.blob_url(repo, digest));
    let expect = Arc::new(Expect::Digest(digest.clone()));
    let hard_deadline = tokio::time::Instant::now() + config.duration;
    let one = ClientOptions {
        pool: 1,
        ..client_opts.clone()
    };
    // Every client is a node of its own: its own HTTP client and connection.
    let mut tasks = Vec::with_capacity(clients);
    for _ in 0..clients {
        let http = http::client(&one)?;
        let (barrier, url, expect) = (Arc::clone(&barrier), Arc::clone(&url), Arc::clone(&expect));
        tasks.push(tokio::spawn(async move {
            let rec = Recorder::default();
            barrier.wait().await;
            let released = Instant::now();
            let fetch = http::fetch(&http, &rec, &url, Kind::Blob, None, &expect, false);
            let result = tokio::time::timeout_at(hard_deadline, fetch).await;
            let finished = Instant::now();
            let outcome = match &result {
                Ok(Ok(_)) => UnitOutcome::Ok,
                Ok(Err(_)) => UnitOutcome::Failed,
                Err(_) => UnitOutcome::Cancelled,
            };
            rec.unit(outcome);
            let error = match result {
                Ok(Ok(_)) => None,
                Ok(Err(kind)) => Some(kind.as_str()),
                Err(_) => Some("cancelled"),
            };
            let ttfb = match &result {
                Ok(Ok(f)) => Some(f.ttfb),
                _ => None,
            };
            (rec.into_stats(), released, finished, ttfb, error)
        }));
    }
    let mut stats = Stats::default();
    let mut ends = Vec::with_capacity(clients);
    for (i, task) in tasks.into_iter().enumerate() {
        let (s, released, finished, ttfb, error) = task
            .await
            .map_err(|e| format!("cold client {i} failed: {e}"))?;
        ends.push((i, s.bytes, released, finished, ttfb, error));
        stats.merge(s);
    }
    let t0 = ends.iter().map(|e| e.2).min().unwrap_or_else(Instant::now);
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let clients: Vec<ColdClient> = ends
        .into_iter()
        .map(
            |(client, bytes, released, finished, ttfb, error)| ColdClient {
                client,
                ok: error.is_none(),
                error,
                bytes,
                start_ms: ms(released - t0),
                ttfb_ms: ttfb.map(|t| ms(released - t0 + t)),
                total_ms: ms(finished - t0),
            },
        )
        .collect();
    let finished = clients.iter().filter(|c| c.ok).map(|c| c.total_ms);
    let first = finished
        .clone()
        .fold(None, |m: Option<f64>, t| Some(m.map_or(t, |m| m.min(t))));
    let all = clients.iter().map(|c| c.total_ms).fold(0.0, f64::max);
    Ok((
        stats,
        ColdReport {
            clients,
            first_finished_ms: first,
            all_finished_ms: all,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let d = Digest::sha256_of(b"x");
        let t = Target::new("http://127.0.0.1:5000/", None).unwrap();
        assert_eq!(
            t.manifest_url("docker.io/library/app", "latest"),
            "http://127.0.0.1:5000/v2/docker.io/library/app/manifests/latest"
        );
        let t = Target::new("http://127.0.0.1:5000", Some("docker.io".into())).unwrap();
        assert_eq!(
            t.blob_url("library/app", &d),
            format!("http://127.0.0.1:5000/v2/library/app/blobs/{d}?ns=docker.io")
        );
        assert!(Target::new("127.0.0.1:5000", None).is_err());
        assert!(Target::new("ftp://127.0.0.1", None).is_err());
        assert!(Target::new("http://127.0.0.1?ns=x", None).is_err());
        assert!(Target::new("http://127.0.0.1", Some("a b".into())).is_err());
    }

    #[test]
    fn images() {
        let d = Digest::sha256_of(b"x");
        let tag = |s: &str| Reference::Tag(s.into());
        assert_eq!(
            split_image("library/app:1.2").unwrap(),
            ("library/app".into(), tag("1.2"))
        );
        assert_eq!(
            split_image("docker.io/library/app").unwrap(),
            ("docker.io/library/app".into(), tag("latest"))
        );
        assert_eq!(
            split_image("registry.local:5000/team/app:v1").unwrap(),
            ("registry.local:5000/team/app".into(), tag("v1"))
        );
        assert_eq!(
            split_image(&format!("library/app@{d}")).unwrap(),
            ("library/app".into(), Reference::Digest(d.clone()))
        );
        assert!(split_image("Library/App:x").is_err());
        assert!(split_image("library/app:").is_err());
        assert!(split_image("library//app").is_err());
        assert!(split_image("library/app@sha256:12").is_err());
        assert_eq!(
            Reference::parse("latest").unwrap().kind(),
            Kind::TagManifest
        );
        assert_eq!(
            Reference::parse(&d.to_string()).unwrap().kind(),
            Kind::Manifest
        );
        assert!(Reference::parse("-x").is_err());
    }
}
