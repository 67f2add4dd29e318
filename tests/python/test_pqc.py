"""Istio's compliance policies on signet-ca's TLS listener and signet-agent's CA client,
driven by a client built on none of the server's crypto: OpenSSL >= 3.5 (4.0 as PyPI
`cryptography` bundles it, through pyOpenSSL) speaking gRPC over HTTP/2 with the `h2` package.
The agent's ClientHello is read off the wire and parsed here."""

import os
import re
import socket
import struct
import subprocess
import tempfile
import time
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import pytest
from OpenSSL import SSL
from OpenSSL._util import lib as openssl_lib
from cryptography import x509

from conftest import (SERVER_NAME, binary, ca_pb2, free_port, make_csr, openssl_verify,
                      start_agent, start_ca, stop_agent, stop_ca)

SPIFFE = "spiffe://cluster.local/ns/default/sa/bookinfo"
PATH = "/istio.v1.auth.IstioCertificateService/CreateCertificate"
# TLS code points (IANA).
X25519MLKEM768, X25519, P256 = 0x11EC, 0x001D, 0x0017


def openssl_version():
    return SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()


def test_the_client_is_openssl_with_ml_kem():
    # OpenSSL gained X25519MLKEM768 in 3.5; the rest of this file relies on it.
    major, minor = map(int, re.search(r"OpenSSL (\d+)\.(\d+)", openssl_version()).groups())
    assert (major, minor) >= (3, 5), openssl_version()


class Refused(Exception):
    """The TLS handshake failed."""


def tls_connect(ca, groups, versions=(SSL.TLS1_2_VERSION, SSL.TLS1_3_VERSION)):
    """An OpenSSL connection to the CA offering `groups` (OpenSSL's names, in order)."""
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_min_proto_version(versions[0])
    ctx.set_max_proto_version(versions[-1])
    # pyOpenSSL has no public call for the group list; its OpenSSL binding does.
    assert openssl_lib.SSL_CTX_set1_curves_list(ctx._context, groups.encode()) == 1, groups
    root = Path(ca.workdir) / "root-for-openssl.pem"
    root.write_bytes(ca.root_pem)
    ctx.load_verify_locations(str(root))
    ctx.set_verify(SSL.VERIFY_PEER, lambda conn, cert, errno, depth, ok: bool(ok))
    ctx.set_alpn_protos([b"h2"])
    sock = socket.create_connection(("127.0.0.1", ca.grpc_port), timeout=30)
    # OpenSSL wants a blocking socket; the kernel's timeouts keep a hang bounded.
    sock.setblocking(True)
    for option in (socket.SO_RCVTIMEO, socket.SO_SNDTIMEO):
        sock.setsockopt(socket.SOL_SOCKET, option, struct.pack("ll", 30, 0))
    conn = SSL.Connection(ctx, sock)
    conn.set_tlsext_host_name(SERVER_NAME.encode())
    conn.set_connect_state()
    try:
        conn.do_handshake()
    except (SSL.Error, OSError) as e:
        sock.close()
        raise Refused(str(e)) from e
    # The chain was verified against the CA's root; the name is checked here.
    cert = conn.get_peer_certificate(as_cryptography=True)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert SERVER_NAME in names.get_values_for_type(x509.DNSName)
    assert conn.get_alpn_proto_negotiated() == b"h2"
    return conn


def grpc_call(conn, token, csr):
    """CreateCertificate over `conn` with h2: the status, message and cert chain."""
    h2c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    h2c.initiate_connection()
    stream = h2c.get_next_available_stream_id()
    h2c.send_headers(stream, [
        (":method", "POST"), (":scheme", "https"), (":path", PATH),
        (":authority", f"{SERVER_NAME}:15012"), ("content-type", "application/grpc"),
        ("te", "trailers"), ("authorization", f"Bearer {token}"), ("clusterid", "Kubernetes"),
    ])
    body = ca_pb2.IstioCertificateRequest(csr=csr).SerializeToString()
    h2c.send_data(stream, struct.pack(">BI", 0, len(body)) + body, end_stream=True)
    conn.sendall(h2c.data_to_send())
    data, headers, ended = b"", {}, False
    while not ended:
        chunk = conn.recv(65536)
        if not chunk:
            break
        for event in h2c.receive_data(chunk):
            if isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                headers.update((k.decode(), v.decode()) for k, v in event.headers)
            elif isinstance(event, h2.events.DataReceived):
                data += event.data
                h2c.acknowledge_received_data(event.flow_controlled_length, stream)
            elif isinstance(event, h2.events.StreamEnded):
                ended = True
        conn.sendall(h2c.data_to_send())
    status = int(headers.get("grpc-status", "-1"))
    if status != 0:
        return status, headers.get("grpc-message", ""), None
    (length,) = struct.unpack(">I", data[1:5])
    response = ca_pb2.IstioCertificateResponse.FromString(data[5:5 + length])
    return status, "", list(response.cert_chain)


