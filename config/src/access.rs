//! `[auth]` and `[access]`: who berth's clients are, and what each may do where.
//!
//! ```toml
//! [auth]
//! htpasswd = "/etc/berth/htpasswd"        # users, bcrypt (htpasswd -B)
//! [auth.groups]
//! admins = ["alice"]
//!
//! [access]
//! admin = { users = ["admin"], groups = ["admins"] }   # everything, everywhere
//! metrics = { anonymous = false, groups = ["admins"] } # who may read /metrics
//! [[access.repository]]
//! pattern = "**"                          # the most specific matching pattern wins
//! anonymous = ["read"]                    # requests without credentials
//! default = ["read"]                      # any authenticated user
//! policies = [{ users = ["builder"], groups = [], actions = ["read", "create", "update", "delete"] }]
//! ```
//!
//! Patterns match the repository path as clients write it: `team/app` for a private
//! repository, `docker.io/library/nginx` for a pulled-through one. Without an `[access]`
//! section every request is allowed, anonymously, on a loopback listener; beyond loopback
//! only pulls are, unless `[access] open = true` says that everyone may do everything.

use std::collections::HashMap;
use std::path::PathBuf;

use toml::{Table, Value};

use crate::glob::Glob;

/// What a request does to a repository.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// Pull: manifests, blobs, tags, referrers.
    Read,
    /// Push new content: uploads, mounts, new tags, manifests by digest.
    Create,
    /// Move an existing tag to another manifest.
    Update,
    Delete,
}

impl Action {
    pub fn parse(s: &str) -> Option<Action> {
        Some(match s {
            "read" => Action::Read,
            "create" => Action::Create,
            "update" => Action::Update,
            "delete" => Action::Delete,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Action::Read => "read",
            Action::Create => "create",
            Action::Update => "update",
            Action::Delete => "delete",
        }
    }
}

/// Users and groups.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Principals {
    pub users: Vec<String>,
    pub groups: Vec<String>,
}

impl Principals {
    pub fn includes(&self, user: &str, groups: &[String]) -> bool {
        self.users.iter().any(|u| u == user) || groups.iter().any(|g| self.groups.contains(g))
    }
}

/// One `[[access.repository]]`.
#[derive(Clone, Debug)]
pub struct RepositoryRule {
    pub pattern: Glob,
    pub anonymous: Vec<Action>,
    pub default: Vec<Action>,
    pub policies: Vec<(Principals, Vec<Action>)>,
}

/// `[auth.token]`: berth issues Docker registry tokens itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenConfig {
    /// The signing key file (at least 32 bytes; HMAC-SHA256). The same key across
    /// restarts keeps issued tokens valid.
    pub key: PathBuf,
    /// The `service` (token audience). Default `berth`.
    pub service: String,
    /// The token endpoint's URL as clients reach it. Default: `[server] external_url`
    /// + `/token`, else the listen address (`https://` with TLS); never the `Host` header.
    pub realm: Option<String>,
    /// How long a token is valid. Default 5 minutes.
    pub lifetime: std::time::Duration,
}

/// The longest an API key may live unless `[auth] api_key_max_lifetime` says otherwise.
pub const DEFAULT_API_KEY_MAX_LIFETIME: std::time::Duration =
    std::time::Duration::from_secs(90 * 24 * 3600);

/// How long a browser login lasts unless `[auth] session_lifetime` says otherwise.
pub const DEFAULT_SESSION_LIFETIME: std::time::Duration = std::time::Duration::from_secs(8 * 3600);

