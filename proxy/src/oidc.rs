//! OpenID Connect providers (`[[auth.oidc]]`): their discovery documents and signing keys,
//! fetched over HTTPS with bounded timeouts and cached, and the verification of the JWTs
//! they sign: ID tokens of browser logins and workload tokens.
//!
//! - Discovery (`<issuer>/.well-known/openid-configuration`) is fetched on first use and
//!   again after an hour; its `issuer` must be the configured one exactly.
//! - The JWKS is fetched on first use and again after an hour, and when a token names a
//!   key id it does not hold (the provider rotated its keys), at most once a minute so that
//!   tokens with made-up key ids cannot make berth hammer the provider.
//! - When a refetch fails, what was fetched before keeps being used.
//! - Only asymmetric algorithms are accepted (RS*, PS*, ES256, ES384, EdDSA), each with a
//!   key of its own type: never `none`, never HMAC with a public key.
//! - Expiry and not-before are judged by berth's clock, with a minute of leeway for
//!   clocks that disagree a little.

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use berth_cache::clock::Clock;
use berth_config::oidc::OidcConfig;
use jsonwebtoken::jwk::{Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

/// How long a discovery document or key set is used before it is fetched again.
const METADATA_TTL: Duration = Duration::from_secs(3600);
/// The least time between two key fetches caused by an unknown key id.
const UNKNOWN_KID_REFETCH: Duration = Duration::from_secs(60);
/// Allowed disagreement between berth's clock and the provider's.
pub const LEEWAY_SECS: u64 = 60;
/// The most bytes of a discovery document, key set or token response berth reads.
const MAX_DOCUMENT: usize = 1 << 20;

/// The claims of a verified token.
pub type Claims = Map<String, Value>;

/// The endpoints berth uses, from the discovery document.
#[derive(Clone, Debug)]
pub struct Discovery {
    pub authorization_endpoint: String,
    pub token_endpoint: String,
    pub jwks_uri: String,
    pub userinfo_endpoint: Option<String>,
    /// The provider accepts the client secret only in the form body
    /// (`client_secret_post`), not as Basic credentials.
    pub secret_in_body: bool,
}

/// One provider.
pub struct Provider {
    pub config: OidcConfig,
    /// The client secret, read at start-up.
    secret: Option<String>,
    http: reqwest::Client,
    clock: Clock,
    discovery: RwLock<Option<(Arc<Discovery>, Instant)>>,
    keys: RwLock<Option<(Arc<Vec<Jwk>>, Instant)>>,
    /// When keys were last fetched because of an unknown key id.
    unknown_kid_fetch: Mutex<Option<Instant>>,
    /// Held while fetching, so that concurrent requests wait for one fetch.
    fetching: tokio::sync::Mutex<()>,
}

/// Why a token or a provider's answer was not accepted. The text is for the client and
/// the log: it never holds the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OidcError(pub String);

impl std::fmt::Display for OidcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn err(msg: impl Into<String>) -> OidcError {
    OidcError(msg.into())
}

/// The `iss` of a JWT, read without verifying it, to pick the provider that must verify
/// it. `None` when `token` is not a JWT.
pub fn unverified_issuer(token: &str) -> Option<String> {
    let mut parts = token.split('.');
    let (_, payload, _) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let v: Value = serde_json::from_slice(&bytes).ok()?;
    v.get("iss")?.as_str().map(str::to_owned)
}

/// What a token must be for.
pub enum Audience<'a> {
    /// A workload token: any of these.
    AnyOf(&'a [String]),
    /// An ID token: berth's client id, with this nonce.
    IdToken { client_id: &'a str, nonce: &'a str },
}

impl Provider {
    pub fn new(config: OidcConfig, clock: Clock) -> Result<Provider, String> {
        let name = &config.name;
        let secret = match &config.client_secret {
            Some(s) => Some(
                s.read()
                    .map_err(|e| format!("auth.oidc {name}: client secret: {e}"))?,
            ),
            None => None,
        };
        let mut http = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout.min(Duration::from_secs(5)))
            .redirect(reqwest::redirect::Policy::limited(3))
            .user_agent(concat!("berth/", env!("CARGO_PKG_VERSION")));
        if let Some(path) = &config.ca_file {
            let pem = std::fs::read(path)
                .map_err(|e| format!("auth.oidc {name}: ca_file {}: {e}", path.display()))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                format!(
                    "auth.oidc {name}: ca_file {}: not a PEM certificate bundle: {e}",
                    path.display()
                )
            })?;
            if certs.is_empty() {
                return Err(format!(
                    "auth.oidc {name}: ca_file {} holds no certificate",
                    path.display()
                ));
            }
            for c in certs {
                http = http.add_root_certificate(c);
            }
        }
        let http = http
            .build()
            .map_err(|e| format!("auth.oidc {name}: HTTP client: {e}"))?;
        Ok(Provider {
            config,
            secret,
            http,
            clock,
            discovery: RwLock::new(None),
            keys: RwLock::new(None),
            unknown_kid_fetch: Mutex::new(None),
            fetching: tokio::sync::Mutex::new(()),
        })
    }

    /// GETs `url` as JSON, bounded in time and size.
    async fn get_json(&self, url: &str, bearer: Option<&str>) -> Result<Value, OidcError> {
        let mut req = self.http.get(url).header("Accept", "application/json");
        if let Some(t) = bearer {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.map_err(|e| err(describe(e)))?;
        read_json(resp).await
    }

    /// The discovery document, fetched when missing or older than an hour.
    pub async fn discovery(&self) -> Result<Arc<Discovery>, OidcError> {
        if let Some((d, at)) = &*self.discovery.read().expect("discovery") {
            if at.elapsed() < METADATA_TTL {
                return Ok(d.clone());
            }
        }
        let _one = self.fetching.lock().await;
        let cached = self.discovery.read().expect("discovery").clone();
        if let Some((d, at)) = &cached {
            if at.elapsed() < METADATA_TTL {
                return Ok(d.clone());
            }
        }
        let url = format!("{}/.well-known/openid-configuration", self.config.issuer);
        match self.fetch_discovery(&url).await {
            Ok(d) => {
                let d = Arc::new(d);
                *self.discovery.write().expect("discovery") = Some((d.clone(), Instant::now()));
                Ok(d)
            }
            Err(e) => {
                tracing::warn!(provider = %self.config.name, url = %url, error = %e,
                    "OIDC discovery failed");
                match cached {
                    Some((d, _)) => Ok(d),
                    None => Err(err(format!(
                        "the identity provider {} cannot be reached: {e}",
                        self.config.name
                    ))),
                }
            }
        }
    }

    async fn fetch_discovery(&self, url: &str) -> Result<Discovery, OidcError> {
        let v = self.get_json(url, None).await?;
        let field = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
        if field("issuer").as_deref() != Some(self.config.issuer.as_str()) {
            return Err(err(format!(
                "its discovery document names issuer {:?}, not the configured {:?}",
                field("issuer").unwrap_or_default(),
                self.config.issuer
            )));
        }
        let required =
            |k: &str| field(k).ok_or_else(|| err(format!("its discovery document has no {k}")));
        let methods: Vec<&str> = v
            .get("token_endpoint_auth_methods_supported")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        Ok(Discovery {
            authorization_endpoint: required("authorization_endpoint")?,
            token_endpoint: required("token_endpoint")?,
            jwks_uri: required("jwks_uri")?,
            userinfo_endpoint: field("userinfo_endpoint"),
            secret_in_body: methods.contains(&"client_secret_post")
                && !methods.contains(&"client_secret_basic"),
        })
    }

    /// The signing keys; fetched again when older than an hour, or when `missing` names a
    /// key id they lack and no such fetch happened in the last minute.
    async fn keys(&self, missing: Option<&str>) -> Result<Arc<Vec<Jwk>>, OidcError> {
        let fresh = |keys: &Option<(Arc<Vec<Jwk>>, Instant)>| {
            keys.as_ref()
                .filter(|(k, at)| {
                    at.elapsed() < METADATA_TTL
                        && missing.is_none_or(|kid| has_kid(k, kid) || !self.may_refetch())
                })
                .map(|(k, _)| k.clone())
        };
        if let Some(k) = fresh(&self.keys.read().expect("keys")) {
            return Ok(k);
        }
        let discovery = self.discovery().await?;
        let _one = self.fetching.lock().await;
        let cached = self.keys.read().expect("keys").clone();
        if let Some(k) = fresh(&cached) {
            return Ok(k);
        }
        if missing.is_some() {
            *self.unknown_kid_fetch.lock().expect("kid fetch") = Some(Instant::now());
        }
        match self.fetch_keys(&discovery.jwks_uri).await {
            Ok(k) => {
                let k = Arc::new(k);
                *self.keys.write().expect("keys") = Some((k.clone(), Instant::now()));
                Ok(k)
            }
            Err(e) => {
                tracing::warn!(provider = %self.config.name, url = %discovery.jwks_uri,
                    error = %e, "fetching the OIDC signing keys failed");
                match cached {
                    Some((k, _)) => Ok(k),
                    None => Err(err(format!(
                        "the signing keys of the identity provider {} cannot be fetched: {e}",
                        self.config.name
                    ))),
                }
            }
        }
    }

    /// Whether an unknown key id may cause a fetch now.
    fn may_refetch(&self) -> bool {
        self.unknown_kid_fetch
            .lock()
            .expect("kid fetch")
            .is_none_or(|at| at.elapsed() >= UNKNOWN_KID_REFETCH)
    }

    async fn fetch_keys(&self, url: &str) -> Result<Vec<Jwk>, OidcError> {
        let v = self.get_json(url, None).await?;
        let Some(items) = v.get("keys").and_then(Value::as_array) else {
            return Err(err("its JWKS has no \"keys\" array"));
        };
        // Keys berth cannot use (encryption keys, unknown types) are skipped, not fatal.
        let keys: Vec<Jwk> = items
            .iter()
            .filter_map(|k| serde_json::from_value::<Jwk>(k.clone()).ok())
            .filter(|k| !matches!(k.common.public_key_use, Some(PublicKeyUse::Encryption)))
            .collect();
        if keys.is_empty() {
            return Err(err("its JWKS holds no signing key berth can use"));
        }
        Ok(keys)
    }

    /// Verifies `token`'s signature with the provider's keys, its issuer, audience, expiry
    /// and (for an ID token) nonce, and returns its claims.
    pub async fn verify(&self, token: &str, audience: Audience<'_>) -> Result<Claims, OidcError> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|_| err("the token is not a JWT"))?;
        let alg = header.alg;
        if matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512) {
            return Err(err(format!(
                "the token is signed with {alg:?}; only asymmetric signatures are accepted"
            )));
        }
        let mut keys = self.keys(None).await?;
        let mut key = pick_key(&keys, header.kid.as_deref(), alg);
        if key.is_none() {
            if let Some(kid) = header.kid.as_deref() {
                keys = self.keys(Some(kid)).await?;
                key = pick_key(&keys, Some(kid), alg);
            }
        }
        let Some(jwk) = key else {
            return Err(err(match header.kid {
                Some(kid) => {
                    format!("the token's signing key {kid:?} is not one of the identity provider's")
                }
                None => "the token names no signing key (kid), and the identity provider has \
                         more than one"
                    .to_owned(),
            }));
        };
        let decoding = DecodingKey::from_jwk(jwk)
            .map_err(|e| err(format!("the provider's signing key is unusable: {e}")))?;
        let mut v = Validation::new(alg);
        v.validate_exp = false;
        v.validate_nbf = false;
        v.validate_aud = false;
        v.required_spec_claims.clear();
        v.set_issuer(&[self.config.issuer.as_str()]);
        let claims = jsonwebtoken::decode::<Claims>(token, &decoding, &v)
            .map_err(|e| {
                err(match e.kind() {
                    jsonwebtoken::errors::ErrorKind::InvalidIssuer => {
                        format!("the token's issuer is not {}", self.config.issuer)
                    }
                    jsonwebtoken::errors::ErrorKind::InvalidSignature => {
                        "the token's signature does not verify".to_owned()
                    }
                    jsonwebtoken::errors::ErrorKind::InvalidAlgorithm => {
                        "the token's algorithm does not fit its signing key".to_owned()
                    }
                    _ => format!("the token is not valid: {e}"),
                })
            })?
            .claims;
        self.check_times(&claims)?;
        check_audience(&claims, &audience)?;
        Ok(claims)
    }

    /// `exp` (required) and `nbf`, by berth's clock, with [`LEEWAY_SECS`].
    fn check_times(&self, claims: &Claims) -> Result<(), OidcError> {
        let now = self.clock.now_ms() / 1000;
        let Some(exp) = claims.get("exp").and_then(Value::as_u64) else {
            return Err(err("the token has no expiry (exp)"));
        };
        if now > exp.saturating_add(LEEWAY_SECS) {
            return Err(err(format!(
                "the token expired {} s ago: get a new one",
                now - exp
            )));
        }
        if let Some(nbf) = claims.get("nbf").and_then(Value::as_u64) {
            if nbf > now.saturating_add(LEEWAY_SECS) {
                return Err(err("the token is not valid yet (nbf)"));
            }
        }
        Ok(())
    }

    /// The URL the browser is sent to, to log in.
    pub async fn authorization_url(
        &self,
        redirect_uri: &str,
        state: &str,
        nonce: &str,
        challenge: &str,
    ) -> Result<String, OidcError> {
        let d = self.discovery().await?;
        let client_id = self.config.client_id.as_deref().unwrap_or_default();
        let scope = self.config.scopes.join(" ");
        let query = form_urlencoded::Serializer::new(String::new())
            .append_pair("response_type", "code")
            .append_pair("client_id", client_id)
            .append_pair("redirect_uri", redirect_uri)
            .append_pair("scope", &scope)
            .append_pair("state", state)
            .append_pair("nonce", nonce)
            .append_pair("code_challenge", challenge)
            .append_pair("code_challenge_method", "S256")
            .finish();
        let sep = if d.authorization_endpoint.contains('?') {
            '&'
        } else {
            '?'
        };
        Ok(format!("{}{sep}{query}", d.authorization_endpoint))
    }

    /// Exchanges an authorization code for tokens; returns the verified ID token's claims,
    /// completed from the userinfo endpoint when the ID token lacks the username or groups
    /// claim (providers differ in what they put in ID tokens).
    pub async fn exchange(
        &self,
        code: &str,
        verifier: &str,
        redirect_uri: &str,
        nonce: &str,
    ) -> Result<Claims, OidcError> {
        let d = self.discovery().await?;
        let client_id = self.config.client_id.as_deref().unwrap_or_default();
        let mut form = vec![
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", redirect_uri),
            ("code_verifier", verifier),
        ];
        let mut req = self.http.post(&d.token_endpoint);
        match &self.secret {
            Some(secret) if !d.secret_in_body => {
                // RFC 6749 2.3.1: both parts form-encoded before Basic.
                let enc =
                    |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
                req = req.basic_auth(enc(client_id), Some(enc(secret)));
            }
            Some(secret) => {
                form.push(("client_id", client_id));
                form.push(("client_secret", secret));
            }
            None => form.push(("client_id", client_id)),
        }
        let resp = req
            .header("Accept", "application/json")
            .form(&form)
            .send()
            .await
            .map_err(|e| err(format!("the token endpoint: {}", describe(e))))?;
        let body = read_json(resp)
            .await
            .map_err(|e| err(format!("the token endpoint refused the login: {e}")))?;
        let Some(id_token) = body.get("id_token").and_then(Value::as_str) else {
            return Err(err("the token endpoint's answer has no id_token"));
        };
        let mut claims = self
            .verify(id_token, Audience::IdToken { client_id, nonce })
            .await?;
        let lacks = |c: &Claims| {
            !c.contains_key(&self.config.username_claim)
                || !c.contains_key(&self.config.groups_claim)
        };
        if lacks(&claims) {
            if let (Some(url), Some(access)) = (
                d.userinfo_endpoint.as_deref(),
                body.get("access_token").and_then(Value::as_str),
            ) {
                let info = self.get_json(url, Some(access)).await?;
                // OIDC Core 5.3.2: userinfo is about the ID token's subject, or ignored.
                if info.get("sub") == claims.get("sub") {
                    if let Value::Object(info) = info {
                        for (k, v) in info {
                            claims.entry(k).or_insert(v);
                        }
                    }
                }
            }
        }
        Ok(claims)
    }

    /// The user name and groups in `claims`, from `username_claim` (`workload_username_claim`
    /// for a workload) and `groups_claim`, with the configured prefixes.
    pub fn identity(
        &self,
        claims: &Claims,
        workload: bool,
    ) -> Result<(String, Vec<String>), OidcError> {
        let claim = if workload {
            &self.config.workload_username_claim
        } else {
            &self.config.username_claim
        };
        let name = match claims.get(claim) {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            _ => {
                return Err(err(format!(
                    "the token has no {claim:?} claim to name its user (auth.oidc {} {})",
                    self.config.name,
                    if workload {
                        "workload_username_claim"
                    } else {
                        "username_claim"
                    }
                )))
            }
        };
        if name.contains(':') && self.config.username_prefix.is_empty() {
            // ':' separates a name from a password in Basic credentials and API keys.
            return Err(err(format!(
                "the user name {name:?} holds ':'; set auth.oidc {} username_prefix, or a \
                 username claim without ':'",
                self.config.name
            )));
        }
        let groups = match claims.get(&self.config.groups_claim) {
            Some(Value::Array(items)) => items
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect(),
            Some(Value::String(s)) => vec![s.clone()],
            _ => Vec::new(),
        };
        let prefix = &self.config.groups_prefix;
        Ok((
            format!("{}{name}", self.config.username_prefix),
            groups.into_iter().map(|g| format!("{prefix}{g}")).collect(),
        ))
    }
}

