#!/usr/bin/env python3
"""Turns the JSON reports of one loadtests/compare.sh run into loadtests/RESULTS.md.

usage: summarize.py OUT_DIR RESULTS_MD   (environment: COMMAND, LAYER_MIB, ROUNDS,
BERTH_RSS_PEAK_KIB, as compare.sh exports them). Besides berth-load's JSON reports
(NAME.TARGET.ROUND.json) it reads resilience.extra (one JSON object) and
containerd.extra and idle.extra (JSON Lines, one object per measurement).
"""
import datetime
import glob
import json
import os
import platform
import statistics
import sys


def run_files(out, ext):
    """(name, target, round, path) of each run's file with the extension `ext`
    (compare.sh names them <name>.<target>.<round>.<ext>)."""
    for path in glob.glob(os.path.join(out, f"*.{ext}")):
        name, target, rnd, _ = os.path.basename(path).split(".")
        yield name, target, rnd, path


def load(out):
    runs = {}
    for name, target, rnd, path in run_files(out, "json"):
        with open(path) as f:
            report = json.load(f)
        report["round"] = rnd
        runs.setdefault((name, target), []).append(report)
    return runs


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def pct(report, kind, p):
    lat = (report.get("latency_us") or {}).get(kind) or {}
    v = lat.get(p)
    return None if v is None else v / 1000.0


def first_kind(report, kinds, p):
    for k in kinds:
        v = pct(report, k, p)
        if v is not None:
            return v
    return None


def fmt(v, unit=""):
    if v is None:
        return "–"
    if abs(v) >= 100:
        return f"{v:,.0f}{unit}"
    return f"{v:.2f}{unit}"


def ratio(a, b):
    return None if a is None or b in (None, 0) else a / b


def machine():
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            kib = int(f.readline().split()[1])
            mem = f", {kib / 1024 / 1024:.0f} GiB memory"
    except (OSError, ValueError):
        pass
    return f"{os.cpu_count()} cores ({model}){mem}, {platform.system()} {platform.release()}"


def load_lines(path):
    """The JSON objects of a JSON Lines file (an .extra file written one run at a time)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def load_side(out, ext):
    """The side files of the runs: {(name, target): {round: text}}."""
    side = {}
    for name, target, rnd, path in run_files(out, ext):
        with open(path) as f:
            side.setdefault((name, target), {})[rnd] = f.read()
    return side


def parse_wrk(text):
    """wrk's output: total requests, requests per second, p99 (ms), errors."""
    units = {"us": 0.001, "ms": 1.0, "s": 1000.0}
    res = {"requests": None, "requests_per_s": None, "p99_ms": None, "errors": 0}
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 3 and words[1] == "requests" and words[2] == "in":
            res["requests"] = int(words[0])
        elif line.startswith("Requests/sec:"):
            res["requests_per_s"] = float(words[1])
        elif len(words) == 2 and words[0] == "99%":
            v = words[1]
            for u in ("us", "ms", "s"):
                if v.endswith(u):
                    res["p99_ms"] = float(v[: -len(u)]) * units[u]
                    break
        elif line.startswith("Non-2xx or 3xx responses:"):
            res["errors"] += int(words[-1])
        elif line.strip().startswith("Socket errors:"):
            res["errors"] += sum(int(w.strip(",")) for w in words[3::2])
    return res


