//! The status page, `/ui`: what this berth node is doing and what it holds.
//!
//! What it shows, and where each figure comes from:
//! - the hit ratio, hits and misses: every manifest and blob request served for an
//!   upstream's repository, counted as it is served ([`berth_cache::stats`]: a hit is
//!   served from the store, a revalidated or stale tag included; a miss needed the
//!   upstream, a join of another request's fetch included);
//! - per upstream: body bytes served to clients and fetched from the upstream (the
//!   `berth_upstream_bytes` counter), its health (`ok`, `failing`: its latest request
//!   failed, `circuit open`: the circuit breaker is open), its last error and when, and
//!   whether stale content is being served (a stale tag was served since the upstream
//!   last answered);
//! - the disk: the store's blob bytes as the budget loop measures them, against
//!   `[cache] max_size` (or, without one, the filesystem less `min_free`), and the
//!   filesystem's free space;
//! - blob fills in progress;
//! - the cache's contents: each pulled-through repository with its size and last pull
//!   ([`berth_cache::contents`]), the most recently pulled first;
//! - the private repositories and their tags.
//!
//! Who sees what follows `[access]`: the node's figures (everything above but the two
//! lists) follow the rule of `/metrics` ([`crate::auth::Auth::allows_metrics`]); each
//! repository of either list is shown only to a viewer who may read it
//! ([`crate::auth::Auth::allows`] with `read`, on `upstream/repo` for a pulled-through
//! one, as a pull names it). The page itself is never refused: a viewer who may see
//! nothing gets it with nothing in it, and, when anonymous (and `[access]` hides
//! something from them), a hint to log in.
//!
//! The two lists come from one read of the store (the cache's index, the private
//! repositories and their tags) on the blocking pool, kept for [`CONTENTS_TTL`] (by
//! berth's clock, [`berth_cache::clock`], which tests move forward to see new content) and
//! shared by every viewer (each sees the part they may read), so that reloading the page
//! in a loop does not load the node: one read runs at a time, and it finishes (and is
//! kept) even if the viewer who started it goes away. Each list shows at most
//! [`MAX_ROWS`] repositories and says how many more there are.

use std::sync::Arc;
use std::time::Duration;

use askama::Template;

use berth_cache::contents::CachedRepo;
use berth_cache::stats::UpstreamStatus;
use berth_cache::{Budget, Cache, Disk};
use berth_config::access::Action;
use berth_registry::{Registry, RegistryError};

use super::{human_bytes, human_time, render, Layout};
use crate::auth::Identity;
use crate::errors::ApiError;
use crate::server::App;

/// How long one read of the store's contents is shown before the next page view reads
/// it again.
pub const CONTENTS_TTL: Duration = Duration::from_secs(30);
/// The most repositories each list shows.
pub const MAX_ROWS: usize = 200;
/// The most tags shown for one private repository.
pub const MAX_TAGS: usize = 50;
/// The most repositories of each kind one read of the store keeps: the most recently
/// pulled cached ones, the first private ones by name.
pub const CONTENTS_LIMIT: usize = 20_000;

/// One read of what the store holds.
#[derive(Debug)]
pub struct Contents {
    /// When it was read (ms since the epoch, by the cache's clock).
    pub at_ms: u64,
    /// The most recently pulled first; at most [`CONTENTS_LIMIT`].
    pub cached: Vec<CachedRepo>,
    /// Pulled-through repositories left out past [`CONTENTS_LIMIT`].
    pub cached_left_out: usize,
    /// By name; at most [`CONTENTS_LIMIT`].
    pub private: Vec<PrivateRepo>,
    /// More private repositories than [`CONTENTS_LIMIT`] exist.
    pub private_left_out: bool,
}

/// A private repository and its first tags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrivateRepo {
    pub name: String,
    /// At most [`MAX_TAGS`], in lexical order.
    pub tags: Vec<String>,
    /// It has more tags than those.
    pub more_tags: bool,
}

