//! End-to-end tests of the cache's lifecycle against a real docker-registry 2.8: the disk
//! budget and eviction under concurrent pulls, the admin endpoints, retention of private
//! repositories, a full disk (a small tmpfs), and kill -9 in the middle of fills.
//!
//! Run: `cargo test --release --workspace --test e2e_lifecycle`.

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::*;

const ACCEPT: [(&str, &str); 1] = [("Accept", ACCEPT_ALL)];
const MIB: usize = 1 << 20;

fn upstream(reg: &Registry) -> String {
    berth_config(&[Upstream::new("docker.io", &reg.url(), &["library/**"]).tag_ttl("1h")])
}

/// Pulls `image` by `tag` through berth (manifest, config, layers) and checks every byte.
async fn pull(berth: &Berth, repo: &str, tag: &str, image: &Image) -> Result<(), String> {
    let path = format!("/v2/docker.io/{repo}/manifests/{tag}");
    let r = berth
        .client
        .get(format!("{}{path}", berth.url()))
        .header("Accept", ACCEPT_ALL)
        .send()
        .await
        .map_err(|e| format!("GET {path}: {e}"))?;
    let status = r.status().as_u16();
    let body = r.bytes().await.map_err(|e| format!("GET {path}: {e}"))?;
    if status != 200 || body != image.manifest {
        return Err(format!(
            "GET {path}: {status} {}",
            String::from_utf8_lossy(&body[..body.len().min(300)])
        ));
    }
    for blob in image.blobs() {
        let path = format!("/v2/docker.io/{repo}/blobs/{}", blob.digest);
        let r = berth
            .client
            .get(format!("{}{path}", berth.url()))
            .send()
            .await
            .map_err(|e| format!("GET {path}: {e}"))?;
        let status = r.status().as_u16();
        let body = r.bytes().await.map_err(|e| format!("GET {path}: {e}"))?;
        if status != 200 || digest_of(&body) != blob.digest {
            return Err(format!(
                "GET {path}: {status}, {} bytes, digest {}",
                body.len(),
                digest_of(&body)
            ));
        }
    }
    Ok(())
}

