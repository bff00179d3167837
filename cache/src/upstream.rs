//! The client for one upstream registry.
//!
//! It speaks the Docker token flow: a request that gets `401` with
//! `WWW-Authenticate: Bearer realm=…,service=…,scope=…` is retried with a token from the
//! realm (anonymous, or with the configured credentials as HTTP Basic), and tokens are
//! cached per scope until shortly before they expire. A `Basic` challenge is answered with
//! the configured credentials. The credentials go only to a realm on the upstream's own
//! host or on one of its configured `token_hosts`, and never in cleartext when the
//! upstream uses TLS; any other realm is asked for an anonymous token. Blob redirects to
//! storage hosts are followed, at most [`MAX_REDIRECTS`] of them; the upstream
//! `Authorization` header is not carried to another host. Transient failures (connection
//! errors, timeouts, 429, 502, 503, 504) are retried with backoff when the caller allows.
//! Nothing a client sent berth (its `Authorization` header above all) is ever forwarded.
//!
//! Every request passes the upstream's circuit breaker ([`crate::breaker`]): a request
//! that found the upstream down (no answer, a timeout or a 5xx, after its retries) counts
//! against it, and while it is open requests fail at once with
//! [`CacheError::UpstreamUnreachable`] ("circuit open …"), which callers treat as any
//! other unreachable upstream (a cached tag is then served stale).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, AUTHORIZATION, RANGE, WWW_AUTHENTICATE};
use reqwest::{Method, Response, StatusCode};

use crate::breaker::{Breaker, Ticket, Transition};
use crate::clock::Clock;
use crate::metrics::{CacheMetrics, UpstreamLabels};
use crate::stats::{UpstreamStats, UpstreamStatus};
use crate::CacheError;
use berth_config::UpstreamConfig;

/// How many times a transient failure is tried in all.
const ATTEMPTS: u32 = 3;
const BACKOFF: Duration = Duration::from_millis(200);
/// The longest berth keeps a token, whatever the token service says.
const MAX_TOKEN_LIFE: u64 = 24 * 3600;
/// How many tokens (one per repository scope) are kept at most.
const MAX_CACHED_TOKENS: usize = 4096;
/// How many redirects one upstream request follows.
pub const MAX_REDIRECTS: usize = 5;
/// A token is renewed this long before the upstream said it expires.
const TOKEN_MARGIN: Duration = Duration::from_secs(10);

/// One upstream registry and its cached tokens.
pub struct UpstreamClient {
    pub config: UpstreamConfig,
    http: reqwest::Client,
    credentials: Option<(String, String)>,
    tokens: Mutex<HashMap<String, (String, Instant)>>,
    pub metrics: CacheMetrics,
    /// This upstream's `berth_upstream_bytes`, looked up once (not per chunk).
    fetched: prometheus_client::metrics::counter::Counter,
    /// What the status page shows of this upstream.
    pub stats: UpstreamStats,
    breaker: Breaker,
    /// The time the breaker's cool-downs are judged by.
    clock: Clock,
}

impl std::fmt::Debug for UpstreamClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamClient")
            .field("namespace", &self.config.namespace)
            .field("url", &self.config.url)
            .finish_non_exhaustive()
    }
}

/// Whether a request may be tried again after a transient failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Retry {
    Yes,
    /// One attempt, bounded by the timeouts: used when a stale copy can be served instead.
    No,
}

