//! berth's web pages: server-rendered HTML (askama templates under `proxy/templates/`,
//! checked at compile time and escaped by default), readable without JavaScript, with no
//! external assets and no front-end build step.
//!
//! - `GET /` answers `303 See Other` to `/ui`;
//! - `GET /ui` is the status page ([`status`]).
//!
//! Every page extends `templates/base.html`: a `<nav>` with the pages and either who is
//! logged in (`#whoami`, and a logout form) or a link to `/login`. The page handlers get
//! the request's [`Identity`] from [`App::authenticate`]; they never parse credentials or
//! cookies themselves. Who sees what on each page is decided there, from `[access]`, and
//! a page is served to anyone who asks: a viewer who may see nothing gets the page with
//! what they may see (perhaps nothing, and a hint to log in), never a `401`/`403` page.
//!
//! Every HTML answer carries the headers of [`App::html_headers`]: no caching, no
//! framing, a Content-Security-Policy that allows no script at all, and no referrer.

pub mod status;

use bytes::Bytes;
use pingora::protocols::http::ServerSession;

use crate::auth::Identity;
use crate::errors::{ApiError, Code};
use crate::server::{send_bytes, App, Headers, Request, Served};

/// A web page's route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UiRoute {
    /// `/`: sends browsers to the status page.
    Root,
    /// `/ui`: the status page.
    Status,
}

impl UiRoute {
    /// The methods the page answers (the `Allow` header of a refusal).
    pub fn allowed(&self) -> &'static str {
        match self {
            UiRoute::Root | UiRoute::Status => "GET, HEAD",
        }
    }
}

/// The web page `path` names, if it names one.
pub fn parse(path: &str) -> Option<UiRoute> {
    match path {
        "/" => Some(UiRoute::Root),
        "/ui" | "/ui/" => Some(UiRoute::Status),
        _ => None,
    }
}

/// What the base layout (`templates/base.html`) shows on every page.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Layout {
    /// The page's title (also its first heading).
    pub title: String,
    /// Who is logged in; `None`: anonymous (the nav links to `/login`).
    pub user: Option<String>,
    /// The CSRF token of the logout form (the browser session's, when there is one).
    pub csrf: Option<String>,
}

impl Layout {
    /// The layout of a page titled `title` for `who`.
    pub fn new(title: &str, who: &Identity, csrf: Option<String>) -> Self {
        Layout {
            title: title.to_owned(),
            user: match who {
                Identity::Anonymous => None,
                Identity::User { name, .. } => Some(name.clone()),
            },
            csrf,
        }
    }
}

impl App {
    /// Serves the web page `route` asks for.
    pub(crate) async fn ui(
        &self,
        session: &mut ServerSession,
        req: &Request,
        who: &Identity,
        route: &UiRoute,
    ) -> Result<Served, ApiError> {
        match (route, req.method.as_str()) {
            (UiRoute::Root, "GET" | "HEAD") => Ok(see_other(session, req, "/ui", Vec::new()).await),
            (UiRoute::Status, "GET" | "HEAD") => {
                let html = self.status_page(who, self.session_csrf(req)).await?;
                Ok(self.send_html(session, req, 200, html, Vec::new()).await)
            }
            _ => {
                let allowed = route.allowed();
                Err(ApiError::new(
                    Code::Unsupported,
                    format!(
                        "{} is not supported on {}: use {allowed}",
                        req.method, req.path
                    ),
                )
                .with_headers(vec![("Allow", allowed.to_owned())]))
            }
        }
    }

    /// The `Content-Security-Policy` of every page: no scripts, no external content;
    /// styles only inline; forms post only to berth.
    pub(crate) fn content_security_policy(&self) -> String {
        "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; form-action 'self'; \
         frame-ancestors 'none'"
            .to_owned()
    }

    /// The headers of every HTML answer.
    pub(crate) fn html_headers(&self) -> Headers {
        vec![
            ("Content-Type", "text/html; charset=utf-8".to_owned()),
            ("Cache-Control", "no-store".to_owned()),
            ("X-Frame-Options", "DENY".to_owned()),
            ("Content-Security-Policy", self.content_security_policy()),
            ("Referrer-Policy", "no-referrer".to_owned()),
            ("X-Content-Type-Options", "nosniff".to_owned()),
        ]
    }

    /// Sends a rendered page with [`App::html_headers`] and `extra` (cookies), the body
    /// left out for `HEAD`.
    pub(crate) async fn send_html(
        &self,
        session: &mut ServerSession,
        req: &Request,
        status: u16,
        html: String,
        mut extra: Headers,
    ) -> Served {
        extra.extend(self.html_headers());
        send_bytes(
            session,
            status,
            extra,
            Bytes::from(html),
            req.is_head(),
            None,
        )
        .await
    }
}

/// `303 See Other` to `location`, setting `cookies` (`Set-Cookie` values).
pub(crate) async fn see_other(
    session: &mut ServerSession,
    req: &Request,
    location: &str,
    cookies: Vec<String>,
) -> Served {
    let mut headers = vec![
        ("Location", location.to_owned()),
        ("Cache-Control", "no-store".to_owned()),
    ];
    headers.extend(cookies.into_iter().map(|c| ("Set-Cookie", c)));
    send_bytes(session, 303, headers, Bytes::new(), req.is_head(), None).await
}

/// Renders a template, turning a failure (a value that would not format) into a `500`.
pub(crate) fn render(page: &impl askama::Template) -> Result<String, ApiError> {
    page.render()
        .map_err(|e| ApiError::new(Code::Internal, format!("rendering the page: {e}")))
}

/// Bytes for people: `512 B`, `12.3 MiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// A time for people, in UTC to the second (`2026-05-01T12:34:56Z`).
pub fn human_time(ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_seconds(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        assert_eq!(parse("/"), Some(UiRoute::Root));
        assert_eq!(parse("/ui"), Some(UiRoute::Status));
        assert_eq!(parse("/ui/"), Some(UiRoute::Status));
        assert_eq!(parse("/uix"), None);
        assert_eq!(parse("/v2/"), None);
    }

    #[test]
    fn units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1024), "1.0 KiB");
        assert_eq!(human_bytes(12_897_484), "12.3 MiB");
        assert_eq!(human_bytes(u64::MAX), "16.0 EiB");
        assert_eq!(human_time(1_700_000_000_123), "2023-11-14T22:13:20Z");
    }
}
