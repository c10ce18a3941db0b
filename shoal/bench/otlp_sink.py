"""A minimal OTLP/HTTP trace receiver on 127.0.0.1, for the overhead benchmark and the tracing tests.

It accepts what an OpenTelemetry OTLP/HTTP exporter sends (POST /v1/traces, an ExportTraceServiceRequest
in protobuf, https://opentelemetry.io/docs/specs/otlp/#otlphttp), answers 200 with an empty
ExportTraceServiceResponse, and keeps the spans it got, so that a test can read them back and a benchmark
pays the real cost of exporting (serialization and an HTTP POST per batch) to a collector on the machine.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

TRACES_PATH = "/v1/traces"


@dataclass
class ReceivedSpan:
    """One span as received: enough to check names, nesting, times and attributes."""

    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    resource: dict[str, Any] = field(default_factory=dict)


class OtlpSink:
    """`with OtlpSink() as sink:` serves on sink.endpoint until the block ends; sink.spans() reads back."""

    def __init__(self) -> None:
        self._spans: list[ReceivedSpan] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="otlp-sink", daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}{TRACES_PATH}"

    def spans(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self._spans)

    def __enter__(self) -> OtlpSink:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _receive(self, body: bytes) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        request = ExportTraceServiceRequest.FromString(body)
        received = [
            _span(span, _attributes(rs.resource.attributes))
            for rs in request.resource_spans
            for ss in rs.scope_spans
            for span in ss.spans
        ]
        with self._lock:
            self._spans.extend(received)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path != TRACES_PATH:
                    self.send_error(404)
                    return
                sink._receive(body)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")  # an empty ExportTraceServiceResponse
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
                pass

        return Handler


def _span(span: Any, resource: dict[str, Any]) -> ReceivedSpan:
    return ReceivedSpan(
        name=span.name,
        trace_id=span.trace_id.hex(),
        span_id=span.span_id.hex(),
        parent_span_id=span.parent_span_id.hex(),
        start_ns=span.start_time_unix_nano,
        end_ns=span.end_time_unix_nano,
        attributes=_attributes(span.attributes),
        resource=resource,
    )


def _attributes(key_values: Any) -> dict[str, Any]:
    """OTLP KeyValue list -> plain dict (strings, ints, floats, bools, and arrays of them)."""
    return {kv.key: _value(kv.value) for kv in key_values}


def _value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    return getattr(value, kind) if kind else None


def main() -> None:
    """`python -m shoal.bench.otlp_sink`: a receiver of its own process (a local collector, as a sidecar
    would be). Prints its endpoint, then, on SIGTERM or SIGINT, how many spans it received."""
    import signal
    import sys

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with OtlpSink() as sink:
        print(sink.endpoint, flush=True)
        stop.wait()
        print(len(sink.spans()), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
