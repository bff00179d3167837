use super::*;
use berth_store::oci::{OCI_INDEX, OCI_MANIFEST};

pub(crate) fn registry() -> (tempfile::TempDir, Registry) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    (dir, Registry::new(store, Options::default()))
}

pub(crate) async fn push_blob(r: &Registry, repo: &str, bytes: &[u8]) -> Digest {
    let d = Digest::sha256_of(bytes);
    let upload = r.start_upload(repo).unwrap();
    let mut u = upload.lock().await;
    u.write(bytes).unwrap();
    r.finish_upload(&mut u, &d, None).unwrap();
    d
}

pub(crate) fn image_manifest(
    config: &Digest,
    config_len: usize,
    layer: &Digest,
    layer_len: usize,
) -> Bytes {
    Bytes::from(format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config}","size":{config_len}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{layer}","size":{layer_len}}}]}}"#
    ))
}

/// Whether no upload or partial blob left a file in the store.
fn tmp_is_empty(dir: &tempfile::TempDir) -> bool {
    upload_files(dir.path()).is_empty()
        && std::fs::read_dir(dir.path().join("tmp"))
            .unwrap()
            .next()
            .is_none()
}

/// The names of the files in the store's `uploads/`, sorted.
fn upload_files(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir.join("uploads"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

/// A registry on the store at `dir` (as a restarted berth opens it).
fn reopen(dir: &std::path::Path, options: Options) -> Registry {
    Registry::new(Arc::new(Store::open(dir).unwrap()), options)
}

/// Starts an upload into `repo`, writes and acknowledges each of `chunks`, and drops the
/// registry, as a restart would; the upload's id.
async fn persisted_upload(r: Registry, repo: &str, chunks: &[&[u8]]) -> String {
    let upload = r.start_upload(repo).unwrap();
    let mut u = upload.lock().await;
    for chunk in chunks {
        u.write(chunk).unwrap();
        u.acknowledge().unwrap();
    }
    u.id().to_owned()
}

fn is_unknown<T>(r: Result<T, RegistryError>) -> bool {
    matches!(r, Err(RegistryError::UploadUnknown(_)))
}

#[tokio::test]
async fn chunks_upload_in_order_and_publish_only_the_right_digest() {
    let (dir, r) = registry();
    let upload = r.start_upload("team/app").unwrap();
    let id = upload.lock().await.id().to_owned();
    {
        let got = r.upload("team/app", &id).unwrap();
        let mut u = got.lock().await;
        u.check_chunk_start(0).unwrap();
        u.write(b"hello ").unwrap();
        assert!(matches!(
            u.check_chunk_start(3),
            Err(RegistryError::ChunkOutOfOrder {
                expected: 6,
                got: 3
            })
        ));
        u.write(b"world").unwrap();
        assert_eq!(u.offset(), 11);
    }
    assert!(matches!(
        r.upload("other/repo", &id),
        Err(RegistryError::UploadUnknown(_))
    ));
    let mut u = upload.lock().await;
    let wrong = Digest::sha256_of(b"hello");
    assert!(matches!(
        r.finish_upload(&mut u, &wrong, None),
        Err(RegistryError::DigestInvalid(_))
    ));
    assert!(r.store.blobs.stat(&wrong).unwrap().is_none());
    assert!(
        tmp_is_empty(&dir),
        "a rejected upload left its bytes behind"
    );
    assert!(matches!(
        r.upload("team/app", &id),
        Err(RegistryError::UploadUnknown(_))
    ));

    let d = push_blob(&r, "team/app", b"hello world").await;
    assert_eq!(r.blob_size("team/app", &d).unwrap(), 11);
    assert!(matches!(
        r.blob("team/other", &d),
        Err(RegistryError::BlobUnknown(_))
    ));
}

#[tokio::test]
async fn mounts_need_the_blob_in_the_source_repository() {
    let (_dir, r) = registry();
    let d = push_blob(&r, "a/src", b"layer").await;
    assert!(!r.mount("a/dst", &d, "a/nothing").unwrap());
    assert!(r.blob("a/dst", &d).is_err());
    assert!(r.mount("a/dst", &d, "a/src").unwrap());
    assert_eq!(r.blob_size("a/dst", &d).unwrap(), 5);
}

#[tokio::test]
async fn manifests_are_validated_stored_exactly_and_tagged() {
    let (_dir, r) = registry();
    let config = push_blob(&r, "t/app", b"{}").await;
    let layer = push_blob(&r, "t/app", b"layer bytes").await;
    let body = image_manifest(&config, 2, &layer, 11);
    let tag = Reference::Tag("v1".into());

    // A layer of another repository does not count.
    let foreign = push_blob(&r, "t/other", b"elsewhere").await;
    let bad = image_manifest(&config, 2, &foreign, 9);
    assert!(matches!(
        r.put_manifest("t/app", &tag, &[], OCI_MANIFEST, bad),
        Err(RegistryError::ManifestBlobUnknown(d)) if d == foreign
    ));
    let wrong_size = image_manifest(&config, 2, &layer, 12);
    assert!(matches!(
        r.put_manifest("t/app", &tag, &[], OCI_MANIFEST, wrong_size),
        Err(RegistryError::ManifestInvalid(_))
    ));
    let by_wrong_digest = Reference::Digest(Digest::sha256_of(b"x"));
    assert!(matches!(
        r.put_manifest("t/app", &by_wrong_digest, &[], OCI_MANIFEST, body.clone()),
        Err(RegistryError::DigestInvalid(_))
    ));
    let huge = Bytes::from(vec![b' '; MAX_MANIFEST_BYTES + 1]);
    assert!(matches!(
        r.put_manifest("t/app", &tag, &[], OCI_MANIFEST, huge),
        Err(RegistryError::ManifestTooLarge { .. })
    ));

    let pushed = r
        .put_manifest(
            "t/app",
            &tag,
            &["latest".into()],
            OCI_MANIFEST,
            body.clone(),
        )
        .unwrap();
    assert_eq!(pushed.digest, Digest::sha256_of(&body));
    for reference in [
        tag.clone(),
        Reference::Tag("latest".into()),
        Reference::Digest(pushed.digest.clone()),
    ] {
        let m = r.manifest("t/app", &reference).unwrap();
        assert_eq!(
            (m.body, m.media_type.as_str()),
            (body.clone(), OCI_MANIFEST)
        );
    }
    assert!(r.manifest("t/other", &tag).is_err());

    // An index needs its children in the repository.
    let index = Bytes::from(format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":{}}}]}}"#,
        pushed.digest,
        body.len()
    ));
    assert!(matches!(
        r.put_manifest("t/other", &tag, &[], OCI_INDEX, index.clone()),
        Err(RegistryError::ManifestBlobUnknown(_))
    ));
    r.put_manifest(
        "t/app",
        &Reference::Tag("multi".into()),
        &[],
        OCI_INDEX,
        index,
    )
    .unwrap();

    // Deleting a tag leaves the manifest; deleting the manifest takes its tags.
    r.delete_manifest("t/app", &Reference::Tag("latest".into()))
        .unwrap();
    assert!(r
        .manifest("t/app", &Reference::Tag("latest".into()))
        .is_err());
    assert!(r.manifest("t/app", &tag).is_ok());
    r.delete_manifest("t/app", &Reference::Digest(pushed.digest.clone()))
        .unwrap();
    assert!(r.manifest("t/app", &tag).is_err());
    assert!(r
        .manifest("t/app", &Reference::Digest(pushed.digest.clone()))
        .is_err());
    assert!(matches!(
        r.delete_manifest("t/app", &tag),
        Err(RegistryError::ManifestUnknown(_))
    ));
}

#[tokio::test]
async fn tags_and_repositories_page_in_lexical_order() {
    let (_dir, r) = registry();
    let config = push_blob(&r, "p/app", b"{}").await;
    let layer = push_blob(&r, "p/app", b"l").await;
    let body = image_manifest(&config, 2, &layer, 1);
    for t in ["b", "a", "c", "a1"] {
        r.put_manifest(
            "p/app",
            &Reference::Tag(t.into()),
            &[],
            OCI_MANIFEST,
            body.clone(),
        )
        .unwrap();
    }
    let page = r.tags("p/app", Some(2), None).unwrap();
    assert_eq!(
        (page.items.clone(), page.more),
        (vec!["a".to_owned(), "a1".to_owned()], true)
    );
    let page = r.tags("p/app", Some(2), Some("a1")).unwrap();
    assert_eq!(
        (page.items.clone(), page.more),
        (vec!["b".to_owned(), "c".to_owned()], false)
    );
    assert_eq!(r.tags("p/app", None, Some("c")).unwrap().items.len(), 0);
    assert!(matches!(
        r.tags("p/none", None, None),
        Err(RegistryError::NameUnknown(_))
    ));

    push_blob(&r, "p/app2", b"x").await;
    push_blob(&r, "o/first", b"x").await;
    let page = r.catalog(Some(2), None).unwrap();
    assert_eq!(page.items, vec!["o/first", "p/app"]);
    assert!(page.more);
    assert_eq!(
        r.catalog(None, Some("p/app")).unwrap().items,
        vec!["p/app2"]
    );
}

#[tokio::test]
async fn referrers_list_manifests_with_a_subject_and_filter_by_artifact_type() {
    let (_dir, r) = registry();
    let config = push_blob(&r, "s/app", b"{}").await;
    let layer = push_blob(&r, "s/app", b"l").await;
    let image = r
        .put_manifest(
            "s/app",
            &Reference::Tag("v1".into()),
            &[],
            OCI_MANIFEST,
            image_manifest(&config, 2, &layer, 1),
        )
        .unwrap();
    let empty = r.referrers("s/app", &image.digest, None).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&empty).unwrap();
    assert_eq!(v["manifests"].as_array().unwrap().len(), 0);
    assert_eq!(v["mediaType"], OCI_INDEX);

    let mut referrers = Vec::new();
    for kind in ["application/x.sig", "application/x.sbom"] {
        let body = Bytes::from(format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","artifactType":"{kind}","config":{{"mediaType":"application/vnd.oci.empty.v1+json","digest":"{config}","size":2}},"layers":[],"subject":{{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":1}},"annotations":{{"kind":"{kind}"}}}}"#,
            image.digest
        ));
        let pushed = r
            .put_manifest(
                "s/app",
                &Reference::Digest(Digest::sha256_of(&body)),
                &[],
                OCI_MANIFEST,
                body,
            )
            .unwrap();
        assert_eq!(pushed.subject.as_ref(), Some(&image.digest));
        referrers.push(pushed.digest);
    }
    let all: serde_json::Value =
        serde_json::from_slice(&r.referrers("s/app", &image.digest, None).unwrap()).unwrap();
    assert_eq!(all["manifests"].as_array().unwrap().len(), 2);
    let sigs: serde_json::Value = serde_json::from_slice(
        &r.referrers("s/app", &image.digest, Some("application/x.sig"))
            .unwrap(),
    )
    .unwrap();
    let sigs = sigs["manifests"].as_array().unwrap();
    assert_eq!(sigs.len(), 1);
    assert_eq!(sigs[0]["digest"], referrers[0].to_string());
    assert_eq!(sigs[0]["annotations"]["kind"], "application/x.sig");
    // Not visible through another repository.
    let other: serde_json::Value =
        serde_json::from_slice(&r.referrers("s/other", &image.digest, None).unwrap()).unwrap();
    assert_eq!(other["manifests"].as_array().unwrap().len(), 0);
    // Deleting a referrer removes it from the list.
    r.delete_manifest("s/app", &Reference::Digest(referrers[1].clone()))
        .unwrap();
    let left: serde_json::Value =
        serde_json::from_slice(&r.referrers("s/app", &image.digest, None).unwrap()).unwrap();
    assert_eq!(left["manifests"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn idle_uploads_expire_and_take_their_bytes_with_them() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    let r = Registry::new(
        store,
        Options {
            upload_timeout: Duration::from_millis(50),
            max_uploads: 2,
            ..Options::default()
        },
    );
    let upload = r.start_upload("e/app").unwrap();
    upload.lock().await.write(b"partial").unwrap();
    let second = r.start_upload("e/app").unwrap();
    assert!(matches!(
        r.start_upload("e/app"),
        Err(RegistryError::TooManyUploads { limit: 2 })
    ));
    r.cancel_upload(&mut *second.lock().await);
    let id = upload.lock().await.id().to_owned();
    drop(upload);
    assert_eq!(r.expire_uploads(), 0);
    tokio::time::sleep(Duration::from_millis(80)).await;
    assert_eq!(r.expire_uploads(), 1);
    assert!(matches!(
        r.upload("e/app", &id),
        Err(RegistryError::UploadUnknown(_))
    ));
    assert!(tmp_is_empty(&dir));
}

#[tokio::test]
async fn garbage_collection_frees_exactly_the_unreferenced_blobs() {
    let (_dir, r) = registry();
    let config = push_blob(&r, "g/app", b"{}").await;
    let kept = push_blob(&r, "g/app", b"kept layer").await;
    let dropped = push_blob(&r, "g/app", b"dropped layer").await;
    let orphan = push_blob(&r, "g/app", b"never referenced").await;
    let shared = push_blob(&r, "g/other", b"dropped layer").await;
    assert_eq!(shared, dropped);
    let cached = Digest::sha256_of(b"pulled through");
    {
        let mut w = r.store.blobs.writer(&cached).unwrap();
        w.write(b"pulled through").unwrap();
        w.commit(None).unwrap();
        r.store
            .meta
            .record_blob(&cached, 14, "docker.io/library/x", 1)
            .unwrap();
    }
    let keep = r
        .put_manifest(
            "g/app",
            &Reference::Tag("keep".into()),
            &[],
            OCI_MANIFEST,
            image_manifest(&config, 2, &kept, 10),
        )
        .unwrap();
    let drop = r
        .put_manifest(
            "g/app",
            &Reference::Tag("drop".into()),
            &[],
            OCI_MANIFEST,
            image_manifest(&config, 2, &dropped, 13),
        )
        .unwrap();
    r.delete_manifest("g/app", &Reference::Digest(drop.digest))
        .unwrap();

    // Within the grace period no blob goes: a push may be about to reference it. The
    // deleted manifest does.
    assert_eq!(
        r.collect_garbage(Duration::from_secs(3600)).unwrap(),
        GcReport {
            manifests_removed: 1,
            ..GcReport::default()
        }
    );

    let report = r.collect_garbage(Duration::ZERO).unwrap();
    // g/app loses its links to the dropped layer and the orphan; g/other's link to the
    // dropped layer is unreferenced too.
    assert_eq!(report.links_removed, 3);
    assert_eq!((report.blobs_removed, report.bytes_freed), (2, 13 + 16));
    for gone in [&dropped, &orphan] {
        assert!(
            r.store.blobs.stat(gone).unwrap().is_none(),
            "{gone} survived"
        );
    }
    for (repo, d) in [("g/app", &config), ("g/app", &kept)] {
        assert!(
            r.blob(repo, d).is_ok(),
            "{d} went although {repo} references it"
        );
    }
    assert!(
        r.store.blobs.stat(&cached).unwrap().is_some(),
        "a pulled-through blob went"
    );
    assert!(r.manifest("g/app", &Reference::Digest(keep.digest)).is_ok());
    assert_eq!(report.repos_removed, 1, "g/other was left with nothing");
    assert_eq!(r.catalog(None, None).unwrap().items, vec!["g/app"]);
    assert_eq!(
        r.collect_garbage(Duration::ZERO).unwrap(),
        GcReport::default()
    );
}

#[tokio::test]
async fn garbage_collection_keeps_a_repository_whose_manifest_it_cannot_read() {
    let (_dir, r) = registry();
    let config = push_blob(&r, "u/app", b"{}").await;
    let layer = push_blob(&r, "u/app", b"layer of u/app").await;
    let orphan = push_blob(&r, "u/app", b"not referenced by anything").await;
    let elsewhere = push_blob(&r, "u/other", b"unreferenced elsewhere").await;
    let pushed = r
        .put_manifest(
            "u/app",
            &Reference::Tag("v1".into()),
            &[],
            OCI_MANIFEST,
            image_manifest(&config, 2, &layer, 14),
        )
        .unwrap();
    // The stored record no longer parses.
    let mut b = Batch::default();
    b.put_private_manifest(
        &pushed.digest,
        &ManifestRecord {
            media_type: OCI_MANIFEST.to_owned(),
            body: Bytes::from_static(b"{\"schemaVersion\": 2, \"layers\": [tru"),
        },
    );
    r.store.meta.write(b).unwrap();

    let report = r.collect_garbage(Duration::ZERO).unwrap();
    assert_eq!(
        report.unreadable_manifests,
        vec![("u/app".to_owned(), pushed.digest.clone())]
    );
    // Nothing of u/app goes, not even what no manifest could reference; u/other is
    // collected as usual.
    for d in [&config, &layer, &orphan] {
        assert!(r.blob("u/app", d).is_ok(), "{d} went");
    }
    assert_eq!((report.links_removed, report.blobs_removed), (1, 1));
    assert!(r.store.blobs.stat(&elsewhere).unwrap().is_none());
    assert_eq!(r.catalog(None, None).unwrap().items, vec!["u/app"]);
}

#[tokio::test]
async fn of_concurrent_create_only_pushes_of_one_tag_one_wins() {
    let (_dir, r) = registry();
    let r = Arc::new(r);
    let config = push_blob(&r, "i/app", b"{}").await;
    let mut layers = Vec::new();
    for i in 0..8 {
        let bytes = format!("layer {i}");
        layers.push((push_blob(&r, "i/app", bytes.as_bytes()).await, bytes.len()));
    }
    for round in 0..20 {
        let tag = format!("t{round}");
        let barrier = Arc::new(std::sync::Barrier::new(layers.len()));
        let threads: Vec<_> = layers
            .iter()
            .map(|(layer, len)| {
                let (r, barrier, tag) = (r.clone(), barrier.clone(), tag.clone());
                let body = image_manifest(&config, 2, layer, *len);
                std::thread::spawn(move || {
                    barrier.wait();
                    let pushed = r.put_manifest_with(
                        "i/app",
                        &Reference::Tag(tag),
                        &[],
                        OCI_MANIFEST,
                        body,
                        false,
                    );
                    match pushed {
                        Ok(p) => Some(p.digest),
                        Err(RegistryError::TagImmutable { .. }) => None,
                        Err(e) => panic!("{e}"),
                    }
                })
            })
            .collect();
        let winners: Vec<Digest> = threads
            .into_iter()
            .filter_map(|t| t.join().unwrap())
            .collect();
        assert_eq!(winners.len(), 1, "round {round}: {winners:?}");
        assert_eq!(
            r.tag_target("i/app", &tag).unwrap(),
            Some(winners[0].clone())
        );
    }
}

#[tokio::test]
async fn an_upload_over_the_size_limit_is_refused_and_removed() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    let options = Options {
        max_upload_size: 10,
        ..Options::default()
    };
    let r = Registry::new(store, options);
    let upload = r.start_upload("s/app").unwrap();
    let mut u = upload.lock().await;
    u.write(b"0123456789").unwrap();
    assert!(u.check_fits(10).is_ok());
    assert!(matches!(
        u.check_fits(11),
        Err(RegistryError::UploadTooLarge { limit: 10 })
    ));
    assert!(matches!(
        u.write(b"x"),
        Err(RegistryError::UploadTooLarge { limit: 10 })
    ));
    assert!(tmp_is_empty(&dir), "the upload's bytes stayed");
    assert!(
        u.write(b"").is_err(),
        "the upload took more after the refusal"
    );
}

