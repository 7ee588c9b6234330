"""``make run``: the whole platform on this machine, in one terminal.

The steps, in order:

1. PostgreSQL and RabbitMQ must answer; for each one that does not, say where it was
   looked for and how to start it, then exit with status 2.
2. Apply the migrations and seed the demo users. Both are safe to repeat.
3. Start an SMTP sink that keeps every message as a file under ``var/mail/new``, then
   every service. Each child leads a process group of its own, so Ctrl-C in the
   terminal reaches this script and not them; it stops them in order (SIGTERM, then
   SIGKILL for any still there after 15 s) instead of letting them die mid-request.
   Closing the terminal (SIGHUP) and SIGTERM stop them the same way.
4. Wait until each service answers ``GET /readyz`` with 200, then say where it listens.

Every line a child prints is shown behind its name. When one child exits on its own the
others are stopped as well and the exit status is 1: a platform with a piece missing
only looks like it works.

The signal handler only notes the time: everything else happens in the main loop,
which polls. Taking a lock inside a handler could deadlock against the very code it
interrupted.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import IO

from aiosmtpd.handlers import Mailbox
from aiosmtpd.smtp import SMTP, Envelope, Session

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
MAIL_DIR = REPO / "var" / "mail"
LOOPBACK = "127.0.0.1"

READY_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
POLL_SECONDS = 0.2
SAME_REQUEST_SECONDS = 1.0

EXIT_PREFLIGHT = 2


@dataclass(frozen=True)
class Service:
    name: str
    script: str
    port: int
    optional: bool = False


SERVICES = (
    Service("comments", "notiflow-comments", 8080),
    Service("sse-gateway", "notiflow-sse-gateway", 8081),
    Service("dispatcher", "notiflow-dispatcher", 8082),
    Service("email-sender", "notiflow-email-sender", 8083),
    Service("push-sender", "notiflow-push-sender", 8084, optional=True),
)

SINK = "smtp-sink"
SELF = "devrun"
WIDTH = max(len(name) for name in (SINK, SELF, *(s.name for s in SERVICES)))
# The same colour for a name on every run; devrun's own lines are bold.
COLOURS = dict(
    zip(
        ("migrate", "seed", SINK, *(s.name for s in SERVICES)),
        ("36", "36", "90", "32", "35", "33", "34", "96"),
        strict=True,
    )
)


class PipeliningMailbox(Mailbox):
    """aiosmtpd's Maildir handler, offering PIPELINING (RFC 2920) as real relays do.

    The email sender then sends MAIL, RCPT and DATA in one write, as it does to
    Postfix or Exim; aiosmtpd reads commands line by line, so it takes them so.
    """

    def handle_message(self, message: Message) -> None:
        # Its folders may have been removed while it ran (`make clean-mail`): a
        # message it cannot store is refused for good, so they are made again.
        for folder in ("new", "cur", "tmp"):
            os.makedirs(os.path.join(self.mail_dir, folder), exist_ok=True)
        super().handle_message(message)

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        # aiosmtpd leaves the session's host name to a handler with this hook.
        session.host_name = hostname
        responses.insert(-1, "250-PIPELINING")
        return responses


class Failed(Exception):
    """Start-up cannot go on; the message says why and the status is the exit code."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


class Console:
    """Writes whole lines to stdout, each behind a fixed-width name.

    The names are coloured only on a terminal, and never when ``NO_COLOR`` is set.
    Once stdout is gone (the ``tee`` it was piped into stopped with the same Ctrl-C,
    or the terminal closed), lines are dropped: the children still have to be stopped,
    and their output still read so that none blocks on a full pipe.
    """

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self._colour = stream.isatty() and not os.environ.get("NO_COLOR")
        self._tags: dict[str, str] = {}
        self._gone = False

    def _tag(self, name: str) -> str:
        tag = self._tags.get(name)
        if tag is None:
            tag = f"{name:<{WIDTH}} |"
            if self._colour:
                tag = f"\033[{COLOURS.get(name, '1')}m{tag}\033[0m"
            self._tags[name] = tag
        return tag

    def say(self, name: str, text: str) -> None:
        self._write(f"{self._tag(name)} {text}\n")

    def plain(self, text: str) -> None:
        self._write(text + "\n")

    def _write(self, text: str) -> None:
        with self._lock:
            if self._gone:
                return
            try:
                self._stream.write(text)
                self._stream.flush()
            except OSError:
                self._gone = True
                _silence(self._stream)


def _silence(stream: IO[str]) -> None:
    """Point a dead stream's descriptor at /dev/null.

    What is left in its buffer then goes nowhere, instead of failing again when the
    interpreter flushes it at exit.
    """
    try:
        fd = stream.fileno()
    except (OSError, ValueError):
        return
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, fd)
    finally:
        os.close(null)


