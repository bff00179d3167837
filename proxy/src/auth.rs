//! Who a request comes from (Basic credentials checked against an htpasswd file, API
//! keys, registry tokens), and whether the access policies let it do what it asks.
//!
//! The htpasswd file is read again when it changes (looked at once a second, by a thread
//! of its own), so
//! users are added and removed without a restart; an API key or a token of a user who is
//! no longer in the file stops working. bcrypt is slow on purpose, so it runs on the
//! blocking pool, never on a worker thread that serves other requests; a successful check
//! is remembered (as a hash of the credentials, per version of the file) so that a
//! client's every request does not pay it again.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use berth_cache::clock::Clock;
use berth_config::access::{AccessConfig, Action};
use berth_config::Config;
use sha2::{Digest as _, Sha256};

use crate::token::{random_hex, Grant, Tokens};

/// Who a request is from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Identity {
    Anonymous,
    User {
        name: String,
        groups: Vec<String>,
        /// With a token: what it was granted; nothing else is allowed with it. `Some`
        /// exactly when `login` is [`Login::Token`].
        grants: Option<Vec<Grant>>,
        /// How the user proved who they are.
        login: Login,
        /// The `[[auth.oidc]]` provider whose groups `groups` are; `None` for an htpasswd
        /// user, whose groups are `[auth.groups]`.
        provider: Option<String>,
    },
}

/// How a user logged in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Login {
    /// Basic credentials with the password of the htpasswd file.
    Password,
    /// Basic credentials with an API key as the password.
    ApiKey,
    /// A registry token from `GET /token`.
    Token,
    /// A JWT from an `[[auth.oidc]]` issuer (a CI job's or a Kubernetes service
    /// account's), as a Bearer token or as the password of Basic credentials.
    Workload,
    /// The `berth_session` cookie of a browser login (berth's pages only).
    Session,
}

impl Identity {
    fn as_user(&self) -> Option<(&str, &[String])> {
        match self {
            Identity::Anonymous => None,
            Identity::User { name, groups, .. } => Some((name, groups)),
        }
    }

    /// The user name for the access log.
    pub fn name(&self) -> &str {
        match self {
            Identity::Anonymous => "-",
            Identity::User { name, .. } => name,
        }
    }
}

/// Why credentials were refused.
#[derive(Debug, PartialEq, Eq)]
pub enum AuthError {
    /// Malformed, unknown user, or wrong password.
    BadCredentials,
    /// Too many failed logins from this address just now.
    TooManyFailures,
    /// A workload token that is not accepted, and why (for the client: it holds the
    /// token, so the reason tells it nothing it could not find out).
    Rejected(String),
}

/// Who may do what when no `[access]` section decides.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `[access]` rules decide every request.
    Checked,
    /// Everyone may do everything, anonymously: `[access] open = true` (`explicit`), or
    /// a loopback listener without `[access]`.
    Open { explicit: bool },
    /// A listener beyond loopback without `[access]` and without `open = true`: anyone
    /// may pull; pushes, deletes and uploads are refused.
    PullsOnly { listen: SocketAddr },
}

impl Mode {
    /// The mode of `config` served on `listen`.
    pub fn of(config: &Config, listen: SocketAddr) -> Mode {
        if config.access.is_some() {
            Mode::Checked
        } else if config.open {
            Mode::Open { explicit: true }
        } else if listen.ip().is_loopback() {
            Mode::Open { explicit: false }
        } else {
            Mode::PullsOnly { listen }
        }
    }

    /// What the start-up log says about it.
    pub fn describe(&self) -> String {
        match self {
            Mode::Checked => "checked: [auth] and [access] decide every request".into(),
            Mode::Open { explicit: true } => {
                "open: anyone may pull, push and delete ([access] open = true)".into()
            }
            Mode::Open { explicit: false } => {
                "open: anyone may pull, push and delete (loopback listener without [access])".into()
            }
            Mode::PullsOnly { .. } => "pulls only: anyone may pull; pushes and deletes are \
                 refused (listener beyond loopback without [access]; set [access] open = true \
                 to open it)"
                .into(),
        }
    }

    /// Why a push, delete or upload is refused in this mode; `None` when it is not.
    pub fn refuses_writes(&self) -> Option<String> {
        match self {
            Mode::PullsOnly { listen } => Some(format!(
                "berth listens on {listen}, beyond loopback, without an [access] section, so it \
                 serves pulls only: set `[access] open = true` to let anyone push and delete, or \
                 configure [auth] and [access] to let some users"
            )),
            _ => None,
        }
    }
}

