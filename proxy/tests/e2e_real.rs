//! End-to-end tests of the `berth` binary against real components: docker-registry 2.8
//! as the upstream (with and without token authentication), skopeo and containerd as
//! clients. See `support/mod.rs` for the harness.
//!
//! Run: `cargo test --release -p berth-proxy --test e2e_real`.

mod support;

use std::time::{Duration, Instant};

use support::*;

/// 1. skopeo copies of a single-arch image and of a multi-arch index through berth are
///    byte-identical to what was pushed upstream; containerd's `?ns=` form serves the
///    same bytes and says which namespace it used.
#[tokio::test(flavor = "multi_thread")]
async fn skopeo_copies_through_berth_are_byte_identical() {
    within(
        300,
        "skopeo_copies_through_berth_are_byte_identical",
        async {
            let reg = Registry::start().await;
            let single = make_single(1, 300_000);
            let multi = make_multiarch(2, 200_000);
            let push = reg.pusher(None);
            push.image("library/alpha", Some("single"), &single).await;
            push.index("library/alpha", "multi", &multi).await;
            let berth =
                Berth::start(&[Upstream::new("docker.io", &reg.url(), &["library/**"])]).await;
            let out = tempdir();

            // Single-platform image.
            let d1 = out.path().join("single");
            skopeo_copy(
                &format!("{}/docker.io/library/alpha:single", berth.host()),
                &d1,
                false,
            )
            .await;
            assert_skopeo_dir(&d1, &single.manifest, &[], &single.blobs());

            // Multi-platform index, every platform.
            let d2 = out.path().join("multi");
            skopeo_copy(
                &format!("{}/docker.io/library/alpha:multi", berth.host()),
                &d2,
                true,
            )
            .await;
            let children: Vec<&Image> = multi.images.iter().collect();
            assert_skopeo_dir(&d2, &multi.bytes, &children, &multi.blobs());

            // containerd's form, same bytes, with OCI-Namespace.
            let ns_path = "/v2/library/alpha/manifests/multi?ns=docker.io";
            let (status, h, body) = berth.fetch(ns_path, &[("Accept", ACCEPT_ALL)]).await;
            assert_eq!(
                status,
                200,
                "GET {ns_path}: {}",
                String::from_utf8_lossy(&body)
            );
            assert_eq!(
                body, multi.bytes,
                "GET {ns_path}: bytes differ from the pushed index"
            );
            assert_eq!(
                header_str(&h, "oci-namespace"),
                Some("docker.io"),
                "GET {ns_path}: OCI-Namespace"
            );
            assert_eq!(
                header_str(&h, "docker-content-digest"),
                Some(multi.digest.as_str())
            );
            assert_eq!(header_str(&h, "content-type"), Some(OCI_INDEX));

            // containerd resolves with HEAD and needs the real Content-Length.
            let r = berth.head(ns_path, &[("Accept", ACCEPT_ALL)]).await;
            assert_eq!(r.status().as_u16(), 200);
            assert_eq!(
                header_str(r.headers(), "content-length"),
                Some(multi.bytes.len().to_string().as_str()),
                "HEAD {ns_path}: Content-Length"
            );
            assert_eq!(
                header_str(r.headers(), "docker-content-digest"),
                Some(multi.digest.as_str())
            );

            // A blob in the ?ns= form.
            let layer = &multi.image("arm64").layers[1].blob;
            let blob_path = format!("/v2/library/alpha/blobs/{}?ns=docker.io", layer.digest);
            let (status, h, body) = berth.fetch(&blob_path, &[]).await;
            assert_eq!(status, 200, "GET {blob_path}");
            assert_eq!(digest_of(&body), layer.digest, "GET {blob_path}: content");
            assert_eq!(header_str(&h, "oci-namespace"), Some("docker.io"));

            // On docker.io a one-segment name means library/<name>, in both forms.
            for path in [
                "/v2/docker.io/alpha/manifests/single",
                "/v2/alpha/manifests/single?ns=docker.io",
            ] {
                let (status, _, body) = berth.fetch(path, &[("Accept", ACCEPT_ALL)]).await;
                assert_eq!(
                    status,
                    200,
                    "GET {path}: {}",
                    String::from_utf8_lossy(&body)
                );
                assert_eq!(body, single.manifest, "GET {path}");
            }

            // It did go through berth to the registry.
            let reqs = reg.requests().await;
            assert!(
                reqs.iter()
                    .any(|r| r.path == "/v2/library/alpha/manifests/multi"
                        && r.user_agent.starts_with("berth/")),
                "the registry never saw berth ask for alpha:multi: {reqs:#?}"
            );
        },
    )
    .await;
}

