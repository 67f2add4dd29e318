//! Replays the checked-in corpus of every fuzz target through its body, so `cargo
//! test` keeps the targets compiling and passing; and (ignored, run by hand) writes
//! the seed corpus.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

type Target = fn(&[u8]);

const TARGETS: [(&str, Target); 8] = [
    ("csr", signet_fuzz::csr),
    ("jwt", signet_fuzz::jwt),
    ("cacerts", signet_fuzz::cacerts),
    ("sds_name", signet_fuzz::sds_name),
    ("ca_answer", signet_fuzz::ca_answer),
    ("federation", signet_fuzz::federation),
    ("sds_authority", signet_fuzz::sds_authority),
    ("kx_share", signet_fuzz::kx_share),
];

fn corpus(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target)
}

#[test]
fn every_corpus_file_replays() {
    for (name, target) in TARGETS {
        let dir = corpus(name);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "{name} has no seed corpus");
        for file in files {
            target(&std::fs::read(&file).unwrap());
        }
    }
}

/// The seeds that exercise the accepting paths are still accepted: a corpus that
/// only holds garbage would fuzz nothing but the first parser error.
#[test]
fn seeds_reach_the_accepting_paths() {
    let read = |target: &str, file: &str| std::fs::read(corpus(target).join(file)).unwrap();
    let csr = String::from_utf8(read("csr", "p256-san")).unwrap();
    assert!(signet_ca::issue::csr::check(&csr).is_ok());
    let answer: Vec<String> = signet_fuzz::parts(&read("ca_answer", "leaf-intermediate-root"))
        .into_iter()
        .map(|p| String::from_utf8(p.to_vec()).unwrap())
        .collect();
    let id = spiffe::SpiffeId::new(signet_fuzz::WORKLOAD_ID).unwrap();
    use rcgen::PublicKeyData;
    let spki = rcgen::KeyPair::from_pem(signet_fuzz::WORKLOAD_KEY)
        .unwrap()
        .subject_public_key_info();
    signet_agent::identity::svid::check_answer(
        &answer,
        &id,
        &spki,
        String::new(),
        signet_fuzz::now(),
    )
    .unwrap();
    let set = read("cacerts", "p256-istio-set");
    let dir = tempfile_dir("seeds");
    for (part, name) in signet_fuzz::parts(&set).into_iter().zip([
        "ca-cert.pem",
        "ca-key.pem",
        "cert-chain.pem",
        "root-cert.pem",
    ]) {
        std::fs::write(dir.join(name), part).unwrap();
    }
    let material = signet_ca::keys::cacerts::load_dir(&dir).unwrap().unwrap();
    signet_ca::keys::signer::Signer::new(material, signet_fuzz::now()).unwrap();
    assert!(signet_agent::secrets::federation::parse_map(&read("federation", "map")).is_ok());
    for seed in ["socket-path", "huffman-continuation"] {
        let out = signet_agent::sds::rewrite_client_bytes(&read("sds_authority", seed)).unwrap();
        assert!(out.len() > 24, "{seed}");
    }
    std::fs::remove_dir_all(dir).unwrap();
    let answer = signet_tls::X25519MLKEM768
        .start_and_complete(&read("kx_share", "client-share"))
        .unwrap();
    assert_eq!(answer.pub_key.len(), read("kx_share", "server-share").len());
}

