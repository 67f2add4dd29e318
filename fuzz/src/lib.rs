//! The bodies of Signet's fuzz targets, one function per target. `fuzz_targets/`
//! hands them libFuzzer's input; `tests/corpus.rs` replays the checked-in corpus
//! through them in `cargo test`, so CI keeps every target compiling and passing.
//!
//! Besides "never panic", each target asserts what must hold for hostile input: a
//! token nobody signed never authenticates, a CA answer is only accepted for our own
//! key and identity, a file-secret path that passes the check stays inside the
//! allowed directory.
#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    path::{Path, PathBuf},
    sync::OnceLock,
};

use signet_agent::{
    identity::svid::check_answer, secrets::filesecret::FilePolicy, secrets::names::SecretName,
};
use signet_ca::issue::authn::{JwksSource, JwtAuthenticator, JwtConfig, Token};
use spiffe::SpiffeId;
use time::OffsetDateTime;

/// The workload key the `ca_answer` target's answers are checked against (a key made
/// for fuzzing only; its seeds certify it).
pub const WORKLOAD_KEY: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgNGrunwWXNyuWaLzU
6cuYaJPzvN0H+DQTKFtKHmEjWhqhRANCAATthl00Vzb9oNcONgSsf36WXrpME6T2
dljO411mYO63NzVAgqgmGsjI16Mv91U1Vd2L0UXXlVhPZBOMH+On9xSV
-----END PRIVATE KEY-----
";
/// The identity the `ca_answer` target expects.
pub const WORKLOAD_ID: &str = "spiffe://cluster.local/ns/fuzz/sa/target";
/// Separates the parts of a multi-part input (a CA answer's elements, a cacerts set).
pub const SEPARATOR: &[u8] = b"\n@@\n";
/// The allowed directory of the `sds_name` target.
pub const FILE_SECRET_DIR: &str = "/etc/certs";

/// The fixed "now" of time-dependent targets, so a crash reproduces.
pub fn now() -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(1_795_000_000).unwrap()
}

/// Splits `data` at [`SEPARATOR`].
pub fn parts(data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut rest = data;
    while let Some(i) = rest.windows(SEPARATOR.len()).position(|w| w == SEPARATOR) {
        out.push(&rest[..i]);
        rest = &rest[i + SEPARATOR.len()..];
    }
    out.push(rest);
    out
}

/// `signet_ca::issue::csr::check` on a PEM (or anything else).
pub fn csr(data: &[u8]) {
    let pem = String::from_utf8_lossy(data);
    if let Ok(checked) = signet_ca::issue::csr::check(&pem) {
        assert!(!checked.spki.is_empty());
    }
}

struct JwtSetup {
    runtime: tokio::runtime::Runtime,
    auth: JwtAuthenticator,
}

fn jwt_setup() -> &'static JwtSetup {
    static SETUP: OnceLock<JwtSetup> = OnceLock::new();
    SETUP.get_or_init(|| {
        // A JWKS whose private keys nobody has: no input can be a valid token.
        let ec = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let point = ec.public_key_raw();
        let jwks = format!(
            r#"{{"keys":[{{"kty":"EC","crv":"P-256","kid":"k1","alg":"ES256","x":"{}","y":"{}"}},{{"kty":"oct","kid":"k2","k":"c2VjcmV0"}},{{"kty":"RSA","kid":"k3","alg":"RS256","n":"{}","e":"AQAB"}}]}}"#,
            base64url(&point[1..33]),
            base64url(&point[33..65]),
            base64url(&[0xc5; 256]),
        );
        let path = std::env::temp_dir().join(format!("signet-fuzz-jwks-{}.json", std::process::id()));
        std::fs::write(&path, jwks).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let auth = runtime
            .block_on(JwtAuthenticator::new(JwtConfig {
                issuer: "https://kubernetes.default.svc".into(),
                audiences: vec!["istio-ca".into()],
                source: JwksSource::File(path),
                refresh_interval: std::time::Duration::from_secs(300),
                max_age: std::time::Duration::from_secs(365 * 86_400),
            }))
            .unwrap();
        JwtSetup { runtime, auth }
    })
}

