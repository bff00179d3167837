//! Authentication and access control, end to end: each shipped example configuration
//! (`examples/auth/*.toml`) with an htpasswd file, proven by a matrix of user × action ×
//! repository with the exact status codes.
//!
//! Run: `cargo test --release -p berth-proxy --test e2e_auth`.

mod support;

use bytes::Bytes;
use support::*;

const PASSWORD: &str = "correct horse";

/// Starts berth with `examples/auth/<name>`, its htpasswd file holding `users` (all with
/// [`PASSWORD`]), and its upstream pointed at a closed port; the port and the directory
/// are held by the second value, for as long as the test keeps it.
async fn start(name: &str, users: &[&str]) -> (Berth, (tempfile::TempDir, ClosedPort)) {
    let dir = tempdir();
    let upstream = ClosedPort::new();
    let htpasswd = dir.path().join("htpasswd");
    let lines: String = users
        .iter()
        .map(|u| format!("{u}:{}\n", bcrypt::hash(PASSWORD, 4).unwrap()))
        .collect();
    std::fs::write(&htpasswd, lines).unwrap();
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/auth")
        .join(name);
    let config = std::fs::read_to_string(&example)
        .unwrap()
        .replace("/etc/berth/htpasswd", htpasswd.to_str().unwrap())
        .replace("https://registry-1.docker.io", &upstream.url());
    (
        Berth::start_with_config(&config, &[]).await,
        (dir, upstream),
    )
}

/// What a request does.
#[derive(Clone, Copy, Debug)]
enum Op {
    /// GET the manifest tagged v1.
    Pull,
    /// A new blob and a manifest under a new tag.
    Push,
    /// Move tag v1 to another manifest.
    Overwrite,
    /// DELETE a tag.
    Delete,
}

struct Client {
    http: reqwest::Client,
    base: String,
    user: Option<&'static str>,
}

impl Client {
    fn new(berth: &Berth, user: Option<&'static str>) -> Client {
        Client {
            http: reqwest::Client::new(),
            base: berth.url(),
            user,
        }
    }

    fn req(&self, method: &str, path: &str) -> reqwest::RequestBuilder {
        let rb = self
            .http
            .request(method.parse().unwrap(), format!("{}{path}", self.base));
        match self.user {
            Some(u) => rb.basic_auth(u, Some(PASSWORD)),
            None => rb,
        }
    }

    async fn status(&self, rb: reqwest::RequestBuilder) -> u16 {
        rb.send().await.unwrap().status().as_u16()
    }

    async fn push_blob(&self, repo: &str, blob: &Blob) -> u16 {
        self.status(
            self.req(
                "POST",
                &format!("/v2/{repo}/blobs/uploads/?digest={}", blob.digest),
            )
            .body(blob.bytes.clone()),
        )
        .await
    }

    async fn put_manifest(&self, repo: &str, reference: &str, body: &Bytes) -> u16 {
        self.status(
            self.req("PUT", &format!("/v2/{repo}/manifests/{reference}"))
                .header("Content-Type", OCI_MANIFEST)
                .body(body.clone()),
        )
        .await
    }

    /// Pushes `image` (its blobs, then the manifest under `tag`); the first failing
    /// status, or the manifest's.
    async fn push_image(&self, repo: &str, tag: &str, image: &Image) -> u16 {
        for b in image.blobs() {
            let s = self.push_blob(repo, b).await;
            if s != 201 {
                return s;
            }
        }
        self.put_manifest(repo, tag, &image.manifest).await
    }
}

/// Content every matrix starts from, pushed by `admin` into `repo`: `v1` → `one`, the
/// manifest `two` by digest, and a tag per user to delete.
struct Seed {
    one: Image,
    two: Image,
    fresh: Image,
}

async fn seed(admin: &Client, repo: &str, deletable: &[&str]) -> Seed {
    let one = make_single(71, 5_000);
    let two = make_single(72, 5_000);
    let fresh = make_single(73, 5_000);
    assert_eq!(
        admin.push_image(repo, "v1", &one).await,
        201,
        "seeding {repo}"
    );
    assert_eq!(admin.push_image(repo, &two.digest, &two).await, 201);
    for tag in deletable {
        assert_eq!(
            admin
                .put_manifest(repo, &format!("del-{tag}"), &one.manifest)
                .await,
            201
        );
    }
    Seed { one, two, fresh }
}

async fn run(client: &Client, repo: &str, op: Op, seed: &Seed, who: &str) -> u16 {
    match op {
        Op::Pull => {
            client
                .status(client.req("GET", &format!("/v2/{repo}/manifests/v1")))
                .await
        }
        Op::Push => {
            client
                .push_image(repo, &format!("new-{who}"), &seed.fresh)
                .await
        }
        Op::Overwrite => client.put_manifest(repo, "v1", &seed.two.manifest).await,
        Op::Delete => {
            client
                .status(client.req("DELETE", &format!("/v2/{repo}/manifests/del-{who}")))
                .await
        }
    }
}

