//! A short smoke run of the load harness (`berth-load`) against berth in front of the
//! real docker-registry: a few concurrent whole-image pulls, every digest verified, and
//! the upstream cost read from berth's own metrics. The full comparison with the peers is
//! `loadtests/compare.sh`, outside CI.

mod support;

use std::path::PathBuf;

use support::{make_multiarch, output_text, tempdir, within, Berth, Registry, Upstream};

/// `berth-load` is built beside `berth` (the test command builds the whole workspace).
fn berth_load() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_BIN_EXE_berth")).with_file_name("berth-load");
    assert!(
        path.exists(),
        "{} is missing: build it with cargo build --release -p berth-loadtests",
        path.display()
    );
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn berth_load_pulls_through_berth() {
    within(180, "berth_load_pulls_through_berth", async {
        let reg = Registry::start().await;
        let multi = make_multiarch(41, 300_000);
        reg.pusher(None).index("library/smoke", "v1", &multi).await;
        let berth = Berth::start(&[Upstream::new("docker.io", &reg.url(), &["library/**"])]).await;
        let out = tempdir();
        let json = out.path().join("report.json");
        let run = tokio::process::Command::new(berth_load())
            .args([
                "pull",
                "--registry",
                &berth.url(),
                "--image",
                "docker.io/library/smoke:v1",
            ])
            .args([
                "--concurrency",
                "4",
                "--pulls",
                "12",
                "--duration",
                "60s",
                "--quiet",
            ])
            .args(["--metrics", &format!("{}/metrics", berth.url())])
            .arg("--json")
            .arg(&json)
            .output()
            .await
            .expect("run berth-load");
        assert!(
            run.status.success(),
            "berth-load failed:\n{}",
            output_text(&run)
        );
        let report: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
        assert_eq!(report["units"]["ok"], 12, "{report:#}");
        assert_eq!(report["units"]["failed"], 0, "{report:#}");
        // One linux/amd64 pull: the index, the platform manifest, its config and layers.
        let amd64 = multi.image("amd64");
        let per_pull = 2 + 1 + amd64.layers.len() as u64;
        assert_eq!(report["digests_verified"], 12 * per_pull, "{report:#}");
        // Twelve pulls cost the upstream one fetch of each object, no more.
        assert_eq!(report["upstream"]["requests"], per_pull, "{report:#}");
    })
    .await;
}