class StopRequest:
    """Handles SIGINT, SIGTERM and SIGHUP: the first asks for a stop, a later one for
    haste. SIGHUP is the terminal closing; the children, in groups of their own, would
    not hear of it and be left running.

    One Ctrl-C can arrive twice, from the terminal and again from a wrapper such as
    ``uv run`` that forwards it, so signals within a second of the first count as
    that same request.
    """

    def __init__(self) -> None:
        self.first: float | None = None
        self.hurry = False

    def __call__(self, signum: int, frame: object) -> None:
        now = time.monotonic()
        if self.first is None:
            self.first = now
        elif now - self.first > SAME_REQUEST_SECONDS:
            self.hurry = True

    def install(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, self)

    @property
    def requested(self) -> bool:
        return self.first is not None

    def sleep(self, seconds: float) -> None:
        """Sleep in short steps, returning early once a stop was asked for."""
        until = time.monotonic() + seconds
        while not self.requested and (left := until - time.monotonic()) > 0:
            time.sleep(min(left, POLL_SECONDS))


class Children:
    """The long-running child processes, each the leader of its own process group."""

    def __init__(self, console: Console) -> None:
        self._console = console
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._pumps: list[threading.Thread] = []

    def start(self, name: str, argv: Sequence[str], env: dict[str, str]) -> None:
        proc = subprocess.Popen(
            argv,
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            process_group=0,
            preexec_fn=_die_with_runner,
        )
        self._procs[name] = proc
        pump = threading.Thread(
            target=self._pump,
            args=(name, proc.stdout),
            name=f"pump-{name}",
            daemon=True,
        )
        pump.start()
        self._pumps.append(pump)

    def _pump(self, name: str, stream: IO[bytes]) -> None:
        with stream:
            for raw in iter(stream.readline, b""):
                line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
                self._console.say(name, line)

    def running(self) -> bool:
        return any(proc.poll() is None for proc in self._procs.values())

    def exited(self) -> tuple[str, int] | None:
        """The first child found to have exited, with its status, if there is one."""
        for name, proc in self._procs.items():
            status = proc.poll()
            if status is not None:
                return name, status
        return None

    def stop(
        self,
        stop: StopRequest,
        timeout: float = STOP_TIMEOUT,
        last: Sequence[str] = (SINK,),
    ) -> list[str]:
        """SIGTERM every group, those named in ``last`` once the others have ended;
        SIGKILL what is left at the deadline; the killed.

        The SMTP sink stops last, so that the email sender's drain finishes the
        emails it is sending: stopped together, they would fail, and one the sink
        had taken but not answered would be sent again.
        """
        running = {n: p for n, p in self._procs.items() if p.poll() is None}
        deadline = time.monotonic() + timeout
        first = {n: p for n, p in running.items() if n not in last}
        for wave in (first, {n: p for n, p in running.items() if n in last}):
            for proc in wave.values():
                _signal_group(proc, signal.SIGTERM)
            while time.monotonic() < deadline and not stop.hurry:
                if all(proc.poll() is not None for proc in wave.values()):
                    break
                time.sleep(POLL_SECONDS / 2)

        killed = [name for name, proc in running.items() if proc.poll() is None]
        for name in killed:
            _signal_group(running[name], signal.SIGKILL)
            running[name].wait()
        for pump in self._pumps:
            pump.join(timeout=2)
        return killed


# prctl's option that has the kernel signal a process when its parent dies.
_PR_SET_PDEATHSIG = 1


def _die_with_runner() -> None:
    """In a child, before it starts: be sent SIGTERM when this runner dies.

    A runner killed outright (SIGKILL, the OOM killer, an editor's hard stop)
    stops nothing itself, and each child leads a process group of its own, so no
    terminal's hang-up reaches them either: they would run on, holding the
    ports the next ``make run`` needs. Linux only; elsewhere nothing is done.
    """
    if sys.platform != "linux":
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _signal_group(proc: subprocess.Popen[bytes], signum: int) -> None:
    # The leader has not been reaped (poll() said so), so its pid, which is also the
    # group id, cannot have been handed to another process meanwhile.
    try:
        os.killpg(proc.pid, signum)
    except ProcessLookupError:
        pass


def describe_status(status: int) -> str:
    if status < 0:
        try:
            return f"was killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"was killed by signal {-status}"
    return f"exited with status {status}"


