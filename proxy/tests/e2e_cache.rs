//! End-to-end tests of berth's caching contract against a real docker-registry 2.8 (and,
//! for blob redirects, the hand-written fake): tag freshness, ranges, persistence across
//! restarts, coalesced manifest misses, token caching, redirects, request validation and
//! unknown manifests. See `support/mod.rs` for the harness.
//!
//! Run: `cargo test --release -p berth-proxy --test e2e_cache`.

mod fake;
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use fake::{Behaviour, FakeUpstream};
use support::*;

const ACCEPT: [(&str, &str); 1] = [("Accept", ACCEPT_ALL)];

/// The registry requests logged after the first `since`.
fn after(reqs: &[LoggedRequest], since: usize) -> Vec<LoggedRequest> {
    reqs[since.min(reqs.len())..].to_vec()
}

fn count(reqs: &[LoggedRequest], method: &str, path: &str) -> usize {
    reqs.iter()
        .filter(|r| r.method == method && r.path == path)
        .count()
}

/// 1. A tag is fetched once, served without asking within its TTL, revalidated with one
///    `HEAD` after it, and re-fetched when the upstream moved it.
#[tokio::test(flavor = "multi_thread")]
async fn tag_freshness_follows_the_ttl_precisely() {
    within(180, "tag_freshness_follows_the_ttl_precisely", async {
        let reg = Registry::start().await;
        let old = make_single(11, 20_000);
        let new = make_single(12, 30_000);
        assert_ne!(old.digest, new.digest);
        let push = reg.pusher(None);
        push.image("library/fresh", Some("v1"), &old).await;
        // berth's clock is the test's (`Berth::advance_clock`): real time never reaches
        // the TTL here (the whole test is bounded to 3 minutes), so every step is exact.
        let berth =
            Berth::start(&[Upstream::new("docker.io", &reg.url(), &["library/**"]).tag_ttl("1h")])
                .await;
        let path = "/v2/docker.io/library/fresh/manifests/v1";
        let up_tag = "/v2/library/fresh/manifests/v1";
        let base = reg.requests().await.len();

        // First GET (a miss), and at once a second one (within the TTL).
        let (status, h, body) = berth.fetch(path, &ACCEPT).await;
        assert_eq!(
            status,
            200,
            "first GET {path}: {}",
            String::from_utf8_lossy(&body)
        );
        assert_eq!(body, old.manifest, "first GET {path}: bytes");
        assert_eq!(
            header_str(&h, "docker-content-digest"),
            Some(old.digest.as_str())
        );
        let (status, h, body) = berth.fetch(path, &ACCEPT).await;
        assert_eq!(status, 200, "second GET {path}");
        assert_eq!(body, old.manifest, "second GET {path}: bytes");
        assert_eq!(
            header_str(&h, "docker-content-digest"),
            Some(old.digest.as_str())
        );
        assert!(h.get("warning").is_none(), "a fresh tag carries a Warning");
        let reqs = reg.requests().await;
        let new_reqs = after(&reqs, base);
        assert_eq!(
            count(&new_reqs, "GET", up_tag),
            1,
            "the first GET of an uncached tag should GET it upstream exactly once: {new_reqs:#?}"
        );
        assert_eq!(
            new_reqs.len(),
            1,
            "a GET within the tag's TTL reached the upstream (only the first GET should \
             have): {new_reqs:#?}"
        );

        // 55 minutes later (plus the real time, under 5 minutes), still within the TTL.
        berth.advance_clock(Duration::from_secs(55 * 60)).await;
        let base = reqs.len();
        let (status, h, body) = berth.fetch(path, &ACCEPT).await;
        assert_eq!(status, 200, "GET {path} near the end of the TTL");
        assert_eq!(
            body, old.manifest,
            "GET {path} near the end of the TTL: bytes"
        );
        assert!(h.get("warning").is_none(), "a fresh tag carries a Warning");
        let reqs = reg.requests().await;
        let new_reqs = after(&reqs, base);
        assert!(
            new_reqs.is_empty(),
            "a GET 55 minutes into a 1 h TTL reached the upstream: {new_reqs:#?}"
        );

        // Past the TTL (65 minutes), the tag unchanged upstream: one HEAD, no GET.
        berth.advance_clock(Duration::from_secs(10 * 60)).await;
        let base = reqs.len();
        let (status, h, body) = berth.fetch(path, &ACCEPT).await;
        assert_eq!(status, 200, "GET {path} past the TTL");
        assert_eq!(body, old.manifest, "GET {path} past the TTL: bytes");
        assert_eq!(
            header_str(&h, "docker-content-digest"),
            Some(old.digest.as_str())
        );
        assert!(
            h.get("warning").is_none(),
            "a revalidated tag carries a Warning: {h:?}"
        );
        let reqs = reg.requests().await;
        let new_reqs = after(&reqs, base);
        assert_eq!(
            count(&new_reqs, "HEAD", up_tag),
            1,
            "past the TTL, berth should revalidate with exactly one HEAD of {up_tag}: {new_reqs:#?}"
        );
        assert_eq!(
            count(&new_reqs, "GET", up_tag),
            0,
            "past the TTL with the tag unchanged, berth fetched the manifest again: {new_reqs:#?}"
        );

        // The tag moves upstream to a different image; past the TTL berth serves the new one.
        push.image("library/fresh", Some("v1"), &new).await;
        berth.advance_clock(Duration::from_secs(61 * 60)).await;
        let base = reg.requests().await.len();
        let (status, h, body) = berth.fetch(path, &ACCEPT).await;
        assert_eq!(
            status,
            200,
            "GET {path} after the tag moved: {}",
            String::from_utf8_lossy(&body)
        );
        assert_eq!(
            header_str(&h, "docker-content-digest"),
            Some(new.digest.as_str()),
            "after the tag moved upstream and its TTL passed, berth still names the old digest"
        );
        assert_eq!(body, new.manifest, "GET {path} after the tag moved: bytes");
        assert!(h.get("warning").is_none(), "{h:?}");
        let new_reqs = after(&reg.requests().await, base);
        assert_eq!(
            count(&new_reqs, "HEAD", up_tag),
            1,
            "a moved tag: one HEAD expected: {new_reqs:#?}"
        );
        assert_eq!(
            count(&new_reqs, "GET", up_tag),
            1,
            "a moved tag: one GET of the new manifest expected: {new_reqs:#?}"
        );
        // And now the new one is the fresh one.
        let (status, _, body) = berth.fetch(path, &ACCEPT).await;
        assert_eq!(status, 200);
        assert_eq!(body, new.manifest, "GET {path} again after the move");

        // The old manifest is still served by digest, from berth's store.
        let by_digest = format!("/v2/docker.io/library/fresh/manifests/{}", old.digest);
        let (status, h, body) = berth.fetch(&by_digest, &ACCEPT).await;
        assert_eq!(
            status,
            200,
            "GET {by_digest}: {}",
            String::from_utf8_lossy(&body)
        );
        assert_eq!(body, old.manifest, "GET {by_digest}: bytes");
        assert_eq!(
            header_str(&h, "docker-content-digest"),
            Some(old.digest.as_str())
        );
        let up_digest = format!("/v2/library/fresh/manifests/{}", old.digest);
        let all = reg.requests().await;
        assert_eq!(
            count(&all, "GET", &up_digest),
            0,
            "the old manifest was fetched by digest upstream although berth had it"
        );
    })
    .await;
}