/// Authentication and access control; `None` inside means everything is allowed.
pub struct Auth {
    access: Option<AccessConfig>,
    mode: Mode,
    users: Option<Htpasswd>,
    tokens: Option<Tokens>,
    /// The token endpoint's URL in challenges, when settled at start-up; `None` when it is
    /// built from the address each connection arrived on (never from `Host`).
    realm: Option<String>,
    /// `http` or `https`, for a realm built from a connection's address.
    scheme: &'static str,
    /// `[server] external_url`.
    external_url: Option<String>,
    listen: SocketAddr,
    /// Where API keys are kept.
    store: Option<std::sync::Arc<berth_store::Store>>,
    /// What token and API key expiry is judged by.
    clock: Clock,
    /// `[[auth.oidc]]` providers.
    oidc: Vec<Arc<crate::oidc::Provider>>,
    /// Workload tokens verified lately (by hash), with who they are and their expiry in
    /// seconds: a CI job sends its token with every request, and a signature check per
    /// blob would cost more than serving it.
    workloads: Mutex<HashMap<[u8; 32], (Identity, u64)>>,
    /// Browser sessions and logins in progress.
    pub sessions: crate::session::Sessions,
    /// Held around each read-modify-write of an API key record, so that recording a use
    /// or a login's groups cannot bring back a key revoked meanwhile.
    key_writes: Arc<Mutex<()>>,
}

/// Workload tokens remembered at most.
const MAX_WORKLOADS: usize = 10_000;
/// An API key's last use is written at most this often.
const KEY_USE_RESOLUTION_MS: u64 = 60_000;

/// The token endpoint's URL: `[auth] token.realm`, else `[server] external_url` + `/token`,
/// else the listen address (`https://` with TLS). `None` when the listen address names no
/// one address clients can use (`0.0.0.0`, `[::]`, or port 0): then the realm is built
/// from the local address each connection arrived on, which the client cannot choose.
/// A request's `Host` header is never used: a client could name any host there and send
/// others' credentials to it.
pub fn token_realm(config: &Config, listen: SocketAddr) -> Option<String> {
    if let Some(realm) = config
        .access
        .as_ref()
        .and_then(|a| a.token.as_ref())
        .and_then(|t| t.realm.clone())
    {
        return Some(realm);
    }
    match &config.server.external_url {
        Some(url) => Some(format!("{url}/token")),
        None if listen.ip().is_unspecified() || listen.port() == 0 => None,
        None => Some(format!("{}://{listen}/token", scheme(config))),
    }
}

/// `https` when berth serves TLS, else `http`.
pub(crate) fn scheme(config: &Config) -> &'static str {
    if config.server.tls.is_some() {
        "https"
    } else {
        "http"
    }
}

impl Auth {
    /// Authentication for `config` served on `listen`.
    pub fn new(
        config: &Config,
        listen: SocketAddr,
        store: Option<std::sync::Arc<berth_store::Store>>,
        clock: Clock,
    ) -> Result<Self, String> {
        let access = config.access.clone();
        let users = access
            .as_ref()
            .and_then(|a| a.htpasswd.clone())
            .map(Htpasswd::new);
        let tokens = match access.as_ref().and_then(|a| a.token.as_ref()) {
            Some(t) => Some(Tokens::load(&t.key, &t.service, t.lifetime, clock.clone())?),
            None => None,
        };
        let oidc = access
            .as_ref()
            .map(|a| a.oidc.clone())
            .unwrap_or_default()
            .into_iter()
            .map(|c| crate::oidc::Provider::new(c, clock.clone()).map(Arc::new))
            .collect::<Result<Vec<_>, String>>()?;
        let lifetime = access
            .as_ref()
            .map(AccessConfig::session_lifetime)
            .unwrap_or(berth_config::access::DEFAULT_SESSION_LIFETIME);
        Ok(Auth {
            access,
            mode: Mode::of(config, listen),
            users,
            tokens,
            realm: token_realm(config, listen),
            scheme: scheme(config),
            external_url: config.server.external_url.clone(),
            listen,
            store,
            sessions: crate::session::Sessions::new(lifetime, clock.clone()),
            clock,
            oidc,
            workloads: Mutex::new(HashMap::new()),
            key_writes: Arc::new(Mutex::new(())),
        })
    }

    /// The token service, when configured.
    pub fn tokens(&self) -> Option<&Tokens> {
        self.tokens.as_ref()
    }

    /// Who may do what.
    pub fn mode(&self) -> &Mode {
        &self.mode
    }