/// The last read of the store's contents, shared by every page view.
#[derive(Debug, Default)]
pub struct ContentsCache {
    slot: Arc<tokio::sync::Mutex<Option<Arc<Contents>>>>,
}

impl ContentsCache {
    /// The contents read at most [`CONTENTS_TTL`] ago, or read now: one read at a time,
    /// in a task of its own that keeps its answer even if the caller goes away.
    pub async fn get(
        &self,
        cache: &Arc<Cache>,
        registry: &Arc<Registry>,
    ) -> Result<Arc<Contents>, String> {
        let mut slot = self.slot.clone().lock_owned().await;
        let now = cache.now_ms();
        let ttl = CONTENTS_TTL.as_millis() as u64;
        // By berth's clock, so that a test moves it; a clock set back reads again.
        if let Some(c) = slot
            .as_ref()
            .filter(|c| c.at_ms <= now && now - c.at_ms < ttl)
        {
            return Ok(c.clone());
        }
        let (cache, registry) = (cache.clone(), registry.clone());
        let task = tokio::spawn(async move {
            let contents = read_contents(&cache, registry).await?;
            let contents = Arc::new(contents);
            *slot = Some(contents.clone());
            Ok::<_, String>(contents)
        });
        task.await
            .map_err(|e| format!("reading the store's contents failed: {e}"))?
    }
}

async fn read_contents(cache: &Cache, registry: Arc<Registry>) -> Result<Contents, String> {
    let at_ms = cache.now_ms();
    let mut cached = cache
        .cached_repositories()
        .await
        .map_err(|e| format!("reading the cache's index: {e}"))?;
    let cached_left_out = cached.len().saturating_sub(CONTENTS_LIMIT);
    cached.truncate(CONTENTS_LIMIT);
    let (private, private_left_out) = tokio::task::spawn_blocking(move || private_repos(&registry))
        .await
        .map_err(|e| format!("listing the private repositories failed: {e}"))?
        .map_err(|e| format!("listing the private repositories: {e}"))?;
    Ok(Contents {
        at_ms,
        cached,
        cached_left_out,
        private,
        private_left_out,
    })
}

/// The first [`CONTENTS_LIMIT`] private repositories with their first tags, and whether
/// there are more. Blocks.
fn private_repos(registry: &Registry) -> Result<(Vec<PrivateRepo>, bool), RegistryError> {
    let mut out = Vec::new();
    let mut last: Option<String> = None;
    loop {
        let page = registry.catalog(Some(500), last.as_deref())?;
        for name in page.items {
            if out.len() == CONTENTS_LIMIT {
                return Ok((out, true));
            }
            let (tags, more_tags) = match registry.tags(&name, Some(MAX_TAGS), None) {
                Ok(p) => (p.items, p.more),
                // Deleted since the catalog was read.
                Err(RegistryError::NameUnknown(_)) => continue,
                Err(e) => return Err(e),
            };
            last = Some(name.clone());
            out.push(PrivateRepo {
                name,
                tags,
                more_tags,
            });
        }
        if !page.more {
            return Ok((out, false));
        }
    }
}

/// A figure as the page shows it: text for people, the raw number for machines
/// (`data-value`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Figure {
    pub text: String,
    pub value: String,
}

impl Figure {
    fn bytes(n: u64) -> Self {
        Figure {
            text: human_bytes(n),
            value: n.to_string(),
        }
    }

    fn count(n: u64) -> Self {
        Figure {
            text: n.to_string(),
            value: n.to_string(),
        }
    }

    /// A time (ms since the epoch), or `-` for none (`data-value` 0).
    fn time(ms: Option<u64>) -> Self {
        match ms {
            Some(ms) => Figure {
                text: human_time(ms),
                value: ms.to_string(),
            },
            None => Figure {
                text: "-".into(),
                value: "0".into(),
            },
        }
    }

