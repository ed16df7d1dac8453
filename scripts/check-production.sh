#!/usr/bin/env bash
# Fails if the production binary could contain an emulator: the production crate must not
# depend on the emulators' crate (nor on the workspace's `dev` package), and the binary must
# carry none of their symbols.
#
#   bash scripts/check-production.sh target/release/identity-binding-proxy
#
# PRODUCTION_PACKAGE names another package to check instead (to see the check fail:
# PRODUCTION_PACKAGE=identity-binding-proxy-dev with target/release/identity-binding-proxy-dev).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/release/identity-binding-proxy}
# The crates that hold test doubles, as cargo names them and as they appear in symbols.
forbidden_crates="ibp-emulators identity-binding-proxy-dev"
forbidden_symbols="ibp_emulators identity_binding_proxy_dev crates/emulators/src"
status=0

package=${PRODUCTION_PACKAGE:-identity-binding-proxy}
tree=$(cargo tree --locked -p "$package" -e normal,build --prefix none)
for crate in $forbidden_crates; do
  if grep -q "^$crate v" <<<"$tree"; then
    echo "FAILED: $package depends on $crate (cargo tree -p $package -i $crate)" >&2
    status=1
  fi
done

[ -f "$bin" ] || { echo "FAILED: no binary at $bin (cargo build --release -p identity-binding-proxy)" >&2; exit 1; }
# Rust's symbols (legacy or v0 mangling) carry the crate's name; `strings` also finds it in
# panic locations and type names kept for debug output.
for symbol in $forbidden_symbols; do
  hits=$( { nm --defined-only "$bin" 2>/dev/null || true; strings -a "$bin"; } | grep -c "$symbol" || true)
  if [ "$hits" -gt 0 ]; then
    echo "FAILED: $bin holds $hits symbols or strings of $symbol" >&2
    status=1
  fi
done
[ "$status" -eq 0 ] && echo "ok: no emulator crate in $package's dependencies or in $bin"
exit "$status"
