//! Browser logins and the API-key page.
//!
//! - `GET /login`: a form for htpasswd users and a link per `[[auth.oidc]]` provider;
//!   `POST /login` checks the form's user name and password.
//! - `GET /login/oidc/<name>`: the authorization-code flow with PKCE (S256) and a nonce:
//!   berth remembers the login under a random `state`, ties it to the browser with the
//!   `berth_login` cookie, and sends the browser to the provider.
//! - `GET /login/callback`: the provider sends the browser back with a code; berth checks
//!   that the state is this browser's, exchanges the code (with the PKCE verifier and the
//!   client secret), verifies the ID token (signature, issuer, audience, expiry, nonce),
//!   takes the user name and groups from its claims, and starts a session: the
//!   `berth_session` cookie (HttpOnly, SameSite=Lax, Secure when berth is reached over
//!   HTTPS).
//! - `POST /logout` ends the session.
//! - `/ui/keys`: a logged-in user makes API keys (shown once), lists them (created, last
//!   used, expires, groups) and revokes them; an administrator sees everyone's.
//!
//! Every form carries a CSRF token and every POST must return it: the session's own, or,
//! on the login form (before there is a session), the value of the `berth_form` cookie.
//! A session authenticates berth's pages only, never the registry API, so a page of
//! another site cannot push or delete through a logged-in browser.
//!
//! An OIDC login also gives its user's API keys made through the same provider the groups
//! of this login (see the README on what groups a key carries).

use std::time::Duration;

use askama::Template;
use base64::Engine as _;
use pingora::protocols::http::ServerSession;
use sha2::{Digest as _, Sha256};

use crate::auth::{Identity, Login};
use crate::errors::{ApiError, Code};
use crate::server::{App, Request, Served};
use crate::session::{
    cookie, same_secret, set_cookie, PendingLogin, FORM_COOKIE, LOGIN_COOKIE, SESSION_COOKIE,
};
use crate::token::random_hex;
use crate::ui::{human_time, render, see_other, Layout};

/// A page of this module.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LoginRoute {
    /// `/login`.
    Page,
    /// `/login/oidc/<name>`.
    Oidc(String),
    /// `/login/callback`.
    Callback,
    /// `/logout`.
    Logout,
    /// `/ui/keys`.
    Keys,
    /// `/ui/keys/<id>/revoke`.
    Revoke(String),
}

/// The page `path` names, if it is one of this module's.
pub fn parse(path: &str) -> Option<LoginRoute> {
    Some(match path {
        "/login" => LoginRoute::Page,
        "/login/callback" => LoginRoute::Callback,
        "/logout" => LoginRoute::Logout,
        "/ui/keys" | "/ui/keys/" => LoginRoute::Keys,
        _ => {
            if let Some(name) = path.strip_prefix("/login/oidc/") {
                LoginRoute::Oidc(name.to_owned())
            } else {
                let id = path.strip_prefix("/ui/keys/")?.strip_suffix("/revoke")?;
                if id.is_empty() || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return None;
                }
                LoginRoute::Revoke(id.to_owned())
            }
        }
    })
}

/// The path and query of a request whose `Cookie` header berth's pages read.
pub fn reads_cookies(path: &str) -> bool {
    path == "/"
        || path == "/ui"
        || path.starts_with("/ui/")
        || path.starts_with("/login")
        || path == "/logout"
}

#[derive(Template)]
#[template(path = "login.html")]
struct LoginPage<'a> {
    layout: Layout,
    error: Option<&'a str>,
    /// Each provider with browser logins: (name, link, display name).
    providers: Vec<(String, String, String)>,
    passwords: bool,
    form_csrf: &'a str,
    next: &'a str,
}

#[derive(Template)]
#[template(path = "message.html")]
struct MessagePage<'a> {
    layout: Layout,
    message: &'a str,
    link: (&'a str, &'a str),
}

