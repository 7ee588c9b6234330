"""``make token``: a token for a seeded user, whatever characters the name given has."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from contracts.auth import verify_token
from contracts.settings import Settings
from tests.support.data import Demo

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parents[2]


def _make_token(settings: Settings, user: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "-s", "--no-print-directory", "token", f"USER={user}"],
        cwd=ROOT,
        env={**os.environ, "NOTIFLOW_DATABASE_URL": settings.database_url},
        capture_output=True,
        text=True,
        timeout=120,
    )


async def test_make_token_prints_a_token_for_the_user_named(
    settings: Settings, demo: Demo
) -> None:
    done = _make_token(settings, "bob")

    assert done.returncode == 0, done.stderr
    token = done.stdout.strip().splitlines()[-1]
    assert verify_token(token, settings).user_id == demo.bob


@pytest.mark.parametrize("name", ["bob'x", 'bob"x', "bob; echo injected", "`id`'s"])
async def test_a_name_with_shell_characters_reaches_the_command_as_it_is(
    settings: Settings, demo: Demo, name: str
) -> None:
    done = _make_token(settings, name)

    assert done.returncode != 0
    assert f"no user named {name!r}" in done.stderr, done.stderr
    assert "injected" not in done.stdout and "uid=" not in done.stdout
