#!/usr/bin/env bash
# Renders the `cacerts` Secret for one cluster from a cacerts directory, with kubectl.
# Prints the YAML; with --apply, applies it instead. The namespace is signet-ca's (the
# chart's release namespace, signet-system in the docs); istiod reads its own from
# istio-system (`--namespace istio-system`).
#
# usage: scripts/render-cacerts-secret.sh CACERTS_DIR [--namespace NS] [--context CTX] [--apply]
set -euo pipefail
dir="${1:?usage: $0 CACERTS_DIR [--namespace NS] [--context CTX] [--apply]}"; shift
namespace=signet-system
context=()
apply=false
while [ $# -gt 0 ]; do
    case "$1" in
        --namespace) namespace="$2"; shift 2 ;;
        --context) context=(--context "$2"); shift 2 ;;
        --apply) apply=true; shift ;;
        *) echo "unknown argument: $1" >&2; exit 64 ;;
    esac
done
for f in ca-cert.pem ca-key.pem cert-chain.pem root-cert.pem; do
    [ -s "$dir/$f" ] || { echo "$dir/$f: missing or empty (want an Istio cacerts directory)" >&2; exit 65; }
done
render() {
    kubectl create secret generic cacerts --namespace "$namespace" \
        --from-file=ca-cert.pem="$dir/ca-cert.pem" \
        --from-file=ca-key.pem="$dir/ca-key.pem" \
        --from-file=cert-chain.pem="$dir/cert-chain.pem" \
        --from-file=root-cert.pem="$dir/root-cert.pem" \
        --dry-run=client -o yaml
}
if $apply; then
    render | kubectl "${context[@]}" apply -f -
else
    render
fi