impl UpstreamClient {
    /// Builds the client; fails if configured credentials cannot be read. `clock` times
    /// the circuit breaker's cool-downs.
    pub fn new(
        config: UpstreamConfig,
        metrics: CacheMetrics,
        clock: Clock,
    ) -> Result<Self, String> {
        let credentials = match &config.credentials {
            Some(c) => Some(
                c.resolve()
                    .map_err(|e| format!("upstream {}: credentials: {e}", config.namespace))?,
            ),
            None => None,
        };
        let mut builder = reqwest::Client::builder();
        if let Some(path) = &config.ca_file {
            let pem = std::fs::read(path).map_err(|e| {
                format!(
                    "upstream {}: ca_file {}: {e}",
                    config.namespace,
                    path.display()
                )
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                format!(
                    "upstream {}: ca_file {}: not a PEM certificate bundle: {e}",
                    config.namespace,
                    path.display()
                )
            })?;
            if certs.is_empty() {
                return Err(format!(
                    "upstream {}: ca_file {} holds no certificate",
                    config.namespace,
                    path.display()
                ));
            }
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder
            .redirect(reqwest::redirect::Policy::limited(MAX_REDIRECTS))
            .connect_timeout(config.connect_timeout)
            .read_timeout(config.read_timeout)
            .user_agent(concat!("berth/", env!("CARGO_PKG_VERSION")))
            .pool_idle_timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| format!("upstream {}: {e}", config.namespace))?;
        let fetched = metrics
            .upstream_bytes
            .get_or_create(&UpstreamLabels {
                upstream: config.namespace.clone(),
            })
            .clone();
        let client = UpstreamClient {
            config,
            http,
            credentials,
            tokens: Mutex::new(HashMap::new()),
            metrics,
            fetched,
            stats: UpstreamStats::default(),
            breaker: Breaker::default(),
            clock,
        };
        client.set_circuit_gauge(false);
        Ok(client)
    }

    fn set_circuit_gauge(&self, open: bool) {
        self.metrics
            .upstream_circuit_open
            .get_or_create(&UpstreamLabels {
                upstream: self.config.namespace.clone(),
            })
            .set(open as i64);
    }

    /// Counts `n` body bytes received from the upstream (`berth_upstream_bytes`).
    pub fn received(&self, n: u64) {
        self.fetched.inc_by(n);
    }

    /// The counter of body bytes received from the upstream, for a body read elsewhere.
    pub(crate) fn fetched_counter(&self) -> prometheus_client::metrics::counter::Counter {
        self.fetched.clone()
    }

    /// The figures of the status page for this upstream, now.
    pub fn status(&self) -> UpstreamStatus {
        self.stats.status(
            &self.config.namespace,
            self.breaker.is_open(),
            self.fetched.get(),
        )
    }

    fn registry(&self) -> String {
        self.config.namespace.clone()
    }

    /// Sends `method` to `/v2/<repo>/<suffix>` and returns a successful response (2xx).
    /// 404 becomes [`CacheError::NotFound`]; other failures say what the upstream did.
    /// While the circuit breaker is open, fails at once with
    /// [`CacheError::UpstreamUnreachable`] without touching the network.
    pub async fn request(
        &self,
        method: Method,
        repo: &str,
        suffix: &str,
        accept: Option<&str>,
        retry: Retry,
    ) -> Result<Response, CacheError> {
        self.request_with(method, repo, suffix, accept, None, retry)
            .await
    }

    /// A `GET` of `/v2/<repo>/<suffix>` from byte `from` on (`Range: bytes=<from>-`), as
    /// [`request`](Self::request) otherwise. The caller checks what came back: a `206`
    /// with the range asked for, or a `200` with the whole body from an upstream that
    /// ignores ranges.
    pub async fn get_from(
        &self,
        repo: &str,
        suffix: &str,
        from: u64,
        retry: Retry,
    ) -> Result<Response, CacheError> {
        self.request_with(Method::GET, repo, suffix, None, Some(from), retry)
            .await
    }

    async fn request_with(
        &self,
        method: Method,
        repo: &str,
        suffix: &str,
        accept: Option<&str>,
        range_from: Option<u64>,
        retry: Retry,
    ) -> Result<Response, CacheError> {
        let ticket = self
            .breaker
            .admit(self.clock.now_ms())
            .map_err(|refused| self.unreachable(&refused.to_string()))?;
        let result = self
            .attempts(method, repo, suffix, accept, range_from, retry)
            .await;
        self.settle(ticket, &result);
        result
    }

