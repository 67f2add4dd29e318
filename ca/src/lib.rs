//! Signet's certificate authority, an Istio-compatible `IstioCertificateService`: a
//! request comes in at one of two entry points (a CreateCertificate call, or a
//! Kubernetes PodCertificateRequest), is authenticated, decided by policy and signed
//! on the signing queue under the loaded key material ([`issue`] over [`keys`]),
//! while the elected replica keeps the trust bundle in the API server
//! ([`kubernetes`]).
//!
//! Folders, each importing only those listed after it (and the leaves):
//! - [`cli`]: the command line: `serve`'s flags put together ([`cli::config`]) and the
//!   `pki` subcommands for operators.
//! - [`issue`]: the request path: the gRPC service and the pod certificate signer,
//!   then [`issue::authn`], [`issue::csr`], [`issue::policy`], the signing queue and
//!   the overload pushback.
//! - [`kubernetes`]: the Kubernetes edge: the API client, the pod cache (node
//!   impersonation), and the writers with their Lease.
//! - [`rotation`]: trust changes the CA drives: the declared next set, the stages
//!   (distribute, switch, retire) and their evidence, the issuance record.
//! - [`keys`]: the key material: private keys, the `cacerts` layouts, the
//!   [`keys::signer`], its reload, and the CA's own TLS.
//!
//! Beside them: [`server`] wires everything and serves; [`conns`] holds who may keep
//! the CA's connections; the leaves `flags` (what every flag group shares), `sync`
//! (poison-recovering locks) and `metrics` (Istio's names).
#![forbid(unsafe_code)]

pub mod cli;
pub mod conns;
pub(crate) mod flags;
pub mod issue;
pub mod keys;
pub mod kubernetes;
pub(crate) mod metrics;
pub mod rotation;
pub mod server;
pub(crate) mod sync;
