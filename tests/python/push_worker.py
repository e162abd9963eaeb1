"""A push worker that misbehaves on request, for the runner tests. Each
row's input `mode` says what to do: ok, slow, hang (the whole call),
garbage (answers non-JSON), crash (exits mid-batch), sigkill (kills itself
with SIGKILL mid-batch), fail500, missing (the
row is left out), dup (the row is answered twice), permanent, hog (takes
HOG_MB megabytes of memory, 512 by default), tmpwrite (writes a file under
/tmp, reads it back and answers with what it saw, or fails permanently
with the OS error), nul (answers a NUL in an attribute value), nulkey (a
NUL in an attribute name), nulerror (fails permanently with a NUL in its
message).

With GPU_LOCK_DIR set, the worker takes an exclusive lock on a file named
after each GPU in CUDA_VISIBLE_DEVICES for as long as it lives, and says in
every result whether another live worker held one of them (gpu_shared).

With OTEL_EXPORTER_OTLP_ENDPOINT set, each call that carries a W3C
`traceparent` is exported as one span (`worker.run`, OTLP/HTTP JSON) under
the runner's call span, as a worker instrumented with OpenTelemetry would."""

import fcntl
import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _send(self, status, data, ctype="application/json"):
        self.send_response(status)
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._send(200, b'{"status": "ok"}')

    def do_POST(self):
        started = time.time_ns()
        batch = json.loads(self.rfile.read(int(self.headers["content-length"])))
        try:
            return self.run(batch)
        finally:
            export_span(self.headers.get("traceparent"), started, len(batch["items"]))

    def run(self, batch):
        modes = [i["input"].get("mode") or "ok" for i in batch["items"]]
        if "crash" in modes:
            os._exit(3)
        if "sigkill" in modes:
            os.kill(os.getpid(), 9)
        if "hog" in modes:
            hog = b"x" * (int(os.environ.get("HOG_MB", "512")) << 20)
            del hog
        if "hang" in modes:
            time.sleep(3600)
        if "garbage" in modes:
            self._send(200, b"<html>this is not json</html>", "text/html")
            return
        if "fail500" in modes:
            self._send(500, b'{"error": "boom"}')
            return
        if "slow" in modes:
            time.sleep(float(os.environ.get("SLOW_SECONDS", "0.5")))
        out = []
        for item, mode in zip(batch["items"], modes):
            ref = {"namespace": item["namespace"], "id": item["id"]}
            if mode == "missing":
                continue
            if mode == "permanent":
                out.append({**ref, "error": {"kind": "permanent", "message": "cannot do " + item["id"]}})
                continue
            if mode == "nul":
                out.append({**ref, "attributes": {"result": "bad\u0000" + item["id"]}})
                continue
            if mode == "nulkey":
                out.append({**ref, "attributes": {"res\u0000ult": "ok"}})
                continue
            if mode == "nulerror":
                out.append({**ref, "error": {"kind": "permanent", "message": "cannot\u0000 do it"}})
                continue
            if mode == "tmpwrite":
                try:
                    attrs = write_tmp(item["id"])
                except OSError as e:
                    out.append({**ref, "error": {"kind": "permanent", "message": f"writing under /tmp: {e}"}})
                    continue
                out.append({**ref, "attributes": attrs})
                continue
            res = {**ref, "attributes": {"result": "ok:" + item["id"], "pid": os.getpid(), **GPU}}
            out.append(res)
            if mode == "dup":
                out.append(res)
        self._send(200, json.dumps({"results": out}).encode())

    def log_message(self, *args):
        pass


def write_tmp(row_id):
    """Writes, reads back and removes a file under /tmp as this user."""
    import tempfile

    data = ("written by " + row_id).encode()
    fd, path = tempfile.mkstemp(dir="/tmp", prefix="layer-")
    try:
        os.write(fd, data)
        os.close(fd)
        with open(path, "rb") as f:
            back = f.read()
    finally:
        os.unlink(path)
    st = os.stat("/tmp")
    return {
        "tmp_read_back": back.decode(),
        "tmp_mode": format(st.st_mode & 0o7777, "o"),
        "tmp_owner": st.st_uid,
        "uid": os.getuid(),
    }


def export_span(traceparent, started, rows):
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if not endpoint or not traceparent:
        return
    import secrets
    import urllib.request

    _, trace_id, parent_id, _ = traceparent.split("-")
    span = {
        "traceId": trace_id,
        "spanId": secrets.token_hex(8),
        "parentSpanId": parent_id,
        "name": "worker.run",
        "kind": 2,
        "startTimeUnixNano": str(started),
        "endTimeUnixNano": str(time.time_ns()),
        "attributes": [{"key": "rows", "value": {"intValue": str(rows)}}],
    }
    body = {
        "resourceSpans": [
            {
                "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "push-worker"}}]},
                "scopeSpans": [{"scope": {"name": "push_worker"}, "spans": [span]}],
            }
        ]
    }
    req = urllib.request.Request(
        endpoint.rstrip("/") + "/v1/traces",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )
    urllib.request.urlopen(req, timeout=5).read()


def exit_with_parent():
    # On Linux a runner's workers die with it (its parent-death signal);
    # elsewhere a runner killed with SIGKILL cannot stop them, so this one
    # also leaves when it is orphaned.
    import threading

    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


GPU = {}
LOCKS = []


def lock_gpus():
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    GPU["gpus"] = visible
    if not os.environ.get("GPU_LOCK_DIR") or not visible:
        return
    shared = False
    for uuid in visible.split(","):
        f = open(os.path.join(os.environ["GPU_LOCK_DIR"], uuid), "a")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            shared = True
        LOCKS.append(f)
    GPU["gpu_shared"] = shared


if __name__ == "__main__":
    exit_with_parent()
    lock_gpus()
    print("push_worker ready on", os.environ["PORT"], "for", os.environ.get("HEVLAYER_UDF_ID"), flush=True)
    sys.stdout.flush()
    # BIND: 127.0.0.1 as a local process, 0.0.0.0 in a container.
    bind = os.environ.get("BIND", "127.0.0.1")
    ThreadingHTTPServer((bind, int(os.environ["PORT"])), Handler).serve_forever()
