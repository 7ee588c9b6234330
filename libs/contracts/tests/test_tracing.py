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