struct KeyRow {
    id: String,
    owner: String,
    name: String,
    created: String,
    last_used: String,
    expires: String,
    expired: bool,
    groups: String,
}

#[derive(Template)]
#[template(path = "keys.html")]
struct KeysPage<'a> {
    layout: Layout,
    user: &'a str,
    groups: String,
    source: &'a str,
    admin: bool,
    keys: Vec<KeyRow>,
    new_key: Option<(String, String)>,
    error: Option<String>,
    max_days: u64,
    default_days: u64,
}

/// Where a browser goes after logging in: a path on berth, else the status page (never
/// another site).
fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(n) if n.starts_with('/') && !n.starts_with("//") && !n.contains('\\') => n.to_owned(),
        _ => "/ui".to_owned(),
    }
}

/// The `next` query parameter of `req`, made safe.
fn next_param(req: &Request) -> String {
    let q = req.query.as_deref();
    safe_next(
        q.and_then(|q| crate::route::query_param(q, "next"))
            .as_deref(),
    )
}

/// The fields of a form body.
fn form(body: &[u8]) -> Vec<(String, String)> {
    form_urlencoded::parse(body).into_owned().collect()
}

fn field<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

impl App {
    /// Serves one of this module's pages.
    pub(crate) async fn login_pages(
        &self,
        session: &mut ServerSession,
        req: &Request,
        who: &Identity,
        route: &LoginRoute,
    ) -> Result<Served, ApiError> {
        if !self.auth.enabled() {
            return Err(ApiError::new(
                Code::NotFound,
                "this berth has no users ([auth] and [access] are not configured): there is nothing to log in to",
            ));
        }
        match (route, req.method.as_str()) {
            (LoginRoute::Page, "GET" | "HEAD") => self.login_page(session, req, None, 200).await,
            (LoginRoute::Page, "POST") => self.password_login(session, req).await,
            (LoginRoute::Oidc(name), "GET") => self.oidc_start(session, req, name).await,
            (LoginRoute::Callback, "GET") => self.oidc_callback(session, req).await,
            (LoginRoute::Logout, "POST") => self.logout(session, req).await,
            (LoginRoute::Keys, "GET" | "HEAD") => self.keys_page(session, req, who, None).await,
            (LoginRoute::Keys, "POST") => self.create_key(session, req, who).await,
            (LoginRoute::Revoke(id), "POST") => self.revoke_key(session, req, who, id).await,
            _ => Err(ApiError::new(
                Code::Unsupported,
                format!("{} is not supported on {}", req.method, req.path),
            )),
        }
    }

    /// The base URL berth is reached at by the browser: `[server] external_url`, else the
    /// address the connection arrived on (never the `Host` header).
    fn base_url(&self, req: &Request) -> String {
        self.auth.base_url(req.local)
    }

    /// Whether cookies get `Secure`: berth is reached over HTTPS.
    fn secure_cookies(&self, req: &Request) -> bool {
        self.base_url(req).starts_with("https://")
    }

    /// The request's browser session (its cookie's value, and the session), if live.
    fn browser_session(&self, req: &Request) -> Option<(String, crate::session::Session)> {
        let value = cookie(req.cookie.as_deref(), SESSION_COOKIE)?;
        Some((value.to_owned(), self.auth.sessions.get(value)?))
    }

    /// The CSRF token of the request's browser session, for the forms of a page.
    pub(crate) fn session_csrf(&self, req: &Request) -> Option<String> {
        self.browser_session(req).map(|(_, s)| s.csrf)
    }

    /// The layout of a page for the request's session.
    fn layout(&self, title: &str, req: &Request) -> Layout {
        let s = self.browser_session(req).map(|(_, s)| s);
        Layout {
            title: title.to_owned(),
            user: s.as_ref().map(|s| s.user.clone()),
            csrf: s.map(|s| s.csrf),
        }
    }

