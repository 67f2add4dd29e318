//! The `signet-agent` binary's command line as a user meets it: the environment
//! variables it reads beside its flags, clap's whole message for a bad value, and a
//! fatal start error said once.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

/// Runs `signet-agent run` with the pod's identity and `env`; (exit code, stderr).
fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_signet-agent"))
        .arg("run")
        .args(["--namespace", "shop", "--service-account", "web"])
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn signet_variables_stand_for_their_flags() {
    for (var, value, flag) in [
        ("SIGNET_KEY_TYPE", "dsa", "--key-type"),
        ("SIGNET_HTTP_ADDR", "everywhere", "--http-addr"),
        (
            "SECRET_GRACE_PERIOD_RATIO_JITTER",
            "0.5",
            "--grace-ratio-jitter",
        ),
    ] {
        let (code, stderr) = run(&[], &[(var, value)]);
        assert_eq!(code, 64, "{var}: {stderr}");
        assert!(stderr.contains(flag), "{var}: {flag} not in {stderr}");
        assert!(stderr.contains(value), "{var}: {stderr}");
    }
    // The accepted values, from clap.
    let (_, stderr) = run(&[], &[("SIGNET_KEY_TYPE", "dsa")]);
    assert!(
        stderr.contains("ec-p256") && stderr.contains("rsa2048"),
        "{stderr}"
    );
    let help = Command::new(env!("CARGO_BIN_EXE_signet-agent"))
        .args(["run", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for var in [
        "SIGNET_TOKEN_FILE",
        "SIGNET_KEY_TYPE",
        "SIGNET_HTTP_ADDR",
        "SECRET_GRACE_PERIOD_RATIO_JITTER",
        "CA_ADDR",
    ] {
        assert!(help.contains(var), "--help lacks {var}");
    }
}

#[test]
fn a_token_file_from_the_environment_is_the_one_read() {
    // SIGNET_TOKEN_FILE names a file that is not there: the agent says so (with that
    // path) while it retries; it is stopped once it has.
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("no-such-token");
    let mut child = Command::new(env!("CARGO_BIN_EXE_signet-agent"))
        .args(["run", "--namespace", "shop", "--service-account", "web"])
        .args(["--ca-addr", "127.0.0.1:9", "--ca-root-cert", "SYSTEM"])
        .args(["--socket", dir.path().join("sock").to_str().unwrap()])
        .args(["--http-addr", "127.0.0.1:0"])
        .env_clear()
        .env("SIGNET_TOKEN_FILE", &token)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        let line = std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .find(|line| line.contains("no-such-token"));
        let _ = tx.send(line);
    });
    // The first attempt names it at once; 30 s is for a loaded machine.
    let line = rx
        .recv_timeout(std::time::Duration::from_secs(30))
        .ok()
        .flatten();
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        line.is_some(),
        "the token path from SIGNET_TOKEN_FILE was never named"
    );
}

#[test]
fn an_http_ca_address_and_file_mounted_certs_are_refused_saying_why() {
    let (code, stderr) = run(&["--ca-addr", "http://istiod:15012"], &[]);
    assert_eq!(code, 64, "{stderr}");
    assert!(
        stderr.contains("plain HTTP") && stderr.contains("--ca-addr"),
        "{stderr}"
    );
    let (code, stderr) = run(&[], &[("FILE_MOUNTED_CERTS", "true")]);
    assert_eq!(code, 64, "{stderr}");
    assert!(stderr.contains("FILE_MOUNTED_CERTS"), "{stderr}");
}

#[test]
fn a_fatal_start_error_is_said_once() {
    let dir = tempfile::tempdir().unwrap();
    // A socket path under a regular file cannot be bound.
    let file = dir.path().join("file");
    std::fs::write(&file, "x").unwrap();
    let socket = file.join("socket");
    let (code, stderr) = run(
        &[
            "--ca-root-cert",
            "SYSTEM",
            "--socket",
            socket.to_str().unwrap(),
            "--http-addr",
            "127.0.0.1:0",
        ],
        &[],
    );
    assert_eq!(code, 1, "{stderr}");
    assert_eq!(stderr.matches("cannot run").count(), 1, "{stderr}");
    assert_eq!(
        stderr.lines().filter(|l| l.contains("ERROR")).count(),
        1,
        "{stderr}"
    );
}
