//! `[[auth.oidc]]`: OpenID Connect providers. People log in through them in a browser
//! (`/login`), and workloads present the JWTs they issue (a CI job's OIDC token, a
//! Kubernetes projected service-account token) as Bearer tokens or as the password of
//! Basic credentials.
//!
//! ```toml
//! [[auth.oidc]]
//! name = "corp"                                  # /login/oidc/corp
//! issuer = "https://sso.example.com/realms/corp" # discovery: <issuer>/.well-known/openid-configuration
//! client_id = "berth"                            # for browser logins; omit for workload tokens only
//! client_secret_env = "BERTH_OIDC_SECRET"        # or client_secret_file = "/run/secrets/oidc"
//! scopes = ["openid", "profile", "email", "groups"]
//! username_claim = "preferred_username"          # who a browser login is
//! groups_claim = "groups"                        # the groups [access] policies name
//! audiences = ["urn:berth"]                      # workload tokens must be for one of these
//! workload_username_claim = "sub"                # who a workload token is
//! ```
//!
//! An issuer is `https://`, or `http://` on a loopback address (a provider on the same
//! host); berth never fetches keys over plain HTTP from anywhere else.

use std::path::PathBuf;
use std::time::Duration;

use toml::Value;

use crate::config::{Problems, SecretSource};

/// One `[[auth.oidc]]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OidcConfig {
    /// `name` (required): letters, digits, `-` and `_`; in `/login/oidc/<name>` and in
    /// the records of API keys made by its users.
    pub name: String,
    /// `display_name`: what the login page's button says. Default: `name`.
    pub display_name: String,
    /// `issuer` (required): exactly the `iss` of the provider's tokens, no trailing `/`.
    pub issuer: String,
    /// `client_id`: berth's client at the provider, for browser logins (the ID token's
    /// audience). Default: none, and this provider only vouches for workload tokens.
    pub client_id: Option<String>,
    /// `client_secret_env` or `client_secret_file`: the client secret. Default: none (a
    /// public client, protected by PKCE alone).
    pub client_secret: Option<SecretSource>,
    /// `scopes`: what a browser login asks for; must include `openid`. Default `openid`,
    /// `profile`, `email`.
    pub scopes: Vec<String>,
    /// `username_claim`: the claim of an ID token that is the user's name. Default
    /// `preferred_username`.
    pub username_claim: String,
    /// `groups_claim`: the claim that lists a user's or workload's groups (an array of
    /// strings, or one string). Default `groups`.
    pub groups_claim: String,
    /// `audiences`: a workload token must name one of these in `aud`. Default: none, and
    /// workload tokens of this issuer are refused.
    pub audiences: Vec<String>,
    /// `workload_username_claim`: the claim of a workload token that is its user name.
    /// Default `sub`.
    pub workload_username_claim: String,
    /// `username_prefix` and `groups_prefix`: put before every name and group this
    /// provider gives, so that they cannot be taken for htpasswd users or another
    /// provider's (`"corp:"`). Default: none.
    pub username_prefix: String,
    pub groups_prefix: String,
    /// `ca_file`: a PEM bundle of certificate authorities trusted for this provider, in
    /// addition to the public roots.
    pub ca_file: Option<PathBuf>,
    /// `timeout`: the longest a discovery, key or token request to the provider may take.
    /// Default `10s`.
    pub timeout: Duration,
}

impl OidcConfig {
    /// Whether browser logins go through this provider.
    pub fn browser_login(&self) -> bool {
        self.client_id.is_some()
    }
}

/// Reads a secret; the error names its source, never its value.
impl SecretSource {
    pub fn read(&self) -> Result<String, String> {
        match self {
            SecretSource::Env(var) => {
                std::env::var(var).map_err(|_| format!("environment variable {var} is not set"))
            }
            SecretSource::File(path) => Ok(std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?
                .trim_end_matches(['\r', '\n'])
                .to_owned()),
        }
    }
}

