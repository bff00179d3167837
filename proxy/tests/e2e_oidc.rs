//! OpenID Connect end to end: a real OpenID provider (`oidc-provider`, tests/oidc), berth
//! with `[[auth.oidc]]` beside an htpasswd user, and a real login in headless Chromium:
//! the test logs in through the provider, makes an API key on berth's page and pushes
//! with skopeo using it; the status page shows the figures; workload JWTs with the right
//! and a wrong audience; an expired token and an expired key; a user whose group is
//! removed in the provider; a revoked key. Every page the browser visits is screenshotted
//! and checked (not blank, the expected elements drawn).
//!
//! Run: `cargo test --release --workspace --test e2e_oidc`.

mod support;

use std::time::Duration;

use support::oidc::*;
use support::*;

const PASSWORD: &str = "hank-pw";

/// berth with an upstream, the provider `corp`, and the htpasswd user `hank`. Group `ci`
/// may read and create (not update: immutable tags) under `ci/**`; `admins` may do
/// everything; any user who logged in may read the rest (nothing is open to anonymous
/// requests, so clients log in when `/v2/` asks them to); `ci` may read `/metrics` (and
/// the status page's figures).
async fn start(idp: &OidcProvider, upstream: &str) -> (Berth, tempfile::TempDir) {
    let dir = tempdir();
    let htpasswd = dir.path().join("htpasswd");
    let hash = bcrypt::hash(PASSWORD, 4).unwrap();
    std::fs::write(&htpasswd, format!("hank:{hash}\n")).unwrap();
    let token_key = dir.path().join("token.key");
    std::fs::write(&token_key, [7u8; 32]).unwrap();
    let config = format!(
        r#"{upstreams}
[auth]
htpasswd = {htpasswd:?}
token = {{ key = {token_key:?} }}
[auth.groups]
ci = ["hank"]

[[auth.oidc]]
name = "corp"
display_name = "Corp SSO"
issuer = "{issuer}"
client_id = "{OIDC_CLIENT_ID}"
client_secret_env = "BERTH_TEST_OIDC_SECRET"
scopes = ["openid", "profile", "email", "groups"]
audiences = ["{WORKLOAD_AUDIENCE}"]

[access]
admin = {{ users = [], groups = ["admins"] }}
metrics = {{ anonymous = false, groups = ["ci"] }}

[[access.repository]]
pattern = "**"
anonymous = []
default = ["read"]

[[access.repository]]
pattern = "ci/**"
anonymous = []
default = []
policies = [{{ users = [], groups = ["ci"], actions = ["read", "create"] }}]
"#,
        upstreams = berth_config(&[Upstream::new("docker.io", upstream, &["library/**"])]),
        issuer = idp.issuer(),
    );
    let env = [("BERTH_TEST_OIDC_SECRET", OIDC_CLIENT_SECRET)];
    (Berth::start_with_config(&config, &env).await, dir)
}

/// An OCI image layout of `image` under `dir`, tagged `v1`, for skopeo to push.
fn oci_layout(dir: &std::path::Path, image: &Image) -> String {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    for b in image.blobs() {
        std::fs::write(blobs.join(b.hex()), &b.bytes).unwrap();
    }
    std::fs::write(
        blobs.join(image.digest.trim_start_matches("sha256:")),
        &image.manifest,
    )
    .unwrap();
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": image.digest, "size": image.manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": "v1"}}]
    });
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    format!("oci:{}:v1", dir.display())
}

