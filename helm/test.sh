#!/usr/bin/env bash
# Tests the Helm chart helm/berth, offline, in under a minute:
#
# - helm lint --strict, for the default values and every scenario below;
# - helm template of each scenario, for two Kubernetes versions ($KUBE_VERSIONS), and
#   kubernetes-validate --strict on every rendered resource (ServiceMonitors, which it
#   has no schema for, against helm/tests/servicemonitor.schema.json);
# - `berth check` on the berth.toml each scenario renders;
# - properties a platform engineer relies on (helm/tests/chart_checks.py): host network,
#   node-critical priority, every taint tolerated, the probes' paths and hosts, a
#   read-only root and no capabilities, the exact node wiring command and hosts
#   directory, the post-delete hook, checksums that follow the configuration, Secrets
#   that never reach the ConfigMap;
# - values the chart must refuse;
# - a real berth started with the rendered args and berth.toml serves the helm test
#   pod's own script (once it serves /readyz), and with nothing anonymous still answers
#   the probes' unauthenticated /readyz and /healthz;
# - the rendered node wiring command run against a temporary hosts directory (twice, and
#   with a node credential), and the cleanup hook's --remove restoring it (once `berth
#   node-config` exists);
# - the Grafana dashboard's queries: berth's own metric names, valid PromQL (promtool);
# - the chart README's values table is the one helm/gen-readme makes from values.yaml.
#
# Uses scripts/helm-tools (helm, kubernetes-validate) and the berth binary at
# $BERTH_BIN (default $CARGO_TARGET_DIR/release/berth). Ends with "N passed, N failed".
set -euo pipefail
cd "$(dirname "$0")/.."

eval "$(scripts/helm-tools)"
BERTH_BIN="${BERTH_BIN:-${CARGO_TARGET_DIR:-$HOME/.cache/berth-target}/release/berth}"
KUBE_VERSIONS="${KUBE_VERSIONS:-1.30.0 1.33.0}"
PYTHON="$(dirname "$KUBERNETES_VALIDATE")/python"
chart=helm/berth
checks=helm/tests/chart_checks.py
if ! [ -x "$BERTH_BIN" ]; then
    echo "helm/test.sh: no berth binary at $BERTH_BIN (cargo build --release -p berth-proxy, or set BERTH_BIN)" >&2
    exit 1
fi

