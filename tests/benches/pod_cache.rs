//! The pod cache behind node impersonation (ambient mode): resident memory with
//! 100,000 pods on 1,000 nodes, and the time policy takes to decide an impersonation
//! request against it (caller's pod looked up, UID and service account compared,
//! target looked up on the caller's node).
//!
//! `cargo bench -p signet-e2e --bench pod_cache`

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;

use k8s_openapi::{
    api::core::v1::{Pod, PodSpec},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use signet_ca::{
    issue::{
        authn::{Caller, Method, PodRef},
        policy::{NodeImpersonation, Policy},
    },
    kubernetes::pods::PodCache,
};
use signet_spiffe::{ServiceAccount, TrustDomains};

const PODS: usize = 100_000;
const NODES: usize = 1_000;
const NAMESPACES: usize = 500;
const ACCOUNTS_PER_NAMESPACE: usize = 8;

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap()
}

fn uid(i: usize) -> String {
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        i,
        i % 65536,
        i % 4096,
        (i / 7) % 4096,
        i * 2654435761 % (1 << 48)
    )
}

/// Pod `i`: a workload, or (the first of every node) that node's ztunnel.
fn pod(i: usize) -> Pod {
    let node = format!("node-{:04}", i % NODES);
    let (namespace, sa, name) = if i < NODES {
        (
            "istio-system".to_owned(),
            "ztunnel".to_owned(),
            format!("ztunnel-{node}"),
        )
    } else {
        let ns = i % NAMESPACES;
        (
            format!("team-{ns:03}"),
            format!("app-{}", (i / NAMESPACES) % ACCOUNTS_PER_NAMESPACE),
            format!(
                "app-{}-{:05x}-{:05x}",
                (i / NAMESPACES) % ACCOUNTS_PER_NAMESPACE,
                i,
                i * 31 % 0xfffff
            ),
        )
    };
    Pod {
        metadata: ObjectMeta {
            namespace: Some(namespace),
            name: Some(name),
            uid: Some(uid(i)),
            ..Default::default()
        },
        spec: Some(PodSpec {
            service_account_name: Some(sa),
            node_name: Some(node),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn main() {
    let before = rss_kib();
    // Built one pod at a time, as a watch delivers them (each Pod object is dropped
    // once taken in).
    let started = Instant::now();
    let cache = PodCache::default();
    for i in 0..PODS {
        cache.apply(&pod(i));
    }
    let took = started.elapsed();
    let after = rss_kib();
    println!(
        "pod cache: {} pods on {NODES} nodes, {} namespaces x {} service accounts",
        cache.len(),
        NAMESPACES,
        ACCOUNTS_PER_NAMESPACE
    );
    println!(
        "  resident memory added: {:.1} MiB ({:.0} bytes per pod); built in {:.0} ms",
        (after - before) as f64 / 1024.0,
        (after - before) as f64 * 1024.0 / PODS as f64,
        took.as_secs_f64() * 1e3
    );

    // Decisions: ztunnel of node n asks for a workload on node n.
    let td = signet_spiffe::trust_domain("cluster.local").unwrap();
    let ztunnel = ServiceAccount::new("istio-system", "ztunnel").unwrap();
    let policy = Policy::new(
        TrustDomains::new(td, vec![]),
        time::Duration::hours(24),
        time::Duration::days(90),
    )
    .with_impersonation(NodeImpersonation {
        trusted: vec![ztunnel.clone()],
        pods: [(
            "Kubernetes".to_owned(),
            PodCache::from_snapshot((0..PODS).map(pod).collect::<Vec<_>>().iter()),
        )]
        .into(),
    });
    let key = rcgen::KeyPair::generate().unwrap();
    let csr_pem = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    let csr = signet_ca::issue::csr::parse(&csr_pem).unwrap();
    let requests: Vec<(Caller, String)> = (NODES..NODES + 10_000)
        .map(|i| {
            let node = i % NODES;
            let target = pod(i);
            let target_id = format!(
                "spiffe://cluster.local/ns/{}/sa/{}",
                target.metadata.namespace.unwrap(),
                target.spec.unwrap().service_account_name.unwrap()
            );
            let caller = Caller {
                account: ztunnel.clone(),
                method: Method::Jwt,
                cluster: "Kubernetes".into(),
                pod: Some(PodRef {
                    name: format!("ztunnel-node-{node:04}"),
                    uid: Some(uid(node)),
                }),
            };
            (caller, target_id)
        })
        .collect();
    let rounds = 20;
    let started = Instant::now();
    for _ in 0..rounds {
        for (caller, target) in &requests {
            let request = signet_ca::issue::policy::Request::Istio {
                caller,
                requested_secs: 0,
                impersonate: Some(target),
                csr: &csr,
            };
            let now = time::OffsetDateTime::now_utc();
            let d = policy.decide(request, now + time::Duration::days(365), now);
            assert!(d.is_ok(), "{d:?}");
        }
    }
    let per = started.elapsed().as_secs_f64() / (rounds * requests.len()) as f64;
    println!(
        "  impersonation decision: {:.2} µs each (policy only; {} decisions)",
        per * 1e6,
        rounds * requests.len()
    );
}
