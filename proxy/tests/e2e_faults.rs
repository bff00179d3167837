//! Fault paths a real registry cannot produce, against a hand-written upstream: wrong
//! bytes, throttled and truncated bodies, resumed downloads, rate limits, clients that go
//! away, and an upstream that is down (the circuit breaker).

mod fake;
mod support;

use std::time::{Duration, Instant};

use fake::{Behaviour, FakeUpstream, RangeAnswer};
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

/// GETs `url` and reads the body chunk by chunk: the status, every byte that arrived, and
/// whether the body ended cleanly (`false` if it broke off).
async fn fetch_partial(url: &str) -> (u16, Vec<u8>, bool) {
    let mut resp = reqwest::get(url).await.expect("berth answers");
    let status = resp.status().as_u16();
    let mut got = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(c)) => got.extend_from_slice(&c),
            Ok(None) => return (status, got, true),
            Err(_) => return (status, got, false),
        }
    }
}

/// The value of the sample of `/metrics` whose line starts with `prefix`.
async fn metric(berth: &Berth, prefix: &str) -> Option<f64> {
    let (_, _, body) = berth.fetch("/metrics", &[]).await;
    String::from_utf8_lossy(&body)
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// The `Range` headers of the GETs that reached `path`, in order (`None`: no `Range`).
fn gets(up: &FakeUpstream, path: &str) -> Vec<Option<String>> {
    up.requests()
        .iter()
        .filter(|r| r.method == "GET" && r.path == path)
        .map(|r| r.header("range").map(str::to_owned))
        .collect()
}

fn ranged(bytes: &[u8], cuts: &[usize], range: RangeAnswer) -> Behaviour {
    Behaviour::Ranged {
        bytes: std::sync::Arc::new(bytes.to_vec()),
        cuts: cuts.to_vec(),
        range,
        stall: false,
    }
}

/// A blob whose first answer breaks off after 300 000 bytes is resumed with
/// `Range: bytes=300000-`: the client gets the whole blob in one response, and the blob
/// is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_cut_off_midway_is_resumed_with_a_range_request() {
    let up = FakeUpstream::start().await;
    let bytes = random_bytes(21, 1 << 20);
    let hex = sha256_hex(&bytes);
    up.route(
        &blob_path(&hex),
        ranged(&bytes, &[300_000], RangeAnswer::Honour),
    );
    let berth = berth_for(&up).await;
    let url = blob_url(&berth, &hex);

    let (status, body) = fetch(&url).await;
    assert_eq!(status, 200);
    let body = body.expect("the whole blob in one response");
    assert_eq!(sha256_hex(&body), hex);
    assert_eq!(
        gets(&up, &blob_path(&hex)),
        vec![None, Some("bytes=300000-".to_owned())]
    );
    assert!(store_has_blob(&berth.store_dir(), &hex));
    assert!(berth.log().contains("resuming it with a Range request"));
    assert_eq!(
        metric(
            &berth,
            "berth_upstream_resumes_total{upstream=\"docker.io\"}"
        )
        .await,
        Some(1.0)
    );

    // Cached: served without the upstream.
    let (status, body) = fetch(&url).await;
    assert_eq!((status, body.unwrap()), (200, bytes));
    assert_eq!(gets(&up, &blob_path(&hex)).len(), 2);
}

/// A blob whose first answer stalls (the connection stays open, nothing more comes) is
/// resumed after the read timeout, as a reset would be.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_blob_download_is_resumed_after_the_read_timeout() {
    let up = FakeUpstream::start().await;
    let bytes = random_bytes(22, 1 << 20);
    let hex = sha256_hex(&bytes);
    up.route(
        &blob_path(&hex),
        Behaviour::Ranged {
            bytes: std::sync::Arc::new(bytes.clone()),
            cuts: vec![400_000],
            range: RangeAnswer::Honour,
            stall: true,
        },
    );
    let berth =
        Berth::start(&[Upstream::new("docker.io", &up.url(), &["library/**"]).read_timeout("1s")])
            .await;
    let (status, body) = fetch(&blob_url(&berth, &hex)).await;
    assert_eq!(status, 200);
    assert_eq!(sha256_hex(&body.expect("the whole blob")), hex);
    assert_eq!(
        gets(&up, &blob_path(&hex)),
        vec![None, Some("bytes=400000-".to_owned())]
    );
    assert!(store_has_blob(&berth.store_dir(), &hex));
}

