//! The OIDC fixture: a real OpenID provider (`tests/oidc/provider.mjs`, oidc-provider on
//! Node.js) and a real browser (`tests/oidc/browser.mjs`, headless Debian Chromium through
//! playwright-core), each a child process. Both need `tests/oidc/node_modules`, which
//! `scripts/setup` installs: without it they fail, naming that script.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use tempfile::TempDir;

use super::{tail, tempdir, terminate, within, READY_TIMEOUT};

/// The client berth logs users in as (`[[auth.oidc]]` `client_id` / `client_secret`). Its
/// redirect URI is `http://127.0.0.1/login/callback` on any port.
pub const OIDC_CLIENT_ID: &str = "berth";
pub const OIDC_CLIENT_SECRET: &str = "berth-secret";
/// The workload client: its client-credentials access tokens are JWTs with `sub` and
/// `client_id` = this id, `aud` = the `resource` asked for, and `groups`.
pub const WORKLOAD_CLIENT_ID: &str = "ci-job";
pub const WORKLOAD_CLIENT_SECRET: &str = "ci-job-secret";
/// The workload client's groups at start ([`OidcProvider::set_groups`] changes them).
pub const WORKLOAD_GROUPS: &[&str] = &["ci"];
/// The audience workload tokens get when no other `resource` is asked for.
pub const WORKLOAD_AUDIENCE: &str = "urn:berth";

/// `tests/oidc` in this checkout.
pub fn oidc_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/oidc")
}

/// Panics unless `node` runs and `tests/oidc/node_modules` holds the fixture's packages.
fn require_oidc_fixture() {
    let node = Command::new("node").arg("--version").output();
    assert!(
        node.is_ok_and(|o| o.status.success()),
        "the OIDC tests need Node.js (`node` on PATH): run scripts/setup"
    );
    let modules = oidc_dir().join("node_modules");
    for package in ["oidc-provider", "jose", "playwright-core"] {
        assert!(
            modules.join(package).join("package.json").is_file(),
            "the OIDC tests need {}: run scripts/setup (it runs `npm ci` in tests/oidc)",
            modules.join(package).display()
        );
    }
}

/// A user of the provider: its login form takes `username` and `password`; ID tokens
/// carry `sub`, `preferred_username` = `username`, and `groups`.
#[derive(Clone, Debug)]
pub struct OidcUser {
    pub sub: String,
    pub username: String,
    pub password: String,
    pub groups: Vec<String>,
}

impl OidcUser {
    pub fn new(sub: &str, username: &str, password: &str, groups: &[&str]) -> OidcUser {
        OidcUser {
            sub: sub.to_owned(),
            username: username.to_owned(),
            password: password.to_owned(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
        }
    }
}

/// What the provider is started with.
#[derive(Clone, Debug)]
pub struct OidcConfig {
    /// `RS256` or `ES256`: the key type, for ID tokens, workload tokens and [`Mint`].
    pub alg: &'static str,
    /// Whether the login client must use PKCE (S256).
    pub pkce_required: bool,
    pub users: Vec<OidcUser>,
}

impl Default for OidcConfig {
    /// RS256, PKCE required, and two users whose `sub` is not their user name: alice
    /// (`u-1001`, groups ci and admins) and bob (`u-1002`, group ci).
    fn default() -> OidcConfig {
        OidcConfig {
            alg: "RS256",
            pkce_required: true,
            users: vec![
                OidcUser::new("u-1001", "alice", "alice-pw", &["ci", "admins"]),
                OidcUser::new("u-1002", "bob", "bob-pw", &["ci"]),
            ],
        }
    }
}

impl OidcConfig {
    fn to_json(&self) -> serde_json::Value {
        let users: Vec<serde_json::Value> = self
            .users
            .iter()
            .map(|u| {
                serde_json::json!({
                    "sub": u.sub, "username": u.username, "password": u.password, "groups": u.groups,
                })
            })
            .collect();
        serde_json::json!({
            "alg": self.alg,
            "pkce_required": self.pkce_required,
            "login_client": { "client_id": OIDC_CLIENT_ID, "client_secret": OIDC_CLIENT_SECRET },
            "workload_clients": [{
                "client_id": WORKLOAD_CLIENT_ID,
                "client_secret": WORKLOAD_CLIENT_SECRET,
                "groups": WORKLOAD_GROUPS,
            }],
            "users": users,
        })
    }
}

/// The claims of a JWT that [`OidcProvider::mint`] signs; `None` takes the provider's
/// default: sub `ci-job`, aud [`WORKLOAD_AUDIENCE`], iss the issuer, expiry in 300 s, and
/// no `groups` or `preferred_username` claim.
#[derive(Clone, Debug, Default)]
pub struct Mint<'a> {
    pub sub: Option<&'a str>,
    pub aud: Option<&'a str>,
    pub groups: Option<&'a [&'a str]>,
    /// Seconds from now; negative: already expired.
    pub exp_in: Option<i64>,
    pub iss: Option<&'a str>,
    pub username: Option<&'a str>,
}

