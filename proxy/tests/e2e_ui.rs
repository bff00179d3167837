//! The status page (`/ui`), end to end: images pulled through berth with curl from a
//! real docker-registry, private repositories pushed, then the page as each viewer gets
//! it under `[access]`: the node's figures (hit ratio, bytes per upstream, health, disk,
//! fills) only for viewers who may read `/metrics`, and only the repositories each
//! viewer may read. Then the upstream stops and a tag past its TTL is served stale, and
//! the page says so.
//!
//! Run: `cargo test --release -p berth-proxy --test e2e_ui`.

mod support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use support::*;

const PASSWORD: &str = "correct horse";

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// berth with one upstream (`docker.io`, the registry at `upstream`), an htpasswd file
/// of `admin`, `olga` (group `ops`, which may read `/metrics` and every repository) and
/// `reader` (may read `docker.io/library/alpine` and `team/**`); anonymous requests may
/// read `docker.io/library/alpine` only, and not `/metrics`.
async fn start(upstream: &str) -> (Berth, tempfile::TempDir) {
    let dir = tempdir();
    let htpasswd = dir.path().join("htpasswd");
    let lines: String = ["admin", "olga", "reader"]
        .iter()
        .map(|u| format!("{u}:{}\n", bcrypt::hash(PASSWORD, 4).unwrap()))
        .collect();
    std::fs::write(&htpasswd, lines).unwrap();
    let ops = r#"policies = [{ users = [], groups = ["ops"], actions = ["read"] }]"#;
    let config = format!(
        r#"{upstreams}
[auth]
htpasswd = {htpasswd:?}
[auth.groups]
ops = ["olga"]

[access]
admin = {{ users = ["admin"], groups = [] }}
metrics = {{ anonymous = false, groups = ["ops"] }}

[[access.repository]]
pattern = "**"
anonymous = []
default = []
{ops}

[[access.repository]]
pattern = "docker.io/library/alpine"
anonymous = ["read"]
default = ["read"]
{ops}

[[access.repository]]
pattern = "team/**"
anonymous = []
default = ["read"]
{ops}
"#,
        upstreams =
            berth_config(&[Upstream::new("docker.io", upstream, &["library/**"]).tag_ttl("1h")]),
    );
    (Berth::start_with_config(&config, &[]).await, dir)
}

/// GETs `path` from berth with curl (as `user`, if given) and returns the status and the
/// body's length.
async fn curl(berth: &Berth, user: Option<&str>, path: &str) -> (u16, u64) {
    let mut cmd = tokio::process::Command::new("curl");
    cmd.args([
        "-sS",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{size_download}",
    ])
    .args(["-H", &format!("Accept: {ACCEPT_ALL}")]);
    if let Some(u) = user {
        cmd.args(["-u", &format!("{u}:{PASSWORD}")]);
    }
    let out = cmd
        .arg(format!("{}{path}", berth.url()))
        .output()
        .await
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "curl {path}: {text} {:?}", out.stderr);
    let (status, size) = text.split_once(' ').expect("curl's -w output");
    (status.parse().unwrap(), size.parse().unwrap())
}

/// Pulls `image` (its manifest by `tag`, then each blob) through berth's `docker.io`
/// namespace with curl, checking every answer; returns the body bytes received.
async fn pull(berth: &Berth, user: Option<&str>, repo: &str, tag: &str, image: &Image) -> u64 {
    let path = format!("/v2/docker.io/{repo}/manifests/{tag}");
    let (status, mut bytes) = curl(berth, user, &path).await;
    assert_eq!(status, 200, "GET {path}");
    for b in image.blobs() {
        let path = format!("/v2/docker.io/{repo}/blobs/{}", b.digest);
        let (status, n) = curl(berth, user, &path).await;
        assert_eq!((status, n), (200, b.bytes.len() as u64), "GET {path}");
        bytes += n;
    }
    assert_eq!(bytes, image_bytes(image));
    bytes
}

/// The manifest's and blobs' bytes of `image`.
fn image_bytes(image: &Image) -> u64 {
    image.manifest.len() as u64
        + image
            .blobs()
            .iter()
            .map(|b| b.bytes.len() as u64)
            .sum::<u64>()
}

/// Pushes `image` to the private repository `repo` under `tag`, as `admin`.
async fn push(berth: &Berth, repo: &str, tag: &str, image: &Image) {
    for b in image.blobs() {
        let r = berth
            .client
            .post(format!(
                "{}/v2/{repo}/blobs/uploads/?digest={}",
                berth.url(),
                b.digest
            ))
            .basic_auth("admin", Some(PASSWORD))
            .body(b.bytes.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 201, "push a blob to {repo}");
    }
    let r = berth
        .client
        .put(format!("{}/v2/{repo}/manifests/{tag}", berth.url()))
        .basic_auth("admin", Some(PASSWORD))
        .header("Content-Type", OCI_MANIFEST)
        .body(image.manifest.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201, "push {repo}:{tag}");
}