    /// berth's base URL for a browser whose connection arrived on `local`: `[server]
    /// external_url`, else the listen address, else `local` (never the `Host` header).
    pub fn base_url(&self, local: Option<SocketAddr>) -> String {
        match &self.external_url {
            Some(url) => url.clone(),
            None if self.listen.ip().is_unspecified() || self.listen.port() == 0 => {
                format!("{}://{}", self.scheme, local.unwrap_or(self.listen))
            }
            None => format!("{}://{}", self.scheme, self.listen),
        }
    }

    /// The token endpoint's URL for a client whose connection arrived on `local`.
    pub fn realm(&self, local: Option<SocketAddr>) -> String {
        match &self.realm {
            Some(realm) => realm.clone(),
            None => format!("{}://{}/token", self.scheme, local.unwrap_or(self.listen)),
        }
    }

    /// The longest an API key may live.
    pub fn api_key_max_lifetime(&self) -> Duration {
        self.access
            .as_ref()
            .map(AccessConfig::api_key_max_lifetime)
            .unwrap_or(berth_config::access::DEFAULT_API_KEY_MAX_LIFETIME)
    }

    /// The `WWW-Authenticate` challenge for a refused request, naming the scope it needs
    /// (`repository:team/app:pull`) when there is one.
    pub fn challenge(&self, scope: Option<&str>, local: Option<SocketAddr>) -> String {
        let Some(tokens) = &self.tokens else {
            return BASIC_CHALLENGE.to_owned();
        };
        let mut c = format!(
            "Bearer realm=\"{}\",service=\"{}\"",
            self.realm(local),
            tokens.service()
        );
        if let Some(scope) = scope {
            c.push_str(&format!(",scope=\"{scope}\""));
        }
        c
    }

    /// The user named by Basic credentials or a workload token (for the token service):
    /// `Ok(None)` without credentials.
    pub async fn login(&self, authorization: Option<&str>) -> Result<Option<Identity>, AuthError> {
        match authorization {
            None => Ok(None),
            Some(h) if h.trim_start().to_ascii_lowercase().starts_with("basic ") => {
                self.authenticate(Some(h)).await.map(Some)
            }
            Some(h) => match bearer(h).and_then(|t| self.workload_provider(t)) {
                Some(p) => self
                    .workload(&p, bearer(h).unwrap_or_default())
                    .await
                    .map(Some),
                None => Err(AuthError::BadCredentials),
            },
        }
    }

    /// Whether requests are checked at all.
    pub fn enabled(&self) -> bool {
        self.access.is_some()
    }

    /// The `[[auth.oidc]]` providers.
    pub fn providers(&self) -> &[Arc<crate::oidc::Provider>] {
        &self.oidc
    }

    /// The provider called `name`.
    pub fn provider(&self, name: &str) -> Option<&Arc<crate::oidc::Provider>> {
        self.oidc.iter().find(|p| p.config.name == name)
    }

    /// The provider that must verify `token`, when it is a JWT from an issuer that
    /// accepts workload tokens.
    fn workload_provider(&self, token: &str) -> Option<Arc<crate::oidc::Provider>> {
        if self.oidc.is_empty() {
            return None;
        }
        let iss = crate::oidc::unverified_issuer(token)?;
        self.oidc
            .iter()
            .find(|p| p.config.issuer == iss && !p.config.audiences.is_empty())
            .cloned()
    }

    /// Who a workload token is, verified by `provider` (or remembered from an earlier
    /// verification while it is valid).
    async fn workload(
        &self,
        provider: &crate::oidc::Provider,
        token: &str,
    ) -> Result<Identity, AuthError> {
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let now = self.clock.now_ms() / 1000;
        if let Some((who, exp)) = self.workloads.lock().expect("workloads").get(&key) {
            if now <= exp.saturating_add(crate::oidc::LEEWAY_SECS) {
                return Ok(who.clone());
            }
        }
        let audiences = &provider.config.audiences;
        let verified = provider
            .verify(token, crate::oidc::Audience::AnyOf(audiences))
            .await
            .and_then(|claims| {
                let exp = claims.get("exp").and_then(|v| v.as_u64()).unwrap_or(0);
                provider.identity(&claims, true).map(|id| (id, exp))
            });
        let ((name, groups), exp) = verified.map_err(|e| {
            tracing::info!(provider = %provider.config.name, reason = %e, "workload token refused");
            AuthError::Rejected(e.0)
        })?;
        let who = Identity::User {
            name,
            groups,
            grants: None,
            login: Login::Workload,
            provider: Some(provider.config.name.clone()),
        };
        let mut cache = self.workloads.lock().expect("workloads");
        if cache.len() >= MAX_WORKLOADS {
            cache.retain(|_, (_, exp)| *exp >= now);
            if cache.len() >= MAX_WORKLOADS {
                cache.clear();
            }
        }
        cache.insert(key, (who.clone(), exp));
        Ok(who)
    }

