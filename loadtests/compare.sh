#!/usr/bin/env bash
# Side-by-side benchmark on one machine, all on loopback:
#   upstream: Debian's docker-registry, seeded with a generated multi-arch image whose
#             big layer is $LAYER_MIB MiB;
#   peer:     a second docker-registry in proxy mode in front of it (what most users
#             would otherwise run);
#   limit:    nginx serving the same bytes as static files with sendfile on;
#   berth:    in front of the same upstream.
# Each workload runs against each target in turn, $ROUNDS rounds; the medians and the
# ratios berth/peer and berth/limit go to loadtests/RESULTS.md (with the machine, the
# date and this command). Not part of CI: it takes several minutes.
#
#   loadtests/compare.sh                 # ROUNDS=3 LAYER_MIB=200 by default
#   WORKLOADS=cold,serve,pull,resilience,containerd,idle,tls # the default; name a subset to run only those
#   BERTH_BIN_DIR=DIR                    # take berth, berth-load, berth-seed-index from DIR, no build
#   RAW=DIR                              # keep every run's own output (per round) in DIR
#
# containerd: a real containerd (Debian's 1.6) pulls the image's linux/amd64 platform direct
# from the upstream, through berth cold and through berth warm, with ctr and through the
# CRI image service as the kubelet does (about 70 s a round).
# idle: 1,000 idle keep-alive connections (loadtests/idle.py; IDLE_CONNS to change it) held
# open while 32 busy ones GET the manifest by tag for 5 s, on berth and on nginx, with the
# servers' memory (about 15 s a round).
# tls: warm blobs and manifests over HTTPS, berth (rustls) against nginx (OpenSSL).
# serve also runs the manifest loads from wrk, and every run records the server's CPU time
# (user + system, /proc/<pid>/stat) and the whole machine's (/proc/stat): CPU per request
# and per GiB are in the tables.
# Whatever the list's order, the workloads run in the script's order (resilience last).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
LAYER_MIB=${LAYER_MIB:-200}
RESULTS=${RESULTS:-loadtests/RESULTS.md}
WORKLOADS=${WORKLOADS:-cold,serve,pull,resilience,containerd,idle,tls}
COMMAND="ROUNDS=$ROUNDS LAYER_MIB=$LAYER_MIB WORKLOADS=$WORKLOADS loadtests/compare.sh"
wants() { case ",$WORKLOADS," in *",$1,"*) return 0;; *) return 1;; esac; }

# BERTH_BIN_DIR=DIR: use the berth, berth-load and berth-seed-index already built in DIR
# (no cargo build, no scripts/setup; the tools below must be installed).
if [ -z "${BERTH_BIN_DIR:-}" ]; then ./scripts/setup; else
    for t in docker-registry skopeo curl python3; do command -v $t >/dev/null || { echo "compare.sh: $t is missing (scripts/setup installs it)" >&2; exit 1; }; done
fi
# The idle workload holds 1,000 connections open in one server and in idle.py.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
command -v nginx >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >/dev/null; }
command -v wrk >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/berth-target}"
[ -n "${BERTH_BIN_DIR:-}" ] || cargo build --release --locked -p berth-proxy -p berth-loadtests
BERTH="$CARGO_TARGET_DIR/release/berth"
LOAD="$CARGO_TARGET_DIR/release/berth-load"
SEED_INDEX="$CARGO_TARGET_DIR/release/berth-seed-index"
FLOOR="$CARGO_TARGET_DIR/release/berth-pingora-floor"
if [ -n "${BERTH_BIN_DIR:-}" ]; then
    BERTH="$BERTH_BIN_DIR/berth"; LOAD="$BERTH_BIN_DIR/berth-load"; SEED_INDEX="$BERTH_BIN_DIR/berth-seed-index"
    FLOOR="$BERTH_BIN_DIR/berth-pingora-floor"
fi

