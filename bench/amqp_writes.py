"""Would fewer socket writes make publishing cheaper? CPU and sends per publish.

aiormq sends every frame with its own ``transport.write``, which in the services'
profiles showed as the largest single cost of the dispatcher and a tenth of the
comments service. This measures three ways of publishing batches of persistent
messages with publisher confirms, as the outbox relay does:

* ``aio-pika``: ``Exchange.publish``, as the relay publishes;
* ``no drain wait``: aiormq's ``basic_publish(wait=False)``, which queues the frame
  and returns without waiting for the writer to drain it (the confirm is still
  awaited);
* ``no drain wait, one send per turn``: the same through a stream writer that keeps
  what is written during one turn of the event loop and sends it together.

For each: this process's CPU time per publish, RabbitMQ's (the whole ``beam.smp``),
and how many sends reached the socket per publish. Rounds alternate between the
ways and the median of each is shown.

    uv run --no-sync python bench/amqp_writes.py
    uv run --no-sync python bench/amqp_writes.py --messages 20000 --batch 10,50
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import uuid
from pathlib import Path
from typing import Any

import aio_pika
from aiormq.connection import TCPTransportFactory
from yarl import URL

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.system import cpu_ms, pids_named  # noqa: E402

MODES = ("aio-pika", "no drain wait", "no drain wait, one send per turn")


class _CountingWriter(asyncio.StreamWriter):
    """Counts sends; with ``hold``, sends what one loop turn wrote at once."""

    def __init__(self, *args: Any, hold: bool) -> None:
        super().__init__(*args)
        self._hold = hold
        self._held: list[bytes] = []
        self.sends = 0

    def write(self, data: Any) -> None:
        if not self._hold:
            self.sends += 1
            super().write(data)
            return
        if not self._held:
            asyncio.get_running_loop().call_soon(self.flush)
        self._held.append(bytes(data))

    def flush(self) -> None:
        if self._held and not self.transport.is_closing():
            self.sends += 1
            self.transport.write(b"".join(self._held))
        self._held.clear()

    async def drain(self) -> None:
        self.flush()
        await super().drain()

    def close(self) -> None:
        self.flush()
        super().close()


class _Factory(TCPTransportFactory):
    def __init__(self, hold: bool) -> None:
        self.hold = hold
        self.writers: list[_CountingWriter] = []

    async def create(self, url: URL, **kwargs: Any) -> Any:
        kwargs.pop("ssl_context_provider", None)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        protocol = asyncio.StreamReaderProtocol(reader)
        transport, _ = await loop.create_connection(
            lambda: protocol, host=url.host, port=url.port, **kwargs
        )
        writer = _CountingWriter(transport, protocol, reader, loop, hold=self.hold)
        self.writers.append(writer)
        return reader, writer


def _connection_class(factory: _Factory) -> type[aio_pika.Connection]:
    class Counted(aio_pika.Connection):
        def __init__(self, url: URL, loop: Any = None, **kwargs: Any) -> None:
            super().__init__(url, loop=loop, **kwargs)
            self.kwargs["transport_factory"] = factory

    return Counted


async def _round(
    url: str, mode: str, messages: int, batch: int
) -> tuple[float, float, float]:
    """(this process's CPU µs, RabbitMQ's CPU µs, sends) per publish."""
    factory = _Factory(hold=mode == MODES[2])
    connection = await aio_pika.connect(
        url, timeout=10, connection_class=_connection_class(factory)
    )
    try:
        channel = await connection.channel(publisher_confirms=True)
        name = f"bench.amqp-writes.{uuid.uuid4().hex[:8]}"
        await channel.declare_queue(name, auto_delete=True)
        underlay = await channel.get_underlay_channel()
        properties = aio_pika.Message(b"", delivery_mode=2).properties
        body = b"x" * 400

        def publish() -> Any:
            if mode == MODES[0]:
                return channel.default_exchange.publish(
                    aio_pika.Message(body, delivery_mode=2), routing_key=name
                )
            return underlay.basic_publish(
                body, routing_key=name, properties=properties, wait=False
            )

        writer = factory.writers[-1]
        beams = pids_named("beam.smp")
        sends_at = writer.sends
        beam_at = sum(cpu_ms(pid) or 0.0 for pid in beams)
        cpu_at = os.times()
        for start in range(0, messages, batch):
            count = min(batch, messages - start)
            await asyncio.gather(*(publish() for _ in range(count)))
        cpu_now = os.times()
        cpu = (cpu_now.user + cpu_now.system) - (cpu_at.user + cpu_at.system)
        beam = (sum(cpu_ms(pid) or 0.0 for pid in beams) - beam_at) / 1000
        sends = writer.sends - sends_at
        return cpu / messages * 1e6, beam / messages * 1e6, sends / messages
    finally:
        await connection.close()


async def main(args: argparse.Namespace) -> None:
    for batch in args.batch:
        results: dict[str, list[tuple[float, float, float]]] = {m: [] for m in MODES}
        for _ in range(args.rounds):
            for mode in MODES:
                results[mode].append(await _round(args.url, mode, args.messages, batch))
        print(
            f"batches of {batch}, {args.messages} publishes, median of {args.rounds}:"
        )
        for mode, rounds in results.items():
            client, broker, sends = (
                statistics.median(r[i] for r in rounds) for i in range(3)
            )
            print(
                f"  {mode:<34} client {client:5.1f} µs   rabbitmq {broker:5.1f} µs"
                f"   {sends:4.2f} sends per publish"
            )


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--url",
        default=os.environ.get(
            "NOTIFLOW_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"
        ),
    )
    parser.add_argument("--messages", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--batch", type=lambda v: [int(x) for x in v.split(",")], default=[10, 50]
    )
    return parser.parse_args()


if __name__ == "__main__":
    import uvloop

    uvloop.run(main(_arguments()))
