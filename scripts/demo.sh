#!/usr/bin/env bash
# Signet locally, no cluster: builds signet-ca, starts it with a self-signed root and a
# JWKS (offline token mode), and has a workload (Python, grpcio) obtain its SPIFFE
# certificate, which openssl then verifies. Stops everything on exit.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
command -v openssl >/dev/null || { apt-get update -qq && apt-get install -y -qq openssl; }

echo "==> building signet-ca (release)"
cargo build --release --locked -p signet-ca 2>&1 | tail -n 1
python="$("$root/scripts/python-env.sh")"

work="$(mktemp -d)"
ca_pid=""
cleanup() {
    [ -n "$ca_pid" ] && kill "$ca_pid" 2>/dev/null && wait "$ca_pid" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

port() { "$python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
grpc_port="$(port)"; http_port="$(port)"

echo "==> making a service account token and the cluster's JWKS"
"$python" scripts/demo_client.py init "$work"

echo "==> starting signet-ca on 127.0.0.1:$grpc_port (self-signed root in $work/state)"
SIGNET_LOG=warn,signet_ca::audit=info ./target/release/signet-ca serve \
    --cacerts-dir "$work/no-cacerts" --state-dir "$work/state" \
    --grpc-addr "127.0.0.1:$grpc_port" --http-addr "127.0.0.1:$http_port" \
    --jwks "$work/jwks.json" --jwt-issuer https://kubernetes.default.svc.cluster.local \
    2> "$work/ca.log" &
ca_pid=$!
for _ in $(seq 100); do
    curl -fs "http://127.0.0.1:$http_port/readyz" >/dev/null 2>&1 && break
    "$python" -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$http_port/readyz', timeout=1)" 2>/dev/null && break
    kill -0 "$ca_pid" 2>/dev/null || { cat "$work/ca.log"; exit 1; }
    sleep 0.1
done

echo "==> workload demo/web asks for its certificate"
"$python" scripts/demo_client.py request "$work" "127.0.0.1:$grpc_port"

echo "==> the CA's audit log"
grep "certificate issued" "$work/ca.log" | sed 's/^/  /'
echo "==> done; stopping signet-ca"
