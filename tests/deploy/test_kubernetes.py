"""deploy/k8s: each kustomization renders, validates against the Kubernetes API
schemas, and points its probes, autoscalers and triggers at what the code serves.
"""

from __future__ import annotations

import base64
import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from contracts import topology

from . import dockerfile
from .conftest import Rendered, missing_tool
from .facts import (
    DEPLOY,
    DOCKERFILE,
    K8S,
    SECRET_SETTINGS,
    SERVICES,
    Service,
    setting_variables,
)
from .manifests import (
    WORKLOAD_KINDS,
    Doc,
    all_secret_refs,
    config_value,
    container,
    container_port,
    containers,
    maybe,
    named,
    of_kind,
    pod_labels,
    pod_spec,
    secret_ref,
    selects,
)
from .routes import OPERATIONS_PATHS, PUBLIC_SERVICES, public_paths, sample

# The oldest Kubernetes minor the manifests promise to work on; autoscaling/v2
# and policy/v1 are GA well before it.
KUBERNETES_VERSION = "1.29"
KEDA_SCHEMA = Path(__file__).with_name("schemas") / "keda.schema.json"

OVERLAYS = ["base", "dev", "prod"]
WITH_KEDA = ["dev", "prod"]
NAMESPACES = {"dev": "notiflow-dev", "prod": "notiflow"}
MODES = {"base": "production", "dev": "development", "prod": "production"}
SERVICE_IDS = [s.name for s in SERVICES]
PDB_SERVICES = ("sse-gateway", "dispatcher")
STREAM_TIMEOUT_SECONDS = 3600


def kubernetes_validate() -> Any:
    try:
        import kubernetes_validate as module
    except ImportError:
        missing_tool("kubernetes-validate")
    return module


def keda_validator(kind: str) -> Any:
    try:
        import jsonschema
    except ImportError:
        missing_tool("kubernetes-validate")  # which brings jsonschema

    schema = json.loads(KEDA_SCHEMA.read_text())
    return jsonschema.Draft202012Validator(
        {"$ref": f"#/$defs/{kind}", "$defs": schema["$defs"]}
    )


def validation_errors(doc: Doc) -> list[str]:
    """Problems the API server would report, or an unknown kind."""
    name = f"{doc['kind']}/{doc['metadata']['name']}"
    if doc["apiVersion"].startswith("keda.sh/"):
        validator = keda_validator(doc["kind"])
        return [
            f"{name}: {'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(doc)
        ]
    module = kubernetes_validate()
    try:
        module.validate(doc, KUBERNETES_VERSION, strict=True)
    except module.ValidationError as error:
        return [f"{name}: {'.'.join(map(str, error.path))}: {error.message}"]
    except module.SchemaNotFoundError:
        return [f"{name}: no schema for {doc['apiVersion']} {doc['kind']}"]
    return []


def deployment(docs: list[Doc], service: Service) -> Doc:
    return named(docs, "Deployment", service.name)


def drain_seconds(docs: list[Doc], found: Doc) -> float:
    value = config_value(docs, found, "NOTIFLOW_DRAIN_SECONDS")
    assert value is not None, "NOTIFLOW_DRAIN_SECONDS is not set explicitly"
    return float(value)


def health_routes() -> set[str]:
    from contracts.runtime import health_router

    router = health_router(None)  # type: ignore[arg-type]
    return {route.path for route in router.routes}  # type: ignore[attr-defined]


def ingress_routes(docs: list[Doc]) -> list[tuple[Doc, str, str, Doc]]:
    """(ingress, path, pathType, backend service) for every rule."""
    found = []
    for ingress in of_kind(docs, "Ingress"):
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                found.append(
                    (
                        ingress,
                        path["path"],
                        path["pathType"],
                        path["backend"]["service"],
                    )
                )
    return found


def route_for(docs: list[Doc], request: str) -> tuple[Doc, Doc] | None:
    """The (ingress, backend) ingress-nginx picks for a request path."""
    best = None
    for ingress, path, kind, backend in ingress_routes(docs):
        if kind == "Exact":
            matched = request == path
        else:
            prefix = path.rstrip("/")
            matched = request == path or request.startswith(prefix + "/")
        # An exact match wins, then the longest prefix.
        rank = (kind == "Exact", len(path))
        if matched and (best is None or rank > best[0]):
            best = (rank, ingress, backend)
    return (best[1], best[2]) if best else None


# Rendering and schemas


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kustomization_renders_valid_kubernetes_objects(
    rendered: Rendered, overlay: str
) -> None:
    errors = [error for doc in rendered(overlay) for error in validation_errors(doc)]

    assert errors == []


