#!/usr/bin/env bash
# The whole check, as CI runs it: install etcd when missing, format check, clippy with
# warnings as errors, then the full test suite against etcd 3.5.1 and again against 3.4.23.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}

echo "== installing etcd (when missing) =="
bins=$(bash scripts/install-etcd.sh)
ETCD35=$(printf '%s\n' "$bins" | sed -n 's/^ETCD35=//p')
ETCD34=$(printf '%s\n' "$bins" | sed -n 's/^ETCD34=//p')
[ -x "$ETCD35" ] || { echo "test.sh: etcd 3.5.1 binary not found" >&2; exit 1; }
[ -x "$ETCD34" ] || { echo "test.sh: etcd 3.4.23 binary not found" >&2; exit 1; }

echo "== cargo fmt --check =="
cargo fmt --all -- --check

echo "== cargo clippy (all targets, all features, -D warnings) =="
cargo clippy --all-targets --all-features -- -D warnings

start=$(date +%s)
for bin in "$ETCD35" "$ETCD34"; do
  echo "== tests against $("$bin" --version 2>/dev/null | sed -n 1p) ($bin) =="
  # A hang must fail the run, not eat the CI budget.
  ETCD_BIN="$bin" timeout 1500 cargo test --all-features --all-targets
done
echo "== doc tests =="
cargo test --all-features --doc
echo "== test suite took $(( $(date +%s) - start )) s =="
