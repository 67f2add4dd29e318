//! signet-ca as the signer of Kubernetes pod certificates, against the stateful
//! test API server: what a kubelet would find in the status of its
//! PodCertificateRequests, checked with openssl against the ClusterTrustBundle root.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use base64::Engine;
use serde_json::{Value, json};
use signet_e2e::{
    cluster::{CaProcess, Setup, eventually, free_port},
    metric, sh, uri_sans,
};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

const SIGNER: &str = "signet.dev/pods";
const BUNDLE_OBJECT: &str = "signet.dev:pods:bundle";
const PLURAL: &str = "podcertificaterequests";

/// A PodCertificateRequest named `name` over the key of `stub`: by default in
/// `apps`, from service account `web`, for [`SIGNER`], lasting an hour, without
/// annotations; a test changes what it is about.
fn pcr(name: &str, stub: &[u8]) -> Pcr {
    Pcr {
        ns: "apps".into(),
        name: name.into(),
        sa: "web".into(),
        signer: SIGNER.into(),
        stub: stub.to_vec(),
        max_secs: 3600,
        annotations: json!({}),
    }
}

/// The parts of a PodCertificateRequest the tests vary.
struct Pcr {
    ns: String,
    name: String,
    sa: String,
    signer: String,
    stub: Vec<u8>,
    max_secs: i64,
    annotations: Value,
}

impl Pcr {
    fn ns(mut self, ns: &str) -> Self {
        self.ns = ns.into();
        self
    }

    fn sa(mut self, sa: &str) -> Self {
        self.sa = sa.into();
        self
    }

    fn signer(mut self, signer: &str) -> Self {
        self.signer = signer.into();
        self
    }

    fn max_secs(mut self, secs: i64) -> Self {
        self.max_secs = secs;
        self
    }

    fn annotations(mut self, annotations: Value) -> Self {
        self.annotations = annotations;
        self
    }

    /// The object, its pod fields naming `<name>-pod` on node-a.
    fn json(self) -> Value {
        let Self {
            ns,
            name,
            sa,
            signer,
            stub,
            max_secs,
            annotations,
        } = self;
        json!({
            "metadata": {"namespace": ns, "name": name},
            "spec": {
                "signerName": signer, "podName": format!("{name}-pod"), "podUID": "pod-uid",
                "serviceAccountName": sa, "serviceAccountUID": "sa-uid",
                "nodeName": "node-a", "nodeUID": "node-uid",
                "maxExpirationSeconds": max_secs,
                "stubPKCS10Request": base64::engine::general_purpose::STANDARD.encode(stub),
                "unverifiedUserAnnotations": annotations,
            },
        })
    }
}

fn stub(alg: &'static rcgen::SignatureAlgorithm) -> Vec<u8> {
    let key = rcgen::KeyPair::generate_for(alg).unwrap();
    rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .der()
        .to_vec()
}

fn rsa_stub(bits: u32, dir: &std::path::Path) -> Vec<u8> {
    sh(
        &format!(
            "openssl req -new -newkey rsa:{bits} -nodes -keyout k.pem -subj /CN=pod -outform DER -out r.der 2>/dev/null"
        ),
        dir,
    );
    std::fs::read(dir.join("r.der")).unwrap()
}

fn time(v: &Value) -> OffsetDateTime {
    OffsetDateTime::parse(v.as_str().unwrap(), &Rfc3339).unwrap()
}

fn condition(pcr: &Value) -> Option<(String, String, String)> {
    let c = pcr["status"]["conditions"].as_array()?.first()?;
    Some((
        c["type"].as_str()?.to_owned(),
        c["reason"].as_str()?.to_owned(),
        c["message"].as_str()?.to_owned(),
    ))
}