/// Runs `rows` of (user, repository, operation, expected status) and reports every
/// mismatch at once.
async fn matrix(
    berth: &Berth,
    seeds: &[(&str, &Seed)],
    rows: &[(Option<&'static str>, &str, Op, u16)],
) {
    let mut wrong = Vec::new();
    for &(user, repo, op, want) in rows {
        let client = Client::new(berth, user);
        let seed = seeds.iter().find(|(r, _)| *r == repo).unwrap().1;
        let got = run(&client, repo, op, seed, user.unwrap_or("anonymous")).await;
        if got != want {
            wrong.push(format!("{user:?} {op:?} {repo}: got {got}, want {want}"));
        }
    }
    assert!(wrong.is_empty(), "access matrix:\n{}", wrong.join("\n"));
}

#[tokio::test(flavor = "multi_thread")]
async fn nothing_anonymous() {
    within(120, "nothing_anonymous", async {
        let (berth, _dir) = start("no-anonymous.toml", &["builder", "reader"]).await;
        let builder = Client::new(&berth, Some("builder"));
        let s = seed(&builder, "team/app", &["builder", "reader", "anonymous"]).await;
        use Op::*;
        matrix(
            &berth,
            &[("team/app", &s)],
            &[
                (Some("builder"), "team/app", Pull, 200),
                (Some("reader"), "team/app", Pull, 200),
                (None, "team/app", Pull, 401),
                (Some("reader"), "team/app", Push, 403),
                (None, "team/app", Push, 401),
                (Some("reader"), "team/app", Overwrite, 403),
                (Some("reader"), "team/app", Delete, 403),
                (None, "team/app", Delete, 401),
                (Some("builder"), "team/app", Push, 201),
                (Some("builder"), "team/app", Overwrite, 201),
                (Some("builder"), "team/app", Delete, 202),
            ],
        )
        .await;
        // Clients log in when /v2/ asks: 401 with a Basic challenge.
        let r = reqwest::get(format!("{}/v2/", berth.url())).await.unwrap();
        assert_eq!(r.status().as_u16(), 401);
        assert_eq!(
            header_str(r.headers(), "www-authenticate"),
            Some("Basic realm=\"berth\"")
        );
        let (code, _) = oci_error(&r.bytes().await.unwrap(), "/v2/ without credentials");
        assert_eq!(code, "UNAUTHORIZED");
        // A wrong password is 401 too, and pull-through namespaces are covered.
        let wrong = reqwest::Client::new()
            .get(format!("{}/v2/team/app/manifests/v1", berth.url()))
            .basic_auth("builder", Some("wrong"))
            .send()
            .await
            .unwrap();
        assert_eq!(wrong.status().as_u16(), 401);
        let c = Client::new(&berth, None);
        assert_eq!(
            c.status(c.req("GET", "/v2/docker.io/library/alpine/manifests/3"))
                .await,
            401
        );
        let c = Client::new(&berth, Some("reader"));
        assert_eq!(c.status(c.req("GET", "/metrics")).await, 403);
        // The access log names the user and never the password.
        let log = berth.log();
        assert!(log.contains("user=reader"), "{log}");
        assert!(!log.contains(PASSWORD) && !log.contains("Basic "), "{log}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn anonymous_read() {
    within(120, "anonymous_read", async {
        let (berth, _dir) = start("anonymous-read.toml", &["admin", "alice", "bob"]).await;
        let admin = Client::new(&berth, Some("admin"));
        let s = seed(&admin, "team/app", &["admin", "alice", "bob", "anonymous"]).await;
        use Op::*;
        matrix(
            &berth,
            &[("team/app", &s)],
            &[
                (None, "team/app", Pull, 200),
                (Some("bob"), "team/app", Pull, 200),
                (None, "team/app", Push, 401),
                (Some("bob"), "team/app", Push, 403),
                (Some("bob"), "team/app", Overwrite, 403),
                (Some("bob"), "team/app", Delete, 403),
                (None, "team/app", Delete, 401),
                (Some("alice"), "team/app", Push, 201),
                (Some("alice"), "team/app", Overwrite, 201),
                (Some("alice"), "team/app", Delete, 202),
                (Some("admin"), "team/app", Delete, 202),
            ],
        )
        .await;
        let c = Client::new(&berth, None);
        assert_eq!(c.status(c.req("GET", "/v2/")).await, 200);
        assert_eq!(c.status(c.req("GET", "/metrics")).await, 401);
        let alice = Client::new(&berth, Some("alice"));
        assert_eq!(alice.status(alice.req("GET", "/metrics")).await, 200);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn immutable_ci_pushes() {
    within(120, "immutable_ci_pushes", async {
        let (berth, _dir) = start("immutable-ci.toml", &["alice", "ci-robot", "bob"]).await;
        let alice = Client::new(&berth, Some("alice"));
        let s = seed(&alice, "team/app", &["alice", "ci-robot"]).await;
        use Op::*;
        matrix(
            &berth,
            &[("team/app", &s)],
            &[
                (None, "team/app", Pull, 200),
                (Some("ci-robot"), "team/app", Pull, 200),
                (Some("ci-robot"), "team/app", Push, 201),
                (Some("ci-robot"), "team/app", Overwrite, 403),
                (Some("ci-robot"), "team/app", Delete, 403),
                (Some("bob"), "team/app", Push, 403),
                (None, "team/app", Push, 401),
                (Some("alice"), "team/app", Overwrite, 201),
                (Some("alice"), "team/app", Delete, 202),
            ],
        )
        .await;
        // Pushing the same manifest again under its tag is not a move: allowed.
        let robot = Client::new(&berth, Some("ci-robot"));
        assert_eq!(
            robot
                .put_manifest("team/app", "new-ci-robot", &s.fresh.manifest)
                .await,
            201
        );
        let c = Client::new(&berth, None);
        assert_eq!(c.status(c.req("GET", "/metrics")).await, 200);
        let _ = &s.one;

        // The CI robot as it really runs: with an API key an administrator made for it.
        let http = reqwest::Client::new();
        let keys = format!("{}/api/keys", berth.url());
        let r = http
            .post(&keys)
            .basic_auth("bob", Some(PASSWORD))
            .body(r#"{"name": "ci", "owner": "ci-robot"}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 403, "bob made a key for someone else");
        assert_eq!(
            http.post(&keys).send().await.unwrap().status().as_u16(),
            401
        );
        let (key, id) = make_key(
            &berth,
            r#"{"name": "ci", "owner": "ci-robot", "expires_in": "720h"}"#,
        )
        .await;
        assert!(key.starts_with("berth_"), "{key}");
        let with_key = |method: &str, path: &str, user: &str| {
            http.request(method.parse().unwrap(), format!("{}{path}", berth.url()))
                .basic_auth(user, Some(&key))
        };
        let pushed = make_single(75, 4_000);
        for b in pushed.blobs() {
            let r = with_key(
                "POST",
                &format!("/v2/team/app/blobs/uploads/?digest={}", b.digest),
                "ci-robot",
            )
            .body(b.bytes.clone())
            .send()
            .await
            .unwrap();
            assert_eq!(r.status().as_u16(), 201);
        }
        let put = |tag: &str, user: &str| {
            with_key("PUT", &format!("/v2/team/app/manifests/{tag}"), user)
                .header("Content-Type", OCI_MANIFEST)
                .body(pushed.manifest.clone())
                .send()
        };
        assert_eq!(
            put("from-key", "ci-robot").await.unwrap().status().as_u16(),
            201
        );
        assert_eq!(
            put("v1", "ci-robot").await.unwrap().status().as_u16(),
            403,
            "moved a tag"
        );
        assert_eq!(
            put("other", "bob").await.unwrap().status().as_u16(),
            401,
            "another user's key"
        );
        // Listed (without the secret) for its owner; revoked by the administrator.
        let listed: serde_json::Value = with_key("GET", "/api/keys", "ci-robot")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(listed["keys"][0]["id"], id.as_str());
        assert!(
            !listed.to_string().contains(&key[10..]),
            "the list shows the secret"
        );
        let r = http
            .delete(format!("{keys}/{id}"))
            .basic_auth("alice", Some(PASSWORD))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 204);
        assert_eq!(
            put("after-revoke", "ci-robot")
                .await
                .unwrap()
                .status()
                .as_u16(),
            401
        );
        // The store holds only the key's hash.
        let secret = key.rsplit('_').next().unwrap();
        let mut dirs = vec![berth.store_dir().join("meta")];
        while let Some(d) = dirs.pop() {
            for e in std::fs::read_dir(d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    dirs.push(p);
                } else {
                    let bytes = std::fs::read(&p).unwrap();
                    assert!(
                        !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                        "{} holds the key's secret",
                        p.display()
                    );
                }
            }
        }
    })
    .await;
}

/// An API key alice (an administrator) makes with the request `body`: (key, id).
async fn make_key(berth: &Berth, body: &'static str) -> (String, String) {
    let r = reqwest::Client::new()
        .post(format!("{}/api/keys", berth.url()))
        .basic_auth("alice", Some(PASSWORD))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let made: serde_json::Value = r.json().await.unwrap();
    let field = |k: &str| made[k].as_str().unwrap().to_owned();
    (field("key"), field("id"))
}

/// Immutable tags hold under concurrency: of concurrent pushes of one new tag (each a
/// different manifest) by the create-only CI robot, exactly one wins; every other gets
/// 403 DENIED and the tag names the winner's manifest.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_create_only_pushes_of_one_tag_have_one_winner() {
    within(
        180,
        "concurrent_create_only_pushes_of_one_tag_have_one_winner",
        async {
            let (berth, _dir) = start("immutable-ci.toml", &["alice", "ci-robot"]).await;
            let http = reqwest::Client::new();
            // An API key: checked with one hash, so the pushes arrive close together.
            let (key, _) = make_key(&berth, r#"{"name": "race", "owner": "ci-robot"}"#).await;
            let robot = Client::new(&berth, Some("ci-robot"));
            let images: Vec<Image> = (0..8).map(|i| make_single(300 + i, 2_000)).collect();
            for image in &images {
                for b in image.blobs() {
                    assert_eq!(robot.push_blob("team/race", b).await, 201);
                }
            }
            for round in 0..15 {
                let tag = format!("race-{round}");
                let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(images.len()));
                let pushes: Vec<_> = images
                    .iter()
                    .map(|image| {
                        let (http, barrier, key) = (http.clone(), barrier.clone(), key.clone());
                        let url = format!("{}/v2/team/race/manifests/{tag}", berth.url());
                        let (body, digest) = (image.manifest.clone(), image.digest.clone());
                        tokio::spawn(async move {
                            let req = http
                                .put(url)
                                .basic_auth("ci-robot", Some(&key))
                                .header("Content-Type", OCI_MANIFEST)
                                .body(body);
                            barrier.wait().await;
                            let r = req.send().await.unwrap();
                            let status = r.status().as_u16();
                            let body = r.bytes().await.unwrap();
                            (status, body, digest)
                        })
                    })
                    .collect();
                let mut winners = Vec::new();
                for p in pushes {
                    let (status, body, digest) = p.await.unwrap();
                    match status {
                        201 => winners.push(digest),
                        403 => {
                            let (code, _) = oci_error(&body, "a losing push");
                            assert_eq!(code, "DENIED");
                        }
                        other => panic!("round {round}: {other} {body:?}"),
                    }
                }
                assert_eq!(winners.len(), 1, "round {round}: {winners:?} all won {tag}");
                let (status, h, _) = berth
                    .fetch(
                        &format!("/v2/team/race/manifests/{tag}"),
                        &[("Accept", OCI_MANIFEST)],
                    )
                    .await;
                assert_eq!(status, 200);
                assert_eq!(
                    header_str(&h, "docker-content-digest"),
                    Some(winners[0].as_str())
                );
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn per_workspace_isolation() {
    within(120, "per_workspace_isolation", async {
        let (berth, _dir) = start(
            "workspaces.toml",
            &["admin", "ws-a-builder", "ws-b-builder"],
        )
        .await;
        let a = Client::new(&berth, Some("ws-a-builder"));
        let b = Client::new(&berth, Some("ws-b-builder"));
        let sa = seed(&a, "workspace-a/app", &["ws-a-builder", "ws-b-builder"]).await;
        let sb = seed(&b, "workspace-b/app", &["ws-a-builder", "ws-b-builder"]).await;
        use Op::*;
        matrix(
            &berth,
            &[("workspace-a/app", &sa), ("workspace-b/app", &sb)],
            &[
                (Some("ws-a-builder"), "workspace-a/app", Pull, 200),
                (Some("ws-a-builder"), "workspace-b/app", Pull, 403),
                (Some("ws-b-builder"), "workspace-a/app", Pull, 403),
                (Some("ws-a-builder"), "workspace-b/app", Push, 403),
                (Some("ws-a-builder"), "workspace-b/app", Delete, 403),
                (None, "workspace-a/app", Pull, 401),
                (Some("ws-a-builder"), "workspace-a/app", Push, 201),
                (Some("ws-a-builder"), "workspace-a/app", Overwrite, 201),
                (Some("ws-b-builder"), "workspace-b/app", Delete, 202),
            ],
        )
        .await;
        // Not by digest: a blob of workspace-b through workspace-b is 403, and through
        // workspace-a (where it was never pushed) 404.
        let layer = &sb.one.layers[0].blob.digest;
        let only_b = make_single(74, 3_000);
        assert_eq!(
            b.push_image("workspace-b/app", "secret", &only_b).await,
            201
        );
        let secret = &only_b.layers[0].blob.digest;
        assert_eq!(
            a.status(a.req("GET", &format!("/v2/workspace-b/app/blobs/{layer}")))
                .await,
            403
        );
        assert_eq!(
            a.status(a.req("GET", &format!("/v2/workspace-a/app/blobs/{secret}")))
                .await,
            404
        );
        // Not through a mount: it falls back to an upload (202), and the blob stays
        // unreadable through workspace-a.
        let r = a
            .req(
                "POST",
                &format!("/v2/workspace-a/app/blobs/uploads/?mount={secret}&from=workspace-b/app"),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 202);
        assert_eq!(
            a.status(a.req("GET", &format!("/v2/workspace-a/app/blobs/{secret}")))
                .await,
            404
        );
        // The catalog lists only what the caller may read.
        let v: serde_json::Value = a
            .req("GET", "/v2/_catalog")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(v["repositories"], serde_json::json!(["workspace-a/app"]));
        // Both may pull through docker.io (the upstream here is closed: 502, not 403).
        assert_eq!(
            a.status(a.req("GET", "/v2/docker.io/library/alpine/manifests/3"))
                .await,
            502
        );
    })
    .await;
}

/// A berth that issues its own tokens: the no-anonymous policies plus `[auth.token]`.
async fn start_with_tokens(dir: &std::path::Path, service: &str, lifetime: &str) -> Berth {
    start_with_tokens_and(dir, service, lifetime, "", "").await
}

/// [`start_with_tokens`] with more `[server]` and `[auth]` lines.
async fn start_with_tokens_and(
    dir: &std::path::Path,
    service: &str,
    lifetime: &str,
    server: &str,
    auth: &str,
) -> Berth {
    let htpasswd = dir.join("htpasswd");
    if !htpasswd.exists() {
        let lines: String = ["builder", "reader"]
            .iter()
            .map(|u| format!("{u}:{}\n", bcrypt::hash(PASSWORD, 4).unwrap()))
            .collect();
        std::fs::write(&htpasswd, lines).unwrap();
        std::fs::write(dir.join("token.key"), random_bytes(99, 32)).unwrap();
    }
    let config = format!(
        r#"[server]
{server}
[auth]
htpasswd = "{}"
token = {{ key = "{}", service = "{service}", lifetime = "{lifetime}" }}
{auth}
[access]
[[access.repository]]
pattern = "**"
policies = [
  {{ users = ["builder"], actions = ["read", "create", "update", "delete"] }},
  {{ users = ["reader"], actions = ["read"] }},
]
"#,
        htpasswd.display(),
        dir.join("token.key").display()
    );
    Berth::start_with_config(&config, &[]).await
}

/// `GET /token` for `scope` with `user`'s credentials (or none); the token.
async fn token(berth: &Berth, user: Option<&str>, scope: &str) -> String {
    let mut rb =
        reqwest::Client::new().get(format!("{}/token?service=berth&scope={scope}", berth.url()));
    if let Some(u) = user {
        rb = rb.basic_auth(u, Some(PASSWORD));
    }
    let r = rb.send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200, "token for {user:?} {scope}");
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["token"], v["access_token"]);
    assert!(v["expires_in"].as_u64().unwrap() > 0);
    assert!(v["issued_at"].as_str().unwrap().ends_with('Z'));
    v["token"].as_str().unwrap().to_owned()
}

async fn with_token(berth: &Berth, token: &str, path: &str) -> u16 {
    reqwest::Client::new()
        .get(format!("{}{path}", berth.url()))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// The Docker token flow: berth challenges with `Bearer`, serves `/token`, and enforces
/// each token's signature, audience, lifetime and scope; skopeo and containerd log in
/// through it unchanged; tokens survive a restart with the same key.
#[tokio::test(flavor = "multi_thread")]
async fn token_flow_with_skopeo_and_containerd() {
    within(240, "token_flow_with_skopeo_and_containerd", async {
        let dir = tempdir();
        let mut berth = start_with_tokens(dir.path(), "berth", "5m").await;
        let image = make_single(81, 30_000);

        // The challenge names the realm, the service and the scope.
        let r = reqwest::get(format!("{}/v2/team/app/manifests/v1", berth.url()))
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 401);
        let want = format!(
            "Bearer realm=\"http://{}/token\",service=\"berth\",scope=\"repository:team/app:pull\"",
            berth.host()
        );
        assert_eq!(
            header_str(r.headers(), "www-authenticate"),
            Some(want.as_str())
        );

        // skopeo pushes and pulls through the token flow.
        let layout = tempdir();
        let src = layout.path().join("src");
        std::fs::create_dir_all(src.join("blobs/sha256")).unwrap();
        std::fs::write(src.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        for b in image.blobs() {
            std::fs::write(src.join("blobs/sha256").join(b.hex()), &b.bytes).unwrap();
        }
        std::fs::write(
            src.join("blobs/sha256")
                .join(image.digest.trim_start_matches("sha256:")),
            &image.manifest,
        )
        .unwrap();
        std::fs::write(
            src.join("index.json"),
            serde_json::to_vec(&serde_json::json!({
                "schemaVersion": 2,
                "manifests": [{"mediaType": OCI_MANIFEST, "digest": image.digest,
                    "size": image.manifest.len(),
                    "annotations": {"org.opencontainers.image.ref.name": "v1"}}]
            }))
            .unwrap(),
        )
        .unwrap();
        let creds = format!("builder:{PASSWORD}");
        skopeo_with(
            &format!("oci:{}:v1", src.display()),
            &format!("docker://{}/team/app:v1", berth.host()),
            &["--dest-creds", &creds],
        )
        .await;
        let out = layout.path().join("out");
        let reader = format!("reader:{PASSWORD}");
        skopeo_with(
            &format!("docker://{}/team/app:v1", berth.host()),
            &format!("oci:{}:v1", out.display()),
            &["--src-creds", &reader],
        )
        .await;
        assert_oci_layout(&out, &image.manifest, &[], &image.blobs());
        assert!(
            berth.log().contains("path=/token"),
            "skopeo did not use the token flow"
        );

        // containerd too.
        let containerd = Containerd::start().await;
        let ref_ = format!("{}/team/app:v1", berth.host());
        let pulled = containerd
            .ctr(
                "berth-token",
                &[
                    "images",
                    "pull",
                    "--snapshotter",
                    "native",
                    "--plain-http",
                    "--user",
                    &reader,
                    &ref_,
                ],
            )
            .await;
        assert!(
            pulled.status.success(),
            "ctr pull: {}",
            output_text(&pulled)
        );

        // The catalog with a token granted it lists what the user may read.
        let catalog = token(&berth, Some("reader"), "registry:catalog:*").await;
        let v: serde_json::Value = reqwest::Client::new()
            .get(format!("{}/v2/_catalog", berth.url()))
            .bearer_auth(&catalog)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(v["repositories"], serde_json::json!(["team/app"]));
        // A token is for its scope only: team/app's does not open team/other.
        let app = token(&berth, Some("reader"), "repository:team/app:pull").await;
        assert_eq!(
            with_token(&berth, &app, "/v2/team/app/manifests/v1").await,
            200
        );
        let r = reqwest::Client::new()
            .get(format!("{}/v2/team/other/manifests/v1", berth.url()))
            .bearer_auth(&app)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 401);
        assert!(header_str(r.headers(), "www-authenticate")
            .unwrap()
            .contains("scope=\"repository:team/other:pull\""));
        // Asking for more than the policies allow grants only what they allow.
        let pull_only = token(&berth, Some("reader"), "repository:team/app:pull,push").await;
        let r = reqwest::Client::new()
            .post(format!("{}/v2/team/app/blobs/uploads/", berth.url()))
            .bearer_auth(&pull_only)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 401, "a pull-only token pushed");
        // Anonymous tokens carry the anonymous policy: nothing here.
        let anonymous = token(&berth, None, "repository:team/app:pull").await;
        assert_eq!(
            with_token(&berth, &anonymous, "/v2/team/app/manifests/v1").await,
            401
        );
        // Wrong credentials at the token service.
        let r = reqwest::Client::new()
            .get(format!(
                "{}/token?service=berth&scope=repository:team/app:pull",
                berth.url()
            ))
            .basic_auth("reader", Some("wrong"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 401);

        // Tampered: one character of the signature changed.
        let mut tampered = app.clone().into_bytes();
        let last = tampered.len() - 2;
        tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(tampered).unwrap();
        assert_eq!(
            with_token(&berth, &tampered, "/v2/team/app/manifests/v1").await,
            401
        );

        // Wrong audience: a token from a berth with the same key but another service.
        let other_dir = tempdir();
        for f in ["htpasswd", "token.key"] {
            std::fs::copy(dir.path().join(f), other_dir.path().join(f)).unwrap();
        }
        let other = start_with_tokens(other_dir.path(), "elsewhere", "5m").await;
        let foreign = {
            let r = reqwest::Client::new()
                .get(format!(
                    "{}/token?scope=repository:team/app:pull",
                    other.url()
                ))
                .basic_auth("reader", Some(PASSWORD))
                .send()
                .await
                .unwrap();
            let v: serde_json::Value = r.json().await.unwrap();
            v["token"].as_str().unwrap().to_owned()
        };
        assert_eq!(
            with_token(&berth, &foreign, "/v2/team/app/manifests/v1").await,
            401
        );

        // A restart with the same key keeps issued tokens valid.
        berth.stop().await;
        berth.restart().await;
        assert_eq!(
            with_token(&berth, &app, "/v2/team/app/manifests/v1").await,
            200
        );
        // The log never holds a token or a password.
        let log = berth.log();
        assert!(
            !log.contains(&app[..40]) && !log.contains(PASSWORD),
            "{log}"
        );
    })
    .await;
}

/// An expired token is refused (beyond the few seconds of clock skew allowed).
#[tokio::test(flavor = "multi_thread")]
async fn expired_tokens_are_refused() {
    within(60, "expired_tokens_are_refused", async {
        let dir = tempdir();
        let berth = start_with_tokens(dir.path(), "berth", "1s").await;
        let t = token(&berth, Some("reader"), "repository:team/app:pull").await;
        // Valid now (404: nothing pushed), refused once expired.
        assert_eq!(
            with_token(&berth, &t, "/v2/team/app/manifests/v1").await,
            404
        );
        // Past the lifetime and the 5 s leeway, by berth's clock.
        berth.advance_clock(std::time::Duration::from_secs(7)).await;
        assert_eq!(
            with_token(&berth, &t, "/v2/team/app/manifests/v1").await,
            401
        );
    })
    .await;
}

/// Guessing passwords: each failure waits, and after ten from one address its
/// credentials are refused with 429 TOOMANYREQUESTS, even the right ones, for a minute;
/// requests without credentials are not affected.
#[tokio::test(flavor = "multi_thread")]
async fn brute_force_attempts_hit_the_limit() {
    within(60, "brute_force_attempts_hit_the_limit", async {
        let (berth, _dir) = start("anonymous-read.toml", &["admin"]).await;
        let http = reqwest::Client::new();
        let url = format!("{}/v2/team/app/tags/list", berth.url());
        let t0 = std::time::Instant::now();
        for i in 0..10 {
            let r = http
                .get(&url)
                .basic_auth("admin", Some(format!("guess-{i}")))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 401, "attempt {i}");
        }
        assert!(
            t0.elapsed() >= std::time::Duration::from_millis(2000),
            "failed logins were not slowed: 10 took {:?}",
            t0.elapsed()
        );
        let r = http
            .get(&url)
            .basic_auth("admin", Some(PASSWORD))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 429);
        let (code, _) = oci_error(&r.bytes().await.unwrap(), "blocked login");
        assert_eq!(code, "TOOMANYREQUESTS");
        // Anonymous reads still work (404: the repository is empty).
        assert_eq!(http.get(&url).send().await.unwrap().status().as_u16(), 404);
    })
    .await;
}

/// berth serves HTTPS with a configured certificate and key; containerd pulls a private
/// image over it (trusting the test CA through hosts.toml), and skopeo too.
#[tokio::test(flavor = "multi_thread")]
async fn containerd_pulls_over_tls() {
    within(180, "containerd_pulls_over_tls", async {
        let pki = test_pki();
        let d = pki.path();
        let config = format!(
            "[server]\ntls = {{ cert = \"{}\", key = \"{}\" }}\n",
            d.join("server.pem").display(),
            d.join("server.key").display()
        );
        let berth = Berth::start_with_config(&config, &[]).await;
        let host = berth.host();

        // A client that trusts the test CA pushes an image over HTTPS.
        let ca = reqwest::Certificate::from_pem(&std::fs::read(d.join("ca.pem")).unwrap()).unwrap();
        let https = reqwest::Client::builder()
            .add_root_certificate(ca)
            .build()
            .unwrap();
        let image = make_single(91, 300_000);
        let base = format!("https://{host}");
        for b in image.blobs() {
            let r = https
                .post(format!(
                    "{base}/v2/team/tls/blobs/uploads/?digest={}",
                    b.digest
                ))
                .body(b.bytes.clone())
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 201);
        }
        let r = https
            .put(format!("{base}/v2/team/tls/manifests/v1"))
            .header("Content-Type", OCI_MANIFEST)
            .body(image.manifest.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 201);
        // Blobs over TLS are whole and exact (no sendfile under TLS).
        let layer = &image.layers[0].blob;
        let body = https
            .get(format!("{base}/v2/team/tls/blobs/{}", layer.digest))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert_eq!(digest_of(&body), layer.digest);

        // containerd, trusting the CA through hosts.toml.
        let containerd = Containerd::start().await;
        let hosts = containerd.hosts_dir(&base, &[(&host, &base)]);
        let toml = hosts.join(&host).join("hosts.toml");
        let text = std::fs::read_to_string(&toml).unwrap().replace(
            "capabilities = [\"pull\", \"resolve\"]",
            &format!(
                "capabilities = [\"pull\", \"resolve\"]\n  ca = \"{}\"",
                d.join("ca.pem").display()
            ),
        );
        std::fs::write(&toml, text).unwrap();
        let pulled = containerd
            .pull("berth-tls", &format!("{host}/team/tls:v1"), &hosts)
            .await;
        assert!(
            pulled.status.success(),
            "ctr pull over TLS: {}",
            output_text(&pulled)
        );
        // Plain HTTP is not served on the TLS port.
        assert!(reqwest::get(format!("http://{host}/v2/"))
            .await
            .map(|r| !r.status().is_success())
            .unwrap_or(true));
    })
    .await;
}

/// `POST /api/keys` with `body` and `authorization`; the status, the parsed body and the
/// `WWW-Authenticate` header.
async fn post_key(
    berth: &Berth,
    authorization: Option<&str>,
    body: &str,
) -> (u16, serde_json::Value, Option<String>) {
    let mut rb = reqwest::Client::new()
        .post(format!("{}/api/keys", berth.url()))
        .body(body.to_owned());
    if let Some(a) = authorization {
        rb = rb.header("Authorization", a);
    }
    let r = rb.send().await.unwrap();
    let status = r.status().as_u16();
    let challenge = header_str(r.headers(), "www-authenticate").map(str::to_owned);
    let bytes = r.bytes().await.unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or_default(),
        challenge,
    )
}

/// The message of an OCI error body.
fn message(v: &serde_json::Value) -> String {
    v["errors"][0]["message"].as_str().unwrap_or("").to_owned()
}

/// API keys are made only from a password login, never from a token (a short pull-only
/// token would otherwise become a long-lived key that can push) or from another key, and
/// never outlive `[auth] api_key_max_lifetime`.
#[tokio::test(flavor = "multi_thread")]
async fn api_keys_come_only_from_a_password_login() {
    within(60, "api_keys_come_only_from_a_password_login", async {
        let dir = tempdir();
        let berth = start_with_tokens_and(
            dir.path(),
            "berth",
            "5m",
            "",
            "api_key_max_lifetime = \"720h\"",
        )
        .await;
        let password = basic_auth("builder", PASSWORD);

        // Without credentials: 401 and a Basic challenge (tokens cannot make keys).
        let (status, _, challenge) = post_key(&berth, None, "{}").await;
        assert_eq!(status, 401);
        assert!(
            challenge
                .as_deref()
                .is_some_and(|c| c.starts_with("Basic ")),
            "{challenge:?}"
        );
        let r = reqwest::get(format!("{}/api/keys", berth.url()))
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 401, "anonymous GET /api/keys");

        // A pull-only token: refused, saying how to do it.
        let t = token(&berth, Some("builder"), "repository:team/app:pull").await;
        let bearer = format!("Bearer {t}");
        let (status, v, _) = post_key(&berth, Some(&bearer), r#"{"name": "ci"}"#).await;
        assert_eq!(status, 403, "a token made a key: {v}");
        assert_eq!(v["errors"][0]["code"], "DENIED");
        assert!(message(&v).contains("password"), "{v}");
        let r = reqwest::Client::new()
            .get(format!("{}/api/keys", berth.url()))
            .bearer_auth(&t)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 403, "a token listed keys");

        // Longer than the maximum: refused, naming it.
        let (status, v, _) = post_key(
            &berth,
            Some(&password),
            r#"{"name": "ci", "expires_in": "721h"}"#,
        )
        .await;
        assert_eq!(status, 400, "{v}");
        assert_eq!(v["errors"][0]["code"], "BAD_REQUEST");
        assert!(
            message(&v).contains("720h") && message(&v).contains("api_key_max_lifetime"),
            "{v}"
        );

        // With the password: made, living at most the maximum (the default is cut to it).
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let (status, v, _) = post_key(&berth, Some(&password), r#"{"name": "ci"}"#).await;
        assert_eq!(status, 201, "{v}");
        let expires = v["expires_at_ms"].as_u64().unwrap();
        let max_ms = 720 * 3600 * 1000;
        assert!(
            expires > now_ms && expires <= now_ms + max_ms + 60_000,
            "expires {expires}, now {now_ms}"
        );
        let key = v["key"].as_str().unwrap().to_owned();
        let with_key = basic_auth("builder", &key);

        // The key works, lists keys, but does not make another.
        let r = reqwest::Client::new()
            .get(format!("{}/api/keys", berth.url()))
            .header("Authorization", &with_key)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        let (status, v, _) = post_key(&berth, Some(&with_key), r#"{"name": "more"}"#).await;
        assert_eq!(status, 403, "a key made a key: {v}");
        assert!(message(&v).contains("password"), "{v}");

        // No key outlives the maximum: 721 hours on, by berth's clock, it is refused.
        berth
            .advance_clock(std::time::Duration::from_secs(721 * 3600))
            .await;
        let r = reqwest::Client::new()
            .get(format!("{}/v2/team/app/tags/list", berth.url()))
            .header("Authorization", &with_key)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 401, "an expired key was accepted");
    })
    .await;
}

/// Removing a user from the htpasswd file ends their API keys and tokens too, without a
/// restart.
#[tokio::test(flavor = "multi_thread")]
async fn removed_users_lose_their_keys_and_tokens() {
    within(60, "removed_users_lose_their_keys_and_tokens", async {
        let dir = tempdir();
        let berth = start_with_tokens(dir.path(), "berth", "5m").await;
        let (status, v, _) = post_key(
            &berth,
            Some(&basic_auth("reader", PASSWORD)),
            r#"{"name": "robot"}"#,
        )
        .await;
        assert_eq!(status, 201, "{v}");
        let key = basic_auth("reader", v["key"].as_str().unwrap());
        let t = format!(
            "Bearer {}",
            token(&berth, Some("reader"), "repository:team/app:pull").await
        );
        let path = format!("{}/v2/team/app/tags/list", berth.url());
        let status_with = |auth: String| {
            let path = path.clone();
            async move {
                reqwest::Client::new()
                    .get(path)
                    .header("Authorization", auth)
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16()
            }
        };
        // 404: allowed, and nothing pushed there.
        assert_eq!(status_with(key.clone()).await, 404);
        assert_eq!(status_with(t.clone()).await, 404);

        // reader leaves the file (its modification time moves on, so the change is seen).
        let htpasswd = dir.path().join("htpasswd");
        let kept: String = std::fs::read_to_string(&htpasswd)
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with("reader:"))
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(&htpasswd, kept).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&htpasswd)
            .unwrap()
            .set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(10))
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while status_with(key.clone()).await != 401 {
            assert!(
                std::time::Instant::now() < deadline,
                "the key of a removed user still works"
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert_eq!(status_with(t).await, 401, "the token of a removed user");
        assert_eq!(
            status_with(basic_auth("builder", PASSWORD)).await,
            404,
            "the user who stayed"
        );
    })
    .await;
}

/// With nothing open to anonymous requests, the catalog asks for credentials; a user's
/// catalog pages go past the repositories they may not read instead of ending there.
#[tokio::test(flavor = "multi_thread")]
async fn catalog_needs_credentials_and_pages_past_unreadable_repositories() {
    within(90, "catalog_pages_past_unreadable_repositories", async {
        let (berth, _dir) = start(
            "workspaces.toml",
            &["admin", "ws-a-builder", "ws-b-builder"],
        )
        .await;
        let r = reqwest::get(format!("{}/v2/_catalog", berth.url()))
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 401, "anonymous catalog");
        assert!(header_str(r.headers(), "www-authenticate").is_some());
        let r = reqwest::get(format!("{}/api/keys", berth.url()))
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 401, "anonymous /api/keys");

        let admin = Client::new(&berth, Some("admin"));
        for (i, repo) in [
            "workspace-a/app",
            "workspace-a/lib",
            "workspace-b/app",
            "workspace-b/lib",
        ]
        .iter()
        .enumerate()
        {
            let image = make_single(80 + i as u64, 2_000);
            assert_eq!(admin.push_image(repo, "v1", &image).await, 201, "{repo}");
        }
        let page = |user: &'static str, query: String| {
            let c = Client::new(&berth, Some(user));
            async move {
                let r = c
                    .req("GET", &format!("/v2/_catalog{query}"))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status().as_u16(), 200);
                let link = header_str(r.headers(), "link").map(str::to_owned);
                let v: serde_json::Value = r.json().await.unwrap();
                (v["repositories"].clone(), link)
            }
        };
        // ws-b's repositories come after two it may not read.
        let (repos, link) = page("ws-b-builder", "?n=2".into()).await;
        assert_eq!(
            repos,
            serde_json::json!(["workspace-b/app", "workspace-b/lib"])
        );
        assert_eq!(link, None);
        // One at a time, following the Link.
        let (repos, link) = page("ws-b-builder", "?n=1".into()).await;
        assert_eq!(repos, serde_json::json!(["workspace-b/app"]));
        let link = link.expect("a Link to the rest");
        assert_eq!(
            link,
            "</v2/_catalog?n=1&last=workspace-b%2Fapp>; rel=\"next\""
        );
        let (repos, link) = page("ws-b-builder", "?n=1&last=workspace-b%2Fapp".into()).await;
        assert_eq!(repos, serde_json::json!(["workspace-b/lib"]));
        assert_eq!(link, None);
        // ws-a's come first; unreadable ones after them are skipped to the end.
        let (repos, _) = page("ws-a-builder", "?n=5".into()).await;
        assert_eq!(
            repos,
            serde_json::json!(["workspace-a/app", "workspace-a/lib"])
        );
        let (repos, link) = page("ws-a-builder", "?n=1&last=workspace-a%2Flib".into()).await;
        assert_eq!(repos, serde_json::json!([]));
        assert_eq!(link, None);
    })
    .await;
}

