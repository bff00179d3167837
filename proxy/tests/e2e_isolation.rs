//! Isolation of pulled-through content: a digest cached through one repository of one
//! upstream is served through another repository only when that repository's upstream
//! says it has it, against the real docker-registry.
//!
//! Run: `cargo test --release -p berth-proxy --test e2e_isolation`.

mod support;

use support::*;

fn code(body: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    v["errors"][0]["code"].as_str().unwrap_or("").to_owned()
}

/// Caches `acme/secret/app` through ghcr.io, then asks for its layer and manifest through
/// docker.io's `library/alpine` (namespaced and `?ns=`, GET and HEAD) and through another
/// ghcr.io repository: each is refused after the upstream said no, never served from the
/// cache. Once `library/alpine` has the layer upstream, berth confirms that with one HEAD,
/// serves its stored copy, and remembers the answer across a restart.
#[tokio::test(flavor = "multi_thread")]
async fn a_cached_digest_is_served_only_through_a_repository_that_has_it() {
    within(
        240,
        "a_cached_digest_is_served_only_through_a_repository_that_has_it",
        async {
            let reg = Registry::start().await;
            let secret = make_single(41, 150_000);
            let public = make_single(42, 150_000);
            let push = reg.pusher(None);
            push.image("acme/secret/app", Some("1"), &secret).await;
            push.image("library/alpine", Some("3"), &public).await;
            push.image("acme/other", Some("1"), &public).await;
            let mut berth = Berth::start(&[
                Upstream::new("ghcr.io", &reg.url(), &["acme/**"]),
                Upstream::new("docker.io", &reg.url(), &["library/**"]),
            ])
            .await;

            // Cached through its own repository.
            let layer = &secret.layers[0].blob;
            for blob in secret.blobs() {
                let path = format!("/v2/ghcr.io/acme/secret/app/blobs/{}", blob.digest);
                let (status, _, body) = berth.fetch(&path, &[]).await;
                assert_eq!(status, 200, "GET {path}");
                assert_eq!(body, blob.bytes, "GET {path}");
            }
            let secret_manifest =
                format!("/v2/ghcr.io/acme/secret/app/manifests/{}", secret.digest);
            let (status, _, body) = berth
                .fetch(&secret_manifest, &[("Accept", ACCEPT_ALL)])
                .await;
            assert_eq!(status, 200, "GET {secret_manifest}");
            assert_eq!(body, secret.manifest);

            // Through repositories that do not have it: refused, for every form.
            let blob_paths = [
                format!("/v2/docker.io/library/alpine/blobs/{}", layer.digest),
                format!("/v2/library/alpine/blobs/{}?ns=docker.io", layer.digest),
                format!("/v2/ghcr.io/acme/other/blobs/{}", layer.digest),
            ];
            for path in &blob_paths {
                let (status, _, body) = berth.fetch(path, &[]).await;
                assert_eq!(status, 404, "GET {path} served another repository's blob");
                assert_eq!(code(&body), "BLOB_UNKNOWN", "GET {path}");
                let r = berth.head(path, &[]).await;
                assert_eq!(
                    r.status().as_u16(),
                    404,
                    "HEAD {path} answered for another repository's blob"
                );
            }
            let manifest_paths = [
                format!("/v2/docker.io/library/alpine/manifests/{}", secret.digest),
                format!(
                    "/v2/library/alpine/manifests/{}?ns=docker.io",
                    secret.digest
                ),
                format!("/v2/ghcr.io/acme/other/manifests/{}", secret.digest),
            ];
            for path in &manifest_paths {
                let (status, _, body) = berth.fetch(path, &[("Accept", ACCEPT_ALL)]).await;
                assert_eq!(
                    status, 404,
                    "GET {path} served another repository's manifest"
                );
                assert_eq!(code(&body), "MANIFEST_UNKNOWN", "GET {path}");
                let r = berth.head(path, &[("Accept", ACCEPT_ALL)]).await;
                assert_eq!(
                    r.status().as_u16(),
                    404,
                    "HEAD {path} answered for another repository's manifest"
                );
            }
            // The upstream was asked each time: the answer came from it, not from the cache.
            let alpine_blob = format!("/v2/library/alpine/blobs/{}", layer.digest);
            assert!(
                reg.count("HEAD", &alpine_blob).await >= 1,
                "berth never asked the upstream whether library/alpine has the layer"
            );

            // Now library/alpine has the layer upstream too: one HEAD confirms it, and the
            // bytes come from berth's stored copy.
            push.image("library/alpine", Some("copy"), &secret).await;
            let heads_before = reg.count("HEAD", &alpine_blob).await;
            let path = &blob_paths[0];
            let (status, _, body) = berth.fetch(path, &[]).await;
            assert_eq!(status, 200, "GET {path} once library/alpine has the layer");
            assert_eq!(body, layer.bytes, "GET {path}");
            assert_eq!(
                reg.count("GET", &alpine_blob).await,
                0,
                "the stored copy was fetched again"
            );
            assert_eq!(
                reg.count("HEAD", &alpine_blob).await,
                heads_before + 1,
                "one HEAD confirms it"
            );

            // The answer is remembered, across a restart too.
            berth.stop().await;
            berth.restart().await;
            for path in &blob_paths[..2] {
                let (status, _, body) = berth.fetch(path, &[]).await;
                assert_eq!(status, 200, "GET {path} after the restart");
                assert_eq!(body, layer.bytes);
            }
            assert_eq!(
                reg.count("HEAD", &alpine_blob).await,
                heads_before + 1,
                "asked again"
            );
            assert_eq!(reg.count("GET", &alpine_blob).await, 0);
        },
    )
    .await;
}