def create_certificate(ca, cluster, groups, **kw):
    """A certificate over an OpenSSL connection offering `groups`: the group OpenSSL
    reports as negotiated, and the chain, checked by `openssl verify`."""
    conn = tls_connect(ca, groups, **kw)
    try:
        group = conn.get_group_name()
        key, csr = make_csr(uri=SPIFFE)
        status, message, chain = grpc_call(conn, cluster.token(), csr)
    finally:
        conn.close()
    assert status == 0, message
    with tempfile.TemporaryDirectory() as d:
        verified = openssl_verify(chain[-1], chain, d)
        assert verified.returncode == 0, verified.stdout + verified.stderr
    leaf = x509.load_pem_x509_certificate(chain[0].encode())
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [SPIFFE]
    return group, chain


def metric_reaches(ca, name, want, **labels):
    """Waits (10 s at most) for a counter the CA bumps just after the client saw the
    handshake end; returns its last value."""
    deadline = time.time() + 10
    while True:
        value = metric(ca, name, **labels)
        if value >= want or time.time() > deadline:
            return value
        time.sleep(0.05)


def metric(ca, name, **labels):
    _, text = ca.http("/metrics")
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(name + "{"):
            got = ",".join(sorted(line[len(name) + 1:line.index("}")].split(",")))
            if got == want:
                return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture(scope="module")
def pqc_ca(cluster):
    with tempfile.TemporaryDirectory() as d:
        server = start_ca(d, cluster, env={"COMPLIANCE_POLICY": "pqc", "SIGNET_LOG": "debug"})
        yield server
        stop_ca(server)


# --- no policy: the hybrid group accepted and preferred, classical groups kept ----


def test_hybrid_only_client_gets_a_certificate(ca, cluster):
    before = metric(ca, "signet_ca_tls_handshakes_total", listener="grpc",
                    group="X25519MLKEM768", version="TLSv1.3")
    group, _ = create_certificate(ca, cluster, "X25519MLKEM768")
    assert group == "X25519MLKEM768"
    after = metric_reaches(ca, "signet_ca_tls_handshakes_total", before + 1, listener="grpc",
                           group="X25519MLKEM768", version="TLSv1.3")
    assert after >= before + 1


def test_the_hybrid_group_is_preferred_when_offered_after_x25519(ca, cluster):
    # OpenSSL sends a key share for its first group only: X25519 here. The CA asks
    # for the hybrid share instead (HelloRetryRequest) rather than settle on X25519.
    group, _ = create_certificate(ca, cluster, "X25519:P-256:X25519MLKEM768")
    assert group == "X25519MLKEM768"


def test_classical_clients_are_still_served(ca, cluster):
    group, _ = create_certificate(ca, cluster, "X25519")
    assert group.lower() == "x25519"
    group, _ = create_certificate(ca, cluster, "P-256", versions=(SSL.TLS1_2_VERSION,))
    assert group in ("P-256", "prime256v1", "secp256r1")
    assert metric_reaches(ca, "signet_ca_tls_handshakes_total", 1, listener="grpc",
                          group="P-256", version="TLSv1.2") >= 1


# --- COMPLIANCE_POLICY=pqc on the CA -------------------------------------------------


def test_pqc_serves_the_hybrid_group(pqc_ca, cluster):
    group, _ = create_certificate(pqc_ca, cluster, "X25519MLKEM768",
                                  versions=(SSL.TLS1_3_VERSION,))
    assert group == "X25519MLKEM768"
    pqc_ca.log.flush()
    log = Path(pqc_ca.log.name).read_text()
    assert re.search(r"TLS handshake complete.*group=X25519MLKEM768.*version=TLSv1.3", log), log
    assert "compliance_policy=pqc" in log


