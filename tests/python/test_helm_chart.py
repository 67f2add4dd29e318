"""The Helm chart deploy/helm/signet, offline: `helm lint` and rendering through Helm's own
Go SDK (helm-python-sdk, no helm binary, no cluster), for the default values and for each
documented mode. Every rendered object, and the examples under deploy/examples, must
validate against the Kubernetes 1.33 and 1.37 OpenAPI schemas (kubernetes-validate 1.37.0
ships 1.25 to 1.37; strict: unknown fields are errors). The RBAC must be exactly what
signet-ca calls in that mode, and every flag passed to the container must be one that
`signet-ca serve --help` lists."""

import itertools
import os
import re
import subprocess

import helm_python
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate import utils as kv_utils

from conftest import ROOT, binary

CHART = ROOT / "deploy" / "helm" / "signet"
EXAMPLES = sorted((ROOT / "deploy" / "examples").glob("*.yaml"))
RELEASE, NS = "signet", "signet-system"
FULLNAME = "signet-ca"
SA = ("ServiceAccount", FULLNAME, NS)
KUBE_VERSIONS = ("1.33", "1.37")

MODES = {
    "default": {},
    "tokenreview": {"tokenAuth": {"mode": "tokenReview"}},
    "jwks": {"tokenAuth": {"mode": "jwks"}},
    "root-configmap-off": {"rootConfigMap": {"enabled": False}},
    "istiod-secret": {"istiodCert": {"enabled": True, "revisions": ["canary"],
                                      "dnsNames": ["istiod.istio-system.svc.cluster.local"]}},
    "cluster-trust-bundle": {"clusterTrustBundle": {"enabled": True}},
    "self-signed": {"cacerts": {"selfSigned": True}, "replicaCount": 1},
    "rotation-off": {"rotation": {"enabled": False}},
    "rotation-custom": {"rotation": {"nextSecretName": "mesh-ca-next", "window": "30m"}},
    "ambient": {"ambient": {"trustedNodeAccounts": ["istio-system/ztunnel"]}},
    "pod-certificates": {"podCertificates": {"enabled": True, "allow": ["apps", "payments/api"],
                                             "deny": ["apps/legacy"]}},
    "multi-cluster": {
        "multiCluster": {
            "clusterAliases": ["east-alias"], "trustDomainAliases": ["old.example"],
            "remoteClusters": [
                {"id": "west", "kubeconfigSecret": "west-kubeconfig"},
                {"id": "north", "jwks": {"issuer": "https://north.example", "configMap": "north-jwks"}},
                {"id": "south", "kubeconfigSecret": "south-kubeconfig",
                 "jwks": {"issuer": "https://south.example", "url": "https://south.example/jwks"}},
            ]},
        "limits": {"maxConnections": 8192, "maxTokenReviews": 128, "signingThreads": 4},
        "extraArgs": ["--max-streams-per-connection=50"],
    },
    "everything": {
        "tokenAuth": {"mode": "jwks"},
        "rootConfigMap": {"namespaceSelector": "istio-injection in (enabled)"},
        "clusterTrustBundle": {"enabled": True},
        "istiodCert": {"enabled": True},
        "extraServingDnsNames": ["ca.example.internal"],
        "ambient": {"trustedNodeAccounts": ["istio-system/ztunnel", "kube-system/ztunnel"]},
        "podCertificates": {"enabled": True, "deny": ["kube-system"]},
        "connections": {"peerShares": ["10.0.8.15/32=unlimited", "10.1.0.0/16=512"]},
        "compliancePolicy": "pqc",
        "subjectCn": {"template": "{ns}.{sa}", "namespaces": ["minio-users", "etl"]},
        "jwtSvids": {"enabled": True},
        "oidc": {"enabled": True, "issuer": "https://oidc.example.com", "tlsSecretName": "oidc-tls"},
    },
    "jwt-svids": {"jwtSvids": {"enabled": True, "ttl": "10m", "maxTtl": "2h", "keyAlgorithm": "rs256",
                               "keyRotation": "12h"}},
    "oidc": {"jwtSvids": {"enabled": True},
             "oidc": {"enabled": True, "issuer": "https://oidc.example.com/mesh", "tlsSecretName": "oidc-tls"}},
    # No certificate of its own: the CA's serving certificate, which must then name the issuer.
    "oidc-ca-certificate": {"jwtSvids": {"enabled": True},
                            "oidc": {"enabled": True, "issuer": "https://signet-ca-oidc.signet-system.svc"}},
}

# The rules each mode needs: (kind, namespace, apiGroup or URL marker, resource or URL,
# verb, resourceNames). "" is the core API group; None marks a non-resource URL.
LEASE = {("Role", NS, "coordination.k8s.io", "leases", "create", ()),
         ("Role", NS, "coordination.k8s.io", "leases", "get", ("signet-ca-writer",)),
         ("Role", NS, "coordination.k8s.io", "leases", "update", ("signet-ca-writer",))}
# The shared record of a trust rotation, in the Lease's namespace: ConfigMap
# signet-ca-rotation, read and merge-patched by every replica (created by the first: create
# cannot be limited by name), and an events.k8s.io Event on it per stage change. Rendered
# with the Lease whether or not rotation.enabled: in cluster mode the CA reads the record on
# every look, and a refused read would stop it from reloading cacerts.
ROTATION_RECORD = {("Role", NS, "", "configmaps", "create", ())} | {
    ("Role", NS, "", "configmaps", v, ("signet-ca-rotation",)) for v in ("get", "patch")} | {
    ("Role", NS, "events.k8s.io", "events", "create", ())}
WRITER = LEASE | ROTATION_RECORD
ROOT_CONFIGMAPS = {("ClusterRole", None, "", "namespaces", v, ()) for v in ("get", "list", "watch")} | {
    ("ClusterRole", None, "", "configmaps", "create", ())} | {
    ("ClusterRole", None, "", "configmaps", v, ("istio-ca-root-cert",))
    for v in ("get", "list", "watch", "update", "delete")}
JWKS = {("ClusterRole", None, None, url, "get", ())
        for url in ("/openid/v1/jwks", "/.well-known/openid-configuration")}
TRUST_BUNDLE = {("ClusterRole", None, "certificates.k8s.io", "clustertrustbundles", "create", ())} | {
    ("ClusterRole", None, "certificates.k8s.io", "clustertrustbundles", v, ("signet.dev:spiffe:bundle",))
    for v in ("get", "list", "watch", "update")} | {
    ("ClusterRole", None, "certificates.k8s.io", "signers", "attest", ("signet.dev/spiffe",))}
# Node impersonation: one cluster-wide pod list/watch, no get, no resourceNames.
PODS = {("ClusterRole", None, "", "pods", v, ()) for v in ("list", "watch")}
# Pod certificates: every request cluster-wide (field selector spec.signerName), answered
# through /status, as this signer only; plus the ClusterTrustBundle of the same name.
POD_CERTS = {("ClusterRole", None, "certificates.k8s.io", "podcertificaterequests", v, ())
             for v in ("get", "list", "watch")} | {
    ("ClusterRole", None, "certificates.k8s.io", "podcertificaterequests/status", "update", ()),
    ("ClusterRole", None, "certificates.k8s.io", "signers", "sign", ("signet.dev/spiffe",))} | {
    # The pod and service account each request names, read before it is answered.
    ("ClusterRole", None, "", r, "get", ()) for r in ("pods", "serviceaccounts")}
ISTIOD_SECRET = {("Role", "istio-system", "", "secrets", "create", ())} | {
    ("Role", "istio-system", "", "secrets", v, ("istiod-tls",)) for v in ("get", "list", "watch", "update")}

# JWT-SVIDs: the key set's Secret, read and written by every replica: create (which RBAC
# cannot limit by name), then get and update of that one Secret, in the release namespace.
JWT_KEYS = {("Role", NS, "", "secrets", "create", ())} | {
    ("Role", NS, "", "secrets", v, ("signet-ca-jwt-keys",)) for v in ("get", "update")}

