//! Signet's certificate authority: an Istio-compatible `IstioCertificateService`.
//!
//! Major components:
//! - [`cacerts`]: loads the operator's key material (Istio or cert-manager layout) or
//!   a self-signed root from the state directory.
//! - [`signer`]: checks key material and issues SPIFFE workload certificates.
//! - [`reload`]: takes changed key material while serving, or refuses it.
//! - [`csr`]: parses and verifies workload CSRs.
//! - [`conns`]: who may hold the CA's connections and for how long (shares per peer,
//!   deadlines, eviction of idle connections when the pool is full).
//! - [`policy`]: decides identity, lifetime, impersonation and SANs of a request.
//! - [`keys`]: private keys in PKCS#1, SEC1 or PKCS#8, and public key classification.
//! - [`pki`]: `signet-ca pki`, roots and per-cluster intermediates for operators.
//! - [`writers`]: what the elected replica keeps in the Kubernetes API server (root
//!   ConfigMaps, ClusterTrustBundle, istiod's Secret) and the Lease that elects it.
#![forbid(unsafe_code)]

pub mod authn;
pub mod cacerts;
pub mod config;
pub mod conns;
pub mod csr;
pub(crate) mod flags;
pub mod keys;
pub(crate) mod kubeapi;
pub(crate) mod metrics;
pub mod pki;
pub mod podcert;
pub mod pods;
pub mod policy;
pub(crate) mod pushback;
pub(crate) mod queue;
pub(crate) mod reload;
pub mod server;
pub(crate) mod service;
pub mod signer;
pub(crate) mod sync;
pub(crate) mod tls;
pub mod writers;