    async fn message(
        &self,
        session: &mut ServerSession,
        req: &Request,
        status: u16,
        title: &str,
        message: &str,
    ) -> Result<Served, ApiError> {
        let html = render(&MessagePage {
            layout: self.layout(title, req),
            message,
            link: ("/login", "Log in again"),
        })?;
        Ok(self.send_html(session, req, status, html, Vec::new()).await)
    }

    async fn login_page(
        &self,
        session: &mut ServerSession,
        req: &Request,
        error: Option<&str>,
        status: u16,
    ) -> Result<Served, ApiError> {
        // The login form's CSRF token: the berth_form cookie's value, made once.
        let existing = cookie(req.cookie.as_deref(), FORM_COOKIE).map(str::to_owned);
        let token = match existing.clone() {
            Some(t) => t,
            None => random_hex(16).map_err(|e| ApiError::new(Code::Internal, e))?,
        };
        let next = next_param(req);
        let providers = self
            .auth
            .providers()
            .iter()
            .filter(|p| p.config.browser_login())
            .map(|p| {
                let href_next: String = form_urlencoded::byte_serialize(next.as_bytes()).collect();
                (
                    p.config.name.clone(),
                    format!("/login/oidc/{}?next={href_next}", p.config.name),
                    p.config.display_name.clone(),
                )
            })
            .collect();
        let html = render(&LoginPage {
            layout: self.layout("Log in", req),
            error,
            providers,
            passwords: self.auth.has_passwords(),
            form_csrf: &token,
            next: &next,
        })?;
        let mut headers = Vec::new();
        if existing.is_none() {
            let c = set_cookie(
                FORM_COOKIE,
                &token,
                "/login",
                Duration::from_secs(3600),
                self.secure_cookies(req),
            );
            headers.push(("Set-Cookie", c));
        }
        Ok(self.send_html(session, req, status, html, headers).await)
    }

    async fn password_login(
        &self,
        session: &mut ServerSession,
        req: &Request,
    ) -> Result<Served, ApiError> {
        let fields = form(&crate::private::read_body(session, 16 << 10).await?);
        let expected = cookie(req.cookie.as_deref(), FORM_COOKIE);
        let sent = field(&fields, "csrf");
        if !matches!((expected, sent), (Some(a), Some(b)) if same_secret(a, b)) {
            return self
                .login_page(session, req, Some("The form expired: log in again."), 400)
                .await;
        }
        if req.client_ip.is_some_and(|ip| self.logins.blocked(ip)) {
            let why = format!(
                "Too many failed logins from this address: try again in {} s.",
                crate::auth::FAILURE_WINDOW.as_secs()
            );
            return self.login_page(session, req, Some(&why), 429).await;
        }
        let user = field(&fields, "username").unwrap_or("");
        let password = field(&fields, "password").unwrap_or("");
        if user.is_empty() || !self.auth.check_password(user, password).await {
            if let Some(ip) = req.client_ip {
                self.logins.failed(ip);
            }
            tokio::time::sleep(crate::auth::FAILURE_DELAY).await;
            return self
                .login_page(session, req, Some("Wrong user name or password."), 401)
                .await;
        }
        let value = self
            .auth
            .sessions
            .create(user, Vec::new(), None)
            .map_err(|e| ApiError::new(Code::Internal, e))?;
        tracing::info!(user = %user, "browser login (htpasswd)");
        let c = self.session_cookie(req, &value);
        let next = safe_next(field(&fields, "next"));
        Ok(see_other(session, req, &next, vec![c]).await)
    }

    fn session_cookie(&self, req: &Request, value: &str) -> String {
        set_cookie(
            SESSION_COOKIE,
            value,
            "/",
            self.auth.sessions.lifetime(),
            self.secure_cookies(req),
        )
    }