    /// The identity of a request with this `Authorization` header.
    pub async fn authenticate(&self, authorization: Option<&str>) -> Result<Identity, AuthError> {
        let Some(header) = authorization else {
            return Ok(Identity::Anonymous);
        };
        let Some(access) = &self.access else {
            // Access is open: credentials sent anyway are ignored.
            return Ok(Identity::Anonymous);
        };
        if let Some(token) = bearer(header) {
            if let Some(p) = self.workload_provider(token) {
                return self.workload(&p, token).await;
            }
            let tokens = self.tokens.as_ref().ok_or(AuthError::BadCredentials)?;
            let claims = tokens
                .verify(token)
                .map_err(|_| AuthError::BadCredentials)?;
            return match (claims.subject, claims.provider) {
                (None, _) => Ok(Identity::Anonymous),
                // A token of an OIDC user carries their groups, while the provider is
                // still configured.
                (Some(name), Some(p)) if self.provider(&p).is_some() => Ok(Identity::User {
                    name,
                    groups: claims.groups,
                    grants: Some(claims.access),
                    login: Login::Token,
                    provider: Some(p),
                }),
                (Some(_), Some(_)) => Err(AuthError::BadCredentials),
                // A user removed from the htpasswd file loses the tokens they hold.
                (Some(name), None) if !self.user_exists(&name) => Err(AuthError::BadCredentials),
                (Some(name), None) => Ok(Identity::User {
                    groups: access.groups_of(&name),
                    name,
                    grants: Some(claims.access),
                    login: Login::Token,
                    provider: None,
                }),
            };
        }
        let (user, password) = parse_basic(header).ok_or(AuthError::BadCredentials)?;
        if let Some(p) = self.workload_provider(&password) {
            // `docker login` and imagePullSecrets carry a token as a password; the user
            // name beside it says nothing the token does not.
            return self.workload(&p, &password).await;
        }
        if password.starts_with(API_KEY_PREFIX) {
            let record = self
                .verify_api_key(&user, &password)
                .await
                .ok_or(AuthError::BadCredentials)?;
            let (groups, provider) = if record.provider.is_empty() {
                (access.groups_of(&user), None)
            } else {
                (record.groups, Some(record.provider))
            };
            return Ok(Identity::User {
                name: user,
                groups,
                grants: None,
                login: Login::ApiKey,
                provider,
            });
        }
        let users = self.users.as_ref().ok_or(AuthError::BadCredentials)?;
        if !users.verify(&user, &password).await {
            return Err(AuthError::BadCredentials);
        }
        let groups = access.groups_of(&user);
        Ok(Identity::User {
            name: user,
            groups,
            grants: None,
            login: Login::Password,
            provider: None,
        })
    }

    /// The identity of a browser's `berth_session` cookie (`Cookie` header), if it names
    /// a live session whose user still exists.
    pub fn session_identity(&self, cookie_header: Option<&str>) -> Option<Identity> {
        let access = self.access.as_ref()?;
        let cookie = crate::session::cookie(cookie_header, crate::session::SESSION_COOKIE)?;
        let s = self.sessions.get(cookie)?;
        let groups = match &s.provider {
            Some(p) if self.provider(p).is_some() => s.groups,
            Some(_) => return None,
            None if self.user_exists(&s.user) => access.groups_of(&s.user),
            None => return None,
        };
        Some(Identity::User {
            name: s.user,
            groups,
            grants: None,
            login: Login::Session,
            provider: s.provider,
        })
    }

    /// Whether htpasswd users can log in (the login form shows a password form).
    pub fn has_passwords(&self) -> bool {
        self.users.is_some()
    }

    /// Checks an htpasswd user's password (the login form).
    pub async fn check_password(&self, user: &str, password: &str) -> bool {
        match &self.users {
            Some(u) => u.verify(user, password).await,
            None => false,
        }
    }

    /// Whether `user` is in the htpasswd file now.
    fn user_exists(&self, user: &str) -> bool {
        self.users.as_ref().is_some_and(|u| u.has_user(user))
    }

    /// Whether `who` is an administrator.
    pub fn is_admin(&self, who: &Identity) -> bool {
        match (&self.access, who.as_user()) {
            (None, _) => true,
            (Some(a), Some((name, groups))) => a.admin.includes(name, groups),
            (Some(_), None) => false,
        }
    }

