//! The secrets by SDS name: the [`store`] the rotation publishes into and SDS reads,
//! the [`names`] Envoy asks for and the resources they become, Istio's
//! file-backed secrets ([`filesecret`]), other trust domains' bundles
//! ([`federation`]), and the optional files on disk.

pub mod federation;
pub mod filesecret;
pub mod names;
pub(crate) mod output;
pub(crate) mod resources;
pub mod store;
