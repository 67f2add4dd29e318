//! Istio's `istio.v1.auth` certificate service: messages, client and server.
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

/// Full gRPC path of the one method, as clients send it.
pub const CREATE_CERTIFICATE_PATH: &str =
    "/istio.v1.auth.IstioCertificateService/CreateCertificate";