/// `tests/oidc/provider.mjs`, listening on a loopback port it chose. Stopped with SIGTERM
/// (and SIGKILL after 5 s) when dropped.
pub struct OidcProvider {
    child: Option<Child>,
    issuer: String,
    port: u16,
    config: OidcConfig,
    log: PathBuf,
    client: reqwest::Client,
    /// Held so that the provider never writes to a closed pipe.
    _stdout: BufReader<ChildStdout>,
    _dir: TempDir,
}

impl OidcProvider {
    /// Starts the provider with `config` and waits for the line that names its port.
    pub async fn start(config: &OidcConfig) -> OidcProvider {
        require_oidc_fixture();
        let dir = tempdir();
        let config_file = dir.path().join("provider.json");
        fs::write(&config_file, config.to_json().to_string()).unwrap();
        let log = dir.path().join("provider.log");
        let mut child = Command::new("node")
            .arg(oidc_dir().join("provider.mjs"))
            .arg(&config_file)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .expect("start node tests/oidc/provider.mjs");
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let pid = child.id();
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = stdout.read_line(&mut line);
            let _ = tx.send((line, stdout));
        });
        let (line, stdout) = tokio::time::timeout(READY_TIMEOUT, rx)
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_else(|| {
                terminate(&mut child, Duration::ZERO);
                panic!("provider.mjs did not start:\n{}", tail(&log, 40))
            });
        let ready: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| {
            terminate(&mut child, Duration::ZERO);
            panic!("provider.mjs printed {line:?} ({e}):\n{}", tail(&log, 40))
        });
        assert_eq!(ready["pid"].as_u64(), Some(u64::from(pid)), "{ready}");
        OidcProvider {
            child: Some(child),
            issuer: ready["issuer"].as_str().unwrap().to_owned(),
            port: u16::try_from(ready["port"].as_u64().unwrap()).unwrap(),
            config: config.clone(),
            log,
            client: reqwest::Client::builder().no_proxy().build().unwrap(),
            _stdout: stdout,
            _dir: dir,
        }
    }

    /// `http://127.0.0.1:PORT`, exactly as in the `iss` of its tokens (no trailing slash).
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The user named `username` in the configuration it was started with.
    pub fn user(&self, username: &str) -> &OidcUser {
        self.config
            .users
            .iter()
            .find(|u| u.username == username)
            .unwrap_or_else(|| panic!("the OIDC provider has no user {username}"))
    }

    async fn check(&self, what: &str, res: reqwest::Response) -> String {
        let status = res.status();
        let body = res.text().await.unwrap_or_default();
        assert!(
            status.is_success(),
            "provider {what}: {status} {body}\n{}",
            tail(&self.log, 20)
        );
        body
    }

    /// A workload token: the client-credentials grant of [`WORKLOAD_CLIENT_ID`] with
    /// `resource` (the token's `aud`; any absolute URI).
    pub async fn client_credentials_token(&self, resource: &str) -> String {
        let body = form_urlencoded::Serializer::new(String::new())
            .append_pair("grant_type", "client_credentials")
            .append_pair("scope", "pull push")
            .append_pair("resource", resource)
            .finish();
        let res = self
            .client
            .post(format!("{}/token", self.issuer))
            .basic_auth(WORKLOAD_CLIENT_ID, Some(WORKLOAD_CLIENT_SECRET))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await
            .expect("POST the provider's /token");
        let body = self.check("client-credentials token", res).await;
        let token: serde_json::Value = serde_json::from_str(&body).unwrap();
        token["access_token"].as_str().unwrap().to_owned()
    }

    /// A JWT with the claims `m`, signed with the provider's key (the `kid` in its JWKS).
    pub async fn mint(&self, m: &Mint<'_>) -> String {
        let mut q = form_urlencoded::Serializer::new(String::new());
        let exp_in = m.exp_in.map(|s| s.to_string());
        let groups = m.groups.map(|g| g.join(","));
        for (k, v) in [
            ("sub", m.sub),
            ("aud", m.aud),
            ("groups", groups.as_deref()),
            ("exp_in", exp_in.as_deref()),
            ("iss", m.iss),
            ("username", m.username),
        ] {
            if let Some(v) = v {
                q.append_pair(k, v);
            }
        }
        let url = format!("{}/_test/mint?{}", self.issuer, q.finish());
        let res = self.client.get(url).send().await.expect("GET /_test/mint");
        self.check("/_test/mint", res).await
    }

    /// Replaces the groups of the user `name` (user name or sub) or of the workload client
    /// `name`: later logins and tokens carry them; tokens issued before keep theirs.
    pub async fn set_groups(&self, name: &str, groups: &[&str]) {
        let body = form_urlencoded::Serializer::new(String::new())
            .append_pair("user", name)
            .append_pair("groups", &groups.join(","))
            .finish();
        let res = self
            .client
            .post(format!("{}/_test/groups", self.issuer))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await
            .expect("POST /_test/groups");
        self.check("/_test/groups", res).await;
    }

    /// What the provider wrote to stderr so far (a line per request, and its warnings).
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for OidcProvider {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            terminate(&mut child, Duration::from_secs(5));
        }
        if std::thread::panicking() {
            eprintln!(
                "----- provider.mjs log, last lines -----\n{}\n-----",
                tail(&self.log, 40)
            );
        }
    }
}