/// Pushes `blob` to team/app (start an upload, then complete it), without asserting:
/// the status and body of whichever step answered last.
async fn try_push(berth: &Berth, blob: &Blob) -> (u16, String) {
    let start = berth
        .client
        .post(format!("{}/v2/team/app/blobs/uploads/", berth.url()))
        .send()
        .await
        .unwrap();
    if start.status() != 202 {
        return (start.status().as_u16(), start.text().await.unwrap());
    }
    let loc = start.headers()["location"].to_str().unwrap().to_owned();
    let r = berth
        .client
        .put(upload_url(berth, &loc, &blob.digest))
        .body(blob.bytes.clone())
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// The URL that completes the upload at `location` with `digest`.
fn upload_url(berth: &Berth, location: &str, digest: &str) -> String {
    let sep = if location.contains('?') { '&' } else { '?' };
    format!("{}{location}{sep}digest={digest}", berth.url())
}

/// Pushes a small blob to team/app until berth accepts it (bounded): a store that has
/// space again takes pushes without a restart.
async fn push_until_accepted(berth: &Berth, seed: u64) {
    let data = Blob::new("application/octet-stream", random_bytes(seed, 1000));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, _) = try_push(berth, &data).await;
        if status == 201 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "pushes never worked again (last status {status}):\n{}",
            berth.log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn admin(berth: &Berth, method: reqwest::Method, path: &str) -> serde_json::Value {
    let r = berth.request(method.clone(), path, &[]).await;
    let status = r.status().as_u16();
    let body = r.bytes().await.unwrap();
    assert_eq!(
        status,
        200,
        "{method} {path}: {}",
        String::from_utf8_lossy(&body)
    );
    serde_json::from_slice(&body).unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

async fn store_usage(berth: &Berth) -> serde_json::Value {
    admin(berth, reqwest::Method::GET, "/admin/store").await
}

/// Every published blob file: `(digest, size)`, after checking its bytes match its name.
fn blob_files(store: &Path) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let root = store.join("blobs/sha256");
    let Ok(shards) = std::fs::read_dir(&root) else {
        return out;
    };
    for shard in shards {
        for f in std::fs::read_dir(shard.unwrap().path()).unwrap() {
            let f = f.unwrap();
            let name = f.file_name().to_string_lossy().into_owned();
            let bytes = std::fs::read(f.path()).unwrap();
            assert_eq!(
                sha256_hex(&bytes),
                name,
                "{}: a stored blob does not match its digest",
                f.path().display()
            );
            out.push((format!("sha256:{name}"), bytes.len() as u64));
        }
    }
    out
}

/// Where the store keeps the published blob `digest`.
fn blob_path(store: &Path, digest: &str) -> std::path::PathBuf {
    let hex = digest.strip_prefix("sha256:").unwrap();
    store.join("blobs/sha256").join(&hex[..2]).join(hex)
}

fn has_blob_file(store: &Path, digest: &str) -> bool {
    blob_path(store, digest).exists()
}

async fn wait_for(what: &str, secs: u64, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `n` images of 3 MiB (seeds from `seed`) pushed as library/img<i>:v1, and a berth with
/// a 12 MiB store budget (marks 90 % and 60 %, `keep_recent` 1 s) pulling through `reg`.
async fn budget_berth(
    reg: &Registry,
    n: u64,
    seed: u64,
    env: &[(&str, &str)],
) -> (Vec<Image>, Berth) {
    let push = reg.pusher(None);
    let images: Vec<Image> = (0..n).map(|i| make_single(seed + i, 3 * MIB)).collect();
    for (i, img) in images.iter().enumerate() {
        push.image(&format!("library/img{i}"), Some("v1"), img)
            .await;
    }
    let config = format!(
        "{}\n[cache]\nmax_size = \"12MiB\"\nhigh_watermark = \"90%\"\nlow_watermark = \"60%\"\n\
         keep_recent = \"1s\"\neviction_interval = \"1s\"\nmetadata_reserve = \"1MiB\"\n\
         min_free = \"1MiB\"\n",
        upstream(reg)
    );
    (images, Berth::start_with_config(&config, env).await)
}

/// Pulls image 3, which takes the 12 MiB store past its 90 % mark, waits for eviction to
/// bring it to 60 %, and checks that images 0 and 3 stayed and 1 and 2 went (`why`).
async fn evict_for_image_3(berth: &Berth, images: &[Image], why: &str) {
    pull(berth, "library/img3", "v1", &images[3]).await.unwrap();
    let limit = (12 * MIB) as u64 * 6 / 10;
    wait_for("eviction to the low mark", 30, async || {
        store_usage(berth).await["total_bytes"].as_u64().unwrap() <= limit
    })
    .await;
    let store = berth.store_dir();
    for (i, kept) in [(0, true), (1, false), (2, false), (3, true)] {
        let layer = &images[i].layers[0].blob.digest;
        assert_eq!(
            has_blob_file(&store, layer),
            kept,
            "image {i}'s layer: kept {kept} expected ({why})"
        );
    }
}

/// 1. Over `max_size`, the least recently used images go, whole, and the store settles
///    within the budget; pulls running meanwhile all succeed with the right bytes, and
///    the index agrees with the files on disk.
#[tokio::test(flavor = "multi_thread")]
async fn the_budget_evicts_least_recently_used_images_and_no_pull_fails() {
    within(300, "the_budget_evicts_least_recently_used_images", async {
        let reg = Registry::start().await;
        let (images, berth) = budget_berth(&reg, 8, 700, &[]).await;

        // Images 0, 1 and 2 (9 MiB: within the high mark), then image 0 is used again.
        for (i, image) in images.iter().enumerate().take(3) {
            pull(&berth, &format!("library/img{i}"), "v1", image)
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
        pull(&berth, "library/img0", "v1", &images[0])
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        // Image 3 takes the store past 90 % of 12 MiB: eviction brings it to 60 %.
        evict_for_image_3(&berth, &images, "0 was used again, 3 is new").await;
        // Evicted images come back from the upstream; kept ones cost it nothing.
        let before = reg.requests().await.len();
        pull(&berth, "library/img0", "v1", &images[0])
            .await
            .unwrap();
        let reqs = reg.requests().await;
        assert!(
            reqs[before..].iter().all(|r| !r.path.contains("/blobs/")),
            "image 0 was kept: {:?}",
            &reqs[before..]
        );
        let before = reqs.len();
        pull(&berth, "library/img1", "v1", &images[1])
            .await
            .unwrap();
        let reqs = reg.requests().await;
        let layer1 = format!("/v2/library/img1/blobs/{}", images[1].layers[0].blob.digest);
        assert!(
            reqs[before..]
                .iter()
                .any(|r| r.method == "GET" && r.path == layer1),
            "image 1 was evicted and fetched again: {:?}",
            &reqs[before..]
        );

        // 16 clients pull at random while eviction runs: every request succeeds.
        let berth = Arc::new(berth);
        let images = Arc::new(images);
        let mut tasks = Vec::new();
        for c in 0..16u64 {
            let (berth, images) = (berth.clone(), images.clone());
            tasks.push(tokio::spawn(async move {
                let mut x = c * 7919 + 13;
                for _ in 0..6 {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let i = (x >> 33) as usize % images.len();
                    pull(&berth, &format!("library/img{i}"), "v1", &images[i]).await?;
                }
                Ok::<_, String>(())
            }));
        }
        for t in tasks {
            if let Err(e) = t.await.unwrap() {
                panic!("a pull failed during eviction: {e}\n{}", berth.log());
            }
        }
        // Once the pulls stop, the store is brought within the budget, and the index
        // and the files agree byte for byte.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        admin(&berth, reqwest::Method::POST, "/admin/evict").await;
        let usage = store_usage(&berth).await;
        let total = usage["total_bytes"].as_u64().unwrap();
        assert!(total <= (12 * MIB) as u64, "{usage}");
        let files = blob_files(&berth.store_dir());
        assert_eq!(files.iter().map(|f| f.1).sum::<u64>(), total, "{usage}");
        assert_eq!(
            files.len() as u64,
            usage["cached"]["blobs"].as_u64().unwrap()
        );
        let metrics = berth.get("/metrics", &[]).await.text().await.unwrap();
        let evicted: u64 = metrics
            .lines()
            .find(|l| l.starts_with("berth_evictions_total{kind=\"blob\"}"))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0);
        assert!(evicted >= 2, "berth_evictions_total: {metrics}");
        assert!(metrics.contains("berth_evicted_bytes_total "), "{metrics}");
        assert!(
            metrics.contains("berth_store_bytes{kind=\"cached\"}"),
            "{metrics}"
        );
    })
    .await;
}

/// 1b. A manifest answered from a worker's memo of answers (`memo.rs`) counts as a use,
///     as any hit does: an image whose tag a node only resolves again (no blob read) is
///     not the least recently used. And an evicted image's answer leaves the memo. One
///     worker thread, so that the memo answers.
#[tokio::test(flavor = "multi_thread")]
async fn memo_answers_count_as_uses() {
    within(300, "memo_answers_count_as_uses", async {
        let reg = Registry::start().await;
        let (images, berth) = budget_berth(&reg, 4, 760, &[("BERTH_THREADS", "1")]).await;
        let manifest = |i: usize| format!("/v2/docker.io/library/img{i}/manifests/v1");
        // Images 0, 1 and 2 cached, and each tag asked for once more: a hit from memory,
        // which the memo keeps.
        for (i, image) in images.iter().enumerate().take(3) {
            pull(&berth, &format!("library/img{i}"), "v1", image)
                .await
                .unwrap();
        }
        for i in 0..3 {
            let (status, _, _) = berth.fetch(&manifest(i), &[("Accept", ACCEPT_ALL)]).await;
            assert_eq!(status, 200);
        }
        // Images 1 and 2 pulled again; then only image 0's tag resolved again, from the
        // memo (nothing has changed in memory since).
        tokio::time::sleep(Duration::from_millis(1500)).await;
        for (i, image) in images.iter().enumerate().take(3).skip(1) {
            pull(&berth, &format!("library/img{i}"), "v1", image)
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let (status, _, body) = berth.fetch(&manifest(0), &[("Accept", ACCEPT_ALL)]).await;
        assert_eq!((status, &body[..]), (200, &images[0].manifest[..]));
        tokio::time::sleep(Duration::from_millis(1500)).await;
        // Image 3 takes the store past 90 %: two images go, the least recently used.
        let why = "image 0's tag was resolved last, from the memo; 3 is new";
        evict_for_image_3(&berth, &images, why).await;
        // The memo held image 1's answer; eviction took the image, so the memo must not
        // answer for it: the tag is fetched from the upstream again, with the same bytes.
        let upstream_gets = || reg.count("GET", "/v2/library/img1/manifests/v1");
        let before = upstream_gets().await;
        let (status, _, body) = berth.fetch(&manifest(1), &[("Accept", ACCEPT_ALL)]).await;
        assert_eq!((status, &body[..]), (200, &images[1].manifest[..]));
        assert_eq!(
            upstream_gets().await,
            before + 1,
            "image 1 was evicted, yet its manifest was answered without the upstream"
        );
    })
    .await;
}

/// 2. `/admin/*` answers administrators only; a purge removes one repository's cached
///    content (and only what no other repository holds), which a later pull fetches again.
#[tokio::test(flavor = "multi_thread")]
async fn admin_endpoints_purge_a_repository_for_administrators_only() {
    within(180, "admin_endpoints_purge_a_repository", async {
        let reg = Registry::start().await;
        let push = reg.pusher(None);
        let a = make_single(801, 200_000);
        let b = make_single(802, 200_000);
        push.image("library/a", Some("v1"), &a).await;
        push.image("library/b", Some("v1"), &b).await;
        let dir = tempdir();
        let htpasswd = dir.path().join("htpasswd");
        std::fs::write(
            &htpasswd,
            format!(
                "root:{}\nalice:{}\n",
                bcrypt::hash("pw", 4).unwrap(),
                bcrypt::hash("pw", 4).unwrap()
            ),
        )
        .unwrap();
        let config = format!(
            "{}\n[auth]\nhtpasswd = {:?}\n[access]\nadmin = {{ users = [\"root\"] }}\n\
             [[access.repository]]\npattern = \"**\"\nanonymous = [\"read\"]\ndefault = [\"read\"]\n",
            upstream(&reg),
            htpasswd.to_str().unwrap()
        );
        let berth = Berth::start_with_config(&config, &[]).await;
        pull(&berth, "library/a", "v1", &a).await.unwrap();
        pull(&berth, "library/b", "v1", &b).await.unwrap();
        let root = basic_auth("root", "pw");
        let alice = basic_auth("alice", "pw");
        let anonymous = berth.get("/admin/store", &[]).await;
        assert_eq!(anonymous.status().as_u16(), 401);
        assert!(anonymous.headers().contains_key("www-authenticate"));
        let user = berth.get("/admin/store", &[("Authorization", &alice)]).await;
        assert_eq!(user.status().as_u16(), 403);
        let r = berth.get("/admin/store", &[("Authorization", &root)]).await;
        assert_eq!(r.status().as_u16(), 200);
        let usage: serde_json::Value = r.json().await.unwrap();
        assert_eq!(usage["cached"]["manifests"], 2, "{usage}");
        assert_eq!(usage["cached"]["tags"], 2, "{usage}");
        // Each image: a config and two layers.
        assert_eq!(usage["upstreams"]["docker.io"]["blobs"], 6, "{usage}");
        assert_eq!(usage["private"]["bytes"], 0, "{usage}");
        let wrong = berth
            .request(reqwest::Method::GET, "/admin/evict", &[("Authorization", &root)])
            .await;
        assert_eq!(wrong.status().as_u16(), 405);

        let r = berth
            .request(
                reqwest::Method::DELETE,
                "/admin/cache/docker.io/library/a",
                &[("Authorization", &root)],
            )
            .await;
        assert_eq!(r.status().as_u16(), 200);
        let report: serde_json::Value = r.json().await.unwrap();
        assert_eq!(report["manifests"], 1, "{report}");
        assert_eq!(report["blobs"], 3, "{report}");
        let store = berth.store_dir();
        for blob in a.blobs() {
            assert!(!has_blob_file(&store, &blob.digest));
        }
        for blob in b.blobs() {
            assert!(has_blob_file(&store, &blob.digest), "library/b was not purged");
        }
        // The purged image is fetched again, whole.
        let before = reg.requests().await.len();
        pull(&berth, "library/a", "v1", &a).await.unwrap();
        let reqs = reg.requests().await;
        assert!(
            reqs[before..].iter().any(|r| r.path == "/v2/library/a/manifests/v1"),
            "{:?}",
            &reqs[before..]
        );
        let unknown = berth
            .request(
                reqwest::Method::DELETE,
                "/admin/cache/quay.io",
                &[("Authorization", &root)],
            )
            .await;
        assert_eq!(unknown.status().as_u16(), 404);
    })
    .await;
}

/// 3. The shipped retention example (keep the newest tag, delete the referrers of what
///    goes): a dry run reports exactly what the real run then deletes, and deletes
///    nothing itself.
#[tokio::test(flavor = "multi_thread")]
async fn the_shipped_retention_policy_dry_run_then_real_run() {
    within(180, "the_shipped_retention_policy", async {
        let example = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/retention/keep-latest.toml"),
        )
        .unwrap();
        let start = example.find("[[retention]]").unwrap();
        let end = example.find("[[upstream]]").unwrap();
        let policy = &example[start..end];
        let upstream = ClosedPort::new();
        let config = format!(
            "{}\n{policy}",
            berth_config(&[Upstream::new("docker.io", &upstream.url(), &["library/**"])])
        );
        let berth = Berth::start_with_config(&config, &[]).await;
        let push = Pusher::new(&berth.url(), None);
        let old = make_single(811, 10_000);
        let new = make_single(812, 10_000);
        push.image("ci/app", Some("v1"), &old).await;
        // A signature-like referrer of the old image.
        let sig_config = Blob::new("application/vnd.oci.empty.v1+json", &b"{}"[..]);
        push.blob("ci/app", &sig_config).await;
        let referrer = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": "application/vnd.example.signature",
            "config": sig_config.descriptor(),
            "layers": [],
            "subject": {"mediaType": OCI_MANIFEST, "digest": old.digest, "size": old.manifest.len()},
        }))
        .unwrap();
        let referrer_digest = digest_of(&referrer);
        push.manifest("ci/app", &referrer_digest, OCI_MANIFEST, &referrer.into())
            .await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        push.image("ci/app", Some("v2"), &new).await;
        push.image("team/app", Some("v1"), &old).await;

        let dry = admin(&berth, reqwest::Method::POST, "/admin/retention?dry_run=true").await;
        let status = |path: String| {
            let berth = &berth;
            async move {
                berth
                    .head(&path, &ACCEPT)
                    .await
                    .status()
                    .as_u16()
            }
        };
        assert_eq!(status("/v2/ci/app/manifests/v1".into()).await, 200, "dry run deleted: {dry}");
        let real = admin(&berth, reqwest::Method::POST, "/admin/retention").await;
        assert_eq!(dry["repositories"], real["repositories"], "dry {dry}\nreal {real}");
        assert_eq!(dry["dry_run"], true);
        let text = real.to_string();
        assert!(text.contains(&old.digest) && text.contains(&referrer_digest), "{real}");
        assert_eq!(status("/v2/ci/app/manifests/v1".into()).await, 404);
        assert_eq!(status(format!("/v2/ci/app/manifests/{}", old.digest)).await, 404);
        assert_eq!(status(format!("/v2/ci/app/manifests/{referrer_digest}")).await, 404);
        assert_eq!(status("/v2/ci/app/manifests/v2".into()).await, 200);
        // Outside the policy's repositories nothing changed.
        assert_eq!(status("/v2/team/app/manifests/v1".into()).await, 200);
    })
    .await;
}

