//! X25519MLKEM768 (draft-ietf-tls-ecdhe-mlkem, code point 0x11ec): ML-KEM-768 from
//! RustCrypto's `ml-kem` and X25519 from rustls's ring provider. Only the combination
//! is ours, and the draft fixes it: the client's share is the ML-KEM-768 encapsulation
//! key then its X25519 share, the server's is the ML-KEM ciphertext then its X25519
//! share, and the shared secret is the ML-KEM secret then the X25519 secret. TLS 1.3
//! only.
//!
//! Randomness comes from ring's `SystemRandom`, as for the rest of the handshake: the
//! 64-byte ML-KEM seed, and the 32-byte message `m` of FIPS 203's encapsulation
//! (`encapsulate_deterministic` is ML-KEM.Encaps with `m` drawn by the caller).

use ml_kem::{
    B32, DecapsulationKey, EncapsulationKey, KeyExport, MlKem768, Seed, array::Array,
    kem::Decapsulate,
};
use ring::rand::{SecureRandom, SystemRandom};
use rustls::{
    Error, NamedGroup, PeerMisbehaved, ProtocolVersion,
    crypto::{
        ActiveKeyExchange, CompletedKeyExchange, SharedSecret, SupportedKxGroup,
        ring::kx_group::X25519,
    },
    ffdhe_groups::FfdheGroup,
};
use zeroize::Zeroize;

/// The hybrid group, for a provider's `kx_groups`.
pub static X25519MLKEM768: &dyn SupportedKxGroup = &X25519MlKem768;

/// ML-KEM-768 encapsulation key (FIPS 203, table 3).
const EK_LEN: usize = 1184;
/// ML-KEM-768 ciphertext.
const CT_LEN: usize = 1088;
/// An X25519 public key.
const X25519_LEN: usize = 32;

#[derive(Debug)]
struct X25519MlKem768;

impl SupportedKxGroup for X25519MlKem768 {
    /// The client's side: a fresh ML-KEM key pair and X25519 key.
    fn start(&self) -> Result<Box<dyn ActiveKeyExchange>, Error> {
        let x25519 = X25519.start()?;
        let mut seed = Seed::default();
        random(&mut seed)?;
        let dk = DecapsulationKey::<MlKem768>::from_seed(seed);
        seed.zeroize();
        let mut share = Vec::with_capacity(EK_LEN + X25519_LEN);
        share.extend_from_slice(&dk.encapsulation_key().to_bytes());
        share.extend_from_slice(x25519.pub_key());
        Ok(Box::new(Active { x25519, dk, share }))
    }

    /// The server's side: encapsulates to the client's ML-KEM key and completes
    /// X25519 with its share.
    fn start_and_complete(&self, client_share: &[u8]) -> Result<CompletedKeyExchange, Error> {
        if client_share.len() != EK_LEN + X25519_LEN {
            return Err(invalid_share());
        }
        let (ek, x25519_share) = client_share.split_at(EK_LEN);
        let ek = <&Array<u8, _>>::try_from(ek).map_err(|_| invalid_share())?;
        // Includes FIPS 203's modulus check of the encapsulation key.
        let ek = EncapsulationKey::<MlKem768>::new(ek).map_err(|_| invalid_share())?;
        let x25519 = X25519.start_and_complete(x25519_share)?;

        let mut m = B32::default();
        random(&mut m)?;
        let (ct, mut mlkem_secret) = ek.encapsulate_deterministic(&m);
        m.zeroize();

        let mut share = Vec::with_capacity(CT_LEN + X25519_LEN);
        share.extend_from_slice(&ct);
        share.extend_from_slice(&x25519.pub_key);
        let secret = combine(&mlkem_secret, &x25519.secret);
        mlkem_secret.zeroize();
        Ok(CompletedKeyExchange {
            group: self.name(),
            pub_key: share,
            secret,
        })
    }

    fn ffdhe_group(&self) -> Option<FfdheGroup<'static>> {
        None
    }

    fn name(&self) -> NamedGroup {
        NamedGroup::X25519MLKEM768
    }

    /// Neither ring nor `ml-kem` is a validated module.
    fn fips(&self) -> bool {
        false
    }

    fn usable_for_version(&self, version: ProtocolVersion) -> bool {
        version == ProtocolVersion::TLSv1_3
    }
}

/// A client's key exchange in flight.
struct Active {
    x25519: Box<dyn ActiveKeyExchange>,
    dk: DecapsulationKey<MlKem768>,
    share: Vec<u8>,
}

impl ActiveKeyExchange for Active {
    fn complete(self: Box<Self>, server_share: &[u8]) -> Result<SharedSecret, Error> {
        if server_share.len() != CT_LEN + X25519_LEN {
            return Err(invalid_share());
        }
        let (ct, x25519_share) = server_share.split_at(CT_LEN);
        let x25519_secret = self.x25519.complete(x25519_share)?;
        let mut mlkem_secret = self.dk.decapsulate_slice(ct).map_err(|_| invalid_share())?;
        let secret = combine(&mlkem_secret, &x25519_secret);
        mlkem_secret.zeroize();
        Ok(secret)
    }

