//! Fault paths a real registry cannot produce, against a hand-written upstream: wrong
//! bytes, throttled and truncated bodies, rate limits, clients that go away.

mod fake;
mod support;

use std::time::{Duration, Instant};

use fake::{Behaviour, FakeUpstream};
use support::{random_bytes, sha256_hex, Berth, Upstream};

/// berth in front of the fake, as docker.io with `library/**` allowed.
async fn berth_for(up: &FakeUpstream) -> Berth {
    Berth::start(&[Upstream::new("docker.io", &up.url(), &["library/**"]).read_timeout("3s")]).await
}

fn blob_url(berth: &Berth, hex: &str) -> String {
    format!(
        "{}/v2/docker.io/library/app/blobs/sha256:{hex}",
        berth.url()
    )
}

/// `bytes` served in `chunk`-byte pieces with `pause` between them.
fn throttled(bytes: &[u8], chunk: usize, pause_ms: u64) -> Behaviour {
    Behaviour::Body {
        bytes: std::sync::Arc::new(bytes.to_vec()),
        content_type: "application/octet-stream",
        chunk,
        pause: Duration::from_millis(pause_ms),
    }
}

fn blob_path(hex: &str) -> String {
    format!("/v2/library/app/blobs/sha256:{hex}")
}

/// Whether any blob file was published under the store.
fn store_has_blob(store: &std::path::Path, hex: &str) -> bool {
    store
        .join("blobs/sha256")
        .join(&hex[..2])
        .join(hex)
        .exists()
}

