"""GET /metrics on the event loop (no thread: the daemon forks supervisors).

Just enough HTTP/1.1 for Prometheus: one request per connection, request
head at most 8 KiB within 5 s, `GET /metrics` (or `/`) answered with the
text exposition format; anything else 404/405. prometheus_client renders.
"""
from __future__ import annotations

import asyncio

HEAD_LIMIT = 8192
HEAD_TIMEOUT_S = 5.0


class MetricsServer:
    def __init__(self, daemon):
        self.daemon = daemon
        self.server = None
        self.port = None

    async def start(self, address: str) -> None:
        from agent.config import split_host_port

        host, port = split_host_port(address)
        self.server = await asyncio.start_server(self._serve, host=host, port=port,
                                                 limit=HEAD_LIMIT, reuse_address=True)
        self.port = self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT_S)
            request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = request_line.split()
            if len(parts) != 3:
                await self._reply(writer, 400, b"bad request\n")
                return
            method, target = parts[0], parts[1].split("?", 1)[0]
            if method not in ("GET", "HEAD"):
                await self._reply(writer, 405, b"method not allowed\n", extra=b"Allow: GET, HEAD\r\n")
                return
            if target not in ("/metrics", "/"):
                await self._reply(writer, 404, b"not found; try /metrics\n")
                return
            body, content_type = self.daemon.metrics.render()
            await self._reply(writer, 200, body if method == "GET" else b"", content_type,
                              length=len(body))
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError, ValueError):
            pass
        finally:
            writer.close()

    @staticmethod
    async def _reply(writer, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8",
                     extra: bytes = b"", length=None) -> None:
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}[status]
        head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body) if length is None else length}\r\nConnection: close\r\n").encode()
        writer.write(head + extra + b"\r\n" + body)
        try:
            await asyncio.wait_for(writer.drain(), HEAD_TIMEOUT_S)
        except asyncio.TimeoutError:
            pass