/// An answer to the Range request that does not continue the blob where it stopped never
/// puts a wrong byte in front of a client: a `206` from an earlier offset fails the
/// response after the right prefix; a `200` (the upstream ignores ranges) is read past the
/// bytes already written and completes the blob; a `206` that lies about its bytes is
/// caught by the digest. Only a correct blob is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_answer_that_does_not_continue_the_blob_never_corrupts_it() {
    let up = FakeUpstream::start().await;
    let cases = [
        (RangeAnswer::StartEarlier { back: 1000 }, false),
        (RangeAnswer::Ignore, true),
        (RangeAnswer::Lie, false),
    ];
    let blobs: Vec<Vec<u8>> = (0..cases.len())
        .map(|i| random_bytes(30 + i as u64, 1 << 20))
        .collect();
    for ((answer, _), bytes) in cases.iter().zip(&blobs) {
        up.route(
            &blob_path(&sha256_hex(bytes)),
            ranged(bytes, &[300_000], *answer),
        );
    }
    let berth = berth_for(&up).await;
    for ((answer, completes), bytes) in cases.iter().zip(&blobs) {
        let hex = sha256_hex(bytes);
        let (status, got, complete) = fetch_partial(&blob_url(&berth, &hex)).await;
        assert_eq!(
            gets(&up, &blob_path(&hex)),
            vec![None, Some("bytes=300000-".to_owned())],
            "{answer:?}"
        );
        if *completes {
            assert!(status == 200 && complete, "{answer:?}: {status}");
            assert_eq!(sha256_hex(&got), hex, "{answer:?}: wrong bytes");
            assert!(store_has_blob(&berth.store_dir(), &hex), "{answer:?}");
            continue;
        }
        assert!(
            status != 200 || !complete,
            "{answer:?}: a response completed"
        );
        assert!(
            got.len() < bytes.len(),
            "{answer:?}: the last byte came before verification"
        );
        if *answer != RangeAnswer::Lie {
            // Only a lie about the bytes themselves can get past the checks, and only
            // the digest catches it: every other answer is refused before a byte of it
            // is written.
            let wrong = got.iter().zip(bytes.iter()).position(|(a, b)| a != b);
            assert_eq!(wrong, None, "{answer:?}: a wrong byte reached the client");
            assert!(got.len() <= 300_000, "{answer:?}");
        }
        assert!(!store_has_blob(&berth.store_dir(), &hex), "{answer:?}");
    }
    let log = berth.log();
    assert!(log.contains("cannot resume the blob download"), "{log}");
    assert!(log.contains("does not match"), "{log}");
}

/// Resumes are bounded: at most 3 Range requests per fill, and none after an answer that
/// brought no byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumes_are_bounded_and_need_progress() {
    let up = FakeUpstream::start().await;
    let always_cut = random_bytes(41, 1 << 20);
    let stuck = random_bytes(42, 1 << 20);
    let (always_hex, stuck_hex) = (sha256_hex(&always_cut), sha256_hex(&stuck));
    up.route(
        &blob_path(&always_hex),
        ranged(&always_cut, &[100_000; 10], RangeAnswer::Honour),
    );
    // The first resume brings nothing; a third answer would have been whole.
    up.route(
        &blob_path(&stuck_hex),
        ranged(&stuck, &[300_000, 0, 0], RangeAnswer::Honour),
    );
    let berth = berth_for(&up).await;

    let (status, got, complete) = fetch_partial(&blob_url(&berth, &always_hex)).await;
    assert!(status != 200 || !complete, "the blob completed");
    let wrong = got.iter().zip(always_cut.iter()).position(|(a, b)| a != b);
    assert_eq!(wrong, None, "a wrong byte reached the client");
    assert_eq!(
        gets(&up, &blob_path(&always_hex)),
        vec![
            None,
            Some("bytes=100000-".to_owned()),
            Some("bytes=200000-".to_owned()),
            Some("bytes=300000-".to_owned()),
        ]
    );
    assert!(!store_has_blob(&berth.store_dir(), &always_hex));

    let (status, _, complete) = fetch_partial(&blob_url(&berth, &stuck_hex)).await;
    assert!(status != 200 || !complete, "the blob completed");
    assert_eq!(
        gets(&up, &blob_path(&stuck_hex)),
        vec![None, Some("bytes=300000-".to_owned())]
    );
    assert!(!store_has_blob(&berth.store_dir(), &stuck_hex));
}

