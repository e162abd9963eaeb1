"""The seed's product classifier as a push worker: plain Python, standard
library only. The runner starts it with PORT set, waits for GET /healthz,
then POSTs batches to /run:

    {"udf_id", "version", "batch_id", "items": [{"namespace", "id", "input": {...}}]}

and reads back one result per item:

    {"results": [{"namespace", "id", "attributes": {...}}
                 | {"namespace", "id", "error": {"kind": "permanent"|"transient", "message"}}]}
"""

import json
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class PermanentError(Exception):
    """The row can never succeed."""


def tag_product(*, id, title, description):
    if not title:
        raise PermanentError(f"{id}: missing title")
    text = f"{title} {description or ''}".lower()
    tags = []
    if "wireless" in text:
        tags.append("wireless")
    if "waterproof" in text:
        tags.append("waterproof")
    return tags or ["uncategorized"]


def run(batch):
    results = []
    for item in batch["items"]:
        ref = {"namespace": item["namespace"], "id": item["id"]}
        inp = item["input"]
        try:
            tags = tag_product(id=inp.get("id"), title=inp.get("title"), description=inp.get("description"))
            results.append({**ref, "attributes": {"tags": tags}})
        except PermanentError as e:
            results.append({**ref, "error": {"kind": "permanent", "message": str(e)}})
        except Exception as e:  # anything else may pass on a retry
            results.append({**ref, "error": {"kind": "transient", "message": repr(e)}})
    return {"results": results}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _send(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/healthz":
            self._send(200, {"status": "ok"})
        else:
            self._send(404, {"error": "not found"})

    def do_POST(self):
        if self.path != "/run":
            self._send(404, {"error": "not found"})
            return
        length = int(self.headers.get("content-length", "0"))
        batch = json.loads(self.rfile.read(length))
        self._send(200, run(batch))

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    # BIND: 127.0.0.1 as a local process, 0.0.0.0 in a container.
    bind = os.environ.get("BIND", "127.0.0.1")
    ThreadingHTTPServer((bind, int(os.environ["PORT"])), Handler).serve_forever()
