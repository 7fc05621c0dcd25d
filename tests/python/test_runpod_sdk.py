"""RunPod's official Python SDK (`runpod`, pinned in requirements.txt) as a real client of the
emulator binary: its pod and GPU functions send GraphQL with inline arguments to
`$RUNPOD_API_BASE_URL/graphql`. Spot pods are not in the SDK, so the spot mutations go through
the SDK's own transport (`run_graphql_query`) written the way RunPod documents them. Raw
requests check variables, aliases, operation names, fragments and the error shapes."""

import json
import urllib.error
import urllib.request

import pytest
import runpod
from runpod import error as rp_error
from runpod.api.graphql import run_graphql_query

from emulator_proc import KEY, Emulator

A5000 = "NVIDIA RTX A5000"


@pytest.fixture()
def emu(monkeypatch):
    e = Emulator('boot_delay = "0s"\nsshd = false\n')
    monkeypatch.setenv("RUNPOD_API_BASE_URL", e.api_url)
    monkeypatch.setattr(runpod, "api_key", KEY)
    yield e
    e.stop()


def gql(emu, query, variables=None, operation=None, key=KEY):
    """A raw GraphQL POST: (HTTP status, decoded body)."""
    body = {"query": query}
    if variables is not None:
        body["variables"] = variables
    if operation is not None:
        body["operationName"] = operation
    req = urllib.request.Request(emu.graphql_url, data=json.dumps(body).encode(), method="POST")
    req.add_header("Content-Type", "application/json")
    req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_get_gpus_returns_only_the_selected_fields(emu):
    gpus = runpod.get_gpus()
    assert len(gpus) == 9
    assert all(set(g) == {"id", "displayName", "memoryInGb"} for g in gpus)
    a5000 = next(g for g in gpus if g["id"] == A5000)
    assert a5000 == {"id": A5000, "displayName": "RTX A5000", "memoryInGb": 24}


def test_get_gpu_with_prices_and_lowest_price(emu):
    g = runpod.get_gpu(A5000)
    assert g["id"] == A5000 and g["securePrice"] == 0.26 and g["communityPrice"] == 0.16
    assert g["secureSpotPrice"] == 0.14 and g["communitySpotPrice"] == 0.11
    assert g["secureCloud"] is True and g["maxGpuCount"] == 8 and g["manufacturer"] == "Nvidia"
    assert g["lowestPrice"] == {"minimumBidPrice": 0.11, "uninterruptablePrice": 0.16}
    assert runpod.get_gpu(A5000, 4)["lowestPrice"]["minimumBidPrice"] == 0.11
    with pytest.raises(ValueError, match="No GPU found"):
        runpod.get_gpu("NVIDIA GeForce 256")


def test_pod_lifecycle_create_get_stop_resume_terminate(emu):
    created = runpod.create_pod("sdk-1", "runpod/base:0.6.2", A5000, cloud_type="SECURE",
                                ports="22/tcp,8888/http", env={"RPA_OWNER": "sdk"})
    pid = created["id"]
    assert created["imageName"] == "runpod/base:0.6.2"
    assert "RPA_OWNER=sdk" in created["env"]
    assert created["machine"]["podHostId"].startswith(pid)
    # The same pod over REST v2.
    status, _, rest = emu.request("GET", f"/v2/pods/{pid}")
    assert status == 200 and rest["name"] == "sdk-1" and rest["cloud"] == "SECURE"
    assert rest["ports"] == ["22/tcp", "8888/http"] and rest["env"]["RPA_OWNER"] == "sdk"

    pods = runpod.get_pods()
    assert [p["id"] for p in pods] == [pid]
    pod = runpod.get_pod(pid)
    assert pod["desiredStatus"] == "RUNNING" and pod["costPerHr"] == 0.26
    assert pod["gpuCount"] == 1 and pod["imageName"] == "runpod/base:0.6.2"
    assert pod["podType"] == "RESERVED" and pod["ports"] == "22/tcp,8888/http"
    assert pod["machine"] == {"gpuDisplayName": "RTX A5000"}
    assert pod["containerDiskInGb"] == 10

    stopped = runpod.stop_pod(pid)
    assert stopped == {"id": pid, "desiredStatus": "EXITED"}
    assert runpod.get_pod(pid)["costPerHr"] == 0
    resumed = runpod.resume_pod(pid, 1)
    assert resumed["id"] == pid and resumed["desiredStatus"] == "RUNNING"
    assert runpod.terminate_pod(pid) is None
    assert runpod.get_pod(pid) is None
    assert emu.request("GET", f"/v2/pods/{pid}")[0] == 404
    assert runpod.get_pods() == []
    with pytest.raises(rp_error.QueryError, match="pod not found to terminate"):
        runpod.terminate_pod(pid)