def preflight() -> None:
    from pydantic import ValidationError

    from contracts.preflight import problems
    from contracts.settings import describe, get_settings

    try:
        settings = get_settings()
    except ValidationError as exc:
        raise Failed(
            f"the settings are not valid:\n{describe(exc)}", EXIT_PREFLIGHT
        ) from None
    found = problems(settings)
    if found:
        raise Failed("\n".join(found), EXIT_PREFLIGHT)


def check_smtp_port(value: str) -> None:
    """Refuse a ``NOTIFLOW_SMTP_PORT`` that no sink could listen on, naming it."""
    # isdigit alone takes characters such as "²" that int() refuses.
    if value.isascii() and value.isdigit() and 1 <= int(value) <= 65535:
        return
    raise Failed(
        f"invalid setting NOTIFLOW_SMTP_PORT: must be a TCP port from 1 to 65535, "
        f"got {value!r}",
        EXIT_PREFLIGHT,
    )


def run_once(console: Console, label: str, script: Path, stop: StopRequest) -> None:
    """Run a one-shot command to the end, showing its output behind its name."""
    result = subprocess.run(
        [str(script)],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        check=False,
    )
    if stop.requested:
        return
    for line in result.stdout.decode("utf-8", errors="replace").splitlines():
        console.say(label, line)
    if result.returncode != 0:
        status = result.returncode if result.returncode > 0 else 1
        raise Failed(f"{script.name} {describe_status(result.returncode)}", status)