/// 2. containerd pulls an image of docker.io and one of ghcr.io through berth (hosts.toml
///    mirror, `?ns=`), and the registry saw berth fetch them.
#[tokio::test(flavor = "multi_thread")]
async fn containerd_pulls_docker_io_and_ghcr_io_through_berth() {
    within(
        300,
        "containerd_pulls_docker_io_and_ghcr_io_through_berth",
        async {
            let reg = Registry::start().await;
            let lib = make_multiarch(3, 150_000);
            let app = make_multiarch(4, 150_000);
            let push = reg.pusher(None);
            push.index("library/ctrimg", "v1", &lib).await;
            push.index("team/app", "v2", &app).await;
            let berth = Berth::start(&[
                Upstream::new("docker.io", &reg.url(), &["library/**"]),
                Upstream::new("ghcr.io", &reg.url(), &["team/**"]),
            ])
            .await;
            let ctd = Containerd::start().await;
            // containerd falls back to `server` when the mirror fails: make that a port
            // this test holds closed, so a failing berth fails the pull instead of
            // sending it to the Internet.
            let fallback = ClosedPort::new();
            let hosts = ctd.hosts_dir(
                &berth.url(),
                &[("docker.io", &fallback.url()), ("ghcr.io", &fallback.url())],
            );

            let o = ctd
                .pull("berth-e2e", "docker.io/library/ctrimg:v1", &hosts)
                .await;
            assert!(
                o.status.success(),
                "ctr pull docker.io/library/ctrimg:v1 failed:\n{}\nberth log:\n{}",
                output_text(&o),
                berth.log()
            );
            let o = ctd.pull("berth-e2e", "ghcr.io/team/app:v2", &hosts).await;
            assert!(
                o.status.success(),
                "ctr pull ghcr.io/team/app:v2 failed:\n{}\nberth log:\n{}",
                output_text(&o),
                berth.log()
            );

            let ls = ctd.ctr("berth-e2e", &["images", "ls"]).await;
            let ls = String::from_utf8_lossy(&ls.stdout).into_owned();
            assert!(
                ls.contains(&lib.digest),
                "ctr images ls lacks {}:\n{ls}",
                lib.digest
            );
            assert!(
                ls.contains(&app.digest),
                "ctr images ls lacks {}:\n{ls}",
                app.digest
            );

            // The registry served the host platform's layers to berth (not to containerd).
            let reqs = reg.requests().await;
            for (repo, index) in [("library/ctrimg", &lib), ("team/app", &app)] {
                let image = index.image(host_arch());
                for blob in image.blobs() {
                    let path = format!("/v2/{repo}/blobs/{}", blob.digest);
                    assert!(
                        reqs.iter().any(|r| r.method == "GET"
                            && r.path == path
                            && r.status == 200
                            && r.user_agent.starts_with("berth/")),
                        "the registry never served {path} to berth: {reqs:#?}"
                    );
                }
            }
            assert!(
                !reqs.iter().any(|r| r.user_agent.contains("containerd")),
                "containerd talked to the registry directly: {reqs:#?}"
            );
            // And berth was asked in containerd's form for both namespaces.
            let log = berth.log().replace('"', "");
            for ns in ["docker.io", "ghcr.io"] {
                assert!(
                    log.lines()
                        .any(|l| l.contains(&format!("ns={ns}")) && l.contains("status=200")),
                    "berth's log shows no ?ns={ns} request:\n{log}"
                );
            }
        },
    )
    .await;
}

