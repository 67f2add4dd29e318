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

# A run that builds from nothing gains nothing from incremental compilation data: it
# costs disk (several GiB) and time. Set CARGO_INCREMENTAL=1 to keep it while
# editing.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

# How long each step took, printed at the end.
began=$SECONDS
timings=()
step() { # NAME COMMAND...: runs COMMAND, timed, under NAME
    local name="$1" start=$SECONDS
    shift
    echo "==> $name"
    "$@"
    timings+=("$(printf '%4ds  %s' "$((SECONDS - start))" "$name")")
}

step "cargo fmt --check" cargo fmt --all -- --check
step "cargo clippy" cargo clippy --workspace --all-targets --locked -- -D warnings
step "cargo build" cargo build --workspace --locked
# cargo-nextest gives each test a time limit (.config/nextest.toml); the Rust
# machines here have it, and anywhere else it is built once from crates.io, without
# its release profile's whole-program optimisation (4 minutes on two cores; its
# work here is starting test processes, which that does not speed up).
if ! cargo nextest --version >/dev/null 2>&1; then
    step "installing cargo-nextest" cargo install cargo-nextest --locked \
        --config profile.release.lto=false --config profile.release.codegen-units=16 \
        --config profile.release.opt-level=1
fi
step "cargo nextest run (each test killed after 5 minutes)" cargo nextest run --workspace --locked
step "cargo test --doc" cargo test --workspace --locked --doc
# The images as they ship (static release binaries, OCI layouts): in CI, where the
# Python tests then inspect them; elsewhere on demand (scripts/build-images.sh).
if [ "${CI:-}" = "true" ]; then
    step "build the images (scripts/build-images.sh)" ./scripts/build-images.sh
fi
python="$("$root/scripts/python-env.sh")"
step "python tests (grpcio, cryptography, PyJWT, prometheus-client, openssl, Envoy)" \
    "$python" -m pytest -q "$root/tests/python"
step "package the chart (target/dist/signet-<version>.tgz)" ./scripts/package-chart.sh
# The README's first command, on the binaries built above.
step "./scripts/demo.sh (the README's first command)" env SIGNET_DEMO_PROFILE=dev ./scripts/demo.sh

echo "==> all passed in $((SECONDS - began))s"
printf '    %s\n' "${timings[@]}"
