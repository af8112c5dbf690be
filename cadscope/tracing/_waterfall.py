"""Read OTLP/JSON span files and draw a trace as a terminal waterfall."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

__all__ = ["SpanRecord", "read_otlp_json", "render_waterfall", "traces_by_job"]

_KEY_ATTRIBUTES = (
    "cad.job_id",
    "cad.engine",
    "cad.freecad_version",
    "cad.occt_version",
    "cad.stage",
    "cad.boolean.operation",
    "cad.solids_count",
    "cad.feature",
    "cad.export.format",
    "cad.export.size_bytes",
    "cad.a4.iterations",
    "cad.subprocess.outcome",
    "error.type",
    "http.route",
    "http.status_code",
)


@dataclass
class SpanRecord:
    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    start_ns: int
    end_ns: int
    status_code: int
    kind: int
    service: str
    attributes: dict[str, Any] = field(default_factory=dict)

    @property
    def duration_s(self) -> float:
        return max(self.end_ns - self.start_ns, 0) / 1e9


def _value(any_value: dict[str, Any]) -> Any:
    for key in ("stringValue", "boolValue", "doubleValue"):
        if key in any_value:
            return any_value[key]
    if "intValue" in any_value:
        return int(any_value["intValue"])
    if "arrayValue" in any_value:
        return [_value(v) for v in any_value["arrayValue"].get("values", [])]
    return None


def _attributes(items: Iterable[dict[str, Any]]) -> dict[str, Any]:
    return {item["key"]: _value(item.get("value", {})) for item in items}


def read_otlp_json(lines: Iterable[str]) -> Iterator[SpanRecord]:
    """Spans from OTLP/JSON lines (one ``ExportTraceServiceRequest`` per line)."""
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            request = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"line {number}: not JSON ({exc})") from None
        for resource_spans in request.get("resourceSpans", []):
            service = str(_attributes(resource_spans.get("resource", {}).get("attributes", [])).get("service.name", ""))
            for scope_spans in resource_spans.get("scopeSpans", []):
                for span in scope_spans.get("spans", []):
                    yield SpanRecord(
                        trace_id=span["traceId"],
                        span_id=span["spanId"],
                        parent_span_id=span.get("parentSpanId", ""),
                        name=span["name"],
                        start_ns=int(span["startTimeUnixNano"]),
                        end_ns=int(span["endTimeUnixNano"]),
                        status_code=int(span.get("status", {}).get("code", 0)),
                        kind=int(span.get("kind", 0)),
                        service=service,
                        attributes=_attributes(span.get("attributes", [])),
                    )


def traces_by_job(spans: Iterable[SpanRecord]) -> dict[str, list[SpanRecord]]:
    """Spans grouped by trace, keyed by the ``cad.job_id`` found in the trace."""
    traces: dict[str, list[SpanRecord]] = defaultdict(list)
    for span in spans:
        traces[span.trace_id].append(span)
    by_job: dict[str, list[SpanRecord]] = {}
    for trace_spans in traces.values():
        job = next((s.attributes["cad.job_id"] for s in trace_spans if "cad.job_id" in s.attributes), None)
        if job is not None:
            by_job.setdefault(str(job), []).extend(trace_spans)
    return by_job


def render_waterfall(spans: list[SpanRecord], out: TextIO, width: int = 40) -> None:
    """Print spans as an indented tree with duration bars on a shared time axis."""
    if not spans:
        out.write("(no spans)\n")
        return
    ids = {s.span_id for s in spans}
    children: dict[str, list[SpanRecord]] = defaultdict(list)
    roots = []
    for span in spans:
        if span.parent_span_id and span.parent_span_id in ids:
            children[span.parent_span_id].append(span)
        else:
            roots.append(span)
    t0 = min(s.start_ns for s in spans)
    total = max(max(s.end_ns for s in spans) - t0, 1)
    out.write(f"trace {spans[0].trace_id}  {len(spans)} spans  {total / 1e9 * 1000:.1f} ms\n")

    def draw(span: SpanRecord, depth: int) -> None:
        left = int((span.start_ns - t0) / total * width)
        length = max(1, int((span.end_ns - span.start_ns) / total * width))
        bar = " " * left + "█" * min(length, width - left) if left < width else " " * (width - 1) + "▏"
        status = {2: "ERROR", 1: "ok"}.get(span.status_code, "")
        keys = " ".join(
            f"{k.removeprefix('cad.')}={span.attributes[k]}" for k in _KEY_ATTRIBUTES if k in span.attributes
        )
        label = ("  " * depth + span.name)[:44]
        out.write(f"{label:<44} {bar:<{width}} {span.duration_s * 1000:9.2f} ms {status:<5} {keys}\n")
        for child in sorted(children.get(span.span_id, []), key=lambda s: s.start_ns):
            draw(child, depth + 1)

    for root in sorted(roots, key=lambda s: s.start_ns):
        draw(root, 0)
