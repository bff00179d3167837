#!/usr/bin/env python3
"""Checks of helm/berth's rendered manifests, for helm/test.sh.

Runs in the kubernetes-validate virtualenv (PyYAML and jsonschema come with it).

  chart_checks.py validate RENDERED K8S_VERSION KUBERNETES_VALIDATE SERVICEMONITOR_SCHEMA
  chart_checks.py extract-config RENDERED OUT_TOML
  chart_checks.py properties SCENARIO RENDERED
  chart_checks.py annotations RENDERED            (prints checksum/config checksum/secrets)
  chart_checks.py node-wiring RENDERED (write|remove) BERTH_BIN CONFIG HOSTS_DIR [CREDENTIALS_FILE]
  chart_checks.py hosts-written CONFIG HOSTS_DIR URL [USER:SECRET]
  chart_checks.py dashboard DASHBOARD_JSON REPO_ROOT RULES_OUT
  chart_checks.py serve-args RENDERED CONFIG LISTEN STORE
  chart_checks.py test-script RENDERED OUT_SCRIPT
  chart_checks.py stand-in-upstream PORT_FILE       (serves for at most 2 minutes)
  chart_checks.py free-port
Each exits 1 with one line per problem.
"""

import hashlib
import json
import os
import re
import subprocess
import sys
import tomllib

import jsonschema
import yaml

PROBLEMS = []


def problem(msg):
    PROBLEMS.append(msg)


def expect(cond, msg):
    if not cond:
        problem(msg)
    return cond


def finish():
    for p in PROBLEMS:
        print(p)
    sys.exit(1 if PROBLEMS else 0)


