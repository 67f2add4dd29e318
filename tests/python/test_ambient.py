"""Node impersonation as ztunnel does it, from a stock grpcio client: ztunnel's own
token (bound to its pod), the `clusterid` header, and the target in the request's
`metadata` Struct under `ImpersonatedIdentity`. signet-ca watches the pods of the
stateful test API server (`tests/src/kube.rs`, run as `test-apiserver`); the issued
chain is checked with openssl and the SAN with `cryptography`."""

import json
import subprocess
import tempfile
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from google.protobuf import struct_pb2

from conftest import binary, make_csr, openssl_verify, request, start_ca, stop_ca

WEB = "spiffe://cluster.local/ns/apps/sa/web"
DB = "spiffe://cluster.local/ns/apps/sa/db"


def pod(ns, name, uid, sa, node):
    return {"plural": "pods",
            "metadata": {"namespace": ns, "name": name, "uid": uid},
            "spec": {"serviceAccountName": sa, "nodeName": node,
                     "containers": [{"name": "app", "image": "app"}]}}


@pytest.fixture(scope="module")
def ambient(cluster):
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        objects = [{"plural": "namespaces", "metadata": {"name": ns}} for ns in ("istio-system", "apps")]
        # conftest's tokens are bound to pod "<sa>-pod" with UID "p1".
        objects += [pod("istio-system", "ztunnel-pod", "p1", "ztunnel", "node-a"),
                    pod("apps", "web-1", "w1", "web", "node-a"),
                    pod("apps", "db-1", "d1", "db", "node-b")]
        (d / "objects.json").write_text(json.dumps(objects))
        api = subprocess.Popen([binary("test-apiserver"), str(d / "objects.json"), str(d)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert api.stdout.readline().strip() == "ready"
        ca = start_ca(d, cluster, ["--no-token-review", "--kubeconfig", str(d / "kubeconfig"),
                                   "--trusted-node-accounts", "istio-system/ztunnel"])
        try:
            yield ca, d
        finally:
            stop_ca(ca)
            api.stdin.close()
            api.wait(timeout=30)


def impersonating(target):
    md = struct_pb2.Struct()
    md.update({"ImpersonatedIdentity": target})
    return md


def test_ztunnel_gets_a_pod_on_its_node_verified_by_openssl(ambient, cluster):
    ca, d = ambient
    _, csr = make_csr(uri=WEB)
    token = cluster.token(ns="istio-system", sa="ztunnel")
    chain = list(request(ca.stub(), csr, token, ttl=3600, metadata=impersonating(WEB)).cert_chain)
    # Against the root the CA wrote at start, not the one the answer carries.
    result = openssl_verify(ca.root_pem, chain, d)
    assert result.returncode == 0, result.stdout + result.stderr
    leaf = x509.load_pem_x509_certificate(chain[0].encode())
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [WEB]
    # The audit line names the identity issued, the caller who asked and its node.
    serial = format(leaf.serial_number, "x")
    ca.log.flush()
    lines = [line for line in Path(ca.log.name).read_text().splitlines()
             if "certificate issued" in line and serial in line.lower()]
    assert len(lines) == 1, lines
    for field in (f'spiffe_id={WEB}', 'caller=istio-system/ztunnel', 'node="node-a"',
                  'pod="ztunnel-pod"'):
        assert field in lines[0], (field, lines[0])


def test_a_pod_on_another_node_and_an_untrusted_caller_are_refused(ambient, cluster):
    ca, _ = ambient
    _, csr = make_csr(uri=DB)
    ztunnel = cluster.token(ns="istio-system", sa="ztunnel")
    with pytest.raises(grpc.RpcError) as e:
        request(ca.stub(), csr, ztunnel, metadata=impersonating(DB))
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "not allowed to impersonate" in e.value.details() and "node-a" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        request(ca.stub(), csr, cluster.token(ns="apps", sa="web"), metadata=impersonating(DB))
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "--trusted-node-accounts" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        request(ca.stub(), csr, ztunnel, metadata=impersonating("spiffe://elsewhere/ns/apps/sa/db"))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # A value that is not a string is refused, not taken as "no impersonation" (which
    # would issue ztunnel's own identity).
    _, own = make_csr()
    with pytest.raises(grpc.RpcError) as e:
        request(ca.stub(), own, ztunnel, metadata=impersonating(42))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "must be a string" in e.value.details()
