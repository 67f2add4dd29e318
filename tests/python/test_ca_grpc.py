"""signet-ca driven by an independent gRPC client (grpcio, stubs generated from
proto/ by grpcio-tools), with CSRs from `cryptography`, tokens from PyJWT and chains
checked by `openssl verify`."""

import datetime
import subprocess
import tempfile
import time

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID
from google.protobuf import struct_pb2
from istio.v1.auth import ca_pb2

from conftest import (ISSUER, Cluster, binary, hammer, make_csr, openssl_verify, request,
                      start_ca, stop_ca)

SPIFFE = "spiffe://cluster.local/ns/default/sa/bookinfo"


def leaf_of(chain):
    return x509.load_pem_x509_certificate(chain[0].encode())


def expect_error(code, fn, *contains):
    with pytest.raises(grpc.RpcError) as info:
        fn()
    err = info.value
    assert err.code() == code, f"want {code}, got {err.code()}: {err.details()}"
    for text in contains:
        assert text in err.details(), f"{text!r} not in {err.details()!r}"
    return err.details()


def test_issues_spiffe_certificate_that_openssl_verifies(ca, cluster):
    key, csr = make_csr(uri=SPIFFE)
    resp = request(ca.stub(), csr, cluster.token())
    chain = list(resp.cert_chain)
    # Self-signed CA: [leaf, root]; the last element is the trust bundle.
    assert len(chain) == 2
    assert chain[-1].encode().strip() == ca.root_pem.strip()
    with tempfile.TemporaryDirectory() as d:
        result = openssl_verify(chain[-1], chain, d)
        assert result.returncode == 0, result.stdout + result.stderr
    leaf = leaf_of(chain)
    assert leaf.subject == x509.Name([])
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [SPIFFE]
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and ku.key_encipherment and not ku.key_cert_sign
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    root = x509.load_pem_x509_certificate(chain[-1].encode())
    ski = root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert leaf.public_key().public_numbers() == key.public_key().public_numbers()
    assert 0 < leaf.serial_number < 2**128
    life = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert datetime.timedelta(hours=24) <= life <= datetime.timedelta(hours=24, minutes=2)
    assert isinstance(leaf.signature_hash_algorithm, hashes.SHA256)


@pytest.mark.parametrize("ttl,expected", [
    (3600, datetime.timedelta(hours=1)),
    (0, datetime.timedelta(hours=24)),
    (-30, datetime.timedelta(hours=24)),
    (100 * 365 * 86400, datetime.timedelta(hours=2160)),
    (5, datetime.timedelta(seconds=5)),
])
def test_lifetime_is_requested_default_or_clamped(ca, cluster, ttl, expected):
    _, csr = make_csr()
    before = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    leaf = leaf_of(request(ca.stub(), csr, cluster.token(), ttl=ttl).cert_chain)
    after = datetime.datetime.now(datetime.timezone.utc)
    # NotAfter is now + lifetime (the answer shows the real NotAfter when clamped).
    assert before + expected - datetime.timedelta(seconds=1) <= leaf.not_valid_after_utc
    assert leaf.not_valid_after_utc <= after + expected
    # Backdated by at most 10% of the lifetime and never more than two minutes.
    backdate = before - leaf.not_valid_before_utc
    assert backdate <= min(expected / 10, datetime.timedelta(minutes=2)) + datetime.timedelta(seconds=1)


def test_rsa_and_p384_csrs(ca, cluster):
    for key in (rsa.generate_private_key(public_exponent=65537, key_size=2048),
                ec.generate_private_key(ec.SECP384R1())):
        _, csr = make_csr(key=key, uri=SPIFFE)
        leaf = leaf_of(request(ca.stub(), csr, cluster.token()).cert_chain)
        assert leaf.public_key().public_numbers() == key.public_key().public_numbers()


