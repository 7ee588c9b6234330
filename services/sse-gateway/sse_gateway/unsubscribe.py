"""One-click unsubscribe: the link every notification email carries.

An email names ``{NOTIFLOW_PUBLIC_URL}/unsubscribe?token=…`` in its
``List-Unsubscribe`` header, with ``List-Unsubscribe-Post:
List-Unsubscribe=One-Click`` (RFC 2369, RFC 8058), and as a link at the end of its
text. The token (:func:`contracts.auth.unsubscribe_token`) names the user and the
channel type, and stands in for signing in.

* ``GET`` answers a page saying whose emails the link turns off, with a button that
  posts to the same URL. It changes nothing: mail scanners and link previews fetch
  every link in a message, and a fetch must not unsubscribe anyone.
* ``POST`` turns the type off in ``notification_preferences``, through the same
  code as ``PATCH /preferences``, and answers a confirmation page. That also
  skips the user's emails still waiting to be sent (queued, or between retries);
  one a sender is already handing to the mail server still arrives. Posting
  again stores the same and answers the same.

A POST's body is not read. A mail client's one-click POST sends the form
``List-Unsubscribe=One-Click``, and the page's button sends the same; RFC 8058 fixes
that body, so it holds nothing to act on, and the token alone decides. Taking no
body parameter, the route is left alone by the HTTP policy's 415 for bodies not
sent as JSON (which only a route that wants a JSON body gives); the body size limit
applies to it as to any route.

A token that is missing, malformed or forged is a 422 naming ``token``, and a genuine
one that names a user no longer stored a 404; neither changes anything. Errors are
JSON as everywhere else, or a page for a browser (one asking for ``text/html``),
which is how people follow the link.

The token comes in the query, as the email wrote it. :class:`sse_gateway.app.
GatewayApp` takes it out of the query before anything records the request, and
leaves it in the scope under :data:`LINK_TOKEN`, not in ``Authorization``: it is no
bearer token, and this route must not read one as it. A query that gives the token
twice is refused, since which one the sender meant cannot be known.
"""

from __future__ import annotations

import logging
from html import escape

import asyncpg
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response

from contracts.auth import (
    InvalidLinkToken,
    UnknownUser,
    Unsubscribe,
    verify_unsubscribe_token,
)
from contracts.db import connection
from contracts.http import error, invalid_request
from sse_gateway import preferences
from sse_gateway.api import Pool

logger = logging.getLogger(__name__)

PATH = "/unsubscribe"
# The scope key under which GatewayApp leaves the query's tokens for these routes.
LINK_TOKEN = "notiflow.link_tokens"

USER = "SELECT display_name, email FROM users WHERE id = $1"

# Whether the user has turned the channel type $2 off already.
TURNED_OFF = """
SELECT EXISTS (
    SELECT FROM notification_preferences
    WHERE user_id = $1 AND type = $2 AND NOT enabled
)
"""

# What each channel type a link may turn off is called on the page.
_NAMES = {"email": "notification emails"}

# The page carries the token in its form: kept out of caches, and out of the
# Referer of anything it could lead to. Nor may another site frame it, to have
# its one button clicked unseen.
_PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
}

router = APIRouter(include_in_schema=False)


class _Refused(Exception):
    """The link cannot be used; answered as JSON, or as a page to a browser."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


@router.get(PATH)
async def confirm_page(request: Request, db: Pool) -> Response:
    """A page saying what the link turns off, with a button that does it."""
    try:
        link = _link(request)
        async with connection(db) as pg:
            user = await _user(pg, link)
            off = await pg.fetchval(TURNED_OFF, link.user_id, link.channel_type)
    except _Refused as refused:
        return _refusal(request, refused)

    what = _NAMES[link.channel_type]
    if off:
        return _page(
            f"{what.capitalize()} are already off",
            f"<p>{what.capitalize()} are already turned off for "
            f"<strong>{_whom(user)}</strong>; this link has nothing more to do. "
            "You can turn them back on in the notiflow page under "
            "“Notify me by”.</p>",
        )
    token = escape(request.scope[LINK_TOKEN][0])
    return _page(
        "Turn off notification emails?",
        f"<p>This turns off {what} for <strong>{_whom(user)}</strong>. "
        "Live and push notifications stay as they are, and you can turn emails "
        "back on in the notiflow page under “Notify me by”.</p>"
        f'<form method="post" action="?token={token}">'
        '<input type="hidden" name="List-Unsubscribe" value="One-Click">'
        f'<button type="submit">Turn off {what}</button>'
        "</form>",
    )


@router.post(PATH)
async def unsubscribe(request: Request, db: Pool) -> Response:
    """Turn the link's channel type off for its user; the same when done again."""
    try:
        link = _link(request)
        async with connection(db) as pg:
            user = await _user(pg, link)
            try:
                changed = await preferences.change(
                    pg, link.user_id, {link.channel_type: False}
                )
            except UnknownUser as exc:
                # Deleted since it was looked up; nothing was stored.
                raise _Refused(404, str(exc)) from None
    except _Refused as refused:
        return _refusal(request, refused)

    changed.log(logger, link.user_id, via="unsubscribe_link")
    what = _NAMES[link.channel_type]
    return _page(
        "Notification emails turned off",
        f"<p>{what.capitalize()} are turned off for "
        f"<strong>{_whom(user)}</strong>.</p>",
    )


def _link(request: Request) -> Unsubscribe:
    tokens = request.scope.get(LINK_TOKEN) or [None]
    if len(tokens) > 1:
        raise _Refused(422, "the token is given more than once")
    settings = request.app.state.runtime.settings
    try:
        return verify_unsubscribe_token(tokens[0], settings.secret_key)
    except InvalidLinkToken as exc:
        raise _Refused(422, str(exc)) from None


async def _user(pg: asyncpg.Connection, link: Unsubscribe) -> asyncpg.Record:
    user = await pg.fetchrow(USER, link.user_id)
    if user is None:
        raise _Refused(404, str(UnknownUser(link.user_id)))
    return user


def _whom(user: asyncpg.Record) -> str:
    """The user's name, and their address with most of its local part hidden:
    whoever holds a forwarded email learns the domain, not the mailbox."""
    name = escape(user["display_name"])
    address = user["email"]
    if not address or "@" not in address:
        return name
    local, _, domain = address.rpartition("@")
    return f"{name} ({escape(local[:1])}…@{escape(domain)})"


def _refusal(request: Request, refused: _Refused) -> Response:
    if "text/html" in request.headers.get("accept", ""):
        return _page(
            "This link cannot be used",
            f"<p>{escape(_sentence(refused.detail))}</p>",
            status=refused.status,
        )
    if refused.status == 404:
        return error(404, "not_found", refused.detail)
    return invalid_request([("token", refused.detail)])


def _sentence(detail: str) -> str:
    # "the token is missing" becomes "The link's token is missing."
    return "The link's " + detail.removeprefix("the ") + "."


def _page(title: str, body: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)} · notiflow</title>"
        '<link rel="icon" href="/static/icon.svg" type="image/svg+xml">'
        "<style>body{font-family:system-ui,sans-serif;max-width:34rem;"
        "margin:3rem auto;padding:0 1rem;line-height:1.5}"
        "button{font:inherit;padding:.5rem 1rem}</style></head>"
        f"<body><h1>{escape(title)}</h1>{body}</body></html>",
        status_code=status,
        headers=_PAGE_HEADERS,
    )
