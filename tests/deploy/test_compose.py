"""deploy/compose.yaml: it resolves, everything long-running is health-checked, the
services wait for the migration, and the scalable ones can be scaled.
"""

from __future__ import annotations

from typing import Any

import pytest

from email_sender.app import EmailSettings

from . import dockerfile
from .composefile import duration, environment, mounts, published_ports
from .conftest import render_compose
from .facts import DOCKERFILE, DRAIN_SECONDS_DEFAULT, SERVICES, setting_variables

INFRASTRUCTURE = ("postgres", "rabbitmq")
ONE_SHOTS = ("migrate", "seed")


def image_has_health_check(service: dict[str, Any]) -> bool:
    build = service.get("build")
    if not build:
        return False
    recipe = dockerfile.parse(DOCKERFILE)
    check = recipe.resolved(build["target"], "HEALTHCHECK")
    return check is not None and check.args.upper() != "NONE"


def has_health_check(service: dict[str, Any]) -> bool:
    check = service.get("healthcheck")
    if check is not None:
        return not check.get("disable", False)
    return image_has_health_check(service)


def test_compose_file_resolves(compose: dict[str, Any]) -> None:
    expected = {s.name for s in SERVICES} | set(INFRASTRUCTURE) | set(ONE_SHOTS)
    expected |= {"mailpit", "proxy", "prometheus", "grafana"}

    assert set(compose["services"]) == expected


def test_compose_file_resolves_without_optional_profiles() -> None:
    # What `docker compose up` starts by default: every service but the demo seed
    # and the observability pair.
    result = render_compose("config", "--services")

    assert result.returncode == 0, result.stderr


def test_every_service_says_whether_it_restarts(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        expected = "no" if name in ONE_SHOTS else "unless-stopped"
        assert str(service.get("restart")) == expected, name


def test_every_long_running_service_has_a_health_check(
    compose: dict[str, Any],
) -> None:
    for name, service in compose["services"].items():
        if name in ONE_SHOTS:
            continue
        assert has_health_check(service), f"{name} has no health check"


def test_dependencies_wait_for_health_or_completion(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, service in services.items():
        for dependency, rule in (service.get("depends_on") or {}).items():
            condition = rule["condition"]
            if dependency in ONE_SHOTS:
                assert condition == "service_completed_successfully", (name, dependency)
            else:
                assert condition == "service_healthy", (name, dependency)
                assert has_health_check(services[dependency]), dependency


@pytest.mark.parametrize("name", [s.name for s in SERVICES])
def test_services_start_after_migration_and_infrastructure(
    compose: dict[str, Any], name: str
) -> None:
    depends = compose["services"][name]["depends_on"]

    assert depends["migrate"]["condition"] == "service_completed_successfully"
    for dependency in INFRASTRUCTURE:
        assert depends[dependency]["condition"] == "service_healthy"


def test_migration_waits_for_postgres(compose: dict[str, Any]) -> None:
    depends = compose["services"]["migrate"]["depends_on"]

    assert depends["postgres"]["condition"] == "service_healthy"


@pytest.mark.parametrize("name", [s.name for s in SERVICES])
def test_services_can_be_scaled(compose: dict[str, Any], name: str) -> None:
    service = compose["services"][name]

    assert "container_name" not in service
    assert "hostname" not in service
    assert published_ports(service) == [], "a host port allows one replica only"


def test_published_ports_listen_on_loopback_only(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for host_ip, _ in published_ports(service):
            assert host_ip == "127.0.0.1", f"{name} publishes on {host_ip or 'all'}"


@pytest.mark.parametrize("name", [s.name for s in SERVICES])
def test_stop_grace_period_outlasts_the_drain(
    compose: dict[str, Any], name: str
) -> None:
    service = compose["services"][name]
    drain = float(environment(service).get("NOTIFLOW_DRAIN_SECONDS") or 0)

    if name == "email-sender":
        # A stop must not cut an email short: it may be with the server already.
        assert drain >= EmailSettings().smtp_conversation_seconds
    else:
        assert drain == DRAIN_SECONDS_DEFAULT
    assert duration(service.get("stop_grace_period", "10s")) > drain + 1


@pytest.mark.parametrize("name", [s.name for s in SERVICES] + ["migrate"])
def test_services_reach_postgres_and_rabbitmq_by_service_name(
    compose: dict[str, Any], name: str
) -> None:
    env = environment(compose["services"][name])

    assert "@postgres:5432/" in str(env["NOTIFLOW_DATABASE_URL"])
    if name != "migrate":
        assert "@rabbitmq:5672/" in str(env["NOTIFLOW_AMQP_URL"])


def test_database_and_broker_credentials_match_their_servers(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    postgres = environment(services["postgres"])
    rabbitmq = environment(services["rabbitmq"])
    env = environment(services["comments"])

    assert (
        f"postgresql://{postgres['POSTGRES_USER']}:{postgres['POSTGRES_PASSWORD']}"
        f"@postgres:5432/{postgres['POSTGRES_DB']}"
    ) == env["NOTIFLOW_DATABASE_URL"]
    assert (
        f"amqp://{rabbitmq['RABBITMQ_DEFAULT_USER']}:"
        f"{rabbitmq['RABBITMQ_DEFAULT_PASS']}@rabbitmq:5672/"
    ) == env["NOTIFLOW_AMQP_URL"]


def test_the_page_calls_every_api_through_the_proxy(compose: dict[str, Any]) -> None:
    env = environment(compose["services"]["sse-gateway"])

    assert env["NOTIFLOW_API_BASE_URL"] == env["NOTIFLOW_PUBLIC_URL"]
    assert env["NOTIFLOW_PUSH_BASE_URL"] == env["NOTIFLOW_PUBLIC_URL"]


def test_email_goes_to_the_sink(compose: dict[str, Any]) -> None:
    env = environment(compose["services"]["email-sender"])

    assert env["NOTIFLOW_SMTP_HOST"] == "mailpit"
    assert env["NOTIFLOW_SMTP_PORT"] == "1025"
    assert compose["services"]["mailpit"]["image"].startswith("axllent/mailpit")


def test_rabbitmq_keeps_its_data_and_exports_metrics(compose: dict[str, Any]) -> None:
    rabbitmq = compose["services"]["rabbitmq"]
    targets = {target for _, target in mounts(rabbitmq)}

    assert rabbitmq["image"].startswith("rabbitmq:3")
    assert "management" in rabbitmq["image"]
    assert rabbitmq.get("hostname") == "rabbitmq"
    assert {"/var/lib/rabbitmq", "/etc/rabbitmq/enabled_plugins"} <= targets


def test_state_lives_in_named_volumes(compose: dict[str, Any]) -> None:
    named = set(compose.get("volumes") or {})

    for name, target in (
        ("postgres", "/var/lib/postgresql/data"),
        ("rabbitmq", "/var/lib/rabbitmq"),
        ("push-sender", "/var/lib/notiflow"),
    ):
        found = mounts(compose["services"][name])
        assert any(s in named and t == target for s, t in found), (name, found)


def test_every_notiflow_variable_is_a_real_setting(compose: dict[str, Any]) -> None:
    known = setting_variables()

    for name, service in compose["services"].items():
        for variable in environment(service):
            if variable.startswith("NOTIFLOW_"):
                assert variable in known, f"{name}: no settings class reads {variable}"
