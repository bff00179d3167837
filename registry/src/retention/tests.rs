use std::sync::Arc;
use std::time::Duration;

use berth_config::glob::Glob;
use berth_config::RetentionPolicy;
use berth_store::oci::{Digest, Reference, OCI_INDEX, OCI_MANIFEST};
use berth_store::{Batch, ManifestRecord, RepoTag};
use bytes::Bytes;

use crate::tests::{image_manifest, push_blob, registry};
use crate::{now_ms, Registry, RepoRetention, RetentionReport};

const HOUR: u64 = 3600 * 1000;

fn policy(globs: &[&str]) -> RetentionPolicy {
    RetentionPolicy {
        repositories: globs.iter().map(|g| Glob::new(g).unwrap()).collect(),
        keep_last: None,
        keep_pulled_within: None,
        untagged_grace: None,
        delete_referrers: false,
    }
}

fn hours(n: u64) -> Option<Duration> {
    Some(Duration::from_secs(n * 3600))
}

/// Pushes an image whose layer holds `seed`, under `tag` or by digest.
async fn image(r: &Registry, repo: &str, tag: Option<&str>, seed: &str) -> Digest {
    let config = push_blob(r, repo, b"{}").await;
    let layer = push_blob(r, repo, seed.as_bytes()).await;
    let body = image_manifest(&config, 2, &layer, seed.len());
    push(r, repo, tag, OCI_MANIFEST, body)
}

fn push(r: &Registry, repo: &str, tag: Option<&str>, media_type: &str, body: Bytes) -> Digest {
    let reference = match tag {
        Some(t) => Reference::Tag(t.into()),
        None => Reference::Digest(Digest::sha256_of(&body)),
    };
    r.put_manifest(repo, &reference, &[], media_type, body)
        .unwrap()
        .digest
}

/// Pushes, by digest, an artifact whose subject is `subject`.
async fn referrer(r: &Registry, repo: &str, subject: &Digest, kind: &str) -> Digest {
    let config = push_blob(r, repo, b"{}").await;
    let body = Bytes::from(format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","artifactType":"application/x.{kind}","config":{{"mediaType":"application/vnd.oci.empty.v1+json","digest":"{config}","size":2}},"layers":[],"subject":{{"mediaType":"{OCI_MANIFEST}","digest":"{subject}","size":1}}}}"#
    ));
    push(r, repo, None, OCI_MANIFEST, body)
}

/// Pushes an index of `children` under `tag`.
fn index(r: &Registry, repo: &str, tag: &str, children: &[&Digest]) -> Digest {
    let list: Vec<String> = children
        .iter()
        .map(|d| format!(r#"{{"mediaType":"{OCI_MANIFEST}","digest":"{d}","size":1}}"#))
        .collect();
    let body = Bytes::from(format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[{}]}}"#,
        list.join(",")
    ));
    push(r, repo, Some(tag), OCI_INDEX, body)
}

/// Makes `tag` look pushed at `ms`.
fn pushed_at(r: &Registry, repo: &str, tag: &str, ms: u64) {
    let digest = r.store.meta.repo_tag(repo, tag).unwrap().unwrap().digest;
    let mut b = Batch::default();
    b.put_tag(
        repo,
        tag,
        &RepoTag {
            digest,
            updated_ms: ms,
        },
    );
    r.store.meta.write(b).unwrap();
}

fn tags(r: &Registry, repo: &str) -> Vec<String> {
    r.tags(repo, None, None).unwrap().items
}

fn linked(r: &Registry, repo: &str, d: &Digest) -> bool {
    r.store.meta.repo_manifest(repo, d).unwrap().is_some()
}

fn sorted(mut ds: Vec<Digest>) -> Vec<Digest> {
    ds.sort();
    ds
}

fn only(report: &RetentionReport) -> &RepoRetention {
    assert_eq!(report.repositories.len(), 1, "{report:#?}");
    &report.repositories[0]
}

/// `ci/app`: v1 → a (signed, the signature signed in turn), v2 → b, v3 and latest → c
/// (signed), pushed in that order; `team/app` has two tags no policy covers.
struct Fixture {
    a: Digest,
    b: Digest,
    c: Digest,
    sig_a: Digest,
    sig_sig_a: Digest,
    sig_c: Digest,
}

