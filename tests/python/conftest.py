"""Shared fixtures: a real signet-ca process with a JWKS made here, and helpers that
speak to it only through grpcio, `cryptography`, PyJWT and the openssl CLI."""

import base64
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / ".venv" / "signet_pb"))

from istio.v1.auth import ca_pb2, ca_pb2_grpc  # noqa: E402

ISSUER = "https://kubernetes.default.svc.cluster.local"
SERVER_NAME = "istiod.istio-system.svc"


def binary(name):
    path = os.environ.get(f"SIGNET_{name.upper().replace('-', '_')}_BIN")
    if path:
        return path
    return str(ROOT / "target" / "debug" / name)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def b64url_uint(n):
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


class Cluster:
    """The token side of a cluster: an RSA signing key and its JWKS."""

    def __init__(self, kid="key-1"):
        self.kid = kid
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pub = self.key.public_key().public_numbers()
        self.jwks = {"keys": [{"kty": "RSA", "alg": "RS256", "use": "sig", "kid": kid,
                               "n": b64url_uint(pub.n), "e": b64url_uint(pub.e)}]}

    def token(self, ns="default", sa="bookinfo", aud=("istio-ca",), iss=ISSUER,
              exp_in=3600, key=None, alg="RS256", kid=None, extra=None):
        now = int(time.time())
        claims = {
            "iss": iss, "aud": list(aud), "sub": f"system:serviceaccount:{ns}:{sa}",
            "iat": now, "nbf": now, "exp": now + exp_in,
            "kubernetes.io": {"namespace": ns, "serviceaccount": {"name": sa, "uid": "u1"},
                              "pod": {"name": f"{sa}-pod", "uid": "p1"}},
        }
        if extra:
            claims.update(extra)
        signing_key = key if key is not None else self.key
        return jwt.encode(claims, signing_key, algorithm=alg, headers={"kid": kid or self.kid})


class CA:
    def __init__(self, proc, grpc_port, http_port, root_pem, workdir, log):
        self.proc = proc
        self.grpc_port = grpc_port
        self.http_port = http_port
        self.root_pem = root_pem
        self.workdir = workdir
        self.log = log

    def channel(self):
        creds = grpc.ssl_channel_credentials(root_certificates=self.root_pem)
        return grpc.secure_channel(f"127.0.0.1:{self.grpc_port}", creds,
                                   options=[("grpc.ssl_target_name_override", SERVER_NAME)])

    def stub(self):
        return ca_pb2_grpc.IstioCertificateServiceStub(self.channel())

    def http(self, path):
        # Generous: a loaded machine can be slow to answer, and it costs nothing.
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=30) as r:
            return r.status, r.read().decode()


def start_ca(workdir, cluster, extra_args=(), cacerts=None, env=None):
    workdir = Path(workdir)
    jwks = workdir / "jwks.json"
    jwks.write_text(json.dumps(cluster.jwks))
    grpc_port, http_port = free_port(), free_port()
    state = workdir / "state"
    args = [binary("signet-ca"), "serve",
            "--cacerts-dir", str(cacerts or workdir / "no-cacerts"),
            "--state-dir", str(state),
            "--grpc-addr", f"127.0.0.1:{grpc_port}", "--http-addr", f"127.0.0.1:{http_port}",
            "--jwks", str(jwks), "--jwt-issuer", ISSUER, *extra_args]
    log = open(workdir / "ca.log", "w+")
    full_env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST")}
    full_env.update(env or {})
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=full_env)
    # 60 s at most: generous for a loaded machine, free when it is fast.
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"signet-ca exited with {proc.returncode}: {log.read()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/readyz", timeout=5) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(0.05)
    else:
        proc.kill()
        raise RuntimeError("signet-ca did not become ready")
    root_file = (Path(cacerts) / "root-cert.pem") if cacerts else state / "root-cert.pem"
    return CA(proc, grpc_port, http_port, root_file.read_bytes(), workdir, log)


def stop_ca(ca):
    ca.proc.terminate()
    try:
        ca.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        ca.proc.kill()
    ca.log.close()


@pytest.fixture(scope="session")
def cluster():
    return Cluster()


@pytest.fixture(scope="session")
def ca(cluster):
    with tempfile.TemporaryDirectory() as d:
        server = start_ca(d, cluster)
        yield server
        stop_ca(server)


def make_csr(key=None, uri=None):
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if uri:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=True)
    csr = builder.sign(key, hashes.SHA256())
    return key, csr.public_bytes(serialization.Encoding.PEM).decode()


