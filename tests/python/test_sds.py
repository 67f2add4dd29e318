"""The real signet-agent's SDS server driven by an independent client: Envoy's API
types from the `envoy-data-plane` package (betterproto2) sent with grpcio's generic
stream/unary API over the agent's Unix socket (contract section 5)."""

import concurrent.futures
import datetime
import os
import queue
import subprocess
import tempfile
import threading
import time
import warnings
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
# envoy-data-plane 2.2.0 trips pydantic 2.12's deprecation of classmethod validators.
warnings.filterwarnings("ignore", message=r"Using `@model_validator` with mode='after'")

from envoy_data_plane.envoy.config.core.v3 import Node  # noqa: E402
from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import Secret  # noqa: E402
from envoy_data_plane.envoy.service.discovery.v3 import (  # noqa: E402
    DeltaDiscoveryRequest,
    DeltaDiscoveryResponse,
    DiscoveryRequest,
    DiscoveryResponse,
)
from envoy_data_plane.google.rpc import Status  # noqa: E402

from conftest import start_agent, stop_agent  # noqa: E402

SERVICE = "envoy.service.secret.v3.SecretDiscoveryService"
SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
NS, SA = "bookstore", "reviews"
SPIFFE = f"spiffe://cluster.local/ns/{NS}/sa/{SA}"
NODE = Node(id=f"sidecar~10.1.2.3~{SA}-pod.{NS}~{NS}.svc.cluster.local", cluster=f"{SA}.{NS}")

# The one directory the module's agents may serve file-backed names from
# (--file-secret-dir); everything else is refused.
FILES = Path(tempfile.mkdtemp(prefix="files", dir="/tmp"))

# How long "nothing arrives" is watched for; a reply to a request comes in milliseconds.
QUIET = 1.5
# Rotation with --secret-ttl 4s happens about every 2 s; waited for up to this long,
# generous for a loaded machine (it costs nothing when the machine is fast).
ROTATION_WAIT = 30
# How long a reply that must come is waited for, at most (same reasoning).
REPLY_WAIT = 30


# --- client helpers ---------------------------------------------------------------


class Ended:
    """The end of a response stream: `error` is the grpc.RpcError, or None for OK."""

    def __init__(self, error):
        self.error = error

    def __repr__(self):
        if self.error is None:
            return "Ended(OK)"
        return f"Ended({self.error.code()}: {self.error.details()!r})"


class Stream:
    """One bidirectional SDS stream. Responses are read on a background thread into a
    queue so a test can wait for one with a timeout, or assert that none arrives."""

    _END = object()

    def __init__(self, channel, method="StreamSecrets", response=DiscoveryResponse):
        self._requests = queue.Queue()
        self.responses = queue.Queue()
        self.nonce = ""
        self.last = None
        self.ended = None
        rpc = channel.stream_stream(f"/{SERVICE}/{method}", request_serializer=bytes,
                                    response_deserializer=response.parse)
        self.call = rpc(self._outbound())
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _outbound(self):
        while True:
            item = self._requests.get()
            if item is self._END:
                return
            yield item

    def _read(self):
        try:
            for resp in self.call:
                self.responses.put(resp)
            self.responses.put(Ended(None))
        except grpc.RpcError as e:
            self.responses.put(Ended(e))

    def send(self, req):
        self._requests.put(req)

    def request(self, names, nonce=None, version="", error=None, node=True):
        """A SotW request; `nonce` defaults to the last nonce received."""
        self.send(DiscoveryRequest(
            version_info=version, node=NODE if node else None, resource_names=list(names),
            type_url=SECRET_TYPE, response_nonce=self.nonce if nonce is None else nonce,
            error_detail=error))

    def ack(self, names):
        self.request(names, version=self.last.version_info if self.last else "")

    def nack(self, names, message="rejected by the test client"):
        self.request(names, version="", error=Status(code=13, message=message))

    def recv(self, timeout=REPLY_WAIT):
        try:
            item = self.responses.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no SDS response within {timeout}s") from None
        if isinstance(item, Ended):
            self.ended = item
            raise AssertionError(f"stream ended instead of responding: {item}")
        self.last = item
        self.nonce = item.nonce
        return item

    def recv_end(self, timeout=REPLY_WAIT):
        """Waits for the end of the stream, skipping responses; returns the Ended."""
        deadline = time.time() + timeout
        while True:
            left = deadline - time.time()
            try:
                item = self.responses.get(timeout=max(left, 0.01))
            except queue.Empty:
                raise AssertionError(f"stream did not end within {timeout}s") from None
            if isinstance(item, Ended):
                self.ended = item
                return item

    def expect_nothing(self, seconds=QUIET):
        try:
            item = self.responses.get(timeout=seconds)
        except queue.Empty:
            return
        raise AssertionError(f"expected nothing within {seconds}s, got {describe(item)}")

    def close(self):
        self._requests.put(self._END)
        self.call.cancel()
        self._reader.join(timeout=5)


