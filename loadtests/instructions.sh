#!/usr/bin/env bash
# Instructions per cached manifest request, by tag and by digest, under callgrind: a
# figure that repeats from run to run on a shared machine, unlike CPU time.
#
#   loadtests/instructions.sh N BIN...     # e.g. 2000 target/release/berth /tmp/old-berth
#
# Starts a docker-registry with one small image, then for each berth binary: berth under
# valgrind (BERTH_LOG=info by default: the access log on), a warm-up with wrk, the
# counters zeroed, exactly N requests over 4 keep-alive connections from Python's
# http.client, and a dump. The count covers berth's whole process. A binary named
# berth-pingora-floor is run with the manifest as its body, by tag only.
# The profiles stay in $OUT_DIR (default /tmp) as cg-out.<name>.<tag|digest>.
set -euo pipefail
OUT_DIR=${OUT_DIR:-/tmp}
N=$1; shift
WORK=$(mktemp -d /tmp/berth-cg.XXXXXX); PIDS=()
trap 'for p in "${PIDS[@]}"; do kill $p 2>/dev/null||true; done; wait 2>/dev/null; rm -rf $WORK' EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
UP=$(free_port)
mkdir -p $WORK/up
cat > $WORK/up/config.yml <<Y
version: 0.1
log: {level: warn}
storage: {filesystem: {rootdirectory: $WORK/up/data}}
http: {addr: 127.0.0.1:$UP}
Y
docker-registry serve $WORK/up/config.yml 2>/dev/null & PIDS+=($!)
for i in $(seq 100); do curl -sf -o /dev/null http://127.0.0.1:$UP/v2/ && break; sleep 0.1; done
R=http://127.0.0.1:$UP/v2/library/bench
printf '{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}' > $WORK/cfg
CD=sha256:$(sha256sum $WORK/cfg|cut -d' ' -f1); CS=$(stat -c%s $WORK/cfg)
LOC=$(curl -sf -D- -o /dev/null -X POST $R/blobs/uploads/ | tr -d '\r' | awk -F': ' 'tolower($1)=="location"{print $2}')
case $LOC in http*) ;; *) LOC=http://127.0.0.1:$UP$LOC;; esac
curl -sf -X PUT -H 'Content-Type: application/octet-stream' --data-binary @$WORK/cfg "$LOC&digest=$CD" >/dev/null
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"%s","size":%d},"layers":[]}' $CD $CS > $WORK/m
MD=sha256:$(sha256sum $WORK/m|cut -d' ' -f1)
curl -sf -X PUT -H 'Content-Type: application/vnd.oci.image.manifest.v1+json' --data-binary @$WORK/m $R/manifests/v1 >/dev/null
ACC='Accept: application/vnd.oci.image.manifest.v1+json'
cat > $WORK/berth.toml <<T
[server]
drain = "1s"
[[upstream]]
namespace = "docker.io"
url = "http://127.0.0.1:$UP"
prefixes = ["library/**"]
tag_ttl = "1h"
T
for b in "$@"; do
  name=$(basename $b)
  P=$(free_port); rm -rf $WORK/store
  if [ "$name" = berth-pingora-floor ]; then args=("127.0.0.1:$P" "$WORK/m"); refs=v1
  else args=(serve --config "$WORK/berth.toml" --listen "127.0.0.1:$P" --store "$WORK/store"); refs="v1 $MD"; fi
  BERTH_LOG=${BERTH_LOG:-info} valgrind --tool=callgrind --callgrind-out-file=$WORK/cg.$name.%p --dump-instr=no \
     "$b" "${args[@]}" 2>>$WORK/berth.err & BP=$!; PIDS+=($BP)
  for i in $(seq 600); do curl -sf -o /dev/null http://127.0.0.1:$P/v2/ && break; sleep 0.2; done
  U=http://127.0.0.1:$P/v2/docker.io/library/bench/manifests
  for ref in $refs; do
    kind=tag; [ $ref = v1 ] || kind=digest
    # warm: keep-alive connections made, caches filled
    wrk -t1 -c4 -d2s -H "$ACC" $U/$ref >/dev/null
    callgrind_control -z $BP >/dev/null 2>&1
    # exactly N requests over 4 keep-alive connections
    python3 - "$P" "$ref" "$N" <<'PY'
import http.client, sys, threading
port, ref, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
def go(k):
    c = http.client.HTTPConnection("127.0.0.1", port)
    for _ in range(k):
        c.request("GET", f"/v2/docker.io/library/bench/manifests/{ref}", headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
        r = c.getresponse(); r.read(); assert r.status == 200, r.status
ts = [threading.Thread(target=go, args=(n // 4,)) for _ in range(4)]
[t.start() for t in ts]; [t.join() for t in ts]
PY
    callgrind_control -d "$kind" $BP >/dev/null 2>&1
    sleep 1
    f=$(ls -t $WORK/cg.$name.$BP.* | head -1)
    total=$(callgrind_annotate $f 2>/dev/null | awk '/PROGRAM TOTALS/{gsub(",","",$1); print $1}')
    echo "$name $kind: $((total / N)) instructions/request ($total over $N)"
    cp $f "$OUT_DIR/cg-out.$name.$kind"
  done
  kill $BP; wait $BP 2>/dev/null || true
done
