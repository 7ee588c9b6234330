"""HTTP routes of the comments service."""

from __future__ import annotations

import hashlib
import logging
import math
import unicodedata
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Annotated, Any

import asyncpg
from fastapi import APIRouter, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
)

from comments import repository as sql
from contracts import topology, tracing
from contracts.auth import Principal, UnknownUser, bearer, verify_token
from contracts.db import (
    PASSING_ERRORS,
    SCHEMA_MISSING_ERRORS,
    OutcomeUnknown,
    connection,
    is_unavailable,
    transaction,
)
from contracts.http import (
    BodyId,
    Conflict,
    NotFound,
    PathId,
    RuntimeDep,
    TooMany,
    UserDep,
)
from contracts.mentions import MAX_MENTIONS, mentioned_usernames
from contracts.messages import CommentCreated
from contracts.outbox import enqueue, outgoing_event
from contracts.runtime import Runtime

logger = logging.getLogger(__name__)

MAX_BODY_CHARS = 5000
MAX_IDEMPOTENCY_KEY_CHARS = 200
FORGOTTEN_KEY_TRIES = 3


def _ascii_key(value: str | None) -> str | None:
    if value is None:
        return None
    # A header sent with no value arrives as "" (servers strip the spaces around
    # a value). Its sender meant to send a key: taking the request as one without
    # a key would let a retry store the comment twice.
    if not value.strip():
        raise ValueError("must not be empty; send a key such as a UUID, or no header")
    # Header values arrive as bytes that the server decodes as Latin-1, so a UTF-8
    # key would be stored garbled; keys are meant to be UUIDs, so refuse the rest.
    if not (value.isascii() and value.isprintable()):
        raise ValueError("must be printable ASCII, such as a UUID")
    return value


router = APIRouter()

# Code points Unicode files as letters or symbols that still show nothing: fillers,
# the grapheme joiner, variation selectors, the blank Braille pattern.
_BLANK = frozenset(
    "\u034f\u115f\u1160\u17b4\u17b5\u180b\u180c\u180d\u180f\u2800\u3164\uffa0"
    + "".join(map(chr, range(0xFE00, 0xFE10)))
    + "".join(map(chr, range(0xE0100, 0xE01F0)))
)
# Letters, numbers, punctuation and symbols. Not marks, which show only on another
# character; not spaces, controls, format characters (zero-width spaces and
# joiners, bidi marks, the byte order mark), private-use or unassigned code points.
_VISIBLE_CATEGORIES = ("L", "N", "P", "S")


def _shows_something(char: str) -> bool:
    return unicodedata.category(char)[0] in _VISIBLE_CATEGORIES and char not in _BLANK


class NewComment(BaseModel):
    model_config = ConfigDict(extra="forbid")

    post_id: BodyId
    # An empty body is refused by the check below, with its own message; the
    # schema says so too.
    body: str = Field(max_length=MAX_BODY_CHARS, json_schema_extra={"minLength": 1})

    @field_validator("body")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        # Zero-width and format characters are blank to every reader; one
        # character that shows, anywhere, makes the body text.
        if not any(map(_shows_something, value)):
            raise ValueError("must contain text")
        if "\x00" in value:
            raise ValueError("must not contain NUL characters")
        if "@" in value and len(named := mentioned_usernames(value)) > MAX_MENTIONS:
            raise ValueError(
                f"mentions {len(named)} people; a comment may mention at most "
                f"{MAX_MENTIONS}"
            )
        return value


@router.get("/users")
async def list_users(
    rt: RuntimeDep, authorization: Annotated[str | None, Header()] = None
) -> list[dict[str, Any]]:
    # The demo page lists users to sign in as; elsewhere the directory is for
    # signed-in users only.
    user = None
    if rt.settings.env != "development":
        user = verify_token(bearer(authorization), rt.settings)
    async with transaction(rt.db, rt.settings.db_acquire_timeout) as conn:
        rows = await conn.fetch(sql.LIST_USERS)
    # The directory names every user, so it also tells whether the token's exists.
    if user is not None and not any(row["id"] == user.user_id for row in rows):
        raise UnknownUser(user.user_id)
    return [dict(row) for row in rows]


@router.get("/posts")
async def list_posts(rt: RuntimeDep) -> list[dict[str, Any]]:
    async with transaction(rt.db, rt.settings.db_acquire_timeout) as conn:
        rows = await conn.fetch(sql.LIST_POSTS, 100)
    return [{**sql.post(row), "comment_count": row["comment_count"]} for row in rows]


@router.get("/posts/{post_id}")
async def get_post(post_id: PathId, rt: RuntimeDep) -> dict[str, Any]:
    async with transaction(rt.db, rt.settings.db_acquire_timeout) as conn:
        row = await conn.fetchrow(sql.GET_POST, post_id)
        if row is None:
            raise NotFound(f"post {post_id} does not exist")
        comments = await conn.fetch(sql.POST_COMMENTS, post_id)
    return {**sql.post(row), "comments": [sql.comment(c) for c in comments]}