def describe(item):
    if isinstance(item, Ended):
        return repr(item)
    if isinstance(item, DiscoveryResponse):
        names = [Secret.parse(r.value).name for r in item.resources]
        return f"DiscoveryResponse(version={item.version_info!r}, nonce={item.nonce!r}, names={names})"
    if isinstance(item, DeltaDiscoveryResponse):
        names = [(r.name, r.version) for r in item.resources]
        return (f"DeltaDiscoveryResponse(nonce={item.nonce!r}, resources={names}, "
                f"removed={list(item.removed_resources)})")
    return repr(item)


def the_secret(resp):
    """The single Secret of a SotW response (Envoy accepts nothing else)."""
    assert resp.type_url == SECRET_TYPE
    assert len(resp.resources) == 1, f"want exactly one secret, got {describe(resp)}"
    assert resp.resources[0].type_url == SECRET_TYPE
    assert resp.version_info, "empty version_info"
    assert resp.nonce, "empty nonce"
    return Secret.parse(resp.resources[0].value)


def recv_secrets(stream, count, timeout=REPLY_WAIT):
    """`count` SotW responses as {name: (response, Secret)}; names must not repeat."""
    out = {}
    for _ in range(count):
        resp = stream.recv(timeout)
        secret = the_secret(resp)
        assert secret.name not in out, f"{secret.name} sent twice: {describe(resp)}"
        out[secret.name] = (resp, secret)
    return out


def pem_certs(data):
    return x509.load_pem_x509_certificates(data)


def leaf_serial(secret):
    return pem_certs(secret.tls_certificate.certificate_chain.inline_bytes)[0].serial_number


def spki(key_or_cert):
    pub = key_or_cert.public_key()
    return pub.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def channel_for(agent, authority=None):
    """A stock grpcio channel: on a `unix:` target it sends the socket path,
    percent-encoded, as :authority (h2 alone would refuse it; the agent mends it)."""
    options = [] if authority is None else [("grpc.default_authority", authority)]
    return grpc.insecure_channel(agent.target, options=options)


def expect_rpc_error(code, fn, *contains):
    with pytest.raises(grpc.RpcError) as info:
        fn()
    err = info.value
    assert err.code() == code, f"want {code}, got {err.code()}: {err.details()}"
    for text in contains:
        assert text in (err.details() or ""), f"{text!r} not in {err.details()!r}"


def fetch(agent, names, timeout=REPLY_WAIT):
    with channel_for(agent) as ch:
        rpc = ch.unary_unary(f"/{SERVICE}/FetchSecrets", request_serializer=bytes,
                             response_deserializer=DiscoveryResponse.parse)
        return rpc(DiscoveryRequest(node=NODE, resource_names=list(names), type_url=SECRET_TYPE),
                   timeout=timeout)


# --- fixtures ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def agent(ca, cluster):
    """An agent whose certificate lives 24 h: nothing rotates during the tests."""
    a = start_agent(ca, cluster, ns=NS, sa=SA, extra_args=("--file-secret-dir", str(FILES)))
    yield a
    stop_agent(a)


@pytest.fixture(scope="module")
def rotating_agent(ca, cluster):
    """An agent asking for 4 s certificates: it rotates about every 2 s."""
    a = start_agent(ca, cluster, ns=NS, sa=SA, extra_args=("--secret-ttl", "4s"))
    yield a
    stop_agent(a)


@pytest.fixture
def channel(agent):
    ch = channel_for(agent)
    yield ch
    ch.close()


@pytest.fixture
def streams():
    """Collects streams so they are closed after the test, whatever happens."""
    opened = []
    yield opened
    for s in opened:
        s.close()


def open_stream(streams, channel, delta=False):
    if delta:
        s = Stream(channel, "DeltaSecrets", DeltaDiscoveryResponse)
    else:
        s = Stream(channel)
    streams.append(s)
    return s


# --- any :authority ------------------------------------------------------------------


