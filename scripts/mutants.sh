#!/usr/bin/env bash
# Mutation testing of src/decide/ and src/simulate/ with cargo-mutants (installed once into
# .tools/cargo-mutants). Configuration, including the excluded equivalent mutants and why:
# .cargo/mutants.toml. Not part of the CI test command: about an hour on 2 cores.
#
#   scripts/mutants.sh                 # every mutant of both modules
#   scripts/mutants.sh --file src/decide/cost.rs   # extra arguments go to cargo mutants
#
# Prints the caught / missed / unviable / timeout counts; exits non-zero when any mutant was
# missed. Results (with the diff of every missed mutant) land in mutants.out/.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

CARGO_MUTANTS_VERSION="27.1.0"
root=".tools/cargo-mutants"
if ! "$root/bin/cargo-mutants" mutants --version 2>/dev/null | grep -q "$CARGO_MUTANTS_VERSION"; then
  log "installing cargo-mutants $CARGO_MUTANTS_VERSION into $root"
  cargo install --locked --root "$root" cargo-mutants --version "=$CARGO_MUTANTS_VERSION"
fi

# Both modules unless the caller names files (cargo-mutants adds --file to the config's globs,
# so the scope lives here).
scope=(--file 'src/decide/*.rs' --file 'src/simulate/*.rs')
for arg in "$@"; do
  case "$arg" in -f | --file | --file=*) scope=() ;; esac
done
log "mutating ${scope[*]:-the given files} (lib tests decide:: and simulate:: only)"
status=0
PATH="$PWD/$root/bin:$PATH" cargo mutants --no-shuffle "${scope[@]}" "$@" -- -- decide:: simulate:: ||
  status=$?

out="mutants.out"
count() {
  if [ -f "$out/$1.txt" ]; then grep -c . "$out/$1.txt" || true; else echo 0; fi
}
log "caught $(count caught), missed $(count missed), unviable $(count unviable), timeout $(count timeout)"
if [ "$(count missed)" != 0 ]; then
  log "missed mutants:"
  cat "$out/missed.txt"
fi
exit "$status"