/// One range request's checks: status 206, Content-Range, Content-Length and the bytes.
async fn assert_range(
    berth: &Berth,
    blob: &Blob,
    range: &str,
    start: usize,
    end_inclusive: usize,
    what: &str,
) {
    let size = blob.bytes.len();
    let path = format!("/v2/docker.io/library/ranges/blobs/{}", blob.digest);
    let (status, h, body) = berth.fetch(&path, &[("Range", range)]).await;
    assert_eq!(
        status,
        206,
        "{what}: GET {path} with Range {range}: {}",
        String::from_utf8_lossy(&body[..body.len().min(300)])
    );
    assert_eq!(
        header_str(&h, "content-range"),
        Some(format!("bytes {start}-{end_inclusive}/{size}").as_str()),
        "{what}: Range {range}: Content-Range"
    );
    let len = end_inclusive + 1 - start;
    assert_eq!(
        header_str(&h, "content-length"),
        Some(len.to_string().as_str()),
        "{what}: Range {range}: Content-Length"
    );
    assert_eq!(body.len(), len, "{what}: Range {range}: body length");
    assert!(
        body[..] == blob.bytes[start..=end_inclusive],
        "{what}: Range {range}: wrong bytes"
    );
}

async fn assert_unsatisfiable(berth: &Berth, blob: &Blob, what: &str) {
    let size = blob.bytes.len();
    let path = format!("/v2/docker.io/library/ranges/blobs/{}", blob.digest);
    let range = format!("bytes={size}-");
    let (status, h, body) = berth.fetch(&path, &[("Range", range.as_str())]).await;
    assert_eq!(
        status,
        416,
        "{what}: GET {path} with Range {range}: {}",
        String::from_utf8_lossy(&body[..body.len().min(300)])
    );
    assert_eq!(
        header_str(&h, "content-range"),
        Some(format!("bytes */{size}").as_str()),
        "{what}: Range {range}: Content-Range"
    );
}

/// A HEAD over a raw connection: 200, Content-Length = size, the digest, and no body.
async fn assert_blob_head(berth: &Berth, blob: &Blob, what: &str) {
    let path = format!("/v2/docker.io/library/ranges/blobs/{}", blob.digest);
    let (head, rest) = raw_http(
        berth.port(),
        &format!(
            "HEAD {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            berth.host()
        ),
    )
    .await;
    let status_line = head.lines().next().unwrap_or("");
    assert!(
        status_line.starts_with("HTTP/1.1 200"),
        "{what}: HEAD {path}: {head}"
    );
    assert_eq!(
        raw_header(&head, "content-length"),
        Some(blob.bytes.len().to_string().as_str()),
        "{what}: HEAD {path}: Content-Length\n{head}"
    );
    assert_eq!(
        raw_header(&head, "docker-content-digest"),
        Some(blob.digest.as_str()),
        "{what}: HEAD {path}: Docker-Content-Digest\n{head}"
    );
    assert!(
        rest.is_empty(),
        "{what}: HEAD {path} was followed by {} body bytes",
        rest.len()
    );
}

/// 2. Ranges of a cached blob and of blobs berth has not fetched yet.
#[tokio::test(flavor = "multi_thread")]
async fn range_requests_on_cached_and_uncached_blobs() {
    within(180, "range_requests_on_cached_and_uncached_blobs", async {
        let reg = Registry::start().await;
        let blobs: Vec<Blob> = (0..5)
            .map(|i| {
                Blob::new(
                    "application/octet-stream",
                    random_bytes(21 + i, 150_000 + 1000 * i as usize),
                )
            })
            .collect();
        let push = reg.pusher(None);
        for b in &blobs {
            push.blob("library/ranges", b).await;
        }
        let berth = Berth::start(&[Upstream::new("docker.io", &reg.url(), &["library/**"])]).await;

        // A cached blob.
        let cached = &blobs[0];
        let path = format!("/v2/docker.io/library/ranges/blobs/{}", cached.digest);
        let (status, _, body) = berth.fetch(&path, &[]).await;
        assert_eq!(status, 200, "GET {path}");
        assert_eq!(digest_of(&body), cached.digest);
        let size = cached.bytes.len();
        assert_range(&berth, cached, "bytes=10-99", 10, 99, "cached").await;
        assert_range(&berth, cached, "bytes=-5", size - 5, size - 1, "cached").await;
        assert_unsatisfiable(&berth, cached, "cached").await;
        assert_blob_head(&berth, cached, "cached").await;

        // Blobs not cached yet: each case is the first request for its blob.
        let [_, u1, u2, u3, u4] = &blobs[..] else {
            unreachable!()
        };
        assert_range(&berth, u1, "bytes=10-99", 10, 99, "uncached").await;
        let s2 = u2.bytes.len();
        assert_range(&berth, u2, "bytes=-5", s2 - 5, s2 - 1, "uncached").await;
        assert_unsatisfiable(&berth, u3, "uncached").await;
        assert_blob_head(&berth, u4, "uncached").await;

        // Every one is then served whole and correct, fetched upstream once.
        for b in [u1, u2, u3, u4] {
            let path = format!("/v2/docker.io/library/ranges/blobs/{}", b.digest);
            let (status, h, body) = berth.fetch(&path, &[]).await;
            assert_eq!(status, 200, "GET {path}");
            assert_eq!(
                header_str(&h, "content-length"),
                Some(b.bytes.len().to_string().as_str())
            );
            assert_eq!(digest_of(&body), b.digest, "GET {path}: content");
        }
        let reqs = reg.requests().await;
        for b in [cached, u1, u2, u3, u4] {
            let up = format!("/v2/library/ranges/blobs/{}", b.digest);
            assert_eq!(
                count(&reqs, "GET", &up),
                1,
                "{up} should be fetched upstream exactly once: {reqs:#?}"
            );
        }
    })
    .await;
}

/// Reads one response from a kept-alive connection: the head, then exactly
/// Content-Length body bytes (none after a HEAD).
async fn read_response(sock: &mut tokio::net::TcpStream, head_request: bool) -> (String, Vec<u8>) {
    let mut pending = Vec::new();
    let (head, body) = read_next(sock, &mut pending, head_request).await;
    assert!(pending.is_empty(), "more bytes than Content-Length: {head}");
    (head, body)
}