/// The same manifest bytes pushed to two workspaces with different Content-Types: each
/// repository answers with the type it was pushed with, before and after the other push.
#[tokio::test(flavor = "multi_thread")]
async fn a_manifest_s_content_type_belongs_to_the_repository_it_was_pushed_to() {
    within(
        120,
        "a_manifest_s_content_type_belongs_to_the_repository_it_was_pushed_to",
        async {
            let berth = Berth::start(&[]).await;
            let push = Pusher::new(&berth.url(), None);
            let image = make_single(43, 10_000);
            // No mediaType field in the body, so both Content-Types describe it.
            let body = bytes::Bytes::from(
                serde_json::to_vec(&serde_json::json!({
                    "schemaVersion": 2,
                    "config": image.config.descriptor(),
                    "layers": image.layers.iter().map(|l| l.blob.descriptor()).collect::<Vec<_>>(),
                }))
                .unwrap(),
            );
            let digest = digest_of(&body);
            const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
            for repo in ["team-a/app", "team-b/app"] {
                for blob in image.blobs() {
                    push.blob(repo, blob).await;
                }
            }
            push.manifest("team-a/app", "v1", OCI_MANIFEST, &body).await;
            let get = |repo: &str| format!("/v2/{repo}/manifests/{digest}");
            let content_type = |h: &reqwest::header::HeaderMap| {
                header_str(h, "content-type").unwrap_or("").to_owned()
            };
            let (status, h, _) = berth
                .fetch(&get("team-a/app"), &[("Accept", ACCEPT_ALL)])
                .await;
            assert_eq!(status, 200);
            assert_eq!(content_type(&h), OCI_MANIFEST);

            push.manifest("team-b/app", "v1", DOCKER_MANIFEST, &body)
                .await;
            for (repo, expected) in [
                ("team-a/app", OCI_MANIFEST),
                ("team-b/app", DOCKER_MANIFEST),
            ] {
                for path in [get(repo), format!("/v2/{repo}/manifests/v1")] {
                    let (status, h, got) = berth.fetch(&path, &[("Accept", ACCEPT_ALL)]).await;
                    assert_eq!(status, 200, "GET {path}");
                    assert_eq!(got, body, "GET {path}");
                    assert_eq!(
                        content_type(&h),
                        expected,
                        "GET {path}: another repository's push changed its Content-Type"
                    );
                }
            }
        },
    )
    .await;
}

