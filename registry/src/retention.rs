//! Retention: deleting the tags and manifests of private repositories that a
//! `[[retention]]` policy (see [`berth_config::retention`]) no longer keeps.
//!
//! For each private repository, the first policy whose globs match it decides, in one
//! step under the repository's tag lock (pushes and deletes of the repository wait; a
//! push either lands before the decision and counts, or after the write):
//!
//! 1. **Tags.** A tag is kept if it is among the `keep_last` most recently pushed tags
//!    (ties with the last one kept are kept too) or if its manifest, or a manifest that
//!    its index contains (at any depth), was pulled within `keep_pulled_within`. With
//!    neither rule every tag is kept. Every other tag is deleted. A tag whose manifest
//!    is not in the repository (not served) is left alone and counts for nothing.
//! 2. **Manifests.** A manifest is kept when:
//!    - a kept tag names it;
//!    - it had no tag before this run and is still in use: the policy has no
//!      `untagged_grace`, or the manifest was pushed, or pulled (itself or a manifest
//!      it contains), within `untagged_grace` or within `keep_pulled_within`; a
//!      referrer of a manifest this run deletes is kept so only without
//!      `delete_referrers`;
//!    - a kept manifest contains it, at any depth (an image is never taken apart), or
//!      it is a referrer (it has a `subject`) of a kept manifest.
//!
//!    Every other manifest is deleted. In particular a manifest whose last tag this run
//!    deleted goes at once, unless a kept index contains it or it is a referrer of a
//!    kept manifest (it was not pulled within `keep_pulled_within`, or its tags would
//!    have been kept), while a manifest untagged by a push (a tag moved) waits for the
//!    untagged grace, counted from its push or last pull. The manifests an index
//!    contains are untagged: when the index goes they are deleted by the untagged grace
//!    (in the same run if they are old and unused), and are kept by a policy without one.
//! 3. **Referrers.** With `delete_referrers`, the referrers of a deleted manifest are
//!    deleted with it, and theirs in turn, however recent, unless something above keeps
//!    them. Without it they become untagged manifests whose subject is gone, judged by
//!    the untagged grace like any other: kept while in use (or always, without an
//!    untagged grace), deleted, in the same run, once not. Referrers are untagged as a
//!    rule: the untagged grace never deletes one whose subject is kept.
//!
//! The result is a fixed point: running the same policies again at the same time
//! deletes nothing more. A dry run computes the same report and writes nothing.
//!
//! Pulls are the store's access log ([`berth_store::AccessLog`]): every manifest read,
//! by tag or by digest, records its digest (see [`Registry::manifest`]), so the
//! platform manifests that clients fetch by digest after an index count for the index's
//! tags. Access times not yet flushed count too.
//!
//! Retention fails closed: a repository with a manifest it cannot read or parse is left
//! untouched and reported ([`RepoRetention::unreadable_manifests`]). It removes no blob
//! file: garbage collection (`gc_interval`) collects what the deleted manifests
//! referenced once nothing else does.

use std::collections::{BTreeMap, BTreeSet};

use berth_config::retention::{policy_for, RetentionPolicy};
use berth_store::oci::Digest;
use berth_store::{Batch, StoreError};

use crate::{manifest, Registry, RegistryError};

/// What a retention run deleted, or with `dry_run` would delete.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RetentionReport {
    pub dry_run: bool,
    /// How many private repositories a policy applied to.
    pub repositories_checked: usize,
    /// The repositories where something was (or would be) deleted or could not be read,
    /// in lexical order.
    pub repositories: Vec<RepoRetention>,
}

/// What retention did in one repository. Lists are sorted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RepoRetention {
    pub repository: String,
    pub tags_deleted: Vec<String>,
    /// Deleted manifests without a `subject`.
    pub manifests_deleted: Vec<Digest>,
    /// Deleted manifests with a `subject` (signatures, SBOMs, attestations…).
    pub referrers_deleted: Vec<Digest>,
    /// Manifests that could not be read or parsed: nothing of the repository was deleted.
    pub unreadable_manifests: Vec<Digest>,
}