/// `[auth]` and `[access]` together.
#[derive(Clone, Debug, Default)]
pub struct AccessConfig {
    /// The htpasswd file (bcrypt entries).
    pub htpasswd: Option<PathBuf>,
    /// `api_key_max_lifetime`: no API key outlives this; a longer `expires_in` is refused.
    /// `None`: [`DEFAULT_API_KEY_MAX_LIFETIME`] (90 days).
    pub api_key_max_lifetime: Option<std::time::Duration>,
    /// `[access] open = true` (only while parsing: [`crate::config::Config::open`] keeps it).
    pub open: bool,
    /// The token service, when clients log in with the Docker token flow.
    pub token: Option<TokenConfig>,
    /// `[[auth.oidc]]`: OpenID Connect providers, for browser logins and workload tokens.
    pub oidc: Vec<crate::oidc::OidcConfig>,
    /// `session_lifetime`: how long a browser login lasts. `None`:
    /// [`DEFAULT_SESSION_LIFETIME`].
    pub session_lifetime: Option<std::time::Duration>,
    /// Group → members.
    pub groups: HashMap<String, Vec<String>>,
    pub admin: Principals,
    /// Whether `/metrics` is open to requests without credentials.
    pub metrics_anonymous: bool,
    pub metrics: Principals,
    pub repositories: Vec<RepositoryRule>,
}

impl AccessConfig {
    /// The longest an API key may live.
    pub fn api_key_max_lifetime(&self) -> std::time::Duration {
        self.api_key_max_lifetime
            .unwrap_or(DEFAULT_API_KEY_MAX_LIFETIME)
    }

    /// How long a browser login lasts.
    pub fn session_lifetime(&self) -> std::time::Duration {
        self.session_lifetime.unwrap_or(DEFAULT_SESSION_LIFETIME)
    }

    /// The groups `user` belongs to.
    pub fn groups_of(&self, user: &str) -> Vec<String> {
        let mut g: Vec<String> = self
            .groups
            .iter()
            .filter(|(_, members)| members.iter().any(|m| m == user))
            .map(|(name, _)| name.clone())
            .collect();
        g.sort();
        g
    }

    /// Whether `user` (with `groups`; `None` for a request without credentials) may do
    /// `action` on the repository at `path`.
    pub fn allows(&self, user: Option<(&str, &[String])>, path: &str, action: Action) -> bool {
        if let Some((name, groups)) = user {
            if self.admin.includes(name, groups) {
                return true;
            }
        }
        let Some(rule) = self
            .repositories
            .iter()
            .filter(|r| r.pattern.matches(path))
            .max_by_key(|r| r.pattern.specificity())
        else {
            return false;
        };
        // Credentials never take away what a request without them may do.
        if rule.anonymous.contains(&action) {
            return true;
        }
        let Some((name, groups)) = user else {
            return false;
        };
        rule.default.contains(&action)
            || rule
                .policies
                .iter()
                .any(|(who, actions)| actions.contains(&action) && who.includes(name, groups))
    }

    /// Whether `user` may read `/metrics`.
    pub fn allows_metrics(&self, user: Option<(&str, &[String])>) -> bool {
        match user {
            None => self.metrics_anonymous,
            Some((name, groups)) => {
                self.metrics_anonymous
                    || self.admin.includes(name, groups)
                    || self.metrics.includes(name, groups)
            }
        }
    }

    /// Whether a request without credentials may do anything at all.
    pub fn anonymous_can_do_anything(&self) -> bool {
        self.metrics_anonymous || self.repositories.iter().any(|r| !r.anonymous.is_empty())
    }
}

type Problems = crate::config::Problems;

pub(crate) fn parse_auth(v: &Value, access: &mut AccessConfig, p: &mut Problems) {
    let Some(t) = v.as_table() else {
        return p.add("auth", "must be a table");
    };
    for (key, value) in t {
        let path = format!("auth.{key}");
        match key.as_str() {
            "htpasswd" => match value.as_str() {
                Some(s) if !s.is_empty() => access.htpasswd = Some(PathBuf::from(s)),
                _ => p.add(&path, "must be the path of an htpasswd file"),
            },
            "token" => access.token = token(&path, value, p),
            "oidc" => access.oidc = crate::oidc::parse_oidc(&path, value, p),
            "session_lifetime" => match value.as_str().map(crate::config::parse_duration) {
                Some(Ok(d)) if !d.is_zero() => access.session_lifetime = Some(d),
                _ => p.add(&path, "must be a duration such as \"8h\""),
            },
            "api_key_max_lifetime" => match value.as_str().map(crate::config::parse_duration) {
                Some(Ok(d)) if !d.is_zero() => access.api_key_max_lifetime = Some(d),
                _ => p.add(&path, "must be a duration such as \"2160h\" (90 days)"),
            },
            "groups" => match value.as_table() {
                Some(groups) => {
                    for (name, members) in groups {
                        let gpath = format!("{path}.{name}");
                        access
                            .groups
                            .insert(name.clone(), names(&gpath, members, p));
                    }
                }
                None => p.add(&path, "must be a table of group = [users]"),
            },
            _ => p.add(&path, "unknown key"),
        }
    }
}