/// The status page as `user` gets it: checks the status and the HTML headers.
async fn page(berth: &Berth, user: Option<&str>) -> String {
    let mut rb = berth.client.get(format!("{}/ui", berth.url()));
    if let Some(u) = user {
        rb = rb.basic_auth(u, Some(PASSWORD));
    }
    let r = rb.send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200, "GET /ui as {user:?}");
    let h = r.headers().clone();
    assert_eq!(
        header_str(&h, "content-type"),
        Some("text/html; charset=utf-8")
    );
    assert_eq!(header_str(&h, "cache-control"), Some("no-store"));
    assert_eq!(header_str(&h, "x-frame-options"), Some("DENY"));
    assert_eq!(header_str(&h, "x-content-type-options"), Some("nosniff"));
    assert_eq!(header_str(&h, "referrer-policy"), Some("no-referrer"));
    let csp = header_str(&h, "content-security-policy").unwrap_or("");
    assert!(csp.starts_with("default-src 'none'"), "{csp}");
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    r.text().await.unwrap()
}

/// The `<tr>` whose `attr` is `value` (`data-repo="team/app"`), or `None`.
fn row<'a>(html: &'a str, attr: &str, value: &str) -> Option<&'a str> {
    let start = html.find(&format!("<tr {attr}=\"{value}\">"))?;
    let end = html[start..].find("</tr>").expect("a closed row") + start;
    Some(&html[start..end])
}

/// The `data-value` of the element whose last class (or id) is `name` in `html`.
fn value(html: &str, name: &str) -> String {
    let key = format!("{name}\" data-value=\"");
    let start = html
        .find(&key)
        .unwrap_or_else(|| panic!("no {name} with a data-value in\n{html}"))
        + key.len();
    let end = html[start..].find('"').unwrap() + start;
    html[start..end].to_owned()
}

/// Checks that `who`'s page shows none of `absent` and a row for each of `repos`.
fn assert_sees(html: &str, who: &str, absent: &[&str], repos: &[&str]) {
    for a in absent {
        assert!(!html.contains(a), "{who} sees {a}:\n{html}");
    }
    for r in repos {
        assert!(
            row(html, "data-repo", r).is_some(),
            "{who} does not see {r}:\n{html}"
        );
    }
}