/// 3. Token-authenticated upstreams: anonymous pulls, pulls with configured credentials,
///    and a clear error without them. A client's own Authorization header never leaves berth.
#[tokio::test(flavor = "multi_thread")]
async fn token_auth_upstreams() {
    within(300, "token_auth_upstreams", async {
        const PASSWORD: &str = "s3cret-upstream-pw";
        const PW_ENV: &str = "BERTH_E2E_UPSTREAM_PASSWORD";
        let client_auth = basic_auth("client-user", "client-secret-xyz");
        let client_b64 = client_auth.trim_start_matches("Basic ").to_owned();

        // Anonymous pulls allowed.
        let ts_anon = TokenServer::start_anonymous();
        let reg_anon = Registry::start_with_token_auth(&ts_anon).await;
        let tap_anon = TapProxy::start(reg_anon.port());
        let public = make_multiarch(5, 120_000);
        reg_anon
            .pusher(Some(ts_anon.mint("library/public", &["pull", "push"])))
            .index("library/public", "v1", &public)
            .await;

        // Credentials required.
        let ts_priv = TokenServer::start_requiring("bob", PASSWORD);
        let reg_priv = Registry::start_with_token_auth(&ts_priv).await;
        let tap_priv = TapProxy::start(reg_priv.port());
        let private = make_multiarch(6, 120_000);
        reg_priv
            .pusher(Some(ts_priv.mint("team/private", &["pull", "push"])))
            .index("team/private", "v1", &private)
            .await;

        // Sanity: the registries really require tokens.
        let r = reqwest::get(format!("{}/v2/team/private/manifests/v1", reg_priv.url()))
            .await
            .unwrap();
        assert_eq!(
            r.status().as_u16(),
            401,
            "the private registry should require a token"
        );
        let anon_before = ts_priv.requests().len();
        assert_eq!(anon_before, 0);

        let berth = Berth::start_with_env(
            &[
                Upstream::new("docker.io", &tap_anon.url(), &["library/**"]),
                Upstream::new("ghcr.io", &tap_priv.url(), &["team/**"])
                    .credentials("bob", PW_ENV)
                    .token_host(&ts_priv.host()),
            ],
            &[(PW_ENV, PASSWORD)],
        )
        .await;
        let with_client_auth = [("Authorization", client_auth.as_str())];

        // Anonymous token flow.
        pull_index_through(
            &berth,
            "docker.io",
            "library/public",
            "v1",
            &public,
            &with_client_auth,
        )
        .await;
        let treqs = ts_anon.requests();
        assert!(
            !treqs.is_empty(),
            "berth never asked the anonymous token server for a token"
        );
        for t in &treqs {
            assert_eq!(
                t.authorization, None,
                "berth sent an Authorization header to the anonymous token server: {t:?}"
            );
            assert_eq!(t.service.as_deref(), Some(TOKEN_SERVICE), "{t:?}");
            assert!(
                t.scopes
                    .iter()
                    .any(|s| s == "repository:library/public:pull"),
                "{t:?}"
            );
        }
        let sent = tap_anon.authorizations();
        assert!(
            sent.iter().any(|a| a.starts_with("Bearer ")),
            "berth never sent a bearer token to the registry: {sent:?}"
        );
        assert!(
            sent.iter().all(|a| a.starts_with("Bearer ")),
            "berth sent a non-bearer Authorization to the registry: {sent:?}"
        );
        assert!(
            !tap_anon.captured().contains(&client_b64),
            "the client's Authorization reached the registry"
        );

        // Configured credentials.
        pull_index_through(
            &berth,
            "ghcr.io",
            "team/private",
            "v1",
            &private,
            &with_client_auth,
        )
        .await;
        let treqs = ts_priv.requests();
        assert!(
            !treqs.is_empty(),
            "berth never asked the token server for a token"
        );
        let expected = basic_auth("bob", PASSWORD);
        for t in &treqs {
            assert_eq!(
                t.authorization.as_deref(),
                Some(expected.as_str()),
                "the token server must only ever see berth's configured credentials: {t:?}"
            );
            assert_eq!(t.status, 200, "{t:?}");
        }
        let sent = tap_priv.authorizations();
        assert!(
            sent.iter().any(|a| a.starts_with("Bearer ")),
            "no bearer token reached the registry: {sent:?}"
        );
        assert!(
            !tap_priv.captured().contains(&client_b64),
            "the client's Authorization reached the registry"
        );
        assert!(
            !tap_priv.captured().contains(PASSWORD),
            "the upstream password reached the registry itself"
        );

        // Without credentials configured, the same pull fails clearly.
        let berth_anon =
            Berth::start(&[Upstream::new("ghcr.io", &tap_priv.url(), &["team/**"])]).await;
        let before = ts_priv.requests().len();
        let path = "/v2/ghcr.io/team/private/manifests/v1";
        let (status, _, body) = berth_anon
            .fetch(
                path,
                &[
                    ("Accept", ACCEPT_ALL),
                    ("Authorization", client_auth.as_str()),
                ],
            )
            .await;
        assert!(
            matches!(status, 401 | 403),
            "GET {path} without credentials: expected 401/403, got {status}: {}",
            String::from_utf8_lossy(&body)
        );
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_else(|e| {
            panic!(
                "GET {path}: error body is not JSON ({e}): {}",
                String::from_utf8_lossy(&body)
            )
        });
        let code = v["errors"][0]["code"]
            .as_str()
            .unwrap_or_else(|| panic!("no OCI error code in {v}"));
        assert!(
            matches!(code, "DENIED" | "UNAUTHORIZED"),
            "GET {path}: code {code}"
        );
        assert!(!String::from_utf8_lossy(&body).contains(PASSWORD));
        let after = ts_priv.requests();
        assert!(
            after.len() > before,
            "berth without credentials never tried the token server"
        );
        for t in &after[before..] {
            assert_eq!(
                t.authorization, None,
                "berth without credentials sent an Authorization to the token server: {t:?}"
            );
            assert_eq!(t.status, 401);
        }
        for t in ts_anon.requests().iter().chain(ts_priv.requests().iter()) {
            assert!(
                !t.authorization
                    .as_deref()
                    .unwrap_or("")
                    .contains(&client_b64),
                "the client's Authorization reached a token server: {t:?}"
            );
        }
        assert!(
            !tap_priv.captured().contains(&client_b64),
            "the client's Authorization reached the registry"
        );
    })
    .await;
}