/// A push that tags a manifest while the manifest is being deleted by digest: either the
/// push comes first (and the delete removes its tag too) or the delete does (and the push
/// links the manifest again). Never a tag left naming a manifest the repository lost,
/// which would make an acknowledged push disappear.
#[tokio::test]
async fn a_delete_by_digest_and_a_concurrent_tag_push_stay_consistent() {
    let (_dir, r) = registry();
    let r = Arc::new(r);
    let config = push_blob(&r, "d/app", b"{}").await;
    let layer = push_blob(&r, "d/app", b"layer").await;
    let body = image_manifest(&config, 2, &layer, 5);
    let digest = Digest::sha256_of(&body);
    for round in 0..200 {
        r.put_manifest(
            "d/app",
            &Reference::Tag("a".into()),
            &[],
            OCI_MANIFEST,
            body.clone(),
        )
        .unwrap();
        let barrier = Arc::new(std::sync::Barrier::new(2));
        let pusher = {
            let (r, barrier, body) = (r.clone(), barrier.clone(), body.clone());
            std::thread::spawn(move || {
                barrier.wait();
                r.put_manifest(
                    "d/app",
                    &Reference::Tag("b".into()),
                    &[],
                    OCI_MANIFEST,
                    body,
                )
                .unwrap();
            })
        };
        barrier.wait();
        r.delete_manifest("d/app", &Reference::Digest(digest.clone()))
            .unwrap();
        pusher.join().unwrap();
        let tagged = r.store.meta.repo_tag("d/app", "b").unwrap().is_some();
        let linked = r
            .store
            .meta
            .repo_manifest("d/app", &digest)
            .unwrap()
            .is_some();
        assert_eq!(
            tagged, linked,
            "round {round}: tag b exists: {tagged}, its manifest is in the repository: {linked}"
        );
        // Start the next round with neither.
        if linked {
            r.delete_manifest("d/app", &Reference::Digest(digest.clone()))
                .unwrap();
        }
    }
}