def test_pqc_refuses_x25519_and_tls12(pqc_ca, cluster):
    before = metric(pqc_ca, "signet_ca_tls_handshake_failures_total", listener="grpc",
                    reason="no_shared_group")
    with pytest.raises(Refused):
        tls_connect(pqc_ca, "X25519")
    with pytest.raises(Refused):
        tls_connect(pqc_ca, "X25519:P-256:P-384")
    with pytest.raises(Refused):
        tls_connect(pqc_ca, "X25519MLKEM768:P-256", versions=(SSL.TLS1_2_VERSION,))
    after = metric_reaches(pqc_ca, "signet_ca_tls_handshake_failures_total", before + 2,
                           listener="grpc", reason="no_shared_group")
    assert after == before + 2
    pqc_ca.log.flush()
    log = Path(pqc_ca.log.name).read_text()
    assert re.search(r"TLS handshake failed.*reason=no_shared_group", log), log
    assert metric_reaches(pqc_ca, "signet_ca_tls_handshake_failures_total", 1,
                          listener="grpc", reason="protocol_version") >= 1


def test_fips_140_3_refuses_x25519_alone(cluster):
    with tempfile.TemporaryDirectory() as d:
        ca = start_ca(d, cluster, extra_args=["--compliance-policy", "fips-140-3"])
        try:
            with pytest.raises(Refused):
                tls_connect(ca, "X25519")
            group, _ = create_certificate(ca, cluster, "X25519:P-256")
            assert group in ("P-256", "prime256v1", "secp256r1")
            group, _ = create_certificate(ca, cluster, "X25519MLKEM768")
            assert group == "X25519MLKEM768"
        finally:
            stop_ca(ca)


# --- signet-agent's CA client ---------------------------------------------------------


