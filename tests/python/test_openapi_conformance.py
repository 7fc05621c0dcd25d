"""Keeps the emulator honest against RunPod's published v2 OpenAPI spec: every response of the
endpoints the client uses (success and error paths) is validated with JSON Schema Draft 2020-12
(OpenAPI 3.1) against the schema the spec declares for that path, method and status, with
`#/components/...` references resolved inside the spec. The spec is read from
`../shared/reference/runpod-rest-v2.openapi.json` relative to the repository root (or
RPA_OPENAPI_SPEC)."""

import copy
import json
import os
import pathlib
import re
import subprocess

import pytest
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from emulator_proc import ROOT, Emulator

SPEC_PATH = pathlib.Path(os.environ.get(
    "RPA_OPENAPI_SPEC", ROOT.parent / "shared" / "reference" / "runpod-rest-v2.openapi.json"))
SPEC_URI = "urn:runpod:rest-v2"


@pytest.fixture(scope="module")
def spec():
    assert SPEC_PATH.exists(), f"OpenAPI spec missing at {SPEC_PATH}"
    return json.loads(SPEC_PATH.read_text())


@pytest.fixture(scope="module")
def registry(spec):
    return Registry().with_resource(SPEC_URI, Resource.from_contents(spec, default_specification=DRAFT202012))


def response_spec(spec, template, method, status):
    responses = spec["paths"][template][method.lower()]["responses"]
    r = responses.get(str(status)) or responses.get("default")
    assert r is not None, f"{method} {template} has no response {status} in the spec"
    if "$ref" in r:
        r = spec["components"]["responses"][r["$ref"].rsplit("/", 1)[-1]]
    return r


class Checker:
    def __init__(self, spec, registry, emu):
        self.spec, self.registry, self.emu = spec, registry, emu
        self.checked = []

    def validate(self, template, method, status, headers, body):
        r = response_spec(self.spec, template, method, status)
        content = r.get("content")
        if not content:
            assert body is None, f"{method} {template} {status} must have no body, got {body!r}"
        else:
            ctype = headers.get("content-type", "").split(";")[0].strip()
            assert ctype in content, f"{method} {template} {status}: content-type {ctype!r} not in {list(content)}"
            schema = content[ctype]["schema"]
            pointer = schema["$ref"] if "$ref" in schema else None
            wrapper = {"$ref": SPEC_URI + pointer} if pointer else schema
            errors = sorted(Draft202012Validator(wrapper, registry=self.registry).iter_errors(body),
                            key=lambda e: list(e.absolute_path))
            assert not errors, f"{method} {template} {status}: " + "; ".join(
                f"{list(e.absolute_path)}: {e.message}" for e in errors[:5])
        for name in r.get("headers", {}):
            if name.lower() in ("ratelimit", "ratelimit-policy", "retry-after"):
                assert name.lower() in headers, f"{method} {template} {status}: header {name} missing"
        self.checked.append((method, template, status))

    def call(self, method, path, template, expect, body=None, key="default"):
        kwargs = {} if key == "default" else {"key": key}
        status, headers, data = self.emu.request(method, path, body, **kwargs)
        assert status == expect, f"{method} {path}: {status} {data}"
        self.validate(template, method, status, headers, data)
        return data


@pytest.fixture()
def checker(spec, registry, tmp_path):
    emu = Emulator('boot_delay = "1s"\n')
    yield Checker(spec, registry, emu)
    emu.stop()


def public_key(tmp_path):
    key = tmp_path / "id"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return (tmp_path / "id.pub").read_text().strip()


def create_body(name, pub=None, **over):
    body = {"name": name, "image": "runpod/base:0.6.2", "gpu": {"id": "NVIDIA RTX A5000", "count": 1},
            "cloud": "SECURE", "ports": ["22/tcp"], "env": {"RPA_OWNER": "runpod-autoscaler"},
            "startSsh": True, "disk": 20}
    if pub:
        body["env"]["PUBLIC_KEY"] = pub
    body.update(over)
    return body