/// The same manifest bytes pushed to two repositories with two Content-Types (possible
/// for a body without `mediaType` that has both `manifests` and `config`/`layers`): GC
/// reads each repository's copy as the type it was pushed there with, so the image
/// manifest's blobs stay even though the index was stored last.
#[tokio::test]
async fn gc_reads_a_manifest_as_each_repository_pushed_it() {
    let (_dir, r) = registry();
    let ambiguous = |config: &Digest, layer: &Digest| {
        Bytes::from(format!(
            r#"{{"schemaVersion":2,"manifests":[],"config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config}","size":2}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{layer}","size":5}}]}}"#
        ))
    };
    let config = push_blob(&r, "b/two", b"{}").await;
    let layer = push_blob(&r, "b/two", b"layer").await;
    let body = ambiguous(&config, &layer);
    r.put_manifest(
        "b/two",
        &Reference::Tag("m".into()),
        &[],
        OCI_MANIFEST,
        body.clone(),
    )
    .unwrap();
    // Stored last, so the record's type is the index's.
    r.put_manifest("a/one", &Reference::Tag("i".into()), &[], OCI_INDEX, body)
        .unwrap();
    let report = r.collect_garbage(Duration::ZERO).unwrap();
    assert!(report.unreadable_manifests.is_empty(), "{report:?}");
    assert_eq!(r.blob_size("b/two", &layer).unwrap(), 5, "{report:?}");
    assert_eq!(r.blob_size("b/two", &config).unwrap(), 2, "{report:?}");
}

