//! The gRPC APIs Signet speaks: Istio's `istio.v1.auth` certificate service, the
//! SPIFFE Workload API (package-less, as the standard's file is), and Signet's own
//! `signet.v1` (JWT-SVIDs); messages, clients and servers.
#![forbid(unsafe_code)]

/// Generated from `proto/istio/v1/auth/ca.proto`.
#[allow(unreachable_pub, missing_debug_implementations, clippy::all)]
pub mod istio_auth {
    tonic::include_proto!("istio.v1.auth");
}

pub use istio_auth::istio_certificate_service_client::IstioCertificateServiceClient;
pub use istio_auth::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
pub use istio_auth::{IstioCertificateRequest, IstioCertificateResponse};

/// Generated from `proto/spiffe/workload.proto`: the SPIFFE Workload API.
#[allow(unreachable_pub, missing_debug_implementations, clippy::all)]
pub mod workload {
    tonic::include_proto!("_");
}

/// Generated from `proto/signet/v1/jwt.proto`: JWT-SVIDs minted by signet-ca.
#[allow(unreachable_pub, missing_debug_implementations, clippy::all)]
pub mod signet_v1 {
    tonic::include_proto!("signet.v1");
}

/// Full gRPC path of the one method, as clients send it.
pub const CREATE_CERTIFICATE_PATH: &str =
    "/istio.v1.auth.IstioCertificateService/CreateCertificate";