    /// Tells the breaker what a request found, and logs and exports a change of state.
    fn settle(&self, ticket: Ticket<'_>, result: &Result<Response, CacheError>) {
        match result {
            Ok(_) | Err(CacheError::NotFound) => self.stats.answered(),
            Err(e) => self.stats.failed(e.to_string(), self.clock.now_ms()),
        }
        let down = down_reason(result);
        let transition = self
            .breaker
            .record(ticket, down.as_deref(), self.clock.now_ms());
        let upstream = &self.config.namespace;
        let last_failure = down.as_deref().unwrap_or("");
        match transition {
            Some(Transition::Opened {
                cool_down,
                after_probe: false,
            }) => {
                self.set_circuit_gauge(true);
                tracing::warn!(upstream = %upstream, failures = crate::breaker::FAILURE_THRESHOLD,
                    cool_down_s = cool_down.as_secs(), last_failure,
                    "upstream circuit open: the upstream looks down; requests to it fail fast \
                     (cached content is still served) until a probe succeeds");
            }
            Some(Transition::Opened {
                cool_down,
                after_probe: true,
            }) => {
                self.set_circuit_gauge(true);
                tracing::warn!(upstream = %upstream, cool_down_s = cool_down.as_secs(),
                    last_failure, "upstream circuit open again: the probe request failed");
            }
            Some(Transition::Closed) => {
                self.set_circuit_gauge(false);
                tracing::info!(upstream = %upstream, "upstream circuit closed: the probe request succeeded");
            }
            None => {}
        }
    }

