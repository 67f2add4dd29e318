//! Signet's workload agent, one data path: the [`identity`] loop makes a key locally,
//! gets it certified by signet-ca (or istiod) with the pod's token, checks the answer
//! and publishes it into the [`secrets`] store, which Envoy reads over [`sds`] on a
//! Unix socket; it renews at half-life.
//!
//! Folders, each importing only those listed after it (and the leaves):
//! - [`sds`]: Envoy's Secret Discovery Service on the socket.
//! - [`secrets`]: the secrets by SDS name: the store, the names Envoy asks for and
//!   the resources they become, file-backed secrets, federated bundles, and the
//!   optional files on disk.
//! - [`identity`]: the workload's key, the CA client and its trust, the checks of
//!   each answer, and the rotation with its pure schedule.
//! - [`workload`]: the SPIFFE Workload API on a socket of its own, over the secrets
//!   store and [`jwt`] (JWT-SVIDs minted by signet-ca, cached per audience, and the
//!   CA's JWT bundle).
//!
//! Beside them: [`server`] wires everything; [`config`] puts `signet-agent run`'s
//! flag groups together; [`inspect`] is an SDS client for operators; the leaves
//! `sync` and [`metrics`] (and `signet-flags`, shared with the CA).
#![forbid(unsafe_code)]

pub mod config;
pub mod identity;
pub mod inspect;
pub(crate) mod jose;
pub mod jwt;
pub mod metrics;
pub mod sds;
pub mod secrets;
pub mod server;
pub(crate) mod sync;
pub mod workload;