fn base64url(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// The JWT front end: the JWKS parser on the raw input, and the whole offline
/// verification (header, key choice, signature, claims) on it as a token.
pub fn jwt(data: &[u8]) {
    let _ = signet_ca::issue::authn::Jwks::parse(data);
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let setup = jwt_setup();
    let verdict = setup
        .runtime
        .block_on(setup.auth.verify(&Token::new(text), now()));
    assert!(verdict.is_err(), "a token nobody signed was accepted");
}

/// A cacerts directory (Istio layout, and `ca-crl.pem` when a fifth part is given)
/// loaded exactly as `signet-ca serve` loads it, then checked by `Signer::new`.
pub fn cacerts(data: &[u8]) {
    thread_local! {
        static DIR: PathBuf = {
            let base = if Path::new("/dev/shm").is_dir() {
                PathBuf::from("/dev/shm")
            } else {
                std::env::temp_dir()
            };
            let dir = base.join(format!("signet-fuzz-cacerts-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            dir
        };
    }
    let parts = parts(data);
    DIR.with(|dir| {
        let names = [
            "ca-cert.pem",
            "ca-key.pem",
            "cert-chain.pem",
            "root-cert.pem",
            "ca-crl.pem",
        ];
        for (i, name) in names.iter().enumerate() {
            let path = dir.join(name);
            match parts.get(i) {
                Some(bytes) => std::fs::write(&path, bytes).unwrap(),
                None => {
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        if let Ok(Some(material)) = signet_ca::keys::cacerts::load_dir(dir) {
            let _ = signet_ca::keys::signer::Signer::new(material, now());
        }
    });
}

/// SDS resource names, and the file-secret path check for the file-backed ones.
pub fn sds_name(data: &[u8]) {
    let name = String::from_utf8_lossy(data);
    let Ok(parsed) = SecretName::parse(&name) else {
        return;
    };
    let policy = FilePolicy::new(vec![PathBuf::from(FILE_SECRET_DIR)]);
    let paths: Vec<&Path> = match &parsed {
        SecretName::FileCert { cert, key } => vec![cert, key],
        SecretName::FileRoot(path) => vec![path],
        _ => Vec::new(),
    };
    for path in paths {
        if policy.check(path).is_ok() {
            assert!(path.starts_with(FILE_SECRET_DIR), "{path:?}");
            assert!(
                !path
                    .components()
                    .any(|c| matches!(c, std::path::Component::ParentDir)),
                "{path:?}"
            );
        }
    }
}

fn workload_spki() -> &'static [u8] {
    static SPKI: OnceLock<Vec<u8>> = OnceLock::new();
    SPKI.get_or_init(|| {
        use rcgen::PublicKeyData;
        rcgen::KeyPair::from_pem(WORKLOAD_KEY)
            .unwrap()
            .subject_public_key_info()
    })
}

/// The agent's check of a CA answer (`cert_chain` elements separated by
/// [`SEPARATOR`]).
pub fn ca_answer(data: &[u8]) {
    let chain: Vec<String> = parts(data)
        .into_iter()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect();
    let id = SpiffeId::new(WORKLOAD_ID).unwrap();
    if let Ok(svid) = check_answer(&chain, &id, workload_spki(), String::new(), now()) {
        assert_eq!(svid.id, id);
    }
}

/// Federated bundles: a bundle file (`.pem` or `.json`, chosen by the first byte)
/// and the one-document JSON map.
pub fn federation(data: &[u8]) {
    let ext = if data.first().is_some_and(|b| b % 2 == 0) {
        "json"
    } else {
        "pem"
    };
    let body = data.get(1..).unwrap_or_default();
    if let Ok(Some((_, pem))) =
        signet_agent::secrets::federation::parse_file("b.example", ext, body)
    {
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"));
    }
    if let Ok(bundles) = signet_agent::secrets::federation::parse_map(data) {
        for pem in bundles.values() {
            assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"));
        }
    }
}

/// The SDS socket's HTTP/2 rewriter (`signet_agent::sds::rewrite_client_bytes`) on any
/// client bytes: never a panic, and what it hands h2 is the client's preface and
/// frames, whose header blocks decode (in order, one HPACK table) to lists of at most
/// 16 KiB with an `:authority` h2 accepts, if any.
pub fn sds_authority(data: &[u8]) {
    let Ok(out) = signet_agent::sds::rewrite_client_bytes(data) else {
        return;
    };
    let mut rest = out.get(24..).unwrap_or_default();
    let mut decoder = loona_hpack::Decoder::new();
    let mut block: Vec<u8> = Vec::new();
    while rest.len() >= 9 {
        let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
        let (kind, flags) = (rest[3], rest[4]);
        let Some(payload) = rest.get(9..9 + len) else {
            // The rest of a passed-through frame has not arrived.
            return;
        };
        if kind == 0x1 || kind == 0x9 {
            block.extend_from_slice(payload);
            if flags & 0x4 != 0 {
                let mut size = 0;
                decoder
                    .decode_with_cb(&block, |name, value| {
                        size += name.len() + value.len() + 32;
                        if &*name == b":authority" {
                            assert!(
                                http::uri::Authority::try_from(&*value).is_ok(),
                                "h2 would refuse :authority {value:?}"
                            );
                        }
                    })
                    .expect("a header block the rewriter wrote does not decode");
                assert!(size <= 16 * 1024, "a header list of {size} bytes passed");
                block.clear();
            }
        }
        rest = &rest[9 + len..];
    }
}

/// A peer's X25519MLKEM768 key share (`signet_tls`), as a client's share on the
/// CA's side and as a server's answer to a client in progress: never a panic; a
/// client share is taken only at 1216 bytes (answered with 1120 and a 64-byte
/// secret), an answer only at 1120. Key pairs and encapsulations draw fresh
/// randomness on each run, as in a handshake; what decides acceptance (lengths, the
/// encapsulation key's modulus check) depends on the input alone. Random inputs
/// almost never pass the modulus check: the `client-share` seed covers that path.
pub fn kx_share(data: &[u8]) {
    if let Ok(done) = signet_tls::X25519MLKEM768.start_and_complete(data) {
        assert_eq!(data.len(), 1184 + 32);
        assert_eq!(done.pub_key.len(), 1088 + 32);
        assert_eq!(done.secret.secret_bytes().len(), 64);
    }
    let Ok(client) = signet_tls::X25519MLKEM768.start() else {
        return;
    };
    if client.complete(data).is_ok() {
        assert_eq!(data.len(), 1088 + 32);
    }
}
