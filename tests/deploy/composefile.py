"""Readers for `docker compose config` output, which compose v1 and v2 print in
different shapes (short strings or long mappings)."""

from __future__ import annotations

import re
from typing import Any

VOLUME_MODES = {"ro", "rw", "z", "Z", "cached", "delegated", "consistent", "nocopy"}


def duration(value: Any) -> float:
    """Seconds in a compose duration ("1m30s", "30s", or a number)."""
    if isinstance(value, int | float):
        return float(value)
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    return sum(
        float(number) * units[unit]
        for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", str(value))
    )


def environment(service: dict[str, Any]) -> dict[str, str | None]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        pairs = [item.partition("=") for item in env]
        return {key: (value if sep else None) for key, sep, value in pairs}
    return dict(env)


def published_ports(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(host ip, host port) of each published port."""
    found = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            if port.get("published"):
                found.append((str(port.get("host_ip", "")), str(port["published"])))
            continue
        parts = str(port).split(":")
        if len(parts) == 3:
            found.append((parts[0], parts[1]))
        elif len(parts) == 2:
            found.append(("", parts[0]))
    return found


def mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of each volume; the source is empty for anonymous ones."""
    found = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            found.append((str(volume.get("source", "")), str(volume["target"])))
            continue
        parts = str(volume).split(":")
        if len(parts) > 1 and parts[-1] in VOLUME_MODES:
            parts = parts[:-1]
        if len(parts) == 1:
            found.append(("", parts[0]))
        else:
            found.append((":".join(parts[:-1]), parts[-1]))
    return found
