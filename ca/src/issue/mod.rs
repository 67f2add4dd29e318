//! The request path. Two entry points, `service` (Istio's CreateCertificate over
//! gRPC) and [`podcert`] (Kubernetes PodCertificateRequests), each turn their input
//! into one [`policy::Request`]: the caller is authenticated ([`authn`]: a token or a
//! client certificate; for a pod, its binding), its CSR or key parsed ([`csr`]),
//! [`policy`] decides identity, validity and queue share, and the signing `queue`
//! runs the signer of exactly that decision; `pushback` tells refused callers when
//! to come back. [`jwtsvid`] mints JWT-SVIDs for callers authenticated the same way,
//! on the same queue.

pub mod authn;
pub mod csr;
pub mod jwtsvid;
pub mod podcert;
pub mod policy;
pub(crate) mod pushback;
pub(crate) mod queue;
pub(crate) mod service;
