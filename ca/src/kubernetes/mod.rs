//! The Kubernetes edge: the API `client` (in-cluster or a kubeconfig), the
//! [`pods`] cache node impersonation reads, and the [`writers`] the elected replica
//! runs (root ConfigMaps, ClusterTrustBundle, istiod's Secret) with their Lease, and
//! the [`reachability`] probe behind `signet_ca_api_server_up` and readiness; the
//! JWT key set's Secret ([`jwtsecret`]).

pub(crate) mod client;
pub mod jwtsecret;
pub mod pods;
pub(crate) mod reachability;
pub mod writers;
