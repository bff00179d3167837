#!/usr/bin/env bash
# The container image test: builds berth's image with scripts/image (an OCI layout, no
# daemon), checks it is reproducible, pushes it into a running berth with skopeo and pulls
# it back (manifest digest and blobs unchanged), checks its config (user, entrypoint, port,
# environment), runs the image's filesystem in a chroot as 65532, and then, where podman
# can run containers here, pulls the image from berth with podman, runs `--help`, and runs
# it as a berth server that takes a push into its own store and stops cleanly on SIGTERM.
#
#   tests/image.sh            (the berth binary: $BERTH_TEST_BINARY, or
#                              $CARGO_TARGET_DIR/release/berth, default ~/.cache/berth-target)
#
# Needs skopeo, python3, curl and objcopy (scripts/setup installs them); podman is optional:
# without it, or where it cannot run a container, the podman part is skipped and says why.
# Every process it starts is stopped by its PID; its files live in one temporary directory.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
binary=${BERTH_TEST_BINARY:-${CARGO_TARGET_DIR:-$HOME/.cache/berth-target}/release/berth}
tag="test"
repo_path=tools/berth
started=$SECONDS

say() { printf 'image test: %s\n' "$*" >&2; }
failure=""
fail() { failure=$*; say "FAIL: $*"; exit 1; }

[ "$(id -u)" = 0 ] || fail "run as root (chroot, podman)"
[ -x "$binary" ] || fail "no berth binary at $binary"
for c in skopeo python3 curl objcopy ldd chroot tar; do
    command -v "$c" >/dev/null || fail "$c is missing (run scripts/setup)"
done

work=$(mktemp -d "${TMPDIR:-/tmp}/berth-image-test.XXXXXX")
berth_pid=""
podman_used=0
note=""