pub(crate) fn parse_access(v: &Value, access: &mut AccessConfig, p: &mut Problems) {
    let Some(t) = v.as_table() else {
        return p.add("access", "must be a table");
    };
    for (key, value) in t {
        let path = format!("access.{key}");
        match key.as_str() {
            "open" => match value.as_bool() {
                Some(b) => access.open = b,
                None => p.add(&path, "must be true or false"),
            },
            "admin" => {
                if let Some(t) = value.as_table() {
                    access.admin = principals(&path, t, &[], p);
                } else {
                    p.add(&path, "must be a table { users, groups }");
                }
            }
            "metrics" => {
                if let Some(t) = value.as_table() {
                    access.metrics = principals(&path, t, &["anonymous"], p);
                    match t.get("anonymous").map(Value::as_bool) {
                        None => {}
                        Some(Some(b)) => access.metrics_anonymous = b,
                        Some(None) => p.add(&format!("{path}.anonymous"), "must be true or false"),
                    }
                } else {
                    p.add(&path, "must be a table { anonymous, users, groups }");
                }
            }
            "repository" => match value.as_array() {
                Some(items) => {
                    for (i, item) in items.iter().enumerate() {
                        if let Some(r) = repository(&format!("{path}[{i}]"), item, p) {
                            access.repositories.push(r);
                        }
                    }
                }
                None => p.add(&path, "must be an array of tables ([[access.repository]])"),
            },
            _ => p.add(&path, "unknown key"),
        }
    }
    if access.open && t.len() > 1 {
        p.add(
            "access.open",
            "true lets everyone do everything: it cannot be combined with other [access] keys",
        );
    }
}

fn token(path: &str, v: &Value, p: &mut Problems) -> Option<TokenConfig> {
    let Some(t) = v.as_table() else {
        p.add(path, "must be a table { key, service, realm, lifetime }");
        return None;
    };
    let mut cfg = TokenConfig {
        key: PathBuf::new(),
        service: "berth".into(),
        realm: None,
        lifetime: std::time::Duration::from_secs(300),
    };
    for (key, value) in t {
        let kpath = format!("{path}.{key}");
        let text = value.as_str().filter(|s| !s.is_empty());
        match (key.as_str(), text) {
            ("key", Some(s)) => cfg.key = PathBuf::from(s),
            ("service", Some(s)) => cfg.service = s.to_owned(),
            ("realm", Some(s)) if s.starts_with("http://") || s.starts_with("https://") => {
                cfg.realm = Some(s.to_owned())
            }
            ("realm", _) => p.add(
                &kpath,
                "must be the token endpoint's URL, http(s)://…/token",
            ),
            ("lifetime", Some(s)) => match crate::config::parse_duration(s) {
                Ok(d) if !d.is_zero() => cfg.lifetime = d,
                _ => p.add(&kpath, "must be a duration such as \"5m\""),
            },
            ("key" | "service" | "lifetime", None) => p.add(&kpath, "must be a non-empty string"),
            _ => p.add(&kpath, "unknown key"),
        }
    }
    if cfg.key.as_os_str().is_empty() {
        p.add(&format!("{path}.key"), "is required: the signing key file");
        return None;
    }
    Some(cfg)
}

