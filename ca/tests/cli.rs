//! The `signet-ca` binary: exit code 64 and clap's whole message for bad flags;
//! `--check-config` finding what start-up would; a broken cacerts set stops start-up
//! naming the file; a fatal error said once.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

fn signet_ca(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_signet-ca"))
        .args(args)
        .env_remove("KUBECONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_flags_exit_64_with_claps_whole_message() {
    let jwks = ["--jwks", "/nonexistent.json", "--jwt-issuer", "x"];
    for (extra, needles) in [
        (
            vec!["--default-ttl", "tomorrow"],
            vec!["--default-ttl", "like 24h", "try '--help'"],
        ),
        (
            vec!["--grpc-addr", "localhost"],
            vec!["--grpc-addr", "try '--help'"],
        ),
        (vec!["--max-ttl", "1h"], vec!["--max-ttl"]),
        (vec!["--no-such-flag"], vec!["--no-such-flag", "Usage:"]),
        // The similar flag, and the accepted values.
        (
            vec!["--default-tll", "1h"],
            vec!["a similar argument exists: '--default-ttl'"],
        ),
        (vec!["--log-format", "xml"], vec!["text or json"]),
    ] {
        let mut args = vec!["serve"];
        args.extend_from_slice(&jwks);
        args.extend(extra);
        let (code, stderr) = signet_ca(&args);
        assert_eq!(code, 64, "{args:?}: {stderr}");
        for needle in needles {
            assert!(
                stderr.contains(needle),
                "{args:?}: {needle:?} not in {stderr}"
            );
        }
    }
    // No way to authenticate tokens at all is a configuration error too.
    let (code, stderr) = signet_ca(&["serve"]);
    assert_eq!(code, 64, "{stderr}");
    assert!(stderr.contains("--kubeconfig"), "{stderr}");
}

#[test]
fn a_trust_domain_written_as_something_else_says_what_is_wrong() {
    for (domain, says) in [
        ("spiffe://cluster.local", "without a scheme"),
        ("cluster.local/ns/default", "no path"),
        ("Cluster.Local", "lower case"),
        ("cluster.local:8080", "no port"),
    ] {
        let (code, stderr) = signet_ca(&[
            "serve",
            "--jwks",
            "/x.json",
            "--jwt-issuer",
            "x",
            "--trust-domain",
            domain,
        ]);
        assert_eq!(code, 64, "{domain}: {stderr}");
        assert!(stderr.contains("--trust-domain"), "{stderr}");
        assert!(stderr.contains(says), "{domain}: {says:?} not in {stderr}");
    }
}

#[test]
fn check_config_fails_for_what_serve_would_fail_on_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let d = |name: &str| dir.path().join(name).display().to_string();
    let jwks = d("jwks.json");
    std::fs::write(&jwks, JWKS).unwrap();
    let base = ["serve", "--check-config", "--jwt-issuer", "x"];
    let run = |extra: &[&str]| {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        signet_ca(&args)
    };
    let cacerts = d("no-cacerts");
    let state = d("state");
    let (code, out) = run(&[
        "--jwks",
        &jwks,
        "--cacerts-dir",
        &cacerts,
        "--state-dir",
        &state,
    ]);
    assert_eq!(code, 0, "{out}");
    // Nothing was created: a check writes nothing.
    assert!(!dir.path().join("state").exists());
    for (extra, says) in [
        (
            vec!["--jwks", "/nonexistent/jwks.json"],
            "/nonexistent/jwks.json",
        ),
        (
            vec!["--jwks", &jwks, "--kubeconfig", "/nonexistent/kubeconfig"],
            "/nonexistent/kubeconfig",
        ),
        (
            vec!["--jwks", &jwks, "--require-cacerts"],
            "holds no CA key material",
        ),
    ] {
        let mut all = extra.clone();
        all.extend(["--cacerts-dir", &cacerts, "--state-dir", &state]);
        let (code, stderr) = run(&all);
        assert_eq!(code, 64, "{extra:?}: {stderr}");
        assert!(stderr.contains(says), "{extra:?}: {says:?} not in {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    }
}

#[test]
fn a_fatal_start_error_is_said_once_each_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    let (code, stderr) = signet_ca(&[
        "serve",
        "--jwks",
        "/nonexistent/jwks.json",
        "--jwt-issuer",
        "x",
        "--cacerts-dir",
        dir.path().join("none").to_str().unwrap(),
        "--state-dir",
        dir.path().join("state").to_str().unwrap(),
        "--grpc-addr",
        "127.0.0.1:0",
        "--http-addr",
        "127.0.0.1:0",
    ]);
    assert_eq!(code, 1, "{stderr}");
    assert_eq!(
        stderr.matches("/nonexistent/jwks.json").count(),
        1,
        "{stderr}"
    );
    assert_eq!(stderr.matches("cannot serve").count(), 1, "{stderr}");
    // The missing cacerts directory was named, with the fallback taken.
    assert!(
        stderr.contains("the cacerts directory does not exist"),
        "{stderr}"
    );
}

const JWKS: &str = r#"{"keys":[{"kty":"EC","crv":"P-256","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}]}"#;

#[test]
fn help_explains_flags_and_their_environment() {
    let out = Command::new(env!("CARGO_BIN_EXE_signet-ca"))
        .args(["serve", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--cacerts-dir",
        "ROOT_CA_DIR",
        "--state-dir",
        "SIGNET_STATE_DIR",
        "--trust-domain",
        "TRUST_DOMAIN",
        "--default-ttl",
        "DEFAULT_WORKLOAD_CERT_TTL",
        "--max-ttl",
        "MAX_WORKLOAD_CERT_TTL",
        "--token-audiences",
        "TOKEN_AUDIENCES",
        "--cluster-id",
        "CLUSTER_ID",
        "--kubeconfig",
        "KUBECONFIG",
        "--jwt-issuer",
        "--jwks",
        "--serving-dns-names",
        "--grpc-addr",
        "--http-addr",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
}

#[test]
fn partial_cacerts_set_stops_startup_naming_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca-cert.pem"), "x").unwrap();
    std::fs::write(dir.path().join("ca-key.pem"), "x").unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, JWKS).unwrap();
    let (code, stderr) = signet_ca(&[
        "serve",
        "--cacerts-dir",
        dir.path().to_str().unwrap(),
        "--jwks",
        jwks.to_str().unwrap(),
        "--jwt-issuer",
        "x",
        "--grpc-addr",
        "127.0.0.1:0",
        "--http-addr",
        "127.0.0.1:0",
    ]);
    assert_ne!(code, 0);
    assert!(
        stderr.contains("cert-chain.pem") && stderr.contains("root-cert.pem"),
        "{stderr}"
    );
}