/// 4. kill -9 while 50 cold fills are streaming, three times over: after each restart
///    every blob berth serves matches its digest, nothing partial is left in the store,
///    and every file under blobs/ is exactly its digest's bytes.
#[tokio::test(flavor = "multi_thread")]
async fn kill_9_during_50_cold_fills_never_serves_a_bad_blob() {
    within(300, "kill_9_during_50_cold_fills", async {
        let reg = Registry::start().await;
        let push = reg.pusher(None);
        let blobs: Vec<Blob> = (0..50)
            .map(|i| {
                Blob::new(
                    "application/octet-stream",
                    random_bytes(900 + i, 512 * 1024),
                )
            })
            .collect();
        for b in &blobs {
            push.blob("library/crash", b).await;
        }
        let mut berth = Berth::start_with_config(&upstream(&reg), &[]).await;
        let blobs = Arc::new(blobs);
        for round in 0..3u64 {
            let mut tasks = Vec::new();
            for i in 0..blobs.len() {
                let (client, url, blobs) = (berth.client.clone(), berth.url(), blobs.clone());
                tasks.push(tokio::spawn(async move {
                    let path =
                        format!("{url}/v2/docker.io/library/crash/blobs/{}", blobs[i].digest);
                    // The response is cut by the kill; whatever did arrive is checked.
                    if let Ok(r) = client.get(path).send().await {
                        if r.status() == 200 {
                            if let Ok(body) = r.bytes().await {
                                assert_eq!(
                                    digest_of(&body),
                                    blobs[i].digest,
                                    "a whole body with wrong bytes"
                                );
                            }
                        }
                    }
                }));
            }
            tokio::time::sleep(Duration::from_millis(40 + 90 * round)).await;
            berth.kill();
            for t in tasks {
                let _ = t.await;
            }
            let mark = berth.log_len();
            berth.restart().await;
            wait_for("the store to be reconciled", 30, async || {
                berth
                    .log_since(mark)
                    .contains("store index and files reconciled")
            })
            .await;
            // The index and the files agree: every file is indexed, every record has
            // its file (a fill killed between publishing and recording left neither).
            let files = blob_files(&berth.store_dir());
            let usage = store_usage(&berth).await;
            assert_eq!(
                usage["cached"]["blobs"].as_u64().unwrap(),
                files.len() as u64,
                "round {round}: {usage}"
            );
            let tmp: Vec<_> = std::fs::read_dir(berth.store_dir().join("tmp"))
                .unwrap()
                .filter_map(|e| e.ok())
                .filter(|e| e.file_name() != "reserve")
                .collect();
            assert!(
                tmp.is_empty(),
                "round {round}: partial writes left: {tmp:?}"
            );
            for b in blobs.iter() {
                let path = format!("/v2/docker.io/library/crash/blobs/{}", b.digest);
                let (status, _, body) = berth.fetch(&path, &[]).await;
                assert_eq!(status, 200, "round {round}: {path}");
                assert_eq!(digest_of(&body), b.digest, "round {round}: {path}");
            }
            // Everything is cached now; the next round's blobs must be cold again.
            if round < 2 {
                let r = berth
                    .request(reqwest::Method::DELETE, "/admin/cache/docker.io", &[])
                    .await;
                assert_eq!(r.status().as_u16(), 200);
                assert!(blob_files(&berth.store_dir()).is_empty());
            }
        }
    })
    .await;
}