@pytest.mark.parametrize("authority", [
    None,                                            # grpcio's own: the percent-encoded path
    "/var/run/secrets/workload-spiffe-uds/socket",   # grpc-java: the raw path
    "unix:/tmp/sds sock",                            # spaces and a scheme
    "localhost",
    "sds-grpc",                                      # Envoy's envoy_grpc: the cluster name
])
def test_every_authority_a_client_sends_is_served(agent, authority):
    with channel_for(agent, authority) as ch:
        rpc = ch.unary_unary(f"/{SERVICE}/FetchSecrets", request_serializer=bytes,
                             response_deserializer=DiscoveryResponse.parse)
        resp = rpc(DiscoveryRequest(node=NODE, resource_names=["default"], type_url=SECRET_TYPE),
                   timeout=REPLY_WAIT)
    assert len(resp.resources) == 1


# --- state of the world: names, content -------------------------------------------


def test_one_stream_both_names_one_secret_per_response(channel, streams):
    s = open_stream(streams, channel)
    s.request(["default", "ROOTCA"])
    got = recv_secrets(s, 2)
    assert set(got) == {"default", "ROOTCA"}
    nonces = [resp.nonce for resp, _ in got.values()]
    assert len(set(nonces)) == 2, f"nonces not unique: {nonces}"
    default = got["default"][1]
    assert default.tls_certificate is not None and default.validation_context is None
    assert default.tls_certificate.certificate_chain.inline_bytes
    assert default.tls_certificate.private_key.inline_bytes
    root = got["ROOTCA"][1]
    assert root.validation_context is not None and root.tls_certificate is None
    assert root.validation_context.trusted_ca.inline_bytes
    # Nothing else is sent for a request answered in full.
    s.expect_nothing()


def test_default_chain_key_and_rootca_are_consistent(ca, channel, streams, tmp_path):
    s = open_stream(streams, channel)
    s.request(["default", "ROOTCA"])
    got = recv_secrets(s, 2)
    tls = got["default"][1].tls_certificate
    chain = pem_certs(tls.certificate_chain.inline_bytes)
    leaf = chain[0]
    uris = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
        .get_values_for_type(x509.UniformResourceIdentifier)
    assert uris == [SPIFFE]
    key = serialization.load_pem_private_key(tls.private_key.inline_bytes, password=None)
    assert spki(key) == spki(leaf), "served private key does not match the leaf certificate"

    roots_pem = got["ROOTCA"][1].validation_context.trusted_ca.inline_bytes
    roots = pem_certs(roots_pem)
    assert [r.public_bytes(serialization.Encoding.DER) for r in roots] == \
        [r.public_bytes(serialization.Encoding.DER) for r in pem_certs(ca.root_pem)]
    root_ders = {r.public_bytes(serialization.Encoding.DER) for r in roots}
    for cert in chain:
        assert cert.public_bytes(serialization.Encoding.DER) not in root_ders, \
            "the chain served as `default` must not include the root"

    (tmp_path / "roots.pem").write_bytes(roots_pem)
    (tmp_path / "leaf.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    args = ["openssl", "verify", "-CAfile", str(tmp_path / "roots.pem")]
    if len(chain) > 1:
        (tmp_path / "untrusted.pem").write_bytes(
            b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain[1:]))
        args += ["-untrusted", str(tmp_path / "untrusted.pem")]
    out = subprocess.run(args + [str(tmp_path / "leaf.pem")], capture_output=True, text=True)
    assert out.returncode == 0 and ": OK" in out.stdout, out.stdout + out.stderr


def test_ack_is_answered_with_nothing(channel, streams):
    s = open_stream(streams, channel)
    s.request(["default"])
    resp = s.recv()
    assert the_secret(resp).name == "default"
    s.ack(["default"])
    s.expect_nothing()


def test_rootca_first_then_default(channel, streams):
    s = open_stream(streams, channel)
    s.request(["ROOTCA"])
    assert the_secret(s.recv()).name == "ROOTCA"
    s.ack(["ROOTCA"])
    s.expect_nothing(0.5)
    # Adding a name is answered for the new name only.
    s.request(["ROOTCA", "default"], version=s.last.version_info)
    assert the_secret(s.recv()).name == "default"
    s.expect_nothing()
    # Dropping a name is answered with nothing; adding it back sends it again.
    s.request(["default"], version=s.last.version_info)
    s.expect_nothing(0.5)
    s.request(["default", "ROOTCA"], version=s.last.version_info)
    assert the_secret(s.recv()).name == "ROOTCA"
    s.expect_nothing(0.5)