def request(stub, csr, token, ttl=0, cluster_id="Kubernetes", metadata=None):
    md = []
    if token is not None:
        md.append(("authorization", f"Bearer {token}"))
    if cluster_id is not None:
        md.append(("clusterid", cluster_id))
    return stub.CreateCertificate(
        ca_pb2.IstioCertificateRequest(csr=csr, validity_duration=ttl, metadata=metadata),
        metadata=md, timeout=30)


def openssl_verify(root_pem, chain, workdir):
    """`openssl verify` of chain[0] with chain[1:-1] as untrusted and the bundle as roots."""
    d = Path(workdir)
    (d / "root.pem").write_text(root_pem if isinstance(root_pem, str) else root_pem.decode())
    (d / "leaf.pem").write_text(chain[0])
    args = ["openssl", "verify", "-CAfile", str(d / "root.pem")]
    if len(chain) > 2:
        (d / "untrusted.pem").write_text("".join(chain[1:-1]))
        args += ["-untrusted", str(d / "untrusted.pem")]
    args.append(str(d / "leaf.pem"))
    return subprocess.run(args, capture_output=True, text=True)


# --- signet-agent (used by test_sds.py) -------------------------------------------


class Agent:
    def __init__(self, proc, socket_path, http_port, workdir, log, ns, sa):
        self.proc = proc
        self.socket = socket_path
        self.http_port = http_port
        self.workdir = workdir
        self.log = log
        self.ns = ns
        self.sa = sa

    @property
    def target(self):
        return "unix:" + str(self.socket)

    def http(self, path):
        # Generous: a loaded machine can be slow to answer, and it costs nothing.
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=30) as r:
            return r.status, r.read().decode()

    def log_text(self):
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")


def start_agent(ca, cluster, ns="default", sa="bookinfo", extra_args=(), workdir=None,
                http_host="127.0.0.1", env=None, ca_root_cert=None):
    """Starts the real signet-agent against `ca` and waits for /healthz/ready; it
    trusts the CA with `ca_root_cert` (default: the CA's self-signed root).
    The working directory is a short one under /tmp so the socket path stays short."""
    workdir = Path(workdir or tempfile.mkdtemp(prefix="sds", dir="/tmp"))
    token = workdir / "istio-token"
    token.write_text(cluster.token(ns=ns, sa=sa))
    sock = workdir / "sds" / "socket"
    http_port = free_port()
    args = [binary("signet-agent"), "run",
            "--ca-addr", f"localhost:{ca.grpc_port}",
            "--ca-root-cert", str(ca_root_cert or Path(ca.workdir) / "state" / "root-cert.pem"),
            "--token-file", str(token), "--namespace", ns, "--service-account", sa,
            "--socket", str(sock), "--http-addr", f"{http_host}:{http_port}", *extra_args]
    log = open(workdir / "agent.log", "w+")
    full_env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST")}
    full_env.update(env or {})
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=full_env, cwd=workdir)
    agent = Agent(proc, sock, http_port, workdir, log, ns, sa)
    # 60 s at most: generous for a loaded machine (the first certificate may need a
    # retry with backoff), free when it is fast.
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"signet-agent exited with {proc.returncode}: {agent.log_text()}")
        try:
            if agent.http("/healthz/ready")[0] == 200 and sock.exists():
                return agent
        except OSError:
            pass
        time.sleep(0.05)
    stop_agent(agent)
    raise RuntimeError(f"signet-agent did not become ready: {agent.log_text()}")


def stop_agent(agent):
    if agent.proc.poll() is None:
        agent.proc.terminate()
        try:
            agent.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            agent.proc.kill()
            agent.proc.wait()
    agent.log.close()


def hammer(make_call, threads=16, seconds=3):
    """Calls from `threads` threads for `seconds`, each thread its own `make_call()`,
    ignoring any pushback, as callers that keep the signing queue full do. Returns
    (calls that succeeded, RESOURCE_EXHAUSTED refusals as (monotonic time, their
    `grpc-retry-pushback-ms` or None), other errors as (code, details))."""
    import threading
    stop = time.monotonic() + seconds
    ok, refusals, others, lock = [0], [], [], threading.Lock()

    def run():
        call = make_call()
        while time.monotonic() < stop:
            try:
                call()
                with lock:
                    ok[0] += 1
            except grpc.RpcError as e:
                trailers = dict(e.trailing_metadata() or ())
                with lock:
                    if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                        others.append((e.code(), e.details()))
                    refusals.append((time.monotonic(), trailers.get("grpc-retry-pushback-ms")))

    workers = [threading.Thread(target=run) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return ok[0], refusals, others
