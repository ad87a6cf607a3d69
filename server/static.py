"""Static files of the browser client, answered from websockets' `process_request` hook.

Only GET/HEAD of regular files that resolve (symlinks followed) inside the client directory are
served; anything else is a 404 (or 405 for other methods) — including `..` in any encoding.
"""

from __future__ import annotations

import email.utils
import http
from pathlib import Path
from urllib.parse import unquote, urlsplit

from websockets.datastructures import Headers
from websockets.http11 import Response

# The client lives next to the package in a checkout (repo/client). An installed wheel carries a
# copy as package data under server/client (pyproject: server = ["client/**/*"]).
_CANDIDATES = (Path(__file__).resolve().parents[1] / "client", Path(__file__).resolve().parent / "client")

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".ico": "image/x-icon",
    ".txt": "text/plain; charset=utf-8",
}

# The page needs its own scripts/styles, blob: images (createImageBitmap, toBlob) and the
# websocket back to this server; nothing from elsewhere.
CSP = ("default-src 'self'; img-src 'self' blob: data:; media-src 'self' blob: mediastream:; "
       "connect-src 'self' ws: wss:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")

MAX_FILE_BYTES = 8 * 1024 * 1024
MAX_PATH_CHARS = 1024  # the client's paths are a few characters; longer ones get 414


def default_client_dir() -> Path:
    """The directory served at `/`: repo/client in a checkout, else the installed package data."""
    for candidate in _CANDIDATES:
        if (candidate / "index.html").is_file():
            return candidate
    return _CANDIDATES[0]


def _response(status: http.HTTPStatus, body: bytes, content_type: str, head: bool = False,
              extra: dict[str, str] | None = None) -> Response:
    headers = Headers([
        ("Date", email.utils.formatdate(usegmt=True)),
        ("Connection", "close"),
        ("Content-Type", content_type),
        ("Content-Length", str(len(body))),
        ("X-Content-Type-Options", "nosniff"),
        ("Cache-Control", "no-cache"),
        ("Referrer-Policy", "no-referrer"),  # the join URL carries the room token
    ])
    for key, value in (extra or {}).items():
        headers[key] = value
    return Response(status.value, status.phrase, headers, b"" if head else body)


def not_found(head: bool = False) -> Response:
    return _response(http.HTTPStatus.NOT_FOUND, b"404 not found\n", "text/plain; charset=utf-8", head)


def resolve(root: Path, raw_path: str) -> Path | None:
    """Map a request path to a file inside `root`, or None when it is not one we may serve."""
    path = urlsplit(raw_path).path
    decoded = unquote(path, errors="strict") if "%" in path else path
    if "\x00" in decoded or "\\" in decoded:
        return None
    parts = [p for p in decoded.split("/") if p not in ("", ".")]
    if any(p == ".." or p.startswith(".") for p in parts):  # no parent dirs, no dotfiles
        return None
    root = root.resolve()
    candidate = root.joinpath(*parts) if parts else root
    try:
        if candidate.is_dir():
            candidate = candidate / "index.html"
        real = candidate.resolve(strict=True)  # follows symlinks: they must stay inside root
        if not real.is_relative_to(root) or not real.is_file():
            return None
    except (OSError, RuntimeError):  # e.g. ENAMETOOLONG, a symlink loop
        return None
    return real


def serve_file(root: Path, method: str, raw_path: str) -> Response:
    """The HTTP response for a plain (non-websocket) request."""
    if method not in ("GET", "HEAD"):
        return _response(http.HTTPStatus.METHOD_NOT_ALLOWED, b"405 method not allowed\n",
                         "text/plain; charset=utf-8", extra={"Allow": "GET, HEAD"})
    head = method == "HEAD"
    if len(raw_path) > MAX_PATH_CHARS:
        return _response(http.HTTPStatus.REQUEST_URI_TOO_LONG, b"414 URI too long\n",
                         "text/plain; charset=utf-8", head)
    try:
        real = resolve(root, raw_path)
    except (UnicodeDecodeError, OSError, ValueError):
        # OSError: a name the file system refuses (too long, ...); never a 500 with a traceback
        real = None
    if real is None:
        return not_found(head)
    try:
        if real.stat().st_size > MAX_FILE_BYTES:
            return not_found(head)
        body = real.read_bytes()
    except OSError:
        return not_found(head)
    content_type = CONTENT_TYPES.get(real.suffix.lower(), "application/octet-stream")
    extra = {"Content-Security-Policy": CSP} if real.suffix.lower() == ".html" else None
    # HEAD: Content-Length still reports the size GET would send (computed before dropping it).
    return _response(http.HTTPStatus.OK, body, content_type, head, extra)
