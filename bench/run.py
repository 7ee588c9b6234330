"""``make bench``: how much the platform carries on this machine, and what it costs.

Starts the platform on a private database and virtual host (or uses a running one,
given ``--comments-url`` and the rest), measures the machine's own floors, then
offers comments at rising fixed rates until the platform stops keeping up, and
measures latency again at half the best sustained rate. Prints a report, writes
bench/results/latest.json and a chart beside it. See docs/performance.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, Python puts bench/ first on the path; the repository root is what
# makes ``bench``, ``contracts`` and ``tests`` importable as packages.
ROOT = Path(__file__).resolve().parent.parent
if sys.path and Path(sys.path[0]).resolve() == ROOT / "bench":
    sys.path[0] = str(ROOT)

import argparse  # noqa: E402
import asyncio  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

from bench import (  # noqa: E402
    baselines,
    batches,
    chart,
    http1,
    load,
    pyspy,
    report,
    stages,
    system,
)
from bench.sink import CountingSink  # noqa: E402
from bench.stack import Platform, smtp_port_for_own_platform  # noqa: E402
from contracts.settings import Settings  # noqa: E402
from tests.support.processes import free_port  # noqa: E402

RESULTS = ROOT / "bench" / "results"
DRAIN_LIMIT_S = 60.0
DRAIN_IDLE_S = 10.0
SETTLE_LIMIT_S = 120.0
# Seconds without a new arrival before a step may start.
SETTLE_QUIET_S = 1.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=20.0, help="seconds a step")
    parser.add_argument(
        "--rates",
        default="25,50,75,100,150,200,300,500",
        help="comments per second of each step, comma-separated, rising",
    )
    parser.add_argument(
        "--max-p99-ms",
        type=float,
        default=2000.0,
        help="a step whose SSE or email p99 is above this is not sustained",
    )
    parser.add_argument("--connections", type=int, default=64, help="HTTP pool size")
    parser.add_argument(
        "--max-in-flight", type=int, default=1000, help="requests in flight at most"
    )
    parser.add_argument("--skip-baselines", action="store_true")
    parser.add_argument(
        "--profile-at",
        type=float,
        help="record every service with py-spy during the step at this rate",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "latest.json")
    external = parser.add_argument_group(
        "a running platform (all of these, instead of starting one)"
    )
    external.add_argument("--comments-url")
    external.add_argument("--sse-url")
    external.add_argument("--database-url")
    external.add_argument("--amqp-url")
    external.add_argument(
        "--smtp-port",
        type=int,
        help="where its email sender delivers; the sink binds it",
    )
    external.add_argument(
        "--pid", action="append", default=[], help="NAME=PID of a service, for CPU"
    )
    args = parser.parse_args(argv)
    args.rates = [float(r) for r in args.rates.split(",") if r.strip()]
    if not args.rates or any(r <= 0 for r in args.rates):
        parser.error(f"--rates must be positive numbers, got {args.rates!r}")
    if args.duration <= 0:
        parser.error("--duration must be positive")
    given = [args.comments_url, args.sse_url, args.database_url, args.amqp_url]
    if any(given) and not (all(given) and args.smtp_port):
        parser.error(
            "a running platform needs --comments-url, --sse-url, --database-url, "
            "--amqp-url and --smtp-port together"
        )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = Settings()
    if args.comments_url:
        pids = dict(p.split("=", 1) for p in args.pid)
        platform = Platform.external(
            args.comments_url,
            args.sse_url,
            args.database_url,
            args.amqp_url,
            args.smtp_port,
            {k: int(v) for k, v in pids.items()},
        )
    else:
        print("starting the platform on a private database and vhost…", flush=True)
        platform = Platform.start(
            smtp_port_for_own_platform(),
            {"NOTIFLOW_SECRET_KEY": settings.secret_key},
        )
    try:
        with CountingSink(platform.smtp_port) as sink:
            result = asyncio.run(run(args, platform, sink, settings))
    except BaseException:
        for name, tail in platform.logs().items():
            if tail.strip():
                print(f"--- {name} log (tail) ---\n{tail[-1500:]}", file=sys.stderr)
        raise
    finally:
        platform.close()

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    png = chart.draw(result, args.out.with_suffix(".png"))
    print()
    print(report.format_text(result))
    if result.get("profile"):
        print()
        print(pyspy.format_text(result["profile"]))
    print(f"\nwrote {_rel(args.out)} and {_rel(png)}")
    return 0


def _rel(path: Path) -> str:
    with contextlib.suppress(ValueError):
        return str(path.resolve().relative_to(ROOT))
    return str(path)


async def run(
    args: argparse.Namespace, platform: Platform, sink: CountingSink, settings: Settings
) -> dict[str, Any]:
    machine = await system.describe(platform.database_url, platform.amqp_url)
    print(
        f"machine: {machine['cores']} cores, {machine['memory_gib']} GiB, "
        f"load {machine['load_average_at_start']}, PostgreSQL autovacuum "
        f"{machine['postgresql_autovacuum']}",
        flush=True,
    )
    found_baselines: dict[str, float | None] = dict.fromkeys(
        (
            "broker_msgs_per_s",
            "pg_commits_per_s",
            "notify_rtt_us",
            "asgi_requests_per_s",
        )
    )
    if not args.skip_baselines:
        print("measuring baselines…", flush=True)
        found_baselines = await baselines.measure(
            platform.database_url, platform.amqp_url, free_port()
        )
        print(f"baselines: {found_baselines}", flush=True)

    cast = await load.create_users(platform.database_url, settings)
    async with (
        load.Streams(platform.sse_url, cast) as streams,
        load.QueueWatch(platform.amqp_url, platform.database_url) as watch,
        http1.Pool(platform.comments_url, args.connections, timeout=30) as pool,
    ):
        bench = Bench(args, platform, sink, streams, watch, pool, cast)
        # A short unreported step: pools fill, code paths warm up.
        await bench.step(min(args.rates) / 2, min(3.0, args.duration), "warmup")

        steps: list[dict[str, Any]] = []
        for rate in args.rates:
            summary = await bench.step(rate, args.duration, "ramp")
            steps.append(summary)
            if not summary["stable"]:
                break
        half = report.half_rate(steps, args.rates)
        steps.append(await bench.step(half, args.duration, "half"))

    result = report.build(
        steps,
        found_baselines,
        machine,
        {
            "duration_s": args.duration,
            "rates": args.rates,
            "max_p99_ms": args.max_p99_ms,
            "connections": args.connections,
            "sse_disconnects": streams.disconnects,
            "smtp_unparsed": sink.unparsed,
            "own_platform": platform.owned_database is not None,
        },
    )
    if bench.profiles:
        result["profile"] = bench.profiles
    return result


class Bench:
    def __init__(
        self,
        args: argparse.Namespace,
        platform: Platform,
        sink: CountingSink,
        streams: load.Streams,
        watch: load.QueueWatch,
        pool: http1.Pool,
        cast: load.Cast,
    ) -> None:
        self.args = args
        self.platform = platform
        self.sink = sink
        self.streams = streams
        self.watch = watch
        self.pool = pool
        self.cast = cast
        self.profiles: dict[str, dict[str, Any]] = {}

    async def settle(self) -> None:
        """Wait (bounded) until every queue and outbox is empty and nothing more
        arrives.

        A queue's depth counts only the messages waiting in it, not those its
        consumers have taken and not yet acked (up to their prefetch each), so after
        an overloaded step the queues look empty while deliveries still arrive. A
        step measured then would be charged for the previous one's backlog.
        """
        deadline = time.perf_counter() + SETTLE_LIMIT_S
        last: object = None
        arrived = -1
        quiet_since = time.perf_counter()
        while time.perf_counter() < deadline:
            now = time.perf_counter()
            count = len(self.streams.arrivals) + len(self.sink.arrivals)
            if count != arrived:
                arrived, quiet_since = count, now
            try:
                last = await self.watch.depths()
            except Exception as exc:
                last = exc
            else:
                if not any(last.values()) and now - quiet_since >= SETTLE_QUIET_S:
                    return
            await asyncio.sleep(0.25)
        print(
            f"the platform did not settle in {SETTLE_LIMIT_S:.0f} s: {last!r}",
            flush=True,
        )

    async def _process_groups(self) -> dict[str, list[int]]:
        groups = {name: [pid] for name, pid in self.platform.pids.items()}
        groups["bench"] = [os.getpid()]
        groups["postgres"] = await system.backend_pids(self.watch.db)
        groups["rabbitmq"] = system.pids_named("beam.smp")
        return groups

    async def vacuum(self) -> None:
        """Clear the dead rows earlier steps left, as autovacuum would in production.

        The outbox's rows are deleted as fast as they are written and each
        notification row is updated two or three times, so a server whose
        autovacuum is off (as on the development machine) would charge every step
        for the dead rows of all the steps before it. Only a database the bench
        made for itself is vacuumed.
        """
        if self.platform.owned_database is None:
            return
        await self.watch.db.execute(
            "VACUUM (ANALYZE) outbox, notifications, events, inbox_sequences"
        )

    async def step(self, rate: float, duration: float, purpose: str) -> dict[str, Any]:
        await self.settle()
        await self.vacuum()
        posts = await load.create_posts(self.platform.database_url, self.cast)
        sse_mark = len(self.streams.arrivals)
        email_mark = len(self.sink.arrivals)
        groups = await self._process_groups()
        batches_before = await batches.totals(self.platform.metrics_urls)
        backends = await system.backends_by_client(self.watch.db)
        cpu_before = system.snapshot(groups)
        backends_before = system.snapshot(backends)
        backlog: list[tuple[float, float]] = []
        queues: dict[str, list[tuple[float, float]]] = {}
        sent = load.Sent()
        offset = stages.clock_offset()
        started = time.perf_counter()
        window_end = started + duration
        recorders = self._start_profiles(rate, duration, purpose)

        def owed() -> float:
            arrived = len(self.streams.arrivals) - sse_mark
            arrived += len(self.sink.arrivals) - email_mark
            return len(sent.due) * report.DELIVERIES_PER_COMMENT - arrived

        sampler = asyncio.create_task(
            load.sample_while(
                lambda: time.perf_counter() < window_end,
                started,
                self.watch,
                owed,
                backlog,
                queues,
            )
        )
        offered = await load.offer(
            self.pool,
            self.cast,
            posts,
            rate,
            duration,
            self.args.max_in_flight,
            sent,
        )
        await sampler
        drain_started = time.perf_counter()
        await self._drain(offered, sse_mark, email_mark)
        drained = time.perf_counter() - max(drain_started, window_end)
        cpu = system.spent(cpu_before, system.snapshot(groups))
        backend_cpu = system.spent(backends_before, system.snapshot(backends))
        batch_means = batches.means(
            batches_before, await batches.totals(self.platform.metrics_urls)
        )
        await self._finish_profiles(recorders)

        streamed = self.streams.arrivals[sse_mark:]
        sse_ms = [
            (t - offered.due[cid]) * 1000
            for cid, _, t in streamed
            if cid in offered.due
        ]
        emails = self.sink.arrivals[email_mark:]
        comment_of = await self.watch.comment_of([nid for nid, _ in emails])
        email_ms = [
            (t - offered.due[comment_of[nid]]) * 1000
            for nid, t in emails
            if comment_of.get(nid) in offered.due
        ]
        in_window = sum(1 for _, _, t in streamed if t <= window_end) + sum(
            1 for _, t in emails if t <= window_end
        )
        data = report.StepData(
            rate=rate,
            duration=duration,
            scheduled=offered.scheduled,
            accepted=len(offered.due),
            errors=offered.errors,
            skipped=offered.skipped,
            post_ms=offered.post_ms,
            sse_ms=sse_ms,
            email_ms=email_ms,
            delivered_in_window=in_window,
            backlog=backlog,
            queues=queues,
            cpu_ms=cpu,
            drain_seconds=max(0.0, drained),
            purpose=purpose,
        )
        summary = report.summarise(data, self.args.max_p99_ms)
        if batch_means:
            summary["batch_mean"] = batch_means
        if offered.due:
            summary["postgres_cpu_ms_per_comment_by_client"] = {
                name: round(ms / len(offered.due), 3)
                for name, ms in sorted(backend_cpu.items())
            }
        if purpose == "half":
            rows = await stages.fetch_rows(self.watch.db, offered.due)
            summary["stages_ms"] = stages.breakdown(
                offered.due, rows, {nid: t for _, nid, t in streamed}, offset
            )
            # How far the two clocks moved apart during the step: the error the one
            # offset leaves in the first and last stage.
            drift = stages.clock_offset() - offset
            summary["clock_drift_ms"] = round(drift * 1000, 3)
        if offered.error_samples:
            summary["error_samples"] = offered.error_samples
        if purpose != "warmup":
            self._print(summary)
        return summary

    async def _drain(self, sent: load.Sent, sse_mark: int, email_mark: int) -> None:
        """Wait for the step's deliveries: all, or until none come for a while."""
        want = len(sent.due) * report.RECIPIENTS
        deadline = time.perf_counter() + DRAIN_LIMIT_S
        last_count, last_change = -1, time.perf_counter()
        while time.perf_counter() < deadline:
            sse = len(self.streams.arrivals) - sse_mark
            email = len(self.sink.arrivals) - email_mark
            if sse >= want and email >= want:
                return
            now = time.perf_counter()
            if sse + email != last_count:
                last_count, last_change = sse + email, now
            elif now - last_change > DRAIN_IDLE_S:
                return
            await asyncio.sleep(0.1)

    def _start_profiles(
        self, rate: float, duration: float, purpose: str
    ) -> dict[str, tuple[Any, Path]]:
        if self.args.profile_at != rate or purpose != "ramp" or duration < 4:
            return {}
        seconds = int(min(duration - 2, 15))
        out_dir = RESULTS / "profile"
        out_dir.mkdir(parents=True, exist_ok=True)
        recorders = {}
        for name, pid in self.platform.pids.items():
            out = out_dir / f"{name}.txt"
            try:
                recorders[name] = (pyspy.start(pid, seconds, out), out)
            except RuntimeError as exc:
                self.profiles[name] = {"error": str(exc)}
        return recorders

    async def _finish_profiles(self, recorders: dict[str, tuple[Any, Path]]) -> None:
        for name, (proc, out) in recorders.items():
            try:
                await asyncio.to_thread(proc.wait, 60)
            except Exception as exc:
                proc.kill()
                self.profiles[name] = {"error": f"py-spy did not finish: {exc!r}"}
                continue
            if proc.returncode != 0 or not out.exists():
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                self.profiles[name] = {"error": f"py-spy failed: {err.strip()[-300:]}"}
                continue
            self.profiles[name] = pyspy.summarise(out.read_text())

    def _print(self, s: dict[str, Any]) -> None:
        sse, email = s["sse_latency_ms"], s["email_latency_ms"]
        verdict = (
            "stable" if s["stable"] else "UNSTABLE: " + "; ".join(s["unstable_because"])
        )
        print(
            f"[{s['purpose']}] {s['rate']:g}/s: accepted {s['comments_per_s']}/s, "
            f"{s['deliveries_per_s']} deliveries/s, sse p50/p99 "
            f"{sse['p50']}/{sse['p99']} ms, email p50/p99 {email['p50']}/{email['p99']}"
            f" ms, backlog end {s['backlog_at_end']:.0f}, drain {s['drain_s']} s"
            f" — {verdict}",
            flush=True,
        )
        if s.get("batch_mean"):
            mean = ", ".join(f"{q} {m:g}" for q, m in sorted(s["batch_mean"].items()))
            print(f"    messages per consumer batch: {mean}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