work="$(mktemp -d)"
pids=()
cleanup() {
    local p
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
passed=0
failed=0
skipped=0

# check NAME COMMAND...: runs COMMAND, counts it, and shows its output only on failure.
check() {
    local name="$1" out
    shift
    if out="$("$@" 2>&1)"; then
        passed=$((passed + 1))
        echo "ok   $name"
    else
        failed=$((failed + 1))
        echo "FAIL $name"
        printf '%s\n' "$out" | sed 's/^/       /'
    fi
}
# refuses NAME MESSAGE ARGS...: helm template with ARGS must fail, saying MESSAGE.
refuses() {
    local name="$1" message="$2" out
    shift 2
    if out="$("$HELM" template berth "$chart" -n berth-system "$@" 2>&1)"; then
        failed=$((failed + 1))
        echo "FAIL refuses $name: rendered"
    elif ! grep -qF -- "$message" <<<"$out"; then
        failed=$((failed + 1))
        echo "FAIL refuses $name: the error does not say \"$message\""
        printf '%s\n' "$out" | sed 's/^/       /'
    else
        passed=$((passed + 1))
        echo "ok   refuses $name"
    fi
}
render() { "$HELM" template berth "$chart" -n berth-system "$@"; }

# name|helm arguments
scenarios=(
    "default|"
    "deployment|--set mode=deployment"
    "k3s|--set nodeWiring.runtime=k3s"
    "remove|--set nodeWiring.remove=true"
    "node-credentials|--set nodeWiring.credentials.existingSecret=berth-node"
    "daemonset-all|-f helm/tests/daemonset-all.yaml"
    "deployment-all|-f helm/tests/deployment-all.yaml"
)
for f in "$chart"/examples/*.yaml; do
    scenarios+=("example-$(basename "$f" .yaml)|-f $f")
done

for s in "${scenarios[@]}"; do
    name="${s%%|*}"
    read -ra args <<<"${s#*|}"
    check "lint $name" "$HELM" lint --strict "$chart" "${args[@]}"
    for v in $KUBE_VERSIONS; do
        out="$work/$name-$v.yaml"
        check "template $name (Kubernetes $v)" \
            bash -c '"$@" > "'"$out"'"' _ "$HELM" template berth "$chart" -n berth-system \
            --kube-version "$v" "${args[@]}"
        [ -s "$out" ] || continue
        check "kubernetes-validate --strict $name (Kubernetes $v)" \
            "$PYTHON" "$checks" validate "$out" "$v" "$KUBERNETES_VALIDATE" helm/tests/servicemonitor.schema.json
    done
    out="$work/$name-${KUBE_VERSIONS%% *}.yaml"
    [ -s "$out" ] || continue
    check "berth check: $name's berth.toml" \
        bash -c '"$1" '"$checks"' extract-config "$2" "$3" && "$4" check "$3"' _ \
        "$PYTHON" "$out" "$work/$name.toml" "$BERTH_BIN"
    check "properties $name" "$PYTHON" "$checks" properties "$name" "$out"
done

# The checksum annotations follow what berth reads at start-up, and only that.
# checksums ARGS...: prints "checksum/config checksum/secrets" of the DaemonSet's pods.
checksums() { render "$@" >"$work/sum.yaml" && "$PYTHON" "$checks" annotations "$work/sum.yaml"; }
# compare WANT FIELD "ARGS A" "ARGS B": the field (1: config, 2: secrets) is the same, or differs.
compare() {
    local want="$1" field="$2" a b
    read -ra A <<<"$3"
    read -ra B <<<"$4"
    a="$(checksums "${A[@]}" | cut -d' ' -f"$field")"
    b="$(checksums "${B[@]}" | cut -d' ' -f"$field")"
    [ -n "$a" ] && [ -n "$b" ] || return 1
    if [ "$want" = differs ]; then [ "$a" != "$b" ]; else [ "$a" = "$b" ]; fi
}
bcrypt='$2y$05$abcdefghijklmnopqrstuuABCDEFGHIJKLMNOPQRSTUVWXYZ01234'
check "checksum/config changes with a config value" compare differs 1 "" "--set config.server.drain=10s"
check "checksum/config changes with the port" compare differs 1 "" "--set port=5001"
check "checksum/config stays with a value outside the config" compare same 1 "" "--set logLevel=debug"
check "checksum/secrets changes with an upstream password" compare differs 2 \
    '--set-json config.upstreams=[{"namespace":"docker.io","url":"https://registry-1.docker.io","prefixes":["library/**"],"credentials":{"username":"u","password":"first"}}]' \
    '--set-json config.upstreams=[{"namespace":"docker.io","url":"https://registry-1.docker.io","prefixes":["library/**"],"credentials":{"username":"u","password":"second"}}]'
check "checksums stay when only the chart version changes" bash -c '
    cp -r "$1" "$2/chart-next" && sed -i "s/^version: .*/version: 99.0.0/" "$2/chart-next/Chart.yaml" &&
    a="$("$3" template berth "$1" | grep checksum/)" && b="$("$3" template berth "$2/chart-next" | grep checksum/)" &&
    [ -n "$a" ] && [ "$a" = "$b" ]' _ "$chart" "$work" "$HELM"
check "checksum/secrets changes with the token key" compare differs 2 \
    "--set tokenKey.value=first-key-0123456789abcdef0123456789" "--set tokenKey.value=second-key-0123456789abcdef012345678"
check "checksum/config stays when htpasswd users change (berth re-reads the file)" \
    compare same 1 "--set-string htpasswd.content=alice:$bcrypt" "--set-string htpasswd.content=bob:$bcrypt"
check "checksum/secrets stays when htpasswd users change" \
    compare same 2 "--set-string htpasswd.content=alice:$bcrypt" "--set-string htpasswd.content=bob:$bcrypt"

# Values the chart must refuse, with a message that says what to change.
refuses "a plain-text htpasswd entry" "not a bcrypt entry" --set-string htpasswd.content="bob:secret"
refuses "a short token key" "at least 32 bytes" --set tokenKey.value=short
refuses "config.auth.token without a key" "needs a signing key" --set config.auth.token.lifetime=5m
refuses "TLS without a certificate" "tls.enabled needs" --set tls.enabled=true
refuses "node wiring without the host network" "only with daemonset.hostNetwork: true" --set daemonset.hostNetwork=false
refuses "a ServiceMonitor on a loopback node cache" "berth listens on loopback only" --set serviceMonitor.enabled=true
refuses "[server] listen in config (the chart owns it)" "additional properties 'listen' not allowed" --set config.server.listen=0.0.0.0:5000
refuses "two replicas on one store" "/deployment/replicas" --set mode=deployment --set deployment.replicas=2
refuses "an unknown mode" "/mode" --set mode=statefulset
refuses "an unknown access action" "/config/access/repository/0/anonymous/0" \
    --set 'config.access.repository[0].pattern=**' --set 'config.access.repository[0].anonymous[0]=pull'
refuses "a default_upstream that is not an upstream" "is not one of config.upstreams" \
    --set-json 'config.upstreams=[{"namespace":"quay.io","url":"https://quay.io","prefixes":["prometheus/**"]}]'
refuses "two password sources for an upstream" "exactly one of password" \
    --set-json 'config.upstreams=[{"namespace":"docker.io","url":"https://registry-1.docker.io","prefixes":["library/**"],"credentials":{"username":"u","password":"p","password_env":"X"}}]'

# A real berth, started with the rendered container args and berth.toml (its upstream a
# stand-in registry on loopback), serves the helm test pod's pulls: the pod's script,
# run here with bash (the pod's sh is busybox's), must pass.
"$PYTHON" "$checks" stand-in-upstream "$work/upstream.port" &
pids+=($!)
for _ in $(seq 50); do [ -s "$work/upstream.port" ] && break; sleep 0.1; done
uport="$(cat "$work/upstream.port")"
bport="$("$PYTHON" "$checks" free-port)"
render --set "port=$bport" \
    --set-json "config.upstreams=[{\"namespace\":\"docker.io\",\"url\":\"http://127.0.0.1:$uport\",\"prefixes\":[\"library/**\"]}]" \
    >"$work/serve.yaml"
"$PYTHON" "$checks" extract-config "$work/serve.yaml" "$work/serve.toml"
mapfile -t serve_args < <("$PYTHON" "$checks" serve-args "$work/serve.yaml" "$work/serve.toml" "127.0.0.1:$bport" "$work/store")
"$BERTH_BIN" serve "${serve_args[@]}" >"$work/berth.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do curl -fs -o /dev/null "http://127.0.0.1:$bport/healthz" && break; sleep 0.1; done
check "berth serve starts with the rendered args and berth.toml" curl -fsS -o /dev/null "http://127.0.0.1:$bport/healthz"
eval "$("$PYTHON" "$checks" test-script "$work/serve.yaml" "$work/test-pull.sh")"
if [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$bport/readyz")" = 404 ]; then
    skipped=$((skipped + 1))
    echo "SKIP the helm test pod's script: $BERTH_BIN does not serve /readyz yet"
else
    check "the helm test pod's script pulls $NS/$REPO:$REF through berth" \
        env BERTH_URL="http://127.0.0.1:$bport" NS="$NS" REPO="$REPO" REF="$REF" bash "$work/test-pull.sh"
fi
check "the pull-only default refuses an anonymous push (401)" \
    bash -c '[ "$(curl -s -o /dev/null -w "%{http_code}" -X POST "$1/v2/team/app/blobs/uploads/")" = 401 ]' _ "http://127.0.0.1:$bport"

# With nothing anonymous (examples/no-anonymous.yaml), the kubelet's probes, which send no
# credentials, still get 200 from /readyz and /healthz, and /v2/ asks for credentials.
na="$work/no-anonymous"
mkdir -p "$na"
"$PYTHON" "$checks" extract-config "$work/example-no-anonymous-${KUBE_VERSIONS%% *}.yaml" "$na/berth.toml"
sed -i "s|/etc/berth/htpasswd|$na/htpasswd|; s|/etc/berth/token.key|$na/token.key|" "$na/berth.toml"
printf 'builder:%s\n' "$bcrypt" >"$na/htpasswd"
head -c 48 /dev/urandom >"$na/token.key"
naport="$("$PYTHON" "$checks" free-port)"
"$BERTH_BIN" serve --config "$na/berth.toml" --listen "127.0.0.1:$naport" --store "$na/store" >"$na/berth.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do curl -fs -o /dev/null "http://127.0.0.1:$naport/healthz" && break; sleep 0.1; done
status_is() { [ "$(curl -s -o /dev/null -w '%{http_code}' "$2")" = "$1" ]; }
check "no-anonymous: the startup and readiness probe's /readyz answers 200 without credentials" \
    status_is 200 "http://127.0.0.1:$naport/readyz"
check "no-anonymous: the liveness probe's /healthz answers 200 without credentials" \
    status_is 200 "http://127.0.0.1:$naport/healthz"
check "no-anonymous: /v2/ without credentials is 401" status_is 401 "http://127.0.0.1:$naport/v2/"

# The node wiring command, as rendered, against a temporary hosts directory.
if "$BERTH_BIN" node-config --help >/dev/null 2>&1; then
    hosts="$work/certs.d"
    mkdir -p "$hosts/docker.io"
    printf 'server = "https://registry-1.docker.io"\n# the node own file\n' >"$hosts/docker.io/hosts.toml"
    cp "$hosts/docker.io/hosts.toml" "$work/original-hosts.toml"
    default="$work/default-${KUBE_VERSIONS%% *}.yaml"
    config="$work/default.toml"
    check "node wiring: the init container's command writes the hosts directory" \
        "$PYTHON" "$checks" node-wiring "$default" write "$BERTH_BIN" "$config" "$hosts"
    check "node wiring: a hosts.toml per upstream, berth a pull+resolve host" \
        "$PYTHON" "$checks" hosts-written "$config" "$hosts" "http://127.0.0.1:5000"
    cp -a "$hosts" "$work/certs.d-first"
    check "node wiring: a second run (a pod restart) changes nothing" \
        bash -c '"$@" && diff -r "'"$work/certs.d-first"'" "'"$hosts"'"' _ \
        "$PYTHON" "$checks" node-wiring "$default" write "$BERTH_BIN" "$config" "$hosts"
    check "node wiring: the post-delete hook's --remove restores the node's own file" \
        bash -c '"$@" && cmp "'"$work/original-hosts.toml"'" "'"$hosts/docker.io/hosts.toml"'" && ! [ -e "'"$hosts/ghcr.io/hosts.toml"'" ]' _ \
        "$PYTHON" "$checks" node-wiring "$default" remove "$BERTH_BIN" "$config" "$hosts"
    # With a node credential (for a berth that allows no anonymous reads).
    printf 'node:s3cret-node-credential\n' >"$work/node-credential"
    mkdir -p "$work/certs.d-credentials"
    check "node wiring with a credential: an Authorization header, files only root may read" \
        bash -c '"$@" && "$1" "$2" hosts-written "$7" "$8" http://127.0.0.1:5000 node:s3cret-node-credential' _ \
        "$PYTHON" "$checks" node-wiring "$work/node-credentials-${KUBE_VERSIONS%% *}.yaml" write "$BERTH_BIN" \
        "$work/node-credentials.toml" "$work/certs.d-credentials" "$work/node-credential"
    # The files the rendered command writes for the berth running above (rendered with its
    # port), used by a real containerd: it pulls through berth, as the node would.
    if command -v containerd >/dev/null && command -v ctr >/dev/null; then
        live="$work/certs.d-live"
        ctd="$work/containerd"
        mkdir -p "$live" "$ctd"
        printf '%s\n' 'version = 2' "root = \"$ctd/root\"" "state = \"$ctd/state\"" \
            'disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs"]' \
            '[grpc]' "  address = \"$ctd/c.sock\"" '[ttrpc]' "  address = \"$ctd/c.sock.ttrpc\"" \
            >"$ctd/config.toml"
        containerd --config "$ctd/config.toml" >"$ctd/log" 2>&1 &
        pids+=($!)
        for _ in $(seq 100); do ctr --address "$ctd/c.sock" version >/dev/null 2>&1 && break; sleep 0.1; done
        ctr_pull() {
            "$PYTHON" "$checks" node-wiring "$work/serve.yaml" write "$BERTH_BIN" "$work/serve.toml" "$live" &&
                ctr --address "$ctd/c.sock" -n helm-test images pull --snapshotter native --hosts-dir "$live" \
                    docker.io/library/busybox:1.37.0 >"$ctd/pull.log" 2>&1 &&
                tr -d '"' <"$work/berth.log" | grep -q 'path=/v2/library/busybox/manifests/1.37.0 ns=docker.io status=200'
        }
        check "node wiring: containerd pulls through berth with the files the rendered command wrote" ctr_pull
    else
        skipped=$((skipped + 1))
        echo "SKIP node wiring with a real containerd: no containerd (scripts/setup installs it)"
    fi
else
    skipped=$((skipped + 1))
    echo "SKIP node wiring: $BERTH_BIN has no node-config subcommand yet"
fi

# The dashboard.
check "dashboard: berth's metric names" \
    "$PYTHON" "$checks" dashboard "$chart/dashboards/berth.json" . "$work/dashboard-rules.yaml"
if command -v promtool >/dev/null; then
    check "dashboard: every query is valid PromQL (promtool)" promtool check rules "$work/dashboard-rules.yaml"
else
    skipped=$((skipped + 1))
    echo "SKIP dashboard PromQL: no promtool (scripts/setup installs prometheus)"
fi

check "the chart README's values table matches values.yaml (helm/gen-readme)" \
    "$PYTHON" helm/tests/readme.py --check
check "helm package includes the dashboard, the schema and the examples" \
    bash -c '"$1" package "$2" -d "$3" >/dev/null && tar tzf "$3"/berth-*.tgz | grep -q "berth/dashboards/berth.json" &&
             tar tzf "$3"/berth-*.tgz | grep -q "berth/values.schema.json" && tar tzf "$3"/berth-*.tgz | grep -q "berth/examples/no-anonymous.yaml"' \
    _ "$HELM" "$chart" "$work"

echo "helm: $passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ]
