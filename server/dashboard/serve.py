"""Serve the dashboard with the standard library: read-only, localhost unless exposed with a token.

``GET /`` is the page, ``GET /status.json`` the same view as JSON; any other method
is refused. By default the server binds 127.0.0.1. Binding another address needs a
token (``--token``, or ``MEDMETA_DASHBOARD_TOKEN``): every request must then carry it,
as ``?token=...`` once (the page sets an HttpOnly cookie and drops it from the URL),
as that cookie, or as ``Authorization: Bearer ...``. Tokens are compared in constant
time. The view is rebuilt from the state directory on every request, so the page is
always current and the server holds no state of its own.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import re
from collections.abc import Callable
from http import HTTPStatus
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from medmeta_common.errors import ConfigError
from server.dashboard.page import render
from server.run_view import read_run

log = logging.getLogger("medmeta.dashboard")

COOKIE = "medmeta_dashboard"
MIN_TOKEN_LENGTH = 16


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (``localhost`` counts)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, token: str | None) -> None:
    """Refuse to listen beyond this machine without a token long enough to resist guessing."""
    if token is not None and not re.fullmatch(r"[A-Za-z0-9._~-]+", token):
        raise ConfigError(source="--token", field="token", expected="letters, digits and "
                          "._~- only (it travels in a URL and a cookie)", found="other characters")
    if is_loopback(host):
        return
    if not token:
        raise ConfigError(source="--host", field="host", expected="127.0.0.1 (the default), "
                          "or --token (or MEDMETA_DASHBOARD_TOKEN) to expose the dashboard on "
                          "another address", found=host)
    if len(token) < MIN_TOKEN_LENGTH:
        raise ConfigError(source="--token", field="token",
                          expected=f"at least {MIN_TOKEN_LENGTH} characters (e.g. `openssl "
                          "rand -hex 16`)", found=f"{len(token)} characters")


def make_handler(state_dir: Path, token: str | None, rounds_planned: int | None,
                 refresh: int) -> type[BaseHTTPRequestHandler]:
    """A request handler class bound to one state directory (and token)."""

    class DashboardHandler(BaseHTTPRequestHandler):
        server_version = "medmeta-dashboard"

        def log_message(self, format: str, *args: object) -> None:
            log.debug("%s " + format, self.address_string(), *args)

        def _authorised(self) -> tuple[bool, bool]:
            """(allowed, token came in the URL)."""
            if token is None:
                return True, False
            offered = parse_qs(urlsplit(self.path).query).get("token", [""])[0]
            if offered:
                return hmac.compare_digest(offered, token), True
            header = self.headers.get("Authorization", "")
            if header.startswith("Bearer "):
                return hmac.compare_digest(header[7:], token), False
            cookie = SimpleCookie(self.headers.get("Cookie", ""))
            value = cookie[COOKIE].value if COOKIE in cookie else ""
            return bool(value) and hmac.compare_digest(value, token), False

        def _send(self, status: HTTPStatus, body: bytes, content_type: str,
                  headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Content-Security-Policy", "default-src 'none'; "
                             "style-src 'unsafe-inline'; img-src 'self'")
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_GET(self) -> None:
            allowed, in_url = self._authorised()
            if not allowed:
                self._send(HTTPStatus.UNAUTHORIZED, b"a valid token is needed\n",
                           "text/plain; charset=utf-8")
                return
            path = urlsplit(self.path).path
            if in_url:  # keep the token out of the address bar and the history
                self._send(HTTPStatus.SEE_OTHER, b"", "text/plain", {
                    "Location": path, "Set-Cookie": f"{COOKIE}={token}; HttpOnly; "
                    "SameSite=Strict; Path=/"})
                return
            view = read_run(state_dir, rounds_planned)
            if path == "/":
                self._send(HTTPStatus.OK, render(view, refresh=refresh).encode(),
                           "text/html; charset=utf-8")
            elif path == "/status.json":
                self._send(HTTPStatus.OK, json.dumps(view.to_json()).encode(),
                           "application/json")
            else:
                self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain; charset=utf-8")

        do_HEAD = do_GET

        def _read_only(self) -> None:
            self._send(HTTPStatus.METHOD_NOT_ALLOWED, b"the dashboard is read-only\n",
                       "text/plain; charset=utf-8", {"Allow": "GET, HEAD"})

        do_POST = do_PUT = do_DELETE = do_PATCH = _read_only

    return DashboardHandler


def dashboard_server(state_dir: Path, *, host: str = "127.0.0.1", port: int = 8050,
                     token: str | None = None, rounds_planned: int | None = None,
                     refresh: int = 10) -> ThreadingHTTPServer:
    """A bound (not yet serving) dashboard server; ``port`` 0 picks a free one."""
    check_exposure(host, token)
    handler: Callable[..., BaseHTTPRequestHandler] = make_handler(
        Path(state_dir), token, rounds_planned, refresh)
    return ThreadingHTTPServer((host, port), handler)
