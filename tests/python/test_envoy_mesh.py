"""Two Envoys, each fed by its own signet-agent, in mutual TLS with URI SAN matchers
in both directions: a request through them succeeds; a third workload with another
identity is refused by the SAN matcher (Envoy's `ssl.fail_verify_san` rises). Then
rotation under load (4 s certificates, a request every 200 ms, one request per
connection, so every request is a new handshake) with no failed request; the
SPIFFE validator fed by `ALL`; and an agent restart while Envoy keeps serving."""

import json
import time
import urllib.error
import urllib.request

import pytest

from conftest import free_port, start_agent, stop_agent
from envoy_util import (Envoy, downstream_tls, http_listener, sds_cluster, tls_context,
                        upstream_cluster)

NS = "mesh"


def spiffe(sa):
    return f"spiffe://cluster.local/ns/{NS}/sa/{sa}"


def backend(tmp_path, agent, port, allowed="frontend", validation="ROOTCA", name="backend",
            sds_client="envoy_grpc", api_type="GRPC"):
    """Envoy in front of a service: mutual TLS, only `allowed` may call."""
    route = {"match": {"prefix": "/"},
             "direct_response": {"status": 200, "body": {"inline_string": f"hello from {name}"}}}
    listener = http_listener("inbound", port, route, downstream_tls(
        tls_context(agent.socket, peer=spiffe(allowed), validation=validation, client=sds_client,
                    api_type=api_type)))
    return Envoy(tmp_path, name, [listener], [sds_cluster(agent.socket)])


def client(tmp_path, agent, port, backend_port, name, expect="backend", per_connection=False,
           curves=None, sds_client="envoy_grpc", api_type="GRPC", tls12=False):
    """Envoy beside a caller: plain HTTP in, mutual TLS out to the backend, which must
    present the identity `expect`; `curves` sets the upstream `ecdh_curves`; `tls12`
    leaves the upstream at Envoy's own default, TLS 1.2 at most."""
    route = {"match": {"prefix": "/"}, "route": {"cluster": "backend"}}
    listener = http_listener("outbound", port, route)
    ctx = tls_context(agent.socket, peer=spiffe(expect), client=sds_client, api_type=api_type)
    if curves:
        ctx["tls_params"]["ecdh_curves"] = curves
    if tls12:
        del ctx["tls_params"]["tls_maximum_protocol_version"]
    upstream = upstream_cluster("backend", backend_port, ctx, per_connection)
    return Envoy(tmp_path, name, [listener], [sds_cluster(agent.socket), upstream])


def get(port):
    try:
        # Generous: a loaded machine can be slow to answer, and it costs nothing.
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.fixture
def started():
    """Collects agents and Envoys to stop, whatever happens."""
    things = []
    yield things
    for t in reversed(things):
        t.stop() if hasattr(t, "stop") else stop_agent(t)


def serials(envoy):
    """Serial numbers of the certificates Envoy holds as its own (`/certs`)."""
    certs = json.loads(envoy.get("/certs"))["certificates"]
    return {c["serial_number"] for entry in certs for c in entry.get("cert_chain", [])}


def pair(ca, cluster, tmp_path, started, agent_args=(), validation="ROOTCA",
         per_connection=False, sds_client="envoy_grpc", api_type="GRPC"):
    """frontend -> backend, each Envoy fed by its own agent; returns the backend's
    agent, both Envoys and the frontend's plain-HTTP port."""
    fa = start_agent(ca, cluster, ns=NS, sa="frontend", extra_args=agent_args)
    ba = start_agent(ca, cluster, ns=NS, sa="backend", extra_args=agent_args)
    started.extend([fa, ba])
    bport, fport = free_port(), free_port()
    b = backend(tmp_path, ba, bport, validation=validation, sds_client=sds_client,
                api_type=api_type)
    f = client(tmp_path, fa, fport, bport, "frontend", per_connection=per_connection,
               sds_client=sds_client, api_type=api_type)
    started.extend([b, f])
    b.wait_ready(names=("default", validation))
    f.wait_ready()
    return ba, b, f, fport, bport


@pytest.mark.parametrize("sds_client", ["envoy_grpc", "google_grpc"])
def test_mutual_tls_with_san_matchers_and_a_refused_third(ca, cluster, tmp_path, started, sds_client):
    agents = {sa: start_agent(ca, cluster, ns=NS, sa=sa) for sa in ("frontend", "backend", "intruder")}
    started.extend(agents.values())
    bport, fport, iport = free_port(), free_port(), free_port()
    b = backend(tmp_path, agents["backend"], bport, sds_client=sds_client)
    f = client(tmp_path, agents["frontend"], fport, bport, "frontend", sds_client=sds_client)
    i = client(tmp_path, agents["intruder"], iport, bport, "intruder", sds_client=sds_client)
    started.extend([b, f, i])
    for e in (b, f, i):
        e.wait_ready()
    assert get(fport) == (200, "hello from backend")
    before = int(b.stats("fail_verify_san").get("listener.127.0.0.1_%d.ssl.fail_verify_san" % bport, "0"))
    status, _ = get(iport)
    assert status == 503
    after = int(b.stats("fail_verify_san")["listener.127.0.0.1_%d.ssl.fail_verify_san" % bport])
    assert after > before, "refused by the SAN matcher, not by anything else"
    # Mesh mutual TLS is TLS 1.3, as in Istio (Envoy's client alone would stop at 1.2).
    versions = b.stats(r"ssl\.versions\.")
    assert int(versions.get("listener.127.0.0.1_%d.ssl.versions.TLSv1.3" % bport, "0")) >= 1, versions
    assert "listener.127.0.0.1_%d.ssl.versions.TLSv1.2" % bport not in versions, versions
    for e in (b, f, i):
        s = e.stats(r"^sds\.")
        assert s["sds.default.update_rejected"] == "0" and s["sds.ROOTCA.update_rejected"] == "0"