/// A stored blob large enough to be sent with sendfile: whole, as ranges and as HEAD, one
/// after the other on one kept-alive connection, with exact framing.
#[tokio::test(flavor = "multi_thread")]
async fn large_stored_blobs_keep_the_connection_and_exact_bytes() {
    within(
        120,
        "large_stored_blobs_keep_the_connection_and_exact_bytes",
        async {
            use tokio::io::AsyncWriteExt;
            let reg = Registry::start().await;
            let blob = Blob::new(
                "application/octet-stream",
                random_bytes(77, (3 << 20) + 123),
            );
            reg.pusher(None).blob("library/large", &blob).await;
            let berth =
                Berth::start(&[Upstream::new("docker.io", &reg.url(), &["library/**"])]).await;
            let path = format!("/v2/docker.io/library/large/blobs/{}", blob.digest);
            // The first GET fills the cache; every request below is served from the store.
            let (status, _, body) = berth.fetch(&path, &[]).await;
            assert_eq!((status, digest_of(&body)), (200, blob.digest.clone()));

            let size = blob.bytes.len();
            let mut sock = tokio::net::TcpStream::connect(("127.0.0.1", berth.port()))
                .await
                .unwrap();
            let cases: [(&str, Option<&str>, u16, std::ops::Range<usize>); 5] = [
                ("GET", None, 200, 0..size),
                ("GET", Some("bytes=1000-525287"), 206, 1000..525_288),
                ("HEAD", None, 200, 0..0),
                ("GET", Some("bytes=-300000"), 206, size - 300_000..size),
                ("GET", Some("bytes=5-14"), 206, 5..15),
            ];
            for (i, (method, range, status, want)) in cases.into_iter().enumerate() {
                let range_line = range.map(|r| format!("Range: {r}\r\n")).unwrap_or_default();
                let request = format!(
                    "{method} {path} HTTP/1.1\r\nHost: {}\r\n{range_line}\r\n",
                    berth.host()
                );
                sock.write_all(request.as_bytes()).await.unwrap();
                let (head, body) = read_response(&mut sock, method == "HEAD").await;
                let what = format!("request {i} on one connection: {method} {range:?}");
                assert!(
                    head.starts_with(&format!("HTTP/1.1 {status}")),
                    "{what}: {head}"
                );
                assert_ne!(
                    raw_header(&head, "connection").map(str::to_ascii_lowercase),
                    Some("close".to_owned()),
                    "{what}: berth closes the connection: {head}"
                );
                if method == "HEAD" {
                    assert_eq!(
                        raw_header(&head, "content-length"),
                        Some(size.to_string().as_str()),
                        "{what}"
                    );
                } else {
                    assert!(body[..] == blob.bytes[want], "{what}: wrong bytes");
                }
            }
            assert_eq!(
                reg.count("GET", &format!("/v2/library/large/blobs/{}", blob.digest))
                    .await,
                1,
                "the blob should have been fetched upstream once"
            );
        },
    )
    .await;
}

