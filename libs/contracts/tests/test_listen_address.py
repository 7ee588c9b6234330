"""HOST and PORT, where a service listens: which are taken, which refused, and
that a refusal comes before the service connects to anything."""

from __future__ import annotations

import subprocess
import sys

import pytest

from contracts.runtime import listen_host, listen_port
from contracts.settings import InvalidSetting

# A service entrypoint whose app must never be built, reaching nothing: both
# servers are on a port where nothing listens, which would be reported if the
# service tried them before judging HOST and PORT.
SERVE = (
    "from contracts.runtime import serve\n"
    "def never():\n"
    "    raise SystemExit('the app was built')\n"
    "serve(never, 'probe', default_port=18080)\n"
)
UNREACHABLE = {
    "PATH": "/usr/bin:/bin",
    "NOTIFLOW_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/x",
    "NOTIFLOW_AMQP_URL": "amqp://guest:guest@127.0.0.1:1/",
}


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "0.0.0.0",
        "::",
        "::1",
        "fe80::1%eth0",
        "localhost",
        "api-1.internal.example",
        "xn--bcher-kva.example",
    ],
)
def test_an_ip_address_or_host_name_is_taken_as_the_listening_host(
    host: str,
) -> None:
    assert listen_host(host) == host


def test_an_unset_host_listens_on_loopback() -> None:
    assert listen_host(None) == "127.0.0.1"


@pytest.mark.parametrize(
    ("host", "complaint"),
    [
        ("not_a_host!!", "must be an IP address or a host name"),
        ("api example", "must be an IP address or a host name"),
        ("-api.example", "must be an IP address or a host name"),
        ("api..example", "must be an IP address or a host name"),
        ("http://api.example", "must be an IP address or a host name"),
        ("api.example:8080", "must be an IP address or a host name"),
        ("999.0.0.1", "must be an IP address or a host name"),
        ("127.1", "must be an IP address or a host name"),
        ("localhost.", "must be an IP address or a host name"),
        ("a" * 64 + ".example", "must be an IP address or a host name"),
        ("bücher.example", "must be an IP address or a host name"),
        ("[::1]", "write an IPv6 address without [ ]"),
        ("", "is empty"),
    ],
)
def test_a_host_that_is_no_address_or_name_is_refused_naming_host(
    host: str, complaint: str
) -> None:
    with pytest.raises(InvalidSetting) as refused:
        listen_host(host)

    assert refused.value.name == "HOST"
    assert complaint in refused.value.problem


@pytest.mark.parametrize(("port", "taken"), [(None, 18080), ("1", 1), ("65535", 65535)])
def test_a_tcp_port_or_none_is_taken_as_the_listening_port(
    port: str | None, taken: int
) -> None:
    assert listen_port(port, 18080) == taken


@pytest.mark.parametrize("port", ["", " 8080", "0", "65536", "-1", "8o80", "\u00b2"])
def test_a_port_that_is_empty_or_no_tcp_port_is_refused_naming_port(
    port: str,
) -> None:
    with pytest.raises(InvalidSetting) as refused:
        listen_port(port, 18080)

    assert refused.value.name == "PORT"
    assert "a TCP port from 1 to 65535" in refused.value.problem


@pytest.mark.parametrize(
    ("env", "line"),
    [
        (
            {"HOST": "not_a_host!!"},
            "notiflow: invalid setting HOST: must be an IP address or a host name "
            "(letters, digits, hyphens and dots), got 'not_a_host!!'",
        ),
        (
            {"PORT": ""},
            "notiflow: invalid setting PORT: is empty; give a TCP port from 1 to "
            "65535, or unset it for 18080",
        ),
        (
            {"PORT": "99999"},
            "notiflow: invalid setting PORT: must be a TCP port from 1 to 65535, "
            "got '99999'",
        ),
    ],
)
def test_a_listening_address_it_cannot_use_stops_a_service_before_it_connects(
    env: dict[str, str], line: str
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", SERVE],
        env={**UNREACHABLE, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [line]