    /// The request itself, with its retries.
    async fn attempts(
        &self,
        method: Method,
        repo: &str,
        suffix: &str,
        accept: Option<&str>,
        range_from: Option<u64>,
        retry: Retry,
    ) -> Result<Response, CacheError> {
        let url = format!("{}/v2/{repo}/{suffix}", self.config.url);
        let scope = format!("repository:{repo}:pull");
        let attempts = if retry == Retry::Yes { ATTEMPTS } else { 1 };
        let mut last = None;
        for attempt in 0..attempts {
            if attempt > 0 {
                tokio::time::sleep(BACKOFF * 2u32.pow(attempt - 1)).await;
            }
            match self
                .send_authorized(&method, &url, &scope, accept, range_from)
                .await
            {
                Ok(resp) if resp.status().is_success() => return Ok(resp),
                Ok(resp) => {
                    let status = resp.status();
                    let err = self.status_error(status, repo);
                    if !is_transient(status) {
                        return Err(err);
                    }
                    if let Some(wait) = retry_after(resp.headers()) {
                        if attempt + 1 < attempts {
                            tokio::time::sleep(wait.min(Duration::from_secs(5))).await;
                        }
                    }
                    last = Some(err);
                }
                Err(e) if is_transient_error(&e) => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.expect("at least one attempt"))
    }

    fn status_error(&self, status: StatusCode, repo: &str) -> CacheError {
        match status {
            StatusCode::NOT_FOUND => CacheError::NotFound,
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => CacheError::UpstreamDenied {
                registry: self.registry(),
                repo: repo.to_owned(),
            },
            StatusCode::TOO_MANY_REQUESTS => CacheError::UpstreamRateLimited {
                registry: self.registry(),
            },
            s => CacheError::Upstream {
                registry: self.registry(),
                status: s.as_u16(),
            },
        }
    }

    async fn send_authorized(
        &self,
        method: &Method,
        url: &str,
        scope: &str,
        accept: Option<&str>,
        range_from: Option<u64>,
    ) -> Result<Response, CacheError> {
        let token = self.cached_token(scope);
        let resp = self
            .send(method, url, accept, range_from, token.as_deref())
            .await?;
        // Answer only the upstream's own challenges, not one from a host a redirect led to.
        if resp.status() != StatusCode::UNAUTHORIZED || !self.same_origin(resp.url()) {
            return Ok(resp);
        }
        let Some(challenge) = resp
            .headers()
            .get(WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .and_then(Challenge::parse)
        else {
            return Ok(resp);
        };
        let auth = match challenge {
            Challenge::Bearer {
                realm,
                service,
                scope: challenge_scope,
            } => {
                let scope_used = challenge_scope.unwrap_or_else(|| scope.to_owned());
                let token = self
                    .fetch_token(&realm, service.as_deref(), &scope_used)
                    .await?;
                let mut tokens = self.tokens.lock().expect("token lock");
                if tokens.len() >= MAX_CACHED_TOKENS {
                    let now = Instant::now();
                    tokens.retain(|_, (_, until)| *until > now);
                    if tokens.len() >= MAX_CACHED_TOKENS {
                        tokens.clear();
                    }
                }
                tokens.insert(scope.to_owned(), (format!("Bearer {}", token.0), token.1));
                drop(tokens);
                format!("Bearer {}", token.0)
            }
            Challenge::Basic => match &self.credentials {
                Some((user, pass)) => basic(user, pass),
                None => return Ok(resp),
            },
        };
        self.send(method, url, accept, range_from, Some(&auth))
            .await
    }

    /// Whether `url` is on the configured upstream's scheme, host and port.
    fn same_origin(&self, url: &reqwest::Url) -> bool {
        match reqwest::Url::parse(&self.config.url) {
            Ok(base) => {
                base.scheme() == url.scheme()
                    && base.host_str() == url.host_str()
                    && base.port_or_known_default() == url.port_or_known_default()
            }
            Err(_) => false,
        }
    }

    /// Why the configured credentials may not go to `realm`, if they may not: it is not
    /// on the upstream's host or one of its `token_hosts`, or it is plain http while the
    /// upstream itself is reached over TLS.
    fn realm_refusal(&self, realm: &str) -> Option<&'static str> {
        let Ok(url) = reqwest::Url::parse(realm) else {
            return Some("the token realm is not a URL");
        };
        if url.scheme() == "http" && self.config.url.starts_with("https://") {
            return Some("the token realm is plain http");
        }
        let host = url.host_str().unwrap_or("");
        let port = url.port_or_known_default();
        let upstream_host = reqwest::Url::parse(&self.config.url)
            .ok()
            .is_some_and(|u| u.host_str() == Some(host) && u.port_or_known_default() == port);
        let listed = self
            .config
            .token_hosts
            .iter()
            .any(|h| match h.rsplit_once(':') {
                Some((name, p)) if p.bytes().all(|b| b.is_ascii_digit()) => {
                    name.eq_ignore_ascii_case(host) && p.parse().ok() == port
                }
                _ => h.eq_ignore_ascii_case(host),
            });
        if upstream_host || listed {
            None
        } else {
            Some("the token realm is not on the upstream's host nor in its token_hosts")
        }
    }

    fn cached_token(&self, scope: &str) -> Option<String> {
        let mut tokens = self.tokens.lock().expect("token lock");
        match tokens.get(scope) {
            Some((t, until)) if *until > Instant::now() => Some(t.clone()),
            Some(_) => {
                tokens.remove(scope);
                None
            }
            None => None,
        }
    }

    async fn send(
        &self,
        method: &Method,
        url: &str,
        accept: Option<&str>,
        range_from: Option<u64>,
        authorization: Option<&str>,
    ) -> Result<Response, CacheError> {
        let mut headers = HeaderMap::new();
        if let Some(a) = accept.and_then(|a| HeaderValue::from_str(a).ok()) {
            headers.insert(ACCEPT, a);
        }
        if let Some(from) = range_from {
            let range = HeaderValue::try_from(format!("bytes={from}-"))
                .expect("digits make a header value");
            headers.insert(RANGE, range);
        }
        if let Some(a) = authorization.and_then(|a| HeaderValue::from_str(a).ok()) {
            let mut a = a;
            a.set_sensitive(true);
            headers.insert(AUTHORIZATION, a);
        }
        let fut = self
            .http
            .request(method.clone(), url)
            .headers(headers)
            .send();
        // Bounded by the read timeout even if the upstream accepts and never answers.
        let result =
            tokio::time::timeout(self.config.read_timeout + self.config.connect_timeout, fut).await;
        self.count(method_label(method), &result);
        match result {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => Err(self.unreachable(&describe(&e))),
            Err(_) => Err(self.unreachable("timed out waiting for a response")),
        }
    }

    /// Counts one request sent upstream, by the status of its answer (if one came).
    fn count<E, F>(&self, method: &'static str, result: &Result<Result<Response, E>, F>) {
        let status = match result {
            Ok(Ok(resp)) => Some(resp.status().as_u16()),
            _ => None,
        };
        self.metrics.request(&self.config.namespace, method, status);
    }

    fn unreachable(&self, why: &str) -> CacheError {
        CacheError::UpstreamUnreachable {
            registry: self.registry(),
            reason: why.to_owned(),
        }
    }

    async fn fetch_token(
        &self,
        realm: &str,
        service: Option<&str>,
        scope: &str,
    ) -> Result<(String, Instant), CacheError> {
        let mut query = vec![("scope", scope)];
        if let Some(s) = service {
            query.push(("service", s));
        }
        let mut req = self.http.get(realm).query(&query);
        if let Some((user, pass)) = &self.credentials {
            match self.realm_refusal(realm) {
                Some(why) => tracing::warn!(upstream = %self.config.namespace, realm = %realm,
                    "{why}; asking for an anonymous token"),
                None => req = req.basic_auth(user, Some(pass)),
            }
        }
        let fut = req.send();
        let result = tokio::time::timeout(self.config.read_timeout, fut).await;
        self.count("TOKEN", &result);
        let resp = match result {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return Err(self.unreachable(&format!("token service: {}", describe(&e)))),
            Err(_) => return Err(self.unreachable("token service timed out")),
        };
        match resp.status() {
            s if s.is_success() => {}
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                return Err(CacheError::UpstreamDenied {
                    registry: self.registry(),
                    repo: format!("scope {scope} (the token service refused)"),
                })
            }
            StatusCode::TOO_MANY_REQUESTS => {
                return Err(CacheError::UpstreamRateLimited {
                    registry: self.registry(),
                })
            }
            s => {
                return Err(CacheError::Upstream {
                    registry: format!("{} (token service)", self.registry()),
                    status: s.as_u16(),
                })
            }
        }

        #[derive(serde::Deserialize)]
        struct TokenResponse {
            token: Option<String>,
            access_token: Option<String>,
            expires_in: Option<u64>,
        }
        let body: TokenResponse = resp
            .json()
            .await
            .map_err(|_| self.unreachable("token service sent an unreadable answer"))?;
        let token = body
            .token
            .or(body.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| self.unreachable("token service sent no token"))?;
        // The token spec's default lifetime is 60 seconds.
        let life = Duration::from_secs(body.expires_in.unwrap_or(60).clamp(1, MAX_TOKEN_LIFE));
        let until = Instant::now()
            + life
                .saturating_sub(TOKEN_MARGIN)
                .max(Duration::from_secs(1));
        Ok((token, until))
    }
}

