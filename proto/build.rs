//! Compiles `proto/` with the protoc that the `protoc-bin-vendored` crate ships, so a
//! fresh machine builds without a system protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    // Ordered maps: the same bundles encode to the same bytes (the agent's Workload
    // API compares digests of what it sent).
    config.btree_map([
        ".X509SVIDResponse.federated_bundles",
        ".X509BundlesResponse.bundles",
        ".JWTBundlesResponse.bundles",
    ]);
    let include = protoc_bin_vendored::include_path()?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_with_config(
            config,
            &[
                std::path::PathBuf::from("proto/istio/v1/auth/ca.proto"),
                std::path::PathBuf::from("proto/spiffe/workload.proto"),
                std::path::PathBuf::from("proto/signet/v1/jwt.proto"),
            ],
            &[std::path::PathBuf::from("proto"), include],
        )?;
    Ok(())
}