@pytest.mark.parametrize("sds_client,api_type", [
    ("envoy_grpc", "GRPC"), ("google_grpc", "GRPC"), ("envoy_grpc", "DELTA_GRPC")])
def test_rotation_under_load_fails_no_request(ca, cluster, tmp_path, started, sds_client,
                                              api_type):
    _, b, _, fport, bport = pair(ca, cluster, tmp_path, started, ("--secret-ttl", "4s"),
                                 per_connection=True, sds_client=sds_client, api_type=api_type)
    first = serials(b)
    assert len(first) == 1, first

    def updates():
        return int(b.stats(r"^sds\.default\.update_success")["sds.default.update_success"])

    failures, count = [], 0
    # At least 7 s, 25 requests and two rotations taken by Envoy: a loaded machine
    # makes the run longer (120 s at most), not the counts smaller.
    began = time.time()
    while True:
        status, body = get(fport)
        count += 1
        if status != 200:
            failures.append((status, body))
        elapsed = time.time() - began
        if (elapsed >= 7 and count >= 25 and updates() >= 3) or elapsed > 120:
            break
        time.sleep(0.2)
    assert count >= 25
    assert not failures, f"{len(failures)} of {count} requests failed: {failures[:3]}"
    assert updates() >= 3
    # Envoy drops a replaced TLS context once no connection holds it: poll briefly.
    deadline = time.time() + 30
    while (now := serials(b)) & first or not now:
        assert time.time() < deadline, f"Envoy still holds the first certificate: {first} -> {now}"
        time.sleep(0.2)
    # Every request was a new handshake on both sides.
    handshakes = int(b.stats("ssl.handshake")["listener.127.0.0.1_%d.ssl.handshake" % bport])
    assert handshakes >= count


@pytest.mark.parametrize("sds_client", ["envoy_grpc", "google_grpc"])
def test_spiffe_validator_from_all(ca, cluster, tmp_path, started, sds_client):
    _, b, _, fport, _ = pair(ca, cluster, tmp_path, started, validation="ALL", sds_client=sds_client)
    assert get(fport) == (200, "hello from backend")
    assert b.stats(r"^sds\.ALL\.update_rejected")["sds.ALL.update_rejected"] == "0"


@pytest.mark.parametrize("sds_client", ["envoy_grpc", "google_grpc"])
def test_envoy_keeps_serving_while_its_agent_restarts(ca, cluster, tmp_path, started, sds_client):
    ba, b, _, fport, _ = pair(ca, cluster, tmp_path, started, per_connection=True,
                              sds_client=sds_client)
    stop_agent(ba)
    started.remove(ba)
    for _ in range(5):
        assert get(fport) == (200, "hello from backend")
    again = start_agent(ca, cluster, ns=NS, sa="backend", workdir=ba.workdir)
    started.append(again)
    # Envoy reconnects by itself and takes the new agent's certificate (a new key). Its
    # retries back off (up to 30 s apart), so 90 s at most, for a loaded machine.
    deadline = time.time() + 90
    while int(b.stats(r"^sds\.default\.update_success")["sds.default.update_success"]) < 2:
        assert time.time() < deadline, "Envoy did not take the restarted agent's certificate"
        time.sleep(0.2)
    assert get(fport) == (200, "hello from backend")
    assert b.stats(r"^sds\.default\.update_rejected")["sds.default.update_rejected"] == "0"


def test_rsa_workload_certificates_work_with_envoys_defaults(ca, cluster, tmp_path, started):
    """docs/agent.md's key-type table: RSA keys on both sides, default TLS settings."""
    _, b, f, fport, _ = pair(ca, cluster, tmp_path, started, ("--key-type", "rsa2048"))
    assert get(fport) == (200, "hello from backend")
    for e in (b, f):
        assert e.stats(r"^sds\.default\.update_rejected")["sds.default.update_rejected"] == "0"


def test_a_p384_server_certificate_needs_p384_in_the_clients_curves(ca, cluster, tmp_path, started):
    """As docs/agent.md says: with Istio's mesh TLS (1.3) a P-384 server certificate
    works; a client on TLS 1.2 (Envoy's own default) with its default curves (X25519,
    P-256) fails the handshake, and listing P-384 in its `ecdh_curves` makes it work.
    P-384 as a client certificate needs nothing."""
    fa = start_agent(ca, cluster, ns=NS, sa="frontend", extra_args=("--key-type", "ec-p384"))
    ba = start_agent(ca, cluster, ns=NS, sa="backend", extra_args=("--key-type", "ec-p384"))
    started.extend([fa, ba])
    bport, mesh_port, default_port, p384_port = free_port(), free_port(), free_port(), free_port()
    b = backend(tmp_path, ba, bport)
    mesh = client(tmp_path, fa, mesh_port, bport, "mesh-tls")
    plain = client(tmp_path, fa, default_port, bport, "default-curves", tls12=True)
    listed = client(tmp_path, fa, p384_port, bport, "p384-curves", curves=["X25519", "P-256", "P-384"],
                    tls12=True)
    started.extend([b, mesh, plain, listed])
    for e in (b, mesh, plain, listed):
        e.wait_ready()
    assert get(mesh_port) == (200, "hello from backend")
    assert get(default_port)[0] == 503
    assert get(p384_port) == (200, "hello from backend")
