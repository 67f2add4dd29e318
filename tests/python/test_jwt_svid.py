"""JWT-SVIDs minted by the real signet-ca and checked by clients we did not write:
PyJWT's PyJWKClient finds the keys through Signet's OIDC discovery (as MinIO, AWS IAM
or Vault would) and validates a token, refusing one for another audience, an expired
one and one whose key was retired; grpcio drives the bad requests; py-spiffe fetches
JWT-SVIDs and the JWT bundle from signet-agent's Workload API and validates with it."""

import datetime
import json
import ssl
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
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from spiffe import JwtSvid, TrustDomain, WorkloadApiClient
from spiffe._proto import workload_pb2, workload_pb2_grpc

from conftest import ROOT, free_port, hammer, start_agent, start_ca, stop_agent, stop_ca

sys.path.insert(0, str(ROOT / ".venv" / "signet_pb"))
from signet.v1 import jwt_pb2, jwt_pb2_grpc  # noqa: E402

SPIFFE = "spiffe://cluster.local/ns/default/sa/bookinfo"


def oidc_cert(workdir):
    """A serving certificate for localhost from a CA of our own (as an operator's
    cert-manager would give); the CA's PEM."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "oidc test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    (workdir / "oidc.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (workdir / "oidc-key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    (workdir / "oidc-ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return workdir / "oidc-ca.pem"


class JwtCa:
    """signet-ca with JWT-SVIDs and OIDC discovery at https://localhost:<port>."""

    def __init__(self, workdir, cluster, *extra):
        self.workdir = Path(workdir)
        self.cluster = cluster
        self.extra = extra
        self.trust = oidc_cert(self.workdir)
        # One issuer URL across restarts, as relying parties are configured with it.
        self.port = free_port()
        self.issuer = f"https://localhost:{self.port}"
        self.start()

    def start(self):
        self.ca = start_ca(self.workdir, self.cluster, extra_args=[
            "--jwt-svids", "--oidc-issuer", self.issuer,
            "--oidc-addr", f"127.0.0.1:{self.port}",
            "--oidc-tls-cert", str(self.workdir / "oidc.pem"),
            "--oidc-tls-key", str(self.workdir / "oidc-key.pem"),
            "--jwt-svid-max-ttl", "10m", *self.extra])

    def stop(self):
        stop_ca(self.ca)

    def ssl(self):
        return ssl.create_default_context(cafile=str(self.trust))

    def discovery(self):
        url = f"{self.issuer}/.well-known/openid-configuration"
        with urllib.request.urlopen(url, context=self.ssl(), timeout=30) as r:
            assert r.headers["Content-Type"] == "application/json"
            return json.loads(r.read())

    def relying_party(self):
        """What MinIO or AWS IAM do with an issuer URL: discovery, then the JWKS."""
        doc = self.discovery()
        return jwt.PyJWKClient(doc["jwks_uri"], ssl_context=self.ssl(), cache_keys=False,
                               cache_jwk_set=False)

    def stub(self):
        return jwt_pb2_grpc.JwtSvidServiceStub(self.ca.channel())

    def mint(self, audience=("minio",), ttl=0, token=None, metadata=None):
        md = list(metadata or [])
        token = self.cluster.token() if token is None else token
        if token:
            md.append(("authorization", f"Bearer {token}"))
        return self.stub().MintJwtSvid(
            jwt_pb2.MintJwtSvidRequest(audience=list(audience), ttl_seconds=ttl),
            metadata=md, timeout=30)

    def log(self):
        self.ca.log.flush()
        return Path(self.ca.log.name).read_text(errors="replace")


@pytest.fixture(scope="module")
def jca(cluster):
    with tempfile.TemporaryDirectory() as d:
        server = JwtCa(d, cluster)
        yield server
        server.stop()


def verify(jca, token, audience="minio"):
    key = jca.relying_party().get_signing_key_from_jwt(token)
    return jwt.decode(token, key.key, algorithms=["ES256", "RS256"], audience=audience,
                      issuer=jca.issuer)


