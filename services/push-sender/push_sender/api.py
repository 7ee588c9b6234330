"""Routes: the page's VAPID key, and a user's own push subscriptions."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Annotated, Any

import asyncpg
from fastapi import APIRouter, FastAPI, Header, Request, Response
from fastapi.exceptions import RequestValidationError

from contracts.auth import UnknownUser
from contracts.db import connection, transaction
from contracts.http import NoBody, NotFound, PathId, RuntimeDep, UserDep
from push_sender import subscriptions as subs
from push_sender.endpoints import EndpointPolicy, canonical
from push_sender.vapid import VapidKeys

logger = logging.getLogger(__name__)

MAX_USER_AGENT_CHARS = 500

# Ids are bigints in canonical decimal: a larger number names no row, and asyncpg
# could not send it.
SubscriptionId = PathId

router = APIRouter(prefix="/push")


@router.get("/vapid-public-key")
async def vapid_public_key(request: Request) -> dict[str, str]:
    keys: VapidKeys = request.app.state.vapid
    return {"public_key": keys.application_server_key}


@router.post("/subscriptions", status_code=201)
async def subscribe(
    new: subs.NewSubscription,
    request: Request,
    rt: RuntimeDep,
    user: UserDep,
    user_agent: Annotated[str | None, Header()] = None,
) -> dict[str, Any]:
    endpoints: EndpointPolicy = request.app.state.endpoints
    problem = endpoints.problem(new.endpoint)
    if problem:
        _refuse(("body", "endpoint"), problem)
    agent = (user_agent or "")[:MAX_USER_AGENT_CHARS] or None
    if agent and "\x00" in agent:
        # PostgreSQL text cannot hold a NUL.
        _refuse(("header", "user-agent"), "must not contain U+0000")
    # Checking the endpoint's addresses makes the server resolve a name the
    # caller chose: only for a user who exists, so that a token whose user was
    # deleted (or never stored) cannot have it look names up.
    async with connection(rt.db) as conn:
        if not await conn.fetchval(subs.USER_EXISTS, user.user_id):
            raise UnknownUser(user.user_id)
    problem = await endpoints.check(new.endpoint)
    if problem:
        _refuse(("body", "endpoint"), problem)
    endpoint = canonical(new.endpoint)
    limit: int = request.app.state.max_subscriptions
    try:
        async with transaction(rt.db) as conn:
            await conn.execute(subs.LOCK_ENDPOINT, endpoint)
            owner = await conn.fetchval(subs.OWNER, endpoint)
            for user_id in sorted({user.user_id, owner or user.user_id}):
                await conn.execute(subs.LOCK_USER, user_id)
            await conn.execute(subs.RELEASE_FROM_OTHERS, endpoint, user.user_id)
            replaced = await conn.fetch(
                subs.MAKE_ROOM, user.user_id, endpoint, limit - 1
            )
            row = await conn.fetchrow(
                subs.UPSERT,
                user.user_id,
                endpoint,
                new.keys.p256dh,
                new.keys.auth,
                agent,
                new.expires_at,
            )
    except asyncpg.ForeignKeyViolationError:
        # The row's one foreign key is its user's: the user was deleted since the
        # check above. The whole transaction rolls back, the release from others
        # and the replaced subscriptions included.
        raise UnknownUser(user.user_id) from None
    if replaced:
        logger.info(
            "user %d reached the limit of %d push subscriptions: "
            "subscription %d replaces %s",
            user.user_id,
            limit,
            row["id"],
            ", ".join(str(r["id"]) for r in replaced),
            extra={"action": "push.subscription_replaced"},
        )
    return dict(row)


@router.get("/subscriptions")
async def list_subscriptions(rt: RuntimeDep, user: UserDep) -> list[dict[str, Any]]:
    async with transaction(rt.db) as conn:
        rows = await conn.fetch(subs.LIST_OWN, user.user_id)
    if not rows:
        raise UnknownUser(user.user_id)
    return [dict(row) for row in rows if row["id"] is not None]


@router.delete("/subscriptions/{subscription_id}", status_code=204)
async def unsubscribe(
    subscription_id: SubscriptionId, rt: RuntimeDep, user: UserDep, _: NoBody
) -> Response:
    async with transaction(rt.db) as conn:
        row = await conn.fetchrow(subs.DELETE_OWN, subscription_id, user.user_id)
    if not row["user_exists"]:
        raise UnknownUser(user.user_id)
    if not row["deleted"]:
        # Someone else's subscription looks exactly like a missing one.
        raise NotFound(f"subscription {subscription_id} does not exist")
    return Response(status_code=204)


def _refuse(loc: tuple[str, str], problem: str) -> None:
    raise RequestValidationError([_error(loc, problem)])


def _error(loc: tuple[str, str], problem: str) -> dict[str, Any]:
    """A validation error as FastAPI's handler takes it."""
    return {"loc": loc, "msg": problem, "type": "value_error"}


def name_every_problem(app: FastAPI) -> None:
    """Have a subscription body that fails validation also name its endpoint's
    problem, found by the endpoint's text alone, when the endpoint is a string that
    passed its own field's checks: so a client fixes everything at once.

    The route checks the endpoint against the app's policy only once the body is
    valid; this wraps the app's answer to an invalid request to do it earlier.
    """
    answer = app.exception_handlers[RequestValidationError]

    async def invalid(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        errors = list(exc.errors())
        body = exc.body
        if (
            request.scope.get("endpoint") is subscribe
            and isinstance(body, dict)
            and isinstance(body.get("endpoint"), str)
            and not any(_about_the_endpoint(err) for err in errors)
            and not any(err["type"] == "json_invalid" for err in errors)
        ):
            policy: EndpointPolicy = request.app.state.endpoints
            problem = policy.problem(body["endpoint"])
            if problem:
                errors.append(_error(("body", "endpoint"), problem))
                exc = RequestValidationError(errors, body=body)
        return await answer(request, exc)

    app.exception_handlers[RequestValidationError] = invalid


def _about_the_endpoint(err: Mapping[str, Any]) -> bool:
    return tuple(err["loc"])[:2] == ("body", "endpoint")
