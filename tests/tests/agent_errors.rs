//! The errors an operator meets with signet-agent: a missing or empty token (not
//! ready, then recovery), and socket paths that cannot work.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use signet_e2e::{
    TestCa,
    agent::{AgentSetup, TestAgent},
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_token_is_a_clear_error_and_the_agent_recovers() {
    let s = AgentSetup::new();
    let ca = TestCa::start(&s.ca_args()).await;
    let mut args = s.agent_args(&ca, "shop", "cart", &[]);
    let token = s.token_file("cart");
    std::fs::remove_file(&token).unwrap();
    args.extend([
        "--output-certs".to_string(),
        s.dir.path().join("out").display().to_string(),
    ]);
    let agent = TestAgent::start(&args).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(agent.ready_status().await, 503, "ready without a token");
    // An empty token is no better.
    std::fs::write(&token, "").unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(agent.ready_status().await, 503, "ready with an empty token");
    std::fs::write(&token, s.jwt.token("shop", "cart")).unwrap();
    agent.wait_ready().await;
    // --output-certs wrote the files, private ones 0600.
    use std::os::unix::fs::PermissionsExt;
    for f in ["key.pem", "cert-chain.pem", "root-cert.pem"] {
        let path = s.dir.path().join("out").join(f);
        // Written by its own task just after the certificate is published (30 s at
        // most: generous for a loaded machine).
        signet_e2e::eventually(Duration::from_secs(30), f, async || {
            path.exists().then_some(())
        })
        .await;
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{f}");
    }
    agent.stop().await;
    ca.stop().await;
}

#[test]
fn socket_paths_that_cannot_work_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let err = signet_agent::sds::bind(dir.path()).unwrap_err().to_string();
    assert!(err.contains("is a directory"), "{err}");
    let file = dir.path().join("plain");
    std::fs::write(&file, "x").unwrap();
    let err = signet_agent::sds::bind(&file.join("socket"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("cannot create its directory"), "{err}");
    let err = signet_agent::sds::bind(&file).unwrap_err().to_string();
    assert!(err.contains("not a socket"), "{err}");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let socket = dir.path().join("live/socket");
        let _live = signet_agent::sds::bind(&socket).unwrap();
        let err = signet_agent::sds::bind(&socket).unwrap_err().to_string();
        assert!(err.contains("another server"), "{err}");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777,
            0o660
        );
    });
    // A stale socket file (nobody listening) is replaced.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let socket = dir.path().join("stale/socket");
        drop(signet_agent::sds::bind(&socket).unwrap());
        assert!(socket.exists());
        signet_agent::sds::bind(&socket).unwrap();
    });
}