/// The status of `GET path` with `Authorization: auth`, and the body.
async fn get(berth: &Berth, path: &str, auth: Option<&str>) -> (u16, String) {
    let mut req = berth.client.get(format!("{}{path}", berth.url())).header(
        "Accept",
        "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json",
    );
    if let Some(a) = auth {
        req = req.header("Authorization", a);
    }
    let r = req.send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// The status of starting an upload to `repo` with Basic `user:password`.
async fn start_upload(berth: &Berth, repo: &str, user: &str, password: &str) -> u16 {
    berth
        .client
        .post(format!("{}/v2/{repo}/blobs/uploads/", berth.url()))
        .basic_auth(user, Some(password))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

fn texts(v: &serde_json::Value) -> String {
    v.to_string()
}

#[tokio::test]
async fn browser_login_key_push_status_workloads_expiry_and_group_removal() {
    within(600, "oidc end to end", async {
        let idp = OidcProvider::start(&OidcConfig::default()).await;
        let registry = Registry::start().await;
        let alpine = make_single(7, 3000);
        registry
            .pusher(None)
            .image("library/alpine", Some("3"), &alpine)
            .await;
        let (mut berth, _dir) = start(&idp, &registry.url()).await;

        // A pull through the cache, twice (a miss, then a hit), for the status page.
        let hank = format!("Basic {}", b64std(format!("hank:{PASSWORD}").as_bytes()));
        for _ in 0..2 {
            let path = "/v2/docker.io/library/alpine/manifests/3";
            let (status, _) = get(&berth, path, Some(&hank)).await;
            assert_eq!(status, 200);
        }

        // The htpasswd user keeps working beside OIDC.
        assert_eq!(start_upload(&berth, "ci/hank", "hank", PASSWORD).await, 202);

        // A real login in Chromium through the provider's form, then an API key made on
        // berth's page.
        let browser = Browser::new(&berth.url());
        let made = browser
            .run(
                "login-create-key",
                &[
                    "--provider",
                    "corp",
                    "--user",
                    "bob",
                    "--password",
                    "bob-pw",
                    "--key-name",
                    "ci-pipeline",
                ],
            )
            .await;
        assert_eq!(made["user"], "bob", "{made}");
        let key = made["key"].as_str().unwrap().to_owned();
        assert!(key.starts_with("berth_"), "{made}");
        let key_id = made["key_id"].as_str().unwrap().to_owned();
        assert!(texts(&made["groups"]).contains("ci"), "{made}");
        assert!(
            made["row"]["key-groups"]["text"]
                .as_str()
                .unwrap()
                .contains("ci"),
            "the key carries bob's groups: {made}"
        );
        // The name is preferred_username, not the provider's opaque sub.
        assert!(!berth.log().contains("user=u-1002"));

        // skopeo pushes with the key, as bob.
        let layout = tempdir();
        let pushed = make_single(8, 2000);
        let src = oci_layout(layout.path(), &pushed);
        let creds = format!("bob:{key}");
        skopeo_with(
            &src,
            &format!("docker://{}/ci/app:v1", berth.host()),
            &["--dest-creds", &creds],
        )
        .await;
        let basic = format!("Basic {}", b64std(creds.as_bytes()));
        let (status, body) = get(&berth, "/v2/ci/app/manifests/v1", Some(&basic)).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body.as_bytes(), &pushed.manifest[..], "byte for byte");
        // Immutable tags: ci may create, not update.
        let other = make_single(9, 1000);
        let layout2 = tempdir();
        let src2 = oci_layout(layout2.path(), &other);
        let out = tokio::process::Command::new("skopeo")
            .args([
                "--insecure-policy",
                "copy",
                "--retry-times",
                "0",
                "--dest-tls-verify=false",
                "--dest-creds",
                &creds,
                &src2,
                &format!("docker://{}/ci/app:v1", berth.host()),
            ])
            .output()
            .await
            .unwrap();
        assert!(!out.status.success(), "a ci key moved an existing tag");

        // The status page, as bob: the figures and the repositories he may read (the page
        // reads the store's contents at most every 30 s, and last read them at the login).
        berth.advance_clock(Duration::from_secs(31)).await;
        let status = browser.run("status", &[]).await;
        assert_eq!(status["whoami"], "bob", "{status}");
        let ratio = status["figures"]["hit-ratio"]["value"]
            .as_str()
            .unwrap_or("");
        assert!(
            ratio.parse::<f64>().is_ok_and(|r| r > 0.0),
            "hit ratio {ratio}: {status}"
        );
        let cached = texts(&status["cache_repos"]);
        assert!(cached.contains("docker.io/library/alpine"), "{cached}");
        let private = texts(&status["private_repos"]);
        assert!(
            private.contains("ci/app") && private.contains("v1"),
            "{private}"
        );
        let upstreams = texts(&status["upstreams"]);
        assert!(upstreams.contains("docker.io"), "{upstreams}");
        // Anonymous: the page renders, without the node's figures (the driver's status
        // command requires them, so it says which one is missing).
        let anon = Browser::new(&berth.url()).try_run("status", &[]).await;
        let e = anon.expect_err("an anonymous viewer saw the node's figures");
        assert!(e.contains("#hit-ratio is missing"), "{e}");

        // The page's forms are protected against CSRF: with bob's session cookie but
        // without the form's token, or with another, nothing is made.
        let state = std::fs::read(browser.screenshots().with_file_name("state.json")).unwrap();
        let state: serde_json::Value = serde_json::from_slice(&state).unwrap();
        let cookie = state["cookies"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "berth_session")
            .map(|c| format!("berth_session={}", c["value"].as_str().unwrap()))
            .expect("the browser holds a berth_session cookie");
        for body in ["name=forged", "name=forged&csrf=0123456789abcdef"] {
            let r = berth
                .client
                .post(format!("{}/ui/keys", berth.url()))
                .header("Cookie", &cookie)
                .header("Content-Type", "application/x-www-form-urlencoded")
                .body(body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 403, "{body}");
        }
        // The session cookie does not authenticate the registry API.
        let r = berth
            .client
            .post(format!("{}/v2/ci/app/blobs/uploads/", berth.url()))
            .header("Cookie", &cookie)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 401);

        // The keys page lists the key as used, and not the forged ones.
        let keys = browser.run("keys", &[]).await;
        let row = keys["keys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["id"] == key_id.as_str() || texts(k).contains(&key_id))
            .unwrap_or_else(|| panic!("key {key_id} not listed: {keys}"))
            .clone();
        assert!(!texts(&row).contains("never"), "last used: {row}");
        assert!(!texts(&keys).contains("forged"), "{keys}");

        // Workload tokens: the right audience, as Bearer and as a Basic password, and
        // exchanged at /token; a wrong audience is refused, saying why.
        let token = idp.client_credentials_token(WORKLOAD_AUDIENCE).await;
        let (status, body) = get(
            &berth,
            "/v2/ci/app/manifests/v1",
            Some(&format!("Bearer {token}")),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        let as_password = format!("Basic {}", b64std(format!("ci-job:{token}").as_bytes()));
        let (status, _) = get(&berth, "/v2/ci/app/manifests/v1", Some(&as_password)).await;
        assert_eq!(status, 200);
        let (status, body) = get(
            &berth,
            "/token?service=berth&scope=repository:ci/app:pull",
            Some(&format!("Bearer {token}")),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        let exchanged: serde_json::Value = serde_json::from_str(&body).unwrap();
        let berth_token = exchanged["token"].as_str().unwrap();
        let (status, _) = get(
            &berth,
            "/v2/ci/app/manifests/v1",
            Some(&format!("Bearer {berth_token}")),
        )
        .await;
        assert_eq!(
            status, 200,
            "the exchanged token carries the workload's groups"
        );
        let wrong = idp.client_credentials_token("urn:not-berth").await;
        let (status, body) = get(
            &berth,
            "/v2/ci/app/manifests/v1",
            Some(&format!("Bearer {wrong}")),
        )
        .await;
        assert_eq!(status, 401, "{body}");
        assert!(
            body.contains("urn:not-berth") && body.contains(WORKLOAD_AUDIENCE),
            "{body}"
        );
        let expired = idp
            .mint(&Mint {
                exp_in: Some(-120),
                groups: Some(&["ci"]),
                ..Default::default()
            })
            .await;
        let (status, body) = get(
            &berth,
            "/v2/ci/app/manifests/v1",
            Some(&format!("Bearer {expired}")),
        )
        .await;
        assert_eq!(status, 401, "{body}");
        assert!(body.contains("expired"), "{body}");
        // A token naming a key the provider does not have.
        let unknown = {
            let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
            let mut header = jwt_header(&token);
            header["kid"] = serde_json::json!("no-such-key");
            parts[0] = b64url(&serde_json::to_vec(&header).unwrap());
            parts.join(".")
        };
        let (status, body) = get(
            &berth,
            "/v2/ci/app/manifests/v1",
            Some(&format!("Bearer {unknown}")),
        )
        .await;
        assert_eq!(status, 401, "{body}");
        assert!(body.contains("no-such-key"), "{body}");

        // A group removed in the provider. Bob's key keeps the groups of his latest login
        // until he logs in again; then it loses them. New workload tokens lose it at once.
        idp.set_groups("bob", &[]).await;
        idp.set_groups("ci-job", &[]).await;
        assert_eq!(start_upload(&berth, "ci/app", "bob", &key).await, 202);
        let again = browser
            .run(
                "login",
                &[
                    "--provider",
                    "corp",
                    "--user",
                    "bob",
                    "--password",
                    "bob-pw",
                ],
            )
            .await;
        assert_eq!(again["user"], "bob", "{again}");
        assert_eq!(start_upload(&berth, "ci/app", "bob", &key).await, 403);
        let keys = browser.run("keys", &[]).await;
        assert!(!texts(&keys["groups"]).contains("ci"), "{keys}");
        let token = idp.client_credentials_token(WORKLOAD_AUDIENCE).await;
        let (status, _) = get(
            &berth,
            "/v2/ci/app/manifests/v1",
            Some(&format!("Bearer {token}")),
        )
        .await;
        assert_eq!(status, 403);

        // Revoked on the page: the key stops working.
        let revoked = browser.run("revoke", &["--key-id", &key_id]).await;
        assert!(!texts(&revoked["keys"]).contains(&key_id), "{revoked}");
        assert_eq!(start_upload(&berth, "ci/app", "bob", &key).await, 401);

        // A key that has expired: made for one day, then the clock moves two days on.
        let short = browser
            .run(
                "login-create-key",
                &[
                    "--provider",
                    "corp",
                    "--user",
                    "alice",
                    "--password",
                    "alice-pw",
                    "--key-name",
                    "short",
                    "--expires-in-days",
                    "1",
                ],
            )
            .await;
        let short_key = short["key"].as_str().unwrap().to_owned();
        assert_eq!(
            start_upload(&berth, "ci/app", "alice", &short_key).await,
            202
        );
        berth.advance_clock(Duration::from_secs(2 * 86_400)).await;
        assert_eq!(
            start_upload(&berth, "ci/app", "alice", &short_key).await,
            401
        );
        assert_eq!(start_upload(&berth, "ci/hank", "hank", PASSWORD).await, 202);
        berth.stop().await;
        let log = berth.log();
        for secret in [key.as_str(), short_key.as_str(), OIDC_CLIENT_SECRET] {
            assert!(!log.contains(secret), "a secret reached the log");
        }
    })
    .await;
}

/// base64url without padding.
fn b64url(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}