/// An upstream that is down (every request 503) opens berth's circuit breaker after 5
/// failed requests: then requests for uncached content fail without reaching it, a cached
/// tag past its TTL is served stale and a manifest by digest from the store. After the
/// cool-down (berth's clock moved) one probe goes through; it fails and the breaker opens
/// again, for longer; once the upstream is back and that cool-down is over, the next
/// request goes through and requests work again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_upstream_opens_the_circuit_and_cached_content_is_still_served() {
    let up = FakeUpstream::start().await;
    let manifest =
        br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}"#;
    let manifest_hex = sha256_hex(manifest);
    up.route(
        "/v2/library/app/manifests/v1",
        Behaviour::Body {
            bytes: std::sync::Arc::new(manifest.to_vec()),
            content_type: "application/vnd.oci.image.manifest.v1+json",
            chunk: 1024,
            pause: Duration::ZERO,
        },
    );
    let bytes = random_bytes(51, 200_000);
    let hex = sha256_hex(&bytes);
    up.route(&blob_path(&hex), Behaviour::blob(bytes.clone()));
    let berth = Berth::start(&[Upstream::new("docker.io", &up.url(), &["library/**"])
        .read_timeout("3s")
        .tag_ttl("10s")])
    .await;
    let tag_path = "/v2/docker.io/library/app/manifests/v1";
    let gauge = "berth_upstream_circuit_open{upstream=\"docker.io\"}";
    let blob = blob_url(&berth, &hex);

    let (status, _, body) = berth.fetch(tag_path, &[]).await;
    assert_eq!((status, &body[..]), (200, &manifest[..]));
    assert_eq!(metric(&berth, gauge).await, Some(0.0));

    up.outage(Some(503));
    for i in 0..5 {
        let before = up.total_requests();
        let (status, _) = fetch(&blob).await;
        assert!(matches!(status, 502..=504), "request {i}: {status}");
        assert!(
            up.total_requests() > before,
            "request {i} never reached the upstream"
        );
    }
    assert_eq!(metric(&berth, gauge).await, Some(1.0));
    assert!(berth.log().contains("upstream circuit open"));

    // Open: nothing reaches the upstream.
    let seen = up.total_requests();
    let (status, body) = fetch(&blob).await;
    assert!(matches!(status, 502..=504), "{status}");
    let body = String::from_utf8(body.unwrap()).unwrap();
    assert!(body.contains("circuit open"), "{body}");
    let (status, _) = fetch(&format!(
        "{}/v2/docker.io/library/app/manifests/v2",
        berth.url()
    ))
    .await;
    assert!(matches!(status, 502..=504), "{status}");
    // Past the tag's TTL, within the cool-down: the cached tag is served stale.
    berth.advance_clock(Duration::from_secs(11)).await;
    let (status, h, body) = berth.fetch(tag_path, &[]).await;
    assert_eq!((status, &body[..]), (200, &manifest[..]));
    let warning = h.get("warning").expect("a stale tag has a Warning");
    assert!(warning.to_str().unwrap().contains("110"), "{warning:?}");
    let (status, _, body) = berth
        .fetch(
            &format!("/v2/docker.io/library/app/manifests/sha256:{manifest_hex}"),
            &[],
        )
        .await;
    assert_eq!((status, &body[..]), (200, &manifest[..]));
    assert_eq!(up.total_requests(), seen, "a request reached the upstream");

    // The cool-down (30 s) is over: one probe goes; it fails, and the breaker opens again.
    berth.advance_clock(Duration::from_secs(20)).await;
    let (status, _) = fetch(&blob).await;
    assert!(matches!(status, 502..=504), "{status}");
    assert!(up.total_requests() > seen, "no probe reached the upstream");
    let seen = up.total_requests();
    let (status, _) = fetch(&blob).await;
    assert!(matches!(status, 502..=504), "{status}");
    // The upstream is back, but the second cool-down (60 s) is not over.
    up.outage(None);
    let (status, _) = fetch(&blob).await;
    assert!(matches!(status, 502..=504), "{status}");
    assert_eq!(up.total_requests(), seen, "a request reached the upstream");
    assert_eq!(metric(&berth, gauge).await, Some(1.0));

    berth.advance_clock(Duration::from_secs(61)).await;
    let (status, body) = fetch(&blob).await;
    assert_eq!((status, body.unwrap()), (200, bytes));
    assert_eq!(metric(&berth, gauge).await, Some(0.0));
    assert!(berth.log().contains("upstream circuit closed"));
    let (status, h, body) = berth.fetch(tag_path, &[]).await;
    assert_eq!((status, &body[..]), (200, &manifest[..]));
    assert!(h.get("warning").is_none(), "revalidated, not stale: {h:?}");
}
