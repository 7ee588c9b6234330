"""Alert rules, the compose Prometheus and the Grafana dashboard.

promtool checks the syntax and runs the unit tests in prometheus/alerts_test.yaml;
the rest checks that the queries name real queues and real metrics.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from contracts import topology

from .composefile import mounts
from .conftest import require, run
from .facts import (
    BY_NAME,
    CONSUMED_QUEUES,
    DEPLOY,
    UNCONSUMED_QUEUES,
    defined_metrics,
    exposed_series,
)

ALERTS = DEPLOY / "prometheus" / "alerts.yaml"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
ALERT_TESTS = Path(__file__).with_name("prometheus") / "alerts_test.yaml"
DASHBOARD = DEPLOY / "grafana" / "notiflow.json"
PROVISIONING = DEPLOY / "grafana" / "provisioning"

# What the dashboard must show, by the names the services export.
DASHBOARD_METRICS = {
    "notiflow_delivery_latency_seconds_bucket",
    "notiflow_sse_connections",
    "notiflow_sse_events_written_total",
    "notiflow_consumer_in_flight",
    "notiflow_notifications_total",
    "notiflow_outbox_oldest_age_seconds",
    "rabbitmq_detailed_queue_messages",
    "rabbitmq_detailed_queue_consumers",
}
# PromQL words that look like metric names.
PROMQL_WORDS = {
    "sum",
    "max",
    "min",
    "avg",
    "count",
    "rate",
    "increase",
    "by",
    "without",
    "histogram_quantile",
    "or",
    "and",
    "unless",
    "vector",
    "on",
    "ignoring",
    "le",
    "type",
    "status",
    "queue",
    "vhost",
    "job",
    "instance",
    "pod",
}


def rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))["groups"]
    return [rule for group in groups for rule in group["rules"]]


def alert(name: str) -> dict[str, Any]:
    (found,) = [rule for rule in rules() if rule.get("alert") == name]
    return found


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def dashboard_queries() -> list[str]:
    return [
        target["expr"]
        for panel in dashboard()["panels"]
        for target in panel.get("targets", [])
    ]


def series_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (label matchers and strings removed)."""
    stripped = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    stripped = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", stripped)
    words = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", stripped))
    return {w for w in words - PROMQL_WORDS if "_" in w and not w.startswith("$")}


def queue_regex(expr: str) -> re.Pattern[str]:
    """The one queue pattern of ``expr``, which every series it reads shares."""
    (pattern,) = set(re.findall(r'queue=~"((?:[^"\\]|\\.)*)"', expr))
    # PromQL string escapes first, then an anchored regular expression.
    return re.compile(pattern.encode().decode("unicode_escape"))


def test_promtool_accepts_the_alert_rules() -> None:
    result = run([require("promtool"), "check", "rules", str(ALERTS)])

    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_fire_as_their_unit_tests_expect() -> None:
    result = run(
        [require("promtool"), "test", "rules", ALERT_TESTS.name],
        cwd=ALERT_TESTS.parent,
    )

    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_accepts_the_compose_prometheus_config() -> None:
    result = run([require("promtool"), "check", "config", str(PROMETHEUS_CONFIG)])

    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_says_how_bad_and_what_happened() -> None:
    for rule in rules():
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]


def test_dead_letter_alert_watches_the_dead_letter_queue() -> None:
    expr = alert("NotiflowDeadLettersWaiting")["expr"]

    assert f'queue="{topology.DEAD_LETTER_QUEUE}"' in expr
    assert "rabbitmq_queue_messages" in expr
    assert "rabbitmq_detailed_queue_messages" in expr


@pytest.mark.parametrize(
    "name", ["NotiflowQueueWithoutConsumer", "NotiflowQueueBacklog"]
)
def test_queue_alerts_cover_exactly_the_consumed_queues(name: str) -> None:
    pattern = queue_regex(alert(name)["expr"])

    for queue in CONSUMED_QUEUES:
        assert pattern.fullmatch(queue), queue
    for queue in UNCONSUMED_QUEUES:
        assert not pattern.fullmatch(queue), queue


