"""``GET /ui``: the live page of the gateway, its login, its session cookie and its static files.

Without keys (loopback only) the page is open.  With keys it needs an admin
key, given either in an ``Authorization: Bearer`` header or once in the login
form (``POST /ui/login``): the gateway then sets a session cookie holding a
random session id (``HttpOnly; SameSite=Strict; Path=/ui``), which it maps to
the key's identity; the key itself is never in the cookie, and never read
from a URL (URLs end up in logs and browser histories).  Sessions live in the
process, and in Redis with ``shared_state`` (so every worker knows them), for
``SESSION_SECONDS``.

The page (``static/``: HTML, CSS, JavaScript and uPlot, no build step) polls
``GET /ui/snapshot`` every second: the snapshot of ``GET /v1/snapshot``,
with the session cookie as its credential.
"""

from __future__ import annotations

import hashlib
import html
import secrets
import time
from collections.abc import Callable, Mapping
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from .auth import Identity
from .errors import HTTPError

if TYPE_CHECKING:
    from ..router import LLMRouter
    from .app import Reply
    from .auth import Keys

COOKIE = "xpl_ui_session"
SESSION_SECONDS = 12 * 3600
TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
         ".html": "text/html; charset=utf-8", ".txt": "text/plain; charset=utf-8", "": "text/plain; charset=utf-8"}
