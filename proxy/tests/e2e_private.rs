//! End-to-end tests of private repositories (pushed to berth, served from its store),
//! with skopeo and plain HTTP, against the `berth` binary. The test upstream is Debian's
//! docker-registry.
//!
//! Run: `cargo test --release -p berth-proxy --test e2e_private`.

mod support;

use support::*;

/// skopeo copies images from the upstream into private repositories of berth, then out
/// of berth into OCI layouts: every byte survives both ways, single and multi-arch.
#[tokio::test(flavor = "multi_thread")]
async fn skopeo_pushes_and_pulls_private_images_byte_for_byte() {
    within(
        300,
        "skopeo_pushes_and_pulls_private_images_byte_for_byte",
        async {
            let reg = Registry::start().await;
            let single = make_single(11, 400_000);
            let multi = make_multiarch(12, 300_000);
            let push = reg.pusher(None);
            push.image("library/src", Some("single"), &single).await;
            push.index("library/src", "multi", &multi).await;
            let berth =
                Berth::start(&[Upstream::new("docker.io", &reg.url(), &["library/**"])]).await;

            skopeo(
                &format!("docker://{}/library/src:single", reg.host()),
                &format!("docker://{}/team/app:single", berth.host()),
                false,
            )
            .await;
            skopeo(
                &format!("docker://{}/library/src:multi", reg.host()),
                &format!("docker://{}/team/app:multi", berth.host()),
                true,
            )
            .await;

            let out = tempdir();
            let layout = out.path().join("layout");
            skopeo(
                &format!("docker://{}/team/app:single", berth.host()),
                &format!("oci:{}:single", layout.display()),
                false,
            )
            .await;
            assert_oci_layout(&layout, &single.manifest, &[], &single.blobs());
            skopeo(
                &format!("docker://{}/team/app:multi", berth.host()),
                &format!("oci:{}:multi", layout.display()),
                true,
            )
            .await;
            let children: Vec<&Image> = multi.images.iter().collect();
            assert_oci_layout(&layout, &multi.bytes, &children, &multi.blobs());

            // The private repository is not an upstream one: the upstream saw no request for
            // it, and the pull-through namespace does not have it.
            let reqs = reg.requests().await;
            assert!(
                !reqs.iter().any(|r| r.path.contains("team/app")),
                "berth asked the upstream about a private repository: {reqs:#?}"
            );
            let (status, h, body) = berth
                .fetch("/v2/team/app/manifests/multi", &[("Accept", ACCEPT_ALL)])
                .await;
            assert_eq!(status, 200);
            assert_eq!(body, multi.bytes);
            assert_eq!(
                header_str(&h, "docker-content-digest"),
                Some(multi.digest.as_str())
            );
            assert_eq!(header_str(&h, "content-type"), Some(OCI_INDEX));
        },
    )
    .await;
}