/// 5. A full disk (a 48 MiB tmpfs filled up by someone else): new blobs stream straight
///    through, verified and not stored; pushes get 507 with a message; what is cached
///    keeps answering, through failed metadata writes; berth restarts on the full disk;
///    and once space returns it caches and takes pushes again by itself.
#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_streams_through_refuses_pushes_and_recovers() {
    within(300, "a_full_disk", async {
        require_tool("mount");
        let reg = Registry::start().await;
        let push = reg.pusher(None);
        let cached = make_single(821, 2 * MIB);
        let fresh = make_single(822, 2 * MIB);
        push.image("library/cached", Some("v1"), &cached).await;
        push.image("library/fresh", Some("v1"), &fresh).await;
        let config = format!(
            "{}\n[cache]\nmetadata_reserve = \"4MiB\"\nmin_free = \"1MiB\"\nkeep_recent = \"10m\"\n\
             eviction_interval = \"1s\"\n",
            berth_config(&[Upstream::new("docker.io", &reg.url(), &["library/**"]).tag_ttl("1m")])
        );
        let mut mount = None;
        let mut berth = Berth::start_with_store(&config, &[], |store| {
            mount = Some(Tmpfs::mount(store, "48m"));
        })
        .await;
        let disk = mount.unwrap();
        pull(&berth, "library/cached", "v1", &cached).await.unwrap();
        let store = berth.store_dir();
        wait_for("the metadata reserve", 20, async || {
            store.join("reserve-start").exists() && store.join("reserve-running").exists()
        })
        .await;

        // Someone else fills the disk; berth gives its reserve back, which the filler
        // takes too.
        let mark = berth.log_len();
        disk.fill("filler");
        wait_for("berth to give back its reserve", 20, async || {
            berth
                .log_since(mark)
                .contains("gave back the space reserved for metadata")
        })
        .await;
        disk.fill("filler");
        assert!(disk.available() < MIB as u64, "the disk is full");

        // A new image streams through: right bytes, nothing stored.
        pull(&berth, "library/fresh", "v1", &fresh).await.unwrap();
        for blob in fresh.blobs() {
            assert!(
                !has_blob_file(&store, &blob.digest),
                "{} was stored",
                blob.digest
            );
        }
        assert!(berth
            .log()
            .contains("streaming the blob without caching it"));

        // Cached content keeps answering, while every revalidation's write may fail.
        for round in 0..40 {
            berth.advance_clock(Duration::from_secs(61)).await;
            let path = "/v2/docker.io/library/cached/manifests/v1";
            let (status, _, body) = berth.fetch(path, &ACCEPT).await;
            assert_eq!(
                status,
                200,
                "round {round}: {}",
                String::from_utf8_lossy(&body)
            );
            assert_eq!(body, cached.manifest);
        }
        pull(&berth, "library/cached", "v1", &cached).await.unwrap();
        assert!(
            berth
                .log()
                .contains("could not record a tag; serving without it"),
            "the revalidations' metadata writes were meant to fail"
        );

        // A push fails clearly.
        let data = Blob::new("application/octet-stream", random_bytes(830, MIB));
        let (status, text) = try_push(&berth, &data).await;
        assert_eq!(status, 507, "{text}");
        assert!(text.contains("no space left for this push"), "{text}");

        // Space returns: berth caches and takes pushes again by itself, without a restart.
        std::fs::remove_file(store.join("filler")).unwrap();
        push_until_accepted(&berth, 831).await;
        pull(&berth, "library/fresh", "v1", &fresh).await.unwrap();
        wait_for("the fresh image to be cached", 20, async || {
            has_blob_file(&store, &fresh.layers[0].blob.digest)
        })
        .await;
        Pusher::new(&berth.url(), None)
            .image("team/app", Some("v1"), &make_single(832, 1000))
            .await;

        // Full again, and killed: berth starts on the full disk and serves its cache.
        wait_for("the reserve to be held again", 20, async || {
            store.join("reserve-start").exists()
        })
        .await;
        disk.fill("filler");
        berth.kill();
        disk.fill("filler");
        berth.restart().await;
        pull(&berth, "library/cached", "v1", &cached).await.unwrap();
        pull(&berth, "library/fresh", "v1", &fresh).await.unwrap();
        std::fs::remove_file(store.join("filler")).unwrap();
        push_until_accepted(&berth, 833).await;
        blob_files(&store);
    })
    .await;
}