def test_discovery_names_the_issuer_and_its_keys(jca):
    doc = jca.discovery()
    assert doc["issuer"] == jca.issuer
    assert doc["jwks_uri"] == f"{jca.issuer}/keys"
    assert "ES256" in doc["id_token_signing_alg_values_supported"]
    with urllib.request.urlopen(doc["jwks_uri"], context=jca.ssl(), timeout=30) as r:
        keys = json.loads(r.read())["keys"]
    assert [k["kty"] for k in keys] == ["EC"]
    assert all("d" not in k for k in keys), "no private part in the JWKS"
    # Nothing else is served.
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"{jca.issuer}/other", context=jca.ssl(), timeout=30)
    assert e.value.code == 404


def test_a_relying_party_validates_a_jwt_svid_through_discovery(jca):
    answer = jca.mint(audience=("minio", "vault"))
    claims = verify(jca, answer.token)
    assert claims["sub"] == SPIFFE == answer.spiffe_id
    assert claims["aud"] == ["minio", "vault"]
    assert claims["exp"] == answer.expires_at
    assert claims["exp"] - claims["iat"] == 300, "five minutes by default"
    header = jwt.get_unverified_header(answer.token)
    assert header["alg"] == "ES256" and header["typ"] == "JWT" and header["kid"]
    # The other audience validates too; an audience it was not minted for does not.
    verify(jca, answer.token, audience="vault")
    with pytest.raises(jwt.InvalidAudienceError):
        verify(jca, answer.token, audience="aws")


def test_an_expired_jwt_svid_is_refused(jca):
    answer = jca.mint(ttl=1)
    assert answer.expires_at - int(time.time()) <= 1
    time.sleep(2.2)
    with pytest.raises(jwt.ExpiredSignatureError):
        verify(jca, answer.token)


def test_bad_requests_get_the_right_status_and_no_secret_reaches_the_log(jca, cluster):
    foreign_audience = cluster.token(aud=("other",))
    cases = [
        ((), 0, None, grpc.StatusCode.INVALID_ARGUMENT, "audience is required"),
        ([f"a{i}" for i in range(17)], 0, None, grpc.StatusCode.INVALID_ARGUMENT, "at most 16"),
        (["x" * 257], 0, None, grpc.StatusCode.INVALID_ARGUMENT, "at most 256"),
        (["ok", ""], 0, None, grpc.StatusCode.INVALID_ARGUMENT, "audience 1 is empty"),
        (["a\tb"], 0, None, grpc.StatusCode.INVALID_ARGUMENT, "control characters"),
        (["minio"], 601, None, grpc.StatusCode.INVALID_ARGUMENT, "--jwt-svid-max-ttl"),
        (["minio"], -5, None, grpc.StatusCode.INVALID_ARGUMENT, "negative"),
        (["minio"], 0, "", grpc.StatusCode.UNAUTHENTICATED, ""),
        (["minio"], 0, foreign_audience, grpc.StatusCode.UNAUTHENTICATED, ""),
    ]
    for audience, ttl, token, code, words in cases:
        with pytest.raises(grpc.RpcError) as e:
            jca.mint(audience=audience, ttl=ttl, token=token)
        assert e.value.code() == code, (audience, ttl, e.value.details())
        assert words in e.value.details(), e.value.details()
    # The longest lifetime asked for is given.
    caller_token = cluster.token()
    answer = jca.mint(ttl=600, token=caller_token)
    assert answer.expires_at - int(time.time()) in range(598, 601)
    log = jca.log()
    assert "jwt-svid issued" in log
    assert answer.token not in log
    assert answer.token.split(".")[2] not in log, "no signature in the log"
    assert caller_token not in log and foreign_audience not in log, "no caller token"
    key_set = (Path(jca.workdir) / "state" / "jwt-keys.json").read_text()
    assert json.loads(key_set)["keys"][0]["pkcs8"] not in log