/// Uploads in several chunks, an out-of-order chunk, resuming after asking where the
/// upload stands, a wrong digest, a cancelled upload, monolithic uploads and mounts.
#[tokio::test(flavor = "multi_thread")]
async fn chunked_uploads_resume_and_refuse_what_does_not_fit() {
    within(
        120,
        "chunked_uploads_resume_and_refuse_what_does_not_fit",
        async {
            let berth = Berth::start(&[]).await;
            let http = reqwest::Client::new();
            let url = |path: &str| format!("{}{path}", berth.url());
            let bytes = random_bytes(5, 300_000);
            let digest = digest_of(&bytes);

            let start = |repo: &'static str| {
                let http = http.clone();
                let post = url(&format!("/v2/{repo}/blobs/uploads/"));
                async move {
                    let r = http.post(post).send().await.unwrap();
                    assert_eq!(
                        r.status().as_u16(),
                        202,
                        "POST uploads: {:?}",
                        r.text().await
                    );
                    assert!(r.headers().contains_key("docker-upload-uuid"));
                    header_str(r.headers(), "location").unwrap().to_owned()
                }
            };
            let patch = |loc: String, range: String, body: Vec<u8>| {
                let http = http.clone();
                let u = url(&loc);
                async move {
                    http.patch(u)
                        .header("Content-Type", "application/octet-stream")
                        .header("Content-Range", range)
                        .body(body)
                        .send()
                        .await
                        .unwrap()
                }
            };

            let loc = start("team/chunks").await;
            assert!(loc.starts_with("/v2/team/chunks/blobs/uploads/"), "{loc}");
            let r = patch(loc.clone(), "0-99999".into(), bytes[..100_000].to_vec()).await;
            assert_eq!(r.status().as_u16(), 202);
            assert_eq!(header_str(r.headers(), "range"), Some("0-99999"));
            // A chunk that skips ahead is refused with where the upload stands.
            let r = patch(
                loc.clone(),
                "200000-299999".into(),
                bytes[200_000..].to_vec(),
            )
            .await;
            assert_eq!(r.status().as_u16(), 416);
            assert_eq!(header_str(r.headers(), "range"), Some("0-99999"));
            assert_eq!(header_str(r.headers(), "location"), Some(loc.as_str()));
            let (code, msg) = oci_error(&r.bytes().await.unwrap(), "out-of-order chunk");
            assert_eq!(code, "BLOB_UPLOAD_INVALID");
            assert!(msg.contains("100000"), "{msg}");
            // A chunk shorter than its Content-Range says.
            let r = patch(
                loc.clone(),
                "100000-100009".into(),
                bytes[100_000..100_005].to_vec(),
            )
            .await;
            assert_eq!(r.status().as_u16(), 416);
            assert_eq!(header_str(r.headers(), "range"), Some("0-100004"));
            // Resume: ask, then send from there.
            let r = http.get(url(&loc)).send().await.unwrap();
            assert_eq!(r.status().as_u16(), 204);
            assert_eq!(header_str(r.headers(), "range"), Some("0-100004"));
            let r = patch(
                loc.clone(),
                "100005-199999".into(),
                bytes[100_005..200_000].to_vec(),
            )
            .await;
            assert_eq!(r.status().as_u16(), 202);
            // The closing PUT carries the last chunk.
            let r = http
                .put(url(&format!("{loc}?digest={digest}")))
                .header("Content-Range", "200000-299999")
                .body(bytes[200_000..].to_vec())
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 201, "{:?}", r.text().await);
            let blob_path = format!("/v2/team/chunks/blobs/{digest}");
            assert_eq!(
                header_str(r.headers(), "location"),
                Some(blob_path.as_str())
            );
            assert_eq!(
                header_str(r.headers(), "docker-content-digest"),
                Some(digest.as_str())
            );
            let (status, _, body) = berth.fetch(&blob_path, &[]).await;
            assert_eq!((status, digest_of(&body)), (200, digest.clone()));
            // The finished upload is gone.
            let r = http.get(url(&loc)).send().await.unwrap();
            assert_eq!(r.status().as_u16(), 404);
            let (code, _) = oci_error(&r.bytes().await.unwrap(), "finished upload");
            assert_eq!(code, "BLOB_UPLOAD_UNKNOWN");

            // A wrong digest at the end: DIGEST_INVALID, and nothing is published.
            let loc = start("team/chunks").await;
            let wrong = digest_of(b"something else");
            let r = http
                .put(url(&format!("{loc}?digest={wrong}")))
                .body(b"these bytes".to_vec())
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 400);
            let (code, _) = oci_error(&r.bytes().await.unwrap(), "wrong digest");
            assert_eq!(code, "DIGEST_INVALID");
            for d in [&wrong, &digest_of(b"these bytes")] {
                let (status, _, _) = berth
                    .fetch(&format!("/v2/team/chunks/blobs/{d}"), &[])
                    .await;
                assert_eq!(status, 404, "{d} was published");
            }
            let left = std::fs::read_dir(berth.store_dir().join("uploads"))
                .unwrap()
                .count();
            assert_eq!(left, 0, "a failed upload left its files in uploads/");

            // A cancelled upload.
            let loc = start("team/chunks").await;
            let r = http.delete(url(&loc)).send().await.unwrap();
            assert_eq!(r.status().as_u16(), 204);
            let r = http.get(url(&loc)).send().await.unwrap();
            assert_eq!(r.status().as_u16(), 404);

            // Monolithic: POST with ?digest=, and POST then one PUT.
            let small = b"monolithic".to_vec();
            let small_digest = digest_of(&small);
            let r = http
                .post(url(&format!(
                    "/v2/team/mono/blobs/uploads/?digest={small_digest}"
                )))
                .body(small.clone())
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 201, "{:?}", r.text().await);
            let loc = start("team/mono2").await;
            let r = http
                .put(url(&format!("{loc}?digest={small_digest}")))
                .body(small.clone())
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 201);

            // A blob is readable only through repositories it was pushed or mounted to.
            let (status, _, _) = berth
                .fetch(&format!("/v2/team/other/blobs/{digest}"), &[])
                .await;
            assert_eq!(status, 404);
            let mount = |repo: &str, from: &str| {
                url(&format!(
                    "/v2/{repo}/blobs/uploads/?mount={digest}&from={from}"
                ))
            };
            let r = http
                .post(mount("team/other", "team/nothing"))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 202, "a refused mount starts an upload");
            assert!(header_str(r.headers(), "location")
                .unwrap()
                .starts_with("/v2/team/other/blobs/uploads/"));
            let (status, _, _) = berth
                .fetch(&format!("/v2/team/other/blobs/{digest}"), &[])
                .await;
            assert_eq!(status, 404);
            let r = http
                .post(mount("team/other", "team/chunks"))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 201);
            assert_eq!(
                header_str(r.headers(), "location"),
                Some(format!("/v2/team/other/blobs/{digest}").as_str())
            );
            let (status, _, body) = berth
                .fetch(&format!("/v2/team/other/blobs/{digest}"), &[])
                .await;
            assert_eq!((status, body.len()), (200, bytes.len()));
        },
    )
    .await;
}