/// 6. A scrub finds a damaged blob on disk and never serves it again: a pulled-through
///    one is removed and fetched again from the upstream, a pushed one is removed and
///    reported (its repository answers `404 BLOB_UNKNOWN`, not wrong bytes).
#[tokio::test(flavor = "multi_thread")]
async fn a_scrub_removes_damaged_blobs_and_fetches_cached_ones_again() {
    within(180, "a_scrub_removes_damaged_blobs", async {
        let reg = Registry::start().await;
        let image = make_single(841, 300_000);
        reg.pusher(None)
            .image("library/scrub", Some("v1"), &image)
            .await;
        let berth = Berth::start_with_config(&upstream(&reg), &[]).await;
        pull(&berth, "library/scrub", "v1", &image).await.unwrap();
        let private = Blob::new("application/octet-stream", random_bytes(842, 100_000));
        Pusher::new(&berth.url(), None)
            .blob("team/scrub", &private)
            .await;
        let store = berth.store_dir();
        let corrupt = |digest: &str| {
            let path = blob_path(&store, digest);
            let mut bytes = std::fs::read(&path).unwrap();
            bytes[1000] ^= 0xff;
            std::fs::write(&path, bytes).unwrap();
        };
        let layer = &image.layers[0].blob;
        corrupt(&layer.digest);
        corrupt(&private.digest);

        let report = admin(&berth, reqwest::Method::POST, "/admin/scrub").await;
        let damaged = report["damaged"].as_array().unwrap();
        assert_eq!(damaged.len(), 2, "{report}");
        let entry = |d: &str| damaged.iter().find(|e| e["digest"] == d).unwrap().clone();
        assert_eq!(entry(&layer.digest)["private"], false, "{report}");
        assert_eq!(entry(&layer.digest)["refetched"], true, "{report}");
        assert_eq!(entry(&private.digest)["private"], true, "{report}");
        assert!(report["blobs"].as_u64().unwrap() >= 4, "{report}");

        // The cached layer is whole again; the pushed blob is gone, not served wrong.
        let path = format!("/v2/docker.io/library/scrub/blobs/{}", layer.digest);
        let (status, _, body) = berth.fetch(&path, &[]).await;
        assert_eq!(status, 200);
        assert_eq!(digest_of(&body), layer.digest);
        let path = format!("/v2/team/scrub/blobs/{}", private.digest);
        let (status, _, body) = berth.fetch(&path, &[]).await;
        assert_eq!(status, 404, "{}", String::from_utf8_lossy(&body));
        // A second scrub finds nothing.
        let again = admin(&berth, reqwest::Method::POST, "/admin/scrub").await;
        assert_eq!(again["damaged"].as_array().unwrap().len(), 0, "{again}");
    })
    .await;
}

