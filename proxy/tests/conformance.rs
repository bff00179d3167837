//! Every endpoint of the OCI distribution specification (v1.1, "end-1" to "end-13"),
//! against a private repository of the `berth` binary, with its success and its failure
//! status codes and error codes. One request per row; a gap shows up as a failing row.
//!
//! Run: `cargo test --release -p berth-proxy --test conformance`.

mod support;

use bytes::Bytes;
use support::*;

/// One request and what must come back.
struct Check<'a> {
    /// The specification's endpoint id and what is being checked.
    what: &'a str,
    method: &'a str,
    path: String,
    headers: Vec<(&'a str, String)>,
    body: Bytes,
    status: u16,
    /// The OCI error code of a failure.
    code: Option<&'a str>,
}

fn check<'a>(what: &'a str, method: &'a str, path: impl Into<String>, status: u16) -> Check<'a> {
    Check {
        what,
        method,
        path: path.into(),
        headers: Vec::new(),
        body: Bytes::new(),
        status,
        code: None,
    }
}

impl<'a> Check<'a> {
    fn code(mut self, code: &'a str) -> Self {
        self.code = Some(code);
        self
    }

    fn header(mut self, name: &'a str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = body.into();
        self
    }

    /// Sends the request; returns the response's headers.
    async fn run(self, http: &reqwest::Client, base: &str) -> reqwest::header::HeaderMap {
        let mut rb = http
            .request(self.method.parse().unwrap(), format!("{base}{}", self.path))
            .body(self.body.clone());
        for (k, v) in &self.headers {
            rb = rb.header(*k, v);
        }
        let r = rb
            .send()
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", self.what));
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let body = r.bytes().await.unwrap();
        assert_eq!(
            status,
            self.status,
            "{}: {} {}: {}",
            self.what,
            self.method,
            self.path,
            String::from_utf8_lossy(&body[..body.len().min(400)])
        );
        if let Some(code) = self.code {
            if self.method == "HEAD" {
                assert!(body.is_empty(), "{}: HEAD with a body", self.what);
            } else {
                let (got, _) = oci_error(&body, self.what);
                assert_eq!(got, code, "{}: {} {}", self.what, self.method, self.path);
            }
        }
        headers
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_endpoint_with_its_success_and_failure_codes() {
    within(
        120,
        "every_endpoint_with_its_success_and_failure_codes",
        async {
            let berth = Berth::start(&[]).await;
            let base = berth.url();
            let http = reqwest::Client::new();
            let image = make_single(51, 20_000);
            let layer = &image.layers[0].blob;
            let missing = digest_of(b"not pushed");
            let repo = "conf/app";

            // end-1: the API is there.
            check("end-1", "GET", "/v2/", 200).run(&http, &base).await;

            // end-4a, end-5, end-13, end-6: an upload in chunks.
            let h = check("end-4a", "POST", format!("/v2/{repo}/blobs/uploads/"), 202)
                .run(&http, &base)
                .await;
            let loc = header_str(&h, "location").unwrap().to_owned();
            let half = layer.bytes.len() / 2;
            check("end-5", "PATCH", loc.clone(), 202)
                .header("Content-Range", format!("0-{}", half - 1))
                .body(layer.bytes.slice(..half))
                .run(&http, &base)
                .await;
            check("end-5 out of order", "PATCH", loc.clone(), 416)
                .header("Content-Range", format!("{}-{}", half + 1, half + 2))
                .body(vec![0u8; 2])
                .code("BLOB_UPLOAD_INVALID")
                .run(&http, &base)
                .await;
            let h = check("end-13", "GET", loc.clone(), 204)
                .run(&http, &base)
                .await;
            assert_eq!(
                header_str(&h, "range"),
                Some(format!("0-{}", half - 1).as_str())
            );
            check("end-6 without a digest", "PUT", loc.clone(), 400)
                .code("DIGEST_INVALID")
                .run(&http, &base)
                .await;
            check(
                "end-6",
                "PUT",
                format!("{loc}?digest={}", layer.digest),
                201,
            )
            .body(layer.bytes.slice(half..))
            .run(&http, &base)
            .await;
            check("end-13 finished", "GET", loc.clone(), 404)
                .code("BLOB_UPLOAD_UNKNOWN")
                .run(&http, &base)
                .await;
            check("end-5 finished", "PATCH", loc.clone(), 404)
                .body(vec![1u8])
                .code("BLOB_UPLOAD_UNKNOWN")
                .run(&http, &base)
                .await;
            check(
                "end-6 unknown upload",
                "PUT",
                format!(
                    "/v2/{repo}/blobs/uploads/{}?digest={missing}",
                    "0".repeat(32)
                ),
                404,
            )
            .code("BLOB_UPLOAD_UNKNOWN")
            .run(&http, &base)
            .await;

            // end-4b: monolithic uploads.
            check(
                "end-4b",
                "POST",
                format!("/v2/{repo}/blobs/uploads/?digest={}", image.config.digest),
                201,
            )
            .body(image.config.bytes.clone())
            .run(&http, &base)
            .await;
            check(
                "end-4b wrong digest",
                "POST",
                format!("/v2/{repo}/blobs/uploads/?digest={missing}"),
                400,
            )
            .body(Bytes::from_static(b"other bytes"))
            .code("DIGEST_INVALID")
            .run(&http, &base)
            .await;
            check(
                "end-4b invalid digest",
                "POST",
                format!("/v2/{repo}/blobs/uploads/?digest=sha256:nope"),
                400,
            )
            .code("DIGEST_INVALID")
            .run(&http, &base)
            .await;
            for l in &image.layers[1..] {
                Pusher::new(&base, None).blob(repo, &l.blob).await;
            }

            // end-2: blobs.
            let blob = format!("/v2/{repo}/blobs/{}", layer.digest);
            check("end-2 GET", "GET", blob.clone(), 200)
                .run(&http, &base)
                .await;
            check("end-2 HEAD", "HEAD", blob.clone(), 200)
                .run(&http, &base)
                .await;
            check("end-2 range", "GET", blob.clone(), 206)
                .header("Range", "bytes=0-9")
                .run(&http, &base)
                .await;
            check(
                "end-2 unknown",
                "GET",
                format!("/v2/{repo}/blobs/{missing}"),
                404,
            )
            .code("BLOB_UNKNOWN")
            .run(&http, &base)
            .await;
            check(
                "end-2 unknown HEAD",
                "HEAD",
                format!("/v2/{repo}/blobs/{missing}"),
                404,
            )
            .code("BLOB_UNKNOWN")
            .run(&http, &base)
            .await;
            check(
                "end-2 other repository",
                "GET",
                format!("/v2/conf/other/blobs/{}", layer.digest),
                404,
            )
            .code("BLOB_UNKNOWN")
            .run(&http, &base)
            .await;
            check(
                "end-2 invalid digest",
                "GET",
                format!("/v2/{repo}/blobs/sha256:xyz"),
                400,
            )
            .code("DIGEST_INVALID")
            .run(&http, &base)
            .await;
            check(
                "end-2 invalid name",
                "GET",
                format!("/v2/Conf/App/blobs/{missing}"),
                400,
            )
            .code("NAME_INVALID")
            .run(&http, &base)
            .await;

            // end-7: manifests.
            let manifest = |reference: &str| format!("/v2/{repo}/manifests/{reference}");
            check("end-7", "PUT", manifest("v1"), 201)
                .header("Content-Type", OCI_MANIFEST)
                .body(image.manifest.clone())
                .run(&http, &base)
                .await;
            check("end-7 by digest", "PUT", manifest(&image.digest), 201)
                .header("Content-Type", OCI_MANIFEST)
                .body(image.manifest.clone())
                .run(&http, &base)
                .await;
            check("end-7 invalid", "PUT", manifest("bad"), 400)
                .header("Content-Type", OCI_MANIFEST)
                .body(Bytes::from_static(b"[]"))
                .code("MANIFEST_INVALID")
                .run(&http, &base)
                .await;
            check(
                "end-7 blob unknown",
                "PUT",
                "/v2/conf/empty/manifests/v1",
                400,
            )
            .header("Content-Type", OCI_MANIFEST)
            .body(image.manifest.clone())
            .code("MANIFEST_BLOB_UNKNOWN")
            .run(&http, &base)
            .await;
            check("end-7 digest mismatch", "PUT", manifest(&missing), 400)
                .header("Content-Type", OCI_MANIFEST)
                .body(image.manifest.clone())
                .code("DIGEST_INVALID")
                .run(&http, &base)
                .await;
            check("end-7 too large", "PUT", manifest("big"), 413)
                .header("Content-Type", OCI_MANIFEST)
                .body(vec![b' '; (4 << 20) + 1])
                .run(&http, &base)
                .await;
            check("end-7 invalid tag", "PUT", manifest("-bad"), 400)
                .header("Content-Type", OCI_MANIFEST)
                .body(image.manifest.clone())
                .code("TAG_INVALID")
                .run(&http, &base)
                .await;

            // end-3: manifests back.
            for reference in ["v1", image.digest.as_str()] {
                check("end-3 GET", "GET", manifest(reference), 200)
                    .run(&http, &base)
                    .await;
                check("end-3 HEAD", "HEAD", manifest(reference), 200)
                    .run(&http, &base)
                    .await;
            }
            check("end-3 invalid tag", "GET", manifest("-bad"), 404)
                .code("MANIFEST_UNKNOWN")
                .run(&http, &base)
                .await;
            check("end-3 unknown", "GET", manifest("nope"), 404)
                .code("MANIFEST_UNKNOWN")
                .run(&http, &base)
                .await;
            check("end-3 unknown HEAD", "HEAD", manifest(&missing), 404)
                .code("MANIFEST_UNKNOWN")
                .run(&http, &base)
                .await;

            // end-8a/8b: tags.
            check("end-8a", "GET", format!("/v2/{repo}/tags/list"), 200)
                .run(&http, &base)
                .await;
            check(
                "end-8b",
                "GET",
                format!("/v2/{repo}/tags/list?n=1&last=a"),
                200,
            )
            .run(&http, &base)
            .await;
            check("end-8a unknown", "GET", "/v2/conf/none/tags/list", 404)
                .code("NAME_UNKNOWN")
                .run(&http, &base)
                .await;
            check(
                "end-8b bad n",
                "GET",
                format!("/v2/{repo}/tags/list?n=x"),
                400,
            )
            .code("PAGINATION_NUMBER_INVALID")
            .run(&http, &base)
            .await;
            check("catalog", "GET", "/v2/_catalog?n=10", 200)
                .run(&http, &base)
                .await;

            // end-11: mounts.
            check(
                "end-11",
                "POST",
                format!(
                    "/v2/conf/mounted/blobs/uploads/?mount={}&from={repo}",
                    layer.digest
                ),
                201,
            )
            .run(&http, &base)
            .await;
            check(
                "end-11 refused",
                "POST",
                format!("/v2/conf/mounted/blobs/uploads/?mount={missing}&from={repo}"),
                202,
            )
            .run(&http, &base)
            .await;

            // end-12a/12b: referrers.
            let referrers = format!("/v2/{repo}/referrers/{}", image.digest);
            check("end-12a", "GET", referrers.clone(), 200)
                .run(&http, &base)
                .await;
            let h = check(
                "end-12b",
                "GET",
                format!("{referrers}?artifactType=application/x"),
                200,
            )
            .run(&http, &base)
            .await;
            assert_eq!(header_str(&h, "oci-filters-applied"), Some("artifactType"));
            check(
                "end-12 invalid digest",
                "GET",
                format!("/v2/{repo}/referrers/x"),
                400,
            )
            .code("DIGEST_INVALID")
            .run(&http, &base)
            .await;

            // Cancelling an upload.
            let h = check("end-4a", "POST", format!("/v2/{repo}/blobs/uploads/"), 202)
                .run(&http, &base)
                .await;
            let loc = header_str(&h, "location").unwrap().to_owned();
            check("upload DELETE", "DELETE", loc.clone(), 204)
                .run(&http, &base)
                .await;
            check("upload DELETE again", "DELETE", loc, 404)
                .code("BLOB_UPLOAD_UNKNOWN")
                .run(&http, &base)
                .await;

            // end-9, end-10: deletes.
            check("end-9 tag", "DELETE", manifest("v1"), 202)
                .run(&http, &base)
                .await;
            check("end-9", "DELETE", manifest(&image.digest), 202)
                .run(&http, &base)
                .await;
            check("end-9 unknown", "DELETE", manifest(&image.digest), 404)
                .code("MANIFEST_UNKNOWN")
                .run(&http, &base)
                .await;
            check("end-10", "DELETE", blob.clone(), 202)
                .run(&http, &base)
                .await;
            check("end-10 unknown", "DELETE", blob, 404)
                .code("BLOB_UNKNOWN")
                .run(&http, &base)
                .await;

            // Methods an endpoint does not have.
            check("unsupported method", "POST", manifest("v1"), 405)
                .code("UNSUPPORTED")
                .run(&http, &base)
                .await;
        },
    )
    .await;
}
