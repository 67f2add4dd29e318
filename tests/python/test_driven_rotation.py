"""A root rotation the CA drives (and, separately, a new intermediate under the same
root), with real Envoys: two Envoys in mutual TLS, each
fed by its own signet-agent (whose trust file is the CA's --root-cert-file, as the
root ConfigMap is in a cluster), one request per connection every 200 ms, and beside
them a grpcio client that renews only at half its lifetime, as ztunnel does. The
operator's one step is putting the next set in place; the CA goes through
distribute, switch, retire and done by itself (`signet-ca rotation status --json`,
the real command, reports each), no request fails, and at the end the old root is in
no bundle: the trust file, what Envoy holds as its validation context, the answers.
The agents tell the CA which roots they serve, and `signet-agent inspect` shows which
stage's bundle each holds."""

import json
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from conftest import (SERVER_NAME, binary, make_csr, request, start_agent, start_ca, stop_agent,
                      stop_ca)
from istio.v1.auth import ca_pb2_grpc
from test_envoy_mesh import backend, client, free_port, get, spiffe

NS = "mesh"


def pki(out, name, under=None):
    """An intermediate (Istio's cacerts layout) under a new root, or under the root
    `under` names, made with the operator's own commands."""
    root, inter = out / f"{under or name}-root", out / name
    steps = [] if under else [["root", "--out", str(root)]]
    steps.append(["intermediate", "--root", str(root), "--cluster", name, "--out", str(inter)])
    for args in steps:
        subprocess.run([binary("signet-ca"), "pki", *args, "--key-type", "ec-p256"],
                       check=True, capture_output=True)
    return inter, (root / "root-cert.pem").read_text()


def publish(staged, dest):
    """The whole set at once, as a Secret mount changes."""
    tmp = dest.with_suffix(".tmp")
    shutil.copytree(staged, tmp)
    tmp.rename(dest)