# Stops process $1 with SIGTERM, then SIGKILL after 10 s; waits for it if it is our child.
stop_pid() {
    local pid=$1 i
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

# podman with storage, state and network configuration of its own under $work: nothing of
# the machine's podman (if any) is read or changed.
pod() {
    timeout 180 podman --root "$work/podman/root" --runroot "$work/podman/run" \
        --tmpdir "$work/podman/tmp" --network-config-dir "$work/podman/net" \
        --storage-driver vfs --cgroup-manager cgroupfs --events-backend none "$@"
}

# The processes podman left that belong to this test: conmon and its exit command (their
# command lines name $work/podman) and container processes (their root is below it).
podman_processes() {
    local p r args
    for p in /proc/[0-9]*; do
        r=$(readlink "$p/root" 2>/dev/null) || continue
        mapfile -d '' -t args <"$p/cmdline" 2>/dev/null || continue
        if [[ $r == "$work/podman/"* || " ${args[*]} " == *"$work/podman/"* ]]; then echo "${p#/proc/}"; fi
    done
}

# Removes every container of this test's own podman storage (a container whose start was
# interrupted has no ID in a variable yet), then waits for podman's processes to end, killing
# by PID any still there after 10 s, so that nothing writes below $work once it is removed.
podman_cleanup() {
    local c i pids=()
    for c in $(pod ps -aq 2>/dev/null); do
        pod rm -f -t 2 "$c" >/dev/null 2>&1 || true
    done
    for ((i = 0; i < 50; i++)); do
        mapfile -t pids < <(podman_processes)
        [ "${#pids[@]}" -gt 0 ] || break
        sleep 0.2
    done
    if [ "${#pids[@]}" -gt 0 ]; then
        say "killing podman processes left behind: ${pids[*]}"
        kill -KILL "${pids[@]}" 2>/dev/null || true
    fi
    # Nothing of podman's may stay mounted below $work before it is removed.
    findmnt -rn -o TARGET | awk -v w="$work" 'index($0, w "/") == 1' | sort -r |
        while read -r m; do umount -l "$m" 2>/dev/null || true; done
}

cleanup() {
    local rc=$?
    trap - EXIT
    trap "" INT TERM # a second signal must not cut the cleanup short
    [ "$podman_used" = 0 ] || podman_cleanup
    [ -z "$berth_pid" ] || stop_pid "$berth_pid"
    if [ "$rc" != 0 ] && [ -f "$work/berth.log" ]; then
        say "berth's log (last 30 lines):"
        tail -n 30 "$work/berth.log" >&2 || true
    fi
    rm -rf "$work"
    if [ "$rc" = 0 ]; then
        say "PASS ($((SECONDS - started))s)$note"
    else
        say "FAIL${failure:+: $failure} (exit $rc, after $((SECONDS - started))s)"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The TCP port process $1 listens on: the LISTEN entry of /proc/$1/net/tcp whose socket
# inode is one of the process's open files (as proxy/tests/support/mod.rs reads it).
listening_port() {
    local pid=$1 fd l inodes=" " ports
    for fd in /proc/"$pid"/fd/*; do
        l=$(readlink "$fd" 2>/dev/null) || continue
        case $l in "socket:["*"]") l=${l#socket:[}; inodes+="${l%]} " ;; esac
    done
    [ "$inodes" != " " ] || return 1
    ports=$(awk -v inodes="$inodes" \
        'NR > 1 && $4 == "0A" && index(inodes, " " $10 " ") { split($2, a, ":"); print a[2] }' \
        /proc/"$pid"/net/tcp 2>/dev/null | sort -u)
    [ -n "$ports" ] || return 1
    [ "$(wc -l <<<"$ports")" = 1 ] || fail "process $pid listens on several ports: $ports"
    printf '%d\n' "0x$ports"
}

# Waits until process $1 listens and answers GET /v2/ with 200; prints the port.
wait_ready() {
    local pid=$1 what=$2 port="" i
    for ((i = 0; i < 300; i++)); do
        kill -0 "$pid" 2>/dev/null || fail "$what exited while starting"
        [ -n "$port" ] || port=$(listening_port "$pid") || port=""
        if [ -n "$port" ] &&
            [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/v2/")" = 200 ]; then
            echo "$port"
            return 0
        fi
        sleep 0.1
    done
    fail "$what did not become ready in 30 s (port: ${port:-none})"
}

# The manifest digest an OCI layout's index.json names for its only image.
layout_digest() {
    python3 -c 'import json, sys
m = json.load(open(sys.argv[1] + "/index.json"))["manifests"]
assert len(m) == 1, m
print(m[0]["digest"])' "$1"
}

# --- 1. the image: built, idempotent, reproducible ------------------------------------------

say "building the image from $binary"
t0=$SECONDS
digest=$("$repo/scripts/image" --binary "$binary" --out "$work/oci" --tag "$tag")
say "built $digest in $((SECONDS - t0))s"
[[ $digest =~ ^sha256:[0-9a-f]{64}$ ]] || fail "scripts/image printed '$digest', not a digest"
[ "$(layout_digest "$work/oci")" = "$digest" ] || fail "index.json does not name $digest"
before=$(cd "$work/oci" && find . -type f | sort | xargs sha256sum)
again=$("$repo/scripts/image" --binary "$binary" --out "$work/oci" --tag "$tag")
[ "$again" = "$digest" ] || fail "a second build into the same layout gave $again, not $digest"
after=$(cd "$work/oci" && find . -type f | sort | xargs sha256sum)
[ "$before" = "$after" ] || fail "a second build changed the layout's files"
other=$("$repo/scripts/image" --binary "$binary" --out "$work/oci-again" --tag "$tag")
[ "$other" = "$digest" ] || fail "a build into a new layout gave $other, not $digest"
diff -r "$work/oci" "$work/oci-again" >&2 || fail "two builds wrote different layouts"
rm -rf "$work/oci-again"
say "ok: rebuilding gives the same layout, byte for byte"

# The layer: the files the image needs, with the owners and modes it needs.
layer=$(python3 -c 'import json, sys
m = json.load(open(sys.argv[1] + "/blobs/sha256/" + sys.argv[2].split(":")[1]))
assert len(m["layers"]) == 1, m["layers"]
print(m["layers"][0]["digest"].split(":")[1])' "$work/oci" "$digest")
python3 - "$work/oci/blobs/sha256/$layer" <<'EOF' || fail "the layer is not as expected"
import sys, tarfile
t = tarfile.open(sys.argv[1])
e = {m.name: m for m in t.getmembers()}
problems = []
def want(name, kind, uid, gid, mode):
    m = e.get(name)
    if m is None:
        problems.append(f"{name}: missing"); return
    got = ({tarfile.DIRTYPE: "dir", tarfile.SYMTYPE: "symlink"}.get(m.type, "file"),
           m.uid, m.gid, m.mode)
    if got != (kind, uid, gid, mode):
        problems.append(f"{name}: {got}, want {(kind, uid, gid, mode)}")
want("usr/local/bin/berth", "file", 0, 0, 0o755)
want("var/lib/berth", "dir", 65532, 65532, 0o755)
want("tmp", "dir", 65532, 65532, 0o1777)
want("etc/ssl/certs/ca-certificates.crt", "file", 0, 0, 0o644)
passwd = t.extractfile("etc/passwd").read().decode()
group = t.extractfile("etc/group").read().decode()
if "berth:x:65532:65532:" not in passwd: problems.append(f"etc/passwd: {passwd!r}")
if "berth:x:65532:" not in group: problems.append(f"etc/group: {group!r}")
if not any("ld-linux" in n for n in e): problems.append("no dynamic loader")
if sorted(e) != [m.name for m in t.getmembers()]: problems.append("entries are not sorted")
if {m.mtime for m in t.getmembers()} != {0}: problems.append("mtimes are not all 0")
for p in problems: print("  " + p, file=sys.stderr)
sys.exit(1 if problems else 0)
EOF

# The layer alone is a root filesystem berth runs in, as 65532: every library is there.
mkdir "$work/rootfs"
tar --numeric-owner -xzf "$work/oci/blobs/sha256/$layer" -C "$work/rootfs"
version=$(chroot --userspec=65532:65532 "$work/rootfs" /usr/local/bin/berth --version) ||
    fail "berth does not run in a chroot of the image's layer"
[ "$version" = "$("$binary" --version)" ] || fail "berth --version in the chroot: $version"
rm -rf "$work/rootfs"
say "ok: the layer holds what berth needs ($version runs in a chroot of it as 65532)"

# --- 2. through berth: push, pull back, inspect ---------------------------------------------

: >"$work/berth.toml" # no upstreams: a private registry on loopback (open to everyone)
"$binary" check "$work/berth.toml" >/dev/null
NO_COLOR=1 "$binary" serve --config "$work/berth.toml" --listen 127.0.0.1:0 \
    --store "$work/store" </dev/null >"$work/berth.log" 2>&1 &
berth_pid=$!
port=$(wait_ready "$berth_pid" berth)
ref=127.0.0.1:$port/$repo_path:$tag
say "berth (pid $berth_pid) serves on 127.0.0.1:$port"

skopeo copy -q --dest-tls-verify=false "oci:$work/oci:$tag" "docker://$ref" >&2 ||
    fail "skopeo could not push the image into berth"
served=$(curl -fsS -I -H "Accept: application/vnd.oci.image.manifest.v1+json" \
    "http://127.0.0.1:$port/v2/$repo_path/manifests/$tag" |
    tr -d '\r' | awk 'tolower($1) == "docker-content-digest:" { print $2 }')
[ "$served" = "$digest" ] || fail "berth serves $repo_path:$tag as '$served', not $digest"
skopeo copy -q --src-tls-verify=false "docker://$ref" "oci:$work/pulled:$tag" >&2 ||
    fail "skopeo could not pull the image back from berth"
pulled=$(layout_digest "$work/pulled")
[ "$pulled" = "$digest" ] || fail "the image pulled back is $pulled, not $digest"
diff -r "$work/oci/blobs" "$work/pulled/blobs" >&2 || fail "the blobs pulled back differ"
say "ok: pushed into berth and pulled back unchanged ($digest)"

skopeo inspect --tls-verify=false --raw --config "docker://$ref" >"$work/config.json"
cmp -s "$work/config.json" "$work/oci/blobs/sha256/$(python3 -c 'import json, sys
print(json.load(open(sys.argv[1]))["config"]["digest"].split(":")[1])' \
    "$work/oci/blobs/sha256/${digest#sha256:}")" || fail "berth served another config blob"
python3 - "$work/config.json" <<'EOF' || fail "the image's config is not as expected"
import json, sys
c = json.load(open(sys.argv[1]))
cfg = c.get("config", {})
env = dict(e.split("=", 1) for e in cfg.get("Env", []))
checks = [
    ("os", c.get("os"), "linux"),
    ("User", cfg.get("User"), "65532:65532"),
    ("Entrypoint", cfg.get("Entrypoint"), ["/usr/local/bin/berth", "serve"]),
    ("Cmd", cfg.get("Cmd"), None),
    ("ExposedPorts", cfg.get("ExposedPorts"), {"5000/tcp": {}}),
    ("SSL_CERT_FILE", env.get("SSL_CERT_FILE"), "/etc/ssl/certs/ca-certificates.crt"),
    ("BERTH_STORE", env.get("BERTH_STORE"), "/var/lib/berth"),
    ("BERTH_LISTEN", env.get("BERTH_LISTEN"), "0.0.0.0:5000"),
    ("title label", cfg.get("Labels", {}).get("org.opencontainers.image.title"), "berth"),
    ("layers", len(c.get("rootfs", {}).get("diff_ids", [])), 1),
]
bad = [f"  {n}: {g!r}, want {w!r}" for n, g, w in checks if g != w]
if bad:
    print("\n".join(bad), file=sys.stderr)
sys.exit(1 if bad else 0)
EOF
say "ok: skopeo inspect --config: User 65532:65532, Entrypoint [/usr/local/bin/berth serve], 5000/tcp"

# The Dockerfile cannot be built here (no base images offline); its runtime stage must
# declare what this image has, and the workspace's version.
python3 - "$repo/Dockerfile" "$work/config.json" "$repo/Cargo.toml" <<'EOF' || fail "the Dockerfile and scripts/image disagree"
import json, re, shlex, sys
text = re.sub(r"\\\n", " ", open(sys.argv[1]).read())
lines = [l.strip() for l in text.splitlines() if l.strip() and not l.lstrip().startswith("#")]
last_from = max(i for i, l in enumerate(lines) if l.upper().startswith("FROM "))
runtime = [l.split(None, 1) for l in lines[last_from + 1:]]
def words(instr):
    return [w for k, v in runtime if k.upper() == instr for w in shlex.split(v)]
def pairs(instr):
    return dict(w.split("=", 1) for w in words(instr) if "=" in w)
cfg = json.load(open(sys.argv[2]))["config"]
version = re.search(r'^version = "([^"]+)"', open(sys.argv[3]).read(), re.M).group(1)
entry = [json.loads(v) for k, v in runtime if k.upper() == "ENTRYPOINT"]
image_env = dict(e.split("=", 1) for e in cfg["Env"] if not e.startswith("PATH="))
labels = {k: v.replace("${VERSION}", pairs("ARG").get("VERSION", "?"))
          for k, v in pairs("LABEL").items()}
checks = [
    ("ENTRYPOINT", entry[-1] if entry else None, cfg["Entrypoint"]),
    ("USER", words("USER"), [cfg["User"]]),
    ("EXPOSE", sorted(words("EXPOSE")), sorted(cfg["ExposedPorts"])),
    ("ENV", pairs("ENV"), image_env),
    ("WORKDIR", words("WORKDIR"), [cfg["WorkingDir"]]),
    ("STOPSIGNAL", words("STOPSIGNAL"), [cfg["StopSignal"]]),
    ("LABEL", labels, cfg["Labels"]),
    ("ARG VERSION", pairs("ARG").get("VERSION"), version),
]
bad = [f"  Dockerfile {n}: {g!r}, the image: {w!r}" for n, g, w in checks if g != w]
if bad:
    print("\n".join(bad), file=sys.stderr)
sys.exit(1 if bad else 0)
EOF
say "ok: the Dockerfile's runtime stage declares the same user, entrypoint, port, env and labels"

# --- 3. podman, where it can run containers here --------------------------------------------

podman_skip() { say "SKIPPED the podman part: $*"; note=" (podman part skipped: see above)"; exit 0; }

command -v podman >/dev/null || podman_skip "podman is not installed (apt-get install podman)"
podman_used=1
mkdir -p "$work/podman/net"
if ! pod info >"$work/podman-info.txt" 2>&1; then
    podman_skip "'podman info' fails here: $(tail -n 3 "$work/podman-info.txt")"
fi
# Can podman run any container here? A root filesystem of /usr/bin/true and its libraries
# tells the machine's limits apart from a fault of the image.
probe=$work/probe-rootfs
mkdir -p "$probe"
cp --parents -L /usr/bin/true "$probe"
ldd /usr/bin/true | grep -o '/[^ ]*' | while read -r lib; do cp --parents -L "$lib" "$probe"; done
# Without CAP_SYS_RESOURCE (some sandboxes and CI containers), runc cannot give a container
# podman's default limits (nofile and nproc of 1048576, say) and refuses to start it; it
# can start one with limits below this machine's. berth needs no more than these.
run_opts=()
if ! pod run --rm --network=none --rootfs "$probe" /usr/bin/true >"$work/probe.txt" 2>&1; then
    if grep -q 'error setting rlimit' "$work/probe.txt"; then
        nofile=$(ulimit -Hn)
        if [ "$nofile" = unlimited ] || [ "$nofile" -gt 65536 ]; then nofile=65536; fi
        run_opts=(--ulimit "nofile=$nofile:$nofile" --ulimit nproc=4096:4096)
        say "podman cannot raise rlimits here ($(grep -o 'error setting rlimit type [0-9]*' \
            "$work/probe.txt" | head -n 1)); its containers run with ${run_opts[*]}"
        pod run --rm --network=none "${run_opts[@]}" --rootfs "$probe" /usr/bin/true \
            >"$work/probe.txt" 2>&1 || run_opts=(failed)
    else
        run_opts=(failed)
    fi
    [ "${run_opts[*]}" != failed ] ||
        podman_skip "podman cannot run a container on this machine: $(tail -n 3 "$work/probe.txt")"
fi
rm -rf "$probe"

pod pull -q --tls-verify=false "$ref" >/dev/null || fail "podman could not pull $ref from berth"
got=$(pod image inspect --format '{{.Digest}} {{.Config.User}}' "$ref")
[ "$got" = "$digest 65532:65532" ] || fail "podman sees the image as '$got'"
help=$(pod run --rm --network=none "${run_opts[@]}" "$ref" --help 2>&1) || fail "podman run $ref --help: $help"
grep -q -- '--listen' <<<"$help" || fail "'podman run IMAGE --help' is not serve's help: $help"
say "ok: podman pulled it from berth; 'podman run IMAGE --help' prints serve's help"

# The image as a berth server, on the host's loopback (a port the kernel picks), with the
# podman options given: it runs as 65532:65532, takes a push into its store, serves it, and
# SIGTERM stops it with 0 (berth is PID 1 in its container).
serve_in_container() {
    local what=$1 cid cpid cport ids code
    shift
    cid=$(pod run -d --network=host "${run_opts[@]}" "$@" "$ref" --listen 127.0.0.1:0) ||
        fail "podman could not start the image ($what)"
    cpid=$(pod inspect --format '{{.State.Pid}}' "$cid")
    [ "${cpid:-0}" -gt 0 ] ||
        fail "the berth container ($what) is not running: $(pod logs "$cid" 2>&1 | tail -n 5)"
    cport=$(wait_ready "$cpid" "berth in its container ($what)") ||
        fail "$(pod logs "$cid" 2>&1 | tail -n 20)"
    ids=$(awk '$1 == "Uid:" || $1 == "Gid:" { printf "%s%s", sep, $2; sep = ":" }' \
        "/proc/$cpid/status")
    [ "$ids" = "65532:65532" ] || fail "berth in its container ($what) runs as uid:gid $ids"
    skopeo copy -q --dest-tls-verify=false "oci:$work/oci:$tag" \
        "docker://127.0.0.1:$cport/$repo_path:$tag" >&2 ||
        fail "a push into the container ($what) failed: $(pod logs "$cid" 2>&1 | tail -n 10)"
    [ "$(skopeo inspect --tls-verify=false --format '{{.Digest}}' \
        "docker://127.0.0.1:$cport/$repo_path:$tag")" = "$digest" ] ||
        fail "the container's berth ($what) does not serve what was pushed"
    pod stop -t 20 "$cid" >/dev/null
    code=$(pod inspect --format '{{.State.ExitCode}}' "$cid")
    [ "$code" = 0 ] ||
        fail "berth in its container ($what) exited $code on SIGTERM: $(pod logs "$cid" 2>&1 | tail -n 10)"
    pod rm "$cid" >/dev/null
    say "ok: podman ran the image as a berth server ($what): uid:gid 65532:65532, took a push," \
        "stopped with 0 on SIGTERM"
}
# The image's own /var/lib/berth (owned by 65532) as the store.
serve_in_container "store in the image"
# A read-only root filesystem and no writable /tmp, as a Kubernetes readOnlyRootFilesystem
# pod: only the store, a host directory owned by 65532, is writable.
install -d -o 65532 -g 65532 "$work/container-store"
serve_in_container "read-only root, store on a host directory" \
    --read-only --read-only-tmpfs=false -v "$work/container-store:/var/lib/berth"
[ -n "$(ls -A "$work/container-store")" ] || fail "berth wrote nothing into the mounted store"