/// Whether `url` may be an issuer: `https://host…`, or `http://` on a loopback address.
fn issuer_problem(url: &str) -> Option<&'static str> {
    if url.ends_with('/') {
        return Some("must not end with '/': it is compared with each token's iss exactly");
    }
    if url.contains(['?', '#']) {
        return Some("must be a URL without a query or fragment");
    }
    if let Some(rest) = url.strip_prefix("https://") {
        return rest
            .is_empty()
            .then_some("must name a host: https://sso.example.com/…");
    }
    if let Some(rest) = url.strip_prefix("http://") {
        let host = rest.split('/').next().unwrap_or("");
        let host = match host.rsplit_once(':') {
            Some((h, port)) if port.parse::<u16>().is_ok() => h,
            _ => host,
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let loopback = host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        return (!loopback).then_some(
            "must be https://: signing keys are fetched over plain HTTP only from a loopback address",
        );
    }
    Some("must be an https:// URL such as https://sso.example.com/realms/corp")
}

pub(crate) fn parse_oidc(path: &str, v: &Value, p: &mut Problems) -> Vec<OidcConfig> {
    let Some(items) = v.as_array() else {
        p.add(path, "must be an array of tables ([[auth.oidc]])");
        return Vec::new();
    };
    let mut out: Vec<OidcConfig> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let ipath = format!("{path}[{i}]");
        if let Some(c) = provider(&ipath, item, p) {
            if out.iter().any(|o| o.name == c.name) {
                p.add(
                    &format!("{ipath}.name"),
                    &format!("{:?} is configured twice", c.name),
                );
            } else if out.iter().any(|o| o.issuer == c.issuer) {
                p.add(
                    &format!("{ipath}.issuer"),
                    &format!("{:?} is configured twice", c.issuer),
                );
            } else {
                out.push(c);
            }
        }
    }
    out
}

fn strings(path: &str, v: &Value, p: &mut Problems) -> Vec<String> {
    match v.as_array() {
        Some(items) => items
            .iter()
            .enumerate()
            .filter_map(|(i, s)| match s.as_str() {
                Some(s) if !s.is_empty() => Some(s.to_owned()),
                _ => {
                    p.add(&format!("{path}[{i}]"), "must be a non-empty string");
                    None
                }
            })
            .collect(),
        None => {
            p.add(path, "must be an array of strings");
            Vec::new()
        }
    }
}

fn provider(path: &str, v: &Value, p: &mut Problems) -> Option<OidcConfig> {
    let t = crate::config::table(path, v, p)?;
    let mut c = OidcConfig {
        name: String::new(),
        display_name: String::new(),
        issuer: String::new(),
        client_id: None,
        client_secret: None,
        scopes: ["openid", "profile", "email"].map(String::from).to_vec(),
        username_claim: "preferred_username".into(),
        groups_claim: "groups".into(),
        audiences: Vec::new(),
        workload_username_claim: "sub".into(),
        username_prefix: String::new(),
        groups_prefix: String::new(),
        ca_file: None,
        timeout: Duration::from_secs(10),
    };
    let before = p.len();
    for (key, value) in t {
        let kpath = format!("{path}.{key}");
        let text = || value.as_str().map(str::to_owned);
        match key.as_str() {
            "scopes" => c.scopes = strings(&kpath, value, p),
            "audiences" => c.audiences = strings(&kpath, value, p),
            "timeout" => {
                if let Some(d) = crate::config::duration(&kpath, value, p) {
                    c.timeout = d;
                }
            }
            "client_secret" => p.add(
                &kpath,
                "secrets are never written in the configuration; use client_secret_env or client_secret_file",
            ),
            // Prefixes may be empty; every other string may not.
            "username_prefix" | "groups_prefix" => match text() {
                Some(s) if key == "username_prefix" => c.username_prefix = s,
                Some(s) => c.groups_prefix = s,
                None => p.add(&kpath, "must be a string"),
            },
            "name" | "display_name" | "issuer" | "client_id" | "client_secret_env"
            | "client_secret_file" | "username_claim" | "groups_claim"
            | "workload_username_claim" | "ca_file" => {
                let Some(s) = text().filter(|s| !s.is_empty()) else {
                    p.add(&kpath, "must be a non-empty string");
                    continue;
                };
                match key.as_str() {
                    "name" => c.name = s,
                    "display_name" => c.display_name = s,
                    "issuer" => c.issuer = s,
                    "client_id" => c.client_id = Some(s),
                    "client_secret_env" | "client_secret_file" => {
                        if c.client_secret.is_some() {
                            p.add(
                                &kpath,
                                "give only one of client_secret_env and client_secret_file",
                            );
                        }
                        c.client_secret = Some(if key == "client_secret_env" {
                            SecretSource::Env(s)
                        } else {
                            SecretSource::File(s.into())
                        });
                    }
                    "username_claim" => c.username_claim = s,
                    "groups_claim" => c.groups_claim = s,
                    "workload_username_claim" => c.workload_username_claim = s,
                    _ => c.ca_file = Some(s.into()),
                }
            }
            _ => p.add(&kpath, "unknown key"),
        }
    }
    if c.name.is_empty() {
        p.add(&format!("{path}.name"), "is required, such as \"corp\"");
    } else if !c
        .name
        .chars()
        .all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_')
    {
        p.add(
            &format!("{path}.name"),
            "may hold only letters, digits, '-' and '_' (it is part of /login/oidc/<name>)",
        );
    }
    if c.issuer.is_empty() {
        p.add(
            &format!("{path}.issuer"),
            "is required: the provider's issuer URL",
        );
    } else if let Some(why) = issuer_problem(&c.issuer) {
        p.add(&format!("{path}.issuer"), why);
    }
    if c.client_id.is_some() && !c.scopes.iter().any(|s| s == "openid") {
        p.add(
            &format!("{path}.scopes"),
            "must include \"openid\" (browser logins need an ID token)",
        );
    }
    if c.client_id.is_none() && c.client_secret.is_some() {
        p.add(
            &format!("{path}.client_id"),
            "is required with a client secret",
        );
    }
    if c.client_id.is_none() && c.audiences.is_empty() {
        p.add(
            path,
            "needs client_id (browser logins), audiences (workload tokens), or both",
        );
    }
    if c.display_name.is_empty() {
        c.display_name = c.name.clone();
    }
    (p.len() == before).then_some(c)
}