/// A transport error with its causes ("error sending request: … Connection refused"),
/// without the URL (which could carry a query with credentials in a misconfiguration).
pub fn describe(e: &reqwest::Error) -> String {
    let mut out = if e.is_timeout() {
        "timed out".to_owned()
    } else {
        String::new()
    };
    let mut source: Option<&dyn std::error::Error> = std::error::Error::source(e);
    while let Some(s) = source {
        let text = s.to_string();
        if !text.is_empty() && !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
        source = s.source();
    }
    if out.is_empty() {
        out = "request failed".to_owned();
    }
    out
}

fn basic(user: &str, pass: &str) -> String {
    use base64::Engine as _;
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
    format!("Basic {encoded}")
}

fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        _ => "OTHER",
    }
}

/// Why a request's outcome shows the upstream down, if it does: no answer (connection
/// errors, timeouts) or a 5xx, from the registry or its token service. Any other answer
/// (404, 401, 403, 429 …) comes from an upstream that is up.
fn down_reason(result: &Result<Response, CacheError>) -> Option<String> {
    match result {
        Err(CacheError::UpstreamUnreachable { reason, .. }) => Some(reason.clone()),
        Err(e @ CacheError::Upstream { status, .. }) if *status >= 500 => Some(e.to_string()),
        _ => None,
    }
}