async fn fixture(r: &Registry, t0: u64) -> Fixture {
    let a = image(r, "ci/app", Some("v1"), "a").await;
    let b = image(r, "ci/app", Some("v2"), "b").await;
    let c = image(r, "ci/app", Some("v3"), "c").await;
    push(
        r,
        "ci/app",
        Some("latest"),
        OCI_MANIFEST,
        r.manifest("ci/app", &Reference::Digest(c.clone()))
            .unwrap()
            .body,
    );
    for (tag, ms) in [("v1", 1), ("v2", 2), ("v3", 3), ("latest", 3)] {
        pushed_at(r, "ci/app", tag, t0 - 10_000 + ms);
    }
    let sig_a = referrer(r, "ci/app", &a, "sig").await;
    let sig_sig_a = referrer(r, "ci/app", &sig_a, "sig").await;
    let sig_c = referrer(r, "ci/app", &c, "sig").await;
    image(r, "team/app", Some("old"), "t1").await;
    image(r, "team/app", Some("new"), "t2").await;
    Fixture {
        a,
        b,
        c,
        sig_a,
        sig_sig_a,
        sig_c,
    }
}

fn keep_latest(delete_referrers: bool) -> Vec<RetentionPolicy> {
    vec![RetentionPolicy {
        keep_last: Some(1),
        delete_referrers,
        ..policy(&["ci/**"])
    }]
}

#[tokio::test]
async fn keep_last_deletes_older_tags_their_manifests_and_their_referrers() {
    let (_dir, r) = registry();
    let t0 = now_ms();
    let f = fixture(&r, t0).await;
    let report = r.apply_retention(&keep_latest(true), t0, false).unwrap();
    assert_eq!(report.repositories_checked, 1, "team/app is not covered");
    let done = only(&report);
    assert_eq!(done.repository, "ci/app");
    assert_eq!(done.tags_deleted, ["v1", "v2"]);
    assert_eq!(
        done.manifests_deleted,
        sorted(vec![f.a.clone(), f.b.clone()])
    );
    assert_eq!(
        done.referrers_deleted,
        sorted(vec![f.sig_a.clone(), f.sig_sig_a.clone()]),
        "a referrer of a deleted referrer goes too"
    );
    // Both tags pushed last (in the same millisecond) stay, with c and its signature.
    assert_eq!(tags(&r, "ci/app"), ["latest", "v3"]);
    for d in [&f.a, &f.b, &f.sig_a, &f.sig_sig_a] {
        assert!(!linked(&r, "ci/app", d), "{d} stayed");
    }
    assert!(linked(&r, "ci/app", &f.c) && linked(&r, "ci/app", &f.sig_c));
    let listed = |subject: &Digest| {
        let v: serde_json::Value =
            serde_json::from_slice(&r.referrers("ci/app", subject, None).unwrap()).unwrap();
        v["manifests"].as_array().unwrap().len()
    };
    assert_eq!((listed(&f.a), listed(&f.sig_a), listed(&f.c)), (0, 0, 1));
    assert_eq!(tags(&r, "team/app"), ["new", "old"]);
    // A fixed point: nothing more to delete.
    let again = r.apply_retention(&keep_latest(true), t0, false).unwrap();
    assert!(again.repositories.is_empty(), "{again:#?}");
}

#[tokio::test]
async fn without_delete_referrers_the_referrers_of_deleted_manifests_stay() {
    let (_dir, r) = registry();
    let t0 = now_ms();
    let f = fixture(&r, t0).await;
    let report = r.apply_retention(&keep_latest(false), t0, false).unwrap();
    let done = only(&report);
    assert_eq!(done.tags_deleted, ["v1", "v2"]);
    assert_eq!(
        done.manifests_deleted,
        sorted(vec![f.a.clone(), f.b.clone()])
    );
    assert!(done.referrers_deleted.is_empty(), "{done:#?}");
    for d in [&f.sig_a, &f.sig_sig_a, &f.sig_c] {
        assert!(linked(&r, "ci/app", d), "{d} went");
    }
    // With an untagged grace, the orphaned signatures are kept while recent...
    let grace = vec![RetentionPolicy {
        untagged_grace: hours(1),
        ..keep_latest(false).remove(0)
    }];
    let report = r.apply_retention(&grace, t0 + HOUR / 2, true).unwrap();
    assert!(report.repositories.is_empty(), "{report:#?}");
    // ...and go as untagged manifests once unused, but never the signature of c.
    let report = r.apply_retention(&grace, t0 + 2 * HOUR, false).unwrap();
    assert_eq!(
        only(&report).referrers_deleted,
        sorted(vec![f.sig_a.clone(), f.sig_sig_a.clone()])
    );
    assert!(linked(&r, "ci/app", &f.sig_c));
}