PAGE_HEADERS = {
    "Content-Type": "text/html; charset=utf-8",
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def _static(name: str) -> bytes | None:
    """A file of ``static/`` (a plain name: no directories, so no way out of it)."""
    if not name or "/" in name or "\\" in name or name.startswith("."):
        return None
    try:
        return (resources.files(__package__) / "static" / name).read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


class UI:
    """The ``/ui`` routes of one gateway process."""

    def __init__(self, keys: Keys, router: Callable[[], LLMRouter]) -> None:
        self.keys = keys
        self.router = router
        self._sessions: dict[str, tuple[float, str]] = {}     # sha256(session id): (expires, key name)

    async def handle(self, method: str, path: str, headers: Mapping[str, str], body: bytes,
                     identity: Identity | None) -> Reply:
        """Answer a request under ``/ui``; a refused page is an HTML page, a refused JSON read an error object."""
        try:
            return await self._route(method, path, headers, body, identity)
        except PageError as err:
            from .app import Reply

            return Reply(err.status, dict(PAGE_HEADERS), err.page)

    async def _route(self, method: str, path: str, headers: Mapping[str, str], body: bytes,
                     identity: Identity | None) -> Reply:
        from .app import Reply

        if path.startswith("/ui/static/"):
            if method != "GET":
                raise _method(method, path, "GET")
            data = _static(path[len("/ui/static/"):])
            if data is None:
                raise HTTPError(404, f"GET {path}: no such file", "invalid_request_error", "unknown_url")
            ext = path[path.rfind("."):] if "." in path.rsplit("/", 1)[-1] else ""
            return Reply(200, {"Content-Type": TYPES.get(ext, "application/octet-stream"),
                               "Cache-Control": "public, max-age=3600", "X-Content-Type-Options": "nosniff"}, data)
        if path in ("/ui", "/ui/"):
            if method != "GET":
                raise _method(method, path, "GET")
            who = await self._who(headers, identity)
            if isinstance(who, Reply):
                return who
            page = _static("index.html") or b""
            return Reply(200, dict(PAGE_HEADERS), page.replace(b"{{logout}}", b"" if who.name != "session"
                                                                  else b'<form method="post" action="/ui/logout">'
                                                                       b'<button type="submit">Log out</button>'
                                                                       b'</form>'))
        if path == "/ui/snapshot":
            if method != "GET":
                raise _method(method, path, "GET")
            await self._who(headers, identity, page=False)
            from ..snapshot import snapshot
            from .app import JSON

            snap = await snapshot(self.router(), source="gateway")
            return Reply(200, {**JSON, "Cache-Control": "no-store"}, snap.to_json().encode())
        if path == "/ui/login":
            if method != "POST":
                raise _method(method, path, "POST")
            return await self._login(headers, body)
        if path == "/ui/logout":
            if method != "POST":
                raise _method(method, path, "POST")
            sid = _cookie(headers)
            if sid:
                await self._forget(sid)
            return Reply(303, {"Location": "/ui", "Cache-Control": "no-store",
                               "Set-Cookie": f"{COOKIE}=; Path=/ui; Max-Age=0; HttpOnly; SameSite=Strict"})
        raise HTTPError(404, f"{method} {path}: no such page; the live view is GET /ui", "invalid_request_error",
                        "unknown_url")

    # ------------------------------------------------------------ who is looking

    async def _who(self, headers: Mapping[str, str], identity: Identity | None, page: bool = True) -> Any:
        """The admin identity looking (a header key, a session, or no keys at all); otherwise the login
        page (page=True) or an HTTP error: 401 without a (valid) key, 403 with a key that is not admin."""
        if identity is not None:
            if identity.admin:
                return identity
            raise _forbidden(page)
        if not self.keys.enabled:
            return Identity(admin=True, name="no keys")
        if headers.get("authorization"):
            try:
                found = self.keys.identify(headers.get("authorization"))
            except HTTPError:
                if page:
                    return _login_page("That key is not known here.", 401)
                raise
            if not found.admin:
                raise _forbidden(page)
            return found
        sid = _cookie(headers)
        if sid and await self._session(sid):
            return Identity(admin=True, name="session")
        if page:
            return _login_page("", 200)
        raise HTTPError(401, "log in at /ui (an admin key), or send Authorization: Bearer <admin key>",
                        "invalid_request_error", "invalid_api_key")

    async def _login(self, headers: Mapping[str, str], body: bytes) -> Reply:
        from .app import Reply

        if len(body) > 16_384:
            return _login_page("That form is too large.", 413)
        form = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
        key = (form.get("key") or [""])[0].strip()
        if not self.keys.enabled:
            return Reply(303, {"Location": "/ui", "Cache-Control": "no-store"})
        if not key:
            return _login_page("Enter an admin key.", 401)
        try:
            who = self.keys.identify(f"Bearer {key}")
        except HTTPError:
            return _login_page("That key is not known here.", 401)
        if not who.admin:
            raise _forbidden(True)
        sid = secrets.token_urlsafe(32)
        await self._remember(sid, who.name)
        secure = "; Secure" if headers.get("x-forwarded-proto", "").lower() == "https" else ""
        return Reply(303, {"Location": "/ui", "Cache-Control": "no-store",
                           "Set-Cookie": f"{COOKIE}={sid}; Path=/ui; Max-Age={SESSION_SECONDS}; HttpOnly; "
                                         f"SameSite=Strict{secure}"})

    # ------------------------------------------------------------ sessions

    def _redis(self) -> Any:
        try:
            state = self.router().state
        except Exception:
            return None
        conn = getattr(state, "conn", None)
        prefix = getattr(state, "prefix", None)
        return (conn, prefix) if conn is not None and prefix else None

    async def _remember(self, sid: str, name: str) -> None:
        digest = hashlib.sha256(sid.encode()).hexdigest()
        now = time.time()
        self._sessions = {k: v for k, v in self._sessions.items() if v[0] > now}
        self._sessions[digest] = (now + SESSION_SECONDS, name)
        shared = self._redis()
        if shared is not None:
            conn, prefix = shared
            try:
                await conn.commands(("SET", f"{prefix}:ui:session:{digest}", name, "EX", SESSION_SECONDS))
            except Exception:       # Redis away: this worker still knows the session
                pass

    async def _session(self, sid: str) -> bool:
        digest = hashlib.sha256(sid.encode()).hexdigest()
        found = self._sessions.get(digest)
        if found is not None:
            if found[0] > time.time():
                return True
            self._sessions.pop(digest, None)
            return False
        shared = self._redis()
        if shared is None:
            return False
        conn, prefix = shared
        try:
            (name,) = await conn.commands(("GET", f"{prefix}:ui:session:{digest}"))
        except Exception:
            return False
        if name:
            self._sessions[digest] = (time.time() + 60.0, str(name))     # known here for a minute
        return bool(name)

    async def _forget(self, sid: str) -> None:
        digest = hashlib.sha256(sid.encode()).hexdigest()
        self._sessions.pop(digest, None)
        shared = self._redis()
        if shared is not None:
            conn, prefix = shared
            try:
                await conn.commands(("DEL", f"{prefix}:ui:session:{digest}"))
            except Exception:
                pass


def _cookie(headers: Mapping[str, str]) -> str | None:
    for part in headers.get("cookie", "").split(";"):
        name, _, value = part.strip().partition("=")
        if name == COOKIE and value:
            return value
    return None


def _method(method: str, path: str, allowed: str) -> HTTPError:
    return HTTPError(405, f"{method} {path}: method not allowed; use {allowed}", "invalid_request_error",
                     "method_not_allowed", headers={"Allow": allowed})


class PageError(Exception):
    """A refusal answered with an HTML page (the browser's view of it)."""

    def __init__(self, status: int, title: str, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.page = _page(title, f"<h1>{html.escape(title)}</h1><p>{html.escape(text)}</p>"
                                 f'<p><a href="/ui">Back to the login</a></p>')


def _forbidden(page: bool) -> Exception:
    text = "This key may not see the live view: it needs a key with admin: true in llm.gateway.keys."
    if page:
        return PageError(403, "Forbidden", text)
    return HTTPError(403, text, "invalid_request_error", "permission_denied")


def _page(title: str, body: str) -> bytes:
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)} - xml-pipeline-llm</title>"
            f'<link rel="icon" href="data:,"><link rel="stylesheet" href="/ui/static/ui.css"></head>'
            f'<body class="plain"><main class="narrow">{body}</main></body></html>').encode()


def _login_page(message: str, status: int) -> Reply:
    from .app import Reply

    note = f'<p class="problem" role="alert">{html.escape(message)}</p>' if message else ""
    body = (f"<h1>xml-pipeline-llm: live view</h1>{note}"
            f'<form method="post" action="/ui/login" class="login">'
            f'<label for="key">Admin key</label>'
            f'<input id="key" name="key" type="password" autocomplete="current-password" required autofocus>'
            f'<button type="submit">Log in</button></form>'
            f"<p class=\"hint\">An admin key of llm.gateway.keys (admin: true). The page keeps a session "
            f"cookie; the key is not stored in the browser.</p>")
    return Reply(status, dict(PAGE_HEADERS), _page("Log in", body))


__all__ = ["UI", "COOKIE"]