/// Pushes to a pull-through namespace are refused without contacting the upstream, and
/// a layer pushed privately that is already cached from an upstream is one file.
#[tokio::test(flavor = "multi_thread")]
async fn upstream_namespaces_stay_read_only_and_content_is_stored_once() {
    within(
        120,
        "upstream_namespaces_stay_read_only_and_content_is_stored_once",
        async {
            let reg = Registry::start().await;
            let image = make_single(21, 200_000);
            reg.pusher(None)
                .image("library/cached", Some("v1"), &image)
                .await;
            let berth =
                Berth::start(&[Upstream::new("docker.io", &reg.url(), &["library/**"])]).await;
            let http = reqwest::Client::new();
            let before = reg.requests().await.len();
            for (method, path) in [
                ("POST", "/v2/docker.io/library/cached/blobs/uploads/"),
                ("POST", "/v2/library/cached/blobs/uploads/?ns=docker.io"),
                ("PUT", "/v2/docker.io/library/cached/manifests/v2"),
                ("DELETE", "/v2/docker.io/library/cached/manifests/v1"),
            ] {
                let r = http
                    .request(method.parse().unwrap(), format!("{}{path}", berth.url()))
                    .body("{}")
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status().as_u16(), 405, "{method} {path}");
                let (code, msg) = oci_error(&r.bytes().await.unwrap(), path);
                assert_eq!(code, "UNSUPPORTED", "{method} {path}");
                assert!(msg.contains("read-only"), "{method} {path}: {msg}");
            }
            assert_eq!(
                reg.requests().await.len(),
                before,
                "a refused push reached the upstream"
            );

            // Pull the layer through, then push the same layer privately.
            let layer = &image.layers[0].blob;
            let (status, _, _) = berth
                .fetch(
                    &format!("/v2/docker.io/library/cached/blobs/{}", layer.digest),
                    &[],
                )
                .await;
            assert_eq!(status, 200);
            Pusher::new(&berth.url(), None)
                .blob("team/mine", layer)
                .await;
            let (status, _, body) = berth
                .fetch(&format!("/v2/team/mine/blobs/{}", layer.digest), &[])
                .await;
            assert_eq!((status, digest_of(&body)), (200, layer.digest.clone()));
            let mut files = Vec::new();
            let mut dirs = vec![berth.store_dir().join("blobs")];
            while let Some(d) = dirs.pop() {
                for e in std::fs::read_dir(d).unwrap() {
                    let p = e.unwrap().path();
                    if p.is_dir() {
                        dirs.push(p);
                    } else if p.file_name().unwrap().to_str() == Some(layer.hex()) {
                        files.push(p);
                    }
                }
            }
            assert_eq!(
                files.len(),
                1,
                "the layer is stored more than once: {files:?}"
            );

            // Private content is not readable through an upstream namespace: berth asks
            // the upstream, which does not have it.
            let secret = make_single(22, 10_000);
            Pusher::new(&berth.url(), None)
                .image("team/secret", Some("v1"), &secret)
                .await;
            for path in [
                format!(
                    "/v2/docker.io/library/cached/blobs/{}",
                    secret.layers[0].blob.digest
                ),
                format!(
                    "/v2/library/cached/blobs/{}?ns=docker.io",
                    secret.config.digest
                ),
                format!("/v2/docker.io/library/cached/manifests/{}", secret.digest),
            ] {
                let (status, _, body) = berth.fetch(&path, &[("Accept", ACCEPT_ALL)]).await;
                assert_eq!(status, 404, "GET {path} served private content: {body:?}");
                let r = berth.head(&path, &[("Accept", ACCEPT_ALL)]).await;
                assert_eq!(r.status().as_u16(), 404, "HEAD {path}");
            }
            // The referrers API is not proxied: a 404 sends clients to the tag schema.
            let r = berth
                .get(
                    &format!("/v2/docker.io/library/cached/referrers/{}", image.digest),
                    &[],
                )
                .await;
            assert_eq!(r.status().as_u16(), 404);
        },
    )
    .await;
}

