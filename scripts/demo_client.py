"""The demo's workload side, written with independent libraries: makes a
service-account-style token and its JWKS (PyJWT, cryptography), then asks signet-ca
for a certificate over gRPC (grpcio) and shows what came back.

usage: demo_client.py init DIR            write DIR/jwks.json and DIR/token
       demo_client.py request DIR ADDR    CSR -> CreateCertificate -> print the result
"""

import base64
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / ".venv" / "signet_pb"))

ISSUER = "https://kubernetes.default.svc.cluster.local"


def b64(n):
    return base64.urlsafe_b64encode(n.to_bytes((n.bit_length() + 7) // 8, "big")).rstrip(b"=").decode()


def init(d):
    import jwt
    from cryptography.hazmat.primitives.asymmetric import rsa
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pub = key.public_key().public_numbers()
    (d / "jwks.json").write_text(json.dumps({"keys": [
        {"kty": "RSA", "alg": "RS256", "kid": "demo", "n": b64(pub.n), "e": b64(pub.e)}]}))
    now = int(time.time())
    token = jwt.encode({"iss": ISSUER, "aud": ["istio-ca"], "sub": "system:serviceaccount:demo:web",
                        "iat": now, "nbf": now, "exp": now + 3600,
                        "kubernetes.io": {"namespace": "demo", "serviceaccount": {"name": "web"}}},
                       key, algorithm="RS256", headers={"kid": "demo"})
    (d / "token").write_text(token)


def request(d, addr):
    import grpc
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from istio.v1.auth import ca_pb2, ca_pb2_grpc

    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
           .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode())
    root = (d / "state" / "root-cert.pem").read_bytes()
    channel = grpc.secure_channel(addr, grpc.ssl_channel_credentials(root_certificates=root),
                                  options=[("grpc.ssl_target_name_override", "istiod.istio-system.svc")])
    stub = ca_pb2_grpc.IstioCertificateServiceStub(channel)
    resp = stub.CreateCertificate(ca_pb2.IstioCertificateRequest(csr=csr),
                                  metadata=[("authorization", "Bearer " + (d / "token").read_text())],
                                  timeout=10)
    chain = list(resp.cert_chain)
    leaf = x509.load_pem_x509_certificate(chain[0].encode())
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    (d / "leaf.pem").write_text(chain[0])
    (d / "bundle.pem").write_text(chain[-1])
    print(f"  SPIFFE ID : {san.get_values_for_type(x509.UniformResourceIdentifier)[0]}")
    print(f"  serial    : {leaf.serial_number:x}")
    print(f"  not before: {leaf.not_valid_before_utc}")
    print(f"  not after : {leaf.not_valid_after_utc}")
    print(f"  chain     : {len(chain)} elements (leaf ... trust bundle)")
    out = subprocess.run(["openssl", "verify", "-CAfile", str(d / "bundle.pem"), str(d / "leaf.pem")],
                         capture_output=True, text=True)
    print(f"  openssl verify: {out.stdout.strip() or out.stderr.strip()}")
    if out.returncode != 0:
        sys.exit(1)


if __name__ == "__main__":
    cmd, d = sys.argv[1], Path(sys.argv[2])
    if cmd == "init":
        init(d)
    else:
        request(d, sys.argv[3])