    /// `hits / (hits + misses)`, or `-` (and an empty `data-value`) before any request.
    fn ratio(hits: u64, misses: u64) -> Self {
        match hits + misses {
            0 => Figure {
                text: "-".into(),
                value: String::new(),
            },
            all => {
                let r = hits as f64 / all as f64;
                Figure {
                    text: format!("{:.1}%", r * 100.0),
                    value: format!("{r:.4}"),
                }
            }
        }
    }
}

/// One upstream's row.
#[derive(Clone, Debug)]
pub struct UpstreamRow {
    pub name: String,
    pub hits: Figure,
    pub misses: Figure,
    pub bytes_served: Figure,
    pub bytes_fetched: Figure,
    pub health: &'static str,
    /// The last error's message, or `-`.
    pub last_error: String,
    /// When it happened.
    pub last_error_at: Figure,
    /// `serving stale` or `no`.
    pub stale: &'static str,
    /// When a stale tag was last served.
    pub last_stale: Figure,
}

impl From<&UpstreamStatus> for UpstreamRow {
    fn from(u: &UpstreamStatus) -> Self {
        UpstreamRow {
            name: u.namespace.clone(),
            hits: Figure::count(u.hits),
            misses: Figure::count(u.misses),
            bytes_served: Figure::bytes(u.bytes_served),
            bytes_fetched: Figure::bytes(u.bytes_fetched),
            health: u.health.as_str(),
            last_error: u
                .last_error
                .as_ref()
                .map_or_else(|| "-".to_owned(), |e| e.message.clone()),
            last_error_at: Figure::time(u.last_error.as_ref().map(|e| e.at_ms)),
            stale: if u.serving_stale {
                "serving stale"
            } else {
                "no"
            },
            last_stale: Figure::time((u.last_stale_ms > 0).then_some(u.last_stale_ms)),
        }
    }
}

/// The node's figures: for viewers who may read `/metrics`.
#[derive(Clone, Debug)]
pub struct Node {
    pub hit_ratio: Figure,
    pub hits: Figure,
    pub misses: Figure,
    /// `None` when the store could not be measured (`disk_error` says why).
    pub disk: Option<DiskView>,
    pub disk_error: Option<String>,
    pub fills_in_progress: Figure,
    pub upstreams: Vec<UpstreamRow>,
}

#[derive(Clone, Debug)]
pub struct DiskView {
    pub used: Figure,
    pub budget: Figure,
    /// Where the budget comes from.
    pub budget_source: &'static str,
    pub free: Figure,
}

impl From<&Disk> for DiskView {
    fn from(d: &Disk) -> Self {
        DiskView {
            used: Figure::bytes(d.used),
            budget: Figure::bytes(d.budget.bytes()),
            budget_source: match d.budget {
                Budget::MaxSize(_) => "[cache] max_size",
                Budget::Filesystem(_) => "the filesystem less [cache] min_free",
            },
            free: Figure::bytes(d.available),
        }
    }
}

impl Node {
    fn new(upstreams: &[UpstreamStatus], disk: Result<Disk, String>, fills: usize) -> Self {
        let hits = upstreams.iter().map(|u| u.hits).sum();
        let misses = upstreams.iter().map(|u| u.misses).sum();
        let (disk, disk_error) = match disk {
            Ok(d) => (Some(DiskView::from(&d)), None),
            Err(e) => (None, Some(e)),
        };
        Node {
            hit_ratio: Figure::ratio(hits, misses),
            hits: Figure::count(hits),
            misses: Figure::count(misses),
            disk,
            disk_error,
            fills_in_progress: Figure::count(fills as u64),
            upstreams: upstreams.iter().map(UpstreamRow::from).collect(),
        }
    }
}

/// A pulled-through repository's row.
#[derive(Clone, Debug)]
pub struct CacheRow {
    /// `upstream/repo`.
    pub name: String,
    pub size: Figure,
    pub last_pull: Figure,
}