#[tokio::test]
async fn issued_requests_chain_to_the_trust_bundle_and_last_as_asked() {
    let setup = Setup::new(&["apps"]).await;
    let api = &setup.api;
    let work = setup.dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    // Created while no CA runs.
    api.put_bound_request(
        PLURAL,
        pcr("p256", &stub(&rcgen::PKCS_ECDSA_P256_SHA256))
            .max_secs(7200)
            .json(),
    );
    api.put_bound_request(
        PLURAL,
        pcr("rsa3072", &rsa_stub(3072, &work))
            .max_secs(86400)
            .json(),
    );
    // As Kubernetes 1.35 sends it: the public key, no PKCS#10 stub.
    let mut old_style = pcr("pkix", b"").max_secs(7200).json();
    let spec = old_style["spec"].as_object_mut().unwrap();
    spec.remove("stubPKCS10Request");
    let key = rcgen::KeyPair::generate().unwrap();
    let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
    spec.insert(
        "pkixPublicKey".into(),
        json!(base64::engine::general_purpose::STANDARD.encode(spki)),
    );
    spec.insert("proofOfPossession".into(), json!("c2lnbmF0dXJl"));
    api.put_bound_request(PLURAL, old_style);
    let ca = setup.ca(&["--pod-certificate-signer", SIGNER]).await;
    // And one while it runs.
    api.put_bound_request(
        PLURAL,
        pcr("later", &stub(&rcgen::PKCS_ECDSA_P384_SHA384))
            .sa("db")
            .json(),
    );

    let answered = |name: &str| {
        api.get(PLURAL, "apps", name)
            .filter(|p| condition(p).is_some())
    };
    // Bounds generous for a loaded machine; they cost nothing when it is fast.
    for name in ["p256", "rsa3072", "later", "pkix"] {
        eventually(Duration::from_secs(60), name, async || answered(name)).await;
    }
    let bundle = eventually(Duration::from_secs(60), "trust bundle", async || {
        api.get("clustertrustbundles", "", BUNDLE_OBJECT)
    })
    .await;
    let root = bundle["spec"]["trustBundle"].as_str().unwrap();
    assert_eq!(root, setup.root.pem);

    for (name, sa, max) in [
        ("p256", "web", 7200),
        ("rsa3072", "web", 86400),
        ("later", "db", 3600),
        ("pkix", "web", 7200),
    ] {
        let p = api.get(PLURAL, "apps", name).unwrap();
        let (kind, reason, _) = condition(&p).unwrap();
        assert_eq!(
            (kind.as_str(), reason.as_str()),
            ("Issued", "Issued"),
            "{name}: {p}"
        );
        let chain = p["status"]["certificateChain"].as_str().unwrap();
        assert_eq!(
            chain.matches("BEGIN CERTIFICATE").count(),
            2,
            "leaf and intermediate, no root"
        );
        std::fs::write(work.join("chain.pem"), chain).unwrap();
        std::fs::write(work.join("root.pem"), root).unwrap();
        let verified = sh(
            "openssl verify -CAfile root.pem -untrusted chain.pem chain.pem",
            &work,
        );
        assert!(verified.contains("chain.pem: OK"), "{name}: {verified}");
        let leaf = chain
            .split_inclusive("-----END CERTIFICATE-----\n")
            .next()
            .unwrap();
        assert_eq!(
            uri_sans(leaf),
            [format!("spiffe://cluster.local/ns/apps/sa/{sa}")]
        );
        let (nb, na) = (
            time(&p["status"]["notBefore"]),
            time(&p["status"]["notAfter"]),
        );
        assert_eq!(
            (na - nb).whole_seconds(),
            max,
            "{name}: lifetime is maxExpirationSeconds"
        );
        let refresh = time(&p["status"]["beginRefreshAt"]);
        let half = nb + (na - nb) / 2_i32;
        assert!(
            (refresh - half).abs() <= (na - nb) / 50_i32,
            "{name}: refresh {refresh} vs half-life {half}"
        );
    }
    // Counted once each, once the status write has been answered (a moment after the
    // API server stored it): polled until the count is in (30 s at most), then exact.
    let metrics = eventually(Duration::from_secs(30), "the answers counted", async || {
        let metrics = ca.metrics().await;
        (answers(&metrics, "issued") >= 4.0).then_some(metrics)
    })
    .await;
    assert_eq!(answers(&metrics, "issued"), 4.0);
    assert_eq!(answers(&metrics, "denied"), 0.0);
    ca.stop().await;
}

