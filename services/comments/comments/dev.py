"""Development-only routes: a token for any seeded user, for the demo web page.

The application includes this router only when ``NOTIFLOW_ENV=development``; in
any other mode the route does not exist.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from contracts.auth import issue_token
from contracts.db import connection
from contracts.http import NotFound

router = APIRouter(prefix="/dev", tags=["development"])

FIND_USER = "SELECT id, username, display_name FROM users WHERE username = $1"


class TokenRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    username: str = Field(min_length=1, max_length=32, pattern=r"^[a-z0-9_]+$")


@router.post("/token")
async def token(body: TokenRequest, request: Request) -> dict[str, Any]:
    runtime = request.app.state.runtime
    async with connection(runtime.db) as conn:
        row = await conn.fetchrow(FIND_USER, body.username)
    if row is None:
        raise NotFound(f"no user named {body.username!r}")
    return {
        "token": issue_token(row["id"], row["username"], runtime.settings),
        "user": dict(row),
    }