def port_taken(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((LOOPBACK, port)) == 0


# Straight to loopback, whatever http_proxy says.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def probe_ready(port: int) -> str | None:
    """None when ``/readyz`` answers 200, otherwise what it answered instead."""
    try:
        with _opener.open(f"http://{LOOPBACK}:{port}/readyz", timeout=2) as resp:
            return None if resp.status == 200 else f"HTTP {resp.status}"
    except urllib.error.HTTPError as exc:
        body = exc.read(300).decode("utf-8", errors="replace").strip()
        return f"HTTP {exc.code} {body}".strip()
    except urllib.error.URLError as exc:
        return str(exc.reason)
    except OSError as exc:
        return str(exc)


class DevRun:
    def __init__(self, scripts: Path, ready_timeout: float) -> None:
        self.scripts = scripts
        self.ready_timeout = ready_timeout
        self.console = Console(sys.stdout)
        self.children = Children(self.console)
        self.stop = StopRequest()

        # The email sender reads these too; they are passed on to it untouched.
        self.smtp_host = os.environ.get("NOTIFLOW_SMTP_HOST", LOOPBACK)
        self.smtp_port = os.environ.get("NOTIFLOW_SMTP_PORT", "1025")
        # Pointed at a real relay elsewhere: then there is nothing to sink.
        self.want_sink = self.smtp_host in (LOOPBACK, "localhost")

    def say(self, text: str) -> None:
        self.console.say(SELF, text)

    def script(self, name: str) -> Path:
        path = self.scripts / name
        if not path.exists():
            raise Failed(f"{path} is missing; `make install` puts it there")
        return path

    def services(self) -> list[Service]:
        return [
            s for s in SERVICES if not s.optional or (self.scripts / s.script).exists()
        ]

    def main(self) -> int:
        self.stop.install()
        try:
            return self._run()
        except Failed as exc:
            try:
                for line in str(exc).splitlines():
                    print(f"{SELF}: {line}", file=sys.stderr, flush=True)
            except OSError:
                _silence(sys.stderr)
            return exc.status
        finally:
            if self.stop.requested and self.children.running():
                self.say(f"stopping, {STOP_TIMEOUT:.0f} s at most; Ctrl-C again kills")
            killed = self.children.stop(self.stop)
            if killed:
                self.say(f"killed, as they had not stopped: {', '.join(killed)}")

    def _run(self) -> int:
        check_smtp_port(self.smtp_port)
        preflight()
        services = self.services()
        steps = [
            ("migrate", self.script("notiflow-migrate")),
            ("seed", self.script("notiflow-seed")),
        ]
        commands = {s.name: self.script(s.script) for s in services}
        ports = [(s.name, s.port) for s in services]
        if self.want_sink:
            ports.insert(0, (SINK, int(self.smtp_port)))
        for name, port in ports:
            if port_taken(port):
                raise Failed(
                    f"port {port}, meant for {name}, is taken on {LOOPBACK}; is an "
                    f"earlier `make run` still up? `ss -ltnp 'sport = :{port}'` "
                    f"names the process"
                )

        for label, script in steps:
            run_once(self.console, label, script, self.stop)
            if self.stop.requested:
                return 0

        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if self.want_sink:
            self._start_sink(env)
            # The sink takes any name in EHLO; without one, the email sender
            # warns of the host's own when it is not fully qualified.
            env.setdefault("NOTIFLOW_SMTP_HELO_NAME", "notiflow.localhost")
        for service in services:
            service_env = dict(env, HOST=LOOPBACK, PORT=str(service.port))
            argv = [str(commands[service.name])]
            self.children.start(service.name, argv, service_env)

        unready = self._wait_ready(services)
        if self.stop.requested:
            return 0
        if (gone := self.children.exited()) is not None:
            return self._report_exit(*gone)
        if unready:
            for name, answer in unready.items():
                self.say(f"{name} did not answer 200 on /readyz: {answer}")
            raise Failed(
                f"not ready after {self.ready_timeout:.0f} s: {', '.join(unready)}; "
                f"stopping everything"
            )

        self._print_summary(services)
        while not self.stop.requested:
            if (gone := self.children.exited()) is not None:
                return self._report_exit(*gone)
            time.sleep(POLL_SECONDS)
        return 0

    def _start_sink(self, env: dict[str, str]) -> None:
        # mailbox.Maildir makes its tmp/new/cur only when it creates the folder itself,
        # and a message then fails with "No such file" if the folder alone was there.
        for part in ("tmp", "new", "cur"):
            (MAIL_DIR / part).mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "aiosmtpd", "-n"]
        argv += ["-l", f"{LOOPBACK}:{self.smtp_port}"]
        argv += ["-c", "devrun.PipeliningMailbox", str(MAIL_DIR)]
        # The sink imports its handler from this file.
        path = os.pathsep.join(filter(None, [str(TOOLS), env.get("PYTHONPATH")]))
        self.children.start(SINK, argv, dict(env, PYTHONPATH=path))

        # The email sender may check its relay when it starts; have the sink up first.
        deadline = time.monotonic() + 10
        while not port_taken(int(self.smtp_port)):
            if self.stop.requested or self.children.exited():
                return
            if time.monotonic() > deadline:
                raise Failed(f"the SMTP sink did not listen on port {self.smtp_port}")
            time.sleep(POLL_SECONDS / 2)

    def _wait_ready(self, services: list[Service]) -> dict[str, str]:
        """Poll each ``/readyz`` until all answer 200; those that never did, and why."""
        pending = {s.name: s.port for s in services}
        answers = dict.fromkeys(pending, "no answer yet")
        deadline = time.monotonic() + self.ready_timeout
        while pending and time.monotonic() < deadline:
            if self.stop.requested or self.children.exited():
                break
            for name, port in list(pending.items()):
                answer = probe_ready(port)
                if answer is None:
                    del pending[name]
                else:
                    answers[name] = answer
            self.stop.sleep(0.25)
        return {name: answers[name] for name in pending}

    def _report_exit(self, name: str, status: int) -> int:
        self.say(f"{name} {describe_status(status)}; stopping the others")
        return 1

    def _print_summary(self, services: list[Service]) -> None:
        url = {s.name: f"http://{LOOPBACK}:{s.port}" for s in services}
        rows = [
            ("comments API", url["comments"]),
            ("SSE gateway", url["sse-gateway"] + "/sse"),
            ("web page", url["sse-gateway"] + "/"),
            ("dispatcher", url["dispatcher"] + "/readyz"),
            ("email sender", url["email-sender"] + "/readyz"),
        ]
        if "push-sender" in url:
            rows.append(("push sender", url["push-sender"] + "/readyz"))
        if self.want_sink:
            rows.append(
                (
                    "SMTP sink",
                    f"{LOOPBACK}:{self.smtp_port}, one file a message under "
                    f"{MAIL_DIR.relative_to(REPO)}/new",
                )
            )
        else:
            rows.append(("SMTP relay", f"{self.smtp_host}:{self.smtp_port} (no sink)"))

        lines = ["", "notiflow is up:"]
        lines += [f"  {label:<14}{where}" for label, where in rows]
        lines += [
            "",
            "a bearer token for a demo user: make token USER=bob",
            "(users: alice bob carol dave). Ctrl-C stops everything.",
            "",
        ]
        self.console.plain("\n".join(lines))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run notiflow on this machine: migrate, seed, start everything."
    )
    parser.add_argument(
        "--scripts",
        type=Path,
        default=Path(sys.executable).parent,
        help="where the notiflow-* commands are (default: next to this Python)",
    )
    parser.add_argument(
        "--ready-timeout",
        type=float,
        default=READY_TIMEOUT,
        metavar="SECONDS",
        help="how long the services may take, all told, to answer 200 on /readyz",
    )
    args = parser.parse_args(argv)
    return DevRun(args.scripts, args.ready_timeout).main()


if __name__ == "__main__":
    sys.exit(main())