/// `signet_ca_pod_certificates_total` for `result` (0 when absent).
fn answers(metrics: &str, result: &str) -> f64 {
    metric(
        metrics,
        &format!("signet_ca_pod_certificates_total{{result=\"{result}\"}}"),
    )
    .unwrap_or(0.0)
}

#[tokio::test]
async fn unusable_requests_are_denied_once_with_the_apis_reasons_and_others_are_left_alone() {
    let setup = Setup::new(&["apps"]).await;
    let api = &setup.api;
    api.put_bound_request(
        PLURAL,
        pcr("ed25519", &stub(&rcgen::PKCS_ED25519))
            .max_secs(86400)
            .json(),
    );
    api.put_bound_request(
        PLURAL,
        pcr("annotated", &stub(&rcgen::PKCS_ECDSA_P256_SHA256))
            .max_secs(86400)
            .annotations(json!({"example.com/wish": "x"}))
            .json(),
    );
    api.put_bound_request(
        PLURAL,
        pcr("elsewhere", &stub(&rcgen::PKCS_ECDSA_P256_SHA256))
            .signer("other.example/signer")
            .max_secs(86400)
            .json(),
    );
    let ca = setup.ca(&["--pod-certificate-signer", SIGNER]).await;
    let answered = |name: &str| {
        api.get(PLURAL, "apps", name)
            .filter(|p| condition(p).is_some())
    };
    for name in ["ed25519", "annotated"] {
        eventually(Duration::from_secs(60), name, async || answered(name)).await;
    }
    let (kind, reason, message) = condition(&api.get(PLURAL, "apps", "ed25519").unwrap()).unwrap();
    assert_eq!(
        (kind.as_str(), reason.as_str()),
        ("Denied", "UnsupportedKeyType")
    );
    assert!(message.contains("ECDSAP256"), "{message}");
    let (kind, reason, message) =
        condition(&api.get(PLURAL, "apps", "annotated").unwrap()).unwrap();
    assert_eq!(
        (kind.as_str(), reason.as_str()),
        ("Denied", "UnknownAnnotations")
    );
    assert!(message.contains("example.com/wish"), "{message}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        api.get(PLURAL, "apps", "elsewhere").unwrap()["status"].is_null(),
        "another signer's request"
    );
    let metrics = eventually(Duration::from_secs(30), "the answers counted", async || {
        let metrics = ca.metrics().await;
        (answers(&metrics, "denied") >= 2.0).then_some(metrics)
    })
    .await;
    assert_eq!(answers(&metrics, "denied"), 2.0);
    assert_eq!(answers(&metrics, "issued"), 0.0);
    ca.stop().await;
}

#[tokio::test]
async fn policy_excludes_namespaces_and_service_accounts() {
    let setup = Setup::new(&["apps", "secret"]).await;
    let api = &setup.api;
    let key = stub(&rcgen::PKCS_ECDSA_P256_SHA256);
    for (ns, name, sa) in [
        ("apps", "web", "web"),
        ("apps", "admin", "admin"),
        ("secret", "x", "x"),
    ] {
        api.put_bound_request(PLURAL, pcr(name, &key).ns(ns).sa(sa).json());
    }
    let ca = setup
        .ca(&[
            "--pod-certificate-signer",
            SIGNER,
            "--pod-certificate-allow",
            "apps",
            "--pod-certificate-deny",
            "apps/admin",
        ])
        .await;
    for (ns, name, want) in [
        ("apps", "web", "Issued"),
        ("apps", "admin", "Denied"),
        ("secret", "x", "Denied"),
    ] {
        let p = eventually(Duration::from_secs(60), name, async || {
            api.get(PLURAL, ns, name).filter(|p| condition(p).is_some())
        })
        .await;
        assert_eq!(condition(&p).unwrap().0, want, "{ns}/{name}");
    }
    ca.stop().await;
}

