"""A raw-socket upstream for the gateway's security tests: records exactly the bytes it receives, answers from a script.

Not the aiohttp fake: this one parses nothing more than it must (request heads and Content-Length bodies, RFC 9112
§2–§6), so it sees a smuggled second request, a CR/LF in a target or a header exactly as it crossed the wire, and it
can answer with what a broken or hostile upstream sends: 1xx interim heads, more bytes than its Content-Length,
bad framing.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["RawRequest", "RawUpstream", "json_answer"]


@dataclass
class RawRequest:
    """One request as received: the request line's parts, the header lines, the body, and its connection."""

    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes
    connection: int
    raw_head: bytes

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None


Answer = Callable[[RawRequest], list[bytes | float]]
"""The script: what to send back for a request, as a list of writes sent in order; a float is a pause in seconds."""


def json_answer(req: RawRequest, extra: bytes = b"", interim: bytes = b"") -> list[bytes | float]:
    """A chat completion whose content echoes the request body's ``user`` field, so callers can check it is theirs."""
    try:
        who = json.loads(req.body).get("user", "")
    except ValueError:
        who = ""
    body = json.dumps(
        {
            "id": "chatcmpl-raw",
            "object": "chat.completion",
            "model": "gpt-4o",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": f"answer for {who}"}}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
        }
    ).encode()
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
    return [interim + head + body + extra]


@dataclass
class RawUpstream:
    """A threaded TCP server on 127.0.0.1; use as a context manager.

    Args:
        answer: the script (default: `json_answer`).
    """

    answer: Answer = json_answer
    received: list[bytearray] = field(default_factory=list)  # every byte, per connection
    requests: list[RawRequest] = field(default_factory=list)
    garbage: list[bytes] = field(default_factory=list)  # bytes that did not parse as a request
    _sock: socket.socket | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _conns: list[socket.socket] = field(default_factory=list)

    @property
    def url(self) -> str:
        assert self._sock is not None
        return f"http://127.0.0.1:{self._sock.getsockname()[1]}"

    def __enter__(self) -> RawUpstream:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        s.listen(128)
        self._sock = s
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._sock is not None:
            self._sock.close()
        with self._lock:
            for c in self._conns:
                with contextlib.suppress(OSError):
                    c.close()

    def _accept(self) -> None:
        assert self._sock is not None
        while True:
            try:
                c, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                n = len(self.received)
                self.received.append(bytearray())
                self._conns.append(c)
            threading.Thread(target=self._serve, args=(c, n), daemon=True).start()

    def _serve(self, c: socket.socket, n: int) -> None:
        buf = b""
        try:
            while True:
                data = c.recv(65536)
                if not data:
                    return
                with self._lock:
                    self.received[n] += data
                buf += data
                while True:
                    req, buf = self._parse(buf, n)
                    if req is None:
                        break
                    with self._lock:
                        self.requests.append(req)
                    for chunk in self.answer(req):
                        if isinstance(chunk, float):
                            time.sleep(chunk)
                        else:
                            c.sendall(chunk)
        except OSError:
            return
        finally:
            if buf:
                with self._lock:
                    self.garbage.append(buf)
            c.close()

    @staticmethod
    def _parse(buf: bytes, n: int) -> tuple[RawRequest | None, bytes]:
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return None, buf
        head = buf[:end]
        lines = head.split(b"\r\n")
        # A space smuggled into the target stays visible in it: split off the method and the version only.
        method, _, rest = lines[0].decode("latin-1").partition(" ")
        target, _, version = rest.rpartition(" ")
        headers = []
        length = 0
        for line in lines[1:]:
            k, _, v = line.decode("latin-1").partition(":")
            headers.append((k.strip(), v.strip()))
            if k.strip().lower() == "content-length":
                length = int(v.strip())
        if len(buf) < end + 4 + length:
            return None, buf
        body = buf[end + 4 : end + 4 + length]
        return RawRequest(method, target, version, headers, body, n, head), buf[end + 4 + length :]
