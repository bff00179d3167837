//! The Pingora application: reads a request, routes it, serves it, logs it.
//!
//! Each step is a plain function of typed values; this module only moves bytes between
//! them and the Pingora session.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ReusedHttpStream};
use pingora::http::ResponseHeader;
use pingora::protocols::http::{ReusableHttpStream, ServerSession};
use pingora::server::ShutdownWatch;

use berth_cache::fill::BlobFill;
use berth_cache::{tags::STALE_WARNING, BlobSource, Cache, Outcome};
use berth_config::Config;
use berth_registry::Registry;
use berth_store::oci::Reference;
use berth_store::StoredBlob;

use crate::auth::{AuthError, Identity};
use crate::errors::{ApiError, Code, Subject};
use crate::metrics::Metrics;
use crate::range::{parse_range, ByteRange};
use crate::route::{self, Endpoint, Form, Route, Target};
use crate::sendfile::Socket;
use berth_config::access::Action;

/// How much of a stored blob is handed to the connection per write.
const SERVE_CHUNK: u64 = 1024 * 1024;

/// Bodies from this size up are sent with `sendfile` when the connection allows it;
/// below it, one write through the session is cheaper than setting that up.
const SENDFILE_MIN: u64 = 256 * 1024;

/// How long one write to a client may block.
pub(crate) const CLIENT_WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// berth's HTTP application.
pub struct App {
    /// Serving HTTPS: bodies always go through the session (never `sendfile`).
    pub tls: bool,
    pub auth: crate::auth::Auth,
    pub logins: crate::auth::LoginLimiter,
    /// Requests being served, for draining on SIGTERM.
    pub in_flight: crate::drain::InFlight,
    pub config: Arc<Config>,
    pub cache: Arc<Cache>,
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    pub access_log: crate::access_log::AccessLog,
    /// The store's contents as the status page last read them.
    pub ui_contents: crate::ui::status::ContentsCache,
}

/// The parts of a request berth looks at, copied out of the session once.
#[derive(Debug)]
pub(crate) struct Request {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub accept: Option<String>,
    pub range: Option<String>,
    pub content_type: Option<String>,
    pub content_range: Option<String>,
    /// Never logged.
    pub authorization: Option<String>,
    /// The local address the connection arrived on (a default token realm is built from
    /// it; a client cannot choose it, unlike `Host`).
    pub local: Option<std::net::SocketAddr>,
    /// berth is stopping (`/readyz` answers 503).
    pub draining: bool,
    /// The `Cookie` header, copied only for berth's web pages (a browser session counts
    /// there and nowhere else). Never logged.
    pub cookie: Option<String>,
    /// The client's address (failed logins are counted per address).
    pub client_ip: Option<std::net::IpAddr>,
}

impl Request {
    fn from_session(session: &ServerSession) -> Self {
        let h = session.req_header();
        // Most requests have one Accept header: it is copied without a list and a join.
        let mut accepts = h
            .headers
            .get_all(http::header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok());
        let accept = accepts.next().map(|first| {
            let mut all = first.to_owned();
            for more in accepts {
                all.push_str(", ");
                all.push_str(more);
            }
            all
        });
        let has_body = !matches!(h.method, http::Method::GET | http::Method::HEAD);
        Request {
            method: h.method.as_str().to_owned(),
            path: h.uri.path().to_owned(),
            query: h.uri.query().map(str::to_owned),
            accept,
            range: header_value(h, http::header::RANGE),
            // Only requests with a body (uploads and pushes) read these two.
            content_type: has_body
                .then(|| header_value(h, http::header::CONTENT_TYPE))
                .flatten(),
            content_range: has_body
                .then(|| header_value(h, http::header::CONTENT_RANGE))
                .flatten(),
            authorization: header_value(h, http::header::AUTHORIZATION),
            local: session.server_addr().and_then(|a| a.as_inet()).copied(),
            draining: false,
            cookie: crate::login::reads_cookies(h.uri.path())
                .then(|| header_value(h, http::header::COOKIE))
                .flatten(),
            client_ip: session
                .client_addr()
                .and_then(|a| a.as_inet())
                .map(|a| a.ip()),
        }
    }

    pub fn is_head(&self) -> bool {
        self.method == "HEAD"
    }

    /// GET or HEAD: a request without a body.
    pub fn is_read(&self) -> bool {
        self.method == "GET" || self.method == "HEAD"
    }
}

