//! `[[retention]]`: which tags and manifests of private (pushed) repositories berth
//! deletes on its own.
//!
//! ```toml
//! [server]
//! retention_interval = "24h"      # how often the policies run; "0s" = never
//!
//! [[retention]]
//! repositories = ["ci/**"]        # required: globs of private repositories
//! keep_last = 1                   # keep the 1 most recently pushed tag
//! keep_pulled_within = "720h"     # and every tag pulled in the last 30 days
//! untagged_grace = "24h"          # delete untagged manifests unused for a day
//! delete_referrers = true         # and the referrers of whatever is deleted
//! ```
//!
//! - The **first** policy (in file order) whose `repositories` match a repository
//!   applies to it; later ones are not consulted. A repository no policy matches is
//!   never touched. Policies cover private repositories only: a pulled-through
//!   namespace (`docker.io/**`) is refused.
//! - A tag is **kept** if any keep rule keeps it: it is among the `keep_last` most
//!   recently pushed tags (by when it was last set; a tag pushed in the same
//!   millisecond as the last one kept is kept too, so one push with several tags counts
//!   once), or its manifest (or, for an index, any manifest it contains) was pulled, by
//!   tag or by digest, within `keep_pulled_within`. Every other tag is deleted. A policy
//!   with neither keep rule deletes no tags.
//! - `untagged_grace`: a manifest with no tag that was neither pushed nor pulled (itself
//!   or a manifest it contains) within this long, nor within `keep_pulled_within`, is
//!   deleted. Without it untagged manifests are kept. A referrer (a manifest with a
//!   `subject`) is kept while its subject is kept.
//! - `delete_referrers`: the referrers of a manifest retention deletes are deleted with
//!   it, and theirs in turn. Without it they become untagged manifests like any other,
//!   which `untagged_grace` judges (and deletes at once if they are not in use).
//!
//! A policy needs at least one of `keep_last`, `keep_pulled_within` and
//! `untagged_grace`. What retention does to manifests that lose their tags is described
//! with `Registry::apply_retention` (crate `berth-registry`).

use std::time::Duration;

use toml::Value;

use crate::config::Problems;
use crate::glob::Glob;

/// The default of `[server] retention_interval`.
pub const DEFAULT_RETENTION_INTERVAL: Duration = Duration::from_secs(24 * 3600);

/// One `[[retention]]` policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// `repositories` (required, not empty): the private repositories it applies to.
    pub repositories: Vec<Glob>,
    /// `keep_last`: keep this many most recently pushed tags (at least 1).
    pub keep_last: Option<usize>,
    /// `keep_pulled_within`: keep tags whose manifest, or a child of it, was pulled
    /// within this long (more than zero).
    pub keep_pulled_within: Option<Duration>,
    /// `untagged_grace`: delete untagged manifests unused for this long (more than
    /// zero); `None` keeps them.
    pub untagged_grace: Option<Duration>,
    /// `delete_referrers`: delete the referrers of deleted manifests. Default `false`.
    pub delete_referrers: bool,
}

impl RetentionPolicy {
    /// Whether the policy covers `repo`.
    pub fn matches(&self, repo: &str) -> bool {
        self.repositories.iter().any(|g| g.matches(repo))
    }

    /// Whether the policy deletes tags: only when it has a keep rule.
    pub fn deletes_tags(&self) -> bool {
        self.keep_last.is_some() || self.keep_pulled_within.is_some()
    }
}

/// The policy that applies to `repo`: the first that matches.
pub fn policy_for<'a>(policies: &'a [RetentionPolicy], repo: &str) -> Option<&'a RetentionPolicy> {
    policies.iter().find(|p| p.matches(repo))
}

/// Parses the `[[retention]]` array; `namespaces` are the configured upstreams, which no
/// policy may name.
pub(crate) fn parse_retention(
    v: &Value,
    namespaces: &[&str],
    p: &mut Problems,
) -> Vec<RetentionPolicy> {
    let Some(items) = v.as_array() else {
        p.add("retention", "must be an array of tables ([[retention]])");
        return Vec::new();
    };
    items
        .iter()
        .enumerate()
        .filter_map(|(i, item)| policy(&format!("retention[{i}]"), item, namespaces, p))
        .collect()
}

