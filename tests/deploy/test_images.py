"""The image recipe: one target per service, built from the lock, run as non-root.

Nothing is built here (no Docker engine on these machines); the recipe is read, and
the health check script it installs is run against a local HTTP server.
"""

from __future__ import annotations

import http.server
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from . import dockerfile
from .facts import (
    DEPLOY,
    DOCKERFILE,
    MIGRATE_COMMAND,
    MIGRATE_PACKAGE,
    MIGRATE_TARGET,
    REPO,
    SERVICES,
    Service,
    locked_packages,
    workspace_scripts,
)

HEALTHCHECK_SCRIPT = DEPLOY / "docker" / "healthcheck.py"

# (target, package, command) for every image.
TARGETS = [(s.name, s.package, s.command) for s in SERVICES] + [
    (MIGRATE_TARGET, MIGRATE_PACKAGE, MIGRATE_COMMAND)
]
TARGET_IDS = [target for target, _, _ in TARGETS]


@pytest.fixture(scope="module")
def recipe() -> dockerfile.Dockerfile:
    return dockerfile.parse(DOCKERFILE)


def build_stage_for(recipe: dockerfile.Dockerfile, target: str) -> dockerfile.Stage:
    """The stage the target copies its virtual environment from."""
    for instruction in recipe.stages[target].all("COPY"):
        options, rest = instruction.flags()
        if "from" in options and rest.split()[0] == "/opt/venv":
            return recipe.stages[options["from"]]
    raise AssertionError(f"target {target} copies no /opt/venv from a build stage")


@pytest.mark.parametrize(("target", "package", "command"), TARGETS, ids=TARGET_IDS)
def test_each_image_has_its_own_target_built_from_the_lock(
    recipe: dockerfile.Dockerfile, target: str, package: str, command: str
) -> None:
    assert target in recipe.stages, f"no `FROM ... AS {target}` stage"

    build = build_stage_for(recipe, target)
    syncs = [i.args for i in build.all("RUN") if "uv sync" in i.args]

    assert syncs, f"{build.name} never runs uv sync"
    for sync in syncs:
        words = sync.split()
        assert {"--frozen", "--no-dev"} <= set(words), sync
        assert words[words.index("--package") + 1] == package, sync
    assert package in locked_packages(), f"{package} is not in uv.lock"


@pytest.mark.parametrize(("target", "package", "command"), TARGETS, ids=TARGET_IDS)
def test_each_image_runs_its_console_script(
    recipe: dockerfile.Dockerfile, target: str, package: str, command: str
) -> None:
    cmd = recipe.resolved(target, "CMD")
    entrypoint = recipe.resolved(target, "ENTRYPOINT")

    argv = (entrypoint.exec_form() if entrypoint else []) or []
    argv += (cmd.exec_form() if cmd else []) or []

    assert argv == [command], "exec form, so the service is PID 1 and gets SIGTERM"
    assert command in workspace_scripts()[package], (
        f"{package}'s pyproject.toml declares no script {command}"
    )


@pytest.mark.parametrize(("target", "package", "command"), TARGETS, ids=TARGET_IDS)
def test_each_image_runs_as_a_numeric_non_root_user(
    recipe: dockerfile.Dockerfile, target: str, package: str, command: str
) -> None:
    user = recipe.resolved(target, "USER")

    assert user is not None, f"{target} names no USER and would run as root"
    uid = user.args.split(":")[0]
    # Numeric, so Kubernetes can check runAsNonRoot without reading /etc/passwd.
    assert uid.isdigit(), user.args
    assert int(uid) != 0


@pytest.mark.parametrize(("target", "package", "command"), TARGETS, ids=TARGET_IDS)
def test_final_stage_starts_from_slim_python_without_build_tools(
    recipe: dockerfile.Dockerfile, target: str, package: str, command: str
) -> None:
    chain = recipe.chain(target)
    text = "\n".join(i.args for stage in chain for i in stage.instructions)

    assert re.fullmatch(r"python:3\.11(\.\d+)?-slim(-\w+)?", recipe.image(target))
    assert "apt-get" not in text, "the runtime stages install no system packages"
    for stage in chain:
        for copy in stage.all("COPY"):
            source = copy.flags()[0].get("from")
            assert source is None or source.startswith("build-"), (
                f"{stage.name} copies from {source}: only a build stage's venv "
                "belongs in the runtime image"
            )
    assert "uv" not in {c.flags()[0].get("from") for s in chain for c in s.all("COPY")}