    /// Lets a client offering the hybrid group first send its X25519 share too, so a
    /// server without ML-KEM needs no HelloRetryRequest.
    fn hybrid_component(&self) -> Option<(NamedGroup, &[u8])> {
        Some((NamedGroup::X25519, self.x25519.pub_key()))
    }

    fn complete_hybrid_component(
        self: Box<Self>,
        server_share: &[u8],
    ) -> Result<SharedSecret, Error> {
        self.x25519.complete(server_share)
    }

    fn pub_key(&self) -> &[u8] {
        &self.share
    }

    fn ffdhe_group(&self) -> Option<FfdheGroup<'static>> {
        None
    }

    fn group(&self) -> NamedGroup {
        NamedGroup::X25519MLKEM768
    }
}

/// The draft's secret: ML-KEM's 32 bytes, then X25519's.
fn combine(mlkem: &[u8], x25519: &SharedSecret) -> SharedSecret {
    let mut secret = Vec::with_capacity(mlkem.len() + x25519.secret_bytes().len());
    secret.extend_from_slice(mlkem);
    secret.extend_from_slice(x25519.secret_bytes());
    SharedSecret::from(secret)
}

fn random(buf: &mut [u8]) -> Result<(), Error> {
    SystemRandom::new()
        .fill(buf)
        .map_err(|_| Error::FailedToGetRandomBytes)
}

fn invalid_share() -> Error {
    Error::PeerMisbehaved(PeerMisbehaved::InvalidKeyShare)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both sides derive the same 64-byte secret, ML-KEM's part first.
    #[test]
    fn client_and_server_agree() {
        let client = X25519MLKEM768.start().unwrap();
        assert_eq!(client.pub_key().len(), EK_LEN + X25519_LEN);
        let server = X25519MLKEM768.start_and_complete(client.pub_key()).unwrap();
        assert_eq!(server.pub_key.len(), CT_LEN + X25519_LEN);
        let client_secret = client.complete(&server.pub_key).unwrap();
        assert_eq!(client_secret.secret_bytes(), server.secret.secret_bytes());
        assert_eq!(client_secret.secret_bytes().len(), 64);
    }

    /// The X25519 half alone is a plain X25519 exchange, for a server that chose the
    /// classical share the client sent alongside.
    #[test]
    fn the_classical_half_completes_alone() {
        let client = X25519MLKEM768.start().unwrap();
        let (group, share) = client.hybrid_component().unwrap();
        assert_eq!(group, NamedGroup::X25519);
        assert_eq!(share, &client.pub_key()[EK_LEN..]);
        let server = X25519.start_and_complete(share).unwrap();
        let secret = client.complete_hybrid_component(&server.pub_key).unwrap();
        assert_eq!(secret.secret_bytes(), server.secret.secret_bytes());
    }

    /// The shares and the secret are in the draft's order, ML-KEM first: checked
    /// against each half computed on its own.
    #[test]
    fn shares_and_secret_are_mlkem_then_x25519() {
        let client = X25519MLKEM768.start().unwrap();
        let (ek, x25519_share) = client.pub_key().split_at(EK_LEN);
        let ek = EncapsulationKey::<MlKem768>::new(ek.try_into().unwrap()).unwrap();
        let (ct, mlkem_secret) = ek.encapsulate_deterministic(&B32::from([9; 32]));
        let x25519 = X25519.start_and_complete(x25519_share).unwrap();
        let server_share = [ct.as_slice(), &x25519.pub_key].concat();

        let secret = client.complete(&server_share).unwrap();
        assert_eq!(&secret.secret_bytes()[..32], mlkem_secret.as_slice());
        assert_eq!(&secret.secret_bytes()[32..], x25519.secret.secret_bytes());
    }

    #[test]
    fn malformed_shares_are_refused() {
        for len in [
            0,
            32,
            EK_LEN,
            EK_LEN + X25519_LEN - 1,
            EK_LEN + X25519_LEN + 1,
        ] {
            let err = X25519MLKEM768.start_and_complete(&vec![7; len]).err();
            assert!(err.is_some(), "share of {len} bytes accepted");
        }
        // The right length, but coefficients not below the modulus q = 3329.
        let err = X25519MLKEM768
            .start_and_complete(&[0xff; EK_LEN + X25519_LEN])
            .err();
        assert_eq!(err, Some(invalid_share()));

        let client = X25519MLKEM768.start().unwrap();
        assert!(client.complete(&[1; CT_LEN]).is_err());
    }

    #[test]
    fn tls13_only() {
        assert!(X25519MLKEM768.usable_for_version(ProtocolVersion::TLSv1_3));
        assert!(!X25519MLKEM768.usable_for_version(ProtocolVersion::TLSv1_2));
    }
}