/// The attack from the security report: a principal allowed to create
/// PodCertificateRequests in a namespace (not a node, so Kubernetes binds nothing)
/// names another service account of that namespace.
#[tokio::test]
async fn a_request_gets_only_the_identity_of_the_pod_it_names() {
    let setup = Setup::new(&["apps"]).await;
    let api = &setup.api;
    let key = stub(&rcgen::PKCS_ECDSA_P256_SHA256);
    api.service_account("apps", "admin", "sa-uid");
    // A pod that runs as `web`, asked for as `admin`.
    api.pod("apps", "impostor-pod", "pod-uid", "web", "node-a");
    api.put(PLURAL, pcr("impostor", &key).sa("admin").json());
    // A pod that does not exist.
    api.put(PLURAL, pcr("ghost", &key).sa("admin").json());
    // A pod that has finished, and one on another node than the request says.
    api.put_bound_request(PLURAL, pcr("done", &key).sa("admin").json());
    let mut done = api.get("pods", "apps", "done-pod").unwrap();
    done["status"]["phase"] = json!("Succeeded");
    api.put("pods", done);
    api.put_bound_request(PLURAL, pcr("moved", &key).sa("admin").json());
    api.pod("apps", "moved-pod", "pod-uid", "admin", "node-b");
    // The real pod of `admin` still gets its certificate.
    api.put_bound_request(PLURAL, pcr("real", &key).sa("admin").json());
    let ca = setup.ca(&["--pod-certificate-signer", SIGNER]).await;
    for (name, want, why) in [
        ("impostor", "Denied", "runs as service account \"web\""),
        ("ghost", "Denied", "does not exist"),
        ("done", "Denied", "finished"),
        ("moved", "Denied", "node-b"),
        ("real", "Issued", ""),
    ] {
        let p = eventually(Duration::from_secs(60), name, async || {
            api.get(PLURAL, "apps", name)
                .filter(|p| condition(p).is_some())
        })
        .await;
        let (kind, reason, message) = condition(&p).unwrap();
        assert_eq!(kind, want, "{name}: {reason} {message}");
        if want == "Denied" {
            assert_eq!(reason, "PodNotBound", "{name}");
            assert!(message.contains(why), "{name}: {message}");
        }
    }
    ca.stop().await;
}

// Several threads: the test waits on child processes while the API server, in this
// runtime, must keep answering them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_answer_each_request_exactly_once() {
    let setup = Setup::new(&["apps"]).await;
    let api = &setup.api;
    let key = stub(&rcgen::PKCS_ECDSA_P256_SHA256);
    let n = 20;
    for i in 0..n {
        api.put_bound_request(PLURAL, pcr(&format!("p{i}"), &key).json());
    }
    let args = setup.args(&["--pod-certificate-signer", SIGNER]);
    let _a = CaProcess::start(&args, free_port(), "replica-a");
    let _b = CaProcess::start(&args, free_port(), "replica-b");
    // Two processes start, elect, and answer: 90 s at most, for a loaded machine.
    eventually(Duration::from_secs(90), "all answered", async || {
        (0..n)
            .all(|i| {
                api.get(PLURAL, "apps", &format!("p{i}"))
                    .is_some_and(|p| condition(&p).is_some())
            })
            .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    // One status write each: no second answer was even tried.
    assert_eq!(api.calls(&format!("PUT {PLURAL}")), n);
}

#[tokio::test]
async fn a_request_made_while_the_ca_was_down_is_answered_when_it_is_back() {
    let setup = Setup::new(&["apps"]).await;
    let api = &setup.api;
    let key = stub(&rcgen::PKCS_ECDSA_P256_SHA256);
    let answered = |name: &'static str| {
        move || {
            api.get(PLURAL, "apps", name)
                .and_then(|p| condition(&p))
                .map(|c| c.0)
        }
    };
    let ca = setup.ca(&["--pod-certificate-signer", SIGNER]).await;
    api.put_bound_request(PLURAL, pcr("before", &key).json());
    let before = answered("before");
    let got = eventually(Duration::from_secs(60), "answered", async || before()).await;
    assert_eq!(got, "Issued");
    ca.stop().await;
    // Made while no CA runs: nobody answers it.
    api.put_bound_request(PLURAL, pcr("while-down", &key).json());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(answered("while-down")().is_none());
    let ca = setup.ca(&["--pod-certificate-signer", SIGNER]).await;
    let while_down = answered("while-down");
    let got = eventually(Duration::from_secs(60), "answered", async || while_down()).await;
    assert_eq!(got, "Issued");
    // The request answered before the restart was not answered again.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(api.calls(&format!("PUT {PLURAL}")), 2);
    ca.stop().await;
}