@router.post("/comments", status_code=201)
async def create_comment(
    new: NewComment,
    request: Request,
    rt: RuntimeDep,
    user: UserDep,
    idempotency_key: Annotated[
        str | None,
        Header(max_length=MAX_IDEMPOTENCY_KEY_CHARS),
        AfterValidator(_ascii_key),
    ] = None,
) -> JSONResponse:
    # The parameter holds the first of the request's keys. Which one a sender of
    # two meant cannot be known, and a retry that sends them in another order, or
    # through a proxy that keeps only the last, would store the comment twice.
    if len(request.headers.getlist("idempotency-key")) > 1:
        raise RequestValidationError(
            [
                {
                    "loc": ("header", "idempotency-key"),
                    "msg": "given more than once; send one key",
                    "type": "value_error",
                }
            ]
        )
    if idempotency_key is None:
        return await _create(new, rt, user)
    request_hash = hashlib.sha256(new.model_dump_json().encode()).hexdigest()

    # A key found taken may be forgotten (past NOTIFLOW_IDEMPOTENCY_KEY_HOURS) by
    # the time its response is read; the request is then new, and claims it.
    for _ in range(FORGOTTEN_KEY_TRIES):
        answer = await _create_keyed(new, rt, user, idempotency_key, request_hash)
        if answer is not None:
            return answer
    raise Conflict(
        f"Idempotency-Key {idempotency_key!r} is being forgotten as this request "
        "comes; send it again"
    )


async def _create_keyed(
    new: NewComment, rt: Runtime, user: Principal, key: str, request_hash: str
) -> JSONResponse | None:
    """The comment stored under ``key``, or the answer of the request that took
    the key; None if the key was forgotten between the two."""
    async with connection(rt.db, rt.settings.db_acquire_timeout) as conn:
        async with conn.transaction():
            try:
                row = await conn.fetchrow(
                    sql.CREATE_COMMENT,
                    new.post_id,
                    user.user_id,
                    new.body,
                    key,
                    request_hash,
                    _pace_interval(rt),
                )
            except asyncpg.ForeignKeyViolationError as exc:
                # The key's claim names the token's user, whose row must exist.
                if exc.constraint_name not in _USER_KEYS:
                    raise
                raise UnknownUser(user.user_id) from None
            if not row["claimed"]:
                return await _replay(conn, user, key, request_hash)
            # Raising rolls the key's claim back: a retry is judged anew.
            wait = await _wait_if_refused(conn, row, user, rt)
            _require_stored(row, new, user, rt, wait)

            event = CommentCreated(
                event_id=uuid.uuid4(),
                occurred_at=datetime.now(UTC),
                comment_id=row["id"],
                post_id=new.post_id,
                author_id=user.user_id,
                body=new.body,
            )
            outbox = await enqueue(
                conn,
                [outgoing_event(event, tracing.inject({}))],
                hand_off=rt.relay is not None,
            )
            body = _created(new, row, str(event.event_id))
            await conn.execute(sql.STORE_RESPONSE, user.user_id, key, 201, body)
        # The outbox row is committed: this process's relay publishes it now.
        if rt.relay is not None:
            rt.relay.hand_off(outbox)

    _log_stored(row["id"], new.post_id, str(event.event_id))
    return JSONResponse(body, status_code=201)


async def _create(new: NewComment, rt: Runtime, user: Principal) -> JSONResponse:
    """A comment without an Idempotency-Key: one statement stores it and its event."""
    event_id = str(uuid.uuid4())
    async with connection(rt.db, rt.settings.db_acquire_timeout) as conn:
        try:
            row = await conn.fetchrow(
                sql.CREATE_COMMENT_AND_EVENT,
                new.post_id,
                user.user_id,
                new.body,
                topology.EVENTS_EXCHANGE,
                topology.COMMENT_CREATED,
                event_id,
                tracing.inject({"event_id": event_id}),
                "on" if rt.relay is not None else "off",
                f"{CommentCreated.MAJOR}.{CommentCreated.MINOR}",
                datetime.now(UTC).isoformat(),
                _pace_interval(rt),
            )
        except asyncpg.ForeignKeyViolationError as exc:
            # The token's user was deleted while the statement ran.
            if exc.constraint_name not in _USER_KEYS:
                raise
            raise UnknownUser(user.user_id) from None
        except Exception as exc:
            if not is_unavailable(exc) or isinstance(exc, _REFUSED_BY_SERVER):
                # A bug, or the server refusing the statement: nothing stored.
                raise
            # The statement is its own transaction: it may have committed, and
            # its comment be notified, though no answer came.
            raise OutcomeUnknown(
                f"no answer to the statement storing a comment: {exc!r}",
                "the database did not answer in time, and the comment may have "
                "been stored; look at the thread before sending it again, or "
                "send comments with an Idempotency-Key, which makes a retry safe",
            ) from exc
        wait = await _wait_if_refused(conn, row, user, rt)
    _require_stored(row, new, user, rt, wait)
    # Committed: this process's relay publishes the event now.
    if rt.relay is not None:
        rt.relay.hand_off([sql.outbox_row(row)])
    _log_stored(row["id"], new.post_id, event_id)
    return JSONResponse(_created(new, row, event_id), status_code=201)


