"""Settings a service refuses at start-up, naming them: a prefetch that cannot hold
one batch, a PORT that is no TCP port."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dispatcher.app import DispatcherSettings
from email_sender.app import EmailSettings
from sse_gateway.app import GatewaySettings


@pytest.mark.parametrize(
    ("settings", "prefix"),
    [
        (DispatcherSettings, "dispatcher"),
        (EmailSettings, "email"),
        (GatewaySettings, "sse"),
    ],
)
def test_a_prefetch_below_the_batch_size_is_refused_naming_both(
    settings: type, prefix: str
) -> None:
    with pytest.raises(ValueError) as refused:
        settings(**{f"{prefix}_prefetch": 5, f"{prefix}_batch_size": 6})

    message = str(refused.value)
    assert f"NOTIFLOW_{prefix.upper()}_PREFETCH (5)" in message
    assert f"NOTIFLOW_{prefix.upper()}_BATCH_SIZE (6)" in message


def test_the_email_sender_exits_2_on_a_prefetch_below_its_batch() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "email_sender"],
        env={
            "PATH": "/usr/bin:/bin",
            "NOTIFLOW_EMAIL_PREFETCH": "5",
            "NOTIFLOW_EMAIL_BATCH_SIZE": "25",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 2, done.stderr
    assert "NOTIFLOW_EMAIL_PREFETCH (5) must be at least" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("port", ["abc", "0", "70000"])
def test_a_port_that_is_no_tcp_port_is_refused_by_name(port: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "comments"],
        env={"PATH": "/usr/bin:/bin", "PORT": port},
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 2, done.stderr
    assert (
        f"invalid setting PORT: must be a TCP port from 1 to 65535, got {port!r}"
        in (done.stderr)
    )
    assert "Traceback" not in done.stderr
