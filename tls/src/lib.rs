//! The TLS both Signet programs speak.
//!
//! - [`CompliancePolicy`]: Istio's `COMPLIANCE_POLICY` (unset, `pqc`, `fips-140-3`,
//!   `fips-140-2`), and what each value allows: protocol versions, cipher suites and
//!   key-exchange groups.
//! - [`X25519MLKEM768`]: the hybrid post-quantum key exchange Istio's clients use under
//!   `pqc`, built from RustCrypto's ML-KEM-768 and rustls's ring X25519; Signet keeps
//!   ring for everything else.
//! - [`provider`]: the rustls provider a policy allows, offering the hybrid group first.
//! - [`ServerConfigs`] and [`accept`]: a server that prefers the hybrid group whenever
//!   a client offers it, and [`Negotiated`], what a handshake settled on, for metrics.
#![forbid(unsafe_code)]

mod accept;
mod hybrid;
mod policy;

pub use accept::{HandshakeFailure, Negotiated, ServerConfigs, accept};
pub use hybrid::X25519MLKEM768;
pub use policy::{ComplianceArgs, CompliancePolicy, UnknownPolicy, follows, group_name, provider};