EXPECTED_RULES = {
    "default": ROOT_CONFIGMAPS | WRITER,
    "tokenreview": ROOT_CONFIGMAPS | WRITER,
    "jwks": JWKS | ROOT_CONFIGMAPS | WRITER,
    "root-configmap-off": set(),
    "rotation-off": ROOT_CONFIGMAPS | WRITER,
    "rotation-custom": ROOT_CONFIGMAPS | WRITER,
    "istiod-secret": ROOT_CONFIGMAPS | ISTIOD_SECRET | WRITER,
    "cluster-trust-bundle": ROOT_CONFIGMAPS | TRUST_BUNDLE | WRITER,
    "self-signed": ROOT_CONFIGMAPS | WRITER,
    "ambient": ROOT_CONFIGMAPS | PODS | WRITER,
    "pod-certificates": ROOT_CONFIGMAPS | POD_CERTS | TRUST_BUNDLE | WRITER,
    "multi-cluster": ROOT_CONFIGMAPS | WRITER,
    "everything": JWKS | ROOT_CONFIGMAPS | PODS | TRUST_BUNDLE | POD_CERTS | ISTIOD_SECRET | JWT_KEYS | WRITER,
    "jwt-svids": ROOT_CONFIGMAPS | JWT_KEYS | WRITER,
    "oidc": ROOT_CONFIGMAPS | JWT_KEYS | WRITER,
    "oidc-ca-certificate": ROOT_CONFIGMAPS | JWT_KEYS | WRITER,
}
# The modes whose RBAC may name pods at all.
PODS_MODES = {"ambient", "everything"}
POD_CERT_MODES = {"pod-certificates", "everything"}

# Driven trust rotation (rotation.enabled, the default): the next set's Secret, mounted
# optional, and the window.
ROTATION_ARGS = ["--next-cacerts-dir=/etc/cacerts-next", "--rotation-window=1h"]
COMMON_ARGS = [
    "serve", "--cacerts-dir=/etc/cacerts", "--require-cacerts", *ROTATION_ARGS,
    "--state-dir=/var/lib/signet-ca", "--grpc-addr=[::]:15012", "--http-addr=[::]:15014",
    "--trust-domain=cluster.local", "--cluster-id=Kubernetes", "--token-audiences=istio-ca",
]
# A self-signed root is the one mode that runs without the cacerts Secret, and renews its
# root in its state directory: the window, but no next Secret.
SELF_SIGNED_ARGS = [a for a in COMMON_ARGS if a not in ("--require-cacerts", ROTATION_ARGS[0])]
NO_ROTATION_ARGS = [a for a in COMMON_ARGS if a not in ROTATION_ARGS]
SERVING = "--serving-dns-names=signet-ca.signet-system.svc,signet-ca.signet-system.svc.cluster.local"
TTLS = ["--default-ttl=24h", "--max-ttl=2160h", "--max-connections-per-peer=64"]
JWKS_ARGS = ["--jwt-issuer=https://kubernetes.default.svc.cluster.local",
             "--jwks=https://kubernetes.default.svc/openid/v1/jwks", "--no-token-review"]
LEASE_ARGS = ["--leader-election-namespace=signet-system", "--leader-election-lease=signet-ca-writer",
              "--leader-election-identity=$(POD_NAME)", "--lease-duration=15s",
              "--lease-renew-deadline=10s", "--lease-retry-period=2s"]
ROOT_CM_ARGS = ["--root-configmap=istio-ca-root-cert"]
ISTIOD_ARGS = ["--istiod-cert-secret=istio-system/istiod-tls", "--istiod-cert-ttl=24h"]
CTB_ARGS = ["--cluster-trust-bundle-signer=signet.dev/spiffe"]
AMBIENT_ARGS = ["--trusted-node-accounts=istio-system/ztunnel"]
POD_CERT_ARGS = ["--pod-certificate-signer=signet.dev/spiffe"]

# The exact argument list per mode: what the chart documents (docs/kubernetes.md).
EXPECTED_ARGS = {
    "default": COMMON_ARGS + [SERVING] + TTLS + ROOT_CM_ARGS + LEASE_ARGS,
    "tokenreview": COMMON_ARGS + [SERVING] + TTLS + ROOT_CM_ARGS + LEASE_ARGS,
    "jwks": COMMON_ARGS + [SERVING] + TTLS + JWKS_ARGS + ROOT_CM_ARGS + LEASE_ARGS,
    "root-configmap-off": COMMON_ARGS + [SERVING] + TTLS,
    "istiod-secret": COMMON_ARGS + [SERVING] + TTLS + ROOT_CM_ARGS + [
        ISTIOD_ARGS[0], "--istiod-cert-dns-names=istiod-canary.istio-system.svc,istiod.istio-system.svc.cluster.local", ISTIOD_ARGS[1],
    ] + LEASE_ARGS,
    "cluster-trust-bundle": COMMON_ARGS + [SERVING] + TTLS + ROOT_CM_ARGS + CTB_ARGS + LEASE_ARGS,
    "self-signed": SELF_SIGNED_ARGS + [SERVING] + TTLS + ROOT_CM_ARGS + LEASE_ARGS,
    "rotation-off": NO_ROTATION_ARGS + [SERVING] + TTLS + ROOT_CM_ARGS + LEASE_ARGS,
    "rotation-custom": [a.replace("=1h", "=30m") for a in COMMON_ARGS] + [SERVING] + TTLS
    + ROOT_CM_ARGS + LEASE_ARGS,
    "ambient": COMMON_ARGS + [SERVING] + TTLS + AMBIENT_ARGS + ROOT_CM_ARGS + LEASE_ARGS,
    "pod-certificates": COMMON_ARGS + [SERVING] + TTLS + ROOT_CM_ARGS + POD_CERT_ARGS + [
        "--pod-certificate-allow=apps", "--pod-certificate-allow=payments/api",
        "--pod-certificate-deny=apps/legacy",
    ] + LEASE_ARGS,
    "multi-cluster": COMMON_ARGS + [SERVING] + TTLS + ROOT_CM_ARGS + [
        "--cluster-alias=east-alias", "--trust-domain-alias=old.example",
        "--remote-cluster=west=/etc/signet/remote/west/kubeconfig",
        "--remote-jwks=north=https://north.example,/etc/signet/remote/north/jwks.json",
        "--remote-cluster=south=/etc/signet/remote/south/kubeconfig",
        "--remote-jwks=south=https://south.example,https://south.example/jwks",
        "--max-connections=8192", "--max-token-reviews=128", "--signing-threads=4",
    ] + LEASE_ARGS + ["--max-streams-per-connection=50"],
    "everything": COMMON_ARGS + [SERVING + ",ca.example.internal"] + TTLS + [
        "--peer-connection-share=10.0.8.15/32=unlimited", "--peer-connection-share=10.1.0.0/16=512",
    ] + JWKS_ARGS + [
        "--trusted-node-accounts=istio-system/ztunnel,kube-system/ztunnel",
    ] + ROOT_CM_ARGS + [
        "--root-configmap-namespace-selector=istio-injection in (enabled)",
    ] + CTB_ARGS + POD_CERT_ARGS + ["--pod-certificate-deny=kube-system"] + ISTIOD_ARGS + LEASE_ARGS,
    # JWT-SVIDs and OIDC are set through the environment (EXPECTED_JWT_ENV).
    "jwt-svids": COMMON_ARGS + [SERVING] + TTLS + ROOT_CM_ARGS + LEASE_ARGS,
    "oidc": COMMON_ARGS + [SERVING] + TTLS + ROOT_CM_ARGS + LEASE_ARGS,
    "oidc-ca-certificate": COMMON_ARGS + [SERVING + ",signet-ca-oidc.signet-system.svc"] + TTLS
    + ROOT_CM_ARGS + LEASE_ARGS,
}