fn repository(path: &str, v: &Value, p: &mut Problems) -> Option<RepositoryRule> {
    let Some(t) = v.as_table() else {
        p.add(path, "must be a table");
        return None;
    };
    let mut pattern = None;
    let mut rule = (Vec::new(), Vec::new(), Vec::new());
    for (key, value) in t {
        let kpath = format!("{path}.{key}");
        match key.as_str() {
            "pattern" => match value.as_str().map(Glob::new) {
                Some(Ok(g)) => pattern = Some(g),
                Some(Err(e)) => p.add(&kpath, &e),
                None => p.add(&kpath, "must be a glob pattern string"),
            },
            "anonymous" => rule.0 = actions(&kpath, value, p),
            "default" => rule.1 = actions(&kpath, value, p),
            "policies" => match value.as_array() {
                Some(items) => {
                    for (i, item) in items.iter().enumerate() {
                        let ppath = format!("{kpath}[{i}]");
                        let Some(t) = item.as_table() else {
                            p.add(&ppath, "must be a table { users, groups, actions }");
                            continue;
                        };
                        let who = principals(&ppath, t, &["actions"], p);
                        let acts = match t.get("actions") {
                            Some(a) => actions(&format!("{ppath}.actions"), a, p),
                            None => {
                                p.add(&format!("{ppath}.actions"), "is required");
                                Vec::new()
                            }
                        };
                        rule.2.push((who, acts));
                    }
                }
                None => p.add(&kpath, "must be an array of { users, groups, actions }"),
            },
            _ => p.add(&kpath, "unknown key"),
        }
    }
    if pattern.is_none() && !t.contains_key("pattern") {
        p.add(&format!("{path}.pattern"), "is required");
    }
    Some(RepositoryRule {
        pattern: pattern?,
        anonymous: rule.0,
        default: rule.1,
        policies: rule.2,
    })
}

fn principals(path: &str, t: &Table, other_keys: &[&str], p: &mut Problems) -> Principals {
    let mut out = Principals::default();
    for (key, value) in t {
        let kpath = format!("{path}.{key}");
        match key.as_str() {
            "users" => out.users = names(&kpath, value, p),
            "groups" => out.groups = names(&kpath, value, p),
            k if other_keys.contains(&k) => {}
            _ => p.add(&kpath, "unknown key"),
        }
    }
    out
}

fn names(path: &str, v: &Value, p: &mut Problems) -> Vec<String> {
    let Some(items) = v.as_array() else {
        p.add(path, "must be an array of names");
        return Vec::new();
    };
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        match item.as_str() {
            Some(s) if !s.is_empty() && !s.contains(':') => out.push(s.to_owned()),
            _ => p.add(&format!("{path}[{i}]"), "must be a name (no ':')"),
        }
    }
    out
}