fn policy(path: &str, v: &Value, namespaces: &[&str], p: &mut Problems) -> Option<RetentionPolicy> {
    let Some(t) = v.as_table() else {
        p.add(path, "must be a table");
        return None;
    };
    let before = p.len();
    let mut repositories = None;
    let mut policy = RetentionPolicy {
        repositories: Vec::new(),
        keep_last: None,
        keep_pulled_within: None,
        untagged_grace: None,
        delete_referrers: false,
    };
    for (key, value) in t {
        let kpath = format!("{path}.{key}");
        match key.as_str() {
            "repositories" => repositories = globs(&kpath, value, namespaces, p),
            "keep_last" => match value.as_integer() {
                Some(n) if n >= 1 => policy.keep_last = usize::try_from(n).ok(),
                _ => p.add(&kpath, "must be a whole number of tags, at least 1"),
            },
            "keep_pulled_within" => {
                policy.keep_pulled_within = positive_duration(&kpath, value, p, "")
            }
            "untagged_grace" => {
                policy.untagged_grace = positive_duration(
                    &kpath,
                    value,
                    p,
                    ": an index's manifests are pushed untagged before the index",
                )
            }
            "delete_referrers" => match value.as_bool() {
                Some(b) => policy.delete_referrers = b,
                None => p.add(&kpath, "must be true or false"),
            },
            _ => p.add(&kpath, "unknown key"),
        }
    }
    if !t.contains_key("repositories") {
        p.add(&format!("{path}.repositories"), "is required");
    }
    let rules = ["keep_last", "keep_pulled_within", "untagged_grace"];
    if !rules.iter().any(|r| t.contains_key(*r)) {
        p.add(
            path,
            "has no rule: give keep_last, keep_pulled_within or untagged_grace",
        );
    }
    if p.len() > before {
        return None;
    }
    policy.repositories = repositories?;
    Some(policy)
}

fn globs(path: &str, v: &Value, namespaces: &[&str], p: &mut Problems) -> Option<Vec<Glob>> {
    let Some(items) = v.as_array() else {
        p.add(path, "must be an array of glob patterns");
        return None;
    };
    if items.is_empty() {
        p.add(path, "must name at least one glob pattern");
        return None;
    }
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let ipath = format!("{path}[{i}]");
        let Some(s) = item.as_str() else {
            p.add(&ipath, "must be a glob pattern string");
            continue;
        };
        match Glob::new(s) {
            Ok(g) => {
                let first = s.split('/').next().unwrap_or("");
                if namespaces.contains(&first) {
                    p.add(
                        &ipath,
                        &format!("{s:?} is in the pull-through namespace {first}: retention applies to private (pushed) repositories only"),
                    );
                }
                out.push(g);
            }
            Err(e) => p.add(&ipath, &e),
        }
    }
    Some(out)
}

