"""The container image's Dockerfile builds what Cargo needs: its Rust image is at least every
locked dependency's rust-version (and equals the crate's own), and its COPY lines bring every
file the manifest, the build script and non-test `include_str!`s read. (No Docker engine here:
hadolint runs in test_deploy_files.py; these catch what hadolint cannot.) Each check fails on a
broken copy."""

import functools
import json
import pathlib
import re
import subprocess

import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[2]


def version(v):
    return tuple(int(x) for x in v.split("."))


@functools.cache
def dependency_rust_versions():
    out = subprocess.run(
        ["cargo", "metadata", "--locked", "--format-version", "1", "--offline"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout
    meta = json.loads(out)
    used = {n["id"] for n in meta["resolve"]["nodes"]}
    return {p["name"]: p["rust_version"] for p in meta["packages"] if p["id"] in used and p.get("rust_version")}


def builder_image_problems(dockerfile, manifest):
    m = re.search(r"(?m)^FROM rust:(\d+\.\d+)(?:\.\d+)?-\S+ AS build", dockerfile)
    if not m:
        return ["no `FROM rust:X.Y-... AS build` stage"]
    image = version(m.group(1))
    problems = []
    declared = manifest["package"].get("rust-version")
    if declared is None or version(declared)[:2] != image:
        problems.append(f"Cargo.toml rust-version {declared} differs from the image's rust:{m.group(1)}")
    for name, need in sorted(dependency_rust_versions().items()):
        if version(need)[:2] > image:
            problems.append(f"{name} needs Rust {need}, the image has {m.group(1)}")
    return problems


def copied_paths(dockerfile):
    paths = set()
    for line in re.findall(r"(?m)^COPY (?!--from)(.+)$", dockerfile):
        *srcs, _dest = line.split()
        paths.update(srcs)
    return paths


def covered(path, copied):
    return any(path == c or path.startswith(c.rstrip("/") + "/") for c in copied)


def copy_problems(dockerfile, manifest):
    copied = copied_paths(dockerfile)
    needed = {"Cargo.toml", "Cargo.lock", "src/lib.rs", "src/main.rs"}
    if (ROOT / "build.rs").exists():
        needed |= {"build.rs", "proto/externalscaler.proto"}
    for bench in manifest.get("bench", []):
        needed.add(bench.get("path", f"benches/{bench['name']}.rs"))
    for path in ROOT.joinpath("src").rglob("*.rs"):
        text = path.read_text()
        test_from = text.find("#[cfg(test)]")
        for m in re.finditer(r'include_(?:str|bytes)!\("([^"]+)"\)', text):
            if path.name == "tests.rs" or (0 <= test_from < m.start()):
                continue
            target = (path.parent / m.group(1)).resolve().relative_to(ROOT)
            needed.add(str(target))
    return [f"{p} is not copied into the build stage" for p in sorted(needed) if not covered(p, copied)]


def manifest():
    return tomllib.loads((ROOT / "Cargo.toml").read_text())


def test_the_builder_image_is_new_enough_for_every_dependency():
    assert builder_image_problems((ROOT / "Dockerfile").read_text(), manifest()) == []


def test_an_old_builder_image_is_caught():
    dockerfile = (ROOT / "Dockerfile").read_text()
    old = re.sub(r"FROM rust:\d+\.\d+", "FROM rust:1.80", dockerfile)
    problems = builder_image_problems(old, manifest())
    assert any("needs Rust" in p for p in problems), problems
    assert any("rust-version" in p for p in problems), problems


def test_the_build_stage_copies_everything_cargo_reads():
    assert copy_problems((ROOT / "Dockerfile").read_text(), manifest()) == []


def test_a_missing_copy_is_caught():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "COPY benches benches" in dockerfile
    problems = copy_problems(dockerfile.replace("COPY benches benches\n", ""), manifest())
    assert any(p.startswith("benches/") for p in problems), problems


def test_hadolint_catches_a_broken_dockerfile():
    import shutil
    import sys
    import tempfile

    tool = shutil.which("hadolint", path=str(pathlib.Path(sys.executable).parent)) or "hadolint"
    dockerfile = (ROOT / "Dockerfile").read_text()
    # An unpinned package, an untagged base image and no cleanup of the apt lists.
    broken = dockerfile.replace("ca-certificates=20230311* libssl3=3.0.*", "ca-certificates libssl3")
    broken = broken.replace(" \\\n && rm -rf /var/lib/apt/lists/*", "")
    broken = broken.replace("FROM debian:bookworm-slim", "FROM debian")
    assert broken != dockerfile
    with tempfile.NamedTemporaryFile("w", suffix=".Dockerfile", delete=False) as f:
        f.write(broken)
    r = subprocess.run([tool, f.name], capture_output=True, text=True)
    assert r.returncode != 0
    for rule in ["DL3008", "DL3006", "DL3009"]:
        assert rule in r.stdout, r.stdout
