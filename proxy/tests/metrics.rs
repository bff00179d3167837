//! `/metrics` after real traffic: valid for `promtool check metrics`, counting what berth
//! asked of its upstream, with bounded labels.

mod support;

use std::process::Stdio;

use tokio::io::AsyncWriteExt;

use support::{make_multiarch, pull_index_through, within, Berth, Registry, Upstream};

/// The value of the sample whose line starts with `prefix` (name and labels).
fn sample(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_and_count_upstream_traffic() {
    within(120, "metrics test", async {
        let reg = Registry::start().await;
        let multi = make_multiarch(21, 50_000);
        reg.pusher(None).index("library/metered", "v1", &multi).await;
        let berth = Berth::start(&[Upstream::new("docker.io", &reg.url(), &["library/**"])]).await;
        pull_index_through(&berth, "docker.io", "library/metered", "v1", &multi, &[]).await;

        let (status, headers, body) = berth.fetch("/metrics", &[]).await;
        assert_eq!(status, 200);
        let content_type = headers["content-type"].to_str().unwrap();
        assert!(content_type.starts_with("text/plain; version=0.0.4"), "{content_type}");
        let text = String::from_utf8(body.to_vec()).unwrap();

        let mut promtool = tokio::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("promtool (Debian package prometheus) is installed");
        promtool
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .await
            .unwrap();
        let out = promtool.wait_with_output().await.unwrap();
        assert!(
            out.status.success(),
            "promtool check metrics failed:\n{}{}\n{text}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );

        let blobs = multi.blobs();
        let blob_bytes: usize = blobs.iter().map(|b| b.bytes.len()).sum();
        let fills = sample(&text, "berth_blob_fills_total{upstream=\"docker.io\",outcome=\"ok\"}");
        assert_eq!(fills, Some(blobs.len() as f64), "{text}");
        let upstream_bytes = sample(&text, "berth_upstream_bytes_total{upstream=\"docker.io\"}")
            .expect("upstream bytes counted");
        assert!(upstream_bytes >= blob_bytes as f64, "{upstream_bytes} < {blob_bytes}");
        let gets = sample(
            &text,
            "berth_upstream_requests_total{upstream=\"docker.io\",method=\"GET\",status=\"2xx\"}",
        )
        .expect("upstream GETs counted");
        // The index, its two manifests and every blob: one upstream GET each.
        assert_eq!(gets, (3 + blobs.len()) as f64, "{text}");
        let hits = sample(
            &text,
            "berth_requests_total{route=\"blob\",upstream=\"docker.io\",outcome=\"miss\",status=\"2xx\"}",
        );
        assert_eq!(hits, Some(blobs.len() as f64), "{text}");
        // Labels are bounded: no repository, tag or digest appears.
        for unbounded in ["metered", "sha256:", "v1\""] {
            assert!(!text.contains(unbounded), "{unbounded} in metrics:\n{text}");
        }

        let (_, headers, body) = berth
            .fetch("/metrics", &[("Accept", "application/openmetrics-text; version=1.0.0")])
            .await;
        assert!(headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text"));
        assert!(String::from_utf8_lossy(&body).ends_with("# EOF\n"));
    })
    .await;
}