fn positive_duration(path: &str, v: &Value, p: &mut Problems, why: &str) -> Option<Duration> {
    match v.as_str().map(crate::config::parse_duration) {
        Some(Ok(d)) if d.is_zero() => {
            p.add(path, &format!("must be more than zero{why}"));
            None
        }
        Some(Ok(d)) => Some(d),
        Some(Err(e)) => {
            p.add(path, &e);
            None
        }
        None => {
            p.add(path, "must be a duration such as \"24h\"");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn policies_parse_and_the_first_match_applies() {
        let c = Config::parse(
            r#"
[[retention]]
repositories = ["ci/app"]
untagged_grace = "1h"
[[retention]]
repositories = ["ci/**", "nightly/*"]
keep_last = 3
keep_pulled_within = "720h"
delete_referrers = true
"#,
        )
        .unwrap();
        assert_eq!(c.retention.len(), 2);
        let exact = policy_for(&c.retention, "ci/app").unwrap();
        assert_eq!(exact.untagged_grace, Some(Duration::from_secs(3600)));
        assert!(!exact.deletes_tags() && !exact.delete_referrers);
        let broad = policy_for(&c.retention, "ci/other/x").unwrap();
        assert_eq!(broad.keep_last, Some(3));
        assert_eq!(
            broad.keep_pulled_within,
            Some(Duration::from_secs(720 * 3600))
        );
        assert!(broad.deletes_tags() && broad.delete_referrers);
        assert_eq!(broad.untagged_grace, None);
        assert!(policy_for(&c.retention, "nightly/a").is_some());
        assert!(policy_for(&c.retention, "team/app").is_none());
        assert!(Config::parse("").unwrap().retention.is_empty());
    }

    #[test]
    fn mistakes_are_reported_with_their_paths() {
        let errors = Config::parse(
            r#"
[server]
retention_interval = "daily"
[[upstream]]
namespace = "docker.io"
url = "https://registry-1.docker.io"
prefixes = ["library/**"]
[[retention]]
keep_last = 0
keep_pulled_within = "0s"
untagged_grace = "soon"
delete_referrers = "yes"
colour = "blue"
[[retention]]
repositories = []
[[retention]]
repositories = ["Team/**", 7, "docker.io/**"]
untagged_grace = "0s"
[[retention]]
repositories = "ci/**"
keep_last = 1.5
"#,
        )
        .unwrap_err()
        .0;
        let want = [
            "server.retention_interval: \"daily\" is not a duration",
            "retention[0].keep_last: must be a whole number of tags, at least 1",
            "retention[0].keep_pulled_within: must be more than zero",
            "retention[0].untagged_grace: \"soon\" is not a duration",
            "retention[0].delete_referrers: must be true or false",
            "retention[0].colour: unknown key",
            "retention[0].repositories: is required",
            "retention[1].repositories: must name at least one glob pattern",
            "retention[1]: has no rule",
            "retention[2].repositories[0]:",
            "retention[2].repositories[1]: must be a glob pattern string",
            "retention[2].repositories[2]: \"docker.io/**\" is in the pull-through namespace docker.io",
            "retention[2].untagged_grace: must be more than zero: an index's manifests",
            "retention[3].repositories: must be an array of glob patterns",
            "retention[3].keep_last: must be a whole number",
        ];
        for w in want {
            assert!(
                errors.iter().any(|e| e.starts_with(w)),
                "missing {w:?} in {errors:#?}"
            );
        }
        assert_eq!(errors.len(), want.len(), "{errors:#?}");
        let e = Config::parse("retention = 1\n").unwrap_err().0;
        assert_eq!(e, ["retention: must be an array of tables ([[retention]])"]);
    }

    #[test]
    fn the_interval_defaults_to_a_day_and_zero_turns_it_off() {
        let c = Config::parse("").unwrap();
        assert_eq!(c.server.retention_interval, None);
        assert_eq!(DEFAULT_RETENTION_INTERVAL, Duration::from_secs(86400));
        let c = Config::parse("[server]\nretention_interval = \"0s\"\n").unwrap();
        assert_eq!(c.server.retention_interval, Some(Duration::ZERO));
    }

    #[test]
    fn the_shipped_example_keeps_the_latest_ci_tag() {
        let text = include_str!("../../examples/retention/keep-latest.toml");
        let c = Config::parse(text).unwrap_or_else(|e| panic!("{e}"));
        let p = policy_for(&c.retention, "ci/app").unwrap();
        assert_eq!(
            *p,
            RetentionPolicy {
                repositories: vec![Glob::new("ci/**").unwrap()],
                keep_last: Some(1),
                keep_pulled_within: None,
                untagged_grace: Some(Duration::from_secs(24 * 3600)),
                delete_referrers: true,
            }
        );
        assert!(policy_for(&c.retention, "team/app").is_none());
    }
}