/// The token realm never comes from the client's `Host` header: with TLS it defaults to
/// `https://<listen address>/token`, and `[server] external_url` sets it.
#[tokio::test(flavor = "multi_thread")]
async fn token_realm_comes_from_the_configuration() {
    within(90, "token_realm_comes_from_the_configuration", async {
        let pki = test_pki();
        let d = pki.path();
        let tls = format!(
            "tls = {{ cert = \"{}\", key = \"{}\" }}",
            d.join("server.pem").display(),
            d.join("server.key").display()
        );
        let dir = tempdir();
        let berth = start_with_tokens_and(dir.path(), "berth", "5m", &tls, "").await;
        let realm_for = |scheme: &'static str, port: u16, host: &'static str| {
            let client = berth.client.clone();
            async move {
                let r = client
                    .get(format!("{scheme}://127.0.0.1:{port}/v2/team/app/tags/list"))
                    .header("Host", host)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status().as_u16(), 401);
                header_str(r.headers(), "www-authenticate")
                    .unwrap()
                    .to_owned()
            }
        };
        let c = realm_for("https", berth.port(), "evil.example").await;
        assert!(
            c.starts_with(&format!(
                "Bearer realm=\"https://127.0.0.1:{}/token\"",
                berth.port()
            )),
            "{c}"
        );
        assert!(!c.contains("evil"), "{c}");

        let dir = tempdir();
        let external = start_with_tokens_and(
            dir.path(),
            "berth",
            "5m",
            "external_url = \"https://localhost:5999\"",
            "",
        )
        .await;
        let c = realm_for("http", external.port(), "evil.example").await;
        assert!(
            c.starts_with("Bearer realm=\"https://localhost:5999/token\""),
            "{c}"
        );
    })
    .await;
}