#[tokio::test]
async fn an_upload_resumes_after_a_restart_and_publishes_the_right_digest() {
    let dir = tempfile::tempdir().unwrap();
    let r = reopen(dir.path(), Options::default());
    let id = persisted_upload(r, "team/app", &[b"first ", b"second "]).await;
    assert_eq!(upload_files(dir.path()), [id.clone(), format!("{id}.json")]);

    let r = reopen(dir.path(), Options::default());
    assert_eq!(r.uploads_in_progress(), 0, "nothing is restored eagerly");
    let upload = r.upload("team/app", &id).unwrap();
    assert_eq!(r.uploads_in_progress(), 1);
    let mut u = upload.lock().await;
    assert_eq!(u.received().unwrap(), 13);
    assert!(u.is_acknowledged());
    assert!(matches!(
        u.check_chunk_start(6),
        Err(RegistryError::ChunkOutOfOrder {
            expected: 13,
            got: 6
        })
    ));
    u.check_chunk_start(13).unwrap();
    u.write(b"third").unwrap();
    let d = Digest::sha256_of(b"first second third");
    assert_eq!(r.finish_upload(&mut u, &d, Some(18)).unwrap(), 18);
    drop(u);
    assert_eq!(r.blob_size("team/app", &d).unwrap(), 18);
    let blob = r.blob("team/app", &d).unwrap();
    assert_eq!(&blob.map().unwrap()[..], b"first second third");
    assert!(tmp_is_empty(&dir), "the finished upload left files");
    assert!(is_unknown(r.upload("team/app", &id)));
    drop(upload);
    drop(blob);
    drop(r);
    assert!(is_unknown(
        reopen(dir.path(), Options::default()).upload("team/app", &id)
    ));
}