/// Manifests pushed by tag and by digest, several tags at once, validation failures,
/// tag and catalog pagination, referrers with and without a filter, and deletes.
#[tokio::test(flavor = "multi_thread")]
async fn manifests_tags_referrers_and_deletes() {
    within(120, "manifests_tags_referrers_and_deletes", async {
        let berth = Berth::start(&[]).await;
        let http = reqwest::Client::new();
        let url = |path: &str| format!("{}{path}", berth.url());
        let image = make_single(31, 50_000);
        let push = Pusher::new(&berth.url(), None);
        for b in image.blobs() {
            push.blob("team/app", b).await;
        }
        let put = |repo: &str, reference: &str, body: bytes::Bytes, media_type: &str| {
            http.put(url(&format!("/v2/{repo}/manifests/{reference}")))
                .header("Content-Type", media_type)
                .body(body)
                .send()
        };

        // References a blob the repository does not have.
        let r = put("team/empty", "v1", image.manifest.clone(), OCI_MANIFEST).await.unwrap();
        assert_eq!(r.status().as_u16(), 400);
        let (code, _) = oci_error(&r.bytes().await.unwrap(), "missing blobs");
        assert_eq!(code, "MANIFEST_BLOB_UNKNOWN");
        // Not what it says it is.
        let r = put("team/app", "v1", bytes::Bytes::from_static(b"{not json"), OCI_MANIFEST)
            .await
            .unwrap();
        let (code, _) = oci_error(&r.bytes().await.unwrap(), "garbage manifest");
        assert_eq!(code, "MANIFEST_INVALID");
        // Too large.
        let r = put("team/app", "v1", bytes::Bytes::from(vec![b' '; (4 << 20) + 1]), OCI_MANIFEST)
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 413);

        // By tag, with more tags at once.
        let r = http
            .put(url("/v2/team/app/manifests/v1?tag=latest&tag=stable"))
            .header("Content-Type", OCI_MANIFEST)
            .body(image.manifest.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 201, "{:?}", r.text().await);
        assert_eq!(header_str(r.headers(), "docker-content-digest"), Some(image.digest.as_str()));
        for tag in ["v1", "latest", "stable", image.digest.as_str()] {
            let (status, _, body) = berth
                .fetch(&format!("/v2/team/app/manifests/{tag}"), &[("Accept", ACCEPT_ALL)])
                .await;
            assert_eq!((status, body.clone()), (200, image.manifest.clone()), "{tag}");
        }
        // By digest, and a wrong digest.
        let r = put("team/app", &image.digest, image.manifest.clone(), OCI_MANIFEST).await.unwrap();
        assert_eq!(r.status().as_u16(), 201);
        let r = put("team/app", &digest_of(b"x"), image.manifest.clone(), OCI_MANIFEST).await.unwrap();
        let (code, _) = oci_error(&r.bytes().await.unwrap(), "wrong manifest digest");
        assert_eq!(code, "DIGEST_INVALID");

        // Tags page with n and last, with a Link to the next page.
        let r = http.get(url("/v2/team/app/tags/list?n=2")).send().await.unwrap();
        assert_eq!(
            header_str(r.headers(), "link"),
            Some("</v2/team/app/tags/list?n=2&last=stable>; rel=\"next\"")
        );
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v, serde_json::json!({"name": "team/app", "tags": ["latest", "stable"]}));
        let r = http
            .get(url("/v2/team/app/tags/list?n=2&last=stable"))
            .send()
            .await
            .unwrap();
        assert!(r.headers().get("link").is_none());
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["tags"], serde_json::json!(["v1"]));
        let r = http.get(url("/v2/team/none/tags/list")).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 404);

        // The catalog lists private repositories.
        push.blob("team/zz", &image.config).await;
        let r = http.get(url("/v2/_catalog?n=1")).send().await.unwrap();
        assert_eq!(
            header_str(r.headers(), "link"),
            Some("</v2/_catalog?n=1&last=team%2Fapp>; rel=\"next\"")
        );
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["repositories"], serde_json::json!(["team/app"]));
        let v: serde_json::Value = http
            .get(url("/v2/_catalog?last=team%2Fapp"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(v["repositories"], serde_json::json!(["team/zz"]));

        // An artifact with a subject, found through the referrers API.
        let empty = Blob::new("application/vnd.oci.empty.v1+json", &b"{}"[..]);
        push.blob("team/app", &empty).await;
        let referrers = format!("/v2/team/app/referrers/{}", image.digest);
        let r = http.get(url(&referrers)).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 200);
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["manifests"], serde_json::json!([]));
        let mut artifacts = Vec::new();
        for kind in ["application/vnd.example.sig", "application/vnd.example.sbom"] {
            let body = bytes::Bytes::from(
                serde_json::to_vec(&serde_json::json!({
                    "schemaVersion": 2,
                    "mediaType": OCI_MANIFEST,
                    "artifactType": kind,
                    "config": empty.descriptor(),
                    "layers": [empty.descriptor()],
                    "subject": {"mediaType": OCI_MANIFEST, "digest": image.digest, "size": image.manifest.len()},
                    "annotations": {"org.example.kind": kind},
                }))
                .unwrap(),
            );
            let d = digest_of(&body);
            let r = put("team/app", &d, body, OCI_MANIFEST).await.unwrap();
            assert_eq!(r.status().as_u16(), 201);
            assert_eq!(header_str(r.headers(), "oci-subject"), Some(image.digest.as_str()));
            artifacts.push(d);
        }
        let r = http.get(url(&referrers)).send().await.unwrap();
        assert_eq!(header_str(r.headers(), "content-type"), Some(OCI_INDEX));
        assert!(r.headers().get("oci-filters-applied").is_none());
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["manifests"].as_array().unwrap().len(), 2);
        let r = http
            .get(url(&format!("{referrers}?artifactType=application/vnd.example.sbom")))
            .send()
            .await
            .unwrap();
        assert_eq!(header_str(r.headers(), "oci-filters-applied"), Some("artifactType"));
        let v: serde_json::Value = r.json().await.unwrap();
        let listed = v["manifests"].as_array().unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0]["digest"], artifacts[1].as_str());
        assert_eq!(listed[0]["artifactType"], "application/vnd.example.sbom");
        assert_eq!(listed[0]["annotations"]["org.example.kind"], "application/vnd.example.sbom");

        // Deletes: a tag, then the manifest (its other tags go with it), then a blob.
        let del = |path: String| http.delete(url(&path)).send();
        assert_eq!(del("/v2/team/app/manifests/stable".into()).await.unwrap().status().as_u16(), 202);
        let (status, _, _) = berth.fetch("/v2/team/app/manifests/stable", &[]).await;
        assert_eq!(status, 404);
        assert_eq!(
            del(format!("/v2/team/app/manifests/{}", image.digest)).await.unwrap().status().as_u16(),
            202
        );
        for tag in ["v1", "latest"] {
            let (status, _, _) = berth.fetch(&format!("/v2/team/app/manifests/{tag}"), &[]).await;
            assert_eq!(status, 404, "{tag} survived its manifest");
        }
        let r = del(format!("/v2/team/app/manifests/{}", image.digest)).await.unwrap();
        assert_eq!(r.status().as_u16(), 404);
        let (code, _) = oci_error(&r.bytes().await.unwrap(), "deleting twice");
        assert_eq!(code, "MANIFEST_UNKNOWN");
        let layer = &image.layers[0].blob.digest;
        assert_eq!(del(format!("/v2/team/app/blobs/{layer}")).await.unwrap().status().as_u16(), 202);
        let r = del(format!("/v2/team/app/blobs/{layer}")).await.unwrap();
        assert_eq!(r.status().as_u16(), 404);
        let (code, _) = oci_error(&r.bytes().await.unwrap(), "deleting a blob twice");
        assert_eq!(code, "BLOB_UNKNOWN");
    })
    .await;
}