@pytest.mark.parametrize("service", SERVICES, ids=[s.name for s in SERVICES])
def test_service_image_listens_on_all_interfaces_at_the_service_port(
    recipe: dockerfile.Dockerfile, service: Service
) -> None:
    env = recipe.env(service.name)
    exposed = [i.args for i in recipe.stages[service.name].all("EXPOSE")]

    assert env.get("HOST") == "0.0.0.0"
    assert env.get("PORT") == str(service.port)
    assert exposed == [str(service.port)]


@pytest.mark.parametrize("service", SERVICES, ids=[s.name for s in SERVICES])
def test_service_image_checks_its_health_with_python(
    recipe: dockerfile.Dockerfile, service: Service
) -> None:
    check = recipe.resolved(service.name, "HEALTHCHECK")

    assert check is not None and check.args.upper() != "NONE"
    options, rest = check.flags()
    argv = dockerfile.Instruction("CMD", rest.removeprefix("CMD").strip()).exec_form()
    assert argv is not None and argv[0] == "python", argv
    installed = f"/usr/local/lib/notiflow/{HEALTHCHECK_SCRIPT.name}"
    assert argv[1] == installed
    copies = [
        c.args.split()
        for stage in recipe.chain(service.name)
        for c in stage.all("COPY")
    ]
    assert ["deploy/docker/healthcheck.py", installed] in copies
    assert {"interval", "timeout", "retries"} <= set(options)


def test_one_shot_image_has_no_health_check(recipe: dockerfile.Dockerfile) -> None:
    check = recipe.resolved(MIGRATE_TARGET, "HEALTHCHECK")

    assert check is not None and check.args.upper() == "NONE"


def test_build_context_keeps_what_the_recipe_copies_and_drops_the_rest(
    recipe: dockerfile.Dockerfile,
) -> None:
    patterns = dockerfile.ignore_patterns(REPO / ".dockerignore")
    sources = {
        word
        for stage in recipe.stages.values()
        for copy in stage.all("COPY")
        if "from" not in copy.flags()[0]
        for word in copy.flags()[1].split()[:-1]
    }
    needed = {
        "pyproject.toml",
        "uv.lock",
        "libs/contracts/pyproject.toml",
        "libs/contracts/contracts/topology.py",
        "libs/contracts/contracts/migrations/0001_initial.sql",
        "services/comments/pyproject.toml",
        "services/sse-gateway/sse_gateway/app.py",
    } | {s for s in sources if s != "."}
    unwanted = {
        ".venv/bin/python",
        "services/comments/.venv/lib/x.py",
        ".git/HEAD",
        "var/mail/1.eml",
        "bench/results/run.json",
        "secrets/server.pem",
        "deploy/tls/key.pem",
        ".env",
        ".env.production",
        "services/comments/.env",
        "libs/contracts/contracts/__pycache__/settings.cpython-311.pyc",
        ".pytest_cache/v/cache/lastfailed",
        ".ruff_cache/0.8.0/123",
        "tests/deploy/test_images.py",
        "deploy/k8s/base/kustomization.yaml",
    }

    for path in sorted(needed):
        assert (REPO / path).exists() or path in sources, f"{path} is not in the repo"
        assert not dockerfile.ignored(patterns, path), f"{path} is left out"
    for path in sorted(unwanted):
        assert dockerfile.ignored(patterns, path), f"{path} is sent to the builder"


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        status = 200 if self.path == "/healthz" else 503
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def run_health_check(port: int, path: str | None = None) -> int:
    env = {**os.environ, "PORT": str(port)}
    if path is not None:
        env["HEALTHCHECK_PATH"] = path
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK_SCRIPT)],
        env=env,
        capture_output=True,
        timeout=30,
        check=False,
    ).returncode


def test_health_check_passes_when_healthz_answers_200(health_server: int) -> None:
    assert run_health_check(health_server) == 0


def test_health_check_fails_on_an_error_status(health_server: int) -> None:
    assert run_health_check(health_server, "/readyz") == 1


def test_health_check_fails_when_nothing_listens() -> None:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Health)
    port = server.server_address[1]
    server.server_close()

    assert run_health_check(port) == 1