fn actions(path: &str, v: &Value, p: &mut Problems) -> Vec<Action> {
    let Some(items) = v.as_array() else {
        p.add(
            path,
            "must be an array of actions (read, create, update, delete)",
        );
        return Vec::new();
    };
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        match item.as_str().and_then(Action::parse) {
            Some(a) => out.push(a),
            None => p.add(
                &format!("{path}[{i}]"),
                "must be one of read, create, update, delete",
            ),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn parse(text: &str) -> Result<Config, Vec<String>> {
        Config::parse(text).map_err(|e| e.0)
    }

    const RULES: &str = r#"
[auth]
htpasswd = "/x/htpasswd"
[auth.groups]
ops = ["olga"]
[access]
admin = { users = ["root"] }
metrics = { groups = ["ops"] }
[[access.repository]]
pattern = "**"
anonymous = ["read"]
default = ["read"]
[[access.repository]]
pattern = "team/**"
policies = [{ users = ["tess"], actions = ["read", "create"] }, { groups = ["ops"], actions = ["delete"] }]
[[access.repository]]
pattern = "team/secret"
policies = [{ users = ["sam"], actions = ["read"] }]
"#;

    #[test]
    fn the_most_specific_pattern_wins() {
        let a = parse(RULES).unwrap().access.unwrap();
        let tess = Some(("tess", &[][..]));
        let ops = ["ops".to_owned()];
        let olga = Some(("olga", &ops[..]));
        let sam = Some(("sam", &[][..]));
        assert!(a.allows(None, "other/repo", Action::Read));
        assert!(!a.allows(None, "other/repo", Action::Create));
        assert!(a.allows(tess, "team/app", Action::Create));
        assert!(!a.allows(tess, "team/app", Action::Update));
        assert!(
            !a.allows(None, "team/app", Action::Read),
            "team/** gives anonymous nothing"
        );
        assert!(
            a.allows(olga, "team/app", Action::Delete),
            "through the group"
        );
        // team/secret is more specific than team/**: tess has nothing there.
        assert!(!a.allows(tess, "team/secret", Action::Read));
        assert!(a.allows(sam, "team/secret", Action::Read));
        assert!(a.allows(Some(("root", &[][..])), "team/secret", Action::Delete));
        assert!(a.allows_metrics(olga) && !a.allows_metrics(tess) && !a.allows_metrics(None));
        assert_eq!(a.groups_of("olga"), vec!["ops"]);
    }

    #[test]
    fn mistakes_are_reported_with_their_paths() {
        let errors = parse(
            r#"
[auth]
htpasswd = ""
passwd = "x"
[access]
metrics = { anonymous = "yes" }
[[access.repository]]
anonymous = ["pull"]
policies = [{ users = ["a:b"] }]
[[access.repository]]
pattern = "Team/**"
"#,
        )
        .unwrap_err();
        for want in [
            "auth.htpasswd: must be the path of an htpasswd file",
            "auth.passwd: unknown key",
            "access.metrics.anonymous: must be true or false",
            "access.repository[0].anonymous[0]: must be one of read, create, update, delete",
            "access.repository[0].policies[0].users[0]: must be a name (no ':')",
            "access.repository[0].policies[0].actions: is required",
            "access.repository[0].pattern: is required",
            "access.repository[1].pattern:",
        ] {
            assert!(
                errors.iter().any(|e| e.starts_with(want)),
                "missing {want:?} in {errors:#?}"
            );
        }
        let errors = parse("[auth]\nhtpasswd = \"/x\"\n").unwrap_err();
        assert!(
            errors[0].starts_with("access: is required with [auth]"),
            "{errors:?}"
        );
        assert!(parse("").unwrap().access.is_none());
    }

    #[test]
    fn open_access_and_key_lifetimes() {
        let c = parse("[access]\nopen = true\n").unwrap();
        assert!(c.open && c.access.is_none());
        assert!(!parse("").unwrap().open);
        let errors = parse("[access]\nopen = true\nadmin = { users = [\"a\"] }\n").unwrap_err();
        assert!(
            errors
                .iter()
                .any(|e| e.starts_with("access.open: true lets everyone")),
            "{errors:?}"
        );
        let errors = parse("[auth]\nhtpasswd = \"/x\"\n[access]\nopen = true\n").unwrap_err();
        assert!(
            errors.iter().any(|e| e.starts_with("access.open:")),
            "{errors:?}"
        );
        assert!(parse("[access]\nopen = \"yes\"\n").is_err());

        let a = parse(RULES).unwrap().access.unwrap();
        assert_eq!(a.api_key_max_lifetime(), DEFAULT_API_KEY_MAX_LIFETIME);
        let text = RULES.replace("[auth]\n", "[auth]\napi_key_max_lifetime = \"720h\"\n");
        let a = parse(&text).unwrap().access.unwrap();
        assert_eq!(a.api_key_max_lifetime().as_secs(), 720 * 3600);
        let text = RULES.replace("[auth]\n", "[auth]\napi_key_max_lifetime = \"0s\"\n");
        assert!(parse(&text).unwrap_err()[0].starts_with("auth.api_key_max_lifetime:"));
    }
}
