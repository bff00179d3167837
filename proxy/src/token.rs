//! Registry tokens, as in the Docker token authentication specification: berth is both
//! the token service (`GET /token`) and the registry that checks them.
//!
//! A token is a JWT signed with HMAC-SHA256 under the configured key file. Its claims:
//! `iss` (berth), `sub` (the user, empty for anonymous), `aud` (the service), `iat`,
//! `nbf`, `exp`, `jti`, and `access`: the repositories and actions it was granted. Clients
//! treat tokens as opaque, so a symmetric signature is enough: only berth makes and
//! checks them.

use std::path::Path;
use std::time::Duration;

use berth_cache::clock::Clock;
use ring::hmac;
use serde_json::{json, Value};

/// Who issues the tokens (`iss`).
pub const ISSUER: &str = "berth";

/// Clock skew tolerated on `exp` and `nbf`, in seconds.
const LEEWAY: u64 = 5;

/// One grant of a token: actions (`pull`, `push`, `delete`) on a resource.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    /// `repository` (or `registry` for the catalog).
    pub kind: String,
    pub name: String,
    pub actions: Vec<String>,
}

impl Grant {
    /// Parses a `scope` parameter: `repository:team/app:pull,push`.
    pub fn parse_scope(scope: &str) -> Option<Grant> {
        let (kind, rest) = scope.split_once(':')?;
        let (name, actions) = rest.rsplit_once(':')?;
        if kind.is_empty() || name.is_empty() {
            return None;
        }
        Some(Grant {
            kind: kind.to_owned(),
            name: name.to_owned(),
            actions: actions
                .split(',')
                .filter(|a| !a.is_empty())
                .map(str::to_owned)
                .collect(),
        })
    }

    fn to_json(&self) -> Value {
        json!({"type": self.kind, "name": self.name, "actions": self.actions})
    }
}

/// What a valid token says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claims {
    /// The user; `None` for an anonymous token.
    pub subject: Option<String>,
    pub access: Vec<Grant>,
    /// For an OIDC user: the provider, whose groups `groups` are (`berth_provider` and
    /// `berth_groups`); `None` for an htpasswd user.
    pub provider: Option<String>,
    pub groups: Vec<String>,
}

/// Why a token was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum TokenError {
    Malformed,
    BadSignature,
    Expired,
    NotYetValid,
    WrongAudience,
    WrongIssuer,
}

/// Issues and checks tokens with one key.
pub struct Tokens {
    key: hmac::Key,
    service: String,
    lifetime: Duration,
    leeway: u64,
    /// What `iat`, `nbf` and `exp` are set and checked by.
    clock: Clock,
}

impl Tokens {
    /// Loads the signing key from `path` (at least 32 bytes).
    pub fn load(
        path: &Path,
        service: &str,
        lifetime: Duration,
        clock: Clock,
    ) -> Result<Tokens, String> {
        let secret = std::fs::read(path)
            .map_err(|e| format!("cannot read the token signing key {}: {e}", path.display()))?;
        if secret.len() < 32 {
            return Err(format!(
                "the token signing key {} has {} bytes; it needs at least 32 (for example: openssl rand -out {} 32)",
                path.display(),
                secret.len(),
                path.display()
            ));
        }
        Ok(Tokens {
            key: hmac::Key::new(hmac::HMAC_SHA256, &secret),
            service: service.to_owned(),
            lifetime,
            leeway: LEEWAY,
            clock,
        })
    }