    async fn oidc_start(
        &self,
        session: &mut ServerSession,
        req: &Request,
        name: &str,
    ) -> Result<Served, ApiError> {
        let Some(provider) = self
            .auth
            .provider(name)
            .filter(|p| p.config.browser_login())
        else {
            return self
                .message(
                    session,
                    req,
                    404,
                    "Log in",
                    &format!("There is no identity provider {name:?} to log in with here."),
                )
                .await;
        };
        let internal = |e: String| ApiError::new(Code::Internal, e);
        let state = random_hex(16).map_err(internal)?;
        let nonce = random_hex(16).map_err(internal)?;
        let verifier = random_hex(32).map_err(internal)?;
        let challenge = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(Sha256::digest(verifier.as_bytes()));
        let redirect_uri = format!("{}/login/callback", self.base_url(req));
        let url = match provider
            .authorization_url(&redirect_uri, &state, &nonce, &challenge)
            .await
        {
            Ok(u) => u,
            Err(e) => {
                return self
                    .message(
                        session,
                        req,
                        502,
                        "Log in",
                        &format!("Logging in is not possible now: {e}."),
                    )
                    .await
            }
        };
        let next = next_param(req);
        self.auth.sessions.start_login(
            &state,
            PendingLogin {
                provider: name.to_owned(),
                nonce,
                verifier,
                redirect_uri,
                next,
                expires_ms: self.auth.sessions.login_expiry(),
            },
        );
        let c = set_cookie(
            LOGIN_COOKIE,
            &state,
            "/login",
            crate::session::LOGIN_TIMEOUT,
            self.secure_cookies(req),
        );
        Ok(see_other(session, req, &url, vec![c]).await)
    }

    async fn oidc_callback(
        &self,
        session: &mut ServerSession,
        req: &Request,
    ) -> Result<Served, ApiError> {
        let q = req.query.as_deref().unwrap_or("");
        let param = |k| crate::route::query_param(q, k);
        let state = param("state").unwrap_or_default();
        let mine = cookie(req.cookie.as_deref(), LOGIN_COOKIE);
        let pending = match mine {
            Some(c) if !state.is_empty() && same_secret(c, &state) => {
                self.auth.sessions.finish_login(&state)
            }
            _ => None,
        };
        let Some(pending) = pending else {
            return self
                .message(session, req, 400, "Log in", "This login was not started in this browser, or it took longer than 10 minutes, or it was already used: log in again.")
                .await;
        };
        let clear = set_cookie(
            LOGIN_COOKIE,
            "",
            "/login",
            Duration::ZERO,
            self.secure_cookies(req),
        );
        if let Some(error) = param("error") {
            let detail = param("error_description").unwrap_or_default();
            tracing::info!(provider = %pending.provider, error = %error, "the identity provider refused a login");
            let msg = format!("The identity provider refused the login: {error} {detail}");
            return self
                .message(session, req, 401, "Log in", msg.trim_end())
                .await;
        }
        let Some(provider) = self.auth.provider(&pending.provider).cloned() else {
            return self
                .message(
                    session,
                    req,
                    400,
                    "Log in",
                    "That identity provider is no longer configured.",
                )
                .await;
        };
        let code = param("code").unwrap_or_default();
        let result = provider
            .exchange(
                &code,
                &pending.verifier,
                &pending.redirect_uri,
                &pending.nonce,
            )
            .await
            .and_then(|claims| provider.identity(&claims, false));
        let (user, groups) = match result {
            Ok(id) => id,
            Err(e) => {
                tracing::warn!(provider = %pending.provider, error = %e, "OIDC login failed");
                return self
                    .message(
                        session,
                        req,
                        401,
                        "Log in",
                        &format!("The login did not succeed: {e}."),
                    )
                    .await;
            }
        };
        let value = self
            .auth
            .sessions
            .create(&user, groups.clone(), Some(pending.provider.clone()))
            .map_err(|e| ApiError::new(Code::Internal, e))?;
        match self
            .auth
            .refresh_key_groups(&user, &pending.provider, &groups)
            .await
        {
            Ok(n) => tracing::info!(user = %user, provider = %pending.provider,
                groups = %groups.join(","), keys_updated = n, "browser login (OIDC)"),
            Err(e) => tracing::warn!(user = %user, error = %e,
                "browser login (OIDC): the groups of the user's API keys were not updated"),
        }
        let c = self.session_cookie(req, &value);
        Ok(see_other(session, req, &pending.next, vec![c, clear]).await)
    }