    /// Runs `f` on the store from the blocking pool: RocksDB calls never hold up an
    /// async worker (and every other request on it).
    async fn on_store<T, F>(&self, f: F) -> Result<T, String>
    where
        T: Send + 'static,
        F: FnOnce(&berth_store::Store) -> Result<T, berth_store::StoreError> + Send + 'static,
    {
        let store = self.store.clone().ok_or("no store for API keys")?;
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| format!("store task failed: {e}"))?
            .map_err(|e| e.to_string())
    }

    /// The record of `key` (`berth_<id>_<secret>`) when it is a live API key of `user`:
    /// an htpasswd user still in the file, or a user of a provider still configured.
    /// Records its use, to the minute.
    async fn verify_api_key(&self, user: &str, key: &str) -> Option<berth_store::ApiKeyRecord> {
        let (id, secret) = key
            .strip_prefix(API_KEY_PREFIX)
            .and_then(|rest| rest.split_once('_'))?;
        let id = id.to_owned();
        let i = id.clone();
        let record = self
            .on_store(move |s| s.meta.get_api_key(&i))
            .await
            .ok()??;
        let hash: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
        let owner_ok = if record.provider.is_empty() {
            self.user_exists(user)
        } else {
            self.provider(&record.provider).is_some()
        };
        let now = self.clock.now_ms();
        let valid =
            crate::session::same_secret(&hex::encode(hash), &hex::encode(record.secret_sha256))
                && record.owner == user
                && now < record.expires_ms
                && owner_ok;
        if !valid {
            return None;
        }
        if now.saturating_sub(record.last_used_ms) >= KEY_USE_RESOLUTION_MS {
            let _ = self
                .update_api_keys(
                    move |_, r| {
                        r.last_used_ms = now;
                        true
                    },
                    Some(id),
                )
                .await;
        }
        Some(record)
    }

    /// Runs `change` on API key records (`only` one id, or all), writing back those it
    /// changed, under the lock that orders key writes.
    async fn update_api_keys<F>(&self, change: F, only: Option<String>) -> Result<usize, String>
    where
        F: Fn(&str, &mut berth_store::ApiKeyRecord) -> bool + Send + 'static,
    {
        let lock = self.key_writes.clone();
        self.on_store(move |s| {
            let _held = lock.lock().expect("key writes");
            let records = match only {
                Some(id) => s
                    .meta
                    .get_api_key(&id)?
                    .map(|r| (id, r))
                    .into_iter()
                    .collect(),
                None => s.meta.api_keys()?,
            };
            let mut changed = 0;
            for (id, mut r) in records {
                if change(&id, &mut r) {
                    s.meta.put_api_key(&id, &r)?;
                    changed += 1;
                }
            }
            Ok(changed)
        })
        .await
    }

    /// Gives `owner`'s API keys made through `provider` the groups of their latest login
    /// (see the README: what a key may do follows its owner's latest login).
    pub async fn refresh_key_groups(
        &self,
        owner: &str,
        provider: &str,
        groups: &[String],
    ) -> Result<usize, String> {
        let (owner, provider, groups) = (owner.to_owned(), provider.to_owned(), groups.to_vec());
        self.update_api_keys(
            move |_, r| {
                let mine = r.owner == owner && r.provider == provider;
                let stale = r.groups != groups;
                if mine && stale {
                    r.groups = groups.clone();
                }
                mine && stale
            },
            None,
        )
        .await
    }

    /// Makes an API key for `owner`; returns its id and the key (shown once). `who` is
    /// who asks: a key made by its owner carries the owner's OIDC provider and groups.
    pub async fn create_api_key(
        &self,
        owner: &str,
        who: &Identity,
        name: &str,
        lifetime: Duration,
    ) -> Result<(String, String, berth_store::ApiKeyRecord), String> {
        let (provider, groups) = match who {
            Identity::User {
                name: me,
                groups,
                provider: Some(p),
                ..
            } if me == owner => (p.clone(), groups.clone()),
            _ => (String::new(), Vec::new()),
        };
        let id = random_hex(8)?;
        let secret = random_hex(32)?;
        let now = self.clock.now_ms();
        let record = berth_store::ApiKeyRecord {
            owner: owner.to_owned(),
            name: name.to_owned(),
            secret_sha256: Sha256::digest(secret.as_bytes()).into(),
            created_ms: now,
            expires_ms: now.saturating_add(lifetime.as_millis() as u64),
            provider,
            groups,
            last_used_ms: 0,
        };
        let (i, r) = (id.clone(), record.clone());
        self.on_store(move |s| s.meta.put_api_key(&i, &r)).await?;
        Ok((id.clone(), format!("{API_KEY_PREFIX}{id}_{secret}"), record))
    }

    /// The API keys `who` may see: their own, or every key for an administrator.
    pub async fn api_keys(
        &self,
        who: &Identity,
    ) -> Result<Vec<(String, berth_store::ApiKeyRecord)>, String> {
        let all = self.on_store(|s| s.meta.api_keys()).await?;
        let admin = self.is_admin(who);
        Ok(all
            .into_iter()
            .filter(|(_, r)| admin || Some(r.owner.as_str()) == who.as_user().map(|u| u.0))
            .collect())
    }

    /// Revokes key `id` if `who` may see it; returns whether it did.
    pub async fn revoke_api_key(&self, who: &Identity, id: &str) -> Result<bool, String> {
        if !self.api_keys(who).await?.iter().any(|(k, _)| k == id) {
            return Ok(false);
        }
        let id = id.to_owned();
        let lock = self.key_writes.clone();
        self.on_store(move |s| {
            let _held = lock.lock().expect("key writes");
            s.meta.delete_api_key(&id)
        })
        .await?;
        Ok(true)
    }

    /// Whether `who` may do `action` on the repository at `path`.
    pub fn allows(&self, who: &Identity, path: &str, action: Action) -> bool {
        let Some(a) = &self.access else {
            return true;
        };
        if let Identity::User {
            grants: Some(grants),
            ..
        } = who
        {
            // A token opens only what it names (the policies still decide within that).
            let needed = token_action(action);
            let granted = grants.iter().any(|g| {
                g.kind == "repository"
                    && g.name == path
                    && g.actions.iter().any(|x| x == needed || x == "*")
            });
            if !granted {
                return false;
            }
        }
        a.allows(who.as_user(), path, action)
    }

    pub fn allows_metrics(&self, who: &Identity) -> bool {
        match &self.access {
            None => true,
            Some(a) => a.allows_metrics(who.as_user()),
        }
    }

    /// Whether a request without credentials may read some repository (and so has a
    /// catalog to see).
    pub fn anonymous_may_read(&self) -> bool {
        self.access.as_ref().is_none_or(|a| {
            a.repositories
                .iter()
                .any(|r| r.anonymous.contains(&Action::Read))
        })
    }

    /// Whether a request without credentials may do anything.
    pub fn anonymous_can_do_anything(&self) -> bool {
        self.access
            .as_ref()
            .is_none_or(AccessConfig::anonymous_can_do_anything)
    }
}

