//! Key material in every form operators bring: the openssl runbook, rcgen-made RSA and
//! EC sets in PKCS#1, SEC1 and PKCS#8, cert-manager's layout; and the broken sets
//! that must stop start-up with an error naming the file.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{fs, path::Path};

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use signet_ca::keys::{cacerts, signer::Signer};
use signet_e2e::{TestRoot, csr, openssl_verify, sh, uri_sans, workspace};
use spiffe::SpiffeId;
use time::{Duration, OffsetDateTime};

fn issue(dir: &Path) -> Vec<String> {
    let now = OffsetDateTime::now_utc();
    let material = cacerts::load_dir(dir).unwrap().expect("a cacerts set");
    let signer = Signer::new(material, now).unwrap();
    let (key, _) = csr(None);
    use rcgen::PublicKeyData;
    let id = SpiffeId::new("spiffe://cluster.local/ns/default/sa/web").unwrap();
    let window = signer.window(Duration::hours(1), now).unwrap();
    signet_e2e::istio_chain(
        signer
            .sign(&key.subject_public_key_info(), &id, &window)
            .unwrap(),
    )
}

fn load_err(dir: &Path) -> String {
    let now = OffsetDateTime::now_utc();
    match cacerts::load_dir(dir) {
        Err(e) => e.to_string(),
        Ok(None) => "no key material".into(),
        Ok(Some(m)) => Signer::new(m, now).unwrap_err().to_string(),
    }
}

/// Converts a PKCS#8 key file to the traditional form (PKCS#1 for RSA, SEC1 for EC).
fn to_traditional(path: &Path) {
    sh(
        &format!(
            "openssl pkey -in {0} -traditional -out {0}.t && mv {0}.t {0}",
            path.display()
        ),
        Path::new("."),
    );
}

#[test]
fn openssl_runbook_set_loads_and_issues_verifiable_chains() {
    let dir = tempfile::tempdir().unwrap();
    sh(
        &format!(
            "{}/scripts/make-cacerts-openssl.sh {} cluster1",
            workspace().display(),
            dir.path().display()
        ),
        Path::new("."),
    );
    let chain = issue(dir.path());
    // [leaf, intermediate, root (from cert-chain.pem), bundle]
    assert_eq!(chain.len(), 4);
    assert_eq!(
        chain.last().unwrap().trim(),
        fs::read_to_string(dir.path().join("root-cert.pem"))
            .unwrap()
            .trim()
    );
    openssl_verify(&chain).unwrap();
    assert_eq!(
        uri_sans(&chain[0]),
        vec!["spiffe://cluster.local/ns/default/sa/web"]
    );
    // RSA CA key: SHA256withRSA.
    let sig = sh(
        &format!(
            "echo '{}' | openssl x509 -noout -text | grep -m1 'Signature Algorithm'",
            chain[0]
        ),
        Path::new("."),
    );
    assert!(sig.contains("sha256WithRSAEncryption"), "{sig}");
}

/// A root and an intermediate made with rcgen, keys in the given algorithms.
fn rcgen_set(dir: &Path, root_key: &KeyPair, ca_key: &KeyPair, pathlen: Option<u8>) {
    let root = TestRoot::new(
        "Example Root",
        KeyPair::from_pem(&root_key.serialize_pem()).unwrap(),
    );
    root.write_cacerts(dir, "Example Intermediate", ca_key, pathlen, &[]);
}