/// A berth process started here on `listen` (the support helpers listen on loopback only).
struct Listening {
    child: std::process::Child,
    log: std::path::PathBuf,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Listening {
    /// Starts berth with `config` on `ip` and a free port, and waits until `/v2/` answers
    /// on 127.0.0.1.
    async fn start(config: &str, ip: &str) -> Listening {
        let dir = tempdir();
        std::fs::write(dir.path().join("berth.toml"), config).unwrap();
        let log = dir.path().join("berth.log");
        let port = free_port();
        let out = std::fs::File::create(&log).unwrap();
        let child = std::process::Command::new(support::berth_binary())
            .arg("serve")
            .arg("--config")
            .arg(dir.path().join("berth.toml"))
            .arg("--listen")
            .arg(format!("{ip}:{port}"))
            .arg("--store")
            .arg(dir.path().join("store"))
            .env_remove("BERTH_CONFIG")
            .env_remove("BERTH_LISTEN")
            .env_remove("BERTH_STORE")
            .env("NO_COLOR", "1")
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        let mut me = Listening {
            child,
            log,
            port,
            _dir: dir,
        };
        let deadline = std::time::Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(r) = reqwest::get(me.url("/v2/")).await {
                if r.status().as_u16() == 200 {
                    return me;
                }
            }
            assert!(
                me.child.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline,
                "berth on {ip}:{port} did not start:\n{}",
                me.log()
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn log(&self) -> String {
        strip_ansi(&std::fs::read_to_string(&self.log).unwrap_or_default())
    }
}

impl Drop for Listening {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A listener beyond loopback without `[access]` serves pulls to anyone but refuses
/// pushes and deletes, naming the setting that opens them; `[access] open = true` opens
/// them. The start-up log states the mode.
#[tokio::test(flavor = "multi_thread")]
async fn beyond_loopback_without_access_serves_pulls_only() {
    within(
        60,
        "beyond_loopback_without_access_serves_pulls_only",
        async {
            let http = reqwest::Client::new();
            let berth = Listening::start("", "0.0.0.0").await;
            assert!(berth.log().contains("access=pulls only"), "{}", berth.log());
            let r = http
                .post(berth.url("/v2/team/app/blobs/uploads/"))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 403, "an anonymous upload");
            let (code, msg) = oci_error(&r.bytes().await.unwrap(), "upload");
            assert_eq!(code, "DENIED");
            assert!(msg.contains("[access] open = true"), "{msg}");
            let r = http
                .delete(berth.url("/v2/team/app/manifests/v1"))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 403, "an anonymous delete");
            // Pulls still work (404: nothing there).
            let r = http
                .get(berth.url("/v2/team/app/tags/list"))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 404);
            drop(berth);

            let open = Listening::start("[access]\nopen = true\n", "0.0.0.0").await;
            assert!(
                open.log().contains(
                    "access=open: anyone may pull, push and delete ([access] open = true)"
                ),
                "{}",
                open.log()
            );
            let r = http
                .post(open.url("/v2/team/app/blobs/uploads/"))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 202, "an upload with open = true");
            drop(open);

            // The default loopback listener stays open, and says so.
            let local = Berth::start(&[]).await;
            assert!(local.log().contains("access=open:"), "{}", local.log());
            assert!(local.log().contains("loopback"), "{}", local.log());
        },
    )
    .await;
}