class Cpu:
    """Server CPU time per unit of work, from the .cpu side files (clock ticks)."""

    def __init__(self, out, runs):
        self.ticks = load_side(out, "cpu")
        # The whole machine's busy time during each run: server, client and kernel.
        self.machine = load_side(out, "sys")
        self.wrk = load_side(out, "wrk")
        self.runs = runs
        self.hz = float(os.environ.get("CLK_TCK", "100"))

    def cpu_s(self, name, target, rnd, machine=False):
        """CPU seconds of one run: the server's, or with `machine` the whole machine's."""
        text = (self.machine if machine else self.ticks).get((name, target), {}).get(rnd)
        return None if text is None else int(text.strip() or 0) / self.hz

    def rounds(self, name, target):
        return sorted(self.ticks.get((name, target), {}))

    def report(self, name, target, rnd):
        for r in self.runs.get((name, target), []):
            if str(r.get("round")) == rnd:
                return r
        return None

    def wrk_run(self, name, target, rnd):
        text = self.wrk.get((name, target), {}).get(rnd)
        return None if text is None else parse_wrk(text)

    def per_request_us(self, name, target, machine=False):
        """Median over rounds of CPU per request, for a wrk or a berth-load run: the
        server's, or with `machine` the whole machine's."""
        vals = []
        for rnd in self.rounds(name, target):
            cpu = self.cpu_s(name, target, rnd, machine)
            w = self.wrk_run(name, target, rnd)
            n = w["requests"] if w else ((self.report(name, target, rnd) or {}).get("units") or {}).get("ok")
            if cpu is not None and n:
                vals.append(cpu / n * 1e6)
        return median(vals)

    def per_gib_s(self, name, target, machine=False):
        vals = []
        for rnd in self.rounds(name, target):
            cpu = self.cpu_s(name, target, rnd, machine)
            b = (self.report(name, target, rnd) or {}).get("bytes")
            if cpu is not None and b:
                vals.append(cpu / (b / (1 << 30)))
        return median(vals)

    def wrk_median(self, name, target, key):
        return median((self.wrk_run(name, target, rnd) or {}).get(key) for rnd in self.wrk.get((name, target), {}))


def cpu_section(cpu, lines, m):
    """Server CPU per unit of work, and berth-load's request rates against wrk's."""
    if not cpu.rounds("wtag32", "berth"):
        return
    targets = ("berth", "peer", "nginx")
    rows = [
        ("manifests by tag, 32 conns, wrk (req/s)", lambda t: cpu.wrk_median("wtag32", t, "requests_per_s")),
        ("manifests by tag, wrk p99 (ms)", lambda t: cpu.wrk_median("wtag32", t, "p99_ms")),
        ("manifests by tag: server CPU per request (us)", lambda t: cpu.per_request_us("wtag32", t)),
        ("manifests by digest, 32 conns, wrk (req/s)", lambda t: cpu.wrk_median("wdigest32", t, "requests_per_s")),
        ("manifests by digest, wrk p99 (ms)", lambda t: cpu.wrk_median("wdigest32", t, "p99_ms")),
        ("manifests by digest: server CPU per request (us)", lambda t: cpu.per_request_us("wdigest32", t)),
        ("warm blob, 1 stream: server CPU per GiB (s)", lambda t: cpu.per_gib_s("blob1", t)),
        ("warm blob, 32 clients: server CPU per GiB (s)", lambda t: cpu.per_gib_s("blob32", t)),
        ("manifests by tag, wrk: machine CPU per request (us)", lambda t: cpu.per_request_us("wtag32", t, True)),
        ("warm blob, 1 stream: machine CPU per GiB (s)", lambda t: cpu.per_gib_s("blob1", t, True)),
        ("warm blob, 32 clients: machine CPU per GiB (s)", lambda t: cpu.per_gib_s("blob32", t, True)),
    ]
    lines.append("\n## Server CPU per unit of work (user + system time of the server's processes)\n")
    lines.append(
        "Manifest rows are from `wrk -t2 -c32 -d5s --latency`; blob rows from the berth-load "
        "runs above. Both servers write an access log line per request. The machine rows "
        "are the busy time of every core during the run (server, client and kernel, from "
        "/proc/stat): on loopback the kernel does a transfer's TCP work in whichever of "
        "sender and receiver runs it, so the server's own share moves with the timing.\n"
    )
    lines.append("| workload | berth | peer (distribution proxy) | nginx (limit) | berth/peer | berth/limit |")
    lines.append("|---|---|---|---|---|---|")
    for label, fn in rows:
        v = {t: fn(t) for t in targets}
        lines.append(
            f"| {label} | {fmt(v['berth'])} | {fmt(v['peer'])} | {fmt(v['nginx'])} | "
            f"{fmt(ratio(v['berth'], v['peer']), 'x')} | {fmt(ratio(v['berth'], v['nginx']), 'x')} |"
        )
    if cpu.rounds("wtag32", "floor"):
        lines.append("\n### Pingora's own cost: berth-pingora-floor beside nginx and berth, manifests by tag, wrk\n")
        lines.append(
            "`berth-pingora-floor` is a Pingora server that answers every request with the "
            "index and berth's manifest headers, on berth's listener settings: no routing, "
            "cache, access log or metrics.\n"
        )
        lines.append("| | nginx | Pingora floor | berth | floor/nginx | berth/floor |")
        lines.append("|---|---|---|---|---|---|")
        for label, key in (("req/s", "requests_per_s"), ("p99 (ms)", "p99_ms")):
            n, f, b = (cpu.wrk_median("wtag32", t, key) for t in ("nginx", "floor", "berth"))
            lines.append(f"| {label} | {fmt(n)} | {fmt(f)} | {fmt(b)} | {fmt(ratio(f, n), 'x')} | {fmt(ratio(b, f), 'x')} |")
        n, f, b = (cpu.per_request_us("wtag32", t) for t in ("nginx", "floor", "berth"))
        lines.append(
            f"| server CPU per request (us) | {fmt(n)} | {fmt(f)} | {fmt(b)} | "
            f"{fmt(ratio(f, n), 'x')} | {fmt(ratio(b, f), 'x')} |"
        )
    lines.append("\n### The harness against wrk: manifests, 32 connections, requests per second\n")
    lines.append("| target | by tag: berth-load | by tag: wrk | berth-load/wrk | by digest: berth-load | by digest: wrk | berth-load/wrk |")
    lines.append("|---|---|---|---|---|---|---|")
    for t in targets:
        bt = m("tag32", t, lambda r: r.get("requests_per_s"))
        wt = cpu.wrk_median("wtag32", t, "requests_per_s")
        bd = m("digest32", t, lambda r: r.get("requests_per_s"))
        wd = cpu.wrk_median("wdigest32", t, "requests_per_s")
        lines.append(
            f"| {t} | {fmt(bt)} | {fmt(wt)} | {fmt(ratio(bt, wt), 'x')} | "
            f"{fmt(bd)} | {fmt(wd)} | {fmt(ratio(bd, wd), 'x')} |"
        )


