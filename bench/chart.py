"""One PNG with the run's shape: throughput, latency and CPU against offered load."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on a server

import matplotlib.pyplot as plt


def draw(report: Mapping[str, Any], out: Path) -> Path:
    # The ramp draws the lines; the half-rate step is marked on its own.
    steps = sorted(
        (s for s in report["steps"] if s["purpose"] == "ramp"), key=lambda s: s["rate"]
    )
    half = next((s for s in report["steps"] if s["purpose"] == "half"), None)
    rates = [s["rate"] for s in steps]
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4.6))
    machine = report["machine"]
    broker = report["baselines"].get("broker_msgs_per_s")
    fig.suptitle(
        f"notiflow on {machine.get('cores')} cores: sustained "
        f"{report['sustained_comments_per_s']:.0f} comments/s, "
        f"{report['deliveries_per_s']:.0f} deliveries/s "
        f"(broker baseline {broker or 0:.0f} msg/s)"
    )

    left.plot(rates, rates, ":", color="grey", label="offered")
    left.plot(rates, [s["comments_per_s"] for s in steps], "o-", label="comments/s")
    left.plot(
        rates,
        [s["deliveries_per_s"] / 6 for s in steps],
        "s--",
        label="deliveries/s ÷ 6",
    )
    for s in steps:
        if not s["stable"]:
            left.annotate("unstable", (s["rate"], s["comments_per_s"]), color="red")
    left.set_xlabel("offered comments/s")
    left.set_ylabel("per second")
    left.set_title("throughput")
    left.legend()

    for key, label, style in (
        ("sse_latency_ms", "SSE", "-"),
        ("email_latency_ms", "email", "--"),
    ):
        for q, marker in (("p50", "o"), ("p99", "^")):
            values = [s[key][q] for s in steps]
            line = middle.plot(
                rates, values, style, marker=marker, label=f"{label} {q}"
            )
            if half is not None and half[key][q] is not None:
                middle.plot(
                    [half["rate"]],
                    [half[key][q]],
                    marker="*",
                    markersize=13,
                    color=line[0].get_color(),
                    linestyle="none",
                )
    middle.axhline(50, color="grey", linewidth=0.8, linestyle=":")
    middle.axhline(10, color="grey", linewidth=0.8, linestyle=":")
    middle.set_yscale("log")
    middle.set_xlabel("offered comments/s")
    middle.set_ylabel("ms from scheduled POST (log)")
    middle.set_title("latency; ★ = half-rate step; SSE targets dotted")
    middle.legend(fontsize="small")

    processes = sorted({name for s in steps for name in s["cpu_ms_per_comment"]})
    bottom = [0.0] * len(steps)
    labels = [f"{s['rate']:g}" for s in steps]
    for name in processes:
        values = [s["cpu_ms_per_comment"].get(name) or 0.0 for s in steps]
        right.bar(labels, values, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    right.set_xlabel("offered comments/s")
    right.set_ylabel("CPU ms per comment")
    right.set_title("CPU per comment, by process")
    right.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))

    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