    /// The session of the request when the form's CSRF token is the session's.
    fn checked_session(
        &self,
        req: &Request,
        fields: &[(String, String)],
    ) -> Option<(String, crate::session::Session)> {
        let (value, s) = self.browser_session(req)?;
        let sent = field(fields, "csrf")?;
        same_secret(sent, &s.csrf).then_some((value, s))
    }

    async fn logout(&self, session: &mut ServerSession, req: &Request) -> Result<Served, ApiError> {
        let fields = form(&crate::private::read_body(session, 16 << 10).await?);
        if let Some((value, s)) = self.checked_session(req, &fields) {
            self.auth.sessions.remove(&value);
            tracing::info!(user = %s.user, "browser logout");
        }
        let c = set_cookie(
            SESSION_COOKIE,
            "",
            "/",
            Duration::ZERO,
            self.secure_cookies(req),
        );
        Ok(see_other(session, req, "/ui", vec![c]).await)
    }

    /// The longest lifetime a key may have, in whole days, and the default.
    fn key_days(&self) -> (u64, u64) {
        let max = (self.auth.api_key_max_lifetime().as_secs() / 86_400).max(1);
        (max, max.min(90))
    }

    async fn keys_page(
        &self,
        session: &mut ServerSession,
        req: &Request,
        who: &Identity,
        outcome: Option<Result<(String, String), String>>,
    ) -> Result<Served, ApiError> {
        let Identity::User {
            name,
            groups,
            login: Login::Session,
            provider,
            ..
        } = who
        else {
            return Ok(see_other(session, req, "/login?next=/ui/keys", Vec::new()).await);
        };
        let (new_key, error) = match outcome {
            Some(Ok(made)) => (Some(made), None),
            Some(Err(e)) => (None, Some(e)),
            None => (None, None),
        };
        let now = self.cache.now_ms();
        let mut keys: Vec<KeyRow> = self
            .auth
            .api_keys(who)
            .await
            .map_err(|e| ApiError::new(Code::Internal, e))?
            .into_iter()
            .map(|(id, r)| KeyRow {
                id,
                owner: r.owner,
                name: r.name,
                created: human_time(r.created_ms),
                last_used: if r.last_used_ms == 0 {
                    "never".into()
                } else {
                    human_time(r.last_used_ms)
                },
                expires: human_time(r.expires_ms),
                expired: r.expires_ms <= now,
                groups: if r.provider.is_empty() {
                    "[auth.groups], at each use".into()
                } else {
                    r.groups.join(", ")
                },
            })
            .collect();
        keys.sort_by(|a, b| (&a.owner, &a.created).cmp(&(&b.owner, &b.created)));
        let (max_days, default_days) = self.key_days();
        let status = if error.is_some() { 400 } else { 200 };
        let html = render(&KeysPage {
            layout: self.layout("API keys", req),
            user: name,
            groups: groups.join(", "),
            source: match provider {
                Some(p) => p,
                None => "htpasswd",
            },
            admin: self.auth.is_admin(who),
            keys,
            new_key,
            error,
            max_days,
            default_days,
        })?;
        Ok(self.send_html(session, req, status, html, Vec::new()).await)
    }

