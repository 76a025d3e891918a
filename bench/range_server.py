"""A minimal read-only S3 stand-in: ranged GETs of local files, almost no CPU per request.

moto implements S3 faithfully but spends ~2-4 ms of Python per request, on
the same two cores as the reader being measured; a read of 40 granules
(~3,000 requests) then waits for moto rather than for latency. Real S3
spends none of *our* CPU. This server answers the only calls the reader
makes (``GET`` and ``HEAD`` of ``/bucket/key`` with an optional ``Range``)
in well under a millisecond, so that behind :mod:`bench.latency_proxy` the
reader meets latency alone, as it would on S3. It checks no signature.

``python -m bench.range_server ROOT`` serves ``ROOT/<bucket>/<key>`` on
loopback and prints ``PORT <n>``; it stops when its stdin closes.
"""

from __future__ import annotations

import asyncio
import email.utils
import os
import re
import sys
from pathlib import Path
from urllib.parse import unquote, urlsplit

RANGE = re.compile(r"bytes=(\d+)-(\d*)$")
NO_SUCH_KEY = (
    b'<?xml version="1.0" encoding="UTF-8"?>'
    b"<Error><Code>NoSuchKey</Code><Message>The specified key does not exist.</Message></Error>"
)


def _response(status: str, headers: dict[str, str], body: bytes) -> bytes:
    head = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


def answer(root: Path, method: str, target: str, headers: dict[str, str]) -> bytes:
    """The full HTTP response to one request."""
    # normpath, not resolve: objects may be symlinks to files elsewhere
    path = Path(os.path.normpath(root / unquote(urlsplit(target).path).lstrip("/")))
    if root not in path.parents or not path.is_file():
        return _response("404 Not Found", {"Content-Type": "application/xml"}, NO_SUCH_KEY)
    stat = path.stat()
    meta = {
        "ETag": f'"{stat.st_size:x}-{stat.st_mtime_ns:x}"',
        "Last-Modified": email.utils.formatdate(stat.st_mtime, usegmt=True),
        "Accept-Ranges": "bytes",
    }
    start, stop, status = 0, stat.st_size, "200 OK"
    match = RANGE.match(headers.get("range", ""))
    if match:
        start = int(match[1])
        stop = min(int(match[2]) + 1 if match[2] else stat.st_size, stat.st_size)
        if start >= stat.st_size:
            meta["Content-Range"] = f"bytes */{stat.st_size}"
            return _response("416 Range Not Satisfiable", meta, b"")
        meta["Content-Range"] = f"bytes {start}-{stop - 1}/{stat.st_size}"
        status = "206 Partial Content"
    if method == "HEAD":
        response = _response(status, meta, b"")
        return response.replace(b"Content-Length: 0", f"Content-Length: {stop - start}".encode())
    with path.open("rb") as f:
        f.seek(start)
        return _response(status, meta, f.read(stop - start))


async def serve(root: Path) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while request_line := await reader.readline():
                method, target, _ = request_line.decode("latin-1").split(" ", 2)
                headers = {}
                while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = line.decode("latin-1").partition(":")
                    headers[name.strip().lower()] = value.strip()
                if length := int(headers.get("content-length", 0)):
                    await reader.readexactly(length)
                writer.write(answer(root, method, target, headers))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=1024)
    print(f"PORT {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


if __name__ == "__main__":
    asyncio.run(serve(Path(sys.argv[1]).resolve()))
