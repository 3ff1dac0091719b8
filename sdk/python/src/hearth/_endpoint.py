"""Reaching a microVM's endpoint from Python: tokens that renew themselves,
and a transport that connects ``*.localhost`` hosts to 127.0.0.1.

A microVM's endpoint is ``<microvm-id>.localhost:PORT`` on a local server.
curl and browsers resolve ``*.localhost`` to the loopback address; Python's
resolver (glibc) does not, so the transport connects to 127.0.0.1 and keeps
the endpoint in the ``Host`` header, which is how the proxy routes.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Callable, Optional, Tuple
from urllib.parse import urlsplit, urlunsplit

import requests
import requests.adapters

#: Minutes a minted token lives.
TOKEN_MINUTES = 60
#: A token this close to its expiry is replaced before use.
RENEW_BEFORE = 120.0


class TokenSource:
    """A token minted on first use and again shortly before it expires.
    ``mint(minutes)`` returns the ``X-aws-proxy-auth`` value."""

    def __init__(self, mint: Callable[[int], str]):
        self._mint = mint
        self._lock = threading.Lock()
        self._token: Optional[str] = None
        self._expires = 0.0

    def __call__(self) -> str:
        with self._lock:
            now = time.monotonic()
            if self._token is None or now > self._expires - RENEW_BEFORE:
                self._token = self._mint(TOKEN_MINUTES)
                self._expires = now + TOKEN_MINUTES * 60
            return self._token


def loopback_target(url: str) -> Tuple[str, Optional[str]]:
    """For a URL on a ``*.localhost`` host: the same URL on 127.0.0.1 and the
    Host header to send; other URLs unchanged (and no Host)."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if host != "localhost" and not host.endswith(".localhost"):
        return url, None
    netloc = "127.0.0.1" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment)), parts.netloc


class LoopbackAdapter(requests.adapters.HTTPAdapter):
    """Sends requests for ``*.localhost`` hosts to 127.0.0.1 with the
    original host in ``Host``."""

    def send(self, request, **kwargs):
        url, host = loopback_target(request.url)
        if host is not None:
            request.url = url
            request.headers["Host"] = host
        return super().send(request, **kwargs)


def new_session() -> requests.Session:
    session = requests.Session()
    adapter = LoopbackAdapter()
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


class EndpointSession(requests.Session):
    """A ``requests.Session`` for one port of a microVM's endpoint.

    Relative URLs (``session.get("/path")``) go to the endpoint; every request
    to the endpoint's host carries a token for the port (``X-aws-proxy-auth``,
    renewed before it expires) and the port (``X-aws-proxy-port``). Requests
    to other hosts get neither. Works where ``*.localhost`` does not resolve.
    """

    def __init__(self, base_url: str, port: int, token: Callable[[], str]):
        super().__init__()
        self.base_url = base_url.rstrip("/")
        self.port = port
        self._token = token
        self._host = urlsplit(self.base_url).netloc.lower()
        adapter = LoopbackAdapter()
        self.mount("http://", adapter)
        self.mount("https://", adapter)

    def request(self, method, url, *args, **kwargs):
        if url.startswith("/"):
            url = self.base_url + url
        return super().request(method, url, *args, **kwargs)

    def prepare_request(self, request):
        prepared = super().prepare_request(request)
        if urlsplit(prepared.url).netloc.lower() == self._host:
            prepared.headers.setdefault("X-aws-proxy-auth", self._token())
            prepared.headers.setdefault("X-aws-proxy-port", str(self.port))
        return prepared


def abort(response: requests.Response) -> None:
    """Closes a streaming response at once, waking a thread blocked reading
    it: shuts the socket down (closing the file alone does not interrupt a
    blocked read), so the server sees the client go away."""
    connection = getattr(response.raw, "connection", None) or getattr(response.raw, "_connection", None)
    sock = getattr(connection, "sock", None)
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    response.close()