/// Waits (bounded) until every blob of `index` is published in berth's store.
async fn wait_for_store(berth: &Berth, index: &Index) {
    let deadline = Instant::now() + Duration::from_secs(20);
    for blob in index.blobs() {
        let hex = blob.hex();
        let file = berth
            .store_dir()
            .join("blobs/sha256")
            .join(&hex[..2])
            .join(hex);
        while !file.exists() {
            assert!(
                Instant::now() < deadline,
                "blob {} was never published at {}",
                blob.digest,
                file.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Pulls everything again (upstream down) and checks it all came from the store.
async fn pull_from_store_only(berth: &Berth, index: &Index, mark: usize, when: &str) {
    pull_index_through(berth, "docker.io", "library/persist", "v1", index, &[]).await;
    let path = "/v2/docker.io/library/persist/manifests/v1";
    let (status, h, body) = berth.fetch(path, &ACCEPT).await;
    assert_eq!(status, 200, "{when}: GET {path}");
    assert_eq!(body, index.bytes, "{when}: GET {path}");
    assert!(
        h.get("warning").is_none(),
        "{when}: the tag (within its TTL) was served as stale: {h:?}"
    );
    let r = berth.head(path, &ACCEPT).await;
    assert_eq!(r.status().as_u16(), 200, "{when}: HEAD {path}");
    assert_eq!(
        header_str(r.headers(), "docker-content-digest"),
        Some(index.digest.as_str())
    );
    // Every request since the restart was a hit.
    let log = berth.log_since(mark).replace('"', "");
    let access: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("berth::access") && l.contains("/v2/docker.io/"))
        .collect();
    assert!(
        access.len() > index.blobs().len(),
        "{when}: too few access lines in berth's log:\n{log}"
    );
    for l in &access {
        assert!(
            l.contains("outcome=hit"),
            "{when}: not served from the store: {l}"
        );
    }
}

/// 3. Everything cached survives a restart of berth (graceful, then a crash) and is served
///    with the upstream gone.
#[tokio::test(flavor = "multi_thread")]
async fn the_cache_persists_across_restarts() {
    within(240, "the_cache_persists_across_restarts", async {
        let mut reg = Registry::start().await;
        let multi = make_multiarch(31, 150_000);
        reg.pusher(None)
            .index("library/persist", "v1", &multi)
            .await;
        let mut berth =
            Berth::start(&[Upstream::new("docker.io", &reg.url(), &["library/**"]).tag_ttl("5m")])
                .await;
        pull_index_through(&berth, "docker.io", "library/persist", "v1", &multi, &[]).await;
        wait_for_store(&berth, &multi).await;
        let before = reg.requests().await;
        assert!(
            before
                .iter()
                .any(|r| r.path.starts_with("/v2/library/persist/")
                    && r.user_agent.starts_with("berth/")),
            "the first pull never reached the registry: {before:#?}"
        );

        // Graceful stop; the upstream goes away; berth starts again on the same store.
        berth.stop().await;
        reg.stop();
        let mark = berth.log_len();
        berth.restart().await;
        pull_from_store_only(&berth, &multi, mark, "after SIGTERM and a restart").await;

        // A crash (SIGKILL) and another restart.
        berth.kill();
        let mark = berth.log_len();
        berth.restart().await;
        pull_from_store_only(&berth, &multi, mark, "after SIGKILL and a restart").await;
    })
    .await;
}

/// GETs `path` from berth `n` times at once, each on its own client; returns
/// (status, Docker-Content-Digest, body) of each.
async fn herd(berth: &Berth, path: &str, n: usize) -> Vec<(u16, Option<String>, bytes::Bytes)> {
    let barrier = Arc::new(tokio::sync::Barrier::new(n));
    let mut tasks = Vec::new();
    for i in 0..n {
        let url = format!("{}{path}", berth.url());
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            barrier.wait().await;
            let resp = client
                .get(&url)
                .header("Accept", ACCEPT_ALL)
                .send()
                .await
                .unwrap_or_else(|e| panic!("request {i} of GET {url}: {e}"));
            let status = resp.status().as_u16();
            let digest = header_str(resp.headers(), "docker-content-digest").map(str::to_owned);
            let body = resp
                .bytes()
                .await
                .unwrap_or_else(|e| panic!("request {i} of GET {url}: body: {e}"));
            (status, digest, body)
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("a herd task panicked"));
    }
    out
}

/// 4. 30 concurrent GETs of an uncached tag, and of an uncached manifest digest: one
///    upstream GET each, 30 identical, correct bodies.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_manifest_misses_fetch_once() {
    within(180, "concurrent_manifest_misses_fetch_once", async {
        let reg = Registry::start().await;
        let img = make_single(41, 20_000);
        let multi = make_multiarch(42, 20_000);
        let push = reg.pusher(None);
        push.image("library/herd", Some("v1"), &img).await;
        push.index("library/herd2", "v1", &multi).await;
        let berth = Berth::start(&[Upstream::new("docker.io", &reg.url(), &["library/**"])]).await;

        let child = multi.image("arm64");
        let cases = [
            (
                "/v2/docker.io/library/herd/manifests/v1".to_owned(),
                "/v2/library/herd/manifests/v1".to_owned(),
                &img.manifest,
                &img.digest,
            ),
            (
                format!("/v2/docker.io/library/herd2/manifests/{}", child.digest),
                format!("/v2/library/herd2/manifests/{}", child.digest),
                &child.manifest,
                &child.digest,
            ),
        ];
        // Both cases run before anything is asserted, so a failure reports both.
        let mut counts = Vec::new();
        for (path, up, bytes, digest) in &cases {
            let results = herd(&berth, path, 30).await;
            for (i, (status, d, body)) in results.iter().enumerate() {
                assert_eq!(
                    *status,
                    200,
                    "request {i} of GET {path}: {}",
                    String::from_utf8_lossy(body)
                );
                assert_eq!(body, *bytes, "request {i} of GET {path}: bytes");
                assert_eq!(
                    d.as_deref(),
                    Some(digest.as_str()),
                    "request {i} of GET {path}: digest"
                );
            }
            counts.push((path, count(&reg.requests().await, "GET", up)));
        }
        let wrong: Vec<_> = counts.iter().filter(|(_, n)| *n != 1).collect();
        assert!(
            wrong.is_empty(),
            "30 concurrent GETs should cost one upstream GET each; upstream GETs per path: \
             {counts:#?}"
        );
    })
    .await;
}

/// 5. berth keeps its upstream token: one token request for a whole pull.
#[tokio::test(flavor = "multi_thread")]
async fn tokens_are_cached_until_they_expire() {
    within(180, "tokens_are_cached_until_they_expire", async {
        let ts = TokenServer::start_anonymous();
        let reg = Registry::start_with_token_auth(&ts).await;
        let img = make_single(51, 40_000);
        reg.pusher(Some(ts.mint("library/tok", &["pull", "push"])))
            .image("library/tok", Some("v1"), &img)
            .await;
        let berth = Berth::start(&[Upstream::new("docker.io", &reg.url(), &["library/**"])]).await;
        assert!(ts.requests().is_empty(), "{:?}", ts.requests());

        let path = "/v2/docker.io/library/tok/manifests/v1";
        let (status, _, body) = berth.fetch(path, &ACCEPT).await;
        assert_eq!(
            status,
            200,
            "GET {path}: {}",
            String::from_utf8_lossy(&body)
        );
        assert_eq!(body, img.manifest);
        for blob in img.blobs() {
            let path = format!("/v2/docker.io/library/tok/blobs/{}", blob.digest);
            let (status, _, body) = berth.fetch(&path, &[]).await;
            assert_eq!(status, 200, "GET {path}");
            assert_eq!(digest_of(&body), blob.digest, "GET {path}");
        }

        let scope = "repository:library/tok:pull";
        let treqs = ts.requests();
        let for_scope = treqs
            .iter()
            .filter(|t| t.scopes.iter().any(|s| s == scope))
            .count();
        assert_eq!(
            for_scope, 1,
            "berth should ask for a {scope} token once and reuse it: {treqs:#?}"
        );
        // The registry served the manifest and every blob to berth, and challenged it once.
        let reqs = reg.requests().await;
        let ours: Vec<&LoggedRequest> = reqs
            .iter()
            .filter(|r| {
                r.path.starts_with("/v2/library/tok/") && r.user_agent.starts_with("berth/")
            })
            .collect();
        let ok = ours.iter().filter(|r| r.status == 200).count();
        assert_eq!(
            ok,
            1 + img.blobs().len(),
            "the registry did not serve the manifest and each blob to berth: {ours:#?}"
        );
        let challenged = ours.iter().filter(|r| r.status == 401).count();
        assert_eq!(
            challenged, 1,
            "berth went without its token more than once: {ours:#?}"
        );
    })
    .await;
}

/// 6. A blob redirected to a storage host is fetched from there, without the upstream's
///    Authorization.
#[tokio::test(flavor = "multi_thread")]
async fn blob_redirects_are_followed_without_credentials() {
    within(120, "blob_redirects_are_followed_without_credentials", async {
        let registry = FakeUpstream::start().await;
        let storage = FakeUpstream::start().await;
        let bytes = random_bytes(61, 300_000);
        let hex = sha256_hex(&bytes);
        const TOKEN: &str = "fake-registry-token-61";
        registry.route(
            "/token",
            Behaviour::Body {
                bytes: Arc::new(
                    serde_json::to_vec(&serde_json::json!({"token": TOKEN, "expires_in": 300}))
                        .unwrap(),
                ),
                content_type: "application/json",
                chunk: 64 * 1024,
                pause: Duration::ZERO,
            },
        );
        let blob_path = format!("/v2/library/app/blobs/sha256:{hex}");
        let storage_path = format!("/storage/{hex}");
        registry.route(
            &blob_path,
            Behaviour::RequireAuth {
                challenge: format!(
                    "Bearer realm=\"{}/token\",service=\"fake\",scope=\"repository:library/app:pull\"",
                    registry.url()
                ),
                then: Box::new(Behaviour::Redirect(format!(
                    "{}{storage_path}?X-Signature=abc123",
                    storage.url()
                ))),
            },
        );
        storage.route(&storage_path, Behaviour::blob(bytes.clone()));
        let berth = Berth::start(&[Upstream::new("docker.io", &registry.url(), &["library/**"])
            .read_timeout("5s")])
        .await;

        let path = format!("/v2/docker.io/library/app/blobs/sha256:{hex}");
        let (status, h, body) = berth.fetch(&path, &[]).await;
        assert_eq!(
            status,
            200,
            "GET {path}: {}",
            String::from_utf8_lossy(&body[..body.len().min(500)])
        );
        assert_eq!(body.len(), bytes.len(), "GET {path}: length");
        assert_eq!(sha256_hex(&body), hex, "GET {path}: content");
        assert_eq!(
            header_str(&h, "content-length"),
            Some(bytes.len().to_string().as_str())
        );

        // berth had a credential for the registry and used it there...
        let at_registry = registry.requests();
        assert!(
            at_registry
                .iter()
                .any(|r| r.path == blob_path
                    && r.header("authorization") == Some(&format!("Bearer {TOKEN}"))),
            "berth never sent its bearer token to the registry: {at_registry:#?}"
        );
        // ...and followed the redirect without it.
        let at_storage = storage.requests();
        assert_eq!(
            storage.count("GET", &storage_path),
            1,
            "the storage host should be asked once: {at_storage:#?}"
        );
        for r in &at_storage {
            assert_eq!(
                r.header("authorization"),
                None,
                "the registry's Authorization reached the storage host: {r:#?}"
            );
            assert!(
                !r.headers.iter().any(|(_, v)| v.contains(TOKEN)),
                "the registry's token reached the storage host: {r:#?}"
            );
        }

        // Cached: served again without either host.
        let (status, _, body) = berth.fetch(&path, &[]).await;
        assert_eq!(status, 200);
        assert_eq!(sha256_hex(&body), hex);
        assert_eq!(storage.count("GET", &storage_path), 1);
    })
    .await;
}

/// 7. Invalid names, digests and tags and unknown namespaces are answered before anything
///    is sent upstream.
#[tokio::test(flavor = "multi_thread")]
async fn invalid_requests_are_refused_without_upstream_traffic() {
    within(
        120,
        "invalid_requests_are_refused_without_upstream_traffic",
        async {
            let reg = Registry::start().await;
            let img = make_single(71, 5_000);
            reg.pusher(None)
                .image("library/ok", Some("latest"), &img)
                .await;
            let berth = Berth::start(&[
                Upstream::new("docker.io", &reg.url(), &["library/**"]),
                Upstream::new("ghcr.io", &reg.url(), &["team/**"]),
            ])
            .await;
            let baseline = reg.requests().await.len();

            let cases = [
                (
                    "/v2/docker.io/library/UPPER/manifests/latest",
                    400,
                    "NAME_INVALID",
                ),
                (
                    "/v2/docker.io/library/ok/manifests/sha256:zz",
                    400,
                    "DIGEST_INVALID",
                ),
                (
                    "/v2/docker.io/library/ok/blobs/notadigest",
                    400,
                    "DIGEST_INVALID",
                ),
                (
                    "/v2/docker.io/library/ok/manifests/-bad-tag",
                    404,
                    "MANIFEST_UNKNOWN",
                ),
                (
                    "/v2/library/ok/manifests/latest?ns=nowhere.example",
                    404,
                    "NAME_UNKNOWN",
                ),
            ];
            for (path, want_status, want_code) in cases {
                let (status, h, body) = berth.fetch(path, &ACCEPT).await;
                assert_eq!(
                    status,
                    want_status,
                    "GET {path}: {}",
                    String::from_utf8_lossy(&body)
                );
                assert!(
                    header_str(&h, "content-type").is_some_and(|t| t.contains("json")),
                    "GET {path}: Content-Type {:?}",
                    h.get("content-type")
                );
                let (code, message) = oci_error(&body, &format!("GET {path}"));
                assert_eq!(code, want_code, "GET {path}: {message}");
                if want_code == "NAME_UNKNOWN" {
                    for ns in ["docker.io", "ghcr.io"] {
                        assert!(
                            message.contains(ns),
                            "GET {path}: the message does not list upstream {ns}: {message}"
                        );
                    }
                }
                let r = berth.head(path, &ACCEPT).await;
                assert_eq!(r.status().as_u16(), want_status, "HEAD {path}");
            }
            let reqs = reg.requests().await;
            assert_eq!(
                reqs.len(),
                baseline,
                "invalid requests reached the upstream: {:#?}",
                &reqs[baseline..]
            );

            // Control: a valid request does reach the upstream.
            let (status, _, body) = berth
                .fetch("/v2/docker.io/library/ok/manifests/latest", &ACCEPT)
                .await;
            assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
            assert_eq!(body, img.manifest);
            assert!(
                reg.requests().await.len() > baseline,
                "the valid request did not reach the upstream"
            );
        },
    )
    .await;
}

/// 8. A tag (or digest) the upstream does not have is MANIFEST_UNKNOWN, and not cached.
#[tokio::test(flavor = "multi_thread")]
async fn unknown_manifests_are_manifest_unknown_and_not_cached() {
    within(
        120,
        "unknown_manifests_are_manifest_unknown_and_not_cached",
        async {
            let reg = Registry::start().await;
            let img = make_single(81, 5_000);
            reg.pusher(None)
                .image("library/known", Some("v1"), &img)
                .await;
            let berth =
                Berth::start(&[Upstream::new("docker.io", &reg.url(), &["library/**"])]).await;
            let missing_digest = digest_of(b"no such manifest, berth e2e");
            for reference in ["nope", missing_digest.as_str()] {
                let path = format!("/v2/docker.io/library/known/manifests/{reference}");
                let up = format!("/v2/library/known/manifests/{reference}");
                for attempt in 1..=2 {
                    let (status, h, body) = berth.fetch(&path, &ACCEPT).await;
                    assert_eq!(
                        status,
                        404,
                        "attempt {attempt}: GET {path}: {}",
                        String::from_utf8_lossy(&body)
                    );
                    assert!(
                        header_str(&h, "content-type").is_some_and(|t| t.contains("json")),
                        "GET {path}: Content-Type {:?}",
                        h.get("content-type")
                    );
                    let (code, message) =
                        oci_error(&body, &format!("attempt {attempt}: GET {path}"));
                    assert_eq!(code, "MANIFEST_UNKNOWN", "GET {path}: {message}");
                    let reqs = reg.requests().await;
                    assert_eq!(
                        count(&reqs, "GET", &up),
                        attempt,
                        "attempt {attempt}: each GET of an unknown manifest should ask the \
                         upstream (nothing cached): {reqs:#?}"
                    );
                }
            }
            // The repository itself works.
            let (status, _, body) = berth
                .fetch("/v2/docker.io/library/known/manifests/v1", &ACCEPT)
                .await;
            assert_eq!(status, 200);
            assert_eq!(body, img.manifest);
        },
    )
    .await;
}

/// 9. Range headers with huge or malformed numbers neither crash berth nor produce a
///    wrong 206: an end past the blob is clamped, a malformed spec is ignored (200).
#[tokio::test(flavor = "multi_thread")]
async fn huge_and_malformed_ranges_are_safe() {
    within(120, "huge_and_malformed_ranges_are_safe", async {
        let reg = Registry::start().await;
        let img = make_single(31, 50_000);
        reg.pusher(None)
            .image("library/ranges", Some("v1"), &img)
            .await;
        let berth = Berth::start(&[Upstream::new("docker.io", &reg.url(), &["library/**"])]).await;
        let blob = &img.config;
        let size = blob.bytes.len();
        assert_range(
            &berth,
            blob,
            "bytes=5-18446744073709551615",
            5,
            size - 1,
            "huge end",
        )
        .await;
        assert_range(
            &berth,
            blob,
            "bytes=0-18446744073709551615",
            0,
            size - 1,
            "huge end from 0",
        )
        .await;
        let path = format!("/v2/docker.io/library/ranges/blobs/{}", blob.digest);
        for malformed in ["bytes=x-1", "bytes=9-3", "bytes=0-99999999999999999999999"] {
            let (status, h, body) = berth.fetch(&path, &[("Range", malformed)]).await;
            assert_eq!(status, 200, "Range {malformed} should be ignored");
            assert!(h.get("content-range").is_none(), "Range {malformed}");
            assert_eq!(body, blob.bytes, "Range {malformed}: the whole blob");
        }
    })
    .await;
}

/// 10. A client that accepts fewer manifest types does not change what other clients
///     get for the same tag: each `Accept` variant is cached and revalidated on its own.
#[tokio::test(flavor = "multi_thread")]
async fn narrow_accept_clients_do_not_change_what_others_get() {
    within(
        120,
        "narrow_accept_clients_do_not_change_what_others_get",
        async {
            let reg = Registry::start().await;
            let multi = make_multiarch(32, 20_000);
            reg.pusher(None).index("library/narrow", "v1", &multi).await;
            let berth = Berth::start(&[
                Upstream::new("docker.io", &reg.url(), &["library/**"]).tag_ttl("1h")
            ])
            .await;
            let path = "/v2/docker.io/library/narrow/manifests/v1";
            let narrow = [("Accept", OCI_MANIFEST)];

            let (status, _, body) = berth.fetch(path, &ACCEPT).await;
            assert_eq!(status, 200);
            assert_eq!(body, multi.bytes);
            // docker-registry 2.8 has no OCI manifest to offer for an index tag: 404.
            let (status, _, body) = berth.fetch(path, &narrow).await;
            assert_eq!(status, 404, "{}", String::from_utf8_lossy(&body));
            assert_eq!(oci_error(&body, "narrow GET").0, "MANIFEST_UNKNOWN");
            let (status, _, body) = berth.fetch(path, &ACCEPT).await;
            assert_eq!((status, body), (200, multi.bytes.clone()));

            // Past the TTL, the narrow client asks first; the others still get the index.
            berth.advance_clock(Duration::from_secs(61 * 60)).await;
            let (status, _, _) = berth.fetch(path, &narrow).await;
            assert_eq!(status, 404);
            let (status, h, body) = berth.fetch(path, &ACCEPT).await;
            assert_eq!((status, body), (200, multi.bytes.clone()));
            assert_eq!(
                header_str(&h, "docker-content-digest"),
                Some(multi.digest.as_str())
            );
        },
    )
    .await;
}

/// Reads one response as [`read_response`] does, keeping in `pending` the bytes read past
/// it (the start of the next response to requests sent together).
async fn read_next(
    sock: &mut tokio::net::TcpStream,
    pending: &mut Vec<u8>,
    head_request: bool,
) -> (String, Vec<u8>) {
    use tokio::io::AsyncReadExt;
    let mut chunk = vec![0u8; 64 * 1024];
    let head_end = loop {
        if let Some(i) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = sock
            .read(&mut chunk)
            .await
            .expect("reading a response head");
        assert!(
            n > 0,
            "the connection closed before a response head: {pending:?}"
        );
        pending.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&pending[..head_end]).into_owned();
    let len: usize = if head_request {
        0
    } else {
        raw_header(&head, "content-length")
            .unwrap_or_else(|| panic!("no Content-Length: {head}"))
            .parse()
            .unwrap()
    };
    while pending.len() < head_end + len {
        let n = sock
            .read(&mut chunk)
            .await
            .expect("reading a response body");
        assert!(n > 0, "the connection closed in a response body: {head}");
        pending.extend_from_slice(&chunk[..n]);
    }
    let body = pending[head_end..head_end + len].to_vec();
    pending.drain(..head_end + len);
    (head, body)
}

/// Reads from `sock` until berth closes it, for at most 10 s (past that the test fails,
/// saying that berth should have closed it `what`): the bytes read, and how the read
/// ended.
async fn read_until_closed(
    sock: &mut tokio::net::TcpStream,
    what: &str,
) -> (Vec<u8>, std::io::Result<usize>) {
    use tokio::io::AsyncReadExt;
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(10), sock.read_to_end(&mut rest))
        .await
        .unwrap_or_else(|_| panic!("berth should close the connection {what}"));
    (rest, ended)
}

