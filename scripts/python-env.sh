#!/usr/bin/env bash
# Creates .venv with the independent clients the tests use (grpcio from PyPI, the
# `cryptography` and PyJWT packages) and compiles proto/ for Python into
# .venv/signet_pb. Idempotent; prints the venv's python path on success.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/.venv"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv" >&2
fi
stamp="$venv/.signet-requirements"
if [ ! -f "$stamp" ] || ! cmp -s "$stamp" "$root/tests/python/requirements.txt"; then
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$root/tests/python/requirements.txt" >&2
    cp "$root/tests/python/requirements.txt" "$stamp"
fi
out="$venv/signet_pb"
mkdir -p "$out"
"$venv/bin/python" -m grpc_tools.protoc -I "$root/proto/proto" \
    --python_out="$out" --grpc_python_out="$out" istio/v1/auth/ca.proto signet/v1/jwt.proto >&2
echo "$venv/bin/python"