/// A private repository's row.
#[derive(Clone, Debug)]
pub struct PrivateRow {
    pub name: String,
    /// Comma-separated.
    pub tags: String,
    pub more_tags: bool,
}

/// The page.
#[derive(Template)]
#[template(path = "status.html")]
pub struct StatusPage {
    pub layout: Layout,
    /// `None`: the viewer may not see the node's figures.
    pub node: Option<Node>,
    /// Anonymous, and `[access]` hides something: say that logging in may show more.
    pub login_hint: bool,
    /// Why the lists are missing, if the store could not be read.
    pub contents_error: Option<String>,
    /// When the lists were read.
    pub contents_at: String,
    pub cache_repos: Vec<CacheRow>,
    /// Readable pulled-through repositories not shown (past [`MAX_ROWS`]).
    pub cache_more: usize,
    pub private_repos: Vec<PrivateRow>,
    pub private_more: usize,
    /// The listing stopped at [`CONTENTS_LIMIT`] repositories.
    pub contents_cut: bool,
}

/// Who may see what on the page.
pub trait Viewer {
    fn sees_node(&self) -> bool;
    fn may_read(&self, path: &str) -> bool;
}

impl StatusPage {
    /// The page for `viewer` (`layout` says who they are; `anonymous_checked`: they are
    /// anonymous and `[access]` decides, so logging in may show more).
    pub fn build(
        layout: Layout,
        viewer: &impl Viewer,
        anonymous_checked: bool,
        node: impl FnOnce() -> Node,
        contents: Result<&Contents, String>,
    ) -> Self {
        let node = viewer.sees_node().then(node);
        let mut hidden = node.is_none();
        let mut page = StatusPage {
            layout,
            node,
            login_hint: false,
            contents_error: None,
            contents_at: String::new(),
            cache_repos: Vec::new(),
            cache_more: 0,
            private_repos: Vec::new(),
            private_more: 0,
            contents_cut: false,
        };
        match contents {
            Err(e) => page.contents_error = Some(e),
            Ok(c) => {
                page.contents_at = human_time(c.at_ms);
                page.contents_cut = c.cached_left_out > 0 || c.private_left_out;
                for r in &c.cached {
                    let name = format!("{}/{}", r.upstream, r.repo);
                    if !viewer.may_read(&name) {
                        hidden = true;
                    } else if page.cache_repos.len() < MAX_ROWS {
                        page.cache_repos.push(CacheRow {
                            name,
                            size: Figure::bytes(r.bytes),
                            last_pull: Figure::time(r.last_pull_ms),
                        });
                    } else {
                        page.cache_more += 1;
                    }
                }
                for r in &c.private {
                    if !viewer.may_read(&r.name) {
                        hidden = true;
                    } else if page.private_repos.len() < MAX_ROWS {
                        page.private_repos.push(PrivateRow {
                            name: r.name.clone(),
                            tags: r.tags.join(", "),
                            more_tags: r.more_tags,
                        });
                    } else {
                        page.private_more += 1;
                    }
                }
            }
        }
        page.login_hint = anonymous_checked && hidden;
        page
    }
}

/// A request's viewer, as `[access]` sees them.
struct AccessViewer<'a> {
    app: &'a App,
    who: &'a Identity,
}

impl Viewer for AccessViewer<'_> {
    fn sees_node(&self) -> bool {
        self.app.auth.allows_metrics(self.who)
    }

    fn may_read(&self, path: &str) -> bool {
        self.app.auth.allows(self.who, path, Action::Read)
    }
}

