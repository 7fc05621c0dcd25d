"""tests/smoke-tests.sh against real services: it passes against a healthy one (plaintext, TLS
with the right CA, mutual TLS with a client certificate), and fails, naming each failed check,
against a wrong HTTP address, a stopped service, and a TLS service probed in plaintext, with
the wrong CA, or without a client certificate."""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "smoke-tests.sh"
BINARY = pathlib.Path(os.environ.get("RPA_BINARY", ROOT / "target" / "debug" / "runpod-autoscaler"))
GRPC_CHECKS = ["grpc health", "IsActive", "StreamIsActive", "GetMetricSpec", "GetMetrics gpu-demand"]
HTTP_CHECKS = ["/healthz", "/readyz", "/metrics", "/debug/plan"]


def start(env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    proc = subprocess.Popen(
        [str(BINARY), "serve", "--config", str(ROOT / "examples" / "static.toml"),
         "--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    line = proc.stdout.readline()
    assert line, proc.stderr.read()
    return proc, json.loads(line)


def stop(proc):
    proc.terminate()
    proc.wait(timeout=10)


def smoke(grpc_addr, http_addr, **env):
    r = subprocess.run(
        ["bash", str(SCRIPT), grpc_addr, http_addr], capture_output=True, text=True, timeout=120,
        env=dict(os.environ, RPA_PYTHON=sys.executable, SMOKE_TIMEOUT="5", **env),
    )
    results = {}
    for line in r.stdout.splitlines():
        m = re.match(r"(ok  |FAIL) ([^:]+): ", line)
        if m:
            results[m.group(2)] = m.group(1).strip()
    return r, results


@pytest.fixture(scope="module")
def service():
    proc, addrs = start()
    yield addrs
    stop(proc)


def test_passes_against_a_healthy_service(service):
    r, results = smoke(service["grpc"], service["http"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert results == {c: "ok" for c in GRPC_CHECKS + HTTP_CHECKS}, r.stdout
    assert "gpu-demand=7" in r.stdout
    assert "smoke tests passed" in r.stdout


def test_a_wrong_http_address_fails_the_http_checks(service):
    # A port nothing listens on (the service's gRPC port speaks HTTP/2 only, not /healthz).
    r, results = smoke(service["grpc"], "127.0.0.1:1")
    assert r.returncode == 1, r.stdout
    assert results == {**{c: "ok" for c in GRPC_CHECKS}, **{c: "FAIL" for c in HTTP_CHECKS}}, r.stdout
    assert "FAIL /healthz: unreachable" in r.stdout


def test_a_stopped_service_fails_every_check():
    proc, addrs = start()
    stop(proc)
    r, results = smoke(addrs["grpc"], addrs["http"])
    assert r.returncode == 1
    assert results == {c: "FAIL" for c in GRPC_CHECKS + HTTP_CHECKS}, r.stdout
    assert "smoke tests FAILED" in r.stdout


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki():
    """A CA with a server certificate for 127.0.0.1 and a client certificate, and an unrelated CA."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make test certificates")
    d = pathlib.Path(tempfile.mkdtemp(prefix="rpa-smoke-pki-"))
    for ca in ["ca", "other-ca"]:
        openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-days", "2", "-subj", f"/CN={ca}", cwd=d)
    for name, ext in [("server", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth"),
                      ("client", "extendedKeyUsage=clientAuth")]:
        (d / f"{name}.ext").write_text(ext + "\n")
        openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=d)
    yield d
    shutil.rmtree(d)


@pytest.fixture(scope="module")
def tls_service(pki):
    proc, addrs = start({
        "RUNPOD_AUTOSCALER__SERVICE__TLS__CERT_FILE": str(pki / "server.pem"),
        "RUNPOD_AUTOSCALER__SERVICE__TLS__KEY_FILE": str(pki / "server.key"),
    })
    yield addrs
    stop(proc)


@pytest.fixture(scope="module")
def mtls_service(pki):
    proc, addrs = start({
        "RUNPOD_AUTOSCALER__SERVICE__TLS__CERT_FILE": str(pki / "server.pem"),
        "RUNPOD_AUTOSCALER__SERVICE__TLS__KEY_FILE": str(pki / "server.key"),
        "RUNPOD_AUTOSCALER__SERVICE__TLS__CLIENT_CA_FILE": str(pki / "ca.pem"),
    })
    yield addrs
    stop(proc)


def grpc_results(results):
    return {c: results.get(c) for c in GRPC_CHECKS}


def test_tls_service_passes_with_its_ca(tls_service, pki):
    r, results = smoke(tls_service["grpc"], tls_service["http"], SMOKE_CA_FILE=str(pki / "ca.pem"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SERVING (TLS)" in r.stdout


def test_tls_service_probed_in_plaintext_fails(tls_service):
    r, results = smoke(tls_service["grpc"], tls_service["http"])
    assert r.returncode == 1
    assert grpc_results(results) == {c: "FAIL" for c in GRPC_CHECKS}, r.stdout
    # The HTTP side has no TLS: those checks still pass, so the failure is the gRPC one.
    assert {c: results[c] for c in HTTP_CHECKS} == {c: "ok" for c in HTTP_CHECKS}, r.stdout


def test_tls_service_with_the_wrong_ca_fails(tls_service, pki):
    r, results = smoke(tls_service["grpc"], tls_service["http"], SMOKE_CA_FILE=str(pki / "other-ca.pem"))
    assert r.returncode == 1
    assert grpc_results(results) == {c: "FAIL" for c in GRPC_CHECKS}, r.stdout
    assert "(TLS)" in r.stdout


def test_mutual_tls_needs_the_client_certificate(mtls_service, pki):
    ca = str(pki / "ca.pem")
    r, results = smoke(mtls_service["grpc"], mtls_service["http"], SMOKE_CA_FILE=ca)
    assert r.returncode == 1
    assert grpc_results(results) == {c: "FAIL" for c in GRPC_CHECKS}, r.stdout
    r, results = smoke(mtls_service["grpc"], mtls_service["http"], SMOKE_CA_FILE=ca,
                       SMOKE_CERT_FILE=str(pki / "client.pem"), SMOKE_KEY_FILE=str(pki / "client.key"))
    assert r.returncode == 0, r.stdout + r.stderr