/// After deletes, `berth gc` (berth stopped) frees exactly the blobs nothing references
/// any more, and refuses to run on a store a running berth holds.
#[tokio::test(flavor = "multi_thread")]
async fn garbage_collection_after_deletes_frees_exactly_the_unreferenced() {
    within(
        120,
        "garbage_collection_after_deletes_frees_exactly_the_unreferenced",
        async {
            let mut berth = Berth::start(&[]).await;
            let push = Pusher::new(&berth.url(), None);
            let keep = make_single(41, 30_000);
            let drop = make_single(42, 40_000);
            push.image("team/gc", Some("keep"), &keep).await;
            push.image("team/gc", Some("drop"), &drop).await;
            let orphan = Blob::new("application/octet-stream", random_bytes(43, 5_000));
            push.blob("team/gc", &orphan).await;
            let r = reqwest::Client::new()
                .delete(format!(
                    "{}/v2/team/gc/manifests/{}",
                    berth.url(),
                    drop.digest
                ))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 202);

            let gc = |store: std::path::PathBuf| async move {
                tokio::process::Command::new(support::berth_binary())
                    .args(["gc", "--grace", "0s", "--store"])
                    .arg(store)
                    .output()
                    .await
                    .unwrap()
            };
            let refused = gc(berth.store_dir()).await;
            assert_eq!(
                refused.status.code(),
                Some(2),
                "gc ran on a store in use: {}",
                output_text(&refused)
            );
            assert!(
                output_text(&refused).contains("is berth running"),
                "{}",
                output_text(&refused)
            );

            berth.stop().await;
            let out = gc(berth.store_dir()).await;
            assert!(out.status.success(), "{}", output_text(&out));
            // drop's config and layers (none shared with keep) and the orphan.
            let freed: Vec<&Blob> = drop.blobs().into_iter().chain([&orphan]).collect();
            let bytes: usize = freed.iter().map(|b| b.bytes.len()).sum();
            let want = format!(
                "removed 1 manifests, {n} blob links and {n} blobs ({bytes} bytes)",
                n = freed.len()
            );
            assert!(
                String::from_utf8_lossy(&out.stdout).contains(&want),
                "{} (want {want})",
                output_text(&out)
            );

            berth.restart().await;
            for b in &freed {
                let (status, _, _) = berth
                    .fetch(&format!("/v2/team/gc/blobs/{}", b.digest), &[])
                    .await;
                assert_eq!(status, 404, "{} survived", b.digest);
            }
            let out = tempdir();
            skopeo(
                &format!("docker://{}/team/gc:keep", berth.host()),
                &format!("oci:{}:keep", out.path().display()),
                false,
            )
            .await;
            assert_oci_layout(out.path(), &keep.manifest, &[], &keep.blobs());
        },
    )
    .await;
}

/// With `gc_interval` set, berth collects garbage while it runs: after a delete, the
/// blobs only the deleted manifest used go once they are older than `gc_grace`, and a
/// push in progress (younger than the grace period) is untouched.
#[tokio::test(flavor = "multi_thread")]
async fn garbage_is_collected_while_berth_runs() {
    within(120, "garbage_is_collected_while_berth_runs", async {
        let config = "[server]\ngc_interval = \"300ms\"\ngc_grace = \"2s\"\n";
        let berth = Berth::start_with_config(config, &[]).await;
        let push = Pusher::new(&berth.url(), None);
        let keep = make_single(61, 20_000);
        let drop = make_single(62, 20_000);
        push.image("team/live", Some("keep"), &keep).await;
        push.image("team/live", Some("drop"), &drop).await;
        let r = reqwest::Client::new()
            .delete(format!(
                "{}/v2/team/live/manifests/{}",
                berth.url(),
                drop.digest
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 202);
        // A blob pushed now, with no manifest yet, stays for the grace period.
        let pending = Blob::new("application/octet-stream", random_bytes(63, 1_000));
        push.blob("team/live", &pending).await;
        let layer = &drop.layers[0].blob;
        let path = format!("/v2/team/live/blobs/{}", layer.digest);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let (status, _, _) = berth.fetch(&path, &[]).await;
            if status == 404 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{path} was never collected"
            );
            let (status, _, _) = berth
                .fetch(&format!("/v2/team/live/blobs/{}", pending.digest), &[])
                .await;
            assert_eq!(
                status, 200,
                "a blob younger than the grace period was collected"
            );
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        let hex = layer.hex();
        let file = berth
            .store_dir()
            .join("blobs/sha256")
            .join(&hex[..2])
            .join(hex);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while file.exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "{} was not deleted",
                file.display()
            );
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        let out = tempdir();
        skopeo(
            &format!("docker://{}/team/live:keep", berth.host()),
            &format!("oci:{}:keep", out.path().display()),
            false,
        )
        .await;
        assert_oci_layout(out.path(), &keep.manifest, &[], &keep.blobs());
    })
    .await;
}