def test_parallel_streams(agent, streams):
    channels = [channel_for(agent) for _ in range(4)]
    try:
        # Several streams multiplexed on each of several connections.
        opened = [open_stream(streams, ch) for ch in channels for _ in range(4)]
        for s in opened:
            s.request(["default", "ROOTCA"])
        versions = set()
        for s in opened:
            got = recv_secrets(s, 2)
            assert set(got) == {"default", "ROOTCA"}
            versions.add(got["default"][0].version_info)
        assert len(versions) == 1, f"streams got different certificates: {versions}"
    finally:
        for s in streams:
            s.close()
        for ch in channels:
            ch.close()


def test_serial_streams(channel, streams):
    versions = set()
    for _ in range(8):
        s = Stream(channel)
        try:
            s.request(["default", "ROOTCA"])
            got = recv_secrets(s, 2)
            assert set(got) == {"default", "ROOTCA"}
            versions.add(got["default"][0].version_info)
            s.ack(["default", "ROOTCA"])
            s.expect_nothing(0.2)
        finally:
            s.close()
    assert len(versions) == 1, versions


def test_unknown_name_ends_stream_with_invalid_argument(channel, streams):
    s = open_stream(streams, channel)
    s.request(["default", "bogus"])
    end = s.recv_end()
    assert end.error is not None, "stream ended OK"
    assert end.error.code() == grpc.StatusCode.INVALID_ARGUMENT, end
    assert "bogus" in end.error.details(), end


def test_unknown_name_added_later_ends_stream(channel, streams):
    s = open_stream(streams, channel)
    s.request(["default"])
    s.recv()
    s.request(["default", "no-such-secret"], version=s.last.version_info)
    end = s.recv_end()
    assert end.error is not None and end.error.code() == grpc.StatusCode.INVALID_ARGUMENT, end
    assert "no-such-secret" in end.error.details(), end


def test_nack_is_not_answered_with_a_resend(agent, channel, streams):
    s = open_stream(streams, channel)
    s.request(["default"])
    s.recv()
    s.nack(["default"], message="test-nack-marker: certificate refused")
    s.expect_nothing(2.5)
    # Logged when the agent reads it (normally within the quiet time above; polled, as
    # a loaded machine may be slower).
    deadline = time.time() + REPLY_WAIT
    while "test-nack-marker" not in agent.log_text() and time.time() < deadline:
        time.sleep(0.1)
    assert "test-nack-marker" in agent.log_text(), "the NACK was not logged"
    # The stream still works afterwards.
    s.request(["default", "ROOTCA"])
    assert the_secret(s.recv()).name == "ROOTCA"


def test_stale_nonce_is_ignored(channel, streams):
    root = Path(tempfile.mkdtemp(dir=FILES)) / "root.pem"
    root.write_bytes(self_signed("stale-test")[0])
    s = open_stream(streams, channel)
    s.request(["default"])
    first = s.recv().nonce
    s.request(["default", "ROOTCA"], version=s.last.version_info)
    assert the_secret(s.recv()).name == "ROOTCA"
    assert s.nonce != first
    # A request echoing the older nonce is stale: its new name must not be served.
    extra = f"file-root:{root}"
    s.request(["default", "ROOTCA", extra], nonce=first)
    s.expect_nothing()
    # The same request with the latest nonce is served.
    s.request(["default", "ROOTCA", extra], version=s.last.version_info)
    assert the_secret(s.recv()).name == extra


def test_reconnect_gets_the_same_certificate(agent):
    versions = []
    for _ in range(3):
        with channel_for(agent) as ch:
            s = Stream(ch)
            try:
                s.request(["default"])
                resp = s.recv()
                secret = the_secret(resp)
                assert secret.name == "default"
                versions.append((resp.version_info, leaf_serial(secret)))
            finally:
                s.close()
    assert len(set(versions)) == 1, versions


def test_many_concurrent_reconnects(agent):
    def one(_):
        with channel_for(agent) as ch:
            s = Stream(ch)
            try:
                s.request(["default"])
                resp = s.recv(timeout=60)  # 100 streams at once: generous
                assert the_secret(resp).name == "default"
                return resp.version_info
            finally:
                s.close()

    with concurrent.futures.ThreadPoolExecutor(max_workers=50) as pool:
        for _round in range(2):
            versions = list(pool.map(one, range(50)))
            assert len(versions) == 50 and len(set(versions)) == 1, set(versions)
    assert agent.proc.poll() is None, "agent died"
    assert agent.http("/healthz/ready")[0] == 200
    # The server still answers a fresh stream.
    assert one(0) == versions[0]


# --- FetchSecrets -----------------------------------------------------------------


