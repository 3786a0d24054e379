"""A small HTTP forward proxy on 127.0.0.1 for egress tests: absolute-form requests and CONNECT tunnels (RFC 9110 §9.3.6).

It records the request line of every request it is asked to carry, then pipes bytes both ways until either side
closes; enough to prove the gateway's upstream traffic went through it.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from urllib.parse import urlsplit

__all__ = ["ForwardProxy"]


class ForwardProxy:
    """Use as a context manager; ``seen`` holds the request lines it carried, ``url`` is ``http://127.0.0.1:PORT``."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"

    def __enter__(self) -> ForwardProxy:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._sock.close()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with client:
            head = b""
            while b"\r\n\r\n" not in head:
                data = client.recv(65536)
                if not data:
                    return
                head += data
            line, _, rest = head.partition(b"\r\n")
            method, target, version = line.decode("latin-1").split(" ")
            self.seen.append(f"{method} {target}")
            if method == "CONNECT":
                host, _, port = target.rpartition(":")
                upstream = socket.create_connection((host, int(port)))
                client.sendall(b"HTTP/1.1 200 Connection Established\r\n\r\n")
                leftover = rest.partition(b"\r\n\r\n")[2]
            else:
                u = urlsplit(target)
                upstream = socket.create_connection((u.hostname or "", u.port or 80))
                origin = (u.path or "/") + ("?" + u.query if u.query else "")
                leftover = f"{method} {origin} {version}\r\n".encode("latin-1") + rest
            with upstream:
                if leftover:
                    upstream.sendall(leftover)
                t = threading.Thread(target=_pipe, args=(upstream, client), daemon=True)
                t.start()
                _pipe(client, upstream)
                t.join(5)


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := src.recv(65536):
            dst.sendall(data)
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)
