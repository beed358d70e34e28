"""An OTLP/HTTP receiver for the tests of `model-tracer serve --otlp-endpoint`.

Listens on 127.0.0.1 (port 0 by default), prints `listening on PORT`, and
decodes every POST /v1/logs and /v1/traces with the generated protobuf
classes of the `opentelemetry-proto` package, as a collector does. Each
log record and each span becomes one JSON line of --out (flushed at once):

    {"signal": "logs", "resource": {...}, "scope": "...", "severity": "WARN",
     "event_name": "...", "body": "...", "attributes": {...},
     "trace_id": "...", "span_id": "..."}
    {"signal": "traces", "resource": {...}, "scope": "...", "name": "...",
     "trace_id": "...", "span_id": "...", "parent_span_id": "...",
     "start": NANOS, "end": NANOS, "attributes": {...}}

It answers each export with an empty Export*ServiceResponse (protobuf),
anything else with 404, and a body it cannot decode with 400.

    python3 otlp_receiver.py --out records.jsonl [--port 0]
"""

import argparse
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)


def any_value(v):
    """An AnyValue as a plain JSON value."""
    kind = v.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return attributes(v.kvlist_value.values)
    if kind == "bytes_value":
        return v.bytes_value.hex()
    return getattr(v, kind)


def attributes(kvs):
    return {kv.key: any_value(kv.value) for kv in kvs}


def log_lines(request):
    for rl in request.resource_logs:
        resource = attributes(rl.resource.attributes)
        for sl in rl.scope_logs:
            for r in sl.log_records:
                yield {
                    "signal": "logs",
                    "resource": resource,
                    "scope": sl.scope.name,
                    "severity": r.severity_text,
                    "severity_number": r.severity_number,
                    "event_name": r.event_name,
                    "body": any_value(r.body),
                    "attributes": attributes(r.attributes),
                    "trace_id": r.trace_id.hex(),
                    "span_id": r.span_id.hex(),
                }


def span_lines(request):
    for rs in request.resource_spans:
        resource = attributes(rs.resource.attributes)
        for ss in rs.scope_spans:
            for s in ss.spans:
                yield {
                    "signal": "traces",
                    "resource": resource,
                    "scope": ss.scope.name,
                    "name": s.name,
                    "trace_id": s.trace_id.hex(),
                    "span_id": s.span_id.hex(),
                    "parent_span_id": s.parent_span_id.hex(),
                    "start": s.start_time_unix_nano,
                    "end": s.end_time_unix_nano,
                    "status": s.status.code,
                    "attributes": attributes(s.attributes),
                }


SIGNALS = {
    "/v1/logs": (ExportLogsServiceRequest, ExportLogsServiceResponse, log_lines),
    "/v1/traces": (ExportTraceServiceRequest, ExportTraceServiceResponse, span_lines),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON Lines file of the decoded records")
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args()
    out = open(args.out, "a", encoding="utf-8")
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def answer(self, status, body=b"", content_type="application/x-protobuf"):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            signal = SIGNALS.get(self.path)
            if signal is None:
                self.answer(404, b"no such signal", "text/plain")
                return
            request_type, response_type, lines = signal
            if self.headers.get("Content-Type") != "application/x-protobuf":
                self.answer(415, b"protobuf only", "text/plain")
                return
            request = request_type()
            try:
                request.ParseFromString(body)
            except DecodeError as e:
                self.answer(400, str(e).encode(), "text/plain")
                return
            with lock:
                for line in lines(request):
                    out.write(json.dumps(line) + "\n")
                out.flush()
            self.answer(200, response_type().SerializeToString())

        def log_message(self, format, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print(f"listening on {server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        out.close()


if __name__ == "__main__":
    sys.exit(main())
