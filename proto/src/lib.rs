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

/// What a signet-agent and signet-ca tell each other beside CreateCertificate
/// during a trust change, in gRPC metadata (other clients send and read neither):
/// the agent says which roots it serves ([`SERVED_ROOTS`]), the CA which stage of
/// its trust change the answer's bundle belongs to ([`TRUST_STAGE`]).
pub mod trust {
    /// Request metadata: the roots the caller serves now, as SHA-256 of each root's
    /// DER, lowercase hex, comma separated (empty: none yet).
    pub const SERVED_ROOTS: &str = "signet-served-roots";
    /// Response metadata: the stage of the CA's trust change (`idle`, `distribute`,
    /// `switch`, `retire`, `done`, `aborting`).
    pub const TRUST_STAGE: &str = "signet-trust-stage";
    /// Most roots one [`SERVED_ROOTS`] value may name.
    pub const MAX_ROOTS: usize = 32;

    /// A [`SERVED_ROOTS`] value that is not what it must be.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct RootsError(pub String);

    impl std::fmt::Display for RootsError {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "{SERVED_ROOTS}: {}", self.0)
        }
    }

    impl std::error::Error for RootsError {}

    /// The [`SERVED_ROOTS`] value naming `roots` (SHA-256 digests).
    pub fn encode_roots(roots: &[[u8; 32]]) -> String {
        roots.iter().map(hex::encode).collect::<Vec<_>>().join(",")
    }

    /// The digests a [`SERVED_ROOTS`] value names, sorted, without repeats.
    pub fn decode_roots(value: &str) -> Result<Vec<[u8; 32]>, RootsError> {
        if value.is_empty() {
            return Ok(Vec::new());
        }
        if value.len() > MAX_ROOTS * 65 {
            return Err(RootsError(format!(
                "names more than {MAX_ROOTS} roots ({} bytes)",
                value.len()
            )));
        }
        let mut roots = Vec::new();
        for (i, part) in value.split(',').enumerate() {
            let mut digest = [0u8; 32];
            if part.len() != 64
                || !part.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
                || hex::decode_to_slice(part, &mut digest).is_err()
            {
                return Err(RootsError(format!(
                    "entry {} is not a SHA-256 digest in lowercase hex (64 characters)",
                    i + 1
                )));
            }
            roots.push(digest);
        }
        if roots.len() > MAX_ROOTS {
            return Err(RootsError(format!("names more than {MAX_ROOTS} roots")));
        }
        roots.sort_unstable();
        roots.dedup();
        Ok(roots)
    }

    #[cfg(test)]
    #[allow(clippy::unwrap_used)]
    mod tests {
        use super::*;

        #[test]
        fn served_roots_round_trip_and_refuse_what_is_not_a_digest() {
            let (a, b) = ([0xab; 32], [0x01; 32]);
            let value = encode_roots(&[a, b, a]);
            assert_eq!(decode_roots(&value), Ok(vec![b, a]));
            assert_eq!(decode_roots(""), Ok(vec![]));
            for bad in [
                ",".to_owned(),
                "abc".to_owned(),
                "AB".repeat(32),
                format!("{},", hex::encode(a)),
                "zz".repeat(32),
                vec![hex::encode(a); MAX_ROOTS + 1].join(","),
            ] {
                let e = decode_roots(&bad).unwrap_err();
                assert!(e.to_string().starts_with(SERVED_ROOTS), "{e}");
            }
        }
    }
}