#[tokio::test]
async fn a_chunk_cut_off_half_way_is_not_part_of_the_resumed_upload() {
    let dir = tempfile::tempdir().unwrap();
    let r = reopen(dir.path(), Options::default());
    let upload = r.start_upload("team/app").unwrap();
    let id = {
        let mut u = upload.lock().await;
        u.write(b"kept").unwrap();
        u.acknowledge().unwrap();
        // A chunk whose request failed half-way: received, never acknowledged...
        u.write(b"half of a ch").unwrap();
        assert!(!u.is_acknowledged());
        u.id().to_owned()
    };
    drop(upload);
    drop(r);
    // ... and the torn end of a write the crash interrupted, which was never hashed.
    let data = dir.path().join("uploads").join(&id);
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&data)
        .unwrap();
    std::io::Write::write_all(&mut f, b"torn").unwrap();
    drop(f);

    let r = reopen(dir.path(), Options::default());
    let upload = r.upload("team/app", &id).unwrap();
    let mut u = upload.lock().await;
    assert_eq!(u.received().unwrap(), 4);
    assert_eq!(std::fs::metadata(&data).unwrap().len(), 4);
    u.write(b" and the rest").unwrap();
    let d = Digest::sha256_of(b"kept and the rest");
    assert!(matches!(
        r.finish_upload(
            &mut u,
            &Digest::sha256_of(b"kepthalf of a ch and the rest"),
            None
        ),
        Err(RegistryError::DigestInvalid(_))
    ));
    assert!(tmp_is_empty(&dir), "a refused upload left files");
    assert!(r.blob("team/app", &d).is_err());

    // Again, finishing with the right digest.
    drop(u);
    drop(upload);
    drop(r);
    let r = reopen(dir.path(), Options::default());
    let upload = r.start_upload("team/app").unwrap();
    let id = {
        let mut u = upload.lock().await;
        u.write(b"kept").unwrap();
        u.acknowledge().unwrap();
        u.write(b"lost").unwrap();
        u.id().to_owned()
    };
    drop(upload);
    drop(r);
    let r = reopen(dir.path(), Options::default());
    let upload = r.upload("team/app", &id).unwrap();
    let mut u = upload.lock().await;
    u.write(b" and the rest").unwrap();
    r.finish_upload(&mut u, &d, Some(17)).unwrap();
    assert_eq!(
        &r.blob("team/app", &d).unwrap().map().unwrap()[..],
        b"kept and the rest"
    );
}