impl RepoRetention {
    fn is_empty(&self) -> bool {
        self.tags_deleted.is_empty()
            && self.manifests_deleted.is_empty()
            && self.referrers_deleted.is_empty()
            && self.unreadable_manifests.is_empty()
    }
}

impl RetentionReport {
    pub fn tags_deleted(&self) -> usize {
        self.repositories.iter().map(|r| r.tags_deleted.len()).sum()
    }

    pub fn manifests_deleted(&self) -> usize {
        self.repositories
            .iter()
            .map(|r| r.manifests_deleted.len())
            .sum()
    }

    pub fn referrers_deleted(&self) -> usize {
        self.repositories
            .iter()
            .map(|r| r.referrers_deleted.len())
            .sum()
    }

    /// The report as JSON (for an API answer):
    /// `{"dry_run", "repositories_checked", "repositories": [{"repository",
    /// "tags_deleted", "manifests_deleted", "referrers_deleted",
    /// "unreadable_manifests"}]}`, digests as strings.
    pub fn to_json(&self) -> serde_json::Value {
        let digests = |ds: &[Digest]| ds.iter().map(Digest::to_string).collect::<Vec<_>>();
        let repos: Vec<_> = self
            .repositories
            .iter()
            .map(|r| {
                serde_json::json!({
                    "repository": r.repository,
                    "tags_deleted": r.tags_deleted,
                    "manifests_deleted": digests(&r.manifests_deleted),
                    "referrers_deleted": digests(&r.referrers_deleted),
                    "unreadable_manifests": digests(&r.unreadable_manifests),
                })
            })
            .collect();
        serde_json::json!({
            "dry_run": self.dry_run,
            "repositories_checked": self.repositories_checked,
            "repositories": repos,
        })
    }
}

/// A manifest of the repository, as retention sees it.
struct Node {
    linked_ms: u64,
    /// The manifests it contains (an index's `manifests`).
    children: Vec<Digest>,
    subject: Option<Digest>,
}

/// One repository's manifests and the last uses of their digests.
struct Graph<'a> {
    registry: &'a Registry,
    nodes: BTreeMap<Digest, Node>,
    /// Subject → the manifests of the repository that refer to it.
    referrers: BTreeMap<Digest, Vec<Digest>>,
    /// Last uses read so far (the access log is asked once per digest).
    last_use: std::cell::RefCell<BTreeMap<Digest, Option<u64>>>,
}

impl Graph<'_> {
    fn last_use(&self, d: &Digest) -> Result<Option<u64>, StoreError> {
        if let Some(t) = self.last_use.borrow().get(d) {
            return Ok(*t);
        }
        let t = self
            .registry
            .store
            .access
            .last(&self.registry.store.meta, d)?;
        self.last_use.borrow_mut().insert(d.clone(), t);
        Ok(t)
    }

    /// Whether `d`, or a manifest it contains at any depth, was pulled at or after
    /// `since_ms`.
    fn pulled_since(&self, d: &Digest, since_ms: u64) -> Result<bool, StoreError> {
        let mut seen = BTreeSet::new();
        let mut todo = vec![d.clone()];
        while let Some(d) = todo.pop() {
            if !seen.insert(d.clone()) {
                continue;
            }
            if self.last_use(&d)?.is_some_and(|t| t >= since_ms) {
                return Ok(true);
            }
            if let Some(n) = self.nodes.get(&d) {
                todo.extend(n.children.iter().cloned());
            }
        }
        Ok(false)
    }

    /// `roots` and everything they keep: the manifests they contain and their referrers,
    /// transitively.
    fn closure(&self, roots: &BTreeSet<Digest>) -> BTreeSet<Digest> {
        let mut kept = BTreeSet::new();
        let mut todo: Vec<Digest> = roots.iter().cloned().collect();
        while let Some(d) = todo.pop() {
            let Some(node) = self.nodes.get(&d) else {
                continue;
            };
            if !kept.insert(d.clone()) {
                continue;
            }
            todo.extend(node.children.iter().cloned());
            if let Some(refs) = self.referrers.get(&d) {
                todo.extend(refs.iter().cloned());
            }
        }
        kept
    }
}