/// Whether `keys` holds key id `kid`.
fn has_kid(keys: &[Jwk], kid: &str) -> bool {
    keys.iter().any(|k| k.common.key_id.as_deref() == Some(kid))
}

/// The key that verifies a token signed with `alg` naming `kid`: the one with that id,
/// or, without an id, the only key of the algorithm's type.
fn pick_key<'a>(keys: &'a [Jwk], kid: Option<&str>, alg: Algorithm) -> Option<&'a Jwk> {
    use jsonwebtoken::jwk::AlgorithmParameters as P;
    let fits = |k: &Jwk| {
        let type_fits = matches!(
            (&k.algorithm, alg),
            (
                P::RSA(_),
                Algorithm::RS256
                    | Algorithm::RS384
                    | Algorithm::RS512
                    | Algorithm::PS256
                    | Algorithm::PS384
                    | Algorithm::PS512
            ) | (P::EllipticCurve(_), Algorithm::ES256 | Algorithm::ES384)
                | (P::OctetKeyPair(_), Algorithm::EdDSA)
        );
        // A key that names its algorithm is used with that one only.
        let alg_fits = k
            .common
            .key_algorithm
            .is_none_or(|ka| format!("{ka:?}") == format!("{alg:?}"));
        type_fits && alg_fits
    };
    match kid {
        Some(kid) => keys
            .iter()
            .find(|k| k.common.key_id.as_deref() == Some(kid))
            .filter(|k| fits(k)),
        None => {
            let mut fitting = keys.iter().filter(|k| fits(k));
            let first = fitting.next();
            fitting.next().is_none().then_some(first).flatten()
        }
    }
}

