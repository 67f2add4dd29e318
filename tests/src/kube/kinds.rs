//! The kinds the server knows, by group, versions and plural, with the rules
//! Kubernetes keeps for each (immutable fields, a `status` subresource).

/// A kind the server knows: where it lives and how it is named.
#[derive(Clone, Debug)]
pub struct Kind {
    /// API group ("" for the core group).
    pub group: &'static str,
    /// Versions served, newest first.
    pub versions: Vec<&'static str>,
    /// `kind`.
    pub kind: &'static str,
    /// Plural resource name in URLs.
    pub plural: &'static str,
    /// Whether objects live in namespaces.
    pub namespaced: bool,
    /// Top-level fields that may not change once set (`type` of a Secret, ...).
    pub immutable: &'static [&'static str],
    /// Whether `status` is only written through the `/status` subresource.
    pub status_subresource: bool,
}

/// The kinds Signet's controllers use. ClusterTrustBundle is served as `v1` and
/// `v1beta1`, as on Kubernetes 1.37; [`KubeApi::start_with`] picks other sets.
pub fn default_kinds() -> Vec<Kind> {
    let kind = |group, versions: &[&'static str], kind, plural, namespaced| Kind {
        group,
        versions: versions.to_vec(),
        kind,
        plural,
        namespaced,
        immutable: &[],
        status_subresource: false,
    };
    vec![
        Kind {
            status_subresource: true,
            ..kind("", &["v1"], "Namespace", "namespaces", false)
        },
        kind("", &["v1"], "ConfigMap", "configmaps", true),
        kind("", &["v1"], "ServiceAccount", "serviceaccounts", true),
        Kind {
            immutable: &["type"],
            ..kind("", &["v1"], "Secret", "secrets", true)
        },
        kind("coordination.k8s.io", &["v1"], "Lease", "leases", true),
        kind("events.k8s.io", &["v1"], "Event", "events", true),
        Kind {
            status_subresource: true,
            ..kind("", &["v1"], "Pod", "pods", true)
        },
        cluster_trust_bundle(&["v1", "v1beta1"]),
        pod_certificate_request(&["v1", "v1beta1"]),
    ]
}

/// PodCertificateRequest served in `versions`; its status is written once.
pub fn pod_certificate_request(versions: &[&'static str]) -> Kind {
    Kind {
        group: "certificates.k8s.io",
        versions: versions.to_vec(),
        kind: "PodCertificateRequest",
        plural: "podcertificaterequests",
        namespaced: true,
        immutable: &["spec"],
        status_subresource: true,
    }
}

/// ClusterTrustBundle served in `versions`.
pub fn cluster_trust_bundle(versions: &[&'static str]) -> Kind {
    Kind {
        group: "certificates.k8s.io",
        versions: versions.to_vec(),
        kind: "ClusterTrustBundle",
        plural: "clustertrustbundles",
        namespaced: false,
        immutable: &[],
        status_subresource: false,
    }
}