/// Failed logins per client address: each costs a delay, and more than
/// [`MAX_FAILURES`] within [`FAILURE_WINDOW`] block that address's credentials until the
/// window ends (`429 TOOMANYREQUESTS`), so passwords cannot be guessed at speed.
pub struct LoginLimiter {
    failures: Mutex<HashMap<std::net::IpAddr, (Instant, u32)>>,
}

/// Failed logins an address may make per window.
pub const MAX_FAILURES: u32 = 10;
/// The window of [`MAX_FAILURES`].
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// How long a failed login waits before its answer.
pub const FAILURE_DELAY: Duration = Duration::from_millis(250);
/// Addresses remembered at most (the oldest windows are dropped first).
const MAX_TRACKED: usize = 10_000;

impl Default for LoginLimiter {
    fn default() -> Self {
        LoginLimiter {
            failures: Mutex::new(HashMap::new()),
        }
    }
}

impl LoginLimiter {
    /// Whether `ip` is blocked now.
    pub fn blocked(&self, ip: std::net::IpAddr) -> bool {
        let map = self.failures.lock().expect("login limiter");
        map.get(&ip)
            .is_some_and(|(start, n)| start.elapsed() < FAILURE_WINDOW && *n >= MAX_FAILURES)
    }

    /// Records a failed login from `ip`.
    pub fn failed(&self, ip: std::net::IpAddr) {
        let mut map = self.failures.lock().expect("login limiter");
        if map.len() >= MAX_TRACKED {
            map.retain(|_, (start, _)| start.elapsed() < FAILURE_WINDOW);
        }
        let entry = map.entry(ip).or_insert((Instant::now(), 0));
        if entry.0.elapsed() >= FAILURE_WINDOW {
            *entry = (Instant::now(), 0);
        }
        entry.1 += 1;
    }
}

/// How an API key starts: `berth_<id>_<secret>`.
pub const API_KEY_PREFIX: &str = "berth_";

/// The challenge that asks for a user name and password.
pub const BASIC_CHALLENGE: &str = "Basic realm=\"berth\"";

/// The token action that covers `action`.
pub fn token_action(action: Action) -> &'static str {
    match action {
        Action::Read => "pull",
        Action::Create | Action::Update => "push",
        Action::Delete => "delete",
    }
}