/// GETs `url` and returns the status and, if the body arrived complete, the body.
async fn fetch(url: &str) -> (u16, Result<Vec<u8>, String>) {
    let resp = reqwest::get(url).await.expect("berth answers");
    let status = resp.status().as_u16();
    (
        status,
        resp.bytes()
            .await
            .map(|b| b.to_vec())
            .map_err(|e| e.to_string()),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_bytes_are_never_cached_and_the_client_fails() {
    let up = FakeUpstream::start().await;
    let good = random_bytes(1, 3 << 20);
    let hex = sha256_hex(&good);
    let mut bad = good.clone();
    let last = bad.len() - 1;
    bad[last] ^= 0xff;
    up.route(&blob_path(&hex), Behaviour::blob(bad.clone()));
    let berth = berth_for(&up).await;
    let url = blob_url(&berth, &hex);

    for attempt in 1..=2 {
        let (status, body) = fetch(&url).await;
        assert!(
            status != 200 || body.is_err(),
            "attempt {attempt}: a blob with wrong bytes was served complete ({status})"
        );
        assert!(!store_has_blob(&berth.store_dir(), &hex));
    }
    // Nothing was cached, so the second request went upstream again.
    assert_eq!(up.count("GET", &blob_path(&hex)), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_with_wrong_bytes_is_refused_and_not_cached() {
    let up = FakeUpstream::start().await;
    let real = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}"#;
    let hex = sha256_hex(real);
    let path = format!("/v2/library/app/manifests/sha256:{hex}");
    up.route(
        &path,
        Behaviour::Body {
            bytes: std::sync::Arc::new(b"{\"tampered\":true}".to_vec()),
            content_type: "application/vnd.oci.image.manifest.v1+json",
            chunk: 1024,
            pause: Duration::ZERO,
        },
    );
    let berth = berth_for(&up).await;
    let url = format!(
        "{}/v2/docker.io/library/app/manifests/sha256:{hex}",
        berth.url()
    );
    for _ in 0..2 {
        let (status, body) = fetch(&url).await;
        assert_eq!(status, 502);
        let body = String::from_utf8(body.unwrap()).unwrap();
        assert!(body.contains("does not match its digest"), "{body}");
    }
    assert_eq!(up.count("GET", &path), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_byte_arrives_before_the_upstream_has_finished() {
    let up = FakeUpstream::start().await;
    let bytes = random_bytes(2, 2 << 20);
    let hex = sha256_hex(&bytes);
    // About 1.6 s to send it all.
    up.route(&blob_path(&hex), throttled(&bytes, 64 * 1024, 50));
    let berth = berth_for(&up).await;
    let url = blob_url(&berth, &hex);
    let mut resp = reqwest::get(&url).await.unwrap();
    assert_eq!(resp.status(), 200);
    let first = resp.chunk().await.unwrap().expect("a first chunk");
    let first_at = Instant::now();
    let mut body = first.to_vec();
    while let Some(c) = resp.chunk().await.unwrap() {
        body.extend_from_slice(&c);
    }
    assert_eq!(sha256_hex(&body), hex);
    let upstream_done = up.finished_at(&blob_path(&hex)).expect("upstream finished");
    assert!(
        first_at < upstream_done,
        "the client's first byte came only after the upstream had sent the whole blob"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_upstream_body_fails_the_client_and_caches_nothing() {
    let up = FakeUpstream::start().await;
    let bytes = random_bytes(3, 1 << 20);
    let hex = sha256_hex(&bytes);
    up.route(
        &blob_path(&hex),
        Behaviour::ResetAfter {
            bytes: std::sync::Arc::new(bytes),
            after: 300_000,
        },
    );
    let berth = berth_for(&up).await;
    let url = blob_url(&berth, &hex);
    let (status, body) = fetch(&url).await;
    assert!(
        status != 200 || body.is_err(),
        "a truncated blob was served complete"
    );
    assert!(!store_has_blob(&berth.store_dir(), &hex));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_are_retried() {
    let up = FakeUpstream::start().await;
    let bytes = random_bytes(4, 100_000);
    let hex = sha256_hex(&bytes);
    up.route(
        &blob_path(&hex),
        Behaviour::StatusThen {
            status: 429,
            times: 1,
            then: Box::new(Behaviour::blob(bytes.clone())),
        },
    );
    let berth = berth_for(&up).await;
    let url = blob_url(&berth, &hex);
    let (status, body) = fetch(&url).await;
    assert_eq!(status, 200);
    assert_eq!(body.unwrap(), bytes);
    assert_eq!(up.count("GET", &blob_path(&hex)), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_rate_limits_reach_the_client_as_429() {
    let up = FakeUpstream::start().await;
    let hex = sha256_hex(b"never");
    up.route(
        &blob_path(&hex),
        Behaviour::StatusThen {
            status: 429,
            times: 100,
            then: Box::new(Behaviour::Hang),
        },
    );
    let berth = berth_for(&up).await;
    let (status, body) = fetch(&blob_url(&berth, &hex)).await;
    assert_eq!(status, 429);
    assert!(String::from_utf8(body.unwrap())
        .unwrap()
        .contains("TOOMANYREQUESTS"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_finishes_when_its_client_goes_away() {
    let up = FakeUpstream::start().await;
    let bytes = random_bytes(5, 1 << 20);
    let hex = sha256_hex(&bytes);
    up.route(&blob_path(&hex), throttled(&bytes, 32 * 1024, 20));
    let berth = berth_for(&up).await;
    let url = blob_url(&berth, &hex);
    {
        let mut resp = reqwest::get(&url).await.unwrap();
        resp.chunk().await.unwrap().expect("a first chunk");
        // Dropped here: the client goes away mid-blob.
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while !store_has_blob(&berth.store_dir(), &hex) {
        assert!(Instant::now() < deadline, "the fill did not finish");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, body) = fetch(&url).await;
    assert_eq!(status, 200);
    assert_eq!(body.unwrap(), bytes);
    assert_eq!(up.count("GET", &blob_path(&hex)), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_blobs_are_blob_unknown() {
    let up = FakeUpstream::start().await;
    let berth = berth_for(&up).await;
    let hex = sha256_hex(b"nothing");
    let (status, body) = fetch(&blob_url(&berth, &hex)).await;
    assert_eq!(status, 404);
    assert!(String::from_utf8(body.unwrap())
        .unwrap()
        .contains("BLOB_UNKNOWN"));
}

/// A blob without `Content-Length` is bounded by `[server] max_upload_size`: one that
/// grows past it fails and leaves nothing stored; one within it is served and stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_without_content_length_is_bounded() {
    let up = FakeUpstream::start().await;
    let big = random_bytes(11, 3 << 20);
    let small = random_bytes(12, 512 << 10);
    let (big_hex, small_hex) = (sha256_hex(&big), sha256_hex(&small));
    up.route(
        &blob_path(&big_hex),
        Behaviour::Unsized(std::sync::Arc::new(big)),
    );
    up.route(
        &blob_path(&small_hex),
        Behaviour::Unsized(std::sync::Arc::new(small.clone())),
    );
    let config = format!(
        "[server]\nmax_upload_size = \"1MiB\"\n\n{}",
        support::berth_config(&[Upstream::new("docker.io", &up.url(), &["library/**"])])
    );
    let berth = Berth::start_with_config(&config, &[]).await;

    let (status, body) = fetch(&blob_url(&berth, &big_hex)).await;
    assert!(
        status != 200 || body.is_err(),
        "a blob past max_upload_size was served complete ({status})"
    );
    assert!(!store_has_blob(&berth.store_dir(), &big_hex));

    let (status, body) = fetch(&blob_url(&berth, &small_hex)).await;
    assert_eq!(status, 200);
    assert_eq!(body.expect("the whole small blob"), small);
    assert!(store_has_blob(&berth.store_dir(), &small_hex));
}
