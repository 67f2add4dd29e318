#!/usr/bin/env bash
# Builds the two container images without a container daemon or a registry, as OCI
# image layouts written by umoci (Debian's package, rootless):
#   target/images/signet-ca     signet-ca on an empty base (entrypoint signet-ca serve)
#   target/images/signet-agent  signet-agent alone, for sidecars (entrypoint signet-agent run)
# Each holds its static binary (scripts/build-release.sh), the CA certificates of
# Debian's ca-certificates (for an https JWKS or CA), runs as 65532:65532 and carries
# the OCI labels source (SIGNET_IMAGE_SOURCE, by default the clone's origin), revision,
# version, title, description and licenses. Copy one
# to a registry with `skopeo copy oci:target/images/signet-ca:<version>
# docker://<registry>/signet-ca:<version>`.
#
# usage: scripts/build-images.sh [--skip-build]   (--skip-build: use target/dist as is)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

need_apt=()
command -v umoci >/dev/null || need_apt+=(umoci)
command -v skopeo >/dev/null || need_apt+=(skopeo)   # to copy them to a registry
[ -s /etc/ssl/certs/ca-certificates.crt ] || need_apt+=(ca-certificates)
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "==> installing ${need_apt[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi

if [ "${1:-}" != "--skip-build" ]; then
    ./scripts/build-release.sh
fi

version="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)"
revision="${SIGNET_REVISION:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
source="${SIGNET_IMAGE_SOURCE:-$(git config --get remote.origin.url 2>/dev/null || echo unknown)}"
created="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# image NAME DESCRIPTION CMD: target/images/NAME, tagged with the version.
image() {
    local name="$1" description="$2" cmd="$3"
    local layout="target/images/$name" ref="target/images/$name:$version"
    local rootfs="$work/$name/rootfs"
    rm -rf "$layout"
    mkdir -p target/images
    umoci init --layout "$layout"
    umoci new --image "$ref"
    # One layer: unpack the empty image, add the files, repack (umoci's `insert`
    # writes layers without the tar end-of-archive blocks).
    umoci unpack --rootless --image "$ref" "$work/$name" >/dev/null
    install -D -m 0755 "target/dist/$name" "$rootfs/usr/local/bin/$name"
    install -D -m 0644 /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
    umoci repack --image "$ref" "$work/$name"
    umoci config --image "$ref" \
        --author "Signet" --created "$created" \
        --config.user 65532:65532 \
        --config.entrypoint "/usr/local/bin/$name" --config.cmd "$cmd" \
        --config.env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
        --config.workingdir / \
        --config.label "org.opencontainers.image.title=$name" \
        --config.label "org.opencontainers.image.description=$description" \
        --config.label "org.opencontainers.image.version=$version" \
        --config.label "org.opencontainers.image.revision=$revision" \
        --config.label "org.opencontainers.image.source=$source" \
        --config.label "org.opencontainers.image.licenses=Apache-2.0" \
        --config.label "org.opencontainers.image.created=$created" \
        $( [ "$name" = signet-ca ] && echo --config.exposedports 15012/tcp --config.exposedports 15014/tcp )
    umoci gc --layout "$layout"
    echo "    $ref ($(du -sh "$layout" | cut -f1))"
}

echo "==> OCI image layouts in target/images (version $version, revision $revision)"
image signet-ca "Signet's certificate authority: Istio's CreateCertificate over TLS" serve
image signet-agent "Signet's workload agent: keys, certificates and Envoy SDS" run
