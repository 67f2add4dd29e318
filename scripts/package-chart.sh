#!/usr/bin/env bash
# Packages deploy/helm/signet into OUT_DIR/signet-<version>.tgz (default target/dist)
# with Helm's own library (helm-python-sdk in .venv), exactly as `helm package` does;
# prints the archive's path. Publish it to a chart repository or an OCI registry.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$root/target/dist}"
python="$("$root/scripts/python-env.sh")"
mkdir -p "$out"
"$python" - "$root/deploy/helm/signet" "$out" <<'PY'
import sys

import helm_python

print(helm_python.package(sys.argv[1], destination=sys.argv[2]))
PY
