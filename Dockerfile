# syntax=docker/dockerfile:1
# signet-ca and signet-agent in one image (docs/kubernetes.md, "Image").
#   docker build -t <registry>/signet:0.1.0 .
# ENTRYPOINT is signet-ca; run the agent with `command: ["/usr/local/bin/signet-agent"]`.

FROM rust:1-bookworm AS build
WORKDIR /src
# The toolchain pinned in rust-toolchain.toml; protoc comes from the protoc-bin-vendored
# crate, so nothing else is installed.
COPY rust-toolchain.toml ./
RUN rustup toolchain install
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    ./scripts/build-release.sh \
    && mkdir -p /out \
    && cp target/dist/signet-ca target/dist/signet-agent /out/

# glibc and libgcc (for signet-ca; signet-agent is static), CA certificates and
# nothing else: no shell, no package manager.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/signet-ca /out/signet-agent /usr/local/bin/
USER 65532:65532
EXPOSE 15012 15014
ENTRYPOINT ["/usr/local/bin/signet-ca"]
CMD ["serve"]