def tls_section(cpu, lines, m):
    """Warm serving over HTTPS: berth (rustls) against nginx (OpenSSL)."""
    if not cpu.rounds("tblob1", "berth-tls"):
        return
    gib = lambda r: r.get("bytes_per_s", 0) / (1 << 30)
    rows = [
        ("warm blob, 1 stream (GiB/s)", lambda t: m("tblob1", t, gib)),
        ("warm blob, 32 clients (GiB/s)", lambda t: m("tblob32", t, gib)),
        ("warm blob, 1 stream: server CPU per GiB (s)", lambda t: cpu.per_gib_s("tblob1", t)),
        ("warm blob, 32 clients: server CPU per GiB (s)", lambda t: cpu.per_gib_s("tblob32", t)),
        ("manifests by tag, 32 conns, wrk (req/s)", lambda t: cpu.wrk_median("wttag32", t, "requests_per_s")),
        ("manifests by tag: server CPU per request (us)", lambda t: cpu.per_request_us("wttag32", t)),
        ("manifests by digest, 32 conns, wrk (req/s)", lambda t: cpu.wrk_median("wtdigest32", t, "requests_per_s")),
        ("manifests by digest: server CPU per request (us)", lambda t: cpu.per_request_us("wtdigest32", t)),
    ]
    lines.append("\n## HTTPS: warm serving, one certificate (ECDSA P-256), TLS 1.3\n")
    lines.append("| workload | berth (rustls) | nginx (OpenSSL) | berth/nginx |")
    lines.append("|---|---|---|---|")
    for label, fn in rows:
        b, n = fn("berth-tls"), fn("nginx-tls")
        lines.append(f"| {label} | {fmt(b)} | {fmt(n)} | {fmt(ratio(b, n), 'x')} |")