impl App {
    /// The status page for `who`, rendered.
    pub(crate) async fn status_page(
        &self,
        who: &Identity,
        csrf: Option<String>,
    ) -> Result<String, ApiError> {
        let viewer = AccessViewer { app: self, who };
        let disk = if viewer.sees_node() {
            Some(self.cache.disk().await.map_err(|e| e.to_string()))
        } else {
            None
        };
        let contents = self.ui_contents.get(&self.cache, &self.registry).await;
        if let Err(e) = &contents {
            tracing::warn!(error = %e, "status page: the store's contents could not be read");
        }
        let node = || {
            Node::new(
                &self.cache.upstream_status(),
                disk.unwrap_or_else(|| Err("not measured".into())),
                self.cache.fills_in_progress(),
            )
        };
        let anonymous_checked = *who == Identity::Anonymous && self.auth.enabled();
        // The session's CSRF token comes with browser logins (not yet).
        let layout = Layout::new("Status", who, csrf);
        let page = StatusPage::build(
            layout,
            &viewer,
            anonymous_checked,
            node,
            contents.as_deref().map_err(Clone::clone),
        );
        render(&page)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_cache::stats::{Health, LastError};

    struct Sees {
        node: bool,
        repos: &'static [&'static str],
    }

    impl Viewer for Sees {
        fn sees_node(&self) -> bool {
            self.node
        }
        fn may_read(&self, path: &str) -> bool {
            self.repos.contains(&path)
        }
    }

    fn upstream(name: &str) -> UpstreamStatus {
        UpstreamStatus {
            namespace: name.into(),
            hits: 3,
            misses: 1,
            bytes_served: 3 * 1024 * 1024,
            bytes_fetched: 1024,
            health: Health::Failing,
            last_error: Some(LastError {
                message: "upstream <b>x</b> answered \"HTTP 503\" & gave up".into(),
                at_ms: 1_700_000_000_000,
            }),
            serving_stale: true,
            last_stale_ms: 1_700_000_001_000,
        }
    }

    fn contents() -> Contents {
        Contents {
            at_ms: 1_700_000_002_000,
            cached: vec![
                CachedRepo {
                    upstream: "docker.io".into(),
                    repo: "library/nginx".into(),
                    bytes: 2048,
                    manifests: 1,
                    blobs: 2,
                    last_pull_ms: Some(1_700_000_000_500),
                },
                CachedRepo {
                    upstream: "ghcr.io".into(),
                    repo: "secret/app".into(),
                    bytes: 1,
                    manifests: 1,
                    blobs: 0,
                    last_pull_ms: None,
                },
            ],
            cached_left_out: 0,
            private: vec![
                PrivateRepo {
                    name: "team/<script>".into(),
                    tags: vec!["v1".into(), "v2&".into()],
                    more_tags: false,
                },
                PrivateRepo {
                    name: "other/app".into(),
                    tags: vec!["x".into()],
                    more_tags: true,
                },
            ],
            private_left_out: false,
        }
    }

    fn node() -> Node {
        let disk = Disk {
            used: 10 * 1024 * 1024,
            budget: Budget::MaxSize(1 << 30),
            available: 5 << 30,
            total: 10 << 30,
        };
        Node::new(&[upstream("docker.io"), upstream("ghcr.io")], Ok(disk), 2)
    }

    fn page(viewer: &Sees, anonymous: bool) -> String {
        let layout = Layout {
            title: "Status".into(),
            user: (!anonymous).then(|| "alice".into()),
            csrf: None,
        };
        let c = contents();
        render(&StatusPage::build(layout, viewer, anonymous, node, Ok(&c))).unwrap()
    }