/// `aud` names one of the accepted audiences; for an ID token, berth's client (and `azp`,
/// when present, is berth) and the nonce of this login.
fn check_audience(claims: &Claims, audience: &Audience<'_>) -> Result<(), OidcError> {
    let auds: Vec<&str> = match claims.get("aud") {
        Some(Value::String(s)) => vec![s.as_str()],
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    match audience {
        Audience::AnyOf(accepted) => {
            if !auds.iter().any(|a| accepted.iter().any(|x| x == a)) {
                return Err(err(format!(
                    "the token is for {}, not for this registry: ask for a token with audience {}",
                    if auds.is_empty() {
                        "no audience".to_owned()
                    } else {
                        auds.join(", ")
                    },
                    accepted.join(" or ")
                )));
            }
        }
        Audience::IdToken { client_id, nonce } => {
            if !auds.contains(client_id) {
                return Err(err("the ID token is not for this registry's client"));
            }
            if let Some(azp) = claims.get("azp").and_then(Value::as_str) {
                if azp != *client_id {
                    return Err(err("the ID token was issued to another client (azp)"));
                }
            }
            if claims.get("nonce").and_then(Value::as_str) != Some(*nonce) {
                return Err(err(
                    "the ID token's nonce is not this login's: log in again",
                ));
            }
        }
    }
    Ok(())
}

/// An HTTP response as JSON: a non-2xx status is an error naming it (with the OAuth
/// `error` and `error_description` when the body has them).
async fn read_json(resp: reqwest::Response) -> Result<Value, OidcError> {
    let status = resp.status();
    if resp
        .content_length()
        .is_some_and(|n| n > MAX_DOCUMENT as u64)
    {
        return Err(err(format!(
            "the answer is larger than {MAX_DOCUMENT} bytes"
        )));
    }
    let mut body = Vec::new();
    let mut resp = resp;
    while let Some(chunk) = resp.chunk().await.map_err(|e| err(describe(e)))? {
        body.extend_from_slice(&chunk);
        if body.len() > MAX_DOCUMENT {
            return Err(err(format!(
                "the answer is larger than {MAX_DOCUMENT} bytes"
            )));
        }
    }
    let v: Option<Value> = serde_json::from_slice(&body).ok();
    if !status.is_success() {
        let oauth = v.as_ref().and_then(|v| {
            let e = v.get("error")?.as_str()?;
            let d = v.get("error_description").and_then(Value::as_str);
            Some(match d {
                Some(d) => format!(": {e}: {d}"),
                None => format!(": {e}"),
            })
        });
        return Err(err(format!("HTTP {status}{}", oauth.unwrap_or_default())));
    }
    v.ok_or_else(|| err("the answer is not JSON"))
}

/// A request error in words, without the URL's query (it may hold a code).
fn describe(e: reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".into()
    } else if e.is_connect() {
        "cannot connect".into()
    } else {
        e.without_url().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_issuer_is_read_without_verifying() {
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let t = format!(
            "{}.{}.sig",
            b64("{\"alg\":\"RS256\"}"),
            b64("{\"iss\":\"https://idp\"}")
        );
        assert_eq!(unverified_issuer(&t).as_deref(), Some("https://idp"));
        assert_eq!(unverified_issuer("berth_abc_def"), None);
        assert_eq!(unverified_issuer("a.b"), None);
        assert_eq!(unverified_issuer(&format!("{t}.x")), None);
    }

    fn claims(v: Value) -> Claims {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn audiences_and_nonces_are_checked() {
        let accepted = vec!["urn:berth".to_owned()];
        let ok = claims(serde_json::json!({"aud": ["x", "urn:berth"]}));
        assert!(check_audience(&ok, &Audience::AnyOf(&accepted)).is_ok());
        let wrong = claims(serde_json::json!({"aud": "urn:other"}));
        let e = check_audience(&wrong, &Audience::AnyOf(&accepted)).unwrap_err();
        assert!(
            e.0.contains("urn:other") && e.0.contains("urn:berth"),
            "{e}"
        );
        let none = claims(serde_json::json!({}));
        assert!(check_audience(&none, &Audience::AnyOf(&accepted)).is_err());

        let id = |v| claims(v);
        let good = id(serde_json::json!({"aud": "berth", "nonce": "n1"}));
        let want = Audience::IdToken {
            client_id: "berth",
            nonce: "n1",
        };
        assert!(check_audience(&good, &want).is_ok());
        let replay = id(serde_json::json!({"aud": "berth", "nonce": "n0"}));
        assert!(check_audience(&replay, &want).is_err());
        let other = id(serde_json::json!({"aud": ["berth", "x"], "azp": "x", "nonce": "n1"}));
        assert!(check_audience(&other, &want).is_err());
    }

    #[test]
    fn keys_are_picked_by_id_and_type() {
        let rsa: Jwk = serde_json::from_value(serde_json::json!({
            "kty": "RSA", "kid": "r1", "n": "AQAB", "e": "AQAB"
        }))
        .unwrap();
        let ec: Jwk = serde_json::from_value(serde_json::json!({
            "kty": "EC", "kid": "e1", "crv": "P-256", "alg": "ES256",
            "x": "AQAB", "y": "AQAB"
        }))
        .unwrap();
        let keys = vec![rsa, ec];
        assert_eq!(
            pick_key(&keys, Some("r1"), Algorithm::RS256).and_then(|k| k.common.key_id.clone()),
            Some("r1".into())
        );
        // The key id names an RSA key: an ES256 token cannot use it.
        assert!(pick_key(&keys, Some("r1"), Algorithm::ES256).is_none());
        assert!(
            pick_key(&keys, Some("e1"), Algorithm::ES384).is_none(),
            "alg named by the key"
        );
        assert!(
            pick_key(&keys, None, Algorithm::ES256).is_some(),
            "the only EC key"
        );
        assert!(pick_key(&keys, Some("gone"), Algorithm::RS256).is_none());
    }
}
