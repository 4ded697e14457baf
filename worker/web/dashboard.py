"""The HTML dashboard at `/dashboard`: a login form, then a page that polls the monitor API.

Everything is served by the receiver (`worker/web/static/`, no CDN). The login form posts
the token once and gets a session cookie (see `worker.web.monitor`: HttpOnly,
SameSite=Strict, a random id of a session kept in Redis and deleted at sign-out, never the
token); the token never appears in a URL. The page
builds its DOM with `textContent` only and a strict Content-Security-Policy, so data from
the ledger (client names, provider messages) can never run as script. It shows what the
monitor API returns, where emails are already masked.
"""

from __future__ import annotations

import html
from pathlib import Path

from aiohttp import web

from worker.web.monitor import (
    COOKIE,
    SESSION_SECONDS,
    AuthFailure,
    authenticate,
    close_session,
    configured_token,
    locked_out,
    open_session,
    retry_after,
    token_failed,
    token_matches,
    token_succeeded,
)

STATIC = Path(__file__).with_name("static")
SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                                "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}

_LOGIN = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>clientsync monitor — sign in</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="stylesheet" href="/dashboard/static/dashboard.css">
<script src="/dashboard/static/login.js" defer></script></head>
<body class="login"><main>
<h1>clientsync monitor</h1>
{message}
<form method="post" action="/dashboard/login" autocomplete="off">
<label for="token">Monitor token (CLIENTSYNC_MONITOR_TOKEN)</label>
<input id="token" name="token" type="password" required autofocus>
<button id="login" type="submit">Sign in</button>
</form></main></body></html>
"""


def _page(body: str, status: int = 200) -> web.Response:
    return web.Response(text=body, status=status, content_type="text/html", headers=SECURITY_HEADERS)


def _login_page(message: str = "", status: int = 200) -> web.Response:
    note = f'<p class="error" role="alert">{html.escape(message)}</p>' if message else ""
    return _page(_LOGIN.format(message=note), status)


async def dashboard(request: web.Request) -> web.Response:
    """`GET /dashboard`: the dashboard for a signed-in operator (cookie or bearer), else the login form."""
    try:
        await authenticate(request)
    except AuthFailure as exc:
        if exc.status == 503:
            return _page(f"<!doctype html><title>clientsync monitor</title><p>{html.escape(str(exc))}</p>", 503)
        return _login_page()
    return _page((STATIC / "dashboard.html").read_text())


async def login(request: web.Request) -> web.Response:
    """`POST /dashboard/login` (form field `token`): sets the session cookie and goes to the dashboard."""
    token = configured_token(request)
    if token is None:
        return _page("<!doctype html><title>clientsync monitor</title>"
                     "<p>the monitor is disabled: set CLIENTSYNC_MONITOR_TOKEN to enable it</p>", 503)
    wait = await locked_out(request)
    if wait:
        response = _login_page("Too many wrong tokens from this address; try again later.", 429)
        response.headers.update(retry_after(wait))
        return response
    form = await request.post()
    given = form.get("token")
    if not isinstance(given, str) or not token_matches(given.strip(), token):
        await token_failed(request)
        return _login_page("That token is not valid.", 401)
    await token_succeeded(request)
    response = web.HTTPSeeOther("/dashboard", headers=SECURITY_HEADERS)
    response.set_cookie(COOKIE, await open_session(request, token), max_age=SESSION_SECONDS, path="/",
                        httponly=True, samesite="Strict", secure=request.secure)
    raise response


async def logout(request: web.Request) -> web.Response:
    """`POST /dashboard/logout`: end the session on the server and forget the cookie."""
    await close_session(request)
    response = web.HTTPSeeOther("/dashboard", headers=SECURITY_HEADERS)
    response.del_cookie(COOKIE, path="/")
    raise response

