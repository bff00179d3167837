#!/usr/bin/env python3
"""Holds N idle keep-alive HTTP/1.1 connections to a server (loadtests/compare.sh's
`idle` workload).

usage: idle.py HOST PORT PATH N

Opens N connections one after the other; on each sends one GET for PATH and reads the
whole response (it must be 200), so that the connection is idle and reusable. Then
prints `ready OPENED` on a line of its own and holds the connections, watching them: a
connection that becomes readable while idle was closed (or written to) by the server,
and is counted as dropped, with the time since it was opened. On SIGTERM or SIGINT it
checks every connection once more and prints one JSON line:

  {"wanted": N, "opened": ..., "failed": ..., "open_at_end": ..., "dropped": ...,
   "first_drop_s": ..., "held_s": ..., "open_s": ...}

held_s is the time from the last connection opened to the signal; open_s the time it
took to open them all. Standard library only.
"""
import json
import resource
import selectors
import signal
import socket
import sys
import time


def read_response(sock):
    """Reads one whole HTTP/1.1 response; returns its status code."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before the response header")
        buf += chunk
    head, body = buf.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while not body.endswith(b"0\r\n\r\n"):
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed in a chunked body")
            body += chunk
    else:
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed in the body")
            body += chunk
    if headers.get("connection", "").lower() == "close":
        raise ConnectionError("the server answered Connection: close")
    return status


def still_open(sock):
    """True if the server has neither closed the connection nor sent anything."""
    try:
        data = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False  # b"": closed; anything else was not asked for


def main():
    host, port, path, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n + 64:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, n + 1024), hard))
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        "Accept: application/vnd.oci.image.index.v1+json\r\n"
        "User-Agent: berth-idle/1\r\n\r\n"
    ).encode()

    conns, failed, errors = [], 0, {}
    t0 = time.monotonic()
    for _ in range(n):
        s = socket.socket()
        try:
            s.settimeout(10)
            s.connect((host, port))
            s.sendall(request)
            status = read_response(s)
            if status != 200:
                raise ConnectionError(f"status {status}")
            s.setblocking(False)
            conns.append((s, time.monotonic()))
        except (OSError, ValueError, IndexError) as e:
            failed += 1
            errors[str(e)] = errors.get(str(e), 0) + 1
            s.close()
    opened_at = time.monotonic()
    print(f"ready {len(conns)}", flush=True)
    if errors:
        print(f"errors: {errors}", file=sys.stderr, flush=True)

    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    sel = selectors.DefaultSelector()
    for s, since in conns:
        sel.register(s, selectors.EVENT_READ, since)
    dropped, first_drop = 0, None
    while not stop:
        try:
            events = sel.select(timeout=0.2)
        except InterruptedError:
            continue
        for key, _ in events:
            # Readable while idle: the server closed it (or sent something unasked).
            sel.unregister(key.fileobj)
            dropped += 1
            after = time.monotonic() - key.data
            first_drop = after if first_drop is None else min(first_drop, after)
    held = time.monotonic() - opened_at
    open_at_end = 0
    for key in list(sel.get_map().values()):
        if still_open(key.fileobj):
            open_at_end += 1
        else:
            dropped += 1
    print(json.dumps({
        "wanted": n, "opened": len(conns), "failed": failed, "open_at_end": open_at_end,
        "dropped": dropped, "first_drop_s": None if first_drop is None else round(first_drop, 3),
        "held_s": round(held, 3), "open_s": round(opened_at - t0, 3),
    }), flush=True)
    for s, _ in conns:
        s.close()


if __name__ == "__main__":
    main()