# What the server answers a statement it refuses, which then stored nothing.
_REFUSED_BY_SERVER = (*PASSING_ERRORS, *SCHEMA_MISSING_ERRORS)

# Foreign keys to users that the comment statements can break: only when the
# token's user is missing, or was deleted while the statement ran.
_USER_KEYS = frozenset(
    {
        "idempotency_keys_user_id_fkey",
        "comments_author_id_fkey",
        "comment_pace_user_id_fkey",
    }
)


def _pace_interval(rt: Runtime) -> float:
    """Seconds between one user's comments once the minute's are spent; 0 for
    no limit."""
    per_minute = rt.settings.comments_per_minute
    return 60 / per_minute if per_minute else 0.0


async def _wait_if_refused(
    conn: asyncpg.Connection, row: asyncpg.Record, user: Principal, rt: Runtime
) -> int | None:
    """The seconds a comment refused for its author's pace should wait; None if
    it was not refused for that."""
    if row["paced"] or row["author_id"] is None or not row["post_exists"]:
        return None
    wait = await conn.fetchval(sql.PACE_WAIT, user.user_id, _pace_interval(rt))
    return wait or math.ceil(_pace_interval(rt))


def _require_stored(
    row: asyncpg.Record,
    new: NewComment,
    user: Principal,
    rt: Runtime,
    wait: int | None,
) -> None:
    """401 for a token whose user is not stored, then 404 for a missing post,
    then 429 for an author with no comment left this minute, told to wait
    ``wait`` seconds (:func:`_wait_if_refused`, which gives a number then).

    The statement that stored nothing says why. The token is judged first, as
    the other services judge it before they look at anything the request names.
    """
    if row["author_id"] is None:
        raise UnknownUser(user.user_id)
    if not row["post_exists"]:
        raise NotFound(f"post {new.post_id} does not exist")
    if not row["paced"]:
        per_minute = rt.settings.comments_per_minute
        logger.info(
            "user %d has posted %d comments in the last minute; refusing another",
            user.user_id,
            per_minute,
            extra={"action": "comment.too_many"},
        )
        raise TooMany(
            "too_many_comments",
            f"a user may post {per_minute} comment{'' if per_minute == 1 else 's'} "
            f"a minute; try again in {wait} s",
            retry_after=wait,
        )


def _log_stored(comment_id: int, post_id: int, event_id: str) -> None:
    logger.info(
        "comment %d stored on post %d",
        comment_id,
        post_id,
        extra={"action": "comment.created", "event_id": event_id},
    )


# The keys of a 201 body, and of its author, in the order they are sent: a replay
# answers in it too, since the stored copy (jsonb) keeps keys in an order of its own.
CREATED_KEYS = ("id", "post_id", "body", "author", "created_at", "event_id")
PERSON_KEYS = ("id", "username", "display_name")


def _in_order(body: dict[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    first = {key: body[key] for key in keys if key in body}
    return first | {key: value for key, value in body.items() if key not in first}


def _created(new: NewComment, row: asyncpg.Record, event_id: str) -> dict[str, Any]:
    """The ``201`` body for a stored comment."""
    return {
        "id": row["id"],
        "post_id": new.post_id,
        "body": new.body,
        "author": sql.person(row),
        "created_at": row["created_at"].isoformat(),
        "event_id": event_id,
    }


async def _replay(
    conn: Any, user: Principal, key: str, request_hash: str
) -> JSONResponse | None:
    """The stored answer to the request that took ``key``; None if the key is
    gone, forgotten since it was found taken."""
    stored = await conn.fetchrow(sql.STORED_RESPONSE, user.user_id, key)
    if stored is None:
        return None
    if stored["request_hash"] != request_hash:
        raise Conflict(
            f"Idempotency-Key {key!r} was already used with a different request body"
        )
    body = _in_order(stored["response"], CREATED_KEYS)
    if isinstance(body.get("author"), dict):
        body["author"] = _in_order(body["author"], PERSON_KEYS)
    return JSONResponse(
        body,
        status_code=stored["status_code"],
        headers={"Idempotent-Replayed": "true"},
    )
