//! No stalls: garbage collection and pushes waiting for it never hold the async workers
//! that serve pulls. Against the `berth` binary, with Debian's docker-registry as the
//! upstream, and berth's `BERTH_TEST_GC_HOLD` hook to keep a collection in its exclusive
//! sweep for as long as the test needs.
//!
//! Run: `cargo test --release -p berth-proxy --test e2e_stalls`.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::*;

/// Polls `cond` until it holds, failing with `what` after `secs`.
async fn until(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// While a collection holds the GC lock and manifest pushes and a mount wait for it
/// (at least as many as berth has worker threads), cached pull-through manifests and
/// blobs keep being served, from the cache: every one of those answers comes before the
/// collection is released, and every push completes only after.
#[tokio::test(flavor = "multi_thread")]
async fn cache_hits_are_served_while_pushes_wait_for_garbage_collection() {
    within(
        240,
        "cache_hits_are_served_while_pushes_wait_for_garbage_collection",
        async {
            let reg = Registry::start().await;
            let cached = make_single(81, 200_000);
            reg.pusher(None)
                .image("library/hit", Some("v1"), &cached)
                .await;
            let hold = tempdir();
            let config = format!(
                "{}[server]\ngc_interval = \"200ms\"\ngc_grace = \"1h\"\n",
                berth_config(&[Upstream::new("docker.io", &reg.url(), &["library/**"])])
            );
            let hold_dir = hold.path().to_str().unwrap().to_owned();
            let berth =
                Berth::start_with_config(&config, &[("BERTH_TEST_GC_HOLD", &hold_dir)]).await;

            // Cache the image.
            let manifest_path = "/v2/docker.io/library/hit/manifests/v1";
            let (status, _, body) = berth
                .fetch(manifest_path, &[("Accept", OCI_MANIFEST)])
                .await;
            assert_eq!(status, 200);
            assert_eq!(body, cached.manifest);
            for b in cached.blobs() {
                let (status, _, body) = berth
                    .fetch(
                        &format!("/v2/docker.io/library/hit/blobs/{}", b.digest),
                        &[],
                    )
                    .await;
                assert_eq!(status, 200);
                assert_eq!(body, b.bytes);
            }
            let upstream_before = reg.requests().await.len();

            // Blobs for the pushes, uploaded before the collection holds the lock.
            let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
            let pushes = workers.max(2);
            let push = Pusher::new(&berth.url(), None);
            let images: Vec<Image> = (0..pushes)
                .map(|i| make_single(100 + i as u64, 5_000))
                .collect();
            for image in &images {
                for b in image.blobs() {
                    push.blob("team/pushed", b).await;
                }
            }

            // The next collection holds the lock.
            let mark = berth.log_len();
            std::fs::write(hold.path().join("arm"), b"").unwrap();
            until(30, "garbage collection never held its lock", || {
                hold.path().join("held").exists()
            })
            .await;

            // Events in the order they happened.
            let seq = Arc::new(AtomicUsize::new(0));
            let http = reqwest::Client::new();
            let mut push_tasks = Vec::new();
            for (i, image) in images.iter().enumerate() {
                let (http, seq) = (http.clone(), seq.clone());
                let url = format!("{}/v2/team/pushed/manifests/t{i}", berth.url());
                let body = image.manifest.clone();
                push_tasks.push(tokio::spawn(async move {
                    let r = http
                        .put(url)
                        .header("Content-Type", OCI_MANIFEST)
                        .body(body)
                        .send()
                        .await
                        .unwrap();
                    (r.status().as_u16(), seq.fetch_add(1, Ordering::SeqCst))
                }));
            }
            {
                let (http, seq) = (http.clone(), seq.clone());
                let url = format!(
                    "{}/v2/team/mounted/blobs/uploads/?mount={}&from=team/pushed",
                    berth.url(),
                    images[0].config.digest
                );
                push_tasks.push(tokio::spawn(async move {
                    let r = http.post(url).send().await.unwrap();
                    (r.status().as_u16(), seq.fetch_add(1, Ordering::SeqCst))
                }));
            }
            // Every push has reached the lock and waits for the collection.
            let waiting = |log: &str| {
                log.matches(
                    "a push waits for garbage collection or eviction to finish removing files",
                )
                .count()
            };
            let deadline = Instant::now() + Duration::from_secs(15);
            while waiting(&berth.log_since(mark)) < push_tasks.len() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }

            // Cache hits, now.
            let hits = async {
                let mut done = Vec::new();
                for round in 0..3 {
                    let (status, _, body) = berth
                        .fetch(manifest_path, &[("Accept", OCI_MANIFEST)])
                        .await;
                    assert_eq!(status, 200, "round {round}");
                    assert_eq!(body, cached.manifest);
                    done.push(seq.fetch_add(1, Ordering::SeqCst));
                    for b in cached.blobs() {
                        let path = format!("/v2/docker.io/library/hit/blobs/{}", b.digest);
                        let (status, _, body) = berth.fetch(&path, &[]).await;
                        assert_eq!(status, 200, "{path}");
                        assert_eq!(body, b.bytes, "{path}");
                        done.push(seq.fetch_add(1, Ordering::SeqCst));
                    }
                }
                done
            };
            // A berth whose workers are stuck never answers: give up after a while
            // (this bounds the wait; the assertion is about order).
            let hits = tokio::time::timeout(Duration::from_secs(30), hits).await;
            let released_at = seq.fetch_add(1, Ordering::SeqCst);
            std::fs::write(hold.path().join("release"), b"").unwrap();

            let hits =
                hits.expect("cache hits were not answered while garbage collection held pushes");
            assert!(hits.iter().all(|&h| h < released_at));
            assert!(
                waiting(&berth.log_since(mark)) >= push_tasks.len(),
                "not every push waited for the collection"
            );
            for t in push_tasks {
                let (status, at) = t.await.unwrap();
                assert_eq!(status, 201);
                assert!(
                    at > released_at,
                    "a push completed while garbage collection held the lock"
                );
            }
            assert_eq!(
                reg.requests().await.len(),
                upstream_before,
                "the cache hits went to the upstream"
            );
            until(30, "garbage collection never finished", || {
                berth.log_since(mark).contains("garbage collected")
            })
            .await;
            for (i, image) in images.iter().enumerate() {
                let (status, _, body) = berth
                    .fetch(
                        &format!("/v2/team/pushed/manifests/t{i}"),
                        &[("Accept", OCI_MANIFEST)],
                    )
                    .await;
                assert_eq!(status, 200);
                assert_eq!(body, image.manifest);
            }
        },
    )
    .await;
}
