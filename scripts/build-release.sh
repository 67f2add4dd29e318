#!/usr/bin/env bash
# Builds the binaries as they ship, into target/dist/, both linked statically (glibc's
# static libc, 2.34 or newer, which has DNS and /etc/hosts look-ups built in: nothing
# is loaded at run time, so they run on an empty image, scripts/build-images.sh):
#   signet-ca     the release profile (fat LTO, stripped);
#   signet-agent  the agent profile (the same, optimised for size; only the parts of
#                 libc it calls are loaded, which is most of the agent's memory
#                 saving; docs/performance.md).
# `scripts/build-release.sh agent` builds the agent only, `... ca` the CA only.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

what=("$@")
[ ${#what[@]} -gt 0 ] || what=(ca agent)
host="$(rustc -vV | sed -n 's/^host: //p')"
# The revision the binaries report (`*_build_info{revision}`).
SIGNET_REVISION="${SIGNET_REVISION:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
export SIGNET_REVISION
mkdir -p target/dist
# --target keeps crt-static off build scripts and proc macros, which run on the host
# and cannot be static.
flags="${RUSTFLAGS:-}"
case "$host" in
*-linux-gnu) flags="$flags -C target-feature=+crt-static" ;;
esac
for w in "${what[@]}"; do
    case "$w" in
    ca)
        RUSTFLAGS="$flags" cargo build --release --locked -p signet-ca --target "$host"
        cp "target/$host/release/signet-ca" target/dist/
        ;;
    agent)
        RUSTFLAGS="$flags" cargo build --profile agent --locked -p signet-agent --target "$host"
        cp "target/$host/agent/signet-agent" target/dist/
        ;;
    *)
        echo "usage: $0 [ca] [agent]" >&2
        exit 2
        ;;
    esac
done
