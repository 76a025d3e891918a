"""A loopback TCP proxy that delays every request by a fixed latency.

Real S3 answers a ranged GET from us-west-2 compute in ~20-40 ms; moto on
loopback answers in ~1 ms, which hides exactly the cost that concurrency is
meant to hide. This proxy restores it: bytes from the client reach the
server ``delay`` seconds after they arrive, while responses flow back at
once. An HTTP request without a body (every GET) is one burst of bytes, so
each request pays the delay once, and requests on different connections
overlap as they would against S3 (the delay is a line, not a queue).

It runs in its own process (``python -m bench.latency_proxy --upstream
http://127.0.0.1:PORT --delay-ms 30`` prints ``PORT <n>``) so that the
measured process spends no CPU on it.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
from urllib.parse import urlparse


async def _delayed(src: asyncio.StreamReader, dst: asyncio.StreamWriter, delay: float) -> None:
    """Forward ``src`` to ``dst``, each burst ``delay`` seconds after it arrived, in order."""
    loop = asyncio.get_running_loop()
    line: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def receive() -> None:
        while data := await src.read(1 << 16):
            line.put_nowait((loop.time() + delay, data))
        line.put_nowait((loop.time() + delay, b""))

    async def deliver() -> None:
        while True:
            due, data = await line.get()
            if (wait := due - loop.time()) > 0:
                await asyncio.sleep(wait)
            if not data:
                dst.close()
                return
            dst.write(data)
            await dst.drain()

    await asyncio.gather(receive(), deliver())


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    while data := await src.read(1 << 16):
        dst.write(data)
        await dst.drain()
    dst.close()


def _no_delay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def serve(upstream: str, delay: float, port: int = 0) -> None:
    target = urlparse(upstream)

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(target.hostname, target.port)
        except OSError:
            client_w.close()
            return
        _no_delay(client_w)
        _no_delay(server_w)
        try:
            await asyncio.gather(_delayed(client_r, server_w, delay), _pipe(server_r, client_w))
        except (ConnectionError, OSError, asyncio.CancelledError):
            pass  # a client or server went away, or the proxy is shutting down
        finally:
            client_w.close()
            server_w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
    print(f"PORT {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        # Serve until the parent closes our stdin (or exits).
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--upstream", required=True, help="http://host:port of the real server")
    p.add_argument("--delay-ms", type=float, default=30.0)
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args()
    asyncio.run(serve(args.upstream, args.delay_ms / 1000, args.port))


if __name__ == "__main__":
    main()