/// The response heads of `head` without `Date`, as lowercase name and value pairs.
fn head_fields(head: &str) -> Vec<(String, String)> {
    let mut fields: Vec<(String, String)> = head
        .split("\r\n")
        .skip(1)
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_ascii_lowercase(), v.to_owned()))
        .filter(|(k, _)| k != "date")
        .collect();
    fields.sort();
    fields
}

/// berth's front (`front.rs`) answers repeated manifest requests from the memo itself and
/// hands every other request to Pingora on the same connection. One kept-alive
/// connection goes back and forth between them: the answers are the same bytes and
/// headers whichever side gave them, requests sent together (pipelined) are all answered
/// in order, a head that arrives in pieces is read whole, `Connection: close` and
/// HTTP/1.0 close, and a head Pingora would refuse is refused.
#[tokio::test(flavor = "multi_thread")]
async fn one_connection_moves_between_the_memo_and_pingora() {
    within(
        180,
        "one_connection_moves_between_the_memo_and_pingora",
        async {
            use tokio::io::AsyncWriteExt;
            let reg = Registry::start().await;
            let image = make_single(23, 10_000);
            reg.pusher(None)
                .image("library/front", Some("v1"), &image)
                .await;
            let berth = Berth::start_with_env(
                &[Upstream::new("docker.io", &reg.url(), &["library/**"]).tag_ttl("1h")],
                &[("BERTH_THREADS", "1")],
            )
            .await;
            let host = berth.host();
            let manifest = "/v2/docker.io/library/front/manifests/v1";
            let ns_form = "/v2/library/front/manifests/v1?ns=docker.io";
            let blob = format!("/v2/docker.io/library/front/blobs/{}", image.config.digest);
            let req = |method: &str, path: &str, extra: &str| {
                format!(
                    "{method} {path} HTTP/1.1\r\nHost: {host}\r\nAccept: {ACCEPT_ALL}\r\n{extra}\r\n"
                )
            };
            let connect = async || {
                tokio::net::TcpStream::connect(("127.0.0.1", berth.port()))
                    .await
                    .unwrap()
            };
            let mut sock = connect().await;
            let mut pending = Vec::new();

            // The first answer is the cache's, through Pingora; it is what the memo keeps.
            sock.write_all(req("GET", manifest, "").as_bytes())
                .await
                .unwrap();
            let (first, body) = read_next(&mut sock, &mut pending, false).await;
            assert!(first.starts_with("HTTP/1.1 200"), "{first}");
            assert_eq!(body, image.manifest);
            let want = head_fields(&first);
            assert!(
                want.contains(&("connection".into(), "keep-alive".into())),
                "{first}"
            );
            assert!(
                want.contains(&("docker-content-digest".into(), image.digest.clone())),
                "{first}"
            );

            // Alternating: the memo's answers, and requests only Pingora's side answers.
            let steps: Vec<(String, &str, u16)> = vec![
                (req("GET", manifest, ""), "GET", 200),
                (req("HEAD", manifest, ""), "HEAD", 200),
                (req("GET", "/v2/", ""), "GET", 200),
                (req("GET", manifest, ""), "GET", 200),
                (req("GET", &blob, ""), "GET", 200),
                (req("GET", ns_form, ""), "GET", 200),
                (req("GET", ns_form, ""), "GET", 200),
                (req("GET", manifest, "Connection: keep-alive\r\n"), "GET", 200),
            ];
            for (i, (request, method, status)) in steps.iter().enumerate() {
                sock.write_all(request.as_bytes()).await.unwrap();
                let (head, body) = read_next(&mut sock, &mut pending, *method == "HEAD").await;
                let what = format!("request {i}: {}", request.lines().next().unwrap());
                assert!(
                    head.starts_with(&format!("HTTP/1.1 {status}")),
                    "{what}: {head}"
                );
                assert_eq!(
                    raw_header(&head, "connection"),
                    Some("keep-alive"),
                    "{what}: {head}"
                );
                if request.contains("/manifests/") {
                    let mut fields = head_fields(&head);
                    if request.contains("?ns=") {
                        let ns = ("oci-namespace".to_owned(), "docker.io".to_owned());
                        assert!(fields.contains(&ns), "{what}: {head}");
                        fields.retain(|f| *f != ns);
                    }
                    assert_eq!(fields, want, "{what}: not the headers of the first answer");
                    if *method == "GET" {
                        assert_eq!(body, image.manifest, "{what}: bytes");
                    }
                } else if request.contains("/blobs/") {
                    assert_eq!(body, image.config.bytes, "{what}: bytes");
                }
            }

            // Four requests in one write: each is answered, in order, on this connection.
            let batch = [
                req("GET", manifest, ""),
                req("GET", "/v2/", ""),
                req("HEAD", manifest, ""),
                req("GET", manifest, ""),
            ]
            .concat();
            sock.write_all(batch.as_bytes()).await.unwrap();
            for (i, head_only) in [false, false, true, false].into_iter().enumerate() {
                let (head, body) = read_next(&mut sock, &mut pending, head_only).await;
                assert!(head.starts_with("HTTP/1.1 200"), "pipelined {i}: {head}");
                assert_eq!(
                    raw_header(&head, "connection"),
                    Some("keep-alive"),
                    "pipelined {i}: {head}"
                );
                if i != 1 {
                    assert_eq!(head_fields(&head), want, "pipelined {i}");
                }
                if i == 3 {
                    assert_eq!(body, image.manifest, "pipelined {i}: bytes");
                }
            }

            // A head that arrives in pieces is read whole.
            let request = req("GET", manifest, "");
            for piece in request.as_bytes().chunks(17) {
                sock.write_all(piece).await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let (head, body) = read_next(&mut sock, &mut pending, false).await;
            assert_eq!(head_fields(&head), want, "a head in pieces");
            assert_eq!(body, image.manifest, "a head in pieces: bytes");

            // A client that asks for the connection to close gets its answer, then the close.
            sock.write_all(req("GET", manifest, "Connection: close\r\n").as_bytes())
                .await
                .unwrap();
            let (head, body) = read_next(&mut sock, &mut pending, false).await;
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            assert_eq!(raw_header(&head, "connection"), Some("close"), "{head}");
            assert_eq!(body, image.manifest);
            let (rest, ended) = read_until_closed(&mut sock, "after Connection: close").await;
            assert_eq!(
                (ended.unwrap(), pending.len()),
                (0, 0),
                "bytes after the last answer: {rest:?}"
            );

            // Each answer is logged once: the first as the miss it was, the rest as hits.
            let log = berth.log();
            let lines: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("berth::access") && l.contains(&format!("path={manifest} ")))
                .collect();
            assert_eq!(lines.len(), 10, "access log lines for {manifest}:\n{log}");
            let hits = lines.iter().filter(|l| l.contains("outcome=hit")).count();
            assert_eq!(hits, 9, "access log lines for {manifest}:\n{log}");
            assert_eq!(
                reg.count("GET", "/v2/library/front/manifests/v1").await,
                1,
                "the manifest should have been fetched upstream once"
            );

            // HTTP/1.0 without keep-alive: the answer says close, and closes; a request
            // sent after it is not answered.
            let mut sock = connect().await;
            let batch = format!("GET {manifest} HTTP/1.0\r\nAccept: {ACCEPT_ALL}\r\n\r\n")
                + &req("GET", manifest, "");
            sock.write_all(batch.as_bytes()).await.unwrap();
            let (head, body) = read_next(&mut sock, &mut pending, false).await;
            assert!(head.starts_with("HTTP/1.1 200"), "HTTP/1.0: {head}");
            assert_eq!(raw_header(&head, "connection"), Some("close"), "HTTP/1.0: {head}");
            assert_eq!(body, image.manifest, "HTTP/1.0: bytes");
            let (rest, ended) =
                read_until_closed(&mut sock, "of HTTP/1.0 after its answer").await;
            ended.unwrap();
            assert!(
                rest.is_empty() && pending.is_empty(),
                "the request after HTTP/1.0 was answered: {}",
                String::from_utf8_lossy(&rest)
            );

            // Two Host headers: Pingora refuses such a head, and so does the front.
            let mut sock = connect().await;
            sock.write_all(req("GET", manifest, "Host: elsewhere\r\n").as_bytes())
                .await
                .unwrap();
            let (rest, _) = read_until_closed(&mut sock, "of a head with two Host headers").await;
            assert!(
                !rest.starts_with(b"HTTP/1.1 200"),
                "a head with two Host headers got the manifest: {}",
                String::from_utf8_lossy(&rest)
            );
        },
    )
    .await;
}