/// The text of the cell of class `class` in `row`.
fn text(row: &str, class: &str) -> String {
    let start = row
        .find(&format!("class=\"{class}\""))
        .unwrap_or_else(|| panic!("no {class} in {row}"));
    let open = row[start..].find('>').unwrap() + start + 1;
    let close = row[open..].find('<').unwrap() + open;
    row[open..close].to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_status_page_shows_each_viewer_what_they_may_see() {
    within(
        180,
        "the_status_page_shows_each_viewer_what_they_may_see",
        async {
            let mut reg = Registry::start().await;
            let alpine = make_single(81, 20_000);
            let secret = make_single(82, 30_000);
            let upstream = reg.pusher(None);
            upstream.image("library/alpine", Some("3"), &alpine).await;
            upstream.image("library/secret", Some("1"), &secret).await;
            let (berth, _dir) = start(&reg.url()).await;

            // `/` sends browsers to the page.
            let r = reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap()
                .get(format!("{}/", berth.url()))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 303);
            assert_eq!(header_str(r.headers(), "location"), Some("/ui"));

            // Before any pull, the hit ratio is a dash.
            let html = page(&berth, Some("olga")).await;
            assert_eq!(value(&html, "hit-ratio"), "", "{html}");

            let started = now_ms() / 1000 * 1000;
            // alpine twice (all misses, then all hits), anonymously; secret once (misses).
            let mut served = pull(&berth, None, "library/alpine", "3", &alpine).await;
            served += pull(&berth, None, "library/alpine", "3", &alpine).await;
            served += pull(&berth, Some("olga"), "library/secret", "1", &secret).await;
            let pulled = now_ms();
            push(&berth, "team/app", "v1", &make_single(83, 1_000)).await;
            push(&berth, "team/app", "v2", &make_single(84, 1_000)).await;
            push(&berth, "other/hidden", "x", &make_single(85, 1_000)).await;
            // The page read the store's contents above, and keeps them 30 s (by berth's
            // clock): move past that.
            berth.advance_clock(Duration::from_secs(31)).await;

            // ops: everything.
            let html = page(&berth, Some("olga")).await;
            assert!(html.contains(r#"<span id="whoami">olga</span>"#), "{html}");
            // A manifest and its blobs, per image.
            let requests = |i: &Image| i.blobs().len() as u64 + 1;
            let hits = requests(&alpine);
            let misses = requests(&alpine) + requests(&secret);
            assert_eq!(hits * 2, misses, "the images should be alike");
            assert_eq!(value(&html, "hits"), hits.to_string(), "{html}");
            assert_eq!(value(&html, "misses"), misses.to_string(), "{html}");
            assert_eq!(value(&html, "hit-ratio"), "0.3333", "{html}");
            assert!(html.contains(">33.3%<"), "{html}");
            assert_eq!(value(&html, "fills-in-progress"), "0");
            let used: u64 = value(&html, "disk-used").parse().unwrap();
            let blobs: u64 = [&alpine, &secret]
                .iter()
                .flat_map(|i| i.blobs())
                .map(|b| b.bytes.len() as u64)
                .sum();
            assert!(
                used >= blobs,
                "disk-used {used} < the {blobs} bytes of blobs pulled"
            );
            let budget: u64 = value(&html, "disk-budget").parse().unwrap();
            let free: u64 = value(&html, "disk-free").parse().unwrap();
            assert!(budget > 0 && free > 0, "{html}");
            let up = row(&html, "data-upstream", "docker.io").expect("the docker.io row");
            assert_eq!(value(up, "bytes-served"), served.to_string(), "{up}");
            let fetched = image_bytes(&alpine) + image_bytes(&secret);
            assert_eq!(value(up, "bytes-fetched"), fetched.to_string(), "{up}");
            assert_eq!(text(up, "health"), "ok", "{up}");
            assert_eq!(text(up, "last-error"), "-", "{up}");
            assert_eq!(text(up, "stale"), "no", "{up}");

            let a = row(&html, "data-repo", "docker.io/library/alpine").expect("alpine's row");
            assert_eq!(value(a, "size"), image_bytes(&alpine).to_string(), "{a}");
            let last: u64 = value(a, "last-pull").parse().unwrap();
            assert!(
                (started..=pulled).contains(&last),
                "alpine's last pull {last} is not between {started} and {pulled}"
            );
            let s = row(&html, "data-repo", "docker.io/library/secret").expect("secret's row");
            assert_eq!(value(s, "size"), image_bytes(&secret).to_string(), "{s}");
            let t = row(&html, "data-repo", "team/app").expect("team/app's row");
            assert_eq!(text(t, "tags"), "v1, v2", "{t}");
            assert!(row(&html, "data-repo", "other/hidden").is_some(), "{html}");

            // reader: no node figures; alpine and team/app only.
            let html = page(&berth, Some("reader")).await;
            assert!(
                html.contains(r#"<span id="whoami">reader</span>"#),
                "{html}"
            );
            assert_sees(
                &html,
                "reader",
                &[
                    "id=\"hit-ratio\"",
                    "id=\"disk-used\"",
                    "data-upstream=",
                    "docker.io/library/secret",
                    "other/hidden",
                    "login-hint",
                ],
                &["docker.io/library/alpine"],
            );
            let t = row(&html, "data-repo", "team/app").expect("team/app for reader");
            assert_eq!(text(t, "tags"), "v1, v2", "{t}");

            // Anonymous: alpine only, and a hint to log in.
            let html = page(&berth, None).await;
            assert_sees(
                &html,
                "anonymous",
                &[
                    "id=\"hit-ratio\"",
                    "id=\"fills-in-progress\"",
                    "data-upstream=",
                    "docker.io/library/secret",
                    "team/app",
                    "other/hidden",
                    "whoami",
                ],
                &["docker.io/library/alpine"],
            );
            assert!(html.contains(r#"id="login-hint""#), "{html}");
            assert!(
                html.contains(r#"<a id="login-link" href="/login">"#),
                "{html}"
            );

            // The upstream stops; past the tag's TTL, alpine:3 is served stale.
            reg.stop();
            berth.advance_clock(Duration::from_secs(2 * 3600)).await;
            let (status, _) = curl(&berth, None, "/v2/docker.io/library/alpine/manifests/3").await;
            assert_eq!(status, 200, "a stale tag is served");
            let html = page(&berth, Some("olga")).await;
            let up = row(&html, "data-upstream", "docker.io").expect("the docker.io row");
            assert_eq!(text(up, "stale"), "serving stale", "{up}");
            assert_ne!(value(up, "stale"), "0", "{up}");
            assert_eq!(text(up, "health"), "failing", "{up}");
            assert!(text(up, "last-error").contains("unreachable"), "{up}");
            assert_ne!(value(up, "last-error"), "0", "{up}");
            assert_eq!(
                value(&html, "hits"),
                (hits + 1).to_string(),
                "the stale serve is a hit: {html}"
            );
        },
    )
    .await;
}