/// An upload nobody finishes is removed after `upload_timeout`, with its bytes.
#[tokio::test(flavor = "multi_thread")]
async fn abandoned_uploads_are_removed_after_the_upload_timeout() {
    within(
        60,
        "abandoned_uploads_are_removed_after_the_upload_timeout",
        async {
            let config = "[server]\nupload_timeout = \"1s\"\n";
            let berth = Berth::start_with_config(config, &[]).await;
            let http = reqwest::Client::new();
            let r = http
                .post(format!("{}/v2/team/abandoned/blobs/uploads/", berth.url()))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 202);
            let loc = format!(
                "{}{}",
                berth.url(),
                header_str(r.headers(), "location").unwrap()
            );
            let r = http
                .patch(&loc)
                .body(vec![7u8; 50_000])
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 202);
            let uploads = berth.store_dir().join("uploads");
            assert_eq!(
                std::fs::read_dir(&uploads).unwrap().count(),
                2,
                "the upload's file and state"
            );
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            loop {
                let status = http.get(&loc).send().await.unwrap().status().as_u16();
                if status == 404 {
                    break;
                }
                assert_eq!(status, 204);
                assert!(
                    std::time::Instant::now() < deadline,
                    "the upload was never removed"
                );
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            }
            assert_eq!(
                std::fs::read_dir(&uploads).unwrap().count(),
                0,
                "its files stayed"
            );
        },
    )
    .await;
}

