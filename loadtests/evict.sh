#!/usr/bin/env bash
# Eviction with a large index: a store with RECORDS blobs (8 bytes each, used now, so
# eviction must read past them) and FILES real blobs of FILE_SIZE bytes (cached a day ago: the
# ones eviction removes). It measures:
#   - berth's start-up time with that store (exec to `/v2/` answering);
#   - the time one eviction pass takes to free EVICT bytes (`POST /admin/evict?bytes=`);
#   - the latency of pulls (a private manifest by tag and a 1 MiB blob, `wrk --latency`)
#     during the pass, against the same pulls without it.
#
#   loadtests/evict.sh        # RECORDS=1000000 FILES=2100 FILE_SIZE=524288 EVICT=1GiB
#
# Needs: a release build (berth, berth-seed-index), wrk, curl, python3. Listens on
# 127.0.0.1 ports picked at run time; stops what it starts.
set -euo pipefail
cd "$(dirname "$0")/.."
target=${CARGO_TARGET_DIR:-$HOME/.cache/berth-target}
BERTH=${BERTH_BIN:-$target/release/berth}
SEED=${SEED_BIN:-$target/release/berth-seed-index}
RECORDS=${RECORDS:-1000000}
FILES=${FILES:-2100}
FILE_SIZE=${FILE_SIZE:-524288}
EVICT=${EVICT:-1GiB}
WRK_SECONDS=${WRK_SECONDS:-20}

work=$(mktemp -d /var/tmp/berth-evict.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$work/berth.toml" <<TOML
[cache]
max_size = "1TiB"
min_free = "1MiB"
keep_recent = "1h"
eviction_interval = "1h"
TOML

echo "seeding $RECORDS records and $FILES blobs of $FILE_SIZE bytes..."
t0=$(date +%s.%N)
"$SEED" "$work/store" "$RECORDS" --recent --with-files --files "$FILES" --file-size "$FILE_SIZE" >/dev/null
t1=$(date +%s.%N)
echo "seeded in $(python3 -c "print(f'{$t1-$t0:.1f}')") s"

start_berth() {
    local t0 t1
    t0=$(date +%s.%N)
    "$BERTH" serve --config "$work/berth.toml" --listen "127.0.0.1:$port" --store "$work/store" \
        >>"$work/berth.log" 2>&1 &
    pids+=($!)
    until curl -fs -o /dev/null "http://127.0.0.1:$port/v2/"; do sleep 0.01; done
    t1=$(date +%s.%N)
    startup=$(python3 -c "print(f'{$t1-$t0:.2f}')")
}
start_berth
echo "start-up with $RECORDS records: $startup s"
# The start-up reconciliation (every file and record read once) runs in the background;
# the measurements wait for it.
until grep -q "store index and files reconciled" "$work/berth.log"; do sleep 0.2; done
echo "$(grep "store index and files reconciled" "$work/berth.log" | sed 's/.*INFO //')"

# Something to pull: a private image (a 1 MiB blob and its manifest).
python3 - "$port" <<'PY'
import hashlib, json, os, sys, urllib.request
port = sys.argv[1]
base = f"http://127.0.0.1:{port}"
def req(method, path, data=None, headers={}):
    r = urllib.request.Request(base + path, data=data, method=method, headers=headers)
    return urllib.request.urlopen(r)
def push_blob(data):
    d = "sha256:" + hashlib.sha256(data).hexdigest()
    req("POST", f"/v2/bench/app/blobs/uploads/?digest={d}", data,
        {"Content-Type": "application/octet-stream"})
    return d, len(data)
layer = os.urandom(1 << 20)
ld, ls = push_blob(layer)
cd, cs = push_blob(b"{}")
m = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": ld, "size": ls}]}).encode()
req("PUT", "/v2/bench/app/manifests/v1", m,
    {"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
open(os.environ.get("LAYER_OUT", "/dev/null"), "w").write(ld)
PY
layer=$(curl -fsS "http://127.0.0.1:$port/v2/bench/app/manifests/v1" \
    -H 'Accept: application/vnd.oci.image.manifest.v1+json' | python3 -c 'import json,sys; print(json.load(sys.stdin)["layers"][0]["digest"])')

cat > "$work/pull.lua" <<LUA
local paths = {"/v2/bench/app/manifests/v1", "/v2/bench/app/blobs/$layer"}
local i = 0
request = function()
  i = i + 1
  return wrk.format("GET", paths[(i % 2) + 1], {["Accept"] = "application/vnd.oci.image.manifest.v1+json"})
end
LUA

p99() { awk '/^ +99%/ {print $2}' "$1"; }
echo "pulls without eviction ($WRK_SECONDS s)..."
wrk -t1 -c8 -d"${WRK_SECONDS}s" --latency -s "$work/pull.lua" "http://127.0.0.1:$port" > "$work/base.txt"
echo "pulls during an eviction pass of $EVICT..."
wrk -t1 -c8 -d"${WRK_SECONDS}s" --latency -s "$work/pull.lua" "http://127.0.0.1:$port" > "$work/during.txt" &
wrk_pid=$!
sleep 2
evict=$(curl -fsS -X POST -w ' %{time_total}' "http://127.0.0.1:$port/admin/evict?bytes=$EVICT")
wait "$wrk_pid"
seconds=${evict##* }
report=${evict% *}
echo "$report" | python3 -c '
import json, sys
r = json.load(sys.stdin)
print("evicted %d blobs, %d bytes; %d cached blob records before" % (r["blobs"], r["bytes"], r["before"]["cached_blobs"]))'
echo "eviction pass: $seconds s"
echo "p99 without eviction: $(p99 "$work/base.txt"); during: $(p99 "$work/during.txt")"
echo "requests: $(awk '/requests in/ {print $1}' "$work/base.txt") without, $(awk '/requests in/ {print $1}' "$work/during.txt") during"
grep -E "Non-2xx|Socket errors" "$work/during.txt" || true
echo "berth's peak resident memory: $(awk '/VmHWM/ {print $2, $3}' "/proc/${pids[0]}/status")"
