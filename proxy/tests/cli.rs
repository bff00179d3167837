//! The `berth` command line: `check`, configuration errors, `--help`, and stopping.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use support::{Berth, ClosedPort, Upstream};

fn berth() -> Command {
    let mut c = Command::new(support::berth_binary());
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
fn check_accepts_the_example_access_configurations() {
    for name in [
        "no-anonymous",
        "anonymous-read",
        "immutable-ci",
        "workspaces",
    ] {
        let path = format!(
            "{}/../examples/auth/{name}.toml",
            env!("CARGO_MANIFEST_DIR")
        );
        let out = berth().args(["check", &path]).output().unwrap();
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

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
    let upstream = ClosedPort::new();
    let mut b = Berth::start(&[Upstream::new("docker.io", &upstream.url(), &["library/**"])]).await;
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

/// Sends SIGTERM to `b`.
fn sigterm(b: &Berth) {
    let status = Command::new("kill")
        .args(["-TERM", &b.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Starts a GET of a 64 MiB private blob on a raw connection (more than the socket
/// buffers hold) and reads its first bytes. Returns the connection, the body length and
/// what was read so far (past the header).
async fn start_big_download(b: &Berth) -> (tokio::net::TcpStream, usize, Vec<u8>, support::Blob) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let blob = support::Blob::new(
        "application/octet-stream",
        support::random_bytes(9, 64 << 20),
    );
    support::Pusher::new(&b.url(), None)
        .blob("team/big", &blob)
        .await;
    let mut sock = tokio::net::TcpStream::connect(("127.0.0.1", b.port()))
        .await
        .unwrap();
    let req = format!(
        "GET /v2/team/big/blobs/{} HTTP/1.1\r\nHost: {}\r\n\r\n",
        blob.digest,
        b.host()
    );
    sock.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 64 << 10];
    let mut got = Vec::new();
    let body_start = loop {
        let n = sock.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed before the response head");
        got.extend_from_slice(&buf[..n]);
        if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&got[..body_start]).into_owned();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    (sock, blob.bytes.len(), got.split_off(body_start), blob)
}

async fn wait_exit(b: &mut Berth, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(s) = b.exited() {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "berth did not exit within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// SIGTERM with a pull in flight: berth stops taking requests, lets the pull finish
/// within the drain time (default 5 s), and exits as soon as it has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_pull_in_flight_finish() {
    use tokio::io::AsyncReadExt;
    let mut b = Berth::start(&[]).await;
    let (mut sock, len, mut body, blob) = start_big_download(&b).await;
    sigterm(&b);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(b.exited().is_none(), "berth exited with a pull in flight");
    let mut buf = vec![0u8; 1 << 20];
    while body.len() < len {
        let n = sock.read(&mut buf).await.unwrap();
        assert!(
            n > 0,
            "the pull was cut after {} of {len} bytes",
            body.len()
        );
        body.extend_from_slice(&buf[..n]);
    }
    assert_eq!(support::digest_of(&body), blob.digest);
    let exit = wait_exit(&mut b, Duration::from_secs(3)).await;
    assert!(exit.success(), "berth exited with {exit}");
}

/// A pull that outlasts the drain time is cut, and berth still exits in about the drain
/// time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_cuts_what_outlasts_the_drain_time() {
    let mut b = Berth::start_with_config("[server]\ndrain = \"1s\"\n", &[]).await;
    let (_sock, _, _, _) = start_big_download(&b).await;
    let t0 = Instant::now();
    sigterm(&b);
    // Not reading: the pull cannot finish.
    wait_exit(&mut b, Duration::from_secs(6)).await;
    assert!(
        t0.elapsed() >= Duration::from_millis(900),
        "berth exited after {:?}, before its drain time",
        t0.elapsed()
    );
}
