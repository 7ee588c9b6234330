"""``notiflow-seed`` seeds only when asked to, and says how it is used."""

from __future__ import annotations

import subprocess

import pytest

from tests.support.processes import BIN

SEED = str(BIN / "notiflow-seed")
# A database no test creates: reaching for it would be refused differently.
NOWHERE = "postgresql://postgres@127.0.0.1:5432/notiflow_seed_never_created"


@pytest.mark.parametrize("argv", [["--bogus"], ["alice"]])
def test_the_seed_command_refuses_arguments_it_does_not_take(argv: list[str]) -> None:
    done = subprocess.run(
        [SEED, *argv],
        env={"PATH": "/usr/bin:/bin", "NOTIFLOW_DATABASE_URL": NOWHERE},
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("usage: notiflow-seed")
    assert "unrecognized arguments" in done.stderr
    assert "seeded" not in done.stdout


def test_the_seed_command_explains_itself_without_seeding() -> None:
    done = subprocess.run(
        [SEED, "--help"],
        env={"PATH": "/usr/bin:/bin", "NOTIFLOW_DATABASE_URL": NOWHERE},
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 0, done.stderr
    assert "demo users alice, bob, carol and dave" in " ".join(done.stdout.split())
    assert "seeded" not in done.stdout