def test_bad_csrs_are_invalid_argument(ca, cluster):
    stub, token = ca.stub(), cluster.token()
    expect_error(grpc.StatusCode.INVALID_ARGUMENT, lambda: request(stub, "", token), "empty")
    expect_error(grpc.StatusCode.INVALID_ARGUMENT, lambda: request(stub, "garbage", token), "PEM")
    _, csr = make_csr()
    lines = csr.strip().splitlines()
    truncated = "\n".join(lines[:3] + lines[-1:]) + "\n"
    expect_error(grpc.StatusCode.INVALID_ARGUMENT, lambda: request(stub, truncated, token))
    # A CSR whose signature was made by another key: no proof of possession.
    key = ec.generate_private_key(ec.SECP256R1())
    other = ec.generate_private_key(ec.SECP256R1())
    good = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
    forged_der = bytearray(good.public_bytes(serialization.Encoding.DER))
    forged_der[-4] ^= 0x55
    import base64
    forged = ("-----BEGIN CERTIFICATE REQUEST-----\n"
              + base64.encodebytes(bytes(forged_der)).decode()
              + "-----END CERTIFICATE REQUEST-----\n")
    expect_error(grpc.StatusCode.INVALID_ARGUMENT, lambda: request(stub, forged, token))
    del other
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    _, csr = make_csr(key=weak)
    expect_error(grpc.StatusCode.INVALID_ARGUMENT, lambda: request(stub, csr, token), "RSA-1024")


def test_served_roots_are_heard_and_the_trust_stage_is_told(ca, cluster):
    """A signet-agent says which roots it serves (`signet-served-roots`) and hears the
    stage of the CA's trust change (`signet-trust-stage`); a grpcio client built from
    our protos sends the same metadata. The header is advisory: a malformed value
    costs no certificate, and the CA's log says what was wrong with it."""
    stub, token = ca.stub(), cluster.token()
    _, csr = make_csr(uri=SPIFFE)
    root = x509.load_pem_x509_certificate(ca.root_pem)
    served = root.fingerprint(hashes.SHA256()).hex()
    md = [("authorization", f"Bearer {token}"), ("clusterid", "Kubernetes"),
          ("signet-served-roots", served)]
    answer, call = stub.CreateCertificate.with_call(
        ca_pb2.IstioCertificateRequest(csr=csr), metadata=md, timeout=30)
    assert len(answer.cert_chain) >= 2
    assert ("signet-trust-stage", "idle") in call.initial_metadata()
    for bad in ["xyz", served + ",", served.upper(), ",".join([served] * 33)]:
        md[-1] = ("signet-served-roots", bad)
        answer = stub.CreateCertificate(ca_pb2.IstioCertificateRequest(csr=csr), metadata=md,
                                        timeout=30)
        assert len(answer.cert_chain) >= 2, bad
    log = (ca.workdir / "ca.log").read_text()
    assert "ignoring a malformed report of the roots a caller serves" in log, log[-2000:]
    assert "signet-served-roots: entry 1 is not a SHA-256 digest" in log, log[-2000:]


def test_csr_for_another_identity_is_permission_denied(ca, cluster):
    other = "spiffe://cluster.local/ns/kube-system/sa/admin"
    _, csr = make_csr(uri=other)
    details = expect_error(grpc.StatusCode.PERMISSION_DENIED,
                           lambda: request(ca.stub(), csr, cluster.token()), other, SPIFFE)
    assert "Bearer" not in details


def test_ca_true_request_still_gets_a_leaf(ca, cluster):
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
           .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
           .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode())
    leaf = leaf_of(request(ca.stub(), csr, cluster.token()).cert_chain)
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False