JWT_ON = {"SIGNET_JWT_SVIDS": "true", "SIGNET_JWT_KEYS_SECRET": "signet-system/signet-ca-jwt-keys"}
OIDC_TLS = {"SIGNET_OIDC_ADDR": "[::]:8443", "SIGNET_OIDC_TLS_CERT": "/etc/signet/oidc-tls/tls.crt",
            "SIGNET_OIDC_TLS_KEY": "/etc/signet/oidc-tls/tls.key"}
# The SIGNET_JWT_* and SIGNET_OIDC_* variables per mode; none in the others.
EXPECTED_JWT_ENV = {
    "everything": {**JWT_ON, "SIGNET_OIDC_ISSUER": "https://oidc.example.com", **OIDC_TLS},
    "jwt-svids": {**JWT_ON, "SIGNET_JWT_SVID_TTL": "10m", "SIGNET_JWT_SVID_MAX_TTL": "2h",
                  "SIGNET_JWT_KEY_ALGORITHM": "rs256", "SIGNET_JWT_KEY_ROTATION": "12h"},
    "oidc": {**JWT_ON, "SIGNET_OIDC_ISSUER": "https://oidc.example.com/mesh", **OIDC_TLS},
    "oidc-ca-certificate": {**JWT_ON, "SIGNET_OIDC_ISSUER": "https://signet-ca-oidc.signet-system.svc",
                            "SIGNET_OIDC_ADDR": "[::]:8443"},
}


@pytest.fixture(scope="module")
def chart():
    with helm_python.Chart.load(CHART) as c:
        yield c


def render(chart, values):
    manifests = chart.render(values, name=RELEASE, namespace=NS, is_install=True)
    return [doc for path, text in sorted(manifests.items()) if not path.endswith("NOTES.txt")
            for doc in yaml.safe_load_all(text) if doc]


