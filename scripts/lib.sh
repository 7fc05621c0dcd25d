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

# ensure_sshd: OpenSSH's server, the stand-in for a RunPod pod's sshd (emulator tests).
ensure_sshd() {
  if [ -x /usr/sbin/sshd ] && command -v ssh-keygen >/dev/null 2>&1; then
    return
  fi
  log "installing openssh-server (sshd for emulated pods)"
  local sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  if ! DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq openssh-server >/dev/null 2>&1; then
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq openssh-server >/dev/null
  fi
}
