//! The Kubernetes edge: the API `client` (in-cluster or a kubeconfig), the
//! [`pods`] cache node impersonation reads, and the [`writers`] the elected replica
//! runs (root ConfigMaps, ClusterTrustBundle, istiod's Secret) with their Lease.

pub(crate) mod client;
pub mod pods;
pub mod writers;
