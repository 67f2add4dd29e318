//! A driven trust change in cluster mode, against the stateful test API server: the
//! elected replica advances the record in `signet-ca-rotation`, the other follows,
//! and the objects the writers keep (root ConfigMaps, the ClusterTrustBundle,
//! istiod's Secret) hold the union during `distribute` and the new root alone after
//! `retire`; a leader change and a restart in each stage, an abort, Events.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{path::Path, time::Duration};

use base64::Engine as _;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Api,
    api::{Patch, PatchParams},
};
use serde_json::Value;
use signet_e2e::{
    TestCa, TestRoot,
    cluster::{Setup, eventually, writer_args},
    kube::KubeApi,
    publish_set,
};

const CM: &str = "istio-ca-root-cert";
const SIGNER: &str = "signet.dev/spiffe";
const BUNDLE_OBJECT: &str = "signet.dev:spiffe:bundle";

/// A bundle's certificates, sorted (DER).
type Certs = Vec<Vec<u8>>;

fn certs(pem: &str) -> Certs {
    let mut all: Certs = ::pem::parse_many(pem)
        .unwrap_or_default()
        .into_iter()
        .map(|p| p.into_contents())
        .collect();
    all.sort();
    all
}

fn set_of(roots: &[&TestRoot]) -> Certs {
    certs(&roots.iter().map(|r| r.pem.as_str()).collect::<String>())
}

/// What each consumer holds: (root ConfigMap in `apps`, ClusterTrustBundle,
/// istiod's Secret `ca.crt`).
fn consumers(api: &KubeApi) -> (Certs, Certs, Certs) {
    let cm = api
        .get("configmaps", "apps", CM)
        .and_then(|c| c["data"]["root-cert.pem"].as_str().map(certs))
        .unwrap_or_default();
    let ctb = api
        .get("clustertrustbundles", "", BUNDLE_OBJECT)
        .and_then(|c| c["spec"]["trustBundle"].as_str().map(certs))
        .unwrap_or_default();
    let secret = api
        .get("secrets", "signet", "istiod-tls")
        .and_then(|s| s["data"]["ca.crt"].as_str().map(str::to_owned))
        .map(|b| {
            certs(
                &String::from_utf8(base64::engine::general_purpose::STANDARD.decode(b).unwrap())
                    .unwrap(),
            )
        })
        .unwrap_or_default();
    (cm, ctb, secret)
}

fn shared_record(api: &KubeApi) -> Option<Value> {
    let cm = api.get("configmaps", "signet", "signet-ca-rotation")?;
    serde_json::from_str(cm["data"]["record.json"].as_str()?).ok()
}

fn holder(api: &KubeApi) -> Option<String> {
    api.get("leases", "signet", "signet-ca-writer")?["spec"]["holderIdentity"]
        .as_str()
        .map(str::to_owned)
}

/// A next root with its intermediate staged in `<dir>/staged`, and where the next set
/// goes (`<dir>/next`, empty so far).
fn next_set(setup: &Setup) -> (TestRoot, std::path::PathBuf, std::path::PathBuf) {
    let new_root = TestRoot::p256("Next Root");
    let staged = setup.dir.path().join("staged");
    new_root.write_cacerts(
        &staged,
        "Next Intermediate",
        &rcgen::KeyPair::generate().unwrap(),
        None,
        &[],
    );
    (new_root, staged, setup.dir.path().join("next"))
}

/// A replica: its own state directory, the shared cacerts and next directories.
fn replica_args(setup: &Setup, dir: &Path, next: &Path, identity: &str) -> Vec<String> {
    writer_args(
        dir,
        &setup.api,
        &setup.cacerts,
        &[
            "--root-configmap",
            CM,
            "--cluster-trust-bundle-signer",
            SIGNER,
            "--istiod-cert-secret",
            "signet/istiod-tls",
            "--next-cacerts-dir",
            next.to_str().unwrap(),
            "--rotation-window",
            "10s",
            "--default-ttl",
            "20s",
            "--leader-election-identity",
            identity,
        ],
    )
}

