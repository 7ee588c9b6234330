"""What the deployment files must agree with, gathered from the code where it lives.

Ports, commands and queue names are read from the workspace (``__main__`` modules,
``pyproject.toml`` files, :mod:`contracts.topology`), so a service that moves to
another port or queue fails these tests instead of its deployment.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from contracts import topology

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
COMPOSE_FILE = DEPLOY / "compose.yaml"
K8S = DEPLOY / "k8s"

# The settings default; the manifests must give the pods more time than this.
DRAIN_SECONDS_DEFAULT = 10.0


@dataclass(frozen=True)
class Service:
    """A long-running notiflow service and where its facts come from."""

    name: str
    queue: str | None
    autoscaler: str  # "hpa" (CPU) or "keda" (queue length)

    @property
    def package(self) -> str:
        return f"notiflow-{self.name}"

    @property
    def command(self) -> str:
        return f"notiflow-{self.name}"

    @property
    def folder(self) -> Path:
        return REPO / "services" / self.name

    @property
    def module(self) -> str:
        return self.name.replace("-", "_")

    @property
    def port(self) -> int:
        return default_port(self)


SERVICES = (
    Service("comments", None, "hpa"),
    Service("sse-gateway", topology.delivery_queue("sse"), "hpa"),
    Service("dispatcher", topology.DISPATCHER_QUEUE, "keda"),
    Service("email-sender", topology.delivery_queue("email"), "keda"),
    Service("push-sender", topology.delivery_queue("push"), "keda"),
)
BY_NAME = {service.name: service for service in SERVICES}

# The one-shot image: package and console script.
MIGRATE_TARGET = "migrate"
MIGRATE_PACKAGE = "notiflow-contracts"
MIGRATE_COMMAND = "notiflow-migrate"

# Queues some service consumes, as opposed to retry queues (emptied by their TTL)
# and the dead-letter queue (emptied by an operator).
CONSUMED_QUEUES = frozenset(
    [topology.DISPATCHER_QUEUE]
    + [topology.delivery_queue(kind) for kind in topology.CHANNEL_TYPES]
)
UNCONSUMED_QUEUES = frozenset(
    [topology.DEAD_LETTER_QUEUE] + [level.queue for level in topology.retry_levels()]
)

# Settings whose values are credentials: never a literal in base or prod.
SECRET_SETTINGS = frozenset(
    {
        "NOTIFLOW_DATABASE_URL",
        "NOTIFLOW_AMQP_URL",
        "NOTIFLOW_SECRET_KEY",
        "NOTIFLOW_SMTP_PASSWORD",
        "NOTIFLOW_VAPID_PRIVATE_KEY",
    }
)


def default_port(service: Service) -> int:
    """The ``default_port=`` the service's ``__main__`` passes to ``serve``."""
    main = service.folder / service.module / "__main__.py"
    tree = ast.parse(main.read_text(), filename=str(main))
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "default_port":
            if isinstance(node.value, ast.Constant) and isinstance(
                node.value.value, int
            ):
                return node.value.value
    raise LookupError(f"{main} passes no literal default_port to serve()")


@cache
def workspace_scripts() -> dict[str, dict[str, str]]:
    """Console scripts of every workspace package, by package name."""
    found = {}
    services = sorted((REPO / "services").glob("*/pyproject.toml"))
    for pyproject in [REPO / "libs" / "contracts" / "pyproject.toml", *services]:
        project = tomllib.loads(pyproject.read_text())["project"]
        found[project["name"]] = project.get("scripts", {})
    return found


@cache
def locked_packages() -> frozenset[str]:
    """Package names in uv.lock, which `uv sync --frozen --package` can build."""
    lock = tomllib.loads((REPO / "uv.lock").read_text())
    return frozenset(package["name"] for package in lock.get("package", []))


_METRIC_DEFINITION = re.compile(
    r"\b(Counter|Gauge|Histogram|Summary)\(\s*[\"'](notiflow_[a-z0-9_]+)[\"']"
)


@cache
def defined_metrics() -> dict[str, str]:
    """Prometheus metric names the workspace defines, with their kind."""
    found = {}
    for folder in (REPO / "libs", REPO / "services"):
        for source in folder.rglob("*.py"):
            if "tests" in source.parts:
                continue
            for kind, name in _METRIC_DEFINITION.findall(source.read_text()):
                found[name] = kind
    return found


def exposed_series(name: str, kind: str) -> set[str]:
    """The series names prometheus_client exposes for a metric of this kind."""
    if kind == "Counter":
        return {f"{name}_total", f"{name}_created"}
    if kind in ("Histogram", "Summary"):
        return {f"{name}_bucket", f"{name}_sum", f"{name}_count", name}
    return {name}


@cache
def setting_variables() -> frozenset[str]:
    """Every environment variable a notiflow settings class reads.

    The services' modules are imported (nothing connects at import time) so that
    their subclasses of the shared Settings are found, whatever they are called.
    """
    from contracts.settings import Settings

    for service in SERVICES:
        package = importlib.import_module(service.module)
        for info in pkgutil.iter_modules(package.__path__):
            if info.name != "__main__":
                importlib.import_module(f"{service.module}.{info.name}")

    names = {"HOST", "PORT"}
    pending = [Settings]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        prefix = cls.model_config.get("env_prefix", "")
        names.update(f"{prefix}{field}".upper() for field in cls.model_fields)
    return frozenset(names)
