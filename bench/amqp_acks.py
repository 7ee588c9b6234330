"""Does waiting for an ack's frame to be written cost the consumer anything?

aio-pika's ``IncomingMessage.ack`` hands the frame to the connection's writer and
waits until the writer has drained it; aiormq's ``basic_ack(wait=False)`` returns
once the frame is queued. An ack has no reply either way. This consumes persistent
messages from a quorum queue, as the services do, with a handler per message that
acks one way or the other, and shows this process's and RabbitMQ's CPU time per
message. Rounds alternate between the two ways; the median of each is shown.

    uv run --no-sync python bench/amqp_acks.py
    uv run --no-sync python bench/amqp_acks.py --messages 20000 --prefetch 10,100
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.system import cpu_ms, pids_named  # noqa: E402

MODES = ("aio-pika ack", "no drain wait")


async def _fill(channel: aio_pika.abc.AbstractChannel, name: str, count: int) -> None:
    body = b"x" * 400
    for start in range(0, count, 200):
        await asyncio.gather(
            *(
                channel.default_exchange.publish(
                    aio_pika.Message(body, delivery_mode=2), routing_key=name
                )
                for _ in range(min(200, count - start))
            )
        )


async def _round(
    url: str, mode: str, messages: int, prefetch: int
) -> tuple[float, float, float]:
    """(this process's CPU µs, RabbitMQ's CPU µs, wall µs) per message consumed."""
    connection = await aio_pika.connect(url, timeout=10)
    try:
        channel = await connection.channel(publisher_confirms=True)
        name = f"bench.amqp-acks.{uuid.uuid4().hex[:8]}"
        queue = await channel.declare_queue(
            name, durable=True, arguments={"x-queue-type": "quorum"}
        )
        await _fill(channel, name, messages)

        consuming = await connection.channel()
        await consuming.set_qos(prefetch_count=prefetch)
        underlay = await consuming.get_underlay_channel()
        done = asyncio.Event()
        seen = 0

        async def handle(message: AbstractIncomingMessage) -> None:
            nonlocal seen
            if mode == MODES[0]:
                await message.ack()
            else:
                await underlay.basic_ack(message.delivery_tag or 0, wait=False)
            seen += 1
            if seen == messages:
                done.set()

        beams = pids_named("beam.smp")
        beam_at = sum(cpu_ms(pid) or 0.0 for pid in beams)
        cpu_at = os.times()
        wall_at = time.perf_counter()
        tag = await consuming.get_queue(name, ensure=False)
        consumer_tag = await tag.consume(handle)
        await asyncio.wait_for(done.wait(), timeout=120)
        wall = time.perf_counter() - wall_at
        cpu_now = os.times()
        cpu = (cpu_now.user + cpu_now.system) - (cpu_at.user + cpu_at.system)
        beam = (sum(cpu_ms(pid) or 0.0 for pid in beams) - beam_at) / 1000
        await tag.cancel(consumer_tag)
        await queue.delete(if_unused=False, if_empty=False)
        return cpu / messages * 1e6, beam / messages * 1e6, wall / messages * 1e6
    finally:
        await connection.close()


async def main(args: argparse.Namespace) -> None:
    for prefetch in args.prefetch:
        results: dict[str, list[tuple[float, float, float]]] = {m: [] for m in MODES}
        for _ in range(args.rounds):
            for mode in MODES:
                results[mode].append(
                    await _round(args.url, mode, args.messages, prefetch)
                )
        print(
            f"prefetch {prefetch}, {args.messages} messages, median of {args.rounds}:"
        )
        for mode, rounds in results.items():
            client, broker, wall = (
                statistics.median(r[i] for r in rounds) for i in range(3)
            )
            print(
                f"  {mode:<14} client {client:5.1f} µs   rabbitmq {broker:5.1f} µs"
                f"   wall {wall:5.1f} µs per message"
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
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--prefetch", type=lambda v: [int(x) for x in v.split(",")], default=[10, 100]
    )
    return parser.parse_args()


if __name__ == "__main__":
    import uvloop

    uvloop.run(main(_arguments()))