fn is_transient_error(e: &CacheError) -> bool {
    match e {
        CacheError::UpstreamUnreachable { .. } | CacheError::UpstreamRateLimited { .. } => true,
        CacheError::Upstream { status, .. } => {
            is_transient(StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_GATEWAY))
        }
        _ => false,
    }
}

fn is_transient(s: StatusCode) -> bool {
    matches!(s.as_u16(), 429 | 502 | 503 | 504)
}

fn retry_after(h: &HeaderMap) -> Option<Duration> {
    h.get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

/// A parsed `WWW-Authenticate` challenge.
#[derive(Debug, PartialEq, Eq)]
enum Challenge {
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
    Basic,
}

impl Challenge {
    fn parse(header: &str) -> Option<Challenge> {
        let (scheme, params) = header.trim().split_once(' ').unwrap_or((header.trim(), ""));
        if scheme.eq_ignore_ascii_case("basic") {
            return Some(Challenge::Basic);
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        let mut realm = None;
        let mut service = None;
        let mut scope = None;
        let mut rest = params;
        while !rest.is_empty() {
            let (key, after) = rest.split_once('=')?;
            let key = key.trim().trim_start_matches(',').trim();
            let after = after.trim_start();
            let (value, tail) = if let Some(quoted) = after.strip_prefix('"') {
                let end = quoted.find('"')?;
                (&quoted[..end], &quoted[end + 1..])
            } else {
                let end = after.find(',').unwrap_or(after.len());
                (&after[..end], &after[end..])
            };
            match key.to_ascii_lowercase().as_str() {
                "realm" => realm = Some(value.to_owned()),
                "service" => service = Some(value.to_owned()),
                "scope" => scope = Some(value.to_owned()),
                _ => {}
            }
            rest = tail.trim_start().trim_start_matches(',').trim_start();
        }
        Some(Challenge::Bearer {
            realm: realm?,
            service,
            scope,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_challenges_parse() {
        let c = Challenge::parse(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/nginx:pull""#,
        )
        .unwrap();
        assert_eq!(
            c,
            Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/nginx:pull".into()),
            }
        );
        let c = Challenge::parse(r#"Bearer realm="http://127.0.0.1:9/t", service="x""#).unwrap();
        assert!(matches!(c, Challenge::Bearer { scope: None, .. }));
        assert_eq!(
            Challenge::parse(r#"Basic realm="r""#),
            Some(Challenge::Basic)
        );
        assert_eq!(Challenge::parse("Bearer service=\"x\""), None);
        assert_eq!(Challenge::parse("Negotiate"), None);
    }

    fn client(extra: &str) -> UpstreamClient {
        let text = format!(
            "[[upstream]]\nnamespace = \"docker.io\"\nurl = \"https://registry-1.docker.io\"\nprefixes = []\n{extra}"
        );
        let config = berth_config::Config::parse(&text).unwrap();
        UpstreamClient::new(
            config.upstreams[0].clone(),
            CacheMetrics::default(),
            Clock::system(),
        )
        .unwrap()
    }

    #[test]
    fn credentials_go_only_to_the_upstream_s_own_or_listed_realm_hosts() {
        let c = client("token_hosts = [\"auth.docker.io\", \"tokens.example:8443\"]");
        for ok in [
            "https://registry-1.docker.io/token",
            "https://auth.docker.io/token",
            "https://AUTH.docker.io/token?x=1",
            "https://tokens.example:8443/t",
        ] {
            assert_eq!(c.realm_refusal(ok), None, "{ok}");
        }
        for refused in [
            "https://evil.example/token",
            "https://auth.docker.io.evil.example/token",
            "https://registry-1.docker.io:8443/token",
            "https://tokens.example/t",
            "http://auth.docker.io/token",
            "not a url",
        ] {
            assert!(c.realm_refusal(refused).is_some(), "{refused}");
        }
        assert!(client("")
            .realm_refusal("https://auth.docker.io/token")
            .is_some());
    }

    #[test]
    fn basic_credentials_are_rfc7617() {
        assert_eq!(basic("user", "pass"), "Basic dXNlcjpwYXNz");
    }
}