/// An upstream's credentials go only to a token realm on its own host or on a host its
/// `token_hosts` lists: a realm elsewhere (here, another port of the same address) gets an
/// anonymous token request, and the credentials never reach it.
#[tokio::test(flavor = "multi_thread")]
async fn upstream_credentials_go_only_to_a_realm_the_upstream_owns() {
    within(
        120,
        "upstream_credentials_go_only_to_a_realm_the_upstream_owns",
        async {
            const PW_ENV: &str = "BERTH_E2E_REALM_PASSWORD";
            const PASSWORD: &str = "realm-secret-7d1f";
            let ts = TokenServer::start_requiring("bob", PASSWORD);
            let reg = Registry::start_with_token_auth(&ts).await;
            let image = make_single(44, 20_000);
            reg.pusher(Some(ts.mint("team/private", &["pull", "push"])))
                .image("team/private", Some("v1"), &image)
                .await;
            let path = "/v2/ghcr.io/team/private/manifests/v1";

            // The realm is not the upstream's and not listed: no credentials go there.
            let berth = Berth::start_with_env(
                &[Upstream::new("ghcr.io", &reg.url(), &["team/**"]).credentials("bob", PW_ENV)],
                &[(PW_ENV, PASSWORD)],
            )
            .await;
            let (status, _, _) = berth.fetch(path, &[("Accept", ACCEPT_ALL)]).await;
            assert_ne!(status, 200, "GET {path} succeeded without the credentials");
            let asked = ts.requests();
            assert!(!asked.is_empty(), "berth never asked the token service");
            assert!(
            asked.iter().all(|t| t.authorization.is_none()),
            "berth sent its upstream credentials to a realm the upstream does not own: {asked:?}"
        );
            assert!(
                !berth.log().contains(PASSWORD),
                "the password reached berth's log"
            );
            drop(berth);

            // Listed: the credentials go there, and the pull works.
            let berth = Berth::start_with_env(
                &[Upstream::new("ghcr.io", &reg.url(), &["team/**"])
                    .credentials("bob", PW_ENV)
                    .token_host(&ts.host())],
                &[(PW_ENV, PASSWORD)],
            )
            .await;
            let (status, _, body) = berth.fetch(path, &[("Accept", ACCEPT_ALL)]).await;
            assert_eq!(
                status,
                200,
                "GET {path}: {}",
                String::from_utf8_lossy(&body)
            );
            assert_eq!(body, image.manifest);
            assert!(ts.requests().iter().any(|t| t.authorization.is_some()));
        },
    )
    .await;
}

/// An upstream serving HTTPS with a certificate from a private CA: refused without
/// `ca_file` (berth does not trust it), pulled through with it.
#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_signed_by_a_private_ca_works_with_its_ca_file() {
    within(
        120,
        "an_upstream_signed_by_a_private_ca_works_with_its_ca_file",
        async {
            let pki = test_pki();
            let reg = Registry::start_tls(pki.path()).await;
            assert!(reg.url().starts_with("https://"));
            let image = make_single(45, 50_000);
            reg.pusher(None).image("corp/app", Some("1"), &image).await;
            let path = "/v2/registry.corp/corp/app/manifests/1";

            let berth =
                Berth::start(&[Upstream::new("registry.corp", &reg.url(), &["corp/**"])]).await;
            let (status, _, body) = berth.fetch(path, &[("Accept", ACCEPT_ALL)]).await;
            assert_eq!(
                status,
                502,
                "GET {path} without the CA: {}",
                String::from_utf8_lossy(&body)
            );
            drop(berth);

            let berth = Berth::start(&[Upstream::new("registry.corp", &reg.url(), &["corp/**"])
                .ca_file(&pki.path().join("ca.pem"))])
            .await;
            let (status, _, body) = berth.fetch(path, &[("Accept", ACCEPT_ALL)]).await;
            assert_eq!(
                status,
                200,
                "GET {path} with the CA: {}",
                String::from_utf8_lossy(&body)
            );
            assert_eq!(body, image.manifest);
            let layer = &image.layers[0].blob;
            let (status, _, body) = berth
                .fetch(
                    &format!("/v2/registry.corp/corp/app/blobs/{}", layer.digest),
                    &[],
                )
                .await;
            assert_eq!(status, 200);
            assert_eq!(body, layer.bytes);
        },
    )
    .await;
}