def test_create_pod_defaults_community_and_errors(emu):
    # cloud_type defaults to ALL, volume 0, dataCenterId null, min vCPU/memory: all accepted.
    pod = runpod.create_pod("sdk-defaults", "runpod/base:0.6.2", A5000, gpu_count=2)
    assert runpod.get_pod(pod["id"])["gpuCount"] == 2
    pod = runpod.create_pod("sdk-com", "img", A5000, cloud_type="COMMUNITY",
                            data_center_id="EU-RO-1")
    assert runpod.get_pod(pod["id"])["costPerHr"] == 0.16
    with pytest.raises(rp_error.QueryError, match="unknown data center"):
        runpod.create_pod("sdk-dc", "img", A5000, data_center_id="XX-NOPE-1")
    emu.request("PUT", "/admin/faults", {"capacity_exhausted": [A5000]})
    with pytest.raises(rp_error.QueryError, match="no longer any instances available"):
        runpod.create_pod("sdk-cap", "img", A5000)
    with pytest.raises(rp_error.QueryError, match="CPU pods"):
        runpod.create_pod("sdk-cpu", "img")


def test_wrong_key_is_an_authentication_error(emu, monkeypatch):
    monkeypatch.setattr(runpod, "api_key", "rpa_wrong")
    with pytest.raises(rp_error.AuthenticationError):
        runpod.get_pods()


SPOT = """
mutation {
  podRentInterruptable(input: {bidPerGpu: 0.2, gpuTypeId: "NVIDIA RTX A5000", gpuCount: 2,
      cloudType: COMMUNITY, name: "sdk-spot", imageName: "runpod/base:0.6.2", ports: "22/tcp",
      env: [{key: "RPA_OWNER", value: "sdk"}], startSsh: true, supportPublicIp: true,
      containerDiskInGb: 20, volumeInGb: 0}) {
    id
    rate: costPerHr
    podType
    desiredStatus
  }
}
"""


def test_spot_rent_with_inline_arguments_and_bid_resume(emu):
    data = run_graphql_query(SPOT)["data"]["podRentInterruptable"]
    assert set(data) == {"id", "rate", "podType", "desiredStatus"}
    assert data["rate"] == pytest.approx(0.4) and data["podType"] == "INTERRUPTABLE"
    pid = data["id"]
    assert runpod.stop_pod(pid)["desiredStatus"] == "EXITED"
    resumed = run_graphql_query(
        f'mutation {{ podBidResume(input: {{podId: "{pid}", bidPerGpu: 0.25, gpuCount: 2}})'
        " { id desiredStatus costPerHr } }")["data"]["podBidResume"]
    assert resumed == {"id": pid, "desiredStatus": "RUNNING", "costPerHr": 0.5}
    with pytest.raises(rp_error.QueryError, match="minimum bid"):
        run_graphql_query(SPOT.replace("0.2,", "0.01,").replace("sdk-spot", "sdk-low"))
    # A GPU type with no spot offer cannot be rented at any bid.
    with pytest.raises(rp_error.QueryError, match="NVIDIA H200 has no spot offer"):
        run_graphql_query(SPOT.replace("NVIDIA RTX A5000", "NVIDIA H200").replace("sdk-spot", "sdk-h200"))
    # Resuming below the floor is refused the same way, and the pod stays stopped.
    assert runpod.stop_pod(pid)["desiredStatus"] == "EXITED"
    with pytest.raises(rp_error.QueryError, match="bid 0.01 is below the minimum bid"):
        run_graphql_query(
            f'mutation {{ podBidResume(input: {{podId: "{pid}", bidPerGpu: 0.01, gpuCount: 2}})'
            " { id desiredStatus } }")
    assert runpod.get_pod(pid)["desiredStatus"] == "EXITED"