/// Found by the `cacerts` target: a signing certificate whose subject holds an object
/// identifier DER cannot encode made rcgen panic when it signed. It is refused at load
/// with a reason now.
#[test]
fn a_subject_with_an_unencodable_oid_is_refused_at_load() {
    let set = std::fs::read(corpus("cacerts").join("regression-invalid-oid-in-subject")).unwrap();
    let dir = tempfile_dir("oid");
    for (part, name) in signet_fuzz::parts(&set).into_iter().zip([
        "ca-cert.pem",
        "ca-key.pem",
        "cert-chain.pem",
        "root-cert.pem",
    ]) {
        std::fs::write(dir.join(name), part).unwrap();
    }
    let material = signet_ca::keys::cacerts::load_dir(&dir).unwrap().unwrap();
    let err = signet_ca::keys::signer::Signer::new(material, signet_fuzz::now())
        .unwrap_err()
        .to_string();
    assert!(err.contains("attribute type"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

fn tempfile_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("signet-fuzz-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Writes the `sds_authority` seeds: a gRPC client's first bytes on the SDS socket
/// (preface, SETTINGS, a request's HEADERS and a DATA frame), its `:authority` the
/// socket path as Envoy's google_grpc sends it; and the same with Huffman-coded
/// strings and the block split over a CONTINUATION frame.
#[test]
#[ignore]
fn write_sds_authority_seeds() {
    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }
    let fields: [(&[u8], &[u8]); 6] = [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (
            b":path",
            b"/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets",
        ),
        (
            b":authority",
            b"%2Fvar%2Frun%2Fsecrets%2Fworkload-spiffe-uds%2Fsocket",
        ),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
    ];
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let settings = frame(0x4, 0, 0, &[]);
    let data = frame(0x0, 0, 1, &[0, 0, 0, 0, 2, 0x0a, 0x00]);
    let plain = loona_hpack::Encoder::new().encode(fields);
    let mut seed = preface.to_vec();
    seed.extend(&settings);
    seed.extend(frame(0x1, 0x4, 1, &plain));
    seed.extend(&data);
    write_corpus("sds_authority", "socket-path", &seed);
    // Huffman-coded literals (the first byte of a string with its top bit set), the
    // block split in two frames.
    let mut huffman = Vec::new();
    for (name, value) in fields {
        huffman.push(0x00);
        for s in [name, value] {
            let mut coded = Vec::new();
            httlib_huffman::encode(s, &mut coded).unwrap();
            huffman.push(0x80 | coded.len() as u8);
            huffman.extend(coded);
        }
    }
    let (first, second) = huffman.split_at(huffman.len() / 2);
    let mut seed = preface.to_vec();
    seed.extend(&settings);
    seed.extend(frame(0x1, 0, 1, first));
    seed.extend(frame(0x9, 0x4, 1, second));
    seed.extend(&data);
    write_corpus("sds_authority", "huffman-continuation", &seed);
}

/// Writes the `kx_share` seeds: a client's X25519MLKEM768 share and a server's
/// answer to it.
#[test]
#[ignore]
fn write_kx_share_seeds() {
    let client = signet_tls::X25519MLKEM768.start().unwrap();
    let answer = signet_tls::X25519MLKEM768
        .start_and_complete(client.pub_key())
        .unwrap();
    write_corpus("kx_share", "client-share", client.pub_key());
    write_corpus("kx_share", "server-share", &answer.pub_key);
}

fn write_corpus(target: &str, file: &str, bytes: &[u8]) {
    let dir = corpus(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(file), bytes).unwrap();
}

/// Writes the seed corpus: `cargo test -p signet-fuzz -- --ignored write_seeds`.
#[test]
#[ignore]
fn write_seeds() {
    write_sds_authority_seeds();
    write_kx_share_seeds();
    use rcgen::{CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose, SanType};
    let write = |target: &str, file: &str, bytes: &[u8]| {
        let dir = corpus(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(file), bytes).unwrap();
    };
    let join = |parts: &[&[u8]]| parts.join(signet_fuzz::SEPARATOR);
    let openssl = |cmd: &str| {
        let out = std::process::Command::new("bash")
            .arg("-c")
            .arg(cmd)
            .output()
            .unwrap();
        assert!(out.status.success(), "{cmd}");
        out.stdout
    };

    // CSRs.
    let p256 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(
        "spiffe://cluster.local/ns/a/sa/b".try_into().unwrap(),
    )];
    write(
        "csr",
        "p256-san",
        params
            .serialize_request(&p256)
            .unwrap()
            .pem()
            .unwrap()
            .as_bytes(),
    );
    let p384 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    write(
        "csr",
        "p384",
        CertificateParams::default()
            .serialize_request(&p384)
            .unwrap()
            .pem()
            .unwrap()
            .as_bytes(),
    );
    write(
        "csr",
        "rsa2048-openssl",
        &openssl(
            "openssl req -new -newkey rsa:2048 -nodes -keyout /dev/null -subj / -addext subjectAltName=URI:spiffe://cluster.local/ns/a/sa/b 2>/dev/null",
        ),
    );

    // Tokens (signed by keys the target's JWKS does not hold) and a JWKS.
    let header = |h: &str| base64url(h.as_bytes());
    let claims = base64url(br#"{"iss":"https://kubernetes.default.svc","aud":"istio-ca","sub":"system:serviceaccount:a:b","exp":1895000000,"kubernetes.io":{"namespace":"a","serviceaccount":{"name":"b"}}}"#);
    write(
        "jwt",
        "es256-k1",
        format!(
            "{}.{claims}.{}",
            header(r#"{"alg":"ES256","kid":"k1"}"#),
            base64url(&[7; 64])
        )
        .as_bytes(),
    );
    write(
        "jwt",
        "alg-none",
        format!("{}.{claims}.", header(r#"{"alg":"none"}"#)).as_bytes(),
    );
    write(
        "jwt",
        "hs256-k2",
        format!(
            "{}.{claims}.{}",
            header(r#"{"alg":"HS256","kid":"k2"}"#),
            base64url(&[1; 32])
        )
        .as_bytes(),
    );
    write(
        "jwt",
        "rs256-no-kid",
        format!(
            "{}.{claims}.{}",
            header(r#"{"alg":"RS256"}"#),
            base64url(&[3; 256])
        )
        .as_bytes(),
    );
    write("jwt", "jwks", br#"{"keys":[{"kty":"EC","crv":"P-256","kid":"a","x":"AAAA","y":"AAAA"},{"kty":"oct","k":"AAAA"}]}"#);

    // A root, an intermediate, a workload leaf for WORKLOAD_KEY.
    let now = signet_fuzz::now();
    let root_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut root = CertificateParams::default();
    root.distinguished_name = rcgen::DistinguishedName::new();
    root.distinguished_name
        .push(DnType::OrganizationName, "Fuzz Root");
    root.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    root.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    root.not_before = now - time::Duration::days(30);
    root.not_after = now + time::Duration::days(3650);
    let root_cert = root.self_signed(&root_key).unwrap();
    let root_issuer = rcgen::Issuer::from_params(&root, &root_key);
    let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut ca = CertificateParams::default();
    ca.distinguished_name = rcgen::DistinguishedName::new();
    ca.distinguished_name
        .push(DnType::CommonName, "Fuzz Intermediate");
    ca.is_ca = IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca.use_authority_key_identifier_extension = true;
    ca.not_before = now - time::Duration::days(30);
    ca.not_after = now + time::Duration::days(700);
    let ca_cert = ca.signed_by(&ca_key, &root_issuer).unwrap();
    let ca_issuer = rcgen::Issuer::from_params(&ca, &ca_key);
    write(
        "cacerts",
        "p256-istio-set",
        &join(&[
            ca_cert.pem().as_bytes(),
            ca_key.serialize_pem().as_bytes(),
            (ca_cert.pem() + &root_cert.pem()).as_bytes(),
            root_cert.pem().as_bytes(),
        ]),
    );
    let crl = rcgen::CertificateRevocationListParams {
        this_update: now - time::Duration::days(1),
        next_update: now + time::Duration::days(1),
        crl_number: rcgen::SerialNumber::from(1u64),
        issuing_distribution_point: None,
        revoked_certs: vec![rcgen::RevokedCertParams {
            serial_number: rcgen::SerialNumber::from(42u64),
            revocation_time: now - time::Duration::days(1),
            reason_code: None,
            invalidity_date: None,
        }],
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    }
    .signed_by(&ca_issuer)
    .unwrap();
    write(
        "cacerts",
        "p256-istio-set-crl",
        &join(&[
            ca_cert.pem().as_bytes(),
            ca_key.serialize_pem().as_bytes(),
            (ca_cert.pem() + &root_cert.pem()).as_bytes(),
            root_cert.pem().as_bytes(),
            crl.pem().unwrap().as_bytes(),
        ]),
    );
    let sec1 = openssl(&format!(
        "printf '%s' '{}' | openssl ec -outform PEM 2>/dev/null",
        ca_key.serialize_pem()
    ));
    write(
        "cacerts",
        "p256-istio-set-sec1",
        &join(&[
            ca_cert.pem().as_bytes(),
            &sec1,
            (ca_cert.pem() + &root_cert.pem()).as_bytes(),
            root_cert.pem().as_bytes(),
        ]),
    );

    let workload = KeyPair::from_pem(signet_fuzz::WORKLOAD_KEY).unwrap();
    let mut leaf = CertificateParams::default();
    leaf.distinguished_name = rcgen::DistinguishedName::new();
    leaf.subject_alt_names = vec![SanType::URI(signet_fuzz::WORKLOAD_ID.try_into().unwrap())];
    leaf.not_before = now - time::Duration::hours(1);
    leaf.not_after = now + time::Duration::hours(23);
    leaf.use_authority_key_identifier_extension = true;
    let leaf_cert = leaf.signed_by(&workload, &ca_issuer).unwrap();
    write(
        "ca_answer",
        "leaf-intermediate-root",
        &join(&[
            leaf_cert.pem().as_bytes(),
            ca_cert.pem().as_bytes(),
            root_cert.pem().as_bytes(),
        ]),
    );
    write("ca_answer", "leaf-only", leaf_cert.pem().as_bytes());

    // SDS names.
    for (file, name) in [
        ("default", "default"),
        ("rootca", "ROOTCA"),
        ("all", "ALL"),
        ("trust-domain", "spiffe://b.example"),
        (
            "file-cert",
            "file-cert:/etc/certs/cert-chain.pem~/etc/certs/key.pem",
        ),
        ("file-root", "file-root:/etc/certs/root-cert.pem"),
        (
            "file-root-escape",
            "file-root:/etc/certs/../../root/.ssh/id_rsa",
        ),
    ] {
        write("sds_name", file, name.as_bytes());
    }

    // Federated bundles: '0' (even) + JSON, '1' (odd) + PEM, and a map.
    let x5c = base64std(root_cert.der());
    let bundle = format!(
        r#"{{"keys":[{{"use":"x509-svid","kty":"EC","x5c":["{x5c}"]}},{{"use":"jwt-svid","kty":"EC"}}]}}"#
    );
    write("federation", "bundle-json", format!("0{bundle}").as_bytes());
    write(
        "federation",
        "bundle-pem",
        format!("1{}", root_cert.pem()).as_bytes(),
    );
    write(
        "federation",
        "map",
        format!(r#"{{"b.example":{bundle}}}"#).as_bytes(),
    );
}

fn base64url(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn base64std(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}