/// Checking a password with bcrypt does not hold up other requests: while more slow
/// logins are in flight than berth has worker threads, `/healthz` is answered before
/// any of them (in berth's access log, which records requests as they finish).
#[tokio::test(flavor = "multi_thread")]
async fn bcrypt_does_not_block_other_requests() {
    within(120, "bcrypt_does_not_block_other_requests", async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dir = tempdir();
        let logins = 2 * std::thread::available_parallelism().map_or(2, |n| n.get()) + 2;
        // One slow hash (cost 12) for every user: each user's first login pays it.
        let hash = bcrypt::hash(PASSWORD, 12).unwrap();
        let users: Vec<String> = (0..logins).map(|i| format!("user{i}")).collect();
        let lines: String = users.iter().map(|u| format!("{u}:{hash}\n")).collect();
        std::fs::write(dir.path().join("htpasswd"), lines).unwrap();
        let config = format!(
            "[auth]\nhtpasswd = \"{}\"\n[access]\n[[access.repository]]\npattern = \"**\"\ndefault = [\"read\"]\n",
            dir.path().join("htpasswd").display()
        );
        let berth = Berth::start_with_config(&config, &[]).await;
        let mark = berth.log_len();
        let addr = berth.host();
        // The connection /healthz is asked on, open before the logins start.
        let mut health = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let (written_tx, mut written) = tokio::sync::mpsc::channel(logins);
        let mut tasks = Vec::new();
        for u in &users {
            let request = format!(
                "GET /v2/team/app/tags/list HTTP/1.1\r\nHost: {addr}\r\nAuthorization: {}\r\nConnection: close\r\n\r\n",
                basic_auth(u, PASSWORD)
            );
            let addr = addr.clone();
            let written_tx = written_tx.clone();
            tasks.push(tokio::spawn(async move {
                let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
                s.write_all(request.as_bytes()).await.unwrap();
                written_tx.send(()).await.unwrap();
                let mut answer = Vec::new();
                s.read_to_end(&mut answer).await.unwrap();
                String::from_utf8_lossy(&answer).into_owned()
            }));
        }
        for _ in 0..logins {
            written.recv().await.unwrap();
        }
        health
            .write_all(format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut answer = Vec::new();
        health.read_to_end(&mut answer).await.unwrap();
        assert!(answer.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&answer));
        for t in tasks {
            let answer = t.await.unwrap();
            assert!(answer.starts_with("HTTP/1.1 404"), "a login: {answer}");
        }
        let log = berth.log_since(mark);
        let access: Vec<&str> = log.lines().filter(|l| l.contains("berth::access")).collect();
        let first_login = access.iter().position(|l| l.contains("path=/v2/team/app/tags/list"));
        let health_at = access.iter().position(|l| l.contains("path=/healthz"));
        assert!(
            health_at.is_some() && first_login.is_some() && health_at < first_login,
            "/healthz waited for bcrypt:\n{}",
            access.join("\n")
        );
    })
    .await;
}
