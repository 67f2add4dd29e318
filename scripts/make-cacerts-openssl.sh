#!/usr/bin/env bash
# The operators' runbook, verbatim in spirit: an RSA-4096 root (10 years) and an
# RSA-4096 intermediate (2 years) signed by it, written as an Istio `cacerts`
# directory: ca-cert.pem, ca-key.pem, cert-chain.pem (intermediate + root),
# root-cert.pem. Needs only the openssl CLI.
#
# usage: scripts/make-cacerts-openssl.sh OUT_DIR [CLUSTER_NAME]
set -euo pipefail
out="${1:?usage: $0 OUT_DIR [CLUSTER_NAME]}"
cluster="${2:-cluster1}"
mkdir -p "$out"
cd "$out"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# Root: self-signed, RSA 4096, SHA-256, 3650 days.
openssl req -new -newkey rsa:4096 -x509 -sha256 -days 3650 -nodes \
    -subj "/O=Istio/CN=Root CA" -keyout root-key.pem -out root-cert.pem 2>/dev/null

# Intermediate: RSA 4096, 730 days, CA:TRUE, keyCertSign and cRLSign.
cat > "$work/ca.ext" <<EXT
basicConstraints=CA:TRUE
keyUsage=critical,digitalSignature,keyCertSign,cRLSign
EXT
openssl req -new -newkey rsa:4096 -nodes -sha256 \
    -subj "/O=Istio/CN=Intermediate CA/L=${cluster}" \
    -keyout ca-key.pem -out "$work/ca.csr" 2>/dev/null
openssl x509 -req -sha256 -days 730 -in "$work/ca.csr" \
    -CA root-cert.pem -CAkey root-key.pem -CAcreateserial -CAserial "$work/root.srl" \
    -extfile "$work/ca.ext" -out ca-cert.pem 2>/dev/null
cat ca-cert.pem root-cert.pem > cert-chain.pem
chmod 600 ca-key.pem root-key.pem
echo "wrote $out: ca-cert.pem ca-key.pem cert-chain.pem root-cert.pem (root key: root-key.pem)"