    async fn create_key(
        &self,
        session: &mut ServerSession,
        req: &Request,
        who: &Identity,
    ) -> Result<Served, ApiError> {
        let fields = form(&crate::private::read_body(session, 16 << 10).await?);
        let Some((_, s)) = self.checked_session(req, &fields) else {
            return self.message(session, req, 403, "API keys", "The form expired or was not sent from this page: open the API-key page and try again.").await;
        };
        let key_name = field(&fields, "name").unwrap_or("").trim().to_owned();
        let (max_days, default_days) = self.key_days();
        let days = match field(&fields, "expires_in_days").map(str::trim) {
            None | Some("") => Ok(default_days),
            Some(d) => match d.parse::<u64>() {
                Ok(0) | Err(_) => Err(format!("Expiry: {d:?} is not a whole number of days (1 to {max_days}).")),
                Ok(n) if n > max_days => Err(format!(
                    "Expiry: keys live at most {max_days} days here ([auth] api_key_max_lifetime); ask for {max_days} or fewer."
                )),
                Ok(n) => Ok(n),
            },
        };
        let days = match (days, key_name.is_empty(), key_name.len() > 200) {
            (Err(e), _, _) => Err(e),
            (_, true, _) => {
                Err("Name: give the key a name, such as the CI job that will use it.".to_owned())
            }
            (_, _, true) => Err("Name: at most 200 characters.".to_owned()),
            (Ok(d), _, _) => Ok(d),
        };
        let days = match days {
            Ok(d) => d,
            Err(e) => return self.keys_page(session, req, who, Some(Err(e))).await,
        };
        let lifetime = Duration::from_secs(days * 86_400).min(self.auth.api_key_max_lifetime());
        let (id, key, _) = self
            .auth
            .create_api_key(&s.user, who, &key_name, lifetime)
            .await
            .map_err(|e| ApiError::new(Code::Internal, e))?;
        tracing::info!(id = %id, owner = %s.user, "API key created on the page");
        self.keys_page(session, req, who, Some(Ok((key, s.user))))
            .await
    }

    async fn revoke_key(
        &self,
        session: &mut ServerSession,
        req: &Request,
        who: &Identity,
        id: &str,
    ) -> Result<Served, ApiError> {
        let fields = form(&crate::private::read_body(session, 16 << 10).await?);
        let Some((_, s)) = self.checked_session(req, &fields) else {
            return self.message(session, req, 403, "API keys", "The form expired or was not sent from this page: open the API-key page and try again.").await;
        };
        match self.auth.revoke_api_key(who, id).await {
            Ok(true) => tracing::info!(id = %id, by = %s.user, "API key revoked on the page"),
            Ok(false) => {
                return self
                    .message(
                        session,
                        req,
                        404,
                        "API keys",
                        &format!("There is no API key {id} of yours."),
                    )
                    .await
            }
            Err(e) => return Err(ApiError::new(Code::Internal, e)),
        }
        Ok(see_other(session, req, "/ui/keys", Vec::new()).await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        assert_eq!(parse("/login"), Some(LoginRoute::Page));
        assert_eq!(
            parse("/login/oidc/corp"),
            Some(LoginRoute::Oidc("corp".into()))
        );
        assert_eq!(
            parse("/ui/keys/ab12/revoke"),
            Some(LoginRoute::Revoke("ab12".into()))
        );
        assert_eq!(parse("/ui/keys/x y/revoke"), None);
        assert_eq!(parse("/ui"), None, "the status page is ui/mod.rs's");
        assert!(reads_cookies("/ui") && reads_cookies("/login/callback") && !reads_cookies("/v2/"));
    }

    #[test]
    fn logins_go_back_only_to_berth() {
        assert_eq!(safe_next(Some("/ui/keys")), "/ui/keys");
        assert_eq!(safe_next(Some("//evil.example/x")), "/ui");
        assert_eq!(safe_next(Some("https://evil.example")), "/ui");
        assert_eq!(safe_next(Some("/\\evil.example")), "/ui");
        assert_eq!(safe_next(None), "/ui");
    }
}
