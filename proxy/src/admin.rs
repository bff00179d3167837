//! `/admin/…`: the store's upkeep, for administrators (`[access] admin`; without
//! `[access]`, requests on a loopback listener, or anyone with `open = true`).
//!
//! - `GET /admin/store`: what the store holds, pulled through and private, by upstream,
//!   with counts, the filesystem and the budget (`[cache]`);
//! - `POST /admin/evict[?bytes=1GiB]`: an eviction pass now, freeing what the budget
//!   asks (or at least `bytes`), and removing what is older than `max_age`;
//! - `POST /admin/gc[?grace=1h]`: garbage collection of private content now;
//! - `POST /admin/scrub[?rate=64MiB]`: reads every stored blob again and checks it
//!   against its digest (at most `rate` bytes a second); a damaged one is removed, and
//!   fetched again if it was pulled through;
//! - `DELETE /admin/cache/<upstream>[/<repository>]`: purges what was cached through one
//!   upstream, or one of its repositories, that no other repository holds;
//! - `POST /admin/retention?dry_run=true`: applies the `[[retention]]` policies now, or
//!   (with `dry_run=true`) reports what they would delete without deleting it.
//!
//! Every answer is JSON.

use bytes::Bytes;
use pingora::protocols::http::ServerSession;
use serde_json::json;

use berth_cache::evict::Goal;

use crate::auth::Identity;
use crate::errors::{ApiError, Code};
use crate::server::{send_bytes, App, Request, Served};

/// What an admin request asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdminRoute {
    Store,
    Evict,
    Gc,
    Scrub,
    Retention,
    Purge {
        upstream: String,
        repo: Option<String>,
    },
}

/// Parses the path after `/admin/`.
pub fn parse(rest: &str) -> Option<AdminRoute> {
    match rest {
        "store" => Some(AdminRoute::Store),
        "evict" => Some(AdminRoute::Evict),
        "gc" => Some(AdminRoute::Gc),
        "scrub" => Some(AdminRoute::Scrub),
        "retention" => Some(AdminRoute::Retention),
        _ => {
            let target = rest.strip_prefix("cache/")?;
            let (upstream, repo) = match target.split_once('/') {
                Some((u, r)) => (u, Some(r.trim_end_matches('/').to_owned())),
                None => (target, None),
            };
            (!upstream.is_empty()).then(|| AdminRoute::Purge {
                upstream: upstream.to_owned(),
                repo: repo.filter(|r| !r.is_empty()),
            })
        }
    }
}

fn query_value<'a>(query: Option<&'a str>, key: &str) -> Option<&'a str> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

fn bad(message: String) -> ApiError {
    ApiError::new(Code::BadRequest, message)
}

impl App {
    /// Whether `who` may use the admin endpoints.
    pub(crate) fn check_admin(&self, who: &Identity, req: &Request) -> Result<(), ApiError> {
        if !self.auth.enabled() {
            return match self.auth.mode().refuses_writes() {
                Some(why) => Err(ApiError::new(Code::Denied, why)),
                None => Ok(()),
            };
        }
        if self.auth.is_admin(who) {
            return Ok(());
        }
        let mut e = self.deny(req, who, "the admin endpoints", None);
        if matches!(who, Identity::User { .. }) {
            e = ApiError::new(
                Code::Denied,
                "the admin endpoints are for administrators ([access] admin)",
            );
        }
        Err(e)
    }