def test_agent_under_pqc_gets_certificates_from_a_ca_under_pqc(pqc_ca, cluster):
    before = metric(pqc_ca, "signet_ca_tls_handshakes_total", listener="grpc",
                    group="X25519MLKEM768", version="TLSv1.3")
    agent = start_agent(pqc_ca, cluster, env={"COMPLIANCE_POLICY": "pqc"})
    try:
        out = subprocess.run([binary("signet-agent"), "inspect", "--socket", str(agent.socket),
                              "--names", "default"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
        assert SPIFFE in out.stdout
    finally:
        stop_agent(agent)
    assert metric_reaches(pqc_ca, "signet_ca_tls_handshakes_total", before + 1,
                          listener="grpc", group="X25519MLKEM768", version="TLSv1.3") > before


def test_agent_without_policy_gets_certificates_from_a_ca_under_pqc(pqc_ca, cluster):
    # It offers the hybrid group first under no policy, so a CA under pqc serves it.
    before = metric(pqc_ca, "signet_ca_tls_handshakes_total", listener="grpc",
                    group="X25519MLKEM768", version="TLSv1.3")
    agent = start_agent(pqc_ca, cluster)
    stop_agent(agent)
    assert metric_reaches(pqc_ca, "signet_ca_tls_handshakes_total", before + 1,
                          listener="grpc", group="X25519MLKEM768", version="TLSv1.3") > before


def tls_extensions(hello):
    """The extensions of a ClientHello handshake message, by type."""
    assert hello[0] == 1, "not a ClientHello"
    pos = 4 + 2 + 32  # handshake header, legacy_version, random
    pos += 1 + hello[pos]  # session id
    pos += 2 + struct.unpack(">H", hello[pos:pos + 2])[0]  # cipher suites
    pos += 1 + hello[pos]  # compression methods
    end = pos + 2 + struct.unpack(">H", hello[pos:pos + 2])[0]
    pos += 2
    extensions = {}
    while pos < end:
        kind, length = struct.unpack(">HH", hello[pos:pos + 4])
        extensions[kind] = hello[pos + 4:pos + 4 + length]
        pos += 4 + length
    return extensions


def agent_client_hello(ca, cluster, policy):
    """The first ClientHello signet-agent under `policy` sends to its CA, read by a
    listener that answers nothing: the supported groups, the groups it sent key
    shares for (with their lengths), and the TLS versions it offers."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(60)
    workdir = Path(tempfile.mkdtemp(prefix="hello", dir="/tmp"))
    (workdir / "root.pem").write_bytes(ca.root_pem)
    (workdir / "token").write_text(cluster.token())
    env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST")}
    env["COMPLIANCE_POLICY"] = policy
    log = open(workdir / "agent.log", "w+")
    agent = subprocess.Popen(
        [binary("signet-agent"), "run", "--ca-addr", f"127.0.0.1:{listener.getsockname()[1]}",
         "--ca-server-name", SERVER_NAME, "--ca-root-cert", str(workdir / "root.pem"),
         "--token-file", str(workdir / "token"), "--namespace", "default",
         "--service-account", "bookinfo", "--socket", str(workdir / "socket"),
         "--http-addr", f"127.0.0.1:{free_port()}"],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir)
    try:
        listener.settimeout(0.1)
        deadline = time.time() + 60
        while True:
            try:
                conn, _ = listener.accept()
                break
            except TimeoutError:
                log.seek(0)
                assert agent.poll() is None, f"signet-agent exited: {log.read()}"
                assert time.time() < deadline, f"no connection from signet-agent: {log.read()}"
        with conn:
            conn.settimeout(60)
            data = b""
            while len(data) < 5 or len(data) < 5 + struct.unpack(">H", data[3:5])[0]:
                chunk = conn.recv(65536)
                assert chunk, "the agent closed before its ClientHello was whole"
                data += chunk
    finally:
        agent.kill()
        agent.wait()
        listener.close()
        log.close()
    assert data[0] == 22, "not a TLS handshake record"
    ext = tls_extensions(data[5:])
    groups = struct.unpack(f">{len(ext[10]) // 2 - 1}H", ext[10][2:])
    shares, body, pos = [], ext[51][2:], 0
    while pos < len(body):
        group, length = struct.unpack(">HH", body[pos:pos + 4])
        shares.append((group, length))
        pos += 4 + length
    versions = struct.unpack(f">{ext[43][0] // 2}H", ext[43][1:])
    return list(groups), shares, list(versions)


@pytest.mark.parametrize("policy", ["", "fips-140-3"])
def test_agent_offers_the_hybrid_group_first(ca, cluster, policy):
    groups, shares, versions = agent_client_hello(ca, cluster, policy)
    assert groups[0] == X25519MLKEM768
    # A share for the hybrid group (1184 + 32 bytes), and its X25519 half for a
    # server without ML-KEM (fips-140-3 allows no X25519 alone).
    assert shares[0] == (X25519MLKEM768, 1216)
    if policy == "":
        assert X25519 in groups and P256 in groups
        assert shares[1:] == [(X25519, 32)]
    else:
        assert X25519 not in groups and P256 in groups
        assert shares == [(X25519MLKEM768, 1216)]
    assert 0x0304 in versions


def test_agent_under_pqc_offers_the_hybrid_group_alone(ca, cluster):
    groups, shares, versions = agent_client_hello(ca, cluster, "pqc")
    assert groups == [X25519MLKEM768]
    assert shares == [(X25519MLKEM768, 1216)]
    assert versions == [0x0304]


# --- configuration ---------------------------------------------------------------------


@pytest.mark.parametrize("value", ["PQC", "fips", "mlkem", "fips-140-3 "])
def test_an_unknown_policy_is_a_configuration_error(value):
    ca = subprocess.run([binary("signet-ca"), "serve", "--check-flags", "--jwks", "/x",
                         "--jwt-issuer", "i"], capture_output=True, text=True,
                        env={"COMPLIANCE_POLICY": value}, timeout=60)
    assert ca.returncode == 64, ca.stderr
    assert "pqc, fips-140-3 and fips-140-2" in ca.stderr
    agent = subprocess.run([binary("signet-agent"), "run", "--compliance-policy", value],
                           capture_output=True, text=True, timeout=60)
    assert agent.returncode == 64, agent.stderr
    assert "pqc, fips-140-3 and fips-140-2" in agent.stderr
