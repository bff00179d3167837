#!/usr/bin/env python3
"""A TCP relay that makes a loopback upstream look like a remote one: each direction of
each connection is delayed by half the round-trip time and paced to a bandwidth.

usage: slowlink.py LISTEN_PORT TARGET_PORT RTT_MS MIB_PER_S

Prints "ready" once it listens. Stdlib only. Used by compare.sh's containerd workload:
pulling directly from a registry on loopback is the best case a direct pull can have,
and no cache can beat it; a node pulls from a registry across a network.
"""
import asyncio
import sys
import time

CHUNK = 64 << 10


async def pipe(reader, writer, delay, rate):
    """Copies reader to writer; every chunk arrives `delay` s after it was read, and the
    chunks leave no faster than `rate` bytes per second."""
    queue = asyncio.Queue()

    async def deliver():
        next_free = time.monotonic()
        while True:
            at, data = await queue.get()
            if data is None:
                break
            now = time.monotonic()
            start = max(at, next_free)
            next_free = start + len(data) / rate
            if next_free > now:
                await asyncio.sleep(next_free - now)
            writer.write(data)
            await writer.drain()
        writer.close()

    task = asyncio.create_task(deliver())
    try:
        while True:
            data = await reader.read(CHUNK)
            queue.put_nowait((time.monotonic() + delay, data or None))
            if not data:
                break
            # Do not read far ahead of what the link has delivered.
            while queue.qsize() > 64:
                await asyncio.sleep(0.001)
    except (ConnectionError, OSError):
        queue.put_nowait((0, None))
    try:
        await task
    except (ConnectionError, OSError):
        pass


async def main():
    listen, target, rtt_ms, mib = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
    delay, rate = rtt_ms / 2000.0, mib * (1 << 20)

    async def handle(client_r, client_w):
        try:
            # Connecting costs one round trip, as it would.
            await asyncio.sleep(2 * delay)
            up_r, up_w = await asyncio.open_connection("127.0.0.1", target)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(pipe(client_r, up_w, delay, rate), pipe(up_r, client_w, delay, rate))

    server = await asyncio.start_server(handle, "127.0.0.1", listen)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