async fn status(ca: &TestCa) -> Value {
    let (_, body) = ca.http_get("/rotation").await.unwrap();
    serde_json::from_str(&body).unwrap()
}

async fn wait_stage(api: &KubeApi, stage: &str, within: Duration) -> Value {
    eventually(within, &format!("shared stage {stage}"), async || {
        shared_record(api).filter(|r| r["stage"] == stage)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_elected_replica_drives_the_writers_objects_and_a_new_leader_goes_on() {
    let setup = Setup::new(&["apps"]).await;
    let api = &setup.api;
    let old_root = &setup.root;
    let (new_root, staged, next) = next_set(&setup);
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = TestCa::start(&replica_args(&setup, dir_a.path(), &next, "replica-a")).await;
    eventually(Duration::from_secs(60), "replica-a leads", async || {
        (holder(api).as_deref() == Some("replica-a")).then_some(())
    })
    .await;
    let b = TestCa::start(&replica_args(&setup, dir_b.path(), &next, "replica-b")).await;
    let old = set_of(&[old_root]);
    eventually(
        Duration::from_secs(60),
        "consumers on the old root",
        async || (consumers(api) == (old.clone(), old.clone(), old.clone())).then_some(()),
    )
    .await;

    publish_set(&staged, &next);
    wait_stage(api, "distribute", Duration::from_secs(30)).await;
    let both = set_of(&[old_root, &new_root]);
    eventually(
        Duration::from_secs(30),
        "every consumer holds both roots",
        async || (consumers(api) == (both.clone(), both.clone(), both.clone())).then_some(()),
    )
    .await;
    // The other replica follows: its answers carry both roots too.
    let followed = eventually(Duration::from_secs(30), "replica-b follows", async || {
        let st = status(&b).await;
        (st["stage"] == "distribute" && st["roots"] == 2).then_some(st)
    })
    .await;
    assert!(
        followed["role"].as_str().unwrap().starts_with("following"),
        "{followed}"
    );

    // The leader goes away in the middle of the stage; the other takes over and
    // goes on from the shared record.
    a.stop().await;
    eventually(Duration::from_secs(30), "replica-b leads", async || {
        (holder(api).as_deref() == Some("replica-b")).then_some(())
    })
    .await;
    let done = wait_stage(api, "done", Duration::from_secs(120)).await;
    let stages: Vec<&str> = done["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["stage"].as_str().unwrap())
        .collect();
    assert_eq!(stages, ["distribute", "switch", "retire", "done"], "{done}");
    let new = set_of(&[&new_root]);
    eventually(
        Duration::from_secs(30),
        "every consumer holds the new root alone",
        async || (consumers(api) == (new.clone(), new.clone(), new.clone())).then_some(()),
    )
    .await;
    // Its status follows at the end of the look that wrote the record.
    let st = eventually(Duration::from_secs(30), "replica-b done", async || {
        let st = status(&b).await;
        (st["stage"] == "done").then_some(st)
    })
    .await;
    assert!(st["role"].as_str().unwrap().starts_with("elected"), "{st}");
    // One Event per stage change, on the rotation's ConfigMap.
    let reasons: Vec<String> = api
        .list("events")
        .iter()
        .filter_map(|e| e["reason"].as_str().map(str::to_owned))
        .collect();
    for reason in ["StageDistribute", "StageSwitch", "StageRetire", "StageDone"] {
        assert!(
            reasons.iter().any(|r| r == reason),
            "{reason} in {reasons:?}"
        );
    }

    // A replica restarted now follows the shared record.
    let a = TestCa::start(&replica_args(&setup, dir_a.path(), &next, "replica-a")).await;
    let st = eventually(Duration::from_secs(30), "replica-a follows", async || {
        let st = status(&a).await;
        (st["stage"] == "done").then_some(st)
    })
    .await;
    assert_eq!(st["roots"], 1, "{st}");

    // The operator makes the next set the cacerts Secret: idle on it, everywhere.
    publish_set(&staged, &setup.cacerts);
    wait_stage(api, "idle", Duration::from_secs(30)).await;
    eventually(Duration::from_secs(30), "replica-a idle", async || {
        (status(&a).await["stage"] == "idle").then_some(())
    })
    .await;
    a.stop().await;
    b.stop().await;
}

/// Writes (or, with `None`, removes) the report of a replica that is not running
/// but counts as alive, in the shared ConfigMap: a replica that lags behind in
/// `stage` since `since` holds the rotation where it is, as a real one would.
async fn laggard(api: &KubeApi, said: Option<(&str, i64)>) {
    let value = said.map(|(stage, since)| {
        let at = time::OffsetDateTime::now_utc().unix_timestamp() + 3600;
        serde_json::json!({
            "marks": {"renew_by": 0, "expire_by": 0},
            "stage": stage, "since": since, "pending": 0, "complete": true,
            "sample": [], "at": at,
        })
        .to_string()
    });
    let patch = serde_json::json!({"data": {"replica.laggard.json": value}});
    let cms = Api::<ConfigMap>::namespaced(api.client().await, "signet");
    eventually(
        Duration::from_secs(10),
        "the laggard's report written",
        async || {
            // The test API server's merge patch may conflict with a replica's.
            cms.patch(
                "signet-ca-rotation",
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
            .ok()
        },
    )
    .await;
}

/// Waits until the elected replica is `who`, then until its status shows `stage`.
async fn leads_in(api: &KubeApi, who: &str, ca: &TestCa, stage: &str) -> Value {
    eventually(
        Duration::from_secs(30),
        &format!("{who} leads"),
        async || (holder(api).as_deref() == Some(who)).then_some(()),
    )
    .await;
    eventually(
        Duration::from_secs(30),
        &format!("{who} in {stage}"),
        async || {
            let st = status(ca).await;
            (st["stage"] == stage && st["role"].as_str().unwrap_or("").starts_with("elected"))
                .then_some(st)
        },
    )
    .await
}

/// Stops the elected replica `leader` in `stage`; the other (`name`, `other`) must
/// take the Lease and go on in `stage` with a bundle of `roots` roots; the stopped
/// one, restarted with `args` (its state directory kept), must follow. Returns it.
async fn hand_over(
    api: &KubeApi,
    (leader_name, leader): (&str, TestCa),
    args: &[String],
    (name, other): (&str, &TestCa),
    stage: &str,
    roots: u64,
) -> TestCa {
    assert_eq!(
        holder(api).as_deref(),
        Some(leader_name),
        "the one stopped leads"
    );
    leader.stop().await;
    let st = leads_in(api, name, other, stage).await;
    assert_eq!(st["roots"], roots, "{st}");
    let restarted = TestCa::start(args).await;
    eventually(
        Duration::from_secs(30),
        "the restarted replica follows",
        async || {
            let st = status(&restarted).await;
            (st["stage"] == stage && st["roots"] == roots).then_some(())
        },
    )
    .await;
    restarted
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_and_a_leader_change_in_switch_and_in_retire_do_not_break_the_rotation() {
    let setup = Setup::new(&["apps"]).await;
    let api = &setup.api;
    let (new_root, staged, next) = next_set(&setup);
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let args_a = replica_args(&setup, dir_a.path(), &next, "replica-a");
    let args_b = replica_args(&setup, dir_b.path(), &next, "replica-b");
    let a = TestCa::start(&args_a).await;
    eventually(Duration::from_secs(60), "replica-a leads", async || {
        (holder(api).as_deref() == Some("replica-a")).then_some(())
    })
    .await;
    let b = TestCa::start(&args_b).await;
    publish_set(&staged, &next);
    let distribute = wait_stage(api, "distribute", Duration::from_secs(60)).await;
    // A third replica says it is in distribute: once the record moves on, it is
    // left behind and holds the stage, so the test can act in the middle of it.
    laggard(
        api,
        Some(("distribute", distribute["since"].as_i64().unwrap())),
    )
    .await;
    let switch = wait_stage(api, "switch", Duration::from_secs(60)).await;

    // In switch: the leader stops, the other takes over from the shared record; the
    // stopped one restarts (same state directory) and follows.
    let a = hand_over(
        api,
        ("replica-a", a),
        &args_a,
        ("replica-b", &b),
        "switch",
        2,
    )
    .await;
    // Both sign with the new chain (their status names its signing certificate).
    for ca in [&a, &b] {
        let st = status(ca).await;
        let signing = st["signing"].as_str().unwrap();
        assert!(signing.starts_with(next.to_str().unwrap()), "{st}");
    }
    let both = set_of(&[&setup.root, &new_root]);
    assert_eq!(consumers(api), (both.clone(), both.clone(), both.clone()));
    assert_eq!(
        shared_record(api).unwrap()["stage"],
        "switch",
        "held by the laggard"
    );

    // The laggard catches up; in retire it lags again.
    laggard(api, Some(("switch", switch["since"].as_i64().unwrap()))).await;
    wait_stage(api, "retire", Duration::from_secs(60)).await;
    let new = set_of(&[&new_root]);
    eventually(
        Duration::from_secs(30),
        "every consumer holds the new root alone",
        async || (consumers(api) == (new.clone(), new.clone(), new.clone())).then_some(()),
    )
    .await;
    // In retire: the same the other way round.
    let b = hand_over(
        api,
        ("replica-b", b),
        &args_b,
        ("replica-a", &a),
        "retire",
        1,
    )
    .await;
    assert_eq!(consumers(api), (new.clone(), new.clone(), new.clone()));
    assert_eq!(shared_record(api).unwrap()["stage"], "retire");

    // The laggard goes away: done, with no stage repeated or skipped.
    laggard(api, None).await;
    let done = wait_stage(api, "done", Duration::from_secs(60)).await;
    let stages: Vec<&str> = done["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["stage"].as_str().unwrap())
        .collect();
    assert_eq!(stages, ["distribute", "switch", "retire", "done"], "{done}");
    assert_eq!(consumers(api), (new.clone(), new.clone(), new.clone()));
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abort_written_into_the_shared_record_converges_back() {
    let setup = Setup::new(&["apps"]).await;
    let api = &setup.api;
    let (new_root, staged, next) = next_set(&setup);
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::start(&replica_args(&setup, dir.path(), &next, "replica-a")).await;
    publish_set(&staged, &next);
    wait_stage(api, "distribute", Duration::from_secs(60)).await;
    let both = set_of(&[&setup.root, &new_root]);
    eventually(Duration::from_secs(30), "both roots", async || {
        (consumers(api).0 == both).then_some(())
    })
    .await;
    // What `kubectl patch configmap signet-ca-rotation` does.
    Api::<ConfigMap>::namespaced(api.client().await, "signet")
        .patch(
            "signet-ca-rotation",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"data": {"abort": "requested"}})),
        )
        .await
        .unwrap();
    let idle = wait_stage(api, "idle", Duration::from_secs(30)).await;
    assert_eq!(idle["declined"].as_str().map(str::len), Some(64), "{idle}");
    let old = set_of(&[&setup.root]);
    eventually(
        Duration::from_secs(30),
        "every consumer back on the old root",
        async || (consumers(api) == (old.clone(), old.clone(), old.clone())).then_some(()),
    )
    .await;
    let cm = api
        .get("configmaps", "signet", "signet-ca-rotation")
        .unwrap();
    assert!(
        cm["data"]["abort"].is_null(),
        "the request is answered: {cm}"
    );
    ca.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_cluster_switches_before_every_cluster_on_the_shared_root_distributed() {
    let east = Setup::new(&["apps"]).await;
    let west = Setup::new(&["apps"]).await;
    // One shared root: west's intermediate is under east's root too.
    east.root.write_cacerts(
        &west.cacerts,
        "West Intermediate",
        &rcgen::KeyPair::generate().unwrap(),
        None,
        &[],
    );
    let new_root = TestRoot::p256("Next Root");
    let stage_next = |setup: &Setup, name: &str| {
        let staged = setup.dir.path().join("staged");
        new_root.write_cacerts(
            &staged,
            name,
            &rcgen::KeyPair::generate().unwrap(),
            None,
            &[],
        );
        (staged, setup.dir.path().join("next"))
    };
    let (east_staged, east_next) = stage_next(&east, "East Next");
    let (west_staged, west_next) = stage_next(&west, "West Next");
    let (kc_east, kc_west) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let east_kubeconfig = east.api.kubeconfig(kc_east.path());
    let west_kubeconfig = west.api.kubeconfig(kc_west.path());
    let (dir_e, dir_w) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut args_e = replica_args(&east, dir_e.path(), &east_next, "east-a");
    args_e.extend([
        "--cluster-id".into(),
        "east".into(),
        "--remote-cluster".into(),
        format!("west={}", west_kubeconfig.display()),
    ]);
    let mut args_w = replica_args(&west, dir_w.path(), &west_next, "west-a");
    args_w.extend([
        "--cluster-id".into(),
        "west".into(),
        "--remote-cluster".into(),
        format!("east={}", east_kubeconfig.display()),
    ]);
    let ca_e = TestCa::start(&args_e).await;
    let ca_w = TestCa::start(&args_w).await;

    // East declares; west lags.
    publish_set(&east_staged, &east_next);
    wait_stage(&east.api, "distribute", Duration::from_secs(30)).await;
    let ready = eventually(Duration::from_secs(60), "east's own evidence", async || {
        shared_record(&east.api).filter(|r| r["ready"] == true)
    })
    .await;
    assert_eq!(ready["stage"], "distribute", "{ready}");
    // Its own evidence is in, but west has not distributed: east keeps signing
    // with the old chain, and says what it waits for.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(shared_record(&east.api).unwrap()["stage"], "distribute");
    let st = status(&ca_e).await;
    let waits = st["lagging"].to_string();
    assert!(waits.contains("cluster west"), "{st}");
    assert!(waits.contains("lacks the next roots"), "{st}");
    assert_eq!(shared_record(&west.api).unwrap()["stage"], "idle");

    // West declares too: both go through every stage.
    let west_declared = time::OffsetDateTime::now_utc().unix_timestamp();
    publish_set(&west_staged, &west_next);
    let east_done = wait_stage(&east.api, "done", Duration::from_secs(120)).await;
    let west_done = wait_stage(&west.api, "done", Duration::from_secs(120)).await;
    let at = |record: &Value, stage: &str| {
        record["history"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["stage"] == stage)
            .and_then(|c| c["at"].as_i64())
            .unwrap()
    };
    assert!(
        at(&east_done, "switch") >= west_declared,
        "east switched before west distributed: {east_done} {west_done}"
    );
    // Neither dropped the old root before the other had switched.
    assert!(at(&east_done, "retire") >= at(&west_done, "switch"));
    assert!(at(&west_done, "retire") >= at(&east_done, "switch"));
    let new = set_of(&[&new_root]);
    for api in [&east.api, &west.api] {
        eventually(Duration::from_secs(30), "the new root alone", async || {
            (consumers(api) == (new.clone(), new.clone(), new.clone())).then_some(())
        })
        .await;
    }
    ca_e.stop().await;
    ca_w.stop().await;
}
