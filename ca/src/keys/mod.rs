//! The key material: private keys and key kinds (this module), the operator's
//! [`cacerts`] layouts or a self-signed root, the [`signer`] proven at load, its
//! `reload` while serving, the CA's own serving certificate (`tls`), and the keys
//! that sign JWT-SVIDs ([`jwt`]).

pub mod cacerts;
mod checks;
pub mod jwt;
pub mod jwtstore;
mod key;
pub(crate) mod reload;
pub mod signer;
pub(crate) mod tls;

pub use key::{KeyError, KeyKind, SigningKey, generate_p256, load_signing_key, random_serial};
