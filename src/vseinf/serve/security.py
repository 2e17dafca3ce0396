"""Keep a served photo index private to the machine (or the hosts the user names).

DNS rebinding: a web page the user visits at ``http://evil.example`` can make its own name resolve
to 127.0.0.1 and then read ``http://evil.example:8000/api/search?q=…`` as same-origin — the
browser sends ``Host: evil.example:8000``. Answering only requests whose Host header names this
server closes that door: :class:`HostPolicy` decides which names those are, and
:class:`SecurityMiddleware` refuses the others (400) and adds the headers that keep the pages from
being framed by other sites, sniffed as another content type, or made to load foreign scripts.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import Iterable

# Names every browser resolves to this machine itself (``*.localhost`` included, RFC 6761):
# no outside DNS answers for them, so they cannot be rebound.
LOCAL_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
# Bind addresses that listen on every interface.
WILDCARD_BINDS = frozenset({"", "0.0.0.0", "::"})

# The pages are static files (no inline scripts or styles); the upload preview is a blob: URL.
PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
            "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
            "frame-ancestors 'none'")
# FastAPI's Swagger page (only with --api-docs): its script and style come from a CDN, and it
# starts itself with an inline script.
DOCS_CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
            "style-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
            "img-src 'self' data: https://fastapi.tiangolo.com; connect-src 'self'; object-src 'none'; "
            "base-uri 'none'; frame-ancestors 'none'")


def host_name(header: str | None) -> str | None:
    """The host of a Host header, lower-case, without port or trailing dot; None if malformed.

    ``"LocalHost:8000"`` → ``"localhost"``, ``"[::1]:8000"`` → ``"::1"``.
    """
    if header is None:
        return None
    value = header.strip().lower()
    if value.startswith("["):  # IPv6 literal: [addr] or [addr]:port
        end = value.find("]")
        if end < 0 or (value[end + 1:] and not value[end + 1:].startswith(":")):
            return None
        name = value[1:end]
        port = value[end + 2:] if value[end + 1:] else ""
    else:
        name, _, port = value.partition(":")
    if port and not port.isdigit():
        return None
    name = name.rstrip(".")
    if not name or any(c.isspace() or c in "/\\@?#" for c in name):
        return None
    return name


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class HostPolicy:
    """Which Host headers the server answers.

    By default: the localhost names and the address the server is bound to. A server bound to
    every interface (``0.0.0.0`` or ``::``) also answers any IP address (a page can reach it only
    at the address itself, which is not a name an attacker's DNS can rebind) and this machine's
    host names. ``allow`` adds names (``"photos.example"``; ``".example"`` for every subdomain of
    example; ``"*"`` for every host, e.g. behind a reverse proxy that checks Host itself).

    Args:
        bind: the address the server listens on (``--host``).
        allow: more host names to answer (``--allow-host``).
    """

    def __init__(self, bind: str = "127.0.0.1", allow: Iterable[str] = ()):
        bind = (bind or "").strip().lower().strip("[]")
        self.any_host = False
        self.names = set(LOCAL_NAMES)
        self.suffixes = {".localhost"}
        self.any_ip = bind in WILDCARD_BINDS
        if not self.any_ip:
            self.names.add(bind.rstrip("."))
        else:
            for name in {socket.gethostname(), socket.getfqdn()}:
                if name:
                    self.names.add(name.lower().rstrip("."))
        for entry in allow:
            entry = entry.strip().lower()
            if entry == "*":
                self.any_host = True
            elif entry.startswith("."):
                self.suffixes.add(entry.rstrip("."))
            elif entry:
                name = host_name(entry)
                if name is None:
                    raise ValueError(f"--allow-host: {entry!r} is not a host name")
                self.names.add(name)

    def allows(self, header: str | None) -> bool:
        """Whether a request with this Host header is answered."""
        if self.any_host:
            return True
        name = host_name(header)
        if name is None:
            return False
        if name in self.names or any(name.endswith(s) for s in self.suffixes):
            return True
        return self.any_ip and _is_ip(name)

    def describe(self) -> str:
        if self.any_host:
            return "any host"
        names = sorted(self.names) + [f"*{s}" for s in sorted(self.suffixes)]
        return ", ".join(names) + (", any IP address" if self.any_ip else "")


class SecurityMiddleware:
    """Refuse requests for hosts the policy does not allow; add security headers to every answer.

    Headers: ``Content-Security-Policy`` (``csp``; ``docs_csp`` on ``docs_path``), which also
    forbids framing (``frame-ancestors 'none'``, and ``X-Frame-Options: DENY`` for old browsers);
    ``X-Content-Type-Options: nosniff``; ``Referrer-Policy: no-referrer`` (queries are in URLs);
    ``Cross-Origin-Resource-Policy: same-origin`` (other sites cannot embed the thumbnails).

    Args:
        app: the ASGI app to wrap.
        policy: the hosts to answer.
        csp: the Content-Security-Policy of every answer.
        docs_path: the API docs page, which gets ``docs_csp`` instead (None: no docs page).
        docs_csp: its policy.
    """

    def __init__(self, app, policy: HostPolicy, csp: str = PAGE_CSP, docs_path: str | None = None,
                 docs_csp: str = DOCS_CSP):
        self.app = app
        self.policy = policy
        self.csp = csp
        self.docs_path = docs_path
        self.docs_csp = docs_csp

    def _headers(self, path: str) -> list[tuple[bytes, bytes]]:
        csp = self.docs_csp if self.docs_path is not None and path == self.docs_path else self.csp
        return [(b"content-security-policy", csp.encode()), (b"x-content-type-options", b"nosniff"),
                (b"x-frame-options", b"DENY"), (b"referrer-policy", b"no-referrer"),
                (b"cross-origin-resource-policy", b"same-origin")]

    async def _refuse(self, scope, send, host: str | None) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        shown = "no Host header" if host is None else f"host {host[:100]!r}"
        body = json.dumps({"detail": f"{shown} is not served here (this server answers {self.policy.describe()}; "
                                     "start it with --allow-host NAME to add a name)"}).encode()
        await send({"type": "http.response.start", "status": 400,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()), *self._headers("")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        hosts = [v for k, v in scope.get("headers", []) if k == b"host"]
        host = hosts[0].decode("latin-1") if len(hosts) == 1 else None
        if len(hosts) > 1 or not self.policy.allows(host):
            return await self._refuse(scope, send, host)
        extra = self._headers(scope.get("path", ""))
        names = {k for k, _ in extra}

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() not in names]
                message = {**message, "headers": headers + extra}
            await send(message)

        await self.app(scope, receive, send_with_headers)