def test_schema_validation_catches_a_misspelt_field(rendered: Rendered) -> None:
    broken = copy.deepcopy(named(rendered("base"), "Deployment", "comments"))
    pod_spec(broken)["containers"][0]["readinesProbe"] = {}
    scaled = copy.deepcopy(named(rendered("dev"), "ScaledObject", "dispatcher"))
    scaled["spec"]["triggers"][0]["metadata"]["queue"] = "x"

    assert validation_errors(broken)
    assert validation_errors(scaled)


# Probes, ports and shutdown


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("service", SERVICES, ids=SERVICE_IDS)
def test_probes_and_ports_are_the_services_own(
    rendered: Rendered, overlay: str, service: Service
) -> None:
    docs = rendered(overlay)
    workload = deployment(docs, service)
    found = container(workload, service.name)
    routes = health_routes()

    assert config_value(docs, found, "PORT") == str(service.port)
    assert config_value(docs, found, "HOST") == "0.0.0.0"
    assert [p["containerPort"] for p in found["ports"]] == [service.port]
    for probe, path in (
        ("startupProbe", "/healthz"),
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
    ):
        check = found[probe]["httpGet"]
        assert check["path"] == path, probe
        assert path in routes
        assert container_port(found, check["port"]) == service.port, probe
    annotations = workload["spec"]["template"]["metadata"].get("annotations", {})
    assert annotations.get("prometheus.io/port") == str(service.port)
    assert annotations.get("prometheus.io/path") == "/metrics" and "/metrics" in routes


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("service", SERVICES, ids=SERVICE_IDS)
def test_service_object_reaches_the_pods(
    rendered: Rendered, overlay: str, service: Service
) -> None:
    docs = rendered(overlay)
    workload = deployment(docs, service)
    found = container(workload, service.name)
    svc = named(docs, "Service", service.name)

    assert selects(svc["spec"]["selector"], pod_labels(workload))
    assert selects(workload["spec"]["selector"]["matchLabels"], pod_labels(workload))
    for port in svc["spec"]["ports"]:
        assert container_port(found, port["targetPort"]) == service.port


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("service", SERVICES, ids=SERVICE_IDS)
def test_grace_period_outlasts_pre_stop_and_drain(
    rendered: Rendered, overlay: str, service: Service
) -> None:
    docs = rendered(overlay)
    workload = deployment(docs, service)
    found = container(workload, service.name)
    pre_stop = found["lifecycle"]["preStop"]["exec"]["command"]

    assert pre_stop[0] == "sleep"
    budget = float(pre_stop[1]) + drain_seconds(docs, found) + 1  # uvicorn adds 1 s
    assert pod_spec(workload)["terminationGracePeriodSeconds"] > budget + 5


# Resources and security


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_requests_resources_and_caps_memory(
    rendered: Rendered, overlay: str
) -> None:
    for workload in rendered(overlay):
        if workload["kind"] not in WORKLOAD_KINDS:
            continue
        for found in containers(workload):
            resources = found.get("resources", {})
            where = f"{workload['metadata']['name']}/{found['name']}"
            assert {"cpu", "memory"} <= set(resources.get("requests", {})), where
            assert "memory" in resources.get("limits", {}), where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_notiflow_pods_run_as_the_image_user_on_a_read_only_root(
    rendered: Rendered, overlay: str
) -> None:
    user = dockerfile.parse(DOCKERFILE).resolved("comments", "USER")
    assert user is not None
    uid = int(user.args.split(":")[0])

    docs = rendered(overlay)
    workloads = [deployment(docs, s) for s in SERVICES]
    workloads.append(named(docs, "Job", "notiflow-migrate"))

    for workload in workloads:
        security = pod_spec(workload)["securityContext"]
        assert security["runAsNonRoot"] is True
        assert security["runAsUser"] == uid
        for found in containers(workload):
            assert found["securityContext"]["readOnlyRootFilesystem"] is True
            assert found["securityContext"]["allowPrivilegeEscalation"] is False