def test_keys_persist_across_restarts_and_a_retired_key_is_refused(cluster):
    with tempfile.TemporaryDirectory() as d:
        server = JwtCa(d, cluster)
        try:
            before = server.mint(ttl=600)
            kid = jwt.get_unverified_header(before.token)["kid"]
            key_file = Path(d) / "state" / "jwt-keys.json"
            assert key_file.stat().st_mode & 0o777 == 0o600
            server.stop()
            # A restart keeps the key: tokens minted before still validate.
            server.start()
            after = server.mint()
            assert jwt.get_unverified_header(after.token)["kid"] == kid
            verify(server, before.token)
            server.stop()
            # The key retired at once (as after a compromise: taken out of the set):
            # a fresh key signs, and tokens of the old one no longer validate.
            key_file.write_text(json.dumps({"version": 1, "keys": []}))
            server.start()
            fresh = server.mint()
            assert jwt.get_unverified_header(fresh.token)["kid"] != kid
            verify(server, fresh.token)
            with pytest.raises(jwt.PyJWKClientError):
                verify(server, before.token)
        finally:
            server.stop()


def test_rs256_keys_on_request(cluster):
    with tempfile.TemporaryDirectory() as d:
        server = JwtCa(d, cluster, "--jwt-key-algorithm", "rs256")
        try:
            answer = server.mint()
            assert jwt.get_unverified_header(answer.token)["alg"] == "RS256"
            assert verify(server, answer.token)["sub"] == SPIFFE
        finally:
            server.stop()


def test_overload_refusals_carry_a_retry_pushback(cluster):
    """JWT-SVID mints share the signing queue with certificates; a mint refused for
    overload tells grpcio when to come back (`grpc-retry-pushback-ms`, gRFC A6), booked
    at the rate the CA issues, as CreateCertificate refusals are."""
    with tempfile.TemporaryDirectory() as d:
        # RS256 (a millisecond a signature), one signing thread and one pending slot:
        # 16 callers that ignore the pushback keep the queue full.
        server = JwtCa(d, cluster, "--jwt-key-algorithm", "rs256", "--signing-threads", "1",
                       "--max-pending", "1")
        try:
            md = [("authorization", f"Bearer {cluster.token()}")]

            def caller():
                stub = server.stub()
                return lambda: stub.MintJwtSvid(
                    jwt_pb2.MintJwtSvidRequest(audience=["minio"]), metadata=md, timeout=30)

            minted, refusals, others = hammer(caller)
        finally:
            server.stop()
    assert not others, others[:3]
    assert minted > 10, minted
    pushed = [int(v) for _, v in refusals if v is not None]
    assert len(pushed) > 20, f"{len(pushed)} of {len(refusals)} refusals carried a pushback"
    assert all(250 <= ms <= 60_000 for ms in pushed), pushed[:5]


def test_bad_oidc_flags_exit_64(tmp_path):
    from conftest import binary
    for args, words in [
        (["--oidc-addr", "127.0.0.1:1"], "needs --jwt-svids"),
        (["--jwt-svids", "--oidc-addr", "127.0.0.1:1"], "needs --oidc-issuer"),
        (["--jwt-svids", "--oidc-issuer", "http://h"], "https"),
        (["--jwt-svids", "--jwt-svid-ttl", "2h", "--jwt-svid-max-ttl", "1h"], "shorter"),
        (["--jwt-svids", "--jwt-keys-secret", "nope"], "<namespace>/<name>"),
        (["--jwt-svids", "--jwt-key-rotation", "1m"], "keeps up to 63 keys"),
        (["--jwt-svids", "--jwt-key-rotation", "1h", "--jwt-svid-max-ttl", "24h"], "at most 16"),
    ]:
        out = subprocess.run([binary("signet-ca"), "serve", "--check-flags", "--jwks", "/j.json",
                              "--jwt-issuer", "https://kubernetes.default.svc", *args],
                             capture_output=True, text=True)
        assert out.returncode == 64, (args, out.stderr)
        assert words in out.stderr, out.stderr


# --- signet-agent's Workload API ------------------------------------------------------


@pytest.fixture(scope="module")
def agent(jca, cluster):
    workdir = Path(tempfile.mkdtemp(prefix="jw", dir="/tmp"))
    socket = workdir / "api" / "agent.sock"
    agent = start_agent(jca.ca, cluster, workdir=workdir,
                        extra_args=["--workload-api-socket", str(socket)])
    yield agent, socket
    stop_agent(agent)