    #[test]
    fn the_node_figures_carry_their_ids_and_raw_values() {
        let html = page(
            &Sees {
                node: true,
                repos: &["docker.io/library/nginx"],
            },
            false,
        );
        for want in [
            r#"id="hit-ratio" data-value="0.7500">75.0%<"#,
            r#"id="hits" data-value="6">6<"#,
            r#"id="misses" data-value="2">2<"#,
            r#"id="disk-used" data-value="10485760">10.0 MiB<"#,
            r#"id="disk-budget" data-value="1073741824">1.0 GiB<"#,
            r#"id="disk-free" data-value="5368709120">5.0 GiB<"#,
            r#"id="fills-in-progress" data-value="2">2<"#,
            r#"<tr data-upstream="docker.io">"#,
            r#"bytes-served" data-value="3145728">3.0 MiB<"#,
            r#"bytes-fetched" data-value="1024">1.0 KiB<"#,
            r#"class="health">failing<"#,
            r#"class="stale" data-value="1700000001000">serving stale<"#,
            r#"<span id="whoami">alice</span>"#,
            r#"<form method="post" action="/logout">"#,
        ] {
            assert!(html.contains(want), "{want} missing from\n{html}");
        }
        assert!(!html.contains("login-hint"), "{html}");
    }

    #[test]
    fn names_and_errors_are_escaped() {
        let html = page(
            &Sees {
                node: true,
                repos: &["team/<script>"],
            },
            false,
        );
        assert!(!html.contains("<script>"), "{html}");
        assert!(!html.contains("<b>x</b>"), "{html}");
        assert!(html.contains("team/&#60;script&#62;"), "{html}");
        assert!(
            html.contains(
                "upstream &#60;b&#62;x&#60;/b&#62; answered &#34;HTTP 503&#34; &#38; gave up"
            ),
            "{html}"
        );
        assert!(html.contains("v1, v2&#38;"), "{html}");
    }

    #[test]
    fn a_viewer_sees_only_the_repositories_they_may_read() {
        let html = page(
            &Sees {
                node: true,
                repos: &["docker.io/library/nginx", "other/app"],
            },
            false,
        );
        assert!(
            html.contains(r#"<tr data-repo="docker.io/library/nginx">"#),
            "{html}"
        );
        assert!(
            html.contains(r#"size" data-value="2048">2.0 KiB<"#),
            "{html}"
        );
        assert!(
            html.contains(r#"class="last-pull" data-value="1700000000500">2023-11-14T22:13:20Z<"#),
            "{html}"
        );
        assert!(html.contains(r#"<tr data-repo="other/app">"#), "{html}");
        assert!(!html.contains("secret/app"), "{html}");
        assert!(!html.contains("script"), "{html}");
    }

    #[test]
    fn an_anonymous_viewer_without_metrics_gets_no_figures_and_a_hint_to_log_in() {
        let html = page(
            &Sees {
                node: false,
                repos: &[],
            },
            true,
        );
        for absent in [
            "hit-ratio",
            "disk-used",
            "data-upstream",
            "data-repo",
            "whoami",
        ] {
            assert!(!html.contains(absent), "{absent} in\n{html}");
        }
        assert!(html.contains(r#"id="login-hint""#), "{html}");
        assert!(
            html.contains(r#"<a id="login-link" href="/login">"#),
            "{html}"
        );
    }

    #[test]
    fn rows_are_bounded_and_the_rest_counted() {
        let mut c = contents();
        c.private = (0..MAX_ROWS + 5)
            .map(|i| PrivateRepo {
                name: format!("r/{i:04}"),
                tags: vec![],
                more_tags: false,
            })
            .collect();
        struct All;
        impl Viewer for All {
            fn sees_node(&self) -> bool {
                false
            }
            fn may_read(&self, _: &str) -> bool {
                true
            }
        }
        let p = StatusPage::build(Layout::default(), &All, false, node, Ok(&c));
        assert_eq!(p.private_repos.len(), MAX_ROWS);
        assert_eq!(p.private_more, 5);
        let html = render(&p).unwrap();
        assert!(
            html.contains(r#"id="private-more" data-value="5""#),
            "{html}"
        );
    }

    #[test]
    fn before_any_request_the_ratio_is_a_dash() {
        let f = Figure::ratio(0, 0);
        assert_eq!((f.text.as_str(), f.value.as_str()), ("-", ""));
    }
}