def test_fetch_secrets_returns_all_names(agent, channel, streams):
    resp = fetch(agent, ["default", "ROOTCA"])
    assert resp.type_url == SECRET_TYPE
    assert resp.version_info
    assert len(resp.resources) == 2, describe(resp)
    secrets = {}
    for res in resp.resources:
        assert res.type_url == SECRET_TYPE
        sec = Secret.parse(res.value)
        secrets[sec.name] = sec
    assert set(secrets) == {"default", "ROOTCA"}
    assert secrets["default"].tls_certificate.certificate_chain.inline_bytes
    assert secrets["ROOTCA"].validation_context.trusted_ca.inline_bytes
    # The same certificate a stream gets.
    s = open_stream(streams, channel)
    s.request(["default"])
    streamed = the_secret(s.recv())
    assert streamed.tls_certificate.certificate_chain.inline_bytes == \
        secrets["default"].tls_certificate.certificate_chain.inline_bytes


def test_fetch_secrets_unknown_name(agent):
    expect_rpc_error(grpc.StatusCode.INVALID_ARGUMENT,
                     lambda: fetch(agent, ["default", "bogus"]), "bogus")


# --- rotation -----------------------------------------------------------------------


def wait_for_new_default(s, old_version, old_serial, timeout=ROTATION_WAIT):
    deadline = time.time() + timeout
    while True:
        left = deadline - time.time()
        if left <= 0:
            raise AssertionError(f"no rotated `default` within {timeout}s")
        resp = s.recv(timeout=left)
        secret = the_secret(resp)
        if secret.name == "default":
            break
    assert resp.version_info != old_version, "pushed `default` has the same version"
    assert leaf_serial(secret) != old_serial, "pushed `default` has the same certificate"
    s.ack(s.names)
    return resp.version_info, leaf_serial(secret)


def subscribe_default(s, names):
    s.names = list(names)
    s.request(names)
    # The agent rotates every ~2 s: a push may come between the initial responses.
    got = {}
    while set(got) != set(names):
        resp = s.recv()
        secret = the_secret(resp)
        assert secret.name in names, describe(resp)
        got[secret.name] = (resp, secret)
    s.ack(names)
    resp, secret = got["default"]
    return resp.version_info, leaf_serial(secret)


def test_rotation_pushes_to_every_stream(rotating_agent, streams):
    channels = [channel_for(rotating_agent) for _ in range(2)]
    try:
        holders = []
        for i in range(6):
            s = open_stream(streams, channels[i % 2])
            names = ["default", "ROOTCA"] if i % 2 else ["default"]
            holders.append((s, *subscribe_default(s, names)))
        for s, version, serial in holders:
            wait_for_new_default(s, version, serial)
        # A second rotation reaches them all again.
        again = [(s, s.last.version_info, leaf_serial(the_secret(s.last))) for s, _, _ in holders]
        for s, version, serial in again:
            wait_for_new_default(s, version, serial)
    finally:
        for s in streams:
            s.close()
        for ch in channels:
            ch.close()


def test_rotation_does_not_resend_unchanged_rootca(rotating_agent, streams):
    with channel_for(rotating_agent) as ch:
        roots_only = open_stream(streams, ch)
        roots_only.request(["ROOTCA"])
        assert the_secret(roots_only.recv()).name == "ROOTCA"
        roots_only.ack(["ROOTCA"])
        watcher = open_stream(streams, ch)
        version, serial = subscribe_default(watcher, ["default"])
        # Two rotations pass; the roots did not change, so nothing is pushed.
        version, serial = wait_for_new_default(watcher, version, serial)
        wait_for_new_default(watcher, version, serial)
        roots_only.expect_nothing(0.3)


def test_unsubscribe_stops_pushes_across_rotation(rotating_agent, streams):
    with channel_for(rotating_agent) as ch:
        quitter = open_stream(streams, ch)
        subscribe_default(quitter, ["default"])
        watcher = open_stream(streams, ch)
        version, serial = subscribe_default(watcher, ["default"])
        # Empty resource_names: unsubscribe. Drain a push that may have raced it
        # (sent before the server read the request), then expect silence.
        quitter.request([], version=quitter.last.version_info)
        time.sleep(0.3)
        while not quitter.responses.empty():
            item = quitter.responses.get_nowait()
            assert not isinstance(item, Ended), item
            quitter.nonce = item.nonce
            quitter.request([], version=item.version_info)
            time.sleep(0.3)
        version, serial = wait_for_new_default(watcher, version, serial)
        wait_for_new_default(watcher, version, serial)
        quitter.expect_nothing(0.5)


# --- DeltaSecrets -------------------------------------------------------------------