def test_no_consumer_alert_reads_the_consumer_count() -> None:
    expr = alert("NotiflowQueueWithoutConsumer")["expr"]

    assert "rabbitmq_detailed_queue_consumers" in expr
    assert "rabbitmq_queue_consumers" in expr
    assert re.search(r"==\s*0\s*$", expr.strip())


def test_failure_ratio_compares_failed_with_sent() -> None:
    expr = alert("NotiflowDeliveryFailureRatioHigh")["expr"]

    assert 'notiflow_notifications_total{status="failed"}' in expr
    assert 'status=~"sent|failed"' in expr


def test_outbox_alerts_read_the_oldest_row_age() -> None:
    for name in ("NotiflowOutboxLagging", "NotiflowOutboxStalled"):
        assert "notiflow_outbox_oldest_age_seconds" in alert(name)["expr"]


def test_dashboard_shows_the_metrics_operators_need() -> None:
    used = set().union(*(series_names(expr) for expr in dashboard_queries()))

    assert DASHBOARD_METRICS <= used


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    # promtool parses every expression of a rule file; Grafana's interval macro
    # is not PromQL, so a fixed window stands in for it.
    queries = [e.replace("$__rate_interval", "5m") for e in dashboard_queries()]
    rule_file = tmp_path / "dashboard-rules.yaml"
    rule_file.write_text(
        yaml.safe_dump(
            {
                "groups": [
                    {
                        "name": "dashboard",
                        "rules": [
                            {"record": f"dashboard:query_{i}", "expr": expr}
                            for i, expr in enumerate(queries)
                        ],
                    }
                ]
            }
        )
    )

    result = run([require("promtool"), "check", "rules", str(rule_file)])

    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_panels_have_unique_ids_and_do_not_overlap() -> None:
    panels = dashboard()["panels"]
    ids = [panel["id"] for panel in panels]
    cells: set[tuple[int, int]] = set()

    assert len(ids) == len(set(ids))
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, panel["title"]
                cells.add((x, y))


def test_dashboard_asks_for_its_datasource() -> None:
    board = dashboard()
    (variable,) = [v for v in board["templating"]["list"] if v["type"] == "datasource"]

    assert variable["query"] == "prometheus"
    for panel in board["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == f"${{{variable['name']}}}"


def test_alerts_and_dashboard_name_metrics_the_services_define() -> None:
    defined = defined_metrics()
    exposed = set().union(*(exposed_series(n, k) for n, k in defined.items()))
    used = set().union(*(series_names(e) for e in dashboard_queries()))
    used |= set().union(*(series_names(rule["expr"]) for rule in rules()))

    missing = {name for name in used if name.startswith("notiflow_")} - exposed
    assert missing == set(), "no prometheus_client definition in libs/ or services/"


def test_compose_prometheus_scrapes_each_service_on_its_port() -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text(encoding="utf-8"))
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "notiflow"]
    scraped = {name: sd["port"] for sd in job["dns_sd_configs"] for name in sd["names"]}

    assert scraped == {name: service.port for name, service in BY_NAME.items()}


def test_compose_prometheus_reads_the_detailed_queue_metrics() -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text(encoding="utf-8"))
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "rabbitmq"]

    assert job["metrics_path"] == "/metrics/detailed"
    assert {"queue_coarse_metrics", "queue_consumer_count"} <= set(
        job["params"]["family"]
    )


def test_compose_mounts_the_rules_and_the_dashboard(compose: dict[str, Any]) -> None:
    services = compose["services"]
    prometheus = dict((t, s) for s, t in mounts(services["prometheus"]))
    grafana = dict((t, s) for s, t in mounts(services["grafana"]))
    provider = yaml.safe_load(
        (PROVISIONING / "dashboards" / "notiflow.yaml").read_text(encoding="utf-8")
    )
    folder = provider["providers"][0]["options"]["path"]

    assert prometheus["/etc/prometheus"] == str(ALERTS.parent)
    assert grafana[f"{folder}/{DASHBOARD.name}"] == str(DASHBOARD)
    assert grafana["/etc/grafana/provisioning"] == str(PROVISIONING)