#[tokio::test]
async fn persisted_uploads_expire_from_their_last_acknowledged_activity() {
    let dir = tempfile::tempdir().unwrap();
    let timeout = Duration::from_millis(400);
    let options = Options {
        upload_timeout: timeout,
        ..Options::default()
    };
    let old = persisted_upload(reopen(dir.path(), options.clone()), "e/app", &[b"old"]).await;
    let old_again =
        persisted_upload(reopen(dir.path(), options.clone()), "e/app", &[b"old too"]).await;
    // An upload file whose state was never written (a crash while starting).
    let orphan = "0123456789abcdef0123456789abcdef";
    std::fs::write(dir.path().join("uploads").join(orphan), b"x").unwrap();
    tokio::time::sleep(timeout + Duration::from_millis(100)).await;
    let fresh = persisted_upload(reopen(dir.path(), options.clone()), "e/app", &[b"new"]).await;

    let r = reopen(dir.path(), options);
    let live = r.start_upload("e/app").unwrap();
    let live_id = live.lock().await.id().to_owned();
    // Expired: not resumed, though its files are still there until the sweep.
    assert!(is_unknown(r.upload("e/app", &old)));
    assert_eq!(r.uploads_in_progress(), 1);
    assert!(upload_files(dir.path()).contains(&old));
    assert_eq!(r.expire_uploads(), 3, "{:?}", upload_files(dir.path()));
    let mut left = vec![
        fresh.clone(),
        format!("{fresh}.json"),
        live_id.clone(),
        format!("{live_id}.json"),
    ];
    left.sort();
    assert_eq!(upload_files(dir.path()), left);
    for id in [&old, &old_again, &orphan.to_owned()] {
        assert!(is_unknown(r.upload("e/app", id)));
    }
    let resumed = r.upload("e/app", &fresh).unwrap();
    assert_eq!(resumed.lock().await.received().unwrap(), 3);
    assert_eq!(r.expire_uploads(), 0);
}

