#!/usr/bin/env python3
"""A TCP proxy that caps every connection at a fixed rate each way: real S3's shape on a loopback server.

S3 serves one connection at about 85 MB/s (../shared/spec/test-servers.md), so what a client gets from it is
set by how many connections it keeps busy; SeaweedFS on loopback serves one connection at several hundred
MB/s and hides that. bench_push.py --conn-mbps R puts this in front of the server, so each contender's
connection count shows the way it would on S3.

  python scripts/throttle_proxy.py --port 9000 --target 127.0.0.1:8333 --mbps 20 --procs 4

Several processes accept on one port (SO_REUSEPORT), so the proxy itself is not what limits the sum.
"""

import argparse
import asyncio
import os
import signal
import socket
import sys

CHUNK = 256 * 1024
BURST_S = 0.05  # a connection may run this far ahead of its rate


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, rate: float) -> None:
    loop = asyncio.get_running_loop()
    free_at = loop.time()  # when this direction may send again at the capped rate
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
            now = loop.time()
            free_at = max(free_at, now - BURST_S) + len(data) / rate
            if free_at > now:
                await asyncio.sleep(free_at - now)
    except (ConnectionError, OSError):
        pass
    finally:
        try:
            writer.close()
        except (ConnectionError, OSError):
            pass


async def serve(port: int, target: tuple[str, int], rate: float) -> None:
    async def handle(client_r, client_w):
        try:
            server_r, server_w = await asyncio.open_connection(*target)
        except OSError:
            client_w.close()
            return
        for s in (client_w, server_w):
            s.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await asyncio.gather(pipe(client_r, server_w, rate), pipe(server_r, client_w, rate))

    server = await asyncio.start_server(handle, "127.0.0.1", port, reuse_port=True, backlog=512)
    async with server:
        await server.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--target", required=True, help="host:port of the server")
    ap.add_argument("--mbps", type=float, required=True, help="MB/s per connection, each way")
    ap.add_argument("--procs", type=int, default=max(1, (os.cpu_count() or 2) // 4))
    a = ap.parse_args()
    host, _, port = a.target.rpartition(":")
    children = []
    for _ in range(a.procs - 1):
        pid = os.fork()
        if pid == 0:
            children = []
            break
        children.append(pid)

    def stop(*_):
        for pid in children:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    asyncio.run(serve(a.port, (host, int(port)), a.mbps * 1e6))


if __name__ == "__main__":
    main()
