#!/usr/bin/env bash
# One root and a distinct intermediate per cluster, each a ready Istio cacerts
# directory: OUT_DIR/root/{root-cert.pem,root-key.pem} and OUT_DIR/<cluster>/.
# Uses `signet-ca pki` (from $SIGNET_CA, PATH, or this checkout's build).
#
# usage: scripts/make-multicluster-pki.sh [--key-type rsa-4096|ec-p256|ec-p384] OUT_DIR CLUSTER...
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
key_type=rsa-4096
if [ "${1:-}" = "--key-type" ]; then key_type="$2"; shift 2; fi
out="${1:?usage: $0 [--key-type TYPE] OUT_DIR CLUSTER...}"; shift
[ $# -gt 0 ] || { echo "usage: $0 [--key-type TYPE] OUT_DIR CLUSTER..." >&2; exit 64; }

ca="${SIGNET_CA:-}"
if [ -z "$ca" ]; then
    if command -v signet-ca >/dev/null; then ca=signet-ca
    elif [ -x "$root/target/release/signet-ca" ]; then ca="$root/target/release/signet-ca"
    elif [ -x "$root/target/debug/signet-ca" ]; then ca="$root/target/debug/signet-ca"
    else
        cargo build --release --locked -p signet-ca --manifest-path "$root/Cargo.toml" >&2
        ca="$root/target/release/signet-ca"
    fi
fi

if [ -f "$out/root/root-key.pem" ]; then
    echo "reusing the root in $out/root"
else
    "$ca" pki root --out "$out/root" --key-type "$key_type"
fi
for cluster in "$@"; do
    "$ca" pki intermediate --root "$out/root" --cluster "$cluster" --out "$out/$cluster" --key-type "$key_type"
    "$ca" pki inspect "$out/$cluster" >/dev/null
done
echo "done: apply each cluster's set with scripts/render-cacerts-secret.sh $out/<cluster> --apply"
