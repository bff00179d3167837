//! The harness against a tiny in-process registry (hand-written HTTP/1.1 on
//! 127.0.0.1:0) that serves an index, two platform manifests, configs and layers, and
//! counts what it serves: requests, body bytes, hits per path. It can also serve wrong
//! bytes for a path, hang on a path, write a Combined Log Format access log and expose
//! berth-style upstream counters on /metrics.

use std::collections::{HashMap, HashSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use berth_loadtests::digest::Digest;
use berth_loadtests::oci::Platform;
use berth_loadtests::{run, Config, Mode, Reference, Target};

const REPO: &str = "library/app";
const TAG: &str = "latest";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

fn sha256(bytes: &[u8]) -> String {
    let hex: String = Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256:{hex}")
}

/// Deterministic filler bytes.
fn filler(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 33) as u8
        })
        .collect()
}

struct Resource {
    body: Bytes,
    content_type: &'static str,
    digest: String,
}

/// An image: an index with linux/amd64 and linux/arm64 manifests, each with a config
/// and layers of its own.
struct Image {
    index_digest: String,
    amd64_manifest: String,
    amd64_blobs: Vec<String>,
    arm64_manifest: String,
    arm64_blobs: Vec<String>,
    routes: HashMap<String, Resource>,
}

fn manifest_path(reference: &str) -> String {
    format!("/v2/{REPO}/manifests/{reference}")
}

fn blob_path(digest: &str) -> String {
    format!("/v2/{REPO}/blobs/{digest}")
}

impl Image {
    fn new() -> Image {
        let mut routes = HashMap::new();
        let mut add_blob = |body: Vec<u8>| {
            let digest = sha256(&body);
            routes.insert(
                blob_path(&digest),
                Resource {
                    body: Bytes::from(body),
                    content_type: "application/octet-stream",
                    digest: digest.clone(),
                },
            );
            digest
        };
        // amd64: a config, an empty layer, a small one and a 1 MiB + 7 one.
        let amd64_blobs = vec![
            add_blob(br#"{"architecture":"amd64","os":"linux"}"#.to_vec()),
            add_blob(Vec::new()),
            add_blob(filler(1, 1000)),
            add_blob(filler(2, (1 << 20) + 7)),
        ];
        let arm64_blobs = vec![
            add_blob(br#"{"architecture":"arm64","os":"linux"}"#.to_vec()),
            add_blob(filler(3, 5000)),
        ];
        let manifest = |blobs: &[String]| {
            let layers: Vec<String> = blobs[1..]
                .iter()
                .map(|d| {
                    format!(
                        r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{d}","size":0}}"#
                    )
                })
                .collect();
            format!(
                r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":0}},"layers":[{}]}}"#,
                blobs[0],
                layers.join(",")
            )
        };
        let mut add_manifest = |body: String, content_type: &'static str, tag: Option<&str>| {
            let digest = sha256(body.as_bytes());
            let body = Bytes::from(body);
            for reference in std::iter::once(digest.as_str()).chain(tag) {
                routes.insert(
                    manifest_path(reference),
                    Resource {
                        body: body.clone(),
                        content_type,
                        digest: digest.clone(),
                    },
                );
            }
            digest
        };
        let amd64_manifest = add_manifest(manifest(&amd64_blobs), OCI_MANIFEST, None);
        let arm64_manifest = add_manifest(manifest(&arm64_blobs), OCI_MANIFEST, None);
        let index = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[
                {{"mediaType":"{OCI_MANIFEST}","digest":"{arm64_manifest}","size":1,"platform":{{"os":"linux","architecture":"arm64","variant":"v8"}}}},
                {{"mediaType":"{OCI_MANIFEST}","digest":"{amd64_manifest}","size":1,"platform":{{"os":"linux","architecture":"amd64"}}}}
            ]}}"#
        );
        let index_digest = add_manifest(index, OCI_INDEX, Some(TAG));
        Image {
            index_digest,
            amd64_manifest,
            amd64_blobs,
            arm64_manifest,
            arm64_blobs,
            routes,
        }
    }

    fn blob_len(&self, digest: &str) -> u64 {
        self.routes[&blob_path(digest)].body.len() as u64
    }
}