/// 4. A second pull of the same image sends nothing upstream (long tag TTL).
#[tokio::test(flavor = "multi_thread")]
async fn second_pull_is_served_from_the_cache() {
    within(300, "second_pull_is_served_from_the_cache", async {
        let reg = Registry::start().await;
        let multi = make_multiarch(7, 250_000);
        reg.pusher(None).index("library/again", "v1", &multi).await;
        let berth =
            Berth::start(&[Upstream::new("docker.io", &reg.url(), &["library/**"]).tag_ttl("1h")])
                .await;
        let out = tempdir();
        let src = format!("{}/docker.io/library/again:v1", berth.host());

        let baseline = reg.requests().await.len();
        let d1 = out.path().join("first");
        skopeo_copy(&src, &d1, true).await;
        let children: Vec<&Image> = multi.images.iter().collect();
        assert_skopeo_dir(&d1, &multi.bytes, &children, &multi.blobs());
        let after_first = reg.requests().await;
        assert!(
            after_first.len() > baseline,
            "the first pull sent nothing upstream?"
        );
        for blob in multi.blobs() {
            let p = format!("/v2/library/again/blobs/{}", blob.digest);
            assert_eq!(
                after_first
                    .iter()
                    .filter(|r| r.method == "GET" && r.path == p)
                    .count(),
                1,
                "the first pull should fetch {p} upstream exactly once"
            );
        }

        let d2 = out.path().join("second");
        skopeo_copy(&src, &d2, true).await;
        assert_skopeo_dir(&d2, &multi.bytes, &children, &multi.blobs());
        // containerd's form of the same content is the same cache.
        pull_index_through(&berth, "docker.io", "library/again", "v1", &multi, &[]).await;
        let r = berth
            .head(
                "/v2/library/again/manifests/v1?ns=docker.io",
                &[("Accept", ACCEPT_ALL)],
            )
            .await;
        assert_eq!(r.status().as_u16(), 200);
        let after_second = reg.requests().await;
        assert_eq!(
            after_second.len(),
            after_first.len(),
            "the second pull reached the upstream: {:#?}",
            &after_second[after_first.len()..]
        );
    })
    .await;
}