/// The token of `Bearer <token>`.
fn bearer(header: &str) -> Option<&str> {
    let (scheme, rest) = header.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
}

/// Standard base64, padded or not (clients differ).
const BASIC: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    base64::engine::GeneralPurposeConfig::new()
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);

/// `Basic base64(user:password)`.
fn parse_basic(header: &str) -> Option<(String, String)> {
    let (scheme, rest) = header.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::Engine::decode(&BASIC, rest.trim()).ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

/// Users from an htpasswd file, re-read when it changes. The file is looked at from a
/// thread of its own, never from a request: a slow disk holds up no async worker.
struct Htpasswd {
    state: Arc<Mutex<HtpasswdState>>,
}

#[derive(Default)]
struct HtpasswdState {
    modified: Option<SystemTime>,
    /// Counts the versions of the file loaded, so that a check against an older version
    /// is not remembered for a newer one.
    generation: u64,
    hashes: HashMap<String, String>,
    /// sha256 of `user:password` for credentials verified against this version.
    verified: HashSet<[u8; 32]>,
}

/// How often the file's modification time is looked at.
const RELOAD_CHECK: Duration = Duration::from_secs(1);

impl Htpasswd {
    /// Loads the file, and watches it for as long as the returned value lives.
    fn new(path: PathBuf) -> Self {
        let state = Arc::new(Mutex::new(HtpasswdState::default()));
        reload(&path, &state);
        let weak = Arc::downgrade(&state);
        let watcher = std::thread::Builder::new()
            .name("berth-htpasswd".into())
            .spawn(move || loop {
                std::thread::sleep(RELOAD_CHECK);
                let Some(state) = weak.upgrade() else {
                    return;
                };
                reload(&path, &state);
            });
        if let Err(e) = watcher {
            tracing::error!(error = %e, "cannot watch the htpasswd file: changes to it need a restart");
        }
        Htpasswd { state }
    }

    /// Whether `user` is in the current version of the file.
    fn has_user(&self, user: &str) -> bool {
        let state = self.state.lock().expect("htpasswd");
        state.hashes.contains_key(user)
    }

    /// Whether `password` is `user`'s. bcrypt runs on the blocking pool: it takes a
    /// worker thread's time on purpose, and the other requests on that thread must not
    /// wait for it.
    async fn verify(&self, user: &str, password: &str) -> bool {
        let key: [u8; 32] = Sha256::digest(format!("{user}:{password}").as_bytes()).into();
        let (hash, generation) = {
            let state = self.state.lock().expect("htpasswd");
            if state.verified.contains(&key) {
                return true;
            }
            (state.hashes.get(user).cloned(), state.generation)
        };
        // An unknown user costs a bcrypt check too, so timing does not tell users apart.
        let known = hash.is_some();
        let hash = hash.unwrap_or_else(|| DUMMY_HASH.to_owned());
        let password = password.to_owned();
        let ok = tokio::task::spawn_blocking(move || bcrypt::verify(password, &hash))
            .await
            .is_ok_and(|r| r.unwrap_or(false))
            && known;
        if ok {
            let mut state = self.state.lock().expect("htpasswd");
            if state.generation == generation {
                state.verified.insert(key);
            }
        }
        ok
    }
}

/// Reads `path` again if its modification time changed (the file is read and parsed
/// before the lock is taken).
fn reload(path: &Path, state: &Mutex<HtpasswdState>) {
    let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let loaded = state.lock().expect("htpasswd").modified;
    if modified.is_some() && modified == loaded {
        return;
    }
    match read_htpasswd(path) {
        Ok(hashes) => {
            tracing::info!(path = %path.display(), users = hashes.len(), "htpasswd loaded");
            let mut state = state.lock().expect("htpasswd");
            *state = HtpasswdState {
                modified,
                generation: state.generation + 1,
                hashes,
                verified: HashSet::new(),
            };
        }
        Err(e) => {
            tracing::error!(path = %path.display(), error = %e,
                "cannot read the htpasswd file; keeping the users loaded before");
        }
    }
}

/// A bcrypt hash no password is checked against successfully (see `verify`).
const DUMMY_HASH: &str = "$2y$05$CCCCCCCCCCCCCCCCCCCCC.E5YPO9kmyuRGyh0XouQYb4YMJKvyOeW";

/// `user:hash` lines; blank lines and `#` comments are skipped. Only bcrypt hashes are
/// accepted: berth refuses to check passwords against weaker ones.
fn read_htpasswd(path: &Path) -> Result<HashMap<String, String>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let mut users = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (user, hash) = line
            .split_once(':')
            .ok_or_else(|| format!("line {}: not user:hash", i + 1))?;
        if !(hash.starts_with("$2y$") || hash.starts_with("$2b$") || hash.starts_with("$2a$")) {
            return Err(format!(
                "line {}: user {user:?} does not have a bcrypt hash (write it with htpasswd -B)",
                i + 1
            ));
        }
        users.insert(user.to_owned(), hash.to_owned());
    }
    Ok(users)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_credentials_decode() {
        // "alice:s3cr:et" — a password may contain ':'.
        assert_eq!(
            parse_basic("Basic YWxpY2U6czNjcjpldA=="),
            Some(("alice".into(), "s3cr:et".into()))
        );
        assert_eq!(parse_basic("basic YTpi"), Some(("a".into(), "b".into())));
        assert_eq!(parse_basic("Bearer abc"), None);
        assert_eq!(parse_basic("Basic !!!"), None);
        assert_eq!(parse_basic("Basic YWJj"), None, "no ':'");
    }

    #[tokio::test]
    async fn htpasswd_users_verify_and_reload() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("htpasswd");
        let hash = bcrypt::hash("pw1", 4).unwrap();
        std::fs::write(&path, format!("# users\nalice:{hash}\n")).unwrap();
        let h = Htpasswd::new(path.clone());
        assert!(h.verify("alice", "pw1").await);
        assert!(h.verify("alice", "pw1").await, "remembered");
        assert!(!h.verify("alice", "pw2").await);
        assert!(!h.verify("bob", "pw1").await);
        // Replaced: alice's old password stops working once the change is seen.
        std::thread::sleep(Duration::from_millis(20));
        let bob = bcrypt::hash("pw3", 4).unwrap();
        std::fs::write(&path, format!("bob:{bob}\n")).unwrap();
        let later = SystemTime::now() + Duration::from_secs(5);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(later)
            .unwrap();
        // The watcher looks once a second.
        for _ in 0..100 {
            if !h.has_user("alice") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(!h.verify("alice", "pw1").await);
        assert!(!h.has_user("alice"), "removed");
        assert!(h.verify("bob", "pw3").await);
        assert!(h.has_user("bob"));
    }

    #[test]
    fn modes_and_realms() {
        let local: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:5000".parse().unwrap();
        let plain = Config::parse("").unwrap();
        assert_eq!(Mode::of(&plain, local), Mode::Open { explicit: false });
        assert_eq!(Mode::of(&plain, any), Mode::PullsOnly { listen: any });
        assert!(Mode::of(&plain, any)
            .refuses_writes()
            .unwrap()
            .contains("[access] open = true"));
        let open = Config::parse("[access]\nopen = true\n").unwrap();
        assert_eq!(Mode::of(&open, any), Mode::Open { explicit: true });
        assert_eq!(Mode::of(&open, any).refuses_writes(), None);
        let checked = Config::parse("[access]\n").unwrap();
        assert_eq!(Mode::of(&checked, any), Mode::Checked);

        let token = "[auth]\ntoken = { key = \"/k\" }\n[access]\n";
        let c = Config::parse(token).unwrap();
        assert_eq!(
            token_realm(&c, local).unwrap(),
            "http://127.0.0.1:5000/token"
        );
        // No one address to name: built from each connection's local address instead.
        assert_eq!(token_realm(&c, "127.0.0.1:0".parse().unwrap()), None);
        assert_eq!(token_realm(&c, "0.0.0.0:5000".parse().unwrap()), None);
        let tls = format!("[server]\ntls = {{ cert = \"/c\", key = \"/k\" }}\n{token}");
        let c = Config::parse(&tls).unwrap();
        assert_eq!(
            token_realm(&c, local).unwrap(),
            "https://127.0.0.1:5000/token"
        );
        let ext = format!("[server]\nexternal_url = \"https://berth.example:5000\"\n{token}");
        let c = Config::parse(&ext).unwrap();
        assert_eq!(
            token_realm(&c, local).unwrap(),
            "https://berth.example:5000/token"
        );
        let set = token.replace(
            "key = \"/k\"",
            "key = \"/k\", realm = \"https://r.example/t\"",
        );
        let c = Config::parse(&set).unwrap();
        assert_eq!(token_realm(&c, local).unwrap(), "https://r.example/t");
    }

    #[test]
    fn weak_hashes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("htpasswd");
        std::fs::write(&path, "alice:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\n").unwrap();
        let e = read_htpasswd(&path).unwrap_err();
        assert!(e.contains("htpasswd -B"), "{e}");
    }
}