def load(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def find(docs, kind, name=None, suffix=None):
    out = [d for d in docs if d["kind"] == kind]
    if name is not None:
        out = [d for d in out if d["metadata"]["name"] == name]
    if suffix is not None:
        out = [d for d in out if d["metadata"]["name"].endswith(suffix)]
    return out


def main_configmap(docs):
    cms = [d for d in find(docs, "ConfigMap") if "berth.toml" in d.get("data", {})
           and "helm.sh/hook" not in d["metadata"].get("annotations", {})]
    if len(cms) != 1:
        problem(f"expected one ConfigMap with berth.toml, found {len(cms)}")
        finish()
    return cms[0]


def workload(docs):
    w = find(docs, "DaemonSet") + find(docs, "Deployment")
    if len(w) != 1:
        problem(f"expected one DaemonSet or Deployment, found {len(w)}")
        finish()
    return w[0]


def container(pod, name, init=False):
    key = "initContainers" if init else "containers"
    for c in pod.get(key, []):
        if c["name"] == name:
            return c
    return None


# --- validate ---------------------------------------------------------------------------

def cmd_validate(rendered, version, kv, sm_schema_path):
    docs = load(rendered)
    builtin = [d for d in docs if d["apiVersion"] != "monitoring.coreos.com/v1"]
    monitors = [d for d in docs if d["apiVersion"] == "monitoring.coreos.com/v1"]
    path = rendered + f".builtin-{version}.yaml"
    with open(path, "w") as f:
        yaml.safe_dump_all(builtin, f, sort_keys=False)
    r = subprocess.run([kv, "--strict", "-k", version, path], capture_output=True, text=True)
    lines = [l for l in (r.stdout + r.stderr).splitlines() if l.strip()]
    passed = [l for l in lines if l.startswith("INFO") and " passed for resource " in l]
    for l in lines:
        if l not in passed:
            problem(f"kubernetes-validate {version}: {l}")
    expect(r.returncode == 0, f"kubernetes-validate {version} exited {r.returncode}")
    expect(len(passed) == len(builtin),
           f"kubernetes-validate {version}: {len(passed)} of {len(builtin)} resources passed")
    with open(sm_schema_path) as f:
        sm_schema = json.load(f)
    for d in monitors:
        expect(d["kind"] == "ServiceMonitor", f"unexpected custom resource {d['kind']}")
        for e in jsonschema.Draft202012Validator(sm_schema).iter_errors(d):
            problem(f"ServiceMonitor {d['metadata']['name']}: {'/'.join(map(str, e.path))}: {e.message}")
    finish()


# --- extract-config ---------------------------------------------------------------------

def cmd_extract_config(rendered, out):
    docs = load(rendered)
    text = main_configmap(docs)["data"]["berth.toml"]
    with open(out, "w") as f:
        f.write(text)
    for hook in find(docs, "ConfigMap", suffix="-cleanup"):
        expect(hook["data"]["berth.toml"] == text,
               f"the cleanup hook's ConfigMap {hook['metadata']['name']} differs from berth's")
    finish()


# --- properties -------------------------------------------------------------------------

LOCAL_HOSTS = {"127.0.0.1", "::1", "localhost"}


def check_hardened(c, what, non_root):
    sc = c.get("securityContext", {})
    expect(sc.get("readOnlyRootFilesystem") is True, f"{what}: readOnlyRootFilesystem is not true")
    expect(sc.get("allowPrivilegeEscalation") is False, f"{what}: allowPrivilegeEscalation is not false")
    expect("ALL" in sc.get("capabilities", {}).get("drop", []), f"{what}: capabilities do not drop ALL")
    if non_root:
        expect(sc.get("runAsNonRoot") is True, f"{what}: runAsNonRoot is not true")
        expect(sc.get("runAsUser") == 65532, f"{what}: runAsUser is {sc.get('runAsUser')}, not 65532")
    expect(sc.get("privileged") in (None, False), f"{what}: privileged")
    expect("resources" in c, f"{what}: no resources")


def cmd_properties(scenario, rendered):
    docs = load(rendered)
    cm = main_configmap(docs)
    config_text = cm["data"]["berth.toml"]
    config = tomllib.loads(config_text)
    w = workload(docs)
    tmpl = w["spec"]["template"]
    pod = tmpl["spec"]
    ds = w["kind"] == "DaemonSet"

    for d in docs:
        labels = d["metadata"].get("labels", {})
        expect(labels.get("app.kubernetes.io/name") == "berth"
               and labels.get("app.kubernetes.io/instance") == "berth",
               f"{d['kind']}/{d['metadata']['name']}: no app.kubernetes.io name/instance labels")

    # The configuration and its checksum.
    ann = tmpl["metadata"].get("annotations", {})
    digest = ann.get("checksum/config", "")
    expect(re.fullmatch(r"[0-9a-f]{64}", digest), "pod template: no checksum/config annotation")
    expect(digest in (hashlib.sha256(config_text.encode()).hexdigest(),
                      hashlib.sha256(config_text.rstrip("\n").encode()).hexdigest()),
           "checksum/config is not the sha256 of the rendered berth.toml")
    expect(re.fullmatch(r"[0-9a-f]{64}", ann.get("checksum/secrets", "")),
           "pod template: no checksum/secrets annotation")

    # The berth container.
    b = container(pod, "berth")
    if not expect(b is not None, "no berth container"):
        finish()
    listen = config["server"]["listen"]
    expect(b["args"] == ["--config", "/etc/berth/berth.toml", "--listen", listen,
                         "--store", "/var/lib/berth"],
           f"berth args are {b['args']}")
    expect(config["server"]["store"] == "/var/lib/berth", "berth.toml: [server] store is not /var/lib/berth")
    expect(config.get("cache", {}).get("min_free"),
           "berth.toml: no [cache] min_free (the chart keeps berth above kubelet's eviction thresholds)")
    expect("command" not in b, "berth container overrides the image's entrypoint (berth serve)")
    check_hardened(b, "berth container", non_root=True)
    port = int(listen.rsplit(":", 1)[1])
    expect(b["ports"][0]["containerPort"] == port and b["ports"][0]["name"] == "registry",
           f"container port is not {port} named registry")
    scheme = "HTTPS" if "tls" in config["server"] else "HTTP"
    listen_host = listen.rsplit(":", 1)[0].strip("[]")
    for probe, path in (("startupProbe", "/readyz"), ("readinessProbe", "/readyz"),
                        ("livenessProbe", "/healthz")):
        p = b.get(probe)
        if not expect(p, f"no {probe}"):
            continue
        g = p["httpGet"]
        expect(g["path"] == path, f"{probe} path is {g['path']}, not {path}")
        expect(g["port"] == "registry", f"{probe} port is {g['port']}")
        expect(g["scheme"] == scheme, f"{probe} scheme is {g['scheme']}, not {scheme}")
        if ds and listen_host in LOCAL_HOSTS:
            expect(g.get("host") == listen_host,
                   f"{probe}: berth listens on {listen_host} of the host network, but the probe asks {g.get('host')}")
        elif listen_host in ("0.0.0.0", "::"):
            expect("host" not in g, f"{probe} sets host {g.get('host')} although berth listens everywhere")
    mounts = {m["name"]: m for m in b["volumeMounts"]}
    expect(mounts.get("config", {}).get("mountPath") == "/etc/berth"
           and mounts["config"].get("readOnly") is True, "config is not mounted read-only at /etc/berth")
    expect(mounts.get("store", {}).get("mountPath") == "/var/lib/berth", "store is not at /var/lib/berth")
    volumes = {v["name"]: v for v in pod["volumes"]}
    sources = volumes["config"]["projected"]["sources"]
    expect(sources[0].get("configMap", {}).get("name") == cm["metadata"]["name"],
           "the config volume does not project the ConfigMap")

    # Files the configuration names are projected where it says.
    projected = {item["path"] for s in sources for item in (s.get("configMap") or s.get("secret"))["items"]}
    files = []
    auth = config.get("auth", {})
    if "htpasswd" in auth:
        files.append(auth["htpasswd"])
    if "token" in auth:
        files.append(auth["token"]["key"])
    if "tls" in config["server"]:
        files += [config["server"]["tls"]["cert"], config["server"]["tls"]["key"]]
    for u in config["upstream"]:
        pf = u.get("credentials", {}).get("password_file", "")
        if pf.startswith("/etc/berth/"):
            files.append(pf)
    for f in files:
        expect(f.startswith("/etc/berth/") and f[len("/etc/berth/"):] in projected,
               f"berth.toml names {f}, which the config volume does not project")

    # Secrets never reach the ConfigMap.
    for s in find(docs, "Secret"):
        for k, v in s.get("data", {}).items():
            import base64
            secret = base64.b64decode(v).decode(errors="replace").strip()
            expect(len(secret) < 8 or secret not in config_text,
                   f"Secret {s['metadata']['name']}/{k} appears in the ConfigMap")

    # Every other container is hardened too.
    for c in pod.get("initContainers", []):
        check_hardened(c, f"init container {c['name']}", non_root=False)

    if ds:
        expect(pod.get("hostNetwork") is True, "daemonset: hostNetwork is not true")
        expect(pod.get("dnsPolicy") in ("ClusterFirstWithHostNet", "Default"),
               f"daemonset: dnsPolicy {pod.get('dnsPolicy')}")
        expect(pod.get("priorityClassName") == "system-node-critical",
               f"daemonset: priorityClassName {pod.get('priorityClassName')}")
        expect({"operator": "Exists"} in pod.get("tolerations", []), "daemonset: does not tolerate every taint")
        expect(volumes["store"].get("hostPath", {}).get("path") == "/var/lib/berth",
               "daemonset: the store is not the hostPath /var/lib/berth")
        perm = container(pod, "store-permissions", init=True)
        if expect(perm is not None, "daemonset: no store-permissions init container"):
            expect(set(perm["securityContext"]["capabilities"].get("add", []))
                   <= {"CHOWN", "FOWNER", "DAC_READ_SEARCH"}, "store-permissions adds more capabilities")
        wiring = container(pod, "node-wiring", init=True)
        k3s = "/var/lib/rancher/k3s/agent/etc/containerd/certs.d"
        hosts_dir = {"k3s": k3s, "daemonset-all": k3s}.get(scenario, "/etc/containerd/certs.d")
        url_host = "127.0.0.1" if listen_host in ("0.0.0.0",) else listen_host
        url = f"{scheme.lower()}://{url_host}:{port}"
        want = ["/usr/local/bin/berth", "node-config", "containerd", "--config",
                "/etc/berth/berth.toml", "--url", url, "--write", "/host/etc/containerd/certs.d"]
        remove = scenario == "remove"
        credentials = scenario == "node-credentials"
        extra = ["--remove"] if remove else (["--credentials-file", "/etc/berth-node/credentials"] if credentials else [])
        if expect(wiring is not None, "daemonset: no node-wiring init container"):
            expect(wiring["command"] == want + extra, f"node-wiring command is {wiring['command']}")
            wm = {m["name"]: m["mountPath"] for m in wiring["volumeMounts"]}
            expect(wm.get("hosts-dir") == "/host/etc/containerd/certs.d", "node-wiring: hosts-dir mount")
            if credentials:
                expect(wm.get("node-credentials") == "/etc/berth-node"
                       and volumes["node-credentials"]["secret"]["secretName"] == "berth-node",
                       "node-wiring: the node credential is not mounted at /etc/berth-node")
                expect("node-credentials" not in mounts, "the berth container mounts the node credential")
            expect(volumes.get("hosts-dir", {}).get("hostPath", {}).get("path") == hosts_dir,
                   f"node-wiring: hosts-dir is not the hostPath {hosts_dir}")
        jobs = find(docs, "Job", suffix="-cleanup")
        if expect(len(jobs) == 1, "daemonset: no cleanup hook Job"):
            j = jobs[0]
            expect(j["metadata"]["annotations"].get("helm.sh/hook") == "post-delete",
                   "the cleanup Job is not a post-delete hook")
            jc = j["spec"]["template"]["spec"]["containers"][0]
            expect(jc["command"] == want + ["--remove"], f"cleanup command is {jc['command']}")
            jv = {v["name"]: v for v in j["spec"]["template"]["spec"]["volumes"]}
            expect(jv["hosts-dir"]["hostPath"]["path"] == hosts_dir, "cleanup: hosts-dir")
            check_hardened(jc, "cleanup container", non_root=False)
        tests = find(docs, "Pod", suffix="-test-pull")
        if expect(len(tests) == 1, "no helm test pod"):
            expect(tests[0]["spec"].get("hostNetwork") is True, "daemonset: the test pod is not on the host network")
            env = {e["name"]: e.get("value") for e in tests[0]["spec"]["containers"][0]["env"]}
            expect(env["BERTH_URL"] == url, f"test pod BERTH_URL {env['BERTH_URL']}, not {url}")
        expect(not find(docs, "PersistentVolumeClaim"), "daemonset: renders a PVC")
        expect(not find(docs, "NetworkPolicy"), "daemonset: renders a NetworkPolicy (not enforced on hostNetwork)")
    else:
        expect(pod.get("hostNetwork") in (None, False), "deployment: hostNetwork")
        expect(w["spec"]["replicas"] in (0, 1), "deployment: replicas > 1")
        expect(w["spec"]["strategy"]["type"] == "Recreate", "deployment: strategy is not Recreate")
        expect(listen == "0.0.0.0:" + str(port), f"deployment: listen {listen}")
        expect(not any("hostPath" in v for v in pod["volumes"]), "deployment: uses a hostPath")
        expect(not find(docs, "Job"), "deployment: renders a Job")
        # Pod Security "restricted".
        expect(pod["securityContext"].get("seccompProfile", {}).get("type") == "RuntimeDefault",
               "deployment: seccompProfile is not RuntimeDefault")
        for c in pod.get("initContainers", []):
            problem(f"deployment: init container {c['name']} (not restricted)")
        svc = find(docs, "Service", name="berth")
        if expect(len(svc) == 1, "deployment: no Service"):
            expect(svc[0]["spec"]["ports"][0]["targetPort"] == "registry", "Service targetPort")
        pvc = find(docs, "PersistentVolumeClaim")
        expect(len(pvc) == 1 and volumes["store"].get("persistentVolumeClaim", {}).get("claimName")
               == pvc[0]["metadata"]["name"], "deployment: the store is not the chart's PVC")
        tests = find(docs, "Pod", suffix="-test-pull")
        if expect(len(tests) == 1, "no helm test pod"):
            env = {e["name"]: e.get("value") for e in tests[0]["spec"]["containers"][0]["env"]}
            expect(env["BERTH_URL"] == f"{scheme.lower()}://berth.berth-system.svc:5000",
                   f"test pod BERTH_URL {env['BERTH_URL']}")

    # Scenario specifics.
    if scenario == "deployment-all":
        expect(config["server"].get("external_url") == "https://registry.example.com",
               "external_url is not the Ingress's first host")
        expect(config["auth"]["token"] == {"key": "/etc/berth/token.key", "service": "berth-test",
                                           "lifetime": "10m"}, f"[auth.token] {config['auth']['token']}")
        creds = {u["namespace"]: u.get("credentials") for u in config["upstream"]}
        expect(creds["docker.io"] == {"username": "me", "password_file": "/etc/berth/upstream-credentials/docker.io"},
               f"docker.io credentials {creds['docker.io']}")
        expect(creds["registry.local:5000"]["password_file"]
               == "/etc/berth/upstream-credentials/registry.local_5000", "registry.local:5000 credentials")
        expect(creds["quay.io"] == {"username": "q", "password_env": "QUAY_TOKEN"}, "quay.io credentials")
        types = {s["metadata"]["name"]: s["type"] for s in find(docs, "Secret")}
        expect(types.get("berth-tls") == "kubernetes.io/tls", "no kubernetes.io/tls Secret")
        for kind in ("Ingress", "NetworkPolicy", "PodDisruptionBudget", "ServiceMonitor"):
            expect(len(find(docs, kind)) == 1, f"no {kind}")
        sm = find(docs, "ServiceMonitor")[0]["spec"]["endpoints"][0]
        expect(sm["scheme"] == "https" and "basicAuth" in sm, "ServiceMonitor: scheme/basicAuth")
        dash = find(docs, "ConfigMap", name="berth-dashboard")
        if expect(len(dash) == 1, "no dashboard ConfigMap"):
            expect(dash[0]["metadata"]["namespace"] == "monitoring"
                   and dash[0]["metadata"]["labels"].get("grafana_dashboard") == "1", "dashboard ConfigMap")
            json.loads(dash[0]["data"]["berth.json"])
    if scenario == "daemonset-all":
        expect(find(docs, "Service", name="berth-metrics")[0]["spec"]["clusterIP"] == "None",
               "daemonset: no headless metrics Service")
    finish()


# --- annotations ------------------------------------------------------------------------

def cmd_annotations(rendered):
    ann = workload(load(rendered))["spec"]["template"]["metadata"]["annotations"]
    print(ann["checksum/config"], ann["checksum/secrets"])


# --- node wiring ------------------------------------------------------------------------

def cmd_node_wiring(rendered, action, berth_bin, config, hosts_dir, credentials=None):
    """Runs the rendered init container's (write) or cleanup hook's (remove) command, with
    the container's paths mapped onto this machine's."""
    docs = load(rendered)
    pod = workload(docs)["spec"]["template"]["spec"]
    if action == "write":
        cmd = container(pod, "node-wiring", init=True)["command"]
    else:
        cmd = find(docs, "Job", suffix="-cleanup")[0]["spec"]["template"]["spec"]["containers"][0]["command"]
    mapping = {"/usr/local/bin/berth": berth_bin, "/etc/berth/berth.toml": config,
               "/host/etc/containerd/certs.d": hosts_dir, "/etc/berth-node/credentials": credentials}
    cmd = [mapping.get(a, a) for a in cmd]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        problem(f"{' '.join(cmd)} exited {r.returncode}: {r.stderr.strip()}")
    finish()


def cmd_hosts_written(config, hosts_dir, url, credential=None):
    with open(config, "rb") as f:
        upstreams = tomllib.load(f)["upstream"]
    for u in upstreams:
        path = os.path.join(hosts_dir, u["namespace"], "hosts.toml")
        if not expect(os.path.isfile(path), f"{path} was not written"):
            continue
        with open(path, "rb") as f:
            h = tomllib.load(f)
        expect(h.get("server") == u["url"], f"{path}: server is {h.get('server')}, not {u['url']}")
        host = h.get("host", {}).get(url)
        if expect(host is not None, f"{path}: no [host.\"{url}\"]"):
            expect({"pull", "resolve"} <= set(host.get("capabilities", [])),
                   f"{path}: capabilities {host.get('capabilities')}")
            expect("push" not in host.get("capabilities", []), f"{path}: berth is a push host")
            if credential:
                import base64
                want = "Basic " + base64.b64encode(credential.encode()).decode()
                expect(host.get("header", {}).get("Authorization") in (want, [want]),
                       f"{path}: no Authorization header with the node's credential")
                expect(os.stat(path).st_mode & 0o077 == 0, f"{path} holds a credential but others may read it")
            else:
                expect("header" not in host, f"{path}: a header without a node credential")
    finish()


# --- dashboard --------------------------------------------------------------------------

def exported_metrics(root):
    """The metric names berth exposes, read from the registrations in its source: each
    `register("name", "help", var.clone())` with the type `var` is declared with."""
    out = set()
    for src in ("proxy/src/metrics.rs", "cache/src/metrics.rs"):
        text = open(os.path.join(root, src)).read()
        prefix = re.search(r'Registry::with_prefix\("([a-z_]+)"\)', open(os.path.join(root, "proxy/src/metrics.rs")).read()).group(1)
        for name, var in re.findall(r'register\(\s*"([a-z_]+)",\s*"[^"]*",\s*([a-z_.]+?)\.clone\(\)', text):
            ident = var.split(".")[-1]
            m = re.search(r"\b" + re.escape(ident) + r"\b\s*[:=][^;\n]*?\b(Counter|Histogram|Gauge)\b", text)
            if not m:
                problem(f"{src}: cannot tell the type of {ident} (metric {name})")
                continue
            base = f"{prefix}_{name}"
            out |= {"Counter": {base + "_total"}, "Gauge": {base},
                    "Histogram": {base + "_bucket", base + "_sum", base + "_count"}}[m.group(1)]
    return out


def cmd_dashboard(path, root, rules_out):
    with open(path) as f:
        dash = json.load(f)
    known = exported_metrics(root)
    expect(len(known) >= 9, f"read only {len(known)} metric names from berth's source: {sorted(known)}")
    exprs = []
    for p in dash["panels"]:
        for t in p.get("targets", []):
            exprs.append((p["title"], t["expr"]))
    expect(exprs, "the dashboard has no queries")
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            exprs.append((f"variable {v['name']}", v["query"]["query"]))
    used = set()
    for title, e in exprs:
        for m in re.findall(r"\bberth_[a-z_]+", e):
            used.add(m)
            expect(m in known, f"{title}: {m} is not a metric berth exports")
    for m in ("berth_requests_total", "berth_request_duration_seconds_bucket",
              "berth_upstream_requests_total", "berth_upstream_bytes_total",
              "berth_response_body_bytes_total", "berth_blob_fills_total",
              "berth_blob_fills_in_progress"):
        expect(m in used, f"the dashboard does not show {m}")
    # PromQL for promtool: Grafana's variables replaced by what they stand for.
    rules = []
    for i, (title, e) in enumerate(exprs):
        if e.startswith("label_values("):
            continue
        e = e.replace("$__rate_interval", "5m")
        e = re.sub(r"\$[a-z_]+", ".*", e)
        rules.append({"record": f"berth:dashboard:{i}", "expr": e})
    with open(rules_out, "w") as f:
        yaml.safe_dump({"groups": [{"name": "berth-dashboard", "rules": rules}]}, f)
    finish()


# --- a real berth serving the rendered configuration --------------------------------------

def cmd_serve_args(rendered, config, listen, store):
    """The berth container's rendered args, with its paths and address mapped here."""
    b = container(workload(load(rendered))["spec"]["template"]["spec"], "berth")
    mapping = {"/etc/berth/berth.toml": config, "/var/lib/berth": store}
    args = [mapping.get(a, a) for a in b["args"]]
    args[args.index("--listen") + 1] = listen
    print("\n".join(args))


def cmd_test_script(rendered, out):
    """Writes the helm test pod's script; prints its NS, REPO and REF as assignments."""
    pod = find(load(rendered), "Pod", suffix="-test-pull")[0]["spec"]["containers"][0]
    expect(pod["command"][:2] == ["sh", "-c"], f"the test pod's command is {pod['command'][:2]}")
    with open(out, "w") as f:
        f.write(pod["command"][2])
    for e in pod["env"]:
        if e["name"] in ("NS", "REPO", "REF"):
            print(f"{e['name']}={e['value']}")
    finish()


def cmd_stand_in_upstream(port_file):
    """A registry that serves one image (a config and no layers), as an upstream of berth
    on loopback: enough for curl and for containerd to pull."""
    import http.server
    import platform
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    config = json.dumps({"architecture": arch, "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": []}}).encode()
    config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "size": len(config), "digest": config_digest},
        "layers": [],
    }).encode()
    digest = "sha256:" + hashlib.sha256(manifest).hexdigest()

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def answer(self, body):
            path = self.path.split("?")[0]
            if path == "/v2/":
                self.send(200, b"{}", "application/json")
            elif path in ("/v2/library/busybox/manifests/1.37.0", f"/v2/library/busybox/manifests/{digest}"):
                self.send(200, manifest, "application/vnd.oci.image.manifest.v1+json", body, digest)
            elif path == f"/v2/library/busybox/blobs/{config_digest}":
                self.send(200, config, "application/octet-stream", body, config_digest)
            else:
                self.send(404, b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"unknown"}]}', "application/json", body)

        def send(self, status, data, ctype, body=True, dgst=None):
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            if dgst:
                self.send_header("Docker-Content-Digest", dgst)
            self.end_headers()
            if body:
                self.wfile.write(data)

        def do_GET(self):
            self.answer(True)

        def do_HEAD(self):
            self.answer(False)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    with open(port_file + ".tmp", "w") as f:
        f.write(str(server.server_address[1]))
    os.rename(port_file + ".tmp", port_file)
    server.timeout = 1
    deadline = __import__("time").time() + 120   # bounded: it stops by itself
    while __import__("time").time() < deadline:
        server.handle_request()


def cmd_free_port():
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    print(s.getsockname()[1])
    s.close()


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {
        "validate": cmd_validate,
        "extract-config": cmd_extract_config,
        "properties": cmd_properties,
        "annotations": cmd_annotations,
        "node-wiring": cmd_node_wiring,
        "hosts-written": cmd_hosts_written,
        "dashboard": cmd_dashboard,
        "serve-args": cmd_serve_args,
        "test-script": cmd_test_script,
        "stand-in-upstream": cmd_stand_in_upstream,
        "free-port": cmd_free_port,
    }[cmd](*args)