def delta_request(s, subscribe=(), unsubscribe=(), nonce=None, error=None, initial=None):
    s.send(DeltaDiscoveryRequest(
        node=NODE, type_url=SECRET_TYPE, resource_names_subscribe=list(subscribe),
        resource_names_unsubscribe=list(unsubscribe),
        initial_resource_versions=dict(initial or {}),
        response_nonce=s.nonce if nonce is None else nonce, error_detail=error))


def delta_resources(resp):
    """{name: (version, Secret)} of a delta response."""
    assert resp.type_url == SECRET_TYPE
    assert resp.nonce, "empty nonce"
    out = {}
    for res in resp.resources:
        assert res.resource is not None and res.resource.type_url == SECRET_TYPE
        assert res.version, f"{res.name}: empty version"
        secret = Secret.parse(res.resource.value)
        assert secret.name == res.name, f"resource {res.name} holds secret {secret.name}"
        assert res.name not in out
        out[res.name] = (res.version, secret)
    return out


def delta_recv(s, timeout=REPLY_WAIT):
    """The next delta response as {name: (version, Secret)}."""
    return delta_resources(s.recv(timeout))


def test_delta_subscribe_ack_nack_unsubscribe(agent, channel, streams):
    s = open_stream(streams, channel, delta=True)
    delta_request(s, subscribe=["default"])
    got = delta_recv(s)
    assert set(got) == {"default"}
    default_version, default = got["default"]
    assert default.tls_certificate.certificate_chain.inline_bytes
    delta_request(s)  # ACK
    s.expect_nothing()

    delta_request(s, subscribe=["ROOTCA"])
    got = delta_recv(s)
    assert set(got) == {"ROOTCA"}, "only the newly subscribed name is sent"
    assert got["ROOTCA"][1].validation_context.trusted_ca.inline_bytes
    delta_request(s, error=Status(code=13, message="delta-nack-marker"))  # NACK
    s.expect_nothing(2.5)

    delta_request(s, unsubscribe=["default"])
    s.expect_nothing(0.5)
    # Subscribing again after an unsubscribe sends the resource again.
    delta_request(s, subscribe=["default"])
    got = delta_recv(s)
    assert set(got) == {"default"}
    assert got["default"][0] == default_version


def test_delta_initial_resource_versions(agent, channel, streams):
    first = open_stream(streams, channel, delta=True)
    delta_request(first, subscribe=["default", "ROOTCA"])
    got = delta_recv(first)
    assert set(got) == {"default", "ROOTCA"}
    current = got["default"][0]

    # A reconnecting client already holding the current `default` gets only ROOTCA
    # (for which it claims an outdated version).
    s = open_stream(streams, channel, delta=True)
    delta_request(s, subscribe=["default", "ROOTCA"],
                  initial={"default": current, "ROOTCA": "outdated"})
    got = delta_recv(s)
    assert set(got) == {"ROOTCA"}, f"got {sorted(got)}"
    delta_request(s)
    s.expect_nothing()

    # An outdated `default` is sent.
    s2 = open_stream(streams, channel, delta=True)
    delta_request(s2, subscribe=["default"], initial={"default": "outdated"})
    got = delta_recv(s2)
    assert set(got) == {"default"} and got["default"][0] == current


def test_delta_unknown_name(channel, streams):
    s = open_stream(streams, channel, delta=True)
    delta_request(s, subscribe=["default", "bogus"])
    end = s.recv_end()
    assert end.error is not None and end.error.code() == grpc.StatusCode.INVALID_ARGUMENT, end
    assert "bogus" in end.error.details(), end


def test_delta_rotation_and_unsubscribe(rotating_agent, streams):
    with channel_for(rotating_agent) as ch:
        holder = open_stream(streams, ch, delta=True)
        delta_request(holder, subscribe=["default", "ROOTCA"])
        got = delta_recv(holder)
        assert set(got) == {"default", "ROOTCA"}
        delta_request(holder)
        version = got["default"][0]

        quitter = open_stream(streams, ch, delta=True)
        delta_request(quitter, subscribe=["default", "ROOTCA"])
        assert set(delta_recv(quitter)) == {"default", "ROOTCA"}
        delta_request(quitter, unsubscribe=["default"])
        time.sleep(0.3)
        while not quitter.responses.empty():  # a push that raced the unsubscribe
            quitter.recv(0.1)
            delta_request(quitter)
            time.sleep(0.3)

        for _ in range(2):
            deadline = time.time() + ROTATION_WAIT
            while True:
                got = delta_recv(holder, timeout=max(deadline - time.time(), 0.01))
                delta_request(holder)
                if "default" in got:
                    break
            assert got["default"][0] != version
            assert "ROOTCA" not in got, "unchanged ROOTCA pushed again"
            version = got["default"][0]
        quitter.expect_nothing(0.3)