def test_bad_tokens_are_unauthenticated_and_never_echoed(ca, cluster):
    stub = ca.stub()
    _, csr = make_csr()
    hs = __import__("jwt").encode({"sub": "system:serviceaccount:default:bookinfo", "iss": ISSUER,
                                   "aud": ["istio-ca"], "exp": int(time.time()) + 600},
                                  "s" * 32, algorithm="HS256")
    unsigned = __import__("jwt").encode({"sub": "system:serviceaccount:default:bookinfo", "iss": ISSUER,
                                         "aud": ["istio-ca"], "exp": int(time.time()) + 600},
                                        None, algorithm="none")
    stranger = Cluster(kid=cluster.kid)
    cases = {
        "missing": (None, "no credentials"),
        "empty": ("", "no credentials"),
        "expired": (cluster.token(exp_in=-3600), "expired"),
        "wrong audience": (cluster.token(aud=("other",)), "audience"),
        "wrong issuer": (cluster.token(iss="https://evil.example"), "issuer"),
        "hmac": (hs, "HS256"),
        "unsigned": (unsigned, "token"),
        "other key": (stranger.token(), "signature"),
        "garbage": ("not-a-jwt", "malformed"),
    }
    for name, (token, reason) in cases.items():
        details = expect_error(grpc.StatusCode.UNAUTHENTICATED,
                               lambda: request(stub, csr, token), reason)
        if token:
            assert token not in details, name
            signature = token.split(".")[-1]
            assert not signature or signature not in details, name


def test_unknown_cluster_id_is_refused_by_name(ca, cluster):
    _, csr = make_csr()
    details = expect_error(grpc.StatusCode.UNAUTHENTICATED,
                           lambda: request(ca.stub(), csr, cluster.token(), cluster_id="cluster-9"),
                           "cluster-9")
    # The clusters this CA knows are for its log, not for an anonymous caller.
    assert "Kubernetes" not in details, details
    # Empty and the local id are both the local cluster.
    request(ca.stub(), csr, cluster.token(), cluster_id=None)
    request(ca.stub(), csr, cluster.token(), cluster_id="")


def test_impersonation_is_refused_without_configuration(ca, cluster):
    _, csr = make_csr()
    md = struct_pb2.Struct()
    md.update({"ImpersonatedIdentity": "spiffe://cluster.local/ns/x/sa/y"})
    expect_error(grpc.StatusCode.PERMISSION_DENIED,
                 lambda: request(ca.stub(), csr, cluster.token(), metadata=md), "impersonat")


def test_oversize_request_is_refused(ca, cluster):
    big = "A" * (200 * 1024)
    err = expect_error(grpc.StatusCode.RESOURCE_EXHAUSTED,
                       lambda: request(ca.stub(), big, cluster.token()))
    assert err


def test_metrics_use_istio_names(ca, cluster):
    _, csr = make_csr()
    request(ca.stub(), csr, cluster.token())
    status, body = ca.http("/metrics")
    assert status == 200
    for name in ["citadel_server_csr_count", "citadel_server_success_cert_issuance_count",
                 "citadel_server_authentication_failure_count",
                 "citadel_server_root_cert_expiry_timestamp",
                 "citadel_server_cert_chain_expiry_timestamp",
                 "signet_ca_create_certificate_duration_seconds_bucket"]:
        assert name in body, name
    assert "citadel_server_csr_count_total" not in body
    assert ca.http("/healthz")[0] == 200
    assert ca.http("/readyz")[0] == 200