#[derive(Default)]
struct Behaviour {
    /// Paths served with one byte flipped (same length, same headers).
    corrupt: HashSet<String>,
    /// Paths that are never answered.
    hang: HashSet<String>,
    /// Whether to send Docker-Content-Digest.
    no_digest_header: bool,
}

struct State {
    routes: HashMap<String, Resource>,
    behaviour: Behaviour,
    requests: AtomicU64,
    bytes: AtomicU64,
    hits: Mutex<HashMap<String, u64>>,
    queries: Mutex<Vec<Option<String>>>,
    log: Option<Mutex<std::fs::File>>,
}

struct Server {
    url: String,
    state: Arc<State>,
}

impl Server {
    async fn start(image: &Image, behaviour: Behaviour, log: Option<&Path>) -> Server {
        let routes = image
            .routes
            .iter()
            .map(|(k, r)| {
                (
                    k.clone(),
                    Resource {
                        body: r.body.clone(),
                        content_type: r.content_type,
                        digest: r.digest.clone(),
                    },
                )
            })
            .collect();
        let state = Arc::new(State {
            routes,
            behaviour,
            requests: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            hits: Mutex::new(HashMap::new()),
            queries: Mutex::new(Vec::new()),
            log: log.map(|p| {
                Mutex::new(
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(p)
                        .unwrap(),
                )
            }),
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let st = Arc::clone(&state);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(stream, Arc::clone(&st)));
            }
        });
        Server { url, state }
    }

    fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::SeqCst)
    }

    fn bytes(&self) -> u64 {
        self.state.bytes.load(Ordering::SeqCst)
    }

    fn hits(&self, path: &str) -> u64 {
        self.state
            .hits
            .lock()
            .unwrap()
            .get(path)
            .copied()
            .unwrap_or(0)
    }
}