/// The test API server refuses what kube-apiserver refuses, so the tests above would
/// catch an answer a real cluster rejects.
#[test]
fn the_test_api_server_checks_answers_as_kube_apiserver_does() {
    use signet_e2e::kube::pod_certificate_status as check;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let stub_der = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .der()
        .to_vec();
    let request = pcr("p", &stub_der).max_secs(7200).json();
    let spec = &request["spec"];
    let nb = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap() - time::Duration::minutes(2);
    let leaf = |key: &rcgen::KeyPair, hours: i64| {
        let mut params = rcgen::CertificateParams::default();
        params.not_before = nb;
        params.not_after = nb + time::Duration::hours(hours);
        params.self_signed(key).unwrap().pem()
    };
    let rfc = |t: OffsetDateTime| t.format(&Rfc3339).unwrap();
    let issued = |chain: String, hours: i64, refresh: OffsetDateTime| {
        json!({
            "certificateChain": chain,
            "notBefore": rfc(nb), "notAfter": rfc(nb + time::Duration::hours(hours)),
            "beginRefreshAt": rfc(refresh),
            "conditions": [{"type": "Issued", "status": "True", "reason": "Issued",
                            "message": "ok", "lastTransitionTime": rfc(nb)}],
        })
    };
    let half = nb + time::Duration::hours(1);
    check(spec, &issued(leaf(&key, 2), 2, half)).unwrap();
    let denied = json!({"conditions": [{"type": "Denied", "status": "True",
        "reason": "UnsupportedKeyType", "message": "no", "lastTransitionTime": rfc(nb)}]});
    check(spec, &denied).unwrap();

    let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut bad: Vec<(&str, Value)> = vec![
        ("another key", issued(leaf(&other, 2), 2, half)),
        ("over maxExpirationSeconds", issued(leaf(&key, 3), 3, half)),
        (
            "refresh too early",
            issued(leaf(&key, 2), 2, nb + time::Duration::minutes(5)),
        ),
        ("not a certificate", issued("garbage".into(), 2, half)),
    ];
    let mut times = issued(leaf(&key, 2), 2, half);
    times["notAfter"] = json!(rfc(nb + time::Duration::minutes(90)));
    bad.push(("times not the leaf's", times));
    let mut two = issued(leaf(&key, 2), 2, half);
    two["conditions"] = json!([denied["conditions"][0], two["conditions"][0]]);
    bad.push(("two conditions", two));
    let mut chained = denied.clone();
    chained["certificateChain"] = json!(leaf(&key, 2));
    bad.push(("a refusal with a chain", chained));
    let mut reason = denied.clone();
    reason["conditions"][0]["reason"] = json!("not a reason!");
    bad.push(("bad reason", reason));
    let mut no_time = denied;
    no_time["conditions"][0]
        .as_object_mut()
        .unwrap()
        .remove("lastTransitionTime");
    bad.push(("no transition time", no_time));
    for (what, status) in bad {
        assert!(check(spec, &status).is_err(), "{what} accepted");
    }
}
