"""OpenTelemetry traces end to end: `salus serve` exports the spans of real
requests to an OTLP receiver built on the `opentelemetry-proto` package —
OTLP/HTTP protobuf over HTTPS (with `telemetry.ca_file`), then OTLP/gRPC —
under the client's W3C `traceparent`, with the phases inside the request span,
nothing but the documented attributes, and no request text in any exported
byte. A collector that goes away costs requests nothing and is counted; when
it comes back, export resumes.

Run by scripts/otel-trace-test.sh, which provides (environment): SALUS_BIN,
SALUS_MODEL, SALUS_OTEL_WORK (certificates, keys, audit key), and the
virtualenv with opentelemetry-proto and grpcio.
"""

import http.server
import json
import os
import secrets
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

sys.path.insert(0, os.path.dirname(__file__))
from checks import free_port, run  # noqa: E402

BIN = os.environ["SALUS_BIN"]
MODEL = os.environ["SALUS_MODEL"]
WORK = os.environ["SALUS_OTEL_WORK"]
KEY = open(os.path.join(WORK, "inference.key")).read().strip()
TLS_CA = os.path.join(WORK, "cert.pem")
COLLECTOR_CA = os.path.join(WORK, "ca.pem")

# Every attribute key a Salus span may carry (server/src/telemetry.rs SPAN_ATTRIBUTES).
DOCUMENTED = {
    "http.request.method", "http.route", "http.response.status_code", "error.type", "salus.request_id",
    "salus.principal", "gen_ai.operation.name", "gen_ai.request.model", "gen_ai.usage.input_tokens",
    "gen_ai.usage.output_tokens", "salus.cached_prompt_tokens", "salus.audit.event", "salus.audit.written",
}
CANARY = "zzotelcanary" + secrets.token_hex(6)


class Received:
    """Every export request a receiver got: raw bytes and the parsed spans."""

    def __init__(self):
        self.lock = threading.Lock()
        self.raw = []
        self.spans = []  # (resource attributes, span)

    def add(self, body):
        req = trace_service_pb2.ExportTraceServiceRequest()
        req.ParseFromString(body)
        with self.lock:
            self.raw.append(body)
            for rs in req.resource_spans:
                resource = {kv.key: kv.value.string_value for kv in rs.resource.attributes}
                for ss in rs.scope_spans:
                    for span in ss.spans:
                        self.spans.append((resource, span))

    def of_trace(self, trace_id_hex):
        with self.lock:
            return [(r, s) for r, s in self.spans if s.trace_id.hex() == trace_id_hex]

    def all_bytes(self):
        with self.lock:
            return b"".join(self.raw)


RECEIVED = Received()


class OtlpHttp(http.server.BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        ok = self.path == "/v1/traces" and self.headers.get("content-type") == "application/x-protobuf"
        if ok:
            RECEIVED.add(body)
        reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
        self.send_response(200 if ok else 400)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *_):
        pass


def start_https_receiver():
    port = free_port()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), OtlpHttp)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(os.path.join(WORK, "collector.pem"), os.path.join(WORK, "collector-key.pem"))
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return port, httpd


class TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def Export(self, request, context):  # noqa: N802 - gRPC's name
        RECEIVED.add(request.SerializeToString())
        return trace_service_pb2.ExportTraceServiceResponse()