# --- file-cert / file-root ----------------------------------------------------------


def self_signed(cn):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, cn)])
    now = time.time()
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(datetime.datetime.fromtimestamp(now - 60, datetime.timezone.utc))
            .not_valid_after(datetime.datetime.fromtimestamp(now + 3600, datetime.timezone.utc))
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def replace(path, data):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def test_file_secrets_served_and_pushed_on_change(channel, streams):
    d = Path(tempfile.mkdtemp(dir=FILES))
    cert, key, root = d / "cert.pem", d / "key.pem", d / "root.pem"
    c1, k1 = self_signed("workload-1")
    r1, _ = self_signed("root-1")
    cert.write_bytes(c1)
    key.write_bytes(k1)
    root.write_bytes(r1)
    cert_name, root_name = f"file-cert:{cert}~{key}", f"file-root:{root}"

    s = open_stream(streams, channel)
    s.request([cert_name, root_name])
    got = recv_secrets(s, 2)
    assert set(got) == {cert_name, root_name}
    tls = got[cert_name][1].tls_certificate
    assert tls.certificate_chain.inline_bytes == c1 and tls.private_key.inline_bytes == k1
    assert got[root_name][1].validation_context.trusted_ca.inline_bytes == r1
    versions = {n: resp.version_info for n, (resp, _) in got.items()}
    s.ack([cert_name, root_name])
    s.expect_nothing(0.5)

    c2, k2 = self_signed("workload-2")
    r2, _ = self_signed("root-2")
    replace(key, k2)
    replace(cert, c2)
    replace(root, r2)
    # Both names are pushed again (the key and cert may be seen in separate polls,
    # so wait until each holds its final content). Files are polled every 2 s: 30 s
    # at most, generous for a loaded machine.
    deadline = time.time() + 30
    final = {}
    while set(final) != {cert_name, root_name}:
        left = deadline - time.time()
        assert left > 0, f"pushes seen: {sorted(final)}"
        resp = s.recv(timeout=left)
        sec = the_secret(resp)
        assert sec.name in (cert_name, root_name)
        assert resp.version_info != versions[sec.name]
        s.ack([cert_name, root_name])
        if sec.name == cert_name:
            t = sec.tls_certificate
            if t.certificate_chain.inline_bytes == c2 and t.private_key.inline_bytes == k2:
                final[cert_name] = resp
        elif sec.validation_context.trusted_ca.inline_bytes == r2:
            final[root_name] = resp
    # Unchanged files are not pushed again.
    s.expect_nothing(2.5)


# --- file secrets under attack (security report, finding 2) -------------------------


def test_file_names_outside_the_allowed_directories_are_refused(ca, agent, channel, streams):
    """The reported attack: asking for the CA's root key by path, directly, as the key
    of a file-cert pair, and through a link planted in the allowed directory."""
    root_key = Path(ca.workdir) / "state" / "root-key.pem"
    assert root_key.exists()
    cert, _ = self_signed("planted")
    d = Path(tempfile.mkdtemp(dir=FILES))
    (d / "cert.pem").write_bytes(cert)
    (d / "link.pem").symlink_to(root_key)
    for name in (f"file-root:{root_key}",
                 f"file-cert:{d / 'cert.pem'}~{root_key}",
                 f"file-root:{d / 'link.pem'}",
                 f"file-root:{d}/../../../{root_key}"):
        s = open_stream(streams, channel)
        s.request([name])
        end = s.recv_end()
        assert end.error is not None, name
        want = (grpc.StatusCode.INVALID_ARGUMENT if "/../" in name
                else grpc.StatusCode.PERMISSION_DENIED)
        assert end.error.code() == want, f"{name}: {end}"
        assert b"PRIVATE KEY" not in (end.error.details() or "").encode()
    expect_rpc_error(grpc.StatusCode.PERMISSION_DENIED,
                     lambda: fetch(agent, [f"file-root:{root_key}"]), "--file-secret-dir")