/// 5. 50 concurrent GETs of one uncached ≥ 100 MiB blob: one upstream GET, 50 correct bodies.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_gets_of_a_large_blob_fetch_it_once() {
    within(
        600,
        "concurrent_gets_of_a_large_blob_fetch_it_once",
        async {
            let reg = Registry::start().await;
            let big = tokio::task::spawn_blocking(|| big_layer().blob.clone())
                .await
                .unwrap();
            assert!(big.bytes.len() >= 100 << 20);
            reg.pusher(None).blob("library/big", &big).await;
            let berth = Berth::start(&[
                Upstream::new("docker.io", &reg.url(), &["library/**"]).read_timeout("10s")
            ])
            .await;
            let path = format!("/v2/docker.io/library/big/blobs/{}", big.digest);
            let upstream_path = format!("/v2/library/big/blobs/{}", big.digest);
            assert_eq!(reg.count("GET", &upstream_path).await, 0);

            let started = Instant::now();
            let mut tasks = Vec::new();
            for i in 0..50 {
                let url = format!("{}{path}", berth.url());
                // One client (and connection) per request, as 50 independent pullers.
                tasks.push(tokio::spawn(async move {
                    use sha2::{Digest as _, Sha256};
                    let client = reqwest::Client::new();
                    let mut resp = client
                        .get(&url)
                        .send()
                        .await
                        .map_err(|e| format!("request {i}: {e}"))?;
                    let status = resp.status().as_u16();
                    let declared = resp.content_length();
                    let mut h = Sha256::new();
                    let mut len = 0u64;
                    while let Some(chunk) = resp
                        .chunk()
                        .await
                        .map_err(|e| format!("request {i}: body after {len} bytes: {e}"))?
                    {
                        len += chunk.len() as u64;
                        h.update(&chunk);
                    }
                    Ok::<_, String>((
                        status,
                        declared,
                        len,
                        format!("sha256:{}", hex(&h.finalize())),
                    ))
                }));
            }
            let mut failures = Vec::new();
            for (i, t) in tasks.into_iter().enumerate() {
                match t.await.unwrap() {
                    Ok((status, declared, len, digest)) => {
                        if status != 200 || len != big.bytes.len() as u64 || digest != big.digest {
                            failures.push(format!(
                                "request {i}: status {status}, {len} bytes, {digest}"
                            ));
                        }
                        if let Some(d) = declared {
                            if d != big.bytes.len() as u64 {
                                failures.push(format!("request {i}: Content-Length {d}"));
                            }
                        }
                    }
                    Err(e) => failures.push(e),
                }
            }
            assert!(
                failures.is_empty(),
                "{} of 50 GETs failed: {failures:#?}",
                failures.len()
            );
            eprintln!(
                "50 concurrent GETs of {} bytes took {:?}",
                big.bytes.len(),
                started.elapsed()
            );
            let reqs = reg.requests().await;
            let gets = reqs
                .iter()
                .filter(|r| r.method == "GET" && r.path == upstream_path)
                .count();
            assert_eq!(
                gets, 1,
                "expected exactly one upstream GET of the blob, got {gets}: {reqs:#?}"
            );

            // Served from the store afterwards.
            let (status, _, body) = berth.fetch(&path, &[]).await;
            assert_eq!(status, 200);
            assert_eq!(digest_of(&body), big.digest);
            assert_eq!(
                reg.count("GET", &upstream_path).await,
                1,
                "a cached blob was fetched again"
            );
        },
    )
    .await;
}