def start_grpc_receiver(port):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(TraceService(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    return server


class Salus:
    def __init__(self, name, telemetry):
        self.port, self.metrics_port = free_port(), free_port()
        env = dict(os.environ)
        env.update({
            "SALUS_MODEL__ALLOW_PLAINTEXT_WEIGHTS": "true",
            "SALUS_MODEL__ID": "smollm2-135m",
            "SALUS_LOGGING__FORMAT": "json",
            "SALUS_SERVER__METRICS_LISTEN": f"127.0.0.1:{self.metrics_port}",
            "SALUS_AUDIT__DIR": os.path.join(WORK, f"audit-{name}"),
            "SALUS_AUDIT__KEY": "file:" + os.path.join(WORK, "audit.key"),
            "SALUS_AUDIT__INSTANCE": f"replica-{name}",
        })
        # [telemetry] keys, one variable each (SALUS_<SECTION>__<KEY>).
        env.update({f"SALUS_TELEMETRY__{k.upper()}": str(v) for k, v in telemetry.items()})
        self.err_path = os.path.join(WORK, f"server-{name}.err")
        self.out = open(os.path.join(WORK, f"server-{name}.out"), "wb")
        self.err = open(self.err_path, "wb")
        self.proc = subprocess.Popen(
            [BIN, "serve", "--listen", f"127.0.0.1:{self.port}", "--model", MODEL,
             "--tls-cert", os.path.join(WORK, "cert.pem"), "--tls-key", os.path.join(WORK, "key.pem"),
             "--api-keys", os.path.join(WORK, "api-keys.json")],
            env=env, stdout=self.out, stderr=self.err)
        self.ssl = ssl.create_default_context(cafile=TLS_CA)
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"https://127.0.0.1:{self.port}/health", context=self.ssl, timeout=2)
                return
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    raise AssertionError("salus did not start: " + open(self.err_path).read()[-2000:])
                time.sleep(0.3)

    def post(self, path, body, headers=None):
        req = urllib.request.Request(
            f"https://127.0.0.1:{self.port}{path}", data=json.dumps(body).encode(), method="POST",
            headers={"authorization": f"Bearer {KEY}", "content-type": "application/json", **(headers or {})})
        with urllib.request.urlopen(req, context=self.ssl, timeout=120) as resp:
            return resp.status, resp.read()

    def metric(self, name):
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise AssertionError(f"{name} not in /metrics")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.out.close()
        self.err.close()
        for path in (self.err_path, self.out.name):
            data = open(path, "rb").read()
            assert CANARY.encode() not in data, f"{path} holds request text"
        assert self.proc.returncode == 0, f"exit status {self.proc.returncode}"


def traceparent():
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, span_id, f"00-{trace_id}-{span_id}-01"


def wait_for_trace(trace_id, names, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        spans = RECEIVED.of_trace(trace_id)
        got = sorted(s.name for _, s in spans)
        if all(got.count(n) >= names.count(n) for n in set(names)):
            return spans
        time.sleep(0.2)
    raise AssertionError(f"spans of trace {trace_id}: {sorted(s.name for _, s in RECEIVED.of_trace(trace_id))}")


def attrs(span):
    out = {}
    for kv in span.attributes:
        v = kv.value
        out[kv.key] = v.string_value or (v.int_value if v.HasField("int_value") else v.bool_value)
    return out


def assert_request_tree(spans, root_name, client_trace, client_span, replica):
    roots = [s for _, s in spans if s.name == root_name]
    assert len(roots) == 1, [s.name for _, s in spans]
    root = roots[0]
    assert root.kind == 2, root.kind  # SPAN_KIND_SERVER
    assert root.trace_id.hex() == client_trace and root.parent_span_id.hex() == client_span
    a = attrs(root)
    assert a["http.response.status_code"] == 200 and a["salus.principal"] == "otel-client", a
    assert a["gen_ai.request.model"] == "smollm2-135m" and a["gen_ai.usage.output_tokens"] > 0, a
    assert a["salus.request_id"].startswith("req_"), a
    children = {}
    for resource, s in spans:
        assert resource.get("service.name") == "salus" and resource.get("service.instance.id") == replica, resource
        assert set(attrs(s)) <= DOCUMENTED, (s.name, set(attrs(s)) - DOCUMENTED)
        if s is root:
            continue
        assert s.parent_span_id == root.span_id, s.name
        assert root.start_time_unix_nano <= s.start_time_unix_nano <= s.end_time_unix_nano <= root.end_time_unix_nano, s.name
        children.setdefault(s.name, []).append(s)
    assert sorted(children) == ["audit.write", "decode", "prefill", "queue"], sorted(children)
    queue, prefill, decode = children["queue"][0], children["prefill"][0], children["decode"][0]
    assert queue.end_time_unix_nano <= prefill.start_time_unix_nano <= prefill.end_time_unix_nano <= decode.start_time_unix_nano
    audits = sorted(children["audit.write"], key=lambda s: s.start_time_unix_nano)
    assert [attrs(s)["salus.audit.event"] for s in audits] == ["inference.started", "inference.completed"]
    assert audits[0].end_time_unix_nano <= queue.start_time_unix_nano
    assert decode.end_time_unix_nano <= audits[1].start_time_unix_nano
    return root


def chat(stream):
    return {"model": "smollm2-135m", "max_tokens": 12, "stream": stream,
            "messages": [{"role": "user", "content": f"Summarize the note of {CANARY}."}], "user": CANARY}


def check_otlp_http_protobuf_over_https():
    port, httpd = start_https_receiver()
    telemetry = {"endpoint": f"https://127.0.0.1:{port}", "ca_file": COLLECTOR_CA, "batch_delay_ms": 200}
    salus = Salus("http", telemetry)
    try:
        trace_id, span_id, parent = traceparent()
        status, body = salus.post("/v1/chat/completions", chat(True), {"traceparent": parent, "tracestate": f"v={CANARY}"})
        assert status == 200 and b"[DONE]" in body
        spans = wait_for_trace(trace_id, ["POST /v1/chat/completions", "queue", "prefill", "decode", "audit.write", "audit.write"])
        assert_request_tree(spans, "POST /v1/chat/completions", trace_id, span_id, "replica-http")
        assert salus.metric("salus_trace_spans_exported_total") >= 6
    finally:
        salus.stop()
        httpd.shutdown()
    assert CANARY.encode() not in RECEIVED.all_bytes(), "an exported span holds request text"


def check_otlp_grpc_and_a_collector_that_goes_away():
    port = free_port()
    grpc_server = start_grpc_receiver(port)
    telemetry = {"endpoint": f"http://127.0.0.1:{port}", "protocol": "grpc", "batch_delay_ms": 200,
                 "export_timeout_secs": 2}
    salus = Salus("grpc", telemetry)
    try:
        trace_id, span_id, parent = traceparent()
        body = {"model": "smollm2-135m", "prompt": f"Patient {CANARY} presents with", "max_tokens": 8}
        status, _ = salus.post("/v1/completions", body, {"traceparent": parent})
        assert status == 200
        spans = wait_for_trace(trace_id, ["POST /v1/completions", "queue", "prefill", "decode", "audit.write", "audit.write"])
        root = assert_request_tree(spans, "POST /v1/completions", trace_id, span_id, "replica-grpc")
        assert attrs(root)["gen_ai.operation.name"] == "text_completion"
        # The collector goes away: requests are served as before, failed exports are counted.
        grpc_server.stop(0).wait()
        failures = salus.metric("salus_trace_export_failures_total")
        t0 = time.time()
        for _ in range(3):
            assert salus.post("/v1/completions", body)[0] == 200
        served = time.time() - t0
        deadline = time.time() + 20
        while salus.metric("salus_trace_export_failures_total") <= failures:
            assert time.time() < deadline, "a failed export was not counted"
            time.sleep(0.3)
        print(f"  3 requests with the collector down: {served:.2f}s", flush=True)
        # It comes back on the same port: export resumes.
        grpc_server = start_grpc_receiver(port)
        trace_id, span_id, parent = traceparent()
        assert salus.post("/v1/completions", body, {"traceparent": parent})[0] == 200
        wait_for_trace(trace_id, ["POST /v1/completions"], timeout=30)
    finally:
        salus.stop()
        grpc_server.stop(0)
    assert CANARY.encode() not in RECEIVED.all_bytes(), "an exported span holds request text"


if __name__ == "__main__":
    run(dict(globals()))