def test_every_response_of_the_used_endpoints_validates(checker, tmp_path):
    c, emu = checker, checker.emu
    P, PID, ACT = "/v2/pods", "/v2/pods/{id}", "/v2/pods/{id}/action"
    assert c.call("GET", P, P, 200) == {"pods": []}
    pod = c.call("POST", P, P, 201, create_body("rpa-conf-1", public_key(tmp_path)))
    assert pod["status"] == "PROVISIONING"
    pid = pod["id"]
    c.call("GET", f"{P}/{pid}", PID, 200)

    def running():
        p = c.call("GET", f"{P}/{pid}", PID, 200)
        return p if p["status"] == "RUNNING" else None
    pod = emu.wait_for(running, "the pod to be RUNNING")
    assert pod["ssh"]["direct"]["port"] == pod["runtime"]["ports"][0]["public"]
    c.call("GET", P, P, 200)

    c.call("POST", f"{P}/{pid}/action", ACT, 200, {"action": "restart"})
    c.call("POST", f"{P}/{pid}/action", ACT, 200, {"action": "stop"})
    c.call("POST", f"{P}/{pid}/action", ACT, 409, {"action": "stop"})
    c.call("POST", f"{P}/{pid}/action", ACT, 200, {"action": "start"})
    c.call("POST", f"{P}/{pid}/action", ACT, 422, {"action": "explode"})
    c.call("POST", f"{P}/nope/action", ACT, 404, {"action": "stop"})

    c.call("POST", P, P, 422, {"name": "x", "image": "i", "gpu": {"id": "NVIDIA RTX A5000"}, "bogus": 1})
    c.call("POST", P, P, 400, create_body("rpa-dc", dataCenterIds=["XX-NOPE-1"]))
    c.call("POST", P, P, 400, create_body("rpa-gpu", gpu={"id": "NVIDIA GeForce 256", "count": 1}))
    c.call("GET", f"{P}/doesnotexist", PID, 404)
    c.call("GET", P, P, 401, key="wrong")
    c.call("GET", P, P, 401, key=None)

    c.call("GET", "/v2/catalog/gpus", "/v2/catalog/gpus", 200)
    cat = c.call("GET", "/v2/catalog/gpus?include=AVAILABILITY&product=POD", "/v2/catalog/gpus", 200)
    assert all("availability" in g for g in cat["gpus"])
    c.call("GET", "/v2/billing/pods", "/v2/billing/pods", 200)
    c.call("GET", f"/v2/billing/pods?podId={pid}&bucketSize=hour", "/v2/billing/pods", 200)
    c.call("GET", "/v2/account/ssh-keys", "/v2/account/ssh-keys", 200)
    (tmp_path / "account").mkdir()
    c.call("PUT", "/v2/account/ssh-keys", "/v2/account/ssh-keys", 200, {"keys": [public_key(tmp_path / "account")]})
    c.call("PUT", "/v2/account/ssh-keys", "/v2/account/ssh-keys", 422, {"keys": ["nonsense"]})

    # Faults keep the error shapes too.
    emu.request("PUT", "/admin/faults", {"capacity_exhausted": ["NVIDIA RTX A5000"]})
    c.call("POST", P, P, 400, create_body("rpa-cap"))
    emu.request("PUT", "/admin/faults", {"rate_limit_next": 1, "retry_after_secs": 2})
    status, headers, _ = emu.request("GET", P)
    assert status == 429 and headers["retry-after"] == "2"
    emu.request("PUT", "/admin/faults", {"rate_limit_next": 1, "retry_after_secs": 2})
    c.call("GET", P, P, 429)
    emu.request("PUT", "/admin/faults", {"error_after_create": 1})
    c.call("POST", P, P, 500, create_body("rpa-500"))
    emu.request("PUT", "/admin/faults", {})

    c.call("DELETE", f"{P}/{pid}", PID, 204)
    c.call("DELETE", f"{P}/{pid}", PID, 404)
    other = c.call("POST", P, P, 201, create_body("rpa-conf-2"))
    c.call("POST", f"{P}/{other['id']}/action", ACT, 204, {"action": "terminate"})

    statuses = {s for (_, _, s) in c.checked}
    assert {200, 201, 204, 400, 401, 404, 409, 422, 429, 500} <= statuses


def test_validator_rejects_wrong_shapes(checker, tmp_path):
    """The check can fail: deliberately wrong shapes of real answers are rejected."""
    c = checker
    pod = c.call("POST", "/v2/pods", "/v2/pods", 201, create_body("rpa-neg"))
    headers = {"content-type": "application/json"}
    broken = [
        {k: v for k, v in pod.items() if k != "status"},      # required field missing
        {**pod, "status": "SLEEPING"},                         # not in the PodStatus enum
        {**pod, "cost": "0.26"},                               # wrong type
        {**pod, "ssh": {"direct": None}},                      # PodSsh.proxy missing
    ]
    for b in broken:
        with pytest.raises(AssertionError):
            c.validate("/v2/pods/{id}", "GET", 200, headers, b)
    with pytest.raises(AssertionError):
        c.validate("/v2/pods", "GET", 200, headers, {"items": [pod]})
    with pytest.raises(AssertionError):
        c.validate("/v2/pods/{id}", "GET", 404, {"content-type": "application/problem+json"},
                   {"title": "Not Found", "status": 404})   # problem without detail
    with pytest.raises(AssertionError):
        c.validate("/v2/pods/{id}", "GET", 404, {"content-type": "application/json"},
                   {"title": "Not Found", "status": 404, "detail": "x"})  # wrong media type