def containerd_section(out, lines):
    recs = load_lines(os.path.join(out, "containerd.extra"))
    if not recs:
        return
    ways = ("direct", "cold", "warm")
    lines.append("\n## containerd: whole pulls of the image (linux/amd64) by a real containerd\n")
    lines.append(
        "Debian's containerd 1.6, each pull into an empty content store (a fresh containerd "
        "root). *fetch* is `ctr content fetch` (every blob into the content store, verified); "
        "*pull* is `ctr images pull --snapshotter native` (the same, then the layers "
        "unpacked); both move every byte through the ctr process and over gRPC into the "
        "daemon. *CRI* is the CRI image service's `PullImage`, the call the kubelet makes: the "
        "daemon fetches and unpacks (native snapshotter) by itself. *direct*: from the "
        "upstream docker-registry (`--plain-http`, or a `hosts.toml` saying `http://`); "
        "*berth cold*: through berth (a `hosts.toml` mirror for docker.io) with an empty "
        "store; *berth warm*: through berth with the image cached. Wall-clock time of `ctr` "
        "or of the `PullImage` call, "
        "median over the rounds. Targets (issue 13): cold/direct ≤ 1.1x, warm/direct < 1.0x. "
        "*loopback*: the upstream on loopback, the best case for a direct pull; *link*: the "
        "upstream behind `loadtests/slowlink.py`, which delays and paces each connection as "
        "a network between a node and a registry does (direct pulls and berth's fills both "
        "cross it).\n"
    )
    lines.append("| upstream | client | direct (ms) | berth cold (ms) | berth warm (ms) | cold/direct | warm/direct "
                 "| upstream requests: direct / cold / warm | failed runs |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    links = []
    for r in recs:
        if r.get("link", "loopback") not in links:
            links.append(r.get("link", "loopback"))
    for link, mode, label in (
        (link, mode, label)
        for link in links
        for mode, label in (
            ("fetch", "fetch (`ctr content fetch`)"),
            ("pull", "pull incl. unpack (`ctr images pull`)"),
            ("cri", "pull incl. unpack (CRI `PullImage`, as the kubelet)"),
        )
    ):
        sel = {
            w: [r for r in recs if r.get("link", "loopback") == link and r["mode"] == mode and r["way"] == w]
            for w in ways
        }
        ms = {w: median(r["ms"] for r in sel[w]) for w in ways}
        up = {w: median(r["upstream_requests"] for r in sel[w]) for w in ways}
        failed = sum(1 for w in ways for r in sel[w] if r["ms"] is None)
        lines.append(
            f"| {link} | {label} | {fmt(ms['direct'])} | {fmt(ms['cold'])} | {fmt(ms['warm'])} | "
            f"{fmt(ratio(ms['cold'], ms['direct']), 'x')} | {fmt(ratio(ms['warm'], ms['direct']), 'x')} | "
            f"{' / '.join(fmt(up[w]) for w in ways)} | {failed} |"
        )


def idle_section(out, lines, m):
    recs = load_lines(os.path.join(out, "idle.extra"))
    if not recs:
        return
    conns = recs[0]["conns"]
    lines.append(f"\n## Many connections: {conns:,} idle keep-alive connections and 32 busy ones\n")
    lines.append(
        f"`loadtests/idle.py` opens {conns:,} connections, each GETs the manifest by tag once "
        "and then stays open and idle; with them open, `berth-load manifests --concurrency 32 "
        "--duration 5s` GETs the manifest by tag. Memory is the server's (for nginx summed "
        "over its master and workers), from /proc/PID/status: before the idle connections, "
        "with them open, and the peak during the busy run (sampled every 100 ms). Medians "
        "over the rounds.\n"
    )
    lines.append("| target | req/s (32 busy conns) | p99 (ms) | failed requests | idle conns open at the end "
                 "| held (s) | VmRSS before / idle / peak (MiB) | RssAnon before / idle / peak (MiB) "
                 "| RssAnon per idle conn (KiB) |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    mib = lambda v: None if v is None else v / 1024
    for t in ("berth", "nginx"):
        sel = [r for r in recs if r["target"] == t]
        if not sel:
            continue
        med = lambda k: median(r.get(k) for r in sel)
        held = [r["held"] or {} for r in sel]
        open_end = median(h.get("open_at_end") for h in held)
        opened = median(h.get("opened") for h in held)
        held_s = median(h.get("held_s") for h in held)
        per_conn = median(
            (r["anon_idle_kib"] - r["anon_before_kib"]) / r["conns"] for r in sel if r["conns"]
        )
        rps = m("idle32", t, lambda r: r.get("requests_per_s"))
        p99 = m("idle32", t, lambda r: first_kind(r, ["tag_manifest", "manifest"], "p99"))
        failed = m("idle32", t, lambda r: sum((r.get("errors") or {}).values()))
        open_txt = "–" if open_end is None else f"{open_end:,.0f} of {opened:,.0f}"
        lines.append(
            f"| {t} | {fmt(rps)} | {fmt(p99)} | {fmt(failed)} | {open_txt} | {fmt(held_s)} | "
            f"{fmt(mib(med('rss_before_kib')))} / {fmt(mib(med('rss_idle_kib')))} / {fmt(mib(med('rss_peak_kib')))} | "
            f"{fmt(mib(med('anon_before_kib')))} / {fmt(mib(med('anon_idle_kib')))} / {fmt(mib(med('anon_peak_kib')))} | "
            f"{fmt(per_conn)} |"
        )


def main():
    out, results = sys.argv[1], sys.argv[2]
    runs = load(out)
    layer_mib = float(os.environ.get("LAYER_MIB", "200"))

    def m(name, target, fn):
        return median(fn(r) for r in runs.get((name, target), []))

    gib = lambda r: r.get("bytes_per_s", 0) / (1 << 30)
    table = [
        ("warm blob, 1 stream (GiB/s)", "blob1", gib),
        ("warm blob, 32 clients (GiB/s)", "blob32", gib),
        ("warm blob, 32 clients, client verifying sha256 (GiB/s)", "blob32v", gib),
        ("warm blob TTFB p50, 1 stream (ms)", "blob1", lambda r: pct(r, "ttfb", "p50")),
        ("warm blob TTFB p99, 32 clients (ms)", "blob32", lambda r: pct(r, "ttfb", "p99")),
        ("manifests by tag, 32 conns (req/s)", "tag32", lambda r: r.get("requests_per_s")),
        ("manifests by tag p99 (ms)", "tag32", lambda r: first_kind(r, ["tag_manifest", "manifest"], "p99")),
        ("manifests by digest, 32 conns (req/s)", "digest32", lambda r: r.get("requests_per_s")),
        ("manifests by digest p99 (ms)", "digest32", lambda r: first_kind(r, ["manifest", "tag_manifest"], "p99")),
    ]
    rows = []
    for label, workload, fn in table:
        vals = {t: m(workload, t, fn) for t in ("berth", "peer", "nginx")}
        b = vals["berth"]
        rows.append((label, vals, ratio(b, vals["peer"]), ratio(b, vals["nginx"])))

    cold_rows = []
    for n in (50, 100):
        for t in ("berth", "peer"):
            cold = m(f"cold{n}", t, lambda r: (r.get("cold") or {}).get("all_finished_ms"))
            warm = m(f"warm{n}", t, lambda r: (r.get("cold") or {}).get("all_finished_ms"))
            up_bytes = m(f"cold{n}", t, lambda r: (r.get("upstream") or {}).get("bytes"))
            up_reqs = m(f"cold{n}", t, lambda r: (r.get("upstream") or {}).get("requests"))
            fetches = None if up_bytes is None else up_bytes / (layer_mib * 1024 * 1024)
            failed = m(f"cold{n}", t, lambda r: (r.get("units") or {}).get("failed"))
            cold_rows.append((n, t, cold, warm, ratio(cold, warm), up_reqs, fetches, failed))

    pull_rows = []
    for t in ("berth", "peer"):
        pull_rows.append((
            t,
            m("pull50", t, lambda r: r.get("pulls_per_s")),
            m("pull50", t, lambda r: r.get("mib_per_s")),
            m("pull50", t, lambda r: (r.get("upstream") or {}).get("requests")),
        ))

    rss = os.environ.get("BERTH_RSS_PEAK_KIB")
    rss_mib = int(rss) / 1024 if rss and rss.isdigit() else None

    lines = []
    lines.append("# berth benchmark results\n")
    lines.append(
        "Produced by `loadtests/compare.sh` (see the script for the set-up: the upstream is "
        "Debian's docker-registry; the peer a second docker-registry in proxy mode; the limit "
        "nginx serving the same bytes as static files with sendfile). All on loopback; HTTPS only "
        "in its own section. Both berth and nginx write an access log line per request. "
        "Figures are medians over the rounds; ratios are berth/peer and berth/nginx. "
        "Blob throughput is measured with a client that counts the bytes without hashing "
        "them (`--no-verify`), except in the row that says it verifies.\n"
    )
    lines.append(f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}")
    lines.append(f"- machine: {machine()}")
    lines.append(f"- command: `{os.environ.get('COMMAND', 'loadtests/compare.sh')}`")
    lines.append(f"- layer: {layer_mib:.0f} MiB, rounds: {os.environ.get('ROUNDS', '?')}\n")
    lines.append("## Warm serving\n")
    lines.append("| workload | berth | peer (distribution proxy) | nginx (limit) | berth/peer | berth/limit |")
    lines.append("|---|---|---|---|---|---|")
    for label, vals, rp, rl in rows:
        lines.append(
            f"| {label} | {fmt(vals.get('berth'))} | {fmt(vals.get('peer'))} | "
            f"{fmt(vals.get('nginx'))} | {fmt(rp, 'x')} | {fmt(rl, 'x')} |"
        )
    lines.append("\n## Cold start: N clients at once on one uncached layer\n")
    lines.append("| clients | target | all done cold (ms) | all done warm (ms) | cold/warm | upstream requests | upstream fetches of the layer | failed clients |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for n, t, cold, warm, cw, reqs, fetches, failed in cold_rows:
        lines.append(
            f"| {n} | {t} | {fmt(cold)} | {fmt(warm)} | {fmt(cw, 'x')} | {fmt(reqs)} | {fmt(fetches)} | {fmt(failed)} |"
        )
    lines.append("\n## Fleet pull: 50 clients pulling the image (index, manifest, config, layers), warm\n")
    lines.append("| target | pulls/s | MiB/s | upstream requests during the run |")
    lines.append("|---|---|---|---|")
    for t, pps, mibs, reqs in pull_rows:
        lines.append(f"| {t} | {fmt(pps)} | {fmt(mibs)} | {fmt(reqs)} |")
    res_path = os.path.join(out, "resilience.extra")
    if os.path.exists(res_path):
        with open(res_path) as f:
            res = json.load(f)
        lines.append("\n## Resilience (berth, one measurement each)\n")
        lines.append("| what | figure | bound |")
        lines.append("|---|---|---|")
        lines.append(f"| restart with 1,000,000 indexed blobs: start to serving `/v2/` | {res['restart_1m_blobs_ms']} ms | 2,000 ms |")
        lines.append(f"| SIGTERM to exit, nothing in flight | {res['sigterm_idle_ms']} ms | drain {res['drain_ms']} ms |")
        if "sigterm_fits_ms" in res:
            whole = "whole" if res["sigterm_fits_bytes"] == res["layer_bytes"] else "cut"
            lines.append(
                f"| SIGTERM to exit, a pull of the layer in flight at 100 MiB/s (it got the {whole} layer) "
                f"| {res['sigterm_fits_ms']:,} ms | drain {res['drain_ms']:,} ms |"
            )
            got = res["sigterm_cut_bytes"] / res["layer_bytes"] * 100
            lines.append(
                f"| SIGTERM to exit, a pull in flight at 20 MiB/s, too slow for the drain (it got {got:.0f}%) "
                f"| {res['sigterm_cut_ms']:,} ms | drain {res['drain_ms']:,} ms + 1 s |"
            )
        lines.append(
            f"| cached tag, upstream hung (accepts, never answers): status {res['hung_status']}, "
            f"Warning 110 {'present' if res['hung_warning'] else 'MISSING'} | {res['hung_ms']} ms | "
            f"read timeout {res['read_timeout_ms']} ms + connect timeout 1,000 ms |"
        )
        lines.append(f"| the same tag again, right after | {res['hung_again_ms']} ms | (served stale at once) |")
    cpu = Cpu(out, runs)
    cpu_section(cpu, lines, m)
    tls_section(cpu, lines, m)
    containerd_section(out, lines)
    idle_section(out, lines, m)
    lines.append("\n## Memory\n")
    lines.append(
        f"- berth peak anonymous resident memory (RssAnon, sampled every 100 ms over the whole run): "
        f"{fmt(rss_mib, ' MiB')}"
    )
    body = "\n".join(lines) + "\n"

    # Keep any hand-written notes below the marker.
    notes = ""
    if os.path.exists(results):
        with open(results) as f:
            old = f.read()
        marker = "<!-- notes -->"
        if marker in old:
            notes = old[old.index(marker):]
    if not notes:
        notes = "<!-- notes -->\n## Notes\n\n(none yet)\n"
    with open(results, "w") as f:
        f.write(body + "\n" + notes)


if __name__ == "__main__":
    main()