/// Part `index` of a JWT (0 the header, 1 the claims), decoded; the signature is not
/// checked.
fn jwt_part(jwt: &str, index: usize) -> serde_json::Value {
    let part = jwt
        .split('.')
        .nth(index)
        .unwrap_or_else(|| panic!("not a JWT: {jwt}"));
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .unwrap_or_else(|e| panic!("JWT part {index} is not base64url ({e}): {jwt}"));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("JWT part {index} is not JSON ({e})"))
}

/// The claims of a JWT, decoded without checking its signature.
pub fn jwt_claims(jwt: &str) -> serde_json::Value {
    jwt_part(jwt, 1)
}

/// The protected header of a JWT (`alg`, `kid`, `typ`).
pub fn jwt_header(jwt: &str) -> serde_json::Value {
    jwt_part(jwt, 0)
}

/// One browser profile for `tests/oidc/browser.mjs`: its cookies (written by the `login`
/// commands, read by the others) and the screenshots of every command, in a temporary
/// directory that is kept, and named, when the test panics.
pub struct Browser {
    berth: String,
    dir: Option<TempDir>,
}

impl Browser {
    /// A profile for berth at `berth_url` (`http://127.0.0.1:PORT`).
    pub fn new(berth_url: &str) -> Browser {
        require_oidc_fixture();
        assert!(
            Path::new("/usr/bin/chromium").is_file(),
            "the browser tests need /usr/bin/chromium: run scripts/setup"
        );
        Browser {
            berth: berth_url.to_owned(),
            dir: Some(tempdir()),
        }
    }

    fn dir(&self) -> &Path {
        self.dir.as_ref().unwrap().path()
    }

    /// Where the screenshots go.
    pub fn screenshots(&self) -> PathBuf {
        self.dir().join("screenshots")
    }

    /// Runs `node tests/oidc/browser.mjs COMMAND --berth URL --out DIR --state FILE ARGS`
    /// and returns the JSON line it printed, or, if it failed, its message (stderr).
    pub async fn try_run(&self, command: &str, args: &[&str]) -> Result<serde_json::Value, String> {
        let mut cmd = tokio::process::Command::new("node");
        cmd.arg(oidc_dir().join("browser.mjs"))
            .arg(command)
            .arg("--berth")
            .arg(&self.berth)
            .arg("--out")
            .arg(self.screenshots())
            .arg("--state")
            .arg(self.dir().join("state.json"))
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let what = format!("browser.mjs {command} {args:?}");
        let out = within(120, &what, cmd.output())
            .await
            .expect("run node tests/oidc/browser.mjs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            return Err(format!("{what}: {}\n{stderr}", out.status));
        }
        let line = stdout.lines().last().unwrap_or_default();
        serde_json::from_str(line)
            .map_err(|e| format!("{what}: stdout is not one JSON line ({e}): {stdout}\n{stderr}"))
    }

    /// [`Browser::try_run`], panicking with the driver's message if it failed.
    pub async fn run(&self, command: &str, args: &[&str]) -> serde_json::Value {
        self.try_run(command, args)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Some(dir) = self.dir.take() {
                eprintln!("browser screenshots kept in {}", dir.keep().display());
            }
        }
    }
}
