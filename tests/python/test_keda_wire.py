"""KEDA-side wire check with another gRPC stack: a grpcio client generated from
proto/externalscaler.proto drives the real `runpod-autoscaler serve` binary."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import urllib.request

import grpc
import pytest
from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parents[2]
BINARY = pathlib.Path(os.environ.get("RPA_BINARY", ROOT / "target" / "debug" / "runpod-autoscaler"))


@pytest.fixture(scope="module")
def stubs():
    out = tempfile.mkdtemp(prefix="rpa-stubs-")
    rc = protoc.main([
        "grpc_tools.protoc",
        f"-I{ROOT / 'proto'}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        str(ROOT / "proto" / "externalscaler.proto"),
    ])
    assert rc == 0, "protoc failed on proto/externalscaler.proto"
    sys.path.insert(0, out)
    import externalscaler_pb2
    import externalscaler_pb2_grpc
    return externalscaler_pb2, externalscaler_pb2_grpc


def start_server(queue_value):
    """`serve` on examples/static.toml with the fixed queue lag overridden through the
    environment, on free loopback ports. Returns the process and its addresses."""
    assert BINARY.exists(), f"{BINARY} missing: build with `cargo build` first"
    env = dict(os.environ, RUNPOD_AUTOSCALER__SIGNALS__QUEUE__VALUE=str(queue_value))
    proc = subprocess.Popen(
        [str(BINARY), "serve", "--config", str(ROOT / "examples" / "static.toml"),
         "--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    line = proc.stdout.readline()
    assert line, f"server printed nothing; stderr: {proc.stderr.read()}"
    return proc, json.loads(line)


def stop(proc):
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def server():
    proc, addrs = start_server(1000)
    yield proc, addrs
    stop(proc)


def debug_plan(addrs):
    with urllib.request.urlopen(f"http://{addrs['http']}/debug/plan", timeout=5) as r:
        return json.load(r)


def ready_metrics(stub, pb2, ref, deadline=20):
    """GetMetrics, retrying UNAVAILABLE until the first tick is published."""
    import time
    end = time.monotonic() + deadline
    while True:
        try:
            return stub.GetMetrics(pb2.GetMetricsRequest(scaledObjectRef=ref, metricName="gpu-demand"), timeout=3)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > end:
                raise
            time.sleep(0.1)


def test_grpcio_client_reads_our_wire_format(stubs, server):
    pb2, pb2_grpc = stubs
    _, addrs = server
    channel = grpc.insecure_channel(addrs["grpc"])
    stub = pb2_grpc.ExternalScalerStub(channel)
    ref = pb2.ScaledObjectRef(name="workers", namespace="media",
                              scalerMetadata={"scalerAddress": addrs["grpc"], "targetSize": "0.5"})

    spec = stub.GetMetricSpec(ref, timeout=3)
    assert len(spec.metricSpecs) == 1
    assert spec.metricSpecs[0].metricName == "gpu-demand"
    assert spec.metricSpecs[0].targetSize == 1
    assert spec.metricSpecs[0].targetSizeFloat == 0.5

    # examples/static.toml with a queue of 1000: at 100 per GPU that is 10 GPU workers, all of
    # which can be had (baseline 2 + max_pods 8, and 8 pods at $0.26/h fit $4/h). KEDA is
    # served 10, although one tick's plan only gets to 7 (2 + max_launches_per_tick 5).
    metrics = ready_metrics(stub, pb2, ref)
    assert len(metrics.metricValues) == 1
    assert metrics.metricValues[0].metricName == "gpu-demand"
    assert metrics.metricValues[0].metricValue == 10
    assert metrics.metricValues[0].metricValueFloat == 10.0
    plan = debug_plan(addrs)["plan"]
    assert (plan["demand_gpus"], plan["served_gpus"], plan["desired_gpus"]) == (10, 10, 7)

    assert stub.IsActive(ref, timeout=3).result is True
    high = pb2.ScaledObjectRef(name="w", namespace="m", scalerMetadata={"activationThreshold": "10"})
    assert stub.IsActive(high, timeout=3).result is False
    below = pb2.ScaledObjectRef(name="w", namespace="m", scalerMetadata={"activationThreshold": "9.5"})
    assert stub.IsActive(below, timeout=3).result is True

    stream = stub.StreamIsActive(ref)
    first = next(stream)
    assert first.result is True
    stream.cancel()


def test_no_work_is_inactive_and_zero_even_with_baseline_gpus(stubs):
    pb2, pb2_grpc = stubs
    proc, addrs = start_server(0)
    try:
        stub = pb2_grpc.ExternalScalerStub(grpc.insecure_channel(addrs["grpc"]))
        ref = pb2.ScaledObjectRef(name="w", namespace="m", scalerMetadata={})
        metrics = ready_metrics(stub, pb2, ref)
        assert metrics.metricValues[0].metricValue == 0
        assert stub.IsActive(ref, timeout=3).result is False
        stream = stub.StreamIsActive(ref)
        assert next(stream).result is False
        stream.cancel()
        # The 2 baseline GPUs still exist; they are just not demand.
        plan = debug_plan(addrs)["plan"]
        assert (plan["served_gpus"], plan["desired_gpus"]) == (0, 2)
    finally:
        stop(proc)


def test_bad_metadata_is_invalid_argument(stubs, server):
    pb2, pb2_grpc = stubs
    _, addrs = server
    stub = pb2_grpc.ExternalScalerStub(grpc.insecure_channel(addrs["grpc"]))
    bad = pb2.ScaledObjectRef(name="w", namespace="m", scalerMetadata={"targetSize": "many"})
    with pytest.raises(grpc.RpcError) as err:
        stub.GetMetricSpec(bad, timeout=3)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "targetSize" in err.value.details()


def test_sigterm_ends_streams_ok_and_exits_zero(stubs, server):
    pb2, pb2_grpc = stubs
    proc, addrs = server
    stub = pb2_grpc.ExternalScalerStub(grpc.insecure_channel(addrs["grpc"]))
    ref = pb2.ScaledObjectRef(name="w", namespace="m", scalerMetadata={})
    ready_metrics(stub, pb2, ref)
    stream = stub.StreamIsActive(ref)
    assert next(stream).result is True
    proc.send_signal(signal.SIGTERM)
    # The stream ends cleanly (StopIteration), not with an error status.
    remaining = list(stream)
    assert remaining == []
    assert stream.code() == grpc.StatusCode.OK
    assert proc.wait(timeout=20) == 0