/// Looked up by a [`HeaderName`] constant: a `&str` name is parsed again on every call.
fn header_value(h: &pingora::http::RequestHeader, name: HeaderName) -> Option<String> {
    h.headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// What happened, for the access log and metrics.
pub(crate) struct Served {
    pub status: u16,
    pub bytes: u64,
    pub outcome: Option<Outcome>,
    /// The response was written completely; otherwise the connection must be dropped.
    pub complete: bool,
}

impl Served {
    fn failed(status: u16) -> Self {
        Served {
            status,
            bytes: 0,
            outcome: None,
            complete: false,
        }
    }
}

#[async_trait]
impl HttpServerApp for App {
    async fn process_new_http(
        self: &Arc<Self>,
        session: ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        let (stream, settings) = self.serve_session(session, shutdown).await?;
        Some(ReusedHttpStream::from_reusable_stream(stream, settings))
    }
}

impl App {
    /// One request on a Pingora session, and the connection back if it may be kept.
    pub(crate) async fn serve_session(
        self: &Arc<Self>,
        mut session: ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Option<(ReusableHttpStream, HttpPersistentSettings)> {
        match session.read_request().await {
            Ok(true) => {}
            _ => return None,
        }
        let _serving = self.in_flight.enter();
        // Kept for 60 s unless berth is draining, or the request did not ask for it
        // (`Connection: close`, or HTTP/1.0 without `Connection: keep-alive`), as Pingora
        // read it.
        let keep = !*shutdown.borrow() && session.get_keepalive().is_some();
        session.set_keepalive(keep.then_some(60));
        // A client that stops reading does not hold its connection (and the blob it was
        // being sent) forever.
        session.set_write_timeout(Some(CLIENT_WRITE_TIMEOUT));
        let started = Instant::now();
        let mut req = Request::from_session(&session);
        req.draining = *shutdown.borrow();
        let route = route::parse(&req.path, req.query.as_deref(), &self.config);
        let who = self.authenticate(&req, req.client_ip).await;
        let served = self.serve(&mut session, &req, &route, &who).await;
        let (kind, upstream) = match &route {
            Ok(r) => (route_kind(r), route_upstream(r)),
            Err(_) => ("invalid", None),
        };
        let user = who.as_ref().map(Identity::name).unwrap_or("(refused)");
        self.done(session, &req, started, (kind, upstream), user, served)
            .await
    }

    /// After a response: the counters, the access log line, and the connection kept for
    /// the next request or closed. The line names the request as the client sent it: a
    /// blob sent with `sendfile` has turned the session's method into HEAD by now.
    async fn done(
        &self,
        session: ServerSession,
        req: &Request,
        started: Instant,
        (kind, upstream): (&'static str, Option<&str>),
        user: &str,
        served: Served,
    ) -> Option<(ReusableHttpStream, HttpPersistentSettings)> {
        let complete = served.complete;
        self.record(
            started,
            kind,
            upstream,
            user,
            served,
            (&req.method, &req.path, req.query.as_deref()),
        );
        if !complete {
            return None;
        }
        let settings = HttpPersistentSettings::for_session(&session);
        match session.finish().await {
            Ok(Some(stream)) => Some((stream, settings)),
            _ => None,
        }
    }

    /// The counters and the access log line for one request: `request` is its method,
    /// path and query.
    pub(crate) fn record(
        &self,
        started: Instant,
        kind: &'static str,
        upstream: Option<&str>,
        user: &str,
        served: Served,
        request: (&str, &str, Option<&str>),
    ) {
        let elapsed = started.elapsed();
        if let Some(upstream) = upstream {
            let body = if (200..300).contains(&served.status) {
                served.bytes
            } else {
                0
            };
            self.cache.served(upstream, served.outcome, body);
        }
        self.metrics.observe(
            kind,
            upstream,
            served.outcome,
            served.status,
            served.bytes,
            elapsed,
        );
        let (method, path, query) = request;
        let ns = query.and_then(|q| route::query_param(q, "ns"));
        self.access_log.write(&crate::access_log::Entry {
            method,
            user,
            path,
            ns: ns.as_deref().unwrap_or(""),
            status: served.status,
            bytes: served.bytes,
            outcome: served.outcome.map(Outcome::as_str).unwrap_or("-"),
            complete: served.complete,
            ms: elapsed.as_millis() as u64,
        });
    }
}

fn route_kind(r: &Route) -> &'static str {
    match r {
        Route::Base => "base",
        Route::Manifest { .. } => "manifest",
        Route::Blob { .. } => "blob",
        Route::TagsList { .. } => "tags",
        Route::Metrics => "metrics",
        Route::Health => "health",
        Route::Ready => "ready",
        Route::Catalog => "catalog",
        Route::Token => "token",
        Route::ApiKeys { .. } => "api_keys",
        Route::Admin(_) => "admin",
        Route::Login(_) => "login",
        Route::Ui(_) => "ui",
        Route::Private { endpoint, .. } => match endpoint {
            Endpoint::Manifest(_) => "private_manifest",
            Endpoint::Blob(_) => "private_blob",
            Endpoint::Tags => "private_tags",
            Endpoint::Uploads | Endpoint::Upload(_) => "upload",
            Endpoint::Referrers(_) => "referrers",
        },
    }
}

fn route_upstream(r: &Route) -> Option<&str> {
    match r {
        Route::Manifest { target, .. }
        | Route::Blob { target, .. }
        | Route::TagsList { target, .. } => Some(&target.upstream),
        _ => None,
    }
}

pub(crate) type Headers = Vec<(&'static str, String)>;

const DOCKER_CONTENT_DIGEST: HeaderName = HeaderName::from_static("docker-content-digest");
const OCI_NAMESPACE: HeaderName = HeaderName::from_static("oci-namespace");

/// `Docker-Distribution-API-Version`, on every response.
const API_VERSION: HeaderName = HeaderName::from_static("docker-distribution-api-version");

/// A response header with `headers`, which must not hold `Content-Length`: the one
/// berth sends, `length`, is added with `Docker-Distribution-API-Version`.
///
/// Names and values arrive made and go straight into the header map, without Pingora's
/// map of header-name case: names go out in lowercase, as HTTP/2 carries them (HTTP/1.1
/// names are case-insensitive). Building the header with Pingora's `insert_header`
/// parsed every name again and kept a second map of their case.
fn response_header(status: u16, mut headers: HeaderMap, length: u64) -> Box<ResponseHeader> {
    headers.insert(API_VERSION, HeaderValue::from_static("registry/2.0"));
    // A 204 has no body and, per RFC 9110, no Content-Length.
    if status != 204 {
        headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(length));
    }
    let (mut parts, ()) = http::Response::new(()).into_parts();
    parts.status = http::StatusCode::from_u16(status).expect("valid status");
    parts.headers = headers;
    Box::new(ResponseHeader::from(parts))
}

/// Room for the headers berth and Pingora add to every response (API version, length,
/// date, connection).
const ADDED_HEADERS: usize = 4;

/// The response header of a manifest: its media type, digest and ETag, `OCI-Namespace`
/// for the `?ns=` form, and a warning when it is served stale.
fn manifest_header(
    m: &berth_cache::Manifest,
    ns_header: Option<HeaderValue>,
    outcome: Outcome,
) -> Box<ResponseHeader> {
    let mut headers = HeaderMap::with_capacity(5 + ADDED_HEADERS);
    if let Some(v) = &m.headers.content_type {
        headers.insert(http::header::CONTENT_TYPE, v.clone());
    }
    headers.insert(DOCKER_CONTENT_DIGEST, m.headers.digest.clone());
    headers.insert(http::header::ETAG, m.headers.etag.clone());
    if let Some(v) = ns_header {
        headers.insert(OCI_NAMESPACE, v);
    }
    if outcome == Outcome::Stale {
        headers.insert(
            http::header::WARNING,
            HeaderValue::from_static(STALE_WARNING),
        );
    }
    response_header(200, headers, m.body.len() as u64)
}

fn header(status: u16, headers: &Headers, length: u64) -> Box<ResponseHeader> {
    let mut map = HeaderMap::with_capacity(headers.len() + ADDED_HEADERS);
    for (k, v) in headers {
        // Values come from validated routes and upstream metadata; skip any that is not a
        // valid header value rather than fail the response.
        if let (Ok(k), Ok(v)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            map.append(k, v);
        }
    }
    response_header(status, map, length)
}

impl App {
    async fn serve(
        &self,
        session: &mut ServerSession,
        req: &Request,
        route: &Result<Route, ApiError>,
        who: &Result<Identity, AuthError>,
    ) -> Served {
        let route = match route {
            Ok(r) => r,
            Err(e) => {
                return refuse(session, req, e).await;
            }
        };
        let who = match who {
            Ok(who) => who,
            Err(AuthError::TooManyFailures) => {
                session.set_keepalive(None);
                let e = ApiError::new(
                    Code::TooManyRequests,
                    format!(
                        "too many failed logins from this address: try again in {} s",
                        crate::auth::FAILURE_WINDOW.as_secs()
                    ),
                );
                return send_error(session, &e, req.is_head()).await;
            }
            Err(AuthError::Rejected(why)) => {
                let e = ApiError::new(
                    Code::Unauthorized,
                    format!("the token was not accepted: {why}"),
                )
                .with_headers(vec![(
                    "WWW-Authenticate",
                    self.auth.challenge(None, req.local),
                )]);
                return refuse(session, req, &e).await;
            }
            Err(AuthError::BadCredentials) => {
                let e = ApiError::new(
                    Code::Unauthorized,
                    "the credentials were not accepted: check the user name and password, or log in again for a new token",
                )
                .with_headers(vec![("WWW-Authenticate", self.auth.challenge(None, req.local))]);
                return refuse(session, req, &e).await;
            }
        };
        if let Err(e) = self.authorize(who, req, route) {
            return refuse(session, req, &e).await;
        }
        if let Route::ApiKeys { id } = route {
            let result = Box::pin(self.api_keys(session, req, who, id.as_deref())).await;
            return match result {
                Ok(s) => s,
                Err(e) => refuse(session, req, &e).await,
            };
        }
        if let Route::Admin(admin) = route {
            let result = match self.check_admin(who, req) {
                Ok(()) => Box::pin(self.admin(session, req, admin)).await,
                Err(e) => Err(e),
            };
            return match result {
                Ok(s) => s,
                Err(e) => refuse(session, req, &e).await,
            };
        }
        if let Route::Login(page) = route {
            return match Box::pin(self.login_pages(session, req, who, page)).await {
                Ok(s) => s,
                Err(e) => refuse(session, req, &e).await,
            };
        }
        if let Route::Ui(ui) = route {
            return match Box::pin(self.ui(session, req, who, ui)).await {
                Ok(s) => s,
                Err(e) => refuse(session, req, &e).await,
            };
        }
        if let Route::Private { repo, endpoint } = route {
            return match Box::pin(self.private(session, req, who, repo, endpoint)).await {
                Ok(s) => s,
                Err(e) => send_error(session, &e, req.is_head()).await,
            };
        }
        if !req.is_read() {
            let e = match route {
                Route::Manifest { target, .. }
                | Route::Blob { target, .. }
                | Route::TagsList { target, .. } => crate::route::read_only(target),
                _ => ApiError::new(
                    Code::Unsupported,
                    format!("{} is not supported on {}", req.method, req.path),
                ),
            };
            return refuse(session, req, &e).await;
        }
        let result = match route {
            Route::Base => Ok(send_bytes(
                session,
                200,
                vec![("Content-Type", "application/json".into())],
                Bytes::from_static(b"{}"),
                req.is_head(),
                None,
            )
            .await),
            Route::Health => Ok(send_bytes(
                session,
                200,
                vec![("Content-Type", "text/plain".into())],
                Bytes::from_static(b"ok\n"),
                req.is_head(),
                None,
            )
            .await),
            Route::Ready => {
                let (status, body) = if req.draining {
                    (
                        503,
                        "stopping: requests in flight are finishing\n".to_owned(),
                    )
                } else {
                    match self.blocking(|r| r.check_store()).await {
                        Ok(()) => (200, "ready\n".to_owned()),
                        Err(e) => {
                            tracing::warn!(error = ?e, "not ready: the store does not answer");
                            (
                                503,
                                "not ready: the store does not answer (see the log)\n".into(),
                            )
                        }
                    }
                };
                Ok(send_bytes(
                    session,
                    status,
                    vec![("Content-Type", "text/plain".into())],
                    Bytes::from(body),
                    req.is_head(),
                    None,
                )
                .await)
            }
            Route::Metrics => {
                let (content_type, body) = self
                    .metrics
                    .render_for(req.accept.as_deref(), self.cache.fills_in_progress());
                Ok(send_bytes(
                    session,
                    200,
                    vec![("Content-Type", content_type.to_owned())],
                    Bytes::from(body),
                    req.is_head(),
                    None,
                )
                .await)
            }
            Route::Manifest { target, reference } => {
                let memo = *who == Identity::Anonymous && req.authorization.is_none();
                self.manifest(session, req, target, reference, memo).await
            }
            Route::Blob { target, digest } => {
                Box::pin(self.blob(session, req, target, digest)).await
            }
            Route::Catalog => Box::pin(self.catalog(session, req, who)).await,
            Route::Token => Box::pin(self.token(session, req)).await,
            Route::ApiKeys { .. } | Route::Admin(_) | Route::Login(_) | Route::Ui(_) => {
                unreachable!("served above")
            }
            Route::Private { .. } => unreachable!("served above"),
            Route::TagsList { target, query } => {
                Box::pin(self.tags(session, req, target, query.as_deref())).await
            }
        };
        match result {
            Ok(s) => s,
            Err(e) => send_error(session, &e, req.is_head()).await,
        }
    }

    /// The request's identity, slowing and then refusing an address's failed logins.
    pub(crate) async fn authenticate(
        &self,
        req: &Request,
        client_ip: Option<std::net::IpAddr>,
    ) -> Result<Identity, AuthError> {
        if req.authorization.is_none() {
            return Ok(self
                .auth
                .session_identity(req.cookie.as_deref())
                .unwrap_or(Identity::Anonymous));
        }
        // Boxed: checking credentials can wait on a provider or on bcrypt, and that future
        // would otherwise make every request's future larger.
        Box::pin(self.check_credentials(req, client_ip)).await
    }

    async fn check_credentials(
        &self,
        req: &Request,
        client_ip: Option<std::net::IpAddr>,
    ) -> Result<Identity, AuthError> {
        if client_ip.is_some_and(|ip| self.logins.blocked(ip)) {
            return Err(AuthError::TooManyFailures);
        }
        let result = self.auth.authenticate(req.authorization.as_deref()).await;
        if result.is_err() {
            if let Some(ip) = client_ip {
                self.logins.failed(ip);
            }
            tokio::time::sleep(crate::auth::FAILURE_DELAY).await;
        }
        result
    }

    /// Checks that `who` may do what `req` asks of `route`: 401 with a challenge for a
    /// request without (valid) credentials, 403 for a user the policies do not allow.
    fn authorize(&self, who: &Identity, req: &Request, route: &Route) -> Result<(), ApiError> {
        if !self.auth.enabled() {
            // Pushes, deletes and uploads of private repositories (pull-through ones are
            // read-only anyway).
            return match self.auth.mode().refuses_writes() {
                Some(why) if !req.is_read() && matches!(route, Route::Private { .. }) => {
                    Err(ApiError::new(Code::Denied, why))
                }
                _ => Ok(()),
            };
        }
        let write = !req.is_read();
        let (path, action) = match route {
            // /api/keys checks its callers itself (a password login to make a key).
            // /admin checks its callers itself (administrators only).
            // The web pages show each viewer what they may see (see `ui/mod.rs`).
            Route::Health
            | Route::Ready
            | Route::Token
            | Route::ApiKeys { .. }
            | Route::Admin(_)
            | Route::Login(_)
            | Route::Ui(_) => return Ok(()),
            Route::Catalog => {
                if *who == Identity::Anonymous && !self.auth.anonymous_may_read() {
                    let scope = Some("registry:catalog:*".to_owned());
                    return Err(self.deny(req, who, "the catalog", scope));
                }
                return Ok(());
            }
            Route::Base => {
                // Clients log in when /v2/ asks them to.
                if *who == Identity::Anonymous && !self.auth.anonymous_can_do_anything() {
                    return Err(self.deny(req, who, "the registry", None));
                }
                return Ok(());
            }
            Route::Metrics => {
                return if self.auth.allows_metrics(who) {
                    Ok(())
                } else {
                    Err(self.deny(req, who, "/metrics", None))
                };
            }
            Route::Manifest { target, .. }
            | Route::Blob { target, .. }
            | Route::TagsList { target, .. } => {
                if write {
                    // Refused as read-only by the caller.
                    return Ok(());
                }
                (format!("{}/{}", target.upstream, target.repo), Action::Read)
            }
            Route::Private { repo, endpoint } => {
                let action = match (endpoint, req.method.as_str()) {
                    (_, "GET" | "HEAD") if !matches!(endpoint, Endpoint::Upload(_)) => Action::Read,
                    (Endpoint::Manifest(_) | Endpoint::Blob(_), "DELETE") => Action::Delete,
                    // Uploads and manifest pushes; moving a tag also needs update, checked
                    // once the pushed manifest's digest is known.
                    _ => Action::Create,
                };
                (repo.clone(), action)
            }
        };
        if self.auth.allows(who, &path, action) {
            Ok(())
        } else {
            let scope = format!("repository:{path}:{}", scope_actions(action));
            Err(self.deny(
                req,
                who,
                &format!("{} on {path}", action.as_str()),
                Some(scope),
            ))
        }
    }

    /// `memo`: the answer may be remembered for the next identical request (see
    /// `memo.rs`): the request has no credentials and the policies let anyone read it.
    async fn manifest(
        &self,
        session: &mut ServerSession,
        req: &Request,
        target: &Target,
        reference: &Reference,
        memo: bool,
    ) -> Result<Served, ApiError> {
        let (m, outcome, valid) = self
            .cache
            .manifest_answer(
                &target.upstream,
                &target.repo,
                reference,
                req.accept.as_deref(),
            )
            .await
            .map_err(|e| {
                ApiError::from_cache(
                    &e,
                    Subject::Manifest,
                    &format!("manifest {}/{}:{reference}", target.upstream, target.repo),
                )
            })?;
        let ns_header = (target.form == Form::Ns)
            .then(|| HeaderValue::from_str(&target.upstream).ok())
            .flatten();
        let resp = manifest_header(&m, ns_header, outcome);
        let body = m.body.clone();
        if let (true, Some(valid)) = (memo, valid) {
            crate::memo::remember(
                &req.path,
                req.query.as_deref(),
                req.accept.as_deref(),
                (&body, crate::memo::intern(&target.upstream)),
                valid,
                &resp,
            );
        }
        Ok(write_response(session, resp, body, req.is_head(), Some(outcome)).await)
    }

    async fn blob(
        &self,
        session: &mut ServerSession,
        req: &Request,
        target: &Target,
        digest: &berth_store::oci::Digest,
    ) -> Result<Served, ApiError> {
        let what = format!("blob {digest} of {}/{}", target.upstream, target.repo);
        let err = |e: &berth_cache::CacheError| ApiError::from_cache(e, Subject::Blob, &what);
        let mut headers = vec![
            ("Content-Type", "application/octet-stream".to_owned()),
            ("Docker-Content-Digest", digest.to_string()),
            ("Accept-Ranges", "bytes".to_owned()),
        ];
        ns_header(&mut headers, target);
        if req.is_head() {
            let (size, outcome) = self
                .cache
                .blob_size(&target.upstream, &target.repo, digest)
                .await
                .map_err(|e| err(&e))?;
            return Ok(send_head(session, 200, headers, size, Some(outcome)).await);
        }
        let (mut source, outcome) = self
            .cache
            .blob(&target.upstream, &target.repo, digest)
            .await
            .map_err(|e| err(&e))?;
        if let (Some(_), BlobSource::Filling { fill, .. }) = (&req.range, &source) {
            // A range is served only from a verified, published blob.
            fill.done().await.map_err(|e| err(&e))?;
            source = self
                .cache
                .blob(&target.upstream, &target.repo, digest)
                .await
                .map_err(|e| err(&e))?
                .0;
        }
        self.send_blob(session, req, source, headers, Some(outcome), &what)
            .await
    }

    /// Sends a blob (or the range of it the request asks for) from the store or from a
    /// fill in progress.
    pub(crate) async fn send_blob(
        &self,
        session: &mut ServerSession,
        req: &Request,
        source: BlobSource,
        mut headers: Headers,
        outcome: Option<Outcome>,
        what: &str,
    ) -> Result<Served, ApiError> {
        let size = source.size();
        let range = match req.range.as_deref().map(|r| parse_range(r, size)) {
            None | Some(Ok(None)) => None,
            Some(Ok(Some(r))) => Some(r),
            Some(Err(_)) => {
                headers.push(("Content-Range", format!("bytes */{size}")));
                let e = ApiError::new(
                    Code::RangeInvalid,
                    format!(
                        "range {:?} is outside the blob's {size} bytes",
                        req.range.as_deref().unwrap_or("")
                    ),
                );
                return Ok(send_error_with(session, &e, headers).await);
            }
        };
        if range.is_some() && !matches!(source, BlobSource::Stored { .. }) {
            return Err(ApiError::new(
                Code::Internal,
                format!("{what}: a range of a blob that is not verified yet"),
            ));
        }
        let (status, ByteRange { start, end }) = match range {
            Some(r) => {
                headers.push((
                    "Content-Range",
                    format!("bytes {}-{}/{size}", r.start, r.end - 1),
                ));
                (206, r)
            }
            None => (
                200,
                ByteRange {
                    start: 0,
                    end: size,
                },
            ),
        };
        // How the body is sent, settled before the header so that a failure here still
        // gets an error response.
        let body = match source {
            BlobSource::Stored { blob } => match (!self.tls && end - start >= SENDFILE_MIN)
                .then(|| Socket::of(session))
                .flatten()
            {
                Some(socket) => Body::SendFile(socket, blob),
                None => {
                    let (data, blob) = tokio::task::spawn_blocking(move || (blob.map(), blob))
                        .await
                        .map_err(|e| ApiError::new(Code::Internal, format!("{what}: {e}")))?;
                    let data = data.map_err(|e| {
                        ApiError::new(Code::Internal, format!("{what}: mapping it: {e}"))
                    })?;
                    Body::Mapped(data, blob)
                }
            },
            BlobSource::Direct(direct) => Body::Direct(direct),
            BlobSource::Filling { fill, .. } => {
                match (!self.tls).then(|| Socket::of(session)).flatten() {
                    Some(socket) => Body::SendFill(socket, fill),
                    None => Body::Fill(fill),
                }
            }
        };
        if matches!(body, Body::SendFile(..) | Body::SendFill(..)) {
            // The body bypasses the session: it must write and flush the header and then
            // expect no body, exactly as for a HEAD request.
            session.req_header_mut().set_method(http::Method::HEAD);
        }
        if let Body::SendFile(socket, _) = &body {
            // A stored body's first bytes are ready at once: the header waits for them.
            // (A fill's may not be, and its header goes at once.)
            socket.cork();
        }
        if session
            .write_response_header(header(status, &headers, end - start))
            .await
            .is_err()
        {
            return Ok(Served::failed(status));
        }
        let mut served = Served {
            status,
            bytes: 0,
            outcome,
            complete: false,
        };
        let result = match body {
            Body::SendFile(socket, blob) => socket
                .send_file(
                    blob.file(),
                    start,
                    end,
                    CLIENT_WRITE_TIMEOUT,
                    &mut served.bytes,
                )
                .await
                .map_err(|e| e.to_string()),
            Body::Mapped(data, _pinned) => {
                write_mapped(session, &data, start, end, &mut served).await
            }
            Body::Direct(direct) => {
                write_chunks(session, Chunks::Direct(direct), size, &mut served).await
            }
            Body::SendFill(socket, fill) => {
                let mut reader = fill.reader();
                loop {
                    match reader.next_span().await {
                        Ok(Some((file, offset, len))) => {
                            // Full segments within the span; its end goes at once.
                            socket.cork();
                            let sent = socket
                                .send_file(
                                    &file,
                                    offset,
                                    offset + len,
                                    CLIENT_WRITE_TIMEOUT,
                                    &mut served.bytes,
                                )
                                .await;
                            if let Err(e) = sent {
                                break Err(e.to_string());
                            }
                        }
                        Ok(None) => break Ok(()),
                        Err(e) => break Err(e.to_string()),
                    }
                }
            }
            Body::Fill(fill) => {
                write_chunks(session, Chunks::Fill(fill.reader()), size, &mut served).await
            }
        };
        match result {
            Ok(()) => served.complete = true,
            Err(e) => {
                tracing::warn!(blob = %what, error = %e, sent = served.bytes,
                    "blob response aborted; closing the client connection");
            }
        }
        Ok(served)
    }

    async fn tags(
        &self,
        session: &mut ServerSession,
        req: &Request,
        target: &Target,
        query: Option<&str>,
    ) -> Result<Served, ApiError> {
        let (body, content_type, link) = self
            .cache
            .tags_list(&target.upstream, &target.repo, query)
            .await
            .map_err(|e| {
                ApiError::from_cache(
                    &e,
                    Subject::Tags,
                    &format!("tags of {}/{}", target.upstream, target.repo),
                )
            })?;
        let mut headers = vec![(
            "Content-Type",
            content_type.unwrap_or_else(|| "application/json".into()),
        )];
        if let Some(link) = link {
            headers.push(("Link", rewrite_link(&link, target)));
        }
        ns_header(&mut headers, target);
        Ok(send_bytes(session, 200, headers, body, req.is_head(), None).await)
    }
}

/// Points an upstream pagination `Link` back at berth's path for the same repository.
fn rewrite_link(link: &str, target: &Target) -> String {
    match target.form {
        Form::Namespaced => {
            let upstream_path = format!("/v2/{}/tags/list", target.repo);
            let berth_path = format!("/v2/{}/{}/tags/list", target.upstream, target.repo);
            return link.replacen(&upstream_path, &berth_path, 1);
        }
        // The upstream's own path is the mirror's path.
        Form::Default => return link.to_owned(),
        Form::Ns => {}
    }
    // Keep containerd's form: the same path, with `ns` added to the query.
    match link.find('>') {
        Some(end) => {
            let sep = if link[..end].contains('?') { '&' } else { '?' };
            format!(
                "{}{sep}ns={}{}",
                &link[..end],
                target.upstream,
                &link[end..]
            )
        }
        None => link.to_owned(),
    }
}

fn ns_header(headers: &mut Headers, target: &Target) {
    if target.form == Form::Ns {
        headers.push(("OCI-Namespace", target.upstream.clone()));
    }
}

/// The actions a client should ask a token for, to do `action`.
pub(crate) fn scope_actions(action: Action) -> &'static str {
    match action {
        Action::Read => "pull",
        Action::Create | Action::Update => "pull,push",
        Action::Delete => "delete",
    }
}

impl App {
    /// The refusal of `what`: 401 with a challenge when the request had no credentials
    /// (so that clients log in, for `scope` when given), 403 for a user who may not.
    pub(crate) fn deny(
        &self,
        req: &Request,
        who: &Identity,
        what: &str,
        scope: Option<String>,
    ) -> ApiError {
        match who {
            Identity::Anonymous => ApiError::new(
                Code::Unauthorized,
                format!("authentication is required for {what}"),
            )
            .with_headers(vec![(
                "WWW-Authenticate",
                self.auth.challenge(scope.as_deref(), req.local),
            )]),
            // A token that does not cover the request: the client asks for another, for
            // this scope (the token service grants only what the policies allow).
            Identity::User {
                grants: Some(_), ..
            } => ApiError::new(
                Code::Unauthorized,
                format!("the token does not grant {what}"),
            )
            .with_headers(vec![(
                "WWW-Authenticate",
                self.auth.challenge(scope.as_deref(), req.local),
            )]),
            Identity::User { name, .. } => {
                ApiError::new(Code::Denied, format!("user {name} is not allowed {what}"))
            }
        }
    }
}

/// How a blob response's body is sent.
enum Body {
    /// A stored blob, from its file straight into the client's socket.
    SendFile(Socket, StoredBlob),
    /// A stored blob, mapped and written through the session (pinned while it is).
    Mapped(Bytes, StoredBlob),
    /// A fill in progress, from the file being written straight into the client's
    /// socket as it grows.
    SendFill(Socket, Arc<BlobFill>),
    /// A fill in progress, read as it grows and written through the session.
    Fill(Arc<BlobFill>),
    /// Straight from the upstream, not stored (the disk is full).
    Direct(Box<berth_cache::direct::DirectBlob>),
}

/// A blob body that arrives in chunks: a fill's reader, or an upstream's body.
enum Chunks {
    Fill(berth_cache::fill::FillReader),
    Direct(Box<berth_cache::direct::DirectBlob>),
}

impl Chunks {
    async fn next(&mut self) -> Result<Option<Bytes>, berth_cache::CacheError> {
        match self {
            Chunks::Fill(reader) => reader.next().await,
            Chunks::Direct(direct) => direct.next().await,
        }
    }
}

/// Writes a blob of `size` bytes through the session as its chunks arrive.
async fn write_chunks(
    session: &mut ServerSession,
    mut chunks: Chunks,
    size: u64,
    served: &mut Served,
) -> Result<(), String> {
    loop {
        match chunks.next().await {
            Ok(Some(chunk)) => {
                let len = chunk.len() as u64;
                let last = served.bytes + len == size;
                if session.write_response_body(chunk, last).await.is_err() {
                    return Err("client went away".into());
                }
                served.bytes += len;
            }
            Ok(None) => return Ok(()),
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Writes bytes `start..end` of a mapped blob through the session.
async fn write_mapped(
    session: &mut ServerSession,
    data: &Bytes,
    start: u64,
    end: u64,
    served: &mut Served,
) -> Result<(), String> {
    let mut offset = start;
    while offset < end {
        let next = (offset + SERVE_CHUNK).min(end);
        let chunk = data.slice(offset as usize..next as usize);
        if session
            .write_response_body(chunk, next == end)
            .await
            .is_err()
        {
            return Err("client went away".into());
        }
        served.bytes += next - offset;
        offset = next;
    }
    Ok(())
}

pub(crate) async fn send_head(
    session: &mut ServerSession,
    status: u16,
    headers: Headers,
    length: u64,
    outcome: Option<Outcome>,
) -> Served {
    write_head(session, header(status, &headers, length), outcome).await
}

async fn write_head(
    session: &mut ServerSession,
    resp: Box<ResponseHeader>,
    outcome: Option<Outcome>,
) -> Served {
    let status = resp.status.as_u16();
    let ok =
        session.write_response_header(resp).await.is_ok() && session.finish_body().await.is_ok();
    Served {
        status,
        bytes: 0,
        outcome,
        complete: ok,
    }
}

pub(crate) async fn send_bytes(
    session: &mut ServerSession,
    status: u16,
    headers: Headers,
    body: Bytes,
    head: bool,
    outcome: Option<Outcome>,
) -> Served {
    let resp = header(status, &headers, body.len() as u64);
    write_response(session, resp, body, head, outcome).await
}

/// Writes `resp` and then `body`, or only `resp` for a HEAD request.
async fn write_response(
    session: &mut ServerSession,
    resp: Box<ResponseHeader>,
    body: Bytes,
    head: bool,
    outcome: Option<Outcome>,
) -> Served {
    if head {
        return write_head(session, resp, outcome).await;
    }
    let status = resp.status.as_u16();
    let len = body.len() as u64;
    let ok = session.write_response_header(resp).await.is_ok()
        && session.write_response_body(body, true).await.is_ok();
    Served {
        status,
        bytes: if ok { len } else { 0 },
        outcome,
        complete: ok,
    }
}

/// An error answered before the request's body was read: a request that may have one
/// does not keep its connection.
async fn refuse(session: &mut ServerSession, req: &Request, e: &ApiError) -> Served {
    if !req.is_read() {
        session.set_keepalive(None);
    }
    send_error(session, e, req.is_head()).await
}

async fn send_error(session: &mut ServerSession, e: &ApiError, head: bool) -> Served {
    let mut headers = e.headers.clone();
    headers.push(("Content-Type", "application/json".to_owned()));
    if head {
        return send_head(session, e.status(), headers, e.body().len() as u64, None).await;
    }
    send_error_with(session, e, headers).await
}

async fn send_error_with(
    session: &mut ServerSession,
    e: &ApiError,
    mut headers: Headers,
) -> Served {
    headers.retain(|(k, _)| *k != "Content-Type" && *k != "Docker-Content-Digest");
    headers.extend(e.headers.iter().cloned());
    headers.push(("Content-Type", "application/json".to_owned()));
    send_bytes(
        session,
        e.status(),
        headers,
        Bytes::from(e.body()),
        false,
        None,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_point_back_at_berth() {
        let t = Target {
            upstream: "docker.io".into(),
            repo: "library/nginx".into(),
            form: Form::Namespaced,
        };
        assert_eq!(
            rewrite_link("</v2/library/nginx/tags/list?last=b&n=2>; rel=\"next\"", &t),
            "</v2/docker.io/library/nginx/tags/list?last=b&n=2>; rel=\"next\""
        );
    }

    #[test]
    fn links_keep_the_ns_form() {
        let t = Target {
            upstream: "docker.io".into(),
            repo: "library/nginx".into(),
            form: Form::Ns,
        };
        assert_eq!(
            rewrite_link("</v2/library/nginx/tags/list?last=b&n=2>; rel=\"next\"", &t),
            "</v2/library/nginx/tags/list?last=b&n=2&ns=docker.io>; rel=\"next\""
        );
    }

    #[test]
    fn links_keep_the_default_mirror_form() {
        let t = Target {
            upstream: "docker.io".into(),
            repo: "library/nginx".into(),
            form: Form::Default,
        };
        let link = "</v2/library/nginx/tags/list?last=b&n=2>; rel=\"next\"";
        assert_eq!(rewrite_link(link, &t), link);
    }
}