/// Harbor's retention deleted images in use because pulls by digest (and so an index's
/// platform manifests) were never recorded.
#[tokio::test]
async fn keep_pulled_within_counts_pulls_by_digest_and_of_an_index_s_manifests() {
    let (_dir, r) = registry();
    let t0 = now_ms();
    let x = image(&r, "ci/app", Some("pinned"), "x").await;
    let amd64 = image(&r, "ci/app", None, "amd64").await;
    let arm64 = image(&r, "ci/app", None, "arm64").await;
    index(&r, "ci/app", "multi", &[&amd64, &arm64]);
    image(&r, "ci/app", Some("newest"), "y").await;
    for (tag, ms) in [("pinned", 1), ("multi", 2), ("newest", 3)] {
        pushed_at(&r, "ci/app", tag, t0 - 10_000 + ms);
    }
    let policies = vec![RetentionPolicy {
        keep_last: Some(1),
        keep_pulled_within: hours(1),
        ..policy(&["ci/*"])
    }];
    let unused = r.apply_retention(&policies, t0, true).unwrap();
    assert_eq!(
        only(&unused).tags_deleted,
        ["multi", "pinned"],
        "without those pulls"
    );

    // A pull of the image by digest, and of one platform manifest by digest only (as
    // containerd does after reading the index by tag elsewhere).
    r.manifest("ci/app", &Reference::Digest(x.clone())).unwrap();
    r.manifest("ci/app", &Reference::Digest(arm64.clone()))
        .unwrap();
    let used = r.apply_retention(&policies, t0 + HOUR / 2, false).unwrap();
    assert!(used.repositories.is_empty(), "{used:#?}");
    assert_eq!(tags(&r, "ci/app"), ["multi", "newest", "pinned"]);

    // Once the pulls are older than keep_pulled_within, the tags go.
    let later = r.apply_retention(&policies, t0 + 2 * HOUR, false).unwrap();
    assert_eq!(only(&later).tags_deleted, ["multi", "pinned"]);
    assert_eq!(tags(&r, "ci/app"), ["newest"]);
}

/// A read by tag records the manifest's digest (HEAD requests read the same way).
#[tokio::test]
async fn a_read_by_tag_is_recorded_as_a_pull() {
    let (_dir, r) = registry();
    let t0 = now_ms();
    let d = image(&r, "ci/app", Some("v1"), "v1").await;
    assert_eq!(r.store.access.last(&r.store.meta, &d).unwrap(), None);
    r.manifest("ci/app", &Reference::Tag("v1".into())).unwrap();
    let at = r.store.access.last(&r.store.meta, &d).unwrap().unwrap();
    assert!(at + 1000 >= t0 && at <= now_ms(), "{at} vs {t0}");
    assert!(r.manifest("ci/app", &Reference::Tag("v2".into())).is_err());
}

#[tokio::test]
async fn untagged_manifests_go_after_the_grace_unless_in_use() {
    let (_dir, r) = registry();
    let t0 = now_ms();
    // p loses its tag to a push of q; s is pushed by digest only; q is signed.
    let p = image(&r, "u/app", Some("v1"), "p").await;
    let q = image(&r, "u/app", Some("v1"), "q").await;
    let s = image(&r, "u/app", None, "s").await;
    let sig_q = referrer(&r, "u/app", &q, "sig").await;
    // An index whose platform manifest is shared with nothing else.
    let child = image(&r, "u/app", None, "child").await;
    let idx = index(&r, "u/app", "multi", &[&child]);
    let policies = vec![RetentionPolicy {
        untagged_grace: hours(1),
        ..policy(&["u/app"])
    }];
    let early = r.apply_retention(&policies, t0 + HOUR / 2, false).unwrap();
    assert!(early.repositories.is_empty(), "{early:#?}");

    let late = r.apply_retention(&policies, t0 + 2 * HOUR, true).unwrap();
    let done = only(&late);
    assert!(done.tags_deleted.is_empty(), "no keep rule: no tag goes");
    assert_eq!(done.manifests_deleted, sorted(vec![p.clone(), s.clone()]));
    assert!(
        done.referrers_deleted.is_empty(),
        "a referrer of a kept manifest is never untagged garbage"
    );

    // A pull within the grace keeps s.
    r.store.access.touch(&s, t0 + 90 * 60 * 1000);
    let report = r.apply_retention(&policies, t0 + 2 * HOUR, false).unwrap();
    assert_eq!(only(&report).manifests_deleted, vec![p.clone()]);
    for d in [&q, &s, &sig_q, &child, &idx] {
        assert!(linked(&r, "u/app", d), "{d} went");
    }
    assert!(!linked(&r, "u/app", &p));
}

