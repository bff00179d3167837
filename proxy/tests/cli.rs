//! The `berth` command line: `check`, configuration errors, `--help`, and stopping.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use support::{Berth, Upstream};

fn berth() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_berth"));
    c.env_remove("BERTH_CONFIG")
        .env_remove("BERTH_LISTEN")
        .env_remove("BERTH_STORE")
        .env("NO_COLOR", "1");
    c
}

const BAD: &str = r#"
[server]
listen = "everywhere"
[[upstream]]
namespace = "docker.io"
url = "https://registry-1.docker.io"
prefixes = ["library/**", "Bad/**"]
credentials = { username = "me", password = "hunter2" }
typo = true
"#;

#[test]
fn check_accepts_the_shipped_configuration() {
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/../upstreams.toml");
    let out = berth().args(["check", shipped]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok (6 upstreams)"));
}

#[test]
fn check_reports_every_problem_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, BAD).unwrap();
    let out = berth().arg("check").arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    for want in [
        "server.listen:",
        "upstream[0].prefixes[1]:",
        "upstream[0].credentials.password: secrets are never written",
        "upstream[0].typo: unknown key",
    ] {
        assert!(err.contains(want), "missing {want:?} in:\n{err}");
    }
    assert!(!err.contains("hunter2"), "a secret was echoed:\n{err}");
}

#[test]
fn serve_refuses_a_bad_configuration_with_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, BAD).unwrap();
    let out = berth()
        .arg("serve")
        .arg("--config")
        .arg(&file)
        .arg("--store")
        .arg(dir.path().join("store"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("upstream[0].typo: unknown key"), "{err}");
    assert!(err.contains("server.listen:"), "{err}");
}

#[test]
fn help_documents_the_commands_and_environment() {
    let out = berth().arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for want in [
        "serve",
        "check",
        "BERTH_CONFIG",
        "BERTH_LISTEN",
        "BERTH_STORE",
        "--store",
    ] {
        assert!(help.contains(want), "--help lacks {want}:\n{help}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_berth_within_its_drain_time() {
    let mut b = Berth::start(&[Upstream::new(
        "docker.io",
        "http://127.0.0.1:9",
        &["library/**"],
    )])
    .await;
    let status = Command::new("kill")
        .args(["-TERM", &b.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    // The default drain time is 5 s; a berth still running well past it is a hang.
    let deadline = Instant::now() + Duration::from_secs(20);
    let exit = loop {
        if let Some(s) = b.exited() {
            break s;
        }
        assert!(Instant::now() < deadline, "berth ignored SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(exit.success(), "berth exited with {exit}");
}