#[cfg(test)]
mod tests {
    use crate::Config;

    fn parse(oidc: &str) -> Result<Config, String> {
        Config::parse(&format!("[[auth.oidc]]\n{oidc}\n[access]\n")).map_err(|e| e.to_string())
    }

    #[test]
    fn a_provider_parses_with_defaults() {
        let c = parse(
            "name = \"corp\"\nissuer = \"https://sso.example.com/realms/corp\"\nclient_id = \"berth\"\nclient_secret_env = \"S\"",
        )
        .unwrap();
        let o = &c.access.unwrap().oidc[0];
        assert_eq!(o.display_name, "corp");
        assert_eq!(o.scopes, ["openid", "profile", "email"]);
        assert_eq!(o.username_claim, "preferred_username");
        assert_eq!(o.groups_claim, "groups");
        assert_eq!(o.workload_username_claim, "sub");
        assert!(o.audiences.is_empty());
        assert!(o.browser_login());
        assert_eq!(o.client_secret, Some(crate::SecretSource::Env("S".into())));
    }

    #[test]
    fn issuers_are_https_or_loopback() {
        let ok = |issuer: &str| {
            parse(&format!(
                "name = \"a\"\nissuer = \"{issuer}\"\naudiences = [\"x\"]"
            ))
        };
        assert!(ok("http://127.0.0.1:8080").is_ok());
        assert!(ok("http://[::1]:8080/x").is_ok());
        assert!(ok("http://localhost:9").is_ok());
        let e = ok("http://sso.example.com").unwrap_err();
        assert!(e.contains("must be https://"), "{e}");
        let e = ok("https://sso.example.com/").unwrap_err();
        assert!(e.contains("must not end with '/'"), "{e}");
        assert!(ok("sso.example.com").is_err());
    }

    #[test]
    fn mistakes_are_named() {
        let e = parse("name = \"a b\"\nissuer = \"https://x\"\nclient_id = \"c\"\nclient_secret = \"s\"\nscopes = [\"profile\"]\nfoo = 1").unwrap_err();
        for want in [
            "auth.oidc[0].name: may hold only",
            "auth.oidc[0].client_secret: secrets are never written",
            "auth.oidc[0].scopes: must include \"openid\"",
            "auth.oidc[0].foo: unknown key",
        ] {
            assert!(e.contains(want), "{want} not in {e}");
        }
        let e = parse("name = \"a\"\nissuer = \"https://x\"").unwrap_err();
        assert!(e.contains("needs client_id"), "{e}");
        let twice = "[[auth.oidc]]\nname = \"a\"\nissuer = \"https://x\"\naudiences = [\"x\"]\n";
        let e = Config::parse(&format!("{twice}{twice}[access]\n")).unwrap_err();
        assert!(e.to_string().contains("\"a\" is configured twice"), "{e}");
    }
}
