//! `signet-ca pki`: the tooling's output loads in `serve`, passes `openssl verify`,
//! sibling intermediates share one root, and `pki inspect` catches broken sets.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{fs, path::Path};

use clap::Parser;
use signet_ca::cli::{
    config::{Cli, Command},
    pki,
};
use signet_e2e::sh;
use time::OffsetDateTime;

fn pki_run(args: &[&str]) -> Result<String, String> {
    let mut full = vec!["signet-ca", "pki"];
    full.extend_from_slice(args);
    let Command::Pki(command) = Cli::try_parse_from(full)
        .map_err(|e| e.to_string())?
        .command
    else {
        unreachable!()
    };
    pki::run(command, OffsetDateTime::now_utc()).map_err(|e| e.to_string())
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn root_and_sibling_intermediates_make_a_shared_trust() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("root");
    pki_run(&["root", "--out", p(&root)]).unwrap();
    let key = fs::read_to_string(root.join("root-key.pem")).unwrap();
    assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        fs::metadata(root.join("root-key.pem"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    let text = sh(
        &format!(
            "openssl x509 -in {} -noout -text",
            root.join("root-cert.pem").display()
        ),
        d.path(),
    );
    assert!(text.contains("Public-Key: (4096 bit)"), "{text}");
    // Existing keys are never overwritten without --force.
    let err = pki_run(&["root", "--out", p(&root)]).unwrap_err();
    assert!(err.contains("--force"), "{err}");
    assert_eq!(fs::read_to_string(root.join("root-key.pem")).unwrap(), key);

    for cluster in ["east", "west"] {
        let out = d.path().join(cluster);
        pki_run(&[
            "intermediate",
            "--root",
            p(&root),
            "--cluster",
            cluster,
            "--out",
            p(&out),
            "--key-type",
            "ec-p256",
        ])
        .unwrap();
        sh(
            &format!(
                "openssl verify -CAfile {0}/root-cert.pem {0}/ca-cert.pem",
                out.display()
            ),
            d.path(),
        );
        let text = sh(
            &format!(
                "openssl x509 -in {}/ca-cert.pem -noout -text",
                out.display()
            ),
            d.path(),
        );
        assert!(text.contains("CA:TRUE, pathlen:0"), "{text}");
        assert!(text.contains("Certificate Sign, CRL Sign"), "{text}");
        assert!(text.contains(&format!("L = {cluster}")), "{text}");
        assert!(text.contains("DNS:istiod.istio-system.svc"), "{text}");
        let report = pki_run(&["inspect", p(&out)]).unwrap();
        assert!(report.contains("no warnings"), "{report}");
        assert!(!report.contains("PRIVATE KEY"));
    }
    // Each cluster's leaf verifies against the other cluster's bundle.
    let now = OffsetDateTime::now_utc();
    let east = signet_ca::keys::signer::Signer::new(
        signet_ca::keys::cacerts::load_dir(&d.path().join("east"))
            .unwrap()
            .unwrap(),
        now,
    )
    .unwrap();
    let (leaf_key, _) = signet_e2e::csr(None);
    use rcgen::PublicKeyData;
    let id = spiffe::SpiffeId::new("spiffe://cluster.local/ns/a/sa/b").unwrap();
    let window = east.window(time::Duration::hours(1), now).unwrap();
    let issued = east
        .sign(&leaf_key.subject_public_key_info(), &id, &window)
        .unwrap();
    let mut chain = signet_e2e::istio_chain(issued);
    let last = chain.len() - 1;
    chain[last] = fs::read_to_string(d.path().join("west/root-cert.pem")).unwrap();
    signet_e2e::openssl_verify(&chain).unwrap();

    let bundle = d.path().join("bundle.pem");
    let other = d.path().join("other");
    pki_run(&["root", "--out", p(&other), "--key-type", "ec-p256"]).unwrap();
    let report = pki_run(&[
        "bundle",
        "--out",
        p(&bundle),
        p(&root.join("root-cert.pem")),
        p(&d.path().join("east/root-cert.pem")),
        p(&other.join("root-cert.pem")),
    ])
    .unwrap();
    assert!(report.contains("2 root(s)"), "{report}");
}

#[test]
fn inspect_catches_broken_sets() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("root");
    pki_run(&["root", "--out", p(&root), "--key-type", "ec-p256"]).unwrap();
    let make = |name: &str, extra: &[&str]| {
        let out = d.path().join(name);
        let mut args = vec![
            "intermediate",
            "--root",
            p(&root),
            "--cluster",
            name,
            "--out",
            p(&out),
            "--key-type",
            "ec-p256",
        ];
        args.extend_from_slice(extra);
        pki_run(&args).unwrap();
        out
    };

    // Wrong key.
    let a = make("a", &[]);
    let b = make("b", &[]);
    fs::copy(b.join("ca-key.pem"), a.join("ca-key.pem")).unwrap();
    let e = pki_run(&["inspect", p(&a)]).unwrap_err();
    assert!(e.contains("does not match"), "{e}");

    // Root bundle without the chain's root.
    let c = make("c", &[]);
    let stranger = d.path().join("stranger");
    pki_run(&["root", "--out", p(&stranger), "--key-type", "ec-p256"]).unwrap();
    fs::copy(stranger.join("root-cert.pem"), c.join("root-cert.pem")).unwrap();
    let e = pki_run(&["inspect", p(&c)]).unwrap_err();
    assert!(
        e.contains("root-cert.pem") && e.contains("does not verify"),
        "{e}"
    );

    // An intermediate close to expiry: loads, with a warning.
    let soon = make("soon", &["--days", "10"]);
    let report = pki_run(&["inspect", p(&soon)]).unwrap();
    assert!(
        report.contains("warning: the intermediate expires in"),
        "{report}"
    );
    let report = pki_run(&["inspect", p(&soon), "--leaf-ttl", "2160h"]).unwrap();
    assert!(report.contains("would be cut short"), "{report}");

    // Pathlen violation: a CA under the pathlen:0 intermediate used as signing cert.
    let parent = make("parent", &[]);
    let sub = d.path().join("sub");
    fs::create_dir_all(&sub).unwrap();
    let parent_key =
        rcgen::KeyPair::from_pem(&fs::read_to_string(parent.join("ca-key.pem")).unwrap()).unwrap();
    let parent_der = ::pem::parse(fs::read_to_string(parent.join("ca-cert.pem")).unwrap())
        .unwrap()
        .into_contents();
    let issuer = rcgen::Issuer::from_ca_cert_der(&parent_der.into(), parent_key).unwrap();
    let sub_key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    let sub_cert = params.signed_by(&sub_key, &issuer).unwrap();
    fs::write(sub.join("ca-cert.pem"), sub_cert.pem()).unwrap();
    fs::write(sub.join("ca-key.pem"), sub_key.serialize_pem()).unwrap();
    fs::write(
        sub.join("cert-chain.pem"),
        sub_cert.pem() + &fs::read_to_string(parent.join("cert-chain.pem")).unwrap(),
    )
    .unwrap();
    fs::copy(parent.join("root-cert.pem"), sub.join("root-cert.pem")).unwrap();
    let e = pki_run(&["inspect", p(&sub)]).unwrap_err();
    assert!(e.contains("pathlen"), "{e}");
}

#[test]
fn inspect_warns_before_the_old_root_is_dropped_too_early() {
    let d = tempfile::tempdir().unwrap();
    let (old_root, new_root) = (d.path().join("old-root"), d.path().join("new-root"));
    pki_run(&["root", "--out", p(&old_root), "--key-type", "ec-p256"]).unwrap();
    pki_run(&["root", "--out", p(&new_root), "--key-type", "ec-p256"]).unwrap();
    let in_use = d.path().join("in-use");
    pki_run(&[
        "intermediate",
        "--root",
        p(&old_root),
        "--cluster",
        "east",
        "--out",
        p(&in_use),
        "--key-type",
        "ec-p256",
    ])
    .unwrap();
    let next = d.path().join("next");
    pki_run(&[
        "intermediate",
        "--root",
        p(&new_root),
        "--cluster",
        "east",
        "--out",
        p(&next),
        "--key-type",
        "ec-p256",
    ])
    .unwrap();
    // Jumping straight from the old set to a new-root-only set: warned.
    let report = pki_run(&["inspect", p(&next), "--previous", p(&in_use)]).unwrap();
    assert!(
        report.contains("the root the set in use signs under"),
        "{report}"
    );
    // With both roots bundled (step 2/3) nothing is dropped.
    let bundle = d.path().join("next/root-cert.pem");
    let both = fs::read_to_string(old_root.join("root-cert.pem")).unwrap()
        + &fs::read_to_string(new_root.join("root-cert.pem")).unwrap();
    fs::write(&bundle, both).unwrap();
    let report = pki_run(&[
        "inspect",
        p(&next),
        "--previous",
        p(&in_use),
        "--leaf-ttl",
        "12h",
    ])
    .unwrap();
    assert!(!report.contains("drops"), "{report}");
    // Step 3 switches roots: the report says how long to wait before step 4, from the
    // lifetime the operator says workloads hold.
    assert!(report.contains("wait 12h"), "{report}");
    // The two intermediates share a name; their key identifiers tell them apart.
    let key_id = |r: &str| {
        r.lines()
            .find_map(|l| l.trim().strip_prefix("key id "))
            .unwrap()
            .to_owned()
    };
    let old_report = pki_run(&["inspect", p(&in_use)]).unwrap();
    assert_ne!(key_id(&report), key_id(&old_report));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tooling_output_serves_and_an_expired_intermediate_is_caught() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("root");
    pki_run(&["root", "--out", p(&root), "--key-type", "ec-p384"]).unwrap();
    let east = d.path().join("east");
    pki_run(&[
        "intermediate",
        "--root",
        p(&root),
        "--cluster",
        "east",
        "--out",
        p(&east),
        "--key-type",
        "ec-p256",
    ])
    .unwrap();
    // The set serves as it is.
    let jwt = signet_e2e::JwtIssuer::new("k");
    let ca = signet_e2e::TestCa::start(&[
        "--cacerts-dir".into(),
        p(&east).into(),
        // The CA keeps its rotation record there: not in the working directory.
        "--state-dir".into(),
        d.path().join("state").display().to_string(),
        "--jwks".into(),
        jwt.write_jwks(d.path()).display().to_string(),
        "--jwt-issuer".into(),
        signet_e2e::ISSUER.into(),
    ])
    .await;
    let roots = fs::read_to_string(east.join("root-cert.pem")).unwrap();
    let mut client = ca.client(&roots).await;
    let (_, csr) = signet_e2e::csr(None);
    let chain = client
        .create_certificate(signet_e2e::request(&csr, Some(&jwt.token("ns", "sa")), 0))
        .await
        .unwrap()
        .into_inner()
        .cert_chain;
    signet_e2e::openssl_verify(&chain).unwrap();
    ca.stop().await;

    // An expired intermediate under the same root: inspect fails, naming it.
    let expired = d.path().join("expired");
    fs::create_dir_all(&expired).unwrap();
    let root_key =
        rcgen::KeyPair::from_pem(&fs::read_to_string(root.join("root-key.pem")).unwrap()).unwrap();
    let root_der = ::pem::parse(fs::read_to_string(root.join("root-cert.pem")).unwrap())
        .unwrap()
        .into_contents();
    let issuer = rcgen::Issuer::from_ca_cert_der(&root_der.into(), root_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(60);
    params.not_after = now - time::Duration::days(1);
    let cert = params.signed_by(&key, &issuer).unwrap();
    fs::write(expired.join("ca-cert.pem"), cert.pem()).unwrap();
    fs::write(expired.join("ca-key.pem"), key.serialize_pem()).unwrap();
    fs::write(expired.join("cert-chain.pem"), cert.pem() + &roots).unwrap();
    fs::write(expired.join("root-cert.pem"), &roots).unwrap();
    let e = pki_run(&["inspect", p(&expired)]).unwrap_err();
    assert!(e.contains("ca-cert.pem") && e.contains("expired"), "{e}");
}
