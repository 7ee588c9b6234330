"""The compose stack's nginx: a valid configuration that sends every public route to
the service that serves it, streams SSE unbuffered, and hides the operations routes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .composefile import mounts
from .conftest import require, run
from .facts import BY_NAME, DEPLOY
from .routes import OPERATIONS_PATHS, PUBLIC_SERVICES, public_paths, sample

NGINX_CONF = DEPLOY / "nginx" / "notiflow.conf"
STREAM_TIMEOUT_SECONDS = 3600


@dataclass
class Location:
    modifier: str
    pattern: str
    body: str

    def directive(self, name: str) -> str | None:
        found = re.search(rf"^\s*{name}\s+([^;]+);", self.body, re.MULTILINE)
        return found.group(1).strip() if found else None


def _block(text: str, start: int) -> str:
    """The text between the brace at ``start`` and its match, quotes respected."""
    depth, quote = 0, ""
    for index in range(start, len(text)):
        char = text[index]
        if quote:
            quote = "" if char == quote and text[index - 1] != "\\" else quote
        elif char in "'\"":
            quote = char
        elif char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : index]
    raise AssertionError("unbalanced braces in the nginx configuration")


def locations(text: str) -> list[Location]:
    return [
        Location(m.group(1) or "", m.group(2), _block(text, m.end() - 1))
        for m in re.finditer(r"location\s+(=|~\*|~|\^~)?\s*(\S+)\s*\{", text)
    ]


def variables(text: str) -> dict[str, str]:
    return dict(re.findall(r"^\s*set\s+\$(\w+)\s+(\S+);", text, re.MULTILINE))


def select(found: list[Location], path: str) -> Location:
    """nginx's choice: exact, then longest prefix (unless ^~), then regexes."""
    for location in found:
        if location.modifier == "=" and location.pattern == path:
            return location
    prefixes = [
        loc
        for loc in found
        if loc.modifier in ("", "^~") and path.startswith(loc.pattern)
    ]
    longest = max(prefixes, key=lambda loc: len(loc.pattern), default=None)
    if longest is not None and longest.modifier == "^~":
        return longest
    for location in found:
        if location.modifier in ("~", "~*"):
            flags = re.IGNORECASE if location.modifier == "~*" else 0
            if re.search(location.pattern, path, flags):
                return location
    if longest is None:
        raise AssertionError(f"no location matches {path}")
    return longest


def upstream(text: str, location: Location) -> str | None:
    """host:port the location proxies to, through a `set` variable or directly."""
    target = location.directive("proxy_pass")
    if target is None:
        return None
    if target.startswith("$"):
        target = variables(text)[target[1:]]
    return target.removeprefix("http://").rstrip("/")


def seconds(value: str) -> int:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = re.fullmatch(r"(\d+)([smhd]?)", value).groups()  # type: ignore[union-attr]
    return int(number) * units.get(unit, 1)


@pytest.fixture(scope="module")
def conf() -> str:
    """The configuration without its comment lines, whose apostrophes would read
    as quotes."""
    return re.sub(r"^\s*#.*$", "", NGINX_CONF.read_text(), flags=re.MULTILINE)


def test_nginx_accepts_the_configuration(tmp_path: Path) -> None:
    nginx = require("nginx")
    # The image's nginx.conf includes conf.d/*.conf inside `http { }`; this does
    # the same, with every path nginx writes under tmp_path.
    main = tmp_path / "nginx.conf"
    temp_paths = "\n".join(
        f"    {kind}_temp_path {tmp_path / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    main.write_text(
        f"pid {tmp_path / 'nginx.pid'};\n"
        "error_log stderr;\n"
        "events {}\n"
        "http {\n"
        "    access_log off;\n"
        f"{temp_paths}\n"
        f"    include {NGINX_CONF};\n"
        "}\n"
    )

    result = run([nginx, "-t", "-q", "-p", str(tmp_path), "-c", str(main)])

    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("name", sorted(PUBLIC_SERVICES))
def test_every_public_route_reaches_its_service(conf: str, name: str) -> None:
    service = BY_NAME[name]
    # The compose stack runs in development mode, with its extra routes.
    paths = public_paths(PUBLIC_SERVICES[name], "development")

    assert paths
    for template in sorted(paths):
        location = select(locations(conf), sample(template))
        assert upstream(conf, location) == f"{name}:{service.port}", template


@pytest.mark.parametrize("path", sorted(OPERATIONS_PATHS))
def test_operations_routes_stay_inside(conf: str, path: str) -> None:
    location = select(locations(conf), path)

    assert upstream(conf, location) is None
    assert re.match(r"404\b", location.directive("return") or "")


def test_event_streams_are_unbuffered_and_may_stay_quiet(conf: str) -> None:
    location = select(locations(conf), "/sse")

    assert upstream(conf, location) == f"sse-gateway:{BY_NAME['sse-gateway'].port}"
    assert location.directive("proxy_buffering") == "off"
    assert location.directive("proxy_cache") == "off"
    for timeout in ("proxy_read_timeout", "proxy_send_timeout"):
        value = location.directive(timeout)
        assert value and seconds(value) >= STREAM_TIMEOUT_SECONDS, timeout


def test_no_location_drops_the_shared_proxy_headers(conf: str) -> None:
    # A proxy_set_header in a location replaces every one set at server level.
    for location in locations(conf):
        assert location.directive("proxy_set_header") is None, location.pattern
    assert re.search(r'proxy_set_header\s+Connection\s+""', conf)
    assert re.search(r"proxy_http_version\s+1\.1", conf)


def test_upstreams_are_resolved_per_request_so_scaling_shows(conf: str) -> None:
    # A hostname in an upstream block or a literal proxy_pass is resolved once;
    # replicas started by `--scale` later would get no traffic.
    assert "upstream " not in conf
    for location in locations(conf):
        target = location.directive("proxy_pass")
        assert target is None or target.startswith("$"), location.pattern
    assert re.search(r"resolver\s+127\.0\.0\.11\b", conf)


def test_compose_mounts_this_file_and_names_real_services(
    compose: dict[str, Any], conf: str
) -> None:
    found = mounts(compose["services"]["proxy"])

    assert (str(NGINX_CONF), "/etc/nginx/conf.d/default.conf") in found, found
    for target in variables(conf).values():
        host = target.removeprefix("http://").split(":")[0]
        assert host in compose["services"], target