def test_fifo_device_and_huge_files_are_refused_without_stalling_the_agent(agent, channel, streams):
    d = Path(tempfile.mkdtemp(dir=FILES))
    os.mkfifo(d / "fifo")
    (d / "zero").symlink_to("/dev/zero")
    (d / "huge.pem").write_bytes(b"-----BEGIN CERTIFICATE-----\n" + b"A" * (2 << 20))
    for name, code in ((f"file-root:{d / 'fifo'}", grpc.StatusCode.INVALID_ARGUMENT),
                       (f"file-root:{d / 'zero'}", grpc.StatusCode.PERMISSION_DENIED),
                       (f"file-root:{d / 'huge.pem'}", grpc.StatusCode.INVALID_ARGUMENT)):
        started = time.time()
        s = open_stream(streams, channel)
        s.request([name])
        end = s.recv_end(timeout=5)
        assert end.error is not None and end.error.code() == code, f"{name}: {end}"
        assert time.time() - started < 3, f"{name} took {time.time() - started:.1f}s"
    # The agent is still whole: ready, and serving its certificate.
    assert agent.http("/healthz/ready")[0] == 200
    s = open_stream(streams, channel)
    s.request(["default"])
    assert the_secret(s.recv()).name == "default"


def test_one_stream_holds_at_most_sixteen_file_names(channel, streams):
    d = Path(tempfile.mkdtemp(dir=FILES))
    s = open_stream(streams, channel)
    s.request([f"file-root:{d}/missing-{i}.pem" for i in range(17)])
    end = s.recv_end()
    assert end.error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, end
    assert "at most 16 file secrets" in end.error.details(), end
    # Sixteen are fine, and the refused stream took none of the slots.
    s = open_stream(streams, channel)
    s.request([f"file-root:{d}/missing-{i}.pem" for i in range(15)] + ["ROOTCA"]
              + [f"file-root:{d}/missing-15.pem"])
    assert the_secret(s.recv()).name == "ROOTCA"


def test_file_names_are_released_when_no_stream_holds_them(channel, streams):
    d = Path(tempfile.mkdtemp(dir=FILES))
    # Four streams of 16 names (a stream's share): 15 missing files and one that is
    # there, whose answer shows that the agent has taken all 16 of that stream
    # (every name's slot is taken before anything is sent), however slow the machine.
    present, _ = self_signed("present")
    holders = []
    for i in range(4):
        (d / f"present-{i}.pem").write_bytes(present)
        h = open_stream(streams, channel)
        h.request([f"file-root:{d}/missing-{i}-{j}.pem" for j in range(15)]
                  + [f"file-root:{d}/present-{i}.pem"])
        holders.append(h)
    for i, h in enumerate(holders):
        assert the_secret(h.recv()).name == f"file-root:{d}/present-{i}.pem"
    holders[-1].expect_nothing(0.5)  # missing files: waited for, not an error
    # Every slot is taken while those streams hold them...
    s = open_stream(streams, channel)
    s.request([f"file-root:{d}/one-more.pem"])
    end = s.recv_end()
    assert end.error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, end
    # ...and given back when they unsubscribe (once the agent has read that: retried
    # while refused, for a loaded machine).
    for h in holders:
        h.request([])
    root, _ = self_signed("after")
    (d / "after.pem").write_bytes(root)
    deadline = time.time() + REPLY_WAIT
    while True:
        s = open_stream(streams, channel)
        s.request([f"file-root:{d}/after.pem"])
        try:
            item = s.responses.get(timeout=REPLY_WAIT)
        except queue.Empty:
            raise AssertionError(f"no SDS response within {REPLY_WAIT}s") from None
        refused = (isinstance(item, Ended) and item.error is not None
                   and item.error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED)
        if not refused or time.time() > deadline:
            break
        time.sleep(0.1)
    assert not isinstance(item, Ended), f"the slots were not given back: {item}"
    assert the_secret(item).validation_context.trusted_ca.inline_bytes == root


def test_inspect_json_gives_rfc3339_times(ca, cluster):
    """`signet-agent inspect --json`, as a script would read it: the SPIFFE ID and
    times that any RFC 3339 parser takes, in UTC."""
    import datetime
    import json
    import subprocess

    from conftest import binary, start_agent, stop_agent
    agent = start_agent(ca, cluster)
    try:
        out = subprocess.run([binary("signet-agent"), "inspect", "--socket", str(agent.socket), "--json"],
                             capture_output=True, text=True, timeout=60, check=True).stdout
        secrets = json.loads(out)
        text = json.dumps(secrets)
        times = []
        for s in secrets:
            for cert in ([s["leaf"]] if s.get("leaf") else []) + s.get("roots", []):
                times += [cert["not_before"], cert["not_after"]]
        assert len(times) >= 4, text
        for t in times:
            parsed = datetime.datetime.fromisoformat(t)
            assert parsed.utcoffset() == datetime.timedelta(0) and t.endswith("Z"), t
        assert "spiffe://cluster.local/ns/default/sa/bookinfo" in text
    finally:
        stop_agent(agent)