/// 7. kill -9 in the middle of an eviction pass (its manifests and tags removed, no blob
///    yet) and of a garbage collection (holding its lock, a push waiting on it): after
///    the restart no acknowledged push is lost, every image berth still has is whole,
///    and the index agrees with the files.
#[tokio::test(flavor = "multi_thread")]
async fn kill_9_mid_eviction_and_mid_gc_loses_no_push() {
    within(300, "kill_9_mid_eviction_and_mid_gc", async {
        let reg = Registry::start().await;
        let push = reg.pusher(None);
        let cached: Vec<Image> = (0..12).map(|i| make_single(850 + i, 200_000)).collect();
        for (i, img) in cached.iter().enumerate() {
            push.image(&format!("library/k{i}"), Some("v1"), img).await;
        }
        let config = format!(
            "{}\n[cache]\nmin_free = \"1MiB\"\nkeep_recent = \"0s\"\n",
            upstream(&reg)
        );
        let (evict_hold, gc_hold) = (tempdir(), tempdir());
        let env = [
            ("BERTH_TEST_EVICT_HOLD", evict_hold.path().to_str().unwrap()),
            ("BERTH_TEST_GC_HOLD", gc_hold.path().to_str().unwrap()),
        ];
        let mut berth = Berth::start_with_config(&config, &env).await;
        let mut pushed: Vec<(String, Image)> = Vec::new();
        for round in 0..2u64 {
            for (i, img) in cached.iter().enumerate() {
                pull(&berth, &format!("library/k{i}"), "v1", img)
                    .await
                    .unwrap();
            }
            // berth listens on another port after each restart.
            let private = Pusher::new(&berth.url(), None);
            // Private images: some kept, some deleted for GC to collect.
            for i in 0..6u64 {
                let img = make_single(870 + round * 10 + i, 100_000);
                let repo = format!("team/r{round}-{i}");
                private.image(&repo, Some("v1"), &img).await;
                if i % 2 == 0 {
                    let r = berth
                        .request(
                            reqwest::Method::DELETE,
                            &format!("/v2/{repo}/manifests/{}", img.digest),
                            &[],
                        )
                        .await;
                    assert_eq!(r.status().as_u16(), 202);
                } else {
                    pushed.push((repo, img));
                }
            }
            for hold in [&evict_hold, &gc_hold] {
                let _ = std::fs::remove_file(hold.path().join("held"));
                std::fs::write(hold.path().join("arm"), b"").unwrap();
            }
            let (client, url) = (berth.client.clone(), berth.url());
            let evict = tokio::spawn({
                let (client, url) = (client.clone(), url.clone());
                async move {
                    let _ = client
                        .post(format!("{url}/admin/evict?bytes=1GiB"))
                        .send()
                        .await;
                }
            });
            let gc = tokio::spawn({
                let (client, url) = (client.clone(), url.clone());
                async move {
                    let _ = client.post(format!("{url}/admin/gc?grace=0s")).send().await;
                }
            });
            for hold in [&evict_hold, &gc_hold] {
                let held = hold.path().join("held");
                wait_for("a pass to reach its hold", 30, async || held.exists()).await;
            }
            // A push racing the collection: it waits for the lock, and is killed there.
            let racer = tokio::spawn({
                let url = url.clone();
                let img = make_single(890 + round, 100_000);
                async move {
                    Pusher::new(&url, None)
                        .image("team/racer", Some("v1"), &img)
                        .await;
                }
            });
            tokio::time::sleep(Duration::from_millis(300)).await;
            berth.kill();
            let _ = evict.await;
            let _ = gc.await;
            assert!(
                racer.await.is_err(),
                "the racing push was killed, not acknowledged"
            );
            for hold in [&evict_hold, &gc_hold] {
                std::fs::remove_file(hold.path().join("arm")).unwrap();
            }
            let mark = berth.log_len();
            berth.restart().await;
            wait_for("the store to be reconciled", 30, async || {
                berth
                    .log_since(mark)
                    .contains("store index and files reconciled")
            })
            .await;
            // Every acknowledged push is whole.
            for (repo, img) in &pushed {
                let path = format!("/v2/{repo}/manifests/{}", img.digest);
                let (status, _, body) = berth.fetch(&path, &ACCEPT).await;
                assert_eq!(status, 200, "round {round}: {path}");
                assert_eq!(body, img.manifest);
                for blob in img.blobs() {
                    let path = format!("/v2/{repo}/blobs/{}", blob.digest);
                    let (status, _, body) = berth.fetch(&path, &[]).await;
                    assert_eq!(status, 200, "round {round}: {path} of an acknowledged push");
                    assert_eq!(digest_of(&body), blob.digest);
                }
            }
            // The eviction was cut between its manifests and its blobs: the images are
            // fetched again, whole.
            for (i, img) in cached.iter().enumerate() {
                pull(&berth, &format!("library/k{i}"), "v1", img)
                    .await
                    .unwrap();
            }
            // Every file is indexed (cached) or linked (private), and every indexed or
            // linked blob has its file.
            let files = blob_files(&berth.store_dir());
            let usage = store_usage(&berth).await;
            assert_eq!(
                usage["cached"]["blobs"].as_u64().unwrap()
                    + usage["private"]["blobs"].as_u64().unwrap(),
                files.len() as u64,
                "round {round}: {usage}"
            );
        }
    })
    .await;
}

