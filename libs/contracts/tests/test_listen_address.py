"""HOST and PORT, where a service listens: which are taken, which refused, and
that a refusal comes before the service connects to anything, whether the value
is malformed or names an address the service cannot listen on."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlsplit

import httpx
import pytest

from contracts.runtime import listen, listen_host, listen_port
from contracts.settings import InvalidSetting, Settings
from tests.support.processes import BIN, free_port, has_ipv6_loopback

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


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port on 127.0.0.1 that another socket listens on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def test_a_port_another_socket_listens_on_is_refused_naming_port(
    taken_port: int,
) -> None:
    with pytest.raises(InvalidSetting) as refused:
        listen("127.0.0.1", taken_port)

    assert refused.value.name == "PORT"
    assert refused.value.problem == f"{taken_port} on 127.0.0.1 is already in use"


def test_an_address_this_machine_lacks_is_refused_naming_host() -> None:
    # 192.0.2.0/24 is set aside for documentation: no machine has it, and
    # binding to it sends nothing.
    with pytest.raises(InvalidSetting) as refused:
        listen("192.0.2.1", 18080)

    assert refused.value.name == "HOST"
    assert refused.value.problem == "192.0.2.1 is not an address of this machine"


def test_a_name_that_does_not_resolve_is_refused_naming_host(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def unknown(*args: object, **kwargs: object) -> list[object]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    # The resolver's answer is faked, so that no query leaves the machine.
    monkeypatch.setattr(socket, "getaddrinfo", unknown)
    with pytest.raises(InvalidSetting) as refused:
        listen("api.internal.example", 18080)

    assert refused.value.name == "HOST"
    assert refused.value.problem == (
        "api.internal.example does not resolve to an address: Name or service not known"
    )


def test_a_host_name_listens_on_each_address_it_stands_for() -> None:
    sockets = listen("localhost", 0)
    try:
        expected = {
            info[4][0]
            for info in socket.getaddrinfo("localhost", 0, type=socket.SOCK_STREAM)
        }
        assert {sock.getsockname()[0] for sock in sockets} == expected
        for sock in sockets:
            with socket.create_connection(sock.getsockname()[:2], timeout=5):
                pass
    finally:
        for sock in sockets:
            sock.close()


def dispatcher_env(settings: Settings, **listening: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HOST", "PORT")}
    return {
        **env,
        "NOTIFLOW_ENV": "test",
        "NOTIFLOW_DATABASE_URL": settings.database_url,
        "NOTIFLOW_AMQP_URL": settings.amqp_url,
        **listening,
    }


def queues(amqp_url: str) -> list[str]:
    """The queues of the URL's virtual host: the dispatcher declares its own
    as soon as it reaches the broker."""
    vhost = unquote(urlsplit(amqp_url).path.lstrip("/"))
    ctl = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    done = subprocess.run(
        [ctl, "-q", "list_queues", "-p", vhost, "name", "--formatter", "json"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return sorted(queue["name"] for queue in json.loads(done.stdout or "[]"))


@pytest.mark.integration
@pytest.mark.parametrize(
    ("listening", "line"),
    [
        (
            {"PORT": "taken"},
            "notiflow: invalid setting PORT: {port} on 127.0.0.1 is already in use",
        ),
        (
            {"HOST": "192.0.2.1"},
            "notiflow: invalid setting HOST: 192.0.2.1 is not an address of "
            "this machine",
        ),
    ],
    ids=["port in use", "address not on this machine"],
)
def test_an_address_a_service_cannot_listen_on_stops_it_before_it_connects(
    settings: Settings, taken_port: int, listening: dict[str, str], line: str
) -> None:
    if listening.get("PORT") == "taken":
        listening = {"PORT": str(taken_port)}
    done = subprocess.run(
        [str(BIN / "notiflow-dispatcher")],
        env=dispatcher_env(settings, **listening),
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.splitlines() == [line.format(port=taken_port)]
    assert "service.started" not in done.stdout
    assert queues(settings.amqp_url) == []


@pytest.mark.integration
def test_a_mistake_in_a_service_setting_is_reported_even_when_its_port_is_taken(
    settings: Settings, taken_port: int
) -> None:
    # The service's own settings say what is wrong whatever the machine's state:
    # an operator fixing the file should not first be sent after the port.
    done = subprocess.run(
        [str(BIN / "notiflow-dispatcher")],
        env=dispatcher_env(
            settings,
            PORT=str(taken_port),
            NOTIFLOW_CHANNEL_CONFIG="/nonexistent/channels.json",
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 2, done.stdout + done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith("notiflow: invalid setting NOTIFLOW_CHANNEL_CONFIG:"), line
    assert queues(settings.amqp_url) == []


@pytest.mark.integration
@pytest.mark.parametrize("host", ["::1", "localhost"])
def test_a_service_on_an_ipv6_address_or_a_host_name_answers_and_stops_on_sigterm(
    settings: Settings, tmp_path: Path, host: str
) -> None:
    if host == "::1" and not has_ipv6_loopback():
        pytest.skip("this machine has no IPv6 loopback")
    port = free_port("::1" if host == "::1" else "127.0.0.1")
    shown = f"[{host}]" if ":" in host else host
    log_path = tmp_path / "dispatcher.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [str(BIN / "notiflow-dispatcher")],
            env=dispatcher_env(settings, HOST=host, PORT=str(port)),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        answer = None
        deadline = time.monotonic() + 30
        while answer is None and process.poll() is None:
            if time.monotonic() > deadline:
                break
            try:
                answer = httpx.get(f"http://{shown}:{port}/healthz", timeout=1)
            except httpx.HTTPError:
                time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    log = log_path.read_text(errors="replace")

    assert answer is not None and answer.json() == {"status": "ok"}, log
    assert f"dispatcher listening on http://{shown}:{port}" in log
    # uvicorn raises again the SIGTERM it caught once it has shut down cleanly.
    assert code in (0, -signal.SIGTERM), log
    assert "Traceback" not in log