# Disruption budgets and autoscaling


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("name", PDB_SERVICES)
def test_disruption_budget_covers_the_pods_without_blocking_drains(
    rendered: Rendered, overlay: str, name: str
) -> None:
    docs = rendered(overlay)
    budget = named(docs, "PodDisruptionBudget", name)

    assert selects(
        budget["spec"]["selector"]["matchLabels"],
        pod_labels(named(docs, "Deployment", name)),
    )
    assert "minAvailable" not in budget["spec"]
    assert budget["spec"]["maxUnavailable"] == 1


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize(
    "service", [s for s in SERVICES if s.autoscaler == "hpa"], ids=lambda s: s.name
)
def test_cpu_autoscaler_targets_the_deployment(
    rendered: Rendered, overlay: str, service: Service
) -> None:
    docs = rendered(overlay)
    hpa = named(docs, "HorizontalPodAutoscaler", service.name)
    target = hpa["spec"]["scaleTargetRef"]

    assert (target["kind"], target["name"]) == ("Deployment", service.name)
    assert maybe(docs, "Deployment", service.name) is not None
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("service", SERVICES, ids=SERVICE_IDS)
def test_autoscaled_deployments_leave_the_replica_count_alone(
    rendered: Rendered, overlay: str, service: Service
) -> None:
    assert "replicas" not in deployment(rendered(overlay), service)["spec"]