    pub fn service(&self) -> &str {
        &self.service
    }

    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }

    /// A token for `subject` with `access`, valid from now for the lifetime; `oidc` is
    /// an OIDC user's provider and groups.
    pub fn issue(
        &self,
        subject: Option<&str>,
        access: &[Grant],
        oidc: Option<(&str, &[String])>,
    ) -> (String, u64) {
        let now = self.clock.now_ms() / 1000;
        let jti = random_hex(16).unwrap_or_default();
        let mut claims = json!({
            "iss": ISSUER,
            "sub": subject.unwrap_or(""),
            "aud": self.service,
            "iat": now,
            "nbf": now,
            "exp": now + self.lifetime.as_secs(),
            "jti": jti,
            "access": access.iter().map(Grant::to_json).collect::<Vec<_>>(),
        });
        if let Some((provider, groups)) = oidc {
            claims["berth_provider"] = json!(provider);
            claims["berth_groups"] = json!(groups);
        }
        let header = b64url(br#"{"alg":"HS256","typ":"JWT"}"#);
        let payload = b64url(&serde_json::to_vec(&claims).expect("serializable"));
        let signing_input = format!("{header}.{payload}");
        let tag = hmac::sign(&self.key, signing_input.as_bytes());
        (format!("{signing_input}.{}", b64url(tag.as_ref())), now)
    }

    /// Checks a token's signature, validity period, audience and issuer.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let mut parts = token.split('.');
        let (Some(header), Some(payload), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed);
        };
        let signature = b64url_decode(signature).ok_or(TokenError::Malformed)?;
        let signing_input = &token[..header.len() + 1 + payload.len()];
        // Constant-time comparison inside ring.
        hmac::verify(&self.key, signing_input.as_bytes(), &signature)
            .map_err(|_| TokenError::BadSignature)?;
        let header: Value = b64url_decode(header)
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or(TokenError::Malformed)?;
        if header["alg"] != "HS256" {
            return Err(TokenError::Malformed);
        }
        let claims: Value = b64url_decode(payload)
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or(TokenError::Malformed)?;
        let now = self.clock.now_ms() / 1000;
        let exp = claims["exp"].as_u64().ok_or(TokenError::Malformed)?;
        if now > exp + self.leeway {
            return Err(TokenError::Expired);
        }
        if claims["nbf"]
            .as_u64()
            .is_some_and(|nbf| nbf > now + self.leeway)
        {
            return Err(TokenError::NotYetValid);
        }
        let audience_ok = match &claims["aud"] {
            Value::String(a) => *a == self.service,
            Value::Array(list) => list.iter().any(|a| *a == self.service.as_str()),
            _ => false,
        };
        if !audience_ok {
            return Err(TokenError::WrongAudience);
        }
        if claims["iss"] != ISSUER {
            return Err(TokenError::WrongIssuer);
        }
        let subject = claims["sub"]
            .as_str()
            .filter(|s| !s.is_empty())
            .map(str::to_owned);
        let access = claims["access"]
            .as_array()
            .map(|list| {
                list.iter()
                    .filter_map(|g| {
                        Some(Grant {
                            kind: g["type"].as_str()?.to_owned(),
                            name: g["name"].as_str()?.to_owned(),
                            actions: g["actions"]
                                .as_array()?
                                .iter()
                                .filter_map(|a| a.as_str().map(str::to_owned))
                                .collect(),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        let provider = claims["berth_provider"].as_str().map(str::to_owned);
        let groups = claims["berth_groups"]
            .as_array()
            .map(|g| {
                g.iter()
                    .filter_map(|x| x.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        Ok(Claims {
            subject,
            access,
            provider,
            groups,
        })
    }
}

/// `bytes` random bytes from the system, in hex.
pub(crate) fn random_hex(bytes: usize) -> Result<String, String> {
    let mut b = vec![0u8; bytes];
    getrandom::fill(&mut b).map_err(|e| format!("no system randomness: {e}"))?;
    Ok(hex::encode(b))
}

/// base64url as JWTs use it: no padding written; padding accepted when decoding.
const B64URL: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    base64::engine::GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);

fn b64url(bytes: &[u8]) -> String {
    base64::Engine::encode(&B64URL, bytes)
}

fn b64url_decode(s: &str) -> Option<Vec<u8>> {
    base64::Engine::decode(&B64URL, s).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(service: &str, lifetime: Duration) -> (tempfile::TempDir, Tokens) {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key");
        std::fs::write(&key, [7u8; 32]).unwrap();
        let t = Tokens::load(&key, service, lifetime, Clock::system()).unwrap();
        (dir, t)
    }

    #[test]
    fn base64url_round_trips() {
        for n in 0..40 {
            let b: Vec<u8> = (0..n).map(|i| (i * 37 + 11) as u8).collect();
            assert_eq!(b64url_decode(&b64url(&b)).unwrap(), b, "{n}");
        }
        assert_eq!(b64url(b"any carnal pleas"), "YW55IGNhcm5hbCBwbGVhcw");
    }

    #[test]
    fn tokens_verify_and_refuse_tampering_audience_and_age() {
        let (_d, t) = tokens("berth", Duration::from_secs(300));
        let grant = Grant::parse_scope("repository:team/app:pull,push").unwrap();
        assert_eq!(grant.actions, ["pull", "push"]);
        let (token, _) = t.issue(Some("alice"), std::slice::from_ref(&grant), None);
        let c = t.verify(&token).unwrap();
        assert_eq!(c.subject.as_deref(), Some("alice"));
        assert_eq!(c.access, std::slice::from_ref(&grant));
        assert_eq!((c.provider, c.groups.len()), (None, 0));
        // An OIDC user's token carries their provider and groups.
        let groups = ["ci".to_owned()];
        let (oidc, _) = t.issue(Some("u"), &[], Some(("corp", &groups)));
        let c = t.verify(&oidc).unwrap();
        assert_eq!(
            (c.provider.as_deref(), c.groups),
            (Some("corp"), groups.to_vec())
        );

        // Tampered claims: the signature no longer matches.
        let parts: Vec<&str> = token.split('.').collect();
        let forged = b64url(
            String::from_utf8(b64url_decode(parts[1]).unwrap())
                .unwrap()
                .replace("team/app", "team/all")
                .as_bytes(),
        );
        let tampered = format!("{}.{forged}.{}", parts[0], parts[2]);
        assert_eq!(t.verify(&tampered), Err(TokenError::BadSignature));
        assert_eq!(t.verify("a.b"), Err(TokenError::Malformed));

        // Another service's token (same key): wrong audience.
        let (_d2, other) = tokens("elsewhere", Duration::from_secs(300));
        let (theirs, _) = other.issue(Some("alice"), std::slice::from_ref(&grant), None);
        assert_eq!(t.verify(&theirs), Err(TokenError::WrongAudience));

        // Expired.
        let (_d3, mut short) = tokens("berth", Duration::ZERO);
        let offset = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        short.clock = Clock::with_offset(offset.clone());
        short.leeway = 0;
        let (token, _) = short.issue(Some("alice"), &[], None);
        offset.store(1_100, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(short.verify(&token), Err(TokenError::Expired));
        assert!(Grant::parse_scope("repository::pull").is_none());
    }

    #[test]
    fn short_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key");
        std::fs::write(&key, b"short").unwrap();
        let e = Tokens::load(&key, "berth", Duration::from_secs(60), Clock::system())
            .err()
            .unwrap();
        assert!(e.contains("openssl rand"), "{e}");
    }
}
