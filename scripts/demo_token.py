"""The demo's stand-in for a Kubernetes cluster: an RSA signing key, its JWKS (what
the API server publishes at /openid/v1/jwks) and a service account token for
demo/web, as the kubelet would mount it (PyJWT, cryptography).

usage: demo_token.py DIR    writes DIR/jwks.json and DIR/token
"""

import base64
import json
import sys
import time
from pathlib import Path

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


if __name__ == "__main__":
    init(Path(sys.argv[1]))