/// Starts an upload into `repo`; its absolute URL.
async fn start_upload(http: &reqwest::Client, berth: &Berth, repo: &str) -> String {
    let r = http
        .post(format!("{}/v2/{repo}/blobs/uploads/", berth.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202, "POST uploads of {repo}");
    let loc = header_str(r.headers(), "location").unwrap();
    format!("{}{loc}", berth.url())
}

/// An upload in progress survives berth being killed (SIGKILL): after the restart the
/// client asks where it stands on the upload URL it has, sends the rest and closes it.
/// The chunk that was arriving when berth died is not part of the resumed upload.
#[tokio::test(flavor = "multi_thread")]
async fn an_upload_in_progress_resumes_after_sigkill() {
    within(120, "an_upload_in_progress_resumes_after_sigkill", async {
        const MIB: usize = 1 << 20;
        let mut berth = Berth::start(&[]).await;
        let http = berth.client.clone();
        let bytes = random_bytes(77, 3 * MIB);
        let digest = digest_of(&bytes);

        let r = http
            .post(format!("{}/v2/team/resume/blobs/uploads/", berth.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 202);
        let loc = header_str(r.headers(), "location").unwrap().to_owned();
        let uuid = header_str(r.headers(), "docker-upload-uuid")
            .unwrap()
            .to_owned();
        let r = http
            .patch(format!("{}{loc}", berth.url()))
            .header("Content-Type", "application/octet-stream")
            .header("Content-Range", format!("0-{}", MIB - 1))
            .body(bytes[..MIB].to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 202);
        let first = format!("0-{}", MIB - 1);
        assert_eq!(header_str(r.headers(), "range"), Some(first.as_str()));

        // The next chunk is half received (a piece of it written) when berth dies.
        let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
        let body = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|c| (Ok::<_, std::io::Error>(c), rx))
        });
        let stalled = tokio::spawn(
            http.patch(format!("{}{loc}", berth.url()))
                .header("Content-Type", "application/octet-stream")
                .body(reqwest::Body::wrap_stream(body))
                .send(),
        );
        tx.send(bytes[MIB..MIB * 5 / 2].to_vec()).await.unwrap();
        // The largest partial file in the store, wherever its layout keeps uploads.
        let largest_partial = || {
            ["uploads", "tmp"]
                .iter()
                .filter_map(|d| std::fs::read_dir(berth.store_dir().join(d)).ok())
                .flatten()
                .filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .max()
                .unwrap_or(0)
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while largest_partial() < 2 * MIB as u64 {
            assert!(
                std::time::Instant::now() < deadline,
                "the second chunk never reached the upload's file"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        berth.kill();
        let _ = stalled.await;
        drop(tx);
        berth.restart().await;

        // Where does it stand? Exactly the acknowledged chunk.
        let r = http
            .get(format!("{}{loc}", berth.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 204, "{:?}", r.text().await);
        assert_eq!(header_str(r.headers(), "range"), Some(first.as_str()));
        assert_eq!(
            header_str(r.headers(), "docker-upload-uuid"),
            Some(uuid.as_str())
        );
        assert_eq!(header_str(r.headers(), "location"), Some(loc.as_str()));
        let file = berth.store_dir().join("uploads").join(&uuid);
        assert_eq!(std::fs::metadata(&file).unwrap().len(), MIB as u64);
        let r = http
            .patch(format!("{}{loc}", berth.url()))
            .header("Content-Type", "application/octet-stream")
            .header("Content-Range", format!("{MIB}-{}", 3 * MIB - 1))
            .body(bytes[MIB..].to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 202);
        let all = format!("0-{}", 3 * MIB - 1);
        assert_eq!(header_str(r.headers(), "range"), Some(all.as_str()));
        let r = http
            .put(format!("{}{loc}?digest={digest}", berth.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 201, "{:?}", r.text().await);
        assert_eq!(
            header_str(r.headers(), "docker-content-digest"),
            Some(digest.as_str())
        );
        let (status, _, body) = berth
            .fetch(&format!("/v2/team/resume/blobs/{digest}"), &[])
            .await;
        assert_eq!(status, 200);
        assert_eq!(digest_of(&body), digest);
        let r = http
            .get(format!("{}{loc}", berth.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 404);
        assert_eq!(
            std::fs::read_dir(berth.store_dir().join("uploads"))
                .unwrap()
                .count(),
            0,
            "the finished upload left files"
        );
    })
    .await;
}

/// A push acknowledged with 201 is there after berth is killed (SIGKILL) right after:
/// blobs, the manifest and its tag.
#[tokio::test(flavor = "multi_thread")]
async fn an_acknowledged_push_survives_sigkill() {
    within(120, "an_acknowledged_push_survives_sigkill", async {
        let mut berth = Berth::start(&[]).await;
        let image = make_single(91, 50_000);
        Pusher::new(&berth.url(), None)
            .image("team/durable", Some("v1"), &image)
            .await;
        berth.kill();
        berth.restart().await;
        let (status, _, body) = berth
            .fetch("/v2/team/durable/manifests/v1", &[("Accept", OCI_MANIFEST)])
            .await;
        assert_eq!(status, 200);
        assert_eq!(body, image.manifest);
        for b in image.blobs() {
            let (status, _, body) = berth
                .fetch(&format!("/v2/team/durable/blobs/{}", b.digest), &[])
                .await;
            assert_eq!(status, 200, "{}", b.digest);
            assert_eq!(body, b.bytes);
        }
    })
    .await;
}

/// `berth gc` fails closed: when a stored manifest cannot be parsed, nothing linked in
/// its repository is collected (not even blobs no manifest could reference), and the
/// manifest is named in the output; other repositories are collected as usual.
#[tokio::test(flavor = "multi_thread")]
async fn garbage_collection_keeps_what_an_unreadable_manifest_may_reference() {
    within(
        120,
        "garbage_collection_keeps_what_an_unreadable_manifest_may_reference",
        async {
            let mut berth = Berth::start(&[]).await;
            let push = Pusher::new(&berth.url(), None);
            let image = make_single(92, 20_000);
            push.image("team/corrupt", Some("v1"), &image).await;
            let orphan = Blob::new("application/octet-stream", random_bytes(93, 3_000));
            push.blob("team/corrupt", &orphan).await;
            let elsewhere = Blob::new("application/octet-stream", random_bytes(94, 3_000));
            push.blob("team/other", &elsewhere).await;
            berth.stop().await;

            // The manifest's record no longer parses.
            {
                let store = berth_store::Store::open(&berth.store_dir()).unwrap();
                let mut b = berth_store::Batch::default();
                b.put_private_manifest(
                    &image.digest.parse().unwrap(),
                    &berth_store::ManifestRecord {
                        media_type: OCI_MANIFEST.to_owned(),
                        body: bytes::Bytes::from_static(b"{\"schemaVersion\": 2, \"lay"),
                    },
                );
                store.meta.write(b).unwrap();
            }
            let out = tokio::process::Command::new(support::berth_binary())
                .args(["gc", "--grace", "0s", "--store"])
                .arg(berth.store_dir())
                .output()
                .await
                .unwrap();
            let text = output_text(&out);
            assert!(out.status.success(), "{text}");
            assert!(
                text.contains(&format!(
                    "kept every blob of team/corrupt: its manifest {} cannot be read",
                    image.digest
                )),
                "{text}"
            );
            assert!(
                text.contains("removed 0 manifests, 1 blob links and 1 blobs"),
                "{text}"
            );

            berth.restart().await;
            for b in image.blobs().into_iter().chain([&orphan]) {
                let (status, _, _) = berth
                    .fetch(&format!("/v2/team/corrupt/blobs/{}", b.digest), &[])
                    .await;
                assert_eq!(status, 200, "{} was collected", b.digest);
            }
            let (status, _, _) = berth
                .fetch(&format!("/v2/team/other/blobs/{}", elsewhere.digest), &[])
                .await;
            assert_eq!(status, 404, "team/other was not collected");
        },
    )
    .await;
}

/// Range arithmetic at the edges of u64: a chunk claiming bytes up to 2^64-1 is
/// refused (not taken as "0 bytes"), and huge `Range` values on a GET get 206 or 416,
/// never a crash; the upload and berth carry on.
#[tokio::test(flavor = "multi_thread")]
async fn content_range_and_range_at_the_edge_of_u64() {
    within(60, "content_range_and_range_at_the_edge_of_u64", async {
        let berth = Berth::start(&[]).await;
        let http = reqwest::Client::new();
        let loc = start_upload(&http, &berth, "team/edge").await;
        for (range, body, status, code) in [
            ("0-18446744073709551615", vec![], 400, "BLOB_UPLOAD_INVALID"),
            (
                "0-18446744073709551615",
                vec![1u8; 10],
                400,
                "BLOB_UPLOAD_INVALID",
            ),
            (
                "18446744073709551615-18446744073709551615",
                vec![],
                400,
                "BLOB_UPLOAD_INVALID",
            ),
            ("5-9", vec![1u8; 5], 416, "BLOB_UPLOAD_INVALID"),
            ("0-18446744073709551614", vec![], 413, "SIZE_INVALID"),
        ] {
            let r = http
                .patch(&loc)
                .header("Content-Range", range)
                .body(body)
                .send()
                .await
                .unwrap();
            let got = r.status().as_u16();
            let (c, msg) = oci_error(&r.bytes().await.unwrap(), range);
            assert_eq!((got, c.as_str()), (status, code), "{range}: {msg}");
            if status == 413 {
                break; // the upload is gone
            }
        }
        assert_eq!(http.get(&loc).send().await.unwrap().status().as_u16(), 404);

        let blob = Blob::new("application/octet-stream", random_bytes(95, 1_000));
        Pusher::new(&berth.url(), None)
            .blob("team/edge", &blob)
            .await;
        let path = format!("/v2/team/edge/blobs/{}", blob.digest);
        for (range, status, want) in [
            ("bytes=0-18446744073709551615", 206, Some((0, 1000))),
            ("bytes=18446744073709551615-", 416, None),
            ("bytes=18446744073709551615-18446744073709551615", 416, None),
            ("bytes=-18446744073709551615", 206, Some((0, 1000))),
            ("bytes=990-18446744073709551614", 206, Some((990, 1000))),
        ] {
            let (got, h, body) = berth.fetch(&path, &[("Range", range)]).await;
            assert_eq!(got, status, "{range}");
            if let Some((start, end)) = want {
                assert_eq!(&body[..], &blob.bytes[start..end], "{range}");
                assert_eq!(
                    header_str(&h, "content-range"),
                    Some(format!("bytes {start}-{}/1000", end - 1).as_str())
                );
            }
        }
    })
    .await;
}

/// `max_upload_size`: an upload that would grow past it gets 413 SIZE_INVALID, whether
/// announced (Content-Length, Content-Range) or found as the bytes arrive (a chunked
/// body), and its bytes are removed; one within it is published.
#[tokio::test(flavor = "multi_thread")]
async fn uploads_over_max_upload_size_are_refused_and_removed() {
    within(
        60,
        "uploads_over_max_upload_size_are_refused_and_removed",
        async {
            let config = "[server]\nmax_upload_size = \"4KiB\"\n";
            let berth = Berth::start_with_config(config, &[]).await;
            let http = reqwest::Client::new();
            let uploads = berth.store_dir().join("uploads");
            let fits = Blob::new("application/octet-stream", random_bytes(96, 4096));
            let over = Blob::new("application/octet-stream", random_bytes(97, 4097));
            let refused = |r: reqwest::Response, what: &'static str| async move {
                assert_eq!(r.status().as_u16(), 413, "{what}");
                let (code, msg) = oci_error(&r.bytes().await.unwrap(), what);
                assert_eq!(code, "SIZE_INVALID", "{what}");
                assert!(msg.contains("4096 bytes"), "{what}: {msg}");
            };

            // Monolithic, with a Content-Length.
            let r = http
                .post(format!(
                    "{}/v2/team/big/blobs/uploads/?digest={}",
                    berth.url(),
                    over.digest
                ))
                .body(over.bytes.clone())
                .send()
                .await
                .unwrap();
            refused(r, "monolithic POST").await;
            // A chunk whose Content-Range ends past the limit.
            let loc = start_upload(&http, &berth, "team/big").await;
            let r = http
                .patch(&loc)
                .header("Content-Range", "0-4096")
                .body(over.bytes.clone())
                .send()
                .await
                .unwrap();
            refused(r, "PATCH with Content-Range").await;
            assert_eq!(http.get(&loc).send().await.unwrap().status().as_u16(), 404);
            // Two chunks, the second streamed without a Content-Length.
            let loc = start_upload(&http, &berth, "team/big").await;
            let r = http
                .patch(&loc)
                .body(over.bytes.slice(..4000))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 202);
            let rest = over.bytes.slice(4000..);
            let stream = futures_util::stream::once(async move { Ok::<_, std::io::Error>(rest) });
            let r = http
                .put(format!("{loc}?digest={}", over.digest))
                .body(reqwest::Body::wrap_stream(stream))
                .send()
                .await
                .unwrap();
            refused(r, "streamed PUT").await;
            assert_eq!(http.get(&loc).send().await.unwrap().status().as_u16(), 404);
            assert_eq!(
                std::fs::read_dir(&uploads).unwrap().count(),
                0,
                "bytes stayed"
            );
            let (status, _, _) = berth
                .fetch(&format!("/v2/team/big/blobs/{}", over.digest), &[])
                .await;
            assert_eq!(status, 404);

            // Exactly the limit is fine.
            Pusher::new(&berth.url(), None)
                .blob("team/big", &fits)
                .await;
            let (status, _, body) = berth
                .fetch(&format!("/v2/team/big/blobs/{}", fits.digest), &[])
                .await;
            assert_eq!(status, 200);
            assert_eq!(body, fits.bytes);
        },
    )
    .await;
}