/// 6. A repository outside the allowlist is refused with DENIED and nothing is sent upstream.
#[tokio::test(flavor = "multi_thread")]
async fn disallowed_repositories_are_denied_without_upstream_traffic() {
    within(
        120,
        "disallowed_repositories_are_denied_without_upstream_traffic",
        async {
            let reg = Registry::start().await;
            // The content exists upstream: if berth forwarded these requests, they would succeed.
            let evil = make_single(8, 5_000);
            let push = reg.pusher(None);
            push.image("evil/x", Some("latest"), &evil).await;
            push.image("library/ok", Some("latest"), &evil).await;
            let berth = Berth::start(&[
                Upstream::new("docker.io", &reg.url(), &["library/**"]),
                Upstream::new("ghcr.io", &reg.url(), &["team/**"]),
            ])
            .await;
            let baseline = reg.requests().await.len();

            let blob = &evil.layers[0].blob.digest;
            let denied = [
                "/v2/docker.io/evil/x/manifests/latest".to_owned(),
                format!("/v2/docker.io/evil/x/manifests/{}", evil.digest),
                format!("/v2/docker.io/evil/x/blobs/{blob}"),
                "/v2/docker.io/evil/x/tags/list".to_owned(),
                "/v2/evil/x/manifests/latest?ns=docker.io".to_owned(),
                format!("/v2/evil/x/blobs/{blob}?ns=docker.io"),
                "/v2/ghcr.io/evil/x/manifests/latest".to_owned(),
                // Allowed on docker.io, but not on ghcr.io.
                "/v2/ghcr.io/library/ok/manifests/latest".to_owned(),
                "/v2/library/ok/manifests/latest?ns=ghcr.io".to_owned(),
            ];
            for path in &denied {
                let (status, _, body) = berth.fetch(path, &[("Accept", ACCEPT_ALL)]).await;
                let text = String::from_utf8_lossy(&body);
                assert_eq!(
                    status, 403,
                    "GET {path}: expected 403, got {status}: {text}"
                );
                let v: serde_json::Value = serde_json::from_slice(&body)
                    .unwrap_or_else(|e| panic!("GET {path}: body not JSON ({e}): {text}"));
                assert_eq!(v["errors"][0]["code"], "DENIED", "GET {path}: {text}");
                let r = berth.head(path, &[("Accept", ACCEPT_ALL)]).await;
                assert_eq!(r.status().as_u16(), 403, "HEAD {path}");
            }
            let after = reg.requests().await;
            assert_eq!(
                after.len(),
                baseline,
                "denied requests reached the upstream: {:#?}",
                &after[baseline..]
            );

            // Control: an allowed repository does reach the upstream (so the count above means something).
            let (status, _, body) = berth
                .fetch(
                    "/v2/docker.io/library/ok/manifests/latest",
                    &[("Accept", ACCEPT_ALL)],
                )
                .await;
            assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
            assert_eq!(body, evil.manifest);
            assert!(
                reg.requests().await.len() > baseline,
                "the allowed request did not reach the upstream"
            );
        },
    )
    .await;
}

/// GETs the cached tag at `path` and checks it is served stale: 200, the same bytes and
/// digest, a `Warning` with code 110, within a bound far above the 2 s read timeout.
async fn assert_served_stale(
    berth: &Berth,
    path: &str,
    accept: &[(&str, &str)],
    img: &Image,
    why: &str,
) {
    let t = Instant::now();
    let (status, h, body) = berth.fetch(path, accept).await;
    let elapsed = t.elapsed();
    assert_eq!(
        status,
        200,
        "stale tag with the {why}: {}",
        String::from_utf8_lossy(&body)
    );
    assert_eq!(body, img.manifest, "stale tag with the {why}: bytes");
    assert_eq!(
        header_str(&h, "docker-content-digest"),
        Some(img.digest.as_str())
    );
    let warning = header_str(&h, "warning")
        .unwrap_or_else(|| panic!("no Warning on a stale tag ({why}); headers {h:?}"));
    assert!(warning.contains("110"), "Warning {warning:?} lacks 110");
    eprintln!("stale tag, {why}: served in {elapsed:?}");
    assert!(
        elapsed < Duration::from_secs(10),
        "stale tag ({why}) took {elapsed:?}, read_timeout is 2s"
    );
}