def test_variables_aliases_operation_names_and_fragments(emu):
    q = """
    query Prices($input: GpuLowestPriceInput, $id: String) {
      cheap: gpuTypes(input: {id: $id}) { ...Money lowestPrice(input: $input) { minimumBidPrice stockStatus } }
    }
    query Other { gpuTypes { id } }
    fragment Money on GpuType { id price: securePrice ... on GpuType { communityPrice } }
    """
    status, body = gql(emu, q, {"input": {"gpuCount": 1}, "id": A5000}, "Prices")
    assert status == 200 and "errors" not in body, body
    assert body["data"] == {"cheap": [{"id": A5000, "price": 0.26, "communityPrice": 0.16,
                                       "lowestPrice": {"minimumBidPrice": 0.11, "stockStatus": "High"}}]}
    status, body = gql(emu, q, operation="Other")
    assert status == 200 and len(body["data"]["gpuTypes"]) == 9
    # Two operations and no operationName: a clean error, not a guess.
    status, body = gql(emu, q)
    assert status == 400 and "operationName" in body["errors"][0]["message"]

    status, body = gql(emu, """mutation Rent($input: PodRentInterruptableInput!) {
        podRentInterruptable(input: $input) { id __typename } }""",
        {"input": {"bidPerGpu": 0.15, "gpuTypeId": A5000, "name": "vars", "imageName": "i"}})
    assert status == 200 and body["data"]["podRentInterruptable"]["__typename"] == "Pod", body
    pid = body["data"]["podRentInterruptable"]["id"]
    status, body = gql(emu, "query($p: String!) { a: pod(input: {podId: $p}) { id } "
                            "b: myself { pods { name } } }", {"p": pid})
    assert body["data"] == {"a": {"id": pid}, "b": {"pods": [{"name": "vars"}]}}


@pytest.mark.parametrize("query,code,needle", [
    ("{ gpuTypes { id bogus } }", 400, 'Cannot query field "bogus" on type "GpuType"'),
    ("{ nope }", 400, 'Cannot query field "nope" on type "Query"'),
    ("{ myself }", 400, 'must have a selection of subfields'),
    ("{ gpuTypes { id { x } } }", 400, 'must not have a selection'),
    ("mutation { podStop(input: {podId: \"x\", color: RED}) { id } }", 400, "color"),
    ("{ gpuTypes { ...Missing } }", 400, 'Unknown fragment "Missing"'),
    ("fragment A on GpuType { ...A } { gpuTypes { ...A } }", 400, "A"),
    ("{ gpuTypes { id ", 400, "Syntax Error"),
    ("subscription { gpuTypes { id } }", 400, "subscription"),
    ("query($x: Int) { pod(input: {podId: $y}) { id } }", 400, '"$y"'),
])
def test_bad_queries_are_graphql_errors(emu, query, code, needle):
    status, body = gql(emu, query)
    assert status == code, body
    assert needle in body["errors"][0]["message"], body
    assert "extensions" in body["errors"][0]


def test_runpod_errors_come_with_http_200_and_a_null_field(emu):
    status, body = gql(emu, 'mutation { t: podTerminate(input: {podId: "gone"}) }')
    assert status == 200
    assert body["data"] == {"t": None}
    assert body["errors"][0]["message"] == "pod not found to terminate"
    assert body["errors"][0]["path"] == ["t"] and body["errors"][0]["extensions"]["code"] == "RUNPOD"


def test_hidden_pods_are_missing_from_graphql_too(emu):
    emu.request("PUT", "/admin/faults", {"hide_new_pods_for": "1h"})
    pid = runpod.create_pod("sdk-hidden", "img", A5000)["id"]
    assert runpod.get_pod(pid) is None
    assert runpod.get_pods() == []
