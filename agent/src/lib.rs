//! Signet's workload agent: generates the private key locally, obtains a SPIFFE
//! certificate from signet-ca (or istiod), rotates it at half-life, and serves it to
//! Envoy over SDS on a Unix socket.
//!
//! Major components:
//! - [`schedule`]: when to renew, back off, or ask again after a trust-file change
//!   (pure functions of the time and what was fetched).
//! - [`rotation`]: the loop that fetches, publishes and sleeps until the schedule says.
//! - [`caclient`]: CreateCertificate over TLS with the pod's token.
//! - [`svid`]: the checks every CA answer passes before it is served.
//! - [`store`] and [`sds`]: the secrets by SDS name and Envoy's SDS protocol.
//! - [`inspect`]: an SDS client for operators.
#![forbid(unsafe_code)]

pub mod caclient;
pub mod catrust;
pub mod config;
pub mod federation;
pub mod filesecret;
pub mod flags;
pub mod inspect;
pub mod keys;
pub mod metrics;
pub mod names;
pub(crate) mod output;
pub(crate) mod resources;
pub mod rotation;
pub mod schedule;
pub mod sds;
pub mod server;
pub mod store;
pub mod svid;
pub(crate) mod sync;