def test_overload_refusals_carry_a_retry_pushback_that_spreads_callers(cluster):
    """A CA refusing for overload tells grpcio when to come back: the
    `grpc-retry-pushback-ms` trailer of gRFC A6, booked at the rate the CA issues, so
    that callers refused one after another are sent to later and later slots."""
    with tempfile.TemporaryDirectory() as d:
        # An RSA-4096 intermediate (milliseconds a signature), one signing thread and one
        # pending slot: 16 callers that ignore the pushback keep the queue full.
        pki = [binary("signet-ca"), "pki"]
        subprocess.run([*pki, "root", "--out", f"{d}/root", "--key-type", "ec-p256"],
                       check=True, capture_output=True)
        subprocess.run([*pki, "intermediate", "--root", f"{d}/root", "--cluster", "c1",
                        "--out", f"{d}/cacerts", "--key-type", "rsa4096"],
                       check=True, capture_output=True)
        ca = start_ca(d, cluster, ["--signing-threads", "1", "--max-pending", "1"],
                      cacerts=f"{d}/cacerts")
        try:
            token = cluster.token()
            _, csr = make_csr()

            def caller():
                stub = ca.stub()
                return lambda: request(stub, csr, token)

            issued, refusals, others = hammer(caller)
        finally:
            stop_ca(ca)
    assert not others, others[:3]
    assert issued > 10, issued
    pushed = [(at, int(v)) for at, v in refusals if v is not None]
    assert len(pushed) > 100, f"{len(pushed)} of {len(refusals)} refusals carried a pushback"
    for _, ms in pushed:
        assert 250 <= ms <= 60_000, ms
    # Each refusal books the slot after the last one: callers refused later in the run
    # are sent later, well beyond the shortest delay.
    assert max(ms for _, ms in pushed) > 2_000, pushed[-5:]
    first, last = pushed[0], pushed[-1]
    assert last[0] + last[1] / 1e3 > first[0] + first[1] / 1e3, (first, last)


def test_subject_cn_profile_for_client_certificate_sts(cluster):
    """--subject-cn-template: a Subject CN in the chosen namespaces (MinIO's
    AssumeRoleWithCertificate names its policy by it), the SPIFFE URI SAN and
    clientAuth unchanged; none elsewhere. As openssl reads the leaf."""
    flags = ["--subject-cn-template", "{ns}.{sa}", "--subject-cn-namespaces", "default,shop-admin"]
    with tempfile.TemporaryDirectory() as d:
        ca = start_ca(d, cluster, extra_args=flags)
        try:
            _, csr = make_csr(uri=SPIFFE)
            chain = list(request(ca.stub(), csr, cluster.token()).cert_chain)
            shown = subprocess.run(
                ["openssl", "x509", "-noout", "-subject", "-ext",
                 "extendedKeyUsage,subjectAltName"],
                input=chain[0], capture_output=True, text=True, check=True).stdout
            assert "CN=default.bookinfo" in shown.replace(" = ", "="), shown
            assert "TLS Web Client Authentication" in shown, shown
            assert f"URI:{SPIFFE}" in shown, shown
            # With a subject the SAN extension is no longer critical (RFC 5280 4.2.1.6).
            leaf = leaf_of(chain)
            san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            assert not san.critical
            assert leaf.subject.rfc4514_string() == "CN=default.bookinfo"
            with tempfile.TemporaryDirectory() as v:
                verified = openssl_verify(chain[-1], chain, v)
                assert verified.returncode == 0, verified.stdout + verified.stderr
            # Another namespace: the empty subject of every other certificate.
            other = "spiffe://cluster.local/ns/shop/sa/web"
            _, csr = make_csr(uri=other)
            chain = list(request(ca.stub(), csr, cluster.token(ns="shop", sa="web")).cert_chain)
            assert leaf_of(chain).subject == x509.Name([])
        finally:
            stop_ca(ca)
    for bad, problem in [(["--subject-cn-template", "{name}", "--subject-cn-namespaces", "*"],
                          "unknown placeholder"),
                         (["--subject-cn-namespaces", "default"], "needs --subject-cn-template"),
                         (["--subject-cn-template", "{sa}"], "name the namespaces"),
                         (["--subject-cn-template", "{ns}-{sa}", "--subject-cn-namespaces", "a,b"],
                          "cannot hold")]:
        out = subprocess.run([binary("signet-ca"), "serve", "--check-flags", "--jwks", "/x",
                              "--jwt-issuer", "i", *bad], capture_output=True, text=True)
        assert out.returncode == 64, (bad, out.stderr)
        assert problem in out.stderr, (bad, out.stderr)