impl Registry {
    /// Applies retention `policies` (the first matching one per private repository) as
    /// of `now_ms` (milliseconds since the Unix epoch), as described in
    /// [`crate::retention`]; with `dry_run`, only reports what it would delete. Each
    /// repository is decided and written while its tag lock is held. Blocks: run it on
    /// a blocking thread.
    pub fn apply_retention(
        &self,
        policies: &[RetentionPolicy],
        now_ms: u64,
        dry_run: bool,
    ) -> Result<RetentionReport, RegistryError> {
        let mut report = RetentionReport {
            dry_run,
            ..RetentionReport::default()
        };
        if policies.is_empty() {
            return Ok(report);
        }
        for repo in self.store.meta.repos(None, usize::MAX)? {
            let Some(policy) = policy_for(policies, &repo) else {
                continue;
            };
            report.repositories_checked += 1;
            let done = self.retain(&repo, policy, now_ms, dry_run)?;
            let deleted = done.tags_deleted.len()
                + done.manifests_deleted.len()
                + done.referrers_deleted.len();
            if deleted > 0 {
                tracing::info!(
                    repo = %done.repository,
                    dry_run,
                    tags = ?done.tags_deleted,
                    manifests = ?done.manifests_deleted.iter().map(Digest::to_string).collect::<Vec<_>>(),
                    referrers = ?done.referrers_deleted.iter().map(Digest::to_string).collect::<Vec<_>>(),
                    "{}",
                    if dry_run { "retention would delete" } else { "retention deleted" }
                );
            }
            if !done.is_empty() {
                report.repositories.push(done);
            }
        }
        Ok(report)
    }

