"""Cross-stack check of the checkpoint format: the binary writes a checkpoint to s3s-fs, the AWS
CLI (botocore, another S3 stack) lists and reads it back, and every file and part hash in the
manifest matches what the CLI downloads; the server refuses to overwrite the manifest."""

import hashlib
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
BINARY = pathlib.Path(os.environ.get("RPA_BINARY", ROOT / "target" / "debug" / "runpod-autoscaler"))
AWS = pathlib.Path(sys.executable).parent / "aws"
ACCESS, SECRET, BUCKET = "rpa-py-access", "rpa-py-secret-0123456789", "ckpt-py"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3(tmp_path):
    binary = os.environ.get("RPA_S3S_BIN")
    if not binary or not pathlib.Path(binary).is_file():
        pytest.fail("RPA_S3S_BIN is not set: run scripts/test.sh, which installs s3s-fs and exports it")
    data = tmp_path / "data"
    (data / BUCKET).mkdir(parents=True)
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--host", "127.0.0.1", "--port", str(port), "--access-key", ACCESS,
         "--secret-key", SECRET, str(data)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            assert time.monotonic() < deadline, "s3s-fs did not start"
            time.sleep(0.05)
    home = tmp_path / "home"
    (home / ".aws").mkdir(parents=True)
    (home / ".aws" / "config").write_text("[default]\ns3 =\n  addressing_style = path\n")
    env = {
        "PATH": os.environ.get("PATH", ""), "HOME": str(home),
        "AWS_CONFIG_FILE": str(home / ".aws" / "config"),
        "AWS_ACCESS_KEY_ID": ACCESS, "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_EC2_METADATA_DISABLED": "true",
    }
    try:
        yield env
    finally:
        proc.kill()
        proc.wait()


def aws(env, *args, check=True):
    r = subprocess.run([str(AWS), *args], capture_output=True, env=env)
    if check:
        assert r.returncode == 0, r.stderr.decode()
    return r


def sha256(b):
    return hashlib.sha256(b).hexdigest()


def test_the_aws_cli_reads_what_we_wrote(s3, tmp_path):
    src = tmp_path / "src"
    (src / "weights").mkdir(parents=True)
    files = {"weights/model.bin": os.urandom(7 * 1024 * 1024 + 123), "notes.txt": b"step 42\n"}
    for rel, data in files.items():
        (src / rel).write_bytes(data)
    r = subprocess.run(
        [str(BINARY), "agent", "checkpoint", "--job", "py-job", "--dir", str(src), "--bucket", BUCKET,
         "--prefix", "x/y", "--writer", "pod-py", "--meta", "epoch=3"],
        capture_output=True, text=True, env={**s3, "RPA_POD_ID": ""},
    )
    assert r.returncode == 0, r.stderr
    seq = json.loads(r.stdout)["seq"]

    listing = json.loads(aws(s3, "s3api", "list-objects-v2", "--bucket", BUCKET, "--prefix", "x/y/py-job/").stdout)
    keys = sorted(o["Key"] for o in listing["Contents"])
    gen = f"x/y/py-job/{seq:020d}/"
    assert gen + "claim.json" in keys and gen + "manifest.json" in keys, keys
    manifest = json.loads(aws(s3, "s3", "cp", f"s3://{BUCKET}/{gen}manifest.json", "-").stdout)
    assert (manifest["job"], manifest["seq"], manifest["writer"]) == ("py-job", seq, "pod-py")
    assert manifest["meta"] == {"epoch": "3"}
    assert gen + manifest["data"] in keys

    out = tmp_path / "data.bin"
    aws(s3, "s3", "cp", f"s3://{BUCKET}/{gen}{manifest['data']}", str(out))
    data = out.read_bytes()
    assert len(data) == manifest["total_size"] == sum(len(b) for b in files.values())
    for f in manifest["files"]:
        content = data[f["offset"]:f["offset"] + f["size"]]
        assert content == files[f["path"]], f["path"]
        assert sha256(content) == f["sha256"]
    for c in manifest["chunks"]:
        assert sha256(data[c["offset"]:c["offset"] + c["size"]]) == c["sha256"], c["part"]

    # The manifest is write-once at the server: a conditional create through botocore fails.
    r = aws(s3, "s3api", "put-object", "--bucket", BUCKET, "--key", gen + "manifest.json",
            "--body", str(out), "--if-none-match", "*", check=False)
    assert r.returncode != 0 and b"PreconditionFailed" in r.stderr, r.stderr
