"""The library's module structure: no dependency cycles between top-level modules, and each
I/O crate imported by the one module that owns it (see the README's architecture section).

Edges come from `crate::<module>` paths in each module's non-test code; a module's own
`#[cfg(test)]` blocks and `tests.rs` files are left out (tests may reach across modules).
"""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"

# Crates that do I/O or shape a wire format: each belongs to exactly the modules listed.
OWNERS = {
    "rdkafka": {"signals"},
    "prometheus_http_query": {"signals"},
    # prometheus-http-query takes a reqwest client built by the Prometheus source; the CLI
    # reads the running service's HTTP API (`pods list --service`).
    "reqwest": {"provider", "signals", "<bin>"},
    "russh": {"join"},
    # Pod file transfers over a pooled SSH channel from `join`.
    "russh_sftp": {"access"},
    # The MCP server and its tool input schemas.
    "rmcp": {"mcp"},
    "schemars": {"mcp"},
    "tonic": {"scaler", "proto"},
    "tonic_health": {"scaler"},
    "prost": {"proto"},
    "rustls": {"tls"},
    # Fault draws in the emulator, retry jitter in the RunPod client, checkpoint writer tokens.
    "rand": {"emulator", "provider", "checkpoint"},
    "figment": {"config"},
    "prometheus_client": {"telemetry"},
    # Two HTTP servers: the service's endpoints and the emulator's API.
    "axum": {"service", "emulator"},
    "csv": {"simulate"},
    "graphql_parser": {"emulator"},
    "redb": {"reconcile"},
    # The checkpoint store: S3 client, its configuration chain, HTTP client, signing, progress.
    "aws_sdk_s3": {"checkpoint"},
    "aws_config": {"checkpoint"},
    "aws_smithy_http_client": {"checkpoint"},
    "aws_runtime": {"checkpoint"},
    "indicatif": {"checkpoint"},
}


def module_of(path: Path) -> str:
    rel = path.relative_to(SRC)
    if rel.parts[0] in ("lib.rs", "main.rs", "cli.rs", "checkpoint_cli.rs", "access_cli.rs"):
        return "<root>" if rel.parts[0] == "lib.rs" else "<bin>"
    return rel.parts[0].removesuffix(".rs")


def non_test_code(text: str) -> str:
    """The text before the first `#[cfg(test)]` item (test modules sit at the end of files)."""
    return text.split("#[cfg(test)]", 1)[0]


def strip_comments(text: str) -> str:
    text = re.sub(r"//[^\n]*", "", text)
    return re.sub(r"/\*.*?\*/", "", text, flags=re.S)


def sources():
    for path in sorted(SRC.rglob("*.rs")):
        if path.name == "tests.rs":
            continue
        yield path, strip_comments(non_test_code(path.read_text()))


def graph():
    edges = {}
    for path, code in sources():
        me = module_of(path)
        if me == "<bin>":
            continue
        deps = set(re.findall(r"\bcrate::(\w+)", code))
        # `use crate::{a, b::c}` groups.
        for group in re.findall(r"\bcrate::\{([^}]*)\}", code):
            deps.update(re.findall(r"(?:^|,)\s*(\w+)", group))
        edges.setdefault(me, set()).update(d for d in deps if d != me and d != "proto")
    return edges


def find_cycle(edges):
    state = {}
    stack = []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(edges.get(n, ())):
            if state.get(m) == "open":
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = "done"
        return None

    for n in sorted(edges):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_no_module_cycles():
    cycle = find_cycle(graph())
    assert cycle is None, "module cycle: " + " -> ".join(cycle)


def test_each_io_crate_has_its_owner_modules():
    users = {}
    for path, code in sources():
        me = "proto" if path.name == "lib.rs" and "include_proto" in code else module_of(path)
        for krate in OWNERS:
            if re.search(rf"(?<![\w:]){krate}::", code):
                users.setdefault(krate, set()).add(me)
    wrong = {
        k: sorted(v - OWNERS[k]) for k, v in users.items() if v - OWNERS[k] and k in OWNERS
    }
    assert not wrong, f"crates imported outside their owner modules: {wrong}"