def status(ca):
    out = subprocess.run([binary("signet-ca"), "rotation", "status", "--http-addr",
                          f"127.0.0.1:{ca.http_port}", "--json"],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def fingerprints(pem):
    return {c.fingerprint(c.signature_hash_algorithm).hex()
            for c in x509.load_pem_x509_certificates(pem.encode())}


def envoy_roots(envoy):
    """Serial numbers of the roots Envoy validates peers with (`/certs`)."""
    certs = json.loads(envoy.get("/certs"))["certificates"]
    return {c["serial_number"] for entry in certs for c in entry.get("ca_cert", [])}


def stub(ca, trust):
    """A CreateCertificate client trusting the CA with the trust file as it is now
    (ztunnel reads the root ConfigMap the same way)."""
    creds = grpc.ssl_channel_credentials(root_certificates=trust.read_bytes())
    channel = grpc.secure_channel(f"127.0.0.1:{ca.grpc_port}", creds,
                                  options=[("grpc.ssl_target_name_override", SERVER_NAME)])
    return ca_pb2_grpc.IstioCertificateServiceStub(channel)


class Scheduled(threading.Thread):
    """Asks for 30 s certificates and renews only at half their lifetime, keeping the
    roots of each answer; records every answer."""

    def __init__(self, ca, cluster, trust):
        super().__init__(daemon=True)
        self.ca, self.trust, self.token = ca, trust, cluster.token(ns=NS, sa="scheduled")
        self.answers, self.errors, self.running = [], [], True

    def fetch(self):
        _, csr = make_csr(uri=spiffe("scheduled"))
        chain = list(request(stub(self.ca, self.trust), csr, self.token, ttl=30).cert_chain)
        leaf = x509.load_pem_x509_certificate(chain[0].encode())
        self.answers.append(chain)
        life = (leaf.not_valid_after_utc - leaf.not_valid_before_utc).total_seconds()
        return leaf.not_valid_before_utc.timestamp() + life / 2

    def run(self):
        renew_at = self.fetch()
        while self.running:
            if time.time() >= renew_at:
                try:
                    renew_at = self.fetch()
                except Exception as e:  # noqa: BLE001 (kept for the assertion)
                    self.errors.append(repr(e))
                    renew_at = time.time() + 1
            time.sleep(0.2)


@pytest.fixture
def started():
    things = []
    yield things
    for t in reversed(things):
        if hasattr(t, "stop"):
            t.stop()
        elif hasattr(t, "grpc_port"):
            stop_ca(t)
        else:
            stop_agent(t)


def inspect(agent):
    """What `signet-agent inspect --json` says of the agent's secrets."""
    out = subprocess.run([binary("signet-agent"), "inspect", "--socket", str(agent.socket),
                          "--agent-addr", f"127.0.0.1:{agent.http_port}", "--json"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return json.loads(out)


def served_leaf(agent):
    """The certificate the agent serves as `default`."""
    return next(s["leaf"] for s in inspect(agent) if s.get("leaf"))


def trust_change(agent):
    """Which stage of the CA's trust change the agent's ROOTCA belongs to, as
    `inspect` shows it."""
    return next(s for s in inspect(agent) if s["name"] == "ROOTCA").get("ca_trust_change")


@pytest.mark.parametrize("change", ["root", "intermediate"])
def test_a_declared_rotation_with_real_envoys_fails_no_request(cluster, tmp_path, started,
                                                               change):
    old_set, old_root = pki(tmp_path, "old")
    if change == "root":
        new_set, new_root = pki(tmp_path, "new")
    else:
        # A new intermediate under the same root: nothing to distribute or retire.
        new_set, new_root = pki(tmp_path, "new", under="old")
    work = Path(tempfile.mkdtemp(prefix="rot", dir="/tmp"))
    cacerts, nxt, trust = work / "cacerts", work / "next", work / "trust.pem"
    shutil.copytree(old_set, cacerts)
    ca = start_ca(work, cluster, cacerts=cacerts, extra_args=[
        "--next-cacerts-dir", str(nxt), "--rotation-window", "20s",
        "--root-cert-file", str(trust), "--default-ttl", "30s"])
    started.append(ca)
    assert status(ca)["stage"] == "idle"
    agents = {sa: start_agent(ca, cluster, ns=NS, sa=sa, ca_root_cert=trust,
                              extra_args=("--secret-ttl", "30s")) for sa in ("frontend", "backend")}
    started.extend(agents.values())
    bport, fport = free_port(), free_port()
    b = backend(tmp_path, agents["backend"], bport)
    f = client(tmp_path, agents["frontend"], fport, bport, "frontend", per_connection=True)
    started.extend([b, f])
    b.wait_ready(names=("default", "ROOTCA"))
    f.wait_ready()
    old_serials = envoy_roots(b)
    scheduled = Scheduled(ca, cluster, trust)
    scheduled.start()

    failures, count, seen = [], 0, []
    stop = threading.Event()

    def traffic():
        nonlocal count
        while not stop.is_set():
            code, body = get(fport)
            count += 1
            if code != 200:
                failures.append((time.time(), code, body[:200]))
            time.sleep(0.2)

    load = threading.Thread(target=traffic, daemon=True)
    load.start()
    time.sleep(2)
    publish(new_set, nxt)  # the operator's one step
    # Every stage is reached with no further step: 240 s at most on a loaded machine.
    deadline = time.time() + 240
    while (st := status(ca))["stage"] != "done":
        if not seen or seen[-1] != st["stage"]:
            seen.append(st["stage"])
        assert time.time() < deadline, f"stuck: {st}"
        time.sleep(0.5)
    stages = [s for s, _ in st["history"]]
    assert stages == ["distribute", "switch", "retire", "done"], st
    if change == "root":
        assert "distribute" in seen and "switch" in seen, seen
        # Envoy drops the old root: its validation context holds the new one alone.
        deadline = time.time() + 60
        while envoy_roots(b) & old_serials or len(envoy_roots(b)) != 1:
            assert time.time() < deadline, envoy_roots(b)
            time.sleep(0.5)
    else:
        # The bundle never changed; the workloads' next certificates come from the
        # new intermediate (L=new), each on its own schedule.
        assert envoy_roots(b) == old_serials
        for agent in agents.values():
            deadline = time.time() + 90
            while "L=new" not in (leaf := served_leaf(agent))["issuer"]:
                assert time.time() < deadline, leaf
                time.sleep(0.5)
    # Each agent told the CA it serves the new bundle (request metadata), and says
    # which stage's bundle it holds; the CA counts both agents as serving the next
    # roots alone.
    deadline = time.time() + 60
    while True:
        held = {sa: trust_change(agent) for sa, agent in agents.items()}
        serving = status(ca)["serving"]
        if (all(h and h["stage"] in ("retire", "done") and h["reported"] for h in held.values())
                and serving["next_alone"] >= 2 and serving["lacking"] == 0):
            break
        assert time.time() < deadline, (held, serving)
        time.sleep(0.5)
    # The scheduled client renews on its own schedule (at half of its first 30 s).
    deadline = time.time() + 90
    while len(scheduled.answers) < 2:
        assert time.time() < deadline, "the scheduled client never renewed"
        time.sleep(0.5)
    time.sleep(2)
    stop.set()
    load.join()
    scheduled.running = False
    scheduled.join()
    # The figures docs/root-rotation.md quotes (pytest -s shows them).
    print(f"requests: {count}, failed: {len(failures)}; stage changes: {st['history']}; "
          f"scheduled client renewals: {len(scheduled.answers) - 1}")
    assert count > 50, count
    assert not failures, f"{len(failures)} of {count} requests failed: {failures[:3]}"
    assert not scheduled.errors, scheduled.errors
    assert len(scheduled.answers) >= 2, "the scheduled client renewed on its own"
    # The old root is in no bundle: the trust file, and a fresh answer.
    assert fingerprints(trust.read_text()) == fingerprints(new_root)
    _, csr = make_csr(uri=spiffe("scheduled"))
    answer = request(stub(ca, trust), csr, cluster.token(ns=NS, sa="scheduled"),
                     ttl=30).cert_chain
    assert fingerprints(answer[-1]) == fingerprints(new_root)
    if change == "root":
        assert fingerprints(old_root).isdisjoint(fingerprints(answer[-1]))