/// berth keeps, per worker thread, the answers to repeated anonymous manifest requests
/// (`memo.rs`). With one worker thread every request reads that memo, so an answer kept
/// past its tag's TTL, or one a user's request left for anonymous clients, would show.
#[tokio::test(flavor = "multi_thread")]
async fn kept_answers_end_with_the_ttl_and_never_reach_other_clients() {
    within(
        180,
        "kept_answers_end_with_the_ttl_and_never_reach_other_clients",
        async {
            let reg = Registry::start().await;
            let old = make_single(21, 10_000);
            let new = make_single(22, 12_000);
            let push = reg.pusher(None);
            push.image("library/kept", Some("v1"), &old).await;
            push.image("library/secret", Some("v1"), &old).await;

            let dir = tempdir();
            let htpasswd = dir.path().join("htpasswd");
            std::fs::write(
                &htpasswd,
                format!("alice:{}\n", bcrypt::hash("pw-alice", 4).unwrap()),
            )
            .unwrap();
            let config = format!(
                r#"[auth]
htpasswd = {htpasswd:?}

[access]
[[access.repository]]
pattern = "docker.io/library/kept"
anonymous = ["read"]
[[access.repository]]
pattern = "**"
policies = [{{ users = ["alice"], actions = ["read"] }}]

{}"#,
                berth_config(&[
                    Upstream::new("docker.io", &reg.url(), &["library/**"]).tag_ttl("1h")
                ])
            );
            let berth = Berth::start_with_config(&config, &[("BERTH_THREADS", "1")]).await;

            // The same request, many times, in both forms: the same bytes and headers.
            for path in [
                "/v2/docker.io/library/kept/manifests/v1",
                "/v2/library/kept/manifests/v1?ns=docker.io",
            ] {
                for i in 0..4 {
                    let (status, h, body) = berth.fetch(path, &ACCEPT).await;
                    assert_eq!(status, 200, "GET {path} (#{i})");
                    assert_eq!(body, old.manifest, "GET {path} (#{i}): bytes");
                    assert_eq!(
                        header_str(&h, "docker-content-digest"),
                        Some(old.digest.as_str()),
                        "GET {path} (#{i})"
                    );
                    let ns = header_str(&h, "oci-namespace");
                    if path.contains("?ns=") {
                        assert_eq!(ns, Some("docker.io"), "GET {path} (#{i}): {h:?}");
                    } else {
                        assert_eq!(ns, None, "GET {path} (#{i}): {h:?}");
                    }
                }
            }

            // The tag moves upstream. Within the TTL the old answer stands; past it, the new.
            push.image("library/kept", Some("v1"), &new).await;
            let path = "/v2/docker.io/library/kept/manifests/v1";
            let (_, h, _) = berth.fetch(path, &ACCEPT).await;
            assert_eq!(
                header_str(&h, "docker-content-digest"),
                Some(old.digest.as_str())
            );
            berth.advance_clock(Duration::from_secs(61 * 60)).await;
            for i in 0..3 {
                let (status, h, body) = berth.fetch(path, &ACCEPT).await;
                assert_eq!(status, 200, "GET {path} past the TTL (#{i})");
                assert_eq!(
                    header_str(&h, "docker-content-digest"),
                    Some(new.digest.as_str()),
                    "GET {path} past the TTL (#{i}): the answer kept from before the TTL ended \
                 was served"
                );
                assert_eq!(body, new.manifest, "GET {path} past the TTL (#{i}): bytes");
            }

            // alice may read library/secret, anonymous clients may not: what alice was
            // answered is never given to a request without her credentials.
            let secret = "/v2/docker.io/library/secret/manifests/v1";
            let auth = basic_auth("alice", "pw-alice");
            for i in 0..3 {
                let (status, _, body) = berth
                    .fetch(secret, &[("Accept", ACCEPT_ALL), ("Authorization", &auth)])
                    .await;
                assert_eq!(status, 200, "alice GET {secret} (#{i})");
                assert_eq!(body, old.manifest, "alice GET {secret} (#{i}): bytes");
            }
            for i in 0..3 {
                let (status, _, body) = berth.fetch(secret, &ACCEPT).await;
                assert_eq!(
                    status,
                    401,
                    "anonymous GET {secret} after alice's (#{i}): {}",
                    String::from_utf8_lossy(&body)
                );
            }
        },
    )
    .await;
}