fn openssl_key(spec: &str) -> KeyPair {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k.pem");
    sh(
        &format!("openssl genpkey {spec} -out {}", path.display()),
        Path::new("."),
    );
    KeyPair::from_pem(&fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn rcgen_sets_in_every_key_encoding() {
    let rsa2048 = || openssl_key("-algorithm RSA -pkeyopt rsa_keygen_bits:2048");
    let p256 = || KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let p384 = || KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    let cases: Vec<(&str, KeyPair, KeyPair, bool, &str)> = vec![
        (
            "rsa pkcs8",
            rsa2048(),
            rsa2048(),
            false,
            "sha256WithRSAEncryption",
        ),
        (
            "rsa pkcs1",
            rsa2048(),
            rsa2048(),
            true,
            "sha256WithRSAEncryption",
        ),
        ("p256 pkcs8", p256(), p256(), false, "ecdsa-with-SHA256"),
        ("p256 sec1", p256(), p256(), true, "ecdsa-with-SHA256"),
        ("p384 sec1", p256(), p384(), true, "ecdsa-with-SHA384"),
        (
            "p384 under rsa root",
            rsa2048(),
            p384(),
            false,
            "ecdsa-with-SHA384",
        ),
    ];
    for (name, root_key, ca_key, traditional, sig_alg) in cases {
        let dir = tempfile::tempdir().unwrap();
        rcgen_set(dir.path(), &root_key, &ca_key, Some(0));
        if traditional {
            to_traditional(&dir.path().join("ca-key.pem"));
            let head = fs::read_to_string(dir.path().join("ca-key.pem")).unwrap();
            assert!(
                head.starts_with("-----BEGIN RSA PRIVATE KEY")
                    || head.starts_with("-----BEGIN EC PRIVATE KEY"),
                "{name}: {head}"
            );
        }
        let chain = issue(dir.path());
        openssl_verify(&chain).unwrap_or_else(|e| panic!("{name}: {e}"));
        let text = sh(
            &format!("echo '{}' | openssl x509 -noout -text", chain[0]),
            Path::new("."),
        );
        assert!(text.contains(sig_alg), "{name}: want {sig_alg}");
    }
}

#[test]
fn cert_manager_layout() {
    let dir = tempfile::tempdir().unwrap();
    let root_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    rcgen_set(dir.path(), &root_key, &ca_key, None);
    let d = dir.path();
    fs::rename(d.join("ca-cert.pem"), d.join("tls.crt")).unwrap();
    fs::rename(d.join("ca-key.pem"), d.join("tls.key")).unwrap();
    fs::rename(d.join("root-cert.pem"), d.join("ca.crt")).unwrap();
    fs::remove_file(d.join("cert-chain.pem")).unwrap();
    let chain = issue(d);
    assert_eq!(chain.len(), 4);
    openssl_verify(&chain).unwrap();
}

#[test]
fn broken_sets_name_the_file_and_the_problem() {
    let root_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let fresh = || {
        let dir = tempfile::tempdir().unwrap();
        rcgen_set(dir.path(), &root_key, &ca_key, Some(0));
        dir
    };

    let dir = fresh();
    fs::remove_file(dir.path().join("cert-chain.pem")).unwrap();
    let e = load_err(dir.path());
    assert!(
        e.contains("incomplete") && e.contains("cert-chain.pem"),
        "{e}"
    );

    let dir = fresh();
    let other = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    fs::write(dir.path().join("ca-key.pem"), other.serialize_pem()).unwrap();
    let e = load_err(dir.path());
    assert!(
        e.contains("ca-cert.pem") && e.contains("does not match"),
        "{e}"
    );

    let dir = fresh();
    fs::write(
        dir.path().join("ca-key.pem"),
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("ca-key.pem"), "{e}");

    let dir = fresh();
    fs::write(dir.path().join("ca-cert.pem"), "garbage").unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("ca-cert.pem"), "{e}");

    // A root bundle that does not hold the chain's root.
    let dir = fresh();
    let stranger = tempfile::tempdir().unwrap();
    let k1 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let k2 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    rcgen_set(stranger.path(), &k1, &k2, None);
    fs::copy(
        stranger.path().join("root-cert.pem"),
        dir.path().join("root-cert.pem"),
    )
    .unwrap();
    let e = load_err(dir.path());
    assert!(
        e.contains("root-cert.pem") && e.contains("does not verify"),
        "{e}"
    );

    // A signing certificate that is not a CA.
    let dir = tempfile::tempdir().unwrap();
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut leaf = CertificateParams::new(vec!["not-a-ca".into()]).unwrap();
    leaf.is_ca = IsCa::ExplicitNoCa;
    let cert = leaf.self_signed(&key).unwrap();
    for f in ["ca-cert.pem", "cert-chain.pem", "root-cert.pem"] {
        fs::write(dir.path().join(f), cert.pem()).unwrap();
    }
    fs::write(dir.path().join("ca-key.pem"), key.serialize_pem()).unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("not a CA"), "{e}");

    // An expired intermediate.
    let dir = tempfile::tempdir().unwrap();
    let now = OffsetDateTime::now_utc();
    let mut root = CertificateParams::default();
    root.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let root_cert = root.self_signed(&root_key).unwrap();
    let issuer = rcgen::Issuer::new(root, &root_key);
    let mut ca = CertificateParams::default();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.not_before = now - Duration::days(30);
    ca.not_after = now - Duration::days(1);
    let ca_cert = ca.signed_by(&ca_key, &issuer).unwrap();
    fs::write(dir.path().join("ca-cert.pem"), ca_cert.pem()).unwrap();
    fs::write(dir.path().join("ca-key.pem"), ca_key.serialize_pem()).unwrap();
    fs::write(
        dir.path().join("cert-chain.pem"),
        ca_cert.pem() + &root_cert.pem(),
    )
    .unwrap();
    fs::write(dir.path().join("root-cert.pem"), root_cert.pem()).unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("expired"), "{e}");
}

#[test]
fn rsa_1024_ca_key_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    sh(
        &format!(
            "openssl genrsa -traditional -out {}/ca-key.pem 1024",
            dir.path().display()
        ),
        Path::new("."),
    );
    let e = signet_ca::keys::load_signing_key(&fs::read(dir.path().join("ca-key.pem")).unwrap())
        .unwrap_err();
    assert!(e.to_string().contains("RSA-1024"), "{e}");
}

#[test]
fn self_signed_root_is_created_once_and_reused() {
    let dir = tempfile::tempdir().unwrap();
    let now = OffsetDateTime::now_utc();
    let a = cacerts::load_or_create_self_signed(dir.path(), "example.org", now).unwrap();
    let b = cacerts::load_or_create_self_signed(dir.path(), "example.org", now).unwrap();
    assert_eq!(a.signing_cert, b.signing_cert);
    let pem = fs::read_to_string(dir.path().join("root-cert.pem")).unwrap();
    let text = sh(
        &format!("echo '{pem}' | openssl x509 -noout -subject -enddate -text"),
        Path::new("."),
    );
    assert!(text.contains("subject=O = example.org\n"), "{text}");
    assert!(
        text.contains("prime256v1") || text.contains("P-256"),
        "{text}"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(dir.path().join("root-key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let signer = Signer::new(a, now).unwrap();
    let years = (signer.signing_not_after() - now).whole_days();
    assert!((3649..=3651).contains(&years), "{years}");
}