/// 7. A cached tag past its TTL is served stale, with a Warning, when the upstream is
///    (a) stopped and (b) hung (accepts connections and never answers).
#[tokio::test(flavor = "multi_thread")]
async fn stale_tags_are_served_when_the_upstream_is_down_or_hung() {
    within(
        180,
        "stale_tags_are_served_when_the_upstream_is_down_or_hung",
        async {
            let mut reg = Registry::start().await;
            let img = make_single(9, 10_000);
            reg.pusher(None)
                .image("library/stale", Some("v1"), &img)
                .await;
            // berth's upstream is a port this test holds for its whole life, relayed to the
            // registry, then to a closed port (stopped), then to a listener that never
            // answers (hung): no port is given up for another process to take meanwhile.
            let relay = TapProxy::start(reg.port());
            let berth = Berth::start(&[Upstream::new("docker.io", &relay.url(), &["library/**"])
                .tag_ttl("1h")
                .read_timeout("2s")])
            .await;
            let path = "/v2/docker.io/library/stale/manifests/v1";
            let accept = [("Accept", ACCEPT_ALL)];

            let (status, h, body) = berth.fetch(path, &accept).await;
            assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
            assert_eq!(body, img.manifest);
            assert!(h.get("warning").is_none(), "a fresh tag carries a Warning");

            // Within the TTL, served without asking (real time never reaches the 1 h TTL:
            // the test is bounded to 3 minutes, and berth's clock is moved by the test).
            let before = reg.requests().await.len();
            let (status, h, body) = berth.fetch(path, &accept).await;
            assert_eq!((status, &body), (200, &img.manifest));
            assert!(h.get("warning").is_none(), "a fresh tag carries a Warning");
            let after = reg.requests().await;
            assert_eq!(
                after.len(),
                before,
                "a GET within the TTL reached the upstream: {:#?}",
                &after[before..]
            );

            // Past the TTL it revalidates:
            berth.advance_clock(Duration::from_secs(61 * 60)).await;
            let before = reg.requests().await.len();
            let (status, h, body) = berth.fetch(path, &accept).await;
            assert_eq!(status, 200);
            assert_eq!(body, img.manifest);
            assert!(
                h.get("warning").is_none(),
                "a revalidated tag carries a Warning"
            );
            let after = reg.requests().await;
            assert!(
                after[before..]
                    .iter()
                    .any(|r| r.path == "/v2/library/stale/manifests/v1"),
                "a tag past its TTL was not revalidated upstream"
            );

            // (a) The upstream is stopped.
            let closed = ClosedPort::new();
            relay.retarget(closed.port());
            reg.stop();
            berth.advance_clock(Duration::from_secs(61 * 60)).await;
            assert_served_stale(&berth, path, &accept, &img, "upstream stopped").await;
            // Content by digest needs no upstream at all.
            let (status, h, body) = berth
                .fetch(
                    &format!("/v2/docker.io/library/stale/manifests/{}", img.digest),
                    &accept,
                )
                .await;
            assert_eq!(status, 200);
            assert_eq!(body, img.manifest);
            assert!(h.get("warning").is_none());

            // (b) The upstream hangs: something accepts on its port and never answers.
            let hung = HungListener::start();
            relay.retarget(hung.port());
            // Past the TTL, and past the backoff after the failed revalidation above.
            berth.advance_clock(Duration::from_secs(61 * 60)).await;
            assert_served_stale(&berth, path, &accept, &img, "upstream hung").await;
            assert!(
                hung.accepted() > 0,
                "berth did not try to revalidate against the hung upstream"
            );

            // An uncached tag cannot be served stale: an error, bounded by the timeouts.
            let t = Instant::now();
            let (status, _, body) = berth
                .fetch(
                    "/v2/docker.io/library/stale/manifests/never-cached",
                    &accept,
                )
                .await;
            let elapsed = t.elapsed();
            assert!(
                matches!(status, 502..=504),
                "uncached tag with the upstream hung: expected 502/503/504, got {status}: {}",
                String::from_utf8_lossy(&body)
            );
            let v: serde_json::Value = serde_json::from_slice(&body).expect("OCI error body");
            assert!(v["errors"][0]["code"].is_string(), "{v}");
            eprintln!("uncached tag, upstream hung: {status} in {elapsed:?}");
            assert!(
                elapsed < Duration::from_secs(30),
                "uncached tag with the upstream hung took {elapsed:?}"
            );
        },
    )
    .await;
}