/// The access log names the method the client sent. A blob large enough for `sendfile`
/// (a fill in progress, then one from the store) is written past Pingora, which is told
/// the request was a HEAD; its line still says GET.
#[tokio::test(flavor = "multi_thread")]
async fn the_access_log_names_the_client_s_method_for_blobs_sent_with_sendfile() {
    within(
        120,
        "the_access_log_names_the_client_s_method_for_blobs_sent_with_sendfile",
        async {
            let reg = Registry::start().await;
            let img = make_single(41, 600_000);
            reg.pusher(None)
                .image("library/logged", Some("v1"), &img)
                .await;
            let berth =
                Berth::start(&[Upstream::new("docker.io", &reg.url(), &["library/**"])]).await;
            let layer = &img.layers[0].blob;
            assert!(
                layer.bytes.len() > 256 << 10,
                "the layer is too small for sendfile"
            );
            let path = format!("/v2/docker.io/library/logged/blobs/{}", layer.digest);
            // A miss, a hit, then a HEAD.
            for _ in 0..2 {
                let (status, _, body) = berth.fetch(&path, &[]).await;
                assert_eq!(status, 200, "GET {path}");
                assert!(body == layer.bytes, "GET {path}: not the layer's bytes");
            }
            assert_eq!(berth.head(&path, &[]).await.status().as_u16(), 200);
            let wanted = ["method=GET", "method=GET", "method=HEAD"];
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let log = berth.log();
                let methods: Vec<&str> = log
                    .lines()
                    .filter(|l| l.contains("berth::access") && l.contains(&format!("path={path} ")))
                    .filter_map(|l| l.split_whitespace().find(|w| w.starts_with("method=")))
                    .collect();
                if methods.len() >= wanted.len() || Instant::now() > deadline {
                    assert_eq!(methods, wanted, "access log lines for {path}:\n{log}");
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        },
    )
    .await;
}