/// 8. `max_age`: cached content unused for longer is evicted whatever the budget, and a
///    later pull fetches it again; content used since stays.
#[tokio::test(flavor = "multi_thread")]
async fn max_age_evicts_unused_content_and_keeps_what_is_used() {
    within(120, "max_age_evicts_unused_content", async {
        let reg = Registry::start().await;
        let push = reg.pusher(None);
        let unused = make_single(861, 100_000);
        let used = make_single(862, 100_000);
        push.image("library/unused", Some("v1"), &unused).await;
        push.image("library/used", Some("v1"), &used).await;
        let config = format!(
            "{}\n[cache]\nmin_free = \"1MiB\"\nmax_age = \"2h\"\nkeep_recent = \"10m\"\n",
            upstream(&reg)
        );
        let berth = Berth::start_with_config(&config, &[]).await;
        pull(&berth, "library/unused", "v1", &unused).await.unwrap();
        pull(&berth, "library/used", "v1", &used).await.unwrap();
        berth.advance_clock(Duration::from_secs(90 * 60)).await;
        pull(&berth, "library/used", "v1", &used).await.unwrap();
        berth.advance_clock(Duration::from_secs(60 * 60)).await;
        // 2.5 h after the first pulls: the unused image is past max_age, the used one
        // was pulled an hour ago.
        let report = admin(&berth, reqwest::Method::POST, "/admin/evict").await;
        assert_eq!(report["manifests"], 1, "{report}");
        let store = berth.store_dir();
        for blob in unused.blobs() {
            assert!(!has_blob_file(&store, &blob.digest), "{report}");
        }
        for blob in used.blobs() {
            assert!(has_blob_file(&store, &blob.digest), "{report}");
        }
        let before = reg.requests().await.len();
        pull(&berth, "library/unused", "v1", &unused).await.unwrap();
        let reqs = reg.requests().await;
        assert!(
            reqs[before..]
                .iter()
                .any(|r| r.path == "/v2/library/unused/manifests/v1"),
            "the evicted image is fetched again: {:?}",
            &reqs[before..]
        );
    })
    .await;
}

