//! Browser logins: the sessions behind the `berth_session` cookie, and the logins in
//! progress at an OpenID provider.
//!
//! Sessions live in memory: a restart logs browsers out, which costs a login and keeps
//! no session secret on disk. Only a hash of each cookie is kept, so a memory dump does
//! not hand out sessions. Each session has its own CSRF token, which every form of the
//! pages carries and every POST must return.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use berth_cache::clock::Clock;
use sha2::{Digest as _, Sha256};

use crate::token::random_hex;

/// The session cookie's name (distinct from any provider's cookies on the same host).
pub const SESSION_COOKIE: &str = "berth_session";
/// The cookie that ties a login in progress to the browser that started it.
pub const LOGIN_COOKIE: &str = "berth_login";
/// The cookie behind the login form's CSRF token, before there is a session.
pub const FORM_COOKIE: &str = "berth_form";
/// The most sessions and pending logins kept; beyond, the oldest go first.
const MAX_ENTRIES: usize = 10_000;
/// How long a login may take at the provider.
pub const LOGIN_TIMEOUT: Duration = Duration::from_secs(600);

/// A logged-in browser.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Session {
    pub user: String,
    /// An OIDC user's groups at login; empty for an htpasswd user, whose groups come
    /// from the configuration at each request.
    pub groups: Vec<String>,
    /// The `[[auth.oidc]]` provider logged in through; `None` for an htpasswd user.
    pub provider: Option<String>,
    /// The token every form of this session carries.
    pub csrf: String,
    pub expires_ms: u64,
}

/// A login sent to a provider and not back yet.
#[derive(Clone, Debug)]
pub struct PendingLogin {
    pub provider: String,
    pub nonce: String,
    pub verifier: String,
    pub redirect_uri: String,
    /// Where the browser goes once logged in (a path on berth).
    pub next: String,
    pub expires_ms: u64,
}

pub struct Sessions {
    sessions: Mutex<HashMap<[u8; 32], Session>>,
    pending: Mutex<HashMap<String, PendingLogin>>,
    lifetime: Duration,
    clock: Clock,
}

fn hash(cookie: &str) -> [u8; 32] {
    Sha256::digest(cookie.as_bytes()).into()
}

/// Drops expired entries, and the soonest to expire when `map` is still full.
fn make_room<K: Clone + Eq + std::hash::Hash, V>(
    map: &mut HashMap<K, V>,
    now: u64,
    expires: impl Fn(&V) -> u64,
) {
    if map.len() < MAX_ENTRIES {
        return;
    }
    map.retain(|_, v| expires(v) > now);
    if map.len() >= MAX_ENTRIES {
        if let Some(k) = map
            .iter()
            .min_by_key(|(_, v)| expires(v))
            .map(|(k, _)| k.clone())
        {
            map.remove(&k);
        }
    }
}

impl Sessions {
    pub fn new(lifetime: Duration, clock: Clock) -> Self {
        Sessions {
            sessions: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
            lifetime,
            clock,
        }
    }

    /// How long a session lasts.
    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }

    /// Starts a session; returns the cookie's value.
    pub fn create(
        &self,
        user: &str,
        groups: Vec<String>,
        provider: Option<String>,
    ) -> Result<String, String> {
        let cookie = random_hex(32)?;
        let now = self.clock.now_ms();
        let session = Session {
            user: user.to_owned(),
            groups,
            provider,
            csrf: random_hex(24)?,
            expires_ms: now.saturating_add(self.lifetime.as_millis() as u64),
        };
        let mut map = self.sessions.lock().expect("sessions");
        make_room(&mut map, now, |s| s.expires_ms);
        map.insert(hash(&cookie), session);
        Ok(cookie)
    }

    /// The live session behind a cookie's value.
    pub fn get(&self, cookie: &str) -> Option<Session> {
        let now = self.clock.now_ms();
        let mut map = self.sessions.lock().expect("sessions");
        let key = hash(cookie);
        match map.get(&key) {
            Some(s) if s.expires_ms > now => Some(s.clone()),
            Some(_) => {
                map.remove(&key);
                None
            }
            None => None,
        }
    }

    /// Ends a session (logout).
    pub fn remove(&self, cookie: &str) {
        self.sessions
            .lock()
            .expect("sessions")
            .remove(&hash(cookie));
    }

    /// Remembers a login sent to a provider, under its `state`.
    pub fn start_login(&self, state: &str, login: PendingLogin) {
        let now = self.clock.now_ms();
        let mut map = self.pending.lock().expect("pending logins");
        make_room(&mut map, now, |p| p.expires_ms);
        map.insert(state.to_owned(), login);
    }

    /// Takes the login of `state` (each state is used once), if it has not timed out.
    pub fn finish_login(&self, state: &str) -> Option<PendingLogin> {
        let now = self.clock.now_ms();
        let login = self.pending.lock().expect("pending logins").remove(state)?;
        (login.expires_ms > now).then_some(login)
    }

    /// A pending login's expiry, from now.
    pub fn login_expiry(&self) -> u64 {
        self.clock
            .now_ms()
            .saturating_add(LOGIN_TIMEOUT.as_millis() as u64)
    }
}

