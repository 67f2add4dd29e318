"""signet-agent's SPIFFE Workload API driven by py-spiffe (PyPI `spiffe`), a client we
did not write, and by raw grpcio calls with py-spiffe's own stubs of the standard's
proto (ours would clash with them in one descriptor pool: the proto has no package): the
X.509-SVID, its key and bundle, checked with `cryptography` and `openssl verify`; a
rotation pushed on the open watch; `SPIFFE_ENDPOINT_SOCKET`; the standard's refusals."""

import os
import tempfile
import threading
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives import hashes
from spiffe import TrustDomain, WorkloadApiClient, X509Source

from spiffe._proto import workload_pb2, workload_pb2_grpc
from conftest import openssl_verify, start_agent, stop_agent

SPIFFE = "spiffe://cluster.local/ns/default/sa/bookinfo"


def api_agent(ca, cluster, *extra):
    workdir = Path(tempfile.mkdtemp(prefix="wl", dir="/tmp"))
    socket = workdir / "api" / "agent.sock"
    agent = start_agent(ca, cluster, workdir=workdir,
                        extra_args=["--workload-api-socket", str(socket), *extra])
    return agent, socket


@pytest.fixture(scope="module")
def agent(ca, cluster):
    agent, socket = api_agent(ca, cluster)
    yield agent, socket
    stop_agent(agent)


def test_py_spiffe_gets_the_svid_key_and_bundle(agent, ca):
    _, socket = agent
    client = WorkloadApiClient(socket_path=f"unix://{socket}")
    try:
        svid = client.fetch_x509_svid(timeout=30)
        bundles = client.fetch_x509_bundles(timeout=30)
    finally:
        client.close()
    assert str(svid.spiffe_id) == SPIFFE
    # The key is the leaf's: a signature made with it verifies with the leaf's key.
    signature = svid.private_key.sign(b"proof", ec.ECDSA(hashes.SHA256()))
    svid.leaf.public_key().verify(signature, b"proof", ec.ECDSA(hashes.SHA256()))
    bundle = bundles.get_bundle_for_trust_domain(TrustDomain("cluster.local"))
    roots = list(bundle.x509_authorities)
    assert [r.public_bytes(serialization.Encoding.PEM) for r in roots] == [ca.root_pem]
    chain = [c.public_bytes(serialization.Encoding.PEM).decode() for c in svid.cert_chain]
    with tempfile.TemporaryDirectory() as d:
        result = openssl_verify(ca.root_pem, chain + [ca.root_pem.decode()], d)
        assert result.returncode == 0, result.stdout + result.stderr


def test_spiffe_endpoint_socket_is_how_workloads_find_it(agent, monkeypatch):
    _, socket = agent
    monkeypatch.setenv("SPIFFE_ENDPOINT_SOCKET", f"unix://{socket}")
    source = X509Source(timeout_in_seconds=30)
    try:
        assert str(source.get_x509_context().default_svid.spiffe_id) == SPIFFE
    finally:
        source.close()


def test_a_rotation_is_pushed_on_the_watch(ca, cluster):
    agent, socket = api_agent(ca, cluster, "--secret-ttl", "4s")
    client = WorkloadApiClient(socket_path=f"unix://{socket}")
    serials, errors, two = [], [], threading.Event()

    def on_success(context):
        serials.append(context.default_svid.leaf.serial_number)
        if len(set(serials)) >= 2:
            two.set()

    handle = client.stream_x509_contexts(on_success=on_success, on_error=errors.append)
    try:
        # Half of 4 s; 30 s is only a backstop.
        assert two.wait(30), (serials, errors)
    finally:
        handle.cancel()
        client.close()
        stop_agent(agent)
    assert not errors, errors


def raw_stub(socket):
    channel = grpc.insecure_channel(f"unix://{socket}")
    return channel, workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)


def test_without_the_security_header_invalid_argument(agent):
    _, socket = agent
    channel, stub = raw_stub(socket)
    with channel:
        with pytest.raises(grpc.RpcError) as e:
            next(stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), timeout=30))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "workload.spiffe.io" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            next(stub.FetchX509Bundles(workload_pb2.X509BundlesRequest(), timeout=30))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # With it: the raw message, as the standard encodes it.
        response = next(stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), timeout=30,
                                           metadata=[("workload.spiffe.io", "true")]))
        assert [s.spiffe_id for s in response.svids] == [SPIFFE]
        bundles = next(stub.FetchX509Bundles(workload_pb2.X509BundlesRequest(), timeout=30,
                                             metadata=[("workload.spiffe.io", "true")]))
        assert list(bundles.bundles) == ["spiffe://cluster.local"]


def test_jwt_calls_against_a_ca_without_jwt_svids(agent):
    _, socket = agent
    channel, stub = raw_stub(socket)
    md = [("workload.spiffe.io", "true")]
    with channel:
        with pytest.raises(grpc.RpcError) as e:
            stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(audience=["minio"]), metadata=md,
                              timeout=30)
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
        # No JWT keys yet: an empty set, so bundle sources that also watch JWT
        # bundles start.
        bundles = stub.FetchJWTBundles(workload_pb2.JWTBundlesRequest(), metadata=md, timeout=30)
        assert dict(next(bundles).bundles) == {}
        bundles.cancel()
        with pytest.raises(grpc.RpcError) as e:
            stub.ValidateJWTSVID(workload_pb2.ValidateJWTSVIDRequest(audience="a", svid="x.y.z"),
                                 metadata=md, timeout=30)
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_the_socket_is_not_world_accessible(agent):
    _, socket = agent
    assert os.stat(socket).st_mode & 0o777 == 0o660