#[tokio::test]
async fn another_repository_cannot_resume_an_upload() {
    let dir = tempfile::tempdir().unwrap();
    let id = persisted_upload(
        reopen(dir.path(), Options::default()),
        "team/app",
        &[b"mine"],
    )
    .await;
    let r = reopen(dir.path(), Options::default());
    assert!(is_unknown(r.upload("team/other", &id)));
    assert_eq!(r.uploads_in_progress(), 0);
    assert_eq!(upload_files(dir.path()).len(), 2, "the refusal touched it");
    let upload = r.upload("team/app", &id).unwrap();
    assert_eq!(upload.lock().await.received().unwrap(), 4);
    assert!(is_unknown(r.upload("team/other", &id)));
    for bad in ["../../meta", "", &id[..31], &format!("{id}.json")] {
        assert!(is_unknown(r.upload("team/app", bad)), "{bad:?}");
    }
}

#[tokio::test]
async fn cancelling_a_resumed_upload_removes_its_files() {
    let dir = tempfile::tempdir().unwrap();
    let id = persisted_upload(
        reopen(dir.path(), Options::default()),
        "team/app",
        &[b"abc"],
    )
    .await;
    let r = reopen(dir.path(), Options::default());
    let upload = r.upload("team/app", &id).unwrap();
    r.cancel_upload(&mut *upload.lock().await);
    assert!(tmp_is_empty(&dir), "{:?}", upload_files(dir.path()));
    assert!(is_unknown(r.upload("team/app", &id)));
    assert!(upload.lock().await.received().is_err());
    drop(upload);
    drop(r);
    assert!(is_unknown(
        reopen(dir.path(), Options::default()).upload("team/app", &id)
    ));
}

