#!/usr/bin/env bash
# The client-only install of docs/deploy.md, section 5, in a fresh virtual environment: the package
# without its dependencies, then only what a ClientApp imports. Checks that the ClientApp, the
# SuperNode command and the credentials/state modules work there, and that neither Ray nor
# matplotlib was installed.
#   bash scripts/device_install.sh [VENV_DIR]      (default: a temporary directory, removed afterwards)
# TORCH_SPEC overrides the torch requirement (default: torch==2.13.0, the CPU build the Makefile pins).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:-}"
if [[ -z "$venv" ]]; then
    venv="$(mktemp -d)/device-venv"
    trap 'rm -rf "$(dirname "$venv")"' EXIT
fi
python3 -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install --quiet --upgrade pip
start=$(date +%s)
# the two commands of the guide (torch pinned here, as on every machine of this project)
"$py" -m pip install --quiet --no-deps "$root"
"$py" -m pip install --quiet "flwr>=1.42,<1.43" "${TORCH_SPEC:-torch==2.13.0}" numpy "protobuf>=6.33.5,<7" \
    cryptography scikit-learn rich zlib-ng
echo "client-only install: $(( $(date +%s) - start )) s"
"$py" - <<'PY'
import importlib.util
import sys

import fedsqueeze.client.app  # the ClientApp and everything it imports
import fedsqueeze.deploy.state  # noqa: F401  durable state
import zlib_ng  # noqa: F401  its checksum
import fedsqueeze.deploy.credentials  # noqa: F401  `fedsqueeze keys` on a device

for absent in ("ray", "matplotlib"):
    assert importlib.util.find_spec(absent) is None, f"{absent} was installed on the device"
assert "ray" not in sys.modules and "matplotlib" not in sys.modules
print("ClientApp imports without Ray or matplotlib:", fedsqueeze.client.app.app)
PY
"$venv/bin/flower-supernode" --help > /dev/null
echo "flower-supernode runs"