#[tokio::test]
async fn a_dry_run_writes_nothing_and_reports_what_the_run_then_deletes() {
    let (_dir, r) = registry();
    let t0 = now_ms();
    let f = fixture(&r, t0).await;
    let loose = image(&r, "ci/app", None, "loose").await;
    let policies = vec![RetentionPolicy {
        untagged_grace: hours(1),
        ..keep_latest(true).remove(0)
    }];
    let now = t0 + 2 * HOUR;
    let before = (
        tags(&r, "ci/app"),
        r.store.meta.repo_manifests("ci/app").unwrap(),
    );
    let dry = r.apply_retention(&policies, now, true).unwrap();
    assert!(dry.dry_run);
    assert_eq!(
        (
            tags(&r, "ci/app"),
            r.store.meta.repo_manifests("ci/app").unwrap()
        ),
        before,
        "the dry run wrote"
    );
    let listed: serde_json::Value =
        serde_json::from_slice(&r.referrers("ci/app", &f.a, None).unwrap()).unwrap();
    assert_eq!(listed["manifests"].as_array().unwrap().len(), 1);

    let real = r.apply_retention(&policies, now, false).unwrap();
    assert_eq!(
        RetentionReport {
            dry_run: false,
            ..dry.clone()
        },
        real
    );
    let done = only(&real);
    assert_eq!(
        done.manifests_deleted,
        sorted(vec![f.a.clone(), f.b.clone(), loose.clone()])
    );
    for d in done.manifests_deleted.iter().chain(&done.referrers_deleted) {
        assert!(!linked(&r, "ci/app", d), "{d} was reported but stayed");
    }
    let left = r.store.meta.repo_manifests("ci/app").unwrap();
    assert_eq!(
        left.len(),
        before.1.len() - done.manifests_deleted.len() - done.referrers_deleted.len()
    );
    assert_eq!(tags(&r, "ci/app"), ["latest", "v3"]);
    let json = dry.to_json();
    assert_eq!(json["dry_run"], true);
    assert_eq!(json["repositories"][0]["tags_deleted"][1], "v2");
    assert_eq!(
        json["repositories"][0]["manifests_deleted"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
}

#[tokio::test]
async fn a_manifest_a_kept_index_contains_is_never_deleted() {
    let (_dir, r) = registry();
    let t0 = now_ms();
    // The platform manifest has an old tag of its own, and the newest index holds it.
    let amd64 = image(&r, "k/app", Some("amd64"), "amd64").await;
    let idx = index(&r, "k/app", "latest", &[&amd64]);
    // An old index whose platform manifest is tagged newest.
    let arm64 = image(&r, "k/app", None, "arm64").await;
    let old = index(&r, "k/app", "old", &[&arm64]);
    r.put_manifest(
        "k/app",
        &Reference::Tag("arm64".into()),
        &[],
        OCI_MANIFEST,
        r.manifest("k/app", &Reference::Digest(arm64.clone()))
            .unwrap()
            .body,
    )
    .unwrap();
    for (tag, ms) in [("amd64", 1), ("old", 2), ("latest", 3), ("arm64", 3)] {
        pushed_at(&r, "k/app", tag, t0 - 10_000 + ms);
    }
    let policies = vec![RetentionPolicy {
        keep_last: Some(1),
        untagged_grace: hours(1),
        delete_referrers: true,
        ..policy(&["k/**"])
    }];
    let report = r.apply_retention(&policies, t0 + 2 * HOUR, false).unwrap();
    let done = only(&report);
    assert_eq!(done.tags_deleted, ["amd64", "old"]);
    assert_eq!(done.manifests_deleted, vec![old.clone()]);
    for d in [&amd64, &idx, &arm64] {
        assert!(linked(&r, "k/app", d), "{d} went");
    }
    assert!(r
        .manifest("k/app", &Reference::Digest(amd64.clone()))
        .is_ok());
}

#[tokio::test]
async fn a_repository_with_an_unreadable_manifest_is_left_alone() {
    let (_dir, r) = registry();
    let t0 = now_ms();
    let a = image(&r, "ci/app", Some("v1"), "a").await;
    image(&r, "ci/app", Some("v2"), "b").await;
    pushed_at(&r, "ci/app", "v1", t0 - 2);
    pushed_at(&r, "ci/app", "v2", t0 - 1);
    let mut b = Batch::default();
    b.put_private_manifest(
        &a,
        &ManifestRecord {
            media_type: OCI_MANIFEST.to_owned(),
            body: Bytes::from_static(b"{\"schemaVersion\": 2, \"layers\": [tru"),
        },
    );
    r.store.meta.write(b).unwrap();
    let report = r.apply_retention(&keep_latest(true), t0, false).unwrap();
    let done = only(&report);
    assert_eq!(done.unreadable_manifests, vec![a.clone()]);
    assert!(done.tags_deleted.is_empty() && done.manifests_deleted.is_empty());
    assert_eq!(tags(&r, "ci/app"), ["v1", "v2"]);
}

#[tokio::test]
async fn no_policy_no_deletion_and_the_first_matching_policy_decides() {
    let (_dir, r) = registry();
    let t0 = now_ms();
    image(&r, "ci/app", Some("v1"), "a").await;
    image(&r, "ci/app", Some("v2"), "b").await;
    pushed_at(&r, "ci/app", "v1", t0 - 2);
    pushed_at(&r, "ci/app", "v2", t0 - 1);
    assert_eq!(
        r.apply_retention(&[], t0, false).unwrap(),
        RetentionReport::default()
    );
    // The first policy keeps everything pulled recently (nothing is): it deletes both
    // tags; the broader keep_last = 1 after it is never consulted.
    let policies = vec![
        RetentionPolicy {
            keep_pulled_within: hours(1),
            ..policy(&["ci/app"])
        },
        RetentionPolicy {
            keep_last: Some(1),
            ..policy(&["**"])
        },
    ];
    let report = r.apply_retention(&policies, t0, true).unwrap();
    assert_eq!(only(&report).tags_deleted, ["v1", "v2"]);
    let report = r.apply_retention(&policies[1..], t0, true).unwrap();
    assert_eq!(only(&report).tags_deleted, ["v1"]);
}

/// A push that tags a manifest while retention deletes it: either the push lands first
/// (and its tag, not among the newest, goes with the manifest) or retention does (and
/// the push stores the manifest again). Never a tag naming a manifest the repository
/// lost, which would make an acknowledged push disappear.
#[tokio::test]
async fn a_push_during_retention_never_leaves_a_tag_without_its_manifest() {
    let (_dir, r) = registry();
    let r = Arc::new(r);
    let config = push_blob(&r, "c/app", b"{}").await;
    let layer = push_blob(&r, "c/app", b"layer").await;
    let body = image_manifest(&config, 2, &layer, 5);
    let digest = Digest::sha256_of(&body);
    image(&r, "c/app", Some("newest"), "newest").await;
    pushed_at(&r, "c/app", "newest", u64::MAX / 2);
    let policies = vec![RetentionPolicy {
        keep_last: Some(1),
        ..policy(&["c/**"])
    }];
    for round in 0..100 {
        let tag = format!("t{round}");
        push(&r, "c/app", Some(&tag), OCI_MANIFEST, body.clone());
        let barrier = Arc::new(std::sync::Barrier::new(2));
        let pusher = {
            let (r, barrier, body) = (r.clone(), barrier.clone(), body.clone());
            std::thread::spawn(move || {
                barrier.wait();
                push(&r, "c/app", Some("fresh"), OCI_MANIFEST, body);
            })
        };
        barrier.wait();
        r.apply_retention(&policies, now_ms() + 1000, false)
            .unwrap();
        pusher.join().unwrap();
        for (t, record) in r.store.meta.repo_tags("c/app", None, usize::MAX).unwrap() {
            assert!(
                linked(&r, "c/app", &record.digest),
                "round {round}: tag {t} names a manifest the repository lost"
            );
        }
        let tagged = r.store.meta.repo_tag("c/app", "fresh").unwrap().is_some();
        assert_eq!(tagged, linked(&r, "c/app", &digest), "round {round}");
        if tagged {
            r.delete_manifest("c/app", &Reference::Digest(digest.clone()))
                .unwrap();
        }
    }
}