def test_py_spiffe_fetches_and_validates_jwt_svids(agent, jca):
    _, socket = agent
    client = WorkloadApiClient(socket_path=f"unix://{socket}")
    try:
        svid = client.fetch_jwt_svid(audience={"minio"}, timeout=30)
        assert str(svid.spiffe_id) == SPIFFE
        assert svid.audience == {"minio"}
        # Cached per audience set.
        assert client.fetch_jwt_svid(audience={"minio"}, timeout=30).token == svid.token
        bundles = client.fetch_jwt_bundles(timeout=30)
        bundle = bundles.get_bundle_for_trust_domain(TrustDomain("cluster.local"))
        assert bundle is not None
        # py-spiffe's own check with the bundle the agent served.
        parsed = JwtSvid.parse_and_validate(svid.token, bundle, {"minio"})
        assert str(parsed.spiffe_id) == SPIFFE
        # The agent's ValidateJWTSVID.
        assert str(client.validate_jwt_svid(svid.token, "minio", timeout=30).spiffe_id) == SPIFFE
        with pytest.raises(Exception) as e:
            client.validate_jwt_svid(svid.token, "aws", timeout=30)
        assert "aud" in str(e.value).lower() or "audience" in str(e.value).lower(), e.value
        # The same key set the relying party reads through discovery.
        verify(jca, svid.token)
    finally:
        client.close()
    agent_proc, _ = agent
    assert svid.token not in agent_proc.log_text(), "no token in the agent's log"
    assert svid.token.split(".")[2] not in agent_proc.log_text()


def raw_stub(socket):
    channel = grpc.insecure_channel(f"unix://{socket}")
    return channel, workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)


def test_workload_api_jwt_refusals(agent, cluster):
    _, socket = agent
    md = [("workload.spiffe.io", "true")]
    channel, stub = raw_stub(socket)
    with channel:
        with pytest.raises(grpc.RpcError) as e:
            stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(audience=["minio"]), timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "workload.spiffe.io" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(audience=[]), metadata=md, timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # The CA's own bound, passed through.
        with pytest.raises(grpc.RpcError) as e:
            stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(audience=["x" * 300]), metadata=md,
                              timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "at most 256" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(
                audience=["minio"], spiffe_id="spiffe://cluster.local/ns/default/sa/other"),
                metadata=md, timeout=30)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        def refused(svid, words, audience="minio"):
            with pytest.raises(grpc.RpcError) as e:
                stub.ValidateJWTSVID(workload_pb2.ValidateJWTSVIDRequest(
                    audience=audience, svid=svid), metadata=md, timeout=30)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert words in e.value.details(), e.value.details()

        # A token of a trust domain the agent holds no JWT bundle for.
        key = ec.generate_private_key(ec.SECP256R1())
        claims = {"sub": SPIFFE, "aud": ["minio"], "exp": int(time.time()) + 60}
        foreign = jwt.encode({**claims, "sub": "spiffe://other.org/w"}, key, algorithm="ES256",
                             headers={"kid": "k"})
        refused(foreign, "no JWT bundle for trust domain \"other.org\"")
        # Ours, signed by a key not in the bundle.
        refused(jwt.encode(claims, key, algorithm="ES256", headers={"kid": "k"}),
                "not in the bundle")
        # Naming the bundle's real key: the signature itself must hold, with the
        # key's own algorithm.
        bundles = stub.FetchJWTBundles(workload_pb2.JWTBundlesRequest(), metadata=md, timeout=30)
        real_kid = json.loads(next(bundles).bundles["spiffe://cluster.local"])["keys"][0]["kid"]
        bundles.cancel()
        forged = jwt.encode(claims, key, algorithm="ES256", headers={"kid": real_kid})
        refused(forged, "signature does not verify")
        from cryptography.hazmat.primitives.asymmetric import rsa
        rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        refused(jwt.encode(claims, rsa_key, algorithm="RS256", headers={"kid": real_kid}),
                "algorithm")
        refused(forged, "audience must be specified", audience="")
        refused("", "svid must be specified")
        # The JWT bundle stream sends the CA's key set.
        bundles = stub.FetchJWTBundles(workload_pb2.JWTBundlesRequest(), metadata=md, timeout=30)
        first = next(bundles)
        assert list(first.bundles) == ["spiffe://cluster.local"]
        assert json.loads(first.bundles["spiffe://cluster.local"])["keys"][0]["kty"] == "EC"
        bundles.cancel()