/// 9. A store too full to open even with its start reserve given back (a kill -9 on a
///    disk someone else filled to the last byte): berth removes least recently used
///    cached blobs, with the database opened read-only, and starts.
#[tokio::test(flavor = "multi_thread")]
async fn a_store_too_full_to_open_evicts_offline_and_starts() {
    within(180, "a_store_too_full_to_open", async {
        require_tool("mount");
        let reg = Registry::start().await;
        let images: Vec<Image> = (0..4).map(|i| make_single(880 + i, 2 * MIB)).collect();
        for (i, img) in images.iter().enumerate() {
            reg.pusher(None)
                .image(&format!("library/full{i}"), Some("v1"), img)
                .await;
        }
        let config = format!(
            "{}\n[cache]\nmetadata_reserve = \"2MiB\"\nmin_free = \"1MiB\"\nkeep_recent = \"10m\"\n",
            upstream(&reg)
        );
        let mut mount = None;
        let mut berth = Berth::start_with_store(&config, &[], |store| {
            mount = Some(Tmpfs::mount(store, "32m"));
        })
        .await;
        let disk = mount.unwrap();
        for (i, img) in images.iter().enumerate() {
            pull(&berth, &format!("library/full{i}"), "v1", img).await.unwrap();
        }
        // Writes to the database that its log holds until it next opens.
        for _ in 0..20 {
            berth.advance_clock(Duration::from_secs(3601)).await;
            pull(&berth, "library/full0", "v1", &images[0]).await.unwrap();
        }
        berth.kill();
        let store = berth.store_dir();
        for reserve in ["reserve-start", "reserve-running"] {
            let _ = std::fs::remove_file(store.join(reserve));
        }
        disk.fill("filler");
        assert!(disk.available() < 64 * 1024, "the disk is full");
        let mark = berth.log_len();
        berth.restart().await;
        assert!(
            berth
                .log_since(mark)
                .contains("removed") && berth.log_since(mark).contains("least recently used cached blobs"),
            "berth opened without evicting: the test did not fill the disk enough:\n{}",
            berth.log_since(mark)
        );
        // It serves: what it kept from the store, what it removed from the upstream.
        for (i, img) in images.iter().enumerate() {
            pull(&berth, &format!("library/full{i}"), "v1", img).await.unwrap();
        }
        blob_files(&store);
    })
    .await;
}

/// 10. The background scrub (every `scrub_interval`, at most `scrub_rate`) finds a
///     damaged cached blob by itself, and the blob is whole again afterwards.
#[tokio::test(flavor = "multi_thread")]
async fn the_background_scrub_repairs_a_damaged_cached_blob() {
    within(120, "the_background_scrub_repairs", async {
        let reg = Registry::start().await;
        let image = make_single(885, 300_000);
        reg.pusher(None)
            .image("library/bg", Some("v1"), &image)
            .await;
        let config = format!(
            "{}\n[cache]\nscrub_interval = \"1s\"\nscrub_rate = \"64MiB\"\n",
            upstream(&reg)
        );
        let berth = Berth::start_with_config(&config, &[]).await;
        pull(&berth, "library/bg", "v1", &image).await.unwrap();
        let layer = &image.layers[0].blob;
        let path = blob_path(&berth.store_dir(), &layer.digest);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[10] ^= 0x55;
        let mark = berth.log_len();
        std::fs::write(&path, bytes).unwrap();
        wait_for("the background scrub to find the damage", 30, async || {
            berth
                .log_since(mark)
                .contains("scrub: a stored blob does not match its digest")
        })
        .await;
        wait_for("the blob to be fetched again", 30, async || {
            std::fs::read(&path).is_ok_and(|b| digest_of(&b) == layer.digest)
        })
        .await;
        pull(&berth, "library/bg", "v1", &image).await.unwrap();
    })
    .await;
}

/// 11. A database that refused a write on a full disk reopens within the space its
///     running reserve gives back, with nothing else freed: before, berth asked for
///     twice that, and a disk full of its own content stayed stuck (eviction writes
///     metadata first, which the database refused) until a restart.
#[tokio::test(flavor = "multi_thread")]
async fn the_database_reopens_within_the_space_its_reserve_gives_back() {
    within(180, "the_database_reopens_within_its_reserve", async {
        require_tool("mount");
        let reg = Registry::start().await;
        let cached = make_single(895, 1_000_000);
        let push = reg.pusher(None);
        push.image("library/db", Some("v1"), &cached).await;
        // Tags whose first pulls write metadata (a tag, a link) on the full disk.
        for t in 0..60 {
            push.manifest(
                "library/db",
                &format!("t{t}"),
                OCI_MANIFEST,
                &cached.manifest,
            )
            .await;
        }
        let config = format!(
            "{}\n[cache]\nmetadata_reserve = \"8MiB\"\nmin_free = \"1MiB\"\nkeep_recent = \"10m\"\n\
             eviction_interval = \"1s\"\n",
            berth_config(&[Upstream::new("docker.io", &reg.url(), &["library/**"]).tag_ttl("1m")])
        );
        let mut mount = None;
        let berth = Berth::start_with_store(&config, &[], |store| {
            mount = Some(Tmpfs::mount(store, "48m"));
        })
        .await;
        let disk = mount.unwrap();
        pull(&berth, "library/db", "v1", &cached).await.unwrap();
        let store = berth.store_dir();
        wait_for("the metadata reserve", 20, async || {
            store.join("reserve-running").exists()
        })
        .await;
        // The disk fills up; at once, revalidated tags make the database refuse writes.
        let mark = berth.log_len();
        disk.fill("filler");
        for t in 0..60 {
            let path = format!("/v2/docker.io/library/db/manifests/t{t}");
            let (status, _, _) = berth.fetch(&path, &ACCEPT).await;
            assert_eq!(status, 200, "{path}");
        }
        assert!(
            berth.log_since(mark).contains("could not record"),
            "the database was meant to refuse a write:\n{}",
            berth.log_since(mark)
        );
        wait_for("berth to give back its running reserve", 20, async || {
            berth
                .log_since(mark)
                .contains("gave back the space reserved for metadata")
        })
        .await;
        // Nothing else is freed: the filler stays. The database reopens and takes a push.
        wait_for("the database to reopen", 30, async || {
            berth
                .log_since(mark)
                .contains("the metadata database takes writes again")
        })
        .await;
        push_until_accepted(&berth, 896).await;
        drop(disk);
    })
    .await;
}
