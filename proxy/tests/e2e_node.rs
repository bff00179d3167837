//! berth on a node: `berth node-config` files used by a real containerd, and Docker
//! Engine's mirror requests (no namespace) served through `[server] default_upstream`,
//! all against the real docker-registry.

mod support;

use std::path::Path;

use support::*;

/// Runs `berth node-config <args>`; returns (success, stdout, stderr).
fn node_config<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> (bool, String, String) {
    let out = std::process::Command::new(berth_binary())
        .arg("node-config")
        .args(args)
        .env_remove("BERTH_CONFIG")
        .output()
        .expect("run berth node-config");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The arguments of `berth node-config containerd` for `berth`, writing `certs_d` and
/// checking `containerd_config`, then `extra`.
fn containerd_wiring(
    berth: &Berth,
    certs_d: &Path,
    containerd_config: &Path,
    extra: &[&str],
) -> Vec<String> {
    let mut args = vec![
        "containerd".to_owned(),
        "--config".to_owned(),
        berth.config_path().display().to_string(),
        "--url".to_owned(),
        berth.url(),
        "--write".to_owned(),
        certs_d.display().to_string(),
        "--containerd-config".to_owned(),
        containerd_config.display().to_string(),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The client whose user agent contains `agent` never asked the registry itself: it went
/// through berth, not around it (a mirror's fallback).
async fn assert_not_asked_by(reg: &Registry, agent: &str) {
    let reqs = reg.requests().await;
    assert!(
        !reqs.iter().any(|r| r.user_agent.contains(agent)),
        "{agent} went to the registry itself: {reqs:#?}"
    );
}

/// berth's access log has a line with every one of `parts` (`path=…`, `ns=…`,
/// `status=200`).
fn assert_logged(berth: &Berth, parts: &[&str]) {
    let log = berth.log().replace('"', "");
    assert!(
        log.lines().any(|l| parts.iter().all(|p| l.contains(p))),
        "berth's log has no line with {parts:?}:\n{log}"
    );
}

/// `berth node-config containerd --write` installs one hosts.toml per upstream (backing up
/// what was there), a real containerd pulls both namespaces through berth with them and
/// never asks the registry itself, a second run changes nothing, and `--remove` puts the
/// node back as it was.
#[tokio::test(flavor = "multi_thread")]
async fn containerd_pulls_through_the_files_node_config_writes() {
    within(
        300,
        "containerd_pulls_through_the_files_node_config_writes",
        async {
            let reg = Registry::start().await;
            let lib = make_multiarch(21, 120_000);
            let app = make_multiarch(22, 120_000);
            let push = reg.pusher(None);
            push.index("library/nodeimg", "v1", &lib).await;
            push.index("team/app", "v2", &app).await;
            let berth = Berth::start(&[
                Upstream::new("docker.io", &reg.url(), &["library/**"]),
                Upstream::new("ghcr.io", &reg.url(), &["team/**"]),
            ])
            .await;
            let certs = tempdir();
            let certs_d = certs.path().join("certs.d");
            std::fs::create_dir_all(certs_d.join("docker.io")).unwrap();
            std::fs::write(certs_d.join("docker.io/hosts.toml"), "# the node's own\n").unwrap();
            let args =
                containerd_wiring(&berth, &certs_d, Path::new("/nonexistent/config.toml"), &[]);
            let (ok, out, err) = node_config(&args);
            assert!(ok, "node-config failed:\n{out}\n{err}");
            assert!(out.contains("Replaced") && out.contains("Created"), "{out}");
            assert!(
                err.contains("config_path"),
                "no warning about config_path: {err}"
            );
            let written = read(&certs_d.join("docker.io/hosts.toml"));
            assert_loopback_only(&written, "the hosts.toml node-config wrote");
            assert!(
                written.contains(&format!("[host.\"{}\"]", berth.url())),
                "{written}"
            );
            assert_eq!(
                read(&certs_d.join("docker.io/hosts.toml.berth-backup")),
                "# the node's own\n"
            );
            let (ok, again, _) = node_config(&args);
            assert!(ok && again.matches("Unchanged").count() == 2, "{again}");

            let ctd = Containerd::start().await;
            for image in ["docker.io/library/nodeimg:v1", "ghcr.io/team/app:v2"] {
                let o = ctd.pull("node-e2e", image, &certs_d).await;
                assert!(
                    o.status.success(),
                    "ctr pull {image} failed:\n{}\nberth log:\n{}",
                    output_text(&o),
                    berth.log()
                );
            }
            assert_not_asked_by(&reg, "containerd").await;
            let reqs = reg.requests().await;
            for (repo, index) in [("library/nodeimg", &lib), ("team/app", &app)] {
                for blob in index.image(host_arch()).blobs() {
                    let path = format!("/v2/{repo}/blobs/{}", blob.digest);
                    assert!(
                        reqs.iter()
                            .any(|r| r.path == path && r.user_agent.starts_with("berth/")),
                        "berth never fetched {path}"
                    );
                }
            }

            let mut remove = args.clone();
            remove.push("--remove".to_owned());
            let (ok, out, err) = node_config(&remove);
            assert!(ok, "node-config --remove failed:\n{out}\n{err}");
            assert_eq!(
                read(&certs_d.join("docker.io/hosts.toml")),
                "# the node's own\n"
            );
            assert!(!certs_d.join("ghcr.io").exists(), "{out}");
            assert!(!certs_d.join("docker.io/hosts.toml.berth-backup").exists());
        },
    )
    .await;
}

/// Docker Engine's `registry-mirrors` requests carry no namespace: `GET /v2/`, then
/// `HEAD` and `GET /v2/library/<name>/manifests/<tag>`, then blobs. With
/// `default_upstream = "docker.io"` they are docker.io's (within its prefixes); other
/// names stay private, and a push to a mirrored name is refused saying why.
#[tokio::test(flavor = "multi_thread")]
async fn docker_mirror_requests_pull_through_the_default_upstream() {
    within(120, "docker_mirror_requests_pull_through_the_default_upstream", async {
        let reg = Registry::start().await;
        let index = make_multiarch(23, 50_000);
        reg.pusher(None).index("library/dockerimg", "3.19", &index).await;
        let config = format!(
            "[server]\ndefault_upstream = \"docker.io\"\n{}",
            berth_config(&[Upstream::new("docker.io", &reg.url(), &["library/**"])])
        );
        let berth = Berth::start_with_config(&config, &[]).await;
        let accept = [(
            "Accept",
            "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json",
        )];
        assert_eq!(berth.get("/v2/", &[]).await.status().as_u16(), 200);
        // The readiness probe a DaemonSet uses: the store answers.
        let ready = berth.get("/readyz", &[]).await;
        assert_eq!(ready.status().as_u16(), 200);
        assert_eq!(ready.text().await.unwrap(), "ready\n");
        let head = berth
            .head("/v2/library/dockerimg/manifests/3.19", &accept)
            .await;
        assert_eq!(head.status().as_u16(), 200, "{}", berth.log());
        assert_eq!(
            head.headers()["docker-content-digest"].to_str().unwrap(),
            index.digest
        );
        let get = berth
            .get("/v2/library/dockerimg/manifests/3.19", &accept)
            .await;
        assert_eq!(get.status().as_u16(), 200);
        assert!(get.headers().get("oci-namespace").is_none());
        assert_eq!(get.bytes().await.unwrap(), index.bytes, "the index was rewritten");
        let image = index.image(host_arch());
        for blob in image.blobs() {
            let r = berth
                .get(&format!("/v2/library/dockerimg/blobs/{}", blob.digest), &[])
                .await;
            assert_eq!(r.status().as_u16(), 200, "{}", blob.digest);
            assert_eq!(r.bytes().await.unwrap(), blob.bytes);
        }
        // Docker's single-name form.
        let short = berth.get("/v2/dockerimg/manifests/3.19", &accept).await;
        assert_eq!(short.status().as_u16(), 200);

        // A push to a mirrored name: refused, naming the rule.
        let r = berth
            .request(
                reqwest::Method::POST,
                "/v2/library/dockerimg/blobs/uploads/",
                &[],
            )
            .await;
        let status = r.status().as_u16();
        let body = r.text().await.unwrap();
        assert_eq!(status, 405, "{body}");
        assert!(body.contains("default_upstream"), "{body}");
        // Other names are private, as before.
        let r = berth
            .request(reqwest::Method::POST, "/v2/team/app/blobs/uploads/", &[])
            .await;
        assert_eq!(r.status().as_u16(), 202);
        let r = berth.get("/v2/team/app/manifests/v1", &accept).await;
        assert_eq!(r.status().as_u16(), 404);
        // skopeo, the way Docker asks: no namespace.
        let dest = tempdir();
        let out = tokio::process::Command::new("skopeo")
            .args(["--override-arch", host_arch(), "copy", "--src-tls-verify=false"])
            .arg(format!(
                "docker://{}/library/dockerimg:3.19",
                berth.url().trim_start_matches("http://")
            ))
            .arg(format!("oci:{}:x", dest.path().display()))
            .output()
            .await
            .unwrap();
        assert!(out.status.success(), "{}", output_text(&out));
    })
    .await;
}

/// A real Docker Engine configured by `berth node-config docker` pulls a docker.io image
/// through berth: `registry-mirrors` names berth, and its namespace-less requests reach
/// the default upstream. The machine has no route to Docker Hub, so a pull that
/// succeeds came through berth; the registry confirms that Docker never asked it.
#[tokio::test(flavor = "multi_thread")]
async fn docker_engine_pulls_through_the_daemon_json_node_config_writes() {
    within(
        300,
        "docker_engine_pulls_through_the_daemon_json_node_config_writes",
        async {
            let reg = Registry::start().await;
            let index = make_multiarch(24, 80_000);
            reg.pusher(None)
                .index("library/enginetest", "1.0", &index)
                .await;
            let config = format!(
                "[server]\ndefault_upstream = \"docker.io\"\n{}",
                berth_config(&[Upstream::new("docker.io", &reg.url(), &["library/**"])])
            );
            let berth = Berth::start_with_config(&config, &[]).await;
            let etc = tempdir();
            std::fs::write(
                etc.path().join("daemon.json"),
                "{\"log-level\": \"info\"}\n",
            )
            .unwrap();
            let config_path = berth.config_path();
            let (ok, out, err) = node_config(&[
                "docker",
                "--config",
                config_path.to_str().unwrap(),
                "--url",
                &berth.url(),
                "--write",
                etc.path().to_str().unwrap(),
            ]);
            assert!(ok && err.is_empty(), "node-config docker:\n{out}\n{err}");
            let daemon_json = read(&etc.path().join("daemon.json"));
            assert_loopback_only(&daemon_json, "daemon.json");
            let v: serde_json::Value = serde_json::from_str(&daemon_json).unwrap();
            assert_eq!(v["log-level"], "info", "{daemon_json}");
            assert_eq!(v["registry-mirrors"], serde_json::json!([berth.url()]));

            let dockerd = Dockerd::start(&etc.path().join("daemon.json")).await;
            let info = dockerd
                .docker(&["info", "--format", "{{json .RegistryConfig.Mirrors}}"])
                .await;
            assert!(
                String::from_utf8_lossy(&info.stdout).contains(&berth.url()),
                "dockerd does not list berth as a mirror: {}",
                output_text(&info)
            );
            let pull = dockerd.docker(&["pull", "enginetest:1.0"]).await;
            assert!(
                pull.status.success(),
                "docker pull enginetest:1.0 failed:\n{}\nberth log:\n{}\ndockerd log:\n{}",
                output_text(&pull),
                berth.log(),
                dockerd.log()
            );
            let image = index.image(host_arch());
            let inspect = dockerd
                .docker(&["image", "inspect", "--format", "{{.Id}}", "enginetest:1.0"])
                .await;
            assert_eq!(
                String::from_utf8_lossy(&inspect.stdout).trim(),
                image.config.digest,
                "docker's image is not the registry's"
            );
            // Asked in Docker's form (no namespace), and answered by berth.
            assert_logged(
                &berth,
                &[
                    "path=/v2/library/enginetest/manifests/1.0 ns= ",
                    "status=200",
                ],
            );
            assert_not_asked_by(&reg, "docker/").await;
            let reqs = reg.requests().await;
            assert!(
                reqs.iter()
                    .any(|r| r.path == "/v2/library/enginetest/manifests/1.0"
                        && r.user_agent.starts_with("berth/")),
                "berth never fetched the tag: {reqs:#?}"
            );
        },
    )
    .await;
}

/// A protobuf length-delimited field.
fn pb_bytes(field: u8, bytes: &[u8]) -> Vec<u8> {
    let mut out = vec![(field << 3) | 2];
    let mut n = bytes.len();
    loop {
        let b = (n & 0x7f) as u8;
        n >>= 7;
        out.push(if n > 0 { b | 0x80 } else { b });
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(bytes);
    out
}

/// The CRI image service's `PullImage` for `image`, over containerd's socket: one gRPC
/// call made with curl (HTTP/2 over the Unix socket, a hand-encoded
/// `PullImageRequest{image: ImageSpec{image}}`). Returns the `image_ref` berth's content
/// became, or gRPC's error.
async fn cri_pull(sock: &Path, image: &str) -> Result<String, String> {
    let msg = pb_bytes(1, &pb_bytes(1, image.as_bytes()));
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    frame.extend_from_slice(&msg);
    let dir = tempdir();
    let (req, resp, headers) = (
        dir.path().join("req"),
        dir.path().join("resp"),
        dir.path().join("headers"),
    );
    std::fs::write(&req, frame).unwrap();
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--http2-prior-knowledge", "--max-time", "120"])
        .arg("--unix-socket")
        .arg(sock)
        .args(["-H", "content-type: application/grpc", "-H", "te: trailers"])
        .arg("--data-binary")
        .arg(format!("@{}", req.display()))
        .arg("-o")
        .arg(&resp)
        .arg("-D")
        .arg(&headers)
        .arg("http://localhost/runtime.v1.ImageService/PullImage")
        .output()
        .await
        .unwrap();
    let headers = std::fs::read_to_string(&headers).unwrap_or_default();
    if !out.status.success()
        || headers
            .lines()
            .any(|l| l.starts_with("grpc-status: ") && l.trim() != "grpc-status: 0")
    {
        return Err(format!("{}\n{headers}", output_text(&out)));
    }
    let body = std::fs::read(&resp).unwrap_or_default();
    // A gRPC frame (5 bytes), then PullImageResponse{image_ref = 1}.
    match body.get(5..) {
        Some([0x0a, n, rest @ ..]) if rest.len() >= *n as usize => {
            Ok(String::from_utf8_lossy(&rest[..*n as usize]).into_owned())
        }
        _ => Err(format!("an unexpected answer: {body:?}\n{headers}")),
    }
}

/// The CRI image service (what the kubelet calls) of a real containerd, whose registry
/// `config_path` names the certs.d folder `berth node-config containerd` wrote, pulls an
/// image through berth; node-config finds nothing to warn about in that containerd's
/// config.toml.
#[tokio::test(flavor = "multi_thread")]
async fn the_cri_image_service_pulls_through_node_config_s_files() {
    within(300, "the_cri_image_service_pulls_through_node_config_s_files", async {
        require_tool("containerd");
        let reg = Registry::start().await;
        let index = make_multiarch(25, 90_000);
        reg.pusher(None).index("library/criimg", "v1", &index).await;
        let berth = Berth::start(&[Upstream::new("docker.io", &reg.url(), &["library/**"])]).await;
        let dir = tempdir();
        let d = dir.path();
        let certs_d = d.join("certs.d");
        let sock = d.join("c.sock");
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs"]
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  disable_cgroup = true
  disable_apparmor = true
  restrict_oom_score_adj = true
[plugins."io.containerd.grpc.v1.cri".containerd]
  snapshotter = "native"
[plugins."io.containerd.grpc.v1.cri".cni]
  bin_dir = "{d}/cni-bin"
  conf_dir = "{d}/cni-conf"
[plugins."io.containerd.grpc.v1.cri".registry]
  config_path = "{certs}"
"#,
            root = d.join("root").display(),
            state = d.join("state").display(),
            sock = sock.display(),
            d = d.display(),
            certs = certs_d.display(),
        );
        let containerd_config = d.join("config.toml");
        std::fs::write(&containerd_config, config).unwrap();
        let (ok, out, err) =
            node_config(&containerd_wiring(&berth, &certs_d, &containerd_config, &[]));
        assert!(ok, "node-config failed:\n{out}\n{err}");
        assert!(err.is_empty(), "warnings for a containerd set up right: {err}");

        let log = d.join("containerd.log");
        let child = std::process::Command::new("containerd")
            .arg("--config")
            .arg(&containerd_config)
            .stdin(std::process::Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::OpenOptions::new().append(true).open(&log).unwrap())
            .spawn()
            .unwrap();
        let _containerd = ProcGuard::new("containerd (CRI)", child, Some(log.clone()));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !read(&log).contains("serving...") {
            assert!(std::time::Instant::now() < deadline, "containerd did not start:\n{}", read(&log));
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        let image_ref = cri_pull(&sock, "docker.io/library/criimg:v1")
            .await
            .unwrap_or_else(|e| panic!("CRI PullImage failed: {e}\nberth log:\n{}", berth.log()));
        assert_eq!(image_ref, index.image(host_arch()).config.digest);
        assert_not_asked_by(&reg, "containerd").await;
        assert_logged(
            &berth,
            &["path=/v2/library/criimg/manifests/v1", "ns=docker.io", "status=200"],
        );
    })
    .await;
}

/// A node cache that lets nothing anonymous in: containerd never sends a pod's
/// imagePullSecrets to a mirror, so the node's own credential, which `node-config
/// --credentials-file` writes into hosts.toml as an `Authorization` header, is what its
/// pulls carry. Anonymous requests are refused; containerd pulls with the header, and
/// never falls back to the registry.
#[tokio::test(flavor = "multi_thread")]
async fn a_node_credential_in_hosts_toml_lets_containerd_pull_when_nothing_is_anonymous() {
    within(
        300,
        "a_node_credential_in_hosts_toml_lets_containerd_pull_when_nothing_is_anonymous",
        async {
            let reg = Registry::start().await;
            let index = make_multiarch(26, 60_000);
            reg.pusher(None).index("library/authimg", "v1", &index).await;
            let secrets = tempdir();
            let htpasswd = secrets.path().join("htpasswd");
            let hash = bcrypt::hash("node-secret", 4).unwrap();
            std::fs::write(&htpasswd, format!("node:{hash}\n")).unwrap();
            let credentials = secrets.path().join("node-credentials");
            std::fs::write(&credentials, "node:node-secret\n").unwrap();
            let config = format!(
                "[auth]\nhtpasswd = \"{}\"\n[access]\n[[access.repository]]\npattern = \"docker.io/**\"\npolicies = [{{ users = [\"node\"], actions = [\"read\"] }}]\n{}",
                htpasswd.display(),
                berth_config(&[Upstream::new("docker.io", &reg.url(), &["library/**"])])
            );
            let berth = Berth::start_with_config(&config, &[]).await;
            let anonymous = berth
                .get("/v2/library/authimg/manifests/v1?ns=docker.io", &[])
                .await;
            assert_eq!(anonymous.status().as_u16(), 401, "an anonymous pull was served");

            let certs = tempdir();
            let (ok, out, err) = node_config(&containerd_wiring(
                &berth,
                certs.path(),
                Path::new("/nonexistent/config.toml"),
                &["--credentials-file", credentials.to_str().unwrap()],
            ));
            assert!(ok, "node-config failed:\n{out}\n{err}");
            let hosts = certs.path().join("docker.io/hosts.toml");
            let mode = std::os::unix::fs::PermissionsExt::mode(
                &std::fs::metadata(&hosts).unwrap().permissions(),
            );
            assert_eq!(mode & 0o777, 0o600, "a hosts.toml with a credential is readable by others");

            let ctd = Containerd::start().await;
            let o = ctd
                .pull("node-auth", "docker.io/library/authimg:v1", certs.path())
                .await;
            assert!(
                o.status.success(),
                "ctr pull with the node credential failed:\n{}\nberth log:\n{}",
                output_text(&o),
                berth.log()
            );
            assert_not_asked_by(&reg, "containerd").await;
            assert_logged(
                &berth,
                &["user=node", "path=/v2/library/authimg/manifests/v1", "status=200"],
            );
        },
    )
    .await;
}

/// The `registries.yaml` for k3s, checked against the format k3s documents: top-level
/// `mirrors` (a registry name to `endpoint`, a list of URLs) and `configs` (a registry
/// host to `auth` {username, password} and `tls` {ca_file, cert_file, key_file,
/// insecure_skip_verify}), parsed as YAML.
#[test]
fn k3s_registries_yaml_follows_k3s_s_format() {
    let dir = tempdir();
    let config = dir.path().join("berth.toml");
    // Never contacted: node-config only reads the configuration.
    let closed = ClosedPort::new();
    std::fs::write(
        &config,
        berth_config(&[
            Upstream::new("docker.io", &closed.url(), &["library/**"]),
            Upstream::new("ghcr.io", &closed.url(), &["a/**"]),
        ]),
    )
    .unwrap();
    let credentials = dir.path().join("node");
    std::fs::write(&credentials, "node:s3cret\n").unwrap();
    let (ok, out, err) = node_config(&[
        "k3s",
        "--config",
        config.to_str().unwrap(),
        "--url",
        "https://127.0.0.1:5443",
        "--ca",
        "/etc/berth/ca.pem",
        "--credentials-file",
        credentials.to_str().unwrap(),
        "--write",
        dir.path().to_str().unwrap(),
    ]);
    assert!(ok, "{out}\n{err}");
    let check = r#"
import sys, yaml
doc = yaml.safe_load(open(sys.argv[1]))
assert set(doc) <= {"mirrors", "configs"}, doc
for name, m in doc["mirrors"].items():
    assert set(m) <= {"endpoint", "rewrite"}, m
    assert isinstance(m["endpoint"], list) and all(e.startswith(("http://", "https://")) for e in m["endpoint"]), m
for host, c in doc["configs"].items():
    assert "://" not in host, host
    assert set(c) <= {"auth", "tls"}, c
    assert set(c.get("auth", {})) <= {"username", "password", "auth", "identitytoken"}, c
    assert set(c.get("tls", {})) <= {"ca_file", "cert_file", "key_file", "insecure_skip_verify"}, c
print(sorted(doc["mirrors"]), doc["mirrors"]["docker.io"]["endpoint"], doc["configs"])
"#;
    let o = std::process::Command::new("python3")
        .args(["-c", check])
        .arg(dir.path().join("registries.yaml"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", output_text(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "['docker.io', 'ghcr.io'] ['https://127.0.0.1:5443'] {'127.0.0.1:5443': {'auth': {'username': 'node', 'password': 's3cret'}, 'tls': {'ca_file': '/etc/berth/ca.pem'}}}"
    );
}
