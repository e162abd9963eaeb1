"""The documented examples: each valid against its own schema, and the
runner routes' examples sent as a runner sends them.

Schemathesis sends the examples of the routes that take an API key, but
takes one that breaks its schema for a negative case and expects nothing
of it; here every example of a request body or parameter must validate
against the schema it illustrates. Schemathesis reaches the routes that take a runner token only as far as
their 401 (it holds an API key). Here a runner registers with the
documented example of `POST /v2/runners`, then sends the documented
examples of its own calls with its real id and session token; each must
be accepted (200) and answered as the document says (the response
validates against the documented schema, with `jsonschema_rs`, which
schemathesis brings).

Env: LAYER_URL, LAYER_API_KEY (admin). The platform must hold the
Function the examples name (`tags`).
"""

import json
import os
import sys
import urllib.error
import urllib.request

import jsonschema_rs

URL = os.environ["LAYER_URL"]
KEY = os.environ["LAYER_API_KEY"]


def call(method, path, token, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(URL + path, data=data, method=method)
    req.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def main():
    status, doc = call("GET", "/openapi.json", KEY)
    assert status == 200, (status, doc)
    components = doc["components"]

    def check(method, template, token, **ids):
        op = doc["paths"][template][method.lower()]
        body = None
        if "requestBody" in op:
            body = op["requestBody"]["content"]["application/json"]["example"]
        path = template
        for name, value in ids.items():
            path = path.replace("{" + name + "}", value)
        status, answer = call(method, path, token, body)
        assert status == 200, f"{method} {template} with its example: {status} {answer}"
        schema = dict(op["responses"]["200"]["content"]["application/json"]["schema"])
        schema["components"] = components
        errors = list(jsonschema_rs.Draft202012Validator(schema).iter_errors(answer))
        assert not errors, f"{method} {template}: the answer {answer} is not as documented: {errors[0].message}"
        print(f"ok {method} {template}")
        return answer

    problems = []
    for template, item in doc["paths"].items():
        for method, op in item.items():
            examples = [(f"parameter {p['name']}", p["schema"], p["example"]) for p in op.get("parameters", [])
                        if "example" in p]
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {})
            if "example" in body:
                examples.append(("request body", body["schema"], body["example"]))
            for what, schema, example in examples:
                schema = dict(schema, components=components)
                for e in jsonschema_rs.Draft202012Validator(schema).iter_errors(example):
                    problems.append(f"{method.upper()} {template}: the example of its {what} is invalid: {e.message}")
    assert not problems, "\n".join(problems)
    print("ok: every example validates against its schema")

    registered = check("POST", "/v2/runners", KEY)
    rid, token = registered["runner_id"], registered["token"]
    check("POST", "/v2/runners/{id}/heartbeat", token, id=rid)
    check("POST", "/v2/runners/{id}/worker-slots", token, id=rid)
    check("POST", "/v2/runners/{id}/worker-keys", token, id=rid)
    check("POST", "/v2/runners/{id}/deregister", token, id=rid)


if __name__ == "__main__":
    try:
        main()
    except AssertionError as e:
        print(e, file=sys.stderr)
        sys.exit(1)