    pub(crate) async fn admin(
        &self,
        session: &mut ServerSession,
        req: &Request,
        route: &AdminRoute,
    ) -> Result<Served, ApiError> {
        let method = req.method.as_str();
        let cache_error = |e: berth_cache::CacheError| ApiError::new(Code::Internal, e.to_string());
        let body = match (route, method) {
            (AdminRoute::Store, "GET") => {
                let usage = self.cache.usage().await.map_err(cache_error)?;
                let (available, total) = self
                    .cache
                    .store_filesystem()
                    .map_err(|e| ApiError::new(Code::Internal, e.to_string()))?;
                let b = &self.config.cache;
                json!({
                    "cached": {
                        "bytes": usage.cached_bytes,
                        "blobs": usage.cached_blobs,
                        "manifests": usage.cached_manifests,
                        "tags": usage.cached_tags,
                    },
                    "private": {
                        "bytes": usage.private_bytes,
                        "blobs": usage.private_blobs,
                    },
                    "total_bytes": usage.total_bytes(),
                    "upstreams": usage.upstreams,
                    "filesystem": { "available_bytes": available, "total_bytes": total },
                    "budget": {
                        "max_size": b.max_size,
                        "min_free_bytes": b.min_free.bytes(total),
                        "high_watermark": b.high_watermark,
                        "low_watermark": b.low_watermark,
                        "max_age_seconds": b.max_age.map(|d| d.as_secs()),
                        "keep_recent_seconds": b.keep_recent.as_secs(),
                    },
                    "fills_in_progress": self.cache.fills_in_progress(),
                })
            }
            (AdminRoute::Evict, "POST") => {
                let asked = match query_value(req.query.as_deref(), "bytes") {
                    Some(v) => {
                        berth_config::parse_size(v).map_err(|e| bad(format!("bytes: {e}")))?
                    }
                    None => 0,
                };
                let report = self
                    .cache
                    .evict(Goal::Free(asked.max(self.cache.budget_need())))
                    .await
                    .map_err(cache_error)?;
                serde_json::to_value(&report).expect("serializable")
            }
            (AdminRoute::Purge { upstream, repo }, "DELETE") => {
                if self.config.upstream(upstream).is_none() {
                    return Err(ApiError::new(
                        Code::NameUnknown,
                        format!("{upstream:?} is not a configured upstream"),
                    ));
                }
                let report = self
                    .cache
                    .evict(Goal::Purge {
                        upstream: upstream.clone(),
                        repo: repo.clone(),
                    })
                    .await
                    .map_err(cache_error)?;
                serde_json::to_value(&report).expect("serializable")
            }
            (AdminRoute::Scrub, "POST") => {
                let rate = match query_value(req.query.as_deref(), "rate") {
                    Some(v) => {
                        Some(berth_config::parse_size(v).map_err(|e| bad(format!("rate: {e}")))?)
                    }
                    None => None,
                };
                let report = self.cache.scrub(rate).await.map_err(cache_error)?;
                serde_json::to_value(&report).expect("serializable")
            }
            (AdminRoute::Retention, "POST") => {
                let dry_run = match query_value(req.query.as_deref(), "dry_run") {
                    None | Some("false") => false,
                    Some("true") => true,
                    Some(v) => return Err(bad(format!("dry_run: {v:?} is not true or false"))),
                };
                let policies = self.config.retention.clone();
                let now = self.cache.now_ms();
                let report = self
                    .blocking(move |r| r.apply_retention(&policies, now, dry_run))
                    .await?;
                report.to_json()
            }
            (AdminRoute::Gc, "POST") => {
                let grace = match query_value(req.query.as_deref(), "grace") {
                    Some(v) => {
                        berth_config::parse_duration(v).map_err(|e| bad(format!("grace: {e}")))?
                    }
                    None => self
                        .config
                        .server
                        .gc_grace
                        .unwrap_or(crate::cli::DEFAULT_GC_GRACE),
                };
                let r = self.blocking(move |r| r.collect_garbage(grace)).await?;
                json!({
                    "manifests_removed": r.manifests_removed,
                    "repos_removed": r.repos_removed,
                    "links_removed": r.links_removed,
                    "blobs_removed": r.blobs_removed,
                    "bytes_freed": r.bytes_freed,
                    "unreadable_manifests": r.unreadable_manifests.iter()
                        .map(|(repo, d)| json!({"repository": repo, "digest": d.to_string()}))
                        .collect::<Vec<_>>(),
                })
            }
            _ => {
                let allowed = match route {
                    AdminRoute::Store => "GET",
                    AdminRoute::Evict
                    | AdminRoute::Gc
                    | AdminRoute::Scrub
                    | AdminRoute::Retention => "POST",
                    AdminRoute::Purge { .. } => "DELETE",
                };
                return Err(ApiError::new(
                    Code::Unsupported,
                    format!("{method} is not supported on {}: use {allowed}", req.path),
                )
                .with_headers(vec![("Allow", allowed.to_owned())]));
            }
        };
        let body = serde_json::to_vec_pretty(&body).expect("serializable");
        Ok(send_bytes(
            session,
            200,
            vec![("Content-Type", "application/json".into())],
            Bytes::from(body),
            req.is_head(),
            None,
        )
        .await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_paths() {
        assert_eq!(parse("store"), Some(AdminRoute::Store));
        assert_eq!(parse("evict"), Some(AdminRoute::Evict));
        assert_eq!(
            parse("cache/docker.io"),
            Some(AdminRoute::Purge {
                upstream: "docker.io".into(),
                repo: None
            })
        );
        assert_eq!(
            parse("cache/docker.io/library/alpine"),
            Some(AdminRoute::Purge {
                upstream: "docker.io".into(),
                repo: Some("library/alpine".into())
            })
        );
        assert_eq!(parse("cache/"), None);
        assert_eq!(parse("nothing"), None);
    }
}
