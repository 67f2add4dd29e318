//! The `signet-ca` binary: exit code 64 and one clear line for bad flags; a broken
//! cacerts set stops start-up naming the file.

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
fn bad_flags_exit_64_with_one_line() {
    let jwks = ["--jwks", "/nonexistent.json", "--jwt-issuer", "x"];
    for (extra, needle) in [
        (vec!["--default-ttl", "tomorrow"], "--default-ttl"),
        (vec!["--grpc-addr", "localhost"], "--grpc-addr"),
        (vec!["--trust-domain", "bad domain"], "--trust-domain"),
        (vec!["--max-ttl", "1h"], "--max-ttl"),
        (vec!["--no-such-flag"], "--no-such-flag"),
    ] {
        let mut args = vec!["serve"];
        args.extend_from_slice(&jwks);
        args.extend(extra);
        let (code, stderr) = signet_ca(&args);
        assert_eq!(code, 64, "{args:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(stderr.contains(needle), "{stderr}");
    }
    // No way to authenticate tokens at all is a configuration error too.
    let (code, stderr) = signet_ca(&["serve"]);
    assert_eq!(code, 64, "{stderr}");
    assert!(stderr.contains("--kubeconfig"), "{stderr}");
}

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
    std::fs::write(&jwks, r#"{"keys":[{"kty":"EC","crv":"P-256","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}]}"#).unwrap();
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
