//! Envoy's Secret Discovery Service on a Unix socket: `StreamSecrets` (state of the
//! world), `DeltaSecrets` and `FetchSecrets`.
//!
//! Rules Envoy depends on (contract §5): every response holds exactly one secret,
//! named as requested; an ACK is answered with nothing; a NACK is logged and never
//! answered with the same version again; a request echoing an older nonce is stale
//! and ignored; empty `resource_names` unsubscribes; a changed name set is answered
//! for the new names; a secret that changes is pushed to every stream holding it.
//!
//! Modules: [`socket`] prepares the Unix socket; [`authority`] lets h2 accept any
//! `:authority` a client sends on it, with `hpack`'s bounded first pass over each
//! header block; `service` is the
//! `SecretDiscoveryService` (subscriptions, fetch); `protocol` runs one stream of
//! either protocol under the rules above; `transport` routes gRPC requests to it with
//! small buffers.

pub(crate) mod authority;
mod hpack;
mod protocol;
mod service;
mod socket;
mod transport;

#[doc(hidden)]
pub use authority::rewrite as rewrite_client_bytes;
pub use service::Sds;
pub use socket::{SocketError, bind, bind_as};
pub use transport::{SdsServer, Unboxed};

/// The only resource type served.
pub const SECRET_TYPE: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