    /// Retention of one repository, decided and written under its tag lock.
    fn retain(
        &self,
        repo: &str,
        policy: &RetentionPolicy,
        now_ms: u64,
        dry_run: bool,
    ) -> Result<RepoRetention, RegistryError> {
        let _tags = self.tag_lock(repo);
        let meta = &self.store.meta;
        let mut out = RepoRetention {
            repository: repo.to_owned(),
            ..RepoRetention::default()
        };
        let mut graph = Graph {
            registry: self,
            nodes: BTreeMap::new(),
            referrers: BTreeMap::new(),
            last_use: Default::default(),
        };
        for (digest, link) in meta.repo_manifests(repo)? {
            let parsed = match meta.get_private_manifest(&digest)? {
                Some(rec) => {
                    let media_type = meta.repo_manifest_type(repo, &digest)?;
                    manifest::parse(media_type.as_deref().unwrap_or(&rec.media_type), &rec.body)
                        .ok()
                }
                None => None,
            };
            let Some(parsed) = parsed else {
                out.unreadable_manifests.push(digest);
                continue;
            };
            if let Some(s) = &parsed.subject {
                graph
                    .referrers
                    .entry(s.digest.clone())
                    .or_default()
                    .push(digest.clone());
            }
            graph.nodes.insert(
                digest,
                Node {
                    linked_ms: link.linked_ms,
                    children: parsed.manifests.into_iter().map(|m| m.digest).collect(),
                    subject: parsed.subject.map(|s| s.digest),
                },
            );
        }
        if !out.unreadable_manifests.is_empty() {
            tracing::warn!(repo, unreadable = ?out.unreadable_manifests.iter().map(Digest::to_string).collect::<Vec<_>>(),
                "retention cannot read a manifest: nothing of its repository is deleted");
            return Ok(out);
        }

        // 1. Tags (only those whose manifest is in the repository count).
        let tags: Vec<(String, berth_store::RepoTag)> = meta
            .repo_tags(repo, None, usize::MAX)?
            .into_iter()
            .filter(|(_, t)| graph.nodes.contains_key(&t.digest))
            .collect();
        let since = |d: std::time::Duration| now_ms.saturating_sub(d.as_millis() as u64);
        let mut kept_tags = BTreeSet::new();
        if policy.deletes_tags() {
            if let Some(n) = policy.keep_last {
                let mut times: Vec<u64> = tags.iter().map(|(_, t)| t.updated_ms).collect();
                times.sort_unstable_by(|a, b| b.cmp(a));
                if let Some(&threshold) = times.get(n - 1).or(times.last()) {
                    for (name, t) in &tags {
                        if t.updated_ms >= threshold {
                            kept_tags.insert(name.clone());
                        }
                    }
                }
            }
            if let Some(w) = policy.keep_pulled_within {
                for (name, t) in &tags {
                    if !kept_tags.contains(name) && graph.pulled_since(&t.digest, since(w))? {
                        kept_tags.insert(name.clone());
                    }
                }
            }
        } else {
            kept_tags.extend(tags.iter().map(|(name, _)| name.clone()));
        }

        // 2. Manifests.
        let mut roots = BTreeSet::new();
        let mut tagged = BTreeSet::new();
        for (name, t) in &tags {
            tagged.insert(t.digest.clone());
            if kept_tags.contains(name) {
                roots.insert(t.digest.clone());
            } else {
                out.tags_deleted.push(name.clone());
            }
        }
        // Manifests untagged before this run that are still in use. (One that this run
        // untags was not pulled within keep_pulled_within, or its tags would be kept.)
        let mut fresh = BTreeSet::new();
        for (d, node) in graph.nodes.iter().filter(|(d, _)| !tagged.contains(*d)) {
            let expired = match policy.untagged_grace {
                None => false,
                Some(g) => {
                    let used = node.linked_ms >= since(g)
                        || graph.pulled_since(d, since(g))?
                        || match policy.keep_pulled_within {
                            Some(w) => graph.pulled_since(d, since(w))?,
                            None => false,
                        };
                    !used
                }
            };
            if !expired {
                fresh.insert(d.clone());
            }
        }
        // A fresh referrer whose subject is in the repository lives and dies with it
        // (unless delete_referrers is off); every other fresh manifest is kept.
        let has_subject_here = |d: &Digest| {
            graph.nodes[d]
                .subject
                .as_ref()
                .is_some_and(|s| graph.nodes.contains_key(s))
        };
        roots.extend(fresh.iter().filter(|d| !has_subject_here(d)).cloned());
        let mut kept = graph.closure(&roots);
        if !policy.delete_referrers {
            loop {
                let orphaned: Vec<Digest> = fresh
                    .iter()
                    .filter(|d| !kept.contains(*d) && has_subject_here(d))
                    .filter(|d| {
                        let s = graph.nodes[*d].subject.as_ref().expect("has a subject");
                        !kept.contains(s)
                    })
                    .cloned()
                    .collect();
                if orphaned.is_empty() {
                    break;
                }
                roots.extend(orphaned);
                kept = graph.closure(&roots);
            }
        }

        // 3. The deletions, in one batch.
        let mut batch = Batch::default();
        for tag in &out.tags_deleted {
            batch.delete_tag(repo, tag);
        }
        for (d, node) in &graph.nodes {
            if kept.contains(d) {
                continue;
            }
            batch.unlink_manifest(repo, d);
            match &node.subject {
                Some(s) => {
                    batch.delete_referrer(repo, s, d);
                    out.referrers_deleted.push(d.clone());
                }
                None => out.manifests_deleted.push(d.clone()),
            }
        }
        if !dry_run && !batch.is_empty() {
            meta.write_synced(batch)?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests;