WORK=$(mktemp -d /tmp/berth-bench.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    # RAW=DIR: the per-round figures behind the medians, for a later look.
    if [ -n "${RAW:-}" ]; then mkdir -p "$RAW" && cp -r "$WORK/out/." "$RAW/" 2>/dev/null || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT
log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() { # url
    for _ in $(seq 1 200); do curl -sk -o /dev/null "$1" && return 0; sleep 0.05; done
    echo "not ready: $1" >&2
    tail -n 20 "$WORK"/*/err.log >&2 2>/dev/null || true
    return 1
}
sha() { sha256sum "$1" | cut -d' ' -f1; }

# --- the image: an OCI layout made with the shell, pushed with skopeo -----------------
seed_layout() {
    local L=$WORK/layout root=$WORK/rootfs
    mkdir -p "$L/blobs/sha256" "$root"
    printf '{"imageLayoutVersion":"1.0.0"}' > "$L/oci-layout"
    head -c "${LAYER_MIB}M" /dev/urandom > "$root/big.bin"
    tar -C "$root" -cf "$WORK/big.tar" big.bin
    rm -rf "$root"
    local diff_big; diff_big=$(sha "$WORK/big.tar")
    gzip -1 -c "$WORK/big.tar" > "$WORK/big.tar.gz"; rm "$WORK/big.tar"
    BIG=$(sha "$WORK/big.tar.gz"); BIG_SIZE=$(stat -c%s "$WORK/big.tar.gz")
    mv "$WORK/big.tar.gz" "$L/blobs/sha256/$BIG"
    local manifests=""
    for arch in amd64 arm64; do
        mkdir -p "$WORK/small-$arch"; head -c 1M /dev/urandom > "$WORK/small-$arch/$arch.bin"
        tar -C "$WORK/small-$arch" -cf "$WORK/small.tar" "$arch.bin"
        local diff_small; diff_small=$(sha "$WORK/small.tar")
        gzip -1 -c "$WORK/small.tar" > "$WORK/small.tar.gz"
        local small; small=$(sha "$WORK/small.tar.gz"); local small_size; small_size=$(stat -c%s "$WORK/small.tar.gz")
        mv "$WORK/small.tar.gz" "$L/blobs/sha256/$small"
        printf '{"architecture":"%s","os":"linux","config":{},"rootfs":{"type":"layers","diff_ids":["sha256:%s","sha256:%s"]}}' \
            "$arch" "$diff_big" "$diff_small" > "$WORK/config.json"
        local cfg; cfg=$(sha "$WORK/config.json"); local cfg_size; cfg_size=$(stat -c%s "$WORK/config.json")
        mv "$WORK/config.json" "$L/blobs/sha256/$cfg"
        printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%d},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:%s","size":%d},{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:%s","size":%d}]}' \
            "$cfg" "$cfg_size" "$BIG" "$BIG_SIZE" "$small" "$small_size" > "$WORK/m.json"
        local m; m=$(sha "$WORK/m.json"); local m_size; m_size=$(stat -c%s "$WORK/m.json")
        mv "$WORK/m.json" "$L/blobs/sha256/$m"
        [ -n "$manifests" ] && manifests+=","
        manifests+=$(printf '{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%d,"platform":{"architecture":"%s","os":"linux"}}' "$m" "$m_size" "$arch")
        rm -rf "$WORK/small-$arch" "$WORK/small.tar"
    done
    printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[%s]}' "$manifests" > "$WORK/index.json"
    INDEX=$(sha "$WORK/index.json"); local index_size; index_size=$(stat -c%s "$WORK/index.json")
    cp "$WORK/index.json" "$L/blobs/sha256/$INDEX"
    printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.index.v1+json","digest":"sha256:%s","size":%d,"annotations":{"org.opencontainers.image.ref.name":"v1"}}]}' \
        "$INDEX" "$index_size" > "$L/index.json"
}

start_registry() { # name port config-extra...
    local name=$1 port=$2; shift 2
    mkdir -p "$WORK/$name"
    cat > "$WORK/$name/config.yml" <<EOF
version: 0.1
log: {level: warn, accesslog: {disabled: false}}
storage:
  filesystem: {rootdirectory: $WORK/$name/data}
  delete: {enabled: true}
http: {addr: 127.0.0.1:$port}
$*
EOF
    docker-registry serve "$WORK/$name/config.yml" >"$WORK/$name/access.log" 2>"$WORK/$name/err.log" &
    PIDS+=($!); eval "${name^^}_PID=$!"
    wait_http "http://127.0.0.1:$port/v2/"
}

start_berth() { # [store dir, default: a fresh one] [upstream port] [extra upstream settings]
    local store=${1:-} port=${2:-$UP_PORT} extra=${3:-} default_ttl='tag_ttl = "5m"'
    mkdir -p "$WORK/berth"
    if [ -z "$store" ]; then rm -rf "$WORK/berth/store"; store=$WORK/berth/store; fi
    # BERTH_TLS=1: serve HTTPS with the benchmark's certificate (the tls workload).
    local tls="" scheme=http
    if [ -n "${BERTH_TLS:-}" ]; then tls="tls = { cert = \"$WORK/tls.pem\", key = \"$WORK/tls.key\" }"; scheme=https; fi
    cat > "$WORK/berth/berth.toml" <<EOF
[server]
drain = "5s"
$tls
[[upstream]]
namespace = "docker.io"
url = "http://127.0.0.1:$port"
prefixes = ["library/**"]
${extra:-$default_ttl}
EOF
    # berth's default log level: the access log is on, one line per request, as nginx's is.
    BERTH_LOG=info "$BERTH" serve --config "$WORK/berth/berth.toml" --listen "127.0.0.1:$BERTH_PORT" \
        --store "$store" 2>>"$WORK/berth/err.log" &
    BERTH_PID=$!; PIDS+=($BERTH_PID)
    wait_http "$scheme://127.0.0.1:$BERTH_PORT/v2/"
    # Peak anonymous resident memory (heap, not file-backed mappings), sampled.
    ( peak=0; while kill -0 "$BERTH_PID" 2>/dev/null; do
        v=$(awk '/^RssAnon:/{print $2}' "/proc/$BERTH_PID/status" 2>/dev/null || echo 0)
        [ "${v:-0}" -gt "$peak" ] && peak=$v && echo "$peak" > "$WORK/berth-rss-peak-$BERTH_PID"
        sleep 0.1; done ) &
    PIDS+=($!)
}

stop_pid() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

start_peer() {
    rm -rf "$WORK/peer"
    start_registry peer "$PEER_PORT" "proxy: {remoteurl: http://127.0.0.1:$UP_PORT}"
}

# --- set up ---------------------------------------------------------------------------
log "generating a ${LAYER_MIB} MiB layer and a two-platform index"
seed_layout
UP_PORT=$(free_port); PEER_PORT=$(free_port); BERTH_PORT=$(free_port); NGINX_PORT=$(free_port)
start_registry upstream "$UP_PORT"
skopeo copy --all --quiet --dest-tls-verify=false "oci:$WORK/layout:v1" "docker://127.0.0.1:$UP_PORT/library/bench:v1"
UPLOG=$WORK/upstream/access.log

# nginx: the same bytes at the same paths, as static files.
NROOT=$WORK/nginx/root/v2/library/bench
mkdir -p "$NROOT/blobs" "$NROOT/manifests"
cp "$WORK/layout/blobs/sha256/$BIG" "$NROOT/blobs/sha256:$BIG"
cp "$WORK/index.json" "$NROOT/manifests/v1"
cp "$WORK/index.json" "$NROOT/manifests/sha256:$INDEX"
# One certificate for HTTPS, served by berth (rustls) and nginx (OpenSSL) alike.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=127.0.0.1 \
    -addext subjectAltName=IP:127.0.0.1 -keyout "$WORK/tls.key" -out "$WORK/tls.pem" 2>/dev/null
NGINX_TLS_PORT=$(free_port)
cat > "$WORK/nginx/nginx.conf" <<EOF
user root;
worker_processes $(nproc);
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log;
events { worker_connections 4096; }
http {
    # The access log is on, one line per request, as berth's is.
    sendfile on; tcp_nopush on; access_log $WORK/nginx/access.log; keepalive_requests 1000000;
    default_type application/octet-stream;
    server {
        listen 127.0.0.1:$NGINX_PORT; root $WORK/nginx/root;
        # The headers a registry sends with a manifest, so that clients do the same work.
        location /v2/library/bench/manifests/ {
            default_type application/vnd.oci.image.index.v1+json;
            add_header Docker-Content-Digest sha256:$INDEX;
        }
    }
    server {
        listen 127.0.0.1:$NGINX_TLS_PORT ssl; root $WORK/nginx/root;
        ssl_certificate $WORK/tls.pem; ssl_certificate_key $WORK/tls.key;
        location /v2/library/bench/manifests/ {
            default_type application/vnd.oci.image.index.v1+json;
            add_header Docker-Content-Digest sha256:$INDEX;
        }
    }
}
EOF
nginx -c "$WORK/nginx/nginx.conf" -g 'daemon off;' &
PIDS+=($!)
wait_http "http://127.0.0.1:$NGINX_PORT/v2/library/bench/manifests/v1"

OUT=$WORK/out; mkdir -p "$OUT"
# berth-pingora-floor: the least a Pingora server does per request (the serve workload).
FLOOR_PORT=$(free_port)
if wants serve; then
    "$FLOOR" "127.0.0.1:$FLOOR_PORT" "$WORK/index.json" 2>"$WORK/floor.log" &
    FLOOR_PID=$!; PIDS+=($FLOOR_PID)
    wait_http "http://127.0.0.1:$FLOOR_PORT/v2/"
fi
target_url() { case $1 in berth) echo "http://127.0.0.1:$BERTH_PORT";; peer) echo "http://127.0.0.1:$PEER_PORT";; nginx) echo "http://127.0.0.1:$NGINX_PORT";;
    berth-tls) echo "https://127.0.0.1:$BERTH_PORT";; nginx-tls) echo "https://127.0.0.1:$NGINX_TLS_PORT";;
    floor) echo "http://127.0.0.1:$FLOOR_PORT";; esac; }
target_repo() { case $1 in berth*) echo docker.io/library/bench;; *) echo library/bench;; esac; }

# The processes of a target, whose CPU time is its cost: berth and the peer are one
# process each (their threads included), nginx its master and workers.
server_pids() {
    case $1 in
        berth*) echo "${BERTH_PID:-}";; peer) echo "${PEER_PID:-}";; floor) echo "${FLOOR_PID:-}";;
        nginx*) local m; m=$(cat "$WORK/nginx/nginx.pid"); echo "$m" $(pgrep -P "$m");;
    esac
}
cpu_ticks() { # pids... -> user + system CPU time in clock ticks (of every thread)
    local f=() p; for p in "$@"; do f+=("/proc/$p/stat"); done
    [ ${#f[@]} -gt 0 ] || { echo 0; return; }
    awk '{t += $14 + $15} END {print t + 0}' "${f[@]}" 2>/dev/null || echo 0
}
export CLK_TCK; CLK_TCK=$(getconf CLK_TCK)
# The whole machine's busy time (user, nice, system, irq, softirq of every core), in clock
# ticks. On loopback the kernel does a transfer's TCP work in whichever of the sender and
# the receiver happens to run it, so the server's share moves with the timing; the sum
# over the machine (server, client and kernel) does not.
machine_ticks() { awk '/^cpu /{print $2 + $3 + $4 + $7 + $8}' /proc/stat; }
cpu_record() { # prefix c0 m0 pids... -> the target's ticks since c0 to prefix.cpu, the machine's since m0 to prefix.sys
    local prefix=$1 c0=$2 m0=$3; shift 3
    echo $(( $(cpu_ticks "$@") - c0 )) > "$prefix.cpu"
    echo $(( $(machine_ticks) - m0 )) > "$prefix.sys"
}

# Each run also writes the target's CPU time during it (ticks) to $OUT/<name>.<target>.<round>.cpu,
# and the machine's to .sys.
run() { # name target round args...
    local name=$1 t=$2 r=$3 pids c0 m0; shift 3
    log "round $r: $name on $t"
    pids=$(server_pids "$t"); c0=$(cpu_ticks $pids); m0=$(machine_ticks)
    "$LOAD" "$@" --registry "$(target_url "$t")" --json "$OUT/$name.$t.$r.json" >"$OUT/$name.$t.$r.txt" 2>&1 \
        || { echo "FAILED: $name on $t (round $r):"; cat "$OUT/$name.$t.$r.txt"; } >&2
    cpu_record "$OUT/$name.$t.$r" "$c0" "$m0" $pids
}
# The same load from wrk, an independent load generator (2 threads, 32 connections, 5 s):
# its output goes to $OUT/<name>.<target>.<round>.wrk, the CPU times to .cpu and .sys.
run_wrk() { # name target round path
    local name=$1 t=$2 r=$3 path=$4 pids c0 m0
    log "round $r: $name (wrk) on $t"
    pids=$(server_pids "$t"); c0=$(cpu_ticks $pids); m0=$(machine_ticks)
    wrk -t2 -c32 -d5s --latency -H "Accept: application/vnd.oci.image.index.v1+json" \
        "$(target_url "$t")$path" >"$OUT/$name.$t.$r.wrk" 2>&1 \
        || { echo "FAILED: $name (wrk) on $t (round $r):"; cat "$OUT/$name.$t.$r.wrk"; } >&2
    cpu_record "$OUT/$name.$t.$r" "$c0" "$m0" $pids
}

# --- workloads ------------------------------------------------------------------------
for r in $(seq 1 "$ROUNDS"); do
    # Cold start: empty caches, N clients at once on the big layer; then the same warm.
    wants cold && for n in 50 100; do
        for t in berth peer; do
            if [ $t = berth ]; then [ -n "${BERTH_PID:-}" ] && stop_pid "$BERTH_PID"; start_berth;
            else [ -n "${PEER_PID:-}" ] && stop_pid "$PEER_PID"; start_peer; fi
            run "cold$n" $t "$r" cold --repo "$(target_repo $t)" --digest "sha256:$BIG" --clients "$n" --upstream-log "$UPLOG"
            run "warm$n" $t "$r" cold --repo "$(target_repo $t)" --digest "sha256:$BIG" --clients "$n" --upstream-log "$UPLOG"
        done
    done
    if wants serve || wants pull; then
        # Warm: berth and the peer running, with the image cached (one pull each).
        [ -n "${BERTH_PID:-}" ] && kill -0 "$BERTH_PID" 2>/dev/null || start_berth
        [ -n "${PEER_PID:-}" ] && kill -0 "$PEER_PID" 2>/dev/null || start_peer
        for t in berth peer; do
            run warmup $t "$r" pull --image "$(target_repo $t):v1" --concurrency 1 --pulls 1
        done
    fi
    wants serve && for t in berth peer nginx; do
        repo=$(target_repo $t)
        # Throughput of the serving path: the client counts bytes without hashing them
        # (hashing costs it about as much CPU as serving, on the same two cores).
        run blob1 $t "$r" blob --repo "$repo" --digest "sha256:$BIG" --concurrency 1 --requests 8 --no-verify
        run blob32 $t "$r" blob --repo "$repo" --digest "sha256:$BIG" --concurrency 32 --requests 96 --no-verify
        # The same with every body verified, as a node would.
        run blob32v $t "$r" blob --repo "$repo" --digest "sha256:$BIG" --concurrency 32 --requests 96
        # Bounded by time, not by count.
        run tag32 $t "$r" manifests --repo "$repo" --reference v1 --concurrency 32 --duration 5s --requests 100000000
        run digest32 $t "$r" manifests --repo "$repo" --reference "sha256:$INDEX" --concurrency 32 --duration 5s --requests 100000000
        # The same two loads from wrk, to check the harness against.
        run_wrk wtag32 $t "$r" "/v2/$repo/manifests/v1"
        run_wrk wdigest32 $t "$r" "/v2/$repo/manifests/sha256:$INDEX"
    done
    # What Pingora itself costs: berth-pingora-floor answers every request with the index.
    wants serve && run_wrk wtag32 floor "$r" /v2/library/bench/manifests/v1
    wants pull && for t in berth peer; do
        run pull50 $t "$r" pull --image "$(target_repo $t):v1" --concurrency 50 --pulls 100 --upstream-log "$UPLOG"
    done
done

# --- containerd: whole pulls by a real containerd (Debian's 1.6) -------------------------
# The image's linux/amd64 platform, three ways, each into an empty content store (a fresh
# containerd root): direct from the upstream (--plain-http), through berth cold (a fresh
# berth store) and through berth warm (cached by the cold pull). Each way three times: `ctr
# content fetch` (every blob into the content store, verified), `ctr images pull` with
# the native snapshotter (the same, then the layers unpacked), both of which move every
# byte through the ctr process and over gRPC into the daemon; then the CRI image service's
# PullImage, which is what the kubelet calls: the daemon fetches and unpacks by itself.
# Timed from the start of ctr (or of the PullImage call) to its end, after a sync;
# containerd's start-up is not. The direct pull comes first in odd rounds and last in
# even ones. containerd reaches berth through a hosts.toml
# mirror for docker.io (the mirror form: /v2/library/bench/...?ns=docker.io) whose
# fallback server is a port nothing listens on, so a failing berth fails the pull.
CTD=$WORK/ctd
ctd_start() { # [cri]: a containerd with an empty root and state; with cri, its CRI plugin on
    [ -n "${CTD_PID:-}" ] && stop_pid "$CTD_PID"
    rm -rf "$CTD"; mkdir -p "$CTD"
    local cri='"io.containerd.grpc.v1.cri", '
    [ "${1:-}" = cri ] && cri=""
    cat > "$CTD/config.toml" <<EOF
version = 2
root = "$CTD/root"
state = "$CTD/state"
disabled_plugins = [${cri}"io.containerd.internal.v1.opt",
  "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs"]
[grpc]
  address = "$CTD/c.sock"
[ttrpc]
  address = "$CTD/c.sock.ttrpc"
EOF
    # The CRI image service as a node runs it, on the native snapshotter (no overlayfs
    # needed), its registry hosts from $HOSTS: docker.io through berth, the upstream's
    # own address over plain HTTP.
    [ -n "$cri" ] || cat >> "$CTD/config.toml" <<EOF
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
  bin_dir = "$CTD/cni-bin"
  conf_dir = "$CTD/cni-conf"
[plugins."io.containerd.grpc.v1.cri".registry]
  config_path = "$HOSTS"
EOF
    containerd --config "$CTD/config.toml" </dev/null >"$CTD/err.log" 2>&1 &
    CTD_PID=$!; PIDS+=($CTD_PID)
    for _ in $(seq 1 200); do
        timeout 5 ctr --address "$CTD/c.sock" version </dev/null >/dev/null 2>&1 && return 0
        kill -0 "$CTD_PID" 2>/dev/null || break
        sleep 0.05
    done
    echo "containerd did not start" >&2; tail -n 20 "$CTD/err.log" >&2; return 1
}
cri_pull() { # ref log: the CRI image service's PullImage(ref), one gRPC call made with curl
    # A gRPC frame of PullImageRequest{image: ImageSpec{image: ref}}, encoded by hand.
    python3 -c 'import sys; i = sys.argv[1].encode(); assert len(i) < 126
m = b"\n" + bytes([len(i) + 2]) + b"\n" + bytes([len(i)]) + i
sys.stdout.buffer.write(b"\0" + len(m).to_bytes(4, "big") + m)' "$1" > "$CTD/pull.req"
    timeout 600 curl -sS --http2-prior-knowledge --unix-socket "$CTD/c.sock" \
        -H 'content-type: application/grpc' -H 'te: trailers' --data-binary "@$CTD/pull.req" \
        -o "$CTD/pull.resp" -D "$2" http://localhost/runtime.v1.ImageService/PullImage </dev/null 2>>"$2" &&
        grep -q '^grpc-status: 0' "$2"
}
ctd_time() { # way fetch|pull|cri ref remote-options... -> a line of $OUT/containerd.extra
    local way=$1 mode=$2 ref=$3; shift 3
    local args=(content fetch) ms=null up0 t0 ok ns=bench log=$OUT/containerd.${link%% *}.$way.$mode.$r.log
    [ "$mode" = pull ] && args=(images pull --snapshotter native)
    if [ "$mode" = cri ]; then ctd_start cri; ns=k8s.io; else ctd_start; fi
    # The last pull's writes reach the disk before this one is timed, not during it.
    sync
    log "round $r: containerd $mode, $way, upstream on $link"
    up0=$(wc -l < "$UPLOG"); t0=$(date +%s%N)
    if [ "$mode" = cri ]; then cri_pull "$ref" "$log"
    else timeout 600 ctr --address "$CTD/c.sock" -n bench "${args[@]}" --platform linux/amd64 "$@" "$ref" </dev/null >"$log" 2>&1
    fi && ok=1 || ok=0
    if [ $ok = 1 ]; then
        ms=$(( ($(date +%s%N) - t0) / 1000000 ))
        timeout 60 ctr --address "$CTD/c.sock" -n "$ns" content ls </dev/null >"$log.ls" 2>&1 || true
        grep -q "$BIG" "$log.ls" || ms=null # the layer is in the content store
    fi
    [ "$ms" = null ] && { echo "FAILED: containerd $mode, $way (round $r):"; tail -n 20 "$log"; } >&2
    sleep 0.3 # the upstream logs a request once it has sent the response
    printf '{"round": %d, "link": "%s", "mode": "%s", "way": "%s", "ms": %s, "upstream_requests": %d}\n' \
        "$r" "$link" "$mode" "$way" "$ms" $(( $(wc -l < "$UPLOG") - up0 )) >> "$OUT/containerd.extra"
}
ctd_direct() { ctd_time direct "$mode" "127.0.0.1:$up/library/bench:v1" --plain-http; } # this $mode from this $up
if wants containerd; then
    for t in containerd ctr; do command -v $t >/dev/null || { echo "compare.sh: $t is missing (scripts/setup installs it)" >&2; exit 1; }; done
    HOSTS=$WORK/ctd-hosts; mkdir -p "$HOSTS/docker.io"
    printf 'server = "http://127.0.0.1:%s"\n\n[host."http://127.0.0.1:%s"]\n  capabilities = ["pull", "resolve"]\n' \
        "$(free_port)" "$BERTH_PORT" > "$HOSTS/docker.io/hosts.toml"
    # The upstream on loopback, and across an emulated link (loadtests/slowlink.py: each
    # direction delayed by half of $LINK_RTT_MS and paced to $LINK_MIBPS per connection),
    # as a registry across a network is. Direct pulls and berth's fills both go through it.
    LINK_RTT_MS=${LINK_RTT_MS:-20}; LINK_MIBPS=${LINK_MIBPS:-100}
    LINK_PORT=$(free_port)
    python3 loadtests/slowlink.py "$LINK_PORT" "$UP_PORT" "$LINK_RTT_MS" "$LINK_MIBPS" >"$WORK/slowlink.log" 2>&1 &
    PIDS+=($!)
    for _ in $(seq 1 100); do grep -q ready "$WORK/slowlink.log" && break; sleep 0.05; done
    # The CRI image service takes plain HTTP for a registry from its hosts.toml alone.
    for port in "$UP_PORT" "$LINK_PORT"; do
        mkdir -p "$HOSTS/127.0.0.1:$port"
        printf 'server = "http://127.0.0.1:%s"\n' "$port" > "$HOSTS/127.0.0.1:$port/hosts.toml"
    done
    for r in $(seq 1 "$ROUNDS"); do
        for link in loopback "link $LINK_RTT_MS ms, $LINK_MIBPS MiB/s"; do
            up=$UP_PORT; [ "$link" = loopback ] || up=$LINK_PORT
            for mode in fetch pull cri; do
                # The direct pull goes first in odd rounds and last in even ones, so that
                # neither way always follows the other.
                if [ $((r % 2)) = 1 ]; then ctd_direct; fi
                [ -n "${BERTH_PID:-}" ] && stop_pid "$BERTH_PID"; start_berth "" "$up"
                ctd_time cold $mode docker.io/library/bench:v1 --hosts-dir "$HOSTS"
                ctd_time warm $mode docker.io/library/bench:v1 --hosts-dir "$HOSTS"
                if [ $((r % 2)) = 0 ]; then ctd_direct; fi
            done
        done
    done
    stop_pid "$CTD_PID"; rm -rf "$CTD"
    # The workloads after this one use berth with the upstream on loopback.
    stop_pid "$BERTH_PID"; start_berth
fi

# --- idle: 1,000 idle keep-alive connections and 32 busy ones ---------------------------
# loadtests/idle.py opens $IDLE_CONNS connections; each GETs the manifest by tag once and
# then stays open and idle. With them open, berth-load runs 32 connections of manifest
# GETs by tag for 5 s. Per target: requests per second and p99, how many idle connections
# are still open at the end (berth's keep-alive timeout is 60 s, nginx's 75 s; the whole
# hold lasts about 10 s), and the server's memory (VmRSS and RssAnon, for nginx summed
# over its master and workers): before the idle connections, with them open, and at its
# peak during the busy run (sampled every 100 ms).
IDLE_CONNS=${IDLE_CONNS:-1000}
mem_kib() { # pids... -> "VmRSS RssAnon" summed over them, in KiB
    local f=() p; for p in "$@"; do f+=("/proc/$p/status"); done
    awk '/^VmRSS:/ {r += $2} /^RssAnon:/ {a += $2} END {print r + 0, a + 0}' "${f[@]}" 2>/dev/null || echo "0 0"
}
if wants idle; then
    for r in $(seq 1 "$ROUNDS"); do
        # A fresh berth each round (its manifest cached by one request), so that memory
        # freed by earlier work does not hide what the connections cost.
        [ -n "${BERTH_PID:-}" ] && stop_pid "$BERTH_PID"
        start_berth
        curl -sf -o /dev/null -H "Accept: application/vnd.oci.image.index.v1+json" \
            "http://127.0.0.1:$BERTH_PORT/v2/docker.io/library/bench/manifests/v1"
        for t in berth nginx; do
            pids=$(server_pids $t); port=$BERTH_PORT; [ $t = nginx ] && port=$NGINX_PORT
            read -r rss0 anon0 < <(mem_kib $pids)
            log "round $r: idle on $t: opening $IDLE_CONNS connections"
            python3 loadtests/idle.py 127.0.0.1 "$port" "/v2/$(target_repo $t)/manifests/v1" "$IDLE_CONNS" \
                >"$OUT/idle.$t.$r.out" 2>"$OUT/idle.$t.$r.err" &
            idle_pid=$!; PIDS+=($idle_pid)
            for _ in $(seq 1 600); do
                grep -q '^ready' "$OUT/idle.$t.$r.out" && break; kill -0 "$idle_pid" 2>/dev/null || break; sleep 0.1
            done
            sleep 0.5
            read -r rss1 anon1 < <(mem_kib $pids)
            echo "$rss1 $anon1" > "$WORK/idle-peak"
            # Each sample replaces the file whole (a rename): killed between truncating
            # the file and writing it, the sampler left it empty, and the read below
            # ended the whole run.
            ( pr=$rss1; pa=$anon1; while :; do read -r vr va < <(mem_kib $pids)
                [ "$vr" -gt "$pr" ] && pr=$vr; [ "$va" -gt "$pa" ] && pa=$va
                echo "$pr $pa" > "$WORK/idle-peak.new" && mv -f "$WORK/idle-peak.new" "$WORK/idle-peak"; sleep 0.1; done ) &
            sampler=$!
            run idle32 $t "$r" manifests --repo "$(target_repo $t)" --reference v1 --concurrency 32 --duration 5s --requests 100000000
            stop_pid "$sampler"; read -r rss2 anon2 < "$WORK/idle-peak"
            stop_pid "$idle_pid"
            held=$(grep '^{' "$OUT/idle.$t.$r.out" || echo null)
            printf '{"round": %d, "target": "%s", "conns": %d, "rss_before_kib": %d, "anon_before_kib": %d, "rss_idle_kib": %d, "anon_idle_kib": %d, "rss_peak_kib": %d, "anon_peak_kib": %d, "held": %s}\n' \
                "$r" "$t" "$IDLE_CONNS" "$rss0" "$anon0" "$rss1" "$anon1" "$rss2" "$anon2" "$held" >> "$OUT/idle.extra"
        done
    done
fi

# --- tls: warm serving over HTTPS --------------------------------------------------------
# berth (rustls, ring) and nginx (OpenSSL) with the same certificate: blob throughput from
# berth-load (--insecure), manifests from wrk (berth-load's lean client is plain HTTP
# only), each with the server's CPU time. berth serves HTTPS from a store of its own,
# filled by one pull of the layer and the manifests.
if wants tls; then
    [ -n "${BERTH_PID:-}" ] && stop_pid "$BERTH_PID"
    BERTH_TLS=1 start_berth
    TLS_BASE="https://127.0.0.1:$BERTH_PORT/v2/docker.io/library/bench"
    curl -skf -o /dev/null "$TLS_BASE/blobs/sha256:$BIG"
    for ref in v1 "sha256:$INDEX"; do
        curl -skf -o /dev/null -H "Accept: application/vnd.oci.image.index.v1+json" "$TLS_BASE/manifests/$ref"
    done
    for r in $(seq 1 "$ROUNDS"); do
        for t in berth-tls nginx-tls; do
            repo=$(target_repo $t)
            run tblob1 $t "$r" blob --repo "$repo" --digest "sha256:$BIG" --concurrency 1 --requests 8 --no-verify --insecure
            run tblob32 $t "$r" blob --repo "$repo" --digest "sha256:$BIG" --concurrency 32 --requests 96 --no-verify --insecure
            run_wrk wttag32 $t "$r" "/v2/$repo/manifests/v1"
            run_wrk wtdigest32 $t "$r" "/v2/$repo/manifests/sha256:$INDEX"
        done
    done
    stop_pid "$BERTH_PID"; BERTH_PID=""
fi

# --- resilience: restart with a large index, a hung upstream, SIGTERM ----------------------
ms_since() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }
if wants resilience; then
    [ -n "${BERTH_PID:-}" ] && stop_pid "$BERTH_PID"
    log "indexing 1,000,000 blobs in a store"
    "$SEED_INDEX" "$WORK/index-store" 1000000 >/dev/null
    t0=$(date +%s%N); start_berth "$WORK/index-store"; restart_ms=$(ms_since "$t0")

    log "SIGTERM with nothing in flight"
    t0=$(date +%s%N); stop_pid "$BERTH_PID"; sigterm_ms=$(ms_since "$t0")

    # SIGTERM with a pull in flight: one that finishes within the drain time (the big
    # layer at 100 MiB/s) and one that cannot (at 20 MiB/s). The layer is cached first.
    sigterm_pull() { # rate -> "exit_ms bytes_received"
        start_berth
        local url="http://127.0.0.1:$BERTH_PORT/v2/docker.io/library/bench/blobs/sha256:$BIG"
        curl -sf -o /dev/null "$url"
        curl -s --limit-rate "$1" -o /dev/null -w '%{size_download}' "$url" > "$WORK/pull.bytes" &
        local curl_pid=$!
        sleep 1
        local t0; t0=$(date +%s%N)
        stop_pid "$BERTH_PID"
        local ms; ms=$(ms_since "$t0")
        wait "$curl_pid" 2>/dev/null || true
        echo "$ms $(cat "$WORK/pull.bytes")"
    }
    log "SIGTERM with a pull in flight that fits in the drain time"
    read -r sigterm_fits_ms sigterm_fits_bytes < <(sigterm_pull 100M)
    log "SIGTERM with a pull in flight that outlasts the drain time"
    read -r sigterm_cut_ms sigterm_cut_bytes < <(sigterm_pull 20M)

    log "a cached tag with the upstream hung"
    # Last in the script: the upstream itself is stopped and its port taken over.
    HUNG_PORT=$UP_PORT
    start_berth "" "$HUNG_PORT" 'tag_ttl = "1s"
read_timeout = "3s"
connect_timeout = "1s"'
    curl -sf -o /dev/null -H "Accept: application/vnd.oci.image.index.v1+json" \
        "http://127.0.0.1:$BERTH_PORT/v2/docker.io/library/bench/manifests/v1"
    stop_pid "$UPSTREAM_PID"
    python3 -c 'import socket,sys
s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(64); conns=[]
while True: conns.append(s.accept()[0])' "$HUNG_PORT" &
    PIDS+=($!); sleep 1.5
    t0=$(date +%s%N)
    hung_status=$(curl -s -o /dev/null -w '%{http_code}' -D "$WORK/hung.headers" \
        -H "Accept: application/vnd.oci.image.index.v1+json" \
        "http://127.0.0.1:$BERTH_PORT/v2/docker.io/library/bench/manifests/v1")
    hung_ms=$(ms_since "$t0")
    hung_warning=$(grep -ci '^warning: 110' "$WORK/hung.headers" || true)
    t0=$(date +%s%N)
    curl -s -o /dev/null -H "Accept: application/vnd.oci.image.index.v1+json" \
        "http://127.0.0.1:$BERTH_PORT/v2/docker.io/library/bench/manifests/v1"
    hung_again_ms=$(ms_since "$t0")
    stop_pid "$BERTH_PID"
    cat > "$OUT/resilience.extra" <<EOF
{"restart_1m_blobs_ms": $restart_ms, "sigterm_idle_ms": $sigterm_ms,
 "sigterm_fits_ms": $sigterm_fits_ms, "sigterm_fits_bytes": $sigterm_fits_bytes,
 "sigterm_cut_ms": $sigterm_cut_ms, "sigterm_cut_bytes": $sigterm_cut_bytes, "layer_bytes": $BIG_SIZE,
 "hung_status": $hung_status, "hung_ms": $hung_ms, "hung_warning": $hung_warning,
 "hung_again_ms": $hung_again_ms, "read_timeout_ms": 3000, "drain_ms": 5000}
EOF
fi

BERTH_RSS_PEAK_KIB=$( (cat "$WORK"/berth-rss-peak-* 2>/dev/null || true) | sort -n | tail -1)
export BERTH_RSS_PEAK_KIB COMMAND LAYER_MIB ROUNDS
python3 loadtests/summarize.py "$OUT" "$RESULTS"
log "results written to $RESULTS"
