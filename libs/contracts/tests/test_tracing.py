"""How a span carries a trace that came with a message or request."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

from contracts import tracing

TRACE = "0af7651916cd43dd8448eb211c80319c"
INCOMING = {"traceparent": f"00-{TRACE}-b7ad6b7169203331-01"}


def test_a_process_that_exports_nothing_carries_an_incoming_trace_on_unchanged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    provider = TracerProvider(sampler=ALWAYS_OFF)
    monkeypatch.setattr(tracing, "_tracer", provider.get_tracer("test"))
    monkeypatch.setattr(tracing, "_exporting", False)

    with tracing.span("consume q", parent_headers=INCOMING):
        seen = tracing.current_trace_id()
        passed_on = tracing.inject()

    assert seen == TRACE
    # No span of its own: the next service continues the caller's span.
    assert passed_on["traceparent"] == INCOMING["traceparent"]
    assert tracing.current_trace_id() is None


def test_a_process_that_exports_records_a_child_of_the_incoming_trace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    exported = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exported))
    monkeypatch.setattr(tracing, "_tracer", provider.get_tracer("test"))
    monkeypatch.setattr(tracing, "_exporting", True)

    with tracing.span("consume q", parent_headers=INCOMING):
        passed_on = tracing.inject()

    [span] = exported.get_finished_spans()
    assert span.name == "consume q"
    assert format(span.context.trace_id, "032x") == TRACE
    assert format(span.parent.span_id, "016x") == "b7ad6b7169203331"
    assert passed_on["traceparent"] == (
        f"00-{TRACE}-{format(span.context.span_id, '016x')}-01"
    )


async def _traced(headers: list[tuple[bytes, bytes]]) -> dict[str, str]:
    """What a request with ``headers`` sees inside :class:`tracing.TraceContext`."""
    seen: dict[str, str] = {}

    async def app(scope: object, receive: object, send: object) -> None:
        seen.update(tracing.inject())
        seen["trace_id"] = tracing.current_trace_id() or ""

    scope = {"type": "http", "headers": headers}
    await tracing.TraceContext(app)(scope, None, None)  # type: ignore[arg-type]
    return seen


async def test_a_request_runs_in_the_trace_it_came_with_and_passes_it_on() -> None:
    seen = await _traced([(b"traceparent", INCOMING["traceparent"].encode())])

    assert seen["trace_id"] == TRACE
    assert seen["traceparent"] == INCOMING["traceparent"]
    assert tracing.current_trace_id() is None


@pytest.mark.parametrize(
    "headers",
    [[], [(b"traceparent", b"00-not-a-trace-01")], [(b"tracestate", b"k=v")]],
    ids=["none", "malformed", "state without parent"],
)
async def test_a_request_without_a_usable_trace_starts_one_not_sampled(
    headers: list[tuple[bytes, bytes]],
) -> None:
    first = await _traced(headers)
    second = await _traced(headers)

    version, trace_id, span_id, flags = first["traceparent"].split("-")
    assert (version, flags) == ("00", "00")
    assert trace_id == first["trace_id"] and int(trace_id, 16) != 0
    assert int(span_id, 16) != 0
    assert second["trace_id"] != first["trace_id"]


def test_fastapi_telemetry_is_off_unless_traces_are_exported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    assert tracing.fastapi_telemetry() == {
        "tracing": False,
        "metrics": False,
        "logs": False,
        "operation_spans": False,
    }

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    assert tracing.fastapi_telemetry() == {}