@pytest.mark.parametrize("overlay", WITH_KEDA)
@pytest.mark.parametrize(
    "service", [s for s in SERVICES if s.autoscaler == "keda"], ids=lambda s: s.name
)
def test_queue_autoscaler_watches_the_queue_the_service_consumes(
    rendered: Rendered, overlay: str, service: Service
) -> None:
    docs = rendered(overlay)
    scaled = named(docs, "ScaledObject", service.name)
    (trigger,) = scaled["spec"]["triggers"]
    auth = named(docs, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    amqp = secret_ref(
        container(deployment(docs, service), service.name), "NOTIFLOW_AMQP_URL"
    )

    assert scaled["spec"]["scaleTargetRef"]["name"] == service.name
    assert trigger["type"] == "rabbitmq"
    assert trigger["metadata"]["queueName"] == service.queue
    assert service.queue in {topology.DISPATCHER_QUEUE} | {
        topology.delivery_queue(kind) for kind in topology.CHANNEL_TYPES
    }
    assert trigger["metadata"]["mode"] == "QueueLength"
    assert "host" not in trigger["metadata"], "the address comes from the Secret"
    (host,) = [r for r in auth["spec"]["secretTargetRef"] if r["parameter"] == "host"]
    assert amqp is not None
    assert (host["name"], host["key"]) == (amqp["name"], amqp["key"])
    assert scaled["spec"]["minReplicaCount"] >= 1
    hpas = of_kind(docs, "HorizontalPodAutoscaler")
    assert service.name not in {h["spec"]["scaleTargetRef"]["name"] for h in hpas}


def test_every_consuming_service_is_scaled(rendered: Rendered) -> None:
    docs = rendered("prod")
    watched = {
        s["spec"]["triggers"][0]["metadata"]["queueName"]
        for s in of_kind(docs, "ScaledObject")
    }
    scaled_on_cpu = {
        h["spec"]["scaleTargetRef"]["name"]
        for h in of_kind(docs, "HorizontalPodAutoscaler")
    }

    for service in SERVICES:
        assert service.queue in watched or service.name in scaled_on_cpu, service.name


# Configuration and secrets


@pytest.mark.parametrize("overlay", ["base", "prod"])
def test_no_credential_is_written_into_base_or_prod(
    rendered: Rendered, overlay: str
) -> None:
    docs = rendered(overlay)

    assert of_kind(docs, "Secret") == []
    for config in of_kind(docs, "ConfigMap"):
        data = config.get("data", {})
        assert not SECRET_SETTINGS & set(data), config["metadata"]["name"]
        for value in data.values():
            assert not re.search(r"://[^/@\s]+:[^/@\s]+@", str(value)), value
    for workload in docs:
        if workload["kind"] not in WORKLOAD_KINDS:
            continue
        for found in containers(workload):
            for entry in found.get("env", []):
                if entry["name"] in SECRET_SETTINGS:
                    assert "value" not in entry, entry["name"]
                    assert "secretKeyRef" in entry["valueFrom"], entry["name"]


def test_dev_secret_references_resolve(rendered: Rendered) -> None:
    docs = rendered("dev")
    references = all_secret_refs(docs) + [
        (auth["metadata"]["name"], ref)
        for auth in of_kind(docs, "TriggerAuthentication")
        for ref in auth["spec"]["secretTargetRef"]
    ]

    assert references
    for where, ref in references:
        secret = maybe(docs, "Secret", ref["name"])
        if ref.get("optional"):
            continue
        assert secret is not None, f"{where}: no Secret {ref['name']}"
        assert ref["key"] in secret.get("data", {}), f"{where}: no key {ref['key']}"


def test_prod_reads_one_documented_secret(rendered: Rendered) -> None:
    docs = rendered("prod")
    readme = (DEPLOY / "README.md").read_text(encoding="utf-8")
    references = all_secret_refs(docs) + [
        (auth["metadata"]["name"], ref)
        for auth in of_kind(docs, "TriggerAuthentication")
        for ref in auth["spec"]["secretTargetRef"]
    ]

    assert {ref["name"] for _, ref in references} == {"notiflow-secrets"}
    for where, ref in references:
        assert f"`{ref['key']}`" in readme, f"{where}: key {ref['key']} undocumented"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_config_map_references_resolve(rendered: Rendered, overlay: str) -> None:
    docs = rendered(overlay)
    names = {c["metadata"]["name"] for c in of_kind(docs, "ConfigMap")}

    for workload in docs:
        if workload["kind"] not in WORKLOAD_KINDS:
            continue
        for found in containers(workload):
            for source in found.get("envFrom", []):
                assert source["configMapRef"]["name"] in names
        for volume in pod_spec(workload).get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in names


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_notiflow_variable_is_a_real_setting(
    rendered: Rendered, overlay: str
) -> None:
    known = setting_variables()
    docs = rendered(overlay)
    variables = {
        key for config in of_kind(docs, "ConfigMap") for key in config.get("data", {})
    }
    for workload in docs:
        if workload["kind"] in WORKLOAD_KINDS:
            for found in containers(workload):
                variables |= {entry["name"] for entry in found.get("env", [])}

    unknown = {v for v in variables if v.startswith("NOTIFLOW_")} - known
    assert unknown == set()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_mode_is_set_per_environment(rendered: Rendered, overlay: str) -> None:
    docs = rendered(overlay)
    found = container(named(docs, "Deployment", "comments"), "comments")

    assert config_value(docs, found, "NOTIFLOW_ENV") == MODES[overlay]


@pytest.mark.parametrize("overlay", NAMESPACES)
def test_the_page_calls_every_api_at_the_public_address(
    rendered: Rendered, overlay: str
) -> None:
    # The Ingress routes the APIs on the public host; an address left at its
    # development default would send browsers to a port they cannot reach.
    docs = rendered(overlay)
    found = container(named(docs, "Deployment", "sse-gateway"), "sse-gateway")
    public = config_value(docs, found, "NOTIFLOW_PUBLIC_URL")

    assert public
    assert config_value(docs, found, "NOTIFLOW_API_BASE_URL") == public
    assert config_value(docs, found, "NOTIFLOW_PUSH_BASE_URL") == public


@pytest.mark.parametrize("overlay", WITH_KEDA)
def test_email_sender_is_told_where_smtp_is(rendered: Rendered, overlay: str) -> None:
    docs = rendered(overlay)
    found = container(named(docs, "Deployment", "email-sender"), "email-sender")
    host = config_value(docs, found, "NOTIFLOW_SMTP_HOST")
    port = config_value(docs, found, "NOTIFLOW_SMTP_PORT")

    assert host and port
    if overlay == "dev":
        sink = named(docs, "Service", host)
        assert int(port) in {p["port"] for p in sink["spec"]["ports"]}


# Ingress


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ingress_backends_exist(rendered: Rendered, overlay: str) -> None:
    docs = rendered(overlay)

    for ingress, path, _, backend in ingress_routes(docs):
        service = named(docs, "Service", backend["name"])
        ports = {p.get("name") for p in service["spec"]["ports"]}
        assert backend["port"]["name"] in ports, (ingress["metadata"]["name"], path)


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("name", sorted(PUBLIC_SERVICES))
def test_every_public_route_reaches_its_service(
    rendered: Rendered, overlay: str, name: str
) -> None:
    docs = rendered(overlay)
    paths = public_paths(PUBLIC_SERVICES[name], MODES[overlay])

    for template in sorted(paths):
        found = route_for(docs, sample(template))
        assert found is not None, f"{template} is not routed"
        assert found[1]["name"] == name, template


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("path", sorted(OPERATIONS_PATHS))
def test_operations_routes_are_not_exposed(
    rendered: Rendered, overlay: str, path: str
) -> None:
    assert route_for(rendered(overlay), path) is None


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_event_streams_pass_unbuffered_with_long_timeouts(
    rendered: Rendered, overlay: str
) -> None:
    found = route_for(rendered(overlay), "/sse")
    assert found is not None
    ingress, backend = found
    annotations = ingress["metadata"]["annotations"]

    assert backend["name"] == "sse-gateway"
    assert annotations["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    for timeout in ("proxy-read-timeout", "proxy-send-timeout"):
        value = int(annotations[f"nginx.ingress.kubernetes.io/{timeout}"])
        assert value >= STREAM_TIMEOUT_SECONDS, timeout
    assert ingress["spec"]["ingressClassName"] == "nginx"


@pytest.mark.parametrize("overlay", WITH_KEDA)
def test_overlay_names_its_host(rendered: Rendered, overlay: str) -> None:
    for ingress in of_kind(rendered(overlay), "Ingress"):
        hosts = {rule.get("host") for rule in ingress["spec"]["rules"]}
        assert None not in hosts, ingress["metadata"]["name"]
        if overlay == "prod":
            assert ingress["spec"]["tls"][0]["hosts"] == sorted(hosts)


# The migration Job and the images


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_migration_job_runs_the_migrate_image_with_the_database_secret(
    rendered: Rendered, overlay: str
) -> None:
    job = named(rendered(overlay), "Job", "notiflow-migrate")
    (found,) = pod_spec(job)["containers"]

    assert "/migrate" in "/" + found["image"].split(":")[0]
    assert "command" not in found and "args" not in found, "the image's CMD runs"
    assert secret_ref(found, "NOTIFLOW_DATABASE_URL") is not None
    assert pod_spec(job)["restartPolicy"] == "Never"
    assert job["spec"]["backoffLimit"] >= 1


@pytest.mark.parametrize("overlay", WITH_KEDA)
def test_overlay_pins_every_notiflow_image(rendered: Rendered, overlay: str) -> None:
    targets = {s.name for s in SERVICES} | {"migrate"}

    for workload in rendered(overlay):
        if workload["kind"] not in WORKLOAD_KINDS:
            continue
        for found in containers(workload):
            image = found["image"]
            repository, _, tag = image.rpartition(":")
            if "notiflow/" not in image:
                continue
            assert repository.rsplit("/", 1)[-1] in targets, image
            assert tag and "/" not in tag, f"{image} has no tag"
            if overlay == "prod":
                assert tag not in ("latest", "dev"), image


@pytest.mark.parametrize("overlay", WITH_KEDA)
def test_overlay_keeps_everything_in_its_namespace(
    rendered: Rendered, overlay: str
) -> None:
    docs = rendered(overlay)
    namespace = NAMESPACES[overlay]

    assert named(docs, "Namespace", namespace)
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == namespace, doc["metadata"][
                "name"
            ]


def test_dev_runs_its_own_database_and_broker(rendered: Rendered) -> None:
    docs = rendered("dev")
    secret = named(docs, "Secret", all_secret_refs(docs)[0][1]["name"])

    def decoded(key: str) -> str:
        return base64.b64decode(secret["data"][key]).decode()

    for name, port, key in (
        ("postgres", 5432, "database-url"),
        ("rabbitmq", 5672, "amqp-url"),
    ):
        named(docs, "StatefulSet", name)
        service = named(docs, "Service", name)
        assert port in {p["port"] for p in service["spec"]["ports"]}
        assert f"@{name}:{port}/" in decoded(key)


def test_prod_brings_no_database_or_broker(rendered: Rendered) -> None:
    docs = rendered("prod")

    assert of_kind(docs, "StatefulSet") == []
    assert {s["metadata"]["name"] for s in of_kind(docs, "Service")} == {
        s.name for s in SERVICES
    }


def test_rabbitmq_plugins_match_the_compose_stack(rendered: Rendered) -> None:
    (config,) = [
        c
        for c in of_kind(rendered("dev"), "ConfigMap")
        if c["metadata"]["name"].startswith("rabbitmq-config-")
    ]
    folder = DEPLOY / "rabbitmq"
    plugins = (folder / "enabled_plugins").read_text(encoding="utf-8").strip()
    settings = [
        line
        for line in (folder / "notiflow.conf").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]

    assert config["data"]["enabled_plugins"] == plugins
    assert config["data"]["notiflow.conf"].splitlines() == settings


def test_every_manifest_file_is_used() -> None:
    listed: set[Path] = set()
    for kustomization in K8S.rglob("kustomization.yaml"):
        spec = yaml.safe_load(kustomization.read_text())
        entries = spec.get("resources", []) + spec.get("configurations", [])
        entries += [p["path"] for p in spec.get("patches", []) if "path" in p]
        for entry in entries:
            path = (kustomization.parent / entry).resolve()
            if path.is_file():
                listed.add(path)
    files = {p.resolve() for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml"}

    assert files - listed == set()