async fn serve(stream: TcpStream, state: Arc<State>) {
    let (reader, mut writer) = stream.into_split();
    let mut reader = BufReader::new(reader);
    loop {
        let mut request_line = String::new();
        match reader.read_line(&mut request_line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let mut close = false;
        loop {
            let mut header = String::new();
            match reader.read_line(&mut header).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if header == "\r\n" || header == "\n" {
                break;
            }
            let lower = header.to_ascii_lowercase();
            if lower.starts_with("connection:") && lower.contains("close") {
                close = true;
            }
        }
        let mut parts = request_line.split_whitespace();
        let method = parts.next().unwrap_or("").to_owned();
        let target = parts.next().unwrap_or("").to_owned();
        let (path, query) = match target.split_once('?') {
            Some((p, q)) => (p.to_owned(), Some(q.to_owned())),
            None => (target.clone(), None),
        };

        if path == "/metrics" {
            let body = format!(
                "# TYPE berth_upstream_requests counter\n\
                 berth_upstream_requests_total{{upstream=\"test\"}} {}\n\
                 berth_upstream_bytes_total{{upstream=\"test\"}} {}\n# EOF\n",
                state.requests.load(Ordering::SeqCst),
                state.bytes.load(Ordering::SeqCst)
            );
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            if writer.write_all(head.as_bytes()).await.is_err()
                || writer.write_all(body.as_bytes()).await.is_err()
            {
                return;
            }
            continue;
        }

        *state.hits.lock().unwrap().entry(path.clone()).or_default() += 1;
        state.queries.lock().unwrap().push(query);
        if state.behaviour.hang.contains(&path) {
            tokio::time::sleep(Duration::from_secs(20)).await;
            return;
        }
        let (status, content_type, digest, body) = match state.routes.get(&path) {
            Some(r) => {
                let mut body = r.body.to_vec();
                if state.behaviour.corrupt.contains(&path) && !body.is_empty() {
                    let i = body.len() / 2;
                    body[i] ^= 0x55;
                }
                (
                    "200 OK",
                    r.content_type,
                    Some(r.digest.clone()),
                    Bytes::from(body),
                )
            }
            None => (
                "404 Not Found",
                "application/json",
                None,
                Bytes::from_static(br#"{"errors":[{"code":"NOT_FOUND","message":"nope"}]}"#),
            ),
        };
        let mut head = format!(
            "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n",
            body.len()
        );
        if let Some(d) = digest.filter(|_| !state.behaviour.no_digest_header) {
            head.push_str(&format!("Docker-Content-Digest: {d}\r\n"));
        }
        head.push_str("\r\n");
        let sent = if method == "HEAD" { 0 } else { body.len() };
        if writer.write_all(head.as_bytes()).await.is_err()
            || writer.write_all(&body[..sent]).await.is_err()
        {
            return;
        }
        state.requests.fetch_add(1, Ordering::SeqCst);
        state.bytes.fetch_add(sent as u64, Ordering::SeqCst);
        if let Some(log) = &state.log {
            let code = &status[..3];
            let mut f = log.lock().unwrap();
            writeln!(
                f,
                r#"127.0.0.1 - - [23/Nov/2026:02:09:35 +0000] "{method} {target} HTTP/1.1" {code} {sent} "" "berth-load""#
            )
            .unwrap();
        }
        if close {
            return;
        }
    }
}

fn pull_config(server: &Server, pulls: u64, concurrency: usize) -> Config {
    let mut config = Config::new(
        Target::new(&server.url, None).unwrap(),
        Mode::Pull {
            repo: REPO.into(),
            reference: Reference::Tag(TAG.into()),
            platform: "linux/amd64".parse::<Platform>().unwrap(),
            layer_concurrency: 3,
        },
    );
    config.count = pulls;
    config.concurrency = concurrency;
    config.duration = Duration::from_secs(60);
    config.settle = Duration::from_millis(100);
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_run_counts_exactly_what_was_served() {
    let image = Image::new();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    // Something already in the log before the run must not be counted.
    std::fs::write(
        &log,
        "127.0.0.1 - - [23/Nov/2026:02:00:00 +0000] \"GET /v2/ HTTP/1.1\" 200 2 \"\" \"x\"\n",
    )
    .unwrap();
    let server = Server::start(&image, Behaviour::default(), Some(&log)).await;
    let mut config = pull_config(&server, 7, 3);
    config.upstream_log = Some(log.clone());
    config.metrics_url = Some(format!("{}/metrics", server.url));

    let r = run(&config).await.unwrap();

    let blobs = image.amd64_blobs.len() as u64;
    assert_eq!(r.mode, "pull");
    assert_eq!((r.units.ok, r.units.failed, r.units.cancelled), (7, 0, 0));
    assert_eq!(
        (r.requests.tag_manifest.ok, r.requests.tag_manifest.failed),
        (7, 0)
    );
    assert_eq!((r.requests.manifest.ok, r.requests.manifest.failed), (7, 0));
    assert_eq!((r.requests.blob.ok, r.requests.blob.failed), (7 * blobs, 0));
    assert_eq!(r.requests_total.ok, 7 * (2 + blobs));
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert!(!r.has_failures());

    // The server counted the same requests and bytes.
    assert_eq!(server.requests(), r.requests_total.ok);
    assert_eq!(server.bytes(), r.bytes);
    let expected_bytes: u64 = 7
        * (image.routes[&manifest_path(TAG)].body.len() as u64
            + image.routes[&manifest_path(&image.amd64_manifest)]
                .body
                .len() as u64
            + image
                .amd64_blobs
                .iter()
                .map(|d| image.blob_len(d))
                .sum::<u64>());
    assert_eq!(r.bytes, expected_bytes);
    assert_eq!(server.hits(&manifest_path(TAG)), 7);
    assert_eq!(server.hits(&manifest_path(&image.amd64_manifest)), 7);
    for d in &image.amd64_blobs {
        assert_eq!(server.hits(&blob_path(d)), 7, "{d}");
    }
    // The other platform was never touched.
    assert_eq!(server.hits(&manifest_path(&image.arm64_manifest)), 0);
    for d in &image.arm64_blobs {
        assert_eq!(server.hits(&blob_path(d)), 0);
    }
    assert_eq!(server.hits(&manifest_path(&image.index_digest)), 0);

    // Every body was verified against a digest (the tag against its header).
    assert_eq!(r.digests_verified, r.requests_total.ok);

    // One latency per successful request; a ttfb per blob.
    let lat = &r.latency_us;
    assert_eq!(lat.tag_manifest.unwrap().count, 7);
    assert_eq!(lat.manifest.unwrap().count, 7);
    assert_eq!(lat.blob.unwrap().count, (7 * blobs) as usize);
    assert_eq!(lat.ttfb.unwrap().count, (7 * blobs) as usize);
    let b = lat.blob.unwrap();
    assert!(b.p50 <= b.p90 && b.p90 <= b.p99 && b.p99 <= b.max);
    assert!(r.pulls_per_s.unwrap() > 0.0);
    assert!(r.bytes_per_s > 0.0);

    // Amplification from the access log (only the lines of this run) and the metrics.
    let up = r.upstream.as_ref().unwrap();
    assert_eq!(up.source, Some("access_log"));
    assert_eq!(up.requests, Some(server.requests()));
    assert_eq!(up.bytes, Some(server.bytes()));
    assert_eq!(up.access_log.as_ref().unwrap().unparsed_lines, 0);
    let m = up.metrics.unwrap();
    assert_eq!(
        (m.requests, m.bytes),
        (Some(server.requests()), Some(server.bytes()))
    );
    assert_eq!(up.amplification.requests, Some(1.0));
    assert_eq!(up.amplification.bytes, Some(1.0));
    assert!(up.notes.is_empty(), "{:?}", up.notes);

    let json: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
    assert_eq!(json["requests"]["blob"]["ok"], 7 * blobs);
    assert_eq!(json["upstream"]["requests"], server.requests());
    assert!(json["latency_us"]["ttfb"]["p99"].is_u64());
    let table = r.table();
    for needle in ["tag_manifest", "manifest", "blob", "ttfb", "amplification"] {
        assert!(table.contains(needle), "{needle} in\n{table}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ns_is_sent_with_every_request_and_digest_pulls_skip_the_tag() {
    let image = Image::new();
    let server = Server::start(&image, Behaviour::default(), None).await;
    let mut config = pull_config(&server, 3, 2);
    config.target = Target::new(&format!("{}/", server.url), Some("docker.io".into())).unwrap();
    config.mode = Mode::Pull {
        repo: REPO.into(),
        reference: Reference::Digest(Digest::parse(&image.index_digest).unwrap()),
        platform: "linux/arm64/v8".parse().unwrap(),
        layer_concurrency: 1,
    };
    let r = run(&config).await.unwrap();
    assert_eq!(r.units.ok, 3);
    assert_eq!(r.requests.tag_manifest.ok, 0);
    // The index and the arm64 manifest, both by digest.
    assert_eq!(r.requests.manifest.ok, 6);
    assert_eq!(r.requests.blob.ok, 3 * image.arm64_blobs.len() as u64);
    assert_eq!(server.hits(&manifest_path(&image.index_digest)), 3);
    assert_eq!(server.hits(&manifest_path(&image.arm64_manifest)), 3);
    let queries = server.state.queries.lock().unwrap().clone();
    assert_eq!(queries.len() as u64, r.requests_total.ok);
    assert!(queries.iter().all(|q| q.as_deref() == Some("ns=docker.io")));
    assert!(r.upstream.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_bytes_for_one_layer_fail_the_pull() {
    let image = Image::new();
    let bad = blob_path(&image.amd64_blobs[3]);
    let behaviour = Behaviour {
        corrupt: HashSet::from([bad.clone()]),
        ..Default::default()
    };
    let server = Server::start(&image, behaviour, None).await;
    let r = run(&pull_config(&server, 5, 2)).await.unwrap();
    assert_eq!((r.units.ok, r.units.failed), (0, 5));
    assert_eq!(r.errors.get("digest_mismatch"), Some(&5));
    assert_eq!(r.errors.len(), 1, "{:?}", r.errors);
    assert_eq!(r.requests.blob.failed, 5);
    assert_eq!(r.requests.blob.ok, 5 * 3);
    assert_eq!(server.hits(&bad), 5);
    // The bad bytes were received (and counted) but not accepted.
    assert_eq!(server.bytes(), r.bytes);
    assert!(r.has_failures());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_manifest_bytes_fail_the_pull() {
    let image = Image::new();
    // The index's bytes do not match its Docker-Content-Digest.
    let behaviour = Behaviour {
        corrupt: HashSet::from([manifest_path(TAG)]),
        ..Default::default()
    };
    let server = Server::start(&image, behaviour, None).await;
    let r = run(&pull_config(&server, 4, 2)).await.unwrap();
    assert_eq!((r.units.ok, r.units.failed), (0, 4));
    assert_eq!(r.errors.get("digest_mismatch"), Some(&4));
    assert_eq!(r.requests.tag_manifest.failed, 4);
    assert_eq!(r.requests.blob.ok + r.requests.blob.failed, 0);

    // The platform manifest, fetched by digest, does not match that digest.
    let behaviour = Behaviour {
        corrupt: HashSet::from([manifest_path(&image.amd64_manifest)]),
        ..Default::default()
    };
    let server = Server::start(&image, behaviour, None).await;
    let r = run(&pull_config(&server, 4, 2)).await.unwrap();
    assert_eq!((r.units.ok, r.units.failed), (0, 4));
    assert_eq!(r.errors.get("digest_mismatch"), Some(&4));
    assert_eq!(r.requests.manifest.failed, 4);
    assert_eq!(server.requests(), 8);

    // Without Docker-Content-Digest, a tag cannot be verified, and the pull still works.
    let behaviour = Behaviour {
        no_digest_header: true,
        ..Default::default()
    };
    let server = Server::start(&image, behaviour, None).await;
    let r = run(&pull_config(&server, 2, 1)).await.unwrap();
    assert_eq!(r.units.ok, 2);
    assert_eq!(r.digests_verified, r.requests_total.ok - 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_and_connection_errors_are_counted_by_kind() {
    let image = Image::new();
    let server = Server::start(&image, Behaviour::default(), None).await;
    let mut config = pull_config(&server, 3, 1);
    config.mode = Mode::Pull {
        repo: REPO.into(),
        reference: Reference::Tag("missing".into()),
        platform: "linux/amd64".parse().unwrap(),
        layer_concurrency: 3,
    };
    let r = run(&config).await.unwrap();
    assert_eq!((r.units.ok, r.units.failed), (0, 3));
    assert_eq!(r.errors.get("status_4xx"), Some(&3));
    assert_eq!(r.requests.tag_manifest.failed, 3);
    assert_eq!(server.bytes(), r.bytes, "error bodies are counted too");

    // No platform in the index.
    let mut config = pull_config(&server, 2, 1);
    config.mode = Mode::Pull {
        repo: REPO.into(),
        reference: Reference::Tag(TAG.into()),
        platform: "windows/amd64".parse().unwrap(),
        layer_concurrency: 3,
    };
    let r = run(&config).await.unwrap();
    assert_eq!((r.units.ok, r.units.failed), (0, 2));
    assert_eq!(r.errors.get("platform_not_found"), Some(&2));
    assert_eq!(r.requests.tag_manifest.ok, 2);

    // Nothing listening: a port held bound (so nobody else can take it) but not listening.
    let closed = tokio::net::TcpSocket::new_v4().unwrap();
    closed.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    let mut config = pull_config(&server, 2, 1);
    config.target = Target::new(&url, None).unwrap();
    let r = run(&config).await.unwrap();
    assert_eq!((r.units.ok, r.units.failed), (0, 2));
    assert_eq!(r.errors.get("connect"), Some(&2));
}

/// The manifests mode's own HTTP/1.1 client: bad bytes are caught by tag and by digest,
/// a missing `Docker-Content-Digest` leaves a tag unverified, a 404 is a 4xx, and a
/// manifest that never comes is cancelled at the run's hard deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_manifests_client_sees_bad_bytes_missing_digests_and_hangs() {
    let image = Image::new();
    let manifests = |server: &Server, reference: &str, verify: bool| {
        let mut config = Config::new(
            Target::new(&server.url, None).unwrap(),
            Mode::Manifests {
                repo: REPO.into(),
                reference: Reference::parse(reference).unwrap(),
                verify,
            },
        );
        config.count = 12;
        config.concurrency = 3;
        config
    };
    let corrupt = Behaviour {
        corrupt: HashSet::from([manifest_path(TAG), manifest_path(&image.index_digest)]),
        ..Default::default()
    };
    let server = Server::start(&image, corrupt, None).await;
    for reference in [TAG, image.index_digest.as_str()] {
        let r = run(&manifests(&server, reference, true)).await.unwrap();
        assert_eq!((r.units.ok, r.units.failed), (0, 12), "{reference}");
        assert_eq!(r.errors.get("digest_mismatch"), Some(&12), "{:?}", r.errors);
        // Without verification the same bytes are only counted.
        let r = run(&manifests(&server, reference, false)).await.unwrap();
        assert_eq!((r.units.ok, r.digests_verified), (12, 0), "{reference}");
    }
    // The server saw every request, failed or not.
    assert_eq!(server.hits(&manifest_path(TAG)), 24);

    let no_digest = Behaviour {
        no_digest_header: true,
        ..Default::default()
    };
    let server = Server::start(&image, no_digest, None).await;
    let r = run(&manifests(&server, TAG, true)).await.unwrap();
    assert_eq!((r.units.ok, r.digests_verified), (12, 0));
    let r = run(&manifests(&server, "nope", true)).await.unwrap();
    assert_eq!(r.errors.get("status_4xx"), Some(&12), "{:?}", r.errors);

    let hang = Behaviour {
        hang: HashSet::from([manifest_path(TAG)]),
        ..Default::default()
    };
    let server = Server::start(&image, hang, None).await;
    cancelled_at_the_deadline(manifests(&server, TAG, true)).await;
}

/// Runs `config` (3 workers on something that never answers) for 300 ms with a 300 ms
/// grace: the run ends after both, with its 3 units cancelled, not failed.
async fn cancelled_at_the_deadline(mut config: Config) -> berth_loadtests::Report {
    config.duration = Duration::from_millis(300);
    config.grace = Duration::from_millis(300);
    let t = Instant::now();
    let r = run(&config).await.unwrap();
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(600) && took < Duration::from_secs(5),
        "{took:?}"
    );
    assert_eq!((r.units.ok, r.units.failed, r.units.cancelled), (0, 0, 3));
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_are_bounded_in_time() {
    let image = Image::new();
    let server = Server::start(&image, Behaviour::default(), None).await;
    let mut config = pull_config(&server, u64::MAX, 2);
    config.duration = Duration::from_millis(400);
    let t = Instant::now();
    let r = run(&config).await.unwrap();
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(r.units.ok > 0);
    assert_eq!((r.units.failed, r.units.cancelled), (0, 0));
    assert_eq!(server.requests(), r.requests_total.ok);

    // A layer that never comes: the pulls in flight are cancelled after the grace.
    let behaviour = Behaviour {
        hang: HashSet::from([blob_path(&image.amd64_blobs[2])]),
        ..Default::default()
    };
    let server = Server::start(&image, behaviour, None).await;
    let r = cancelled_at_the_deadline(pull_config(&server, 100, 3)).await;
    assert!(!r.has_failures(), "cancelled is not failed: {:?}", r.errors);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_manifests_and_cold_modes() {
    let image = Image::new();
    let server = Server::start(&image, Behaviour::default(), None).await;
    let big = image.amd64_blobs[3].clone();
    let target = Target::new(&server.url, None).unwrap();

    let mut config = Config::new(
        target.clone(),
        Mode::Blob {
            repo: REPO.into(),
            digest: Digest::parse(&big).unwrap(),
            verify: true,
        },
    );
    config.count = 10;
    config.concurrency = 2;
    let r = run(&config).await.unwrap();
    assert_eq!((r.units.ok, r.requests.blob.ok), (10, 10));
    assert_eq!(r.bytes, 10 * image.blob_len(&big));
    assert_eq!(r.digests_verified, 10);
    assert_eq!(r.latency_us.ttfb.unwrap().count, 10);
    assert!(r.mib_per_s > 0.0);

    // Without verification the bytes are still counted exactly, and nothing is hashed.
    config.mode = Mode::Blob {
        repo: REPO.into(),
        digest: Digest::parse(&big).unwrap(),
        verify: false,
    };
    let r = run(&config).await.unwrap();
    assert_eq!((r.units.ok, r.bytes), (10, 10 * image.blob_len(&big)));
    assert_eq!(r.digests_verified, 0);

    for (reference, by_tag) in [(TAG.to_owned(), true), (image.index_digest.clone(), false)] {
        let mut config = Config::new(
            target.clone(),
            Mode::Manifests {
                repo: REPO.into(),
                reference: Reference::parse(&reference).unwrap(),
                verify: true,
            },
        );
        config.count = 50;
        config.concurrency = 4;
        let r = run(&config).await.unwrap();
        let (tag, digest) = (r.requests.tag_manifest, r.requests.manifest);
        if by_tag {
            assert_eq!((tag.ok, digest.ok), (50, 0));
        } else {
            assert_eq!((tag.ok, digest.ok), (0, 50));
        }
        assert_eq!(r.digests_verified, 50);
        assert!(r.requests_per_s > 0.0);
        assert!(r.latency_us.ttfb.is_none());
    }
    assert_eq!(server.hits(&manifest_path(TAG)), 50);
    assert_eq!(server.hits(&manifest_path(&image.index_digest)), 50);

    let before = server.hits(&blob_path(&big));
    let config = Config::new(
        target,
        Mode::Cold {
            repo: REPO.into(),
            digest: Digest::parse(&big).unwrap(),
            clients: 6,
        },
    );
    let r = run(&config).await.unwrap();
    assert_eq!(server.hits(&blob_path(&big)) - before, 6);
    assert_eq!((r.units.ok, r.concurrency), (6, 6));
    let cold = r.cold.as_ref().unwrap();
    assert_eq!(cold.clients.len(), 6);
    assert!(cold
        .clients
        .iter()
        .all(|c| c.ok && c.bytes == image.blob_len(&big)));
    assert!(cold
        .clients
        .iter()
        .all(|c| c.total_ms <= cold.all_finished_ms && c.ttfb_ms.unwrap() <= c.total_ms));
    assert!(cold.first_finished_ms.unwrap() <= cold.all_finished_ms);
}

fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_berth-load"))
}

async fn run_binary(args: Vec<String>) -> std::process::Output {
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(binary())
            .args(args)
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_reports_json_and_exits_non_zero_on_failure() {
    let image = Image::new();
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let server = Server::start(&image, Behaviour::default(), None).await;
    let args = |url: &str, extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = [
            "pull",
            "--registry",
            url,
            "--image",
            "library/app:latest",
            "--pulls",
            "4",
            "-c",
            "2",
            "--duration",
            "30s",
            "--json",
            json.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };

    let out = run_binary(args(&server.url, &[])).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout.contains("tag_manifest"), "{stdout}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["units"]["ok"], 4);
    assert_eq!(report["requests"]["blob"]["ok"], 16);
    assert_eq!(report["bytes"], server.bytes());
    assert!(report["upstream"].is_null());

    let behaviour = Behaviour {
        corrupt: HashSet::from([blob_path(&image.amd64_blobs[2])]),
        ..Default::default()
    };
    let bad = Server::start(&image, behaviour, None).await;
    let out = run_binary(args(&bad.url, &["--quiet"])).await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(out.stdout.is_empty());
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["errors"]["digest_mismatch"], 4);
    assert_eq!(report["units"]["failed"], 4);

    let out = run_binary(args(&bad.url, &["--allow-errors", "--quiet"])).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");

    let out = run_binary(vec!["pull".into(), "--registry".into(), "nope".into()]).await;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let out = run_binary(args("not a url", &[])).await;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}
