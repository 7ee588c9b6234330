"""``make run`` leaves no service behind when it is told to stop, even when the
output it writes can no longer go anywhere."""

from __future__ import annotations

import email
import importlib.util
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import infra

pytestmark = pytest.mark.integration

DEVRUN = Path(__file__).parents[2] / "tools" / "devrun.py"
SERVICES = (
    "notiflow-comments",
    "notiflow-sse-gateway",
    "notiflow-dispatcher",
    "notiflow-email-sender",
)
SERVICE_PORTS = (8080, 8081, 8082, 8083, 8084)

# Stands in for a service: notes its pid, then waits to be stopped. It never answers
# /readyz, so the run stays in its wait for readiness until the signal comes.
STAND_IN = textwrap.dedent(
    """\
    #!{python}
    import os, sys, time
    from pathlib import Path
    Path(sys.argv[0] + ".pid").write_text(str(os.getpid()))
    time.sleep(120)
    """
)


def _taken(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def scripts(tmp_path: Path) -> Path:
    taken = [port for port in SERVICE_PORTS if _taken(port)]
    if taken:
        pytest.skip(f"a running `make run` holds port(s) {taken} on this machine")
    for name in ("notiflow-migrate", "notiflow-seed"):
        (tmp_path / name).write_text("#!/bin/sh\nexit 0\n")
    for name in SERVICES:
        (tmp_path / name).write_text(STAND_IN.format(python=sys.executable))
    for path in tmp_path.iterdir():
        path.chmod(0o755)
    return tmp_path


@pytest.fixture
def vhost() -> Iterator[str]:
    name = infra.create_vhost()
    yield name
    infra.delete_vhost(name)


def _make_run(scripts: Path, vhost: str, output: int) -> subprocess.Popen[bytes]:
    """The runner, starting the stand-ins in ``scripts``; its stdout and stderr
    to ``output``."""
    return subprocess.Popen(
        [sys.executable, str(DEVRUN), "--scripts", str(scripts)],
        env={
            "PATH": "/usr/bin:/bin",
            "NOTIFLOW_DATABASE_URL": infra.database_url(infra.unique("notiflow_run")),
            "NOTIFLOW_AMQP_URL": infra.amqp_url(vhost),
            # Elsewhere than this machine: no SMTP sink is started.
            "NOTIFLOW_SMTP_HOST": "smtp.invalid",
        },
        stdin=subprocess.DEVNULL,
        stdout=output,
        stderr=output,
    )


def _wait_for_pids(scripts: Path) -> list[int]:
    files = [scripts / f"{name}.pid" for name in SERVICES]
    deadline = time.monotonic() + 30
    while not all(f.exists() and f.read_text() for f in files):
        assert time.monotonic() < deadline, "the services were never started"
        time.sleep(0.1)
    return [int(f.read_text()) for f in files]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGHUP], ids=["INT", "HUP"])
def test_stopping_make_run_stops_every_service_when_its_output_is_gone(
    scripts: Path, vhost: str, signum: signal.Signals
) -> None:
    # As with `make run | tee run.log`: the same Ctrl-C ends the tee, and closing
    # the terminal ends both, so devrun's "stopping" line meets a broken pipe.
    run = _make_run(scripts, vhost, subprocess.PIPE)
    pids: list[int] = []
    try:
        pids = _wait_for_pids(scripts)
        assert run.poll() is None
        assert run.stdout is not None
        run.stdout.close()

        run.send_signal(signum)
        status = run.wait(timeout=30)
        leftover = [pid for pid in pids if _alive(pid)]
        assert run.stderr is not None
        errors = run.stderr.read().decode()
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        for stream in (run.stdout, run.stderr):
            if stream is not None:
                stream.close()

    assert leftover == []
    assert status == 0, errors
    assert "Traceback" not in errors
    assert "BrokenPipeError" not in errors


# Notes when SIGTERM reaches it and when it ends, taking ``sys.argv[2]`` seconds to
# stop, as a service draining its work would.
DRAINING = textwrap.dedent(
    """\
    import signal, sys, time
    from pathlib import Path
    log = Path(sys.argv[1])
    def stop(*_):
        log.write_text(f"{time.monotonic()}\\n")
        time.sleep(float(sys.argv[2]))
        log.write_text(log.read_text() + f"{time.monotonic()}\\n")
        sys.exit(0)
    signal.signal(signal.SIGTERM, stop)
    Path(sys.argv[1] + ".up").touch()
    time.sleep(120)
    """
)


def test_the_smtp_sink_stops_only_after_the_email_sender_has(tmp_path: Path) -> None:
    devrun = _load_devrun()
    children = devrun.Children(devrun.Console(io.StringIO()))
    script = tmp_path / "draining.py"
    script.write_text(DRAINING)
    for name, seconds in (("email-sender", "1.0"), (devrun.SINK, "0")):
        children.start(
            name,
            [sys.executable, str(script), str(tmp_path / name), seconds],
            dict(os.environ),
        )
    deadline = time.monotonic() + 10
    while not all(
        (tmp_path / f"{n}.up").exists() for n in ("email-sender", "smtp-sink")
    ):
        assert time.monotonic() < deadline, "the stand-ins did not start"
        time.sleep(0.05)

    killed = children.stop(devrun.StopRequest(), timeout=10)

    sender_ended = float((tmp_path / "email-sender").read_text().split()[1])
    sink_told = float((tmp_path / devrun.SINK).read_text().split()[0])
    assert killed == []
    assert sink_told >= sender_ended


def _load_devrun() -> Any:
    spec = importlib.util.spec_from_file_location("devrun_under_test", DEVRUN)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # as an import would, for its dataclasses
    spec.loader.exec_module(module)
    return module


def test_a_runner_killed_outright_takes_its_services_with_it(
    scripts: Path, vhost: str
) -> None:
    # SIGKILL, the OOM killer, an editor's hard stop: the runner stops nothing
    # itself, and the services lead process groups of their own.
    run = _make_run(scripts, vhost, subprocess.DEVNULL)
    pids: list[int] = []
    try:
        pids = _wait_for_pids(scripts)
        run.kill()
        run.wait(timeout=10)
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        leftover = [pid for pid in pids if _alive(pid)]
    finally:
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)

    assert leftover == []


def test_the_smtp_sink_makes_its_folders_again_when_they_are_removed(
    tmp_path: Path,
) -> None:
    devrun = _load_devrun()
    mail = tmp_path / "mail"
    sink = devrun.PipeliningMailbox(mail)
    message = email.message_from_string("Subject: one\n\nbody\n")
    sink.handle_message(message)
    shutil.rmtree(mail)  # as `make clean-mail` does while `make run` runs

    sink.handle_message(email.message_from_string("Subject: two\n\nbody\n"))

    assert len(list((mail / "new").iterdir())) == 1