/// The value of cookie `name` in a `Cookie` header (`a=1; b=2`).
pub fn cookie<'a>(header: Option<&'a str>, name: &str) -> Option<&'a str> {
    header?
        .split(';')
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim_matches('"'))
        .filter(|v| !v.is_empty())
}

/// A `Set-Cookie` value: HttpOnly, SameSite=Lax (the provider's redirect back to berth is
/// a top-level navigation from another site, which Strict would strip), Secure when
/// berth is reached over HTTPS. `max_age` 0 deletes the cookie.
pub fn set_cookie(name: &str, value: &str, path: &str, max_age: Duration, secure: bool) -> String {
    format!(
        "{name}={value}; Path={path}; Max-Age={}; HttpOnly; SameSite=Lax{}",
        max_age.as_secs(),
        if secure { "; Secure" } else { "" }
    )
}

/// Whether two secrets are equal, in time that does not depend on where they differ.
pub fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_expire_and_end() {
        let clock = Clock::system();
        let s = Sessions::new(Duration::from_secs(60), clock);
        let c = s
            .create("alice", vec!["ci".into()], Some("corp".into()))
            .unwrap();
        let got = s.get(&c).unwrap();
        assert_eq!(
            (got.user.as_str(), got.groups.as_slice()),
            ("alice", &["ci".to_owned()][..])
        );
        assert!(s.get("not-a-session").is_none());
        s.remove(&c);
        assert!(s.get(&c).is_none());
        let expired = Sessions::new(Duration::ZERO, Clock::system());
        let c = expired.create("bob", Vec::new(), None).unwrap();
        assert!(
            expired.get(&c).is_none(),
            "a session past its lifetime is gone"
        );
    }

    #[test]
    fn a_login_state_is_used_once() {
        let s = Sessions::new(Duration::from_secs(60), Clock::system());
        let login = PendingLogin {
            provider: "corp".into(),
            nonce: "n".into(),
            verifier: "v".into(),
            redirect_uri: "http://127.0.0.1/login/callback".into(),
            next: "/ui".into(),
            expires_ms: s.login_expiry(),
        };
        s.start_login("st", login);
        assert!(s.finish_login("st").is_some());
        assert!(s.finish_login("st").is_none(), "replayed");
    }

    #[test]
    fn cookies_parse_and_are_set_safely() {
        let h = Some("a=1; berth_session=abc; b=\"2\"");
        assert_eq!(cookie(h, SESSION_COOKIE), Some("abc"));
        assert_eq!(cookie(h, "b"), Some("2"));
        assert_eq!(cookie(h, "c"), None);
        assert_eq!(cookie(Some("berth_session="), SESSION_COOKIE), None);
        let plain = set_cookie(SESSION_COOKIE, "v", "/", Duration::from_secs(5), false);
        assert_eq!(
            plain,
            "berth_session=v; Path=/; Max-Age=5; HttpOnly; SameSite=Lax"
        );
        let tls = set_cookie(SESSION_COOKIE, "v", "/", Duration::from_secs(5), true);
        assert!(tls.ends_with("; Secure"), "{tls}");
        assert!(same_secret("abc", "abc") && !same_secret("abc", "abd") && !same_secret("a", "ab"));
    }
}