#[tokio::test]
async fn resumed_uploads_count_against_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let options = Options {
        max_uploads: 1,
        ..Options::default()
    };
    let id = persisted_upload(reopen(dir.path(), options.clone()), "team/app", &[b"x"]).await;
    let r = reopen(dir.path(), options);
    let other = r.start_upload("team/app").unwrap();
    assert!(matches!(
        r.upload("team/app", &id),
        Err(RegistryError::TooManyUploads { limit: 1 })
    ));
    r.cancel_upload(&mut *other.lock().await);
    r.upload("team/app", &id).unwrap();
    assert!(matches!(
        r.start_upload("team/app"),
        Err(RegistryError::TooManyUploads { limit: 1 })
    ));
}

/// Many requests for the same persisted upload at once: one resumes it, all get it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_lookups_resume_an_upload_once() {
    let dir = tempfile::tempdir().unwrap();
    let chunk = vec![5u8; 1 << 20];
    let id = persisted_upload(
        reopen(dir.path(), Options::default()),
        "team/app",
        &[&chunk, &chunk, &chunk],
    )
    .await;
    let r = Arc::new(reopen(dir.path(), Options::default()));
    let lookups: Vec<_> = (0..8)
        .map(|_| {
            let (r, id) = (r.clone(), id.clone());
            tokio::task::spawn_blocking(move || r.upload("team/app", &id).unwrap())
        })
        .collect();
    let mut found = Vec::new();
    for l in lookups {
        found.push(l.await.unwrap());
    }
    assert!(found.iter().all(|u| Arc::ptr_eq(u, &found[0])));
    assert_eq!(found[0].lock().await.received().unwrap(), 3 << 20);
    assert_eq!(r.uploads_in_progress(), 1);
}

/// A lookup while an upload is being finished finds that upload, ended once it is done:
/// it never resumes a second session on the file being published.
#[test]
fn an_upload_being_finished_is_not_resumed_meanwhile() {
    let (_dir, r) = registry();
    let r = Arc::new(r);
    let upload = r.start_upload("team/app").unwrap();
    let id = {
        let mut u = upload.blocking_lock();
        u.write(b"acknowledged").unwrap();
        u.acknowledge().unwrap();
        u.write(b" and not yet").unwrap();
        u.id().to_owned()
    };
    let d = Digest::sha256_of(b"acknowledged and not yet");
    // The finisher takes the upload, then waits in `finish_upload` for this lock.
    let removal = r.store.removal_lock.write().unwrap();
    let finisher = {
        let (r, upload, d) = (r.clone(), upload.clone(), d.clone());
        std::thread::spawn(move || r.finish_upload(&mut upload.blocking_lock(), &d, None))
    };
    while upload.try_lock().is_ok() {
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(200));
    let found = r.upload("team/app", &id).unwrap();
    assert!(Arc::ptr_eq(&found, &upload), "a second session was resumed");
    drop(removal);
    assert_eq!(finisher.join().unwrap().unwrap(), 24);
    assert_eq!(
        &r.blob("team/app", &d).unwrap().map().unwrap()[..],
        b"acknowledged and not yet"
    );
    assert!(found.blocking_lock().received().is_err());
    assert!(is_unknown(r.upload("team/app", &id)));
}
