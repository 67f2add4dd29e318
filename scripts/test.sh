#!/usr/bin/env bash
# The one command that checks everything: formatting, clippy, the Rust tests, and the
# Python tests that drive signet-ca with independent clients. Installs what it needs
# (openssl from Debian, Python packages from PyPI into .venv).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

need_apt=()
command -v openssl >/dev/null || need_apt+=(openssl)
command -v kubectl >/dev/null || need_apt+=(kubectl)
python3 -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv)
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "==> installing ${need_apt[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi

# A CI run builds once from nothing: incremental compilation data would only cost
# disk (several GiB) and time.
if [ "${CI:-}" = "true" ]; then
    export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
fi

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "==> cargo build"
cargo build --workspace --locked
# cargo-nextest gives each test a time limit (.config/nextest.toml); the Rust
# machines here have it, and anywhere else it is built once from crates.io.
if ! cargo nextest --version >/dev/null 2>&1; then
    echo "==> installing cargo-nextest"
    cargo install cargo-nextest --locked
fi
echo "==> cargo nextest run (each test killed after 5 minutes)"
cargo nextest run --workspace --locked
echo "==> cargo test --doc"
cargo test --workspace --locked --doc
echo "==> python tests (grpcio, cryptography, PyJWT, openssl)"
python="$("$root/scripts/python-env.sh")"
"$python" -m pytest -q "$root/tests/python"
