"""CPU and wall time to send emails through the email sender's pool, pipelined or not.

The bench's counting sink (:mod:`bench.sink`) runs in a child process, offering
PIPELINING or not, so the CPU time measured here is the sending side's alone: the
pool, aiosmtplib and the event loop. The child reports its own CPU time too, since a
round trip saved is a wake-up saved on both ends. Messages are built beforehand, so
building them costs nothing here; each round opens its connections first, so
connecting costs nothing either. Rounds alternate between the two servers and the
median of each is shown.

    uv run --no-sync python bench/smtp_pipelining.py
    uv run --no-sync python bench/smtp_pipelining.py --emails 5000 --in-flight 1,25
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.sink import CountingSink  # noqa: E402
from email_sender import mime  # noqa: E402
from email_sender.smtp import SmtpConfig, SmtpPool  # noqa: E402

MODES = {"pipelined": True, "one command at a time": False}


@dataclass(frozen=True)
class Round:
    wall: float
    cpu: float
    sink_cpu: float


def _sink(port: int, pipelining: bool) -> None:
    """The child: serve, take CPU time at ``mark``, report it when stdin closes."""
    with CountingSink(port, pipelining=pipelining) as sink:
        print("ready", flush=True)
        marked = 0.0
        for line in sys.stdin:
            marked = time.process_time()
            print(line.strip(), flush=True)
        cpu = time.process_time() - marked
        arrived = len(sink.arrivals)
    print(json.dumps({"arrived": arrived, "cpu": cpu}), flush=True)


class SinkProcess:
    """The counting sink in a child process of its own, on a free port."""

    def __init__(self, pipelining: bool) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        argv = [sys.executable, __file__, "--sink", str(self.port)]
        argv += ["--pipelining"] if pipelining else []
        self._child = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self._expect("ready")

    def mark(self) -> None:
        """From now on the child counts its CPU time."""
        assert self._child.stdin is not None
        self._child.stdin.write("mark\n")
        self._child.stdin.flush()
        self._expect("mark")

    def stop(self) -> dict[str, float]:
        """What arrived and the child's CPU seconds since :meth:`mark`."""
        out, _ = self._child.communicate("", timeout=30)
        return json.loads(out.strip().splitlines()[-1])

    def kill(self) -> None:
        self._child.kill()
        self._child.wait()

    def _expect(self, word: str) -> None:
        assert self._child.stdout is not None
        if self._child.stdout.readline().strip() != word:
            self.kill()
            raise RuntimeError(f"the SMTP sink did not say {word!r}")


async def one_round(pipelining: bool, mails: list[mime.Mail], in_flight: int) -> Round:
    sink = SinkProcess(pipelining)
    try:
        config = SmtpConfig("127.0.0.1", sink.port, timeout=10)
        pool = SmtpPool(config, size=in_flight)
        # Open every connection before timing: connecting is not what differs.
        await asyncio.gather(*(pool.send(m) for m in mails[:in_flight]))
        sink.mark()

        cpu, wall = time.process_time(), time.perf_counter()
        await asyncio.gather(*(pool.send(m) for m in mails[in_flight:]))
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        await pool.close()
        report = sink.stop()
    except BaseException:
        sink.kill()
        raise
    if report["arrived"] != len(mails):
        raise RuntimeError(f"{report['arrived']} of {len(mails)} emails arrived")
    return Round(wall=wall, cpu=cpu, sink_cpu=report["cpu"])


def build(count: int) -> list[mime.Mail]:
    return [
        mime.build(
            notification_id=n,
            to_address=f"user{n % 50}@example.com",
            to_name="A User",
            subject="Alice replied to your post",
            text="Alice replied: sounds good, see you on Friday.",
            html="<p>Alice replied: sounds good, see you on Friday.</p>",
            sender="notifications@notiflow.example.com",
            sender_name="notiflow",
            domain="notiflow.example.com",
        )
        for n in range(count)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--emails", type=int, default=3000)
    parser.add_argument("--in-flight", default="1,25", help="comma-separated")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sink", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--pipelining", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sink:
        _sink(args.sink, pipelining=args.pipelining)
        return

    print(f"{args.emails} emails a round, median of {args.rounds} rounds")
    print(
        f"{'server':<22} {'in flight':>9} {'wall s':>8} {'emails/s':>9} "
        f"{'sender CPU µs/email':>20} {'sink CPU µs/email':>18}"
    )
    for in_flight in (int(n) for n in args.in_flight.split(",")):
        mails = build(args.emails + in_flight)
        rounds: dict[str, list[Round]] = {mode: [] for mode in MODES}
        for _ in range(args.rounds):
            for mode, pipelining in MODES.items():
                rounds[mode].append(
                    asyncio.run(one_round(pipelining, mails, in_flight))
                )
        for mode, taken in rounds.items():
            wall = statistics.median(r.wall for r in taken)
            cpu = statistics.median(r.cpu for r in taken)
            sink_cpu = statistics.median(r.sink_cpu for r in taken)
            print(
                f"{mode:<22} {in_flight:>9} {wall:>8.2f} {args.emails / wall:>9.0f} "
                f"{cpu / args.emails * 1e6:>20.0f} "
                f"{sink_cpu / args.emails * 1e6:>18.0f}"
            )


if __name__ == "__main__":
    main()