def one(objs, kind):
    found = [o for o in objs if o["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind}"
    return found[0]


def container(objs):
    return one(objs, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def rbac_rules(objs):
    out = set()
    for o in objs:
        if o["kind"] not in ("Role", "ClusterRole"):
            continue
        ns = o["metadata"].get("namespace")
        for r in o["rules"]:
            names = tuple(r.get("resourceNames", ()))
            if "nonResourceURLs" in r:
                targets = [(None, url) for url in r["nonResourceURLs"]]
            else:
                targets = itertools.product(r["apiGroups"], r["resources"])
            out |= {(o["kind"], ns, g, res, v, names) for (g, res) in targets for v in r["verbs"]}
    return out


def test_lint_has_no_errors():
    for values in MODES.values():
        report = helm_python.lint(CHART, values, strict=True, namespace=NS)
        assert report["errors"] == [], report
        assert not [m for m in report["messages"] if m["severity"] >= 2], report


@pytest.mark.parametrize("mode", MODES)
def test_renders_and_validates_against_kubernetes_schemas(chart, mode):
    objs = render(chart, MODES[mode])
    kinds = {o["kind"] for o in objs}
    assert {"Deployment", "Service", "ServiceAccount"} <= kinds
    # The chart's floor is 1.31; modes with newer APIs are checked from their own floor.
    floor = {"cluster-trust-bundle": "1.33", "pod-certificates": "1.36", "everything": "1.36"}
    versions = [floor.get(mode, "1.31"), *KUBE_VERSIONS]
    for o in objs:
        for version in versions:
            try:
                kubernetes_validate.validate(o, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{mode}: {o['kind']}/{o['metadata']['name']} on {version}: {e.message} at {list(e.path)}")


def test_schema_versions_are_shipped():
    shipped = {v.rsplit(".", 1)[0] for v in kv_utils.all_versions()}
    assert set(KUBE_VERSIONS) <= shipped, shipped


# The podCertificate projected volume source exists from Kubernetes 1.34 on (alpha; beta
# 1.35, GA 1.37): the 1.33 schema rejects it as an unknown field, so that example is checked
# against 1.37 only. Every other example is checked against every version.
EXAMPLE_VERSIONS = {"pod-certificate-pod.yaml": ("1.37",)}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_validate(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs
    for d in docs:
        for version in EXAMPLE_VERSIONS.get(path.name, KUBE_VERSIONS):
            kubernetes_validate.validate(d, version, strict=True)


@pytest.mark.parametrize("values", [
    {"replicas": 2},
    {"image": {"registy": "example.com"}},
    {"tokenAuth": {"mode": "tokenreview"}},
    {"replicaCount": 0},
    {"rootConfigMap": {"enable": False}},
    {"logFormat": "xml"},
    {"compliancePolicy": "PQC"},
    {"subjectCn": {"template": "{sa}", "namespace": ["a"]}},
    {"jwtSvids": {"enable": True}},
    {"jwtSvids": {"keyAlgorithm": "ES256"}},
    {"jwtSvids": {"keyAlgorithm": "hs256"}},
    {"jwtSvids": {"ttl": 300}},
    {"jwtSvids": {"maxTtl": "1"}},
    {"jwtSvids": {"keysSecretName": "JWT_keys"}},
    {"oidc": {"issuer": "http://oidc.example.com"}},
    {"oidc": {"issuer": "oidc.example.com"}},
    {"oidc": {"port": "8443"}},
    {"oidc": {"service": {"type": "Ingress"}}},
    {"oidc": {"tlsSecret": "oidc-tls"}},
    {"networkPolicy": {"oidcFrom": "anywhere"}},
    {"rotation": {"enable": False}},
    {"rotation": {"nextSecret": "cacerts-next"}},
    {"rotation": {"nextSecretName": "Cacerts_Next"}},
    {"rotation": {"window": 3600}},
    {"rotation": {"window": ""}},
    {"rotation": {"window": "1"}},
])
def test_unknown_or_misspelt_values_are_errors(chart, values):
    """values.schema.json: a typo or an unknown key fails lint and rendering instead of
    being ignored."""
    report = helm_python.lint(CHART, values, strict=True, namespace=NS)
    assert report["errors"] or [m for m in report["messages"] if m["severity"] >= 2], (values, report)
    with pytest.raises(helm_python.HelmValuesError) as e:
        render(chart, values)
    assert "schema" in str(e.value).lower(), str(e.value)


def test_a_subject_cn_template_without_namespaces_refuses_to_render(chart):
    with pytest.raises(helm_python.HelmRenderError) as e:
        render(chart, {"subjectCn": {"template": "{ns}.{sa}"}})
    assert "subjectCn.template needs subjectCn.namespaces" in str(e.value)


def test_self_signed_with_two_replicas_refuses_to_render(chart):
    with pytest.raises(helm_python.HelmRenderError) as e:
        render(chart, {"cacerts": {"selfSigned": True}, "replicaCount": 2})
    assert "cacerts.selfSigned=true with replicaCount=2" in str(e.value)
    assert "own self-signed root" in str(e.value)


@pytest.mark.parametrize("mode", MODES)
def test_container_args_per_mode(chart, mode):
    c = container(render(chart, MODES[mode]))
    assert c["args"] == EXPECTED_ARGS[mode]
    env = {e["name"]: e for e in c["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    # Istio's variable, only when the value is set.
    policy = MODES[mode].get("compliancePolicy")
    assert env.get("COMPLIANCE_POLICY", {}).get("value") == policy, env
    subject = MODES[mode].get("subjectCn")
    assert env.get("SIGNET_SUBJECT_CN_TEMPLATE", {}).get("value") == (subject or {}).get("template")
    if subject:
        assert env["SIGNET_SUBJECT_CN_NAMESPACES"]["value"] == "minio-users,etl"
    jwt_env = {k: e["value"] for k, e in env.items() if k.startswith(("SIGNET_JWT", "SIGNET_OIDC"))}
    assert jwt_env == EXPECTED_JWT_ENV.get(mode, {}), jwt_env


@pytest.mark.parametrize("mode", MODES)
def test_rbac_is_exactly_what_the_mode_needs(chart, mode):
    objs = render(chart, MODES[mode])
    assert rbac_rules(objs) == EXPECTED_RULES[mode]
    for o in objs:
        for r in o.get("rules", ()):
            for field in ("verbs", "resources", "apiGroups", "resourceNames", "nonResourceURLs"):
                assert not any("*" in x for x in r.get(field, ())), (o["metadata"]["name"], r)
            if "pods" in r.get("resources", ()):
                # Node impersonation watches pods; the pod certificate signer reads the
                # one pod (and service account) a request names. Nothing else.
                if set(r["verbs"]) == {"get"}:
                    assert mode in POD_CERT_MODES, (mode, r)
                    assert set(r["resources"]) == {"pods", "serviceaccounts"}, r
                else:
                    assert mode in PODS_MODES, (mode, r)
                    assert set(r["verbs"]) == {"list", "watch"}, r
                assert o["kind"] == "ClusterRole", r
                assert r["apiGroups"] == [""] and "resourceNames" not in r, r
            if "secrets" in r.get("resources", ()):
                # istiod's serving Secret, or the JWT key set's in the release namespace.
                assert o["kind"] == "Role", o
                assert (o["metadata"]["namespace"], o["metadata"]["name"]) in {
                    ("istio-system", "signet-system-signet-ca-istiod-secret"), (NS, "signet-ca-jwt-keys")}, o
    roles = {(o["kind"], o["metadata"]["name"], o["metadata"].get("namespace"))
             for o in objs if o["kind"] in ("Role", "ClusterRole")}
    bound = set()
    for b in (o for o in objs if o["kind"] in ("RoleBinding", "ClusterRoleBinding")):
        assert [(s["kind"], s["name"], s["namespace"]) for s in b["subjects"]] == [SA], b
        ref = b["roleRef"]
        bound.add((ref["kind"], ref["name"], b["metadata"].get("namespace")))
    assert roles <= bound, roles - bound  # every rule reaches the service account
    auth_delegator = ("ClusterRole", "system:auth-delegator", None) in bound
    assert auth_delegator == (MODES[mode].get("tokenAuth", {}).get("mode", "tokenReview") == "tokenReview")


def test_pod_hardening_probes_and_mounts(chart):
    objs = render(chart, {})
    deploy = one(objs, "Deployment")
    pod = deploy["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert deploy["spec"]["replicas"] == 2
    assert pod["securityContext"] == {"runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532,
                                      "fsGroup": 65532, "seccompProfile": {"type": "RuntimeDefault"}}
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"]
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["runAsUser"] == 65532
    assert c["resources"]["requests"] and c["resources"]["limits"]
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http-metrics"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http-metrics"}
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"grpc-ca": 15012, "http-metrics": 15014}
    anti = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert anti[0]["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["cacerts"]["mountPath"] == "/etc/cacerts" and mounts["cacerts"]["readOnly"]
    assert mounts["state"]["mountPath"] == "/var/lib/signet-ca"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["cacerts"]["secret"]["secretName"] == "cacerts"
    assert volumes["cacerts"]["secret"]["optional"] is False
    assert "emptyDir" in volumes["state"]
    svc = one(objs, "Service")
    assert [(p["name"], p["port"], p.get("appProtocol")) for p in svc["spec"]["ports"]] == [
        ("grpc-ca", 15012, "grpc"), ("http-metrics", 15014, "http")]
    assert one(objs, "PodDisruptionBudget")["spec"]["minAvailable"] == 1
    labels = deploy["metadata"]["labels"]
    for key in ("name", "instance", "version", "managed-by"):
        assert f"app.kubernetes.io/{key}" in labels
    assert deploy["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"] == "true"


def test_self_signed_has_no_cacerts_secret_and_no_pdb(chart):
    objs = render(chart, MODES["self-signed"])
    pod = one(objs, "Deployment")["spec"]["template"]["spec"]
    assert "cacerts" not in {v["name"] for v in pod["volumes"]}
    assert not [o for o in objs if o["kind"] == "PodDisruptionBudget"]


def notes(chart, values):
    out = chart.render(values, name=RELEASE, namespace=NS, is_install=True)
    [text] = [t for path, t in out.items() if path.endswith("NOTES.txt")]
    return text


def rotation_parts(objs):
    """The next set's mount and volume, and the rotation flags, as rendered."""
    spec = pod_spec(objs)
    mounts = [m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "cacerts-next"]
    volumes = [v for v in spec["volumes"] if v["name"] == "cacerts-next"]
    flags = [a for a in spec["containers"][0]["args"] if a.startswith(("--next-cacerts-dir", "--rotation-window"))]
    return mounts, volumes, flags


def test_rotation_mounts_the_next_secret_optional_by_default(chart):
    """Driven trust rotation: the next set's Secret is mounted whole, read-only and
    optional (the pod starts without it; creating it declares a rotation), with the key
    readable by the CA only, as cacerts; --next-cacerts-dir points at it."""
    mounts, volumes, flags = rotation_parts(render(chart, {}))
    assert mounts == [{"name": "cacerts-next", "mountPath": "/etc/cacerts-next", "readOnly": True}]
    assert "subPath" not in mounts[0]  # a subPath mount would never see the Secret appear
    assert volumes == [{"name": "cacerts-next", "secret": {
        "secretName": "cacerts-next", "optional": True, "defaultMode": 0o440}}]
    assert flags == ROTATION_ARGS

    objs = render(chart, MODES["rotation-custom"])
    mounts, volumes, flags = rotation_parts(objs)
    assert volumes[0]["secret"]["secretName"] == "mesh-ca-next"
    assert mounts[0]["mountPath"] == "/etc/cacerts-next"
    assert flags == ["--next-cacerts-dir=/etc/cacerts-next", "--rotation-window=30m"]
    # The cacerts Secret itself is untouched.
    cacerts = next(v for v in pod_spec(objs)["volumes"] if v["name"] == "cacerts")
    assert cacerts["secret"] == {"secretName": "cacerts", "optional": False, "defaultMode": 0o440}


def test_rotation_disabled_renders_neither_mount_nor_flags(chart):
    """rotation.enabled=false: no next Secret, no rotation flag (the binary's 1h window);
    the record's Role rules stay, as the CA reads the shared record in cluster mode anyway."""
    for values in (MODES["rotation-off"], {"rotation": {"enabled": False}, "cacerts": {"selfSigned": True},
                                           "replicaCount": 1}):
        objs = render(chart, values)
        assert rotation_parts(objs) == ([], [], []), values
        assert "cacerts-next" not in yaml.safe_dump(pod_spec(objs))
        assert ROTATION_RECORD <= rbac_rules(objs)
    # Its other values are then not checked: an empty name renders.
    objs = render(chart, {"rotation": {"enabled": False, "nextSecretName": ""}})
    assert rotation_parts(objs) == ([], [], [])


def test_self_signed_rotation_has_a_window_but_no_next_secret(chart):
    """A self-signed CA renews its root in its state directory (`signet-ca rotation start
    --self-signed`): the window is passed, no Secret is mounted."""
    objs = render(chart, MODES["self-signed"])
    assert rotation_parts(objs) == ([], [], ["--rotation-window=1h"])
    text = notes(chart, MODES["self-signed"])
    assert "rotation start --self-signed" in text and "cacerts-next" not in text


def test_notes_say_how_to_declare_a_rotation(chart):
    text = notes(chart, {})
    assert "cacerts-next in signet-system" in text
    assert "regarding.name=signet-ca-rotation" in text
    assert "rotation status" in text
    off = notes(chart, MODES["rotation-off"])
    assert "cacerts-next" not in off
    assert "rotation" not in off.split("3. Check a workload")[1]


def test_rotation_record_rules_sit_in_the_lease_role(chart):
    """The ConfigMap signet-ca-rotation and its Events are in the Lease's namespace (the
    release namespace, --leader-election-namespace): get and patch of that one ConfigMap,
    create of ConfigMaps (RBAC cannot limit it by name), create of events.k8s.io Events.
    Nothing cluster-wide beyond what the writers already had; no writer, no rules."""
    objs = render(chart, {})
    role = next(o for o in objs if o["kind"] == "Role" and o["metadata"]["name"] == "signet-ca-leader-election")
    assert role["metadata"]["namespace"] == NS
    assert f"--leader-election-namespace={NS}" in container(objs)["args"]
    assert role["rules"][2:] == [
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create"]},
        {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["signet-ca-rotation"],
         "verbs": ["get", "patch"]},
        {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create"]}]
    # Reading back what the writers keep needs no new rule: the root ConfigMaps are listed
    # with a metadata.name field selector (the ClusterRole's list on that name), the
    # ClusterTrustBundles and istiod's Secret are read by name (get, already granted).
    everything = rbac_rules(render(chart, MODES["everything"]))
    assert ("ClusterRole", None, "", "configmaps", "list", ("istio-ca-root-cert",)) in everything
    assert ("ClusterRole", None, "certificates.k8s.io", "clustertrustbundles", "get",
            ("signet.dev:spiffe:bundle",)) in everything
    assert ("Role", "istio-system", "", "secrets", "get", ("istiod-tls",)) in everything
    assert not [r for r in everything if r[3] == "events" and r[0] == "ClusterRole"]
    assert not [r for r in everything if r[3] == "configmaps" and "patch" == r[4] and r[0] == "ClusterRole"]
    # The record lives where the Lease is: with no writer there is neither.
    assert rbac_rules(render(chart, MODES["root-configmap-off"])) == set()
    # Alone, the Role is bound to the service account.
    binding = next(o for o in objs if o["kind"] == "RoleBinding"
                   and o["metadata"]["name"] == "signet-ca-leader-election")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]


@pytest.mark.parametrize("values, message", [
    ({"rotation": {"nextSecretName": ""}}, "rotation.nextSecretName is empty"),
    ({"rotation": {"nextSecretName": "cacerts"}}, 'rotation.nextSecretName="cacerts" is cacerts.secretName'),
    ({"cacerts": {"secretName": "mesh-ca"}, "rotation": {"nextSecretName": "mesh-ca"}},
     "the next set must be a Secret of its own"),
])
def test_rotation_values_that_cannot_work_refuse_to_render(chart, values, message):
    with pytest.raises(helm_python.HelmRenderError) as e:
        render(chart, values)
    assert message in str(e.value)


def test_every_rendered_flag_is_accepted_by_the_binary(chart):
    """Needs target/debug/signet-ca (or SIGNET_SIGNET_CA_BIN); fails, never skips, without it."""
    exe = binary("signet-ca")
    assert os.path.exists(exe), f"{exe} is missing: cargo build -p signet-ca first"
    proc = subprocess.run([exe, "serve", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    help_text = proc.stdout
    flags = {re.match(r"--[a-z0-9-]+", a).group(0)
             for values in MODES.values() for a in container(render(chart, values))["args"]
             if a.startswith("--")}
    missing = sorted(f for f in flags if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", help_text))
    assert not missing, f"flags the chart passes but `signet-ca serve --help` does not list: {missing}"


@pytest.mark.parametrize("mode", MODES)
def test_rendered_args_and_env_pass_the_binarys_own_checks(chart, mode):
    """`signet-ca serve --check-flags` with exactly the container's args and plain
    env values, in a pod's environment: every value the chart renders (durations,
    selectors, signer names, accounts) is one the binary accepts. (`--check-config`
    would also read the pod's files, which are not here.)"""
    exe = binary("signet-ca")
    c = container(render(chart, MODES[mode]))
    env = {e["name"]: e["value"] for e in c.get("env", ()) if "value" in e}
    env.update({"PATH": os.environ.get("PATH", ""), "KUBERNETES_SERVICE_HOST": "10.0.0.1",
                "KUBERNETES_SERVICE_PORT": "443"})
    proc = subprocess.run([exe, *c.get("command", [])[1:], *c["args"], "--check-flags"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, (mode, c["args"], proc.stderr)
    assert "flags are valid" in proc.stdout


def test_ambient_alone_renders_the_cluster_role(chart):
    """With TokenReview and every writer off, the pods rule is the ClusterRole's only rule,
    and the ClusterRole and its binding are still rendered."""
    values = {"rootConfigMap": {"enabled": False},
              "ambient": {"trustedNodeAccounts": ["istio-system/ztunnel"]}}
    objs = render(chart, values)
    assert rbac_rules(objs) == PODS
    role = one(objs, "ClusterRole")
    assert role["metadata"]["name"] == "signet-system-signet-ca"
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]}]
    bindings = {b["roleRef"]["name"] for b in objs if b["kind"] == "ClusterRoleBinding"}
    assert bindings == {"signet-system-signet-ca", "system:auth-delegator"}
    assert not [o for o in objs if o["kind"] in ("Role", "RoleBinding")]
    args = container(objs)["args"]
    assert "--trusted-node-accounts=istio-system/ztunnel" in args
    assert not [a for a in args if a.startswith("--leader-election")]


@pytest.mark.parametrize("bad", ["ztunnel", "istio-system/", "/ztunnel", "a/b/c", "a/b,c/d", "istio-system/ zt"])
def test_malformed_trusted_node_account_refuses_to_render(chart, bad):
    with pytest.raises(helm_python.HelmRenderError) as e:
        render(chart, {"ambient": {"trustedNodeAccounts": [bad]}})
    assert "ambient.trustedNodeAccounts" in str(e.value)
    assert "want <namespace>/<service account>" in str(e.value)


def cluster_role(objs):
    return next(o for o in objs if o["kind"] == "ClusterRole" and o["metadata"]["name"] == "signet-system-signet-ca")


@pytest.mark.parametrize("ctb_signer, attest", [
    ("signet.dev/spiffe", ["signet.dev/spiffe"]),
    ("signet.dev/mesh-roots", ["signet.dev/mesh-roots", "signet.dev/spiffe"]),
])
def test_pod_certificates_share_the_cluster_trust_bundle_rules(chart, ctb_signer, attest):
    """The pod certificate signer's ClusterTrustBundle needs the same rules as the
    clusterTrustBundle writer: rendered once, with each signer name once."""
    objs = render(chart, {"clusterTrustBundle": {"enabled": True, "signerName": ctb_signer},
                          "podCertificates": {"enabled": True}})
    rules = cluster_role(objs)["rules"]
    ctb = [r for r in rules if "clustertrustbundles" in r.get("resources", ())]
    assert len(ctb) == 2, rules
    named = [r["resourceNames"] for r in ctb if "update" in r["verbs"]]
    assert named == [[s.replace("/", ":") + ":bundle" for s in attest]], rules
    attests = [r for r in rules if "attest" in r.get("verbs", ())]
    assert len(attests) == 1 and attests[0]["resourceNames"] == attest, rules
    signs = [r for r in rules if "sign" in r.get("verbs", ())]
    assert signs == [{"apiGroups": ["certificates.k8s.io"], "resources": ["signers"], "verbs": ["sign"],
                      "resourceNames": ["signet.dev/spiffe"]}], rules
    args = container(objs)["args"]
    assert f"--cluster-trust-bundle-signer={ctb_signer}" in args
    assert "--pod-certificate-signer=signet.dev/spiffe" in args


def test_pod_certificates_alone_are_a_writer(chart):
    """With every other writer off, pod certificates still elect a writer: the Lease Role
    and the leader election flags are rendered."""
    objs = render(chart, {"rootConfigMap": {"enabled": False}, "podCertificates": {"enabled": True}})
    assert rbac_rules(objs) == POD_CERTS | TRUST_BUNDLE | WRITER
    assert "--leader-election-lease=signet-ca-writer" in container(objs)["args"]


@pytest.mark.parametrize("values, message", [
    ({"signerName": "spiffe"}, "want <domain>/<path>"),
    ({"signerName": "signet.dev/mesh/roots"}, "want <domain>/<path>"),
    ({"signerName": "Signet.dev/spiffe"}, "want <domain>/<path>"),
    ({"signerName": "signet.dev/spi_ffe"}, "want <domain>/<path>"),
    ({"signerName": "kubernetes.io/spiffe"}, "reserved"),
    ({"signerName": "pods.kubernetes.io/spiffe"}, "reserved"),
    ({"allow": ["apps/web/extra"]}, "podCertificates.allow"),
    ({"deny": ["apps/"]}, "podCertificates.deny"),
    ({"deny": ["apps,db"]}, "podCertificates.deny"),
])
def test_malformed_pod_certificate_values_refuse_to_render(chart, values, message):
    with pytest.raises(helm_python.HelmRenderError) as e:
        render(chart, {"podCertificates": {"enabled": True, **values}})
    assert message in str(e.value)


def pod_spec(objs):
    return one(objs, "Deployment")["spec"]["template"]["spec"]


def test_multi_cluster_mounts_each_remote_clusters_files(chart):
    """Each remote cluster's kubeconfig Secret and JWKS ConfigMap land where its flags
    point; a JWKS given by URL needs no volume."""
    spec = pod_spec(render(chart, MODES["multi-cluster"]))
    mounts = {m["name"]: m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
    assert mounts["remote-0"] == "/etc/signet/remote/west"
    assert mounts["remote-1"] == "/etc/signet/remote/north"
    volumes = {v["name"]: v for v in spec["volumes"]}
    sources = lambda name: volumes[name]["projected"]["sources"]  # noqa: E731
    assert sources("remote-0") == [{"secret": {"name": "west-kubeconfig", "items": [
        {"key": "kubeconfig", "path": "kubeconfig"}]}}]
    assert sources("remote-1") == [{"configMap": {"name": "north-jwks", "items": [
        {"key": "jwks.json", "path": "jwks.json"}]}}]
    assert [list(s) for s in sources("remote-2")] == [["secret"]]


def test_cluster_ids_that_are_no_volume_names_and_large_limits_render_valid_objects(chart):
    """Istio cluster names may have upper case, `_` and `.`; limits up to the binary's
    maximum come through as integers, not `1e+06`."""
    values = {"multiCluster": {"remoteClusters": [{"id": "US_East.1", "kubeconfigSecret": "k"}]},
              "limits": {"maxConnections": 1000000, "maxPending": 1000000},
              "connections": {"maxPerPeer": 1000000}}
    objs = render(chart, values)
    for o in objs:
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(o, version, strict=True)
    args = container(objs)["args"]
    assert "--remote-cluster=US_East.1=/etc/signet/remote/US_East.1/kubeconfig" in args
    for flag in ("--max-connections=1000000", "--max-pending=1000000",
                 "--max-connections-per-peer=1000000"):
        assert flag in args, args


@pytest.mark.parametrize("remote, message", [
    ({"id": "Kubernetes", "kubeconfigSecret": "k"}, "is this cluster"),
    ({"id": "west"}, "needs kubeconfigSecret"),
    ({"id": "west", "jwks": {"issuer": "https://w", "url": "https://w/j", "configMap": "c"}},
     "exactly one of url and configMap"),
])
def test_malformed_remote_clusters_refuse_to_render(chart, remote, message):
    with pytest.raises(helm_python.HelmRenderError) as e:
        render(chart, {"multiCluster": {"remoteClusters": [remote]}})
    assert message in str(e.value)


def test_escape_hatches_and_openshift_uids(chart):
    """What operators add: flags, variables, volumes, annotations, a priority class;
    and the security contexts with the UIDs left to OpenShift's restricted-v2."""
    values = {
        "extraArgs": ["--max-pending=1024"],
        "extraEnv": [{"name": "HTTPS_PROXY", "value": "http://proxy:3128"}],
        "extraVolumes": [{"name": "jwks-ca", "configMap": {"name": "corp-ca"}}],
        "extraVolumeMounts": [{"name": "jwks-ca", "mountPath": "/etc/corp-ca", "readOnly": True}],
        "podAnnotations": {"example.com/team": "mesh"},
        "priorityClassName": "system-cluster-critical",
        "podSecurityContext": {"runAsUser": None, "runAsGroup": None, "fsGroup": None},
        "containerSecurityContext": {"runAsUser": None, "runAsGroup": None},
    }
    objs = render(chart, values)
    for o in objs:
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(o, version, strict=True)
    spec = pod_spec(objs)
    c = spec["containers"][0]
    assert c["args"][-1] == "--max-pending=1024"
    assert {"name": "HTTPS_PROXY", "value": "http://proxy:3128"} in c["env"]
    assert {"name": "jwks-ca", "mountPath": "/etc/corp-ca", "readOnly": True} in c["volumeMounts"]
    assert {"name": "jwks-ca", "configMap": {"name": "corp-ca"}} in spec["volumes"]
    assert one(objs, "Deployment")["spec"]["template"]["metadata"]["annotations"]["example.com/team"] == "mesh"
    assert spec["priorityClassName"] == "system-cluster-critical"
    # No UID or GID is set, and the rest of the hardening stays.
    assert spec["securityContext"] == {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    assert c["securityContext"] == {
        "runAsNonRoot": True, "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
        "privileged": False, "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}
    with pytest.raises(helm_python.HelmValuesError):
        render(chart, {"extraArgs": ["serve"]})


def test_scheduling_defaults(chart):
    """Linux nodes; several replicas spread over zones; one replica is not spread; a
    startup probe guards liveness."""
    spec = pod_spec(render(chart, {}))
    assert spec["nodeSelector"] == {"kubernetes.io/os": "linux"}
    [zones] = spec["topologySpreadConstraints"]
    assert zones["topologyKey"] == "topology.kubernetes.io/zone"
    assert zones["whenUnsatisfiable"] == "ScheduleAnyway"
    assert zones["labelSelector"]["matchLabels"] == {
        "app.kubernetes.io/name": "signet-ca", "app.kubernetes.io/instance": RELEASE}
    assert "topologySpreadConstraints" not in pod_spec(render(chart, MODES["self-signed"]))
    own = [{"maxSkew": 2, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "DoNotSchedule",
            "labelSelector": {"matchLabels": {"a": "b"}}}]
    assert pod_spec(render(chart, {"topologySpreadConstraints": own}))["topologySpreadConstraints"] == own
    probe = spec["containers"][0]["startupProbe"]
    assert probe["httpGet"] == {"path": "/healthz", "port": "http-metrics"}


@pytest.mark.parametrize("image, want", [
    ({}, "signet-ca:0.1.0"),
    ({"registry": "registry.example/mesh", "tag": "1.2.3"}, "registry.example/mesh/signet-ca:1.2.3"),
    ({"registry": "registry.example", "tag": "1.2.3", "digest": "sha256:" + "ab" * 32},
     "registry.example/signet-ca@sha256:" + "ab" * 32),
])
def test_image_reference(chart, image, want):
    assert container(render(chart, {"image": image}))["image"] == want


def test_a_malformed_digest_is_refused(chart):
    with pytest.raises(helm_python.HelmValuesError):
        render(chart, {"image": {"digest": "latest"}})


def test_monitors_and_network_policy(chart):
    objs = render(chart, {"serviceMonitor": {"enabled": True, "labels": {"release": "kps"}},
                          "podMonitor": {"enabled": True},
                          "networkPolicy": {"enabled": True}})
    service = one(objs, "Service")
    sm = one(objs, "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["release"] == "kps"
    assert sm["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [e["port"] for e in sm["spec"]["endpoints"]] == ["http-metrics"]
    assert "http-metrics" in {p["name"] for p in service["spec"]["ports"]}
    pm = one(objs, "PodMonitor")
    assert [e["port"] for e in pm["spec"]["podMetricsEndpoints"]] == ["http-metrics"]
    pod_ports = {p["name"] for p in container(objs)["ports"]}
    assert "http-metrics" in pod_ports
    np = one(objs, "NetworkPolicy")
    for version in KUBE_VERSIONS:
        kubernetes_validate.validate(np, version, strict=True)
    ingress = {r["ports"][0]["port"]: r.get("from") for r in np["spec"]["ingress"]}
    assert ingress[15012] == [{"namespaceSelector": {}}]
    assert ingress[15014] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    egress_ports = {p["port"] for r in np["spec"]["egress"] for p in r["ports"]}
    assert egress_ports == {443, 6443, 53}
    assert not [o for o in render(chart, {}) if o["kind"] in ("ServiceMonitor", "PodMonitor", "NetworkPolicy")]


def jwt_env(objs):
    return {e["name"]: e.get("value") for e in container(objs)["env"]
            if e["name"].startswith(("SIGNET_JWT", "SIGNET_OIDC"))}


def test_jwt_svids_and_oidc_are_off_by_default(chart):
    """No JWT or OIDC variable, port, volume, Service, Role or NetworkPolicy rule unless
    asked for; the OIDC values alone (issuer, TLS Secret) change nothing."""
    for values in ({}, {"oidc": {"issuer": "https://oidc.example.com", "tlsSecretName": "oidc-tls"}},
                   {"networkPolicy": {"enabled": True}}):
        objs = render(chart, values)
        assert jwt_env(objs) == {}, values
        c = container(objs)
        assert {p["name"] for p in c["ports"]} == {"grpc-ca", "http-metrics"}
        assert "oidc-tls" not in {m["name"] for m in c["volumeMounts"]}
        assert "oidc-tls" not in {v["name"] for v in pod_spec(objs)["volumes"]}
        assert [o["metadata"]["name"] for o in objs if o["kind"] == "Service"] == [FULLNAME]
        assert not [o for o in objs if o["kind"] in ("Role", "RoleBinding") and "jwt" in o["metadata"]["name"]]
        assert not [r for r in rbac_rules(objs) if r[3] == "secrets"]
        for np in (o for o in objs if o["kind"] == "NetworkPolicy"):
            assert [r["ports"][0]["port"] for r in np["spec"]["ingress"]] == [15012, 15014]


def test_jwt_svids_keep_their_keys_in_a_secret_every_replica_writes(chart):
    """JWT-SVIDs: the key set is always in a Secret of the release namespace (a file in
    --state-dir would differ per replica), and its Role is bound whether or not a writer
    elects a leader: every replica reads and writes it."""
    objs = render(chart, {"rootConfigMap": {"enabled": False}, "jwtSvids": {"enabled": True}})
    assert jwt_env(objs) == JWT_ON
    assert rbac_rules(objs) == JWT_KEYS
    role = next(o for o in objs if o["kind"] == "Role")
    assert (role["metadata"]["name"], role["metadata"]["namespace"]) == ("signet-ca-jwt-keys", NS)
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]},
        {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["signet-ca-jwt-keys"],
         "verbs": ["get", "update"]}]
    binding = one(objs, "RoleBinding")
    assert binding["metadata"]["namespace"] == NS
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": "signet-ca-jwt-keys"}
    assert [(s["kind"], s["name"], s["namespace"]) for s in binding["subjects"]] == [SA]
    args = container(objs)["args"]
    assert not [a for a in args if a.startswith(("--leader-election", "--jwt", "--oidc"))], args
    # No listener of its own: JwtSvidService is on the CA's gRPC port.
    assert {p["name"] for p in container(objs)["ports"]} == {"grpc-ca", "http-metrics"}
    assert len([o for o in objs if o["kind"] == "Service"]) == 1

    objs = render(chart, {"jwtSvids": {"enabled": True, "keysSecretName": "mesh-jwt"},
                          "fullnameOverride": "mesh-ca"})
    assert jwt_env(objs)["SIGNET_JWT_KEYS_SECRET"] == "signet-system/mesh-jwt"
    role = next(o for o in objs if o["kind"] == "Role" and o["metadata"]["name"] == "mesh-ca-jwt-keys")
    assert role["rules"][1]["resourceNames"] == ["mesh-jwt"]
    # The default name follows the fullname.
    objs = render(chart, {"jwtSvids": {"enabled": True}, "fullnameOverride": "mesh-ca"})
    assert jwt_env(objs)["SIGNET_JWT_KEYS_SECRET"] == "signet-system/mesh-ca-jwt-keys"


def test_an_issuer_without_the_oidc_listener_is_still_the_tokens_iss(chart):
    objs = render(chart, {"jwtSvids": {"enabled": True}, "oidc": {"issuer": "https://oidc.example.com"}})
    assert jwt_env(objs) == {**JWT_ON, "SIGNET_OIDC_ISSUER": "https://oidc.example.com"}
    assert len([o for o in objs if o["kind"] == "Service"]) == 1
    assert container(objs)["args"] == EXPECTED_ARGS["default"]


def test_oidc_listener_service_certificate_and_network_policy(chart):
    """OIDC discovery: its own port, its own Service (443 by default, so the issuer needs no
    port), the TLS Secret mounted whole and read-only where the variables point, and an
    ingress rule from anywhere unless oidcFrom says otherwise."""
    values = {**MODES["oidc"], "networkPolicy": {"enabled": True},
              "oidc": {**MODES["oidc"]["oidc"],
                       "service": {"type": "LoadBalancer", "annotations": {"example.com/lb": "public"}}}}
    objs = render(chart, values)
    for o in objs:
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(o, version, strict=True)
    c = container(objs)
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {
        "grpc-ca": 15012, "http-metrics": 15014, "https-oidc": 8443}
    assert jwt_env(objs) == EXPECTED_JWT_ENV["oidc"]
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["oidc-tls"] == {"name": "oidc-tls", "mountPath": "/etc/signet/oidc-tls", "readOnly": True}
    assert "subPath" not in mounts["oidc-tls"]  # a subPath mount would never see a renewal
    volumes = {v["name"]: v for v in pod_spec(objs)["volumes"]}
    assert volumes["oidc-tls"]["secret"] == {
        "secretName": "oidc-tls", "optional": False, "defaultMode": 0o440,
        "items": [{"key": "tls.crt", "path": "tls.crt"}, {"key": "tls.key", "path": "tls.key"}]}
    services = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Service"}
    assert set(services) == {FULLNAME, "signet-ca-oidc"}
    # The CA's Service is unchanged: exposing discovery does not expose 15012.
    assert [p["name"] for p in services[FULLNAME]["spec"]["ports"]] == ["grpc-ca", "http-metrics"]
    assert services[FULLNAME]["spec"]["type"] == "ClusterIP"
    oidc = services["signet-ca-oidc"]
    assert oidc["spec"]["type"] == "LoadBalancer"
    assert oidc["metadata"]["annotations"] == {"example.com/lb": "public"}
    assert oidc["spec"]["selector"] == one(objs, "Deployment")["spec"]["selector"]["matchLabels"]
    assert oidc["spec"]["ports"] == [{"name": "https-oidc", "port": 443, "targetPort": "https-oidc",
                                      "protocol": "TCP", "appProtocol": "https"}]
    ingress = {r["ports"][0]["port"]: r for r in one(objs, "NetworkPolicy")["spec"]["ingress"]}
    assert set(ingress) == {15012, 15014, 8443}
    assert "from" not in ingress[8443]
    # The CA's own certificate is not touched when the listener has its own.
    assert c["args"] == EXPECTED_ARGS["oidc"]

    peers = [{"ipBlock": {"cidr": "10.0.0.0/8"}}]
    objs = render(chart, {**MODES["oidc"], "listenAddress": "0.0.0.0",
                          "networkPolicy": {"enabled": True, "oidcFrom": peers},
                          "oidc": {**MODES["oidc"]["oidc"], "port": 9443, "service": {"port": 8443}}})
    assert jwt_env(objs)["SIGNET_OIDC_ADDR"] == "0.0.0.0:9443"
    assert {p["name"]: p["containerPort"] for p in container(objs)["ports"]}["https-oidc"] == 9443
    ingress = {r["ports"][0]["port"]: r for r in one(objs, "NetworkPolicy")["spec"]["ingress"]}
    assert ingress[9443]["from"] == peers
    oidc = next(o for o in objs if o["kind"] == "Service" and o["metadata"]["name"] == "signet-ca-oidc")
    assert (oidc["spec"]["ports"][0]["port"], oidc["spec"]["ports"][0]["targetPort"]) == (8443, "https-oidc")


def test_oidc_with_the_cas_certificate_names_the_issuers_host(chart):
    """Without oidc.tlsSecretName the listener serves the CA's certificate: the issuer's
    host joins --serving-dns-names (once, in lower case); an IP address cannot be a DNS name
    and is left out."""
    objs = render(chart, MODES["oidc-ca-certificate"])
    c = container(objs)
    assert "oidc-tls" not in {m["name"] for m in c["volumeMounts"]}
    assert "oidc-tls" not in {v["name"] for v in pod_spec(objs)["volumes"]}
    assert "SIGNET_OIDC_TLS_CERT" not in jwt_env(objs)

    def serving(values):
        [names] = [a for a in container(render(chart, values))["args"] if a.startswith("--serving-dns-names=")]
        return names.split("=", 1)[1].split(",")

    base = ["signet-ca.signet-system.svc", "signet-ca.signet-system.svc.cluster.local"]
    on = {"jwtSvids": {"enabled": True}, "oidc": {"enabled": True}}
    assert serving({**on, "oidc": {"enabled": True, "issuer": "https://OIDC.example.com:8443/mesh"}}) == [
        *base, "oidc.example.com"]
    assert serving({**on, "oidc": {"enabled": True, "issuer": "https://oidc.example.com"},
                    "extraServingDnsNames": ["oidc.example.com"]}) == [*base, "oidc.example.com"]
    assert serving({**on, "oidc": {"enabled": True, "issuer": "https://10.0.0.7"}}) == base
    assert serving({**on, "oidc": {"enabled": True, "issuer": "https://[fd00::7]:8443"}}) == base


def test_the_oidc_service_name_is_a_dns_label(chart):
    objs = render(chart, {**MODES["oidc"], "fullnameOverride": "x" * 63})
    names = [o["metadata"]["name"] for o in objs if o["kind"] == "Service"]
    assert names == ["x" * 63, "x" * 58 + "-oidc"]


@pytest.mark.parametrize("values, message", [
    ({"oidc": {"enabled": True, "issuer": "https://oidc.example.com"}},
     "oidc.enabled needs jwtSvids.enabled"),
    ({"jwtSvids": {"enabled": True}, "oidc": {"enabled": True}}, "oidc.enabled needs oidc.issuer"),
    ({"jwtSvids": {"enabled": True}, "oidc": {"enabled": True, "issuer": "https://oidc.example.com/"}},
     'oidc.issuer="https://oidc.example.com/": want an https URL'),
    ({"jwtSvids": {"enabled": True}, "oidc": {"enabled": True, "issuer": "https://oidc.example.com?a=b"}},
     "without a trailing slash, query or fragment"),
    ({"jwtSvids": {"enabled": True}, "oidc": {"enabled": True, "issuer": "https://oidc.example.com#x"}},
     "without a trailing slash, query or fragment"),
    ({"jwtSvids": {"enabled": True}, "oidc": {"enabled": True, "issuer": "https:///keys"}},
     "want an https URL"),
    ({"jwtSvids": {"enabled": True}, "oidc": {"enabled": True, "issuer": "https://oidc example.com"}},
     "want an https URL"),
    # The issuer is the tokens' `iss` even without the listener: checked there too.
    ({"jwtSvids": {"enabled": True}, "oidc": {"issuer": "https://oidc.example.com/"}}, "oidc.issuer="),
    ({"jwtSvids": {"enabled": True}, "oidc": {"enabled": True, "issuer": "https://o.example", "port": 15012}},
     "oidc.port=15012 is taken"),
    ({"jwtSvids": {"enabled": True}, "oidc": {"enabled": True, "issuer": "https://o.example", "port": 15014}},
     "oidc.port=15014 is taken"),
])
def test_jwt_and_oidc_combinations_that_cannot_work_refuse_to_render(chart, values, message):
    with pytest.raises(helm_python.HelmRenderError) as e:
        render(chart, values)
    assert message in str(e.value)


def test_a_plain_http_issuer_is_refused_even_without_the_schema(capfd):
    """The schema refuses http:// (test_unknown_or_misspelt_values_are_errors); with schema
    validation skipped (helm --skip-schema-validation) the chart's own check still does. As
    in the Kubernetes-version test below, lint logs a template's `fail`."""
    values = {"jwtSvids": {"enabled": True}, "oidc": {"enabled": True, "issuer": "http://oidc.example.com"}}
    capfd.readouterr()
    report = helm_python.lint(CHART, values, strict=True, namespace=NS, skip_schema_validation=True)
    logged = [line for line in capfd.readouterr().err.splitlines() if "fail message" in line]
    errors = [m["error"] for m in report["messages"] if m["severity"] == 3] + report["errors"] + logged
    assert [e for e in errors if "want an https URL" in e], (report, logged)


def test_features_newer_than_the_floor_are_refused_by_name(capfd):
    """The basic modes work on Kubernetes 1.31 (the chart's floor); ClusterTrustBundle
    needs 1.33 and pod certificates 1.36, and the refusal names the feature, not the
    chart. Helm renders for another Kubernetes version only when linting, and there
    its engine logs a template's `fail` instead of raising it: the message is read
    from that log."""
    def refusals(values, version):
        capfd.readouterr()
        report = helm_python.lint(CHART, values, strict=True, namespace=NS, kube_version=version)
        errors = [m["error"] for m in report["messages"] if m["severity"] == 3] + report["errors"]
        return errors + [line for line in capfd.readouterr().err.splitlines() if "fail message" in line]

    for mode in ("default", "jwks", "ambient", "istiod-secret", "multi-cluster"):
        assert refusals(MODES[mode], "v1.31.0") == [], mode
    [ctb] = refusals(MODES["cluster-trust-bundle"], "v1.32.0")
    assert "clusterTrustBundle.enabled needs Kubernetes 1.33" in ctb and "v1.32.0" in ctb
    assert refusals(MODES["cluster-trust-bundle"], "v1.33.0") == []
    [pcr] = refusals(MODES["pod-certificates"], "v1.35.0")
    assert "podCertificates.enabled needs Kubernetes 1.36" in pcr
    assert refusals(MODES["pod-certificates"], "v1.36.0") == []
    # The chart's own floor, which `helm install` checks against the cluster.
    assert yaml.safe_load((CHART / "Chart.yaml").read_text())["kubeVersion"] == ">=1.31.0-0"


def test_the_chart_packages_and_the_archive_renders(tmp_path):
    """scripts/package-chart.sh, as CI runs it: a .tgz that Helm loads and renders."""
    out = tmp_path / "dist"
    r = subprocess.run([ROOT / "scripts" / "package-chart.sh", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    [archive] = out.glob("signet-*.tgz")
    assert archive.name == "signet-0.1.0.tgz"
    with helm_python.Chart.load(archive) as packaged:
        objs = render(packaged, {})
    assert container(objs)["image"] == "signet-ca:0.1.0"
