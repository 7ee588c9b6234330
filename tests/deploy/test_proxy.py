"""The compose stack's nginx: a valid configuration that sends every public route to
the service that serves it, streams SSE unbuffered, hides the operations routes, and
answers its own errors as the services do.

The last is checked on the real nginx, run on 127.0.0.1 with stand-ins in place of
the services.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.processes import free_port

from .composefile import mounts
from .conftest import require, run
from .facts import BY_NAME, DEPLOY
from .routes import OPERATIONS_PATHS, PUBLIC_SERVICES, public_paths, sample

NGINX_CONF = DEPLOY / "nginx" / "notiflow.conf"
STREAM_TIMEOUT_SECONDS = 3600
# client_max_body_size, and the services' NOTIFLOW_MAX_REQUEST_BYTES default.
MAX_BODY_BYTES = 64 * 1024


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


def main_config(tmp_path: Path, server: Path) -> Path:
    """An nginx.conf that includes ``server`` inside `http { }`, as the image's
    includes conf.d/*.conf, with every path nginx writes under tmp_path."""
    main = tmp_path / "nginx.conf"
    temp_paths = "\n".join(
        f"    {kind}_temp_path {tmp_path / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    # As root, nginx would hand its workers to `nobody`, who cannot write there.
    user = "user root;\n" if os.geteuid() == 0 else ""
    main.write_text(
        f"{user}"
        f"pid {tmp_path / 'nginx.pid'};\n"
        "error_log stderr;\n"
        "events {}\n"
        "http {\n"
        "    access_log off;\n"
        f"{temp_paths}\n"
        f"    include {server};\n"
        "}\n"
    )
    return main


def test_nginx_accepts_the_configuration(tmp_path: Path) -> None:
    nginx = require("nginx")
    server = tmp_path / "notiflow.conf"
    server.write_text(logging_to(NGINX_CONF.read_text(), tmp_path / "access.log"))
    main = main_config(tmp_path, server)

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


# The proxy, running: its own answers, and the services' passing through.

ONE_SECOND_READS = "proxy_read_timeout 1s;"


class StandIn(BaseHTTPRequestHandler):
    """A service behind the proxy: 200 and the path it was asked for, or, for a
    path ending in an error status (``/posts/503``), that status with a JSON error
    of its own, as a service would answer it."""

    protocol_version = "HTTP/1.1"

    def answer(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        last = self.path.rstrip("/").rsplit("/", 1)[-1]
        if last.isdigit() and 400 <= int(last) < 600:
            status = int(last)
            body: dict[str, Any] = {"error": "from_service", "detail": self.path}
        else:
            status, body = 200, {"path": self.path}
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = answer

    def log_message(self, *_: Any) -> None:
        pass


ACCESS_LOG = "/var/log/nginx/access.log"


def logging_to(text: str, path: Path) -> str:
    """The configuration writing its access log to ``path``."""
    assert text.count(f"access_log {ACCESS_LOG} ") == 1
    return text.replace(f"access_log {ACCESS_LOG} ", f"access_log {path} ")


def served_locally(
    text: str, port: int, services: dict[str, int], access_log: Path
) -> str:
    """The configuration listening on 127.0.0.1:``port``, each service name it
    proxies to replaced by 127.0.0.1 and the port ``services`` gives it, and upstream
    reads cut to a second, so that a silent service times out within a test; its
    access log written to ``access_log``."""
    text = logging_to(text, access_log)
    text, listens = re.subn(
        r"^(\s*)listen\s+80;", rf"\1listen 127.0.0.1:{port};", text, flags=re.M
    )
    assert listens == 1, "expected one `listen 80;`"
    # Every address below is a literal one: nothing is left to resolve.
    text = re.sub(r"^\s*resolver(_timeout)?\s[^;]*;", "", text, flags=re.M)

    def local(found: re.Match[str]) -> str:
        return f"http://127.0.0.1:{services[found.group(1)]};"

    text = re.sub(r"http://([\w-]+):\d+;", local, text)
    text, timeouts = re.subn(
        r"^(\s*)(proxy_connect_timeout[^;]*;)",
        rf"\1\2\n\1{ONE_SECOND_READS}",
        text,
        flags=re.M,
    )
    assert timeouts == 1, "expected one server-level proxy_connect_timeout"
    return text


def wait_until_up(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"nginx stopped: {log.read_text()}")
        try:
            if httpx.get(f"{url}/proxy-health", trust_env=False).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.05)
    pytest.fail(f"nginx did not answer within 10 s: {log.read_text()}")


StartProxy = Callable[[dict[str, int]], httpx.Client]


@pytest.fixture
def start_proxy(tmp_path: Path) -> Iterator[StartProxy]:
    """Runs nginx with this configuration in front of the given service ports."""
    nginx = require("nginx")
    running: list[tuple[subprocess.Popen[bytes], httpx.Client]] = []

    def start(services: dict[str, int]) -> httpx.Client:
        port = free_port()
        server = tmp_path / "notiflow.conf"
        server.write_text(
            served_locally(
                NGINX_CONF.read_text(), port, services, tmp_path / "access.log"
            )
        )
        log = tmp_path / "nginx.log"
        main = main_config(tmp_path, server)
        with log.open("wb") as out:
            process = subprocess.Popen(
                [nginx, "-p", str(tmp_path), "-c", str(main), "-g", "daemon off;"],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        url = f"http://127.0.0.1:{port}"
        client = httpx.Client(base_url=url, trust_env=False, timeout=10)
        running.append((process, client))
        wait_until_up(url, process, log)
        return client

    yield start
    for process, client in running:
        client.close()
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
def standin() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()


@pytest.fixture
def silent() -> Iterator[int]:
    """A port that takes connections and never answers on them."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield int(sock.getsockname()[1])


@pytest.fixture
def proxy(start_proxy: StartProxy, standin: int) -> httpx.Client:
    """The proxy with the comments API and the gateway up, the push sender down."""
    return start_proxy(
        {"comments": standin, "sse-gateway": standin, "push-sender": free_port()}
    )


def assert_json_error(resp: httpx.Response, status: int, error: str) -> None:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == "application/json"
    assert resp.json()["error"] == error, resp.text
    assert resp.json()["detail"]


@pytest.mark.parametrize("path", sorted(OPERATIONS_PATHS))
def test_a_hidden_operations_route_is_a_json_not_found(
    proxy: httpx.Client, path: str
) -> None:
    resp = proxy.get(path)

    assert_json_error(resp, 404, "not_found")
    assert resp.json() == {"error": "not_found", "detail": "Not Found"}


@pytest.mark.parametrize("chunked", [False, True], ids=["length", "chunked"])
def test_a_body_over_the_limit_is_a_json_too_large(
    proxy: httpx.Client, chunked: bool
) -> None:
    body = b"x" * (MAX_BODY_BYTES + 1)

    resp = proxy.post(
        "/comments",
        content=iter([body[:4096], body[4096:]]) if chunked else body,
        headers={"Content-Type": "application/json"},
    )

    assert_json_error(resp, 413, "too_large")
    assert resp.json()["detail"] == (
        f"the request body is larger than {MAX_BODY_BYTES} bytes"
    )


def test_the_proxy_allows_no_other_origin_to_read_its_own_refusal(
    proxy: httpx.Client,
) -> None:
    # The page is served by the proxy's own origin, which needs no CORS header; the
    # origins the services allow besides are not the proxy's to know.
    resp = proxy.post(
        "/comments",
        content=b"x" * (MAX_BODY_BYTES + 1),
        headers={
            "Content-Type": "application/json",
            "Origin": "https://elsewhere.example",
        },
    )

    assert resp.status_code == 413
    assert "access-control-allow-origin" not in resp.headers
    assert "access-control-allow-credentials" not in resp.headers


def test_tokens_in_query_strings_stay_out_of_the_access_log(
    proxy: httpx.Client, tmp_path: Path
) -> None:
    secret = "eyJ.secret-part.sig"
    asked = [
        proxy.get(f"/sse?token={secret}"),
        proxy.get(
            f"/unsubscribe?token=1.email.{secret}",
            headers={"Referer": f"http://example.test/?token={secret}"},
        ),
    ]
    assert [r.json()["path"].split("?")[0] for r in asked] == ["/sse", "/unsubscribe"]

    log = logged(tmp_path / "access.log", lines=2)

    assert '"GET /sse HTTP/1.1" 200' in log
    assert '"GET /unsubscribe HTTP/1.1" 200' in log
    assert secret not in log
    assert "token=" not in log


def test_tokens_of_requests_to_a_service_that_is_down_stay_out_of_the_error_log(
    start_proxy: StartProxy, standin: int, tmp_path: Path
) -> None:
    proxy = start_proxy(
        {"comments": standin, "sse-gateway": free_port(), "push-sender": free_port()}
    )
    secret = "eyJ.secret-part.sig"

    asked = [
        proxy.get(f"/sse?token={secret}"),
        proxy.post(f"/unsubscribe?token=1.email.{secret}"),
        proxy.get(f"/?token={secret}"),
        proxy.get("/push/vapid-public-key"),
    ]

    assert [r.status_code for r in asked] == [502] * 4
    log = (tmp_path / "nginx.log").read_text()
    assert secret not in log
    # Elsewhere the error log still says why a request failed.
    assert "/push/vapid-public-key" in log and "connect() failed" in log


def logged(path: Path, lines: int) -> str:
    """The log at ``path`` once it holds ``lines`` lines, or after 5 s: nginx
    writes a request's line once its answer has gone, which the client may read
    first."""
    deadline = time.monotonic() + 5
    while True:
        text = path.read_text()
        if text.count("\n") >= lines or time.monotonic() > deadline:
            return text
        time.sleep(0.02)


def test_a_body_at_the_limit_reaches_the_service(proxy: httpx.Client) -> None:
    resp = proxy.post(
        "/comments",
        content=b"x" * MAX_BODY_BYTES,
        headers={"Content-Type": "application/json"},
    )

    assert resp.status_code == 200, resp.text
    assert resp.json() == {"path": "/comments"}


def test_a_service_that_is_down_is_a_json_bad_gateway(proxy: httpx.Client) -> None:
    resp = proxy.get("/push/vapid-public-key")

    assert_json_error(resp, 502, "unavailable")


def test_a_service_that_does_not_answer_is_a_json_gateway_timeout(
    start_proxy: StartProxy, standin: int, silent: int
) -> None:
    proxy = start_proxy(
        {"comments": silent, "sse-gateway": standin, "push-sender": standin}
    )

    resp = proxy.get("/posts")

    assert_json_error(resp, 504, "unavailable")


@pytest.mark.parametrize(
    "path", ["/posts/404", "/inbox/404", "/posts/413", "/posts/502", "/posts/503"]
)
def test_errors_a_service_answers_pass_through_untouched(
    proxy: httpx.Client, path: str
) -> None:
    resp = proxy.get(path)

    assert resp.status_code == int(path.rsplit("/", 1)[-1])
    assert resp.json() == {"error": "from_service", "detail": path}


def test_comments_posted_too_quickly_from_one_address_get_a_json_429(
    proxy: httpx.Client,
) -> None:
    posted = [
        proxy.post(
            "/comments", json={"post_id": 1, "body": "hi"}, headers={"X-N": str(n)}
        )
        for n in range(60)
    ]
    read = [proxy.get("/comments") for _ in range(60)]

    refused = [r for r in posted if r.status_code == 429]
    assert refused, [r.status_code for r in posted]
    assert {r.status_code for r in posted} == {200, 429}
    # A burst goes through whole before any refusal.
    assert [r.status_code for r in posted[:20]] == [200] * 20
    assert_json_error(refused[0], 429, "too_many_requests")
    assert refused[0].headers["retry-after"] == "1"
    assert {r.status_code for r in read} == {200}
