"""Fixtures for the deployment tests: rendered compose and kustomize output.

These tests run the real tools (docker compose, kubectl kustomize, promtool, nginx)
on the files under deploy/, without a Docker engine or a cluster, and read the
service code to check that the files agree with it.

A missing tool skips the tests that need it, with the install line as the reason,
on a developer's machine; under CI (the CI variable set) it fails them instead, so
a machine that lost a package cannot turn the suite green by skipping.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from .facts import COMPOSE_FILE, K8S, REPO

TOOL_TIMEOUT = 120

INSTALL_HINTS = {
    "kubectl": "kubectl ships with the machine image (google-cloud-cli's kubectl, "
    "with kustomize v5); Debian's kubernetes-client is too old for components",
    "promtool": "apt-get install -y --no-install-recommends prometheus",
    "nginx": "apt-get install -y --no-install-recommends nginx",
    "docker-compose": "the docker compose plugin, or: apt-get install -y "
    "--no-install-recommends docker-compose",
    "kubernetes-validate": "a test dependency from PyPI (Kubernetes API schemas): "
    "uv pip install kubernetes-validate",
}


def missing_tool(what: str) -> None:
    reason = f"{what} is not installed; {INSTALL_HINTS.get(what, '')}".rstrip("; ")
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must have it: see the Makefile's APT_PACKAGES)")
    pytest.skip(reason)


def require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        missing_tool(tool)
    return str(path)


def run(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args,
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT,
        check=False,
        **kwargs,
    )


def compose_command() -> list[str]:
    """`docker compose` when the plugin is there, else Debian's docker-compose."""
    docker = shutil.which("docker")
    if docker and run([docker, "compose", "version"]).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    if legacy:
        return [legacy]
    missing_tool("docker-compose")
    raise AssertionError("unreachable")


def compose_environment() -> dict[str, str]:
    """The caller's environment without anything that would change the defaults."""
    keep = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("NOTIFLOW_", "COMPOSE_", "POSTGRES_", "RABBITMQ_"))
        and not key.endswith("_PORT")
    }
    keep["COMPOSE_PROJECT_NAME"] = "notiflow"
    return keep


def render_compose(*extra: str) -> subprocess.CompletedProcess[str]:
    return run(
        [
            *compose_command(),
            "-f",
            str(COMPOSE_FILE),
            "--profile",
            "demo",
            "--profile",
            "observability",
            *extra,
        ],
        cwd=REPO,
        env=compose_environment(),
    )


@pytest.fixture(scope="session")
def compose() -> dict[str, Any]:
    """The compose file as `docker compose config` resolves it, every profile on."""
    result = render_compose("config")
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def kustomize(folder: Path) -> list[dict[str, Any]]:
    result = run([require("kubectl"), "kustomize", str(folder)])
    assert result.returncode == 0, f"kustomize {folder}: {result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


KUSTOMIZATIONS = {
    "base": K8S / "base",
    "dev": K8S / "overlays" / "dev",
    "prod": K8S / "overlays" / "prod",
}


class Rendered:
    """kustomize output by name (base, dev, prod), each built at most once."""

    def __init__(self) -> None:
        self._built: dict[str, list[dict[str, Any]]] = {}

    def __call__(self, name: str) -> list[dict[str, Any]]:
        if name not in self._built:
            self._built[name] = kustomize(KUSTOMIZATIONS[name])
        return self._built[name]


@pytest.fixture(scope="session")
def rendered() -> Rendered:
    return Rendered()
